"""What a client may tune per session: turn detection, barge-in, and the per-turn model settings.

`SessionSettings` is plain validated data shared by the session (`voice_agent.serve.session`), the
transport-independent events (`voice_agent.serve.protocols.events`) and the server's defaults
(`voice_agent.serve.config`). How settings look on a wire is each protocol adapter's business
(`voice_agent.serve.protocols.native` for the native protocol), so that what an adapter echoes and what it
accepts are written next to each other.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from voice_agent.engine.api import TurnSettings
from voice_agent.errors import VadSettingsError
from voice_agent.serve.vad import VadSettings

MAX_MIN_INTERRUPTION_MS = 10_000


@dataclass(frozen=True)
class SessionSettings:
    """Turn detection (`vad`), barge-in (`min_interruption_ms`) and per-turn model settings (`turn`).

    The rest is what the OpenAI Realtime endpoint lets a client choose (the native protocol keeps the
    defaults): `instructions` the system prompt (None: the server's); `turn_detection` False for
    client-committed turns (push-to-talk: no VAD turns, no barge-in); `create_response` whether a detected
    turn starts a response; `interrupt_response` whether user speech during a response cuts it;
    `idle_timeout_ms` (None: never) after a response has played with no user speech, the session commits the
    silence as a turn (OpenAI's timeout_triggered); `transcribe` whether user audio items get a transcript;
    `modality` 'text' for text-only replies."""

    vad: VadSettings = field(default_factory=VadSettings)
    turn: TurnSettings = field(default_factory=TurnSettings)
    min_interruption_ms: int = 400  # user speech during a response shorter than this is ignored
    instructions: str | None = None
    turn_detection: bool = True
    create_response: bool = True
    interrupt_response: bool = True
    idle_timeout_ms: int | None = None
    transcribe: bool = False
    modality: Literal["audio", "text"] = "audio"

    def __post_init__(self) -> None:
        m = self.min_interruption_ms
        if not (isinstance(m, int) and not isinstance(m, bool) and 0 <= m <= MAX_MIN_INTERRUPTION_MS):
            raise VadSettingsError(
                f"min_interruption_ms: expected an integer 0..{MAX_MIN_INTERRUPTION_MS}, got {m!r}"
            )
