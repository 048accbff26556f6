"""Session state machine: turns, engine events, playback, barge-in policy. No I/O; `now` is stream time."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import FakeEnergyClassifier, SessionClock, silence, tone

from voice_agent.engine.api import AudioChunk, ResponseDone, TextDelta, TurnError, TurnTimings
from voice_agent.errors import SessionStateError, VadSettingsError
from voice_agent.serve.protocols.events import (
    ErrorEvent,
    Interrupted,
    ResponseAudio,
    ResponseFinished,
    ResponseStarted,
    ResponseText,
    SettingsUpdated,
    SpeechStarted,
    SpeechStopped,
)
from voice_agent.serve.session import CancelTurn, Session, SubmitTurn, Trigger, TurnState
from voice_agent.serve.settings import SessionSettings
from voice_agent.serve.vad import TurnDetector, VadSettings

FRAME_MS = 20


Clock = SessionClock


def make_session(min_interruption_ms: int = 400, silence_ms: int = 300) -> tuple[Session, Clock]:
    settings = SessionSettings(
        vad=VadSettings(silence_ms=silence_ms, speech_start_ms=100, prefix_padding_ms=100),
        min_interruption_ms=min_interruption_ms,
    )
    session = Session("s1", settings, TurnDetector(settings.vad, FakeEnergyClassifier()))
    return session, Clock(session)


def chunk(start_ms: float, ms: float = 500.0) -> AudioChunk:
    return AudioChunk(np.zeros(int(ms * 24), np.float32), start_ms)


def play(s: Session, rid: str, start_ms: float, ms: float, now: float, *, sent: bool = True) -> list:
    """An engine audio chunk of `rid`, and (`sent`) its hand-over to the socket at `now`, as the
    connection reports it."""
    out = s.on_engine_event(rid, chunk(start_ms, ms), now)
    if sent:
        s.on_audio_sent(rid, start_ms + ms, now)
    return out


def done(reason: str = "eos", text: str = "hi", audio_ms: float = 0.0) -> ResponseDone:
    return ResponseDone(text, reason, TurnTimings(speech_end=0.0, first_audio=0.1), audio_ms)  # type: ignore[arg-type]


def of(outputs: list, kind: type) -> list:
    return [o for o in outputs if isinstance(o, kind)]


def start_response(s: Session, c: Clock) -> SubmitTurn:
    out = c.feed(np.concatenate([tone(600), silence(400)]))
    assert [type(o) for o in out] == [SpeechStarted, SpeechStopped, ResponseStarted, SubmitTurn]
    assert s.state is TurnState.RESPONDING
    return of(out, SubmitTurn)[0]


def test_speech_then_silence_submits_a_turn() -> None:
    s, c = make_session(silence_ms=300)
    out = c.feed(np.concatenate([silence(200), tone(600), silence(400)]))
    started, stopped = of(out, SpeechStarted)[0], of(out, SpeechStopped)[0]
    submit = of(out, SubmitTurn)[0]
    assert started.at_ms == 200.0 and stopped.at_ms == 800.0 and stopped.turn
    assert submit.response_id == "resp_1"
    assert len(submit.audio) == (100 + 600 + 100) * 16  # prefix pad + speech + trailing pad
    # speech_end is when the speech ended, before the 300 ms end-of-turn wait
    assert submit.speech_end == pytest.approx(100.0 + 1.1 - 0.3, abs=1e-6)
    assert s.state is TurnState.RESPONDING


def test_engine_events_reach_the_client_and_playback_ends_the_response() -> None:
    s, c = make_session()
    rid = start_response(s, c).response_id
    assert of(s.on_engine_event(rid, TextDelta("Hello"), c.now), ResponseText) == [ResponseText(rid, "Hello")]
    audio = play(s, rid, 0.0, 500.0, c.now)
    assert isinstance(audio[0], ResponseAudio) and audio[0].start_ms == 0.0
    fin = of(s.on_engine_event(rid, done(text="Hello", audio_ms=500.0), c.now), ResponseFinished)[0]
    assert fin.reason == "eos" and fin.text == "Hello" and fin.audio_ms == 500.0
    assert fin.timings["end_of_turn_ms"] == 300.0 and fin.timings["first_audio"] == 100.0
    assert s.state is TurnState.RESPONDING  # still playing on the client
    s.on_playback(rid, 200.0, c.now + 0.2)
    assert s.state is TurnState.RESPONDING
    s.on_playback(rid, 500.0, c.now + 0.5)
    assert s.state is TurnState.LISTENING


def test_silent_client_playback_is_estimated_in_real_time() -> None:
    s, c = make_session()
    rid = start_response(s, c).response_id
    t0 = c.now
    play(s, rid, 0.0, 1000.0, t0)
    s.on_engine_event(rid, done(audio_ms=1000.0), t0)
    c.feed(silence(1200))  # 1.0 s of audio + 0.3 s slack not yet over
    assert s.state is TurnState.RESPONDING
    c.feed(silence(200))
    assert s.state is TurnState.LISTENING


def test_backchannel_shorter_than_min_interruption_is_ignored() -> None:
    s, c = make_session(min_interruption_ms=400)
    rid = start_response(s, c).response_id
    s.on_engine_event(rid, chunk(0.0, 5000.0), c.now)
    out = c.feed(np.concatenate([tone(300), silence(400)]))  # a 300 ms "mhm"
    assert [type(o) for o in out] == [SpeechStarted, SpeechStopped]
    assert of(out, SpeechStopped)[0].turn is False
    assert s.state is TurnState.RESPONDING
    assert of(s.on_engine_event(rid, TextDelta("more"), c.now), ResponseText)  # the response goes on


def test_barge_in_cancels_response_and_the_new_turn_waits_for_the_cancel() -> None:
    s, c = make_session(min_interruption_ms=400)
    rid = start_response(s, c).response_id
    play(s, rid, 0.0, 5000.0, c.now)
    s.on_playback(rid, 700.0, c.now)
    out = c.feed(tone(380))  # speech started, not long enough yet
    assert s.state is TurnState.OVERLAP and not of(out, CancelTurn)
    out = c.feed(tone(40))
    assert of(out, CancelTurn) == [CancelTurn(rid, 700.0, generating=True)]
    assert of(out, Interrupted) == [Interrupted(rid, 700.0)]
    assert s.state is TurnState.USER_SPEAKING
    assert s.on_engine_event(rid, TextDelta("stale"), c.now) == []  # unsent output is dropped
    assert s.on_engine_event(rid, chunk(5000.0), c.now) == []
    out = c.feed(np.concatenate([tone(300), silence(400)]))
    assert of(out, SpeechStopped)[0].turn and not of(out, SubmitTurn)  # engine has not confirmed yet
    assert s.state is TurnState.RESPONDING
    out = s.on_engine_event(rid, done("cancelled", text="cut"), c.now)
    assert [type(o) for o in out] == [ResponseFinished, ResponseStarted, SubmitTurn]
    assert out[0].reason == "cancelled" and out[0].text == "cut"
    assert out[2].response_id == "resp_2"


def test_barge_in_during_playback_after_generation_finished() -> None:
    s, c = make_session()
    rid = start_response(s, c).response_id
    play(s, rid, 0.0, 4000.0, c.now)
    s.on_engine_event(rid, done(audio_ms=4000.0), c.now)
    out = c.feed(tone(500))
    played = of(out, Interrupted)[0].played_ms
    assert 350.0 <= played <= 450.0  # real-time estimate: the client has played about 400 ms so far
    assert of(out, CancelTurn) == [CancelTurn(rid, played, generating=False)]
    out = c.feed(silence(400))  # the new turn is submitted at once: nothing to drain
    assert [type(o) for o in out] == [SpeechStopped, ResponseStarted, SubmitTurn]


def test_one_utterance_arriving_in_one_piece_still_interrupts() -> None:
    s, c = make_session(min_interruption_ms=400)
    rid = start_response(s, c).response_id
    s.on_engine_event(rid, chunk(0.0, 5000.0), c.now)
    out = s.on_audio(np.concatenate([tone(600), silence(400)]), c.now + 1.0)
    assert [type(o) for o in out] == [SpeechStarted, CancelTurn, Interrupted, SpeechStopped]
    assert s.state is TurnState.RESPONDING and of(out, SpeechStopped)[0].turn


def test_client_interrupt_request() -> None:
    s, c = make_session()
    rid = start_response(s, c).response_id
    play(s, rid, 0.0, 3000.0, c.now)
    out = s.on_interrupt_request(1234.0, c.now)
    assert of(out, Interrupted) == [Interrupted(rid, 1234.0)]
    assert s.state is TurnState.LISTENING
    assert s.on_interrupt_request(None, c.now) == []  # nothing to interrupt


def test_turn_error_is_reported_and_the_session_continues() -> None:
    s, c = make_session()
    rid = start_response(s, c).response_id
    out = s.on_engine_event(rid, TurnError("engine_error", "boom"), c.now)
    assert out[0] == ErrorEvent("engine_error", "boom")
    assert isinstance(out[1], ResponseFinished) and out[1].reason == "error"
    assert s.state is TurnState.LISTENING
    start_response(s, c)


def test_update_settings_applies_vad_change_at_next_silence() -> None:
    s, c = make_session(silence_ms=300)
    c.feed(tone(300))
    new = SessionSettings(vad=VadSettings(silence_ms=800, speech_start_ms=100), min_interruption_ms=100)
    assert isinstance(s.update_settings(new)[0], SettingsUpdated)
    out = c.feed(silence(300))  # the old 300 ms limit still ends this turn
    assert of(out, SpeechStopped)
    assert s.detector.settings.silence_ms == 300
    c.feed(silence(20))
    assert s.detector.settings.silence_ms == 800


def test_transition_table_rejects_impossible_triggers() -> None:
    s, _ = make_session()
    with pytest.raises(SessionStateError, match="no transition from listening on backchannel"):
        s._fire(Trigger.BACKCHANNEL)


def test_min_interruption_is_validated() -> None:
    with pytest.raises(VadSettingsError, match=r"min_interruption_ms: expected an integer 0..10000, got -1"):
        SessionSettings(min_interruption_ms=-1)


def test_played_ms_never_exceeds_the_audio_sent() -> None:
    s, c = make_session()
    rid = start_response(s, c).response_id
    play(s, rid, 0.0, 1000.0, c.now)
    play(s, rid, 1000.0, 2000.0, c.now, sent=False)  # generated, still queued for a slow client
    s.on_playback(rid, 2500.0, c.now)  # a report beyond what was sent counts as all that was sent
    assert of(s.on_interrupt_request(None, c.now), Interrupted) == [Interrupted(rid, 1000.0)]


def test_a_silent_clients_playback_is_estimated_from_what_was_sent() -> None:
    s, c = make_session()
    rid = start_response(s, c).response_id
    play(s, rid, 0.0, 800.0, c.now)
    play(s, rid, 800.0, 4000.0, c.now, sent=False)
    out = s.on_interrupt_request(None, c.now + 10.0)  # long after: a real-time player has played it all
    assert of(out, Interrupted) == [Interrupted(rid, 800.0)]


def test_a_cancelled_response_counts_the_audio_sent_not_generated() -> None:
    s, c = make_session()
    rid = start_response(s, c).response_id
    play(s, rid, 0.0, 500.0, c.now)
    play(s, rid, 500.0, 1500.0, c.now, sent=False)  # dropped unsent at the cancel
    (cancel,) = of(s.on_interrupt_request(None, c.now), CancelTurn)
    assert cancel.generating
    (fin,) = of(s.on_engine_event(rid, done("cancelled", audio_ms=2000.0), c.now), ResponseFinished)
    assert fin.audio_ms == 500.0


def test_a_finished_response_is_not_over_until_its_audio_is_sent() -> None:
    s, c = make_session()
    rid = start_response(s, c).response_id
    play(s, rid, 0.0, 500.0, c.now, sent=False)
    (fin,) = of(s.on_engine_event(rid, done(audio_ms=500.0), c.now), ResponseFinished)
    assert fin.audio_ms == 500.0  # all of it is queued ahead of response.done
    c.feed(silence(2000))
    assert s.state is TurnState.RESPONDING  # a slow reader has not even received it yet
    s.on_audio_sent(rid, 500.0, c.now)
    c.feed(silence(900))
    assert s.state is TurnState.LISTENING


def interrupt_then_end_a_turn(s: Session, c: Clock) -> str:
    """Barge in on resp_1, end the interrupting turn while resp_1 is still being cancelled; returns resp_1."""
    rid = start_response(s, c).response_id
    play(s, rid, 0.0, 5000.0, c.now)
    out = c.feed(np.concatenate([tone(600), silence(400)]))
    assert of(out, Interrupted) and not of(out, SubmitTurn)
    (stopped,) = of(out, SpeechStopped)
    assert stopped.turn and stopped.response_id == "resp_2"  # announced: resp_2 will answer it
    return rid


def test_a_turn_that_waits_for_a_cancel_and_is_spoken_over_is_still_answered() -> None:
    s, c = make_session(min_interruption_ms=400)
    rid = interrupt_then_end_a_turn(s, c)
    out = c.feed(np.concatenate([tone(700), silence(400)]))  # the user goes on before resp_2 could start
    assert not of(out, Interrupted) and not of(out, CancelTurn)  # nothing was playing
    (stopped,) = of(out, SpeechStopped)
    assert stopped.turn and stopped.response_id == "resp_2"  # this utterance joins the waiting turn
    out = s.on_engine_event(rid, done("cancelled"), c.now)
    assert [type(o) for o in out] == [ResponseFinished, ResponseStarted, SubmitTurn]
    (submit,) = of(out, SubmitTurn)
    assert submit.response_id == "resp_2"
    assert len(submit.audio) == (100 + 600 + 100 + 100 + 700 + 100) * 16  # both utterances, with padding


def test_the_joined_turn_keeps_the_latest_max_turn_ms() -> None:
    s, c = make_session()
    rid = interrupt_then_end_a_turn(s, c)
    c.feed(np.concatenate([tone(20_000), silence(400)]))
    c.feed(np.concatenate([tone(20_000), silence(400)]))
    (submit,) = of(s.on_engine_event(rid, done("cancelled"), c.now), SubmitTurn)
    assert submit.response_id == "resp_2" and len(submit.audio) == s.settings.vad.max_turn_ms * 16


def test_a_stop_request_while_a_turn_waits_for_a_cancel_leaves_the_turn_answered() -> None:
    s, c = make_session()
    rid = interrupt_then_end_a_turn(s, c)
    assert s.on_interrupt_request(100.0, c.now) == []  # resp_2 has not started: nothing is playing
    out = s.on_engine_event(rid, done("cancelled"), c.now)
    assert [e.response_id for e in of(out, ResponseStarted)] == ["resp_2"]


def test_a_turn_that_ends_while_another_is_spoken_waits_for_the_speaker() -> None:
    s, c = make_session()
    rid = interrupt_then_end_a_turn(s, c)
    c.feed(tone(300))  # the user speaks again: the waiting turn reopens
    assert s.state is TurnState.USER_SPEAKING
    assert s.on_engine_event(rid, done("cancelled"), c.now)[1:] == []  # not submitted mid-utterance
    out = c.feed(silence(400))
    assert [type(o) for o in out] == [SpeechStopped, ResponseStarted, SubmitTurn]
