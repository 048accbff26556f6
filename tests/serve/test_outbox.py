"""Outbox: producers never wait, the behind clock, the hard bound, and dropping an interrupted response."""

from __future__ import annotations

import asyncio

import pytest

from voice_agent.errors import SlowClient
from voice_agent.serve.outbox import OVERFLOW, Outbox


async def test_messages_come_out_in_order() -> None:
    box = Outbox(4)
    for m in ("a", b"b", "c"):
        box.put(m)
    assert [(await box.get()).data for _ in range(3)] == ["a", b"b", "c"]
    assert len(box) == 0


async def test_get_waits_for_a_message() -> None:
    box = Outbox(4)
    waiting = asyncio.create_task(box.get())
    await asyncio.sleep(0.01)
    assert not waiting.done()
    box.put("late")
    assert (await asyncio.wait_for(waiting, 1.0)).data == "late"


async def test_the_client_is_behind_from_limit_messages_until_it_catches_up() -> None:
    box = Outbox(3)
    box.put("1")
    box.put("2")
    assert box.behind_since is None
    box.put("3")
    assert box.behind_since is not None
    box.drop("nothing")  # no change: still behind, same start
    since = box.behind_since
    box.put("4")
    assert box.behind_since == since
    await box.get()
    assert box.behind_since == since  # 3 unsent: still behind
    await box.get()
    assert box.behind_since is None


def test_put_past_the_capacity_raises_slow_client_and_keeps_the_bound() -> None:
    box = Outbox(4)
    for i in range(OVERFLOW * 4):
        box.put(str(i))  # never waits, never raises up to the capacity
    with pytest.raises(SlowClient, match=r"expected the client to read its messages, got 8 unread \(at most 8"):
        box.put("one too many")
    assert len(box) == OVERFLOW * 4


async def test_drop_removes_only_the_interrupted_responses_messages() -> None:
    box = Outbox(4)
    box.put("started r1")
    box.put(b"audio r1", "r1")
    box.put("text r1", "r1")
    box.put("interrupted r1")
    box.put(b"audio r2", "r2")
    assert box.behind_since is not None
    box.drop("r1")
    assert box.behind_since is None  # what the client no longer needs does not count against it
    assert [(await box.get()).data for _ in range(3)] == ["started r1", "interrupted r1", b"audio r2"]


async def test_a_message_says_which_reply_audio_it_completes() -> None:
    box = Outbox(4)
    box.put(b"audio r1", "r1", audio=("r1", 480.0))
    box.put("done r1")
    first, second = await box.get(), await box.get()
    assert (first.data, first.response_id, first.audio) == (b"audio r1", "r1", ("r1", 480.0))
    assert second.audio is None


async def test_overdue_returns_after_an_unbroken_spell_behind() -> None:
    box = Outbox(2)
    watch = asyncio.create_task(box.overdue(0.15))
    box.put("1")
    box.put("2")  # behind
    await asyncio.sleep(0.1)
    await box.get()  # caught up: the clock stops
    await asyncio.sleep(0.1)
    assert not watch.done()
    box.put("3")  # behind again: a new spell
    await asyncio.sleep(0.1)
    assert not watch.done()
    await asyncio.wait_for(watch, 1.0)
