"""Speaker voices: Kaldi fbank against its defining formula, resampling, CAM++ through ONNX Runtime (with a
fake model), voice files and names, spk2info entries, default voices and their errors."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from voice_agent.errors import AudioInputError, VoiceError
from voice_agent.model.cosy2.tiny import write_tiny_voices
from voice_agent.model.cosy2.voice import (
    campplus_embedding,
    campplus_features,
    kaldi_fbank,
    load_voice,
    read_embedding_file,
    read_prompt_16k,
    resample,
)


def fbank_by_definition(signal: np.ndarray) -> np.ndarray:
    """Kaldi fbank written out step by step in float64 with explicit loops and a DFT matrix."""
    frame_len, shift, n_fft, n_mels, rate = 400, 160, 512, 80, 16000
    n_frames = 1 + (len(signal) - frame_len) // shift
    i = np.arange(frame_len)
    povey = (0.5 - 0.5 * np.cos(2 * np.pi * i / (frame_len - 1))) ** 0.85
    k = np.arange(n_fft // 2 + 1)
    dft = np.exp(-2j * np.pi * np.outer(k, np.arange(n_fft)) / n_fft)  # (257, 512)

    def mel(f: np.ndarray | float) -> np.ndarray | float:
        return 1127.0 * np.log(1.0 + np.asarray(f) / 700.0)

    lo, hi = mel(20.0), mel(rate / 2)
    delta = (hi - lo) / (n_mels + 1)
    bin_mel = mel(k * rate / n_fft)
    banks = np.zeros((n_mels, n_fft // 2 + 1))
    for m in range(n_mels):
        left, center, right = lo + m * delta, lo + (m + 1) * delta, lo + (m + 2) * delta
        for j in range(n_fft // 2):  # the Nyquist bin gets no weight
            up = (bin_mel[j] - left) / (center - left)
            down = (right - bin_mel[j]) / (right - center)
            banks[m, j] = max(0.0, min(up, down))
    out = np.zeros((n_frames, n_mels))
    for f in range(n_frames):
        x = signal[f * shift: f * shift + frame_len].astype(np.float64)
        x = x - x.mean()
        y = np.empty_like(x)
        y[0] = x[0] - 0.97 * x[0]
        for n in range(1, frame_len):
            y[n] = x[n] - 0.97 * x[n - 1]
        z = np.zeros(n_fft)
        z[:frame_len] = y * povey
        power = np.abs(dft @ z) ** 2
        out[f] = np.log(np.maximum(banks @ power, np.finfo(np.float32).eps))
    return out


def test_fbank_matches_its_defining_formula() -> None:
    rng = np.random.default_rng(0)
    t = np.arange(1234) / 16000
    signal = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * rng.standard_normal(t.size) + 0.1).astype(np.float32)
    ours = kaldi_fbank(signal).numpy()
    assert ours.shape == (1 + (1234 - 400) // 160, 80) == (6, 80)
    np.testing.assert_allclose(ours, fbank_by_definition(signal), rtol=0, atol=2e-4)
    silent = kaldi_fbank(np.zeros(400, dtype=np.float32)).numpy()
    np.testing.assert_allclose(silent, np.log(np.finfo(np.float32).eps), rtol=1e-6)  # the float eps floor
    feats = campplus_features(signal)
    torch.testing.assert_close(feats.mean(dim=0), torch.zeros(80), rtol=0, atol=1e-5)
    with pytest.raises(AudioInputError, match="at least 400 samples"):
        kaldi_fbank(np.zeros(399, dtype=np.float32))


def test_resample_keeps_a_tone_and_the_length() -> None:
    t = np.arange(22050) / 22050
    tone = np.sin(2 * np.pi * 440 * t).astype(np.float32)
    out = resample(tone, 22050)
    assert out.shape == (16000,) and out.dtype == np.float32  # ceil(22050 * 320 / 441)
    expected = np.sin(2 * np.pi * 440 * np.arange(16000) / 16000)
    np.testing.assert_allclose(out[300:-300], expected[300:-300], atol=2e-3)
    assert np.array_equal(resample(tone[:100], 16000), tone[:100])


def write_fake_campplus(path: Path, out_dim: int = 192, seed: int = 0) -> np.ndarray:
    """FakeCampPlus: [1, T, 80] -> mean over time of x^2 -> MatMul [80, out_dim] -> [1, out_dim].
    (x^2 rather than x: the real input is mean-normalised over time, so its plain mean is zero.)"""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    weight = np.random.default_rng(seed).standard_normal((80, out_dim)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Mul", ["feats", "feats"], ["squared"]),
            helper.make_node("ReduceMean", ["squared"], ["pooled"], axes=[1], keepdims=0),
            helper.make_node("MatMul", ["pooled", "weight"], ["embedding"]),
        ],
        "fake_campplus",
        [helper.make_tensor_value_info("feats", TensorProto.FLOAT, [1, "T", 80])],
        [helper.make_tensor_value_info("embedding", TensorProto.FLOAT, [1, out_dim])],
        [numpy_helper.from_array(weight, "weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return weight


def test_campplus_embedding_runs_the_onnx_model_on_cmn_features(tmp_path: Path) -> None:
    weight = write_fake_campplus(tmp_path / "campplus.onnx")
    wav = np.random.default_rng(1).standard_normal(8000).astype(np.float32) * 0.1
    emb = campplus_embedding(wav, tmp_path / "campplus.onnx")
    feats = campplus_features(wav).numpy()
    assert emb.shape == (192,) and emb.dtype == torch.float32
    np.testing.assert_allclose(emb.numpy(), (feats**2).mean(axis=0) @ weight, rtol=1e-4, atol=1e-4)
    write_fake_campplus(tmp_path / "wrong.onnx", out_dim=100)
    with pytest.raises(VoiceError, match="expected a 192-value output"):
        campplus_embedding(wav, tmp_path / "wrong.onnx")
    (tmp_path / "garbage.onnx").write_bytes(b"\x00not onnx")
    with pytest.raises(VoiceError, match="garbage.onnx"):
        campplus_embedding(wav, tmp_path / "garbage.onnx")
    with pytest.raises(VoiceError, match="missing file"):
        campplus_embedding(wav, tmp_path / "absent.onnx")


def test_embedding_file_formats(tmp_path: Path) -> None:
    vec = np.arange(192, dtype=np.float32) / 192
    torch.save(torch.from_numpy(vec)[None], tmp_path / "a.pt")
    torch.save(torch.from_numpy(vec), tmp_path / "b.pt")
    np.save(tmp_path / "c.npy", vec[None].astype(np.float64))
    np.savez(tmp_path / "d.npz", anything=vec)
    np.savez(tmp_path / "e.npz", embedding=vec, other=np.zeros(3))
    for name in ("a.pt", "b.pt", "c.npy", "d.npz", "e.npz"):
        emb = read_embedding_file(tmp_path / name)
        assert emb.dtype == torch.float32 and torch.equal(emb, torch.from_numpy(vec)), name


def test_embedding_file_errors_say_what_was_expected(tmp_path: Path) -> None:
    torch.save({"embedding": torch.zeros(192)}, tmp_path / "dict.pt")
    np.save(tmp_path / "shape.npy", np.zeros((2, 192), dtype=np.float32))
    np.save(tmp_path / "ints.npy", np.zeros(192, dtype=np.int64))
    np.save(tmp_path / "nan.npy", np.full(192, np.nan, dtype=np.float32))
    np.savez(tmp_path / "two.npz", a=np.zeros(192), b=np.zeros(192))
    (tmp_path / "garbage.pt").write_bytes(b"garbage" * 10)
    (tmp_path / "voice.txt").write_text("hello")
    cases = {
        "dict.pt": "expected a float tensor", "ints.npy": "expected a float embedding",
        "shape.npy": r"expected shape \[1, 192\] or \[192\], got \[2, 192\]",
        "nan.npy": "expected finite values",
        "two.npz": "expected one array or an 'embedding' array", "garbage.pt": "malformed file",
        "voice.txt": "expected a voice file ending in", "absent.npy": "missing file",
    }
    for name, message in cases.items():
        with pytest.raises(VoiceError, match=message):
            read_embedding_file(tmp_path / name)


def test_voice_names_spk2info_entries_and_unknown_names(tmp_path: Path) -> None:
    write_tiny_voices(tmp_path, seed=4)
    en = np.load(tmp_path / "voices" / "en.npy")
    assert torch.equal(load_voice(None, tmp_path), torch.from_numpy(en))
    assert torch.equal(load_voice("en", tmp_path), torch.from_numpy(en))
    table = {
        "spk1": {"embedding": torch.ones(1, 192), "speech_feat": torch.zeros(5, 80)},
        "spk2": {"llm_embedding": torch.zeros(1, 192), "flow_embedding": torch.full((1, 192), 2.0)},
        "broken": {"speech_feat": torch.zeros(5, 80)},
    }
    torch.save(table, tmp_path / "spk2info.pt")
    assert torch.equal(load_voice("spk1", tmp_path), torch.ones(192))
    assert torch.equal(load_voice("spk2", tmp_path), torch.full((192,), 2.0))  # flow_embedding first
    with pytest.raises(VoiceError, match="expected one of the keys"):
        load_voice("broken", tmp_path)
    with pytest.raises(VoiceError, match=r"unknown voice 'nobody' .*'en'.*'spk1'"):
        load_voice("nobody", tmp_path)
    with pytest.raises(VoiceError, match="needs a decoder directory"):
        load_voice("en", None)
    with pytest.raises(VoiceError, match="missing file"):
        load_voice("../elsewhere", tmp_path)  # not a name: read as a path


def test_default_voice_is_computed_from_its_prompt_once_and_cached(tmp_path: Path) -> None:
    weight = write_fake_campplus(tmp_path / "campplus.onnx")
    with pytest.raises(VoiceError, match=r"prompt .*prompt_zh.wav is missing.*LLaMA-Omni2"):
        load_voice("zh", tmp_path)
    rate = 22050  # the prompts' rate
    t = np.arange(int(0.6 * rate)) / rate
    prompt = (0.2 * np.sin(2 * np.pi * 180 * t) * (1 + np.sin(2 * np.pi * 3 * t))).astype(np.float32)
    sf.write(tmp_path / "prompt_zh.wav", np.stack([prompt, prompt], axis=1), rate, subtype="FLOAT")
    wav16k = read_prompt_16k(tmp_path / "prompt_zh.wav")
    np.testing.assert_allclose(wav16k, resample(prompt, rate), atol=1e-6)  # channel mean, no rescaling
    emb = load_voice("zh", tmp_path)
    expected = (campplus_features(wav16k).numpy() ** 2).mean(axis=0) @ weight
    np.testing.assert_allclose(emb.numpy(), expected, rtol=1e-4, atol=1e-4)
    assert (tmp_path / "voices" / "zh.npy").is_file()
    (tmp_path / "campplus.onnx").unlink()
    (tmp_path / "prompt_zh.wav").rename(tmp_path / "moved.wav")
    assert torch.equal(load_voice("zh", tmp_path), emb)  # from the cache now
    write_fake_campplus(tmp_path / "campplus.onnx")
    assert torch.allclose(load_voice(tmp_path / "moved.wav", tmp_path), emb, atol=1e-6)  # a recording
    (tmp_path / "bad.wav").write_bytes(b"RIFF....not audio")
    with pytest.raises(AudioInputError, match="bad.wav"):
        load_voice(tmp_path / "bad.wav", tmp_path)
