"""`voice-agent loadtest` runs: steps, warm-up, the window, the ramp, failures, Ctrl-C and the options, with a
fake caller whose latency grows with the callers on the line; then the real harness against the real server
on the tiny demo model, once per protocol (figures checked for presence, never timed)."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from voice_agent.tools.loadtest.records import TurnRecord, Utterance
from voice_agent.tools.loadtest.report import JSON_NAME, PLOT_NAMES, read_run
from voice_agent.tools.loadtest.run import Plan, build_parser, execute, loadtest_main
from voice_agent.tools.loadtest.stats import StepSummary

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TURN_S = 0.06  # the fake caller's turn length


class FakeCallers:
    """A stand-in for caller.run_caller: a turn every TURN_S, first audio 100 ms + 100 ms per caller on the
    line; `fail` callers raise at once; `interrupt_after` turns in all raise SIGINT in the harness."""

    def __init__(self, fail: Sequence[int] = (), interrupt_after: int | None = None) -> None:
        self.fail, self.interrupt_after = set(fail), interrupt_after
        self.live = 0
        self.total = 0
        self.calls: list[dict[str, Any]] = []

    async def __call__(self, url: str, protocol: str, *, caller: int, corpus: Sequence[Utterance], deadline: float,
                       max_turns: int | None, barge_in: float, key: str | None, seed: int,
                       on_turn: Callable[[TurnRecord], None], jitter_ms: float = 60.0) -> None:
        self.calls.append(dict(url=url, protocol=protocol, caller=caller, seed=seed, max_turns=max_turns))
        if caller in self.fail:
            raise ConnectionRefusedError("refused")
        self.live += 1
        try:
            turn = 0
            while time.monotonic() < deadline and (max_turns is None or turn < max_turns):
                await asyncio.sleep(TURN_S)
                first = 100.0 * self.live
                on_turn(TurnRecord(
                    caller=caller, turn=turn, protocol=protocol, utterance="q", speech_s=0.05,
                    speech_end=time.monotonic() - 0.01, speech_stopped_ms=20.0, first_text_ms=first - 10,
                    first_audio_ms=first, reply_audio_ms=40.0, reply_done_ms=first + 40, rtf=0.5, server_timings={},
                    early=False, underruns=0, underrun_total_ms=0.0, underrun_worst_ms=0.0, max_gap_ms=20.0,
                    jitter_ms=jitter_ms, reply_started_ms=first + jitter_ms,
                    reply_chunks=[(first, 20.0), (first + 20, 20.0)]))
                turn += 1
                self.total += 1
                if self.interrupt_after is not None and self.total >= self.interrupt_after:
                    signal.raise_signal(signal.SIGINT)
        finally:
            self.live -= 1


def plan(*argv: str) -> Plan:
    return Plan.from_args(build_parser().parse_args(["ws://127.0.0.1:9", *argv]))


def run_fake(tmp_path: Path, fake: FakeCallers, *argv: str) -> tuple[int, dict[str, Any], str, str]:
    out, err = io.StringIO(), io.StringIO()
    code = execute(plan(*argv), [], tmp_path, run_caller=fake, stdout=out, stderr=err)
    return code, json.loads((tmp_path / JSON_NAME).read_text()), out.getvalue(), err.getvalue()


def test_turns_mode_measures_each_callers_turns_after_the_warm_up(tmp_path: Path) -> None:
    fake = FakeCallers()
    code, doc, out, err = run_fake(tmp_path, fake, "--callers", "3", "--turns", "4", "--warmup-turns", "2",
                                   "--stagger-ms", "10", "--slo", "p95_first_audio_ms<=1000")
    assert code == 0, out
    assert [c["max_turns"] for c in fake.calls] == [6, 6, 6]
    assert [c["url"] for c in fake.calls] == ["ws://127.0.0.1:9/ws"] * 3  # the protocol's path added
    assert sorted(c["seed"] for c in fake.calls) == [0, 1, 2]
    phases = [(t["caller"], t["turn"], t["phase"]) for t in doc["turns"]]
    assert sorted(phases) == [(c, t, "warmup" if t < 2 else "measured") for c in range(3) for t in range(6)]
    (step,) = doc["steps"]
    assert (step["callers"], step["turns"], step["answered"], step["failed"]) == (3, 12, 12, 0)
    assert step["slo"]["holds"]
    assert doc["run"]["stopped_by"] == "completed" and not doc["run"]["interrupted"]
    assert "SLO (p95_first_audio_ms<=1000): holds" in out
    assert "[step 1 N=3]" in err and "measured" in err  # the progress line
    for name in PLOT_NAMES:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC


def test_window_mode_measures_only_turns_that_ended_inside_the_window(tmp_path: Path) -> None:
    code, doc, out, _ = run_fake(tmp_path, FakeCallers(), "--callers", "2", "--window-s", "1", "--warmup-turns", "3",
                                 "--stagger-ms", "50", "--slo", "p95_first_audio_ms<=1000")
    assert code == 0, out
    run = read_run(tmp_path / JSON_NAME)
    (step,) = run.steps
    assert step.window_s == pytest.approx(1.0, abs=0.1)
    measured = [t.record for t in run.turns if t.phase == "measured"]
    warmups = [t.record for t in run.turns if t.phase == "warmup"]
    assert len(warmups) == 6 and {r.turn for r in warmups} == {0, 1, 2}
    assert 2 * 1.0 / TURN_S * 0.5 < len(measured) <= 2 * 1.0 / TURN_S + 2, len(measured)
    first_measured = min(r.speech_end for r in measured)
    last_warmup = max(r.speech_end for r in warmups)
    assert first_measured >= last_warmup  # the window opened once every caller had warmed up
    assert max(r.speech_end for r in measured) - first_measured <= 1.0
    assert step.turns == len(measured)


def test_auto_ramp_doubles_until_the_slo_fails_and_names_the_largest_n_that_held(tmp_path: Path) -> None:
    # first audio = 100 ms x callers on the line: p95 <= 450 holds at 1, 2, 4 and fails at 8
    code, doc, out, _ = run_fake(tmp_path, FakeCallers(), "--ramp", "auto", "--turns", "2", "--warmup-turns", "1",
                                 "--stagger-ms", "0", "--slo", "p95_first_audio_ms<=450")
    assert code == 0, out
    assert [s["callers"] for s in doc["steps"]] == [1, 2, 4, 8]
    assert [s["slo"]["holds"] for s in doc["steps"]] == [True, True, True, False]
    assert doc["run"]["largest_n_holding_slo"] == 4
    assert doc["run"]["stopped_by"] == "auto ramp: the SLO failed at N=8"
    assert "largest N holding the SLO (p95_first_audio_ms<=450): 4" in out
    assert {t["step"] for t in doc["turns"]} == {0, 1, 2, 3}


def test_auto_ramp_stops_at_callers(tmp_path: Path) -> None:
    code, doc, _, _ = run_fake(tmp_path, FakeCallers(), "--ramp", "auto", "--callers", "2", "--turns", "1",
                               "--warmup-turns", "0", "--stagger-ms", "0", "--slo", "p95_first_audio_ms<=10000")
    assert [s["callers"] for s in doc["steps"]] == [1, 2]
    assert doc["run"]["stopped_by"] == "auto ramp reached --callers 2"
    assert code == 0


def test_a_failing_caller_counts_against_its_step(tmp_path: Path) -> None:
    fake = FakeCallers(fail=[1])
    code, doc, out, _ = run_fake(tmp_path, fake, "--ramp", "1,2", "--turns", "2", "--warmup-turns", "1",
                                 "--stagger-ms", "0", "--slo", "error_share<=0.01")
    assert [s["failed"] for s in doc["steps"]] == [0, 1]
    assert doc["steps"][1]["errors"] == {"caller stopped: ConnectionRefusedError: refused": 1}
    assert doc["run"]["largest_n_holding_slo"] == 1
    assert code == 0
    assert "N=2: 1 x caller stopped: ConnectionRefusedError: refused" in out


def test_ctrl_c_stops_cleanly_and_still_writes_what_was_measured(tmp_path: Path) -> None:
    fake = FakeCallers(interrupt_after=12)
    code, doc, out, err = run_fake(tmp_path, fake, "--callers", "2", "--window-s", "60", "--warmup-turns", "1",
                                   "--stagger-ms", "0", "--slo", "p95_first_audio_ms<=1000")
    assert code == 130
    assert doc["run"]["interrupted"] and doc["run"]["stopped_by"] == "interrupted (Ctrl-C)"
    assert doc["steps"][0]["turns"] >= 8  # the window's turns so far
    assert fake.live == 0  # every caller was stopped
    assert "interrupted" in err
    assert (tmp_path / "timeline.png").read_bytes()[:8] == PNG_MAGIC


def test_the_duration_bounds_the_run(tmp_path: Path) -> None:
    started = time.monotonic()
    _, doc, _, _ = run_fake(tmp_path, FakeCallers(), "--ramp", "1,2,4", "--window-s", "5", "--duration", "1.5",
                            "--warmup-turns", "0", "--stagger-ms", "0")
    assert time.monotonic() - started < 4.0
    assert doc["run"]["stopped_by"] == "--duration 1.5 s reached"
    assert len(doc["steps"]) == 1


@pytest.mark.parametrize(("argv", "message"), [
    (["ws://h:1", "--slo", "p95_first_audio_ms=800"], "expected METRIC OP NUMBER"),
    (["ws://h:1", "--callers", "0"], "--callers: expected 1..128, got 0"),
    (["ws://h:1", "--callers", "500"], "--callers: expected 1..128, got 500"),
    (["ws://h:1", "--ramp", "1,two"], "--ramp: expected N,N,... (e.g. 1,2,4,8) or auto, got '1,two'"),
    (["ws://h:1", "--ramp", "1,2", "--callers", "4"], "expected --callers N or --ramp 1,2, got both"),
    (["ws://h:1", "--duration", "99999"], "--duration: expected 1..3600, got 99999"),
    (["ws://h:1", "--barge-in", "1.5"], "--barge-in: expected 0..1, got 1.5"),
    (["ftp://h:1"], "URL: expected a ws://, wss://, http:// or https:// URL with a host, got 'ftp://h:1'"),
    ([], "expected a server URL"),
])
def test_usage_errors_say_what_was_expected(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert loadtest_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("voice-agent loadtest: error: ") and message in err, err


def test_urls() -> None:
    assert plan().url == "ws://127.0.0.1:9/ws"
    assert Plan.from_args(build_parser().parse_args(["http://h:1", "--protocol", "openai"])).url == \
        "ws://h:1/v1/realtime?model=voice-agent"
    assert Plan.from_args(build_parser().parse_args(["wss://h/custom/twilio", "--protocol", "twilio"])).url == \
        "wss://h/custom/twilio"
    assert "key" not in json.dumps(plan("--key", "s3cret").info()).replace("key_given", "")


def test_compare_prints_ratios_of_two_run_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    run_fake(a, FakeCallers(), "--callers", "2", "--turns", "6", "--warmup-turns", "0", "--stagger-ms", "0")
    run_fake(b, FakeCallers(), "--callers", "2", "--turns", "6", "--warmup-turns", "0", "--stagger-ms", "0")
    assert loadtest_main(["--compare", str(a / JSON_NAME), str(b / JSON_NAME)]) == 0
    out = capsys.readouterr().out
    assert "B/A" in out and "no clear difference" in out


# ---- the real server ---------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from realtime_client import realtime_server

    with realtime_server(tmp_path_factory.mktemp("demo")) as addr:
        yield addr


@pytest.mark.parametrize("protocol", ["native", "openai", "twilio"])
def test_loadtest_runs_against_the_real_server(server: str, protocol: str, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    code = loadtest_main([f"ws://{server}", "--protocol", protocol, "--callers", "2", "--turns", "1",
                          "--warmup-turns", "0", "--stagger-ms", "200", "--duration", "40", "--out", str(tmp_path),
                          "--slo", "p95_first_audio_ms<=100000"])
    out = capsys.readouterr().out
    doc = json.loads((tmp_path / JSON_NAME).read_text())
    (step,) = doc["steps"]
    assert set(step) == set(StepSummary.__dataclass_fields__)
    assert step["turns"] == 2 and step["failed"] == 0, out
    assert step["first_audio_ms"]["p50"] is not None, out
    for row in doc["turns"]:
        assert set(row) == {"step", "phase", *TurnRecord.__dataclass_fields__}
        assert row["protocol"] == protocol and row["first_audio_ms"] is not None and row["reply_chunks"], row
    assert code == 0, out
    for name in PLOT_NAMES:
        assert (tmp_path / name).read_bytes()[:8] == PNG_MAGIC
