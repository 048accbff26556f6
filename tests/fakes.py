"""Test fakes: FakeEngine, FakeEnergyClassifier, test signals (`tone`, `silence`) and `SessionClock`.

FakeEngine is a fake of `voice_agent.engine.api.Engine` for server and session tests (no model, no torch).

It emits a scripted reply block by block (a text delta, then `block_ms` of a 24 kHz sine) with a small
sleep per block standing in for an engine step, honours `cancel(played_ms)` within one step (history
keeps only the words whose audio had started playing), records what it was asked, and keeps each
session's history separate. It keeps each session's items as the engine would (`items`, `edits`), answers
`respond` like a turn, and with `on_transcript` gives a transcribed audio item a scripted transcript
("fake transcript of N s"). With `hold=True` a reply, once its blocks are out, goes on "generating"
without output until cancelled. Like the real engine it refuses a turn of more than MAX_INPUT_SAMPLES
(FAKE_MAX_INPUT_SAMPLES names the fake's copy of that check). Scripted failures by voice name
(both are in its `info.voices`, so the server lets them through): "fake-crash" makes the turn's iterator
raise RuntimeError, "fake-error" makes it yield a TurnError.
Never use it to claim model behaviour.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voice_agent.audio import INPUT_SAMPLE_RATE, MAX_INPUT_SAMPLES, OUTPUT_SAMPLE_RATE
from voice_agent.engine.api import (
    AudioChunk,
    EngineEvent,
    EngineInfo,
    HistoryItem,
    ResponseDone,
    TextDelta,
    TranscriptDelta,
    TranscriptDone,
    TranscriptEvent,
    TurnError,
    TurnSettings,
    TurnTimings,
)
from voice_agent.errors import AdmissionError, TurnRejected

FAKE_TONE_HZ = 330.0
FAKE_AMPLITUDE = 0.2
FAKE_MAX_INPUT_SAMPLES = MAX_INPUT_SAMPLES  # the real engine's 30-s input limit, enforced by the fake
FAKE_VOICES = ("en", "alt", "fake-crash", "fake-error")  # the fake's `info.voices`, its scripted failures too


def tone(ms: float, hz: float = 440.0, amp: float = 0.3) -> np.ndarray:
    """A 16 kHz sine: "speech" to webrtcvad in every mode (a stand-in for a voice in fast tests)."""
    t = np.arange(int(ms * INPUT_SAMPLE_RATE / 1000)) / INPUT_SAMPLE_RATE
    return (amp * np.sin(2 * np.pi * hz * t)).astype(np.float32)


def silence(ms: float) -> np.ndarray:
    """Digital silence at 16 kHz."""
    return np.zeros(int(ms * INPUT_SAMPLE_RATE / 1000), dtype=np.float32)


class FakeEnergyClassifier:
    """A fake VAD classifier: a frame is voiced when its RMS exceeds 0.01. Exact and stateless."""

    def __init__(self, frame_ms: int = 20, *, frame_samples: int | None = None) -> None:
        self.frame_samples = frame_samples if frame_samples is not None else frame_ms * INPUT_SAMPLE_RATE // 1000

    def is_speech(self, frame: np.ndarray) -> bool:
        return float(np.sqrt(np.mean(frame**2))) > 0.01


class SessionClock:
    """Feeds audio to a `voice_agent.serve.session.Session` in 20 ms frames, advancing `now` (stream time, s)
    by the audio's duration; returns the session's outputs."""

    FRAME_MS = 20

    def __init__(self, session: Any) -> None:
        self.session, self.now = session, 100.0

    def feed(self, audio: np.ndarray) -> list:
        out: list = []
        step = self.FRAME_MS * INPUT_SAMPLE_RATE // 1000
        for i in range(0, len(audio), step):
            self.now += self.FRAME_MS / 1000
            out += self.session.on_audio(audio[i : i + step], self.now)
        return out


@dataclass
class FakeTurn:
    """What one submitted turn looked like to the fake engine."""

    audio: np.ndarray  # (T,) float32 16 kHz, as submitted (a response.create: the last item's, or none)
    settings: TurnSettings
    item_id: str = ""
    instructions: str | None = None
    keep: bool = True
    user_item: str = ""
    speculative: bool = False
    discarded: bool = False
    reply: str = ""
    cancelled_at_ms: float | None = None
    blocks_sent: int = 0

    @property
    def audio_s(self) -> float:
        return len(self.audio) / INPUT_SAMPLE_RATE


@dataclass
class FakeEngineSession:
    id: str
    engine: FakeEngine
    system_prompt: str | None = None
    on_transcript: Callable[[TranscriptEvent], None] | None = None
    turns: list[FakeTurn] = field(default_factory=list)
    history: list[str] = field(default_factory=list)  # the kept reply text of each turn
    items: list[HistoryItem] = field(default_factory=list)  # the conversation's items, in order
    edits: list[tuple[str, Any, Any]] = field(default_factory=list)  # (op, id or text, after / audio_ms)
    closed: bool = False
    _running: bool = False
    _cancel: bool = False
    _played_ms: float | None = None

    def submit_turn(
        self, audio: np.ndarray, settings: TurnSettings, *, speech_end: float | None = None,
        item_id: str | None = None, reply_id: str | None = None, transcribe: bool = False,
        speculative: bool = False,
    ) -> AsyncIterator[EngineEvent]:
        self._check_audio(audio)
        if self._running:
            raise TurnRejected(f"expected no running turn on session {self.id}, got one running")
        user = item_id or f"fake-user-{len(self.turns) + 1}"
        self.add_item(HistoryItem(user, "user", audio=audio, transcribe=transcribe))
        stream = self.respond(settings, item_id=reply_id or f"fake-reply-{len(self.turns) + 1}", speech_end=speech_end)
        self.turns[-1].user_item, self.turns[-1].speculative = user, speculative
        return stream

    def respond(self, settings: TurnSettings, *, item_id: str, instructions: str | None = None, keep: bool = True,
                speech_end: float | None = None) -> AsyncIterator[EngineEvent]:
        if self.closed:
            raise TurnRejected(f"session {self.id} is closed")
        if self._running:
            raise TurnRejected(f"expected no running turn on session {self.id}, got one running")
        self._running, self._cancel, self._played_ms = True, False, None
        last = self.items[-1] if self.items else None
        audio = last.audio if last is not None and last.audio is not None else np.zeros(0, np.float32)
        turn = FakeTurn(audio=audio.copy(), settings=settings, item_id=item_id, instructions=instructions, keep=keep)
        self.turns.append(turn)
        return self._run(turn, time.monotonic() if speech_end is None else speech_end)

    def add_item(self, item: HistoryItem, *, after: str | None = None) -> None:
        if item.audio is not None:
            self._check_audio(item.audio)
        self.edits.append(("add", item.id, after))
        index = len(self.items) if after is None else (0 if after == "root" else next(
            (i + 1 for i, it in enumerate(self.items) if it.id == after), len(self.items)))
        self.items.insert(index, item)
        if item.transcribe and self.on_transcript is not None:  # a scripted transcript, one delta then done
            seconds = len(item.audio) / INPUT_SAMPLE_RATE if item.audio is not None else 0.0
            text = f"fake transcript of {seconds:.2f} s"
            loop = asyncio.get_running_loop()
            loop.call_soon(self.on_transcript, TranscriptDelta(item.id, text))
            loop.call_soon(self.on_transcript, TranscriptDone(item.id, text, seconds))

    def confirm(self) -> None:
        self.engine.confirms.append(self.id)

    def discard(self) -> None:
        """Drop the running turn and its user item (as the engine's discard: no trace)."""
        if self._running:
            self._cancel = True
            self._running = False
            self.engine.discards.append(self.id)
            turn = self.turns[-1]
            turn.discarded, turn.keep = True, False
            self.items = [it for it in self.items if it.id != turn.user_item]

    def delete_item(self, item_id: str) -> None:
        self.edits.append(("delete", item_id, None))
        self.items = [it for it in self.items if it.id != item_id]

    def truncate_item(self, item_id: str, audio_ms: float) -> None:
        self.edits.append(("truncate", item_id, audio_ms))

    def set_instructions(self, text: str | None) -> None:
        self.edits.append(("instructions", text, None))
        self.system_prompt = text

    def _check_audio(self, audio: np.ndarray) -> None:
        if self.closed:
            raise TurnRejected(f"session {self.id} is closed")
        if audio.ndim != 1 or audio.dtype != np.float32:
            raise TurnRejected(f"expected (T,) float32 audio, got {audio.dtype} {audio.shape}")
        if not 0 < len(audio) <= FAKE_MAX_INPUT_SAMPLES:
            raise TurnRejected(f"FakeEngine: expected 1..{FAKE_MAX_INPUT_SAMPLES} samples, got {len(audio)}")

    def cancel(self, played_ms: float | None = None) -> None:
        if self._running:
            self._cancel, self._played_ms = True, played_ms
            self.engine.cancels.append((self.id, played_ms))

    async def close(self) -> None:
        self.cancel()
        self.closed = True
        self.engine.open_count -= 1

    async def _run(self, turn: FakeTurn, speech_end: float) -> AsyncIterator[EngineEvent]:
        e = self.engine
        timings = TurnTimings(speech_end=speech_end, submitted=time.monotonic())
        words = [f"[{self.id} turn {len(self.turns)}]", *e.words][: e.blocks]
        starts: list[float] = []
        reason = "eos"
        try:
            if turn.settings.voice == "fake-crash":
                await asyncio.sleep(e.step_s)
                raise RuntimeError("FakeEngine scripted crash")
            if turn.settings.voice == "fake-error":
                await asyncio.sleep(e.step_s)
                self._running = False  # as the real engine: a new turn may follow the terminal event at once
                yield TurnError("engine_error", "FakeEngine scripted turn error")
                return
            for i, word in enumerate(words):
                await asyncio.sleep(e.step_s)
                if self._cancel or turn.discarded:
                    reason = "cancelled"
                    break
                start_ms = i * e.block_ms
                starts.append(start_ms)
                timings.first_text = timings.first_text or time.monotonic()
                yield TextDelta(word + " ")
                timings.first_audio = timings.first_audio or time.monotonic()
                yield AudioChunk(e.tone(start_ms), start_ms)
                turn.blocks_sent += 1
            while e.hold and not (self._cancel or turn.discarded):  # still "generating", with nothing to show for it
                await asyncio.sleep(e.step_s)
            if turn.discarded:
                yield ResponseDone("", "discarded", timings, speculative=True)
                return
            if self._cancel:
                reason = "cancelled"
            kept = words[: len(starts)]
            if reason == "cancelled" and self._played_ms is not None:
                kept = [w for w, s in zip(words, starts, strict=False) if s < self._played_ms]
                turn.cancelled_at_ms = self._played_ms
            turn.reply = " ".join(kept)
            self.history.append(turn.reply)
            if turn.keep:
                self.items.append(HistoryItem(turn.item_id, "assistant", text=turn.reply))
            timings.done = time.monotonic()
            self._running = False
            yield ResponseDone(turn.reply, reason, timings, audio_ms=len(starts) * e.block_ms)  # type: ignore[arg-type]
        finally:
            if self.turns[-1] is turn:  # not a later turn, submitted while this one ended
                self._running = False


class FakeEngine:
    """A fake Engine: see the module docstring. `blocks` words of `block_ms` audio per reply."""

    def __init__(
        self,
        *,
        blocks: int = 8,
        block_ms: float = 200.0,
        step_s: float = 0.01,
        max_sessions: int = 4,
        ready: bool = True,
        demo: bool = True,
        hold: bool = False,
    ) -> None:
        self.blocks, self.block_ms, self.step_s, self.max_sessions = blocks, block_ms, step_s, max_sessions
        self.hold = hold
        self.words = [f"w{i}" for i in range(blocks)]
        self.info = EngineInfo(model_name="FakeEngine", demo=demo, device="cpu", dtype="float32",
                               voices=FAKE_VOICES)
        self._ready = ready
        self._ids = itertools.count(1)
        self.sessions: list[FakeEngineSession] = []
        self.cancels: list[tuple[str, float | None]] = []
        self.confirms: list[str] = []  # sessions whose speculative turn was confirmed
        self.discards: list[str] = []  # sessions whose speculative turn was discarded
        self.open_count = 0

    @property
    def ready(self) -> bool:
        return self._ready

    def open_session(self, *, system_prompt: str | None = None,
                     on_transcript: Callable[[TranscriptEvent], None] | None = None) -> FakeEngineSession:
        if self.open_count >= self.max_sessions:
            raise AdmissionError(f"expected at most {self.max_sessions} sessions, got one more")
        self.open_count += 1
        s = FakeEngineSession(id=f"fake{next(self._ids)}", engine=self, system_prompt=system_prompt,
                              on_transcript=on_transcript)
        self.sessions.append(s)
        return s

    def tone(self, start_ms: float) -> np.ndarray:
        """`block_ms` of a sine, continuous across blocks: (N,) float32 at 24 kHz."""
        n = int(round(self.block_ms * OUTPUT_SAMPLE_RATE / 1000))
        t0 = int(round(start_ms * OUTPUT_SAMPLE_RATE / 1000))
        t = (t0 + np.arange(n)) / OUTPUT_SAMPLE_RATE
        return (FAKE_AMPLITUDE * np.sin(2 * np.pi * FAKE_TONE_HZ * t)).astype(np.float32)
