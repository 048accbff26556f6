"""One conversation's turn-taking state machine: listening, user speaking, responding, and barge-in.

Events in (`on_audio`, `on_engine_event`, `on_audio_sent`, `on_playback`, `on_interrupt_request`,
`update_settings`), outputs out: `ServerEvent`s for the client plus two commands for whoever owns the engine session,
`SubmitTurn` and `CancelTurn`. No I/O and no clock: every input carries `now` (time.monotonic()
seconds), so the whole policy is testable with a fake classifier and made-up times.

States (`TurnState`, transitions in `_TRANSITIONS`):
- LISTENING: nobody speaks.
- USER_SPEAKING: the VAD found user speech; when it ends, the audio becomes a turn (RESPONDING).
- RESPONDING: a response is being generated or is still playing on the client. The agent "speaks"
  until the engine is done AND the client has played the audio (by its playback reports, or for a
  client that sends none, by the time a real-time player needs for the audio sent). A turn that ends
  while the previous response is still being cancelled waits here, unsubmitted, until the engine has
  confirmed the cancel; if the user speaks again before that, the turn reopens (USER_SPEAKING) and the
  new utterance joins it: the same response answers both (`SpeechStopped.response_id` names it twice),
  keeping the latest `max_turn_ms` of audio.
- OVERLAP: the user speaks while the agent speaks. Speech shorter than `min_interruption_ms` (a
  cough, "mhm") is ignored and the response goes on; longer speech cancels the response (engine
  `cancel(played_ms)`, `Interrupted` to the client, unsent audio dropped) and becomes the next turn,
  which is submitted once the engine has confirmed the cancelled turn ended.

After `CancelTurn(id)` no `ResponseText` / `ResponseAudio` of `id` comes out any more (its engine events
are dropped here), so whoever sends the events only has to drop what of `id` it still holds while `id` is
generating (once generated, its `ResponseFinished` is already queued behind its audio and counts it). A
turn the detector cut at `max_turn_ms` is submitted like any other. Every `SpeechStopped(turn=True)`
names the response that answers it, and that response always starts and finishes.

Audio accounting: the sender calls `on_audio_sent(id, end_ms, now)` as it hands each audio message to
the socket. What the client has played (`Interrupted.played_ms`, the history cut) is its report or the
real-time estimate from those send times, never more than was sent. `ResponseFinished.audio_ms` is the
audio the client receives: all of it for a finished response (queued before its `ResponseFinished`),
what was sent before the cut for a cancelled one (the rest is dropped unsent).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from enum import Enum
from typing import Literal

import numpy as np

from voice_agent.audio import INPUT_SAMPLES_PER_MS, MAX_INPUT_SAMPLES
from voice_agent.engine.api import (
    AudioChunk,
    EngineEvent,
    HistoryItem,
    ResponseDone,
    TextDelta,
    TranscriptDelta,
    TranscriptDone,
    TranscriptEvent,
    TurnError,
    TurnSettings,
)
from voice_agent.engine.sessions import check_turn_audio
from voice_agent.errors import SessionStateError, TurnRejected
from voice_agent.serve.items import ROOT, ItemList
from voice_agent.serve.protocols.events import (
    BAD_AUDIO,
    BAD_FIELD,
    CreateItem,
    CreateResponse,
    DtmfReceived,
    ErrorEvent,
    InputCleared,
    InputCommitted,
    InputTimeout,
    Interrupted,
    Item,
    ItemAdded,
    ItemDeleted,
    ItemRetrieved,
    ItemTruncated,
    ResponseAudio,
    ResponseFinished,
    ResponseOptions,
    ResponseStarted,
    ResponseText,
    ServerEvent,
    SettingsUpdated,
    SpeechStarted,
    SpeechStopped,
    TruncateItem,
    UserTranscript,
)
from voice_agent.serve.settings import SessionSettings
from voice_agent.serve.vad import TurnDetector, VadPause, VadResumed, VadSettings, VadSpeechStarted, VadState

PLAYED_TOLERANCE_MS = 50.0  # a reported position this close to the end counts as "played it all"
PLAYBACK_SLACK_S = 0.3  # client without reports: jitter buffer + network allowance after real time
REPORT_TIMEOUT_S = 3.0  # client with reports: give up waiting for the final report after this
MIN_COMMIT_MS = 100  # a client's commit needs at least this much audio (as OpenAI's)
MIN_COMMIT_SAMPLES = MIN_COMMIT_MS * INPUT_SAMPLES_PER_MS


@dataclass(frozen=True)
class SubmitTurn:
    """Command: the user's speech joins the history as item `user_item`, and `response_id` answers it on
    the engine as item `reply_item`. `speech_end` is the monotonic time the user's speech ended (before the
    end-of-turn silence), so the turn's timings measure what the user waited."""

    response_id: str
    audio: np.ndarray  # (T,) float32 16 kHz
    settings: TurnSettings
    speech_end: float
    user_item: str = ""
    reply_item: str = ""
    transcribe: bool = False
    speculative: bool = False  # started at a pause candidate: ConfirmTurn or DiscardTurn follows


@dataclass(frozen=True)
class ConfirmTurn:
    """Command: the speculative turn `response_id`'s end of turn is confirmed (engine `confirm`). `speech_end`
    as SubmitTurn's, dated at the confirmation (equal for a client streaming in real time)."""

    response_id: str
    speech_end: float


@dataclass(frozen=True)
class DiscardTurn:
    """Command: drop the speculative turn `response_id` without a trace (engine `discard`); the caller
    went on speaking, and the client never saw anything of it."""

    response_id: str


@dataclass(frozen=True)
class StartResponse:
    """Command: start `response_id` on the engine, answering the history as it is (a client's
    response.create); its reply becomes item `reply_item` unless `keep` is False (out of band)."""

    response_id: str
    reply_item: str
    settings: TurnSettings
    instructions: str | None
    keep: bool
    speech_end: float


@dataclass(frozen=True)
class EditHistory:
    """Command: change the engine's history: `add` (`item` after `after`), `delete` / `truncate` (`item_id`,
    `audio_ms`), or `instructions` (the session's system prompt, `text`)."""

    op: Literal["add", "delete", "truncate", "instructions"]
    item: HistoryItem | None = None
    after: str | None = None
    item_id: str = ""
    audio_ms: float = 0.0
    text: str | None = None


@dataclass(frozen=True)
class CancelTurn:
    """Command: cancel `response_id` keeping `played_ms` of its audio in history. `generating` is False
    when the engine had already finished generating it and the client was still playing it."""

    response_id: str
    played_ms: float
    generating: bool


Output = ServerEvent | SubmitTurn | ConfirmTurn | DiscardTurn | StartResponse | EditHistory | CancelTurn


class TurnState(Enum):
    LISTENING = "listening"
    USER_SPEAKING = "user_speaking"
    RESPONDING = "responding"
    OVERLAP = "overlap"


class Trigger(Enum):
    SPEECH_STARTED = "speech_started"
    TURN_ENDED = "turn_ended"  # user speech became a turn
    BACKCHANNEL = "backchannel"  # user speech during a response, too short to interrupt
    INTERRUPTED = "interrupted"  # the response was cut (barge-in or the client's request)
    TURN_REOPENED = "turn_reopened"  # user speech before the waiting turn's response started
    RESPONSE_FINISHED = "response_finished"  # generated and played
    TURN_COMMITTED = "turn_committed"  # user speech became an item without a response
    RESPONSE_REQUESTED = "response_requested"  # the client asked for a response
    DETECTION_OFF = "detection_off"  # the client turned turn detection off mid-utterance


_TRANSITIONS: dict[tuple[TurnState, Trigger], TurnState] = {
    (TurnState.LISTENING, Trigger.SPEECH_STARTED): TurnState.USER_SPEAKING,
    (TurnState.USER_SPEAKING, Trigger.TURN_ENDED): TurnState.RESPONDING,
    (TurnState.RESPONDING, Trigger.SPEECH_STARTED): TurnState.OVERLAP,
    (TurnState.RESPONDING, Trigger.TURN_REOPENED): TurnState.USER_SPEAKING,
    (TurnState.RESPONDING, Trigger.INTERRUPTED): TurnState.LISTENING,
    (TurnState.RESPONDING, Trigger.RESPONSE_FINISHED): TurnState.LISTENING,
    (TurnState.OVERLAP, Trigger.BACKCHANNEL): TurnState.RESPONDING,
    (TurnState.OVERLAP, Trigger.INTERRUPTED): TurnState.USER_SPEAKING,
    (TurnState.OVERLAP, Trigger.RESPONSE_FINISHED): TurnState.USER_SPEAKING,
    (TurnState.USER_SPEAKING, Trigger.TURN_COMMITTED): TurnState.LISTENING,
    (TurnState.OVERLAP, Trigger.TURN_COMMITTED): TurnState.RESPONDING,
    (TurnState.LISTENING, Trigger.RESPONSE_REQUESTED): TurnState.RESPONDING,
    (TurnState.USER_SPEAKING, Trigger.RESPONSE_REQUESTED): TurnState.OVERLAP,
    (TurnState.USER_SPEAKING, Trigger.DETECTION_OFF): TurnState.LISTENING,
    (TurnState.OVERLAP, Trigger.DETECTION_OFF): TurnState.RESPONDING,
}


@dataclass
class _Response:
    """One response's bookkeeping, from the end of the user's turn to the end of playback."""

    id: str
    audio: np.ndarray  # the user's turn, until submitted
    speech_end: float
    end_of_turn_ms: float
    user_item: str = ""  # the user item it answers ("" for a client's response.create)
    item_id: str = ""  # its reply's item
    options: ResponseOptions = ResponseOptions()
    cause: Literal["", "turn_detected", "client_cancelled"] = ""
    truncated_ms: float | None = None  # a client's truncate: its audio stays cut there
    submitted: bool = False
    generating: bool = True
    audio_ms: float = 0.0  # reply audio queued for the client so far
    sent_ms: float = 0.0  # reply audio handed to the socket so far
    played_ms: float = 0.0  # the client's latest playback report (at most sent_ms)
    reported_at: float | None = None  # when that report came; None: the client never reported
    play_end_at: float | None = None  # when a real-time player would finish what was sent
    held: list[ServerEvent] | None = None  # a speculative response's events, held until its confirmation


class Session:
    """Turn-taking for one conversation. Not thread-safe; call it from one event loop.

    `conversation_events`: emit the item events (`InputCommitted`, `ItemAdded`, ...) of a client that
    manages the conversation (the OpenAI Realtime endpoint); the native protocol has no use for them."""

    def __init__(
        self, session_id: str, settings: SessionSettings, detector: TurnDetector | None = None, *,
        conversation_events: bool = False,
    ) -> None:
        self.id = session_id
        self.settings = settings
        self.detector = detector if detector is not None else TurnDetector(settings.vad)
        self.state = TurnState.LISTENING
        self.items = ItemList()
        self.conversation_events = conversation_events
        self._next_vad: VadSettings | None = None
        self._speech_at_ms = 0.0
        self._current: _Response | None = None  # the response the user is hearing (or will)
        self._draining: _Response | None = None  # cancelled, waiting for the engine to confirm
        self._speculating: _Response | None = None  # started at a pause candidate, not confirmed yet
        self._count = 0
        self._item_count = 0
        self._speech_item = ""  # the id the user item of the speech in progress will have
        self._buffer: list[np.ndarray] = []  # input audio since the last commit or clear
        self._buffered = 0  # samples in _buffer
        self._quiet_since: float | None = None  # idle timeout: when the last speech or response ended
        self._heard_ms = 0.0  # input stream time (ms) received so far

    # ---- inputs ----------------------------------------------------------------------------------

    def on_audio(self, pcm: np.ndarray, now: float) -> list[Output]:
        """Microphone audio ((T,) float32 16 kHz) arrived at `now`."""
        out: list[Output] = []
        self._maybe_finish(now)
        self._keep(pcm)
        if not self.settings.turn_detection:
            return out
        if self._next_vad is not None and self.detector.state is VadState.SILENCE:
            self.detector = TurnDetector(self._next_vad)
            self._next_vad = None
        for ev in self.detector.feed(pcm):
            if isinstance(ev, VadPause):
                self._speculate(ev, now, out)
                continue
            if isinstance(ev, VadResumed):
                self._discard_speculation(out)
                continue
            if isinstance(ev, VadSpeechStarted):
                self._speech_at_ms = ev.at_ms
                waiting = self._current is not None and not self._current.submitted
                if waiting:
                    assert self._current is not None
                    self._speech_item = self._current.user_item
                else:
                    self._speech_item = self._new_item_id()
                self._quiet_since = None
                out.append(SpeechStarted(at_ms=ev.at_ms, item_id=self._speech_item))
                self._fire(Trigger.TURN_REOPENED if waiting else Trigger.SPEECH_STARTED)
                continue
            duration_ms = ev.at_ms - self._speech_at_ms
            self._quiet_since = now
            interrupts = self.settings.interrupt_response
            if self.state is TurnState.OVERLAP and duration_ms >= self.settings.min_interruption_ms and interrupts:
                self._interrupt(now, out, "turn_detected")  # the whole utterance arrived in one piece
            if self.state is TurnState.OVERLAP and (interrupts or duration_ms < self.settings.min_interruption_ms):
                out.append(SpeechStopped(ev.at_ms, duration_ms, turn=False, reason=ev.reason,
                                         item_id=self._speech_item))
                self._fire(Trigger.BACKCHANNEL)
                continue
            if self.state is TurnState.OVERLAP or not self.settings.create_response:
                # Not answered now: the speech joins the conversation as an item (a later response reads it).
                item = self._speech_item
                out.append(SpeechStopped(ev.at_ms, duration_ms, turn=True, reason=ev.reason, item_id=item))
                self._commit_item(item, ev.audio, out)
                self._fire(Trigger.TURN_COMMITTED)
                continue
            speculated = self._speculating
            if speculated is not None and ev.reason == "silence":  # the candidate was the end of the turn
                self._speculating = None
                speculated.end_of_turn_ms = ev.end_of_turn_ms
                speculated.speech_end = now - ev.end_of_turn_ms / 1000.0
                self._current = speculated
                out.append(SpeechStopped(ev.at_ms, duration_ms, turn=True, reason=ev.reason,
                                         response_id=speculated.id, item_id=speculated.user_item))
                self._fire(Trigger.TURN_ENDED)
                self._release(speculated, now, out)
                continue
            self._discard_speculation(out)
            r = self._end_turn(ev.audio, now - ev.end_of_turn_ms / 1000.0, ev.end_of_turn_ms)
            out.append(SpeechStopped(ev.at_ms, duration_ms, turn=True, reason=ev.reason, response_id=r.id,
                                     item_id=r.user_item))
            self._fire(Trigger.TURN_ENDED)
            if self._draining is None:
                self._submit(r, out)
        if self.state is TurnState.OVERLAP and self.detector.voiced_ms >= self.settings.min_interruption_ms \
                and self.settings.interrupt_response:
            self._interrupt(now, out, "turn_detected")
        self._idle(now, out)
        return out

    def on_engine_event(self, response_id: str, event: EngineEvent, now: float) -> list[Output]:
        """An event of `response_id`'s engine stream arrived at `now`."""
        out: list[Output] = []
        held = self._speculating
        if held is not None and held.id == response_id:  # not confirmed yet: the client sees nothing of it
            self._hold(held, event)
            return out
        r = self._current if self._current is not None and self._current.id == response_id else None
        draining = self._draining if self._draining is not None and self._draining.id == response_id else None
        if r is None and draining is None:
            return out  # a response that already ended
        if isinstance(event, TextDelta) and r is not None:
            out.append(ResponseText(response_id, event.text))
        elif isinstance(event, AudioChunk) and r is not None and self._speaks(r):
            r.audio_ms = max(r.audio_ms, event.start_ms + event.duration_ms)
            out.append(ResponseAudio(response_id, event.pcm, event.start_ms))
        elif isinstance(event, (ResponseDone, TurnError)):
            done = r if r is not None else draining
            assert done is not None
            done.generating = False
            timings: dict[str, float | None] = {"end_of_turn_ms": round(done.end_of_turn_ms, 2)}
            # A finished response's audio is all queued ahead of this event; a cancelled one's was cut.
            audio_ms = done.sent_ms if draining is not None else done.audio_ms
            if isinstance(event, ResponseDone):
                timings.update(event.timings.as_ms())
                out.append(ResponseFinished(response_id, event.reason, event.text, audio_ms, timings, done.item_id,
                                            event.input_tokens, event.output_tokens, done.cause))
                status: Literal["completed", "incomplete"] = "completed" if event.reason == "eos" else "incomplete"
                kept_ms = audio_ms if done.truncated_ms is None else min(audio_ms, done.truncated_ms)
                self.items.update(done.item_id, text=event.text, audio_ms=kept_ms, status=status)
            else:
                out.append(ErrorEvent(event.code, event.message))
                out.append(ResponseFinished(response_id, "error", "", audio_ms, timings, done.item_id))
                self.items.update(done.item_id, text="", status="incomplete")
            if draining is not None:
                self._draining = None
                waiting = self._current
                if waiting is not None and not waiting.submitted and self.state is TurnState.RESPONDING:
                    self._submit(waiting, out)
            self._maybe_finish(now)
        return out

    def on_audio_sent(self, response_id: str, end_ms: float, now: float) -> None:
        """The sender handed `response_id`'s audio up to `end_ms` (of the reply) to the socket at `now`."""
        for r in (self._current, self._draining):
            if r is not None and r.id == response_id and end_ms > r.sent_ms:
                r.play_end_at = max(r.play_end_at or now, now) + (end_ms - r.sent_ms) / 1000.0
                r.sent_ms = end_ms

    def on_playback(self, response_id: str, played_ms: float, now: float) -> list[Output]:
        """The client reports having played `played_ms` of `response_id`'s audio (counted up to what was
        sent: a client cannot have played more)."""
        r = self._current
        if r is not None and r.id == response_id:
            r.played_ms = max(r.played_ms, min(played_ms, r.sent_ms))
            r.reported_at = now
        self._maybe_finish(now)
        return []

    def on_interrupt_request(self, played_ms: float | None, now: float) -> list[Output]:
        """The client asked to stop the response. A no-op when the agent is not speaking, including while
        a turn waits for the previous response's cancel (its response has not started)."""
        out: list[Output] = []
        if self.state in (TurnState.RESPONDING, TurnState.OVERLAP) and self._current is not None \
                and self._current.submitted:
            if played_ms is not None:
                self.on_playback(self._current.id, played_ms, now)
            if self._current is not None:
                self._interrupt(now, out, "client_cancelled")
        return out

    def on_dtmf(self, digit: str) -> list[Output]:
        """The caller pressed a key: reported (logged and counted); it changes nothing in the conversation."""
        return [DtmfReceived(digit, round(self._heard_ms, 2))]

    def on_transcript(self, event: TranscriptEvent) -> list[Output]:
        """The engine's transcript of a user audio item."""
        if isinstance(event, TranscriptDelta):
            return [UserTranscript(event.item_id, delta=event.delta)]
        if isinstance(event, TranscriptDone):
            self.items.update(event.item_id, text=event.text)
            return [UserTranscript(event.item_id, text=event.text, final=True, audio_seconds=event.audio_seconds)]
        return [UserTranscript(event.item_id, final=True, error=event.message)]

    def update_settings(self, settings: SessionSettings) -> list[Output]:
        """New settings for the next turns; VAD changes apply at the next silence."""
        out: list[Output] = []
        if settings.vad != self.settings.vad:
            self._next_vad = settings.vad
        if settings.instructions != self.settings.instructions:
            out.append(EditHistory("instructions", text=settings.instructions))
        if self.settings.turn_detection and not settings.turn_detection:
            self._discard_speculation(out)
            self.detector.reset()
            if self.state in (TurnState.USER_SPEAKING, TurnState.OVERLAP):
                self._fire(Trigger.DETECTION_OFF)
        self.settings = settings
        out.append(SettingsUpdated(settings))
        return out

    # ---- the conversation, as a client manages it --------------------------------------------------

    def on_commit(self, now: float, event_id: str | None = None) -> list[Output]:
        """The client commits the input audio since the last commit as a user item (no response: a
        `response.create` asks for one, or the session's create_response with turn detection on)."""
        out: list[Output] = []
        if self._buffered < MIN_COMMIT_SAMPLES:
            return [ErrorEvent("input_audio_buffer_commit_empty",
                               f"expected at least {MIN_COMMIT_MS} ms of audio in the buffer, got "
                               f"{self._buffered / INPUT_SAMPLES_PER_MS:.0f} ms", event_id=event_id)]
        audio = np.concatenate(self._buffer)
        self._discard_speculation(out)
        speaking = self.detector.state is VadState.SPEECH and self.settings.turn_detection
        item = self._speech_item if speaking and self._speech_item else self._new_item_id()
        self.detector.reset()
        self._commit_item(item, audio, out)
        if self.state in (TurnState.USER_SPEAKING, TurnState.OVERLAP):
            self._fire(Trigger.TURN_COMMITTED)
        return out

    def on_clear(self, event_id: str | None = None) -> list[Output]:
        out: list[Output] = []
        self._buffer, self._buffered = [], 0
        self._discard_speculation(out)
        if self.settings.turn_detection:
            self.detector.reset()
            if self.state in (TurnState.USER_SPEAKING, TurnState.OVERLAP):
                self._fire(Trigger.DETECTION_OFF)
        return [*out, InputCleared()]

    def on_create_item(self, event: CreateItem) -> list[Output]:
        item, after = event.item, event.previous_item_id
        if item.id in self.items:
            return [ErrorEvent("item_id_exists", f"item.id: expected a new id, got {item.id!r}, which exists",
                               event_id=event.event_id, param="item.id")]
        if after is not None and after != ROOT and after not in self.items:
            return [self._missing(after, event.event_id, "previous_item_id")]
        if item.audio is not None:
            try:
                check_turn_audio(item.audio)
            except TurnRejected as e:
                return [ErrorEvent(BAD_AUDIO, f"item.content: {e}", event_id=event.event_id, param="item.content")]
        out: list[Output] = []
        self._add(item, after, out)
        return out

    def on_delete_item(self, item_id: str, event_id: str | None = None) -> list[Output]:
        if item_id not in self.items:
            return [self._missing(item_id, event_id, "item_id")]
        self.items.delete(item_id)
        return [EditHistory("delete", item_id=item_id), ItemDeleted(item_id)]

    def on_retrieve_item(self, item_id: str, event_id: str | None = None) -> list[Output]:
        item = self.items.get(item_id)
        if item is None:
            return [self._missing(item_id, event_id, "item_id")]
        return [ItemRetrieved(item)]

    def on_truncate_item(self, event: TruncateItem, now: float) -> list[Output]:
        """Cut an assistant item to its first `audio_end_ms` (clamped to the audio it had: a client's
        wall-clock playback position may run past it). The current response is stopped first."""
        item = self.items.get(event.item_id)
        if item is None:
            return [self._missing(event.item_id, event.event_id, "item_id")]
        if item.role != "assistant":
            return [ErrorEvent(BAD_FIELD, f"item_id: expected an assistant item, got a {item.role} item",
                               event_id=event.event_id, param="item_id")]
        out: list[Output] = []
        r = self._current
        draining = self._draining
        if r is not None and r.item_id == item.id and r.submitted:  # still playing or generating: stop it
            end = round(min(event.audio_end_ms, r.sent_ms), 2)
            self.on_playback(r.id, end, now)
            r.truncated_ms = end
            if self._current is r:
                r.reported_at, r.played_ms = now, end
                self._interrupt(now, out, "client_cancelled")
        elif draining is not None and draining.item_id == item.id:  # cancelled, still winding down
            end = round(min(event.audio_end_ms, draining.sent_ms), 2)
            draining.truncated_ms = end
            out.append(EditHistory("truncate", item_id=item.id, audio_ms=end))
        else:
            end = round(min(event.audio_end_ms, item.audio_ms), 2)
            out.append(EditHistory("truncate", item_id=item.id, audio_ms=end))
        self.items.update(item.id, audio_ms=end, status="incomplete" if end < item.audio_ms else item.status)
        out.append(ItemTruncated(item.id, event.content_index, end))
        return out

    def on_create_response(self, event: CreateResponse, now: float) -> list[Output]:
        """The client asks for a response to the conversation as it is."""
        busy = self._draining is not None or (self._current is not None and
                                              (self._current.generating or not self._current.submitted))
        if busy:
            return [ErrorEvent("conversation_already_has_active_response",
                               "expected no response in progress, got one; cancel it or wait for response.done",
                               event_id=event.event_id)]
        if self._current is not None:  # generated, still playing: the client moves on
            self._current = None
            self._fire(Trigger.RESPONSE_FINISHED)
        discarded: list[Output] = []
        self._discard_speculation(discarded)
        self._count += 1
        options = event.options
        r = _Response(f"resp_{self._count}", np.zeros(0, dtype=np.float32), now, 0.0,
                      item_id=self._new_item_id(), options=options)
        self._current = r
        self._fire(Trigger.RESPONSE_REQUESTED)
        r.submitted = True
        previous = None
        if options.keep:
            previous = self.items.add(Item(r.item_id, "assistant", text="", status="in_progress", kind=self._kind(r)))
        out: list[Output] = [*discarded, ResponseStarted(r.id, r.item_id, options, previous)]
        turn = options.turn if options.turn is not None else self.settings.turn
        out.append(StartResponse(r.id, r.item_id, turn, options.instructions, options.keep, now))
        return out

    def on_cancel_response(self, response_id: str | None, now: float, event_id: str | None = None) -> list[Output]:
        """Stop the response being generated; nothing to stop is not an error (a client may cancel right
        after a truncate or a barge-in ended it)."""
        out: list[Output] = []
        r = self._current
        if r is not None and r.submitted and r.generating and response_id in (None, r.id):
            self._interrupt(now, out, "client_cancelled")
        return out

    # ---- speculation: a turn started at a pause candidate, shown only once the pause ends the turn --------

    def _speculate(self, pause: VadPause, now: float, out: list[Output]) -> None:
        """Start the turn the pause would end, on exactly the audio the end of turn would submit; its events
        are held. Only for a plain speech turn: nothing else in flight, a response wanted."""
        if (self.state is not TurnState.USER_SPEAKING or self._current is not None or self._draining is not None
                or self._speculating is not None or not self.settings.create_response):
            return
        self._count += 1
        waited_ms = pause.detected_ms - pause.at_ms
        r = _Response(f"resp_{self._count}", pause.audio, now - waited_ms / 1000.0, waited_ms,
                      user_item=self._speech_item or self._new_item_id(), item_id=self._new_item_id(), held=[])
        r.submitted = True
        self._speculating = r
        out.append(SubmitTurn(r.id, pause.audio, self.settings.turn, r.speech_end, r.user_item, r.item_id,
                              self.settings.transcribe, speculative=True))

    def _discard_speculation(self, out: list[Output]) -> None:
        r = self._speculating
        if r is not None:
            self._speculating = None
            out.append(DiscardTurn(r.id))

    def _hold(self, r: _Response, event: EngineEvent) -> None:
        """A speculative response's engine event, kept as the server events it will become."""
        assert r.held is not None
        if isinstance(event, TextDelta):
            r.held.append(ResponseText(r.id, event.text))
        elif isinstance(event, AudioChunk) and self._speaks(r):
            r.audio_ms = max(r.audio_ms, event.start_ms + event.duration_ms)
            r.held.append(ResponseAudio(r.id, event.pcm, event.start_ms))
        elif isinstance(event, ResponseDone) and event.reason != "discarded":
            r.generating = False
            r.held.append(ResponseFinished(r.id, event.reason, event.text, r.audio_ms, event.timings.as_ms(),
                                           r.item_id, event.input_tokens, event.output_tokens))
        elif isinstance(event, TurnError):
            r.generating = False
            r.held += [ErrorEvent(event.code, event.message), ResponseFinished(r.id, "error", "", r.audio_ms, {},
                                                                               r.item_id)]

    def _release(self, r: _Response, now: float, out: list[Output]) -> None:
        """The pause ended the turn: the speculative response becomes the current one, its held events go out
        in order (as the same turn submitted now would have sent them), and the engine is told."""
        held, r.held = r.held or [], None
        self._buffer, self._buffered = [], 0
        if self.conversation_events:
            out.append(InputCommitted(r.user_item, self.items.last_id))
        user = Item(r.user_item, "user", audio=r.audio, kind="audio")
        previous = self.items.add(user)
        if self.conversation_events:
            out.append(ItemAdded(user, previous))
        reply_previous = self.items.add(Item(r.item_id, "assistant", text="", status="in_progress", kind=self._kind(r)))
        out += [ResponseStarted(r.id, r.item_id, r.options, reply_previous), ConfirmTurn(r.id, r.speech_end)]
        r.audio = np.zeros(0, dtype=np.float32)
        for event in held:
            if isinstance(event, ResponseFinished):
                event = dataclasses.replace(event, timings={"end_of_turn_ms": round(r.end_of_turn_ms, 2),
                                                            **event.timings})
                status: Literal["completed", "incomplete"] = "completed" if event.reason == "eos" else "incomplete"
                self.items.update(r.item_id, text=event.text, audio_ms=event.audio_ms, status=status)
            out.append(event)
        self._maybe_finish(now)

    # ---- internals -------------------------------------------------------------------------------

    def _fire(self, trigger: Trigger) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, trigger)]
        except KeyError:
            raise SessionStateError(f"no transition from {self.state.value} on {trigger.value}") from None

    def _new_item_id(self) -> str:
        """A fresh item id, never one a client already chose."""
        while True:
            self._item_count += 1
            item_id = f"item_{self.id}_{self._item_count}"
            if item_id not in self.items:
                return item_id

    def _keep(self, pcm: np.ndarray) -> None:
        """Input audio since the last commit, the newest MAX_INPUT_SAMPLES of it."""
        self._heard_ms += len(pcm) / INPUT_SAMPLES_PER_MS
        self._buffer.append(pcm)
        self._buffered += len(pcm)
        while self._buffered - len(self._buffer[0]) >= MAX_INPUT_SAMPLES:
            self._buffered -= len(self._buffer.pop(0))

    def _kind(self, r: _Response) -> Literal["text", "audio"]:
        return "text" if r.options.modality == "text" or self.settings.modality == "text" else "audio"

    def _speaks(self, r: _Response) -> bool:
        return self._kind(r) == "audio"

    def _missing(self, item_id: str, event_id: str | None, param: str) -> ErrorEvent:
        shown = item_id if len(item_id) <= 64 else item_id[:64] + "..."
        return ErrorEvent("item_not_found", f"{param}: expected the id of an item in the conversation, got "
                          f"{shown!r}", event_id=event_id, param=param)

    def _add(self, item: Item, after: str | None, out: list[Output]) -> None:
        """A user, assistant or system item joins the conversation (and the engine's history)."""
        previous = self.items.add(item, after)
        transcribe = self.settings.transcribe and item.audio is not None
        history = HistoryItem(item.id, item.role, text=item.text if item.audio is None else None,
                              audio=item.audio, transcribe=transcribe)
        out.append(EditHistory("add", item=history, after=after))
        if self.conversation_events:
            out.append(ItemAdded(item, previous))

    def _commit_item(self, item_id: str, audio: np.ndarray, out: list[Output]) -> None:
        self._buffer, self._buffered = [], 0
        previous = self.items.last_id
        if self.conversation_events:
            out.append(InputCommitted(item_id, previous))
        self._add(Item(item_id, "user", audio=audio, kind="audio"), None, out)

    def _idle(self, now: float, out: list[Output]) -> None:
        """server_vad's idle timeout: no speech for `idle_timeout_ms` after a response played out commits the
        silence as a turn, so the model speaks up."""
        idle_ms = self.settings.idle_timeout_ms
        if idle_ms is None or self.state is not TurnState.LISTENING or self._quiet_since is None:
            return
        if (now - self._quiet_since) * 1000.0 < idle_ms or self._buffered < MIN_COMMIT_SAMPLES:
            return
        self._quiet_since = None
        item = self._new_item_id()
        end = self._heard_ms
        out.append(InputTimeout(max(0.0, end - idle_ms), end, item))
        audio = np.concatenate(self._buffer)[-MAX_INPUT_SAMPLES:]
        if not self.settings.create_response:
            self._commit_item(item, audio, out)
            return
        self._count += 1
        r = _Response(f"resp_{self._count}", audio, now, 0.0, user_item=item, item_id=self._new_item_id())
        self._current = r
        self._fire(Trigger.RESPONSE_REQUESTED)
        self._submit(r, out)

    def _end_turn(self, audio: np.ndarray, speech_end: float, end_of_turn_ms: float) -> _Response:
        """The response answering a turn that just ended: a new one, or the waiting one it joins."""
        r = self._current
        if r is not None and not r.submitted:  # reopened: this utterance joins the waiting turn
            keep = self.settings.vad.max_turn_ms * INPUT_SAMPLES_PER_MS
            r.audio = np.concatenate([r.audio, audio])[-keep:]
            r.speech_end, r.end_of_turn_ms = speech_end, end_of_turn_ms
            return r
        self._count += 1
        self._current = _Response(f"resp_{self._count}", audio, speech_end, end_of_turn_ms,
                                  user_item=self._speech_item or self._new_item_id(), item_id=self._new_item_id())
        return self._current

    def _submit(self, r: _Response, out: list[Output]) -> None:
        r.submitted = True
        self._buffer, self._buffered = [], 0
        if self.conversation_events:
            out.append(InputCommitted(r.user_item, self.items.last_id))
        previous = self.items.add(Item(r.user_item, "user", audio=r.audio, kind="audio"))
        if self.conversation_events:
            out.append(ItemAdded(Item(r.user_item, "user", audio=r.audio, kind="audio"), previous))
        reply_previous = self.items.add(Item(r.item_id, "assistant", text="", status="in_progress", kind=self._kind(r)))
        out.append(ResponseStarted(r.id, r.item_id, r.options, reply_previous))
        transcribe = self.settings.transcribe
        out.append(SubmitTurn(r.id, r.audio, self.settings.turn, r.speech_end, r.user_item, r.item_id, transcribe))
        r.audio = np.zeros(0, dtype=np.float32)

    def _played(self, r: _Response, now: float) -> float:
        """What the client has heard: its report, or for a silent client the real-time estimate of what
        was sent; never more than was sent."""
        if r.reported_at is not None or r.play_end_at is None:
            return r.played_ms
        return max(0.0, r.sent_ms - max(0.0, r.play_end_at - now) * 1000.0)

    def _interrupt(self, now: float, out: list[Output], cause: Literal["turn_detected", "client_cancelled"]) -> None:
        r = self._current
        assert r is not None and r.submitted, "interrupt without a started response"
        self._current = None
        r.cause = cause
        self._fire(Trigger.INTERRUPTED)
        played = round(self._played(r, now), 2)
        out.append(CancelTurn(r.id, played, generating=r.generating))
        out.append(Interrupted(r.id, played))
        if r.generating:
            self._draining = r
        else:
            self.items.update(r.item_id, audio_ms=played, status="incomplete")

    def _maybe_finish(self, now: float) -> None:
        """End RESPONDING when the current response is generated and played out."""
        r = self._current
        if r is None or not r.submitted or r.generating or r.sent_ms < r.audio_ms:
            return
        if r.audio_ms <= 0.0 or r.play_end_at is None:
            finished = True
        elif r.reported_at is not None:
            finished = (r.played_ms >= r.audio_ms - PLAYED_TOLERANCE_MS
                        or now >= r.play_end_at + REPORT_TIMEOUT_S)
        else:
            finished = now >= r.play_end_at + PLAYBACK_SLACK_S
        if finished:
            self._current = None
            self._quiet_since = now
            self._fire(Trigger.RESPONSE_FINISHED)
