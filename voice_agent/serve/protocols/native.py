"""The native WebSocket protocol, Sans-I/O: wire messages <-> `voice_agent.serve.protocols.events` events.

One `NativeProtocol` per connection. `decode(message)` takes a text (JSON) or binary message and returns
client events or raises `ProtocolError` with a stable code; `encode(event)` returns the text / binary
messages for a server event. It keeps the connection's wire state: whether `start` was seen, the
client's sample rates and frame size, the current settings (so `update` can override them), and the
streaming resamplers between the client's rates and the model's 16 kHz in / 24 kHz out. It implements
`voice_agent.serve.protocols.adapter.WireAdapter`: the session opens with the `start` message, which must
come within START_TIMEOUT_S; a key may come in `start` (never in the URL, to keep it out of logs).

Settings on the wire (`settings_json`, and `_settings` reading `start` / `update`): {"vad": {every
VadSettings field, plus min_interruption_ms}, "voice", "temperature", "max_new_tokens", "seed", "transcribe"}. What
`session.started` / `session.updated` echo is accepted unchanged by `update` and gives the same settings.
`vad.kind` is the server's choice (`--vad`): accepted when equal to it, refused otherwise. The turn options
are checked against the engine (`EngineInfo.check_turn`: a voice it knows, a reply no longer than its
limit) when they are chosen, so a turn never fails on them later.
`vad.silero_threshold` is a per-session option like the others; it is used only when the server's
detector is silero, as `aggressiveness` and `frame_ms` are used only by webrtcvad.

Wire format (full description and an example exchange: docs/protocol.md):
- client text: {"type": "start" | "update" | "playback" | "interrupt", ...}; `start` first, exactly once.
  An `interrupt` whose `played_ms` is unusable still stops the reply (as one without it) and the field is
  reported as `bad_field`: a stop request is never lost to a typo.
- client binary: PCM16 little-endian mono at the start message's `sample_rate`, at most
  MAX_FRAMES_PER_MESSAGE frames of `frame_ms` per message
- server text: {"type": "session.started" | "session.updated" | "speech.started" | "speech.stopped" |
  "transcript" | "response.started" | "text.delta" | "response.done" | "interrupted" | "error", ...}
- server binary: PCM16 little-endian mono reply audio of the latest `response.started`, at the start
  message's `output_sample_rate`; interleaved with that response's `text.delta` messages.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from enum import Enum
from typing import Any

import numpy as np

from voice_agent.audio import (
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    PCM16_BYTES,
    Resampler,
    float_to_pcm16,
    pcm16_to_float,
)
from voice_agent.engine.api import EngineInfo
from voice_agent.errors import ProtocolError, VoiceAgentError
from voice_agent.serve.protocols.events import (
    BAD_AUDIO,
    BAD_FIELD,
    BAD_JSON,
    BAD_MESSAGE,
    DUPLICATE_START,
    FRAME_TOO_LARGE,
    START_REQUIRED,
    UNKNOWN_TYPE,
    AudioFrame,
    ClientEvent,
    DtmfReceived,
    ErrorEvent,
    FieldRejected,
    InputCleared,
    InputCommitted,
    InputTimeout,
    Interrupted,
    InterruptRequest,
    ItemAdded,
    ItemDeleted,
    ItemDone,
    ItemRetrieved,
    ItemTruncated,
    PlaybackProgress,
    ResponseAudio,
    ResponseFinished,
    ResponseStarted,
    ResponseText,
    ServerEvent,
    SessionStarted,
    SettingsUpdated,
    SpeechStarted,
    SpeechStopped,
    StartSession,
    UpdateSettings,
    UserTranscript,
)
from voice_agent.serve.settings import SessionSettings

START_TIMEOUT_S = 10.0  # a connection must send its start message within this
SAMPLE_RATES_HZ = (8_000, 16_000, 22_050, 24_000, 32_000, 44_100, 48_000)  # accepted client rates
FRAME_MS_RANGE = (10, 100)  # a client frame is 10..100 ms of audio
DEFAULT_FRAME_MS = 20
MAX_FRAMES_PER_MESSAGE = 4  # a binary message may carry a few frames (a sender catching up)
CLIENT_MESSAGE_TYPES = ("start", "update", "playback", "interrupt")
# Options of the "vad" object: the VadSettings fields, and min_interruption_ms (on SessionSettings).
VAD_OPTIONS = ("kind", "aggressiveness", "frame_ms", "speech_start_ms", "silence_ms", "prefix_padding_ms",
               "max_turn_ms", "silero_threshold", "speculate_ms", "min_interruption_ms")
# Top-level options: the TurnSettings fields, each a JSON type or null (the server's default).
TURN_OPTIONS: dict[str, tuple[tuple[type, ...], str]] = {
    "voice": ((str,), "a string"),
    "temperature": ((int, float), "a number"),
    "max_new_tokens": ((int,), "an integer"),
    "seed": ((int,), "an integer"),
}


# Server events about the conversation's items: only an endpoint whose clients manage items sends them.
CONVERSATION_EVENTS = (InputCommitted, InputCleared, InputTimeout, ItemAdded, ItemDone, ItemDeleted, ItemRetrieved,
                       ItemTruncated, DtmfReceived)


class WireState(Enum):
    AWAITING_START = "awaiting_start"
    OPEN = "open"


class NativeProtocol:
    """Wire state and translation for one connection; see the module docstring."""

    def __init__(self, defaults: SessionSettings, engine: EngineInfo | None = None) -> None:
        """`engine`: what the engine serves, to check the turn options against (None: not checked)."""
        self.defaults = defaults
        self.engine = engine
        self.state = WireState.AWAITING_START
        self.settings = defaults
        self.sample_rate_hz = INPUT_SAMPLE_RATE
        self.output_sample_rate_hz = OUTPUT_SAMPLE_RATE
        self.frame_ms = DEFAULT_FRAME_MS
        self.start_timeout_s = START_TIMEOUT_S
        self.subprotocol: str | None = None
        self.conversation_events = False
        self.pace_lead_ms: float | None = None
        self._in: Resampler | None = None
        self._out: Resampler | None = None

    def handshake_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return None  # a key goes in the Authorization header or the start message, never in the URL

    def on_accept(self) -> list[ClientEvent]:
        return []  # the session opens with the start message

    @property
    def max_message_bytes(self) -> int:
        frame_samples = self.sample_rate_hz * self.frame_ms // 1000
        return MAX_FRAMES_PER_MESSAGE * frame_samples * PCM16_BYTES

    # ---- client -> server ------------------------------------------------------------------------

    def decode(self, message: str | bytes) -> list[ClientEvent]:
        """One WebSocket message -> client events; raises ProtocolError (non-fatal) for bad input."""
        if isinstance(message, (bytes, bytearray, memoryview)):
            return self._decode_audio(bytes(message))
        try:
            obj = json.loads(message)
        except (json.JSONDecodeError, RecursionError):
            raise ProtocolError(BAD_JSON, f"expected a JSON text message, got {_preview(message)}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise ProtocolError(
                BAD_MESSAGE, f"expected a JSON object with a string 'type', got {_preview(message)}"
            )
        kind = obj["type"]
        if kind not in CLIENT_MESSAGE_TYPES:
            raise ProtocolError(UNKNOWN_TYPE, f"type: expected one of {CLIENT_MESSAGE_TYPES}, got {kind!r}")
        if kind == "start":
            return [self._decode_start(obj)]
        if self.state is not WireState.OPEN:
            raise ProtocolError(START_REQUIRED, f"expected a 'start' message first, got {kind!r}")
        if kind == "update":
            _only(obj, ("type", "vad", "transcribe", *TURN_OPTIONS))
            self.settings = self._settings(obj, base=self.settings)
            return [UpdateSettings(self.settings)]
        if kind == "playback":
            _only(obj, ("type", "response_id", "played_ms"))
            rid = _field(obj, "response_id", str, "a string")
            return [PlaybackProgress(rid, _ms(obj, "played_ms"))]
        _only(obj, ("type", "played_ms"))
        if obj.get("played_ms") is None:
            return [InterruptRequest(None)]
        try:
            return [InterruptRequest(_ms(obj, "played_ms"))]
        except ProtocolError as e:  # stop anyway, estimating what was played, and report the field
            return [InterruptRequest(None), FieldRejected(e.code, str(e))]

    def _decode_start(self, obj: dict[str, Any]) -> StartSession:
        if self.state is WireState.OPEN:
            raise ProtocolError(DUPLICATE_START, "expected one 'start' per connection, got a second")
        _only(obj, ("type", "sample_rate", "frame_ms", "output_sample_rate", "vad", "key", "transcribe",
                    *TURN_OPTIONS))
        rate = _choice(obj, "sample_rate", SAMPLE_RATES_HZ, INPUT_SAMPLE_RATE)
        out_rate = _choice(obj, "output_sample_rate", SAMPLE_RATES_HZ, OUTPUT_SAMPLE_RATE)
        frame_ms = obj.get("frame_ms", DEFAULT_FRAME_MS)
        lo, hi = FRAME_MS_RANGE
        if not (_is_int(frame_ms) and lo <= frame_ms <= hi and rate * frame_ms % 1000 == 0):
            raise ProtocolError(
                BAD_FIELD, f"frame_ms: expected an integer {lo}..{hi} giving whole samples at {rate} Hz, "
                f"got {frame_ms!r}"
            )
        key = obj.get("key")
        if key is not None and not isinstance(key, str):
            raise ProtocolError(BAD_FIELD, f"key: expected a string, got {type(key).__name__}")
        settings = self._settings(obj, base=self.defaults)
        self.state = WireState.OPEN
        self.settings = settings
        self.sample_rate_hz, self.output_sample_rate_hz, self.frame_ms = rate, out_rate, frame_ms
        self._in = Resampler(rate, INPUT_SAMPLE_RATE) if rate != INPUT_SAMPLE_RATE else None
        self._out = None
        return StartSession(settings, rate, frame_ms, out_rate, key)

    def _settings(self, obj: dict[str, Any], *, base: SessionSettings) -> SessionSettings:
        """`base` with the message's "vad" and turn options applied; every error names the field."""
        vad = obj.get("vad", {})
        if not isinstance(vad, dict):
            raise ProtocolError(BAD_FIELD, f"vad: expected an object, got {type(vad).__name__}")
        unknown = sorted(set(vad) - set(VAD_OPTIONS))
        if unknown:
            raise ProtocolError(BAD_FIELD, f"vad: expected options among {VAD_OPTIONS}, got {unknown}")
        if "kind" in vad and vad["kind"] != base.vad.kind:
            raise ProtocolError(
                BAD_FIELD, f"vad.kind: expected {base.vad.kind!r} (the server's detector), got {vad['kind']!r}"
            )
        vad_changes = {k: v for k, v in vad.items() if k not in ("kind", "min_interruption_ms")}
        turn_changes = {k: obj[k] for k in TURN_OPTIONS if k in obj}
        for name, value in turn_changes.items():
            kinds, expected = TURN_OPTIONS[name]
            if value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
                raise ProtocolError(BAD_FIELD, f"{name}: expected {expected}, got {value!r}")
        transcribe = obj.get("transcribe", base.transcribe)
        if not isinstance(transcribe, bool):
            raise ProtocolError(BAD_FIELD, f"transcribe: expected true or false, got {transcribe!r}")
        try:
            settings = dataclasses.replace(
                base,
                vad=dataclasses.replace(base.vad, **vad_changes),
                turn=dataclasses.replace(base.turn, **turn_changes),
                min_interruption_ms=vad.get("min_interruption_ms", base.min_interruption_ms),
                transcribe=transcribe,
            )
            if self.engine is not None:
                self.engine.check_turn(settings.turn)
        except (VoiceAgentError, ValueError, TypeError) as e:
            raise ProtocolError(BAD_FIELD, str(e)) from None
        return settings

    def _decode_audio(self, data: bytes) -> list[ClientEvent]:
        if self.state is not WireState.OPEN:
            raise ProtocolError(
                START_REQUIRED, f"expected a 'start' message first, got {len(data)} bytes of audio"
            )
        if len(data) % PCM16_BYTES:
            raise ProtocolError(
                BAD_AUDIO, f"expected PCM16 audio (an even number of bytes), got {len(data)} bytes"
            )
        if len(data) > self.max_message_bytes:
            raise ProtocolError(
                FRAME_TOO_LARGE,
                f"expected at most {self.max_message_bytes} bytes per message ({MAX_FRAMES_PER_MESSAGE} "
                f"frames of {self.frame_ms} ms at {self.sample_rate_hz} Hz), got {len(data)}",
            )
        pcm = pcm16_to_float(data)
        if self._in is not None:
            pcm = self._in.process(pcm)
        return [AudioFrame(pcm)]

    # ---- server -> client ------------------------------------------------------------------------

    def audio_ms(self, message: str | bytes) -> float:
        return 0.0  # not paced

    def encode(self, event: ServerEvent) -> list[str | bytes]:
        """One server event -> the messages that carry it, in order."""
        if isinstance(event, ResponseAudio):
            pcm = event.pcm
            if self.output_sample_rate_hz != OUTPUT_SAMPLE_RATE:
                if self._out is None:
                    self._out = Resampler(OUTPUT_SAMPLE_RATE, self.output_sample_rate_hz)
                pcm = self._out.process(pcm)
            return [float_to_pcm16(pcm)] if len(pcm) else []
        if isinstance(event, CONVERSATION_EVENTS):
            return []  # the native protocol does not expose the conversation's items
        messages: list[str | bytes] = []
        if isinstance(event, (ResponseStarted, Interrupted)):
            self._out = None  # a new reply starts a fresh resampler; a cut one drops its tail
        elif isinstance(event, ResponseFinished) and self._out is not None:
            tail = self._out.flush()
            self._out = None
            if len(tail):
                messages.append(float_to_pcm16(tail))
        messages.append(json.dumps(_wire(event), separators=(",", ":")))
        return messages


def settings_json(settings: SessionSettings) -> dict[str, Any]:
    """The wire form of settings (session.started, session.updated, GET /api/info); `update` takes it as is."""
    vad: dict[str, Any] = {k: getattr(settings.vad, k) for k in VAD_OPTIONS if k != "min_interruption_ms"}
    vad["min_interruption_ms"] = settings.min_interruption_ms
    return {"vad": vad, **{k: getattr(settings.turn, k) for k in TURN_OPTIONS}, "transcribe": settings.transcribe}


def _wire(event: ServerEvent) -> dict[str, Any]:
    """The JSON object of a non-audio server event."""
    if isinstance(event, SessionStarted):
        return {"type": "session.started", "session_id": event.session_id,
                "sample_rate": event.sample_rate_hz, "output_sample_rate": event.output_sample_rate_hz,
                "frame_ms": event.frame_ms,
                "model": event.model, "demo": event.demo, "settings": settings_json(event.settings)}
    if isinstance(event, SettingsUpdated):
        return {"type": "session.updated", "settings": settings_json(event.settings)}
    if isinstance(event, SpeechStarted):
        return {"type": "speech.started", "at_ms": event.at_ms, "item_id": event.item_id}
    if isinstance(event, SpeechStopped):
        return {"type": "speech.stopped", "at_ms": event.at_ms, "duration_ms": event.duration_ms,
                "turn": event.turn, "reason": event.reason, "response_id": event.response_id,
                "item_id": event.item_id}
    if isinstance(event, UserTranscript):
        return {"type": "transcript", "item_id": event.item_id, "delta": event.delta, "text": event.text,
                "final": event.final, "error": event.error}
    if isinstance(event, ResponseStarted):
        return {"type": "response.started", "response_id": event.response_id}
    if isinstance(event, ResponseText):
        return {"type": "text.delta", "response_id": event.response_id, "text": event.text}
    if isinstance(event, ResponseFinished):
        return {"type": "response.done", "response_id": event.response_id, "reason": event.reason,
                "text": event.text, "audio_ms": round(event.audio_ms, 2), "timings": event.timings}
    if isinstance(event, Interrupted):
        return {"type": "interrupted", "response_id": event.response_id, "played_ms": event.played_ms}
    if isinstance(event, ErrorEvent):
        return {"type": "error", "code": event.code, "message": event.message, "fatal": event.fatal}
    raise TypeError(f"expected a server event, got {type(event).__name__}")


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _only(obj: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(obj) - set(allowed))
    if unknown:
        raise ProtocolError(
            BAD_FIELD, f"{obj['type']}: expected fields among {allowed}, got unknown {unknown}"
        )


def _field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], expected: str) -> Any:
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(BAD_FIELD, f"{obj['type']}.{name}: expected {expected}, got {value!r}")
    return value


def _ms(obj: dict[str, Any], name: str) -> float:
    expected = "a number of milliseconds >= 0"
    value = _field(obj, name, (int, float), expected)
    if not np.isfinite(value) or value < 0:
        raise ProtocolError(BAD_FIELD, f"{obj['type']}.{name}: expected {expected}, got {value}")
    return float(value)


def _choice(obj: dict[str, Any], name: str, allowed: tuple[int, ...], default: int) -> int:
    value = obj.get(name, default)
    if not _is_int(value) or value not in allowed:
        raise ProtocolError(BAD_FIELD, f"{name}: expected one of {allowed} (Hz), got {value!r}")
    return int(value)
