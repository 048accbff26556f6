"""What the engine shows whoever watches it (the server's metrics), without a model: `stats()` and `on_step`."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from voice_agent.engine.api import EngineInfo
from voice_agent.engine.config import EngineConfig, Models
from voice_agent.engine.scheduler import SlotPool
from voice_agent.engine.thread import Engine


def engine_on(device: str) -> Engine:
    engine = Engine(lambda: Models(None), EngineConfig(max_sessions=4), EngineInfo("m", False, device, "bfloat16"))
    engine.worker = SimpleNamespace(bytes_per_session=1000)
    engine._pool = SlotPool(4, "max_sessions 4")
    engine._pool.acquire("s1")
    engine._pool.acquire("s2")
    return engine


def test_stats_count_the_cache_of_the_sessions_in_use_and_cuda_memory_only_on_cuda(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 123)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 456)
    on_cpu = engine_on("cpu").stats()
    assert on_cpu["cache_bytes"] == 2000 and on_cpu["cache_bytes_per_session"] == 1000
    assert on_cpu["commands"] == 0 and on_cpu["cuda_allocated_bytes"] is None
    on_cuda = engine_on("cuda:0").stats()
    assert on_cuda["cuda_allocated_bytes"] == 123 and on_cuda["cuda_reserved_bytes"] == 456


def test_a_failing_step_observer_is_removed_and_fails_no_turn() -> None:
    engine = engine_on("cpu")
    seen: list[tuple[float, dict[str, int]]] = []
    engine.on_step = lambda seconds, rows: seen.append((seconds, dict(rows)))
    engine._stepped(0.01, {"admit": 1, "text": 0})
    assert seen == [(0.01, {"admit": 1, "text": 0})]

    def broken(seconds: float, rows: object) -> None:
        raise RuntimeError("observer bug")

    engine.on_step = broken
    engine._stepped(0.01, {})  # logged, not raised
    assert engine.on_step is None
