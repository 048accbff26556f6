"""Whisper's log-mel spectrogram, batched, in torch, without ffmpeg or stored filter files.

Contract: `log_mel_spectrogram(audio)` maps 16 kHz float audio (B, N) to (B, n_mels, frames) exactly as
openai-whisper does for `log_mel_spectrogram(pad_or_trim(audio), n_mels)`, row by row:

1. pad with zeros at the end, or trim, to `pad_to` samples (default N_SAMPLES = 30 s, as the reference);
2. STFT, n_fft 400, hop 160, periodic Hann window, centred with reflect padding; the last frame is
   dropped, so frames = samples // HOP_LENGTH (3000 for 30 s); power |X|^2;
3. Slaney mel filterbank (computed here with librosa's formula; equal to whisper's `mel_filters.npz`);
4. log10(max(mel, 1e-10)); clamp below at (max over the whole row, padding included) - 8; (x + 4) / 4.

Option that changes numbers: `pad_to=None` computes the mel over the samples given, without padding to
30 s ("unpadded"). It is faster, and the encoder can then run on fewer frames, but the frames near the end
differ (no zero tail), the dynamic-range clamp sees only the real audio, and the encoder sees a shorter
context than it was trained with, so its outputs are not the reference's.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch

from voice_agent.audio import MODEL_SAMPLE_RATE

# ---- physics ------------------------------------------------------------------------------------------
SAMPLE_RATE = MODEL_SAMPLE_RATE  # 16000 Hz
N_FFT = 400  # samples per STFT window (25 ms)
HOP_LENGTH = 160  # samples between frames (10 ms)
CHUNK_LENGTH = 30  # seconds of audio per encoder input
N_SAMPLES = CHUNK_LENGTH * SAMPLE_RATE  # 480000 samples in 30 s
N_FRAMES = N_SAMPLES // HOP_LENGTH  # 3000 mel frames in 30 s
FRAMES_PER_SECOND = SAMPLE_RATE // HOP_LENGTH  # 100 mel frames per second
N_FREQS = N_FFT // 2 + 1  # 201 STFT bins
assert N_SAMPLES % HOP_LENGTH == 0 and SAMPLE_RATE % HOP_LENGTH == 0, "the hop must divide the rates"

LOG_FLOOR = 1e-10  # mel power floor before log10
DYNAMIC_RANGE = 8.0  # log10 units kept below the row's maximum (80 dB)
LOG_OFFSET, LOG_SCALE = 4.0, 4.0  # out = (log10 + 4) / 4

# Slaney mel scale (librosa htk=False): linear below 1 kHz, logarithmic above.
SLANEY_HZ_PER_MEL = 200.0 / 3  # linear part: 66.67 Hz per mel
SLANEY_BREAK_HZ = 1000.0  # start of the log part
SLANEY_BREAK_MEL = SLANEY_BREAK_HZ / SLANEY_HZ_PER_MEL  # 15 mel
SLANEY_LOG_STEP = np.log(6.4) / 27.0  # natural-log Hz per mel above the break


def hz_to_mel(hz: np.ndarray | float) -> np.ndarray:
    """Slaney mel of frequencies in Hz (librosa `hz_to_mel`, htk=False)."""
    hz = np.asarray(hz, dtype=np.float64)
    linear = hz / SLANEY_HZ_PER_MEL
    log = SLANEY_BREAK_MEL + np.log(np.maximum(hz, SLANEY_BREAK_HZ) / SLANEY_BREAK_HZ) / SLANEY_LOG_STEP
    return np.where(hz >= SLANEY_BREAK_HZ, log, linear)


def mel_to_hz(mel: np.ndarray | float) -> np.ndarray:
    """Frequencies in Hz of Slaney mels (librosa `mel_to_hz`, htk=False)."""
    mel = np.asarray(mel, dtype=np.float64)
    linear = mel * SLANEY_HZ_PER_MEL
    log = SLANEY_BREAK_HZ * np.exp(SLANEY_LOG_STEP * (np.maximum(mel, SLANEY_BREAK_MEL) - SLANEY_BREAK_MEL))
    return np.where(mel >= SLANEY_BREAK_MEL, log, linear)


def mel_filterbank(n_mels: int, sample_rate: int = SAMPLE_RATE, n_fft: int = N_FFT) -> np.ndarray:
    """Slaney-normalised triangular mel filters from 0 Hz to Nyquist: (n_mels, n_fft // 2 + 1) float32.

    Same formula as librosa `filters.mel(sr, n_fft, n_mels)` (Slaney scale, Slaney area normalisation),
    which is what whisper stores in `mel_filters.npz`.
    """
    if n_mels <= 0:
        raise ValueError(f"expected a positive number of mel bins, got {n_mels}")
    fft_hz = np.linspace(0.0, sample_rate / 2, n_fft // 2 + 1)  # (F,)
    edges_hz = mel_to_hz(np.linspace(hz_to_mel(0.0), hz_to_mel(sample_rate / 2), n_mels + 2))  # (M + 2,)
    widths = np.diff(edges_hz)  # (M + 1,)
    ramps = edges_hz[:, None] - fft_hz[None, :]  # (M + 2, F)
    rising = -ramps[:-2] / widths[:-1, None]  # (M, F)
    falling = ramps[2:] / widths[1:, None]  # (M, F)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    weights *= (2.0 / (edges_hz[2:] - edges_hz[:-2]))[:, None]  # equal area per filter
    return weights.astype(np.float32)


@lru_cache(maxsize=8)
def _filters(n_mels: int, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(mel_filterbank(n_mels)).to(device)  # (M, F)


@lru_cache(maxsize=8)
def _window(device: torch.device) -> torch.Tensor:
    return torch.hann_window(N_FFT, periodic=True, device=device)  # (N_FFT,)


def pad_or_trim(audio: torch.Tensor, length: int = N_SAMPLES) -> torch.Tensor:
    """Zero-pad at the end or cut the last axis to exactly `length` samples: (..., N) -> (..., length)."""
    n = audio.shape[-1]
    if n > length:
        return audio[..., :length]
    if n < length:
        return torch.nn.functional.pad(audio, (0, length - n))
    return audio


def mel_frames(num_samples: int) -> int:
    """Mel frames for `num_samples` samples (the STFT's last frame is dropped)."""
    return num_samples // HOP_LENGTH


def log_mel_spectrogram(
    audio: torch.Tensor, n_mels: int = 128, pad_to: int | None = N_SAMPLES
) -> torch.Tensor:
    """Whisper log-mel of 16 kHz audio (B, N) -> (B, n_mels, pad_to // 160), float32, on audio's device.

    `pad_to=None` keeps the given N samples (the unpadded option; see the module docstring) and gives
    N // 160 frames; it needs N > 200 samples for the centred STFT.
    """
    if audio.ndim != 2:
        raise ValueError(f"expected audio of shape (B, N), got shape {tuple(audio.shape)}")
    audio = audio.float()
    if pad_to is not None:
        audio = pad_or_trim(audio, pad_to)  # (B, pad_to)
    if audio.shape[1] <= N_FFT // 2:
        raise ValueError(f"expected more than {N_FFT // 2} samples for the log-mel, got {audio.shape[1]}")
    stft = torch.stft(
        audio, N_FFT, HOP_LENGTH, window=_window(audio.device), center=True, pad_mode="reflect",
        return_complex=True,
    )  # (B, F, frames + 1)
    power = stft[..., :-1].abs() ** 2  # (B, F, frames)
    mel = _filters(n_mels, audio.device) @ power  # (B, M, frames)
    log_spec = torch.clamp(mel, min=LOG_FLOOR).log10()
    row_max = log_spec.amax(dim=(1, 2), keepdim=True)  # (B, 1, 1)
    log_spec = torch.maximum(log_spec, row_max - DYNAMIC_RANGE)
    return (log_spec + LOG_OFFSET) / LOG_SCALE
