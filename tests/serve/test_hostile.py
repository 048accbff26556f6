"""The hostile-input corpus: the real server attacked through every endpoint while a healthy caller talks.

The server is real (uvicorn, starlette, the wire adapters, the session, webrtcvad); the engine behind it
is FakeEngine (named a fake: nothing here is about model output). It runs in a thread of its own, so
the attackers and the healthy caller are ordinary blocking WebSocket clients in this thread and another.

Each endpoint registers an `Endpoint`: its path, the messages that open a session on it, and hypothesis
strategies for what a hostile client sends before and after opening (an endpoint whose session opens on
connect, as OpenAI Realtime's, is attacked once), how it carries microphone audio and reply audio. A later
endpoint (telephony) adds one entry to ENDPOINTS and every check below applies to it.

Phone carriers (/twilio, /telephony/telnyx, plivo, vonage) have no error message on the wire: the server logs
each error it would send (`error.sent`, the first LOGGED_ERRORS of a connection), so their known bad inputs
are checked in the log, a few calls each, and a turn answered afterwards proves the call went on. Their turns
are detected by webrtcvad here, as on the other endpoints (a tone is no speech to silero), and their reply
audio is paced in real time, so a reader that never reads is not cut off within seconds (`Endpoint.paced`).

Known bad inputs (each endpoint's list) must get their typed error while the session goes on. Checks,
for every case: the server closes (if it does) only with a documented close code, writes no
traceback and no ERROR record for a client's mistake, still answers /healthz, and the healthy caller
keeps getting its turns answered through the whole run. At the end every engine session but the
healthy caller's has been given back. Figures (cases per endpoint, RSS before and after) are printed.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import random
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import httpx
import numpy as np
import pytest
import uvicorn
from fakes import FakeEngine, silence, tone
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State
from websockets.sync.client import ClientConnection, connect
from websockets.uri import parse_uri

from voice_agent.audio import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, float_to_pcm16, float_to_ulaw, resample
from voice_agent.serve.app import build_app, uvicorn_options
from voice_agent.serve.config import ServerConfig
from voice_agent.serve.logs import FIELDS
from voice_agent.serve.metrics import LOGGED_ERRORS
from voice_agent.serve.metrics import log as sessions_log
from voice_agent.serve.protocols import telephony
from voice_agent.serve.protocols.telephony import PHONE_SILENCE_MS

# Close codes docs/protocol.md documents for a client's doing; anything else (1011 above all) is a finding.
DOCUMENTED_CLOSES = {1000, 1007, 1008, 1009, 1013, 4001, 4002, 4003, 4004, 4005}
QUIET_S = 0.15  # a case ends when the server has said nothing for this long
CASES = 60  # hypothesis examples per strategy and endpoint
CLIENT_LOGGERS = ("websockets.client",)  # the test clients log here; the server never does


# ---- the endpoints ---------------------------------------------------------------------------------------

JSON_SCALARS = (st.none() | st.booleans() | st.integers(min_value=-(2**80), max_value=2**80)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=12), inner, max_size=4), max_leaves=12)


def native_messages() -> st.SearchStrategy[str | bytes]:
    """Messages of the native protocol: every client type with fields drawn from the real names and
    random values, unknown types, raw text, invalid UTF-8 and binary frames of any length."""
    vad_fields = ("kind", "aggressiveness", "frame_ms", "speech_start_ms", "silence_ms", "prefix_padding_ms",
                  "max_turn_ms", "silero_threshold", "min_interruption_ms", "bogus")
    vad = st.dictionaries(st.sampled_from(vad_fields), JSON_VALUES, max_size=4)
    fields = {"sample_rate": JSON_VALUES, "frame_ms": JSON_VALUES, "output_sample_rate": JSON_VALUES,
              "vad": vad | JSON_VALUES, "key": JSON_VALUES, "voice": JSON_VALUES, "temperature": JSON_VALUES,
              "max_new_tokens": JSON_VALUES, "seed": JSON_VALUES, "response_id": JSON_VALUES,
              "played_ms": JSON_VALUES, "extra": JSON_VALUES}
    typed = st.fixed_dictionaries(
        {"type": st.sampled_from(("start", "update", "playback", "interrupt")) | st.text(max_size=12)},
        optional=fields,
    ).map(lambda obj: json.dumps(obj, allow_nan=True))
    return (typed | st.text(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v, allow_nan=True))
            | st.binary(max_size=4000) | st.binary(min_size=1, max_size=64).map(InvalidText))


class InvalidText(bytes):
    """Bytes to send in a *text* frame (invalid UTF-8 where hypothesis makes it so)."""


# Known bad inputs of the native protocol (the hardening issue's list): each must get an `error` event
# with this code while the session stays open and usable.
NATIVE_KNOWN_BAD: list[tuple[dict[str, object], str]] = [
    ({"type": "update", "seed": 2**70}, "bad_field"),
    ({"type": "update", "seed": -1}, "bad_field"),
    ({"type": "update", "voice": "default"}, "bad_field"),
    ({"type": "update", "voice": "x" * 100_000}, "bad_field"),
    ({"type": "update", "voice": "../../../../etc/passwd"}, "bad_field"),
    ({"type": "update", "max_new_tokens": 4096}, "bad_field"),
    ({"type": "update", "max_new_tokens": 0}, "bad_field"),
    ({"type": "update", "temperature": "hot"}, "bad_field"),
    ({"type": "update", "vad": {"kind": "silero"}}, "bad_field"),
    ({"type": "update", "vad": {"max_turn_ms": 120_000}}, "bad_field"),
    ({"type": "interrupt", "played_ms": "soon"}, "bad_field"),
    ({"type": "interrupt", "played_ms": -5}, "bad_field"),
    ({"type": "playback", "response_id": "resp_1", "played_ms": float("nan")}, "bad_field"),
    ({"type": "start"}, "duplicate_start"),
    ({"type": "bogus"}, "unknown_type"),
]


FRAME_MS = 20  # microphone audio is sent in frames this long


def native_audio(audio: np.ndarray) -> list[str | bytes]:
    """16 kHz audio as the native protocol's binary PCM16 frames."""
    data = float_to_pcm16(audio)
    n = 2 * INPUT_SAMPLE_RATE * FRAME_MS // 1000
    return [data[i : i + n] for i in range(0, len(data), n)]


def native_reply_audio(message: str | bytes) -> bool:
    return isinstance(message, bytes)


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    opening: Callable[[], list[str | bytes]]  # messages that open a session validly ([]: it opens on connect)
    messages: Callable[[], st.SearchStrategy[str | bytes]]
    known_bad: list[tuple[str | bytes, str]]  # (message, the error code it must get) after opening
    # The error code a server message carries, if any. None: the wire has no error message (a phone
    # carrier's); the code is read from the server's log (`error.sent`, LOGGED_ERRORS a connection).
    error_code: Callable[[str | bytes], str | None] | None
    still_open: list[str | bytes]  # messages that prove the session still works after the bad ones
    still_open_reply: Callable[[str | bytes], bool]
    audio: Callable[[np.ndarray], list[str | bytes]] = native_audio  # 16 kHz microphone audio -> messages
    is_reply_audio: Callable[[str | bytes], bool] = native_reply_audio  # a message carrying reply audio
    known_bad_before_open: list[tuple[str | bytes, str]] = field(default_factory=list)  # sent before opening
    hang_up: str | None = None  # a message that ends the call: the server closes with 1000
    cases: int = CASES  # hypothesis examples per strategy
    # Reply audio goes out in real time (a phone call): a reader that never reads leaves unread no more than the
    # kernel's socket buffers take (minutes of audio on loopback), so it is not cut off within the test's time.
    paced: bool = False
    floods: Callable[[], list[list[str | bytes]]] = lambda: []  # this endpoint's own floods (test_floods)


def native_error_code(message: str | bytes) -> str | None:
    if isinstance(message, bytes):
        return None
    event = json.loads(message)
    return event["code"] if event["type"] == "error" else None


# ---- OpenAI Realtime (GA) at /v1/realtime: the session opens on connect with session.created ----------------

REALTIME_TYPES = ("session.update", "input_audio_buffer.append", "input_audio_buffer.commit",
                  "input_audio_buffer.clear", "conversation.item.create", "conversation.item.delete",
                  "conversation.item.retrieve", "conversation.item.truncate", "response.create", "response.cancel",
                  "output_audio_buffer.clear", "response.audio.delta", "session.created")
HUGE = st.sampled_from((10_000, 100_000, 1_000_000)).map(lambda n: "x" * n)
BASE64 = (st.binary(max_size=2000).map(lambda b: base64.b64encode(b).decode()) | st.text(max_size=80) | HUGE
          | st.sampled_from(("", "=", "AA==", "!!!!", "AAE", "AAAA====", "\u0000")))
ITEM_IDS = st.text(max_size=70) | st.sampled_from(("root", "", "item_1", "resp_1")) | HUGE | JSON_VALUES


def realtime_messages() -> st.SearchStrategy[str | bytes]:
    """GA client events with fields drawn from the real names (nested session / item / response objects) and
    random values: wrong types, huge strings, bad base64, unknown event types and ids that name no item;
    raw text, JSON that is not an object, invalid UTF-8 and binary frames (audio belongs in base64)."""
    td = st.fixed_dictionaries({}, optional={
        "type": st.sampled_from(("server_vad", "semantic_vad", "bogus")) | JSON_VALUES,
        "threshold": JSON_VALUES, "prefix_padding_ms": JSON_VALUES, "silence_duration_ms": JSON_VALUES,
        "idle_timeout_ms": JSON_VALUES, "create_response": JSON_VALUES, "interrupt_response": JSON_VALUES,
        "eagerness": JSON_VALUES}) | JSON_VALUES
    fmt = st.fixed_dictionaries({"type": st.sampled_from(("audio/pcm", "audio/pcmu", "audio/pcma")) | JSON_VALUES},
                                optional={"rate": JSON_VALUES}) | JSON_VALUES
    audio_cfg = st.fixed_dictionaries({}, optional={
        "input": st.fixed_dictionaries({}, optional={"format": fmt, "turn_detection": td, "transcription": JSON_VALUES,
                                                     "noise_reduction": JSON_VALUES}) | JSON_VALUES,
        "output": st.fixed_dictionaries({}, optional={"format": fmt, "voice": JSON_VALUES | HUGE,
                                                      "speed": JSON_VALUES}) | JSON_VALUES})
    session = st.fixed_dictionaries({"type": st.just("realtime") | JSON_VALUES}, optional={
        "instructions": JSON_VALUES | HUGE, "output_modalities": JSON_VALUES, "audio": audio_cfg | JSON_VALUES,
        "max_output_tokens": JSON_VALUES, "tools": JSON_VALUES, "tool_choice": JSON_VALUES, "model": JSON_VALUES,
        "voice": JSON_VALUES, "bogus": JSON_VALUES}) | JSON_VALUES
    part = st.fixed_dictionaries({"type": st.sampled_from(("input_text", "input_audio", "output_text", "output_audio",
                                                           "text", "audio", "input_image")) | JSON_VALUES},
                                 optional={"text": JSON_VALUES | HUGE, "audio": BASE64 | JSON_VALUES,
                                           "transcript": JSON_VALUES})
    item = st.fixed_dictionaries({}, optional={
        "id": ITEM_IDS, "type": st.sampled_from(("message", "function_call")) | JSON_VALUES,
        "role": st.sampled_from(("user", "assistant", "system", "tool")) | JSON_VALUES,
        "content": st.lists(part, max_size=3) | JSON_VALUES, "status": JSON_VALUES}) | JSON_VALUES
    response = st.fixed_dictionaries({}, optional={
        "instructions": JSON_VALUES, "conversation": st.sampled_from(("auto", "none")) | JSON_VALUES,
        "metadata": st.dictionaries(st.text(max_size=70), st.text(max_size=20) | JSON_VALUES, max_size=20)
        | JSON_VALUES, "output_modalities": JSON_VALUES, "max_output_tokens": JSON_VALUES,
        "audio": JSON_VALUES, "input": JSON_VALUES, "tools": JSON_VALUES}) | JSON_VALUES
    fields = {"event_id": st.text(max_size=20) | JSON_VALUES, "session": session, "audio": BASE64 | JSON_VALUES,
              "item_id": ITEM_IDS, "previous_item_id": ITEM_IDS, "item": item, "content_index": JSON_VALUES,
              "audio_end_ms": JSON_VALUES, "response": response, "response_id": ITEM_IDS}
    typed = st.fixed_dictionaries({"type": st.sampled_from(REALTIME_TYPES) | st.text(max_size=30)},
                                  optional=fields).map(lambda obj: json.dumps(obj, allow_nan=True))
    return (typed | st.text(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v, allow_nan=True))
            | st.binary(max_size=4000) | st.binary(min_size=1, max_size=64).map(InvalidText))


def _text(role: str, text: str = "hi", **item: object) -> dict[str, object]:
    kind = "output_text" if role == "assistant" else "input_text"
    return {"type": "message", "role": role, "content": [{"type": kind, "text": text}], **item}


def _update(**session: object) -> dict[str, object]:
    return {"type": "session.update", "session": {"type": "realtime", **session}}


# Known bad inputs of /v1/realtime: each must get an `error` event with this code while the session stays open.
REALTIME_KNOWN_BAD: list[tuple[dict[str, object] | str | bytes, str]] = [
    (b"\x00\x01\x02\x03", "bad_message"),  # audio goes base64 in input_audio_buffer.append, never binary
    ("{not json", "bad_json"),
    ("[1, 2, 3]", "bad_message"),
    ({"type": 7}, "bad_message"),
    ({"type": "bogus"}, "unknown_type"),
    ({"type": "response.audio.delta", "delta": ""}, "unknown_type"),  # a server event, and beta at that
    ({"type": "x" * 100_000}, "unknown_type"),
    ({"type": "session.update", "event_id": 5, "session": {"type": "realtime"}}, "bad_field"),
    ({"type": "session.update"}, "bad_field"),
    ({"type": "session.update", "session": "realtime"}, "bad_field"),
    (_update(type="transcription"), "bad_field"),
    (_update(instructions=["a"]), "bad_field"),
    (_update(output_modalities=["video"]), "bad_field"),
    (_update(max_output_tokens=0), "bad_field"),
    (_update(audio={"input": {"format": {"type": "audio/pcm", "rate": 16000}}}), "bad_field"),
    (_update(audio={"input": {"format": {"type": "audio/opus"}}}), "bad_field"),
    (_update(audio={"input": {"turn_detection": {"type": "bogus_vad"}}}), "bad_field"),
    (_update(audio={"input": {"turn_detection": {"type": "server_vad", "threshold": 2}}}), "bad_field"),
    (_update(audio={"input": {"turn_detection": {"type": "server_vad", "idle_timeout_ms": 5}}}), "bad_field"),
    (_update(audio={"input": {"turn_detection": {"type": "server_vad", "silence_duration_ms": 10**9}}}),
     "bad_field"),
    (_update(audio={"input": {"turn_detection": {"type": "semantic_vad", "eagerness": "eager"}}}), "bad_field"),
    (_update(audio={"output": {"speed": 9}}), "bad_field"),
    (_update(audio={"output": {"voice": "x" * 100_000}}), "unsupported_parameter"),
    (_update(tools=[{"type": "function", "name": "f"}]), "unsupported_parameter"),
    ({"type": "input_audio_buffer.append"}, "bad_field"),
    ({"type": "input_audio_buffer.append", "audio": 5}, "bad_field"),
    ({"type": "input_audio_buffer.append", "audio": "!!!not base64"}, "bad_audio"),
    ({"type": "input_audio_buffer.append", "audio": "AA=="}, "bad_audio"),  # one byte: not PCM16
    ({"type": "input_audio_buffer.commit", "event_id": "c1"}, "input_audio_buffer_commit_empty"),
    ({"type": "conversation.item.retrieve", "item_id": "nope"}, "item_not_found"),
    ({"type": "conversation.item.retrieve", "item_id": "x" * 100_000}, "item_not_found"),
    ({"type": "conversation.item.retrieve", "item_id": ""}, "bad_field"),
    ({"type": "conversation.item.delete", "item_id": 3}, "bad_field"),
    ({"type": "conversation.item.delete", "item_id": "root"}, "item_not_found"),
    ({"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 10}, "item_not_found"),
    ({"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": -1}, "bad_field"),
    ({"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": float("nan")}, "bad_field"),
    ({"type": "conversation.item.truncate", "item_id": "nope", "audio_end_ms": 1, "content_index": "0"},
     "bad_field"),
    ({"type": "conversation.item.create"}, "bad_field"),
    ({"type": "conversation.item.create", "item": {"type": "function_call", "name": "f"}}, "bad_field"),
    ({"type": "conversation.item.create", "item": _text("tool")}, "bad_field"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user", "content": []}}, "bad_field"),
    ({"type": "conversation.item.create", "item": _text("user", id="x" * 65)}, "bad_field"),
    ({"type": "conversation.item.create", "item": _text("system", text=5)}, "bad_field"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "assistant",
                                                   "content": [{"type": "input_audio", "audio": ""}]}}, "bad_field"),
    ({"type": "conversation.item.create", "item": {"type": "message", "role": "user",
                                                   "content": [{"type": "input_audio", "audio": "!!"}]}}, "bad_audio"),
    ({"type": "conversation.item.create", "previous_item_id": "nope", "item": _text("user")}, "item_not_found"),
    ({"type": "conversation.item.create", "previous_item_id": 5, "item": _text("user")}, "bad_field"),
    ({"type": "response.create", "response": "now"}, "bad_field"),
    ({"type": "response.create", "response": {"conversation": "bogus"}}, "bad_field"),
    ({"type": "response.create", "response": {"metadata": {"k": 1}}}, "bad_field"),
    ({"type": "response.create", "response": {"max_output_tokens": -3}}, "bad_field"),
    ({"type": "response.create", "response": {"output_modalities": "audio"}}, "bad_field"),
    ({"type": "response.cancel", "response_id": 5}, "bad_field"),
]


def realtime_error_code(message: str | bytes) -> str | None:
    if isinstance(message, bytes):
        return None
    event = json.loads(message)
    return event["error"]["code"] if event["type"] == "error" else None


def realtime_audio(audio: np.ndarray) -> list[str | bytes]:
    """16 kHz audio as input_audio_buffer.append events of 24 kHz PCM16 (the GA default format)."""
    data = float_to_pcm16(resample(audio, INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE))
    n = 2 * OUTPUT_SAMPLE_RATE * FRAME_MS // 1000
    return [json.dumps({"type": "input_audio_buffer.append", "audio": base64.b64encode(data[i : i + n]).decode()})
            for i in range(0, len(data), n)]


def realtime_reply_audio(message: str | bytes) -> bool:
    return isinstance(message, str) and json.loads(message)["type"] == "response.output_audio.delta"


def _wire(m: dict[str, object] | str | bytes) -> str | bytes:
    return json.dumps(m, allow_nan=True) if isinstance(m, dict) else m


# ---- phone carriers: /twilio and /telephony/<carrier>. No error message on the wire: the server logs each --------
# bad message with its code (`error.sent`) and the call goes on; `stop` ends the call with 1000.

# A turn any endpoint answers: speech, then a pause longer than the one that ends a phone caller's turn.
TURN = np.concatenate([tone(400), silence(PHONE_SILENCE_MS + 300)])
STREAM = "MZ0123456789abcdef0123456789abcdef"  # the stream id of every test call
CALL = "CA0123456789abcdef0123456789abcdef"
CARRIER_CASES = 12  # hypothesis examples per strategy and carrier (each case waits QUIET_S on a silent wire)
IDS = st.just(STREAM) | st.text(max_size=40) | JSON_VALUES
MARK_NAMES = (st.sampled_from(("resp_1:20", "resp_1:0", ":20", "resp_1:", "resp_1:-5", "resp_1:nan", "resp_1:inf",
                               "resp_1:1e400", "a:b:c", "resp_1")) | st.text(max_size=30) | JSON_VALUES)
DIGITS = st.sampled_from(tuple("0123456789*#ABCDabcd")) | st.text(max_size=3) | JSON_VALUES
# Custom parameters (the FakeEngine's scripted-failure voices left out: nothing here is about the engine).
PARAMETERS = st.dictionaries(
    st.sampled_from(("voice", "instructions", "silence_ms", "key", "bogus")) | st.text(max_size=8),
    st.sampled_from(("en", "alt", "default", "", " ", "800", "49", "-1", "10001", "\uff11\uff12")) | JSON_VALUES
    | HUGE, max_size=4) | JSON_VALUES
SEQUENCE = st.integers(min_value=-2, max_value=2**70) | st.sampled_from(("1", "2", "-1", "x", "")) | JSON_VALUES


def _obj(**optional: st.SearchStrategy[object]) -> st.SearchStrategy[object]:
    """An object with some of these fields, or any JSON value in its place."""
    return st.fixed_dictionaries({}, optional=optional) | JSON_VALUES


def _media_format(encodings: tuple[str, ...], rate_key: str) -> st.SearchStrategy[object]:
    return _obj(encoding=st.sampled_from(encodings) | JSON_VALUES, channels=st.sampled_from((1, "1", 2)) | JSON_VALUES,
                **{rate_key: st.sampled_from((8000, "8000", 16000, "16000", 44100, "8k")) | JSON_VALUES})


MEDIA = _obj(track=st.sampled_from(("inbound", "outbound", "inbound_track")) | JSON_VALUES,
             payload=BASE64 | JSON_VALUES, chunk=JSON_VALUES, timestamp=JSON_VALUES)


def carrier_messages(events: tuple[str, ...], fields: dict[str, st.SearchStrategy[object]]
                     ) -> st.SearchStrategy[str | bytes]:
    """A carrier's events (its own, the server's and unknown ones) with fields drawn from the real names and
    random values; raw text, JSON that is not an object, invalid UTF-8 and binary frames of any length."""
    typed = st.fixed_dictionaries({"event": st.sampled_from(events) | st.text(max_size=20)},
                                  optional=fields).map(lambda obj: json.dumps(obj, allow_nan=True))
    return (typed | typed | st.text(max_size=200) | JSON_VALUES.map(lambda v: json.dumps(v, allow_nan=True))
            | st.binary(max_size=4000) | st.binary(min_size=1, max_size=64).map(InvalidText))


def ulaw_8k(audio: np.ndarray) -> list[str]:
    """16 kHz audio as base64 payloads of 20-ms frames of 8 kHz mu-law (160 bytes)."""
    data = float_to_ulaw(resample(audio, INPUT_SAMPLE_RATE, 8_000))
    n = 8_000 * FRAME_MS // 1000
    return [base64.b64encode(data[i : i + n]).decode() for i in range(0, len(data), n)]


def _json(obj: dict[str, object]) -> str:
    return json.dumps(obj, allow_nan=True)


def reply_event(name: str) -> Callable[[str | bytes], bool]:
    return lambda m: isinstance(m, str) and json.loads(m).get("event") == name


# Known bad inputs every JSON carrier shares (each logged with this code while the call goes on).
JSON_CARRIER_BAD: list[tuple[str | bytes, str]] = [
    ("{not json", "bad_json"),
    ("[1, 2, 3]", "bad_message"),
    (_json({"event": 5}), "bad_message"),
    (_json({"stream": "x"}), "bad_message"),
    (_json({"event": "bogus"}), "unknown_type"),
    (_json({"event": "x" * 100_000}), "unknown_type"),
    (b"\x00\x01\x02\x03", "bad_message"),  # binary on a carrier that sends JSON text only
    (float_to_pcm16(tone(20)), "bad_message"),
]


# -- Twilio (and SignalWire, Pivot) at /twilio

def twilio(event: str, **fields: object) -> str:
    return _json({"event": event, "streamSid": STREAM, **fields})


TWILIO_START = _json({"event": "start", "sequenceNumber": "1", "streamSid": STREAM, "start": {
    "streamSid": STREAM, "callSid": CALL, "tracks": ["inbound"], "customParameters": {},
    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}})
TWILIO_KNOWN_BAD: list[tuple[str | bytes, str]] = [
    *JSON_CARRIER_BAD,
    (_json({"event": "clear", "streamSid": STREAM}), "unknown_type"),  # the server's event, not Twilio's
    (TWILIO_START, "duplicate_start"),
    (twilio("media", media={"payload": "!!!not base64"}), "bad_audio"),
    (twilio("media", media={"payload": ""}), "bad_audio"),  # no audio at all
    (twilio("media", media={"payload": base64.b64encode(bytes(8_001)).decode()}), "frame_too_large"),  # > 1 s
    (twilio("media", media={"payload": 5}), "bad_field"),
    (twilio("media"), "bad_field"),
    (_json({"event": "media", "streamSid": "MZother", "media": {"payload": ulaw_8k(tone(20))[0]}}), "bad_field"),
    (twilio("dtmf", dtmf={"digit": "x"}), "bad_field"),
    (twilio("dtmf", dtmf={"digit": 5}), "bad_field"),
    (twilio("dtmf", dtmf="5"), "bad_field"),
    (twilio("mark", mark={"name": "nope"}), "bad_field"),
    (twilio("mark", mark={"name": "resp_1:-5"}), "bad_field"),
    (twilio("mark", mark={"name": "resp_1:nan"}), "bad_field"),
    (twilio("mark", mark={"name": 7}), "bad_field"),
]
TWILIO_BEFORE_START: list[tuple[str | bytes, str]] = [
    (twilio("media", media={"payload": ulaw_8k(tone(20))[0]}), "start_required"),
    (twilio("mark", mark={"name": "resp_1:20"}), "start_required"),
    (_json({"event": "start", "streamSid": STREAM, "start": {"streamSid": STREAM, "mediaFormat": {
        "encoding": "audio/x-mulaw", "sampleRate": 16000}}}), "bad_field"),  # Twilio is 8 kHz
    (_json({"event": "start", "start": {"callSid": CALL}}), "bad_field"),  # no stream id
]


def twilio_messages() -> st.SearchStrategy[str | bytes]:
    return carrier_messages(("connected", "start", "media", "mark", "dtmf", "stop", "clear"), {
        "streamSid": IDS, "sequenceNumber": SEQUENCE, "media": MEDIA, "mark": _obj(name=MARK_NAMES),
        "dtmf": _obj(digit=DIGITS, track=JSON_VALUES), "stop": JSON_VALUES,
        "start": _obj(streamSid=IDS, callSid=IDS, customParameters=PARAMETERS, tracks=JSON_VALUES,
                      mediaFormat=_media_format(("audio/x-mulaw", "audio/x-raw", "PCMU"), "sampleRate"))})


def twilio_audio(audio: np.ndarray) -> list[str | bytes]:
    return [twilio("media", media={"track": "inbound", "payload": p}) for p in ulaw_8k(audio)]


# -- Telnyx at /telephony/telnyx. Media carries no sequence_number here (a test call's frames are sent twice
# over by some checks; numbered, the second time would be dropped as late): the reorder window is the fuzz's.

def telnyx(event: str, **fields: object) -> str:
    return _json({"event": event, "stream_id": STREAM, **fields})


TELNYX_START = _json({"event": "start", "sequence_number": "1", "stream_id": STREAM, "start": {
    "call_control_id": CALL, "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}}})
TELNYX_KNOWN_BAD: list[tuple[str | bytes, str]] = [
    *JSON_CARRIER_BAD,
    (_json({"event": "clear"}), "unknown_type"),
    (TELNYX_START, "duplicate_start"),
    (telnyx("media", media={"payload": "!!!not base64"}), "bad_audio"),
    (telnyx("media", media={"payload": ""}), "bad_audio"),
    (telnyx("media", media={"payload": base64.b64encode(bytes(8_001)).decode()}), "frame_too_large"),
    (telnyx("media", media=[]), "bad_field"),
    (_json({"event": "media", "stream_id": "other", "media": {"payload": ulaw_8k(tone(20))[0]}}), "bad_field"),
    (telnyx("media", sequence_number="-1", media={"payload": ulaw_8k(tone(20))[0]}), "bad_field"),
    (telnyx("media", sequence_number=True, media={"payload": ulaw_8k(tone(20))[0]}), "bad_field"),
    (telnyx("dtmf", dtmf={"digit": "E"}), "bad_field"),
    (telnyx("dtmf", dtmf={}), "bad_field"),
    (telnyx("mark", mark={"name": "nope"}), "bad_field"),
    (telnyx("mark", mark={"name": "resp_1:inf"}), "bad_field"),
    (telnyx("mark"), "bad_field"),
]
TELNYX_BEFORE_START: list[tuple[str | bytes, str]] = [
    (telnyx("media", media={"payload": ulaw_8k(tone(20))[0]}), "start_required"),
    (telnyx("dtmf", dtmf={"digit": "1"}), "start_required"),
    (_json({"event": "start", "stream_id": STREAM, "start": {"media_format": {"encoding": "OPUS"}}}), "bad_field"),
    (_json({"event": "start", "stream_id": STREAM, "start": {}}), "bad_field"),  # no media format
]


def telnyx_messages() -> st.SearchStrategy[str | bytes]:
    return carrier_messages(("connected", "start", "media", "mark", "dtmf", "stop", "error", "clear"), {
        "stream_id": IDS, "sequence_number": SEQUENCE, "media": MEDIA, "mark": _obj(name=MARK_NAMES),
        "dtmf": _obj(digit=DIGITS), "stop": JSON_VALUES, "payload": JSON_VALUES,
        "start": _obj(call_control_id=IDS, custom_parameters=PARAMETERS,
                      media_format=_media_format(("PCMU", "PCMA", "L16", "pcma", "OPUS"), "sample_rate"))})


def telnyx_audio(audio: np.ndarray) -> list[str | bytes]:
    return [telnyx("media", media={"track": "inbound", "payload": p}) for p in ulaw_8k(audio)]


def telnyx_floods() -> list[list[str | bytes]]:
    """Media out of order: every frame numbered, the numbers shuffled (the reorder window works on each)."""
    order = list(range(2, 3002))
    random.Random(0).shuffle(order)
    payload = ulaw_8k(tone(20))[0]
    return [[telnyx("media", sequence_number=n, media={"payload": payload}) for n in order]]


# -- Plivo at /telephony/plivo

def plivo(event: str, **fields: object) -> str:
    return _json({"event": event, "streamId": STREAM, **fields})


PLIVO_START = _json({"event": "start", "sequenceNumber": 1, "extra_headers": "", "start": {
    "callId": CALL, "streamId": STREAM, "tracks": ["inbound"],
    "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}}})
PLIVO_KNOWN_BAD: list[tuple[str | bytes, str]] = [
    *JSON_CARRIER_BAD,
    (plivo("playAudio", media={"payload": ulaw_8k(tone(20))[0]}), "unknown_type"),  # the server's event
    (plivo("connected"), "unknown_type"),  # Plivo sends none
    (PLIVO_START, "duplicate_start"),
    (plivo("media", media={"payload": "AAE=!"}), "bad_audio"),
    (plivo("media", media={"payload": ""}), "bad_audio"),
    (plivo("media", media={"payload": base64.b64encode(bytes(8_001)).decode()}), "frame_too_large"),
    (plivo("media", media=None), "bad_field"),
    (_json({"event": "media", "streamId": 7, "media": {"payload": ulaw_8k(tone(20))[0]}}), "bad_field"),
    (plivo("dtmf", dtmf={"digit": "##"}), "bad_field"),
    (plivo("playedStream", name="nope"), "bad_field"),
    (plivo("playedStream", name=":20"), "bad_field"),
    (plivo("playedStream"), "bad_field"),
]
PLIVO_BEFORE_START: list[tuple[str | bytes, str]] = [
    (plivo("media", media={"payload": ulaw_8k(tone(20))[0]}), "start_required"),
    (plivo("playedStream", name="resp_1:20"), "start_required"),
    (_json({"event": "start", "start": {"streamId": STREAM, "mediaFormat": {"encoding": "audio/x-mulaw",
                                                                            "sampleRate": 16000}}}), "bad_field"),
]


def plivo_messages() -> st.SearchStrategy[str | bytes]:
    return carrier_messages(("start", "media", "dtmf", "playedStream", "clearedAudio", "stop", "playAudio",
                             "checkpoint", "clearAudio"), {
        "streamId": IDS, "sequenceNumber": SEQUENCE, "media": MEDIA, "name": MARK_NAMES,
        "dtmf": _obj(digit=DIGITS),
        "extra_headers": st.sampled_from(("voice=en;silence_ms=900", "a=1,b", "instructions=", "silence_ms=x",
                                          "key")) | st.text(max_size=60) | JSON_VALUES,
        "start": _obj(callId=IDS, streamId=IDS, accountId=IDS, tracks=JSON_VALUES,
                      mediaFormat=_media_format(("audio/x-mulaw", "audio/x-l16", "audio/x-raw"), "sampleRate"))})


def plivo_audio(audio: np.ndarray) -> list[str | bytes]:
    return [plivo("media", media={"track": "inbound", "payload": p}) for p in ulaw_8k(audio)]


# -- Vonage at /telephony/vonage: binary frames of L16 at 16 kHz (640 bytes, 20 ms) and JSON text control

VONAGE_FRAME = 2 * INPUT_SAMPLE_RATE * FRAME_MS // 1000
VONAGE_CONNECTED = _json({"event": "websocket:connected", "content-type": "audio/l16;rate=16000"})
VONAGE_KNOWN_BAD: list[tuple[str | bytes, str]] = [
    (b"\x00\x01\x02", "bad_audio"),  # not a 20-ms frame
    (bytes(VONAGE_FRAME + 1), "bad_audio"),
    (bytes(2 * VONAGE_FRAME), "bad_audio"),
    (bytes(VONAGE_FRAME // 2), "bad_audio"),  # a 20-ms frame at 8 kHz, on a 16-kHz call
    ("{not json", "bad_json"),
    ("[1, 2, 3]", "bad_message"),
    (_json({"action": "clear"}), "bad_message"),  # the server's message, not Vonage's
    (_json({"event": "websocket:bogus"}), "unknown_type"),
    (VONAGE_CONNECTED, "duplicate_start"),
    (_json({"event": "websocket:dtmf", "digit": "x", "duration": 100}), "bad_field"),
    (_json({"event": "websocket:dtmf"}), "bad_field"),
    (_json({"event": "websocket:notify", "payload": "resp_1:20"}), "bad_field"),
    (_json({"event": "websocket:notify", "payload": {"mark": "nope"}}), "bad_field"),
    (_json({"event": "websocket:notify", "payload": {}}), "bad_field"),
]
VONAGE_BEFORE_START: list[tuple[str | bytes, str]] = [
    (bytes(VONAGE_FRAME), "start_required"),
    (_json({"event": "websocket:dtmf", "digit": "1"}), "start_required"),
    (_json({"event": "websocket:connected", "content-type": "audio/l16;rate=44100"}), "bad_field"),
    (_json({"event": "websocket:connected"}), "bad_field"),
]


def vonage_messages() -> st.SearchStrategy[str | bytes]:
    frames = st.binary(min_size=VONAGE_FRAME, max_size=VONAGE_FRAME) | st.binary(min_size=320, max_size=320)
    content_types = st.sampled_from(("audio/l16;rate=16000", "audio/l16;rate=8000", "audio/L16; rate=16000",
                                     "audio/l16;rate=44100", "audio/pcmu", ""))
    return frames | carrier_messages(
        ("websocket:connected", "websocket:dtmf", "websocket:notify", "websocket:cleared", "websocket:bogus"), {
            "content-type": content_types | JSON_VALUES, "digit": DIGITS, "duration": JSON_VALUES,
            "payload": _obj(mark=MARK_NAMES), "voice": JSON_VALUES, "instructions": JSON_VALUES | HUGE,
            "silence_ms": JSON_VALUES, "key": JSON_VALUES, "bogus": JSON_VALUES})


def vonage_audio(audio: np.ndarray) -> list[str | bytes]:
    """16 kHz audio as Vonage's binary 20-ms frames, the last one padded with silence."""
    data = float_to_pcm16(audio)
    data += bytes(-len(data) % VONAGE_FRAME)
    return [data[i : i + VONAGE_FRAME] for i in range(0, len(data), VONAGE_FRAME)]


def vonage_reply_audio(message: str | bytes) -> bool:
    return isinstance(message, bytes)


def carrier(name: str, path: str, opening: list[str | bytes], messages: Callable[[], st.SearchStrategy[str | bytes]],
            before_start: list[tuple[str | bytes, str]], known_bad: list[tuple[str | bytes, str]],
            audio: Callable[[np.ndarray], list[str | bytes]], is_reply_audio: Callable[[str | bytes], bool], *,
            hang_up: str | None = None, floods: Callable[[], list[list[str | bytes]]] = lambda: []) -> Endpoint:
    """A phone carrier's endpoint: errors only logged, a turn answered proves the call goes on, paced replies."""
    return Endpoint(name, path, lambda: opening, messages, known_bad, None, audio(TURN), is_reply_audio, audio,
                    is_reply_audio, before_start, hang_up, cases=CARRIER_CASES, paced=True, floods=floods)


ENDPOINTS = [
    Endpoint("native", "/ws", lambda: [json.dumps({"type": "start"})], native_messages,
             [(json.dumps(m, allow_nan=True), code) for m, code in NATIVE_KNOWN_BAD], native_error_code,
             [json.dumps({"type": "update", "temperature": 0.5})],
             lambda m: isinstance(m, str) and json.loads(m)["type"] == "session.updated"),
    Endpoint("openai", "/v1/realtime?model=gpt-realtime", lambda: [], realtime_messages,
             [(_wire(m), code) for m, code in REALTIME_KNOWN_BAD], realtime_error_code,
             [json.dumps(_update(instructions="Still here?"))],
             lambda m: isinstance(m, str) and json.loads(m)["type"] == "session.updated"
             and json.loads(m)["session"]["instructions"] == "Still here?",
             realtime_audio, realtime_reply_audio),
    carrier("twilio", "/twilio", [_json({"event": "connected", "protocol": "Call", "version": "1.0.0"}), TWILIO_START],
            twilio_messages, TWILIO_BEFORE_START, TWILIO_KNOWN_BAD, twilio_audio, reply_event("media"),
            hang_up=twilio("stop", stop={"callSid": CALL})),
    carrier("telnyx", "/telephony/telnyx", [_json({"event": "connected", "version": "1.0.0"}), TELNYX_START],
            telnyx_messages, TELNYX_BEFORE_START, TELNYX_KNOWN_BAD, telnyx_audio, reply_event("media"),
            hang_up=telnyx("stop", stop={}), floods=telnyx_floods),
    carrier("plivo", "/telephony/plivo", [PLIVO_START], plivo_messages, PLIVO_BEFORE_START, PLIVO_KNOWN_BAD,
            plivo_audio, reply_event("playAudio"), hang_up=plivo("stop")),
    carrier("vonage", "/telephony/vonage", [VONAGE_CONNECTED], vonage_messages, VONAGE_BEFORE_START,
            VONAGE_KNOWN_BAD, vonage_audio, vonage_reply_audio),
]


# ---- the server in a thread ------------------------------------------------------------------------------


@dataclass
class Findings:
    """Log records that should not exist: tracebacks and errors (a client's mistake is neither)."""

    records: list[logging.LogRecord] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [f"{r.name} {r.levelname}: {r.getMessage()[:200]}" for r in self.records]


class _Catch(logging.Handler):
    def __init__(self, findings: Findings) -> None:
        super().__init__(logging.DEBUG)
        self.findings = findings

    def emit(self, record: logging.LogRecord) -> None:
        if record.name.startswith(CLIENT_LOGGERS):
            return  # the attacking clients' own library, not the server
        if record.exc_info or record.levelno >= logging.ERROR or "Traceback" in record.getMessage():
            self.findings.records.append(record)


class _ErrorsSent(logging.Handler):
    """The connections' `error.sent` lines (their fields), the only trace of a carrier's bad message."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.sent: list[dict[str, object]] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "error.sent":
            self.sent.append(getattr(record, FIELDS))


@dataclass
class Server:
    addr: str
    engine: FakeEngine
    findings: Findings
    errors_sent: list[dict[str, object]]  # the fields of every error.sent line, in order

    def logged_errors(self, ws: ClientConnection, n: int, timeout: float = 5.0) -> list[dict[str, object]]:
        """The first `n` errors logged for the connection `ws` (waiting for them up to `timeout`)."""
        host, port = ws.local_address[:2]
        peer = f"{host}:{port}"
        deadline = time.monotonic() + timeout
        while len(mine := [e for e in list(self.errors_sent) if e.get("peer") == peer]) < n:
            assert time.monotonic() < deadline, f"expected {n} errors logged for {peer}, got {mine}"
            time.sleep(0.005)
        return mine[:n]


def rss_mb() -> float:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    engine = FakeEngine(blocks=4, block_ms=200.0, max_sessions=64)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    cfg = ServerConfig(port=port, log_level="warning", slow_client_ms=500, send_queue_messages=64)
    uv = uvicorn.Server(uvicorn.Config(build_app(cfg, engine), **uvicorn_options(cfg)))
    findings = Findings()
    catch = _Catch(findings)
    loggers = [logging.getLogger(n) for n in ("", "uvicorn", "uvicorn.error", "voice_agent")]
    for lg in loggers:
        lg.addHandler(catch)
    errors = _ErrorsSent()
    # Phone calls detect turns with webrtcvad here, as the other endpoints do, so that a tone is a turn (silero,
    # the phone line's detector when installed, hears no speech in a tone; tests/serve/test_vad.py covers it).
    phone_vad = pytest.MonkeyPatch()
    phone_vad.setattr(telephony, "silero_available", lambda: False)
    sessions_level = sessions_log.level
    sessions_log.setLevel(logging.INFO)  # error.sent is an INFO line
    sessions_log.addHandler(errors)
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Server(f"127.0.0.1:{port}", engine, findings, errors.sent)
    finally:
        uv.should_exit = True
        thread.join(10)
        for lg in loggers:
            lg.removeHandler(catch)
        sessions_log.removeHandler(errors)
        sessions_log.setLevel(sessions_level)
        phone_vad.undo()


# ---- clients ---------------------------------------------------------------------------------------------


def send(ws: ClientConnection, message: str | bytes) -> None:
    if isinstance(message, InvalidText):
        ws.send(bytes(message), text=True)
    else:
        ws.send(message)


def drain(ws: ClientConnection, quiet_s: float = QUIET_S) -> int | None:
    """Read until the server is quiet or closes; returns the close code, or None while open."""
    try:
        while True:
            ws.recv(timeout=quiet_s)
    except TimeoutError:
        return None
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


def speak(ws: ClientConnection, audio: np.ndarray, endpoint: Endpoint = ENDPOINTS[0]) -> None:
    """Send `audio` in 20-ms frames as `endpoint` carries it, as fast as the socket takes them."""
    for message in endpoint.audio(audio):
        ws.send(message)


class HealthyCaller(threading.Thread):
    """Talks turn after turn, in 20-ms frames faster than real time, until told to stop."""

    def __init__(self, addr: str) -> None:
        super().__init__(daemon=True)
        self.addr, self.answered = addr, 0
        self.errors: list[str] = []
        self.stop = threading.Event()

    def run(self) -> None:
        speech = np.concatenate([tone(500), silence(800)])
        try:
            with connect(f"ws://{self.addr}/ws") as ws:
                ws.send(json.dumps({"type": "start"}))
                while not self.stop.is_set():
                    speak(ws, speech)
                    while True:
                        msg = ws.recv(timeout=10)
                        if isinstance(msg, str):
                            event = json.loads(msg)
                            if event["type"] == "error":
                                self.errors.append(msg)
                            if event["type"] == "response.done":
                                ws.send(json.dumps({"type": "playback", "response_id": event["response_id"],
                                                    "played_ms": event["audio_ms"]}))
                                self.answered += 1
                                break
        except Exception as e:  # noqa: BLE001 - reported by the test
            self.errors.append(f"{type(e).__name__}: {e}")


@pytest.fixture(scope="module")
def healthy(server: Server) -> Iterator[HealthyCaller]:
    caller = HealthyCaller(server.addr)
    caller.start()
    yield caller
    caller.stop.set()
    caller.join(15)


def attack(server: Server, endpoint: Endpoint, messages: list[str | bytes], opened: bool) -> int | None:
    server.findings.records.clear()  # what follows belongs to this case
    with connect(f"ws://{server.addr}{endpoint.path}", max_size=None, open_timeout=5) as ws:
        for m in endpoint.opening() if opened else []:
            send(ws, m)
        try:
            for m in messages:
                send(ws, m)
        except ConnectionClosed:
            pass
        return drain(ws)


def check(server: Server, code: int | None) -> None:
    assert code is None or code in DOCUMENTED_CLOSES, f"expected a documented close code, got {code}"
    assert server.findings.lines() == []


# ---- the corpus ------------------------------------------------------------------------------------------

TRIED: dict[str, int] = {}
CORPUS_SETTINGS = settings(max_examples=CASES, deadline=None, derandomize=True,
                           suppress_health_check=list(HealthCheck))


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
@pytest.mark.parametrize("opened", [False, True], ids=["before-open", "after-open"])
def test_fuzzed_messages(server: Server, healthy: HealthyCaller, endpoint: Endpoint, opened: bool) -> None:
    if not opened and not endpoint.opening():
        pytest.skip("the session opens on connect: before-open and after-open are the same")

    @settings(CORPUS_SETTINGS, max_examples=endpoint.cases)
    @given(st.lists(endpoint.messages(), min_size=1, max_size=6))
    def case(messages: list[str | bytes]) -> None:
        TRIED[endpoint.name] = TRIED.get(endpoint.name, 0) + 1
        check(server, attack(server, endpoint, messages, opened))

    case()


def known_bad_calls(endpoint: Endpoint) -> list[tuple[list[tuple[str | bytes, str]], list[tuple[str | bytes, str]]]]:
    """The known bad inputs as calls of (before opening, after opening): one call where errors travel on the
    wire; where they are only logged, calls of at most LOGGED_ERRORS errors (what a connection logs)."""
    before, after = endpoint.known_bad_before_open, endpoint.known_bad
    if endpoint.error_code is not None:
        return [(before, after)]
    first = LOGGED_ERRORS - len(before)
    return [(before, after[:first])] + [([], after[i : i + LOGGED_ERRORS])
                                        for i in range(first, len(after), LOGGED_ERRORS)]


def close_code(ws: ClientConnection, timeout: float = 5.0) -> int | None:
    """Read until the server closes (its close code) or `timeout` passes (None)."""
    deadline = time.monotonic() + timeout
    try:
        while True:
            ws.recv(timeout=max(0.0, deadline - time.monotonic()))
    except TimeoutError:
        return None
    except ConnectionClosed as closed:
        return closed.rcvd.code if closed.rcvd is not None else None


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_known_bad_inputs_get_typed_errors_and_the_session_goes_on(
    server: Server, healthy: HealthyCaller, endpoint: Endpoint
) -> None:
    server.findings.records.clear()
    for before, after in known_bad_calls(endpoint):
        with connect(f"ws://{server.addr}{endpoint.path}", max_size=None) as ws:
            errors = 0

            def expect(message: str | bytes, code: str, opened: bool) -> None:
                nonlocal errors
                TRIED[endpoint.name] = TRIED.get(endpoint.name, 0) + 1
                send(ws, message)
                errors += 1
                if endpoint.error_code is not None:
                    while (got := endpoint.error_code(ws.recv(timeout=5))) is None:
                        pass
                else:  # nothing on the wire: the connection logs it
                    logged = server.logged_errors(ws, errors)[-1]
                    got = str(logged["code"])
                    assert (logged["id"] is not None) == opened, f"{str(message)[:80]}: logged as {logged}"
                assert got == code, f"{str(message)[:80]}: expected error {code}, got {got}"

            for message, code in before:
                expect(message, code, opened=False)
            for m in endpoint.opening():
                send(ws, m)
            for message, code in after:
                expect(message, code, opened=True)
            for m in endpoint.still_open:
                send(ws, m)
            while not endpoint.still_open_reply(ws.recv(timeout=5)):
                pass
            if endpoint.hang_up is not None:
                send(ws, endpoint.hang_up)
                assert close_code(ws) == 1000, "expected the call's end to close the connection with 1000"
    check(server, None)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_floods(server: Server, healthy: HealthyCaller, endpoint: Endpoint) -> None:
    """Many bad messages, many valid no-ops, and audio far faster than real time."""
    floods: list[list[str | bytes]] = [
        ["{not json"] * 500,
        [json.dumps({"type": "bogus", "n": i}) for i in range(500)],
        endpoint.audio(tone(20)) * 3000,
        [float_to_pcm16(tone(20))] * 3000,
        [InvalidText(b"\xff\xfe")] * 200,
        *endpoint.floods(),
    ]
    for messages in floods:
        TRIED[endpoint.name] = TRIED.get(endpoint.name, 0) + 1
        check(server, attack(server, endpoint, messages, opened=True))


TELNYX_AHEAD = 16_000  # control messages numbered far ahead of the call's media (1.1 MB of text)
TELNYX_AHEAD_ANSWER_S = 2.0  # the turn after them is answered this soon (about 0.6 s when they cost O(1) each)


def test_telnyx_control_messages_numbered_far_ahead_do_not_stall_the_call(
    server: Server, healthy: HealthyCaller
) -> None:
    endpoint = next(e for e in ENDPOINTS if e.name == "telnyx")
    server.findings.records.clear()
    with connect(f"ws://{server.addr}{endpoint.path}", max_size=None) as ws:
        for m in endpoint.opening():
            send(ws, m)
        started = time.monotonic()
        for i in range(TELNYX_AHEAD):  # valid messages, each one ahead: no error, nothing is ever released
            ws.send(telnyx("dtmf", sequence_number=1_000 + i, dtmf={"digit": "1"}))
        for m in endpoint.still_open:
            send(ws, m)
        while not endpoint.is_reply_audio(ws.recv(timeout=60)):
            pass
        answered_s = time.monotonic() - started
    check(server, None)
    assert answered_s < TELNYX_AHEAD_ANSWER_S, (f"expected the turn after {TELNYX_AHEAD} dtmf numbered ahead "
                                                f"answered within {TELNYX_AHEAD_ANSWER_S} s, got {answered_s:.1f} s")


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_abrupt_disconnects_mid_reply_give_every_session_back(
    server: Server, healthy: HealthyCaller, endpoint: Endpoint
) -> None:
    server.findings.records.clear()
    before = rss_mb()
    for i in range(30):
        TRIED[endpoint.name] = TRIED.get(endpoint.name, 0) + 1
        ws = connect(f"ws://{server.addr}{endpoint.path}")
        for m in endpoint.opening():
            send(ws, m)
        speak(ws, TURN, endpoint)
        while not endpoint.is_reply_audio(ws.recv(timeout=10)):  # wait for the reply's first audio
            pass
        if i % 2:
            ws.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # TCP reset
        ws.socket.close()
    deadline = time.monotonic() + 10
    while server.engine.open_count > 1:  # only the healthy caller's session stays open
        assert time.monotonic() < deadline, f"expected 1 open engine session, got {server.engine.open_count}"
        time.sleep(0.05)
    check(server, None)
    print(f"\n{endpoint.name}: RSS {before:.0f} MB before 30 abrupt disconnects, {rss_mb():.0f} MB after")


DEAF_S = 30  # a reader that never reads keeps talking this long at most, waiting to be cut off
PACED_DEAF_S = 2  # on a paced endpoint, this long (then it hangs up)


class DeafClient:
    """A WebSocket client that never reads a byte after the handshake: the websockets protocol object
    (Sans-I/O) over a raw socket with a small receive buffer, so the server's replies pile up on it."""

    def __init__(self, addr: str, path: str) -> None:
        host, port = addr.split(":")
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.settimeout(5)
        self.sock.connect((host, int(port)))
        self.proto = ClientProtocol(parse_uri(f"ws://{addr}{path}"))
        self.proto.send_request(self.proto.connect())
        self._flush()
        while self.proto.state is not State.OPEN:  # read the handshake response, and nothing after it
            self.proto.receive_data(self.sock.recv(4096))
            self.proto.events_received()

    def send(self, message: str | bytes) -> None:
        if isinstance(message, str):
            self.proto.send_text(message.encode())
        else:
            self.proto.send_binary(message)
        self._flush()

    def _flush(self) -> None:
        for chunk in self.proto.data_to_send():
            self.sock.sendall(chunk)


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_a_reader_that_never_reads_is_closed_and_forgotten(
    server: Server, healthy: HealthyCaller, endpoint: Endpoint
) -> None:
    server.findings.records.clear()
    deaf = DeafClient(server.addr, endpoint.path)
    for m in endpoint.opening():
        deaf.send(m)
    frames = endpoint.audio(TURN)
    started = time.monotonic()
    closed_after: float | None = None
    try:
        while time.monotonic() - started < (PACED_DEAF_S if endpoint.paced else DEAF_S):
            # keep talking, never read: replies pile up on the server
            for frame in frames:
                deaf.send(frame)
            time.sleep(0.02)
    except OSError:  # the server gave up on us: reset, or the socket stopped taking data
        closed_after = time.monotonic() - started
    deaf.sock.close()
    end = time.monotonic() + 10
    while server.engine.open_count > 1:
        assert time.monotonic() < end, f"expected the deaf reader's session back, got {server.engine.open_count}"
        time.sleep(0.05)
    if endpoint.paced:
        print(f"\n{endpoint.name}: a reader that never reads for {PACED_DEAF_S} s, then gone, was forgotten")
    else:
        assert closed_after is not None, "expected the server to end a connection that never reads"
        print(f"\n{endpoint.name}: a reader that never reads was cut off after {closed_after:.1f} s")
    check(server, None)


def test_the_healthy_caller_was_answered_throughout(server: Server, healthy: HealthyCaller) -> None:
    """Runs last in this module: the caller talked through every attack above and was answered."""
    answered = healthy.answered
    deadline = time.monotonic() + 15
    while healthy.answered < answered + 1:  # still answering now
        assert time.monotonic() < deadline, "expected the healthy caller to be answered after the attacks"
        time.sleep(0.05)
    assert healthy.errors == []
    assert httpx.get(f"http://{server.addr}/healthz").status_code == 200
    print(f"\ncorpus: cases per endpoint {TRIED}; healthy caller's turns answered {healthy.answered}; "
          f"findings {len(server.findings.records)}; engine sessions open {server.engine.open_count} "
          f"(the healthy caller's); RSS {rss_mb():.0f} MB")
