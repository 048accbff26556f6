"""One estimator call over a chunk cache: the flow's U-Net runs on each stream's new frames only.

The estimator's attention is chunk-causal (a frame sees every frame of its own and earlier 100-frame
chunks) and every convolution is causal, so once a chunk is complete, and its mu final, nothing later can
change what the estimator computes for it. What later frames need from it, at each Euler step and for
the conditional and the unconditional row, is

- the keys and values of every transformer block (attention), and
- the last `kernel - 1` input frames of every causal convolution (their left padding).

A per-stream store of both (`ChunkCache`; the engine's `FlowCache` is one) is owned by the caller.
`CachedCall` batches the stores of several streams for one flow call, hands `StepContext`s to the
estimator (one per Euler step) and appends what the completed chunks of this call leave behind. The
estimator has no positional encoding, so cached keys need no positions: padding between rows of
different cache lengths is masked. A call then costs the frames of the current (incomplete) chunk
instead of the whole window.

Memory per cached frame (`cached_bytes`): n_steps * 2 rows * blocks * 2 (key, value) * heads * head_dim
values (the conv tails do not grow with frames). At the official shapes that is
10 * 2 * 56 * 2 * 512 * 4 bytes = 4.6 MB per frame in fp32, so 200 frames (the default 100-unit window's
two chunks) hold 0.92 GB per stream.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import torch
import torch.nn.functional as F

from voice_agent.model.cosy2.flow_config import FlowConfig
from voice_agent.model.cosy2.flow_encoder import chunk_mask

CFG_ROWS = 2  # each stream runs a conditional and an unconditional row in every estimator call


def cached_bytes(cfg: FlowConfig, frames: int, dtype: torch.dtype = torch.float32) -> int:
    """Memory of `frames` cached frames of one stream (keys and values of every block, every step)."""
    blocks = cfg.estimator_n_blocks * (2 + cfg.estimator_num_mid_blocks)
    per_frame = cfg.n_timesteps * CFG_ROWS * blocks * 2 * cfg.estimator_num_heads * cfg.estimator_attention_head_dim
    return frames * per_frame * torch.tensor([], dtype=dtype).element_size()


class ChunkCache(Protocol):
    """One stream's cached estimator state for its frames [done - frames, done) (absolute mel frames).

    Per Euler step k: `kv[k]` (blocks, 2 (key / value), 2 (cond / uncond), heads, frames, head_dim) and
    `tails[k]` (2 (cond / uncond), channels of every causal conv in call order, kernel - 1): the inputs of
    each causal conv at frames [done - kernel + 1, done). Empty lists before the first chunk completes."""

    done: int
    kv: list[torch.Tensor]
    tails: list[torch.Tensor]

    @property
    def frames(self) -> int: ...


class StepContext:
    """The estimator's view of one Euler step of a cached call, over the 2B rows (cond rows first).

    Causal convs ask `conv_input(x)` for their input with the cached left frames in front (instead of
    zero padding); attention blocks ask `attend(q, k, v)`, which puts the cached keys / values in front and
    applies the call's mask. Both record what the call must store afterwards; modules are called in the
    same order every step, so the i-th conv / block of a step is the i-th of every step."""

    def __init__(self, keys: list[torch.Tensor], values: list[torch.Tensor], tails: torch.Tensor | None,
                 bias: torch.Tensor | None, kernel: int):
        self.keys, self.values, self.tails, self.bias, self.kernel = keys, values, tails, bias, kernel
        self.new_kv: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.conv_inputs: list[torch.Tensor] = []
        self._tail_offset = 0

    def conv_input(self, x: torch.Tensor) -> torch.Tensor:
        """x (2B, C, T) masked conv input -> (2B, C, kernel - 1 + T)."""
        left = self.kernel - 1
        C = x.size(1)
        if self.tails is None:
            xin = F.pad(x, (left, 0))
        else:
            tail = self.tails[:, self._tail_offset : self._tail_offset + C]  # (2B, C, left)
            if tail.size(1) != C:
                raise ValueError(f"flow cache: expected conv tails of {C} channels, got {tail.size(1)}")
            xin = torch.cat([tail.to(x.dtype), x], dim=2)
        self._tail_offset += C
        self.conv_inputs.append(xin)
        return xin

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q, k, v (2B, H, T, d) of the new frames -> attention output (2B, H, T, d)."""
        i = len(self.new_kv)
        self.new_kv.append((k, v))
        if i < len(self.keys):
            k = torch.cat([self.keys[i], k], dim=2)
            v = torch.cat([self.values[i], v], dim=2)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=self.bias)


class CachedCall:
    """The caches of B streams for one flow call whose rows hold new frames [done_r, done_r + lens_r).

    `commit[r]` frames (a multiple of the chunk, possibly 0) from the start of row r's new frames are
    complete and final: `step(k)` gives the estimator's context for Euler step k, `store(k, ctx)` keeps
    those frames' state after the step ran, and `finish()` appends it to the caches after the last step."""

    def __init__(self, caches: Sequence[ChunkCache], lens: Sequence[int], commit: Sequence[int], chunk: int,
                 kernel: int, device: torch.device, dtype: torch.dtype):
        self.caches, self.commit = list(caches), list(commit)
        self.kernel = kernel
        self._pending: list[list[tuple[torch.Tensor, torch.Tensor]]] = [[] for _ in self.caches]
        B, T = len(self.caches), max(lens)
        self.ctx = max(c.frames for c in self.caches)
        cached = torch.tensor([c.frames for c in self.caches], device=device)
        new = torch.tensor(list(lens), device=device)
        # keys: [left-padded cached frames | new frames]; a query sees every valid cached frame and, among the
        # new frames, those of its own and earlier chunks (new frames start on a chunk boundary)
        cached_ok = torch.arange(self.ctx, device=device)[None, :] >= (self.ctx - cached)[:, None]  # (B, ctx)
        new_ok = torch.arange(T, device=device)[None, :] < new[:, None]  # (B, T)
        visible = torch.cat([cached_ok[:, None, :].expand(B, T, self.ctx),
                             chunk_mask(T, chunk, device)[None] & new_ok[:, None, :]], dim=2)  # (B, T, ctx + T)
        if bool(visible.all()):
            self.bias: torch.Tensor | None = None
        else:
            bias = (1.0 - visible.to(dtype)) * torch.finfo(dtype).min
            self.bias = torch.cat([bias, bias])[:, None]  # (2B, 1, T, ctx + T)

    def step(self, k: int) -> StepContext:
        kv = self._gather_kv(k)  # (blocks, 2, 2B, H, ctx, d) or None
        keys = [] if kv is None else list(kv[:, 0].unbind(0))
        values = [] if kv is None else list(kv[:, 1].unbind(0))
        return StepContext(keys, values, self._gather_tails(k), self.bias, self.kernel)

    def _gather_kv(self, k: int) -> torch.Tensor | None:
        known = next((c.kv[k] for c in self.caches if c.frames), None)  # (blocks, 2, 2, H, L, d)
        if known is None:
            return None
        rows = []
        for c in self.caches:
            if not c.frames:
                rows.append(known.new_zeros(*known.shape[:-2], self.ctx, known.shape[-1]))
            else:
                rows.append(F.pad(c.kv[k], (0, 0, self.ctx - c.frames, 0)) if c.frames < self.ctx else c.kv[k])
        stacked = torch.stack(rows, dim=3)  # (blocks, 2, 2, B, H, ctx, d)
        return stacked.flatten(2, 3)  # (blocks, 2, 2B, H, ctx, d): cond rows, then uncond rows

    def _gather_tails(self, k: int) -> torch.Tensor | None:
        known = next((c.tails[k] for c in self.caches if c.tails), None)  # (2, channels, kernel - 1)
        if known is None:
            return None
        rows = [c.tails[k] if c.tails else torch.zeros_like(known) for c in self.caches]
        return torch.stack(rows, dim=1).flatten(0, 1)  # (2B, channels, kernel - 1)

    def store(self, k: int, ctx: StepContext) -> None:
        """Keep the committed frames of step k (the caches change in `finish`, after the last step)."""
        if not any(self.commit):
            return
        B, left = len(self.caches), self.kernel - 1
        kv_new = torch.stack([torch.stack(pair) for pair in ctx.new_kv])  # (blocks, 2, 2B, H, T, d)
        for r, n in enumerate(self.commit):
            if n:
                rows = [r, B + r]
                kv = kv_new[:, :, rows, :, :n]  # (blocks, 2, 2, H, n, d)
                tails = torch.cat([x[rows, :, n : n + left] for x in ctx.conv_inputs], dim=1)  # (2, channels, left)
                self._pending[r].append((kv, tails))

    def finish(self) -> None:
        """Append each row's committed frames to its cache and move its end past them."""
        for cache, n, steps in zip(self.caches, self.commit, self._pending, strict=True):
            if not n:
                continue
            kv = [new for new, _ in steps]
            if cache.kv:
                kv = [torch.cat([old, new], dim=-2) for old, new in zip(cache.kv, kv, strict=True)]
            cache.kv = kv
            cache.tails = [tails for _, tails in steps]
            cache.done += n
