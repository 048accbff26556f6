"""One simulated caller: its own connection, real speech paced in real time, every turn measured.

The microphone (`Microphone`) sends a 20 ms frame every 20 ms from the monotonic clock, speech when some is
queued and silence otherwise: a real microphone never stops. A frame goes out once it has been "captured",
so the first sample of an utterance was spoken one frame before its first frame is sent, and the last one
`FRAME_MS - (speech in the last frame)` before the last frame is sent: those are the turn's `speech start`
and `speech_end`, on the time the frame was handed to the socket (a caller that falls behind its clock does
not charge its own lag to the server).

A turn: say an utterance from the corpus, wait for the reply's first audio (or fail after
REPLY_TIMEOUT_S), wait for the server to finish it (REPLY_DONE), let the simulated player finish it, pause
PAUSE_S, then the next. Every reply that starts after the turn's speech started belongs to it (a server
whose VAD cuts an utterance in two may answer twice); a reply whose first audio arrives before the end of
speech makes the turn `early`. Latencies are ms after `speech_end`.

Playback (`simulate_playback`) is a jitter buffer that starts playing `jitter_ms` after the reply's first
byte and plays in real time while it holds audio; when it runs dry before the next chunk arrives, that is an
underrun, and play resumes when the chunk arrives (no re-buffering).

Barge-in (probability `barge_in` per turn): once the reply plays, the caller starts its next utterance at a
random point, BARGE_AT of the reply's expected length (the median of this caller's earlier replies, or
DEFAULT_REPLY_MS), unless the reply has finished playing by then. That utterance is the next turn. The
barged turn records onset -> last reply audio received and onset -> the interrupted event (Twilio: `clear`),
and, once the next turn has its answer, whether it got one.

Never raises for a server-side failure: a connection that fails, closes or sends garbage ends the caller
with one last TurnRecord whose `error` says why.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

from voice_agent.audio import INPUT_SAMPLE_RATE
from voice_agent.tools.loadtest.dialects import (
    FRAME_MS,
    FRAME_SAMPLES,
    CallFailed,
    Client,
    Heard,
    Kind,
    Protocol,
    make_client,
)
from voice_agent.tools.loadtest.records import TurnRecord, Utterance

FRAME_S = FRAME_MS / 1000
LEAD_IN_S = 0.5  # microphone silence before the first question
PAUSE_S = (0.6, 1.2)  # think time after a reply has played, before the next question (uniform)
REPLY_TIMEOUT_S = 30.0  # no reply audio this long after the end of speech: the turn failed
REPLY_MAX_S = 90.0  # a reply not done this long after its first audio: the turn failed
INTERRUPT_WAIT_S = 5.0  # after a barge-in onset, how long to wait for the interrupted event
BARGE_AT = (0.2, 0.7)  # a barge-in starts at this share of the reply's expected length (uniform)
DEFAULT_REPLY_MS = 2000.0  # the expected reply length before this caller has heard a reply


# ---- playback --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Playback:
    """A reply played through a jitter buffer; times in the chunks' unit (ms)."""

    started: float | None  # first arrival + jitter
    ended: float | None  # when the last audio has played
    underruns: int  # times the buffer ran dry before the next chunk arrived
    underrun_total_ms: float
    underrun_worst_ms: float
    max_gap_ms: float  # the longest time between two chunk arrivals


def simulate_playback(chunks: Sequence[tuple[float, float]], jitter_ms: float) -> Playback:
    """Play `chunks` ((arrival ms, audio ms), in arrival order) from `jitter_ms` after the first arrival, in
    real time; a chunk that arrives after the buffer ran dry is an underrun of the wait, and play resumes
    at its arrival."""
    if not chunks:
        return Playback(None, None, 0, 0.0, 0.0, 0.0)
    started = chunks[0][0] + jitter_ms
    play_end = started  # when the audio buffered so far runs out
    underruns, total, worst, max_gap = 0, 0.0, 0.0, 0.0
    previous = chunks[0][0]
    for arrival, audio_ms in chunks:
        max_gap = max(max_gap, arrival - previous)
        previous = arrival
        if arrival > play_end:
            wait = arrival - play_end
            underruns, total, worst = underruns + 1, total + wait, max(worst, wait)
            play_end = arrival
        play_end += audio_ms
    return Playback(started, play_end, underruns, total, worst, max_gap)


# ---- the microphone --------------------------------------------------------------------------------------
@dataclass
class Spoken:
    """One utterance on the microphone; times are time.monotonic()."""

    utterance: Utterance
    start: float | None = None  # its first sample was spoken
    end: float | None = None  # its last sample was spoken: the true end of speech


class Microphone:
    """Sends FRAME_MS of 16 kHz audio every FRAME_MS from the monotonic clock: queued speech, else silence.
    Each utterance starts on a frame of its own; its last frame is padded with silence."""

    def __init__(self, send: Callable[[np.ndarray], Awaitable[None]], on_change: Callable[[], None]) -> None:
        self._send, self._on_change = send, on_change
        self._queue: deque[Spoken] = deque()
        self._pos = 0  # samples of the queue's first utterance sent

    def say(self, utterance: Utterance) -> Spoken:
        spoken = Spoken(utterance)
        self._queue.append(spoken)
        return spoken

    async def run(self) -> None:
        start, frames = time.monotonic(), 0
        silence = np.zeros(FRAME_SAMPLES, np.float32)
        while True:
            frames += 1
            await asyncio.sleep(max(0.0, start + frames * FRAME_S - time.monotonic()))
            if not self._queue:
                await self._send(silence)
                continue
            spoken = self._queue[0]
            pcm = spoken.utterance.pcm16k[self._pos: self._pos + FRAME_SAMPLES]
            speech = pcm.size
            t = time.monotonic()
            await self._send(pcm if speech == FRAME_SAMPLES else np.concatenate([pcm, silence[speech:]]))
            if self._pos == 0:
                spoken.start = t - FRAME_S
            self._pos += speech
            if self._pos >= spoken.utterance.pcm16k.size:
                spoken.end = t - FRAME_S + speech / INPUT_SAMPLE_RATE
                self._queue.popleft()
                self._pos = 0
            self._on_change()


# ---- one turn --------------------------------------------------------------------------------------------
@dataclass
class Reply:
    """One reply as heard: REPLY_STARTED to REPLY_DONE; times are time.monotonic()."""

    started: float
    response_id: str | None
    chunks: list[tuple[float, float]] = field(default_factory=list)  # (arrival, audio ms)
    first_text: float | None = None
    done: float | None = None
    cancelled: bool = False
    interrupted: float | None = None
    timings: dict[str, float | None] = field(default_factory=dict)


@dataclass
class Turn:
    index: int
    spoken: Spoken
    replies: list[Reply] = field(default_factory=list)
    speech_stopped: float | None = None
    errors: list[str] = field(default_factory=list)
    barge_onset: float | None = None  # the caller started talking over this turn's reply
    barged: Reply | None = None  # the reply it talked over
    cut: bool = False

    @property
    def first_audio(self) -> float | None:
        return min((r.chunks[0][0] for r in self.replies if r.chunks), default=None)

    @property
    def settled(self) -> bool:
        """Every reply has ended, and one of them had audio (the turn is answered)."""
        return self.first_audio is not None and all(r.done is not None for r in self.replies)

    @property
    def unanswered(self) -> bool:
        """A reply ended, not cut off, without audio, and none is still going: the turn got no answer."""
        return (self.first_audio is None and bool(self.replies) and all(r.done is not None for r in self.replies)
                and not self.replies[-1].cancelled)

    def chunks(self) -> list[tuple[float, float]]:
        """Every reply's audio in arrival order; a barged reply's only up to its interruption."""
        out = []
        for r in self.replies:
            stop = r.interrupted if r.interrupted is not None else float("inf")
            out += [c for c in r.chunks if c[0] <= stop]
        return sorted(out)

    def play_end(self, jitter_ms: float) -> float | None:
        """When the simulated player has played the turn's reply audio (time.monotonic())."""
        ended = simulate_playback([(t * 1000.0, d) for t, d in self.chunks()], jitter_ms).ended
        return None if ended is None else ended / 1000.0


def turn_record(turn: Turn, *, caller: int, protocol: str, jitter_ms: float, error: str | None) -> TurnRecord:
    """What the caller measured of `turn`, in ms after its end of speech."""
    end = turn.spoken.end
    assert end is not None, "a turn is recorded once its speech has ended"

    def ms(t: float | None) -> float | None:
        return None if t is None else round((t - end) * 1000.0, 3)

    chunks = turn.chunks()
    playback = simulate_playback([((t - end) * 1000.0, d) for t, d in chunks], jitter_ms)
    audio_ms = sum(d for _, d in chunks)
    answering = [r for r in turn.replies if r.chunks]
    done = max((r.done for r in answering if r.done is not None), default=None)
    first = turn.first_audio
    rtf = None
    if first is not None and done is not None and audio_ms > 0:
        rtf = round((done - first) * 1000.0 / audio_ms, 4)
    barge = turn.barged
    last_audio = interrupted = None
    if barge is not None and turn.barge_onset is not None:
        arrivals = [t for t, _ in barge.chunks if barge.interrupted is None or t <= barge.interrupted]
        last_audio = max(0.0, (max(arrivals, default=turn.barge_onset) - turn.barge_onset) * 1000.0)
        if barge.interrupted is not None:
            interrupted = (barge.interrupted - turn.barge_onset) * 1000.0
    return TurnRecord(
        caller=caller, turn=turn.index, protocol=protocol, utterance=turn.spoken.utterance.name,
        speech_s=round(turn.spoken.utterance.seconds, 3), speech_end=end,
        speech_stopped_ms=ms(turn.speech_stopped), first_text_ms=ms(min(
            (r.first_text for r in turn.replies if r.first_text is not None), default=None)),
        first_audio_ms=ms(first), reply_audio_ms=round(audio_ms, 3), reply_done_ms=ms(done), rtf=rtf,
        server_timings=dict(answering[-1].timings) if answering else {},
        early=first is not None and first < end,
        underruns=playback.underruns, underrun_total_ms=round(playback.underrun_total_ms, 3),
        underrun_worst_ms=round(playback.underrun_worst_ms, 3), max_gap_ms=round(playback.max_gap_ms, 3),
        barge_in=barge is not None,
        barge_onset_to_last_audio_ms=None if last_audio is None else round(last_audio, 3),
        barge_onset_to_interrupted_ms=None if interrupted is None else round(interrupted, 3),
        error=error, jitter_ms=jitter_ms,
        reply_started_ms=None if playback.started is None else round(playback.started, 3),
        reply_chunks=[((t - end) * 1000.0, d) for t, d in chunks], cut=turn.cut)


def failed_record(caller: int, protocol: str, index: int, utterance: Utterance | None, error: str,
                  jitter_ms: float) -> TurnRecord:
    """A turn that never got as far as its end of speech (the call failed first); speech_end is now."""
    return TurnRecord(
        caller=caller, turn=index, protocol=protocol, utterance=utterance.name if utterance else "",
        speech_s=round(utterance.seconds, 3) if utterance else 0.0, speech_end=time.monotonic(),
        speech_stopped_ms=None, first_text_ms=None, first_audio_ms=None, reply_audio_ms=0.0, reply_done_ms=None,
        rtf=None, server_timings={}, early=False, underruns=0, underrun_total_ms=0.0, underrun_worst_ms=0.0,
        max_gap_ms=0.0, error=error, jitter_ms=jitter_ms)


# ---- the caller ------------------------------------------------------------------------------------------
class Caller:
    """One connection's turns. `_receive` files the server's events under the turn they belong to; `_turns`
    drives the conversation and waits on what `_receive` and the microphone report."""

    def __init__(self, client: Client, *, caller: int, corpus: Sequence[Utterance], deadline: float,
                 max_turns: int | None, barge_in: float, seed: int, on_turn: Callable[[TurnRecord], None],
                 jitter_ms: float) -> None:
        if not corpus:
            raise ValueError("expected at least one utterance in the corpus, got none")
        if not 0.0 <= barge_in <= 1.0:
            raise ValueError(f"barge_in: expected a probability in [0, 1], got {barge_in}")
        self.client, self.caller, self.corpus, self.deadline = client, caller, list(corpus), deadline
        self.max_turns, self.barge_in, self.on_turn, self.jitter_ms = max_turns, barge_in, on_turn, jitter_ms
        self.rng = random.Random(seed)
        self.mic = Microphone(client.send_frame, self._changed_now)
        self.changed = asyncio.Event()
        self.turn: Turn | None = None  # the latest turn whose speech started: new replies are its
        self.reply: Reply | None = None  # the reply the server is sending now
        self.closed: str | None = None  # why the connection ended, when the server (not we) ended it
        self.reply_lengths_ms: list[float] = []
        self.held: tuple[Turn, str | None] | None = None  # a barged turn (and its error), reported once the
        # turn its barge-in started has its answer

    def _changed_now(self) -> None:
        self.changed.set()

    def _mic_ended(self, task: asyncio.Task[None]) -> None:
        """The microphone only stops when cancelled, or when the socket refuses a frame."""
        if not task.cancelled() and task.exception() is not None and self.closed is None and not self.client.closing:
            e = task.exception()
            self.closed = f"sending audio failed: {type(e).__name__}: {e}"
            self.changed.set()

    def _record(self, turn: Turn, error: str | None) -> TurnRecord:
        return turn_record(turn, caller=self.caller, protocol=self.client.protocol, jitter_ms=self.jitter_ms,
                           error=error)

    def _report(self, record: TurnRecord) -> None:
        """Report `record`, after the barged turn it answers (if one is held)."""
        if self.held is not None:
            held = self._record(*self.held)  # now: its cancelled reply's REPLY_DONE has come by
            if not (record.cut and record.first_audio_ms is None):  # unknown when the run ended first
                held.next_turn_answered = record.first_audio_ms is not None and record.error is None
            self.held = None
            self.on_turn(held)
        self.on_turn(record)

    # ---- the server's events ----
    async def _receive(self) -> None:
        try:
            async for heard in self.client.events():
                self._file(heard)
                self.changed.set()
        except Exception as e:  # noqa: BLE001 - a message the client cannot read is the server's failure
            self.closed = f"unreadable server message: {type(e).__name__}: {e}"
        if self.closed is None and not self.client.closing:
            self.closed = "the connection ended"
        self.changed.set()

    def _file(self, heard: Heard) -> None:  # noqa: C901 - one branch per event kind
        turn, kind = self.turn, heard.kind
        if kind is Kind.SPEECH_STOPPED:
            if turn is not None and turn.first_audio is None:
                turn.speech_stopped = heard.t  # the latest stop before the answer: the one that ended the turn
        elif kind is Kind.REPLY_STARTED:
            self.reply = Reply(heard.t, heard.response_id)
            if turn is not None and turn.spoken.start is not None:
                turn.replies.append(self.reply)
        elif kind is Kind.AUDIO:
            if self.reply is None or self.reply.done is not None:  # audio without a reply start: a reply
                self._file(Heard(Kind.REPLY_STARTED, heard.t, heard.response_id))
            assert self.reply is not None
            self.reply.chunks.append((heard.t, heard.audio_ms))
        elif kind is Kind.TEXT:
            if self.reply is not None and self.reply.first_text is None:
                self.reply.first_text = heard.t
        elif kind is Kind.INTERRUPTED:
            reply = self._reply(heard.response_id)
            if reply is not None and reply.interrupted is None:
                reply.interrupted = heard.t
        elif kind is Kind.REPLY_DONE:
            reply = self._reply(heard.response_id)
            if reply is not None and reply.done is None:
                reply.done, reply.cancelled, reply.timings = heard.t, heard.cancelled, heard.timings
                if reply.chunks and not reply.cancelled:
                    self.reply_lengths_ms.append(sum(d for _, d in reply.chunks))
        elif kind is Kind.ERROR:
            if turn is not None:
                turn.errors.append(f"server error {heard.text}")
            if heard.fatal:
                self.closed = f"server error {heard.text}"
        elif kind is Kind.CLOSED and not self.client.closing:
            self.closed = self.closed or f"the server ended the call: {heard.text}"

    def _reply(self, response_id: str | None) -> Reply | None:
        """The reply `response_id` names (the current one when none is named)."""
        if response_id is None or (self.reply is not None and self.reply.response_id == response_id):
            return self.reply
        owner = self.turn
        return next((r for r in reversed(owner.replies) if r.response_id == response_id), None) if owner else None

    # ---- waiting ----
    async def _until(self, ready: Callable[[], bool], at: float) -> bool:
        """Wait until `ready()`, the server ends the call, or time.monotonic() reaches `at`; returns ready()."""
        while not ready() and self.closed is None:
            left = at - time.monotonic()
            if left <= 0:
                break
            self.changed.clear()
            try:
                await asyncio.wait_for(self.changed.wait(), left)
            except asyncio.TimeoutError:
                pass
        return ready()

    async def _sleep_until(self, at: float) -> None:
        await self._until(lambda: False, min(at, self.deadline))

    # ---- the conversation ----
    def _start_turn(self, index: int) -> Turn:
        turn = Turn(index, self.mic.say(self.rng.choice(self.corpus)))
        return turn

    def _more_turns(self, index: int) -> bool:
        return (self.max_turns is None or index < self.max_turns) and time.monotonic() < self.deadline

    async def run(self) -> None:
        mic = asyncio.create_task(self.mic.run())
        mic.add_done_callback(self._mic_ended)
        receive = asyncio.create_task(self._receive())
        try:
            await self._sleep_until(time.monotonic() + LEAD_IN_S)
            await self._turns()
        finally:
            mic.cancel()
            await asyncio.gather(mic, return_exceptions=True)
            await self.client.close()
            receive.cancel()
            await asyncio.gather(receive, return_exceptions=True)
        if self.held is not None:  # the run ended before the barge-in's turn was answered
            self.on_turn(self._record(*self.held))
            self.held = None

    async def _turns(self) -> None:
        index, turn = 0, None
        while True:
            if self.closed is not None and turn is None:  # the server ended the call between turns
                self._report(failed_record(self.caller, self.client.protocol, index, None, self.closed,
                                           self.jitter_ms))
                return
            if turn is None:
                if not self._more_turns(index):
                    return
                turn = self._start_turn(index)
            self.turn = turn
            following = await self._one_turn(turn)
            if turn.spoken.end is None:
                if self.closed is not None:  # the call failed while the caller was talking
                    self._report(failed_record(self.caller, self.client.protocol, turn.index,
                                               turn.spoken.utterance, self.closed, self.jitter_ms))
                return  # else the run ended while it was being said: not a turn
            error = self._error(turn)
            if turn.barged is not None and following is not None:  # reported once `following` is answered
                if self.held is not None:  # the turn before was barged too: this one answered it
                    self._report_held(self._record(turn, error))
                self.held = (turn, error)
            else:
                self._report(self._record(turn, error))
            if self.closed is not None and error is not None and self.closed in error:
                return  # the failure is reported with this turn
            index, turn = index + 1, following

    def _report_held(self, record: TurnRecord) -> None:
        """Report the held barged turn, answered by `record` (itself barged: it is held next)."""
        assert self.held is not None
        held = self._record(*self.held)
        held.next_turn_answered = record.first_audio_ms is not None and record.error is None
        self.held = None
        self.on_turn(held)

    def _error(self, turn: Turn) -> str | None:
        if self.closed is not None and not (turn.settled or turn.cut):
            return "; ".join([*turn.errors, self.closed])
        if turn.cut:
            return "; ".join(turn.errors) or None
        if turn.first_audio is None:
            why = "the reply ended without audio" if turn.unanswered else \
                f"no reply audio within {REPLY_TIMEOUT_S:g} s of the end of speech"
            return "; ".join([*turn.errors, why])
        if not turn.settled and turn.barged is None:
            return "; ".join([*turn.errors, f"the reply was not done {REPLY_MAX_S:g} s after its first audio"])
        return "; ".join(turn.errors) or None

    async def _one_turn(self, turn: Turn) -> Turn | None:
        """Say `turn`, wait for its answer to play (or barge in on it). Returns the next turn when a barge-in
        already started it, else None. Sets `turn.cut` when the run's deadline came first."""
        spoken = turn.spoken
        if not await self._until(lambda: spoken.end is not None, self.deadline):
            return None
        assert spoken.end is not None
        answered = await self._until(lambda: turn.first_audio is not None or turn.unanswered,
                                     min(self.deadline, spoken.end + REPLY_TIMEOUT_S))
        if not answered or turn.first_audio is None:
            turn.cut = time.monotonic() >= self.deadline and self.closed is None
            return None
        following = None
        if self.rng.random() < self.barge_in and self._more_turns(turn.index + 1):
            following = await self._barge(turn)
            if following is not None:
                return following
        first = turn.first_audio
        if not await self._until(lambda: turn.settled, min(self.deadline, first + REPLY_MAX_S)):
            turn.cut = time.monotonic() >= self.deadline and self.closed is None
            return None
        play_end = turn.play_end(self.jitter_ms)
        assert play_end is not None
        await self._sleep_until(play_end + self.rng.uniform(*PAUSE_S))
        return None

    async def _barge(self, turn: Turn) -> Turn | None:
        """Talk over `turn`'s reply at a random point of it; the new utterance is the next turn (returned).
        None when the reply finished playing first (the turn then goes on as any other)."""
        first = turn.first_audio
        assert first is not None
        expected_ms = statistics.median(self.reply_lengths_ms) if self.reply_lengths_ms else DEFAULT_REPLY_MS
        onset = first + (self.jitter_ms + self.rng.uniform(*BARGE_AT) * expected_ms) / 1000.0
        if await self._until(lambda: turn.settled, min(onset, self.deadline)):
            play_end = turn.play_end(self.jitter_ms)
            if play_end is not None and play_end <= onset:
                return None  # the reply was over before the caller would have talked
        await self._sleep_until(onset)
        if time.monotonic() >= self.deadline or self.closed is not None:
            return None
        barged = self.reply if self.reply is not None and self.reply in turn.replies else turn.replies[-1]
        following = self._start_turn(turn.index + 1)
        self.turn = following  # replies from now on answer the barge-in
        await self._until(lambda: following.spoken.start is not None, self.deadline)
        turn.barge_onset, turn.barged = following.spoken.start, barged
        await self._until(lambda: barged.interrupted is not None or barged.done is not None,
                          min(self.deadline, time.monotonic() + INTERRUPT_WAIT_S))
        if barged.interrupted is None:  # a reply already done may still be cut while it plays
            await self._until(lambda: barged.interrupted is not None,
                              min(self.deadline, time.monotonic() + INTERRUPT_WAIT_S))
        return following


async def run_caller(
    url: str,
    protocol: Protocol,
    *,
    caller: int,
    corpus: Sequence[Utterance],
    deadline: float,
    max_turns: int | None,
    barge_in: float,
    key: str | None,
    seed: int,
    on_turn: Callable[[TurnRecord], None],
    jitter_ms: float = 60.0,
) -> None:
    """Call `url` until `deadline` (time.monotonic()) or `max_turns`, then hang up; report each turn through
    `on_turn`. A call that cannot connect is reported as turn 0 with its `error`."""
    client = make_client(url, protocol, key=key, jitter_ms=jitter_ms)
    try:
        await client.connect()
    except CallFailed as e:
        on_turn(failed_record(caller, protocol, 0, None, str(e), jitter_ms))
        return
    await Caller(client, caller=caller, corpus=corpus, deadline=deadline, max_turns=max_turns,
                 barge_in=barge_in, seed=seed, on_turn=on_turn, jitter_ms=jitter_ms).run()
