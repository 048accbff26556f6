"""What every carrier media stream shares, Sans-I/O: `CarrierProtocol`, the base of the telephony adapters.

A phone carrier (Twilio and its dialects in `twilio.py`, `telnyx.py`, `plivo.py`, `vonage.py`) opens a
WebSocket to the server for one call and streams the caller's audio in small frames of a telephony codec;
the server streams reply audio back the same way, plus two control messages every carrier has under its own
name: a *marker* (the carrier echoes it once the audio sent before it has played) and a *clear* (the
carrier drops the audio it has buffered). A subclass says how its wire spells these (`decode` and the
`_media_message` / `_mark_message` / `_clear_message` builders); this base keeps the connection's wire state
and does the rest, so every carrier behaves the same:

- opening: the session opens on the carrier's start message (`_open`), never on accept (`on_accept` is []);
  media before it is `start_required`, a second start `duplicate_start`;
- settings: the server's defaults with the phone-line tuning on top (`phone_line_settings`), then the call's
  custom parameters (`voice`, `instructions`, `silence_ms`; `key` becomes `StartSession.key`). A parameter
  this server does not know, or a value it cannot use, is reported (`FieldRejected`, `bad_field`) and the
  call goes on with the default: a typo in a TwiML must not leave a caller in silence;
- audio in: the carrier's codec at its rate -> float32 16 kHz through one streaming `Resampler` per call
  (state kept across frames: resetting it per chunk is the classic cause of choppy telephony audio);
- audio out: each reply's 24 kHz audio goes through its own streaming resampler to the carrier's rate and is
  cut into fixed frames of `frame_ms` (20 ms), a partial frame carried to the next chunk and, at
  `ResponseFinished`, padded with silence and sent. After each chunk's frames comes a marker named
  `"<response id>:<ms>"`, where ms is the end of the audio sent so far in that reply (carrier-rate samples
  sent / rate); the carrier's echo becomes `PlaybackProgress(response id, ms)`, the position the session
  cuts the history at on barge-in;
- barge-in: `Interrupted` -> clear; the reply's unsent partial frame and resampler are dropped, later audio
  of that reply is ignored, and echoes of its markers are ignored too (Twilio echoes the marks a clear
  dropped, which would otherwise report audio the caller never heard as played);
- pacing: `pace_lead_ms` is set, so the connection sends the frames in real time; `audio_ms` says how much
  audio a message carries (a whole frame for a media message, 0 for control messages);
- malformed input of any kind is a `ProtocolError` with a stable code (the codes of `events.py`) and an
  "expected X, got Y" message; the connection reports it and the call goes on.

Phone-line defaults (`phone_line_settings`): a caller's line is noisy and the far end's echo canceller is
imperfect, so webrtcvad runs at its most aggressive mode (PHONE_VAD_AGGRESSIVENESS), a turn ends after a
longer pause (PHONE_SILENCE_MS: people pause longer on the phone, and line noise splits words), and a reply
is cut only by longer speech (PHONE_MIN_INTERRUPTION_MS: echo and "mhm" over a phone line are common).
When the silero-vad package (and torch) can be imported, the detector is silero, which tells steady line
noise from speech much better than webrtcvad.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import importlib.util
import json
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import numpy as np

from voice_agent.audio import (
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    PCM16_BYTES,
    Resampler,
    alaw_to_float,
    float_to_alaw,
    float_to_pcm16,
    float_to_pcm16be,
    float_to_ulaw,
    pcm16_to_float,
    pcm16be_to_float,
    ulaw_to_float,
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
    AudioFrame,
    ClientEvent,
    Dtmf,
    FieldRejected,
    Interrupted,
    PlaybackProgress,
    ResponseAudio,
    ResponseFinished,
    ResponseStarted,
    ServerEvent,
    StartSession,
)
from voice_agent.serve.settings import SessionSettings

START_TIMEOUT_S = 10.0  # carriers send their start message right after connecting
DEFAULT_LEAD_MS = 160.0  # reply audio queued ahead of the caller's playback
FRAME_MS = 20  # one outbound media frame: the RTP packet time of every carrier
MAX_PAYLOAD_MS = 1_000  # an inbound media message carries at most this much audio (carriers send 20..100 ms)
MAX_INSTRUCTIONS_CHARS = 8_000  # an `instructions` custom parameter longer than this is refused
CLEARED_REMEMBERED = 16  # cleared replies whose marker echoes are still recognised and ignored
DTMF_DIGITS = frozenset("0123456789*#ABCD")
MARK_SEPARATOR = ":"  # marker names: "<response id>:<ms of the reply sent>"
MARK_INTERVAL_MS = 100  # a playback marker at least this often within a chunk (the cut's resolution)

# The phone-line tuning (see the module docstring); the rest of the server's defaults stay.
PHONE_VAD_AGGRESSIVENESS = 3  # webrtcvad's most aggressive mode (the server default is 2)
PHONE_SILENCE_MS = 800  # a pause this long ends the caller's turn (the server default is 500)
PHONE_MIN_INTERRUPTION_MS = 600  # caller speech shorter than this does not cut a reply (default 400)

START_PARAMETERS = ("voice", "instructions", "silence_ms", "key")  # custom parameters a call may set


class WireState(Enum):
    AWAITING_START = "awaiting_start"
    OPEN = "open"


@dataclass(frozen=True)
class Codec:
    """A carrier's audio format: G.711 mu-law / A-law (one byte a sample) or 16-bit linear PCM (`l16`,
    little-endian unless `big_endian`: RTP's L16 is network byte order), mono at `rate_hz`."""

    encoding: Literal["mulaw", "alaw", "l16"]
    rate_hz: int
    big_endian: bool = False

    @property
    def bytes_per_sample(self) -> int:
        return PCM16_BYTES if self.encoding == "l16" else 1

    def bytes_per_ms(self) -> float:
        return self.rate_hz * self.bytes_per_sample / 1000

    def frame_samples(self, frame_ms: int) -> int:
        return self.rate_hz * frame_ms // 1000

    def decode(self, data: bytes) -> np.ndarray:
        """Wire bytes -> float32 samples (N,); the caller checked the size."""
        if self.encoding == "mulaw":
            return ulaw_to_float(data)
        if self.encoding == "alaw":
            return alaw_to_float(data)
        return pcm16be_to_float(data) if self.big_endian else pcm16_to_float(data)

    def encode(self, pcm: np.ndarray) -> bytes:
        if self.encoding == "mulaw":
            return float_to_ulaw(pcm)
        if self.encoding == "alaw":
            return float_to_alaw(pcm)
        return float_to_pcm16be(pcm) if self.big_endian else float_to_pcm16(pcm)


MULAW_8K = Codec("mulaw", 8_000)


def silero_available() -> bool:
    """Whether the silero detector can be built here (silero-vad and torch importable)."""
    return importlib.util.find_spec("silero_vad") is not None and importlib.util.find_spec("torch") is not None


def phone_line_settings(defaults: SessionSettings, *, silero: bool | None = None) -> SessionSettings:
    """The server's defaults tuned for a phone line (see the module docstring). `silero`: use the silero
    detector (None: when it is installed)."""
    use_silero = silero_available() if silero is None else silero
    vad = dataclasses.replace(
        defaults.vad,
        kind="silero" if use_silero else defaults.vad.kind,
        aggressiveness=PHONE_VAD_AGGRESSIVENESS,
        silence_ms=max(defaults.vad.silence_ms, PHONE_SILENCE_MS),
    )
    return dataclasses.replace(
        defaults, vad=vad, min_interruption_ms=max(defaults.min_interruption_ms, PHONE_MIN_INTERRUPTION_MS)
    )


@dataclass
class _Reply:
    """One reply's outbound state: its resampler, the carrier-rate samples not yet a whole frame, and how
    many carrier-rate samples of it were framed so far."""

    response_id: str
    resampler: Resampler | None
    pending: np.ndarray
    sent_samples: int = 0


class CarrierProtocol:
    """The wire state and translation every carrier shares; see the module docstring. Subclasses implement
    `decode` (with `_open`, `_audio`, `_mark_echo`, `_dtmf`) and the three message builders."""

    carrier = "carrier"  # the name in errors and logs
    frame_ms = FRAME_MS

    def __init__(self, defaults: SessionSettings, engine: EngineInfo | None = None, *,
                 lead_ms: float = DEFAULT_LEAD_MS) -> None:
        """`defaults`: the server's session defaults (the phone-line tuning is applied on top);
        `engine`: what the engine serves, to check a `voice` parameter against (None: not checked);
        `lead_ms`: how far ahead of the caller's playback reply audio is sent."""
        if not lead_ms >= 0:
            raise ValueError(f"lead_ms: expected a number >= 0, got {lead_ms!r}")
        self.defaults = phone_line_settings(defaults)
        self.engine = engine
        self.state = WireState.AWAITING_START
        self.settings = self.defaults
        self.stream_id: str | None = None
        self.call_id: str | None = None
        self.codec = MULAW_8K
        self.start_timeout_s = START_TIMEOUT_S
        self.subprotocol: str | None = None
        self.conversation_events = False
        self.pace_lead_ms: float | None = lead_ms
        self._in: Resampler | None = None
        self._reply: _Reply | None = None
        self._cleared: deque[str] = deque(maxlen=CLEARED_REMEMBERED)

    # ---- WireAdapter ------------------------------------------------------------------------------

    def handshake_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        return None  # a key comes as a custom parameter of the start message (`key`)

    def on_accept(self) -> list[ClientEvent]:
        return []  # the session opens on the carrier's start message

    def decode(self, message: str | bytes) -> list[ClientEvent]:
        raise NotImplementedError

    def audio_ms(self, message: str | bytes) -> float:
        """Every media message this adapter writes is one whole frame; control messages carry none."""
        return float(self.frame_ms) if self._is_media(message) else 0.0

    def encode(self, event: ServerEvent) -> list[str | bytes]:
        """Reply audio as fixed frames with a marker after each chunk; `clear` on Interrupted; nothing else
        (a carrier has no message for text, errors or the conversation)."""
        if isinstance(event, ResponseStarted):
            self._reply = self._new_reply(event.response_id)
            return []
        if isinstance(event, ResponseAudio):
            if event.response_id in self._cleared:
                return []  # audio of a reply the caller cut: never sent
            reply = self._reply
            if reply is None or reply.response_id != event.response_id:
                reply = self._reply = self._new_reply(event.response_id)
            pcm = reply.resampler.process(event.pcm) if reply.resampler is not None else event.pcm
            return self._frames(reply, pcm, final=False)
        if isinstance(event, ResponseFinished):
            reply = self._reply
            if reply is None or reply.response_id != event.response_id:
                return []
            self._reply = None
            tail = reply.resampler.flush() if reply.resampler is not None else np.zeros(0, np.float32)
            return self._frames(reply, tail, final=True)
        if isinstance(event, Interrupted):
            self._cleared.append(event.response_id)
            if self._reply is not None and self._reply.response_id == event.response_id:
                self._reply = None
            return [self._clear_message()]
        return []

    # ---- for subclasses: client side ------------------------------------------------------------------

    def _open(self, stream_id: str, codec: Codec, parameters: Any, *, param: str,
              call_id: str | None = None) -> list[ClientEvent]:
        """The carrier's start: the wire state opens and the session starts with the call's settings.
        `parameters` is the start message's custom parameters (None: none), named `param` in errors."""
        if self.state is WireState.OPEN:
            raise ProtocolError(DUPLICATE_START, f"expected one start per call, got a second ({self.carrier})")
        settings, key, rejected = self._start_settings(parameters, param)
        self.state = WireState.OPEN
        self.stream_id, self.call_id, self.codec, self.settings = stream_id, call_id, codec, settings
        self._in = Resampler(codec.rate_hz, INPUT_SAMPLE_RATE) if codec.rate_hz != INPUT_SAMPLE_RATE else None
        start = StartSession(settings, codec.rate_hz, self.frame_ms, codec.rate_hz, key)
        return [start, *rejected]

    def _require_open(self, what: str) -> None:
        if self.state is not WireState.OPEN:
            raise ProtocolError(START_REQUIRED, f"expected the {self.carrier} start message first, got {what}")

    def _payload(self, obj: dict[str, Any], name: str = "payload") -> bytes:
        """A base64 audio payload of the open call's codec, checked: base64, a whole number of samples,
        1 sample .. MAX_PAYLOAD_MS of audio."""
        text = obj.get(name)
        if not isinstance(text, str):
            raise ProtocolError(BAD_FIELD, f"media.{name}: expected a base64 string, got {_kind(text)}")
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError(BAD_AUDIO, f"media.{name}: expected base64 audio, got {_preview(text)}") from None
        self._check_size(data)
        return data

    def _check_size(self, data: bytes) -> None:
        codec = self.codec
        limit = int(MAX_PAYLOAD_MS * codec.bytes_per_ms())
        if not data or len(data) % codec.bytes_per_sample:
            raise ProtocolError(BAD_AUDIO, f"expected {codec.encoding} audio of whole samples "
                                f"({codec.bytes_per_sample} bytes each), got {len(data)} bytes")
        if len(data) > limit:
            raise ProtocolError(FRAME_TOO_LARGE, f"expected at most {limit} bytes of audio per message "
                                f"({MAX_PAYLOAD_MS} ms of {codec.encoding} at {codec.rate_hz} Hz), got {len(data)}")

    def _audio(self, data: bytes) -> list[ClientEvent]:
        """Checked wire audio -> one AudioFrame at 16 kHz (the resampler keeps its state across frames)."""
        pcm = self.codec.decode(data)
        if self._in is not None:
            pcm = self._in.process(pcm)
        return [AudioFrame(pcm)]

    def _mark_echo(self, name: Any, param: str) -> list[ClientEvent]:
        """A carrier's echo of our marker -> the reply's playback position ([] for a cleared reply)."""
        if not isinstance(name, str) or MARK_SEPARATOR not in name:
            raise ProtocolError(BAD_FIELD, f"{param}: expected a marker name '<response id>:<ms>' this server "
                                f"sent, got {_preview(name) if isinstance(name, str) else _kind(name)}")
        response_id, _, ms = name.rpartition(MARK_SEPARATOR)
        try:
            played_ms = float(ms)
        except ValueError:
            played_ms = -1.0
        if not response_id or not np.isfinite(played_ms) or played_ms < 0:
            raise ProtocolError(BAD_FIELD, f"{param}: expected a marker name '<response id>:<ms>' this server "
                                f"sent, got {_preview(name)}")
        if response_id in self._cleared:
            return []  # an echo of a marker the clear dropped: that audio was never heard
        return [PlaybackProgress(response_id, played_ms)]

    def _dtmf(self, digit: Any, param: str) -> list[ClientEvent]:
        if not isinstance(digit, str) or digit.upper() not in DTMF_DIGITS:
            raise ProtocolError(BAD_FIELD, f"{param}: expected one of 0-9 * # A-D, got "
                                f"{_preview(digit) if isinstance(digit, str) else _kind(digit)}")
        return [Dtmf(digit.upper())]

    def _start_settings(self, parameters: Any, param: str) -> tuple[SessionSettings, str | None,
                                                                        list[ClientEvent]]:
        """The call's settings from its custom parameters: (settings, key, FieldRejected for each parameter
        that could not be used; the default stands for it)."""
        settings, key = self.defaults, None
        rejected: list[ClientEvent] = []
        if parameters is None:
            return settings, key, rejected
        if not isinstance(parameters, dict):
            rejected.append(FieldRejected(BAD_FIELD, f"{param}: expected an object of name -> value, got "
                                          f"{_kind(parameters)}", param=param))
            return settings, key, rejected
        for name, value in parameters.items():
            where = f"{param}.{name}"
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                value = str(value)  # a carrier that sends JSON values (Vonage headers) may send numbers
            if name not in START_PARAMETERS:
                rejected.append(FieldRejected(BAD_FIELD, f"{param}: expected names among {START_PARAMETERS}, "
                                              f"got unknown {_preview(str(name))}", param=where))
                continue
            if not isinstance(value, str):
                rejected.append(FieldRejected(BAD_FIELD, f"{where}: expected a string, got {_kind(value)}",
                                              param=where))
                continue
            try:
                if name == "key":
                    key = value
                else:
                    settings = self._apply_parameter(settings, name, value)
            except (ProtocolError, VoiceAgentError, ValueError, TypeError) as e:
                rejected.append(FieldRejected(BAD_FIELD, f"{where}: {e}", param=where))
        return settings, key, rejected

    def _apply_parameter(self, settings: SessionSettings, name: str, value: str) -> SessionSettings:
        if name == "voice":
            turn = dataclasses.replace(settings.turn, voice=value)
            if self.engine is not None:
                self.engine.check_turn(turn)
            return dataclasses.replace(settings, turn=turn)
        if name == "instructions":
            if not value.strip() or len(value) > MAX_INSTRUCTIONS_CHARS:
                raise ValueError(f"expected 1..{MAX_INSTRUCTIONS_CHARS} characters of text, got {len(value)}")
            return dataclasses.replace(settings, instructions=value)
        if not (value.isascii() and value.isdigit()):
            raise ValueError(f"expected an integer number of milliseconds, got {_preview(value)}")
        return dataclasses.replace(settings, vad=dataclasses.replace(settings.vad, silence_ms=int(value)))

    # ---- for subclasses: server side ------------------------------------------------------------------

    def _media_message(self, frame: bytes) -> str | bytes:
        """One whole outbound frame of `self.codec` audio as the carrier's media message."""
        raise NotImplementedError

    def _mark_message(self, name: str) -> str:
        raise NotImplementedError

    def _clear_message(self) -> str:
        raise NotImplementedError

    def _is_media(self, message: str | bytes) -> bool:
        """Whether `message` is one of this adapter's media messages (what `audio_ms` counts)."""
        raise NotImplementedError

    # ---- internals ----------------------------------------------------------------------------------

    def _new_reply(self, response_id: str) -> _Reply:
        rate = self.codec.rate_hz
        resampler = Resampler(OUTPUT_SAMPLE_RATE, rate) if rate != OUTPUT_SAMPLE_RATE else None
        return _Reply(response_id, resampler, np.zeros(0, np.float32))

    def _frames(self, reply: _Reply, pcm: np.ndarray, *, final: bool) -> list[str | bytes]:
        """`pcm` (carrier rate) appended to the reply's pending samples, cut into whole frames; with
        `final` the last partial frame is padded with silence. A marker follows every MARK_INTERVAL_MS of
        frames and the last frame, so a barge-in cuts the history within MARK_INTERVAL_MS of what was heard."""
        n = self.codec.frame_samples(self.frame_ms)
        pending = np.concatenate([reply.pending, np.asarray(pcm, np.float32)])  # (T,)
        whole = len(pending) // n * n
        frames = [pending[i : i + n] for i in range(0, whole, n)]
        real = whole
        reply.pending = pending[whole:]
        if final and len(reply.pending):
            real += len(reply.pending)
            frames.append(np.concatenate([reply.pending, np.zeros(n - len(reply.pending), np.float32)]))
            reply.pending = np.zeros(0, np.float32)
        if not frames:
            return []
        every = max(1, MARK_INTERVAL_MS // self.frame_ms)
        messages: list[str | bytes] = []
        for j, frame in enumerate(frames):
            messages.append(self._media_message(self.codec.encode(frame)))
            last = j == len(frames) - 1
            reply.sent_samples += (real - n * j) if last else n
            if last or (j + 1) % every == 0:  # the playback position, every MARK_INTERVAL_MS and at the end
                end_ms = round(reply.sent_samples * 1000 / self.codec.rate_hz, 3)
                messages.append(self._mark_message(f"{reply.response_id}{MARK_SEPARATOR}{end_ms:g}"))
        return messages


def parse_json(message: str | bytes, carrier: str) -> dict[str, Any]:
    """A carrier's text message -> its JSON object with a string `event`; ProtocolError otherwise (a binary
    frame included: a carrier with binary audio handles those before calling this)."""
    if isinstance(message, (bytes, bytearray, memoryview)):
        raise ProtocolError(BAD_MESSAGE, f"expected a JSON text frame ({carrier} sends no binary frames), "
                            f"got a binary frame of {len(message)} bytes")
    try:
        obj = json.loads(message)
    except (json.JSONDecodeError, RecursionError):
        raise ProtocolError(BAD_JSON, f"expected a JSON text message, got {_preview(message)}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("event"), str):
        raise ProtocolError(BAD_MESSAGE, f"expected a JSON object with a string 'event', got {_preview(message)}")
    return obj


def dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def field(obj: dict[str, Any], name: str, kind: type | tuple[type, ...], expected: str, *,
          where: str = "") -> Any:
    """`obj[name]`, which must be a `kind` (never a bool); errors name the field as `where.name`."""
    value = obj.get(name)
    if not isinstance(value, kind) or isinstance(value, bool):
        raise ProtocolError(BAD_FIELD, f"{where + '.' if where else ''}{name}: expected {expected}, "
                            f"got {_kind(value) if not isinstance(value, str) else _preview(value)}")
    return value


def rate_field(value: Any, allowed: tuple[int, ...], where: str) -> int:
    """A sample rate given as a number or a numeric string (carriers use both), one of `allowed`."""
    rate = value
    if isinstance(value, str) and value.isascii() and value.isdigit():
        rate = int(value)
    if not isinstance(rate, int) or isinstance(rate, bool) or rate not in allowed:
        raise ProtocolError(BAD_FIELD, f"{where}: expected one of {allowed} (Hz), got {value!r}")
    return rate


def _kind(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


def _preview(text: str, limit: int = 60) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")
