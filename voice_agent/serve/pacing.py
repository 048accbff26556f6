"""Real-time pacing of reply audio for a far end that plays whatever arrives (a phone carrier).

A carrier queues every media frame it receives and plays them in order, so a reply sent as fast as the
engine makes it sits in the carrier's buffer: a barge-in must then flush it (`clear`) and the server no
longer knows what the caller has heard. Sending in real time keeps the carrier's buffer short: `PaceClock`
lets audio go out at most `lead_ms` ahead of a real-time player that started when the first frame went,
measured on the monotonic clock (never from sleep durations, so lateness does not accumulate), and starts
over when the player has run dry (a pause between replies) or was flushed (`restart`).

`PacedQueue` sits in front of a connection's `Outbox`: every message of a paced connection goes through it
in order; control messages (0 ms of audio) pass at once, audio messages when the clock allows. `drop`
removes an interrupted response's unsent messages and restarts the clock (the carrier flushed its buffer).
The queue holds at most one reply's worth of messages (the engine bounds a reply's length).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from dataclasses import dataclass

import anyio

from voice_agent.serve.outbox import Outbox


class PaceClock:
    """When the next audio may go out: at most `lead_ms` ahead of real-time playback. Times in seconds."""

    def __init__(self, lead_ms: float) -> None:
        if not lead_ms >= 0:
            raise ValueError(f"lead_ms: expected a number >= 0, got {lead_ms!r}")
        self.lead_s = lead_ms / 1000.0
        self._start: float | None = None  # when the player started (the first frame of this run went)
        self._sent_s = 0.0  # audio sent since then

    def delay(self, now: float) -> float:
        """Seconds to wait before the next audio message (0: send it now)."""
        if self._start is None or now >= self._start + self._sent_s:  # nothing queued at the far end any more
            self._start, self._sent_s = now, 0.0
            return 0.0
        return max(0.0, self._start + self._sent_s - self.lead_s - now)

    def sent(self, audio_ms: float) -> None:
        """`audio_ms` of audio went out (call after a `delay` of 0)."""
        self._sent_s += audio_ms / 1000.0

    def restart(self) -> None:
        """The far end dropped what it had queued: the next audio starts a new run."""
        self._start, self._sent_s = None, 0.0


@dataclass(frozen=True)
class _Paced:
    data: str | bytes
    response_id: str | None
    audio: tuple[str, float] | None
    audio_ms: float


class PacedQueue:
    """Messages on their way to an `Outbox`, audio released in real time; see the module docstring."""

    def __init__(self, outbox: Outbox, lead_ms: float) -> None:
        self.outbox = outbox
        self.clock = PaceClock(lead_ms)
        self._items: deque[_Paced] = deque()
        self._changed = asyncio.Event()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, data: str | bytes, response_id: str | None, audio: tuple[str, float] | None,
            audio_ms: float) -> None:
        self._items.append(_Paced(data, response_id, audio, audio_ms))
        self._changed.set()

    def drop(self, response_id: str) -> None:
        """Forget `response_id`'s unsent messages; the far end flushes its buffer, so the clock restarts."""
        self._items = deque(m for m in self._items if m.response_id != response_id)
        self.clock.restart()
        self._changed.set()

    async def run(self) -> None:
        """Move messages to the outbox, in order, audio at the clock's pace (forever)."""
        while True:
            while not self._items:
                self._changed.clear()
                await self._changed.wait()
            head = self._items[0]
            wait = self.clock.delay(time.monotonic()) if head.audio_ms > 0 else 0.0
            if wait > 0:
                self._changed.clear()
                with anyio.move_on_after(wait):  # a drop may change the head: look again after it
                    await self._changed.wait()
                continue
            self._items.popleft()
            self.outbox.put(head.data, head.response_id, head.audio)
            if head.audio_ms > 0:
                self.clock.sent(head.audio_ms)
