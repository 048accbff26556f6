"""Vonage Voice API WebSockets (an NCCO `connect` to a `websocket` endpoint), Sans-I/O: `VonageProtocol`.

Unlike the other carriers, audio travels as binary frames of raw 16-bit little-endian PCM (L16), 20 ms
each (640 bytes at 16 kHz, 320 at 8 kHz), both ways; control travels as JSON text frames
(voice_agent.serve.protocols.telephony does the framing, markers, clear, settings and errors):

- Vonage -> server: text `websocket:connected` {"content-type": "audio/l16;rate=16000", plus the NCCO
  endpoint's `headers`} -> StartSession (the headers are the call's custom parameters: `voice`,
  `instructions`, `silence_ms`, `key`), binary audio -> AudioFrame (a frame of any other size is
  `bad_audio`), `websocket:dtmf` {digit, duration} -> Dtmf, `websocket:notify` {payload} (the echo of our
  notify) -> PlaybackProgress, `websocket:cleared` (the answer to our clear: no event). The call's end
  closes the socket; there is no stop message.
- server -> Vonage: binary 20 ms frames, `{"action": "notify", "payload": {"mark": name}}` after each chunk of
  a reply, `{"action": "clear"}` on barge-in.

Facts: developer.vonage.com/voice/voice-api/concepts/websockets and the NCCO reference. The session opens
on `websocket:connected`; a binary frame before it is `start_required`.
"""

from __future__ import annotations

import re
from typing import Any

from voice_agent.errors import ProtocolError
from voice_agent.serve.protocols.events import BAD_AUDIO, BAD_FIELD, UNKNOWN_TYPE, ClientEvent
from voice_agent.serve.protocols.telephony import CarrierProtocol, Codec, dumps, field, parse_json

EVENTS = ("websocket:connected", "websocket:dtmf", "websocket:notify", "websocket:cleared")
RATES = (8_000, 16_000)
CONTENT_TYPE = re.compile(r"audio/l16;\s*rate=(\d+)", re.IGNORECASE)
STREAM_ID = "vonage"  # the socket is the stream: Vonage names none


class VonageProtocol(CarrierProtocol):
    """One Vonage WebSocket call leg; see the module docstring."""

    carrier = "vonage"

    def decode(self, message: str | bytes) -> list[ClientEvent]:
        if isinstance(message, (bytes, bytearray, memoryview)):
            return self._decode_audio(bytes(message))
        obj = parse_json(message, self.carrier)
        kind = obj["event"]
        if kind not in EVENTS:
            raise ProtocolError(UNKNOWN_TYPE, f"event: expected one of {EVENTS}, got {kind!r}")
        if kind == "websocket:connected":
            return self._decode_connected(obj)
        self._require_open(f"{kind!r}")
        if kind == "websocket:dtmf":
            return self._dtmf(obj.get("digit"), "websocket:dtmf.digit")
        if kind == "websocket:notify":
            payload = field(obj, "payload", dict, "an object", where="websocket:notify")
            return self._mark_echo(payload.get("mark"), "websocket:notify.payload.mark")
        return []  # websocket:cleared

    def _decode_connected(self, obj: dict[str, Any]) -> list[ClientEvent]:
        content_type = obj.get("content-type")
        match = CONTENT_TYPE.fullmatch(content_type.strip()) if isinstance(content_type, str) else None
        rate = int(match.group(1)) if match else None
        if rate not in RATES:
            raise ProtocolError(BAD_FIELD, f"websocket:connected.content-type: expected 'audio/l16;rate=R' with R "
                                f"one of {RATES}, got {content_type!r}")
        assert rate is not None
        headers = {k: v for k, v in obj.items() if k not in ("event", "content-type")}
        return self._open(STREAM_ID, Codec("l16", rate), headers, param="headers")

    def _decode_audio(self, data: bytes) -> list[ClientEvent]:
        self._require_open(f"{len(data)} bytes of audio")
        size = self.codec.frame_samples(self.frame_ms) * self.codec.bytes_per_sample
        if len(data) != size:
            raise ProtocolError(BAD_AUDIO, f"expected binary frames of {size} bytes ({self.frame_ms} ms of L16 at "
                                f"{self.codec.rate_hz} Hz), got {len(data)} bytes")
        return self._audio(data)

    # ---- server -> Vonage ---------------------------------------------------------------------------

    def _media_message(self, frame: bytes) -> bytes:
        return frame

    def _mark_message(self, name: str) -> str:
        return dumps({"action": "notify", "payload": {"mark": name}})

    def _clear_message(self) -> str:
        return dumps({"action": "clear"})

    def _is_media(self, message: str | bytes) -> bool:
        return isinstance(message, (bytes, bytearray))
