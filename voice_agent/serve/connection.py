"""One WebSocket client: a `Session` behind a `WireAdapter`, in one task group per socket.

The task group holds:
- the receive loop: wire message -> `adapter.decode` -> `Session` -> engine commands (`SubmitTurn`,
  `CancelTurn`) and server events. It awaits nothing but the socket, so VAD, end of turn and barge-in
  keep up with the microphone however slowly the client reads;
- one pump per response, reading the engine's event stream into the `Session`; it never waits on the
  client either (an engine failure in a turn becomes an `error` event for this client only);
- the send loop, writing the `Outbox` to the socket at the client's pace;
- for an adapter that asks for pacing (`pace_lead_ms`, a phone carrier), the pacer: every message goes
  through a `PacedQueue` (voice_agent.serve.pacing) that releases reply audio to the outbox in real time,
  at most the lead ahead of playback; an interrupted response's unsent audio leaves it too;
- the slow-client watch: a client that stays behind for `slow_client_ms` is closed with `SlowClient`;
- once the session is open, the session watch: no audio for `idle_timeout_s` ends it (`IdleTimeout`), and
  so does reaching `max_session_s` (`SessionTooLong`).

Every server event goes `adapter.encode` -> `Outbox.put`, which never waits; `voice_agent.serve.outbox`
says how the backlog stays bounded (at most twice `send_queue_messages` messages; beyond that the
client is closed at once). At a cancel the interrupted response's unsent audio and text leave the
outbox (unless it had finished generating: its `response.done`, queued behind them, counts them), and the
`Session` emits nothing more of it, so no set of cancelled ids is kept. The send loop tells the `Session`
which reply audio it hands to the socket (`on_audio_sent`), so what the client can have played is known.

Everything about the wire format is the adapter's (`voice_agent.serve.protocols.adapter`): decoding,
encoding, how the session opens and within what time, where a key may come from besides the Bearer
header, and how the fatal error looks.

Ending: `run()` returns the exception that ended the connection (None when the client left); the caller
maps it to a close code (`voice_agent.serve.app.close_for`, the one place that does) and calls
`close(code, event)`: before the upgrade that refuses it (HTTP 403); after it, the adapter's fatal error
message, then the close frame. The engine session is given back first, so a client slow to close holds
no model memory.

Watching: a `ConnectionMonitor` (`voice_agent.serve.metrics`; one that only logs unless given one with
metrics) hears of the session's opening, each turn submitted, each server event sent, and the close.

Auth (when `api_key` is set): `Authorization: Bearer KEY`, or the adapter's `handshake_key`, on the
handshake (a wrong one is refused before the upgrade); else `StartSession.key`. Keys are compared in
constant time. Per peer (`voice_agent.serve.peers.PeerGuard`, shared by the app's connections): failed
attempts lead to a cool-down, during which the handshake is refused (`AuthCoolDown`), and a peer holding
`max_connections_per_peer` connections gets no more (`TooManyConnections`, after the upgrade so the
client learns why).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator

import anyio
import anyio.abc
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect, WebSocketState

from voice_agent.engine.api import Engine, EngineEvent, EngineSession, ResponseDone, TranscriptEvent, TurnError
from voice_agent.errors import (
    AuthCoolDown,
    IdleTimeout,
    NoStart,
    NotReady,
    ProtocolError,
    SessionEnded,
    SessionTooLong,
    SlowClient,
    TooManyConnections,
    TooManyErrors,
    TurnRejected,
    Unauthorized,
    VoiceAgentError,
    error_code,
)
from voice_agent.serve.config import ServerConfig
from voice_agent.serve.metrics import ConnectionMonitor
from voice_agent.serve.outbox import Outbox
from voice_agent.serve.pacing import PacedQueue
from voice_agent.serve.peers import PeerGuard, bearer_key, key_matches
from voice_agent.serve.protocols.adapter import WireAdapter
from voice_agent.serve.protocols.events import (
    AudioFrame,
    CancelResponse,
    ClearInput,
    ClientEvent,
    CommitInput,
    CreateItem,
    CreateResponse,
    DeleteItem,
    Dtmf,
    EndSession,
    ErrorEvent,
    FieldRejected,
    InterruptRequest,
    PlaybackProgress,
    ResponseAudio,
    ResponseText,
    RetrieveItem,
    ServerEvent,
    SessionStarted,
    StartSession,
    TruncateItem,
    UpdateSettings,
)
from voice_agent.serve.session import (
    CancelTurn,
    ConfirmTurn,
    DiscardTurn,
    EditHistory,
    Output,
    Session,
    StartResponse,
    SubmitTurn,
)

log = logging.getLogger("voice_agent.serve.connection")

CLOSE_REASON_MAX_BYTES = 123  # RFC 6455 limit for a close frame's reason
CLOSE_TIMEOUT_S = 5.0  # how long a closing connection lingers to tell its client why
MAX_PROTOCOL_ERRORS = 100  # bad messages tolerated on one connection


class Connection:
    """One WebSocket client: see the module docstring."""

    def __init__(self, ws: WebSocket, adapter: WireAdapter, engine: Engine, config: ServerConfig,
                 monitor: ConnectionMonitor | None = None, peers: PeerGuard | None = None) -> None:
        """`peers`: the app's per-peer limits (None: this connection's own, so only per connection)."""
        self.ws, self.adapter, self.engine, self.config = ws, adapter, engine, config
        self.peers = peers if peers is not None else peer_guard(config)
        self.peer = ws.client.host if ws.client is not None else "unknown"
        self.outbox = Outbox(config.send_queue_messages)
        lead = adapter.pace_lead_ms
        self.paced = PacedQueue(self.outbox, lead) if lead is not None else None
        self.monitor = monitor if monitor is not None else ConnectionMonitor.of(ws)
        self.monitor.watch(self.outbox)
        self.session: Session | None = None
        self.engine_session: EngineSession | None = None
        self._authorized = config.api_key is None
        self._errors = 0
        self._tg: anyio.abc.TaskGroup | None = None
        self._last_audio = 0.0  # when the session last received audio (monotonic s)
        self._audio_mark: tuple[str, float] | None = None  # reply audio the next queued message completes
        self._transcripts: asyncio.Queue[TranscriptEvent] = asyncio.Queue()  # from the engine, one per item

    async def run(self) -> Exception | None:
        """Serve the client until it leaves (None) or something ends the connection (that exception)."""
        refused = self.peers.refused_for(self.peer, time.monotonic())
        if refused is not None:
            n, window = self.config.auth_max_failures, self.config.auth_cooldown_s
            return AuthCoolDown(f"expected fewer than {n} failed API-key attempts from one address within {window} "
                                f"s, got {n}; try again in {math.ceil(refused)} s", refused)
        if self.config.api_key is not None:
            key = bearer_key(self.ws.headers)
            if key is None:
                key = self.adapter.handshake_key(self.ws.headers, self.ws.query_params)
            if key is not None:
                if not self._check_key(key):
                    return Unauthorized("expected a valid API key on the handshake, got a wrong one")
        await self.ws.accept(subprotocol=self.adapter.subprotocol)
        failure: Exception | None = None
        counted = self.peers.open(self.peer, time.monotonic())
        try:
            if not counted:
                raise TooManyConnections(f"expected at most {self.config.max_connections_per_peer} connections "
                                         "from one address, got one more")
            async with anyio.create_task_group() as tg:
                self._tg = tg
                tg.start_soon(self._send_loop)
                if self.paced is not None:
                    tg.start_soon(self.paced.run)
                tg.start_soon(self._watch_client)
                tg.start_soon(self._transcript_loop)
                await self._receive_loop()
                tg.cancel_scope.cancel()
        except Exception as group:
            exc = _leaf(group)
            if not _is_disconnect(exc):
                failure = exc if isinstance(exc, Exception) else group
                if not isinstance(exc, VoiceAgentError):
                    log.error("connection failed", exc_info=exc)
        finally:
            if counted:
                self.peers.close(self.peer, time.monotonic())
            await self._release()
            if failure is None:
                self.monitor.ended()  # else when close() has run
        return failure

    async def close(self, code: int, event: ErrorEvent, refusal: Response | None = None) -> None:
        """End the connection with close code `code`, telling the client `event` first if it can. Before
        the upgrade the handshake is refused instead: with `refusal`, else HTTP 403."""
        self.monitor.closing(code, event)
        reason = f"{event.code}: {event.message}".encode()[:CLOSE_REASON_MAX_BYTES].decode(errors="ignore")
        with anyio.move_on_after(CLOSE_TIMEOUT_S):
            try:
                if self.ws.application_state is WebSocketState.CONNECTING and refusal is not None:
                    await self.ws.send_denial_response(refusal)
                elif self.ws.application_state is WebSocketState.CONNECTING:
                    await self.ws.close(code)  # before the upgrade: refused with HTTP 403
                elif self.ws.application_state is WebSocketState.CONNECTED:
                    for message in self.adapter.encode(event):
                        await self._write(message)
                    await self.ws.close(code, reason)
            except (WebSocketDisconnect, OSError, RuntimeError):
                pass
        self.monitor.ended()

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
                self.monitor.left(message.get("code"))
                return
            now = time.monotonic()
            raw = message.get("bytes")
            data: str | bytes = raw if raw is not None else message.get("text") or ""
            try:
                events = self.adapter.decode(data)
            except ProtocolError as e:
                if e.fatal:
                    raise
                self._send(self._client_error(error_code(e), str(e), getattr(e, "event_id", None),
                                              getattr(e, "param", None)))
                continue
            self._apply_events(events, now)

    def _client_error(self, code: str, message: str, event_id: str | None = None,
                      param: str | None = None) -> ErrorEvent:
        """A client's mistake, counted: too many end the connection."""
        self._errors += 1
        if self._errors > MAX_PROTOCOL_ERRORS:
            raise TooManyErrors(f"expected at most {MAX_PROTOCOL_ERRORS} bad messages")
        return ErrorEvent(code, message, event_id=event_id, param=param)

    def _apply_events(self, events: list[ClientEvent], now: float) -> None:
        for event in events:
            self._apply(self._handle(event, now))

    def _handle(self, event: ClientEvent, now: float) -> list[Output]:
        if isinstance(event, StartSession):
            return self._start(event)
        if isinstance(event, FieldRejected):
            return [self._client_error(event.code, event.message, event.event_id, event.param)]
        session = self.session
        assert session is not None, "the adapter lets nothing but the session's opening through first"
        if isinstance(event, AudioFrame):
            self._last_audio = now
            return session.on_audio(event.pcm, now)
        if isinstance(event, PlaybackProgress):
            return session.on_playback(event.response_id, event.played_ms, now)
        if isinstance(event, InterruptRequest):
            return session.on_interrupt_request(event.played_ms, now)
        if isinstance(event, UpdateSettings):
            return session.update_settings(event.settings)
        if isinstance(event, CommitInput):
            return session.on_commit(now, event.event_id)
        if isinstance(event, ClearInput):
            return session.on_clear(event.event_id)
        if isinstance(event, CreateItem):
            return session.on_create_item(event)
        if isinstance(event, DeleteItem):
            return session.on_delete_item(event.item_id, event.event_id)
        if isinstance(event, RetrieveItem):
            return session.on_retrieve_item(event.item_id, event.event_id)
        if isinstance(event, TruncateItem):
            return session.on_truncate_item(event, now)
        if isinstance(event, CreateResponse):
            return session.on_create_response(event, now)
        if isinstance(event, CancelResponse):
            return session.on_cancel_response(event.response_id, now, event.event_id)
        if isinstance(event, Dtmf):
            log.info("dtmf session=%s digit=%s", session.id, event.digit)
            return session.on_dtmf(event.digit)
        if isinstance(event, EndSession):
            raise SessionEnded(f"the client ended the session ({event.reason or 'no reason given'})")
        raise TypeError(f"expected a client event, got {type(event).__name__}")

    def _start(self, event: StartSession) -> list[Output]:
        if not self._authorized:
            if event.key is None or not self._check_key(event.key):
                got = "no key" if event.key is None else "a wrong key"
                raise Unauthorized(f"expected a valid API key, got {got}")
        if not self.engine.ready:
            raise NotReady("the model is still loading; expected /readyz to answer 200 before connecting")
        prompt = event.settings.instructions if event.settings.instructions is not None else self.config.system_prompt
        self.engine_session = self.engine.open_session(system_prompt=prompt, on_transcript=self._on_transcript)
        self.session = Session(self.engine_session.id, event.settings,
                               conversation_events=self.adapter.conversation_events)
        self._last_audio = time.monotonic()
        assert self._tg is not None
        self._tg.start_soon(self._watch_session, self._last_audio)
        self.monitor.opened(self.engine_session.id)
        info = self.engine.info
        return [SessionStarted(self.engine_session.id, event.sample_rate_hz, event.output_sample_rate_hz,
                               event.frame_ms, info.model_name, info.demo, event.settings)]

    def _on_transcript(self, event: TranscriptEvent) -> None:
        """A user transcript from the engine (a callback on the loop): handed to the task group's transcript
        task, so what it raises (a slow client's full outbox) ends the connection like anything else."""
        self._transcripts.put_nowait(event)

    async def _transcript_loop(self) -> None:
        while True:
            event = await self._transcripts.get()
            if self.session is not None:
                self._apply(self.session.on_transcript(event))

    def _apply(self, outputs: list[Output]) -> None:
        """Carry out a session's outputs in order: engine commands, then events for the client."""
        for out in outputs:
            if isinstance(out, SubmitTurn):
                self._submit(out)
            elif isinstance(out, StartResponse):
                self._respond(out)
            elif isinstance(out, ConfirmTurn):
                self.monitor.speculation("confirmed")
                self.monitor.submitted(out.response_id, out.speech_end)  # what the client waits, from now on
                if self.engine_session is not None:
                    self.engine_session.confirm()
            elif isinstance(out, DiscardTurn):
                self.outbox.drop(out.response_id)  # nothing of it was queued: its events were held
                if self.engine_session is not None:
                    self.engine_session.discard()
            elif isinstance(out, EditHistory):
                self._edit(out)
            elif isinstance(out, CancelTurn):
                if out.generating:  # else its response.done is queued behind its audio and counts it
                    self.outbox.drop(out.response_id)
                if self.paced is not None:  # the far end flushes what it queued (the adapter's clear)
                    self.paced.drop(out.response_id)
                if self.engine_session is not None:
                    # Also when generation had finished: the engine then cuts the last reply's history.
                    self.engine_session.cancel(out.played_ms)
            else:
                self._send(out)

    def _submit(self, cmd: SubmitTurn) -> None:
        assert self.engine_session is not None and self.session is not None and self._tg is not None
        self.monitor.submitted(cmd.response_id, cmd.speech_end)
        try:
            stream = self.engine_session.submit_turn(
                cmd.audio, cmd.settings, speech_end=cmd.speech_end, item_id=cmd.user_item or None,
                reply_id=cmd.reply_item or None, transcribe=cmd.transcribe, speculative=cmd.speculative)
        except TurnRejected as e:
            error = TurnError(error_code(e), str(e))
            self._apply(self.session.on_engine_event(cmd.response_id, error, time.monotonic()))
            return
        self._tg.start_soon(self._pump, cmd.response_id, stream)

    def _respond(self, cmd: StartResponse) -> None:
        assert self.engine_session is not None and self.session is not None and self._tg is not None
        self.monitor.submitted(cmd.response_id, cmd.speech_end)
        try:
            stream = self.engine_session.respond(cmd.settings, item_id=cmd.reply_item, instructions=cmd.instructions,
                                                 keep=cmd.keep, speech_end=cmd.speech_end)
        except (TurnRejected, ValueError) as e:
            error = TurnError(error_code(e, "turn_rejected"), str(e))
            self._apply(self.session.on_engine_event(cmd.response_id, error, time.monotonic()))
            return
        self._tg.start_soon(self._pump, cmd.response_id, stream)

    def _edit(self, cmd: EditHistory) -> None:
        """A change to the engine's history; one it refuses (say, audio it cannot take) is the client's error."""
        es = self.engine_session
        assert es is not None
        try:
            if cmd.op == "add":
                assert cmd.item is not None
                es.add_item(cmd.item, after=cmd.after)
            elif cmd.op == "delete":
                es.delete_item(cmd.item_id)
            elif cmd.op == "truncate":
                es.truncate_item(cmd.item_id, cmd.audio_ms)
            else:
                es.set_instructions(cmd.text)
        except (TurnRejected, ValueError) as e:
            self._send(self._client_error(error_code(e, "bad_field"), str(e)))

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
            if isinstance(event, ResponseDone) and event.reason == "discarded":
                self.monitor.speculation("dropped", event.input_tokens, event.output_tokens)
            self._apply(self.session.on_engine_event(response_id, event, time.monotonic()))
            if isinstance(event, TurnError):
                return

    # ---- send side -------------------------------------------------------------------------------

    def _send(self, event: ServerEvent) -> None:
        self.monitor.sent(event, time.monotonic())
        response_id = event.response_id if isinstance(event, (ResponseAudio, ResponseText)) else None
        if isinstance(event, ResponseAudio):  # carried by the last message of this event (or the next one)
            self._audio_mark = (event.response_id, event.start_ms + event.duration_ms)
        messages = self.adapter.encode(event)
        for i, message in enumerate(messages):
            mark = self._audio_mark if i == len(messages) - 1 else None
            if self.paced is not None:
                self.paced.put(message, response_id, mark, self.adapter.audio_ms(message))
            else:
                self.outbox.put(message, response_id, mark)
            if mark is not None:
                self._audio_mark = None

    async def _send_loop(self) -> None:
        while True:
            out = await self.outbox.get()
            if out.audio is not None and self.session is not None:
                self.session.on_audio_sent(*out.audio, time.monotonic())
            await self._write(out.data)

    async def _watch_client(self) -> None:
        await self.outbox.overdue(self.config.slow_client_ms / 1000.0)
        raise SlowClient(f"expected the client to read its messages, got {len(self.outbox)} unread for "
                         f"{self.config.slow_client_ms} ms")

    async def _watch_session(self, opened: float) -> None:
        """End a session that received no audio for `idle_timeout_s`, or that lasted `max_session_s` (each
        0: no such limit)."""
        idle_s, longest_s = self.config.idle_timeout_s, self.config.max_session_s
        while idle_s or longest_s:
            now = time.monotonic()
            if idle_s and now >= self._last_audio + idle_s:
                raise IdleTimeout(f"expected audio at least every {idle_s} s, got none for "
                                  f"{now - self._last_audio:.0f} s")
            if longest_s and now >= opened + longest_s:
                raise SessionTooLong(f"expected a session to last at most {longest_s} s, got one that long; "
                                     "open a new one to go on")
            deadlines = ([self._last_audio + idle_s] if idle_s else []) + ([opened + longest_s] if longest_s else [])
            await anyio.sleep(max(0.0, min(deadlines) - now))

    def _check_key(self, key: str) -> bool:
        """Whether `key` is the API key; a wrong one counts against this peer."""
        assert self.config.api_key is not None
        if key_matches(key, self.config.api_key):
            self._authorized = True
            self.peers.auth_succeeded(self.peer)
            return True
        self.peers.auth_failed(self.peer, time.monotonic())
        return False

    async def _write(self, message: str | bytes) -> None:
        """Send one message. A socket already closed under us (uvicorn answers a client's bad frame or
        close frame itself, and then refuses sends with RuntimeError) is a disconnect, not a fault."""
        try:
            if isinstance(message, bytes):
                await self.ws.send_bytes(message)
            else:
                await self.ws.send_text(message)
        except RuntimeError as e:
            raise WebSocketDisconnect(CLOSED_UNDER_US, f"the socket closed before a send: {e}") from None


def peer_guard(config: ServerConfig) -> PeerGuard:
    """The per-peer limits `config` asks for (one per app, shared by its connections)."""
    return PeerGuard(config.max_connections_per_peer, config.auth_max_failures, config.auth_cooldown_s)


def _leaf(exc: BaseException) -> BaseException:
    """The first non-cancellation exception inside (nested) exception groups."""
    inner = getattr(exc, "exceptions", None)
    if not inner:
        return exc
    leaves = [_leaf(e) for e in inner]
    real = [e for e in leaves if not isinstance(e, asyncio.CancelledError)]
    return (real or leaves)[0]


CLOSED_UNDER_US = 1006  # the code a socket closed without our close frame reports (RFC 6455)


def _is_disconnect(exc: BaseException) -> bool:
    return isinstance(exc, (WebSocketDisconnect, OSError))

