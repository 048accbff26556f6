"""Telnyx media streaming (bidirectional RTP mode), Sans-I/O: `TelnyxProtocol`, a `CarrierProtocol`.

Telnyx's wire is Twilio's events in snake_case (voice_agent.serve.protocols.telephony does the framing,
markers, clear, settings and errors). JSON text frames only:

- Telnyx -> server: `connected` (ignored), `start` {stream_id, sequence_number, start: {call_control_id,
  media_format: {encoding PCMU | PCMA | L16, sample_rate 8000 | 16000, channels 1}, custom_parameters}} ->
  StartSession, `media` {stream_id, sequence_number, media: {track, chunk, timestamp, payload}} ->
  AudioFrame, `mark` {mark: {name}} -> PlaybackProgress, `dtmf` {dtmf: {digit}} -> Dtmf, `stop` ->
  EndSession, `error` {payload: {code, title, detail}} (Telnyx's own complaint: logged, no event).
- server -> Telnyx: `media` {media: {payload}} in 20 ms frames of the start's codec and rate (the stream's
  `bidirectional_codec` / `bidirectional_sampling_rate` must match what Telnyx sends), `mark` {mark:
  {name}}, `clear`.

Telnyx does not guarantee frame order. Every message's `sequence_number` counts up by one, so media is
released in sequence order: a frame that arrives early waits (at most REORDER_WINDOW frames) for the ones
before it; when the window fills, the gap is given up and playback goes on from the oldest held frame; a
frame arriving after its place was given up (or a duplicate) is dropped and counted (`late_frames`).
Control messages pass at once and fill their place in the sequence. `stop` releases what is held first.

Facts: developers.telnyx.com (stream call media over WebSocket; TeXML <Stream>). Not confirmed there:
the name of the custom parameters in `start` (TeXML `<Parameter>`s "are included in the start message";
we read `start.custom_parameters`), and L16's byte order (we take RTP's: big-endian).
"""

from __future__ import annotations

import base64
import logging
from typing import Any

from voice_agent.engine.api import EngineInfo
from voice_agent.errors import ProtocolError
from voice_agent.serve.protocols.events import BAD_FIELD, DUPLICATE_START, UNKNOWN_TYPE, ClientEvent, EndSession
from voice_agent.serve.protocols.telephony import (
    DEFAULT_LEAD_MS,
    CarrierProtocol,
    Codec,
    WireState,
    dumps,
    field,
    parse_json,
    rate_field,
)
from voice_agent.serve.settings import SessionSettings

log = logging.getLogger(__name__)

EVENTS = ("connected", "start", "media", "mark", "dtmf", "stop", "error")
CODECS = {"PCMU": Codec("mulaw", 8_000), "PCMA": Codec("alaw", 8_000), "L16": Codec("l16", 8_000, big_endian=True)}
RATES = (8_000, 16_000)
REORDER_WINDOW = 4  # messages held while waiting for a missing one (80 ms of 20 ms frames)


class TelnyxProtocol(CarrierProtocol):
    """One Telnyx media stream; see the module docstring."""

    carrier = "telnyx"

    def __init__(self, defaults: SessionSettings, engine: EngineInfo | None = None, *,
                 lead_ms: float = DEFAULT_LEAD_MS) -> None:
        super().__init__(defaults, engine, lead_ms=lead_ms)
        self._next_seq: int | None = None  # the sequence number of the next message to release
        self._held: dict[int, bytes | None] = {}  # sequence number -> media payload (None: a control message)
        self.late_frames = 0

    def decode(self, message: str | bytes) -> list[ClientEvent]:
        obj = parse_json(message, self.carrier)
        kind = obj["event"]
        if kind == "connected":
            return []
        if kind not in EVENTS:
            raise ProtocolError(UNKNOWN_TYPE, f"event: expected one of {EVENTS}, got {kind!r}")
        seq = _sequence_number(obj)
        if kind == "error":
            log.warning("telnyx reported an error on stream %s: %s", self.stream_id, _preview(obj.get("payload")))
            return self._skip(seq)
        if kind == "start":
            events = self._decode_start(obj)
            self._next_seq = None if seq is None else seq + 1
            return events
        self._require_open(f"{kind!r}")
        sid = obj.get("stream_id")
        if sid is not None and sid != self.stream_id:
            raise ProtocolError(BAD_FIELD, f"stream_id: expected this call's stream {self.stream_id!r}, got {sid!r}")
        if kind == "media":
            media = field(obj, "media", dict, "an object")
            if media.get("track", "inbound") not in ("inbound", "inbound_track"):
                return self._skip(seq)  # the outbound track of a both-tracks stream: our own audio
            payload = self._payload(media)
            if seq is None:
                return self._audio(payload)
            return self._arrive(seq, payload)
        if kind == "stop":
            return [*self._release(flush=True), EndSession("telnyx stream stopped (call ended)")]
        if kind == "mark":
            events = self._mark_echo(field(obj, "mark", dict, "an object").get("name"), "mark.name")
        else:
            events = self._dtmf(field(obj, "dtmf", dict, "an object").get("digit"), "dtmf.digit")
        return events if seq is None else [*self._arrive(seq, None), *events]

    def _decode_start(self, obj: dict[str, Any]) -> list[ClientEvent]:
        if self.state is WireState.OPEN:
            raise ProtocolError(DUPLICATE_START, "expected one start per call, got a second (telnyx)")
        sid = field(obj, "stream_id", str, "a string")
        start = field(obj, "start", dict, "an object")
        fmt = field(start, "media_format", dict, "an object", where="start")
        encoding = fmt.get("encoding")
        if not isinstance(encoding, str) or encoding.upper() not in CODECS:
            raise ProtocolError(BAD_FIELD, f"start.media_format.encoding: expected one of {tuple(CODECS)}, "
                                f"got {encoding!r}")
        rate = rate_field(fmt.get("sample_rate", 8_000), RATES, "start.media_format.sample_rate")
        if fmt.get("channels", 1) not in (1, "1"):
            raise ProtocolError(BAD_FIELD, f"start.media_format.channels: expected 1, got {fmt.get('channels')!r}")
        base = CODECS[encoding.upper()]
        call = start.get("call_control_id")
        return self._open(sid, Codec(base.encoding, rate, base.big_endian), start.get("custom_parameters"),
                          param="start.custom_parameters", call_id=call if isinstance(call, str) else None)

    def _skip(self, seq: int | None) -> list[ClientEvent]:
        """A message with no event of its own still fills its place in the sequence."""
        return self._arrive(seq, None) if seq is not None and self.state is WireState.OPEN else []

    def _arrive(self, seq: int, payload: bytes | None) -> list[ClientEvent]:
        """Message `seq` arrived: hold it in its place and release what is now in order."""
        if self._next_seq is None:
            self._next_seq = seq
        if seq < self._next_seq:
            if payload is not None:
                self.late_frames += 1  # its place was given up (or it came twice): dropped
            return []
        self._held[seq] = payload
        return self._release(flush=False)

    def _release(self, *, flush: bool) -> list[ClientEvent]:
        events: list[ClientEvent] = []
        while self._held:
            assert self._next_seq is not None
            if self._next_seq not in self._held:
                # Every held message counts (control ones too), so nothing piles up behind a gap.
                if not flush and len(self._held) <= REORDER_WINDOW:
                    break
                self._next_seq = min(self._held)  # give up the gap
            payload = self._held.pop(self._next_seq)
            self._next_seq += 1
            if payload is not None:
                events += self._audio(payload)
        return events

    # ---- server -> Telnyx ---------------------------------------------------------------------------

    def _media_message(self, frame: bytes) -> str:
        return dumps({"event": "media", "media": {"payload": base64.b64encode(frame).decode("ascii")}})

    def _mark_message(self, name: str) -> str:
        return dumps({"event": "mark", "mark": {"name": name}})

    def _clear_message(self) -> str:
        return dumps({"event": "clear"})

    def _is_media(self, message: str | bytes) -> bool:
        return isinstance(message, str) and message.startswith('{"event":"media"')


def _sequence_number(obj: dict[str, Any]) -> int | None:
    """`sequence_number` (a numeric string or an integer), None when absent."""
    value = obj.get("sequence_number")
    if value is None:
        return None
    if isinstance(value, str) and value.isascii() and value.isdigit():
        return int(value)
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    raise ProtocolError(BAD_FIELD, f"sequence_number: expected a non-negative integer, got {value!r}")


def _preview(value: object, limit: int = 200) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."
