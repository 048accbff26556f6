"""Tests for voice_agent.audio: file loading, band-limited resampling, PCM16 conversions."""

from __future__ import annotations

from math import ceil

import numpy as np
import pytest
import soundfile as sf

from voice_agent.audio import (
    INPUT_SAMPLE_RATE,
    PCM16_SCALE,
    Resampler,
    float_to_pcm16,
    load_audio,
    pcm16_to_float,
    resample,
)
from voice_agent.errors import AudioInputError

EDGE = 300  # output samples skipped at each end when measuring (filter start-up and tail)


def sine(freq_hz: float, rate: int, seconds: float = 1.0, amplitude: float = 0.5) -> np.ndarray:
    t = np.arange(int(round(rate * seconds))) / rate
    return (amplitude * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def fit_sine(y: np.ndarray, freq_hz: float, rate: int) -> tuple[float, float]:
    """Least-squares fit of a sine at `freq_hz`: (amplitude, rms of what is left)."""
    t = np.arange(len(y)) / rate
    basis = np.stack([np.sin(2 * np.pi * freq_hz * t), np.cos(2 * np.pi * freq_hz * t)], axis=1)[EDGE:-EDGE]
    target = y[EDGE:-EDGE].astype(np.float64)
    coef, *_ = np.linalg.lstsq(basis, target, rcond=None)
    residual = target - basis @ coef
    return float(np.hypot(*coef)), float(np.sqrt(np.mean(residual**2)))


@pytest.mark.parametrize(
    ("src", "dst", "freq"),
    [(48000, 16000, 1000.0), (22050, 16000, 3000.0), (16000, 24000, 5000.0), (44100, 16000, 440.0),
     (8000, 16000, 2500.0), (24000, 48000, 9000.0), (48000, 16000, 6400.0)],
)
def test_resample_keeps_sine_frequency_amplitude_and_phase(src: int, dst: int, freq: float) -> None:
    x = sine(freq, src)
    y = resample(x, src, dst)
    assert y.dtype == np.float32
    assert len(y) == ceil(len(x) * dst / src)
    amplitude, residual = fit_sine(y, freq, dst)
    assert amplitude == pytest.approx(0.5, abs=1e-3)
    assert residual < 1e-4  # nothing else: same frequency, no added tones, no delay
    expected = sine(freq, dst, seconds=len(y) / dst)
    np.testing.assert_allclose(y[EDGE:-EDGE], expected[EDGE:-EDGE], atol=1e-3)  # zero delay


@pytest.mark.parametrize(("src", "dst", "freq"), [(48000, 16000, 9000.0), (48000, 16000, 12000.0),
                                                 (44100, 16000, 10000.0), (24000, 16000, 8500.0)])
def test_resample_removes_tones_above_new_nyquist(src: int, dst: int, freq: float) -> None:
    y = resample(sine(freq, src), src, dst)
    rms = np.sqrt(np.mean(y[EDGE:-EDGE].astype(np.float64) ** 2))
    assert 20 * np.log10(rms / (0.5 / np.sqrt(2))) < -70  # an alias would be at full level


@pytest.mark.parametrize(("src", "dst"), [(22050, 16000), (16000, 24000), (48000, 16000), (8000, 16000)])
def test_streamed_resampling_equals_offline(src: int, dst: int) -> None:
    rng = np.random.default_rng(1)
    x = rng.standard_normal(src // 2).astype(np.float32)
    offline = resample(x, src, dst)
    resampler = Resampler(src, dst)
    pieces, i = [], 0
    while i < len(x):
        n = int(rng.integers(1, 700))
        pieces.append(resampler.process(x[i : i + n]))
        i += n
    pieces.append(resampler.flush())
    streamed = np.concatenate(pieces)
    assert streamed.shape == offline.shape
    np.testing.assert_allclose(streamed, offline, atol=1e-5)


def test_resample_same_rate_is_identity_and_rejects_bad_input() -> None:
    x = sine(100.0, 16000, 0.1)
    np.testing.assert_array_equal(resample(x, 16000, 16000), x)
    with pytest.raises(ValueError, match="mono"):
        resample(np.zeros((2, 10)), 16000, 24000)
    with pytest.raises(ValueError, match="sample rates"):
        Resampler(0, 16000)


def test_load_audio_mixes_channels_down(tmp_path) -> None:
    left = np.round(sine(300.0, 16000) * PCM16_SCALE).astype(np.int16)
    right = np.round(sine(1100.0, 16000, amplitude=0.25) * PCM16_SCALE).astype(np.int16)
    path = tmp_path / "stereo.wav"
    sf.write(path, np.stack([left, right], axis=1), 16000, subtype="PCM_16")
    audio = load_audio(path)  # 16 kHz PCM16 in: exactly int16 / 32768, averaged
    assert audio.dtype == np.float32 and audio.shape == (16000,)
    np.testing.assert_allclose(audio, (left / PCM16_SCALE + right / PCM16_SCALE) / 2, atol=1e-7)


def test_load_audio_resamples_flac_to_model_rate(tmp_path) -> None:
    path = tmp_path / "tone.flac"
    x = sine(700.0, 48000, seconds=0.5)
    sf.write(path, np.stack([x, x, x], axis=1), 48000)
    audio = load_audio(path)
    assert audio.shape == (8000,)
    amplitude, residual = fit_sine(audio, 700.0, INPUT_SAMPLE_RATE)
    assert amplitude == pytest.approx(0.5, abs=2e-3) and residual < 1e-3
    assert load_audio(path, rate=24000).shape == (12000,)


def test_load_audio_errors_name_the_file(tmp_path) -> None:
    with pytest.raises(AudioInputError, match="missing.wav"):
        load_audio(tmp_path / "missing.wav")

    text = tmp_path / "notes.wav"
    text.write_text("this is not audio")
    with pytest.raises(AudioInputError, match=r"unreadable audio file .*notes\.wav"):
        load_audio(text)

    empty = tmp_path / "empty.wav"
    sf.write(empty, np.zeros(0, dtype=np.float32), 16000)
    with pytest.raises(AudioInputError, match=r"empty audio file .*empty\.wav"):
        load_audio(empty)

    long = tmp_path / "long.wav"
    sf.write(long, np.zeros(2 * 8000, dtype=np.float32), 8000)
    with pytest.raises(AudioInputError, match=r"long\.wav is too long: expected at most 1.5 s, got 2.00 s"):
        load_audio(long, max_seconds=1.5)
    assert load_audio(long, max_seconds=2.0).shape == (32000,)


def test_pcm16_round_trip_and_scale() -> None:
    ints = np.array([0, 1, -1, 16384, -16384, 32767, -32768], dtype="<i2")
    floats = pcm16_to_float(ints.tobytes())
    assert floats.dtype == np.float32
    np.testing.assert_array_equal(floats, ints / 32768.0)
    np.testing.assert_array_equal(pcm16_to_float(ints), floats)
    assert float_to_pcm16(floats) == ints.tobytes()
    rng = np.random.default_rng(0)
    raw = rng.integers(-32768, 32768, size=1000).astype("<i2").tobytes()
    assert float_to_pcm16(pcm16_to_float(raw)) == raw


def test_float_to_pcm16_clips_and_pcm16_to_float_rejects_odd_bytes() -> None:
    clipped = np.frombuffer(float_to_pcm16(np.array([1.5, -2.0, 1.0, 0.25])), dtype="<i2")
    np.testing.assert_array_equal(clipped, [32767, -32768, 32767, 8192])
    with pytest.raises(ValueError, match="even number"):
        pcm16_to_float(b"\x00\x01\x02")
    with pytest.raises(ValueError, match="int16"):
        pcm16_to_float(np.zeros(4, dtype=np.float32))
