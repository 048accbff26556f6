"""`voice-agent generate` as a user runs it: streamed text, units per read, the dump, the reply WAV,
repeatable greedy runs, and clear errors for bad audio."""

from __future__ import annotations

import re

import numpy as np
import pytest
import soundfile as sf

from voice_agent.cli import main
from voice_agent.model.tiny import make_tiny


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=1)


@pytest.fixture(scope="module")
def question(tmp_path_factory):
    """1.5 s of a voiced signal, stereo at 44.1 kHz: the command must mix down and resample."""
    rate = 44_100
    t = np.arange(int(1.5 * rate)) / rate
    x = 0.2 * np.sin(2 * np.pi * 140 * t) * (0.6 + 0.4 * np.sin(2 * np.pi * 4 * t))
    path = tmp_path_factory.mktemp("audio") / "q.wav"
    sf.write(path, np.stack([x, 0.5 * x], axis=1), rate)
    return path


def generate(tiny, question, tmp_path, *extra):
    dump = tmp_path / "run.npz"
    args = ["generate", "--model-dir", str(tiny.model_dir), "--input", str(question), "--temperature", "0",
            "--max-new-tokens", "7", "--max-final-units", "12", "--dump", str(dump), *extra]
    assert main(args) == 0
    return dict(np.load(dump))


def test_dump_arrays_and_printed_progress(tiny, question, tmp_path, capsys):
    d = generate(tiny, question, tmp_path)
    out = capsys.readouterr().out
    assert out.count("units]") == len(d["unit_blocks"])  # one progress mark per read
    assert d["mel"].shape == (128, 3000) and d["mel"].dtype == np.float32
    assert d["encoder_out"].shape == (1500, 128)
    assert d["adapter_out"].shape == (300, 64)
    assert (d["prompt_ids"] == -200).sum() == 1
    assert d["first_logits"].shape == (384,)
    n = len(d["text_ids"])
    assert 1 <= n <= 7 and d["tts_hidden"].shape == (n, 64)
    assert d["unit_blocks"].sum() == len(d["units"])
    assert len(d["unit_blocks"]) == -(-n // 3)
    assert np.argmax(d["first_logits"]) == d["text_ids"][0]  # greedy


def test_dump_holds_every_llm_step_every_read_and_every_tts_id(tiny, question, tmp_path):
    import torch

    from voice_agent.model.speech_lm import SpeechLM

    d = generate(tiny, question, tmp_path)
    text, n = d["text_ids"], len(d["text_ids"])
    assert d["llm_logits"].shape == (n, 384) and d["llm_logits"].dtype == np.float32
    np.testing.assert_array_equal(d["llm_logits"][0], d["first_logits"])
    np.testing.assert_array_equal(d["llm_logits"].argmax(axis=1), text)  # greedy, no repetition penalty
    reads, final = d["read_ids"], d["read_final"]
    assert reads.shape == (len(d["unit_blocks"]), 3) and final.dtype == bool
    assert final.tolist() == [False] * (len(final) - 1) + [True]
    np.testing.assert_array_equal(reads[reads >= 0], text)  # every text token read once, in order
    lm = SpeechLM.load(tiny.model_dir)
    assert d["tts_fused"].shape == (n, lm.config.tts.hidden_size)
    with torch.inference_mode():
        fused = lm.tts.fuse(torch.from_numpy(d["tts_hidden"]), torch.from_numpy(text))
    np.testing.assert_allclose(d["tts_fused"], fused.numpy(), rtol=1e-5, atol=1e-6)
    ids = d["tts_ids"]
    units = [int(i) - lm.tok.unit_offset for i in ids if i != lm.tok.tts_eos_id]
    assert units == d["units"].tolist()
    assert all(0 <= u < 6561 for u in units)  # raw ids: units at their offset, or the TTS eos


def test_greedy_runs_repeat_exactly(tiny, question, tmp_path):
    a = generate(tiny, question, tmp_path / "a")
    b = generate(tiny, question, tmp_path / "b", "--seed", "99")
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_reply_wav_with_the_vocoder(tiny, question, tmp_path):
    out = tmp_path / "reply.wav"
    d = generate(tiny, question, tmp_path, "--vocoder-dir", str(tiny.cosy2_decoder), "--output", str(out))
    wav, rate = sf.read(out)
    assert rate == 24_000
    assert len(wav) == len(d["wav"]) == 480 * d["flow_mel"].shape[1]
    assert d["flow_mel"].shape == (80, 2 * len(d["units"]))
    assert np.abs(d["wav"]).max() > 0


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda p: p.write_bytes(b"this is not audio"), "q.wav"),
        (lambda p: sf.write(p, np.zeros(0), 16_000), "empty|no samples|zero"),
        (lambda p: sf.write(p, np.zeros(31 * 16_000, np.float32), 16_000), "30"),
    ],
)
def test_bad_audio_is_a_clear_error(tiny, tmp_path, capsys, make, match):
    path = tmp_path / "q.wav"
    make(path)
    assert main(["generate", "--model-dir", str(tiny.model_dir), "--input", str(path)]) == 2
    err = capsys.readouterr().err
    assert "error" in err and str(path) in err
    assert re.search(match, err, flags=re.IGNORECASE)


def test_missing_model_dir_is_a_clear_error(tmp_path, question, capsys):
    assert main(["generate", "--model-dir", str(tmp_path / "nope"), "--input", str(question)]) == 2
    assert "nope" in capsys.readouterr().err
