"""The per-stream store of the flow's chunk cache (`FlowCache`): one streaming reply's state.

What is cached and why the cached call equals the recompute is explained in
`voice_agent.model.cosy2.flow_cached`, which holds the tensor mechanics (`CachedCall`, `StepContext`) and
reaches this store only through its `ChunkCache` protocol. The store lives here, in the engine, because it
is per-session state: it grows as a reply's chunks complete and shrinks as a bounded window moves on.

With a cache over the whole reply the mel equals the full recompute (`FlowStream` faithful mode) up to
float rounding; a bounded stream keeps the cached chunks that lie inside its window. Memory:
`FlowCache.bytes_for` (4.6 MB per frame in fp32 at the official shapes, 0.92 GB for the default window's
200 frames).
"""

from __future__ import annotations

import torch

from voice_agent.model.cosy2.flow_cached import cached_bytes
from voice_agent.model.cosy2.flow_config import FlowConfig


class FlowCache:
    """One stream's cached estimator state for frames [first, done) (absolute mel frames); the layout of
    `kv` and `tails` is `flow_cached.ChunkCache`'s."""

    def __init__(self) -> None:
        self.first = 0
        self.done = 0
        self.kv: list[torch.Tensor] = []
        self.tails: list[torch.Tensor] = []

    @property
    def frames(self) -> int:
        return self.done - self.first

    def drop_before(self, frame: int) -> None:
        """Forget cached frames before `frame` (a chunk boundary): a bounded window moved on."""
        cut = min(max(frame - self.first, 0), self.frames)
        if cut:
            self.kv = [kv[..., cut:, :].clone() for kv in self.kv]  # a copy, so the dropped frames are freed
            self.first += cut

    @staticmethod
    def bytes_for(cfg: FlowConfig, frames: int, dtype: torch.dtype = torch.float32) -> int:
        """Memory of `frames` cached frames (keys and values; the conv tails do not grow with frames)."""
        return cached_bytes(cfg, frames, dtype)
