"""Turn detection: where user speech starts and where the user's turn ends. Pure; no I/O, no clock.

`TurnDetector.feed(pcm)` takes 16 kHz float32 mono audio in pieces of any length, classifies it frame
by frame and returns `VadSpeechStarted` / `VadSpeechStopped` events in stream time (milliseconds of
audio fed so far), so results do not depend on how the audio was chunked.

Rules (all durations are settings, see `VadSettings`):
- speech starts after `speech_start_ms` of consecutive voiced frames; the event's `at_ms` is the start
  of the first of them, and the turn's audio begins `prefix_padding_ms` before that;
- the turn ends at the end of the frame in which the run of unvoiced frames reaches `silence_ms`, i.e.
  never more than one frame after the silence limit; silence is counted from the first frame the
  classifier calls unvoiced (webrtcvad itself holds "speech" for a few frames after energy stops);
- a turn is cut (reason "max_length") when its audio, prefix padding included, reaches `max_turn_ms`
  rounded down to whole frames; `max_turn_ms` is at most `voice_agent.audio.MAX_TURN_MS` (Whisper's 30-s
  window), so a turn's audio never exceeds `MAX_INPUT_SAMPLES` and the engine always takes it.

Classifiers: webrtcvad (default; 10/20/30 ms frames, aggressiveness 0-3) calls steady noise and tones
speech, so noisy rooms should use silero-vad (`kind="silero"`, 32 ms frames, probability threshold),
an optional dependency imported only when chosen.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass
from enum import Enum
from typing import Literal, Protocol

import numpy as np

from voice_agent.audio import INPUT_SAMPLE_RATE, INPUT_SAMPLES_PER_MS, MAX_INPUT_SAMPLES, MAX_TURN_MS, float_to_pcm16
from voice_agent.errors import VadSettingsError, VadUnavailable

WEBRTC_FRAME_MS = (10, 20, 30)  # the only frame lengths webrtcvad accepts
SILERO_FRAME_SAMPLES = 512  # silero-vad's window at 16 kHz (32 ms)
MIN_TURN_MS = 1_000  # the shortest max_turn_ms a client may choose


@dataclass(frozen=True)
class VadSettings:
    """Turn-detection settings. `frame_ms` is the classifier's frame (silero always uses 32 ms)."""

    kind: Literal["webrtc", "silero"] = "webrtc"
    aggressiveness: int = 2  # webrtcvad mode 0 (least) .. 3 (most aggressive in calling frames unvoiced)
    frame_ms: int = 20
    speech_start_ms: int = 150  # consecutive voiced audio before speech "starts"
    silence_ms: int = 500  # unvoiced audio that ends the turn
    prefix_padding_ms: int = 300  # audio kept before the start of speech
    max_turn_ms: int = MAX_TURN_MS  # a turn is cut here (Whisper's window)
    silero_threshold: float = 0.5  # speech probability above which a silero frame is voiced
    speculate_ms: int = 0  # a pause this long is a candidate end of turn (`VadPause`); 0: no candidates

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str, got: object) -> None:
            if not ok:
                raise VadSettingsError(f"VAD {name}: expected {expected}, got {got!r}")

        need(self.kind in ("webrtc", "silero"), "kind", "'webrtc' or 'silero'", self.kind)
        need(_is_int(self.aggressiveness) and 0 <= self.aggressiveness <= 3, "aggressiveness",
             "an integer 0..3", self.aggressiveness)
        if self.kind == "webrtc":
            need(self.frame_ms in WEBRTC_FRAME_MS, "frame_ms", f"one of {WEBRTC_FRAME_MS}", self.frame_ms)
        for name, lo, hi in (("speech_start_ms", 0, 2_000), ("silence_ms", 50, 10_000), ("speculate_ms", 0, 10_000),
                             ("prefix_padding_ms", 0, 2_000), ("max_turn_ms", MIN_TURN_MS, MAX_TURN_MS)):
            value = getattr(self, name)
            need(_is_int(value) and lo <= value <= hi, name, f"an integer {lo}..{hi}", value)
        lead_ms = self.prefix_padding_ms + self.speech_start_ms
        need(self.max_turn_ms > lead_ms, "max_turn_ms",
             f"more than prefix_padding_ms + speech_start_ms ({lead_ms})", self.max_turn_ms)
        need(isinstance(self.silero_threshold, (int, float)) and 0.0 < self.silero_threshold < 1.0,
             "silero_threshold", "a number in (0, 1)", self.silero_threshold)


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


class VoiceClassifier(Protocol):
    """Says whether one frame (`frame_samples` float32 samples at 16 kHz) is speech."""

    frame_samples: int

    def is_speech(self, frame: np.ndarray) -> bool: ...


class WebrtcClassifier:
    """webrtcvad's GMM classifier. It adapts to its input, so use one instance per audio stream."""

    def __init__(self, aggressiveness: int, frame_ms: int) -> None:
        import webrtcvad

        self._vad = webrtcvad.Vad(aggressiveness)
        self.frame_samples = frame_ms * INPUT_SAMPLES_PER_MS

    def is_speech(self, frame: np.ndarray) -> bool:
        return bool(self._vad.is_speech(float_to_pcm16(frame), INPUT_SAMPLE_RATE))  # rounded, clipped int16


class SileroClassifier:
    """silero-vad (ONNX, one thread); one instance per stream because the model keeps state."""

    def __init__(self, threshold: float) -> None:
        try:
            import torch
        except ImportError as e:
            raise VadUnavailable("VAD kind 'silero' needs torch, which is not installed") from e
        threads = torch.get_num_threads()
        try:
            from silero_vad import load_silero_vad
        except ImportError as e:
            raise VadUnavailable(
                "VAD kind 'silero' needs the silero-vad package: pip install silero-vad "
                "(or choose --vad webrtc)"
            ) from e
        finally:
            torch.set_num_threads(threads)  # importing silero_vad sets torch to one thread
        self._torch = torch
        self._model = load_silero_vad(onnx=True)
        self.threshold = threshold
        self.frame_samples = SILERO_FRAME_SAMPLES

    def is_speech(self, frame: np.ndarray) -> bool:
        x = self._torch.from_numpy(np.ascontiguousarray(frame, dtype=np.float32))
        return float(self._model(x, INPUT_SAMPLE_RATE).item()) >= self.threshold


def make_classifier(settings: VadSettings) -> VoiceClassifier:
    """A fresh classifier for one audio stream."""
    if settings.kind == "silero":
        return SileroClassifier(settings.silero_threshold)
    return WebrtcClassifier(settings.aggressiveness, settings.frame_ms)


@dataclass(frozen=True)
class VadSpeechStarted:
    at_ms: float  # stream time of the start of the first voiced frame of the starting run


@dataclass(frozen=True)
class VadSpeechStopped:
    at_ms: float  # stream time of the end of the last voiced frame
    detected_ms: float  # stream time at which the end was decided
    audio: np.ndarray  # (T,) float32 16 kHz: prefix padding + speech + trailing pad
    reason: Literal["silence", "max_length"] = "silence"

    @property
    def end_of_turn_ms(self) -> float:
        """How long the detector waited after the speech before ending the turn."""
        return self.detected_ms - self.at_ms


@dataclass(frozen=True)
class VadPause:
    """A candidate end of turn: the speech paused for `speculate_ms` (or the trailing pad, if longer). `audio`
    is exactly what `VadSpeechStopped.audio` will be if the pause reaches `silence_ms`: the turn's frames up
    to the last voiced one plus the same trailing pad, so a turn started now on it gives the same reply."""

    at_ms: float  # stream time of the end of the last voiced frame (as the stop's)
    detected_ms: float
    audio: np.ndarray


@dataclass(frozen=True)
class VadResumed:
    """The speech went on after a `VadPause`: that candidate was not the end of the turn."""

    at_ms: float


VadEvent = VadSpeechStarted | VadSpeechStopped | VadPause | VadResumed


class VadState(Enum):
    SILENCE = "silence"
    SPEECH = "speech"


class TurnDetector:
    """Feeds frames to a classifier and applies the start / end-of-turn rules in stream time."""

    def __init__(self, settings: VadSettings, classifier: VoiceClassifier | None = None) -> None:
        self.settings = settings
        self._clf = classifier if classifier is not None else make_classifier(settings)
        self._n = self._clf.frame_samples
        self._frame_ms = self._n / INPUT_SAMPLES_PER_MS
        self._start_frames = max(1, math.ceil(settings.speech_start_ms / self._frame_ms))
        self._stop_frames = max(1, math.ceil(settings.silence_ms / self._frame_ms))
        self._pad_frames = math.ceil(settings.prefix_padding_ms / self._frame_ms)
        # A candidate needs the whole trailing pad behind it, or its audio would differ from the stop's.
        speculate = max(math.ceil(settings.speculate_ms / self._frame_ms), self._pad_frames, 1)
        self._pause_frames = speculate if settings.speculate_ms and speculate < self._stop_frames else None
        self._paused = False  # a VadPause was emitted for the current pause
        self._max_frames = settings.max_turn_ms * INPUT_SAMPLES_PER_MS // self._n  # whole frames that fit
        assert self._max_frames * self._n <= MAX_INPUT_SAMPLES, (
            f"expected a turn of at most {MAX_INPUT_SAMPLES} samples, got {self._max_frames} frames of {self._n}"
        )
        self._pending = np.zeros(0, dtype=np.float32)  # samples not yet a whole frame
        self._frames_seen = 0
        self.state = VadState.SILENCE
        # While silent: recent frames (for prefix padding and the starting run) and the voiced run.
        self._recent: deque[np.ndarray] = deque(maxlen=self._pad_frames + self._start_frames)
        self._voiced_run = 0
        # While speaking: the turn's frames, where speech started, the last voiced frame, unvoiced run.
        self._turn: list[np.ndarray] = []
        self._speech_start_frame = 0
        self._last_voiced_frame = 0
        self._unvoiced_run = 0

    def reset(self) -> None:
        """Forget the speech in progress (the client committed the audio itself); stream time goes on."""
        self._paused = False
        self.state = VadState.SILENCE
        self._recent.clear()
        self._voiced_run = 0
        self._turn = []
        self._unvoiced_run = 0

    @property
    def voiced_ms(self) -> float:
        """While speaking: from the start of speech to the end of the latest voiced frame; else 0."""
        if self.state is not VadState.SPEECH:
            return 0.0
        return (self._last_voiced_frame + 1 - self._speech_start_frame) * self._frame_ms

    def feed(self, pcm: np.ndarray) -> list[VadEvent]:
        """Classify `pcm` ((T,) float32 at 16 kHz, any T) and return the events it completes."""
        if pcm.ndim != 1:
            raise ValueError(f"expected mono audio of shape (T,), got shape {pcm.shape}")
        x = np.concatenate([self._pending, pcm.astype(np.float32, copy=False)])
        whole = len(x) // self._n * self._n
        self._pending = x[whole:]
        events: list[VadEvent] = []
        for frame in x[:whole].reshape(-1, self._n):  # (F, frame_samples)
            events.extend(self._step(frame, self._clf.is_speech(frame)))
        return events

    def _step(self, frame: np.ndarray, voiced: bool) -> list[VadEvent]:
        index = self._frames_seen
        self._frames_seen += 1
        if self.state is VadState.SILENCE:
            self._recent.append(frame)
            self._voiced_run = self._voiced_run + 1 if voiced else 0
            if self._voiced_run < self._start_frames:
                return []
            self.state = VadState.SPEECH
            self._speech_start_frame = index + 1 - self._start_frames
            self._last_voiced_frame = index
            self._unvoiced_run = 0
            self._turn = list(self._recent)  # prefix padding + the starting run
            self._recent.clear()
            self._voiced_run = 0
            return [VadSpeechStarted(at_ms=self._speech_start_frame * self._frame_ms)]
        self._turn.append(frame)
        events: list[VadEvent] = []
        if voiced:
            self._last_voiced_frame = index
            self._unvoiced_run = 0
            if self._paused:
                self._paused = False
                events.append(VadResumed(at_ms=index * self._frame_ms))
        else:
            self._unvoiced_run += 1
        if self._unvoiced_run >= self._stop_frames:
            return [*events, self._stop(index, "silence")]
        if len(self._turn) >= self._max_frames:
            return [*events, self._stop(index, "max_length")]
        if self._unvoiced_run == self._pause_frames:
            self._paused = True
            events.append(VadPause(at_ms=(self._last_voiced_frame + 1) * self._frame_ms,
                                   detected_ms=(index + 1) * self._frame_ms, audio=self._cut()))
        return events

    def _cut(self) -> np.ndarray:
        """The turn's audio now: its frames up to the last voiced one plus the trailing pad."""
        keep = len(self._turn) - max(0, self._unvoiced_run - self._pad_frames)  # trim trailing silence
        frames = self._turn[:keep][-self._max_frames :]  # padding rounded up to frames may not all fit
        return np.concatenate(frames) if frames else np.zeros(0, np.float32)

    def _stop(self, index: int, reason: Literal["silence", "max_length"]) -> VadSpeechStopped:
        event = VadSpeechStopped(
            at_ms=(self._last_voiced_frame + 1) * self._frame_ms,
            detected_ms=(index + 1) * self._frame_ms,
            audio=self._cut(),
            reason=reason,
        )
        self.state = VadState.SILENCE
        self._turn = []
        self._unvoiced_run = 0
        self._paused = False
        return event
