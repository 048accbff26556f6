"""Connection is generic over WireAdapter: a toy wire format plugs in with no change to the connection.

The toy format differs from the native one in every policy a WireAdapter owns: the session opens with
the connection (no opening message), the key may come in the `token` query parameter, binary messages are
raw 16 kHz PCM16, text messages are refused, and each server event is a JSON object naming its type.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

import numpy as np
import pytest
import websockets
from fakes import FakeEngine, silence, tone
from serving import free_socket, running
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.websockets import WebSocket
from websockets.asyncio.client import connect

from voice_agent.audio import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, float_to_pcm16, pcm16_to_float
from voice_agent.errors import ProtocolError
from voice_agent.serve.app import close_for, uvicorn_options
from voice_agent.serve.config import ServerConfig
from voice_agent.serve.connection import Connection
from voice_agent.serve.protocols.adapter import WireAdapter
from voice_agent.serve.protocols.events import (
    AudioFrame,
    ClientEvent,
    ErrorEvent,
    ResponseAudio,
    ServerEvent,
    StartSession,
)
from voice_agent.serve.settings import SessionSettings

KEY = "toy-key-123"


class ToyWire:
    """The toy wire format of the module docstring."""

    start_timeout_s = 1.0
    subprotocol = None
    conversation_events = False
    pace_lead_ms = None

    def __init__(self, defaults: SessionSettings) -> None:
        self.defaults = defaults

    def handshake_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return query.get("token")

    def on_accept(self) -> list[ClientEvent]:
        return [StartSession(self.defaults, INPUT_SAMPLE_RATE, 20, OUTPUT_SAMPLE_RATE)]

    def audio_ms(self, message: str | bytes) -> float:
        return 0.0

    def decode(self, message: str | bytes) -> list[ClientEvent]:
        if isinstance(message, str):
            raise ProtocolError("toy_text", f"expected binary audio, got text {message!r}")
        return [AudioFrame(pcm16_to_float(message))]

    def encode(self, event: ServerEvent) -> list[str | bytes]:
        if isinstance(event, ResponseAudio):
            return [float_to_pcm16(event.pcm)]
        extra = {"code": event.code, "fatal": event.fatal} if isinstance(event, ErrorEvent) else {}
        return [json.dumps({"event": type(event).__name__, **extra})]


def test_the_toy_and_native_formats_are_wire_adapters() -> None:
    from voice_agent.serve.protocols.native import NativeProtocol

    adapters: list[WireAdapter] = [ToyWire(SessionSettings()), NativeProtocol(SessionSettings())]
    assert [len(a.on_accept()) for a in adapters] == [1, 0]  # opens on connect / with its start message


@asynccontextmanager
async def serve_toy(engine: FakeEngine) -> AsyncIterator[str]:
    """The toy format at ws://ADDR/toy, through Connection and close_for as the app's /ws route does."""
    config = ServerConfig(log_level="warning", api_key=KEY)

    async def toy(ws: WebSocket) -> None:
        connection = Connection(ws, ToyWire(config.session_defaults()), engine, config)
        failure = await connection.run()
        if failure is not None:
            await connection.close(*close_for(failure))

    app = Starlette(routes=[WebSocketRoute("/toy", toy)])
    async with running(app, uvicorn_options(config), free_socket()) as addr:
        yield addr


async def test_a_toy_wire_format_opens_on_connect_with_a_query_key_and_gets_replies() -> None:
    async with serve_toy(FakeEngine(blocks=2)) as addr, connect(f"ws://{addr}/toy?token={KEY}") as ws:
        await ws.send("hello")  # no opening message: the session is already open; text is refused
        speech = np.concatenate([tone(600), silence(900)])
        for i in range(0, len(speech), 320):
            await ws.send(float_to_pcm16(speech[i : i + 320]))
        names: list[str] = []
        async with asyncio.timeout(10):
            while "ResponseFinished" not in names:
                message = await ws.recv()
                name = "audio" if isinstance(message, bytes) else json.loads(message)["event"]
                if name != "UserTranscript":  # the fake's transcript of the turn, whenever it comes
                    names.append(name)
        assert names[:2] == ["SessionStarted", "ErrorEvent"]
        assert names[2:] == ["SpeechStarted", "SpeechStopped", "ResponseStarted",
                             "ResponseText", "audio", "ResponseText", "audio", "ResponseFinished"]


async def test_a_toy_connection_without_a_key_gets_the_toy_fatal_error_and_1008() -> None:
    async with serve_toy(FakeEngine()) as addr, connect(f"ws://{addr}/toy") as ws:
        assert json.loads(await ws.recv()) == {"event": "ErrorEvent", "code": "unauthorized", "fatal": True}
        with pytest.raises(websockets.ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008


async def test_a_wrong_toy_query_key_is_refused_before_the_upgrade() -> None:
    async with serve_toy(FakeEngine()) as addr:
        with pytest.raises(websockets.InvalidStatus) as info:
            async with connect(f"ws://{addr}/toy?token=wrong-key-1"):
                pass
        assert info.value.response.status_code == 403
