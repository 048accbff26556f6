"""The embedded demo model through the real engine: a short, quiet reply with visible text.

Built as `voice-agent serve` builds it on a machine without weights (`build_engine` with an empty cache
directory, so `ensure_demo_model` writes `make_tiny(..., demo=True)`). Run with `-s` to see the figures of
each turn: reply length, RMS and peak in dBFS, clipped share, and the text.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from voice_agent.engine.api import AudioChunk, EngineSession, ResponseDone, TextDelta, TurnSettings
from voice_agent.engine.build import build_engine
from voice_agent.model.tiny_demo import DEMO_REPLY

MAX_REPLY_S = 3.0
MAX_PEAK = 0.1  # -20 dBFS
CLIP_LEVEL = 0.98  # HiFT clamps at 0.99


def question(seconds: float = 1.5) -> np.ndarray:
    """Speech-like 16 kHz input: a gliding voiced tone with noise (the demo's reply does not depend on it)."""
    t = np.arange(int(16000 * seconds)) / 16000
    f0 = 130 + 40 * np.sin(2 * np.pi * 1.5 * t)
    voiced = 0.2 * np.sin(2 * np.pi * np.cumsum(f0) / 16000)
    return (voiced + 0.02 * np.random.default_rng(0).standard_normal(len(t))).astype(np.float32)


@dataclass(frozen=True)
class Figures:
    seconds: float
    rms_dbfs: float
    peak: float
    clipped: float
    text: str
    reason: str

    def __str__(self) -> str:
        return (f"{self.seconds:.2f} s, RMS {self.rms_dbfs:.1f} dBFS, peak {self.peak:.4f} "
                f"({20 * np.log10(self.peak + 1e-12):.1f} dBFS), clipped {self.clipped:.1%}, "
                f"{self.reason}, text {self.text!r}")


async def turn(session: EngineSession, settings: TurnSettings) -> Figures:
    pcm, text, reason = [], [], ""
    async for event in session.submit_turn(question(), settings):
        if isinstance(event, AudioChunk):
            pcm.append(event.pcm)
        elif isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, ResponseDone):
            reason = event.reason
    audio = np.concatenate(pcm).astype(np.float64) if pcm else np.zeros(1)
    rms = float(np.sqrt(np.mean(audio**2)))
    return Figures(len(audio) / 24000, 20 * np.log10(rms + 1e-12), float(np.abs(audio).max()),
                   float(np.mean(np.abs(audio) >= CLIP_LEVEL)), "".join(text), reason)


async def test_demo_model_speaks_briefly_quietly_and_with_visible_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voice_agent.serve.config import ServerConfig

    monkeypatch.setenv("VOICE_AGENT_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)  # no models/ here
    engine = build_engine(*ServerConfig(max_sessions=1).engine_options())
    assert engine.info.demo
    await engine.start()
    await asyncio.get_running_loop().run_in_executor(None, engine.wait_ready, 60.0)
    try:
        session = engine.open_session()
        # The server's default decoding (greedy for the demo), then the hottest a client may ask for, as the
        # second turn of the same conversation.
        for settings in (TurnSettings(seed=1), TurnSettings(seed=2, temperature=2.0)):
            figures = await turn(session, settings)
            print(f"demo turn {settings}: {figures}")
            assert figures.reason == "eos"
            assert 0.4 <= figures.seconds < MAX_REPLY_S
            assert figures.peak < MAX_PEAK and figures.clipped == 0.0
            assert figures.rms_dbfs > -60.0  # quiet, not silent
            assert figures.text == DEMO_REPLY and figures.text.isprintable()
        await session.close()
    finally:
        await engine.aclose()
