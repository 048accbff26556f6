"""Scheduler: stage choice, ranking, fairness and admission, as plain Python (no torch, no model)."""

from __future__ import annotations

import subprocess
import sys

import pytest

from voice_agent.engine.scheduler import (
    Scheduler,
    SchedulerConfig,
    SlotPool,
    TurnPhase,
    TurnView,
    slots_for_budget,
)
from voice_agent.errors import AdmissionError

Q, G, F = TurnPhase.QUEUED, TurnPhase.GENERATING, TurnPhase.FLUSHING


def view(i: int, phase: TurnPhase, **kw: object) -> TurnView:
    return TurnView(id=i, phase=phase, arrival=kw.pop("arrival", i), **kw)  # type: ignore[arg-type]


def test_the_scheduler_imports_no_torch() -> None:
    code = ("import sys, voice_agent.engine.scheduler, voice_agent.engine.conversation; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_new_turns_are_admitted_first_oldest_first() -> None:
    views = [view(1, G, wants_text=True, started_audio=True), view(3, Q, arrival=5, prompt_tokens=300),
             view(2, Q, arrival=4, prompt_tokens=300)]
    plan = Scheduler().schedule(views)
    assert plan.admit == (2, 3)
    # New turns rank before a turn that is already speaking in every later stage of the same step.
    assert plan.text == (2, 3, 1) and plan.tts[:2] == (2, 3) and plan.vocode[:2] == (2, 3)


def test_prefill_budget_caps_a_step_but_the_oldest_turn_always_goes() -> None:
    s = Scheduler(SchedulerConfig(max_prefill_tokens=500, max_new_turns=8))
    assert s.schedule([view(1, Q, prompt_tokens=900), view(2, Q, prompt_tokens=10)]).admit == (1,)
    assert s.schedule([view(1, Q, prompt_tokens=300), view(2, Q, prompt_tokens=300)]).admit == (1,)
    assert s.schedule([view(i, Q, prompt_tokens=100) for i in range(7)]).admit == (0, 1, 2, 3, 4)
    assert Scheduler(SchedulerConfig(max_new_turns=2)).schedule([view(i, Q) for i in range(4)]).admit == (0, 1)


def test_text_may_run_ahead_of_speech_only_up_to_the_lead_cap() -> None:
    s = Scheduler(SchedulerConfig(max_text_lead=6))
    views = [view(1, G, wants_text=True, text_lead=5), view(2, G, wants_text=True, text_lead=6),
             view(3, G, wants_text=False, wants_tts=True)]
    plan = s.schedule(views)
    assert plan.text == (1,)
    assert set(plan.tts) == {1, 2, 3}
    assert s.text_allowed(5) and not s.text_allowed(6)


def test_a_turn_with_all_units_written_only_waits_for_the_vocoder() -> None:
    plan = Scheduler().schedule([view(1, F, vocode_ready=True), view(2, F, vocode_ready=False)])
    assert plan.admit == () and plan.text == () and plan.tts == () and plan.vocode == (1,)


def test_turns_without_audio_rank_first_then_the_least_buffered() -> None:
    views = [
        view(1, G, started_audio=True, audio_ahead_ms=900.0),
        view(2, G, started_audio=True, audio_ahead_ms=-50.0),  # already behind real time
        view(3, G, started_audio=False),
        view(4, G, started_audio=True, audio_ahead_ms=300.0),
        view(5, G, started_audio=False, arrival=0),
    ]
    plan = Scheduler().schedule(views)
    assert plan.tts == (5, 3, 2, 4, 1)
    assert plan.vocode == (5, 3, 2, 4, 1)


def test_under_a_batch_cap_every_turn_is_served_fairly() -> None:
    """Three speaking turns, room for two per call: serving the least buffered first keeps them level."""
    s = Scheduler(SchedulerConfig(max_batch=2))
    ahead = {1: 0.0, 2: 0.0, 3: 0.0}
    served = {1: 0, 2: 0, 3: 0}
    for _ in range(30):
        plan = s.schedule([view(i, G, wants_tts=True, started_audio=True, audio_ahead_ms=a) for i, a in ahead.items()])
        for i in plan.tts[: plan.max_batch]:
            served[i] += 1
            ahead[i] += 40.0  # one unit of audio
        for i in ahead:
            ahead[i] -= 25.0  # real time passes
    assert max(served.values()) - min(served.values()) <= 1
    assert max(ahead.values()) - min(ahead.values()) <= 40.0


def test_speculative_turns_use_only_slack() -> None:
    s = Scheduler(SchedulerConfig(max_speculative_load=2))
    # Confirmed turns are admitted before speculative ones, whatever their arrival.
    views = [view(1, Q, arrival=1, speculative=True), view(2, Q, arrival=2), view(3, Q, arrival=3)]
    assert s.schedule(views).admit == (2, 3)  # 2 confirmed turns now in flight: the speculative one waits
    assert s.schedule([view(2, G), view(1, Q, speculative=True)]).admit == (1,)  # one in flight: slack
    assert s.schedule([view(2, G), view(3, F), view(1, Q, speculative=True)]).admit == ()
    # ...and a speculative turn in flight ranks after the confirmed ones in every stage.
    plan = s.schedule([view(1, G, wants_text=True, speculative=True), view(2, G, wants_text=True, arrival=9)])
    assert plan.text == (2, 1) and plan.tts == (2, 1)
    # One that holds all the audio it may before its confirmation waits in every stage.
    paused = s.schedule([view(1, G, wants_text=True, vocode_ready=True, speculative=True, paused=True)])
    assert (paused.text, paused.tts, paused.vocode) == ((), (), ())


def test_slot_pool_refuses_with_the_limit_named_and_reuses_released_slots() -> None:
    pool = SlotPool(2, "max_sessions 2")
    a, b = pool.acquire("a"), pool.acquire("b")
    assert {a, b} == {0, 1} and pool.in_use == 2
    with pytest.raises(AdmissionError, match=r"2 of 2 sessions in use \(max_sessions 2\)"):
        pool.acquire("c")
    pool.release(a)
    assert pool.acquire("c") == a
    with pytest.raises(ValueError, match="not in use"):
        SlotPool(1, "x").release(0)


def test_the_kv_budget_limits_the_number_of_sessions() -> None:
    per_session = 235 * 1024 * 1024  # 7B at a 4k context
    assert slots_for_budget(8, per_session, None) == 8
    assert slots_for_budget(8, per_session, 3 * per_session + 1) == 3
    assert slots_for_budget(2, per_session, 10 * per_session) == 2
    with pytest.raises(ValueError, match="holds no session"):
        slots_for_budget(8, per_session, per_session - 1)


def test_config_is_validated() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        SchedulerConfig(max_batch=0)
