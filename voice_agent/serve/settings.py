"""What a client may tune per session: turn detection, barge-in, and the per-turn model settings.

`SessionSettings` is plain validated data shared by the session (`voice_agent.serve.session`), the
transport-independent events (`voice_agent.serve.protocols.events`) and the server's defaults
(`voice_agent.serve.config`). How settings look on a wire is each protocol adapter's business
(`voice_agent.serve.protocols.native` for the native protocol), so that what an adapter echoes and what it
accepts are written next to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from voice_agent.engine.api import TurnSettings
from voice_agent.errors import VadSettingsError
from voice_agent.serve.vad import VadSettings

MAX_MIN_INTERRUPTION_MS = 10_000


@dataclass(frozen=True)
class SessionSettings:
    """Turn detection (`vad`), barge-in (`min_interruption_ms`) and per-turn model settings (`turn`)."""

    vad: VadSettings = field(default_factory=VadSettings)
    turn: TurnSettings = field(default_factory=TurnSettings)
    min_interruption_ms: int = 400  # user speech during a response shorter than this is ignored

    def __post_init__(self) -> None:
        m = self.min_interruption_ms
        if not (isinstance(m, int) and not isinstance(m, bool) and 0 <= m <= MAX_MIN_INTERRUPTION_MS):
            raise VadSettingsError(
                f"min_interruption_ms: expected an integer 0..{MAX_MIN_INTERRUPTION_MS}, got {m!r}"
            )
