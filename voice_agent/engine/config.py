"""The engine's limits and defaults (`EngineConfig`), and what its model thread owns (`Models`).

The server builds an `EngineConfig` from its options (`voice_agent.serve.config.ServerConfig.engine_options`);
benchmarks and tests build one directly. Sizes of the static caches follow from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from voice_agent.engine.api import DEFAULT_MAX_REPLY_TOKENS
from voice_agent.engine.schedule import FINAL_UNIT_LIMIT
from voice_agent.engine.scheduler import SchedulerConfig


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits and defaults (sizes of the static caches follow from them)."""

    max_sessions: int = 4
    context_tokens: int | None = None  # KV positions per session; None: the model's tokenizer_model_max_length
    kv_budget_bytes: int | None = None  # LLM + TTS KV and flow cache memory for all sessions; None: no limit
    max_new_tokens: int = 256  # a turn's default reply length (text tokens)
    max_reply_tokens: int = DEFAULT_MAX_REPLY_TOKENS  # the most a turn may ask for (sizes the TTS cache)
    final_units: int = FINAL_UNIT_LIMIT  # the reference's limit on units after the final read
    flow_context_units: int | None = 100  # bounded flow window in units (voice_agent.engine.flow_stream)
    flow_cache: bool = True  # cache completed flow chunks (voice_agent.engine.flow_cache)
    default_voice: str | None = None
    context_low_water: float = 0.5  # see conversation.ContextPolicy
    admit_window_ms: float = 2.0  # an idle engine waits this long after a command for more (batched starts)
    warm_up: bool = True  # run one short synthetic turn after loading, before `ready`
    threads: int | None = None  # torch CPU threads of the model thread (None: torch's default)
    speculation_hold_ms: float = 2000.0  # audio a speculative turn may make before its confirmation
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)

    def __post_init__(self) -> None:
        for name in ("max_sessions", "max_new_tokens", "max_reply_tokens", "final_units"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"EngineConfig.{name}: expected a positive int, got {value!r}")
        if self.max_new_tokens > self.max_reply_tokens:
            raise ValueError(f"EngineConfig.max_new_tokens: expected <= max_reply_tokens {self.max_reply_tokens}, "
                             f"got {self.max_new_tokens}")


@dataclass
class Models:
    """What the model thread owns: the speech LM, the units-to-audio decoder (None: units only, no audio),
    voices known by name besides the decoder directory's (e.g. a preset's), and Whisper's text decoder for
    user transcripts (None: transcripts fail with `transcriber_unavailable`, which says why and how to fix)."""

    lm: Any  # voice_agent.model.speech_lm.SpeechLM
    decoder: Any | None = None  # voice_agent.model.cosy2.decoder.Cosy2Decoder
    voices: dict[str, Any] = field(default_factory=dict)
    transcriber: Any | None = None  # voice_agent.model.transcribe.Transcriber
    transcriber_unavailable: str = "user transcripts: this engine loaded no Whisper text decoder"
