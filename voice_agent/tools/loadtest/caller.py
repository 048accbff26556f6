"""One simulated caller: its own connection, real speech paced in real time, each turn measured.

(Interface committed first; the body follows.)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from voice_agent.tools.loadtest.records import TurnRecord, Utterance

Protocol = Literal["native", "openai", "twilio"]


async def run_caller(
    url: str,
    protocol: Protocol,
    *,
    caller: int,
    corpus: Sequence[Utterance],
    deadline: float,
    max_turns: int | None,
    barge_in: float,
    key: str | None,
    seed: int,
    on_turn: Callable[[TurnRecord], None],
    jitter_ms: float = 60.0,
) -> None:
    """Call `url` until `deadline` (time.monotonic()) or `max_turns`; report each turn through `on_turn`."""
    raise NotImplementedError
