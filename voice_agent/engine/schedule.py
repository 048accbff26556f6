"""The read/write schedule between the LLM and the TTS LM: one object per session, pure Python.

The reference (architecture notes §3.3, §3.5) reads R text tokens, then writes up to W units:

- after every LLM text token a read is due when the count of text tokens is a multiple of R, or when the
  LLM has just finished (it sampled eos, the eos token itself being read, or it reached max_new_tokens);
- a read fuses the text tokens not yet read (R, or 1..R on the final read); the final read also appends
  the raw `<sep>` embedding;
- after a read the TTS writes up to W tokens, stopping early at the TTS eos; after the final read it
  writes until the TTS eos, at most 1024 tokens;
- a generated TTS eos is fed back like any other generated token (the next read follows it).

So the TTS sequence is `[F F F][u x10][F F F][u x10] ... [F..F][<sep>][u u ... u][eos]`.

The reference pauses text generation while a block is written. This object also allows text tokens to
arrive during a block (an engine may run the LLM and TTS steps of a session side by side): reads that fall
due meanwhile are queued and start, in order, when the block ends, so the TTS sequence is the same.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from enum import Enum

FINAL_UNIT_LIMIT = 1024  # TTS tokens written after the final read, at most (the reference's max_new_tokens)
CUT_FINAL_BLOCKS = 2  # a reply cut by its text limit writes at most this many blocks' units after its last read


class SchedulePhase(Enum):
    READING = "reading"  # no block in progress: waiting for text tokens
    WRITING = "writing"  # a TTS block is in progress
    DONE = "done"  # the final block has ended


@dataclass(frozen=True)
class Read:
    """One TTS call: fuse text tokens [start, stop) of the response, optionally append `<sep>`, then write."""

    start: int  # index of the first text token to fuse (0-based over this response's text tokens)
    stop: int  # one past the last
    append_sep: bool  # the final read: append the raw <sep> embedding after the fused tokens
    max_units: int  # TTS tokens that may be written after this read (W, or FINAL_UNIT_LIMIT)

    @property
    def num_tokens(self) -> int:
        """How many newest text tokens to fuse."""
        return self.stop - self.start

    @property
    def final(self) -> bool:
        return self.append_sep


class ReadWriteSchedule:
    """Which text tokens the TTS reads when, and how many units it may write after each read.

    Transitions (all here): READING --read starts--> WRITING --block ends--> READING, or DONE after the
    final block. A block ends at the TTS eos or when `max_units` tokens have been written.
    """

    def __init__(self, read_tokens: int = 3, write_units: int = 10, final_units: int = FINAL_UNIT_LIMIT):
        for name, value in (
            ("read_tokens", read_tokens),
            ("write_units", write_units),
            ("final_units", final_units),
        ):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ReadWriteSchedule: expected {name} a positive int, got {value!r}")
        self.read_tokens = read_tokens
        self.write_units = write_units
        self.final_units = final_units
        self.phase = SchedulePhase.READING
        self.text_tokens = 0  # text tokens received so far
        self.text_finished = False
        self.unit_blocks: list[list[int]] = []  # units written after each read, one list per read
        self._read_up_to = 0  # text tokens covered by reads issued so far
        self._pending: deque[Read] = deque()
        self._block: Read | None = None
        self._written = 0  # TTS tokens written in the current block (units, eos, anything sampled)

    @property
    def block(self) -> Read | None:
        """The read whose block is being written, or None."""
        return self._block

    @property
    def units_left(self) -> int:
        """TTS tokens the current block may still write (0 when no block is in progress)."""
        return 0 if self._block is None else self._block.max_units - self._written

    @property
    def done(self) -> bool:
        return self.phase is SchedulePhase.DONE

    def text_token(self, finished: bool = False, cut: bool = False) -> Read | None:
        """Record one LLM text token; `finished` when it ends the text (eos sampled, or max tokens reached).
        `cut`: the text was cut by its length limit, so the final block may write at most CUT_FINAL_BLOCKS
        blocks' worth of units (the speech stops soon after the last text token instead of running on to
        `final_units`, which a model that never writes its end of speech would reach).

        Returns the read to perform now, or None (none is due, or a block is in progress and the due
        read is queued; take it with `next_read` once the block ends).
        """
        if self.text_finished:
            raise RuntimeError(
                f"text_token: expected no text after the finishing token, got token {self.text_tokens + 1}"
            )
        self.text_tokens += 1
        self.text_finished = finished
        if finished or self.text_tokens % self.read_tokens == 0:
            self._pending.append(
                Read(
                    start=self._read_up_to,
                    stop=self.text_tokens,
                    append_sep=finished,
                    max_units=(min(self.final_units, CUT_FINAL_BLOCKS * self.write_units) if cut
                               else self.final_units) if finished else self.write_units,
                )
            )
            self._read_up_to = self.text_tokens
        return self.next_read()

    def next_read(self) -> Read | None:
        """Start the next queued read if no block is in progress; None when there is nothing to start."""
        if self.phase is not SchedulePhase.READING or not self._pending:
            return None
        self._block = self._pending.popleft()
        self._written = 0
        self.unit_blocks.append([])
        self.phase = SchedulePhase.WRITING
        return self._block

    def wrote(self, unit: int | None, eos: bool = False) -> bool:
        """Record one TTS token of the current block: a speech `unit`, the TTS eos (`eos=True`, unit None),
        or neither (a non-unit token, possible only with unconstrained sampling).

        Returns True while the block may continue, False once it has ended (eos, or the limit reached).
        """
        if self._block is None:
            raise RuntimeError(f"wrote: expected a block in progress, got phase {self.phase.value}")
        if eos and unit is not None:
            raise ValueError(f"wrote: expected unit None with eos, got unit {unit}")
        if unit is not None:
            self.unit_blocks[-1].append(unit)
        self._written += 1
        if eos or self._written >= self._block.max_units:
            self.phase = SchedulePhase.DONE if self._block.final else SchedulePhase.READING
            self._block = None
            return False
        return True

    @property
    def units(self) -> list[int]:
        """Every unit written so far, in order."""
        return [u for block in self.unit_blocks for u in block]
