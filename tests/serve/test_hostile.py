"""The hostile-input corpus: the real server attacked through every endpoint while a healthy caller talks.

The server is real (uvicorn, starlette, the wire adapters, the session, webrtcvad); the engine behind it
is FakeEngine (named a fake: nothing here is about model output). It runs in a thread of its own, so
the attackers and the healthy caller are ordinary blocking WebSocket clients in this thread and another.

Each endpoint registers an `Endpoint`: its path, the messages that open a session on it, and hypothesis
strategies for what a hostile client sends before and after opening (an endpoint whose session opens on
connect, as OpenAI Realtime's, is attacked once), how it carries microphone audio and reply audio. A later
endpoint (telephony) adds one entry to ENDPOINTS and every check below applies to it.

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

from voice_agent.audio import INPUT_SAMPLE_RATE, OUTPUT_SAMPLE_RATE, float_to_pcm16, resample
from voice_agent.serve.app import build_app, uvicorn_options
from voice_agent.serve.config import ServerConfig

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
    error_code: Callable[[str | bytes], str | None]  # the error code a server message carries, if any
    still_open: str | bytes  # a message that proves the session still works after the bad ones
    still_open_reply: Callable[[str | bytes], bool]
    audio: Callable[[np.ndarray], list[str | bytes]] = native_audio  # 16 kHz microphone audio -> messages
    is_reply_audio: Callable[[str | bytes], bool] = native_reply_audio  # a message carrying reply audio


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


ENDPOINTS = [
    Endpoint("native", "/ws", lambda: [json.dumps({"type": "start"})], native_messages,
             [(json.dumps(m, allow_nan=True), code) for m, code in NATIVE_KNOWN_BAD], native_error_code,
             json.dumps({"type": "update", "temperature": 0.5}),
             lambda m: isinstance(m, str) and json.loads(m)["type"] == "session.updated"),
    Endpoint("openai", "/v1/realtime?model=gpt-realtime", lambda: [], realtime_messages,
             [(_wire(m), code) for m, code in REALTIME_KNOWN_BAD], realtime_error_code,
             json.dumps(_update(instructions="Still here?")),
             lambda m: isinstance(m, str) and json.loads(m)["type"] == "session.updated"
             and json.loads(m)["session"]["instructions"] == "Still here?",
             realtime_audio, realtime_reply_audio),
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


@dataclass
class Server:
    addr: str
    engine: FakeEngine
    findings: Findings


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
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not uv.started:
        assert time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield Server(f"127.0.0.1:{port}", engine, findings)
    finally:
        uv.should_exit = True
        thread.join(10)
        for lg in loggers:
            lg.removeHandler(catch)


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

    @CORPUS_SETTINGS
    @given(st.lists(endpoint.messages(), min_size=1, max_size=6))
    def case(messages: list[str | bytes]) -> None:
        TRIED[endpoint.name] = TRIED.get(endpoint.name, 0) + 1
        check(server, attack(server, endpoint, messages, opened))

    case()


@pytest.mark.parametrize("endpoint", ENDPOINTS, ids=lambda e: e.name)
def test_known_bad_inputs_get_typed_errors_and_the_session_goes_on(
    server: Server, healthy: HealthyCaller, endpoint: Endpoint
) -> None:
    server.findings.records.clear()
    with connect(f"ws://{server.addr}{endpoint.path}", max_size=None) as ws:
        for m in endpoint.opening():
            send(ws, m)
        for message, code in endpoint.known_bad:
            TRIED[endpoint.name] = TRIED.get(endpoint.name, 0) + 1
            send(ws, message)
            while (got := endpoint.error_code(ws.recv(timeout=5))) is None:
                pass
            assert got == code, f"{str(message)[:80]}: expected error {code}, got {got}"
        send(ws, endpoint.still_open)
        while not endpoint.still_open_reply(ws.recv(timeout=5)):
            pass
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
    ]
    for messages in floods:
        TRIED[endpoint.name] = TRIED.get(endpoint.name, 0) + 1
        check(server, attack(server, endpoint, messages, opened=True))


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
        speak(ws, np.concatenate([tone(400), silence(700)]), endpoint)
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
    frames = endpoint.audio(np.concatenate([tone(400), silence(700)]))
    started = time.monotonic()
    closed_after: float | None = None
    try:
        while time.monotonic() - started < 30:  # keep talking, never read: replies pile up on the server
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
