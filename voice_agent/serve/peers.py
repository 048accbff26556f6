"""What the server keeps per peer (client IP address) across its connections: open connections, failed
API-key attempts and the cool-down that follows too many of them. Plain Python, clock passed in.

Rules (`voice_agent.serve.config.ServerConfig` names the settings; docs/protocol.md the closes):
- a peer may hold `max_connections` open WebSocket connections; `open()` refuses one more;
- a peer that has failed `max_failures` API-key attempts within `cooldown_s` is refused for `cooldown_s`
  from its last failure (`refused_for` says how much longer). Attempts it makes while refused are not
  looked at, so they neither count nor extend the cool-down. A successful attempt forgets its failures.

The peer is the address the ASGI server reports: the socket's, or the `X-Forwarded-For` one from a trusted
proxy (uvicorn's `--forwarded-allow-ips`, 127.0.0.1 by default). Callers behind one address (a NAT, a
proxy that is not trusted) share one peer's limits.

Memory stays bounded: a peer with no open connection and no failure within `cooldown_s` is forgotten,
and at most MAX_PEERS are remembered (the oldest idle ones go first).

`bearer_key(headers)` and `key_matches(given, key)` are the one reading of `Authorization: Bearer KEY` and
the one (constant-time) key comparison, for the WebSocket routes and /metrics alike.

Auth failures are logged, never the key: at most one line per LOG_INTERVAL_S, counting what happened
since the last line (`Throttle`), so a flood of guesses makes a few lines.
"""

from __future__ import annotations

import hmac
import logging
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

MAX_PEERS = 65_536  # peers remembered at most
LOG_INTERVAL_S = 10.0  # at most one auth log line per this


BEARER = "bearer "


def bearer_key(headers: Mapping[str, str]) -> str | None:
    """The key of an `Authorization: Bearer KEY` header, or None without one."""
    header = headers.get("authorization")
    if header is None or not header.lower().startswith(BEARER):
        return None
    return header[len(BEARER):].strip()


def key_matches(given: str | None, key: str) -> bool:
    """Whether `given` is `key`, compared in constant time."""
    return given is not None and hmac.compare_digest(given.encode(), key.encode())


class Throttle:
    """At most one event per `interval_s` passes; `allow(now)` returns how many were held back since the
    last one that passed (0 or more), or None to hold this one back."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self._last: float | None = None
        self._held = 0

    def allow(self, now: float) -> int | None:
        if self._last is not None and now - self._last < self.interval_s:
            self._held += 1
            return None
        held, self._last, self._held = self._held, now, 0
        return held


@dataclass
class _Peer:
    connections: int = 0
    failures: deque[float] = field(default_factory=deque)  # times of recent failed attempts
    refused_until: float = 0.0


class PeerGuard:
    """Per-peer connection counts and failed-auth cool-downs; see the module docstring."""

    def __init__(self, max_connections: int, max_failures: int, cooldown_s: float) -> None:
        if min(max_connections, max_failures) < 1 or cooldown_s <= 0:
            raise ValueError(f"expected positive limits, got max_connections={max_connections}, "
                             f"max_failures={max_failures}, cooldown_s={cooldown_s}")
        self.max_connections, self.max_failures, self.cooldown_s = max_connections, max_failures, cooldown_s
        self._peers: dict[str, _Peer] = {}
        self._log = Throttle(LOG_INTERVAL_S)
        self._failed_since_log = 0

    def __len__(self) -> int:
        return len(self._peers)

    def open(self, peer: str, now: float) -> bool:
        """Count a new connection of `peer`; False (not counted) when it already holds `max_connections`."""
        p = self._get(peer, now)
        if p.connections >= self.max_connections:
            return False
        p.connections += 1
        return True

    def close(self, peer: str, now: float) -> None:
        """A connection counted by `open` ended."""
        p = self._peers.get(peer)
        if p is not None:
            p.connections = max(0, p.connections - 1)
            self._forget_if_idle(peer, p, now)

    def refused_for(self, peer: str, now: float) -> float | None:
        """Seconds `peer` stays refused for failed auth, or None when it is not refused."""
        p = self._peers.get(peer)
        if p is None or now >= p.refused_until:
            return None
        return p.refused_until - now

    def auth_failed(self, peer: str, now: float) -> None:
        """Record a failed API-key attempt of `peer` (and log it, throttled)."""
        p = self._get(peer, now)
        while p.failures and now - p.failures[0] >= self.cooldown_s:
            p.failures.popleft()
        p.failures.append(now)
        refused = len(p.failures) >= self.max_failures
        if refused:
            p.failures.clear()
            p.refused_until = now + self.cooldown_s
        self._failed_since_log += 1
        held = self._log.allow(now)
        if refused:  # a cool-down always gets its line
            log.warning("auth: %s failed the API key %d times within %g s; refusing its connections for %g s "
                        "(%d failed attempts from all peers since the last auth line)", peer, self.max_failures,
                        self.cooldown_s, self.cooldown_s, self._failed_since_log)
            self._failed_since_log = 0
        elif held is not None:
            log.warning("auth: a failed API-key attempt from %s (%d failed attempts from all peers since the "
                        "last auth line)", peer, self._failed_since_log)
            self._failed_since_log = 0

    def auth_succeeded(self, peer: str) -> None:
        p = self._peers.get(peer)
        if p is not None:
            p.failures.clear()

    def _get(self, peer: str, now: float) -> _Peer:
        p = self._peers.get(peer)
        if p is None:
            if len(self._peers) >= MAX_PEERS:
                self._prune(now)
            p = self._peers[peer] = _Peer()
        return p

    def _forget_if_idle(self, peer: str, p: _Peer, now: float) -> None:
        recent = p.failures and now - p.failures[-1] < self.cooldown_s
        if p.connections == 0 and not recent and now >= p.refused_until:
            del self._peers[peer]

    def _prune(self, now: float) -> None:
        """Forget idle peers; if all are busy, the oldest without open connections (their failures go)."""
        for peer, p in list(self._peers.items()):
            self._forget_if_idle(peer, p, now)
        for peer, p in list(self._peers.items()):
            if len(self._peers) < MAX_PEERS:
                return
            if p.connections == 0:
                del self._peers[peer]
