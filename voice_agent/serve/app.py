"""The HTTP/WebSocket server: routes, lifespan, the error -> close code mapping, and running uvicorn.

Routes: `/` the bundled page (`static/`), `/static/*` its files, `/api/info` what the page needs before
connecting (model, demo flag, voices, the longest reply a client may ask for, default settings in the
native wire form, whether a key is required), `/healthz` (the process is up), `/readyz` (200 once the
engine has loaded and warmed its model, else 503), `/ws` the native protocol (docs/protocol.md): a `Connection`
(`voice_agent.serve.connection`) with a `NativeProtocol` adapter, `/v1/realtime` the OpenAI Realtime API
(docs/openai-realtime.md): the same connection with an `OpenAIRealtimeProtocol` adapter. `/metrics`
(voice_agent.serve.metrics): Prometheus metrics, behind the API key
when one is set, or on `metrics_port` instead.

`close_for` is the one place that maps an exception that ends a connection to a close code and the
fatal error event the client gets before it (`refusal_for`: the HTTP answer when it ends before the
upgrade).

The WebSocket transport is uvicorn's `websockets-sansio` implementation, named in `uvicorn_options` with
everything the server relies on: no compression, messages of at most 4 MiB (larger: closed 1009), and a
keepalive ping every WS_PING_INTERVAL_S that must be answered within WS_PING_TIMEOUT_S (else uvicorn closes
with 1011 "keepalive ping timeout"). uvicorn itself closes a text message that is not UTF-8 with 1007 and
logs a traceback for it; `ClientFaultFilter` turns that into one throttled warning line.
"""

from __future__ import annotations

import dataclasses
import logging
import logging.config
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.websockets import WebSocket

from voice_agent.engine.api import Engine
from voice_agent.engine.files import download_command
from voice_agent.errors import (
    AdmissionError,
    AuthCoolDown,
    IdleTimeout,
    NoStart,
    NotReady,
    SessionEnded,
    SessionTooLong,
    SlowClient,
    TooManyConnections,
    TooManyErrors,
    Unauthorized,
    VoiceAgentError,
    error_code,
)
from voice_agent.serve.config import ServerConfig
from voice_agent.serve.connection import Connection, peer_guard
from voice_agent.serve.logs import logging_config
from voice_agent.serve.metrics import Metrics, metrics_endpoint, serve_metrics
from voice_agent.serve.peers import Throttle
from voice_agent.serve.protocols.adapter import WireAdapter
from voice_agent.serve.protocols.events import ErrorEvent
from voice_agent.serve.protocols.native import NativeProtocol, settings_json
from voice_agent.serve.protocols.openai import BetaInterfaceRefused, OpenAIRealtimeProtocol
from voice_agent.serve.vad import make_classifier

DOWNLOAD_COMMAND = download_command()  # pasteable in the server's working directory (engine/files.py)
DEFAULT_STATIC_DIR = Path(__file__).resolve().parents[2] / "static"
# uvicorn refuses (1009) larger WebSocket messages before we see them: 4 MiB holds the longest audio the model
# takes (30 s) as base64 24 kHz PCM16 in one OpenAI Realtime event (OpenAI allows 15 MiB; more is refused here).
WS_MAX_MESSAGE_BYTES = 4 << 20
WS_PING_INTERVAL_S = 20.0  # uvicorn pings every client this often (its default, stated here)
WS_PING_TIMEOUT_S = 20.0  # and closes it with 1011 when the pong is this late
FAULT_LOG_INTERVAL_S = 10.0  # at most one log line per this for transport-level client faults

CLOSE_NORMAL = 1000
CLOSE_POLICY_VIOLATION = 1008  # no or wrong API key
CLOSE_INTERNAL_ERROR = 1011
CLOSE_TRY_AGAIN_LATER = 1013  # engine full or still loading
CLOSE_SLOW_CLIENT = 4001  # the client did not read its messages
CLOSE_TOO_MANY_ERRORS = 4002  # connection.MAX_PROTOCOL_ERRORS bad messages
CLOSE_NO_START = 4003  # the session did not open in time
CLOSE_IDLE = 4004  # no audio for idle_timeout_s
CLOSE_SESSION_TOO_LONG = 4005  # the session lasted max_session_s

CLOSE_CODES: dict[type[Exception], int] = {
    Unauthorized: CLOSE_POLICY_VIOLATION,
    BetaInterfaceRefused: CLOSE_POLICY_VIOLATION,  # the retired OpenAI Realtime beta interface
    AuthCoolDown: CLOSE_POLICY_VIOLATION,  # refused before the upgrade (HTTP 429), see refusal_for
    AdmissionError: CLOSE_TRY_AGAIN_LATER,
    NotReady: CLOSE_TRY_AGAIN_LATER,
    TooManyConnections: CLOSE_TRY_AGAIN_LATER,
    SlowClient: CLOSE_SLOW_CLIENT,
    TooManyErrors: CLOSE_TOO_MANY_ERRORS,
    NoStart: CLOSE_NO_START,
    IdleTimeout: CLOSE_IDLE,
    SessionTooLong: CLOSE_SESSION_TOO_LONG,
    SessionEnded: CLOSE_NORMAL,  # the client ended it in its protocol (a carrier's stop)
}


def close_for(exc: BaseException) -> tuple[int, ErrorEvent]:
    """Map an exception that ends a connection to (close code, fatal error event for the client)."""
    code = next((c for kind, c in CLOSE_CODES.items() if isinstance(exc, kind)), CLOSE_INTERNAL_ERROR)
    message = str(exc) if isinstance(exc, VoiceAgentError) else "internal server error (see the log)"
    return code, ErrorEvent(error_code(exc, "internal_error"), message, fatal=True)


def refusal_for(exc: BaseException) -> Response | None:
    """The HTTP answer refusing a handshake for `exc` (None: uvicorn's plain 403): 429 with Retry-After
    for a peer in its auth cool-down."""
    if isinstance(exc, AuthCoolDown):
        return PlainTextResponse(f"{exc.code}: {exc}\n", status_code=429,
                                 headers={"Retry-After": str(max(1, math.ceil(exc.retry_after_s)))})
    return None


class ClientFaultFilter(logging.Filter):
    """On uvicorn's error logger: the traceback uvicorn logs for each text message that is not UTF-8 (it
    then closes the connection with 1007) becomes one warning line per FAULT_LOG_INTERVAL_S, with a count.
    Anyone can send such a message, so it must not flood the log."""

    MESSAGE = "Invalid UTF-8 sequence received from client."

    def __init__(self) -> None:
        super().__init__()
        self._throttle = Throttle(FAULT_LOG_INTERVAL_S)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.getMessage() != self.MESSAGE:
            return True
        held = self._throttle.allow(record.created)
        if held is None:
            return False
        record.msg, record.args = ("a client sent a text message that is not UTF-8; closed with 1007 "
                                   "(%d more since the last such line)", (held,))
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        record.exc_info, record.exc_text = None, None
        return True

    @classmethod
    def install(cls) -> None:
        """Add one to uvicorn's error logger (once per process)."""
        logger = logging.getLogger("uvicorn.error")
        if not any(isinstance(f, cls) for f in logger.filters):
            logger.addFilter(cls())


def build_app(config: ServerConfig, engine: Engine) -> Starlette:
    """The Starlette app serving `engine`. Engines with async `start()` / `aclose()` get them called
    at startup / shutdown."""
    static_dir = Path(config.static_dir) if config.static_dir else DEFAULT_STATIC_DIR
    defaults = config.session_defaults()
    metrics = Metrics(engine)
    peers = peer_guard(config)

    async def page(request: Request) -> Response:
        return FileResponse(static_dir / "index.html", headers={"Cache-Control": "no-cache"})

    async def info(request: Request) -> Response:
        i = engine.info
        return JSONResponse({
            "model": i.model_name, "demo": i.demo, "device": i.device, "dtype": i.dtype,
            "voices": list(i.voices), "max_new_tokens": i.max_new_tokens,
            "ready": engine.ready, "auth_required": config.api_key is not None,
            "download_command": DOWNLOAD_COMMAND, "settings": settings_json(defaults),
        })

    async def healthz(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    async def readyz(request: Request) -> Response:
        ready = engine.ready
        return JSONResponse({"status": "ready" if ready else "loading"}, status_code=200 if ready else 503)

    async def serve(ws: WebSocket, adapter: WireAdapter) -> None:
        connection = Connection(ws, adapter, engine, config, monitor=metrics.monitor(ws), peers=peers)
        failure = await connection.run()
        if failure is not None:
            await connection.close(*close_for(failure), refusal=refusal_for(failure))

    async def websocket(ws: WebSocket) -> None:
        await serve(ws, NativeProtocol(defaults, engine.info))

    async def realtime(ws: WebSocket) -> None:
        # OpenAI's default: no input transcription until the client asks for it.
        openai_defaults = dataclasses.replace(defaults, transcribe=False)
        await serve(ws, OpenAIRealtimeProtocol(openai_defaults, engine.info, headers=ws.headers,
                                               query=ws.query_params))

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        ClientFaultFilter.install()  # after uvicorn has configured its loggers
        start: Any = getattr(engine, "start", None)
        if start is not None:
            await start()
        stop_metrics = serve_metrics(metrics, config.host, config.metrics_port) if config.metrics_port else None
        try:
            yield
        finally:
            if stop_metrics is not None:
                stop_metrics()
            stop: Any = getattr(engine, "aclose", None)
            if stop is not None:
                await stop()

    app = Starlette(
        routes=[
            Route("/", page),
            Route("/api/info", info),
            Route("/healthz", healthz),
            Route("/readyz", readyz),
            WebSocketRoute("/ws", websocket),
            WebSocketRoute("/v1/realtime", realtime),
            Mount("/static", StaticFiles(directory=static_dir), name="static"),
        ] + ([] if config.metrics_port else [Route("/metrics", metrics_endpoint(metrics, config.api_key))]),
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    return app


def demo_banner(engine: Engine) -> str | None:
    """The console warning when the engine runs the embedded random-weight model, else None."""
    if not engine.info.demo:
        return None
    return (
        "No model weights found in models/: running the embedded tiny random-weight DEMO model "
        f"({engine.info.model_name}),\nwhich answers everything with one short sentence and a soft hiss.\n"
        f"Download real weights into models/ by running, in this directory:\n    {DOWNLOAD_COMMAND}\n"
        "then restart the server."
    )


def run_server(config: ServerConfig) -> None:
    """Build the engine (voice_agent.engine.build) and serve it until interrupted."""
    import uvicorn

    from voice_agent.engine.build import build_engine

    log_config = logging_config(config)
    logging.config.dictConfig(log_config)
    make_classifier(config.session_defaults().vad)  # a missing VAD backend fails now, not per connection
    engine = build_engine(*config.engine_options())
    banner = demo_banner(engine)
    if banner:
        print("\n" + "!" * 72 + "\n" + banner + "\n" + "!" * 72 + "\n", flush=True)
    i = engine.info
    print(f"voice-agent: {i.model_name} on {i.device} ({i.dtype}); page at "
          f"http://{config.host}:{config.port}/ (auth {'on' if config.api_key else 'off'})", flush=True)
    uvicorn.run(build_app(config, engine), host=config.host, port=config.port, log_config=log_config,
                **uvicorn_options(config))


def uvicorn_options(config: ServerConfig) -> dict[str, Any]:
    """uvicorn settings the server relies on (module docstring). No permessage-deflate: PCM audio barely
    compresses, and compressing it costs CPU per connection and hides a slow client behind a fast-growing
    backlog. The implementation is named so that an installed package cannot switch it (ClientFaultFilter
    knows what this one logs)."""
    return {"log_level": config.log_level, "ws": "websockets-sansio", "ws_max_size": WS_MAX_MESSAGE_BYTES,
            "ws_per_message_deflate": False, "ws_ping_interval": WS_PING_INTERVAL_S,
            "ws_ping_timeout": WS_PING_TIMEOUT_S}

