"""Tests for voice_agent.model.mel against openai-whisper (used here only as the reference)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import whisper

from voice_agent.model.mel import (
    CHUNK_LENGTH,
    HOP_LENGTH,
    N_FRAMES,
    N_SAMPLES,
    SAMPLE_RATE,
    _frames_to_compute,
    log_mel_rows,
    log_mel_spectrogram,
    mel_filterbank,
    mel_frames,
    pad_or_trim,
)


def speech_like(seconds: float, seed: int, level: float = 0.3) -> torch.Tensor:
    """A voiced, gliding harmonic signal with formant-ish amplitudes, noise bursts and a silent gap."""
    rng = np.random.default_rng(seed)
    n = int(seconds * SAMPLE_RATE)
    t = np.arange(n) / SAMPLE_RATE
    f0 = 110 + 40 * np.sin(2 * np.pi * 0.7 * t)  # Hz
    phase = 2 * np.pi * np.cumsum(f0) / SAMPLE_RATE
    voiced = sum(np.sin(h * phase) / h * (1 + np.cos(2 * np.pi * h * f0 / 1500)) for h in range(1, 30))
    envelope = 0.5 * (1 + np.sin(2 * np.pi * 3 * t)) * (t % 1.0 < 0.8)
    noise = rng.standard_normal(n) * ((t % 1.3) > 1.1) * 0.3
    x = envelope * voiced / 6 + noise
    return torch.from_numpy(level * x).float()


def whisper_mel(row: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    return whisper.log_mel_spectrogram(whisper.pad_or_trim(row), n_mels=n_mels)


def test_constants_are_whispers() -> None:
    assert (SAMPLE_RATE, HOP_LENGTH, CHUNK_LENGTH) == (whisper.audio.SAMPLE_RATE, whisper.audio.HOP_LENGTH,
                                                       whisper.audio.CHUNK_LENGTH)
    assert (N_SAMPLES, N_FRAMES) == (480000, 3000) == (whisper.audio.N_SAMPLES, whisper.audio.N_FRAMES)
    assert mel_frames(N_SAMPLES) == N_FRAMES


@pytest.mark.parametrize("n_mels", [80, 128])
def test_filterbank_equals_whispers_stored_filters(n_mels: int) -> None:
    path = os.path.join(os.path.dirname(whisper.__file__), "assets", "mel_filters.npz")
    with np.load(path) as stored:
        expected = stored[f"mel_{n_mels}"]
    ours = mel_filterbank(n_mels)
    assert ours.shape == expected.shape == (n_mels, 201) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, expected, rtol=1e-5, atol=1e-8)


def test_log_mel_equals_whisper_on_speech_like_and_noise() -> None:
    noise = torch.from_numpy(np.random.default_rng(3).standard_normal(4 * SAMPLE_RATE) * 0.05).float()
    batch = torch.stack([speech_like(4.0, seed=0), noise])  # (2, 64000)
    ours = log_mel_spectrogram(batch)
    assert ours.shape == (2, 128, N_FRAMES) and ours.dtype == torch.float32
    for i in range(2):
        torch.testing.assert_close(ours[i], whisper_mel(batch[i]), atol=1e-4, rtol=0)


def test_log_mel_trims_input_longer_than_30_s_like_whisper() -> None:
    x = speech_like(CHUNK_LENGTH + 1.5, seed=1)[None]  # (1, 504000)
    torch.testing.assert_close(log_mel_spectrogram(x)[0], whisper_mel(x[0]), atol=1e-4, rtol=0)


def test_batch_rows_equal_single_rows() -> None:
    # Very different levels: the dynamic-range clamp must use each row's own maximum.
    batch = torch.stack([speech_like(2.0, seed=4, level=0.8), speech_like(2.0, seed=5, level=1e-3)])
    together = log_mel_spectrogram(batch, n_mels=80)
    for i in range(2):
        alone = log_mel_spectrogram(batch[i : i + 1], n_mels=80)
        torch.testing.assert_close(together[i : i + 1], alone, atol=1e-6, rtol=0)
    assert not torch.allclose(together[0], together[1], atol=0.1)


def full_transform(audio: torch.Tensor, n_mels: int = 128) -> torch.Tensor:
    """The plain batched log-mel over every frame of (B, N), as the contract states it (no frame skipped)."""
    window = torch.hann_window(400)
    stft = torch.stft(audio, 400, 160, window=window, center=True, pad_mode="reflect", return_complex=True)
    power = stft[..., :-1].abs() ** 2
    log_spec = torch.clamp(torch.from_numpy(mel_filterbank(n_mels)) @ power, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.amax(dim=(1, 2), keepdim=True) - 8.0)
    return (log_spec + 4.0) / 4.0


@pytest.mark.parametrize("seconds_or_samples", [0, 0.01, 2.0, 29.5, N_SAMPLES - 202, N_SAMPLES - 201, N_SAMPLES])
def test_silent_tail_frames_equal_the_full_transform(seconds_or_samples: float) -> None:
    # Only the frames that can see audio are transformed; the rest must equal the full transform, up to the
    # boundary where the end's reflect padding starts to mirror real samples.
    n = int(seconds_or_samples * SAMPLE_RATE) if isinstance(seconds_or_samples, float) else seconds_or_samples
    audio = torch.zeros(2, N_SAMPLES)
    audio[0, :n] = torch.randn(n, generator=torch.Generator().manual_seed(n)) * 0.1
    audio[1, n // 3 : n // 2] = 1e-3  # a quiet burst, then silence
    got = log_mel_spectrogram(audio, n_mels=80)
    torch.testing.assert_close(got, full_transform(audio, 80), atol=1e-6, rtol=0)
    rows = [audio[0, :n], audio[1, : n // 2]]  # the rows API pads each row itself
    torch.testing.assert_close(log_mel_rows(rows, n_mels=80), got, atol=1e-6, rtol=0)


def test_log_mel_rows_pads_each_row_and_checks_its_input() -> None:
    rows = [speech_like(1.0, seed=7), speech_like(3.5, seed=8), torch.zeros(0)]
    batch = torch.stack([pad_or_trim(r, N_SAMPLES) for r in rows])
    torch.testing.assert_close(log_mel_rows(rows), full_transform(batch), atol=1e-6, rtol=0)
    short = [r[:16000] for r in rows[:2]]
    torch.testing.assert_close(log_mel_rows(short, num_samples=16000), log_mel_spectrogram(torch.stack(short),
                               pad_to=None), atol=1e-6, rtol=0)
    assert _frames_to_compute(16000 - 1, N_SAMPLES) == 103  # frames 0..101 see the audio, then one silent
    assert _frames_to_compute(N_SAMPLES - 201, N_SAMPLES) == N_FRAMES  # the end padding mirrors audio
    with pytest.raises(ValueError, match="1-D audio rows"):
        log_mel_rows([torch.zeros(2, 100)])
    with pytest.raises(ValueError, match="more than 200 samples"):
        log_mel_rows([torch.zeros(100)], num_samples=150)


def test_unpadded_option_computes_over_the_given_samples_only() -> None:
    noise = torch.randn(1, 3 * SAMPLE_RATE, generator=torch.Generator().manual_seed(2))
    x = speech_like(3.0, seed=2)[None] + 0.05 * noise  # (1, 48000), loud up to the last sample
    unpadded = log_mel_spectrogram(x, pad_to=None)
    assert unpadded.shape == (1, 128, 300)
    reference = whisper.log_mel_spectrogram(x[0], n_mels=128)  # whisper without pad_or_trim
    torch.testing.assert_close(unpadded[0], reference, atol=1e-4, rtol=0)
    padded = log_mel_spectrogram(x)
    assert not torch.allclose(padded[0, :, :300], unpadded[0], atol=1e-3)  # documented: numbers change
    with pytest.raises(ValueError, match="more than 200 samples"):
        log_mel_spectrogram(torch.zeros(1, 150), pad_to=None)


def test_pad_or_trim_and_shape_errors() -> None:
    assert pad_or_trim(torch.ones(2, 10), 16).shape == (2, 16)
    assert pad_or_trim(torch.ones(2, 20), 16).shape == (2, 16)
    assert pad_or_trim(torch.ones(2, 10), 16)[:, 10:].abs().sum() == 0
    with pytest.raises(ValueError, match=r"expected audio of shape \(B, N\)"):
        log_mel_spectrogram(torch.zeros(16000))
