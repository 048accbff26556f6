"""The read/write schedule, driven like the reference loop: text token, maybe a read, then a block."""

from __future__ import annotations

import pytest

from voice_agent.engine.schedule import FINAL_UNIT_LIMIT, Read, ReadWriteSchedule, SchedulePhase


def run(n_text: int, eos_after: dict[int, int] | None = None, final_units: int = FINAL_UNIT_LIMIT,
        cut: bool = False):
    """Drive a schedule over `n_text` text tokens (the last one finishes the text).

    `eos_after` maps a read index to the number of units written before the TTS eos in that block;
    blocks not listed write units until their limit. Returns the schedule and the reads, in order.
    """
    eos_after = eos_after or {}
    schedule = ReadWriteSchedule(3, 10, final_units=final_units)
    reads: list[Read] = []
    unit = 0
    for t in range(n_text):
        read = schedule.text_token(finished=t == n_text - 1, cut=cut and t == n_text - 1)
        if read is None:
            assert schedule.phase is SchedulePhase.READING
            continue
        reads.append(read)
        stop_at = eos_after.get(len(reads) - 1)
        written = 0
        while True:
            if written == stop_at:
                more = schedule.wrote(None, eos=True)
            else:
                more = schedule.wrote(unit)
                unit += 1
            written += 1
            if not more:
                break
    return schedule, reads


def test_reads_three_tokens_and_writes_at_most_ten_units() -> None:
    schedule, reads = run(9, eos_after={2: 4})
    assert [(r.start, r.stop, r.append_sep) for r in reads] == [(0, 3, False), (3, 6, False), (6, 9, True)]
    assert [r.num_tokens for r in reads] == [3, 3, 3]
    assert [r.max_units for r in reads] == [10, 10, FINAL_UNIT_LIMIT]
    assert [len(b) for b in schedule.unit_blocks] == [10, 10, 4]
    assert schedule.units == list(range(24))
    assert schedule.done


@pytest.mark.parametrize(("n_text", "last_group"), [(7, 1), (8, 2), (9, 3), (1, 1), (2, 2)])
def test_final_read_takes_the_remaining_one_to_three_tokens_then_sep(n_text: int, last_group: int) -> None:
    schedule, reads = run(n_text, eos_after={(n_text - 1) // 3: 5})
    final = reads[-1]
    assert final.final and final.append_sep and final.num_tokens == last_group and final.stop == n_text
    assert all(not r.append_sep for r in reads[:-1])
    assert len(reads) == (n_text - 1) // 3 + 1
    assert len(schedule.unit_blocks[-1]) == 5 and schedule.done


def test_finishing_on_max_tokens_flushes_the_same_way() -> None:
    # The text stops on max_new_tokens (no <|im_end|>): the caller says "finished" on that token.
    schedule, reads = run(5, eos_after={1: 7})
    assert [(r.start, r.stop, r.append_sep) for r in reads] == [(0, 3, False), (3, 5, True)]
    assert schedule.unit_blocks == [list(range(10)), list(range(10, 17))]


def test_final_block_stops_at_its_limit_without_eos() -> None:
    schedule, reads = run(4, final_units=25)
    assert [len(b) for b in schedule.unit_blocks] == [10, 25]
    assert schedule.done and schedule.units_left == 0


def test_a_reply_cut_by_its_length_limit_stops_speaking_within_two_blocks() -> None:
    # No TTS eos ever (a model that never ends its speech): the final block would run to final_units...
    schedule, _ = run(4)
    assert [len(b) for b in schedule.unit_blocks] == [10, FINAL_UNIT_LIMIT]
    # ...unless the text was cut by max_new_tokens: then two blocks' worth at most (0.8 s at 25 units/s).
    schedule, reads = run(4, cut=True)
    assert reads[-1].max_units == 2 * 10 and [len(b) for b in schedule.unit_blocks] == [10, 20]
    schedule, _ = run(4, final_units=12, cut=True)  # a smaller final limit still wins
    assert [len(b) for b in schedule.unit_blocks] == [10, 12]


def test_eos_inside_a_block_ends_that_block_only() -> None:
    schedule, reads = run(10, eos_after={0: 0, 1: 6, 3: 2})
    assert [len(b) for b in schedule.unit_blocks] == [0, 6, 10, 2]
    assert len(reads) == 4 and reads[-1].num_tokens == 1


def test_text_arriving_during_a_block_queues_reads_in_order() -> None:
    schedule = ReadWriteSchedule(3, 10)
    first = schedule.text_token()
    assert first is None
    schedule.text_token()
    first = schedule.text_token()
    assert first == Read(0, 3, False, 10) and schedule.phase is SchedulePhase.WRITING
    assert [schedule.text_token() for _ in range(3)] == [None, None, None]  # the read of 3..6 waits
    assert schedule.text_token(finished=True) is None
    assert schedule.next_read() is None  # the first block is still being written
    for u in range(9):
        assert schedule.wrote(u)
    assert schedule.units_left == 1
    assert not schedule.wrote(9)
    assert schedule.next_read() == Read(3, 6, False, 10)
    assert not schedule.wrote(None, eos=True)
    assert schedule.next_read() == Read(6, 7, True, FINAL_UNIT_LIMIT)
    assert not schedule.wrote(None, eos=True)
    assert schedule.done and schedule.next_read() is None
    assert schedule.unit_blocks == [list(range(10)), [], []]


def test_misuse_is_rejected() -> None:
    schedule = ReadWriteSchedule(3, 10)
    with pytest.raises(RuntimeError, match="expected a block in progress"):
        schedule.wrote(1)
    schedule.text_token(finished=True)
    with pytest.raises(RuntimeError, match="no text after the finishing token"):
        schedule.text_token()
    with pytest.raises(ValueError, match="unit None with eos"):
        schedule.wrote(5, eos=True)
    with pytest.raises(ValueError, match="read_tokens"):
        ReadWriteSchedule(0, 10)
