"""The HTTP/WebSocket server: routes, lifespan, the error -> close code mapping, and running uvicorn.

Routes: `/` the bundled page (`static/`), `/static/*` its files, `/api/info` what the page needs before
connecting (model, demo flag, voices, the longest reply a client may ask for, default settings in the
native wire form, whether a key is required), `/healthz` (the process is up), `/readyz` (200 once the
engine has loaded and warmed its model, else 503), `/ws` the native protocol (docs/protocol.md): a `Connection`
(`voice_agent.serve.connection`) with a `NativeProtocol` adapter, `/v1/realtime` the OpenAI Realtime API
(docs/openai-realtime.md): the same connection with an `OpenAIRealtimeProtocol` adapter, `/twilio` a Twilio
media stream (a phone call; also SignalWire and Pivot) with `TwilioProtocol`, checked against the account's
X-Twilio-Signature when `--twilio-auth-token` is set, `/twilio/voice` the TwiML that connects a call to it,
and `/telephony/<carrier>` the other carriers' media streams (docs/telephony.md). `/metrics`
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
from collections.abc import AsyncIterator, Callable, Mapping
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
from voice_agent.serve.protocols.plivo import PlivoProtocol
from voice_agent.serve.protocols.telnyx import TelnyxProtocol
from voice_agent.serve.protocols.twilio import ExotelProtocol, TwilioProtocol
from voice_agent.serve.protocols.vonage import VonageProtocol
from voice_agent.serve.twiml import SIGNATURE_HEADER, connect_stream_twiml, public_stream_url, valid_twilio_signature
from voice_agent.serve.vad import make_classifier

log = logging.getLogger("voice_agent.serve.app")

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

    phone_defaults = dataclasses.replace(defaults, idle_timeout_ms=config.call_silence_s * 1000 or None)
    lead_ms = float(config.telephony_lead_ms)

    async def twilio_stream(ws: WebSocket) -> None:
        token = config.twilio_auth_token
        if token is not None:
            url = public_stream_url(config.public_url, ws.headers, ws.url.path)
            if not valid_twilio_signature(url, {}, ws.headers.get(SIGNATURE_HEADER), token):
                await refuse_unsigned(ws, url)
                return
        await serve(ws, TwilioProtocol(phone_defaults, engine.info, lead_ms=lead_ms))

    async def carrier_stream(ws: WebSocket) -> None:
        name = ws.path_params["carrier"]
        carrier = CARRIERS.get(name)
        if carrier is None:
            shown = name if len(name) <= 40 else name[:40] + "..."
            await ws.send_denial_response(PlainTextResponse(
                f"not_found: expected a carrier among {sorted(CARRIERS)} (Twilio: /twilio), got {shown!r}\n",
                status_code=404))
            return
        await serve(ws, carrier(phone_defaults, engine.info, lead_ms=lead_ms))

    async def twilio_voice(request: Request) -> Response:
        """Twilio's voice webhook: TwiML connecting the call to the media stream at /twilio, with this
        request's `voice`, `instructions` and `silence_ms` (query or form) passed on as stream parameters."""
        form = {k: v for k, v in (await request.form()).items() if isinstance(v, str)}
        token = config.twilio_auth_token
        signed = False
        if token is not None:
            url = public_http_url(config.public_url, request.headers, request.url.path, request.url.query)
            if not valid_twilio_signature(url, form, request.headers.get(SIGNATURE_HEADER), token):
                log.warning("twilio: refused an unsigned or wrongly signed voice webhook for %s", url)
                return PlainTextResponse("unauthorized: expected a valid X-Twilio-Signature\n", status_code=403)
            signed = True
        wanted = {**form, **request.query_params}
        parameters = {name: wanted[name] for name in STREAM_PARAMETERS if wanted.get(name)}
        if config.api_key is not None and signed:  # only Twilio, proven by its signature, learns the key
            parameters["key"] = config.api_key
        stream_url = public_stream_url(config.public_url, request.headers, "/twilio")
        return Response(connect_stream_twiml(stream_url, parameters), media_type="application/xml")

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
            WebSocketRoute("/twilio", twilio_stream),
            Route("/twilio/voice", twilio_voice, methods=["GET", "POST"]),
            WebSocketRoute("/telephony/{carrier:str}", carrier_stream),
            Mount("/static", StaticFiles(directory=static_dir), name="static"),
        ] + ([] if config.metrics_port else [Route("/metrics", metrics_endpoint(metrics, config.api_key))]),
        lifespan=lifespan,
    )
    app.state.metrics = metrics
    return app


STREAM_PARAMETERS = ("voice", "instructions", "silence_ms")  # what /twilio/voice passes on to the stream
# The carriers at /telephony/<name>. Twilio (and SignalWire, Pivot: the same wire) is at /twilio.
CARRIERS: dict[str, Callable[..., WireAdapter]] = {
    "exotel": ExotelProtocol, "telnyx": TelnyxProtocol, "plivo": PlivoProtocol, "vonage": VonageProtocol,
}


async def refuse_unsigned(ws: WebSocket, url: str) -> None:
    """Refuse a media stream without a valid Twilio signature before the upgrade (HTTP 403)."""
    log.warning("twilio: refused an unsigned or wrongly signed media stream for %s", url)
    await ws.send_denial_response(PlainTextResponse("unauthorized: expected a valid X-Twilio-Signature\n",
                                                    status_code=403))


def public_http_url(base_url: str | None, headers: Mapping[str, str], path: str, query: str) -> str:
    """The https:// URL a carrier requested (what Twilio signs): the public URL's form of `path?query`."""
    url = public_stream_url(base_url, headers, path)
    url = "https://" + url.removeprefix("wss://") if url.startswith("wss://") else "http://" + url.removeprefix("ws://")
    return f"{url}?{query}" if query else url


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

