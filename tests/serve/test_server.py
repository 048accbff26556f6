"""The server for real: uvicorn on a free port, `websockets` clients, FakeEngine behind it.

Audio is sent faster than real time (the VAD works in stream time); "speech" is a 440 Hz tone.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import websockets
from fakes import FakeEngine, silence, tone
from serving import free_socket, running
from websockets.asyncio.client import ClientConnection, connect

from voice_agent.audio import MAX_INPUT_SECONDS, MAX_TURN_MS
from voice_agent.engine.sessions import check_turn_audio
from voice_agent.errors import ConfigError
from voice_agent.serve.app import DOWNLOAD_COMMAND, build_app, uvicorn_options
from voice_agent.serve.config import ServerConfig

KEY = "s3cret-key"


SMALL_SOCKET_BUFFER = 32 * 1024  # bytes: kernel buffers that a client which stops reading fills quickly


@asynccontextmanager
async def serve(engine: FakeEngine, *, small_buffers: bool = False, **config: object) -> AsyncIterator[str]:
    """Run the app on a free port in this event loop; yields "127.0.0.1:PORT". `small_buffers`: the
    accepted sockets get a small send buffer (Linux copies it from the listening socket)."""
    sock = free_socket(SMALL_SOCKET_BUFFER if small_buffers else None)
    cfg = ServerConfig(port=sock.getsockname()[1], log_level="warning", **config)  # type: ignore[arg-type]
    async with running(build_app(cfg, engine), uvicorn_options(cfg), sock) as addr:
        yield addr


@dataclass
class Client:
    """Records everything the server sends: JSON events, and the order of text deltas and audio."""

    ws: ClientConnection
    events: list[dict] = field(default_factory=list)
    order: list[str] = field(default_factory=list)  # "t" text delta, "a" audio, per arrival
    arrivals: list[str] = field(default_factory=list)  # every message: its event type, or "audio"
    audio_bytes: int = 0

    async def send(self, obj: dict) -> None:
        await self.ws.send(json.dumps(obj))

    async def speak(self, audio: np.ndarray, frame_ms: int = 20) -> None:
        pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
        n = 16 * frame_ms
        for i in range(0, len(pcm), n):
            await self.ws.send(pcm[i : i + n].tobytes())

    async def until(self, kind: str, timeout: float = 10.0, **match: object) -> dict:
        """Read until a JSON event of `kind` (with the given field values) arrives."""
        async with asyncio.timeout(timeout):
            while True:
                msg = await self.ws.recv()
                if isinstance(msg, bytes):
                    self.audio_bytes += len(msg)
                    self.order.append("a")
                    self.arrivals.append("audio")
                    continue
                event = json.loads(msg)
                self.events.append(event)
                self.arrivals.append(event["type"])
                if event["type"] == "text.delta":
                    self.order.append("t")
                if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                    return event

    async def turn(self, speech_ms: float = 600, silence_ms: float = 900) -> dict:
        """Speak, wait for the reply, report it fully played; returns response.done."""
        await self.speak(np.concatenate([tone(speech_ms), silence(silence_ms)]))
        done = await self.until("response.done")
        await self.send({"type": "playback", "response_id": done["response_id"], "played_ms": done["audio_ms"]})
        return done


def close_code(closed: websockets.ConnectionClosed) -> int:
    """The close code the server sent (fails if the connection just dropped)."""
    assert closed.rcvd is not None, f"expected a close frame from the server, got none ({closed})"
    return closed.rcvd.code


def small_buffer_socket(addr: str) -> socket.socket:
    """A client socket with a small receive buffer, connected to `addr`."""
    host, port = addr.split(":")
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, SMALL_SOCKET_BUFFER)
    sock.connect((host, int(port)))
    return sock


async def eventually(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Wait until `condition()` holds."""
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


@asynccontextmanager
async def client(addr: str, start: dict | None = None, **kw: object) -> AsyncIterator[Client]:
    async with connect(f"ws://{addr}/ws", **kw) as ws:  # type: ignore[arg-type]
        c = Client(ws)
        if start is not None:
            await c.send({"type": "start", **start})
            await c.until("session.started")
        yield c


async def test_http_routes() -> None:
    async with serve(FakeEngine()) as addr, httpx.AsyncClient(base_url=f"http://{addr}") as http:
        assert (await http.get("/healthz")).json() == {"status": "ok"}
        assert (await http.get("/readyz")).status_code == 200
        info = (await http.get("/api/info")).json()
        assert info["demo"] is True and info["download_command"] == DOWNLOAD_COMMAND
        assert info["auth_required"] is False and info["settings"]["vad"]["silence_ms"] == 500
        assert info["voices"] == ["en", "alt", "fake-crash", "fake-error"] and info["max_new_tokens"] == 512
        page = await http.get("/")
        assert page.status_code == 200 and 'src="static/app.js"' in page.text
        for name in ("app.js", "capture-worklet.js", "player-worklet.js", "style.css"):
            assert (await http.get(f"/static/{name}")).status_code == 200, name


async def test_not_ready_engine() -> None:
    async with serve(FakeEngine(ready=False)) as addr:
        async with httpx.AsyncClient() as http:
            r = await http.get(f"http://{addr}/readyz")
        assert r.status_code == 503 and r.json() == {"status": "loading"}
        async with client(addr) as c:
            await c.send({"type": "start"})
            assert (await c.until("error"))["code"] == "not_ready"
            with pytest.raises(websockets.ConnectionClosed) as info:
                await c.ws.recv()
            assert close_code(info.value) == 1013


@pytest.mark.parametrize("silence_ms", [300, 800])
async def test_turn_end_timing_and_interleaved_text_and_audio(silence_ms: int) -> None:
    engine = FakeEngine(blocks=5, block_ms=200)
    async with serve(engine) as addr, client(addr, {"vad": {"silence_ms": silence_ms}}) as c:
        await c.speak(np.concatenate([silence(200), tone(600), silence(silence_ms + 400)]))
        stopped = await c.until("speech.stopped")
        assert stopped["turn"] is True and 780 <= stopped["at_ms"] <= 1000
        done = await c.until("response.done")
        assert silence_ms <= done["timings"]["end_of_turn_ms"] < silence_ms + 20  # within one 20 ms frame
        assert done["reason"] == "eos" and done["text"].startswith("[fake1 turn 1]")
        assert c.order == ["t", "a"] * 5  # each block's text, then its audio
        assert c.audio_bytes == 5 * 200 * 24 * 2  # 24 kHz PCM16
        assert engine.sessions[0].turns[0].audio_s == pytest.approx(0.3 + 0.6 + 0.3, abs=0.03)


async def test_short_speech_does_not_interrupt_and_long_speech_does() -> None:
    engine = FakeEngine(blocks=30, block_ms=200, step_s=0.03)
    async with serve(engine) as addr, client(addr, {"vad": {"min_interruption_ms": 400}}) as c:
        await c.speak(np.concatenate([tone(600), silence(900)]))
        await c.until("text.delta")
        await c.speak(np.concatenate([tone(250), silence(900)]))  # a 250 ms "mhm"
        assert (await c.until("speech.stopped"))["turn"] is False
        await c.send({"type": "playback", "response_id": "resp_1", "played_ms": 300.0})
        await c.speak(tone(700))
        interrupted = await c.until("interrupted")
        assert interrupted == {"type": "interrupted", "response_id": "resp_1", "played_ms": 300.0}
        assert not any(e["type"] == "interrupted" for e in c.events[:-1])
        audio_before = c.audio_bytes
        done = await c.until("response.done", response_id="resp_1")
        assert done["reason"] == "cancelled"
        assert c.audio_bytes == audio_before  # nothing of resp_1 was sent after `interrupted`
        assert engine.cancels == [("fake1", 300.0)]
        assert engine.sessions[0].history[0] == "[fake1 turn 1] w0"  # only what was heard (0-200 ms, 200-400)
        await c.speak(silence(900))
        assert (await c.until("response.started"))["response_id"] == "resp_2"
        assert (await c.until("response.done"))["reason"] == "eos"


async def test_slow_client_is_closed_with_a_clear_code() -> None:
    engine = FakeEngine(blocks=100_000, block_ms=2000, step_s=0.0)
    async with serve(engine, send_queue_messages=8, slow_client_ms=200) as addr:
        async with client(addr, {}, max_queue=1) as c:
            await c.speak(np.concatenate([tone(600), silence(900)]))
            await asyncio.sleep(1.0)  # read nothing while the engine keeps producing
            with pytest.raises(websockets.ConnectionClosed) as info:
                while True:
                    await asyncio.wait_for(c.ws.recv(), 10)
        assert close_code(info.value) == 4001
        assert info.value.rcvd is not None
        assert info.value.rcvd.reason.startswith("slow_client: expected the client to read its messages")
        assert engine.open_count == 0 and engine.sessions[0].closed


async def test_a_client_that_stops_reading_is_still_heard_then_closed_as_slow() -> None:
    """Receiving never waits on sending: while the client reads nothing and the server is more than
    send_queue_messages behind, its speech still ends a turn and barge-in still cuts the reply (seen on
    the engine); it is closed with 4001 once it has stayed behind for slow_client_ms."""
    blocks, behind = 16, 20  # a reply of 2 * 16 text + audio messages; behind at 20 unsent
    engine = FakeEngine(blocks=blocks, block_ms=10_000, step_s=0.005, hold=True)  # 480 kB per audio block
    async with serve(engine, small_buffers=True, send_queue_messages=behind, slow_client_ms=1500) as addr:
        async with client(addr, {}, max_queue=1, sock=small_buffer_socket(addr)) as c:
            await c.speak(np.concatenate([tone(600), silence(900)]))  # from here on the client reads nothing
            session = engine.sessions[0]
            await eventually(lambda: len(session.turns) == 1 and session.turns[0].blocks_sent == blocks)
            await c.speak(np.concatenate([tone(700), silence(900)]))  # the user talks over the reply
            await eventually(lambda: len(session.turns) == 2)  # barge-in, then the new turn, all unread
            assert engine.cancels[0][0] == "fake1" and engine.cancels[0][1] is not None  # not the close's
            assert session.turns[1].audio_s >= 0.7  # the interrupting utterance is the new turn
            await eventually(lambda: session.closed)  # the server gave up on the client
            with pytest.raises(websockets.ConnectionClosed) as info:
                await c.until("never")
        assert close_code(info.value) == 4001
        assert c.events[-1]["code"] == "slow_client" and c.events[-1]["fatal"] is True
        # What reached the client before it was closed is part of the first reply (the rest of the backlog
        # never went out); so when the user barged in, the server had at least `behind` messages unsent
        # (one more may have been half-written).
        heard = [a for a in c.arrivals if a in ("audio", "text.delta")]
        assert 2 * blocks - len(heard) - 1 >= behind


async def test_a_turn_at_the_length_limit_ends_as_max_length_and_is_answered() -> None:
    engine = FakeEngine(blocks=3)
    async with serve(engine) as addr, client(addr, {"vad": {"min_interruption_ms": 10_000}}) as c:
        await c.speak(np.concatenate([tone(MAX_TURN_MS + 1000), silence(900)]))
        stopped = await c.until("speech.stopped")
        assert stopped["reason"] == "max_length" and stopped["turn"] is True
        assert (await c.until("response.done", response_id="resp_1"))["reason"] == "eos"
        assert not [e for e in c.events if e["type"] == "error"]
        turn = engine.sessions[0].turns[0]
        assert turn.audio_s == MAX_INPUT_SECONDS  # prefix padding included
        check_turn_audio(turn.audio)  # the real engine's input check takes it as well


BAD_INPUTS: list[tuple[str | bytes, str | None]] = [
    (b"\x00\x01" * 160, "start_required"),
    ("not json", "bad_json"),
    ('{"type": "dance"}', "unknown_type"),
    ('{"type": "start", "sample_rate": 44}', "bad_field"),
    ('{"type": "start"}', None),  # the good start
    ('{"type": "start"}', "duplicate_start"),
    (b"\x00" * 641, "bad_audio"),
    (b"\x00" * 4000, "frame_too_large"),
    ('{"type": "playback", "response_id": 5, "played_ms": 1}', "bad_field"),
]


async def test_each_bad_input_gets_a_typed_error_and_the_session_continues() -> None:
    async with serve(FakeEngine(blocks=3)) as addr, client(addr) as c:
        for message, code in BAD_INPUTS:
            await c.ws.send(message)
            if code is None:
                await c.until("session.started")
            else:
                event = await c.until("error")
                assert event["code"] == code and event["fatal"] is False, event
        assert (await c.turn())["reason"] == "eos"


async def test_too_many_bad_messages_close_the_connection() -> None:
    async with serve(FakeEngine()) as addr, client(addr) as c:
        for _ in range(101):
            await c.ws.send("x")
        with pytest.raises(websockets.ConnectionClosed) as info:
            while True:
                await c.ws.recv()
        assert close_code(info.value) == 4002


async def test_a_connection_that_never_starts_is_closed(monkeypatch) -> None:
    import voice_agent.serve.protocols.native as native

    monkeypatch.setattr(native, "START_TIMEOUT_S", 0.3)
    async with serve(FakeEngine()) as addr, client(addr) as c:
        with pytest.raises(websockets.ConnectionClosed) as info:
            await c.until("never")
        assert close_code(info.value) == 4003
        assert c.events[-1]["code"] == "start_timeout" and c.events[-1]["fatal"] is True


async def test_two_concurrent_sessions_keep_separate_conversations() -> None:
    engine = FakeEngine(blocks=4, step_s=0.02)

    async def converse(addr: str, turns: int) -> list[str]:
        async with client(addr, {}) as c:
            return [(await c.turn())["text"] for _ in range(turns)]

    async with serve(engine) as addr:
        a, b = await asyncio.gather(converse(addr, 2), converse(addr, 3))
    tags = {r.split("]")[0] for r in a}, {r.split("]")[0] for r in b}
    ids = {a[0].split()[0][1:], b[0].split()[0][1:]}
    assert ids == {"fake1", "fake2"} and len(tags[0]) == 2 and len(tags[1]) == 3
    assert [t.split()[:3] for t in a] == [[f"[{a[0].split()[0][1:]}", "turn", f"{i}]"] for i in (1, 2)]
    by_id = {s.id: s for s in engine.sessions}
    assert by_id[a[0].split()[0][1:]].history == a and by_id[b[0].split()[0][1:]].history == b


async def test_engine_failure_reaches_only_its_own_client() -> None:
    engine = FakeEngine(blocks=4, step_s=0.02)
    async with serve(engine) as addr, client(addr, {"voice": "fake-crash"}) as bad, client(addr, {}) as good:
        await bad.speak(np.concatenate([tone(600), silence(900)]))
        good_done = asyncio.create_task(good.turn())
        error = await bad.until("error")
        assert error["code"] == "engine_error" and "RuntimeError: FakeEngine scripted crash" in error["message"]
        assert (await bad.until("response.done"))["reason"] == "error"
        assert (await good_done)["reason"] == "eos"
        await bad.send({"type": "update", "voice": "en"})
        await bad.until("session.updated")
        assert (await bad.turn())["reason"] == "eos"  # the failing session is still usable


@pytest.mark.parametrize(
    "headers, start, outcome",
    [
        ({}, {}, 1008),
        ({}, {"key": "wrong-key!"}, 1008),
        ({}, {"key": KEY}, "ok"),
        ({"Authorization": f"Bearer {KEY}"}, {}, "ok"),
        ({"Authorization": "Bearer wrong-key!"}, {}, 403),
    ],
)
async def test_auth_on(headers: dict, start: dict, outcome: object) -> None:
    async with serve(FakeEngine(), api_key=KEY) as addr:
        if outcome == 403:
            with pytest.raises(websockets.InvalidStatus) as info:
                async with client(addr, additional_headers=headers):
                    pass
            assert info.value.response.status_code == 403
            return
        async with client(addr, additional_headers=headers) as c:
            await c.send({"type": "start", **start})
            if outcome == "ok":
                await c.until("session.started")
                return
            assert (await c.until("error"))["code"] == "unauthorized"
            with pytest.raises(websockets.ConnectionClosed) as closed:
                await c.ws.recv()
            assert close_code(closed.value) == outcome


async def test_auth_off_needs_no_key() -> None:
    async with serve(FakeEngine()) as addr, client(addr, {}) as c:
        assert c.events[-1]["type"] == "session.started"


async def test_full_engine_refuses_with_try_again_later() -> None:
    async with serve(FakeEngine(max_sessions=1)) as addr, client(addr, {}), client(addr) as second:
        await second.send({"type": "start"})
        assert (await second.until("error"))["code"] == "server_full"
        with pytest.raises(websockets.ConnectionClosed) as info:
            await second.ws.recv()
        assert close_code(info.value) == 1013


def test_config_precedence_cli_over_env_over_default() -> None:
    parser = argparse.ArgumentParser()
    ServerConfig.add_arguments(parser)
    env = {"VOICE_AGENT_PORT": "9000", "VOICE_AGENT_SILENCE_MS": "700", "VOICE_AGENT_API_KEY": KEY}
    cfg = ServerConfig.from_args(parser.parse_args(["--port", "9100", "--vad-aggressiveness", "3"]), env)
    assert (cfg.port, cfg.silence_ms, cfg.vad_aggressiveness, cfg.api_key) == (9100, 700, 3, KEY)
    assert cfg.session_defaults().vad.silence_ms == 700
    assert ServerConfig.from_env({}) == ServerConfig()


@pytest.mark.parametrize(
    "env, message",
    [
        ({"VOICE_AGENT_PORT": "http"}, "VOICE_AGENT_PORT: expected int, got 'http'"),
        ({"VOICE_AGENT_PORT": "70000"}, "--port / VOICE_AGENT_PORT: expected a port number 0..65535, got 70000"),
        ({"VOICE_AGENT_DTYPE": "int8"}, "expected one of ('float32', 'bfloat16', 'float16'), got 'int8'"),
        ({"VOICE_AGENT_VAD_FRAME_MS": "25"}, "frame_ms: expected one of (10, 20, 30), got 25"),
        ({"VOICE_AGENT_MAX_TURN_MS": "60000"}, "max_turn_ms: expected an integer 1000..30000, got 60000"),
        ({"VOICE_AGENT_API_KEY": "short"}, "VOICE_AGENT_API_KEY: expected at least 8 characters, got 5 characters"),
    ],
)
def test_config_errors_name_the_variable(env: dict, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        ServerConfig.from_env(env)
    assert message in str(info.value)
