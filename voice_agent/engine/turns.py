"""What the model thread keeps per session and per turn in flight (worker.py drives them).

`SessionRun`: a session's KV slot, its conversation, its own prompt format (system block), the id of its last
reply (for a cut that comes after the reply ended) and where its transcripts go. `TurnRun`: one response
from submission to its last event: where its reply joins the history, the reply being generated, the
vocoder stream, unit chunks waiting for the vocoder and the audio sent so far. Each reply the model
generated keeps its cut points (`Heard`) on its message, for a cut that comes later.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from voice_agent.audio import OUTPUT_SAMPLES_PER_MS
from voice_agent.engine.api import EngineEvent, TranscriptEvent, TurnSettings, TurnTimings
from voice_agent.engine.conversation import Conversation, PromptFormat
from voice_agent.engine.reply import ForcedLength, Reply
from voice_agent.engine.scheduler import TurnPhase


@dataclass
class StepStats:
    """Counters for benchmarks: steps run and rows per batched call."""

    steps: int = 0
    admitted: int = 0
    prefill_tokens: int = 0
    text_rows: int = 0
    text_calls: int = 0
    tts_rows: int = 0
    tts_calls: int = 0
    vocode_rows: int = 0
    vocode_calls: int = 0
    discarded: int = 0  # speculative turns dropped


@dataclass
class Heard:
    """What a finished reply needs for a late cut: its reads and units per block."""

    reads: list[tuple[int, int]]
    blocks: list[int]
    text_tokens: int


@dataclass(eq=False)
class SessionRun:
    id: str
    slot: int
    conversation: Conversation | None  # None when the session's prompt could not be built
    broken: str = ""
    turn: TurnRun | None = None
    last_reply: str | None = None  # the id of the last reply that joined the history
    fmt: PromptFormat | None = None  # the session's own format (its system prompt)
    on_transcript: Callable[[TranscriptEvent], None] | None = None
    transcripts_failed: bool = False  # a failure is reported once per session
    unconfirmed: TurnRun | None = None  # the last speculative turn, until confirmed or discarded (even if ended)


@dataclass(eq=False)
class TurnRun:
    """One turn in flight. Phase: no reply yet = QUEUED; reply done = FLUSHING; else GENERATING."""

    id: int
    session: SessionRun
    item_id: str  # the reply's message id
    keep: bool  # the reply joins the history (False: out of band)
    fmt: PromptFormat | None  # a format for this reply only (its own instructions), else None
    settings: TurnSettings
    timings: TurnTimings
    forced: ForcedLength | None
    emit: Callable[[EngineEvent], None]
    max_new_tokens: int
    after: str = ""  # the message the reply follows (set at admission)
    user_item: str | None = None  # a speech turn's user message: forgotten if the reply fails or never starts
    speculative: bool = False  # its end of turn is not confirmed yet (scheduled only with slack)
    transcribe: bool = False  # its user speech is to be transcribed (a speculative turn's once confirmed)
    input_tokens: int = 0
    reply: Reply | None = None
    reply_start: int = 0
    vocoder: Any = None
    detok: Any = None
    pending_units: list[int] = field(default_factory=list)
    chunks: deque[tuple[tuple[int, ...], bool]] = field(default_factory=deque)
    samples_sent: int = 0

    @property
    def phase(self) -> TurnPhase:
        if self.reply is None:
            return TurnPhase.QUEUED
        return TurnPhase.FLUSHING if self.reply.done else TurnPhase.GENERATING

    @property
    def audio_ms(self) -> float:
        return self.samples_sent / OUTPUT_SAMPLES_PER_MS


def heard_of(reply: Reply) -> Heard:
    return Heard([(r.start, r.stop) for r in reply.reads], [len(b) for b in reply.schedule.unit_blocks],
                  len(reply.text_ids))


def replies_of(turns: Sequence[TurnRun]) -> list[Reply]:
    """The replies of turns a stage runs (every one has started)."""
    replies = [t.reply for t in turns]
    assert all(r is not None for r in replies), "a stage got a turn without a reply"
    return replies  # type: ignore[return-value]
