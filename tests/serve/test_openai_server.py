"""/v1/realtime for real: uvicorn on a free port, a plain `websockets` client speaking GA events, FakeEngine
behind it (named a fake: nothing here is about model output). Handshake (model echo, Bearer and browser
subprotocol auth, the retired beta interface, a full server), the canonical event order of a response
(protocols.md 5.3), transcripts, item errors, and giving the engine session back on close."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import websockets
from fakes import FakeEngine, silence, tone
from serving import free_socket, running
from websockets.asyncio.client import ClientConnection, connect
from websockets.client import ClientProtocol
from websockets.protocol import State
from websockets.uri import parse_uri

from voice_agent.audio import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, float_to_pcm16, resample
from voice_agent.serve.app import build_app, uvicorn_options
from voice_agent.serve.config import ServerConfig

KEY = "s3cret-key"
QUIET_S = 0.3  # the server has said all it will when it is quiet this long

# protocols.md 5.3, from response.created on (the deltas collapsed to one entry)
RESPONSE_ORDER = [
    "response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added",
    "deltas", "response.output_audio.done", "response.output_audio_transcript.done", "response.content_part.done",
    "response.output_item.done", "conversation.item.done", "response.done",
]
DELTAS = ("response.output_audio.delta", "response.output_audio_transcript.delta")


@asynccontextmanager
async def serve(engine: FakeEngine, send_buffer: int | None = None, **config: Any) -> AsyncIterator[str]:
    sock = free_socket(send_buffer)
    cfg = ServerConfig(port=sock.getsockname()[1], log_level="warning", **config)
    async with running(build_app(cfg, engine), uvicorn_options(cfg), sock) as addr:
        yield addr


@dataclass
class Realtime:
    """A GA client: sends events, records every server event it reads."""

    ws: ClientConnection
    events: list[dict] = field(default_factory=list)

    async def send(self, kind: str, **fields: Any) -> None:
        await self.ws.send(json.dumps({"type": kind, **fields}))

    async def recv(self, timeout: float = 10.0) -> dict:
        msg = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(msg, str), f"expected JSON text events only, got {len(msg)} binary bytes"
        event = json.loads(msg)
        assert isinstance(event.get("event_id"), str) and event["event_id"], event
        self.events.append(event)
        return event

    async def until(self, kind: str, timeout: float = 10.0, **match: Any) -> dict:
        async with asyncio.timeout(timeout):
            while True:
                event = await self.recv()
                if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                    return event

    async def quiet(self, quiet_s: float = QUIET_S) -> list[dict]:
        """Everything until the server is quiet."""
        got = []
        try:
            while True:
                got.append(await self.recv(quiet_s))
        except TimeoutError:
            return got

    def types(self, since: int = 0) -> list[str]:
        return [e["type"] for e in self.events[since:]]

    async def speak(self, audio: np.ndarray, chunk_ms: int = 100) -> None:
        """16 kHz audio as 24 kHz PCM16 appends."""
        pcm = float_to_pcm16(resample(audio, INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE))
        step = OUTPUT_SAMPLE_RATE * chunk_ms // 1000 * 2
        for i in range(0, len(pcm), step):
            await self.send("input_audio_buffer.append", audio=base64.b64encode(pcm[i : i + step]).decode())


@asynccontextmanager
async def realtime(addr: str, query: str = "?model=gpt-realtime", **kw: Any) -> AsyncIterator[Realtime]:
    async with connect(f"ws://{addr}/v1/realtime{query}", **kw) as ws:
        rt = Realtime(ws)
        first = await rt.recv()
        assert first["type"] == "session.created", first
        yield rt


def collapse(types: list[str]) -> list[str]:
    out: list[str] = []
    for t in types:
        t = "deltas" if t in DELTAS else t
        if not (out and out[-1] == t == "deltas"):
            out.append(t)
    return out


def audio_item(ms: float, item_id: str) -> dict:
    pcm = float_to_pcm16(resample(tone(ms), INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE))
    return {"id": item_id, "type": "message", "role": "user",
            "content": [{"type": "input_audio", "audio": base64.b64encode(pcm).decode()}]}


def text_item(text: str, item_id: str, role: str = "user") -> dict:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"id": item_id, "type": "message", "role": role, "content": [{"type": kind, "text": text}]}


def close_code(closed: websockets.ConnectionClosed) -> int:
    assert closed.rcvd is not None, f"expected a close frame from the server, got none ({closed})"
    return closed.rcvd.code


async def closed_with(rt: Realtime) -> websockets.ConnectionClosed:
    with pytest.raises(websockets.ConnectionClosed) as info:
        while True:
            await rt.recv()
    return info.value


async def eventually_released(engine: FakeEngine, timeout: float = 5.0) -> None:
    async with asyncio.timeout(timeout):
        while engine.open_count:
            await asyncio.sleep(0.01)


# ---- the handshake -------------------------------------------------------------------------------------


async def test_session_created_comes_first_and_echoes_the_model() -> None:
    engine = FakeEngine()
    async with serve(engine) as addr:
        async with realtime(addr, "?model=gpt-realtime-2025-08-28") as rt:
            session = rt.events[0]["session"]
            assert session["type"] == "realtime" and session["object"] == "realtime.session"
            assert session["model"] == "gpt-realtime-2025-08-28"
            assert session["id"] == engine.sessions[0].id
            td = session["audio"]["input"]["turn_detection"]
            assert td["type"] == "server_vad" and td["create_response"] is True and td["interrupt_response"] is True
            assert session["audio"]["input"]["transcription"] is None  # none until asked for
            assert await rt.quiet() == []  # nothing else unasked
        async with realtime(addr, "") as rt:
            assert rt.events[0]["session"]["model"] == "FakeEngine"  # no model=: the engine's name
        await eventually_released(engine)


async def test_auth_wrong_bearer_key_is_refused_before_accept() -> None:
    engine = FakeEngine()
    async with serve(engine, api_key=KEY) as addr:
        with pytest.raises(websockets.InvalidStatus) as info:
            async with connect(f"ws://{addr}/v1/realtime", additional_headers={"Authorization": "Bearer nope"}):
                pass
        assert info.value.response.status_code == 403
        assert engine.open_count == 0 and engine.sessions == []


async def test_auth_right_bearer_key_is_accepted() -> None:
    engine = FakeEngine()
    async with serve(engine, api_key=KEY) as addr:
        async with realtime(addr, additional_headers={"Authorization": f"Bearer {KEY}"}) as rt:
            await rt.send("session.update", session={"type": "realtime", "instructions": "Be brief."})
            assert (await rt.until("session.updated"))["session"]["instructions"] == "Be brief."
        await eventually_released(engine)


async def test_auth_no_key_gets_an_error_and_close_1008() -> None:
    engine = FakeEngine()
    async with serve(engine, api_key=KEY) as addr, connect(f"ws://{addr}/v1/realtime") as ws:
        rt = Realtime(ws)
        error = await rt.recv()
        assert error["type"] == "error" and error["error"]["code"] == "unauthorized"
        assert close_code(await closed_with(rt)) == 1008
        assert engine.sessions == []


async def test_browser_subprotocols_key_and_realtime_are_accepted_and_answered() -> None:
    engine = FakeEngine()
    async with serve(engine, api_key=KEY) as addr:
        offered = ["realtime", f"openai-insecure-api-key.{KEY}"]
        async with realtime(addr, subprotocols=offered) as rt:  # type: ignore[arg-type]
            assert rt.ws.subprotocol == "realtime"
        with pytest.raises(websockets.InvalidStatus) as info:
            async with connect(f"ws://{addr}/v1/realtime",
                               subprotocols=["realtime", "openai-insecure-api-key.nope"]):  # type: ignore[list-item]
                pass
        assert info.value.response.status_code == 403
        await eventually_released(engine)


async def test_beta_header_gets_beta_api_shape_disabled_then_close_1008() -> None:
    engine = FakeEngine()
    async with serve(engine) as addr:
        async with connect(f"ws://{addr}/v1/realtime?model=m", additional_headers={"OpenAI-Beta": "realtime=v1"}) as ws:
            rt = Realtime(ws)
            error = await rt.recv()
            assert error["type"] == "error" and error["error"]["code"] == "beta_api_shape_disabled"
            assert "beta" in error["error"]["message"]
            closed = await closed_with(rt)
            assert close_code(closed) == 1008
            assert rt.types() == ["error"]  # no session.created
        assert engine.sessions == []


async def test_beta_subprotocol_is_refused_too() -> None:
    engine = FakeEngine()
    async with serve(engine) as addr:
        offered = ["realtime", "openai-beta.realtime-v1"]
        async with connect(f"ws://{addr}/v1/realtime", subprotocols=offered) as ws:  # type: ignore[arg-type]
            rt = Realtime(ws)
            assert (await rt.recv())["error"]["code"] == "beta_api_shape_disabled"
            assert close_code(await closed_with(rt)) == 1008


async def test_server_full_closes_1013_with_a_clear_reason() -> None:
    engine = FakeEngine(max_sessions=1)
    async with serve(engine) as addr, realtime(addr):
        async with connect(f"ws://{addr}/v1/realtime") as ws:
            rt = Realtime(ws)
            error = await rt.recv()
            assert error["type"] == "error" and error["error"]["code"] == "server_full"
            assert error["error"]["type"] == "server_error"
            closed = await closed_with(rt)
            assert close_code(closed) == 1013
            assert closed.rcvd is not None and closed.rcvd.reason.startswith("server_full: expected at most 1")
        assert engine.open_count == 1


# ---- conversations ------------------------------------------------------------------------------------


async def test_text_item_and_response_create_in_canonical_order_with_a_transcribed_audio_item() -> None:
    engine = FakeEngine(blocks=3, block_ms=100.0)
    async with serve(engine) as addr, realtime(addr) as rt:
        await rt.send("session.update", session={"type": "realtime", "audio": {"input": {
            "transcription": {"model": "whisper-1"}, "turn_detection": None}}})
        updated = await rt.until("session.updated")
        assert updated["session"]["audio"]["input"]["transcription"] == {"model": "whisper-1"}
        assert updated["session"]["audio"]["input"]["turn_detection"] is None

        await rt.send("conversation.item.create", previous_item_id="root", item=audio_item(500, "ua"))
        start = len(rt.events)
        done = await rt.until("conversation.item.input_audio_transcription.completed")
        assert rt.types(start) == ["conversation.item.added", "conversation.item.done",
                                   "conversation.item.input_audio_transcription.delta",
                                   "conversation.item.input_audio_transcription.completed"]
        assert rt.events[start]["previous_item_id"] is None and rt.events[start]["item"]["id"] == "ua"
        assert done["item_id"] == "ua" and done["content_index"] == 0
        assert done["transcript"] == "fake transcript of 0.50 s"
        assert done["usage"] == {"type": "duration", "seconds": 0.5}
        await rt.send("conversation.item.retrieve", item_id="ua")
        retrieved = await rt.until("conversation.item.retrieved")
        assert retrieved["item"]["content"] == [{"type": "input_audio", "transcript": "fake transcript of 0.50 s"}]

        await rt.send("conversation.item.create", event_id="c1", item=text_item("hello", "ut"))
        added = await rt.until("conversation.item.added")
        assert added["previous_item_id"] == "ua"
        assert added["item"]["content"] == [{"type": "input_text", "text": "hello"}]
        await rt.until("conversation.item.done")

        start = len(rt.events)
        await rt.send("response.create", response={"metadata": {"turn": "1"}})
        response = (await rt.until("response.done"))["response"]
        assert collapse(rt.types(start)) == RESPONSE_ORDER
        got = rt.events[start:]
        created = got[0]["response"]
        assert created["status"] == "in_progress" and created["metadata"] == {"turn": "1"}
        rid, item_id = created["id"], got[1]["item"]["id"]
        assert got[2]["previous_item_id"] == "ut" and got[2]["item"]["id"] == item_id
        for e in got[3:-1]:
            if "response_id" in e:
                assert (e["response_id"], e.get("output_index")) == (rid, 0)
            if e["type"] in DELTAS or e["type"].startswith("response.content_part"):
                assert (e["item_id"], e["content_index"]) == (item_id, 0)
        transcript = "".join(e["delta"] for e in got if e["type"] == "response.output_audio_transcript.delta")
        assert transcript.strip() == f"[{engine.sessions[0].id} turn 1] w0 w1"
        assert [e for e in got if e["type"] == "response.output_audio_transcript.done"][0]["transcript"] == transcript
        assert response["status"] == "completed" and response["output"][0]["id"] == item_id
        assert response["usage"]["output_token_details"]["audio_tokens"] > 0
        assert engine.sessions[0].turns[0].keep is True
        assert [it.id for it in engine.sessions[0].items] == ["ua", "ut", item_id]
    await eventually_released(engine)


async def test_server_vad_turn_in_ga_order() -> None:
    engine = FakeEngine(blocks=2, block_ms=100.0)
    async with serve(engine) as addr, realtime(addr) as rt:
        await rt.speak(np.concatenate([tone(600), silence(900)]))
        await rt.until("response.done")
        types = rt.types(1)
        assert types[:5] == ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                             "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
        assert collapse(types[5:]) == RESPONSE_ORDER
        started, stopped, committed = rt.events[1:4]
        user_item = started["item_id"]
        assert user_item and stopped["item_id"] == committed["item_id"] == user_item
        assert rt.events[4]["item"]["id"] == user_item and rt.events[4]["item"]["role"] == "user"
        assert engine.sessions[0].items[0].id == user_item
    await eventually_released(engine)


async def test_push_to_talk_commit_clear_and_an_empty_commit() -> None:
    engine = FakeEngine(blocks=2, block_ms=100.0)
    async with serve(engine) as addr, realtime(addr) as rt:
        await rt.send("session.update", session={"type": "realtime", "audio": {"input": {"turn_detection": None}}})
        await rt.until("session.updated")
        await rt.send("input_audio_buffer.commit", event_id="c0")
        error = (await rt.until("error"))["error"]
        assert (error["code"], error["event_id"]) == ("input_audio_buffer_commit_empty", "c0")
        await rt.speak(tone(500))
        await rt.send("input_audio_buffer.clear")
        await rt.until("input_audio_buffer.cleared")
        await rt.speak(tone(500))
        start = len(rt.events)
        await rt.send("input_audio_buffer.commit")
        await rt.until("conversation.item.done")
        assert rt.types(start) == ["input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
        assert not any(t.startswith("input_audio_buffer.speech") for t in rt.types())
        assert engine.sessions[0].turns == []  # committed, not answered
        await rt.send("response.create")
        assert (await rt.until("response.done"))["response"]["status"] == "completed"
    await eventually_released(engine)


async def test_item_errors_carry_the_event_id_and_param_and_the_session_goes_on() -> None:
    engine = FakeEngine()
    async with serve(engine) as addr, realtime(addr) as rt:
        cases = [
            ({"type": "conversation.item.retrieve", "item_id": "nope", "event_id": "e1"}, "item_not_found", "item_id"),
            ({"type": "conversation.item.delete", "item_id": "nope", "event_id": "e2"}, "item_not_found", "item_id"),
            ({"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 10, "event_id": "e3"},
             "item_not_found", "item_id"),
            ({"type": "conversation.item.create", "previous_item_id": "nope", "item": text_item("x", "a"),
              "event_id": "e4"}, "item_not_found", "previous_item_id"),
        ]
        for message, code, param in cases:
            await rt.ws.send(json.dumps(message))
            error = (await rt.until("error"))["error"]
            assert (error["code"], error["param"], error["event_id"]) == (code, param, message["event_id"])
            assert error["type"] == "invalid_request_error"
        await rt.send("response.cancel", event_id="e5")  # nothing to cancel: no error
        assert await rt.quiet() == []
        await rt.send("session.update", session={"type": "realtime"})
        await rt.until("session.updated")


async def test_an_audio_item_the_engine_refuses_is_an_error_and_not_added() -> None:
    engine = FakeEngine()
    async with serve(engine) as addr, realtime(addr) as rt:
        empty = {"id": "ue", "type": "message", "role": "user", "content": [{"type": "input_audio", "audio": ""}]}
        await rt.send("conversation.item.create", event_id="c1", item=empty)
        got = await rt.quiet()
        assert [e["type"] for e in got] == ["error"]
        assert got[0]["error"]["event_id"] == "c1"
        await rt.send("conversation.item.retrieve", item_id="ue")
        assert (await rt.until("error"))["error"]["code"] == "item_not_found"


async def test_truncate_after_the_reply_played_is_clamped_not_refused() -> None:
    engine = FakeEngine(blocks=2, block_ms=100.0)
    async with serve(engine) as addr, realtime(addr) as rt:
        await rt.send("conversation.item.create", item=text_item("hello", "ut"))
        await rt.send("response.create")
        item_id = (await rt.until("response.done"))["response"]["output"][0]["id"]
        await rt.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=60_000)
        truncated = await rt.until("conversation.item.truncated")
        assert (truncated["item_id"], truncated["content_index"], truncated["audio_end_ms"]) == (item_id, 0, 200)
        assert "error" not in rt.types()
        await rt.send("conversation.item.truncate", item_id=item_id, content_index=0, audio_end_ms=50)
        assert (await rt.until("conversation.item.truncated"))["audio_end_ms"] == 50
        assert engine.sessions[0].edits[-1] == ("truncate", item_id, 50.0)


async def test_binary_frames_and_bad_json_are_errors_not_closes() -> None:
    engine = FakeEngine()
    async with serve(engine) as addr, realtime(addr) as rt:
        await rt.ws.send(b"\x00\x01")
        assert (await rt.until("error"))["error"]["code"] == "bad_message"
        await rt.ws.send("{not json")
        assert (await rt.until("error"))["error"]["code"] == "bad_json"
        await rt.send("input_audio_buffer.append", audio="!!!not base64", event_id="a1")
        error = (await rt.until("error"))["error"]
        assert (error["code"], error["param"], error["event_id"]) == ("bad_audio", "audio", "a1")
        await rt.send("session.update", session={"type": "realtime"})
        await rt.until("session.updated")


@pytest.mark.parametrize("how", ["close", "abrupt", "mid-reply"])
async def test_closing_gives_the_engine_session_back(how: str) -> None:
    engine = FakeEngine(blocks=50, block_ms=200.0, step_s=0.02)
    async with serve(engine) as addr:
        async with realtime(addr) as rt:
            assert engine.open_count == 1
            if how == "mid-reply":
                await rt.send("conversation.item.create", item=text_item("hello", "ut"))
                await rt.send("response.create")
                await rt.until("response.output_audio.delta")
            if how == "abrupt":
                rt.ws.transport.abort()
        await eventually_released(engine)
        assert all(s.closed for s in engine.sessions)
        if how == "mid-reply":
            assert engine.sessions[0].turns[0].blocks_sent < 50  # the reply stopped with the connection



async def test_response_cancel_ends_with_a_cancelled_response_done() -> None:
    engine = FakeEngine(blocks=2, block_ms=100.0, hold=True)  # generates until cancelled
    async with serve(engine) as addr, realtime(addr) as rt:
        await rt.send("conversation.item.create", item=text_item("hello", "ut"))
        await rt.send("response.create")
        rid = (await rt.until("response.created"))["response"]["id"]
        await rt.until("response.output_audio.delta")
        await rt.send("response.create", event_id="again")
        error = (await rt.until("error"))["error"]
        assert (error["code"], error["event_id"]) == ("conversation_already_has_active_response", "again")
        start = len(rt.events)
        await rt.send("response.cancel", response_id=rid)
        response = (await rt.until("response.done"))["response"]
        assert response["status"] == "cancelled"
        assert response["status_details"] == {"type": "cancelled", "reason": "client_cancelled"}
        assert response["output"][0]["status"] == "incomplete"
        item_done = [e for e in rt.events[start:] if e["type"] == "conversation.item.done"]
        assert [e["item"]["status"] for e in item_done] == ["incomplete"]
        await rt.send("response.cancel", event_id="nothing")  # nothing to cancel now: no error
        assert [e for e in await rt.quiet() if e["type"] == "error"] == []
        assert engine.cancels


async def test_out_of_band_response_joins_no_conversation_and_echoes_metadata() -> None:
    engine = FakeEngine(blocks=2, block_ms=100.0)
    async with serve(engine) as addr, realtime(addr) as rt:
        await rt.send("conversation.item.create", item=text_item("hello", "ut"))
        await rt.until("conversation.item.done")
        start = len(rt.events)
        await rt.send("response.create", response={"conversation": "none", "metadata": {"topic": "x"},
                                                   "instructions": "Classify.", "output_modalities": ["text"]})
        response = (await rt.until("response.done"))["response"]
        types = rt.types(start)
        assert "conversation.item.added" not in types and "conversation.item.done" not in types
        assert "response.output_text.delta" in types and "response.output_audio.delta" not in types
        assert response["conversation_id"] is None and response["metadata"] == {"topic": "x"}
        turn = engine.sessions[0].turns[0]
        assert (turn.keep, turn.instructions) == (False, "Classify.")
        assert [it.id for it in engine.sessions[0].items] == ["ut"]




@pytest.mark.parametrize("edit", ["insert-at-root", "delete-last"])
async def test_a_replys_item_added_names_the_item_it_follows(edit: str) -> None:
    engine = FakeEngine(blocks=2, block_ms=100.0)
    async with serve(engine) as addr, realtime(addr) as rt:
        await rt.send("conversation.item.create", item=text_item("a", "a"))
        await rt.send("conversation.item.create", item=text_item("b", "b"))
        if edit == "insert-at-root":
            await rt.send("conversation.item.create", previous_item_id="root", item=text_item("be brief", "s",
                                                                                           role="system"))
            follows = "b"
        else:
            await rt.send("conversation.item.create", item=text_item("c", "c"))
            await rt.send("conversation.item.delete", item_id="c")
            await rt.until("conversation.item.deleted")
            follows = "b"
        start = len(rt.events)
        await rt.send("response.create")
        await rt.until("response.done")
        added = [e for e in rt.events[start:] if e["type"] == "conversation.item.added"
                 and e["item"]["role"] == "assistant"]  # the creates' own events may arrive after `start`
        assert [e["previous_item_id"] for e in added] == [follows]





async def test_truncate_right_after_cancel_keeps_what_the_client_heard() -> None:
    engine = FakeEngine(blocks=20, block_ms=100.0, step_s=0.05)
    async with serve(engine) as addr, realtime(addr) as rt:
        await rt.send("conversation.item.create", item=text_item("hello", "ut"))
        await rt.send("response.create")
        item_id = (await rt.until("response.output_item.added"))["item"]["id"]
        for _ in range(2):  # 200 ms of reply audio sent
            await rt.until("response.output_audio.delta")
        await rt.ws.send(json.dumps({"type": "response.cancel"}))
        await rt.ws.send(json.dumps({"type": "conversation.item.truncate", "item_id": item_id, "content_index": 0,
                                     "audio_end_ms": 150}))
        truncated = await rt.until("conversation.item.truncated")
        assert truncated["audio_end_ms"] == 150


class DeafRealtime:
    """A /v1/realtime client that never reads after the handshake (a raw socket with a small receive buffer
    under the websockets Sans-I/O protocol), so the server's replies back up in its outbox."""

    def __init__(self, addr: str) -> None:
        host, port = addr.split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setblocking(False)
        self.addr, self.port = host, int(port)
        self.proto = ClientProtocol(parse_uri(f"ws://{addr}/v1/realtime"))

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.sock_connect(self.sock, (self.addr, self.port))
        self.proto.send_request(self.proto.connect())
        await self._flush()
        while self.proto.state is not State.OPEN:  # the handshake response, and nothing after it
            self.proto.receive_data(await loop.sock_recv(self.sock, 1))
            self.proto.events_received()

    async def send(self, kind: str, **fields: Any) -> None:
        self.proto.send_text(json.dumps({"type": kind, **fields}).encode())
        await self._flush()

    async def _flush(self) -> None:
        for chunk in self.proto.data_to_send():
            await asyncio.get_running_loop().sock_sendall(self.sock, chunk)


async def test_a_transcript_that_overflows_a_slow_clients_outbox_closes_it_cleanly(
    caplog: pytest.LogCaptureFixture,
) -> None:
    engine = FakeEngine()
    caplog.set_level(logging.WARNING)
    async with serve(engine, send_buffer=4096, send_queue_messages=8, slow_client_ms=10_000) as addr:
        deaf = DeafRealtime(addr)
        await deaf.open()
        # session.updated echoes 1 MB of instructions: once it is written the socket is full and the sender
        # blocks on the next message (the first error below, or the second); the rest queues, at most 16
        await deaf.send("session.update", session={"type": "realtime", "instructions": "x" * 1_000_000, "audio": {
            "input": {"transcription": {"model": "whisper-1"}, "turn_detection": None}}})
        await asyncio.sleep(0.3)
        for i in range(14):  # 13 or 14 queued errors
            await deaf.send("bogus", n=i)
        await deaf.send("conversation.item.create", item=audio_item(200, "ua"))  # item.added + .done: 15 or 16
        # ... then FakeEngine's transcript (delta, completed) arrives through on_transcript: one too many
        try:
            await eventually_released(engine, timeout=3.0)  # closed as a slow client
            released = True
        except TimeoutError:
            released = False
        finally:
            deaf.sock.close()
    errors = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.levelno >= logging.ERROR]
    assert (errors, released) == ([], True)
