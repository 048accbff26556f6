"""The contract between the engine (one owner of the model) and everything that serves sessions.

A connection opens an `EngineSession`, submits user turns (16 kHz float32 mono PCM plus per-turn
settings) and reads the turn's events as an async iterator: `TextDelta`, `UnitBlock`, `AudioChunk` (24 kHz
float32 mono), then exactly one of `ResponseDone` or `TurnError`. `cancel(played_ms)` stops the turn
within one engine step and cuts the session's history back to what the listener heard; the event stream
then ends with `ResponseDone(reason="cancelled")`.

Per-turn settings are checked twice, with the same rules: `TurnSettings` checks what holds for every
engine (types, the sampling ranges, a seed torch's generators take), and `EngineInfo.check_turn` what
holds for this engine (a known voice, a reply no longer than the engine's limit). A server checks both
when a client chooses settings, so a turn never fails on them later.

Nothing here touches torch or sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import numpy as np

from voice_agent.audio import OUTPUT_SAMPLE_RATE
from voice_agent.errors import TurnRejected

MAX_TEMPERATURE = 2.0
# Seeds are 0..2**63 - 1: torch's generators take any value in [-2**63, 2**64 - 1], and a turn's generators
# are seeded with `seed`, `seed + 1` and `seed ^ 0x48494654` (voice_agent.engine.reply and .vocoder).
MAX_SEED = 2**63 - 1
MAX_VOICE_CHARS = 200  # no voice name is longer; longer strings are refused before any lookup
DEFAULT_MAX_REPLY_TOKENS = 512  # the longest reply (text tokens) an engine serves unless configured otherwise
SHOWN_VOICES = 20  # voice names an error message lists at most


@dataclass(frozen=True)
class TurnSettings:
    """Per-turn settings a client may choose. `None` means the server's default.

    Checked when built (TurnRejected, "expected X, got Y"): `voice` a string of 1..MAX_VOICE_CHARS
    characters, `temperature` a number in [0, MAX_TEMPERATURE], `max_new_tokens` an integer >= 1 (the
    upper bound is the engine's: `EngineInfo.max_new_tokens`), `seed` an integer in [0, MAX_SEED]."""

    voice: str | None = None
    temperature: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        v, t, n, seed = self.voice, self.temperature, self.max_new_tokens, self.seed
        if v is not None and not (isinstance(v, str) and 1 <= len(v) <= MAX_VOICE_CHARS):
            raise TurnRejected(f"voice: expected a name of 1..{MAX_VOICE_CHARS} characters, got {_preview(v)}")
        if t is not None and not (_is_number(t) and 0.0 <= t <= MAX_TEMPERATURE):
            raise TurnRejected(f"temperature: expected a number in [0, {MAX_TEMPERATURE:g}], got {_preview(t)}")
        if n is not None and not (_is_int(n) and n >= 1):
            raise TurnRejected(f"max_new_tokens: expected an integer >= 1, got {_preview(n)}")
        if seed is not None and not (_is_int(seed) and 0 <= seed <= MAX_SEED):
            raise TurnRejected(f"seed: expected an integer in [0, {MAX_SEED}] (2**63 - 1), got {_preview(seed)}")


@dataclass
class TurnTimings:
    """Wall-clock marks of one turn (time.monotonic() seconds); None until reached."""

    speech_end: float
    submitted: float | None = None
    encoder_done: float | None = None
    first_text: float | None = None
    first_units: float | None = None
    first_audio: float | None = None
    confirmed: float | None = None  # a speculative turn: when its end of turn was confirmed
    done: float | None = None

    def as_ms(self) -> dict[str, float | None]:
        """Every mark as milliseconds after the end of the user's speech."""
        return {
            k: (None if v is None else round((v - self.speech_end) * 1000.0, 2))
            for k, v in asdict(self).items()
            if k != "speech_end"
        }


@dataclass(frozen=True)
class TextDelta:
    text: str
    kind: Literal["text_delta"] = "text_delta"


@dataclass(frozen=True)
class UnitBlock:
    units: tuple[int, ...]
    kind: Literal["unit_block"] = "unit_block"


@dataclass(frozen=True)
class AudioChunk:
    """`pcm` is float32 mono at OUTPUT_SAMPLE_RATE; `start_ms` is its offset in the reply's audio."""

    pcm: np.ndarray
    start_ms: float
    kind: Literal["audio_chunk"] = "audio_chunk"

    @property
    def duration_ms(self) -> float:
        return 1000.0 * len(self.pcm) / OUTPUT_SAMPLE_RATE


@dataclass(frozen=True)
class ResponseDone:
    """The turn ended. `reason`: 'eos' (the model finished), 'max_tokens', 'cancelled', or 'discarded' (a
    speculative turn dropped without a trace: nothing of it stays in the history). `speculative`: the turn
    was started before its end of turn was confirmed.

    `text` is what stays in the conversation history (cut to what was heard when cancelled; for an
    out-of-band reply, which joins no history, what was generated). `input_tokens`: the prompt positions
    the reply read (the whole conversation, speech positions included); `output_tokens`: the text tokens
    it generated."""

    text: str
    reason: Literal["eos", "max_tokens", "cancelled", "discarded"]
    timings: TurnTimings
    audio_ms: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    speculative: bool = False
    kind: Literal["response_done"] = "response_done"


@dataclass(frozen=True)
class TurnError:
    """The turn failed; the session itself stays usable."""

    code: str
    message: str
    kind: Literal["error"] = "error"


EngineEvent = TextDelta | UnitBlock | AudioChunk | ResponseDone | TurnError


# ---- conversation items and user transcripts ---------------------------------------------------------

ROOT = "root"  # `after=ROOT`: insert an item at the start of the conversation (after the system prompt)


@dataclass(frozen=True)
class HistoryItem:
    """One message of a session's conversation, as a client may place it.

    `role` 'user' carries `text` or `audio` (16 kHz float32 mono speech, checked like a turn's audio);
    'assistant' and 'system' carry `text`. `transcribe`: a user audio item gets a transcript
    (`Transcript*` events to the session's `on_transcript`) once it is encoded."""

    id: str
    role: Literal["user", "assistant", "system"]
    text: str | None = None
    audio: np.ndarray | None = None
    transcribe: bool = False

    def __post_init__(self) -> None:
        if not (isinstance(self.id, str) and 1 <= len(self.id) <= MAX_ITEM_ID_CHARS):
            raise TurnRejected(f"item id: expected a string of 1..{MAX_ITEM_ID_CHARS} characters, "
                               f"got {_preview(self.id)}")
        if self.role not in ("user", "assistant", "system"):
            raise TurnRejected(f"role: expected 'user', 'assistant' or 'system', got {_preview(self.role)}")
        if (self.text is None) == (self.audio is None):
            raise TurnRejected(f"item {self.id}: expected exactly one of text or audio")
        if self.audio is not None and self.role != "user":
            raise TurnRejected(f"item {self.id}: expected audio only on a user item, got a {self.role} item")
        if self.text is not None and not isinstance(self.text, str):
            raise TurnRejected(f"item {self.id}: text: expected a string, got {type(self.text).__name__}")


MAX_ITEM_ID_CHARS = 64


@dataclass(frozen=True)
class TranscriptDelta:
    """More of a user audio item's transcript."""

    item_id: str
    delta: str
    kind: Literal["transcript_delta"] = "transcript_delta"


@dataclass(frozen=True)
class TranscriptDone:
    """A user audio item's whole transcript; `audio_seconds` is the speech it transcribed."""

    item_id: str
    text: str
    audio_seconds: float
    kind: Literal["transcript_done"] = "transcript_done"


@dataclass(frozen=True)
class TranscriptFailed:
    """No transcript for this item (e.g. the Whisper decoder weights are absent); `message` says why."""

    item_id: str
    code: str
    message: str
    kind: Literal["transcript_failed"] = "transcript_failed"


TranscriptEvent = TranscriptDelta | TranscriptDone | TranscriptFailed


class EngineSession(Protocol):
    """One conversation on the engine: its history and KV cache live until `close()`.

    The history is an ordered list of `HistoryItem`s with client-chosen ids. Item operations
    (`add_item`, `delete_item`, `truncate_item`, `set_instructions`) apply in the order they are called,
    before the next response reads the history; an operation naming an unknown item is ignored (the
    caller keeps the authoritative list of ids). A response (`respond`) reads the whole history and, unless
    `keep=False` (out of band), appends its reply as an assistant item `item_id` when it ends."""

    id: str

    def submit_turn(
        self, audio: np.ndarray, settings: TurnSettings, *, speech_end: float | None = None,
        item_id: str | None = None, reply_id: str | None = None, transcribe: bool = False,
        speculative: bool = False,
    ) -> AsyncIterator[EngineEvent]:
        """Start a turn on 16 kHz float32 mono speech: `add_item` of a user audio item (`item_id`, default a
        fresh id) then `respond` (reply item `reply_id`, default a fresh id). Raises TurnRejected if a
        response is running. `speculative`: the end of turn is not confirmed yet; the engine runs it only
        with slack until `confirm()`, and `discard()` drops it without a trace."""
        ...

    def confirm(self) -> None:
        """The running speculative turn's end of turn is confirmed: from now on it is an ordinary turn."""
        ...

    def discard(self) -> None:
        """Drop the running turn within one engine step as if it had never been submitted: its user item and
        reply leave the history (the KV cache is treated as not holding them), its transcript is not made,
        and its stream ends with `ResponseDone(reason="discarded")`."""
        ...

    def add_item(self, item: HistoryItem, *, after: str | None = None) -> None:
        """Insert `item` after item `after` (None: at the end; ROOT: first)."""
        ...

    def delete_item(self, item_id: str) -> None: ...

    def truncate_item(self, item_id: str, audio_ms: float) -> None:
        """Keep only what the first `audio_ms` of assistant item `item_id`'s audio said (as `cancel`)."""
        ...

    def set_instructions(self, text: str | None) -> None:
        """The session's system prompt from now on (None: the server's)."""
        ...

    def respond(
        self, settings: TurnSettings, *, item_id: str, instructions: str | None = None, keep: bool = True,
        speech_end: float | None = None,
    ) -> AsyncIterator[EngineEvent]:
        """Generate a reply to the history as it is. `instructions` replaces the system prompt for this
        reply only; `keep=False` leaves the history untouched (the reply joins nothing). Raises
        TurnRejected if a response is running."""
        ...

    def cancel(self, played_ms: float | None = None) -> None:
        """Stop the running turn within one engine step and keep history up to `played_ms` of its audio
        (None: keep what was generated). When no turn runs, the last reply's history is cut to
        `played_ms` (the listener interrupted the playback of a reply that had finished generating)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class EngineInfo:
    """What an engine serves. `voices`: the names a client may choose; `default_voice`: the engine's own
    default (set by the operator, possibly a file path, so also allowed); `max_new_tokens`: the longest
    reply a turn may ask for (text tokens; the engine sizes its caches by it)."""

    model_name: str
    demo: bool  # True when running the embedded tiny random-weight model
    device: str
    dtype: str
    voices: tuple[str, ...] = field(default_factory=tuple)
    default_voice: str | None = None
    max_new_tokens: int = DEFAULT_MAX_REPLY_TOKENS

    def check_turn(self, settings: TurnSettings) -> None:
        """Raise TurnRejected for settings this engine cannot serve (an unknown voice, too long a reply)."""
        n = settings.max_new_tokens
        if n is not None and n > self.max_new_tokens:
            raise TurnRejected(f"max_new_tokens: expected an integer 1..{self.max_new_tokens}, got {n}")
        voice = settings.voice
        if voice is not None and voice not in self.voices and voice != self.default_voice:
            shown = list(self.voices[:SHOWN_VOICES])
            more = f" and {len(self.voices) - SHOWN_VOICES} more" if len(self.voices) > SHOWN_VOICES else ""
            raise TurnRejected(f"voice: expected one of {shown}{more} (GET /api/info lists them), "
                               f"got {_preview(voice)}")


class Engine(Protocol):
    info: EngineInfo

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None:
        """Start loading and warming the model without blocking the event loop; `ready` turns True
        once it is done."""
        ...

    async def aclose(self) -> None:
        """Stop the engine and release the model."""
        ...

    def open_session(
        self, *, system_prompt: str | None = None,
        on_transcript: Callable[[TranscriptEvent], None] | None = None,
    ) -> EngineSession:
        """Raises AdmissionError when the engine is full. `on_transcript` gets the session's transcript
        events on the event loop (None: transcripts are not made)."""
        ...


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _preview(value: object, limit: int = 40) -> str:
    """`repr(value)`, shortened: error messages never echo a client's long string back whole."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} characters)"
