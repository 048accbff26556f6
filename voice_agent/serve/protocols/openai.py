"""The OpenAI Realtime API (GA interface) over a WebSocket, Sans-I/O: GA wire events <-> `events` events.

One `OpenAIRealtimeProtocol` per connection to `/v1/realtime`; it implements
`voice_agent.serve.protocols.adapter.WireAdapter`. The session opens with the connection: `on_accept` returns
its `StartSession` (so `session.created` is the first server event), or raises `BetaInterfaceRefused` for a
client of the retired beta interface (`OpenAI-Beta: realtime=v1`, or the `openai-beta.realtime-v1`
subprotocol). A browser offers the `realtime` subprotocol (`subprotocol` is then "realtime", for the
connection to answer with) and may carry its key as `openai-insecure-api-key.<key>` (`handshake_key`).

It keeps the connection's wire state: the session as the client chose it on the wire (`RealtimeConfig`:
formats, the voice and turn detection as named, echoed by `session.updated`), the streaming resamplers
between the wire rates (PCM16 24 kHz, G.711 8 kHz) and the model's 16 kHz in / 24 kHz out, the reply being
streamed (ids, modality, transcript so far) and a counter for server `event_id`s.

Mapping (full table and what is refused: docs/openai-realtime.md):
- `audio.input.turn_detection` server_vad: `threshold` -> webrtcvad aggressiveness bucket
  (min(3, floor(4 * threshold)); 0.5 -> 2) or, with a silero detector, its probability threshold;
  `prefix_padding_ms` / `silence_duration_ms` -> VadSettings.prefix_padding_ms / silence_ms; `idle_timeout_ms`,
  `create_response`, `interrupt_response` -> SessionSettings. semantic_vad: `eagerness` -> silence_ms
  (EAGERNESS_SILENCE_MS; medium / auto keep the server's). null -> push-to-talk (turn_detection False).
- `audio.output.voice`: a name the engine serves is used; an OpenAI name (alloy, ash, ...) or a custom {id} the
  engine lacks plays the default voice (echoed as asked); any other unknown name too, with a non-fatal error.
- `max_output_tokens`: "inf" -> the engine's limit; an integer is clamped to it.
- accepted and reported (non-fatal `error`, the rest applies): transcription `prompt` / `keywords`, a speed
  other than 1.0, non-empty `tools`, `tool_choice` other than auto / none, `response.create` `input`, and beta
  field names. A bad value (wrong type, out of range) refuses the whole message and changes nothing.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from voice_agent.audio import (
    G711_SAMPLE_RATE,
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    PCM16_BYTES,
    UNIT_MS,
    Resampler,
    alaw_to_float,
    float_to_alaw,
    float_to_pcm16,
    float_to_ulaw,
    pcm16_to_float,
    resample,
    ulaw_to_float,
)
from voice_agent.engine.api import MAX_ITEM_ID_CHARS, MAX_VOICE_CHARS, EngineInfo, TurnSettings
from voice_agent.errors import ProtocolError, VoiceAgentError
from voice_agent.serve.protocols.events import (
    BAD_AUDIO,
    BAD_FIELD,
    BAD_JSON,
    BAD_MESSAGE,
    FRAME_TOO_LARGE,
    UNKNOWN_TYPE,
    AudioFrame,
    CancelResponse,
    ClearInput,
    ClientEvent,
    CommitInput,
    CreateItem,
    CreateResponse,
    DeleteItem,
    DtmfReceived,
    ErrorEvent,
    FieldRejected,
    InputCleared,
    InputCommitted,
    InputTimeout,
    Interrupted,
    Item,
    ItemAdded,
    ItemDeleted,
    ItemDone,
    ItemRetrieved,
    ItemTruncated,
    ResponseAudio,
    ResponseFinished,
    ResponseOptions,
    ResponseStarted,
    ResponseText,
    RetrieveItem,
    ServerEvent,
    SessionStarted,
    SettingsUpdated,
    SpeechStarted,
    SpeechStopped,
    StartSession,
    TruncateItem,
    UpdateSettings,
    UserTranscript,
)
from voice_agent.serve.settings import SessionSettings

# ---- wire facts -----------------------------------------------------------------------------------------
START_TIMEOUT_S = 10.0  # the session opens on accept; kept for the WireAdapter contract
SUBPROTOCOL = "realtime"  # offered by browsers; must be answered or the browser aborts
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."  # a browser's API key, as a subprotocol entry
BETA_SUBPROTOCOL = "openai-beta.realtime-v1"  # the retired beta interface, as a subprotocol entry
BETA_HEADER = "openai-beta"  # its header: `OpenAI-Beta: realtime=v1`
BETA_CODE = "beta_api_shape_disabled"
UNSUPPORTED = "unsupported_parameter"  # accepted but not served: reported, the rest of the message applies
AudioFormat = Literal["audio/pcm", "audio/pcmu", "audio/pcma"]
PCM: Literal["audio/pcm"] = "audio/pcm"  # PCM16 little-endian mono, 24 kHz
PCMU: Literal["audio/pcmu"] = "audio/pcmu"  # G.711 mu-law, 8 kHz
PCMA: Literal["audio/pcma"] = "audio/pcma"  # G.711 A-law, 8 kHz
WIRE_RATE_HZ = {PCM: OUTPUT_SAMPLE_RATE, PCMU: G711_SAMPLE_RATE, PCMA: G711_SAMPLE_RATE}  # GA pcm is 24 kHz only
BETA_FORMATS = {"pcm16": PCM, "g711_ulaw": PCMU, "g711_alaw": PCMA}  # accepted as plain strings too
MAX_AUDIO_BYTES = 15 * 1024 * 1024  # decoded audio per event (OpenAI's limit)
MAX_AUDIO_BASE64_CHARS = 4 * math.ceil(MAX_AUDIO_BYTES / 3)
OPENAI_VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
DEFAULT_VOICE_NAME = "default"  # echoed when neither client nor operator named a voice
EAGERNESS = ("low", "medium", "high", "auto")
EAGERNESS_SILENCE_MS = {"low": 1_000, "high": 300}  # medium / auto keep the server's silence_ms
WEBRTC_BUCKETS = 4  # threshold [0, 1] -> aggressiveness 0..3 in equal buckets
SILERO_THRESHOLD_RANGE = (0.01, 0.99)  # VadSettings wants (0, 1) open
IDLE_TIMEOUT_MS_RANGE = (1_000, 600_000)
SPEED_RANGE = (0.25, 1.5)
MAX_METADATA_PAIRS, MAX_METADATA_KEY_CHARS, MAX_METADATA_VALUE_CHARS = 16, 64, 512
SERVER_FAULT_CODES = ("engine_error", "internal_error", "server_full", "not_ready", "checkpoint_error",
                      "vad_unavailable", "download_error", "error")
BETA_SESSION_FIELDS = {  # beta name -> where GA puts it
    "modalities": "output_modalities", "voice": "audio.output.voice", "input_audio_format": "audio.input.format",
    "output_audio_format": "audio.output.format", "turn_detection": "audio.input.turn_detection",
    "input_audio_transcription": "audio.input.transcription",
    "input_audio_noise_reduction": "audio.input.noise_reduction",
    "max_response_output_tokens": "max_output_tokens", "temperature": "(no GA field)",
}
SILENT_SESSION_FIELDS = ("type", "model", "tracing", "truncation", "include", "prompt", "parallel_tool_calls",
                         "reasoning", "id", "object", "expires_at", "client_secret")
CLIENT_EVENT_TYPES = (
    "session.update", "input_audio_buffer.append", "input_audio_buffer.commit", "input_audio_buffer.clear",
    "conversation.item.create", "conversation.item.delete", "conversation.item.retrieve",
    "conversation.item.truncate", "response.create", "response.cancel",
)


class BetaInterfaceRefused(ProtocolError):
    """A client of the retired beta interface (`OpenAI-Beta: realtime=v1`); fatal, the connection closes."""

    def __init__(self, message: str) -> None:
        super().__init__(BETA_CODE, message, fatal=True)


class RealtimeRequestError(ProtocolError):
    """A client event that could not be used: `param` the field at fault, `event_id` the client's id of the
    event (both echoed in the wire `error`)."""

    def __init__(self, code: str, message: str, *, param: str | None = None, event_id: str | None = None) -> None:
        super().__init__(code, message)
        self.param = param
        self.event_id = event_id


@dataclass(frozen=True)
class RealtimeConfig:
    """What the session looks like on the wire beyond `SessionSettings`: what session.updated echoes."""

    model: str
    input_format: AudioFormat = PCM
    output_format: AudioFormat = PCM
    voice: str | dict[str, str] = DEFAULT_VOICE_NAME  # as the client named it
    vad_type: Literal["server_vad", "semantic_vad"] = "server_vad"
    threshold: float | None = None  # as the client gave it (None: derived from the detector)
    eagerness: str = "auto"
    transcription: dict[str, Any] | None = None
    noise_reduction: dict[str, Any] | None = None
    speed: float = 1.0
    max_output_tokens: int | Literal["inf"] = "inf"
    tracing: Any = None
    truncation: Any = "auto"
    include: list[str] | None = None
    prompt: Any = None


@dataclass
class _Reply:
    """The response being streamed."""

    response_id: str
    item_id: str
    options: ResponseOptions
    voice: str | dict[str, str]
    max_output_tokens: int | Literal["inf"]
    transcript: list[str] = field(default_factory=list)
    out: Resampler | None = None  # 24 kHz -> 8 kHz for G.711, fresh per response


class OpenAIRealtimeProtocol:
    """Wire state and translation for one `/v1/realtime` connection; see the module docstring."""

    def __init__(self, defaults: SessionSettings, engine: EngineInfo | None = None, *,
                 headers: Mapping[str, str] | None = None, query: Mapping[str, str] | None = None) -> None:
        """`headers` / `query`: the handshake's (the subprotocols offered, a beta header, `model=`)."""
        self.defaults = defaults
        self.engine = engine
        self.start_timeout_s = START_TIMEOUT_S
        self.conversation_events = True
        self.pace_lead_ms: float | None = None
        self._headers = {k.lower(): v for k, v in (headers or {}).items()}
        offered = _subprotocols(self._headers)
        self.subprotocol: str | None = SUBPROTOCOL if SUBPROTOCOL in offered else None
        self._beta = BETA_SUBPROTOCOL in offered or "realtime=v1" in self._headers.get(BETA_HEADER, "")
        self._query_model = (query or {}).get("model")
        self.settings = defaults
        self.config = RealtimeConfig(model=self._query_model or "", voice=self._default_voice_name())
        self.session_id = ""
        self._in = Resampler(WIRE_RATE_HZ[PCM], INPUT_SAMPLE_RATE)
        self._reply: _Reply | None = None
        self._events = 0

    # ---- handshake -------------------------------------------------------------------------------------

    def handshake_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """The key of an `openai-insecure-api-key.<key>` subprotocol entry (browsers), or None."""
        lowered = {k.lower(): v for k, v in headers.items()}
        for entry in _subprotocols(lowered):
            if entry.startswith(KEY_SUBPROTOCOL_PREFIX) and len(entry) > len(KEY_SUBPROTOCOL_PREFIX):
                return entry[len(KEY_SUBPROTOCOL_PREFIX):]
        return None

    def on_accept(self) -> list[ClientEvent]:
        """The session opens with the connection; a beta client is refused (BetaInterfaceRefused)."""
        if self._beta:
            raise BetaInterfaceRefused(
                "expected a client of the GA Realtime interface, got one of the retired beta interface "
                "(OpenAI-Beta: realtime=v1); drop the header and use the GA event names (e.g. "
                "client.realtime.connect instead of client.beta.realtime.connect)"
            )
        rate = WIRE_RATE_HZ[self.config.input_format]
        return [StartSession(self.settings, rate, 20, WIRE_RATE_HZ[self.config.output_format])]

    # ---- client -> server ------------------------------------------------------------------------------

    def decode(self, message: str | bytes) -> list[ClientEvent]:
        """One WebSocket message -> client events; raises RealtimeRequestError (non-fatal) for bad input."""
        if isinstance(message, (bytes, bytearray, memoryview)):
            raise RealtimeRequestError(
                BAD_MESSAGE, f"expected JSON text messages (audio goes base64 in input_audio_buffer.append), "
                f"got a binary message of {len(message)} bytes"
            )
        try:
            obj = json.loads(message)
        except (json.JSONDecodeError, RecursionError):
            raise RealtimeRequestError(BAD_JSON, f"expected a JSON text message, got {_preview(message)}") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("type"), str):
            raise RealtimeRequestError(
                BAD_MESSAGE, f"expected a JSON object with a string 'type', got {_preview(message)}"
            )
        event_id = obj.get("event_id")
        if event_id is not None and not isinstance(event_id, str):
            raise RealtimeRequestError(BAD_FIELD, f"event_id: expected a string, got {_preview(event_id)}",
                                       param="event_id")
        kind = obj["type"]
        handler = self._handlers().get(kind)
        try:
            if handler is None:
                raise RealtimeRequestError(UNKNOWN_TYPE, f"type: expected a GA client event "
                                           f"({', '.join(CLIENT_EVENT_TYPES)}), got {_preview(kind)}", param="type")
            return handler(obj, event_id)
        except RealtimeRequestError as e:
            e.event_id = event_id
            raise

    def _handlers(self) -> dict[str, Callable[[dict[str, Any], str | None], list[ClientEvent]]]:
        return {
            "session.update": self._session_update,
            "input_audio_buffer.append": self._append,
            "input_audio_buffer.commit": lambda obj, eid: [CommitInput(eid)],
            "input_audio_buffer.clear": lambda obj, eid: [ClearInput(eid)],
            "conversation.item.create": self._item_create,
            "conversation.item.delete": lambda obj, eid: [DeleteItem(_item_id(obj), eid)],
            "conversation.item.retrieve": lambda obj, eid: [RetrieveItem(_item_id(obj), eid)],
            "conversation.item.truncate": self._truncate,
            "response.create": self._response_create,
            "response.cancel": self._response_cancel,
        }

    def _session_update(self, obj: dict[str, Any], event_id: str | None) -> list[ClientEvent]:
        s = _object(obj, "session", required=True)
        kind = s.get("type", "realtime")
        if kind != "realtime":
            raise _bad("session.type", "'realtime' (transcription sessions are not served here)", kind)
        notes: list[FieldRejected] = []
        config, settings = self.config, self.settings
        turn = settings.turn
        for name, ga in BETA_SESSION_FIELDS.items():
            if name in s:
                notes.append(FieldRejected(UNSUPPORTED, f"session.{name}: a beta field, ignored; the GA interface "
                                                        f"uses session.{ga}"))
        known = {"instructions", "output_modalities", "audio", "max_output_tokens", "tools", "tool_choice",
                 *SILENT_SESSION_FIELDS, *BETA_SESSION_FIELDS}
        unknown = sorted(set(s) - known)
        if unknown:
            notes.append(FieldRejected(UNSUPPORTED, f"session: unknown fields {unknown} ignored"))
        if "model" in s:
            config = dataclasses.replace(config, model=_string("session.model", s["model"]))
        for name in ("tracing", "truncation", "include", "prompt"):
            if name in s:
                config = dataclasses.replace(config, **{name: s[name]})
        if "instructions" in s:
            settings = dataclasses.replace(settings, instructions=_optional_string("session.instructions",
                                                                                    s["instructions"]))
        if "output_modalities" in s:
            settings = dataclasses.replace(settings, modality=_modality("session.output_modalities",
                                                                        s["output_modalities"]))
        if "max_output_tokens" in s:
            limit, echo = self._max_tokens("session.max_output_tokens", s["max_output_tokens"])
            turn = dataclasses.replace(turn, max_new_tokens=limit)
            config = dataclasses.replace(config, max_output_tokens=echo)
        notes += _tools_notes("session", s)
        audio = _object(s, "audio", where="session")
        inp = _object(audio, "input", where="session.audio")
        out = _object(audio, "output", where="session.audio")
        if "format" in inp:
            config = dataclasses.replace(config, input_format=_format("session.audio.input.format", inp["format"]))
        if "noise_reduction" in inp:
            nr = inp["noise_reduction"]
            if nr is not None and not isinstance(nr, dict):
                raise _bad("session.audio.input.noise_reduction", "an object or null", nr)
            config = dataclasses.replace(config, noise_reduction=nr)
        if "transcription" in inp:
            tr, tr_notes = _transcription(inp["transcription"])
            notes += tr_notes
            config = dataclasses.replace(config, transcription=tr)
            settings = dataclasses.replace(settings, transcribe=tr is not None)
        if "turn_detection" in inp:
            settings, config = self._turn_detection(inp["turn_detection"], settings, config)
        if "format" in out:
            config = dataclasses.replace(config, output_format=_format("session.audio.output.format", out["format"]))
        if "voice" in out:
            voice, voice_echo, note = self._voice("session.audio.output.voice", out["voice"])
            turn = dataclasses.replace(turn, voice=voice)
            config = dataclasses.replace(config, voice=voice_echo)
            notes += note
        if "speed" in out:
            speed = out["speed"]
            if not _is_number(speed) or not SPEED_RANGE[0] <= speed <= SPEED_RANGE[1]:
                raise _bad("session.audio.output.speed", f"a number in [{SPEED_RANGE[0]}, {SPEED_RANGE[1]}]", speed)
            if speed != 1.0:
                notes.append(FieldRejected(UNSUPPORTED, f"session.audio.output.speed: only 1.0 is served, got "
                                                        f"{speed}; speaking at 1.0"))
            config = dataclasses.replace(config, speed=float(speed))
        settings = self._checked(dataclasses.replace(settings, turn=turn))
        if config.input_format != self.config.input_format:
            self._in = Resampler(WIRE_RATE_HZ[config.input_format], INPUT_SAMPLE_RATE)
        self.settings, self.config = settings, config
        return [UpdateSettings(settings), *notes]

    def _turn_detection(self, td: Any, settings: SessionSettings,
                        config: RealtimeConfig) -> tuple[SessionSettings, RealtimeConfig]:
        where = "session.audio.input.turn_detection"
        if td is None:
            return dataclasses.replace(settings, turn_detection=False), config
        if not isinstance(td, dict):
            raise _bad(where, "an object or null", td)
        kind = td.get("type", "server_vad")
        base = self.defaults.vad
        create = _flag(f"{where}.create_response", td.get("create_response"))
        interrupt = _flag(f"{where}.interrupt_response", td.get("interrupt_response"))
        if kind == "semantic_vad":
            eagerness = td.get("eagerness") or "auto"
            if eagerness not in EAGERNESS:
                raise _bad(f"{where}.eagerness", f"one of {EAGERNESS}", eagerness)
            vad = dataclasses.replace(base, silence_ms=EAGERNESS_SILENCE_MS.get(eagerness, base.silence_ms))
            config = dataclasses.replace(config, vad_type="semantic_vad", eagerness=eagerness, threshold=None)
            return dataclasses.replace(settings, vad=vad, turn_detection=True, idle_timeout_ms=None,
                                       create_response=create, interrupt_response=interrupt), config
        if kind != "server_vad":
            raise _bad(f"{where}.type", "'server_vad', 'semantic_vad' (or turn_detection null)", kind)
        changes: dict[str, Any] = {}
        threshold = td.get("threshold")
        if threshold is not None:
            if not _is_number(threshold) or not 0.0 <= threshold <= 1.0:
                raise _bad(f"{where}.threshold", "a number in [0, 1]", threshold)
            if base.kind == "silero":
                lo, hi = SILERO_THRESHOLD_RANGE
                changes["silero_threshold"] = min(max(float(threshold), lo), hi)
            else:
                changes["aggressiveness"] = min(WEBRTC_BUCKETS - 1, int(threshold * WEBRTC_BUCKETS))
        for wire, ours in (("prefix_padding_ms", "prefix_padding_ms"), ("silence_duration_ms", "silence_ms")):
            value = td.get(wire)
            if value is not None:
                if not _is_int(value):
                    raise _bad(f"{where}.{wire}", "an integer number of milliseconds", value)
                changes[ours] = value
        idle = td.get("idle_timeout_ms")
        if idle is not None and not (_is_int(idle) and IDLE_TIMEOUT_MS_RANGE[0] <= idle <= IDLE_TIMEOUT_MS_RANGE[1]):
            raise _bad(f"{where}.idle_timeout_ms", "an integer {}..{} or null".format(*IDLE_TIMEOUT_MS_RANGE), idle)
        try:
            vad = dataclasses.replace(base, **changes)
        except (VoiceAgentError, ValueError) as e:
            raise RealtimeRequestError(BAD_FIELD, f"{where}: {e}", param=where) from None
        config = dataclasses.replace(config, vad_type="server_vad", threshold=threshold)
        return dataclasses.replace(settings, vad=vad, turn_detection=True, idle_timeout_ms=idle,
                                   create_response=create, interrupt_response=interrupt), config

    def _voice(self, where: str, value: Any) -> tuple[str | None, str | dict[str, str], list[FieldRejected]]:
        """(engine voice or None for the default, the name to echo, a note for an unknown non-OpenAI name)."""
        echo: str | dict[str, str]
        if isinstance(value, dict) and isinstance(value.get("id"), str):
            name, echo = value["id"], {"id": value["id"]}
        elif isinstance(value, str):
            name, echo = value, value
        else:
            raise _bad(where, "a voice name or {'id': name}", value)
        engine_voices = self.engine.voices if self.engine is not None else ()
        if name in engine_voices or (self.engine is not None and name == self.engine.default_voice):
            return name, echo, []
        if self.engine is None and 1 <= len(name) <= MAX_VOICE_CHARS and name not in OPENAI_VOICES:
            return name, echo, []  # nothing to check against
        if name in OPENAI_VOICES or isinstance(value, dict):
            return None, echo, []
        shown = list(engine_voices[:10])
        return None, echo, [FieldRejected(UNSUPPORTED, f"{where}: expected one of {shown} or an OpenAI voice name, "
                                                       f"got {_preview(name)}; speaking with the default voice")]

    def _max_tokens(self, where: str, value: Any) -> tuple[int | None, int | Literal["inf"]]:
        """(TurnSettings.max_new_tokens, the value to echo): "inf" is the engine's limit, larger is clamped."""
        if value == "inf" or value is None:
            return None, "inf"
        if not _is_int(value) or value < 1:
            raise _bad(where, "an integer >= 1 or 'inf'", value)
        if self.engine is not None:
            value = min(value, self.engine.max_new_tokens)
        return value, value

    def _checked(self, settings: SessionSettings) -> SessionSettings:
        if self.engine is not None:
            try:
                self.engine.check_turn(settings.turn)
            except VoiceAgentError as e:
                raise RealtimeRequestError(BAD_FIELD, str(e)) from None
        return settings

    def _default_voice_name(self) -> str:
        voice = self.defaults.turn.voice
        if voice is None and self.engine is not None and self.engine.default_voice in self.engine.voices:
            voice = self.engine.default_voice
        return voice or DEFAULT_VOICE_NAME

    def _append(self, obj: dict[str, Any], event_id: str | None) -> list[ClientEvent]:
        pcm = self._audio(obj.get("audio"), "audio")
        pcm = self._in.process(pcm)
        return [AudioFrame(pcm)] if len(pcm) else []

    def _audio(self, data: Any, where: str) -> np.ndarray:
        """Base64 audio in the session's input format -> float32 at the wire rate."""
        if not isinstance(data, str):
            raise _bad(where, "base64 audio (a string)", data)
        if len(data) > MAX_AUDIO_BASE64_CHARS:
            raise RealtimeRequestError(FRAME_TOO_LARGE, f"{where}: expected at most {MAX_AUDIO_BYTES} bytes of audio "
                                       f"per event (15 MiB), got {len(data)} base64 characters", param=where)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RealtimeRequestError(BAD_AUDIO, f"{where}: expected base64 audio, got {_preview(data)}",
                                       param=where) from None
        fmt = self.config.input_format
        if fmt == PCMU:
            return ulaw_to_float(raw)
        if fmt == PCMA:
            return alaw_to_float(raw)
        if len(raw) % PCM16_BYTES:
            raise RealtimeRequestError(BAD_AUDIO, f"{where}: expected PCM16 audio (an even number of bytes), got "
                                       f"{len(raw)} bytes", param=where)
        return pcm16_to_float(raw)

    def _item_create(self, obj: dict[str, Any], event_id: str | None) -> list[ClientEvent]:
        previous = obj.get("previous_item_id")
        if previous is not None and not isinstance(previous, str):
            raise _bad("previous_item_id", "an item id (a string), 'root' or null", previous)
        item = _object(obj, "item", required=True)
        if item.get("type", "message") != "message":
            raise _bad("item.type", "'message' (function calls and other items are not served)", item.get("type"))
        item_id = item.get("id")
        if item_id is None:
            item_id = f"item_{secrets.token_hex(10)}"
        elif not (isinstance(item_id, str) and 1 <= len(item_id) <= MAX_ITEM_ID_CHARS):
            raise _bad("item.id", f"a string of 1..{MAX_ITEM_ID_CHARS} characters", item_id)
        role = item.get("role")
        if role not in ("user", "assistant", "system"):
            raise _bad("item.role", "'user', 'assistant' or 'system'", role)
        content = item.get("content")
        if not isinstance(content, list) or not content or not all(isinstance(p, dict) for p in content):
            raise _bad("item.content", "a non-empty list of content parts (objects)", content)
        allowed = {"user": ("input_text", "input_audio"), "system": ("input_text",),
                   "assistant": ("output_text", "text", "output_audio", "audio")}[role]
        kinds = [p.get("type") for p in content]
        for i, k in enumerate(kinds):
            if k not in allowed:
                raise _bad(f"item.content[{i}].type", f"one of {allowed} for a {role} item", k)
        if role == "user" and "input_audio" in kinds:
            if len(content) != 1:
                raise _bad("item.content", "one input_audio part, or input_text parts", kinds)
            part = content[0]
            rate = WIRE_RATE_HZ[self.config.input_format]
            audio = resample(self._audio(part.get("audio"), "item.content[0].audio"), rate, INPUT_SAMPLE_RATE)
            transcript = part.get("transcript")
            if transcript is not None and not isinstance(transcript, str):
                raise _bad("item.content[0].transcript", "a string or null", transcript)
            new = Item(item_id, "user", text=transcript, audio=audio, kind="audio")
        elif role == "assistant" and any(k in ("output_audio", "audio") for k in kinds):
            new = Item(item_id, "assistant", text=_joined(content, "transcript"), kind="audio")
        else:
            new = Item(item_id, role, text=_joined(content, "text"), kind="text")
        return [CreateItem(new, previous, event_id)]

    def _truncate(self, obj: dict[str, Any], event_id: str | None) -> list[ClientEvent]:
        item_id = _item_id(obj)
        index = obj.get("content_index", 0)
        if not _is_int(index) or index < 0:
            raise _bad("content_index", "an integer >= 0", index)
        end = obj.get("audio_end_ms")
        if not isinstance(end, (int, float)) or isinstance(end, bool) or not math.isfinite(end) or end < 0:
            raise _bad("audio_end_ms", "a number of milliseconds >= 0", end)
        return [TruncateItem(item_id, float(end), index, event_id)]

    def _response_create(self, obj: dict[str, Any], event_id: str | None) -> list[ClientEvent]:
        r = _object(obj, "response")
        notes = _tools_notes("response", r)
        instructions = _optional_string("response.instructions", r.get("instructions"))
        conversation = r.get("conversation", "auto")
        if conversation not in ("auto", "none", None):
            raise _bad("response.conversation", "'auto' or 'none'", conversation)
        metadata = r.get("metadata")
        if metadata is not None and not (
            isinstance(metadata, dict) and len(metadata) <= MAX_METADATA_PAIRS
            and all(isinstance(k, str) and isinstance(v, str) and len(k) <= MAX_METADATA_KEY_CHARS
                    and len(v) <= MAX_METADATA_VALUE_CHARS for k, v in metadata.items())
        ):
            raise _bad("response.metadata", f"at most {MAX_METADATA_PAIRS} string pairs (keys up to "
                       f"{MAX_METADATA_KEY_CHARS}, values up to {MAX_METADATA_VALUE_CHARS} characters)", metadata)
        modality = self.settings.modality
        if r.get("output_modalities") is not None:
            modality = _modality("response.output_modalities", r["output_modalities"])
        turn: TurnSettings | None = None
        if r.get("max_output_tokens") is not None:
            limit, _ = self._max_tokens("response.max_output_tokens", r["max_output_tokens"])
            turn = dataclasses.replace(self.settings.turn, max_new_tokens=limit)
        out = _object(_object(r, "audio", where="response"), "output", where="response.audio")
        if out.get("voice") is not None:
            voice, _, note = self._voice("response.audio.output.voice", out["voice"])
            notes += note
            turn = dataclasses.replace(turn or self.settings.turn, voice=voice)
        if out.get("format") is not None and _format("response.audio.output.format", out["format"]) != \
                self.config.output_format:
            notes.append(FieldRejected(UNSUPPORTED, "response.audio.output.format: a per-response format is not "
                                                    f"served; using the session's {self.config.output_format}"))
        if r.get("input") is not None:
            notes.append(FieldRejected(UNSUPPORTED, "response.input: not served; the response reads the "
                                                    "conversation"))
        if turn is not None:
            try:
                self._checked(dataclasses.replace(self.settings, turn=turn))
            except RealtimeRequestError as e:
                e.param = "response"
                raise
        options = ResponseOptions(instructions, conversation != "none", metadata, modality, turn)
        return [CreateResponse(options, event_id), *notes]

    def _response_cancel(self, obj: dict[str, Any], event_id: str | None) -> list[ClientEvent]:
        rid = obj.get("response_id")
        if rid is not None and not isinstance(rid, str):
            raise _bad("response_id", "a response id (a string) or null", rid)
        return [CancelResponse(rid, event_id)]

    # ---- server -> client ------------------------------------------------------------------------------

    def audio_ms(self, message: str | bytes) -> float:
        return 0.0  # not paced

    def encode(self, event: ServerEvent) -> list[str | bytes]:
        """One server event -> the GA events that carry it, in order (canonical order: protocols.md §5.3)."""
        return [json.dumps(self._stamp(m), separators=(",", ":")) for m in self._messages(event)]

    def _stamp(self, message: dict[str, Any]) -> dict[str, Any]:
        self._events += 1
        return {"event_id": f"event_{self._events}", **message}

    def _messages(self, event: ServerEvent) -> list[dict[str, Any]]:  # noqa: C901 - one branch per event
        if isinstance(event, SessionStarted):
            self.session_id = event.session_id
            if not self.config.model:
                self.config = dataclasses.replace(self.config, model=event.model)
            return [{"type": "session.created", "session": self.session_json(event.settings)}]
        if isinstance(event, SettingsUpdated):
            return [{"type": "session.updated", "session": self.session_json(event.settings)}]
        if isinstance(event, SpeechStarted):
            return [{"type": "input_audio_buffer.speech_started", "audio_start_ms": round(event.at_ms),
                     "item_id": event.item_id or ""}]
        if isinstance(event, SpeechStopped):
            return [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": round(event.at_ms),
                     "item_id": event.item_id or ""}]
        if isinstance(event, InputCommitted):
            return [{"type": "input_audio_buffer.committed", "item_id": event.item_id,
                     "previous_item_id": event.previous_item_id}]
        if isinstance(event, InputCleared):
            return [{"type": "input_audio_buffer.cleared"}]
        if isinstance(event, InputTimeout):
            return [{"type": "input_audio_buffer.timeout_triggered", "audio_start_ms": round(event.audio_start_ms),
                     "audio_end_ms": round(event.audio_end_ms), "item_id": event.item_id}]
        if isinstance(event, ItemAdded):
            added = {"type": "conversation.item.added", "previous_item_id": event.previous_item_id,
                     "item": item_json(event.item)}
            done = {**added, "type": "conversation.item.done"}
            return [added, done] if event.done else [added]
        if isinstance(event, ItemDone):
            return [{"type": "conversation.item.done", "item": item_json(event.item)}]
        if isinstance(event, ItemDeleted):
            return [{"type": "conversation.item.deleted", "item_id": event.item_id}]
        if isinstance(event, ItemRetrieved):
            return [{"type": "conversation.item.retrieved", "item": item_json(event.item)}]
        if isinstance(event, ItemTruncated):
            return [{"type": "conversation.item.truncated", "item_id": event.item_id,
                     "content_index": event.content_index, "audio_end_ms": round(event.audio_end_ms)}]
        if isinstance(event, UserTranscript):
            return [_transcript_json(event)]
        if isinstance(event, ResponseStarted):
            return self._response_started(event)
        if isinstance(event, ResponseText):
            return self._response_text(event)
        if isinstance(event, ResponseAudio):
            return self._response_audio(event)
        if isinstance(event, ResponseFinished):
            return self._response_finished(event)
        if isinstance(event, (Interrupted, DtmfReceived)):
            return []  # response.done (cancelled) carries an interruption; a Realtime client sends no DTMF
        if isinstance(event, ErrorEvent):
            kind = "server_error" if event.code in SERVER_FAULT_CODES else "invalid_request_error"
            return [{"type": "error", "error": {"type": kind, "code": event.code, "message": event.message,
                                                "param": event.param, "event_id": event.event_id}}]
        raise TypeError(f"expected a server event, got {type(event).__name__}")

    def _response_started(self, event: ResponseStarted) -> list[dict[str, Any]]:
        opts = event.options
        turn = opts.turn
        voice = turn.voice if turn is not None and turn.voice is not None else self.config.voice
        max_tokens: int | Literal["inf"] = self.config.max_output_tokens
        if turn is not None and turn.max_new_tokens is not None:
            max_tokens = turn.max_new_tokens
        reply = _Reply(event.response_id, event.item_id, opts, voice, max_tokens)
        if self.config.output_format != PCM:
            reply.out = Resampler(OUTPUT_SAMPLE_RATE, G711_SAMPLE_RATE)
        self._reply = reply
        item = self._reply_item(reply, "in_progress", text="")
        messages: list[dict[str, Any]] = [
            {"type": "response.created", "response": self._response_json(reply, "in_progress")},
            {"type": "response.output_item.added", "response_id": reply.response_id, "output_index": 0,
             "item": {**item, "content": []}},
        ]
        if opts.keep:
            messages.append({"type": "conversation.item.added", "previous_item_id": event.previous_item_id,
                             "item": {**item, "content": []}})
        messages.append({**self._part_ids(reply), "type": "response.content_part.added",
                         "part": _part(opts.modality, "")})
        return messages

    def _response_text(self, event: ResponseText) -> list[dict[str, Any]]:
        reply = self._reply_for(event.response_id)
        reply.transcript.append(event.text)
        kind = "response.output_text.delta" if reply.options.modality == "text" else \
            "response.output_audio_transcript.delta"
        return [{**self._part_ids(reply), "type": kind, "delta": event.text}]

    def _response_audio(self, event: ResponseAudio) -> list[dict[str, Any]]:
        reply = self._reply_for(event.response_id)
        if reply.options.modality == "text":
            return []
        pcm = reply.out.process(event.pcm) if reply.out is not None else event.pcm
        return self._audio_delta(reply, pcm)

    def _audio_delta(self, reply: _Reply, pcm: np.ndarray) -> list[dict[str, Any]]:
        if not len(pcm):
            return []
        fmt = self.config.output_format
        data = float_to_ulaw(pcm) if fmt == PCMU else float_to_alaw(pcm) if fmt == PCMA else float_to_pcm16(pcm)
        return [{**self._part_ids(reply), "type": "response.output_audio.delta",
                 "delta": base64.b64encode(data).decode("ascii")}]

    def _response_finished(self, event: ResponseFinished) -> list[dict[str, Any]]:
        reply = self._reply_for(event.response_id, item_id=event.item_id)
        self._reply = None
        status, details = _status(event)
        item_status = "completed" if status == "completed" else "incomplete"
        sent = "".join(reply.transcript)
        ids = self._part_ids(reply)
        messages: list[dict[str, Any]] = []
        if reply.options.modality == "text":
            messages.append({**ids, "type": "response.output_text.done", "text": sent})
        else:
            if reply.out is not None:
                messages += self._audio_delta(reply, reply.out.flush())
            messages.append({**ids, "type": "response.output_audio.done"})
            messages.append({**ids, "type": "response.output_audio_transcript.done", "transcript": sent})
        messages.append({**ids, "type": "response.content_part.done", "part": _part(reply.options.modality, sent)})
        item = self._reply_item(reply, item_status, text=event.text if reply.options.keep else sent)
        messages.append({"type": "response.output_item.done", "response_id": reply.response_id, "output_index": 0,
                         "item": item})
        if reply.options.keep:
            messages.append({"type": "conversation.item.done", "item": item})
        audio_tokens = round(event.audio_ms / UNIT_MS)
        output_tokens = event.output_tokens + audio_tokens
        usage = {"total_tokens": event.input_tokens + output_tokens, "input_tokens": event.input_tokens,
                 "output_tokens": output_tokens, "input_token_details": {"cached_tokens": 0},
                 "output_token_details": {"text_tokens": event.output_tokens, "audio_tokens": audio_tokens}}
        response = {**self._response_json(reply, status), "status_details": details, "output": [item],
                    "usage": usage}
        messages.append({"type": "response.done", "response": response})
        return messages

    def _reply_for(self, response_id: str, item_id: str = "") -> _Reply:
        """The reply being streamed; a stand-in for events of a response this adapter did not see start."""
        reply = self._reply
        if reply is None or reply.response_id != response_id:
            reply = _Reply(response_id, item_id, ResponseOptions(modality=self.settings.modality),
                           self.config.voice, self.config.max_output_tokens)
            self._reply = reply
        return reply

    def _part_ids(self, reply: _Reply) -> dict[str, Any]:
        return {"response_id": reply.response_id, "item_id": reply.item_id, "output_index": 0, "content_index": 0}

    def _reply_item(self, reply: _Reply, status: str, text: str) -> dict[str, Any]:
        kind: Literal["text", "audio"] = "text" if reply.options.modality == "text" else "audio"
        return item_json(Item(reply.item_id, "assistant", text=text, status=status, kind=kind))  # type: ignore[arg-type]

    def _response_json(self, reply: _Reply, status: str) -> dict[str, Any]:
        opts = reply.options
        return {
            "id": reply.response_id, "object": "realtime.response", "status": status, "status_details": None,
            "output": [], "conversation_id": f"conv_{self.session_id}" if opts.keep else None,
            "output_modalities": [opts.modality],
            "audio": {"output": {"format": _format_json(self.config.output_format), "voice": reply.voice}},
            "max_output_tokens": reply.max_output_tokens, "metadata": opts.metadata, "usage": None,
        }

    def session_json(self, settings: SessionSettings) -> dict[str, Any]:
        """The full effective GA session object (session.created / session.updated)."""
        c = self.config
        return {
            "type": "realtime", "object": "realtime.session", "id": self.session_id, "model": c.model,
            "output_modalities": [settings.modality], "instructions": settings.instructions or "",
            "audio": {
                "input": {"format": _format_json(c.input_format), "transcription": c.transcription,
                          "noise_reduction": c.noise_reduction,
                          "turn_detection": self._turn_detection_json(settings)},
                "output": {"format": _format_json(c.output_format), "voice": c.voice, "speed": c.speed},
            },
            "max_output_tokens": c.max_output_tokens, "tools": [], "tool_choice": "auto", "tracing": c.tracing,
            "truncation": c.truncation, "include": c.include, "prompt": c.prompt,
        }

    def _turn_detection_json(self, settings: SessionSettings) -> dict[str, Any] | None:
        if not settings.turn_detection:
            return None
        flags = {"create_response": settings.create_response, "interrupt_response": settings.interrupt_response}
        c, vad = self.config, settings.vad
        if c.vad_type == "semantic_vad":
            return {"type": "semantic_vad", "eagerness": c.eagerness, **flags}
        threshold = c.threshold
        if threshold is None:
            threshold = vad.silero_threshold if vad.kind == "silero" else vad.aggressiveness / WEBRTC_BUCKETS
        return {"type": "server_vad", "threshold": threshold, "prefix_padding_ms": vad.prefix_padding_ms,
                "silence_duration_ms": vad.silence_ms, "idle_timeout_ms": settings.idle_timeout_ms, **flags}


# ---- GA shapes --------------------------------------------------------------------------------------------


def item_json(item: Item) -> dict[str, Any]:
    """A conversation item as a GA `realtime.item` message."""
    part: dict[str, Any]
    if item.role == "user" and item.kind == "audio":
        part = {"type": "input_audio", "transcript": item.text}
    elif item.role == "assistant" and item.kind == "audio":
        part = {"type": "output_audio", "transcript": item.text or ""}
    elif item.role == "assistant":
        part = {"type": "output_text", "text": item.text or ""}
    else:
        part = {"type": "input_text", "text": item.text or ""}
    return {"id": item.id, "type": "message", "object": "realtime.item", "status": item.status,
            "role": item.role, "content": [part]}


def _part(modality: str, text: str) -> dict[str, Any]:
    return {"type": "text", "text": text} if modality == "text" else {"type": "audio", "transcript": text}


def _status(event: ResponseFinished) -> tuple[str, dict[str, Any] | None]:
    """response.done's (status, status_details) for an engine reason."""
    if event.reason == "eos":
        return "completed", None
    if event.reason == "max_tokens":
        return "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}
    if event.reason == "cancelled":
        return "cancelled", {"type": "cancelled", "reason": event.cause or "client_cancelled"}
    return "failed", {"type": "failed", "error": {"type": "server_error", "code": "engine_error",
                                                  "message": "the response failed (see the error event)"}}


def _transcript_json(event: UserTranscript) -> dict[str, Any]:
    ids = {"item_id": event.item_id, "content_index": 0}
    if event.error is not None:
        return {**ids, "type": "conversation.item.input_audio_transcription.failed",
                "error": {"type": "server_error", "code": "transcription_failed", "message": event.error}}
    if event.final:
        return {**ids, "type": "conversation.item.input_audio_transcription.completed", "transcript": event.text,
                "usage": {"type": "duration", "seconds": round(event.audio_seconds, 3)}}
    return {**ids, "type": "conversation.item.input_audio_transcription.delta", "delta": event.delta}


def _format_json(fmt: str) -> dict[str, Any]:
    return {"type": PCM, "rate": OUTPUT_SAMPLE_RATE} if fmt == PCM else {"type": fmt}


# ---- reading client fields --------------------------------------------------------------------------------


def _bad(param: str, expected: str, got: Any) -> RealtimeRequestError:
    return RealtimeRequestError(BAD_FIELD, f"{param}: expected {expected}, got {_preview(got)}", param=param)


def _preview(value: Any, limit: int = 60) -> str:
    """A client value for an error message: a string quoted, anything else as JSON, cut to `limit`."""
    if isinstance(value, str):
        return repr(value if len(value) <= limit else value[:limit] + "...")
    text = json.dumps(value) if _jsonable(value) else repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _jsonable(value: Any) -> bool:
    try:
        json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return False
    return True


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _object(obj: dict[str, Any], name: str, *, required: bool = False, where: str = "") -> dict[str, Any]:
    value = obj.get(name)
    param = f"{where}.{name}" if where else name
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise _bad(param, "an object", value)
    return value


def _string(param: str, value: Any) -> str:
    if not isinstance(value, str):
        raise _bad(param, "a string", value)
    return value


def _optional_string(param: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise _bad(param, "a string or null", value)
    return value


def _flag(param: str, value: Any) -> bool:
    if value is None:
        return True  # OpenAI's behaviour when unset: respond and interrupt automatically
    if not isinstance(value, bool):
        raise _bad(param, "true, false or null", value)
    return value


def _modality(param: str, value: Any) -> Literal["audio", "text"]:
    if value == ["text"]:
        return "text"
    if isinstance(value, list) and value and set(value) <= {"audio", "text"}:
        return "audio"  # audio always comes with its transcript
    raise _bad(param, "['audio'] or ['text']", value)


def _format(param: str, value: Any) -> AudioFormat:
    if isinstance(value, str) and value in BETA_FORMATS:
        return BETA_FORMATS[value]  # type: ignore[return-value]
    if not isinstance(value, dict) or value.get("type") not in WIRE_RATE_HZ:
        raise _bad(param, f"{{'type': one of {tuple(WIRE_RATE_HZ)}}}", value)
    fmt: AudioFormat = value["type"]
    rate = value.get("rate")
    if rate is not None and rate != WIRE_RATE_HZ[fmt]:
        raise _bad(f"{param}.rate", f"{WIRE_RATE_HZ[fmt]} ({fmt} is {WIRE_RATE_HZ[fmt]} Hz only)", rate)
    return fmt


def _transcription(value: Any) -> tuple[dict[str, Any] | None, list[FieldRejected]]:
    param = "session.audio.input.transcription"
    if value is None:
        return None, []
    if not isinstance(value, dict):
        raise _bad(param, "an object or null", value)
    for name in ("model", "language", "prompt"):
        if value.get(name) is not None and not isinstance(value[name], str):
            raise _bad(f"{param}.{name}", "a string", value[name])
    notes = [FieldRejected(UNSUPPORTED, f"{param}.{name}: not served; the transcript is Whisper's without it")
             for name in ("prompt", "keywords") if value.get(name)]
    return dict(value), notes


def _tools_notes(where: str, obj: dict[str, Any]) -> list[FieldRejected]:
    notes: list[FieldRejected] = []
    tools = obj.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise _bad(f"{where}.tools", "a list", tools)
    if tools:
        notes.append(FieldRejected(UNSUPPORTED, f"{where}.tools: tool calls are not served; the model will not "
                                                f"call the {len(tools)} tool(s)"))
    choice = obj.get("tool_choice")
    if choice is not None and choice not in ("auto", "none"):
        notes.append(FieldRejected(UNSUPPORTED, f"{where}.tool_choice: expected 'auto' or 'none' (tool calls are "
                                                f"not served), got {_preview(choice)}"))
    return notes


def _item_id(obj: dict[str, Any]) -> str:
    value = obj.get("item_id")
    if not isinstance(value, str) or not value:
        raise _bad("item_id", "an item id (a non-empty string)", value)
    return value


def _joined(content: list[dict[str, Any]], key: str) -> str:
    texts = []
    for i, part in enumerate(content):
        text = part.get(key)
        if text is None and key == "text":
            text = part.get("transcript")
        if not isinstance(text, str):
            raise _bad(f"item.content[{i}].{key}", "a string", text)
        texts.append(text)
    return "\n".join(texts)


def _subprotocols(headers: Mapping[str, str]) -> list[str]:
    raw = headers.get("sec-websocket-protocol", "")
    return [p.strip() for p in raw.split(",") if p.strip()]
