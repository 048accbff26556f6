"""Building an engine from model files: which files (`files.resolve_model_paths`), on which device and dtype.

`build_engine(ModelChoice(...), EngineConfig(...))` returns an `Engine` that has loaded nothing yet: its
`start()` starts the model thread, which loads the model there (see thread.py for why).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
    transcripts: bool = True  # load Whisper's text decoder for user transcripts when its weights are found


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
        models = Models(lm, decoder)
        if model.transcripts:
            models.transcriber, models.transcriber_unavailable = load_transcriber(lm, paths.model_dir, paths.whisper)
        else:
            models.transcriber_unavailable = "user transcripts are turned off on this server"
        return models

    if paths.vocoder_dir is None:
        log.warning("engine: no cosy2_decoder directory found; replies will have text and units but no audio")
    voices = tuple(directory_voices(paths.vocoder_dir))
    info = EngineInfo(paths.model_dir.name, paths.demo, model.device, model.dtype, voices)
    return Engine(load, config, info)


def load_transcriber(lm: Any, model_dir: Path, whisper: Path | None) -> tuple[Any | None, str]:
    """Whisper's text decoder from the whisper file the model uses (`whisper`, else where config.json's
    `speech_encoder` points), on the LM's device and dtype; or None and why, saying how to fix it.
    Never raises: without a decoder only the transcripts are off."""
    from voice_agent.model.speech_lm import whisper_candidates
    from voice_agent.model.transcribe import GET_WEIGHTS, Transcriber

    candidates = [whisper] if whisper is not None else whisper_candidates(model_dir, lm.config)
    found = next((p for p in candidates if p.is_file()), None)
    if found is None:
        tried = ", ".join(str(p) for p in candidates)
        reason = f"no Whisper large-v3.pt for user transcripts (tried {tried}); `{GET_WEIGHTS}` fetches it"
    else:
        try:
            transcriber = Transcriber.load(found, device=lm.device, dtype=lm.dtype)
        except Exception as e:  # a bad file turns transcripts off, never the server
            reason = f"the Whisper text decoder did not load ({type(e).__name__}: {e})"
        else:
            log.info("engine: user transcripts by the Whisper text decoder of %s", found)
            return transcriber, ""
    log.warning("engine: user transcripts off: %s", reason)
    return None, reason
