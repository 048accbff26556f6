"""One connection's outgoing backlog: producers never wait, memory stays bounded, a slow client is found.

The receive loop and the engine pumps `put` encoded messages and never await, so a client that reads
slowly never delays the server's reading of its microphone (VAD, end of turn, barge-in). The send loop
`get`s them and writes them at the pace the client reads.

Bounds, with `limit` = the server's `send_queue_messages`:
- the client is *behind* while `limit` or more messages are unsent; `behind_since` is when that began
  (None while not behind), and `overdue(patience_s)` returns once the client has stayed behind for
  `patience_s` without a break (the connection then closes it with `SlowClient`);
- while behind the backlog may grow to `OVERFLOW * limit` messages; a `put` beyond that raises
  `SlowClient` at once. So memory is bounded by construction: at most `OVERFLOW * limit` unsent
  messages per connection, each one encoded server event (a JSON event or one engine block of audio),
  plus the one message the send loop is writing.

`drop(response_id)` removes the unsent messages of an interrupted response: the client must not hear
them, and they no longer count against it.

A message may say which reply audio it completes (`Outgoing.audio`: the response and the end of its
audio in ms); `get` hands it over with that, so the sender knows what audio has gone out.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import anyio

from voice_agent.errors import SlowClient

OVERFLOW = 2  # the backlog may reach this many times `limit` while the client is behind


@dataclass(frozen=True)
class Outgoing:
    data: str | bytes
    response_id: str | None = None  # the response this message is part of, if `drop` may remove it
    audio: tuple[str, float] | None = None  # (response id, end ms): reply audio sent once this is


class Outbox:
    """The bounded, never-waiting outgoing backlog of one connection; see the module docstring."""

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"expected a limit of at least 1 message, got {limit}")
        self.limit = limit
        self.capacity = OVERFLOW * limit
        self.behind_since: float | None = None
        self._items: deque[Outgoing] = deque()
        self._ready = asyncio.Event()  # set while there is something to send
        self._behind = asyncio.Event()  # set while behind_since is not None

    def __len__(self) -> int:
        return len(self._items)

    def put(self, data: str | bytes, response_id: str | None = None, audio: tuple[str, float] | None = None) -> None:
        """Queue one message (see `Outgoing`); raises SlowClient when the backlog is already at capacity."""
        if len(self._items) >= self.capacity:
            raise SlowClient(
                f"expected the client to read its messages, got {len(self._items)} unread "
                f"(at most {self.capacity} are kept)"
            )
        self._items.append(Outgoing(data, response_id, audio))
        self._ready.set()
        self._settle()

    def drop(self, response_id: str) -> None:
        """Forget the unsent messages of `response_id`."""
        self._items = deque(m for m in self._items if m.response_id != response_id)
        self._settle()

    async def get(self) -> Outgoing:
        """The oldest unsent message, waiting for one if there is none."""
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        message = self._items.popleft()
        self._settle()
        return message

    async def overdue(self, patience_s: float) -> None:
        """Return once the client has been behind for `patience_s` without a break."""
        while True:
            await self._behind.wait()
            since = self.behind_since
            if since is None:  # caught up again between the event and this task's turn to run
                continue
            await anyio.sleep(since + patience_s - time.monotonic())
            if self.behind_since == since:
                return

    def _settle(self) -> None:
        """Start or stop the behind clock after the backlog changed."""
        behind = len(self._items) >= self.limit
        if behind and self.behind_since is None:
            self.behind_since = time.monotonic()
            self._behind.set()
        elif not behind and self.behind_since is not None:
            self.behind_since = None
            self._behind.clear()
