"""`voice-agent bench calls`: its figures, and a short run against the real server on the tiny demo model."""

from __future__ import annotations

import shutil

import pytest
from realtime_client import realtime_server

from voice_agent.serve.app import build_app
from voice_agent.serve.config import ServerConfig
from voice_agent.tools.bench_calls import ahead_ms, bench_calls_main, gaps_ms, underrun_ms


def test_a_paced_stream_is_one_frame_ahead_and_a_burst_is_all_of_it() -> None:
    paced = [(i * 0.02, 20.0) for i in range(50)]  # one 20 ms frame every 20 ms
    assert ahead_ms(paced) == pytest.approx(20.0)
    assert gaps_ms([t for t, _ in paced]) == pytest.approx([20.0] * 49)
    burst = [(0.0, 20.0)] * 50  # a whole second at once
    assert ahead_ms(burst) == pytest.approx(1000.0)
    lead = [(0.0, 20.0)] * 8 + [(0.02 * i, 20.0) for i in range(1, 40)]  # 160 ms queued, then real time
    assert ahead_ms(lead) == pytest.approx(160.0)
    assert underrun_ms(paced) == pytest.approx(0.0, abs=1e-6)
    assert underrun_ms([(0.0, 20.0), (0.1, 20.0)]) == pytest.approx(80.0)  # waited 80 ms for the second


def test_bench_calls_runs_against_the_real_server(tmp_path_factory: pytest.TempPathFactory,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    if shutil.which("espeak-ng") is None:
        pytest.skip("needs espeak-ng (apt)")
    from fakes import FakeEngine

    if "/twilio" not in {getattr(r, "path", "") for r in build_app(ServerConfig(), FakeEngine()).routes}:
        pytest.skip("the app has no /twilio route yet")
    with realtime_server(tmp_path_factory.mktemp("demo")) as addr:
        code = bench_calls_main(["--url", f"ws://{addr}/twilio", "--calls", "1", "2", "--quiet-ms", "1000",
                                 "--max-reply-s", "20", "--text", "Hello, are you there?"])
    out = capsys.readouterr().out
    assert code == 0, out
    for label in ("[1 call] 1 replies, 0 without audio, 0 errors", "[2 calls] 2 replies, 0 without audio, 0 errors"):
        assert label in out, out
    for figure in ("inter-frame gap ms: p50", "largest burst ahead of real time", "(lead 160 ms",
                   "first audio ms after the end of speech: p50", "underruns", "close codes after stop: [1000]"):
        assert figure in out, out
