"""The callers' speech: the bundled spoken questions (corpus/), or the user's own (`--speech DIR`).

Every utterance is read as float32 mono at 16 kHz and trimmed of leading and trailing silence by a simple
energy threshold on 10 ms frames, so its last sample is the true end of speech the latency is measured
from. The bundled questions are the project's own espeak-ng recordings (corpus/SOURCES.md).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np

from voice_agent.audio import INPUT_SAMPLE_RATE, load_audio
from voice_agent.errors import AudioInputError, ConfigError
from voice_agent.tools.loadtest.records import Utterance

TRIM_FRAME_MS = 10
TRIM_FRAME_SAMPLES = INPUT_SAMPLE_RATE * TRIM_FRAME_MS // 1000  # 160
TRIM_RELATIVE_DB = -40.0  # a frame this far below the loudest frame's RMS is silence
TRIM_FLOOR_RMS = 1e-3  # and so is any frame quieter than this (about -60 dBFS), however quiet the file
MIN_SPEECH_S = 0.3  # shorter than this after trimming: not a question the VAD would take as a turn
MAX_SPEECH_S = 20.0  # well inside the server's 30 s turn limit (a turn is cut there)
SPEECH_SUFFIXES = (".wav", ".flac")


def trim_silence(x: np.ndarray) -> np.ndarray:
    """`x` (T,) without its leading and trailing silent 10 ms frames (a last partial frame counts as one);
    empty when every frame is silent. A frame is silent when its RMS is below TRIM_FLOOR_RMS or more than
    TRIM_RELATIVE_DB under the loudest frame's."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 1:
        raise ValueError(f"expected mono (T,) samples, got shape {x.shape}")
    n_frames = -(-x.size // TRIM_FRAME_SAMPLES)
    padded = np.zeros(n_frames * TRIM_FRAME_SAMPLES, np.float32)
    padded[: x.size] = x
    frames = padded.reshape(n_frames, TRIM_FRAME_SAMPLES)  # (F, 160)
    counts = np.full(n_frames, TRIM_FRAME_SAMPLES, np.float64)
    if n_frames and x.size % TRIM_FRAME_SAMPLES:
        counts[-1] = x.size % TRIM_FRAME_SAMPLES  # the partial frame's RMS over its real samples
    rms = np.sqrt((frames.astype(np.float64) ** 2).sum(axis=1) / np.maximum(counts, 1))  # (F,)
    if not n_frames or rms.max() < TRIM_FLOOR_RMS:
        return x[:0]
    threshold = max(TRIM_FLOOR_RMS, float(rms.max()) * 10 ** (TRIM_RELATIVE_DB / 20))
    loud = np.flatnonzero(rms >= threshold)
    start, end = int(loud[0]) * TRIM_FRAME_SAMPLES, min(x.size, (int(loud[-1]) + 1) * TRIM_FRAME_SAMPLES)
    return x[start:end]


def load_utterance(path: Path) -> Utterance:
    """One speech file -> a trimmed 16 kHz Utterance named after the file; AudioInputError when unusable."""
    samples = trim_silence(load_audio(path, rate=INPUT_SAMPLE_RATE, max_seconds=10 * MAX_SPEECH_S))
    seconds = samples.size / INPUT_SAMPLE_RATE
    if not MIN_SPEECH_S <= seconds <= MAX_SPEECH_S:
        raise AudioInputError(f"speech file {path}: expected {MIN_SPEECH_S:g}..{MAX_SPEECH_S:g} s of speech "
                              f"after trimming silence, got {seconds:.2f} s")
    return Utterance(path.stem, samples)


def bundled_dir() -> Path:
    return Path(str(resources.files("voice_agent.tools.loadtest") / "corpus"))


def load_corpus(directory: str | None) -> list[Utterance]:
    """The utterances in `directory` (its *.wav and *.flac files, sorted by name), or the bundled corpus
    when None. ConfigError for a missing directory or one without speech files; AudioInputError (naming
    the file) for a file that is not audio or holds too little or too much speech."""
    folder = bundled_dir() if directory is None else Path(directory)
    if not folder.is_dir():
        raise ConfigError(f"--speech: expected a directory of WAV/FLAC files, got {str(folder)!r} (not a directory)")
    paths = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in SPEECH_SUFFIXES)
    if not paths:
        raise ConfigError(f"--speech: expected WAV or FLAC files in {str(folder)!r}, found none")
    return [load_utterance(p) for p in paths]
