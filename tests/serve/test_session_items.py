"""Session conversation API (conversation_events=True, as the OpenAI Realtime endpoint runs it): exact output
sequences for VAD turns, the create/interrupt_response flags, push-to-talk, items, truncation, responses,
transcripts, the idle timeout and instructions. No I/O; `now` is stream time, audio comes in 20 ms frames."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
from fakes import FakeEnergyClassifier, SessionClock, silence, tone

from voice_agent.engine.api import (
    AudioChunk,
    ResponseDone,
    TextDelta,
    TranscriptDelta,
    TranscriptDone,
    TranscriptFailed,
    TurnSettings,
    TurnTimings,
)
from voice_agent.serve.protocols.events import (
    CreateItem,
    CreateResponse,
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
    SettingsUpdated,
    SpeechStarted,
    SpeechStopped,
    TruncateItem,
    UserTranscript,
)
from voice_agent.serve.session import CancelTurn, EditHistory, Session, StartResponse, SubmitTurn, TurnState
from voice_agent.serve.settings import SessionSettings
from voice_agent.serve.vad import TurnDetector, VadSettings

FRAME_MS = 20
SID = "s1"
TURN = np.concatenate([tone(600), silence(400)])  # 600 ms of "speech", then the 300 ms end-of-turn wait


def iid(n: int) -> str:
    """The n-th item id the session makes."""
    return f"item_{SID}_{n}"


Clock = SessionClock


def make(**changes: Any) -> tuple[Session, Clock]:
    settings = SessionSettings(vad=VadSettings(silence_ms=300, speech_start_ms=100, prefix_padding_ms=100),
                               min_interruption_ms=400, **changes)
    session = Session(SID, settings, TurnDetector(settings.vad, FakeEnergyClassifier()), conversation_events=True)
    return session, Clock(session)


def key(o: object) -> tuple:
    """An output as its type and key fields (arrays as their length)."""
    if isinstance(o, SpeechStarted):
        return ("SpeechStarted", o.item_id)
    if isinstance(o, SpeechStopped):
        return ("SpeechStopped", o.item_id, o.turn, o.response_id)
    if isinstance(o, InputCommitted):
        return ("InputCommitted", o.item_id, o.previous_item_id)
    if isinstance(o, ItemAdded):
        i = o.item
        return ("ItemAdded", i.id, i.role, i.kind, i.text, i.status, o.previous_item_id, o.done)
    if isinstance(o, ResponseStarted):
        return ("ResponseStarted", o.response_id, o.item_id)
    if isinstance(o, SubmitTurn):
        return ("SubmitTurn", o.response_id, o.user_item, o.reply_item, o.transcribe)
    if isinstance(o, StartResponse):
        return ("StartResponse", o.response_id, o.reply_item, o.instructions, o.keep, o.settings)
    if isinstance(o, EditHistory):
        h = o.item
        item = None if h is None else (h.id, h.role, h.text, None if h.audio is None else len(h.audio), h.transcribe)
        return ("EditHistory", o.op, item, o.after, o.item_id, o.audio_ms, o.text)
    if isinstance(o, CancelTurn):
        return ("CancelTurn", o.response_id, o.played_ms, o.generating)
    if isinstance(o, Interrupted):
        return ("Interrupted", o.response_id, o.played_ms)
    if isinstance(o, ResponseFinished):
        return ("ResponseFinished", o.response_id, o.reason, o.item_id, o.cause)
    if isinstance(o, ErrorEvent):
        return ("ErrorEvent", o.code, o.event_id, o.param)
    if isinstance(o, InputCleared):
        return ("InputCleared",)
    if isinstance(o, InputTimeout):
        return ("InputTimeout", o.item_id, o.audio_start_ms, o.audio_end_ms)
    if isinstance(o, ItemDeleted):
        return ("ItemDeleted", o.item_id)
    if isinstance(o, ItemRetrieved):
        i = o.item
        return ("ItemRetrieved", i.id, i.role, i.text, i.audio_ms, i.status)
    if isinstance(o, ItemTruncated):
        return ("ItemTruncated", o.item_id, o.content_index, o.audio_end_ms)
    if isinstance(o, UserTranscript):
        return ("UserTranscript", o.item_id, o.delta, o.text, o.final, o.audio_seconds, o.error)
    if isinstance(o, ResponseText):
        return ("ResponseText", o.response_id, o.text)
    if isinstance(o, ResponseAudio):
        return ("ResponseAudio", o.response_id, o.start_ms, o.duration_ms)
    if isinstance(o, SettingsUpdated):
        return ("SettingsUpdated", o.settings.instructions)
    raise AssertionError(f"unexpected output {o!r}")


def keys(outputs: list) -> list[tuple]:
    return [key(o) for o in outputs]


def audio(s: Session, rid: str, ms: float, now: float, start_ms: float = 0.0) -> list:
    """`ms` of reply audio from the engine, handed to the socket at `now`."""
    out = s.on_engine_event(rid, AudioChunk(np.zeros(int(ms * 24), np.float32), start_ms), now)
    s.on_audio_sent(rid, start_ms + ms, now)
    return out


def done(reason: str = "eos", text: str = "hi", audio_ms: float = 0.0) -> ResponseDone:
    return ResponseDone(text, reason, TurnTimings(speech_end=0.0), audio_ms)  # type: ignore[arg-type]


def vad_turn(s: Session, c: Clock) -> SubmitTurn:
    out = c.feed(TURN)
    submit = out[-1]
    assert isinstance(submit, SubmitTurn), keys(out)
    return submit


def user_text(item_id: str, text: str = "hi") -> Item:
    return Item(item_id, "user", text=text)


# ---- server VAD turns ---------------------------------------------------------------------------------


def test_server_vad_turn_announces_the_user_item_commits_it_and_starts_the_response() -> None:
    s, c = make()
    out = c.feed(TURN)
    assert keys(out) == [
        ("SpeechStarted", iid(1)),
        ("SpeechStopped", iid(1), True, "resp_1"),
        ("InputCommitted", iid(1), None),
        ("ItemAdded", iid(1), "user", "audio", None, "completed", None, True),
        ("ResponseStarted", "resp_1", iid(2)),
        ("SubmitTurn", "resp_1", iid(1), iid(2), False),
    ]
    assert s.items.ids() == [iid(1), iid(2)]
    assert s.items.get(iid(2)) == Item(iid(2), "assistant", text="", status="in_progress", kind="audio")
    assert s.state is TurnState.RESPONDING


def test_second_turn_commits_after_the_previous_reply_item() -> None:
    s, c = make()
    rid = vad_turn(s, c).response_id
    audio(s, rid, 200.0, c.now)
    s.on_engine_event(rid, done(text="hello", audio_ms=200.0), c.now)
    s.on_playback(rid, 200.0, c.now)
    out = c.feed(TURN)
    assert keys(out)[2:5] == [
        ("InputCommitted", iid(3), iid(2)),
        ("ItemAdded", iid(3), "user", "audio", None, "completed", iid(2), True),
        ("ResponseStarted", "resp_2", iid(4)),
    ]
    assert s.items.get(iid(2)) == Item(iid(2), "assistant", text="hello", audio_ms=200.0, kind="audio")


def test_create_response_false_makes_the_speech_an_item_without_a_response() -> None:
    s, c = make(create_response=False)
    out = c.feed(TURN)
    assert keys(out) == [
        ("SpeechStarted", iid(1)),
        ("SpeechStopped", iid(1), True, None),
        ("InputCommitted", iid(1), None),
        ("EditHistory", "add", (iid(1), "user", None, 11200, False), None, "", 0.0, None),
        ("ItemAdded", iid(1), "user", "audio", None, "completed", None, True),
    ]
    assert s.state is TurnState.LISTENING and s.items.ids() == [iid(1)]


def test_interrupt_response_false_speech_during_a_response_becomes_an_item_and_the_response_goes_on() -> None:
    s, c = make(interrupt_response=False)
    rid = vad_turn(s, c).response_id
    audio(s, rid, 5000.0, c.now)
    out = c.feed(np.concatenate([tone(800), silence(400)]))
    assert keys(out) == [
        ("SpeechStarted", iid(3)),
        ("SpeechStopped", iid(3), True, None),
        ("InputCommitted", iid(3), iid(2)),
        ("EditHistory", "add", (iid(3), "user", None, 16000, False), None, "", 0.0, None),
        ("ItemAdded", iid(3), "user", "audio", None, "completed", iid(2), True),
    ]
    assert s.state is TurnState.RESPONDING
    assert keys(s.on_engine_event(rid, TextDelta("more"), c.now)) == [("ResponseText", rid, "more")]


def test_barge_in_cancels_the_response_and_the_new_turn_follows_the_engines_confirmation() -> None:
    s, c = make()
    rid = vad_turn(s, c).response_id
    audio(s, rid, 5000.0, c.now)
    s.on_playback(rid, 700.0, c.now)
    out = c.feed(tone(600))
    assert keys(out) == [("SpeechStarted", iid(3)), ("CancelTurn", rid, 700.0, True), ("Interrupted", rid, 700.0)]
    assert keys(s.on_engine_event(rid, done("cancelled", "w0"), c.now)) == [
        ("ResponseFinished", rid, "cancelled", iid(2), "turn_detected")]
    assert s.items.get(iid(2)).status == "incomplete"  # type: ignore[union-attr]
    out = c.feed(silence(400))
    assert keys(out) == [
        ("SpeechStopped", iid(3), True, "resp_2"),
        ("InputCommitted", iid(3), iid(2)),
        ("ItemAdded", iid(3), "user", "audio", None, "completed", iid(2), True),
        ("ResponseStarted", "resp_2", iid(4)),
        ("SubmitTurn", "resp_2", iid(3), iid(4), False),
    ]


def test_a_backchannel_speech_stopped_names_the_item_its_speech_started_named() -> None:
    s, c = make()
    rid = vad_turn(s, c).response_id
    audio(s, rid, 5000.0, c.now)
    out = c.feed(np.concatenate([tone(200), silence(400)]))  # a 200 ms "mhm"
    assert keys(out) == [("SpeechStarted", iid(3)), ("SpeechStopped", iid(3), False, None)]


# ---- push-to-talk ------------------------------------------------------------------------------------


def test_turn_detection_off_audio_makes_no_vad_events() -> None:
    s, c = make(turn_detection=False)
    assert c.feed(np.concatenate([tone(1000), silence(1000), tone(1000)])) == []
    assert s.state is TurnState.LISTENING


@pytest.mark.parametrize("ms", [0, 60, 99], ids=["nothing", "60ms", "99ms"])
def test_commit_of_less_than_100_ms_is_an_error(ms: int) -> None:
    s, c = make(turn_detection=False)
    c.feed(tone(ms))
    assert keys(s.on_commit(c.now, "c1")) == [("ErrorEvent", "input_audio_buffer_commit_empty", "c1", None)]
    assert s.items.ids() == []


def test_commit_makes_the_audio_a_user_item_in_the_history() -> None:
    s, c = make(turn_detection=False)
    c.feed(tone(60))
    s.on_commit(c.now, "too-short")  # refused; its audio stays in the buffer
    c.feed(tone(600))
    assert keys(s.on_commit(c.now, "c1")) == [
        ("InputCommitted", iid(1), None),
        ("EditHistory", "add", (iid(1), "user", None, 660 * 16, False), None, "", 0.0, None),
        ("ItemAdded", iid(1), "user", "audio", None, "completed", None, True),
    ]
    assert keys(s.on_commit(c.now, "c2")) == [("ErrorEvent", "input_audio_buffer_commit_empty", "c2", None)]


def test_commit_asks_for_a_transcript_when_transcription_is_on() -> None:
    s, c = make(turn_detection=False, transcribe=True)
    c.feed(tone(200))
    assert keys(s.on_commit(c.now))[1] == ("EditHistory", "add", (iid(1), "user", None, 3200, True), None, "", 0.0,
                                           None)


def test_clear_drops_the_buffer() -> None:
    s, c = make(turn_detection=False)
    c.feed(tone(600))
    assert keys(s.on_clear("cl")) == [("InputCleared",)]
    assert keys(s.on_commit(c.now, "c1")) == [("ErrorEvent", "input_audio_buffer_commit_empty", "c1", None)]


def test_clear_while_the_user_speaks_with_server_vad_forgets_the_speech() -> None:
    s, c = make()
    c.feed(tone(400))
    assert s.state is TurnState.USER_SPEAKING
    assert keys(s.on_clear()) == [("InputCleared",)]
    assert s.state is TurnState.LISTENING
    assert c.feed(silence(400)) == []  # no turn from the cleared speech


def test_commit_while_the_user_speaks_with_server_vad_uses_the_announced_item_id() -> None:
    s, c = make()
    assert keys(c.feed(tone(400))) == [("SpeechStarted", iid(1))]
    assert keys(s.on_commit(c.now)) == [
        ("InputCommitted", iid(1), None),
        ("EditHistory", "add", (iid(1), "user", None, 400 * 16, False), None, "", 0.0, None),
        ("ItemAdded", iid(1), "user", "audio", None, "completed", None, True),
    ]
    assert s.state is TurnState.LISTENING
    assert c.feed(silence(400)) == []


# ---- conversation.item.create / delete / retrieve ----------------------------------------------------


@pytest.mark.parametrize(
    ("item", "previous", "expected_history", "expected_added", "expected_ids"),
    [
        (user_text("new", "hello"), None, ("new", "user", "hello", None, False), None, ["a", "b", "new"]),
        (Item("new", "assistant", text="sure", kind="audio"), None, ("new", "assistant", "sure", None, False), None,
         ["a", "b", "new"]),
        (Item("new", "system", text="be brief"), None, ("new", "system", "be brief", None, False), None,
         ["a", "b", "new"]),
        (user_text("new"), "root", ("new", "user", "hi", None, False), "root", ["new", "a", "b"]),
        (user_text("new"), "a", ("new", "user", "hi", None, False), "a", ["a", "new", "b"]),
        (Item("new", "user", audio=tone(200), kind="audio"), None, ("new", "user", None, 3200, False), None,
         ["a", "b", "new"]),
    ],
    ids=["user-text", "assistant-text", "system", "after-root", "after-id", "user-audio"],
)
def test_create_item_adds_it_to_the_history_and_announces_it(
    item: Item, previous: str | None, expected_history: tuple, expected_added: str | None, expected_ids: list[str]
) -> None:
    s, _ = make()
    s.on_create_item(CreateItem(user_text("a")))
    s.on_create_item(CreateItem(user_text("b")))
    out = s.on_create_item(CreateItem(item, previous, "e1"))
    prev_id = {None: "b", "root": None, "a": "a"}[expected_added]
    assert keys(out) == [
        ("EditHistory", "add", expected_history, previous, "", 0.0, None),
        ("ItemAdded", "new", item.role, item.kind, item.text, "completed", prev_id, True),
    ]
    assert s.items.ids() == expected_ids


def test_create_item_with_an_unknown_previous_id_is_item_not_found() -> None:
    s, _ = make()
    s.on_create_item(CreateItem(user_text("a")))
    out = s.on_create_item(CreateItem(user_text("new"), "nope", "e1"))
    assert keys(out) == [("ErrorEvent", "item_not_found", "e1", "previous_item_id")]
    assert "'nope'" in out[0].message
    assert s.items.ids() == ["a"]


def test_create_item_with_an_existing_id_is_an_error() -> None:
    s, _ = make()
    s.on_create_item(CreateItem(user_text("a")))
    assert keys(s.on_create_item(CreateItem(user_text("a", "again"), None, "e2"))) == [
        ("ErrorEvent", "item_id_exists", "e2", "item.id")]
    assert s.items.get("a") == user_text("a")


def test_server_item_ids_never_collide_with_client_item_ids() -> None:
    s, c = make()
    s.on_create_item(CreateItem(user_text(iid(1), "mine")))
    vad_turn(s, c)
    assert len(set(s.items.ids())) == len(s.items.ids())


def test_delete_then_retrieve() -> None:
    s, _ = make()
    s.on_create_item(CreateItem(user_text("a", "hello")))
    s.on_create_item(CreateItem(user_text("b")))
    assert keys(s.on_retrieve_item("a", "r1")) == [("ItemRetrieved", "a", "user", "hello", 0.0, "completed")]
    assert keys(s.on_delete_item("a", "d1")) == [("EditHistory", "delete", None, None, "a", 0.0, None),
                                                 ("ItemDeleted", "a")]
    assert s.items.ids() == ["b"]
    assert keys(s.on_retrieve_item("a", "r2")) == [("ErrorEvent", "item_not_found", "r2", "item_id")]
    assert keys(s.on_delete_item("a", "d2")) == [("ErrorEvent", "item_not_found", "d2", "item_id")]


def test_an_unknown_id_in_an_error_is_cut_short() -> None:
    s, _ = make()
    out = s.on_retrieve_item("x" * 10_000, "r1")
    assert keys(out) == [("ErrorEvent", "item_not_found", "r1", "item_id")]
    assert len(out[0].message) < 200


# ---- conversation.item.truncate ----------------------------------------------------------------------


def played_out_reply(s: Session, c: Clock, ms: float = 500.0) -> str:
    """A VAD turn whose reply of `ms` audio was generated and fully played; returns the reply's item id."""
    rid = vad_turn(s, c).response_id
    audio(s, rid, ms, c.now)
    s.on_engine_event(rid, done(text="hello there", audio_ms=ms), c.now)
    s.on_playback(rid, ms, c.now)
    assert s.state is TurnState.LISTENING
    return iid(2)


@pytest.mark.parametrize(("end_ms", "expected_ms", "status"), [(200.0, 200.0, "incomplete"),
                                                               (5000.0, 500.0, "completed")],
                         ids=["inside", "past-the-end-clamped"])
def test_truncate_a_past_assistant_item(end_ms: float, expected_ms: float, status: str) -> None:
    s, c = make()
    item = played_out_reply(s, c)
    out = s.on_truncate_item(TruncateItem(item, end_ms, 0, "t1"), c.now)
    assert keys(out) == [("EditHistory", "truncate", None, None, item, expected_ms, None),
                         ("ItemTruncated", item, 0, expected_ms)]
    assert keys(s.on_retrieve_item(item)) == [("ItemRetrieved", item, "assistant", "hello there", expected_ms, status)]


def test_truncate_the_generating_responses_item_cancels_it() -> None:
    s, c = make()
    rid = vad_turn(s, c).response_id
    audio(s, rid, 1000.0, c.now)
    out = s.on_truncate_item(TruncateItem(iid(2), 300.0, 0, "t1"), c.now)
    assert keys(out) == [("CancelTurn", rid, 300.0, True), ("Interrupted", rid, 300.0),
                         ("ItemTruncated", iid(2), 0, 300.0)]
    assert keys(s.on_engine_event(rid, done("cancelled"), c.now)) == [
        ("ResponseFinished", rid, "cancelled", iid(2), "client_cancelled")]


def test_truncate_past_what_was_sent_of_a_generating_response_clamps_to_it() -> None:
    s, c = make()
    rid = vad_turn(s, c).response_id
    audio(s, rid, 400.0, c.now)
    out = s.on_truncate_item(TruncateItem(iid(2), 9000.0), c.now)
    assert keys(out) == [("CancelTurn", rid, 400.0, True), ("Interrupted", rid, 400.0),
                         ("ItemTruncated", iid(2), 0, 400.0)]


def test_truncate_right_after_cancel_keeps_what_was_heard() -> None:
    s, c = make()
    s.on_create_item(CreateItem(user_text("u1")))
    s.on_create_response(CreateResponse(), c.now)
    audio(s, "resp_1", 1000.0, c.now)
    s.on_cancel_response(None, c.now + 0.5)
    out = s.on_truncate_item(TruncateItem(iid(1), 300.0), c.now + 0.5)
    assert keys(out)[-1] == ("ItemTruncated", iid(1), 0, 300.0)


@pytest.mark.parametrize("item_id", ["u1", "sys"], ids=["user", "system"])
def test_truncate_a_non_assistant_item_is_an_error(item_id: str) -> None:
    s, c = make()
    s.on_create_item(CreateItem(user_text("u1")))
    s.on_create_item(CreateItem(Item("sys", "system", text="be brief")))
    assert keys(s.on_truncate_item(TruncateItem(item_id, 100.0, 0, "t1"), c.now)) == [
        ("ErrorEvent", "bad_field", "t1", "item_id")]


def test_truncate_an_unknown_item_is_item_not_found() -> None:
    s, c = make()
    assert keys(s.on_truncate_item(TruncateItem("nope", 100.0, 0, "t1"), c.now)) == [
        ("ErrorEvent", "item_not_found", "t1", "item_id")]


# ---- response.create / response.cancel ---------------------------------------------------------------


def test_create_response_in_band_adds_an_in_progress_assistant_item() -> None:
    s, c = make(turn_detection=False)
    s.on_create_item(CreateItem(user_text("u1")))
    turn = TurnSettings(voice="alt", max_new_tokens=50)
    out = s.on_create_response(CreateResponse(ResponseOptions(instructions="Be brief.", turn=turn), "e1"), c.now)
    assert keys(out) == [("ResponseStarted", "resp_1", iid(1)),
                         ("StartResponse", "resp_1", iid(1), "Be brief.", True, turn)]
    assert s.items.ids() == ["u1", iid(1)]
    assert s.items.get(iid(1)) == Item(iid(1), "assistant", text="", status="in_progress", kind="audio")
    assert s.state is TurnState.RESPONDING
    s.on_engine_event("resp_1", TextDelta("ok"), c.now)
    assert keys(s.on_engine_event("resp_1", done(text="ok"), c.now)) == [
        ("ResponseFinished", "resp_1", "eos", iid(1), "")]
    assert keys(s.on_retrieve_item(iid(1))) == [("ItemRetrieved", iid(1), "assistant", "ok", 0.0, "completed")]
    assert s.state is TurnState.LISTENING


def test_create_response_uses_the_session_turn_settings_by_default() -> None:
    turn = TurnSettings(voice="en")
    s, c = make(turn=turn)
    assert keys(s.on_create_response(CreateResponse(), c.now))[1] == (
        "StartResponse", "resp_1", iid(1), None, True, turn)


def test_create_response_out_of_band_leaves_the_items_alone() -> None:
    s, c = make()
    s.on_create_item(CreateItem(user_text("u1")))
    out = s.on_create_response(CreateResponse(ResponseOptions(keep=False, metadata={"k": "v"})), c.now)
    assert keys(out) == [("ResponseStarted", "resp_1", iid(1)),
                         ("StartResponse", "resp_1", iid(1), None, False, TurnSettings())]
    assert out[0].options.metadata == {"k": "v"}
    assert s.items.ids() == ["u1"]
    assert keys(s.on_engine_event("resp_1", done(), c.now)) == [("ResponseFinished", "resp_1", "eos", iid(1), "")]
    assert s.items.ids() == ["u1"]


def test_text_modality_response_item_is_text() -> None:
    s, c = make(modality="text")
    s.on_create_response(CreateResponse(), c.now)
    assert s.items.get(iid(1)) == Item(iid(1), "assistant", text="", status="in_progress", kind="text")
    assert s.on_engine_event("resp_1", AudioChunk(np.zeros(2400, np.float32), 0.0), c.now) == []  # no audio


def test_a_second_create_while_generating_is_refused() -> None:
    s, c = make()
    s.on_create_response(CreateResponse(), c.now)
    assert keys(s.on_create_response(CreateResponse(event_id="e2"), c.now)) == [
        ("ErrorEvent", "conversation_already_has_active_response", "e2", None)]
    assert s.items.ids() == [iid(1)]


def test_create_while_a_vad_turn_is_answered_is_refused() -> None:
    s, c = make()
    vad_turn(s, c)
    assert keys(s.on_create_response(CreateResponse(event_id="e2"), c.now)) == [
        ("ErrorEvent", "conversation_already_has_active_response", "e2", None)]


def test_create_while_the_previous_reply_still_plays_starts_the_next() -> None:
    s, c = make()
    rid = vad_turn(s, c).response_id
    audio(s, rid, 5000.0, c.now)
    s.on_engine_event(rid, done(audio_ms=5000.0), c.now)
    assert s.state is TurnState.RESPONDING  # generated, still playing
    assert keys(s.on_create_response(CreateResponse(), c.now)) == [
        ("ResponseStarted", "resp_2", iid(3)), ("StartResponse", "resp_2", iid(3), None, True, TurnSettings())]
    assert s.state is TurnState.RESPONDING


def test_cancel_stops_the_generating_response() -> None:
    s, c = make()
    s.on_create_response(CreateResponse(), c.now)
    audio(s, "resp_1", 1000.0, c.now)
    out = s.on_cancel_response(None, c.now + 0.25, "x1")
    assert keys(out) == [("CancelTurn", "resp_1", 250.0, True), ("Interrupted", "resp_1", 250.0)]
    assert keys(s.on_engine_event("resp_1", done("cancelled"), c.now + 0.3)) == [
        ("ResponseFinished", "resp_1", "cancelled", iid(1), "client_cancelled")]
    assert s.items.get(iid(1)).status == "incomplete"  # type: ignore[union-attr]
    assert s.state is TurnState.LISTENING


def test_cancel_names_the_response() -> None:
    s, c = make()
    s.on_create_response(CreateResponse(), c.now)
    assert s.on_cancel_response("resp_99", c.now) == []  # another response: nothing
    assert keys(s.on_cancel_response("resp_1", c.now))[0] == ("CancelTurn", "resp_1", 0.0, True)


@pytest.mark.parametrize("when", ["nothing-yet", "after-cancel", "after-done"])
def test_cancel_with_nothing_to_cancel_is_silent(when: str) -> None:
    s, c = make()
    if when != "nothing-yet":
        s.on_create_response(CreateResponse(), c.now)
        if when == "after-cancel":
            s.on_cancel_response(None, c.now)
        else:
            s.on_engine_event("resp_1", done(), c.now)
    assert s.on_cancel_response(None, c.now, "x2") == []


# ---- transcripts, idle timeout, instructions ----------------------------------------------------------


def test_transcripts_reach_the_client_and_the_item() -> None:
    s, c = make(transcribe=True)
    assert vad_turn(s, c).transcribe
    assert keys(s.on_transcript(TranscriptDelta(iid(1), "hel"))) == [
        ("UserTranscript", iid(1), "hel", "", False, 0.0, None)]
    assert keys(s.on_transcript(TranscriptDone(iid(1), "hello", 0.7))) == [
        ("UserTranscript", iid(1), "", "hello", True, 0.7, None)]
    assert keys(s.on_retrieve_item(iid(1))) == [("ItemRetrieved", iid(1), "user", "hello", 0.0, "completed")]


def test_a_failed_transcript_is_reported() -> None:
    s, c = make(transcribe=True)
    vad_turn(s, c)
    assert keys(s.on_transcript(TranscriptFailed(iid(1), "no_whisper", "no Whisper here"))) == [
        ("UserTranscript", iid(1), "", "", True, 0.0, "no Whisper here")]
    assert s.items.get(iid(1)).text is None  # type: ignore[union-attr]


def test_a_transcript_of_a_deleted_item_is_still_reported() -> None:
    s, c = make(transcribe=True)
    vad_turn(s, c)
    s.on_delete_item(iid(1))
    assert keys(s.on_transcript(TranscriptDone(iid(1), "hello", 0.7)))[0][0] == "UserTranscript"
    assert iid(1) not in s.items


def test_idle_timeout_commits_the_silence_and_responds() -> None:
    s, c = make(idle_timeout_ms=1000)
    played_out_reply(s, c, 200.0)
    quiet_at = c.now
    out = c.feed(silence(980))
    assert out == []
    out = c.feed(silence(40))
    assert c.now - quiet_at == pytest.approx(1.02)
    assert keys(out) == [
        ("InputTimeout", iid(3), 1020.0, 2020.0),
        ("InputCommitted", iid(3), iid(2)),
        ("ItemAdded", iid(3), "user", "audio", None, "completed", iid(2), True),
        ("ResponseStarted", "resp_2", iid(4)),
        ("SubmitTurn", "resp_2", iid(3), iid(4), False),
    ]
    assert s.state is TurnState.RESPONDING


def test_idle_timeout_without_create_response_only_commits() -> None:
    s, c = make(idle_timeout_ms=1000, create_response=False)
    c.feed(TURN)  # an item, no response: the quiet starts at the end of speech
    out = c.feed(silence(1100))
    assert [k[0] for k in keys(out)] == ["InputTimeout", "InputCommitted", "EditHistory", "ItemAdded"]
    assert s.state is TurnState.LISTENING


def test_no_idle_timeout_while_the_reply_plays_or_when_unset() -> None:
    s, c = make(idle_timeout_ms=1000)
    rid = vad_turn(s, c).response_id
    audio(s, rid, 5000.0, c.now)
    s.on_engine_event(rid, done(audio_ms=5000.0), c.now)
    assert c.feed(silence(2000)) == []  # still playing (by real time)
    s2, c2 = make()
    played_out_reply(s2, c2)
    assert c2.feed(silence(3000)) == []


def test_new_instructions_edit_the_history() -> None:
    s, _ = make()
    out = s.update_settings(dataclasses.replace(s.settings, instructions="Be brief."))
    assert keys(out) == [("EditHistory", "instructions", None, None, "", 0.0, "Be brief."),
                         ("SettingsUpdated", "Be brief.")]
    assert keys(s.update_settings(dataclasses.replace(s.settings, create_response=False))) == [
        ("SettingsUpdated", "Be brief.")]  # same instructions: no edit


def test_turning_detection_off_mid_utterance_drops_it() -> None:
    s, c = make()
    c.feed(tone(400))
    assert s.state is TurnState.USER_SPEAKING
    s.update_settings(dataclasses.replace(s.settings, turn_detection=False))
    assert s.state is TurnState.LISTENING
    assert c.feed(silence(600)) == []
    # the speech stays in the buffer for a client commit
    assert [k[0] for k in keys(s.on_commit(c.now))] == ["InputCommitted", "EditHistory", "ItemAdded"]


def test_history_item_for_a_user_audio_item_has_no_text() -> None:
    s, _ = make(transcribe=True)
    item = Item("a", "user", text="given transcript", audio=tone(200), kind="audio")
    edit = s.on_create_item(CreateItem(item))[0]
    assert isinstance(edit, EditHistory) and edit.item is not None
    h = edit.item
    assert (h.id, h.role, h.text, h.transcribe) == ("a", "user", None, True)  # the engine transcribes it itself
    assert h.audio is not None and np.array_equal(h.audio, item.audio)  # type: ignore[arg-type]
