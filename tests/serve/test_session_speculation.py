"""Speculative endpointing in the session: a turn started at a pause candidate, its events held until the
pause ends the turn (then released in order) or dropped without a trace when the caller goes on."""

from __future__ import annotations

import numpy as np
import pytest
from fakes import FakeEnergyClassifier, SessionClock, silence, tone

from voice_agent.engine.api import AudioChunk, ResponseDone, TextDelta, TurnTimings
from voice_agent.serve.protocols.events import (
    Interrupted,
    ResponseAudio,
    ResponseFinished,
    ResponseText,
    SpeechStarted,
    SpeechStopped,
)
from voice_agent.serve.session import CancelTurn, DiscardTurn, Session, SubmitTurn, TurnState
from voice_agent.serve.settings import SessionSettings
from voice_agent.serve.vad import TurnDetector, VadSettings


def make(speculate_ms: int = 200) -> tuple[Session, SessionClock]:
    settings = SessionSettings(vad=VadSettings(silence_ms=500, speech_start_ms=100, prefix_padding_ms=100,
                                               speculate_ms=speculate_ms))
    session = Session("s1", settings, TurnDetector(settings.vad, FakeEnergyClassifier()))
    return session, SessionClock(session)


def kinds(out: list) -> list[str]:
    return [type(o).__name__ for o in out]


def reply(s: Session, rid: str, now: float) -> list:
    out = s.on_engine_event(rid, TextDelta("Hi "), now)
    out += s.on_engine_event(rid, AudioChunk(np.zeros(4800, np.float32), 0.0), now)
    return out


def test_a_confirmed_candidate_releases_the_held_reply_in_order() -> None:
    s, c = make()
    out = c.feed(np.concatenate([tone(600), silence(200)]))
    assert kinds(out) == ["SpeechStarted", "SubmitTurn"]  # the client sees only the speech start
    submit = out[1]
    assert submit.speculative and s.state is TurnState.USER_SPEAKING
    assert reply(s, submit.response_id, c.now) == []  # held
    out = c.feed(silence(300))  # the pause reaches the end-of-turn silence
    assert kinds(out) == ["SpeechStopped", "ResponseStarted", "ConfirmTurn", "ResponseText", "ResponseAudio"]
    assert out[0].response_id == submit.response_id and out[2].response_id == submit.response_id
    assert out[2].speech_end == pytest.approx(submit.speech_end)  # real time: the same end of speech
    assert s.state is TurnState.RESPONDING
    # From now on it is an ordinary response.
    assert kinds(s.on_engine_event(submit.response_id, TextDelta("there"), c.now)) == ["ResponseText"]
    finished = s.on_engine_event(submit.response_id, ResponseDone("Hi there", "eos", TurnTimings(0.0)), c.now)
    assert kinds(finished) == ["ResponseFinished"]


def test_the_candidate_submits_exactly_the_audio_the_plain_turn_would() -> None:
    audio = np.concatenate([tone(600), silence(600)])
    spec, c1 = make(200)
    plain, c2 = make(0)
    speculative = [o for o in c1.feed(audio) if isinstance(o, SubmitTurn)]
    ordinary = [o for o in c2.feed(audio) if isinstance(o, SubmitTurn)]
    assert len(speculative) == len(ordinary) == 1 and not ordinary[0].speculative
    assert np.array_equal(speculative[0].audio, ordinary[0].audio)
    assert speculative[0].speech_end == pytest.approx(ordinary[0].speech_end)


def test_speech_resuming_discards_the_candidate_and_a_later_pause_starts_another() -> None:
    s, c = make()
    first = c.feed(np.concatenate([tone(600), silence(250)]))
    rid = [o for o in first if isinstance(o, SubmitTurn)][0].response_id
    assert reply(s, rid, c.now) == []
    out = c.feed(tone(400, hz=300))  # the caller goes on
    assert out == [DiscardTurn(rid)] and s.state is TurnState.USER_SPEAKING
    assert s.on_engine_event(rid, ResponseDone("", "discarded", TurnTimings(0.0)), c.now) == []  # no trace
    out = c.feed(silence(600))
    second = [o for o in out if isinstance(o, SubmitTurn)]
    assert len(second) == 1 and second[0].speculative and second[0].response_id != rid
    assert kinds(out) == ["SubmitTurn", "SpeechStopped", "ResponseStarted", "ConfirmTurn"]
    assert not [o for o in out if isinstance(o, (SpeechStarted, ResponseText, ResponseAudio))]


def test_a_reply_finished_while_held_is_released_whole_and_barge_in_works_on_it() -> None:
    s, c = make()
    rid = [o for o in c.feed(np.concatenate([tone(600), silence(200)])) if isinstance(o, SubmitTurn)][0].response_id
    reply(s, rid, c.now)
    assert s.on_engine_event(rid, ResponseDone("Hi", "eos", TurnTimings(0.0), 200.0), c.now) == []
    out = c.feed(silence(300))
    assert kinds(out)[-3:] == ["ResponseText", "ResponseAudio", "ResponseFinished"]
    finished = [o for o in out if isinstance(o, ResponseFinished)][0]
    assert finished.timings["end_of_turn_ms"] == 500.0 and s.state is TurnState.RESPONDING
    s.on_audio_sent(rid, 200.0, c.now)
    # Still playing: the caller talks over it, as over any reply.
    out = c.feed(tone(500))
    assert kinds(out) == ["SpeechStarted", "CancelTurn", "Interrupted"]
    assert out[1] == CancelTurn(rid, out[2].played_ms, generating=False) and isinstance(out[2], Interrupted)


def test_no_speculation_while_a_reply_plays_or_without_create_response() -> None:
    s, c = make()
    rid = [o for o in c.feed(np.concatenate([tone(600), silence(600)])) if isinstance(o, SubmitTurn)][0].response_id
    reply(s, rid, c.now)  # the reply is playing: speech now is a barge-in, not a speculative turn
    out = c.feed(np.concatenate([tone(300), silence(200)]))
    assert not [o for o in out if isinstance(o, SubmitTurn)]
    quiet, c2 = make()
    quiet.update_settings(SessionSettings(vad=quiet.settings.vad, create_response=False))
    assert not [o for o in c2.feed(np.concatenate([tone(600), silence(250)])) if isinstance(o, SubmitTurn)]
    assert [type(o) for o in c2.feed(silence(300)) if isinstance(o, SpeechStopped)] == [SpeechStopped]
