"""The speech adapter: Whisper encoder frames (50 Hz) -> LLM input embeddings (10 Hz for k = 5).

Contract (LLaMA-Omni2's `EncoderProjectorConcat`, keys `linear1`, `linear2`): trailing frames are dropped
so that T % k == 0; each group of k consecutive frames is concatenated along features, frame-major (the
first frame's D features first), which is a plain reshape (B, T, D) -> (B, T / k, k * D); then
y = linear2(ReLU(linear1(x))). Lengths become lengths // k. The hidden width is read from the checkpoint
(2048 in the released models).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from voice_agent.errors import CheckpointError
from voice_agent.model.weights import SafetensorsCheckpoint, load_module

DOWNSAMPLE_K = 5  # encoder frames per LLM embedding: 50 Hz -> 10 Hz
CHECKPOINT_PREFIX = "model.speech_projector."


class SpeechProjector(nn.Module):
    """(B, T, encoder_dim) encoder frames -> (B, T // k, llm_dim) LLM input embeddings."""

    def __init__(self, encoder_dim: int, k: int, hidden: int, llm_dim: int):
        super().__init__()
        for name, value in (("encoder_dim", encoder_dim), ("k", k), ("hidden", hidden), ("llm_dim", llm_dim)):
            if value <= 0:
                raise ValueError(f"SpeechProjector.{name}: expected a positive int, got {value}")
        self.encoder_dim, self.k = encoder_dim, k
        self.linear1 = nn.Linear(encoder_dim * k, hidden)
        self.relu = nn.ReLU()
        self.linear2 = nn.Linear(hidden, llm_dim)

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, T, D), lengths (B,) valid frames per row -> ((B, T // k, llm_dim), lengths // k)."""
        if x.ndim != 3 or x.shape[2] != self.encoder_dim:
            raise ValueError(
                f"expected encoder frames of shape (B, T, {self.encoder_dim}), got {tuple(x.shape)}"
            )
        if lengths.shape != (x.shape[0],):
            raise ValueError(f"expected lengths of shape ({x.shape[0]},), got {tuple(lengths.shape)}")
        b, t, d = x.shape
        t_out = t // self.k
        x = x[:, : t_out * self.k].reshape(b, t_out, self.k * d)  # (B, T/k, k*D), frame-major
        y = self.linear2(self.relu(self.linear1(x.to(self.linear1.weight.dtype))))  # (B, T/k, llm_dim)
        return y, torch.div(lengths, self.k, rounding_mode="floor")


def _shape(tensors: Mapping[str, torch.Tensor], key: str, source: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"missing key in {source}: {key!r} (expected the speech projector)")
    if isinstance(tensors, SafetensorsCheckpoint):
        return tensors.shape(key)
    return tuple(tensors[key].shape)


def projector_from_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    prefix: str = CHECKPOINT_PREFIX,
    k: int = DOWNSAMPLE_K,
    *,
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> SpeechProjector:
    """The projector stored under `prefix`, sizes read from its weight shapes, in eval mode."""
    w1 = _shape(tensors, prefix + "linear1.weight", source)  # (hidden, k * encoder_dim)
    w2 = _shape(tensors, prefix + "linear2.weight", source)  # (llm_dim, hidden)
    if len(w1) != 2 or len(w2) != 2 or w1[1] % k or w2[1] != w1[0]:
        raise CheckpointError(
            f"malformed speech projector in {source}: expected {prefix}linear1.weight (hidden, {k} * D) and "
            f"{prefix}linear2.weight (llm_dim, hidden), got {w1} and {w2}"
        )
    with torch.device("meta"):
        projector = SpeechProjector(w1[1] // k, k, w1[0], w2[0])
    projector = projector.to_empty(device=device).to(dtype=dtype).eval()
    load_module(projector, tensors, prefix, source=source)
    return projector
