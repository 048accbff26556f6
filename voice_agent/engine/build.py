"""Building an engine from model files: which files (`files.resolve_model_paths`), on which device and dtype.

`build_engine(ModelChoice(...), EngineConfig(...))` returns an `Engine` that has loaded nothing yet: its
`start()` starts the model thread, which loads the model there (see thread.py for why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from voice_agent.engine.api import EngineInfo
from voice_agent.engine.config import EngineConfig, Models
from voice_agent.engine.files import directory_voices, resolve_model_paths
from voice_agent.engine.thread import Engine

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ModelChoice:
    """Which model to load and how. `None` directories: look in models/, else the embedded demo model."""

    model_dir: str | None = None
    vocoder_dir: str | None = None
    whisper: str | None = None  # an openai-whisper large-v3.pt to take the encoder's dims from
    device: str = "cpu"
    dtype: str = "float32"  # a torch dtype name
    unpadded: bool = False  # encode each turn at its real length (speech_lm.py)


def build_engine(model: ModelChoice, config: EngineConfig) -> Engine:
    """An engine serving `model` under `config`; nothing loads until `start()`."""
    paths = resolve_model_paths(model.model_dir, model.vocoder_dir, model.whisper)

    def load() -> Models:
        import torch

        from voice_agent.model.cosy2.decoder import Cosy2Decoder
        from voice_agent.model.speech_lm import SpeechLM

        lm = SpeechLM.load(paths.model_dir, whisper_path=paths.whisper, device=model.device,
                           dtype=getattr(torch, model.dtype), unpadded=model.unpadded)
        decoder = Cosy2Decoder.load(paths.vocoder_dir, model.device) if paths.vocoder_dir else None
        return Models(lm, decoder)

    if paths.vocoder_dir is None:
        log.warning("engine: no cosy2_decoder directory found; replies will have text and units but no audio")
    voices = tuple(directory_voices(paths.vocoder_dir))
    info = EngineInfo(paths.model_dir.name, paths.demo, model.device, model.dtype, voices)
    return Engine(load, config, info)
