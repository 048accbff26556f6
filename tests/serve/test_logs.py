"""Server logs: the line formats, the session / turn / error lines of a real connection, and
`voice-agent serve --log-format json` as a process: every line JSON (uvicorn's too), no key anywhere."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from fakes import FakeEngine, silence, tone
from test_metrics import serve, speak, until
from websockets.asyncio.client import connect

from voice_agent import __version__
from voice_agent.model.tiny import make_tiny
from voice_agent.serve.logs import REDACTED, JsonFormatter, TextFormatter

KEY = "log-test-key-Zq9"
WRONG = "wrong-key-Xy7"


def record(message: str, exc: bool = False, **fields: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError(f"boom {KEY}")
        except ValueError:
            exc_info = sys.exc_info()
    r = logging.LogRecord("voice_agent.test", logging.INFO, __file__, 1, message, None, exc_info)
    r.fields = fields
    return r


def test_text_lines_are_one_line_with_quoted_fields() -> None:
    line = TextFormatter().format(record("session.closed", id="s1", peer="127.0.0.1:5", reason="client left\nINFO x",
                                         code=1000, duration_s=1.23456789, voice=None))
    assert "\n" not in line
    assert line.endswith('voice_agent.test session.closed id=s1 peer=127.0.0.1:5 reason="client left\\nINFO x" '
                         "code=1000 duration_s=1.23457 voice=-")


def test_json_lines_are_one_object_with_the_fields_and_the_traceback() -> None:
    line = JsonFormatter().format(record("turn", exc=True, id="s1", first_audio_ms=812.5, outcome="eos"))
    assert "\n" not in line
    obj = json.loads(line)
    assert obj["message"] == "turn" and obj["logger"] == "voice_agent.test" and obj["level"] == "INFO"
    assert obj["id"] == "s1" and obj["first_audio_ms"] == 812.5 and obj["outcome"] == "eos"
    assert obj["time"].endswith("+00:00") and "ValueError: boom" in obj["exception"]


@pytest.mark.parametrize("formatter", [TextFormatter, JsonFormatter])
def test_the_key_is_redacted_from_message_fields_and_traceback(formatter: type[logging.Formatter]) -> None:
    line = formatter(secrets=[KEY]).format(record(f"GET /x?key={KEY}", exc=True, detail=f"got '{KEY}'"))
    assert KEY not in line and line.count(REDACTED) == 3


async def test_a_connection_logs_its_session_turns_and_errors_and_never_the_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    async with serve(FakeEngine(blocks=2, max_sessions=1), api_key=KEY) as addr:
        url = f"ws://{addr}/ws"
        with pytest.raises(websockets.InvalidStatus):
            async with connect(url, additional_headers={"Authorization": f"Bearer {WRONG}"}):
                pass
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "key": WRONG}))
            await until(ws, "error")
        async with connect(url) as ws:
            await ws.send(json.dumps({"type": "start", "key": KEY}))
            await until(ws, "session.started")
            async with connect(url, additional_headers={"Authorization": f"Bearer {KEY}"}) as full:
                await full.send(json.dumps({"type": "start"}))
                await until(full, "error")
            await ws.send("{not json")
            await speak(ws, np.concatenate([tone(600), silence(900)]))
            await until(ws, "response.done")
        await asyncio.sleep(0.1)
    lines = [r for r in caplog.records if r.name == "voice_agent.serve.sessions"]
    assert [r.getMessage() for r in lines] == [
        "session.opened", "session.refused", "error.sent", "turn", "session.closed"]
    opened, refused, error, turn, closed = (r.fields for r in lines)  # type: ignore[attr-defined]
    assert refused["code"] == 1013 and refused["reason"].startswith("server_full: ") and refused["endpoint"] == "/ws"
    assert opened["id"] == closed["id"] == turn["id"] and opened["peer"].startswith("127.0.0.1:")
    assert error["code"] == "bad_json" and error["fatal"] is False
    # what the client got comes after the end of turn; the engine's own first audio may come before it (speculation)
    assert turn["outcome"] == "eos" and turn["queued_first_audio_ms"] >= turn["end_of_turn_ms"] >= 500
    assert turn["queued_first_audio_ms"] >= turn["first_audio_ms"] and turn["underruns"] == 0
    assert closed["turns"] == 1 and closed["errors"] == 1 and closed["code"] == 1000
    assert closed["reason"] == "client closed" and closed["duration_s"] > 0
    assert any(r.name == "voice_agent.serve.peers" for r in caplog.records)  # the auth failures, logged there
    server_side = [r for r in caplog.records if not r.name.startswith(("websockets.client", "httpx", "httpcore"))]
    everything = "".join(r.getMessage() + repr(vars(r)) for r in server_side)
    assert KEY not in everything and WRONG not in everything


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_serve_with_json_logs_writes_one_object_per_line_and_no_key(tmp_path: Path) -> None:
    make_tiny(tmp_path / "cache" / f"demo-tiny-v{__version__}-seed0", seed=0)
    port = free_port()
    env = {**os.environ, "VOICE_AGENT_CACHE": str(tmp_path / "cache"), "VOICE_AGENT_API_KEY": KEY}
    proc = subprocess.Popen(
        [sys.executable, "-m", "voice_agent.cli", "serve", "--port", str(port), "--log-format", "json",
         "--encoder-input", "unpadded", "--max-sessions", "1"],
        cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient() as http:
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not get ready"
                try:
                    if (await http.get(f"{base}/readyz")).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                await asyncio.sleep(0.2)
            assert (await http.get(f"{base}/metrics?key={KEY}", headers={"Authorization": f"Bearer {KEY}"})).is_success
        with pytest.raises(websockets.InvalidStatus):
            async with connect(f"ws://127.0.0.1:{port}/ws", additional_headers={"Authorization": f"Bearer {WRONG}"}):
                pass
        async with connect(f"ws://127.0.0.1:{port}/ws?key={KEY}") as ws:
            await ws.send(json.dumps({"type": "start", "key": KEY}))
            await until(ws, "session.started")
            await ws.send(json.dumps({"type": KEY}))  # echoed in the error message
            assert (await until(ws, "error"))["code"] == "unknown_type"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    assert KEY not in out + err and WRONG not in out + err
    logs = [json.loads(line) for line in err.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(o) for o in logs)
    loggers = {o["logger"] for o in logs}
    assert {"uvicorn.error", "uvicorn.access", "voice_agent.engine.thread", "voice_agent.serve.sessions"} <= loggers
    events = {o["message"]: o for o in logs if o["logger"] == "voice_agent.serve.sessions"}
    assert events["error.sent"]["code"] == "unknown_type" and REDACTED in events["error.sent"]["detail"]
    assert events["session.closed"]["id"] == events["session.opened"]["id"] and events["session.closed"]["code"] == 1000
    assert any(REDACTED in o["message"] for o in logs if o["logger"] == "uvicorn.access")
