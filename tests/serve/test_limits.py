"""Limits and hostile inputs against the real server (uvicorn on a free port, FakeEngine behind it).

Each test names the documented rule it holds the server to (docs/protocol.md, "Limits" and "Errors and
close codes"): failed-auth cool-down, connections per peer, idle and over-long sessions, a text message
that is not UTF-8, a reader that never reads, and the turn settings checked against the engine.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import struct
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager

import numpy as np
import pytest
import websockets
from fakes import FAKE_VOICES, FakeEngine, silence, tone
from serving import free_socket, running
from test_server import KEY, SMALL_SOCKET_BUFFER, client, close_code, eventually, serve, small_buffer_socket
from websockets.asyncio.client import connect

from voice_agent.errors import ConfigError
from voice_agent.serve.app import WS_PING_TIMEOUT_S, build_app, uvicorn_options
from voice_agent.serve.config import MAX_SLOW_CLIENT_MS, ServerConfig

BEARER = {"Authorization": f"Bearer {KEY}"}
WRONG = {"Authorization": "Bearer not-the-key"}


@contextmanager
def records(*names: str) -> Iterator[list[logging.LogRecord]]:
    """Every record that reaches loggers `names` (after their filters), whatever propagates where."""
    got: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if not any(r is record for r in got):  # a record may pass through several of the loggers
                got.append(record)

    handler = Keep(logging.DEBUG)
    loggers = [logging.getLogger(n) for n in names]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield got
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


async def refused_status(addr: str, headers: dict[str, str]) -> tuple[int, dict[str, str]]:
    """The HTTP status (and headers) a refused handshake gets."""
    with pytest.raises(websockets.InvalidStatus) as info:
        async with connect(f"ws://{addr}/ws", additional_headers=headers):
            pass
    response = info.value.response
    return response.status_code, dict(response.headers)


# ---- auth ------------------------------------------------------------------------------------------


async def test_failed_auth_attempts_lead_to_a_cool_down_with_429() -> None:
    async with serve(FakeEngine(), api_key=KEY, auth_max_failures=3, auth_cooldown_s=60) as addr:
        with records("voice_agent") as logged:
            for _ in range(2):
                assert (await refused_status(addr, WRONG))[0] == 403
            async with client(addr) as c:  # a wrong key in the start message counts as well
                await c.send({"type": "start", "key": "wrong-key-in-start"})
                assert (await c.until("error"))["code"] == "unauthorized"
            for headers in (WRONG, BEARER, {}):  # refused now, even with the right key
                status, response_headers = await refused_status(addr, headers)
                assert status == 429 and 55 <= int(response_headers["retry-after"]) <= 60
            for _ in range(50):
                await refused_status(addr, WRONG)
        auth_lines = [r for r in logged if r.getMessage().startswith("auth:")]
        assert 1 <= len(auth_lines) <= 2  # a failure and the cool-down; the flood after it is not logged
        assert "refusing its connections for 60 s" in auth_lines[-1].getMessage()
        assert not any(s in r.getMessage() for r in logged for s in (KEY, "not-the-key", "wrong-key-in-start"))


async def test_a_right_key_forgets_the_failures_before_it() -> None:
    async with serve(FakeEngine(), api_key=KEY, auth_max_failures=2) as addr:
        for _ in range(3):
            assert (await refused_status(addr, WRONG))[0] == 403
            async with client(addr, {}, additional_headers=BEARER) as c:
                assert c.events[-1]["type"] == "session.started"


# ---- per peer, idle, longest ------------------------------------------------------------------------


async def test_connections_per_peer_are_limited_with_1013() -> None:
    async with serve(FakeEngine(), max_connections_per_peer=2) as addr:
        async with client(addr, {}), client(addr):
            async with client(addr) as third:
                error = await third.until("error")
                assert error["code"] == "too_many_connections" and error["fatal"] is True
                with pytest.raises(websockets.ConnectionClosed) as info:
                    await third.ws.recv()
                assert close_code(info.value) == 1013
        async with client(addr, {}), client(addr, {}):  # the closed ones no longer count
            pass


async def test_a_session_without_audio_is_closed_4004() -> None:
    async with serve(FakeEngine(), idle_timeout_s=1) as addr, client(addr, {}) as c:
        started = time.monotonic()
        error = await c.until("error", timeout=5)
        assert error["code"] == "idle_timeout" and error["fatal"] is True
        assert 0.9 <= time.monotonic() - started < 4
        with pytest.raises(websockets.ConnectionClosed) as info:
            await c.ws.recv()
        assert close_code(info.value) == 4004


async def test_audio_keeps_a_session_open_until_its_longest_then_4005() -> None:
    async with serve(FakeEngine(), idle_timeout_s=1, max_session_s=2) as addr, client(addr, {}) as c:
        started = time.monotonic()

        async def talk() -> None:
            while True:
                await c.speak(silence(100))
                await asyncio.sleep(0.1)

        talking = asyncio.create_task(talk())
        try:
            error = await c.until("error", timeout=6)
        finally:
            talking.cancel()
        assert error["code"] == "session_too_long" and 1.9 <= time.monotonic() - started < 5  # not idle at 1 s
        with pytest.raises(websockets.ConnectionClosed) as info:
            await c.until("never")
        assert close_code(info.value) == 4005


# ---- transport ----------------------------------------------------------------------------------------


def masked_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame (masked, as RFC 6455 requires of clients); payload < 126 bytes."""
    mask = os.urandom(4)
    return bytes([0x80 | opcode, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def raw_close_code(addr: str, frame: bytes) -> int | None:
    """Open a WebSocket by hand, send `frame`, return the close code the server answers with (None: the
    connection ended without a close frame)."""
    host, port = addr.split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(f"GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode())
    assert b" 101 " in await reader.readuntil(b"\r\n\r\n")
    writer.write(frame)
    try:
        async with asyncio.timeout(5):
            while True:
                head = await reader.readexactly(2)
                body = await reader.readexactly(head[1] & 0x7F)  # server frames here are short, unmasked
                if head[0] & 0x0F == 0x8:
                    return struct.unpack("!H", body[:2])[0] if len(body) >= 2 else None
    except asyncio.IncompleteReadError:
        return None
    finally:
        writer.close()


async def test_text_that_is_not_utf8_is_closed_1007_with_one_log_line_and_no_traceback(capfd) -> None:
    engine = FakeEngine()
    async with serve(engine) as addr, client(addr, {}) as healthy:
        with records("uvicorn.error", "uvicorn", "voice_agent") as logged:
            codes = [await raw_close_code(addr, masked_frame(0x1, b'{"type": "start"}\xff\xfe')) for _ in range(5)]
        assert codes == [1007] * 5
        assert (await healthy.turn())["reason"] == "eos"  # the server goes on for everyone else
    assert not [r for r in logged if r.exc_info is not None or r.levelno >= logging.ERROR]
    utf8 = [r for r in logged if "not UTF-8" in r.getMessage()]
    assert len(utf8) == 1 and utf8[0].levelno == logging.WARNING  # throttled: one line for five
    assert "Traceback" not in capfd.readouterr().err


@asynccontextmanager
async def serve_with_keepalive(engine: FakeEngine, ping_interval_s: float, ping_timeout_s: float,
                               **config: object) -> AsyncIterator[str]:
    """As test_server.serve with small socket buffers, and uvicorn's keepalive set as given."""
    sock = free_socket(SMALL_SOCKET_BUFFER)
    cfg = ServerConfig(port=sock.getsockname()[1], log_level="warning", **config)  # type: ignore[arg-type]
    options = {**uvicorn_options(cfg), "ws_ping_interval": ping_interval_s, "ws_ping_timeout": ping_timeout_s}
    async with running(build_app(cfg, engine), options, sock) as addr:
        yield addr


def test_the_slow_client_rule_is_held_well_inside_the_keepalive() -> None:
    cfg = ServerConfig()
    options = uvicorn_options(cfg)
    assert (options["ws_ping_interval"], options["ws_ping_timeout"]) == (20.0, 20.0)  # as docs/protocol.md says
    assert MAX_SLOW_CLIENT_MS <= WS_PING_TIMEOUT_S * 1000 / 2
    with pytest.raises(ConfigError, match="SLOW_CLIENT_MS: expected an integer 10..10000, got 20000"):
        ServerConfig(slow_client_ms=20_000)


async def test_a_reader_that_never_reads_is_closed_4001_in_time_not_by_the_keepalive() -> None:
    """The client reads nothing once its session has started, so it answers no ping either: the keepalive
    (a ping every 2 s, 8 s to answer) would close it with 1011 within 10 s. The slow-client rule (behind
    for 500 ms) closes it long before, with 4001."""
    engine = FakeEngine(blocks=16, block_ms=10_000, step_s=0.005, hold=True)  # 480 kB per audio block
    async with serve_with_keepalive(engine, 2.0, 8.0, send_queue_messages=8, slow_client_ms=500) as addr:
        async with client(addr, {}, max_queue=1, sock=small_buffer_socket(addr)) as c:
            await c.speak(np.concatenate([tone(600), silence(900)]))  # from here on the client reads nothing
            spoken = time.monotonic()
            await eventually(lambda: bool(engine.sessions) and engine.sessions[0].closed, timeout=10)
            assert time.monotonic() - spoken < 6.0  # filling the buffers, then 500 ms behind
            with pytest.raises(websockets.ConnectionClosed) as info:
                await c.until("never")  # reading again, within the server's 5-s linger
        assert close_code(info.value) == 4001
        assert info.value.rcvd is not None and info.value.rcvd.reason.startswith("slow_client:")


# ---- settings and stop requests -------------------------------------------------------------------------


async def test_unknown_voices_and_out_of_range_settings_are_refused_at_start_and_update() -> None:
    engine = FakeEngine(blocks=2)
    async with serve(engine) as addr, client(addr) as c:
        for bad in ({"voice": "default"}, {"voice": "../../../../etc/passwd"}, {"voice": "v" * 100_000},
                    {"seed": 2**70}, {"max_new_tokens": 4096}):
            await c.send({"type": "start", **bad})
            error = await c.until("error")
            assert error["code"] == "bad_field" and error["fatal"] is False and len(error["message"]) < 300
            field = next(iter(bad))
            assert error["message"].startswith(f"{field}: expected")
        assert str(list(FAKE_VOICES)) in error_message_for(c, "voice")
        await c.send({"type": "start", "voice": "alt", "seed": 2**63 - 1, "max_new_tokens": 512})
        started = await c.until("session.started")
        assert (started["settings"]["voice"], started["settings"]["seed"]) == ("alt", 2**63 - 1)
        await c.send({"type": "update", "voice": "nobody"})
        assert (await c.until("error"))["code"] == "bad_field"
        assert (await c.turn())["reason"] == "eos"
        assert engine.sessions[0].turns[0].settings.voice == "alt"  # the refused update changed nothing


def error_message_for(c, field: str) -> str:
    return next(e["message"] for e in c.events if e["type"] == "error" and e["message"].startswith(field))


@pytest.mark.parametrize("played_ms", ["x", -5, None])
async def test_a_stop_request_with_a_bad_played_ms_still_stops_the_reply(played_ms: object) -> None:
    engine = FakeEngine(blocks=50, block_ms=200, step_s=0.02)
    async with serve(engine) as addr, client(addr, {}) as c:
        await c.speak(np.concatenate([tone(600), silence(900)]))
        await c.until("text.delta")
        message = json.dumps({"type": "interrupt", "played_ms": played_ms}).replace("null", "NaN")
        await c.ws.send(message)
        interrupted = await c.until("interrupted", response_id="resp_1")
        error = await c.until("error")  # the stop comes first, then the complaint
        assert error["code"] == "bad_field" and error["message"].startswith("interrupt.played_ms: expected")
        assert 0 <= interrupted["played_ms"] <= c.audio_bytes / 48  # at most the audio sent (24 kHz PCM16)
        done = await c.until("response.done", response_id="resp_1")
        assert done["reason"] == "cancelled" and engine.cancels


def test_the_reply_limits_are_server_options_that_reach_the_engine() -> None:
    model, engine = ServerConfig(max_reply_tokens=128, final_units=250).engine_options()
    assert (engine.max_reply_tokens, engine.final_units, engine.max_new_tokens) == (128, 250, 128)
    _, default = ServerConfig().engine_options()
    assert (default.max_reply_tokens, default.final_units, default.max_new_tokens) == (512, 1024, 256)
    for env, message in [
        ({"VOICE_AGENT_MAX_REPLY_TOKENS": "5000"}, "MAX_REPLY_TOKENS: expected an integer 1..4096, got 5000"),
        ({"VOICE_AGENT_FINAL_UNITS": "0"}, "FINAL_UNITS: expected an integer 1..1024, got 0"),
        ({"VOICE_AGENT_AUTH_MAX_FAILURES": "0"}, "AUTH_MAX_FAILURES: expected an integer 1..10000, got 0"),
        ({"VOICE_AGENT_IDLE_TIMEOUT_S": "-1"}, "IDLE_TIMEOUT_S: expected an integer 0..86400, got -1"),
        ({"VOICE_AGENT_MAX_CONNECTIONS_PER_PEER": "0"}, "expected an integer 1..100000, got 0"),
    ]:
        with pytest.raises(ConfigError, match=message.replace("..", r"\.\.")):
            ServerConfig.from_env(env)
