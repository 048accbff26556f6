"""The HTTP/WebSocket server: routes, lifespan, one task group per connection, errors -> close codes.

Routes: `/` the bundled page (`static/`), `/static/*` its files, `/api/info` what the page needs before
connecting (model, demo flag, voices, defaults, whether a key is required), `/healthz` (the process is
up), `/readyz` (200 once the engine has loaded and warmed its model, else 503), `/ws` the native
protocol (docs/protocol.md).

Per connection: a receive loop (decode -> `Session` -> engine commands and server events), a send loop,
and one pump task per response reading the engine's event stream, all in one task group and joined by
a bounded queue. A client that lets the queue stay full for `slow_client_ms` is closed with
CLOSE_SLOW_CLIENT instead of growing memory. Audio and text of an interrupted response still queued are
dropped. An engine failure in a turn becomes an `error` event for that client only. `close_for` is
the one place that maps a connection-ending exception to a close code.

Auth (when `api_key` is set): `Authorization: Bearer KEY` on the WebSocket handshake (a wrong one is
refused before the upgrade, HTTP 403), or a `key` field in the start message (browsers cannot set
headers; the key stays out of URLs and proxy logs). Keys are compared in constant time.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.abc
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_agent.engine.api import Engine, EngineEvent, EngineSession, TurnError
from voice_agent.errors import (
    AdmissionError,
    NoStart,
    NotReady,
    ProtocolError,
    SlowClient,
    TooManyErrors,
    TurnRejected,
    Unauthorized,
    VoiceAgentError,
)
from voice_agent.serve.config import ServerConfig
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
from voice_agent.serve.protocols.native import NativeProtocol
from voice_agent.serve.session import CancelTurn, Output, Session, SubmitTurn
from voice_agent.serve.vad import make_classifier

log = logging.getLogger("voice_agent.serve.app")

DOWNLOAD_COMMAND = "voice-agent download"
DEFAULT_STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
WS_MAX_MESSAGE_BYTES = 1 << 20  # uvicorn refuses (1009) larger WebSocket messages before we see them
CLOSE_REASON_MAX_BYTES = 123  # RFC 6455 limit for a close frame's reason
CLOSE_TIMEOUT_S = 5.0  # how long a closing connection lingers to tell its client why
MAX_PROTOCOL_ERRORS = 100  # bad messages tolerated on one connection
START_TIMEOUT_S = 10.0  # a connection must send its start message within this

CLOSE_NORMAL = 1000
CLOSE_POLICY_VIOLATION = 1008  # no or wrong API key
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013  # engine full or still loading
CLOSE_SLOW_CLIENT = 4001  # the client did not read its messages
CLOSE_TOO_MANY_ERRORS = 4002  # MAX_PROTOCOL_ERRORS bad messages
CLOSE_NO_START = 4003  # no start message within START_TIMEOUT_S


def close_for(exc: BaseException) -> tuple[int, ErrorEvent]:
    """Map an exception that ends a connection to (close code, fatal error event for the client)."""
    codes = {
        Unauthorized: CLOSE_POLICY_VIOLATION,
        AdmissionError: CLOSE_TRY_AGAIN_LATER,
        NotReady: CLOSE_TRY_AGAIN_LATER,
        SlowClient: CLOSE_SLOW_CLIENT,
        TooManyErrors: CLOSE_TOO_MANY_ERRORS,
        NoStart: CLOSE_NO_START,
    }
    for kind, close_code in codes.items():
        if isinstance(exc, kind):
            return close_code, ErrorEvent(exc.code, str(exc), fatal=True)
    if isinstance(exc, VoiceAgentError):
        return CLOSE_INTERNAL_ERROR, ErrorEvent(exc.code, str(exc), fatal=True)
    return CLOSE_INTERNAL_ERROR, ErrorEvent("internal_error", "internal server error (see the log)", True)


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


@dataclass(frozen=True)
class _Outgoing:
    message: str | bytes
    droppable: str | None  # response id: drop this if that response was interrupted before it went out


class Connection:
    """One WebSocket client: see the module docstring."""

    def __init__(self, ws: WebSocket, engine: Engine, config: ServerConfig) -> None:
        self.ws, self.engine, self.config = ws, engine, config
        self.protocol = NativeProtocol(config.session_defaults())
        self.queue: asyncio.Queue[_Outgoing] = asyncio.Queue(maxsize=config.send_queue_messages)
        self.session: Session | None = None
        self.engine_session: EngineSession | None = None
        self._authorized = config.api_key is None
        self._dropped: set[str] = set()
        self._errors = 0
        self._tg: anyio.abc.TaskGroup | None = None

    async def run(self) -> None:
        if self.config.api_key is not None and (key := _bearer(self.ws)) is not None:
            if not _key_matches(key, self.config.api_key):
                await self.ws.close(CLOSE_POLICY_VIOLATION)  # before accept: HTTP 403
                return
            self._authorized = True
        await self.ws.accept()
        failure: Exception | None = None
        try:
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._send_loop)
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
        if failure is not None:
            await self._close(*close_for(failure))

    async def _release(self) -> None:
        """Give the engine session back first, so a client that is slow to close holds no model memory."""
        if self.engine_session is None:
            return
        try:
            self.engine_session.cancel(None)
            with anyio.move_on_after(CLOSE_TIMEOUT_S, shield=True):
                await self.engine_session.close()
        except Exception:
            log.exception("closing engine session %s failed", self.engine_session.id)

    async def _close(self, code: int, event: ErrorEvent) -> None:
        reason = f"{event.code}: {event.message}".encode()[:CLOSE_REASON_MAX_BYTES].decode(errors="ignore")
        with anyio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                if self.ws.application_state is WebSocketState.CONNECTED:
                    await self.ws.send_text(self.protocol.encode(event)[0])  # type: ignore[arg-type]
                    await self.ws.close(code, reason)
            except (WebSocketDisconnect, OSError, RuntimeError):
                pass

    # ---- receive side ----------------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        while True:
            if self.session is None:
                with anyio.move_on_after(START_TIMEOUT_S) as waiting:
                    message = await self.ws.receive()
                if waiting.cancelled_caught:
                    raise NoStart(f"expected a 'start' message within {START_TIMEOUT_S:g} s of connecting, got none")
            else:
                message = await self.ws.receive()
            if message["type"] == "websocket.disconnect":
                return
            now = time.monotonic()
            raw = message.get("bytes")
            data: str | bytes = raw if raw is not None else message.get("text") or ""
            try:
                events = self.protocol.decode(data)
            except ProtocolError as e:
                self._errors += 1
                if self._errors > MAX_PROTOCOL_ERRORS:
                    raise TooManyErrors(f"expected at most {MAX_PROTOCOL_ERRORS} bad messages") from None
                await self._send([ErrorEvent(e.code, str(e))])
                continue
            for event in events:
                await self._apply(self._handle(event, now))

    def _handle(self, event: ClientEvent, now: float) -> list[Output]:
        if isinstance(event, StartSession):
            return self._start(event)
        assert self.session is not None, "the protocol lets nothing but 'start' through before start"
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
                raise Unauthorized(f"expected a valid API key (Bearer header or 'key' in start), got {got}")
            self._authorized = True
        if not self.engine.ready:
            raise NotReady("the model is still loading; expected /readyz to answer 200 before connecting")
        self.engine_session = self.engine.open_session(system_prompt=self.config.system_prompt)
        self.session = Session(self.engine_session.id, event.settings)
        info = self.engine.info
        return [SessionStarted(self.engine_session.id, event.sample_rate_hz, event.output_sample_rate_hz,
                               event.frame_ms, info.model_name, info.demo, event.settings.as_dict())]

    async def _apply(self, outputs: list[Output]) -> None:
        """Carry out a session's outputs in order: engine commands, then events for the client."""
        for out in outputs:
            if isinstance(out, SubmitTurn):
                await self._submit(out)
            elif isinstance(out, CancelTurn):
                self._dropped.add(out.response_id)
                if self.engine_session is not None:
                    # Also when generation had finished: the engine then cuts the last reply's history.
                    self.engine_session.cancel(out.played_ms)
            else:
                await self._send([out])

    async def _submit(self, cmd: SubmitTurn) -> None:
        assert self.engine_session is not None and self.session is not None and self._tg is not None
        try:
            stream = self.engine_session.submit_turn(cmd.audio, cmd.settings, speech_end=cmd.speech_end)
        except TurnRejected as e:
            await self._apply(self.session.on_engine_event(cmd.response_id, TurnError(e.code, str(e)),
                                                           time.monotonic()))
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
                code = e.code if isinstance(e, VoiceAgentError) else "engine_error"
                event = TurnError(code, f"the engine failed on this turn ({type(e).__name__}: {e}); "
                                        "the session continues")
            await self._apply(self.session.on_engine_event(response_id, event, time.monotonic()))
            if isinstance(event, TurnError):
                return

    # ---- send side -------------------------------------------------------------------------------

    async def _send(self, events: list[ServerEvent]) -> None:
        for event in events:
            droppable = event.response_id if isinstance(event, (ResponseAudio, ResponseText)) else None
            if droppable is not None and droppable in self._dropped:
                continue
            for message in self.protocol.encode(event):
                await self._enqueue(_Outgoing(message, droppable))

    async def _enqueue(self, item: _Outgoing) -> None:
        try:
            self.queue.put_nowait(item)
            return
        except asyncio.QueueFull:
            pass
        with anyio.move_on_after(self.config.slow_client_ms / 1000.0) as scope:
            await self.queue.put(item)
        if scope.cancelled_caught:
            raise SlowClient(
                f"expected the client to read its messages, got {self.queue.qsize()} unread for "
                f"{self.config.slow_client_ms} ms"
            )

    async def _send_loop(self) -> None:
        while True:
            item = await self.queue.get()
            if item.droppable is not None and item.droppable in self._dropped:
                continue
            if isinstance(item.message, bytes):
                await self.ws.send_bytes(item.message)
            else:
                await self.ws.send_text(item.message)


# ---- the application ---------------------------------------------------------------------------------


def build_app(config: ServerConfig, engine: Engine) -> Starlette:
    """The Starlette app serving `engine`. Engines with async `start()` / `aclose()` get them called
    at startup / shutdown."""
    static_dir = Path(config.static_dir) if config.static_dir else DEFAULT_STATIC_DIR
    defaults = config.session_defaults()

    async def page(request: Request) -> Response:
        return FileResponse(static_dir / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(request: Request) -> Response:
        i = engine.info
        return JSONResponse({
            "model": i.model_name, "demo": i.demo, "device": i.device, "dtype": i.dtype,
            "voices": list(i.voices),
            "ready": engine.ready, "auth_required": config.api_key is not None,
            "download_command": DOWNLOAD_COMMAND, "settings": defaults.as_dict(),
        })

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready = engine.ready
        return JSONResponse({"status": "ready" if ready else "loading"}, status_code=200 if ready else 503)

    async def websocket(ws: WebSocket) -> None:
        await Connection(ws, engine, config).run()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        start: Any = getattr(engine, "start", None)
        if start is not None:
            await start()
        try:
            yield
        finally:
            stop: Any = getattr(engine, "aclose", None)
            if stop is not None:
                await stop()

    return Starlette(
        routes=[
            Route("/", page),
            Route("/api/info", info),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            WebSocketRoute("/ws", websocket),
            Mount("/static", StaticFiles(directory=static_dir), name="static"),
        ],
        lifespan=lifespan,
    )


def demo_banner(engine: Engine) -> str | None:
    """The console warning when the engine runs the embedded random-weight model, else None."""
    if not engine.info.demo:
        return None
    return (
        "No model weights found: running the embedded tiny random-weight DEMO model "
        f"({engine.info.model_name}); its replies are noise.\n"
        f"Download real weights with: {DOWNLOAD_COMMAND}"
    )


def run_server(config: ServerConfig) -> None:
    """Build the engine (voice_agent.engine.build) and serve it until interrupted."""
    import uvicorn

    from voice_agent.engine.build import build_engine

    logging.basicConfig(level=config.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    make_classifier(config.session_defaults().vad)  # a missing VAD backend fails now, not per connection
    engine = build_engine(*config.engine_options())
    banner = demo_banner(engine)
    if banner:
        print("\n" + "!" * 72 + "\n" + banner + "\n" + "!" * 72 + "\n", flush=True)
    i = engine.info
    print(f"voice-agent: {i.model_name} on {i.device} ({i.dtype}); page at "
          f"http://{config.host}:{config.port}/ (auth {'on' if config.api_key else 'off'})", flush=True)
    uvicorn.run(build_app(config, engine), host=config.host, port=config.port, **uvicorn_options(config))


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """uvicorn settings the server relies on. No permessage-deflate: PCM audio barely compresses, and
    compressing it costs CPU per connection and hides a slow client behind a fast-growing backlog."""
    return {"log_level": config.log_level, "ws_max_size": WS_MAX_MESSAGE_BYTES, "ws_per_message_deflate": False}

