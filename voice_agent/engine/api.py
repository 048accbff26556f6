"""The contract between the engine (one owner of the model) and everything that serves sessions.

A connection opens an `EngineSession`, submits user turns (16 kHz float32 mono PCM plus per-turn
settings) and reads the turn's events as an async iterator: `TextDelta`, `UnitBlock`, `AudioChunk` (24 kHz
float32 mono), then exactly one of `ResponseDone` or `TurnError`. `cancel(played_ms)` stops the turn
within one engine step and cuts the session's history back to what the listener heard; the event stream
then ends with `ResponseDone(reason="cancelled")`.

Nothing here touches torch or sockets.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from typing import Literal, Protocol

import numpy as np

from voice_agent.audio import OUTPUT_SAMPLE_RATE
from voice_agent.errors import TurnRejected


@dataclass(frozen=True)
class TurnSettings:
    """Per-turn settings a client may choose. `None` means the server's default."""

    voice: str | None = None
    temperature: float | None = None
    max_new_tokens: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.temperature is not None and not (0.0 <= self.temperature <= 2.0):
            raise TurnRejected(f"temperature expected in [0, 2], got {self.temperature}")
        if self.max_new_tokens is not None and not (1 <= self.max_new_tokens <= 4096):
            raise TurnRejected(f"max_new_tokens expected in [1, 4096], got {self.max_new_tokens}")


@dataclass
class TurnTimings:
    """Wall-clock marks of one turn (time.monotonic() seconds); None until reached."""

    speech_end: float
    submitted: float | None = None
    encoder_done: float | None = None
    first_text: float | None = None
    first_units: float | None = None
    first_audio: float | None = None
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
    """The turn ended. `reason`: 'eos' (the model finished), 'max_tokens', or 'cancelled'.

    `text` is what stays in the conversation history (cut to what was heard when cancelled)."""

    text: str
    reason: Literal["eos", "max_tokens", "cancelled"]
    timings: TurnTimings
    audio_ms: float = 0.0
    kind: Literal["response_done"] = "response_done"


@dataclass(frozen=True)
class TurnError:
    """The turn failed; the session itself stays usable."""

    code: str
    message: str
    kind: Literal["error"] = "error"


EngineEvent = TextDelta | UnitBlock | AudioChunk | ResponseDone | TurnError


class EngineSession(Protocol):
    """One conversation on the engine: its history and KV cache live until `close()`."""

    id: str

    def submit_turn(
        self, audio: np.ndarray, settings: TurnSettings, *, speech_end: float | None = None
    ) -> AsyncIterator[EngineEvent]:
        """Start a turn on 16 kHz float32 mono speech; raises TurnRejected if one is running."""
        ...

    def cancel(self, played_ms: float | None = None) -> None:
        """Stop the running turn within one engine step and keep history up to `played_ms` of its audio
        (None: keep what was generated). When no turn runs, the last reply's history is cut to
        `played_ms` (the listener interrupted the playback of a reply that had finished generating)."""
        ...

    async def close(self) -> None: ...


@dataclass(frozen=True)
class EngineInfo:
    model_name: str
    demo: bool  # True when running the embedded tiny random-weight model
    device: str
    dtype: str
    voices: tuple[str, ...] = field(default_factory=tuple)


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

    def open_session(self, *, system_prompt: str | None = None) -> EngineSession:
        """Raises AdmissionError when the engine is full."""
        ...
