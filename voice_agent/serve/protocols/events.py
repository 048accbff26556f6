"""Transport-independent events that every protocol adapter translates to and from.

A protocol adapter (`WireAdapter` in `protocols/adapter.py`; `protocols/native.py`, later OpenAI Realtime or
telephony adapters) is Sans-I/O: it turns wire messages into `ClientEvent`s and `ServerEvent`s into wire
messages, and raises `ProtocolError` (with a stable `code`) for anything malformed.
`voice_agent.serve.session` consumes client events and produces server events;
`voice_agent.serve.connection` moves bytes. Settings travel as `SessionSettings`, never in a wire shape.
Audio inside these events is always float32 mono: 16 kHz from the client (`INPUT_SAMPLE_RATE`), 24 kHz to
the client (`OUTPUT_SAMPLE_RATE`); adapters resample to and from whatever rate the wire carries.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from voice_agent.audio import OUTPUT_SAMPLES_PER_MS
from voice_agent.serve.settings import SessionSettings

# Error codes an adapter may raise (also the `code` of the wire `error` event).
BAD_JSON = "bad_json"  # a text message that is not JSON
BAD_MESSAGE = "bad_message"  # JSON that is not an object with a string `type`
UNKNOWN_TYPE = "unknown_type"  # a `type` this protocol does not define
BAD_FIELD = "bad_field"  # a known message with a missing or invalid field
START_REQUIRED = "start_required"  # audio or control before a valid `start`
DUPLICATE_START = "duplicate_start"  # a second `start` on an open session
BAD_AUDIO = "bad_audio"  # binary audio with an odd byte count (not PCM16)
FRAME_TOO_LARGE = "frame_too_large"  # binary audio longer than the protocol allows


# ---- client -> server ------------------------------------------------------------------------------


@dataclass(frozen=True)
class StartSession:
    """The client opened a session. `settings` are the server defaults with the client's overrides
    applied, already validated. `key` is the API key if the client sent one in the message."""

    settings: SessionSettings
    sample_rate_hz: int
    frame_ms: int
    output_sample_rate_hz: int
    key: str | None = None


@dataclass(frozen=True)
class AudioFrame:
    """Microphone audio, float32 mono at INPUT_SAMPLE_RATE (already resampled by the adapter)."""

    pcm: np.ndarray


@dataclass(frozen=True)
class PlaybackProgress:
    """The client has played `played_ms` of response `response_id`'s audio so far."""

    response_id: str
    played_ms: float


@dataclass(frozen=True)
class InterruptRequest:
    """The client asks to stop the current response (a stop button); `played_ms` as in PlaybackProgress."""

    played_ms: float | None = None


@dataclass(frozen=True)
class UpdateSettings:
    """New session settings (server defaults + the client's overrides, validated) for the next turns."""

    settings: SessionSettings


@dataclass(frozen=True)
class FieldRejected:
    """A field the adapter could not use in a message whose other events it still returned (e.g. a bad
    `played_ms` on a stop request, which must stop anyway): reported to the client as a non-fatal error
    with `code` and counted as a bad message."""

    code: str
    message: str


ClientEvent = StartSession | AudioFrame | PlaybackProgress | InterruptRequest | UpdateSettings | FieldRejected


# ---- server -> client ------------------------------------------------------------------------------


@dataclass(frozen=True)
class SessionStarted:
    session_id: str
    sample_rate_hz: int
    output_sample_rate_hz: int
    frame_ms: int
    model: str
    demo: bool
    settings: SessionSettings


@dataclass(frozen=True)
class SettingsUpdated:
    settings: SessionSettings


@dataclass(frozen=True)
class SpeechStarted:
    """The VAD found user speech starting at `at_ms` of the input stream."""

    at_ms: float


@dataclass(frozen=True)
class SpeechStopped:
    """User speech ended at `at_ms` (end of the last voiced frame). `turn` is False when the speech
    was too short to interrupt a response and was ignored (a cough, "mhm"). A turn names the response
    that answers it (`response_id`); an utterance that joined a turn still waiting for its response
    names that same response."""

    at_ms: float
    duration_ms: float
    turn: bool
    reason: Literal["silence", "max_length"] = "silence"
    response_id: str | None = None


@dataclass(frozen=True)
class ResponseStarted:
    response_id: str


@dataclass(frozen=True)
class ResponseText:
    response_id: str
    text: str


@dataclass(frozen=True)
class ResponseAudio:
    """Reply audio, float32 mono at OUTPUT_SAMPLE_RATE; `start_ms` is its offset in the reply."""

    response_id: str
    pcm: np.ndarray
    start_ms: float

    @property
    def duration_ms(self) -> float:
        return len(self.pcm) / OUTPUT_SAMPLES_PER_MS


@dataclass(frozen=True)
class ResponseFinished:
    """A response ended. `reason` is the engine's ('eos', 'max_tokens', 'cancelled') or 'error'.
    `text` is what stays in the conversation history. `timings` are milliseconds after the end of the
    user's speech (see `voice_agent.engine.api.TurnTimings`) plus `end_of_turn_ms`, the silence wait."""

    response_id: str
    reason: str
    text: str
    audio_ms: float
    timings: dict[str, float | None]


@dataclass(frozen=True)
class Interrupted:
    """The response was cut off after the client had played `played_ms` of its audio."""

    response_id: str
    played_ms: float


@dataclass(frozen=True)
class ErrorEvent:
    code: str
    message: str
    fatal: bool = False


ServerEvent = (
    SessionStarted
    | SettingsUpdated
    | SpeechStarted
    | SpeechStopped
    | ResponseStarted
    | ResponseText
    | ResponseAudio
    | ResponseFinished
    | Interrupted
    | ErrorEvent
)
