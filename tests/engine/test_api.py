"""The engine contract's checks: TurnSettings (every engine) and EngineInfo.check_turn (this engine).

A client's settings are checked with these at the server's edge, so each case here is a turn that would
otherwise have failed inside the engine.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from voice_agent.engine.api import (
    MAX_SEED,
    EngineInfo,
    ResponseDone,
    TurnSettings,
    TurnTimings,
)
from voice_agent.engine.config import EngineConfig, Models
from voice_agent.engine.reply import ForcedLength
from voice_agent.engine.thread import Engine
from voice_agent.engine.worker import ModelWorker
from voice_agent.errors import TurnRejected
from voice_agent.model.cosy2.decoder import Cosy2Decoder
from voice_agent.model.speech_lm import SpeechLM
from voice_agent.model.tiny import make_tiny

INFO = EngineInfo("m", False, "cpu", "float32", voices=("en", "zh"), max_new_tokens=512)

# (settings, the message TurnRejected must contain)
BAD_SETTINGS = [
    ({"seed": 2**70}, f"seed: expected an integer in [0, {MAX_SEED}] (2**63 - 1), got {2**70}"),
    ({"seed": 2**63}, "seed: expected an integer in [0, "),
    ({"seed": -1}, "seed: expected an integer in [0, "),
    ({"seed": 1.0}, "seed: expected an integer in [0, "),
    ({"seed": True}, "seed: expected an integer in [0, "),
    ({"temperature": "hot"}, "temperature: expected a number in [0, 2], got 'hot'"),
    ({"temperature": float("nan")}, "temperature: expected a number in [0, 2], got nan"),
    ({"temperature": 2.5}, "temperature: expected a number in [0, 2], got 2.5"),
    ({"max_new_tokens": 0}, "max_new_tokens: expected an integer >= 1, got 0"),
    ({"max_new_tokens": "9"}, "max_new_tokens: expected an integer >= 1, got '9'"),
    ({"voice": ""}, "voice: expected a name of 1..200 characters, got ''"),
    ({"voice": "v" * 100_000}, "voice: expected a name of 1..200 characters, got 'vvvv"),
]


@pytest.mark.parametrize("kwargs, message", BAD_SETTINGS)
def test_turn_settings_refuse_what_no_engine_can_run(kwargs: dict, message: str) -> None:
    with pytest.raises(TurnRejected) as info:
        TurnSettings(**kwargs)
    assert message in str(info.value) and len(str(info.value)) < 200


def test_turn_settings_take_the_documented_ranges() -> None:
    TurnSettings(voice="v" * 200, temperature=0, max_new_tokens=1, seed=0)
    TurnSettings(temperature=2.0, max_new_tokens=10**6, seed=MAX_SEED)


@pytest.mark.parametrize(
    "settings, message",
    [
        (TurnSettings(voice="default"),
         "voice: expected one of ['en', 'zh'] (GET /api/info lists them), got 'default'"),
        (TurnSettings(voice="../../../../etc/passwd"), "got '../../../../etc/passwd'"),
        (TurnSettings(max_new_tokens=513), "max_new_tokens: expected an integer 1..512, got 513"),
    ],
)
def test_engine_info_refuses_what_this_engine_cannot_serve(settings: TurnSettings, message: str) -> None:
    with pytest.raises(TurnRejected) as info:
        INFO.check_turn(settings)
    assert message in str(info.value)


def test_engine_info_takes_its_voices_its_default_and_its_longest_reply() -> None:
    info = EngineInfo("m", False, "cpu", "float32", voices=("en",), default_voice="/srv/me.npy", max_new_tokens=64)
    for settings in (TurnSettings(), TurnSettings(voice="en"), TurnSettings(voice="/srv/me.npy", max_new_tokens=64)):
        info.check_turn(settings)


def test_a_long_voice_list_is_shortened_in_the_message() -> None:
    info = EngineInfo("m", False, "cpu", "float32", voices=tuple(f"spk{i:03d}" for i in range(500)))
    with pytest.raises(TurnRejected, match=r"'spk019'\] and 480 more"):
        info.check_turn(TurnSettings(voice="nobody"))


def test_the_engine_states_its_limits_from_its_config() -> None:
    config = EngineConfig(max_reply_tokens=300, default_voice="zh")
    engine = Engine(lambda: Models(None), config, INFO)  # never started: nothing loads
    assert engine.info.max_new_tokens == 300 and engine.info.default_voice == "zh"
    with pytest.raises(TurnRejected, match="expected an integer 1..300, got 301"):
        engine.check_settings(TurnSettings(max_new_tokens=301), None)


def test_the_largest_seed_runs_a_turn(tmp_path: Path) -> None:
    """torch takes seed, seed + 1 and the vocoder's seed ^ salt for the largest documented seed."""
    make_tiny(tmp_path, seed=0)
    torch.manual_seed(0)
    models = Models(SpeechLM.load(tmp_path / "LLaMA-Omni2-tiny"), Cosy2Decoder.load(tmp_path / "cosy2_decoder"))
    worker = ModelWorker(models, EngineConfig(max_sessions=1, final_units=16))
    worker.allocate(1)
    worker.open("s", 0, None)
    events: list = []
    t = np.arange(16000) / 16000
    audio = (0.2 * np.sin(2 * np.pi * 200 * t)).astype(np.float32)
    worker.submit("s", TurnSettings(temperature=0.8, seed=MAX_SEED), audio, TurnTimings(0.0),
                  ForcedLength(text_tokens=6, final_units=12), events.append)
    for _ in range(500):
        if not worker.busy:
            break
        worker.step()
    assert isinstance(events[-1], ResponseDone), events[-1]
