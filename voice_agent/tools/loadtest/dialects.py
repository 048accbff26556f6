"""One small load-test client per wire protocol, over `websockets`, with one interface for the caller.

Each client connects (with the API key the protocol's way), sends one 20 ms frame of 16 kHz float audio at
a time in its wire format, and turns the server's messages into `Heard` events on the caller's monotonic
clock. The translation, `decode(message, t)`, is Sans-I/O and table-tested; only `connect`, `send_frame`,
`events` and `close` touch the socket.

- native (/ws): key in `start.key`; up binary PCM16 16 kHz; down binary PCM16 24 kHz.
- openai (/v1/realtime): key as `Authorization: Bearer`; up `input_audio_buffer.append` (base64 PCM16
  24 kHz); down `response.output_audio.delta`.
- twilio (/twilio): key in `start.customParameters.key`; `media` (base64 mu-law 8 kHz) both ways.

What each server message becomes (native / openai / twilio):

- SPEECH_STARTED, SPEECH_STOPPED: `speech.started`, `speech.stopped` with `turn: true` /
  `input_audio_buffer.speech_started`, `.speech_stopped` / nothing (Twilio's wire has none).
- REPLY_STARTED: `response.started` / `response.created` / the first `media` while no reply plays.
- TEXT: `text.delta` / `response.output_audio_transcript.delta`, `response.output_text.delta` / nothing.
- AUDIO: a binary message / `response.output_audio.delta` / `media`.
- REPLY_DONE: `response.done` (with its `timings`) / `response.done` / inferred once no `media` came for
  TWILIO_QUIET_S, at the last one's time (the wire has no end-of-reply message).
- INTERRUPTED: `interrupted` / `response.done` with status `cancelled` / `clear`.
- ERROR: `error` / `error`, `response.done` with status `failed` / nothing (the server logs and closes).
- CLOSED: the socket closed (the last event of every connection).

Deviations a reader should know: native audio between `interrupted` and the next `response.started` is
dropped, as the protocol tells clients to. Twilio's far end is simulated as Twilio plays: each reply
starts `jitter_ms` after its first frame, and each `mark` is echoed once the audio before it has played
(all pending marks at once on `clear`).
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Literal
from urllib.parse import urlsplit, urlunsplit

import numpy as np

from voice_agent.audio import (
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    PCM16_BYTES,
    Resampler,
    float_to_pcm16,
    float_to_ulaw,
)

Protocol = Literal["native", "openai", "twilio"]
PROTOCOLS: tuple[Protocol, ...] = ("native", "openai", "twilio")
PATHS: dict[Protocol, str] = {"native": "/ws", "openai": "/v1/realtime", "twilio": "/twilio"}

FRAME_MS = 20  # one microphone frame
FRAME_SAMPLES = INPUT_SAMPLE_RATE * FRAME_MS // 1000  # 320 at 16 kHz
OPENAI_RATE_HZ = OUTPUT_SAMPLE_RATE  # GA audio/pcm: 24 kHz both ways
TWILIO_RATE_HZ = 8000  # mu-law 8 kHz, one byte per sample
TWILIO_BYTES_PER_MS = TWILIO_RATE_HZ // 1000  # 8
TWILIO_QUIET_S = 2.0  # no media this long: the reply is over (Twilio's wire has no end-of-reply message)
OPEN_TIMEOUT_S = 15.0  # handshake, and the native / openai session's first message
CLOSE_TIMEOUT_S = 5.0  # the server's close after ours (or after Twilio's `stop`)
MARK_TICK_S = 0.005  # the simulated Twilio far end acts at most this late


class Kind(Enum):
    SPEECH_STARTED = "speech_started"
    SPEECH_STOPPED = "speech_stopped"
    REPLY_STARTED = "reply_started"
    TEXT = "text"
    AUDIO = "audio"
    REPLY_DONE = "reply_done"
    INTERRUPTED = "interrupted"
    ERROR = "error"
    CLOSED = "closed"


@dataclass(frozen=True)
class Heard:
    """One normalized server event, at `t` (time.monotonic() at arrival)."""

    kind: Kind
    t: float
    response_id: str | None = None
    audio_ms: float = 0.0  # AUDIO: the duration of the audio received
    text: str = ""  # TEXT: the delta; ERROR / CLOSED: what went wrong
    cancelled: bool = False  # REPLY_DONE: the reply was cut off
    timings: dict[str, float | None] = field(default_factory=dict)  # REPLY_DONE: the server's own record
    fatal: bool = False  # ERROR: the server closes next


class CallFailed(Exception):
    """The connection could not be opened or the session did not start."""


def endpoint_url(url: str, protocol: Protocol) -> str:
    """`url` as the WebSocket URL of `protocol`'s endpoint: http(s) becomes ws(s), and a URL without a
    path gets the protocol's path (/ws, /v1/realtime, /twilio); a URL with a path is used as it is."""
    parts = urlsplit(url)
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    if scheme not in ("ws", "wss") or not parts.netloc:
        raise ValueError(f"expected a ws://, wss://, http:// or https:// URL with a host, got {url!r}")
    path = parts.path if parts.path not in ("", "/") else PATHS[protocol]
    query = parts.query
    if protocol == "openai" and "model=" not in query:
        query = f"{query}&model=voice-agent" if query else "model=voice-agent"
    return urlunsplit((scheme, parts.netloc, path, query, ""))


class Client:
    """One connection. Subclasses spell the wire: `_open`, `encode_frame`, `decode`."""

    protocol: Protocol

    def __init__(self, url: str, *, key: str | None, jitter_ms: float) -> None:
        self.url, self.key, self.jitter_ms = endpoint_url(url, self.protocol), key, jitter_ms
        self.ws: Any = None
        self.closing = False  # we are hanging up: a close from now on is the expected one

    async def connect(self) -> None:
        """Open the socket and start the session; CallFailed (with the reason) when it cannot."""
        from websockets.asyncio.client import connect
        from websockets.exceptions import InvalidHandshake, WebSocketException

        try:
            self.ws = await connect(self.url, additional_headers=self._headers(), open_timeout=OPEN_TIMEOUT_S,
                                    close_timeout=CLOSE_TIMEOUT_S, max_size=None, compression=None)
            await asyncio.wait_for(self._open(), OPEN_TIMEOUT_S)
        except CallFailed:
            await self._abort()
            raise
        except (OSError, ValueError, asyncio.TimeoutError, InvalidHandshake, WebSocketException) as e:
            await self._abort()
            raise CallFailed(f"connect {self.url}: {type(e).__name__}: {e}") from e

    async def send_frame(self, frame: np.ndarray) -> None:
        """One microphone frame: (FRAME_SAMPLES,) float32 at 16 kHz."""
        assert frame.shape == (FRAME_SAMPLES,), f"expected ({FRAME_SAMPLES},) samples, got {frame.shape}"
        for message in self.encode_frame(frame):
            await self.ws.send(message)

    async def events(self) -> AsyncIterator[Heard]:
        """The server's events until the socket closes; the last one is CLOSED."""
        from websockets.exceptions import ConnectionClosed

        try:
            async for message in self.ws:
                for heard in self.decode(message, time.monotonic()):
                    yield heard
        except ConnectionClosed:
            pass
        yield Heard(Kind.CLOSED, time.monotonic(), text=self._close_reason())

    async def close(self) -> None:
        """Hang up the protocol's way and wait (bounded) for the server's close."""
        self.closing = True
        if self.ws is None:
            return
        try:
            await self._hang_up()
            await asyncio.wait_for(self.ws.close(), CLOSE_TIMEOUT_S)
        except Exception:  # noqa: BLE001 - a socket already gone is closed enough
            await self._abort()

    def encode_frame(self, frame: np.ndarray) -> list[str | bytes]:
        raise NotImplementedError

    def decode(self, message: str | bytes, t: float) -> list[Heard]:
        raise NotImplementedError

    def _headers(self) -> dict[str, str]:
        return {}

    async def _open(self) -> None:
        """After the handshake: start the session (and wait for its first message where there is one)."""

    async def _hang_up(self) -> None:
        pass

    async def _abort(self) -> None:
        if self.ws is not None:
            self.ws.transport.abort()

    def _close_reason(self) -> str:
        protocol = getattr(self.ws, "protocol", None)
        close = getattr(protocol, "close_rcvd", None) or getattr(protocol, "close_sent", None)
        if close is None:
            return "the connection dropped without a close frame"
        return f"closed {close.code}" + (f" ({close.reason})" if close.reason else "")

    async def _first_json(self, expected: str, key: str = "type") -> dict[str, Any]:
        """The session's first message, which must be `expected` (an `error` first is the server's refusal)."""
        obj = json.loads(await self.ws.recv())
        if not isinstance(obj, dict) or obj.get(key) != expected:
            raise CallFailed(f"expected {expected} first, got {json.dumps(obj)[:300]}")
        return obj


def _json(message: str | bytes) -> dict[str, Any]:
    obj = json.loads(message)
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {str(message)[:200]!r}")
    return obj


class NativeClient(Client):
    """The native protocol (docs/protocol.md): `start`, then binary PCM16 both ways."""

    protocol: Protocol = "native"

    def __init__(self, url: str, *, key: str | None, jitter_ms: float) -> None:
        super().__init__(url, key=key, jitter_ms=jitter_ms)
        self.output_rate_hz = OUTPUT_SAMPLE_RATE
        self._dropping = False  # between `interrupted` and the next `response.started`
        self._response_id: str | None = None

    async def _open(self) -> None:
        start: dict[str, Any] = {"type": "start", "sample_rate": INPUT_SAMPLE_RATE, "frame_ms": FRAME_MS,
                                 "output_sample_rate": OUTPUT_SAMPLE_RATE}
        if self.key is not None:
            start["key"] = self.key
        await self.ws.send(json.dumps(start))
        started = await self._first_json("session.started")
        self.output_rate_hz = int(started.get("output_sample_rate", OUTPUT_SAMPLE_RATE))

    def encode_frame(self, frame: np.ndarray) -> list[str | bytes]:
        return [float_to_pcm16(frame)]

    def decode(self, message: str | bytes, t: float) -> list[Heard]:
        if isinstance(message, bytes):
            if self._dropping:
                return []
            ms = len(message) / PCM16_BYTES * 1000 / self.output_rate_hz
            return [Heard(Kind.AUDIO, t, self._response_id, audio_ms=ms)]
        obj = _json(message)
        kind, rid = obj.get("type"), obj.get("response_id")
        if kind == "speech.started":
            return [Heard(Kind.SPEECH_STARTED, t)]
        if kind == "speech.stopped":
            return [Heard(Kind.SPEECH_STOPPED, t, rid)] if obj.get("turn", True) else []
        if kind == "response.started":
            self._dropping, self._response_id = False, rid
            return [Heard(Kind.REPLY_STARTED, t, rid)]
        if kind == "text.delta":
            return [Heard(Kind.TEXT, t, rid, text=str(obj.get("text", "")))]
        if kind == "response.done":
            timings = obj.get("timings") or {}
            return [Heard(Kind.REPLY_DONE, t, rid, cancelled=obj.get("reason") == "cancelled",
                          timings={str(k): (float(v) if isinstance(v, (int, float)) else None)
                                   for k, v in timings.items()})]
        if kind == "interrupted":
            self._dropping = True
            return [Heard(Kind.INTERRUPTED, t, rid)]
        if kind == "error":
            return [Heard(Kind.ERROR, t, text=f"{obj.get('code')}: {obj.get('message')}",
                          fatal=bool(obj.get("fatal")))]
        return []  # session.updated, transcript, ...


class OpenAIClient(Client):
    """OpenAI Realtime GA (docs/openai-realtime.md): server VAD, PCM16 24 kHz as base64 both ways."""

    protocol: Protocol = "openai"

    def __init__(self, url: str, *, key: str | None, jitter_ms: float) -> None:
        super().__init__(url, key=key, jitter_ms=jitter_ms)
        self._up = Resampler(INPUT_SAMPLE_RATE, OPENAI_RATE_HZ)

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.key}"} if self.key is not None else {}

    async def _open(self) -> None:
        await self._first_json("session.created")
        pcm = {"type": "audio/pcm", "rate": OPENAI_RATE_HZ}
        await self.ws.send(json.dumps({"type": "session.update", "session": {
            "type": "realtime", "output_modalities": ["audio"],
            "audio": {"input": {"format": pcm, "turn_detection": {"type": "server_vad", "create_response": True,
                                                                  "interrupt_response": True}},
                      "output": {"format": pcm}}}}))

    def encode_frame(self, frame: np.ndarray) -> list[str | bytes]:
        pcm = float_to_pcm16(self._up.process(frame))
        if not pcm:
            return []
        return [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(pcm).decode()})]

    def decode(self, message: str | bytes, t: float) -> list[Heard]:
        obj = _json(message)
        kind = obj.get("type")
        if kind == "response.output_audio.delta":
            ms = len(base64.b64decode(obj.get("delta", ""))) / PCM16_BYTES * 1000 / OPENAI_RATE_HZ
            return [Heard(Kind.AUDIO, t, obj.get("response_id"), audio_ms=ms)]
        if kind in ("response.output_audio_transcript.delta", "response.output_text.delta"):
            return [Heard(Kind.TEXT, t, obj.get("response_id"), text=str(obj.get("delta", "")))]
        if kind == "input_audio_buffer.speech_started":
            return [Heard(Kind.SPEECH_STARTED, t)]
        if kind == "input_audio_buffer.speech_stopped":
            return [Heard(Kind.SPEECH_STOPPED, t)]
        if kind == "response.created":
            return [Heard(Kind.REPLY_STARTED, t, (obj.get("response") or {}).get("id"))]
        if kind == "response.done":
            response = obj.get("response") or {}
            rid, status = response.get("id"), response.get("status")
            heard = []
            if status == "cancelled":
                heard.append(Heard(Kind.INTERRUPTED, t, rid))
            elif status == "failed":
                details = response.get("status_details") or {}
                heard.append(Heard(Kind.ERROR, t, text=f"response failed: {json.dumps(details)[:300]}"))
            return [*heard, Heard(Kind.REPLY_DONE, t, rid, cancelled=status == "cancelled")]
        if kind == "error":
            error = obj.get("error") or {}
            return [Heard(Kind.ERROR, t, text=f"{error.get('code')}: {error.get('message')}")]
        return []


class TwilioClient(Client):
    """Twilio Media Streams (docs/telephony.md): the carrier's side of a call, with Twilio's playback."""

    protocol: Protocol = "twilio"
    stream_sid = "MZloadtest0000000000000000000000"
    call_sid = "CAloadtest0000000000000000000000"

    def __init__(self, url: str, *, key: str | None, jitter_ms: float) -> None:
        super().__init__(url, key=key, jitter_ms=jitter_ms)
        self._down = Resampler(INPUT_SAMPLE_RATE, TWILIO_RATE_HZ)
        self._seq = 0
        self._chunk = 0
        self._replying = False  # media arrived and the reply is not over (quiet, or cleared)
        self._last_media_t = 0.0
        self.play_end = 0.0  # when the audio received so far has played (monotonic s)
        self.pending_marks: list[tuple[float, str]] = []  # (due, name): echoed once their audio has played

    def _next_seq(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def _open(self) -> None:
        parameters = {"key": self.key} if self.key is not None else {}
        await self.ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
        await self.ws.send(json.dumps({
            "event": "start", "sequenceNumber": self._next_seq(), "streamSid": self.stream_sid,
            "start": {"streamSid": self.stream_sid, "accountSid": "ACloadtest", "callSid": self.call_sid,
                      "tracks": ["inbound"], "customParameters": parameters,
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": TWILIO_RATE_HZ, "channels": 1}}}))

    def encode_frame(self, frame: np.ndarray) -> list[str | bytes]:
        line = self._down.process(frame)
        if not line.size:
            return []
        self._chunk += 1
        return [json.dumps({
            "event": "media", "sequenceNumber": self._next_seq(), "streamSid": self.stream_sid,
            "media": {"track": "inbound", "chunk": str(self._chunk), "timestamp": str((self._chunk - 1) * FRAME_MS),
                      "payload": base64.b64encode(float_to_ulaw(line)).decode()}})]

    def decode(self, message: str | bytes, t: float) -> list[Heard]:
        obj = _json(message)
        kind = obj.get("event")
        if kind == "media":
            payload = (obj.get("media") or {}).get("payload", "")
            ms = len(base64.b64decode(payload)) / TWILIO_BYTES_PER_MS
            heard = []
            if not self._replying:
                self._replying = True
                heard.append(Heard(Kind.REPLY_STARTED, t))
                self.play_end = t + self.jitter_ms / 1000  # a reply plays from its first frame + the buffer
            self.play_end = max(self.play_end, t) + ms / 1000  # an underrun resumes at the arrival
            self._last_media_t = t
            return [*heard, Heard(Kind.AUDIO, t, audio_ms=ms)]
        if kind == "mark":
            self.pending_marks.append((max(self.play_end, t), str((obj.get("mark") or {}).get("name", ""))))
            return []
        if kind == "clear":
            self.play_end = t
            self.pending_marks = [(t, name) for _, name in self.pending_marks]  # Twilio echoes them at once
            heard = [Heard(Kind.INTERRUPTED, t)]
            if self._replying:
                self._replying = False
                heard.append(Heard(Kind.REPLY_DONE, t, cancelled=True))
            return heard
        return []

    def quiet(self, now: float) -> list[Heard]:
        """REPLY_DONE (at the last frame's time) once the reply has sent no media for TWILIO_QUIET_S."""
        if self._replying and now - self._last_media_t >= TWILIO_QUIET_S:
            self._replying = False
            return [Heard(Kind.REPLY_DONE, self._last_media_t)]
        return []

    def _next_due(self, now: float) -> float:
        """Seconds until the far end has something to do: a mark to echo, a reply to call over."""
        due = [t for t, _ in self.pending_marks]
        if self._replying:
            due.append(self._last_media_t + TWILIO_QUIET_S)
        return max(MARK_TICK_S, min(due, default=now + 1.0) - now)

    def due_marks(self, now: float) -> list[str]:
        due = [name for t, name in self.pending_marks if t <= now]
        self.pending_marks = [(t, name) for t, name in self.pending_marks if t > now]
        return due

    async def events(self) -> AsyncIterator[Heard]:
        """The base loop, plus the far end: mark echoes as their audio plays, and the quiet end of a reply."""
        from websockets.exceptions import ConnectionClosed

        while True:
            try:
                message = await asyncio.wait_for(self.ws.recv(), self._next_due(time.monotonic()))
            except asyncio.TimeoutError:
                message = None
            except ConnectionClosed:
                break
            now = time.monotonic()
            if message is not None:
                for heard in self.decode(message, now):
                    yield heard
            for heard in self.quiet(now):
                yield heard
            try:
                for name in self.due_marks(now):
                    await self.ws.send(json.dumps({"event": "mark", "sequenceNumber": self._next_seq(),
                                                   "streamSid": self.stream_sid, "mark": {"name": name}}))
            except ConnectionClosed:
                break
        yield Heard(Kind.CLOSED, time.monotonic(), text=self._close_reason())

    async def _hang_up(self) -> None:
        """`stop`, as Twilio sends when the caller hangs up; the server closes with 1000."""
        await self.ws.send(json.dumps({"event": "stop", "sequenceNumber": self._next_seq(),
                                       "streamSid": self.stream_sid,
                                       "stop": {"accountSid": "ACloadtest", "callSid": self.call_sid}}))
        await asyncio.wait_for(self.ws.wait_closed(), CLOSE_TIMEOUT_S)


CLIENTS: dict[Protocol, type[Client]] = {"native": NativeClient, "openai": OpenAIClient, "twilio": TwilioClient}


def make_client(url: str, protocol: Protocol, *, key: str | None, jitter_ms: float) -> Client:
    if protocol not in CLIENTS:
        raise ValueError(f"expected a protocol among {PROTOCOLS}, got {protocol!r}")
    return CLIENTS[protocol](url, key=key, jitter_ms=jitter_ms)
