"""Real-time pacing of reply audio: the clock's arithmetic, and the queue in front of the outbox."""

from __future__ import annotations

import asyncio
import time

import pytest

from voice_agent.serve.outbox import Outbox
from voice_agent.serve.pacing import PaceClock, PacedQueue


def test_the_clock_lets_the_lead_out_at_once_then_one_frame_per_frame_time() -> None:
    clock = PaceClock(lead_ms=60)
    t = 100.0
    waits = []
    for _ in range(6):  # 20 ms frames from t = 100 s: the first and 60 ms of lead at once, then one per 20 ms
        wait = clock.delay(t)
        waits.append(round(wait, 3))
        t += wait
        clock.sent(20)
    assert waits == [0.0, 0.0, 0.0, 0.0, 0.02, 0.02]


def test_the_clock_starts_over_when_the_player_ran_dry_or_was_flushed() -> None:
    clock = PaceClock(lead_ms=40)
    assert clock.delay(10.0) == 0.0
    clock.sent(100)  # 100 ms queued at the far end
    assert clock.delay(10.0) == pytest.approx(0.06)  # 100 - 40 ms ahead
    assert clock.delay(10.2) == 0.0  # played out by then: a new run starts
    clock.sent(100)
    clock.restart()  # flushed (a barge-in's clear)
    assert clock.delay(10.21) == 0.0
    with pytest.raises(ValueError, match="lead_ms"):
        PaceClock(-1)


async def test_the_queue_releases_audio_in_real_time_in_order_and_drops_an_interrupted_reply() -> None:
    outbox = Outbox(limit=1000)
    paced = PacedQueue(outbox, lead_ms=40)
    paced.put("ctl", None, None, 0.0)
    for i in range(10):
        paced.put(f"a{i}", "r1", None, 20.0)
    paced.put("mark", "r1", None, 0.0)
    task = asyncio.create_task(paced.run())
    start = time.monotonic()
    got: list[tuple[str, float]] = []
    for _ in range(12):
        out = await outbox.get()
        got.append((str(out.data), time.monotonic() - start))
    assert [d for d, _ in got] == ["ctl", *(f"a{i}" for i in range(10)), "mark"]
    # 200 ms of audio with a 40 ms lead: the last frame leaves about 140 ms after the first, not at once.
    assert 0.12 <= got[-2][1] <= 0.6
    for i in range(10):
        paced.put(f"b{i}", "r2", None, 20.0)
    await asyncio.sleep(0.05)
    paced.drop("r2")  # interrupted: nothing more of r2 goes out
    paced.put("clear", None, None, 0.0)
    await asyncio.sleep(0.05)
    task.cancel()
    rest = []
    while len(outbox):
        rest.append(str((await outbox.get()).data))
    assert rest[-1] == "clear" and len(rest) < 10 and all(r.startswith("b") for r in rest[:-1])
