"""Whisper's log-mel spectrogram, batched, in torch, without ffmpeg or stored filter files.

Contract: `log_mel_spectrogram(audio)` maps 16 kHz float audio (B, N) to (B, n_mels, frames) exactly as
openai-whisper does for `log_mel_spectrogram(pad_or_trim(audio), n_mels)`, row by row:

1. pad with zeros at the end, or trim, to `pad_to` samples (default N_SAMPLES = 30 s, as the reference);
2. STFT, n_fft 400, hop 160, periodic Hann window, centred with reflect padding; the last frame is
   dropped, so frames = samples // HOP_LENGTH (3000 for 30 s); power |X|^2;
3. Slaney mel filterbank (computed here with librosa's formula; equal to whisper's `mel_filters.npz`);
4. log10(max(mel, 1e-10)); clamp below at (max over the whole row, padding included) - 8; (x + 4) / 4.

Speed, same numbers: only the frames whose window can reach a nonzero sample are transformed (plus one
silent frame); the frames of the zero tail all take that silent frame's value, which is what the full
transform gives them (their power is exactly 0). `log_mel_rows` takes rows of any length up to `pad_to`
and pads them itself, so a batch of short turns never builds (B, 480000). Rows run one at a time.

Option that changes numbers: `pad_to=None` computes the mel over the samples given, without padding to
30 s ("unpadded"). It is faster, and the encoder can then run on fewer frames, but the frames near the end
differ (no zero tail), the dynamic-range clamp sees only the real audio, and the encoder sees a shorter
context than it was trained with, so its outputs are not the reference's.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import torch

from voice_agent.audio import INPUT_SAMPLE_RATE, MAX_INPUT_SECONDS

# ---- physics ------------------------------------------------------------------------------------------
SAMPLE_RATE = INPUT_SAMPLE_RATE  # 16000 Hz
N_FFT = 400  # samples per STFT window (25 ms)
HOP_LENGTH = 160  # samples between frames (10 ms)
CHUNK_LENGTH = MAX_INPUT_SECONDS  # 30 seconds of audio per encoder input
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
    num_samples = audio.shape[1] if pad_to is None else pad_to
    if num_samples <= N_FFT // 2:
        raise ValueError(f"expected more than {N_FFT // 2} samples for the log-mel, got {num_samples}")
    audio = audio[:, :num_samples]
    return log_mel_rows(list(audio), n_mels, num_samples, last_nonzero=_last_nonzero(audio))


def log_mel_rows(
    rows: Sequence[torch.Tensor],
    n_mels: int = 128,
    num_samples: int = N_SAMPLES,
    *,
    last_nonzero: Sequence[int] | None = None,
) -> torch.Tensor:
    """Log-mels of 1-D rows, each zero-padded (or cut) to `num_samples`: -> (B, n_mels, num_samples // 160).

    Equal to `log_mel_spectrogram(stacked rows, n_mels, pad_to=num_samples)` without building the padded
    batch. `last_nonzero[i]`: an index at or past row i's last nonzero sample (-1: all zero); by default
    its last given sample. Only the frames that can see a nonzero sample are transformed, plus one silent
    frame; every later frame is silent too (its window holds only zeros, so its power is exactly 0), so it
    takes that frame's value. Rows run one at a time: a batched STFT of 30-s rows outgrows CPU caches.
    """
    if num_samples <= N_FFT // 2:
        raise ValueError(f"expected more than {N_FFT // 2} samples for the log-mel, got {num_samples}")
    if last_nonzero is None:
        last_nonzero = [min(row.shape[-1], num_samples) - 1 for row in rows]
    if len(last_nonzero) != len(rows):
        raise ValueError(f"expected one last_nonzero index per row ({len(rows)}), got {len(last_nonzero)}")
    if not rows:
        raise ValueError("expected at least one audio row, got none")
    for i, row in enumerate(rows):
        if row.ndim != 1:
            raise ValueError(f"expected 1-D audio rows, got shape {tuple(row.shape)} for row {i}")
    out = torch.empty(len(rows), n_mels, mel_frames(num_samples), device=rows[0].device)  # (B, M, frames)
    for i, (row, last) in enumerate(zip(rows, last_nonzero, strict=True)):
        computed = _frames_to_compute(last, num_samples)
        out[i, :, :computed] = _log_mel_frames(row.float(), n_mels, num_samples, computed)
        out[i, :, computed:] = out[i, :, computed - 1 : computed]  # the silent tail: the last frame's value
    return out


def _frames_to_compute(last: int, num_samples: int) -> int:
    """Leading frames to transform when samples past `last` are zero: those whose window can reach sample
    `last` and one silent frame after them; all frames when the end's reflect padding may see audio."""
    frames = mel_frames(num_samples)
    reflected = num_samples - 1 - N_FFT // 2  # the end padding mirrors samples [reflected, num_samples - 2]
    if last >= reflected:
        return frames
    reaching = (last + N_FFT // 2) // HOP_LENGTH + 1  # frame c's window covers [160 c - 200, 160 c + 200)
    return min(frames, reaching + 1)


def _log_mel_frames(row: torch.Tensor, n_mels: int, num_samples: int, computed: int) -> torch.Tensor:
    """The first `computed` frames of the final log-mel (M, computed) of one row padded to `num_samples`.

    When `computed` is less than all frames, the last of them is silent and its value stands for the
    silent tail, which also joins the row's maximum.
    """
    if computed < mel_frames(num_samples):  # these frames need no sample past the last one's window
        num_samples = (computed - 1) * HOP_LENGTH + N_FFT // 2
    row = pad_or_trim(row, num_samples)  # (num_samples,)
    stft = torch.stft(
        row, N_FFT, HOP_LENGTH, window=_window(row.device), center=True, pad_mode="reflect",
        return_complex=True,
    )  # (F, frames + 1)
    power = stft[:, :computed].abs() ** 2  # (F, computed)
    mel = _filters(n_mels, row.device) @ power  # (M, computed)
    log_spec = torch.clamp(mel, min=LOG_FLOOR).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - DYNAMIC_RANGE)
    return (log_spec + LOG_OFFSET) / LOG_SCALE


def _last_nonzero(audio: torch.Tensor) -> list[int]:
    """Per row of (B, N): an index at or past the last nonzero (or NaN) sample, to the hop; -1 if none."""
    b, n = audio.shape
    whole = n // HOP_LENGTH * HOP_LENGTH
    last = torch.full((b,), -1, dtype=torch.int64, device=audio.device)
    if whole > 0:
        hops = audio[:, :whole].reshape(b, -1, HOP_LENGTH)  # (B, n // 160, 160)
        sounding = (hops.amax(dim=2) != 0) | (hops.amin(dim=2) != 0)  # (B, n // 160); NaN compares unequal
        ends = torch.arange(1, sounding.shape[1] + 1, device=audio.device)  # hop i ends before sample 160 i
        last = (sounding * ends).amax(dim=1) * HOP_LENGTH - 1  # (B,)
    if whole < n:
        tail = (audio[:, whole:] != 0).any(dim=1)  # (B,)
        last = torch.where(tail, n - 1, last)
    return [int(x) for x in last.tolist()]
