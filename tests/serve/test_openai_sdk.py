"""The official `openai` client against the real server at /v1/realtime (protocols.md 1 and 5).

The server is the one `voice-agent serve` runs without weights: the embedded tiny demo model (its reply is
one short sentence and 1.6 s of audio; `long_reply_server` has plain random weights, whose replies run for
tens of seconds, for the barge-in). The user speaks with espeak-ng's voice, streamed in real time. Every
server event is read raw and checked against the GA types of the `openai` package; the happy paths must
not see a single `error` event.

Needs: espeak-ng (apt; installed by `scripts/install.sh --test`) and the test extra's openai[realtime].
"""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import pytest
from realtime_client import (
    BYTES_PER_MS,
    RESPONSE_ORDER,
    Recorder,
    assert_spoken_reply,
    audio_ms,
    b64,
    espeak_pcm,
    event_order,
    microphone,
    realtime_server,
    reply_audio,
    silence,
)

openai = pytest.importorskip("openai", reason="needs the test extra's openai[realtime]")
websockets = pytest.importorskip("websockets")

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt)")

KEY = "sk-test-0123456789"
FIRST = "Hello, can you hear me?"
SECOND = "Stop. Tell me a joke instead, please."
LEAD_MS = 300  # silence before the first word
SESSION = {  # protocols.md 5.3's session.update
    "type": "realtime",
    "instructions": "You are a helpful assistant. Answer briefly.",
    "output_modalities": ["audio"],
    "audio": {
        "input": {
            "format": {"type": "audio/pcm", "rate": 24000},
            "transcription": {"model": "gpt-4o-mini-transcribe"},
            "turn_detection": {"type": "server_vad", "create_response": True, "interrupt_response": True,
                               "silence_duration_ms": 500, "prefix_padding_ms": 300},
        },
        "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "marin"},
    },
}
PUSH_TO_TALK = {"type": "realtime", "audio": {"input": {"turn_detection": None}}}


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, bytes]:
    folder = tmp_path_factory.mktemp("speech")
    return {text: espeak_pcm(text, folder / f"{i}.wav") for i, text in enumerate((FIRST, SECOND))}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo model, with an API key."""
    with realtime_server(tmp_path_factory.mktemp("demo"), api_key=KEY) as addr:
        yield addr


@pytest.fixture(scope="module")
def long_reply_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Plain random tiny weights: replies still generating seconds after they start."""
    with realtime_server(tmp_path_factory.mktemp("long"), long_replies=True, api_key=KEY) as addr:
        yield addr


@asynccontextmanager
async def realtime(addr: str, key: str = KEY, **connect: Any) -> AsyncIterator[tuple[Any, Recorder]]:
    """An SDK connection (client.realtime.connect) and the recorder of its events, after session.created."""
    client = openai.AsyncOpenAI(api_key=key, websocket_base_url=f"ws://{addr}/v1")
    async with client.realtime.connect(model="gpt-realtime", **connect) as conn:
        rec = Recorder(conn.recv_bytes)
        created = await rec.next()
        assert created["type"] == "session.created", f"expected session.created first, got\n{rec.dump()}"
        assert created["session"]["type"] == "realtime", rec.dump()
        yield conn, rec


async def update(conn: Any, rec: Recorder, session: dict) -> dict:
    await conn.session.update(session=session)
    return (await rec.until("session.updated"))["session"]


def appender(conn: Any) -> Any:
    async def send(pcm: bytes) -> None:
        await conn.input_audio_buffer.append(audio=b64(pcm))
    return send


async def test_server_vad_turn_in_ga_order(server: str, speech: dict[str, bytes]) -> None:
    async with realtime(server) as (conn, rec):
        session = await update(conn, rec, SESSION)
        turn_detection = session["audio"]["input"]["turn_detection"]
        assert turn_detection["type"] == "server_vad" and turn_detection["silence_duration_ms"] == 500, session
        assert session["audio"]["output"]["voice"] == "marin", session
        assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}, session
        async with microphone(appender(conn)) as mic:
            mic.say(silence(LEAD_MS) + speech[FIRST])
            done = await rec.until("response.done")
        user_transcript = await rec.seen_or_until("conversation.item.input_audio_transcription.completed")
    rec.assert_clean()

    order = event_order(rec.events)
    expected = ["session.created", "session.updated", "input_audio_buffer.speech_started",
                "input_audio_buffer.speech_stopped", "input_audio_buffer.committed", "conversation.item.added",
                "conversation.item.done", *RESPONSE_ORDER]
    assert order == expected, f"expected {expected}\ngot      {order}\n{rec.dump()}"

    started, stopped = rec.of("input_audio_buffer.speech_started")[0], rec.of("input_audio_buffer.speech_stopped")[0]
    committed = rec.of("input_audio_buffer.committed")[0]
    user_added, user_done = rec.of("conversation.item.added")[0], rec.of("conversation.item.done")[0]
    user_id = committed["item_id"]
    assert started["item_id"] == stopped["item_id"] == user_id == user_added["item"]["id"] == user_done["item"]["id"], \
        rec.dump()
    speech_ms = audio_ms(speech[FIRST])
    assert 0 <= started["audio_start_ms"] <= LEAD_MS + 300, rec.dump([started])
    assert speech_ms / 2 <= stopped["audio_end_ms"] - started["audio_start_ms"] <= speech_ms + 1000, \
        rec.dump([started, stopped])
    user_item = user_added["item"]
    assert (user_item["type"], user_item["role"]) == ("message", "user"), rec.dump([user_added])
    assert [c["type"] for c in user_item["content"]] == ["input_audio"], rec.dump([user_added])

    created = rec.of("response.created")[0]
    reply_id = assert_spoken_reply(rec, created, done)
    assistant_added = rec.of("conversation.item.added")[1]
    assert assistant_added["previous_item_id"] == user_id, rec.dump([assistant_added])

    # The user transcript (requested in SESSION) comes once, for the user item, after that item is done.
    transcription = [e for e in rec.events if e["type"].startswith("conversation.item.input_audio_transcription.")]
    assert user_transcript["item_id"] == user_id and user_transcript["content_index"] == 0, rec.dump([user_transcript])
    assert isinstance(user_transcript["transcript"], str) and user_transcript["usage"]["type"] in ("duration", "tokens")
    assert all(e["item_id"] == user_id and rec.index(e) > rec.index(user_done) for e in transcription), \
        rec.dump(transcription)
    assert len(rec.of("conversation.item.input_audio_transcription.completed")) == 1, rec.dump(transcription)
    assert reply_id != user_id


async def test_barge_in_cancels_then_truncate(long_reply_server: str, speech: dict[str, bytes]) -> None:
    async with realtime(long_reply_server) as (conn, rec):
        await update(conn, rec, {"type": "realtime", "audio": {"input": {"turn_detection": {"type": "server_vad"}}}})
        async with microphone(appender(conn)) as mic:
            mic.say(silence(LEAD_MS) + speech[FIRST])
            first_audio = await rec.until("response.output_audio.delta")
            reply_id, item_id = first_audio["response_id"], first_audio["item_id"]
            mic.say(speech[SECOND])  # while the reply is still generating: > 400 ms of speech
            barge_in = await rec.until("input_audio_buffer.speech_started")
            done = await rec.until("response.done", timeout=20)
            await mic.until_quiet()
            heard_ms = audio_ms(reply_audio(rec.events, item_id))

            await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=10 * 60 * 1000)
            clamped = await rec.until("conversation.item.truncated")
            await conn.conversation.item.truncate(item_id=item_id, content_index=0, audio_end_ms=300)
            truncated = await rec.until("conversation.item.truncated")
            await conn.conversation.item.retrieve(item_id=item_id)
            retrieved = await rec.until("conversation.item.retrieved")
    rec.assert_clean()

    assert done["response"]["id"] == reply_id, f"the first response.done is not the interrupted reply's:\n{rec.dump()}"
    assert done["response"]["status"] == "cancelled", rec.dump([done])
    assert done["response"]["status_details"]["reason"] == "turn_detected", rec.dump([done])
    assert rec.index(first_audio) < rec.index(barge_in) < rec.index(done), rec.dump()
    late = [e for e in rec.events[rec.index(done):] if e.get("response_id") == reply_id]
    assert not late, f"events of the cancelled reply after its response.done:\n{rec.dump(late)}"
    for e in rec.of("response.output_item.done") + rec.of("conversation.item.done"):
        if e["item"]["id"] == item_id:
            assert e["item"]["status"] == "incomplete", rec.dump([e])
    assert heard_ms > 0
    assert (clamped["item_id"], clamped["content_index"]) == (item_id, 0), rec.dump([clamped])
    assert 0 < clamped["audio_end_ms"] <= heard_ms + 1, f"heard {heard_ms} ms\n{rec.dump([clamped])}"
    assert (truncated["item_id"], truncated["content_index"], truncated["audio_end_ms"]) == (item_id, 0, 300), \
        rec.dump([truncated])
    assert retrieved["item"]["id"] == item_id and retrieved["item"]["role"] == "assistant", rec.dump([retrieved])


async def test_push_to_talk_commit_and_clear(server: str, speech: dict[str, bytes]) -> None:
    async with realtime(server) as (conn, rec):
        session = await update(conn, rec, PUSH_TO_TALK)
        assert session["audio"]["input"]["turn_detection"] is None, session
        pcm = silence(LEAD_MS) + speech[FIRST] + silence(500)
        for i in range(0, len(pcm), 100 * BYTES_PER_MS):  # no VAD: no need to pace
            await conn.input_audio_buffer.append(audio=b64(pcm[i: i + 100 * BYTES_PER_MS]))
        await conn.input_audio_buffer.commit()
        committed = await rec.until("input_audio_buffer.committed")
        user_done = await rec.until("conversation.item.done")
        await conn.response.create()
        done = await rec.until("response.done")
        await conn.input_audio_buffer.append(audio=b64(speech[SECOND][: 200 * BYTES_PER_MS]))
        await conn.input_audio_buffer.clear()
        await rec.until("input_audio_buffer.cleared")
    rec.assert_clean()

    order = event_order(rec.events)
    expected = ["session.created", "session.updated", "input_audio_buffer.committed", "conversation.item.added",
                "conversation.item.done", *RESPONSE_ORDER, "input_audio_buffer.cleared"]
    assert order == expected, f"expected {expected}\ngot      {order}\n{rec.dump()}"
    user_id = committed["item_id"]
    assert rec.of("conversation.item.added")[0]["item"]["id"] == user_done["item"]["id"] == user_id, rec.dump()
    assert_spoken_reply(rec, rec.of("response.created")[0], done)
    assert rec.of("conversation.item.added")[1]["previous_item_id"] == user_id, rec.dump()


async def test_text_item_answered_with_speech(server: str) -> None:
    async with realtime(server) as (conn, rec):
        item = {"id": "msg_client_0001", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "Hello there, who are you?"}]}
        await conn.conversation.item.create(item=item, previous_item_id="root")
        added = await rec.until("conversation.item.added")
        item_done = await rec.until("conversation.item.done")
        await conn.response.create()
        done = await rec.until("response.done")
    rec.assert_clean()

    assert added["item"]["id"] == item_done["item"]["id"] == "msg_client_0001", rec.dump()
    assert added["item"]["content"][0] == {"type": "input_text", "text": "Hello there, who are you?"}, rec.dump()
    order = event_order(rec.events)
    expected = ["session.created", "conversation.item.added", "conversation.item.done", *RESPONSE_ORDER]
    assert order == expected, f"expected {expected}\ngot      {order}\n{rec.dump()}"
    assert_spoken_reply(rec, rec.of("response.created")[0], done)
    assert rec.of("conversation.item.added")[1]["previous_item_id"] == "msg_client_0001", rec.dump()


async def test_out_of_band_response_echoes_metadata(server: str) -> None:
    async with realtime(server) as (conn, rec):
        item = {"id": "msg_before_oob", "type": "message", "role": "user",
                "content": [{"type": "input_text", "text": "My favourite colour is green."}]}
        await conn.conversation.item.create(item=item, previous_item_id="root")
        await rec.until("conversation.item.done")
        await conn.response.create(response={"conversation": "none", "metadata": {"topic": "x"},
                                             "instructions": "Name the topic.", "output_modalities": ["audio"]})
        created = await rec.until("response.created")
        done = await rec.until("response.done")
        await conn.conversation.item.retrieve(item_id="msg_before_oob")
        retrieved = await rec.until("conversation.item.retrieved")
    rec.assert_clean()

    assert created["response"]["metadata"] == {"topic": "x"}, rec.dump([created])
    assert done["response"]["metadata"] == {"topic": "x"}, rec.dump([done])
    assert created["response"].get("conversation_id") is None, rec.dump([created])
    assert_spoken_reply(rec, created, done, in_conversation=False)
    span = rec.events[rec.index(created): rec.index(done) + 1]
    assert not [e for e in span if e["type"].startswith("conversation.item.")], rec.dump(span)
    assert retrieved["item"]["id"] == "msg_before_oob", rec.dump([retrieved])
    assert retrieved["item"]["content"][0]["text"] == "My favourite colour is green.", rec.dump([retrieved])


async def test_wrong_key_is_refused_before_accept(server: str) -> None:
    client = openai.AsyncOpenAI(api_key="sk-wrong-key-0000", websocket_base_url=f"ws://{server}/v1")
    with pytest.raises(websockets.InvalidStatus) as refused:
        async with client.realtime.connect(model="gpt-realtime"):
            pass
    assert refused.value.response.status_code == 403


async def test_browser_subprotocols_are_answered_with_realtime(server: str) -> None:
    from websockets.asyncio.client import connect

    offered = ["realtime", f"openai-insecure-api-key.{KEY}"]
    async with connect(f"ws://{server}/v1/realtime?model=gpt-realtime", subprotocols=offered) as ws:
        assert ws.subprotocol == "realtime"
        rec = Recorder(ws.recv)
        assert (await rec.next())["type"] == "session.created", rec.dump()
        await ws.send('{"type": "session.update", "session": {"type": "realtime", "instructions": "Hi."}}')
        assert (await rec.until("session.updated"))["session"]["instructions"] == "Hi."
    rec.assert_clean()


async def test_beta_header_gets_an_error_and_a_close(server: str) -> None:
    from websockets.asyncio.client import connect

    headers = {"Authorization": f"Bearer {KEY}", "OpenAI-Beta": "realtime=v1"}
    async with connect(f"ws://{server}/v1/realtime?model=gpt-realtime", additional_headers=headers) as ws:
        rec = Recorder(ws.recv)
        with pytest.raises(websockets.ConnectionClosed) as closed:
            while True:
                await rec.next()
    errors = rec.of("error")
    assert [e["error"]["code"] for e in errors] == ["beta_api_shape_disabled"], rec.dump()
    assert not [e for e in rec.events if e["type"] != "error"], f"only the error is expected:\n{rec.dump()}"
    assert closed.value.rcvd is not None, f"expected a close frame from the server, got {closed.value}"
