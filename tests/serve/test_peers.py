"""PeerGuard: connection counts, failed-auth cool-downs, bounded memory; Throttle. Made-up times."""

from __future__ import annotations

import logging

import pytest

import voice_agent.serve.peers as peers
from voice_agent.serve.peers import PeerGuard, Throttle


def test_connections_per_peer() -> None:
    g = PeerGuard(max_connections=2, max_failures=3, cooldown_s=60)
    assert g.open("a", 0) and g.open("a", 0) and not g.open("a", 0)
    assert g.open("b", 0)  # another address has its own count
    g.close("a", 1)
    assert g.open("a", 1)


def test_failures_within_the_cool_down_refuse_the_peer_for_it() -> None:
    g = PeerGuard(max_connections=2, max_failures=3, cooldown_s=60)
    g.auth_failed("a", 0)
    g.auth_failed("a", 10)
    assert g.refused_for("a", 10) is None
    g.auth_failed("a", 20)
    assert g.refused_for("a", 20) == 60 and g.refused_for("a", 79) == 1
    assert g.refused_for("b", 20) is None
    assert g.refused_for("a", 80) is None  # over: three new failures are needed again
    g.auth_failed("a", 81)
    assert g.refused_for("a", 81) is None


def test_old_failures_and_a_right_key_are_forgotten() -> None:
    g = PeerGuard(max_connections=2, max_failures=3, cooldown_s=60)
    g.auth_failed("a", 0)
    g.auth_failed("a", 1)
    g.auth_failed("a", 61)  # the first is more than 60 s old
    assert g.refused_for("a", 61) is None
    g.auth_succeeded("a")
    g.auth_failed("a", 62)
    g.auth_failed("a", 63)
    assert g.refused_for("a", 63) is None


def test_memory_stays_bounded(monkeypatch) -> None:
    monkeypatch.setattr(peers, "MAX_PEERS", 100)
    g = PeerGuard(max_connections=2, max_failures=3, cooldown_s=60)
    for i in range(1000):
        g.auth_failed(f"10.0.{i // 256}.{i % 256}", 0)
    assert len(g) <= 100
    g.open("busy", 0)
    g.close("busy", 0)
    assert len(g) <= 100 and g.refused_for("busy", 0) is None


def test_auth_failures_are_logged_throttled(caplog: pytest.LogCaptureFixture) -> None:
    g = PeerGuard(max_connections=2, max_failures=1000, cooldown_s=60)
    with caplog.at_level(logging.WARNING, logger="voice_agent.serve.peers"):
        for i in range(500):
            g.auth_failed(f"p{i}", i * 0.01)  # 500 failures in 5 s
        g.auth_failed("late", 20.0)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert lines[1].endswith("(500 failed attempts from all peers since the last auth line)")


def test_throttle() -> None:
    t = Throttle(10)
    assert [t.allow(s) for s in (0, 1, 2, 9.9, 10, 11, 25)] == [0, None, None, None, 3, None, 1]
