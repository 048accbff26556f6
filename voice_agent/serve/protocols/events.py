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
from voice_agent.engine.api import TurnSettings
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
    event_id: str | None = None
    param: str | None = None


# Conversation control (the OpenAI Realtime endpoint; a native client uses none of these). `event_id` is the
# client's id of the message, echoed in any error it causes.


@dataclass(frozen=True)
class Item:
    """One conversation item as the server's list keeps it. `role` user: `text` (typed) or `audio` (16 kHz
    float32 speech; `text` is then its transcript, None until known); assistant: `text` is what was said
    (its transcript), `audio_ms` the audio it had; system: `text`. `status` 'completed', 'incomplete' (an
    assistant reply that was cut) or 'in_progress' (a reply being generated)."""

    id: str
    role: Literal["user", "assistant", "system"]
    text: str | None = None
    audio: np.ndarray | None = None
    audio_ms: float = 0.0
    status: Literal["completed", "incomplete", "in_progress"] = "completed"
    kind: Literal["text", "audio"] = "text"  # the content's kind (what the wire calls it)


@dataclass(frozen=True)
class CommitInput:
    """Turn the input audio since the last commit / clear into a user item (turn detection off)."""

    event_id: str | None = None


@dataclass(frozen=True)
class ClearInput:
    """Drop the input audio since the last commit."""

    event_id: str | None = None


@dataclass(frozen=True)
class CreateItem:
    """Insert `item` after `previous_item_id` (None: at the end; "root": first)."""

    item: Item
    previous_item_id: str | None = None
    event_id: str | None = None


@dataclass(frozen=True)
class DeleteItem:
    item_id: str
    event_id: str | None = None


@dataclass(frozen=True)
class RetrieveItem:
    item_id: str
    event_id: str | None = None


@dataclass(frozen=True)
class TruncateItem:
    """Cut assistant item `item_id` to its first `audio_end_ms` of audio (clamped to its length)."""

    item_id: str
    audio_end_ms: float
    content_index: int = 0
    event_id: str | None = None


@dataclass(frozen=True)
class ResponseOptions:
    """What a client asked of one response. `instructions` replaces the session's for it; `keep` False
    answers out of band (the history is left untouched); `metadata` is echoed; `modality` 'text' gives text
    only; `turn` the per-turn model settings (voice, max tokens) for this response."""

    instructions: str | None = None
    keep: bool = True
    metadata: dict[str, str] | None = None
    modality: Literal["audio", "text"] = "audio"
    turn: TurnSettings | None = None  # None: the session's


@dataclass(frozen=True)
class CreateResponse:
    options: ResponseOptions = ResponseOptions()
    event_id: str | None = None


@dataclass(frozen=True)
class CancelResponse:
    """Stop the response `response_id` (None: the current one)."""

    response_id: str | None = None
    event_id: str | None = None


# Telephony (a carrier's media stream).


@dataclass(frozen=True)
class Dtmf:
    """The caller pressed a key (`digit`: 0-9, *, #, A-D)."""

    digit: str


@dataclass(frozen=True)
class EndSession:
    """The client ended the session (a carrier's `stop`: the call hung up); the connection closes normally."""

    reason: str = ""


ClientEvent = (
    StartSession | AudioFrame | PlaybackProgress | InterruptRequest | UpdateSettings | FieldRejected
    | CommitInput | ClearInput | CreateItem | DeleteItem | RetrieveItem | TruncateItem | CreateResponse
    | CancelResponse | Dtmf | EndSession
)


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
    """The VAD found user speech starting at `at_ms` of the input stream; `item_id` is the id the user
    item will have if this speech becomes a turn."""

    at_ms: float
    item_id: str | None = None


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
    item_id: str | None = None


@dataclass(frozen=True)
class ResponseStarted:
    """A response starts; its reply becomes assistant item `item_id` (unless out of band)."""

    response_id: str
    item_id: str = ""
    options: ResponseOptions = ResponseOptions()
    previous_item_id: str | None = None  # the item the reply follows in the conversation (in band)


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
    item_id: str = ""
    input_tokens: int = 0
    output_tokens: int = 0
    cause: Literal["", "turn_detected", "client_cancelled"] = ""  # why a cancelled response was cut


@dataclass(frozen=True)
class Interrupted:
    """The response was cut off after the client had played `played_ms` of its audio."""

    response_id: str
    played_ms: float


@dataclass(frozen=True)
class ErrorEvent:
    """`event_id`: the client message that caused it, when known; `param`: the field at fault."""

    code: str
    message: str
    fatal: bool = False
    event_id: str | None = None
    param: str | None = None


@dataclass(frozen=True)
class InputCommitted:
    """The input audio became user item `item_id`, placed after `previous_item_id`."""

    item_id: str
    previous_item_id: str | None


@dataclass(frozen=True)
class InputCleared:
    pass


@dataclass(frozen=True)
class InputTimeout:
    """No user speech for the idle timeout after a response: the input from `audio_start_ms` to
    `audio_end_ms` (input stream time) becomes user item `item_id`."""

    audio_start_ms: float
    audio_end_ms: float
    item_id: str


@dataclass(frozen=True)
class ItemAdded:
    """`item` joined the conversation after `previous_item_id` (None: first). `done` False for an item
    still being generated (a reply's assistant item; `ItemDone` follows)."""

    item: Item
    previous_item_id: str | None
    done: bool = True


@dataclass(frozen=True)
class ItemDone:
    item: Item


@dataclass(frozen=True)
class ItemDeleted:
    item_id: str


@dataclass(frozen=True)
class ItemRetrieved:
    item: Item


@dataclass(frozen=True)
class ItemTruncated:
    item_id: str
    content_index: int
    audio_end_ms: float


@dataclass(frozen=True)
class UserTranscript:
    """The transcript of user audio item `item_id`: a `delta`, then one with `final` and the whole `text`
    (`audio_seconds` transcribed); `error` (a message) instead when it cannot be had."""

    item_id: str
    delta: str = ""
    text: str = ""
    final: bool = False
    audio_seconds: float = 0.0
    error: str | None = None


@dataclass(frozen=True)
class DtmfReceived:
    """A key the caller pressed, as the session heard it (`at_ms`: input stream time)."""

    digit: str
    at_ms: float


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
    | InputCommitted
    | InputCleared
    | InputTimeout
    | ItemAdded
    | ItemDone
    | ItemDeleted
    | ItemRetrieved
    | ItemTruncated
    | UserTranscript
    | DtmfReceived
)
