"""Which work the engine's next step runs, and who gets a session slot: plain Python, no torch.

The engine step is schedule -> run -> postprocess. `Scheduler.schedule(views)` looks at every live turn
(a `TurnView`: what it is waiting for, how much audio its listener has buffered) and returns a `StepPlan`:
one ranked candidate list per stage. The engine runs the stages in order, each as one batched call over
the first `max_batch` candidates that are ready when the stage runs, so work that a stage enables (the
first token of a new turn, a read that falls due, a block that ends) can go on in the same step.

Policy:

1. New turns first. Queued turns are encoded and prefilled before anything else, oldest first, up to
   `max_new_turns` turns and `max_prefill_tokens` positions per step (the first queued turn always goes,
   however long). They gate first audio, and a prefill costs about one decode step of the whole batch.
2. One LLM decode step for every turn that wants text, unless its text already runs `max_text_lead`
   tokens ahead of what the TTS has read. Text ahead lets a TTS block start the moment the previous one
   ends (no stall of R LLM steps every W units); the cap bounds the work a barge-in throws away. A turn
   that has not sent audio yet is never held back: its lead is below one read until its first block.
3. One TTS LM step for every turn with a block in progress.
4. One vocoder call (flow + HiFT) for every turn with a unit chunk ready, one chunk per turn per step.
5. Ranking in every stage (matters only when more than `max_batch` are ready): confirmed turns before
   speculative ones, then turns that have not sent audio yet (first audio is never starved), then the turn
   whose listener has the least audio buffered ahead of real time (earliest deadline first, which is also
   what makes it fair: whoever waited longest relative to playback goes next), then arrival order.
6. Speculation (a turn started during the caller's pause, before the end of turn is confirmed) only uses
   slack: every queued confirmed turn is admitted before any speculative one, and a speculative turn is
   admitted only while fewer than `max_speculative_load` confirmed turns are in flight. Under load a
   speculative turn waits, queued, until it is confirmed (then it is an ordinary turn) or discarded. A
   speculative turn that has made as much audio as may be held before confirmation (`paused`) takes part
   in no stage until it is confirmed.

Admission (`SlotPool`): a session owns one KV slot for its lifetime. The number of slots is the smaller of
`max_sessions` and what the KV memory budget holds at the session's context length
(`slots_for_budget`); when all are taken, `acquire` raises AdmissionError naming the limit that was hit,
instead of admitting a session that would slow everyone down.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from enum import Enum

from voice_agent.errors import AdmissionError

GIB = 1 << 30


class TurnPhase(Enum):
    """QUEUED -> GENERATING -> FLUSHING -> (removed). Cancellation removes a turn from any phase."""

    QUEUED = "queued"  # submitted: waits for the encoder and the prefill
    GENERATING = "generating"  # the LLM and/or the TTS LM still produce text or units
    FLUSHING = "flushing"  # all units are written; unit chunks wait for the vocoder


@dataclass(frozen=True)
class TurnView:
    """What the scheduler needs to know about one live turn."""

    id: int
    phase: TurnPhase
    arrival: int  # submission order
    prompt_tokens: int = 0  # positions to prefill (an estimate while QUEUED)
    wants_text: bool = False
    wants_tts: bool = False
    text_lead: int = 0  # text tokens generated but not read by a started TTS block
    vocode_ready: bool = False  # a unit chunk waits for the vocoder
    started_audio: bool = False  # the first audio chunk has been sent
    audio_ahead_ms: float = 0.0  # audio sent minus real time since the first chunk
    speculative: bool = False  # started before its end of turn was confirmed (may be discarded)
    paused: bool = False  # a speculative turn holding as much audio as it may before its confirmation


@dataclass(frozen=True)
class SchedulerConfig:
    max_new_turns: int = 16  # turns encoded + prefilled per step
    max_prefill_tokens: int = 8192  # prompt positions prefilled per step (the first turn always goes)
    max_batch: int = 256  # rows per LLM / TTS / vocoder call
    max_text_lead: int = 9  # text tokens a turn may run ahead of the TTS (3 reads at R = 3)
    max_speculative_load: int = 8  # confirmed turns in flight at which speculative turns stop being admitted

    def __post_init__(self) -> None:
        for name in ("max_new_turns", "max_prefill_tokens", "max_batch", "max_text_lead", "max_speculative_load"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"SchedulerConfig.{name}: expected a positive int, got {value!r}")


@dataclass(frozen=True)
class StepPlan:
    """Ranked turn ids per stage; the engine runs the first `max_batch` that are ready at each stage."""

    admit: tuple[int, ...] = ()
    text: tuple[int, ...] = ()
    tts: tuple[int, ...] = ()
    vocode: tuple[int, ...] = ()
    max_batch: int = 256


def _rank(view: TurnView) -> tuple[bool, bool, float, int]:
    return (view.speculative, view.started_audio, view.audio_ahead_ms if view.started_audio else 0.0, view.arrival)


class Scheduler:
    """Stateless policy over `TurnView`s (see the module docstring)."""

    def __init__(self, config: SchedulerConfig | None = None):
        self.config = config or SchedulerConfig()

    def schedule(self, views: list[TurnView]) -> StepPlan:
        cfg = self.config
        admit: list[int] = []
        tokens = 0
        confirmed = sum(1 for v in views if v.phase is not TurnPhase.QUEUED and not v.speculative)
        for view in sorted((v for v in views if v.phase is TurnPhase.QUEUED), key=lambda v: (v.speculative, v.arrival)):
            if len(admit) >= cfg.max_new_turns or (admit and tokens + view.prompt_tokens > cfg.max_prefill_tokens):
                break
            if view.speculative and confirmed >= cfg.max_speculative_load:
                break  # speculation only with slack; the rest of the queue is speculative too
            admit.append(view.id)
            tokens += view.prompt_tokens
            confirmed += 0 if view.speculative else 1
        admitted = set(admit)
        live = sorted((v for v in views if (v.phase is not TurnPhase.QUEUED or v.id in admitted) and not v.paused),
                      key=_rank)
        # New turns take part in every stage of the step that prefills them; the engine skips a candidate
        # that is not ready when its stage runs.
        text = [v.id for v in live if v.id in admitted
                or (v.phase is TurnPhase.GENERATING and v.wants_text and v.text_lead < cfg.max_text_lead)]
        tts = [v.id for v in live if v.phase is TurnPhase.GENERATING or v.id in admitted]
        vocode = [v.id for v in live if v.vocode_ready or v.phase is TurnPhase.GENERATING or v.id in admitted]
        return StepPlan(tuple(admit), tuple(text), tuple(tts), tuple(vocode), cfg.max_batch)

    def text_allowed(self, text_lead: int) -> bool:
        """Whether a turn whose text is `text_lead` tokens ahead of the TTS may decode more now."""
        return text_lead < self.config.max_text_lead


def slots_for_budget(max_sessions: int, bytes_per_session: int, kv_budget_bytes: int | None) -> int:
    """Session slots: `max_sessions`, or fewer when the KV budget holds fewer sessions."""
    if max_sessions < 1:
        raise ValueError(f"max_sessions: expected >= 1, got {max_sessions}")
    if kv_budget_bytes is None:
        return max_sessions
    fit = kv_budget_bytes // max(1, bytes_per_session)
    if fit < 1:
        raise ValueError(
            f"KV budget {kv_budget_bytes / GIB:.2f} GiB holds no session: one needs {bytes_per_session / GIB:.3f} GiB"
        )
    return min(max_sessions, fit)


class SlotPool:
    """Session slots 0..n-1, thread-safe; `acquire` refuses with the reason when none is free."""

    def __init__(self, slots: int, limit_reason: str):
        if slots < 1:
            raise ValueError(f"SlotPool: expected >= 1 slot, got {slots}")
        self.slots = slots
        self.limit_reason = limit_reason
        self._free = list(range(slots - 1, -1, -1))  # pop() hands out the lowest slot first
        self._owner: dict[int, str] = {}
        self._lock = threading.Lock()

    def acquire(self, owner: str) -> int:
        with self._lock:
            if not self._free:
                raise AdmissionError(
                    f"server full: {self.slots} of {self.slots} sessions in use ({self.limit_reason}); "
                    "try again later"
                )
            slot = self._free.pop()
            self._owner[slot] = owner
            return slot

    def release(self, slot: int) -> None:
        with self._lock:
            if slot not in self._owner:
                raise ValueError(f"SlotPool.release: slot {slot} is not in use")
            del self._owner[slot]
            self._free.append(slot)
            self._free.sort(reverse=True)

    @property
    def in_use(self) -> int:
        with self._lock:
            return len(self._owner)
