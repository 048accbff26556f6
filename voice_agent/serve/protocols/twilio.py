"""Twilio Media Streams (bidirectional, `<Connect><Stream>`), Sans-I/O, and the carriers that speak its wire.

`TwilioProtocol` is a `CarrierProtocol` (voice_agent.serve.protocols.telephony: framing, markers, clear,
settings, errors); this module only spells Twilio's messages. All frames are JSON text frames with an
`event` field (a binary frame is `bad_message`):

- Twilio -> server: `connected` (ignored), `start` {streamSid, start: {streamSid, callSid, customParameters,
  mediaFormat: {encoding "audio/x-mulaw", sampleRate 8000, channels 1}}} -> StartSession (the custom
  parameters `voice`, `instructions`, `silence_ms`, `key`), `media` {streamSid, media: {track, payload:
  base64 mu-law}} -> AudioFrame, `mark` {mark: {name}} (the echo of our marker) -> PlaybackProgress,
  `dtmf` {dtmf: {digit}} -> Dtmf, `stop` -> EndSession (the call hung up).
- server -> Twilio: `media` {streamSid, media: {payload}} one 20 ms frame each (160 bytes of mu-law),
  `mark` {streamSid, mark: {name}} after each chunk of a reply, `clear` {streamSid} on barge-in.

Dialects (`Dialect`, a small table): SignalWire's and 2600Hz Pivot's `<Connect><Stream>` speak Twilio's
wire (camelCase, mu-law 8 kHz) and use `TwilioProtocol` as is. Exotel's Voicebot applet (`ExotelProtocol`)
sends the same events in snake_case (`stream_sid`, `custom_parameters`, `media_format`) with raw
little-endian PCM16 at 8 kHz in ~100 ms chunks; we answer in 100 ms chunks (Exotel asks for multiples of
320 bytes, i.e. 20 ms; the chunk size it prefers was not checked against a live call).
Facts: twilio.com/docs/voice/media-streams/websocket-messages; developer.exotel.com/docs/agentstream.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from voice_agent.errors import ProtocolError
from voice_agent.serve.protocols.events import BAD_FIELD, DUPLICATE_START, UNKNOWN_TYPE, ClientEvent, EndSession
from voice_agent.serve.protocols.telephony import (
    MULAW_8K,
    CarrierProtocol,
    Codec,
    WireState,
    dumps,
    field,
    parse_json,
    rate_field,
)

EVENTS = ("connected", "start", "media", "mark", "dtmf", "stop")  # what Twilio sends on a bidirectional stream


@dataclass(frozen=True)
class Dialect:
    """How one carrier spells Twilio's wire: field names, the codecs its start may announce, frame size."""

    carrier: str
    stream_key: str  # the stream id, top level and in `start`
    call_key: str
    parameters_key: str  # the custom parameters in `start`
    format_key: str  # the media format in `start`
    rate_key: str  # the sample rate in the media format
    codecs: Mapping[str, Codec]  # media format encoding -> codec (its rate is checked against `rates`)
    rates: tuple[int, ...]
    frame_ms: int


TWILIO = Dialect("twilio", "streamSid", "callSid", "customParameters", "mediaFormat", "sampleRate",
                 {"audio/x-mulaw": MULAW_8K}, (8_000,), 20)
EXOTEL = Dialect("exotel", "stream_sid", "call_sid", "custom_parameters", "media_format", "sample_rate",
                 {"audio/x-raw": Codec("l16", 8_000)}, (8_000, 16_000), 100)


class TwilioProtocol(CarrierProtocol):
    """One Twilio (SignalWire, Pivot) media stream; see the module docstring."""

    dialect = TWILIO
    carrier = TWILIO.carrier
    frame_ms = TWILIO.frame_ms

    def decode(self, message: str | bytes) -> list[ClientEvent]:
        d = self.dialect
        obj = parse_json(message, d.carrier)
        kind = obj["event"]
        if kind == "connected":
            return []
        if kind == "start":
            return self._decode_start(obj)
        if kind not in EVENTS:
            raise ProtocolError(UNKNOWN_TYPE, f"event: expected one of {EVENTS}, got {kind!r}")
        self._require_open(f"{kind!r}")
        sid = obj.get(d.stream_key)
        if sid is not None and sid != self.stream_id:
            raise ProtocolError(BAD_FIELD, f"{d.stream_key}: expected this call's stream {self.stream_id!r}, "
                                f"got {sid!r}")
        if kind == "media":
            media = field(obj, "media", dict, "an object")
            if media.get("track", "inbound") not in ("inbound", "inbound_track"):
                return []  # the outbound track of a both-tracks stream: our own audio
            return self._audio(self._payload(media))
        if kind == "mark":
            mark = field(obj, "mark", dict, "an object")
            return self._mark_echo(mark.get("name"), "mark.name")
        if kind == "dtmf":
            dtmf = field(obj, "dtmf", dict, "an object")
            return self._dtmf(dtmf.get("digit"), "dtmf.digit")
        return [EndSession(f"{d.carrier} stream stopped (call ended)")]

    def _decode_start(self, obj: dict[str, Any]) -> list[ClientEvent]:
        d = self.dialect
        if self.state is WireState.OPEN:
            raise ProtocolError(DUPLICATE_START, f"expected one start per call, got a second ({d.carrier})")
        start = field(obj, "start", dict, "an object")
        sid = field(start, d.stream_key, str, "a string", where="start")
        media_format = start.get(d.format_key)
        codec = next(iter(d.codecs.values()))
        if media_format is not None:
            if not isinstance(media_format, dict):
                raise ProtocolError(BAD_FIELD, f"start.{d.format_key}: expected an object, got "
                                    f"{type(media_format).__name__}")
            encoding = media_format.get("encoding")
            if not isinstance(encoding, str) or encoding not in d.codecs:
                raise ProtocolError(BAD_FIELD, f"start.{d.format_key}.encoding: expected one of "
                                    f"{tuple(d.codecs)}, got {encoding!r}")
            rate = rate_field(media_format.get(d.rate_key, d.rates[0]), d.rates,
                              f"start.{d.format_key}.{d.rate_key}")
            channels = media_format.get("channels", 1)
            if channels not in (1, "1"):
                raise ProtocolError(BAD_FIELD, f"start.{d.format_key}.channels: expected 1, got {channels!r}")
            codec = Codec(d.codecs[encoding].encoding, rate, d.codecs[encoding].big_endian)
        call = start.get(d.call_key)
        return self._open(sid, codec, start.get(d.parameters_key), param=f"start.{d.parameters_key}",
                          call_id=call if isinstance(call, str) else None)

    # ---- server -> Twilio ---------------------------------------------------------------------------

    def _media_message(self, frame: bytes) -> str:
        return dumps({"event": "media", self.dialect.stream_key: self.stream_id,
                      "media": {"payload": base64.b64encode(frame).decode("ascii")}})

    def _mark_message(self, name: str) -> str:
        return dumps({"event": "mark", self.dialect.stream_key: self.stream_id, "mark": {"name": name}})

    def _clear_message(self) -> str:
        return dumps({"event": "clear", self.dialect.stream_key: self.stream_id})

    def _is_media(self, message: str | bytes) -> bool:
        return isinstance(message, str) and message.startswith('{"event":"media"')


class ExotelProtocol(TwilioProtocol):
    """One Exotel Voicebot stream: Twilio's events in snake_case with PCM16 audio; see the module docstring."""

    dialect = EXOTEL
    carrier = EXOTEL.carrier
    frame_ms = EXOTEL.frame_ms
