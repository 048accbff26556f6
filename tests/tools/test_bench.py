"""Benchmarks run end to end and print their figures; presets have the real shapes."""

from __future__ import annotations

import pytest
import torch

from voice_agent.model.presets import PRESETS, build_preset
from voice_agent.tools.bench import bench_engine_main, bench_model_main, playback_stall_ms, synthetic_audio


def test_bench_engine_compares_concurrent_and_sequential(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_engine_main(["--preset", "tiny", "--sessions", "2", "--text-tokens", "4", "--final-units", "5",
                              "--audio-seconds", "0.5", "--compare"])
    out = capsys.readouterr().out
    assert code == 0
    for label in ("[concurrent] 2 turns, 0 errors", "[sequential] 2 turns, 0 errors"):
        assert label in out
    for figure in ("first audio ms: p50", "max gap between audio chunks", "playback stalls",
                   "real-time factor per turn", "throughput:", "mean rows per call", "batching ratio",
                   "MiB of KV and flow cache per session; peak"):
        assert figure in out, figure
    assert "mean rows per call: text 1.00, tts 1.00" in out.split("[sequential]")[1]


def test_playback_stalls_count_only_time_without_audio() -> None:
    # chunks of 400 ms arriving every 300 ms never stall; one arriving 900 ms after the audio ran out does
    assert playback_stall_ms([0.0, 0.3, 0.6, 0.9], [400.0] * 4) == 0.0
    assert playback_stall_ms([0.0, 0.3, 1.7], [400.0] * 3) == pytest.approx(900.0)
    assert playback_stall_ms([0.0, 0.5, 1.0], [400.0] * 3) == pytest.approx(200.0)  # 100 ms twice
    assert playback_stall_ms([], []) == 0.0


def test_bench_engine_spreads_arrivals(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_engine_main(["--preset", "tiny", "--sessions", "2", "--text-tokens", "3", "--final-units", "5",
                              "--audio-seconds", "0.5", "--arrival-ms", "200", "--no-flow-cache"])
    out = capsys.readouterr().out
    assert code == 0 and "[concurrent] 2 turns, 0 errors" in out
    assert "flow window 100 units; turn starts spread over 200 ms" in out  # and no chunk cache


def test_bench_model_prints_every_stage(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_model_main(["--preset", "tiny", "--batch", "2", "--steps", "3", "--repeats", "1",
                             "--audio-seconds", "0.5"])
    out = capsys.readouterr().out
    assert code == 0
    for stage in ("mel", "encoder", "adapter", "prefill", "text decode", "tokens/s", "TTS", "units/s",
                  "flow + HiFT per 10-unit block"):
        assert stage in out, stage


@pytest.mark.parametrize("name", ["0.5b", "7b"])
def test_presets_have_the_official_shapes(name: str) -> None:
    lm, decoder, voices = build_preset(name, device="meta")  # shapes only, nothing allocated
    llm = PRESETS[name].llm
    assert llm is not None
    shapes = {k: tuple(v.shape) for k, v in lm.llm.state_dict().items()}
    H, V = llm.hidden_size, llm.vocab_size
    assert shapes["model.embed_tokens.weight"] == (V, H)
    assert shapes["model.layers.0.self_attn.k_proj.weight"] == (llm.num_kv_heads * H // llm.num_heads, H)
    assert lm.llm.tied == (name == "0.5b")
    assert tuple(lm.tts.model.lm_head.weight.shape) == (158227, 896)
    assert tuple(lm.tts.state_dict()["input_proj.0.weight"].shape) == (2 * H, H)
    assert tuple(lm.encoder.conv1.weight.shape) == (1280, 128, 3) and len(lm.encoder.blocks) == 32
    assert tuple(lm.projector.linear1.weight.shape) == (2048, 6400)
    assert sum(p.numel() for p in decoder.flow.parameters()) == pytest.approx(112.5e6, rel=0.01)
    assert sum(p.numel() for p in decoder.hift.parameters()) == pytest.approx(20.8e6, rel=0.01)
    assert tuple(voices["en"].shape) == (192,)


def test_tiny_preset_runs_and_is_reproducible() -> None:
    a, _, _ = build_preset("tiny", seed=3)
    b, _, _ = build_preset("tiny", seed=3)
    feats = a.speech_features([synthetic_audio(0.5, 0)])
    assert torch.equal(a.llm.lm_head.weight, b.llm.lm_head.weight)
    assert feats.adapter_out.shape[-1] == a.config.llm.hidden_size
    with pytest.raises(ValueError, match="unknown preset"):
        build_preset("3b")


# strict: once the worker builds Transcripts(models.transcriber, models.transcriber_unavailable) this passes and
# the marker must go
def test_bench_engine_with_transcripts_reports_when_each_was_done(capsys: pytest.CaptureFixture[str]) -> None:
    code = bench_engine_main(["--preset", "tiny", "--sessions", "2", "--text-tokens", "3", "--final-units", "5",
                              "--audio-seconds", "0.5", "--transcribe"])
    out = capsys.readouterr().out
    assert code == 0 and "; with user transcripts" in out and "[concurrent] 2 turns, 0 errors" in out
    assert "transcripts: 2 done, 0 failed, 0 not done" in out
    assert "transcript done ms (from submission): p50" in out and "first audio ms: p50" in out
