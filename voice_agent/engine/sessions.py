"""The asyncio side of the engine: sessions whose calls post commands to the model thread.

`LocalSession` (the `EngineSession` of api.py) never blocks the event loop: its calls check what they can
at once (`check_turn_audio`, the engine's settings check) and post a command (`Open`, `Submit`, `Respond`,
`AddItem`, `DeleteItem`, `TruncateItem`, `SetInstructions`, `Confirm`, `Discard`, `Cancel`, `Close`,
`Stop`) that the model thread applies, in order, before its next step. Each
turn's events come back through `loop.call_soon_threadsafe` into that turn's `TurnStream`, read as an
async iterator that ends after `ResponseDone` or `TurnError`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from voice_agent.audio import INPUT_SAMPLE_RATE, MAX_INPUT_SAMPLES, MAX_INPUT_SECONDS
from voice_agent.engine.api import (
    EngineEvent,
    HistoryItem,
    ResponseDone,
    TranscriptEvent,
    TurnError,
    TurnSettings,
    TurnTimings,
)
from voice_agent.errors import TurnRejected


# ---------------------------------------------------------------- commands to the model thread
@dataclass(frozen=True)
class Open:
    session: LocalSession
    system_prompt: str | None
    on_transcript: Callable[[TranscriptEvent], None] | None = None


@dataclass(frozen=True)
class Submit:
    session: LocalSession
    audio: np.ndarray
    settings: TurnSettings
    timings: TurnTimings
    forced: Any | None  # voice_agent.engine.reply.ForcedLength
    emit: Callable[[EngineEvent], None]
    item_id: str | None = None
    reply_id: str | None = None
    transcribe: bool = False
    speculative: bool = False


@dataclass(frozen=True)
class Confirm:
    session: LocalSession


@dataclass(frozen=True)
class Discard:
    session: LocalSession


@dataclass(frozen=True)
class Respond:
    session: LocalSession
    settings: TurnSettings
    timings: TurnTimings
    emit: Callable[[EngineEvent], None]
    item_id: str
    instructions: str | None
    keep: bool


@dataclass(frozen=True)
class AddItem:
    session: LocalSession
    item: HistoryItem
    after: str | None


@dataclass(frozen=True)
class DeleteItem:
    session: LocalSession
    item_id: str


@dataclass(frozen=True)
class TruncateItem:
    session: LocalSession
    item_id: str
    audio_ms: float


@dataclass(frozen=True)
class SetInstructions:
    session: LocalSession
    text: str | None


@dataclass(frozen=True)
class Cancel:
    session: LocalSession
    played_ms: float | None


@dataclass(frozen=True)
class Close:
    session: LocalSession
    closed: Callable[[], None]


class Stop:
    pass


_TERMINAL = (ResponseDone, TurnError)


class TurnStream:
    """The events of one turn as an async iterator; it ends after ResponseDone or TurnError."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._ended = False

    def __aiter__(self) -> TurnStream:
        return self

    async def __anext__(self) -> EngineEvent:
        if self._ended:
            raise StopAsyncIteration
        event = await self._queue.get()
        if isinstance(event, _TERMINAL):
            self._ended = True
        return event


class SessionHost(Protocol):
    """What a session needs of its engine (`voice_agent.engine.thread.Engine`)."""

    @property
    def alive(self) -> bool: ...

    def post(self, command: Any) -> None: ...

    def check_settings(self, settings: TurnSettings, forced: Any | None) -> None: ...


class LocalSession:
    """One conversation on an engine (implements api.EngineSession)."""

    def __init__(self, engine: SessionHost, session_id: str, slot: int):
        self.id = session_id
        self.slot = slot
        self._engine = engine
        self._running = False
        self._closed = False
        self._turns = 0  # turns started: a stream's end frees the session only if no later turn started

    def submit_turn(self, audio: np.ndarray, settings: TurnSettings, *, speech_end: float | None = None,
                    item_id: str | None = None, reply_id: str | None = None, transcribe: bool = False,
                    speculative: bool = False, forced: Any | None = None) -> TurnStream:
        """Start a turn on 16 kHz float32 mono speech. `forced` (a ForcedLength) is for benchmarks."""
        pcm = check_turn_audio(audio)
        stream, timings, emit = self._begin(settings, speech_end, forced)
        self._engine.post(Submit(self, pcm, settings, timings, forced, emit, item_id, reply_id, transcribe,
                                 speculative))
        return stream

    def confirm(self) -> None:
        if not self._closed:
            self._engine.post(Confirm(self))

    def discard(self) -> None:
        """Drop the running turn; a new one may start at once (the engine applies commands in order)."""
        if not self._closed:
            self._engine.post(Discard(self))
            self._running = False

    def respond(self, settings: TurnSettings, *, item_id: str, instructions: str | None = None, keep: bool = True,
                speech_end: float | None = None) -> TurnStream:
        stream, timings, emit = self._begin(settings, speech_end, None)
        self._engine.post(Respond(self, settings, timings, emit, item_id, instructions, keep))
        return stream

    def add_item(self, item: HistoryItem, *, after: str | None = None) -> None:
        if item.audio is not None:
            item = HistoryItem(item.id, item.role, audio=check_turn_audio(item.audio), transcribe=item.transcribe)
        self._post_edit(AddItem(self, item, after))

    def delete_item(self, item_id: str) -> None:
        self._post_edit(DeleteItem(self, item_id))

    def truncate_item(self, item_id: str, audio_ms: float) -> None:
        if not (isinstance(audio_ms, (int, float)) and audio_ms >= 0):
            raise ValueError(f"audio_ms: expected a number >= 0, got {audio_ms!r}")
        self._post_edit(TruncateItem(self, item_id, float(audio_ms)))

    def set_instructions(self, text: str | None) -> None:
        self._post_edit(SetInstructions(self, text))

    def _post_edit(self, command: Any) -> None:
        if self._closed:
            raise TurnRejected(f"session {self.id} is closed")
        self._engine.post(command)

    def _begin(self, settings: TurnSettings, speech_end: float | None,
               forced: Any | None) -> tuple[TurnStream, TurnTimings, Callable[[EngineEvent], None]]:
        """Checks for a new response, and its stream, timings and the model thread's way to reach it."""
        if self._closed:
            raise TurnRejected(f"session {self.id} is closed")
        if self._running:
            raise TurnRejected(f"session {self.id}: a turn is already running; cancel it or wait for its end")
        self._engine.check_settings(settings, forced)
        loop = asyncio.get_running_loop()
        stream = TurnStream()
        now = time.monotonic()
        timings = TurnTimings(speech_end=now if speech_end is None else speech_end, submitted=now)

        self._turns += 1
        turn = self._turns

        def deliver(event: EngineEvent) -> None:  # on the loop
            if isinstance(event, _TERMINAL) and turn == self._turns:
                self._running = False
            stream._queue.put_nowait(event)

        def emit(event: EngineEvent) -> None:  # on the model thread
            try:
                loop.call_soon_threadsafe(deliver, event)
            except RuntimeError:  # the loop is closed: nobody is listening any more
                pass

        self._running = True
        return stream, timings, emit

    def cancel(self, played_ms: float | None = None) -> None:
        if played_ms is not None and not (isinstance(played_ms, (int, float)) and played_ms >= 0):
            raise ValueError(f"played_ms: expected None or a number >= 0, got {played_ms!r}")
        if not self._closed:
            self._engine.post(Cancel(self, played_ms))

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()

        def closed() -> None:  # on the model thread
            loop.call_soon_threadsafe(_resolve, done)

        self._engine.post(Close(self, closed))
        if self._engine.alive:
            await done


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def check_turn_audio(audio: np.ndarray) -> np.ndarray:
    """A copy of a turn's audio as float32, or TurnRejected naming what is wrong (shape, length, NaN)."""
    a = np.asarray(audio)
    if a.ndim != 1 or a.dtype.kind != "f":
        raise TurnRejected(f"audio: expected 1-D float mono PCM at {INPUT_SAMPLE_RATE} Hz, got shape {a.shape} "
                           f"dtype {a.dtype}")
    if not 0 < len(a) <= MAX_INPUT_SAMPLES:
        raise TurnRejected(f"audio: expected 1..{MAX_INPUT_SAMPLES} samples (up to {MAX_INPUT_SECONDS:.0f} s), "
                           f"got {len(a)}")
    if not np.isfinite(a).all():
        raise TurnRejected("audio: expected finite samples, got NaN or infinity")
    return a.astype(np.float32, copy=True)
