"""The hostile-input corpus: the real server attacked through every endpoint while a healthy caller talks.

The server is real (uvicorn, starlette, the wire adapters, the session, webrtcvad); the engine behind it
is FakeEngine (named a fake: nothing here is about model output). It runs in a thread of its own, so
the attackers and the healthy caller are ordinary blocking WebSocket clients in this thread and another.

Each endpoint registers an `Endpoint`: its path, the messages that open a session on it, and hypothesis
strategies for what a hostile client sends before and after opening. A later endpoint (OpenAI Realtime,
telephony) adds one entry to ENDPOINTS and every check below applies to it.

Known bad inputs (each endpoint's list) must get their typed error while the session goes on. Checks,
for every case: the server closes (if it does) only with a documented close code, writes no
traceback and no ERROR record for a client's mistake, still answers /healthz, and the healthy caller
keeps getting its turns answered through the whole run. At the end every engine session but the
healthy caller's has been given back. Figures (cases per endpoint, RSS before and after) are printed.
"""

from __future__ import annotations

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

from voice_agent.audio import float_to_pcm16
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


@dataclass(frozen=True)
class Endpoint:
    name: str
    path: str
    opening: Callable[[], list[str | bytes]]  # messages that open a session validly
    messages: Callable[[], st.SearchStrategy[str | bytes]]
    known_bad: list[tuple[str | bytes, str]]  # (message, the error code it must get) after opening
    error_code: Callable[[str | bytes], str | None]  # the error code a server message carries, if any
    still_open: str | bytes  # a message that proves the session still works after the bad ones
    still_open_reply: Callable[[str | bytes], bool]


def native_error_code(message: str | bytes) -> str | None:
    if isinstance(message, bytes):
        return None
    event = json.loads(message)
    return event["code"] if event["type"] == "error" else None


ENDPOINTS = [
    Endpoint("native", "/ws", lambda: [json.dumps({"type": "start"})], native_messages,
             [(json.dumps(m, allow_nan=True), code) for m, code in NATIVE_KNOWN_BAD], native_error_code,
             json.dumps({"type": "update", "temperature": 0.5}),
             lambda m: isinstance(m, str) and json.loads(m)["type"] == "session.updated"),
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


FRAME_BYTES = 2 * 320  # 20 ms of PCM16 at 16 kHz, the native protocol's default frame


def speak(ws: ClientConnection, audio: np.ndarray) -> None:
    """Send `audio` in 20-ms frames, as fast as the socket takes them."""
    data = float_to_pcm16(audio)
    for i in range(0, len(data), FRAME_BYTES):
        ws.send(data[i : i + FRAME_BYTES])


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
    before = rss_mb()
    for i in range(30):
        TRIED[endpoint.name] = TRIED.get(endpoint.name, 0) + 1
        ws = connect(f"ws://{server.addr}{endpoint.path}")
        for m in endpoint.opening():
            send(ws, m)
        speak(ws, np.concatenate([tone(400), silence(700)]))
        while not isinstance(ws.recv(timeout=10), bytes):  # wait for the reply's first audio
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
    deaf = DeafClient(server.addr, endpoint.path)
    for m in endpoint.opening():
        deaf.send(m)
    data = float_to_pcm16(np.concatenate([tone(400), silence(700)]))
    frames = [data[i : i + FRAME_BYTES] for i in range(0, len(data), FRAME_BYTES)]
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
