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

from dataclasses import dataclass
from enum import Enum

import numpy as np

from voice_agent.audio import INPUT_SAMPLES_PER_MS
from voice_agent.engine.api import AudioChunk, EngineEvent, ResponseDone, TextDelta, TurnError, TurnSettings
from voice_agent.errors import SessionStateError
from voice_agent.serve.protocols.events import (
    ErrorEvent,
    Interrupted,
    ResponseAudio,
    ResponseFinished,
    ResponseStarted,
    ResponseText,
    ServerEvent,
    SettingsUpdated,
    SpeechStarted,
    SpeechStopped,
)
from voice_agent.serve.settings import SessionSettings
from voice_agent.serve.vad import TurnDetector, VadSettings, VadSpeechStarted, VadState

PLAYED_TOLERANCE_MS = 50.0  # a reported position this close to the end counts as "played it all"
PLAYBACK_SLACK_S = 0.3  # client without reports: jitter buffer + network allowance after real time
REPORT_TIMEOUT_S = 3.0  # client with reports: give up waiting for the final report after this


@dataclass(frozen=True)
class SubmitTurn:
    """Command: start `response_id` on the engine. `speech_end` is the monotonic time the user's speech
    ended (before the end-of-turn silence), so the turn's timings measure what the user waited."""

    response_id: str
    audio: np.ndarray  # (T,) float32 16 kHz
    settings: TurnSettings
    speech_end: float


@dataclass(frozen=True)
class CancelTurn:
    """Command: cancel `response_id` keeping `played_ms` of its audio in history. `generating` is False
    when the engine had already finished generating it and the client was still playing it."""

    response_id: str
    played_ms: float
    generating: bool


Output = ServerEvent | SubmitTurn | CancelTurn


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
}


@dataclass
class _Response:
    """One response's bookkeeping, from the end of the user's turn to the end of playback."""

    id: str
    audio: np.ndarray  # the user's turn, until submitted
    speech_end: float
    end_of_turn_ms: float
    submitted: bool = False
    generating: bool = True
    audio_ms: float = 0.0  # reply audio queued for the client so far
    sent_ms: float = 0.0  # reply audio handed to the socket so far
    played_ms: float = 0.0  # the client's latest playback report (at most sent_ms)
    reported_at: float | None = None  # when that report came; None: the client never reported
    play_end_at: float | None = None  # when a real-time player would finish what was sent


class Session:
    """Turn-taking for one conversation. Not thread-safe; call it from one event loop."""

    def __init__(
        self, session_id: str, settings: SessionSettings, detector: TurnDetector | None = None
    ) -> None:
        self.id = session_id
        self.settings = settings
        self.detector = detector if detector is not None else TurnDetector(settings.vad)
        self.state = TurnState.LISTENING
        self._next_vad: VadSettings | None = None
        self._speech_at_ms = 0.0
        self._current: _Response | None = None  # the response the user is hearing (or will)
        self._draining: _Response | None = None  # cancelled, waiting for the engine to confirm
        self._count = 0

    # ---- inputs ----------------------------------------------------------------------------------

    def on_audio(self, pcm: np.ndarray, now: float) -> list[Output]:
        """Microphone audio ((T,) float32 16 kHz) arrived at `now`."""
        out: list[Output] = []
        self._maybe_finish(now)
        if self._next_vad is not None and self.detector.state is VadState.SILENCE:
            self.detector = TurnDetector(self._next_vad)
            self._next_vad = None
        for ev in self.detector.feed(pcm):
            if isinstance(ev, VadSpeechStarted):
                self._speech_at_ms = ev.at_ms
                out.append(SpeechStarted(at_ms=ev.at_ms))
                waiting = self._current is not None and not self._current.submitted
                self._fire(Trigger.TURN_REOPENED if waiting else Trigger.SPEECH_STARTED)
                continue
            duration_ms = ev.at_ms - self._speech_at_ms
            if self.state is TurnState.OVERLAP and duration_ms >= self.settings.min_interruption_ms:
                self._interrupt(now, out)  # the whole utterance arrived in one piece
            if self.state is TurnState.OVERLAP:
                out.append(SpeechStopped(ev.at_ms, duration_ms, turn=False, reason=ev.reason))
                self._fire(Trigger.BACKCHANNEL)
                continue
            r = self._end_turn(ev.audio, now - ev.end_of_turn_ms / 1000.0, ev.end_of_turn_ms)
            out.append(SpeechStopped(ev.at_ms, duration_ms, turn=True, reason=ev.reason, response_id=r.id))
            self._fire(Trigger.TURN_ENDED)
            if self._draining is None:
                self._submit(r, out)
        if self.state is TurnState.OVERLAP and self.detector.voiced_ms >= self.settings.min_interruption_ms:
            self._interrupt(now, out)
        return out

    def on_engine_event(self, response_id: str, event: EngineEvent, now: float) -> list[Output]:
        """An event of `response_id`'s engine stream arrived at `now`."""
        out: list[Output] = []
        r = self._current if self._current is not None and self._current.id == response_id else None
        draining = self._draining if self._draining is not None and self._draining.id == response_id else None
        if r is None and draining is None:
            return out  # a response that already ended
        if isinstance(event, TextDelta) and r is not None:
            out.append(ResponseText(response_id, event.text))
        elif isinstance(event, AudioChunk) and r is not None:
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
                out.append(ResponseFinished(response_id, event.reason, event.text, audio_ms, timings))
            else:
                out.append(ErrorEvent(event.code, event.message))
                out.append(ResponseFinished(response_id, "error", "", audio_ms, timings))
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
                self._interrupt(now, out)
        return out

    def update_settings(self, settings: SessionSettings) -> list[Output]:
        """New settings for the next turns; VAD changes apply at the next silence."""
        if settings.vad != self.settings.vad:
            self._next_vad = settings.vad
        self.settings = settings
        return [SettingsUpdated(settings)]

    # ---- internals -------------------------------------------------------------------------------

    def _fire(self, trigger: Trigger) -> None:
        try:
            self.state = _TRANSITIONS[(self.state, trigger)]
        except KeyError:
            raise SessionStateError(f"no transition from {self.state.value} on {trigger.value}") from None

    def _end_turn(self, audio: np.ndarray, speech_end: float, end_of_turn_ms: float) -> _Response:
        """The response answering a turn that just ended: a new one, or the waiting one it joins."""
        r = self._current
        if r is not None and not r.submitted:  # reopened: this utterance joins the waiting turn
            keep = self.settings.vad.max_turn_ms * INPUT_SAMPLES_PER_MS
            r.audio = np.concatenate([r.audio, audio])[-keep:]
            r.speech_end, r.end_of_turn_ms = speech_end, end_of_turn_ms
            return r
        self._count += 1
        self._current = _Response(f"resp_{self._count}", audio, speech_end, end_of_turn_ms)
        return self._current

    def _submit(self, r: _Response, out: list[Output]) -> None:
        r.submitted = True
        out.append(ResponseStarted(r.id))
        out.append(SubmitTurn(r.id, r.audio, self.settings.turn, r.speech_end))
        r.audio = np.zeros(0, dtype=np.float32)

    def _played(self, r: _Response, now: float) -> float:
        """What the client has heard: its report, or for a silent client the real-time estimate of what
        was sent; never more than was sent."""
        if r.reported_at is not None or r.play_end_at is None:
            return r.played_ms
        return max(0.0, r.sent_ms - max(0.0, r.play_end_at - now) * 1000.0)

    def _interrupt(self, now: float, out: list[Output]) -> None:
        r = self._current
        assert r is not None and r.submitted, "interrupt without a started response"
        self._current = None
        self._fire(Trigger.INTERRUPTED)
        played = round(self._played(r, now), 2)
        out.append(CancelTurn(r.id, played, generating=r.generating))
        out.append(Interrupted(r.id, played))
        if r.generating:
            self._draining = r

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
            self._fire(Trigger.RESPONSE_FINISHED)
