"""One WebSocket client: a `Session` behind a `WireAdapter`, in one task group per socket.

The task group holds:
- the receive loop: wire message -> `adapter.decode` -> `Session` -> engine commands (`SubmitTurn`,
  `CancelTurn`) and server events. It awaits nothing but the socket, so VAD, end of turn and barge-in
  keep up with the microphone however slowly the client reads;
- one pump per response, reading the engine's event stream into the `Session`; it never waits on the
  client either (an engine failure in a turn becomes an `error` event for this client only);
- the send loop, writing the `Outbox` to the socket at the client's pace;
- the slow-client watch: a client that stays behind for `slow_client_ms` is closed with `SlowClient`.

Every server event goes `adapter.encode` -> `Outbox.put`, which never waits; `voice_agent.serve.outbox`
says how the backlog stays bounded (at most twice `send_queue_messages` messages; beyond that the
client is closed at once). At a cancel the interrupted response's unsent audio and text leave the
outbox, and the `Session` emits nothing more of it, so no set of cancelled ids is kept.

Everything about the wire format is the adapter's (`voice_agent.serve.protocols.adapter`): decoding,
encoding, how the session opens and within what time, where a key may come from besides the Bearer
header, and how the fatal error looks.

Ending: `run()` returns the exception that ended the connection (None when the client left); the caller
maps it to a close code (`voice_agent.serve.app.close_for`, the one place that does) and calls
`close(code, event)`: before the upgrade that refuses it (HTTP 403); after it, the adapter's fatal error
message, then the close frame. The engine session is given back first, so a client slow to close holds
no model memory.

Auth (when `api_key` is set): `Authorization: Bearer KEY`, or the adapter's `handshake_key`, on the
handshake (a wrong one is refused before the upgrade); else `StartSession.key`. Keys are compared in
constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator

import anyio
import anyio.abc
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_agent.engine.api import Engine, EngineEvent, EngineSession, TurnError
from voice_agent.errors import (
    NoStart,
    NotReady,
    ProtocolError,
    SlowClient,
    TooManyErrors,
    TurnRejected,
    Unauthorized,
    VoiceAgentError,
    error_code,
)
from voice_agent.serve.config import ServerConfig
from voice_agent.serve.outbox import Outbox
from voice_agent.serve.protocols.adapter import WireAdapter
from voice_agent.serve.protocols.events import (
    AudioFrame,
    ClientEvent,
    ErrorEvent,
    InterruptRequest,
    PlaybackProgress,
    ResponseAudio,
    ResponseText,
    ServerEvent,
    SessionStarted,
    StartSession,
    UpdateSettings,
)
from voice_agent.serve.session import CancelTurn, Output, Session, SubmitTurn

log = logging.getLogger("voice_agent.serve.connection")

CLOSE_REASON_MAX_BYTES = 123  # RFC 6455 limit for a close frame's reason
CLOSE_TIMEOUT_S = 5.0  # how long a closing connection lingers to tell its client why
MAX_PROTOCOL_ERRORS = 100  # bad messages tolerated on one connection


class Connection:
    """One WebSocket client: see the module docstring."""

    def __init__(self, ws: WebSocket, adapter: WireAdapter, engine: Engine, config: ServerConfig) -> None:
        self.ws, self.adapter, self.engine, self.config = ws, adapter, engine, config
        self.outbox = Outbox(config.send_queue_messages)
        self.session: Session | None = None
        self.engine_session: EngineSession | None = None
        self._authorized = config.api_key is None
        self._errors = 0
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> Exception | None:
        """Serve the client until it leaves (None) or something ends the connection (that exception)."""
        if self.config.api_key is not None:
            key = _bearer(self.ws)
            if key is None:
                key = self.adapter.handshake_key(self.ws.headers, self.ws.query_params)
            if key is not None:
                if not _key_matches(key, self.config.api_key):
                    return Unauthorized("expected a valid API key on the handshake, got a wrong one")
                self._authorized = True
        await self.ws.accept()
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._send_loop)
                tg.start_soon(self._watch_client)
                await self._receive_loop()
                tg.cancel_scope.cancel()
        except Exception as group:
            exc = _leaf(group)
            if not _is_disconnect(exc):
                failure = exc if isinstance(exc, Exception) else group
                if not isinstance(exc, VoiceAgentError):
                    log.error("connection failed", exc_info=exc)
        finally:
            await self._release()
        return failure

    async def close(self, code: int, event: ErrorEvent) -> None:
        """End the connection with close code `code`, telling the client `event` first if it can."""
        reason = f"{event.code}: {event.message}".encode()[:CLOSE_REASON_MAX_BYTES].decode(errors="ignore")
        with anyio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                if self.ws.application_state is WebSocketState.CONNECTING:
                    await self.ws.close(code)  # before the upgrade: refused with HTTP 403
                elif self.ws.application_state is WebSocketState.CONNECTED:
                    for message in self.adapter.encode(event):
                        await self._write(message)
                    await self.ws.close(code, reason)
            except (WebSocketDisconnect, OSError, RuntimeError):
                pass

    async def _release(self) -> None:
        """Give the engine session back (the connection is ending)."""
        if self.engine_session is None:
            return
        try:
            self.engine_session.cancel(None)
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await self.engine_session.close()
        except Exception:
            log.exception("closing engine session %s failed", self.engine_session.id)

    # ---- receive side: never waits on the client -------------------------------------------------

    async def _receive_loop(self) -> None:
        self._apply_events(self.adapter.on_accept(), time.monotonic())
        start_deadline = anyio.current_time() + self.adapter.start_timeout_s
        while True:
            if self.session is None:
                with anyio.move_on_after(start_deadline - anyio.current_time()) as waiting:
                    message = await self.ws.receive()
                if waiting.cancelled_caught:
                    raise NoStart(f"expected the session to open within {self.adapter.start_timeout_s:g} s "
                                  "of connecting, got no opening message")
            else:
                message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            now = time.monotonic()
            raw = message.get("bytes")
            data: str | bytes = raw if raw is not None else message.get("text") or ""
            try:
                events = self.adapter.decode(data)
            except ProtocolError as e:
                self._errors += 1
                if self._errors > MAX_PROTOCOL_ERRORS:
                    raise TooManyErrors(f"expected at most {MAX_PROTOCOL_ERRORS} bad messages") from None
                self._send(ErrorEvent(error_code(e), str(e)))
                continue
            self._apply_events(events, now)

    def _apply_events(self, events: list[ClientEvent], now: float) -> None:
        for event in events:
            self._apply(self._handle(event, now))

    def _handle(self, event: ClientEvent, now: float) -> list[Output]:
        if isinstance(event, StartSession):
            return self._start(event)
        assert self.session is not None, "the adapter lets nothing but the session's opening through first"
        if isinstance(event, AudioFrame):
            return self.session.on_audio(event.pcm, now)
        if isinstance(event, PlaybackProgress):
            return self.session.on_playback(event.response_id, event.played_ms, now)
        if isinstance(event, InterruptRequest):
            return self.session.on_interrupt_request(event.played_ms, now)
        if isinstance(event, UpdateSettings):
            return self.session.update_settings(event.settings)
        raise TypeError(f"expected a client event, got {type(event).__name__}")

    def _start(self, event: StartSession) -> list[Output]:
        if not self._authorized:
            if not _key_matches(event.key, self.config.api_key or ""):
                got = "no key" if event.key is None else "a wrong key"
                raise Unauthorized(f"expected a valid API key, got {got}")
            self._authorized = True
        if not self.engine.ready:
            raise NotReady("the model is still loading; expected /readyz to answer 200 before connecting")
        self.engine_session = self.engine.open_session(system_prompt=self.config.system_prompt)
        self.session = Session(self.engine_session.id, event.settings)
        info = self.engine.info
        return [SessionStarted(self.engine_session.id, event.sample_rate_hz, event.output_sample_rate_hz,
                               event.frame_ms, info.model_name, info.demo, event.settings)]

    def _apply(self, outputs: list[Output]) -> None:
        """Carry out a session's outputs in order: engine commands, then events for the client."""
        for out in outputs:
            if isinstance(out, SubmitTurn):
                self._submit(out)
            elif isinstance(out, CancelTurn):
                self.outbox.drop(out.response_id)
                if self.engine_session is not None:
                    # Also when generation had finished: the engine then cuts the last reply's history.
                    self.engine_session.cancel(out.played_ms)
            else:
                self._send(out)

    def _submit(self, cmd: SubmitTurn) -> None:
        assert self.engine_session is not None and self.session is not None and self._tg is not None
        try:
            stream = self.engine_session.submit_turn(cmd.audio, cmd.settings, speech_end=cmd.speech_end)
        except TurnRejected as e:
            error = TurnError(error_code(e), str(e))
            self._apply(self.session.on_engine_event(cmd.response_id, error, time.monotonic()))
            return
        self._tg.start_soon(self._pump, cmd.response_id, stream)

    async def _pump(self, response_id: str, stream: AsyncIterator[EngineEvent]) -> None:
        """Forward one response's engine events through the session; an engine failure ends the turn."""
        assert self.session is not None
        while True:
            try:
                event: EngineEvent = await anext(stream)
            except StopAsyncIteration:
                return
            except Exception as e:
                if not isinstance(e, VoiceAgentError):
                    log.error("engine failed on %s", response_id, exc_info=e)
                event = TurnError(error_code(e), f"the engine failed on this turn ({type(e).__name__}: {e}); "
                                                 "the session continues")
            self._apply(self.session.on_engine_event(response_id, event, time.monotonic()))
            if isinstance(event, TurnError):
                return

    # ---- send side -------------------------------------------------------------------------------

    def _send(self, event: ServerEvent) -> None:
        response_id = event.response_id if isinstance(event, (ResponseAudio, ResponseText)) else None
        for message in self.adapter.encode(event):
            self.outbox.put(message, response_id)

    async def _send_loop(self) -> None:
        while True:
            await self._write(await self.outbox.get())

    async def _watch_client(self) -> None:
        await self.outbox.overdue(self.config.slow_client_ms / 1000.0)
        raise SlowClient(f"expected the client to read its messages, got {len(self.outbox)} unread for "
                         f"{self.config.slow_client_ms} ms")

    async def _write(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            await self.ws.send_bytes(message)
        else:
            await self.ws.send_text(message)


def _leaf(exc: BaseException) -> BaseException:
    """The first non-cancellation exception inside (nested) exception groups."""
    inner = getattr(exc, "exceptions", None)
    if not inner:
        return exc
    leaves = [_leaf(e) for e in inner]
    real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)]
    return (real or leaves)[0]


def _is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, (WebSocketDisconnect, OSError))


def _key_matches(given: str | None, expected: str) -> bool:
    return given is not None and hmac.compare_digest(given.encode(), expected.encode())


def _bearer(ws: WebSocket) -> str | None:
    header = ws.headers.get("authorization")
    if header is None or not header.lower().startswith("bearer "):
        return None
    return header[len("bearer "):].strip()
