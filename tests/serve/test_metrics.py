"""/metrics: scraped from the real server (uvicorn on a free port) and parsed with prometheus-client's parser.

The bench-like run drives two concurrent sessions, one full turn each, over the native protocol against
the real engine on the tiny random-weight checkpoint, scrapes while the replies stream and after, and
finds the turns, the latencies, the engine's steps and its cache in the scrape. The other tests use
FakeEngine: access (key, separate port), refusals, errors by code, outcomes, and the playback estimate.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
import websockets
from fakes import FakeEngine, silence, tone
from prometheus_client.parser import text_string_to_metric_families
from serving import free_socket, running
from websockets.asyncio.client import ClientConnection, connect

from voice_agent.audio import OUTPUT_SAMPLE_RATE
from voice_agent.engine.api import Engine
from voice_agent.engine.build import build_engine
from voice_agent.model.tiny import make_tiny
from voice_agent.serve.app import build_app, uvicorn_options
from voice_agent.serve.config import ServerConfig
from voice_agent.serve.metrics import ConnectionMonitor, Metrics
from voice_agent.serve.protocols.events import ResponseAudio

KEY = "metrics-test-key"
BEARER = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@asynccontextmanager
async def serve(engine: Any, **config: Any) -> AsyncIterator[str]:
    """The app on a free port in this event loop; yields "127.0.0.1:PORT" once the engine is ready."""
    sock = free_socket()
    cfg = ServerConfig(port=sock.getsockname()[1], log_level="warning", **config)
    async with running(build_app(cfg, engine), uvicorn_options(cfg), sock) as addr:
        async with asyncio.timeout(120):
            while not engine.ready:
                await asyncio.sleep(0.02)
        yield addr


class Samples:
    """One parsed scrape."""

    def __init__(self, text: str) -> None:
        self.families = {f.name: f for f in text_string_to_metric_families(text)}
        self.samples = [s for f in self.families.values() for s in f.samples]

    def value(self, name: str, **labels: str) -> float:
        """The sum of the samples called `name` whose labels include `labels`."""
        return sum(s.value for s in self.samples
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def has(self, name: str) -> bool:
        return any(s.name == name for s in self.samples)


async def scrape(url: str, headers: dict[str, str] | None = None) -> Samples:
    async with httpx.AsyncClient() as http:
        r = await http.get(url, headers=headers)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/plain")
    return Samples(r.text)


async def until(ws: ClientConnection, kind: str, timeout: float = 60.0) -> dict:
    """Read (skipping audio) until a JSON event of `kind`."""
    async with asyncio.timeout(timeout):
        while True:
            msg = await ws.recv()
            if isinstance(msg, str) and (event := json.loads(msg))["type"] == kind:
                return event


async def speak(ws: ClientConnection, audio: np.ndarray) -> None:
    pcm = (np.clip(audio, -1, 1) * 32767).astype("<i2")
    for i in range(0, len(pcm), 320):  # 20-ms frames, faster than real time
        await ws.send(pcm[i : i + 320].tobytes())


# ---- the bench-like run on the real engine ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("tiny")
    make_tiny(root, seed=0)
    return root / "LLaMA-Omni2-tiny", root / "cosy2_decoder"


def tiny_engine(tiny_dirs: tuple[Path, Path]) -> Engine:
    """The real engine as `voice-agent serve` builds it, with short replies (12 units after the text)."""
    model, engine_config = ServerConfig(model_dir=str(tiny_dirs[0]), vocoder_dir=str(tiny_dirs[1]),
                                        encoder_input="unpadded", max_sessions=2).engine_options()
    return build_engine(model, replace(engine_config, final_units=12))


async def one_turn(addr: str, seed: int, first_audio: asyncio.Event) -> dict:
    async with connect(f"ws://{addr}/ws", additional_headers=BEARER) as ws:
        await ws.send(json.dumps({"type": "start", "seed": seed, "max_new_tokens": 6}))
        await until(ws, "session.started")
        await speak(ws, np.concatenate([tone(600, hz=300 + 100 * seed), silence(900)]))
        async with asyncio.timeout(60):
            while not isinstance(await ws.recv(), bytes):
                pass
        first_audio.set()
        done = await until(ws, "response.done")
        await ws.send(json.dumps({"type": "playback", "response_id": done["response_id"],
                                  "played_ms": done["audio_ms"]}))
        return done


async def test_a_scrape_during_a_bench_run_shows_its_turns(tiny_dirs: tuple[Path, Path]) -> None:
    engine = tiny_engine(tiny_dirs)
    async with serve(engine, api_key=KEY) as addr:
        url = f"http://{addr}/metrics"
        async with httpx.AsyncClient() as http:
            assert (await http.get(url)).status_code == 401
            refused = await http.get(url, headers={"Authorization": "Bearer not-the-key"})
            assert refused.status_code == 401 and refused.headers["www-authenticate"] == "Bearer"
            assert KEY not in refused.text
        started = [asyncio.Event(), asyncio.Event()]
        turns = [asyncio.create_task(one_turn(addr, i, started[i])) for i in range(2)]
        await started[0].wait()
        during = await scrape(url, BEARER)  # replies streaming
        assert during.value("voice_agent_sessions_active", endpoint="/ws") >= 1
        assert during.value("voice_agent_engine_sessions") >= 1
        per_session = during.value("voice_agent_engine_cache_bytes_per_session")
        assert during.value("voice_agent_engine_cache_bytes") >= per_session > 0
        assert during.value("voice_agent_engine_step_seconds_count") > 0
        dones = await asyncio.gather(*turns)
        await asyncio.sleep(0.2)  # the sockets' ends reach the server
        after = await scrape(url, BEARER)

    reasons = {d["reason"] for d in dones}
    assert reasons <= {"eos", "max_tokens"}
    for reason in reasons:
        assert after.value("voice_agent_turns_total", endpoint="/ws", outcome=reason) == \
            sum(d["reason"] == reason for d in dones)
    assert after.value("voice_agent_sessions_opened_total", endpoint="/ws") == 2
    assert after.value("voice_agent_sessions_active", endpoint="/ws") == 0
    assert after.value("voice_agent_session_duration_seconds_count", endpoint="/ws") == 2
    assert after.value("voice_agent_first_audio_seconds_count", endpoint="/ws") == 2
    assert after.value("voice_agent_engine_first_text_seconds_count") == 2
    assert after.value("voice_agent_engine_first_audio_seconds_count") == 2
    # server-measured end of speech -> first audio includes the end-of-turn silence (500 ms)
    assert after.value("voice_agent_first_audio_seconds_sum") >= 2 * 0.5
    assert after.value("voice_agent_audio_chunk_gap_seconds_count", endpoint="/ws") >= 2
    assert after.value("voice_agent_engine_step_rows_count", stage="admit") >= 1
    assert after.value("voice_agent_engine_step_rows_sum", stage="admit") == 2
    assert after.value("voice_agent_engine_step_rows_count", stage="vocode") >= 2
    assert after.value("voice_agent_engine_cache_bytes") == 0
    assert after.has("voice_agent_engine_commands_queued") and after.has("voice_agent_outbox_messages")
    assert after.value("voice_agent_ready") == 1
    assert after.value("voice_agent_model_info", model="LLaMA-Omni2-tiny", device="cpu") == 1
    assert not after.has("voice_agent_cuda_memory_allocated_bytes")  # not on CUDA
    assert after.value("voice_agent_errors_total") == 0


# ---- access ---------------------------------------------------------------------------------------


async def test_without_a_key_metrics_are_open_on_the_main_port() -> None:
    async with serve(FakeEngine()) as addr:
        samples = await scrape(f"http://{addr}/metrics")
    assert samples.has("voice_agent_ready") and samples.has("voice_agent_outbox_messages")
    assert not samples.has("voice_agent_engine_sessions")  # FakeEngine has no stats()


async def test_a_metrics_port_serves_them_without_the_key_and_the_main_port_has_none() -> None:
    port = free_port()
    async with serve(FakeEngine(), api_key=KEY, metrics_port=port) as addr:
        async with httpx.AsyncClient() as http:
            assert (await http.get(f"http://{addr}/metrics", headers=BEARER)).status_code == 404
        samples = await scrape(f"http://127.0.0.1:{port}/metrics")
        assert samples.has("voice_agent_sessions_opened_total") or samples.has("voice_agent_ready")
    with pytest.raises(httpx.ConnectError):  # stopped with the app
        async with httpx.AsyncClient() as http:
            await http.get(f"http://127.0.0.1:{port}/metrics")


# ---- what the connections count -------------------------------------------------------------------


async def test_refusals_errors_and_outcomes_are_counted() -> None:
    engine = FakeEngine(blocks=3, max_sessions=1)
    async with serve(engine, api_key=KEY) as addr:
        url = f"ws://{addr}/ws"
        with pytest.raises(websockets.InvalidStatus):  # a wrong key is refused before the upgrade
            async with connect(url, additional_headers={"Authorization": "Bearer wrong-key-123"}):
                pass
        async with connect(url) as ws:
            await ws.send("not json")
            assert (await until(ws, "error"))["code"] == "bad_json"
            await ws.send(json.dumps({"type": "start", "key": KEY}))
            await until(ws, "session.started")
            async with connect(url, additional_headers=BEARER) as full:
                await full.send(json.dumps({"type": "start"}))
                assert (await until(full, "error"))["code"] == "server_full"
            await speak(ws, np.concatenate([tone(600), silence(900)]))
            assert (await until(ws, "response.done"))["reason"] == "eos"
            await ws.send(json.dumps({"type": "update", "voice": "fake-error"}))
            await speak(ws, np.concatenate([silence(600), tone(600), silence(900)]))
            assert (await until(ws, "response.done"))["reason"] == "error"
        await asyncio.sleep(0.1)
        samples = await scrape(f"http://{addr}/metrics", BEARER)
    assert samples.value("voice_agent_sessions_refused_total", endpoint="/ws", reason="unauthorized") == 1
    assert samples.value("voice_agent_sessions_refused_total", endpoint="/ws", reason="server_full") == 1
    assert samples.value("voice_agent_sessions_opened_total") == 1
    assert samples.value("voice_agent_errors_total", endpoint="/ws", code="bad_json") == 1
    assert samples.value("voice_agent_errors_total", endpoint="/ws", code="server_full") == 1
    assert samples.value("voice_agent_errors_total", endpoint="/ws", code="engine_error") == 1
    assert samples.value("voice_agent_turns_total", outcome="eos") == 1
    assert samples.value("voice_agent_turns_total", outcome="error") == 1
    assert samples.value("voice_agent_first_audio_seconds_count") == 1


def test_underruns_are_estimated_from_chunk_arrival_against_real_time_playback() -> None:
    metrics = Metrics(FakeEngine())
    monitor = ConnectionMonitor("/ws", "peer", metrics)
    monitor.opened("s1")
    monitor.submitted("resp_1", speech_end=100.0)

    def chunk(at: float, ms: float) -> None:
        pcm = np.zeros(int(OUTPUT_SAMPLE_RATE * ms / 1000), np.float32)
        monitor.sent(ResponseAudio("resp_1", pcm, 0.0), at)

    chunk(101.0, 400)  # first audio 1 s after the end of speech; the player has audio until 101.4
    chunk(101.3, 400)  # in time: until 101.8
    chunk(102.0, 400)  # 0.2 s late: an underrun; the player resumes, until 102.4
    chunk(102.1, 400)  # in time
    samples = Samples(metrics.render().decode())
    assert samples.value("voice_agent_first_audio_seconds_sum") == pytest.approx(1.0)
    assert samples.value("voice_agent_audio_chunk_gap_seconds_count") == 3
    assert samples.value("voice_agent_audio_chunk_gap_seconds_sum") == pytest.approx(1.1)
    assert samples.value("voice_agent_playback_underruns_total") == 1
    assert samples.value("voice_agent_playback_underrun_seconds_total") == pytest.approx(0.2)
    assert samples.value("voice_agent_outbox_messages") == 0


def test_engine_stats_become_gauges_at_scrape_time() -> None:
    engine = FakeEngine()
    stats = {"sessions": 2, "max_sessions": 4, "commands": 3, "cache_bytes": 2000, "cache_bytes_per_session": 1000,
             "cuda_allocated_bytes": 123, "cuda_reserved_bytes": None}
    engine.stats = lambda: stats  # type: ignore[attr-defined]
    samples = Samples(Metrics(engine).render().decode())
    assert samples.value("voice_agent_engine_sessions") == 2 and samples.value("voice_agent_engine_session_slots") == 4
    assert samples.value("voice_agent_engine_commands_queued") == 3
    assert samples.value("voice_agent_engine_cache_bytes") == 2000
    assert samples.value("voice_agent_cuda_memory_allocated_bytes") == 123
    assert not samples.has("voice_agent_cuda_memory_reserved_bytes")  # None: not reported
