"""Plivo audio streaming (bidirectional `<Stream>`), Sans-I/O: `PlivoProtocol`, a `CarrierProtocol`.

JSON text frames only, camelCase (voice_agent.serve.protocols.telephony does the framing, markers,
clear, settings and errors):

- Plivo -> server: `start` {sequenceNumber, start: {callId, streamId, accountId, tracks, mediaFormat:
  {encoding audio/x-mulaw (8000) | audio/x-l16 (8000, 16000), sampleRate}}, extra_headers "a=1;b=2"} ->
  StartSession (the `extraHeaders` of the `<Stream>` are the call's custom parameters), `media` {media:
  {track, timestamp, chunk, payload}} -> AudioFrame, `dtmf` {dtmf: {digit}} -> Dtmf, `playedStream`
  {streamId, name} (the echo of our `checkpoint`) -> PlaybackProgress, `clearedAudio` (the answer to our
  `clearAudio`: no event). A call's end closes the socket; a `stop`, if one comes, -> EndSession.
- server -> Plivo: `playAudio` {streamId, media: {contentType, sampleRate, payload}} one 20 ms frame each in
  the start's format, `checkpoint` {streamId, name} after each chunk of a reply, `clearAudio` {streamId}
  on barge-in.

Facts: plivo.com/docs/voice/audio-streaming (stream event protocol), the `<Stream>` XML reference.
Not confirmed there: the byte order of audio/x-l16 (we take little-endian, raw PCM as the other carriers
send it; the documented, safe choice is `contentType="audio/x-mulaw;rate=8000"`), and `stop` (Plivo's list
of messages has none).
"""

from __future__ import annotations

import base64
import re
from typing import Any

from voice_agent.errors import ProtocolError
from voice_agent.serve.protocols.events import BAD_FIELD, DUPLICATE_START, UNKNOWN_TYPE, ClientEvent, EndSession
from voice_agent.serve.protocols.telephony import (
    CarrierProtocol,
    Codec,
    WireState,
    dumps,
    field,
    parse_json,
    rate_field,
)

EVENTS = ("start", "media", "dtmf", "playedStream", "clearedAudio", "stop")
CODECS = {"audio/x-mulaw": (Codec("mulaw", 8_000), (8_000,)), "audio/x-l16": (Codec("l16", 8_000), (8_000, 16_000))}
CONTENT_TYPES = {"mulaw": "audio/x-mulaw", "l16": "audio/x-l16"}


class PlivoProtocol(CarrierProtocol):
    """One Plivo audio stream; see the module docstring."""

    carrier = "plivo"

    def decode(self, message: str | bytes) -> list[ClientEvent]:
        obj = parse_json(message, self.carrier)
        kind = obj["event"]
        if kind not in EVENTS:
            raise ProtocolError(UNKNOWN_TYPE, f"event: expected one of {EVENTS}, got {kind!r}")
        if kind == "start":
            return self._decode_start(obj)
        self._require_open(f"{kind!r}")
        sid = obj.get("streamId")
        if sid is not None and sid != self.stream_id:
            raise ProtocolError(BAD_FIELD, f"streamId: expected this call's stream {self.stream_id!r}, got {sid!r}")
        if kind == "media":
            media = field(obj, "media", dict, "an object")
            if media.get("track", "inbound") != "inbound":
                return []
            return self._audio(self._payload(media))
        if kind == "dtmf":
            return self._dtmf(field(obj, "dtmf", dict, "an object").get("digit"), "dtmf.digit")
        if kind == "playedStream":
            return self._mark_echo(obj.get("name"), "playedStream.name")
        if kind == "clearedAudio":
            return []
        return [EndSession("plivo stream stopped (call ended)")]

    def _decode_start(self, obj: dict[str, Any]) -> list[ClientEvent]:
        if self.state is WireState.OPEN:
            raise ProtocolError(DUPLICATE_START, "expected one start per call, got a second (plivo)")
        start = field(obj, "start", dict, "an object")
        sid = field(start, "streamId", str, "a string", where="start")
        fmt = field(start, "mediaFormat", dict, "an object", where="start")
        encoding = fmt.get("encoding")
        if not isinstance(encoding, str) or encoding not in CODECS:
            raise ProtocolError(BAD_FIELD, f"start.mediaFormat.encoding: expected one of {tuple(CODECS)}, "
                                f"got {encoding!r}")
        base, rates = CODECS[encoding]
        rate = rate_field(fmt.get("sampleRate"), rates, "start.mediaFormat.sampleRate")
        call = start.get("callId")
        return self._open(sid, Codec(base.encoding, rate), _extra_headers(obj.get("extra_headers")),
                          param="extra_headers", call_id=call if isinstance(call, str) else None)

    # ---- server -> Plivo ----------------------------------------------------------------------------

    def _media_message(self, frame: bytes) -> str:
        return dumps({"event": "playAudio", "streamId": self.stream_id,
                      "media": {"contentType": CONTENT_TYPES[self.codec.encoding], "sampleRate": self.codec.rate_hz,
                                "payload": base64.b64encode(frame).decode("ascii")}})

    def _mark_message(self, name: str) -> str:
        return dumps({"event": "checkpoint", "streamId": self.stream_id, "name": name})

    def _clear_message(self) -> str:
        return dumps({"event": "clearAudio", "streamId": self.stream_id})

    def _is_media(self, message: str | bytes) -> bool:
        return isinstance(message, str) and message.startswith('{"event":"playAudio"')


def _extra_headers(value: Any) -> Any:
    """`extra_headers` "a=1;b=2" (or "a=1,b=2", as the `<Stream extraHeaders>` attribute is written) -> a
    dict; None stays None, anything else goes on as is (and is reported as not an object)."""
    if not isinstance(value, str):
        return value
    pairs = [p.strip() for p in re.split(r"[;,]", value) if p.strip()]
    out: dict[str, Any] = {}
    for pair in pairs:
        name, sep, item = pair.partition("=")
        out[name.strip()] = item.strip() if sep else [pair]  # a pair without "=" is reported as not a string
    return out
