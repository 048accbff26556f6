"""Shared test settings.

torch runs single-threaded in tests: the tiny models are far too small to gain from threads, and on a
shared 2-core machine a second thread turns millisecond calls into seconds of contention.
"""

from pathlib import Path

import pytest
import torch

from voice_agent.model.cosy2.flow_config import FlowConfig
from voice_agent.model.cosy2.tiny import write_tiny_cosy2_decoder, write_tiny_flow

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def flow_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random flow.pt (FlowConfig.tiny(), seed 0)."""
    path = tmp_path_factory.mktemp("cosy2_decoder") / "flow.pt"
    write_tiny_flow(path, FlowConfig.tiny(), seed=0)
    return path


@pytest.fixture(scope="session")
def decoder_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny cosy2_decoder directory (seed 0); tests only read it."""
    return write_tiny_cosy2_decoder(tmp_path_factory.mktemp("tiny") / "cosy2_decoder", seed=0)
