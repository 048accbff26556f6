"""Prometheus metrics of the server, and the per-connection watch that feeds them and writes the session logs.

`Metrics` owns one `CollectorRegistry` per app (so tests can build several apps); docs/operations.md lists
every metric. Where the numbers come from:
- sessions, turns, errors, latencies, chunk gaps, underruns: a `ConnectionMonitor` per WebSocket, which
  the connection tells when the session opens, each turn it submits, each server event it sends, when it
  closes the socket or the client does, and when it ends;
- engine step time and rows per stage: the engine's `on_step` hook (called on the model thread);
- the engine's sessions, queued commands, cache bytes and CUDA memory: `engine.stats()`, and the unsent
  messages of every live connection, both read at scrape time.
An engine without `stats` / `on_step` (a test fake) simply has no engine metrics.

Estimates (the server cannot hear the client's speaker): end of speech -> first audio is measured when
the first audio of the reply is queued for the client, from the end of the user's voiced audio. A chunk
gap is the time between two consecutive audio chunks of one reply being queued. Underruns assume a
player without a jitter buffer that starts with the first chunk and plays in real time: a chunk that
arrives after everything before it would have been played is an underrun, and the player waits for it
(its wait is the underrun's length).

Access: `/metrics` on the main port, behind the API key when one is set (`Authorization: Bearer KEY`,
else 401); with `metrics_port`, on that port only (no key there: keep it on a private network).

Logs (`voice_agent.serve.logs` formats them): `session.opened`, `session.closed` (id, endpoint, peer,
duration, turns, close code, reason), `turn` (outcome and timings), `error.sent` (the first
`LOGGED_ERRORS` errors of each connection; the close line counts them all) and `session.refused` (at
most one line per REFUSAL_LOG_INTERVAL_S, counting the ones held back: anyone can cause one; refusals for
the API key are logged by voice_agent.serve.peers instead). Never audio, text of the conversation, or
key material.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sized
from dataclasses import dataclass
from typing import Any

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.exposition import start_http_server
from prometheus_client.registry import Collector
from starlette.requests import HTTPConnection, Request
from starlette.responses import PlainTextResponse, Response

from voice_agent.engine.api import Engine
from voice_agent.serve.logs import log_event
from voice_agent.serve.peers import Throttle, bearer_key, key_matches
from voice_agent.serve.protocols.events import ErrorEvent, ResponseAudio, ResponseFinished, ServerEvent

log = logging.getLogger("voice_agent.serve.sessions")

OUTCOMES = ("eos", "max_tokens", "cancelled", "error")
STAGES = ("admit", "text", "tts", "vocode")
LATENCY_BUCKETS_S = (0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 10.0, float("inf"))
GAP_BUCKETS_S = (0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, float("inf"))
STEP_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, float("inf"))
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, float("inf"))
DURATION_BUCKETS_S = (1, 10, 30, 60, 120, 300, 600, 1800, 3600, float("inf"))
LOGGED_ERRORS = 10  # error events logged per connection
MESSAGE_LOG_CHARS = 200  # longer error messages are cut in the log (they may echo a client's input)
REFUSAL_LOG_INTERVAL_S = 1.0  # at most one session.refused line per this, per app
AUTH_REFUSALS = ("unauthorized", "auth_cooldown")  # logged by voice_agent.serve.peers


class Metrics:
    """The server's metrics for one app and engine; see the module docstring."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.registry = r = CollectorRegistry()
        self.live: set[ConnectionMonitor] = set()
        self.refusal_log = Throttle(REFUSAL_LOG_INTERVAL_S)
        self.sessions_active = Gauge("voice_agent_sessions_active", "Open sessions", ["endpoint"], registry=r)
        self.sessions_opened = Counter("voice_agent_sessions_opened", "Sessions opened", ["endpoint"], registry=r)
        self.sessions_refused = Counter("voice_agent_sessions_refused", "Connections closed before a session "
                                        "opened, by error code", ["endpoint", "reason"], registry=r)
        self.session_seconds = Histogram("voice_agent_session_duration_seconds", "Session length", ["endpoint"],
                                         buckets=DURATION_BUCKETS_S, registry=r)
        self.turns = Counter("voice_agent_turns", "Turns answered, by outcome", ["endpoint", "outcome"], registry=r)
        self.first_audio = Histogram("voice_agent_first_audio_seconds", "End of user speech to the first reply "
                                     "audio queued for the client", ["endpoint"], buckets=LATENCY_BUCKETS_S,
                                     registry=r)
        self.engine_first_text = Histogram("voice_agent_engine_first_text_seconds", "Turn submitted to the "
                                           "engine's first text token", buckets=LATENCY_BUCKETS_S, registry=r)
        self.engine_first_audio = Histogram("voice_agent_engine_first_audio_seconds", "Turn submitted to the "
                                            "engine's first audio chunk", buckets=LATENCY_BUCKETS_S, registry=r)
        self.chunk_gap = Histogram("voice_agent_audio_chunk_gap_seconds", "Time between consecutive audio chunks "
                                   "of one reply", ["endpoint"], buckets=GAP_BUCKETS_S, registry=r)
        self.underruns = Counter("voice_agent_playback_underruns", "Estimated playback underruns (a real-time "
                                 "player ran dry before the next chunk)", ["endpoint"], registry=r)
        self.underrun_seconds = Counter("voice_agent_playback_underrun_seconds", "Estimated time players "
                                        "waited for audio", ["endpoint"], registry=r)
        self.errors = Counter("voice_agent_errors", "Error events sent to clients, by code", ["endpoint", "code"],
                              registry=r)
        self.speculations = Counter("voice_agent_speculative_turns", "Turns started at a pause candidate, by "
                                    "outcome: confirmed (the pause ended the turn) or dropped (the caller went on)",
                                    ["endpoint", "outcome"], registry=r)
        self.dropped_work = Counter("voice_agent_speculation_dropped_tokens", "Work thrown away with dropped "
                                    "speculative turns: prompt positions they read, text tokens they generated",
                                    ["kind"], registry=r)
        self.step_seconds = Histogram("voice_agent_engine_step_seconds", "Engine step time",
                                      buckets=STEP_BUCKETS_S, registry=r)
        self.step_rows = Histogram("voice_agent_engine_step_rows", "Rows (turns) per batched call, by stage",
                                   ["stage"], buckets=ROW_BUCKETS, registry=r)
        for stage in STAGES:  # listed from the start, at zero
            self.step_rows.labels(stage)
        r.register(_ScrapeTime(self))
        if hasattr(engine, "on_step"):
            engine.on_step = self.stepped

    def stepped(self, seconds: float, rows: Mapping[str, int]) -> None:
        """One engine step (model thread)."""
        self.step_seconds.observe(seconds)
        for stage, n in rows.items():
            if n:
                self.step_rows.labels(stage).observe(n)

    def monitor(self, conn: HTTPConnection) -> ConnectionMonitor:
        """The watch of one new WebSocket."""
        return ConnectionMonitor.of(conn, self)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _ScrapeTime(Collector):
    """Gauges read when scraped: the engine's stats and every live connection's backlog."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def describe(self) -> list[Metric]:
        return []  # nothing is read at registration (the engine may still be loading)

    def collect(self) -> Iterator[Metric]:
        engine = self.metrics.engine
        i = engine.info
        info = InfoMetricFamily("voice_agent_model", "The model served")
        info.add_metric([], {"model": i.model_name, "device": i.device, "dtype": i.dtype, "demo": str(i.demo).lower()})
        yield info
        yield GaugeMetricFamily("voice_agent_ready", "1 once the model is loaded and warmed", value=int(engine.ready))
        backlogs = [len(m.outbox) for m in list(self.metrics.live) if m.outbox is not None]
        yield GaugeMetricFamily("voice_agent_outbox_messages", "Unsent messages, all connections", value=sum(backlogs))
        yield GaugeMetricFamily("voice_agent_outbox_messages_max", "Unsent messages of the most behind connection",
                                value=max(backlogs, default=0))
        stats_of: Callable[[], dict[str, Any]] | None = getattr(engine, "stats", None)
        if stats_of is None:
            return
        stats = stats_of()
        for key, name, doc in (
            ("sessions", "voice_agent_engine_sessions", "Engine session slots in use"),
            ("max_sessions", "voice_agent_engine_session_slots", "Engine session slots"),
            ("commands", "voice_agent_engine_commands_queued", "Commands waiting for the model thread"),
            ("cache_bytes", "voice_agent_engine_cache_bytes", "KV and flow cache bytes of the sessions in use"),
            ("cache_bytes_per_session", "voice_agent_engine_cache_bytes_per_session", "KV and flow cache bytes "
             "one session holds"),
            ("cuda_allocated_bytes", "voice_agent_cuda_memory_allocated_bytes", "CUDA memory torch has allocated"),
            ("cuda_reserved_bytes", "voice_agent_cuda_memory_reserved_bytes", "CUDA memory torch has reserved"),
        ):
            if stats.get(key) is not None:
                yield GaugeMetricFamily(name, doc, value=stats[key])


def metrics_endpoint(metrics: Metrics, api_key: str | None) -> Callable[[Request], Awaitable[Response]]:
    """The `/metrics` route of the main port: behind the key when one is set."""

    async def endpoint(request: Request) -> Response:
        if api_key is not None and not key_matches(bearer_key(request.headers), api_key):
            return PlainTextResponse("expected Authorization: Bearer <API key>\n", status_code=401,
                                     headers={"WWW-Authenticate": "Bearer"})
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return endpoint


def serve_metrics(metrics: Metrics, host: str, port: int) -> Callable[[], None]:
    """Serve the metrics on `host:port` from a thread; returns the function that stops it."""
    httpd, thread = start_http_server(port, addr=host, registry=metrics.registry)
    log_event(log, logging.INFO, "metrics.serving", url=f"http://{host}:{port}/metrics")

    def stop() -> None:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5.0)

    return stop


@dataclass
class _Reply:
    """The playback estimate of the reply in flight."""

    id: str
    speech_end: float  # time.monotonic() at the end of the user's voiced audio
    first_audio: float | None = None  # when its first audio was queued
    last_chunk: float = 0.0
    dry_at: float = 0.0  # when a real-time player would have played everything queued
    longest_gap_s: float = 0.0
    underruns: int = 0


class ConnectionMonitor:
    """Metrics and log lines of one WebSocket connection (see the module docstring). `metrics` None: logs
    only."""

    def __init__(self, endpoint: str, peer: str, metrics: Metrics | None = None) -> None:
        self.endpoint, self.peer, self.metrics = endpoint, peer, metrics
        self.outbox: Sized | None = None  # the connection's unsent messages, for the backlog gauges
        self.session_id: str | None = None
        self.opened_at: float | None = None
        self.turns = self.errors = 0
        self.close_code: int | None = None
        self.reason = ""
        self.failure: str | None = None  # the error code the server closed the connection for
        self._reply: _Reply | None = None
        self._ended = False

    @classmethod
    def of(cls, conn: HTTPConnection, metrics: Metrics | None = None) -> ConnectionMonitor:
        client = getattr(conn, "client", None)
        peer = f"{client.host}:{client.port}" if client is not None else "unknown"
        return cls(getattr(conn, "scope", {}).get("path", "unknown"), peer, metrics)

    def watch(self, outbox: Sized) -> None:
        self.outbox = outbox

    def opened(self, session_id: str) -> None:
        self.session_id, self.opened_at = session_id, time.monotonic()
        if self.metrics is not None:
            self.metrics.live.add(self)
            self.metrics.sessions_opened.labels(self.endpoint).inc()
            self.metrics.sessions_active.labels(self.endpoint).inc()
        log_event(log, logging.INFO, "session.opened", id=session_id, endpoint=self.endpoint, peer=self.peer)

    def submitted(self, response_id: str, speech_end: float) -> None:
        self._reply = _Reply(response_id, speech_end)

    def speculation(self, outcome: str, prompt_tokens: int = 0, text_tokens: int = 0) -> None:
        """A speculative turn was confirmed, or dropped after reading `prompt_tokens` and generating
        `text_tokens`."""
        if self.metrics is not None:
            self.metrics.speculations.labels(self.endpoint, outcome).inc()
            if outcome == "dropped":
                self.metrics.dropped_work.labels("prompt").inc(prompt_tokens)
                self.metrics.dropped_work.labels("text").inc(text_tokens)

    def sent(self, event: ServerEvent, now: float) -> None:
        if isinstance(event, ResponseAudio):
            self._audio(event, now)
        elif isinstance(event, ResponseFinished):
            self._finished(event)
        elif isinstance(event, ErrorEvent):
            self._error(event)

    def left(self, code: int | None) -> None:
        """The client closed the socket (with `code`, if it sent one)."""
        if self.close_code is None:
            self.close_code, self.reason = code, "client closed"

    def closing(self, code: int, event: ErrorEvent) -> None:
        """The server closes the socket with `code`, telling the client `event`."""
        self.close_code, self.failure = code, event.code
        self.reason = f"{event.code}: {_short(event.message)}"
        self._error(event, logged=False)  # the close line says it

    def ended(self) -> None:
        """The connection is over (after `closing`, or the client left); later calls do nothing."""
        if self._ended:
            return
        self._ended = True
        m = self.metrics
        if self.session_id is None or self.opened_at is None:
            if self.failure is None:
                return  # the client left before opening a session
            if m is not None:
                m.sessions_refused.labels(self.endpoint, self.failure).inc()
            held = None if m is None or self.failure in AUTH_REFUSALS else m.refusal_log.allow(time.monotonic())
            if held is not None:
                log_event(log, logging.INFO, "session.refused", endpoint=self.endpoint, peer=self.peer,
                          code=self.close_code, reason=self.reason, held_back=held)
            return
        duration_s = time.monotonic() - self.opened_at
        if m is not None:
            m.live.discard(self)
            m.sessions_active.labels(self.endpoint).dec()
            m.session_seconds.labels(self.endpoint).observe(duration_s)
        log_event(log, logging.INFO, "session.closed", id=self.session_id, endpoint=self.endpoint, peer=self.peer,
                  duration_s=round(duration_s, 3), turns=self.turns, errors=self.errors, code=self.close_code,
                  reason=self.reason or "client left")

    # ---- events ----------------------------------------------------------------------------------

    def _audio(self, event: ResponseAudio, now: float) -> None:
        r = self._reply
        if r is None or r.id != event.response_id:
            return
        m = self.metrics
        if r.first_audio is None:
            r.first_audio = now
            if m is not None:
                m.first_audio.labels(self.endpoint).observe(max(0.0, now - r.speech_end))
        else:
            gap = now - r.last_chunk
            r.longest_gap_s = max(r.longest_gap_s, gap)
            if m is not None:
                m.chunk_gap.labels(self.endpoint).observe(gap)
            if now > r.dry_at:  # the player ran dry and waits for this chunk
                r.underruns += 1
                if m is not None:
                    m.underruns.labels(self.endpoint).inc()
                    m.underrun_seconds.labels(self.endpoint).inc(now - r.dry_at)
        r.dry_at = max(r.dry_at, now) + event.duration_ms / 1000.0
        r.last_chunk = now

    def _finished(self, event: ResponseFinished) -> None:
        self.turns += 1
        outcome = event.reason if event.reason in OUTCOMES else "error"
        t = event.timings
        submitted, first_text, first_audio = t.get("submitted"), t.get("first_text"), t.get("first_audio")
        m = self.metrics
        if m is not None:
            m.turns.labels(self.endpoint, outcome).inc()
            if submitted is not None and first_text is not None:
                m.engine_first_text.observe(max(0.0, first_text - submitted) / 1000.0)
            if submitted is not None and first_audio is not None:
                m.engine_first_audio.observe(max(0.0, first_audio - submitted) / 1000.0)
        r = self._reply if self._reply is not None and self._reply.id == event.response_id else None
        marks = {k if k.endswith("_ms") else f"{k}_ms": v for k, v in t.items()}  # ms after the end of speech
        queued = None if r is None or r.first_audio is None else round(1000.0 * (r.first_audio - r.speech_end), 1)
        log_event(log, logging.INFO, "turn", id=self.session_id, response=event.response_id, outcome=outcome,
                  audio_ms=round(event.audio_ms, 1), **marks, queued_first_audio_ms=queued,
                  longest_gap_ms=None if r is None else round(1000.0 * r.longest_gap_s, 1),
                  underruns=None if r is None else r.underruns)
        if r is not None:
            self._reply = None

    def _error(self, event: ErrorEvent, logged: bool = True) -> None:
        self.errors += 1
        if self.metrics is not None:
            self.metrics.errors.labels(self.endpoint, event.code).inc()
        if logged and self.errors <= LOGGED_ERRORS:
            log_event(log, logging.INFO, "error.sent", id=self.session_id, endpoint=self.endpoint, peer=self.peer,
                      code=event.code, fatal=event.fatal, detail=_short(event.message))


def _short(message: str) -> str:
    return message if len(message) <= MESSAGE_LOG_CHARS else message[:MESSAGE_LOG_CHARS] + "..."
