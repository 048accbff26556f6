"""The load test's records: one spoken question, one measured turn.

Every time on a `TurnRecord` is on the caller's own monotonic clock (`time.monotonic()`), and every
latency is in ms after `speech_end`, the last sample of the utterance as the caller sent it (trailing
silence trimmed). `to_json` is the turn's row in the run's JSON file; `SCHEMA_VERSION` versions that
file and rises whenever a field changes meaning or goes away.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voice_agent.audio import INPUT_SAMPLE_RATE

SCHEMA_VERSION = 1


@dataclass
class Utterance:
    """One spoken question: float32 mono at 16 kHz, leading and trailing silence trimmed."""

    name: str
    pcm16k: np.ndarray  # (T,) float32 in [-1, 1]

    def __post_init__(self) -> None:
        if self.pcm16k.ndim != 1:
            raise ValueError(f"expected mono (T,) audio for {self.name!r}, got shape {self.pcm16k.shape}")
        if self.pcm16k.size == 0:
            raise ValueError(f"utterance {self.name!r} is empty (all silence?)")
        self.pcm16k = np.ascontiguousarray(self.pcm16k, dtype=np.float32)

    @property
    def seconds(self) -> float:
        return self.pcm16k.size / INPUT_SAMPLE_RATE


@dataclass
class TurnRecord:
    """One turn of one caller, as the caller heard it."""

    caller: int
    turn: int
    protocol: str  # "native" | "openai" | "twilio"
    utterance: str  # Utterance.name
    speech_s: float  # length of the utterance sent
    speech_end: float  # client monotonic seconds at the utterance's true end of speech
    speech_stopped_ms: float | None  # ms after speech_end when the server said the speech stopped
    first_text_ms: float | None  # ms after speech_end: first reply text delta
    first_audio_ms: float | None  # ms after speech_end: first reply audio byte (the headline)
    reply_audio_ms: float  # duration of the reply audio received
    reply_done_ms: float | None  # ms after speech_end when the server said the reply is done
    rtf: float | None  # reply wall time from first byte to done / reply audio duration
    server_timings: dict[str, float | None]  # the server's own record where the protocol gives one, else {}
    early: bool  # the reply began before the user finished speaking (left out of latency figures)
    underruns: int  # simulated playback: times the jitter buffer ran dry mid-reply
    underrun_total_ms: float  # total silence those underruns inserted
    underrun_worst_ms: float  # the longest of them
    max_gap_ms: float  # the longest wait between two audio chunks arriving
    barge_in: bool = False  # the caller talked over this reply
    barge_onset_to_last_audio_ms: float | None = None  # barge-in onset -> last reply audio received (or `clear`)
    barge_onset_to_interrupted_ms: float | None = None  # barge-in onset -> the server's interrupted event
    next_turn_answered: bool | None = None  # after a barge-in: did the turn it started get a reply
    error: str | None = None  # why the turn failed; None when it did not
    jitter_ms: float = 0.0  # the simulated jitter buffer's depth
    reply_started_ms: float | None = None  # ms after speech_end when playback began (first byte + jitter)
    reply_chunks: list[tuple[float, float]] = field(default_factory=list)  # (arrival ms after speech_end, audio ms)
    cut: bool = False  # the run's deadline ended the turn before it finished: not a failure, and not a full turn

    def to_json(self) -> dict[str, Any]:
        row = dataclasses.asdict(self)
        row["reply_chunks"] = [[round(t, 3), round(d, 3)] for t, d in self.reply_chunks]
        return row
