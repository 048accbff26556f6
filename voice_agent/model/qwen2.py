"""Qwen2 decoder (the LLM, and the body of the TTS LM), batch-first, with a static slot KV cache.

Numerics follow transformers' Qwen2 exactly: RMSNorm computed in fp32 and cast back before the weight,
rotate-half RoPE with `inv_freq = theta^(-2i/d)` (angles and cos/sin in fp32, cast to the activation
dtype), grouped-query attention through `scaled_dot_product_attention` (scale 1/sqrt(head_dim)), SiLU MLP,
q/k/v biases and no o_proj bias. The module tree reproduces the official state-dict keys
(`model.embed_tokens.weight`, `model.layers.{i}.self_attn.q_proj.weight`, ..., `lm_head.weight`).

Batching contract (one call serves a prefill of several sessions or one decode step of many):

- `inputs_embeds` (B, T, H), `positions` (B, T) int64, `slots` (B,) int64 distinct cache rows, and
  `valid` (B, T) bool for right padding. Row b's token t is written to cache row `slots[b]` at position
  `positions[b, t]` and attends to keys 0..positions[b, t] of that row. Padding tokens (valid False) are
  computed but never written (they go to a scratch position past `max_len`); their outputs are garbage.
- The cache keeps no lengths. The caller tracks each slot's length; truncating a session is lowering that
  length, because entries beyond a query's position are masked out and later overwritten.
- `kv_len` (a host int) limits attention to the first `kv_len` cache positions (it must exceed every
  position in the call); None attends over all `max_len` positions (static shapes, for CUDA graphs).

No KV is kept between calls when `cache` is None: a plain full-sequence forward where token t attends to
the valid tokens of its row whose position is <= its own.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from voice_agent.model.config import Qwen2Dims


class KVCache:
    """Static per-layer K/V buffers, one row ("slot") per session: (slots, kv_heads, max_len + 1, head_dim).

    The extra position at index `max_len` is a scratch row that absorbs the writes of padding tokens; it
    is never attended to.
    """

    def __init__(
        self,
        dims: Qwen2Dims,
        slots: int,
        max_len: int,
        device: torch.device | str | None = None,
        dtype: torch.dtype = torch.float32,
    ):
        if slots < 1:
            raise ValueError(f"KVCache: expected slots >= 1, got {slots}")
        if max_len < 1:
            raise ValueError(f"KVCache: expected max_len >= 1, got {max_len}")
        self.dims = dims
        self.slots = slots
        self.max_len = max_len
        self.dtype = dtype
        shape = (slots, dims.num_kv_heads, max_len + 1, dims.head_dim)  # (S, KVH, L + 1, Dh)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(dims.num_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(dims.num_layers)]

    @staticmethod
    def token_bytes(dims: Qwen2Dims, dtype: torch.dtype) -> int:
        """Bytes one cached token takes over all layers (K and V), for memory budgets before allocating."""
        itemsize = torch.empty((), dtype=dtype).element_size()
        return 2 * dims.num_layers * dims.num_kv_heads * dims.head_dim * itemsize

    @property
    def bytes_per_token(self) -> int:
        return self.token_bytes(self.dims, self.dtype)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def device(self) -> torch.device:
        return self.k[0].device


class Qwen2RMSNorm(nn.Module):
    """RMSNorm as transformers computes it: normalise in fp32, cast back, then scale."""

    def __init__(
        self,
        size: int,
        eps: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, device=device, dtype=dtype))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class _Context:
    """What every layer of one forward call shares: RoPE tables, the attention mask, cache addressing."""

    def __init__(
        self,
        cos: torch.Tensor,
        sin: torch.Tensor,
        mask: torch.Tensor,
        cache: KVCache | None,
        slots: torch.Tensor | None,
        write_positions: torch.Tensor | None,
        kv_len: int,
        first_slot: int | None = None,
    ):
        self.cos = cos  # (B, 1, T, Dh)
        self.sin = sin  # (B, 1, T, Dh)
        self.mask = mask  # (B, 1, n_rep * T, L) bool, True = attend
        self.cache = cache
        self.slots = slots  # (B,)
        self.write_positions = write_positions  # (B, T); padding -> scratch position max_len
        self.kv_len = kv_len  # L
        self.first_slot = first_slot  # slots == first_slot + arange(B): the cache rows are one slice

    def cached(self, buf: torch.Tensor) -> torch.Tensor:
        """The first kv_len positions of this call's cache rows: (B, Hkv, L, Dh), a view when it can be."""
        if self.first_slot is not None:
            return buf[self.first_slot : self.first_slot + self.mask.shape[0], :, : self.kv_len]
        assert self.slots is not None
        return buf[self.slots, :, : self.kv_len]  # gathered copy


class Qwen2Attention(nn.Module):
    def __init__(self, dims: Qwen2Dims, layer: int, **factory: Any):
        super().__init__()
        self.layer = layer
        self.num_heads = dims.num_heads
        self.num_kv_heads = dims.num_kv_heads
        self.head_dim = dims.head_dim
        self.q_proj = nn.Linear(dims.hidden_size, dims.hidden_size, bias=True, **factory)
        self.k_proj = nn.Linear(dims.hidden_size, dims.kv_dim, bias=True, **factory)
        self.v_proj = nn.Linear(dims.hidden_size, dims.kv_dim, bias=True, **factory)
        self.o_proj = nn.Linear(dims.hidden_size, dims.hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        B, T, _ = x.shape
        Hq, Hkv, Dh = self.num_heads, self.num_kv_heads, self.head_dim
        q = self.q_proj(x).view(B, T, Hq, Dh).transpose(1, 2)  # (B, Hq, T, Dh)
        k = self.k_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        v = self.v_proj(x).view(B, T, Hkv, Dh).transpose(1, 2)  # (B, Hkv, T, Dh)
        q = q * ctx.cos + _rotate_half(q) * ctx.sin
        k = k * ctx.cos + _rotate_half(k) * ctx.sin
        if ctx.cache is not None:
            assert ctx.slots is not None and ctx.write_positions is not None
            k_buf, v_buf = ctx.cache.k[self.layer], ctx.cache.v[self.layer]  # (S, Hkv, max_len + 1, Dh)
            rows = ctx.slots[:, None]  # (B, 1), broadcast against write_positions (B, T)
            k_buf[rows, :, ctx.write_positions] = k.transpose(1, 2)  # indexed view is (B, T, Hkv, Dh)
            v_buf[rows, :, ctx.write_positions] = v.transpose(1, 2)
            k, v = ctx.cached(k_buf), ctx.cached(v_buf)  # (B, Hkv, L, Dh) each
        # GQA without repeating K/V: the n_rep query heads that share a KV head are stacked on the query
        # axis (head h uses KV head h // n_rep, as transformers' repeat_kv).
        n_rep = Hq // Hkv
        q = q.reshape(B, Hkv, n_rep * T, Dh)  # (B, Hkv, n_rep * T, Dh)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask)  # (B, Hkv, n_rep * T, Dh)
        out = out.view(B, Hq, T, Dh).transpose(1, 2).reshape(B, T, Hq * Dh)  # (B, T, H)
        return self.o_proj(out)


class Qwen2MLP(nn.Module):
    def __init__(self, dims: Qwen2Dims, **factory: Any):
        super().__init__()
        self.gate_proj = nn.Linear(dims.hidden_size, dims.intermediate_size, bias=False, **factory)
        self.up_proj = nn.Linear(dims.hidden_size, dims.intermediate_size, bias=False, **factory)
        self.down_proj = nn.Linear(dims.intermediate_size, dims.hidden_size, bias=False, **factory)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nn.Module):
    def __init__(self, dims: Qwen2Dims, layer: int, **factory: Any):
        super().__init__()
        self.self_attn = Qwen2Attention(dims, layer, **factory)
        self.mlp = Qwen2MLP(dims, **factory)
        self.input_layernorm = Qwen2RMSNorm(dims.hidden_size, dims.rms_norm_eps, **factory)
        self.post_attention_layernorm = Qwen2RMSNorm(dims.hidden_size, dims.rms_norm_eps, **factory)

    def forward(self, x: torch.Tensor, ctx: _Context) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), ctx)
        return x + self.mlp(self.post_attention_layernorm(x))


class Qwen2Model(nn.Module):
    """Embedding table, decoder layers and the final norm; `forward` returns the final-normed state."""

    def __init__(
        self, dims: Qwen2Dims, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        self.dims = dims
        self.embed_tokens = nn.Embedding(dims.vocab_size, dims.hidden_size, **factory)
        self.layers = nn.ModuleList(Qwen2DecoderLayer(dims, i, **factory) for i in range(dims.num_layers))
        self.norm = Qwen2RMSNorm(dims.hidden_size, dims.rms_norm_eps, **factory)
        # Kept out of the state dict and out of `.to(dtype)`: the angles are always computed in fp32.
        exponent = torch.arange(0, dims.head_dim, 2, dtype=torch.int64).float() / dims.head_dim
        self._inv_freq = 1.0 / (dims.rope_theta**exponent)  # (Dh / 2,) fp32 on the CPU
        self._inv_freq_on: dict[torch.device, torch.Tensor] = {}

    def _rope(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        device = positions.device
        if device not in self._inv_freq_on:
            self._inv_freq_on[device] = self._inv_freq.to(device)
        angles = positions.float()[..., None] * self._inv_freq_on[device]  # (B, T, Dh / 2) fp32
        angles = torch.cat((angles, angles), dim=-1)  # (B, T, Dh)
        return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]  # (B, 1, T, Dh) each

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """(B, T, H) embeddings at (B, T) positions -> (B, T, H) state after the final norm."""
        dims = self.dims
        if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != dims.hidden_size:
            raise ValueError(
                f"inputs_embeds: expected (B, T, {dims.hidden_size}), got {tuple(inputs_embeds.shape)}"
            )
        B, T, _ = inputs_embeds.shape
        if positions.shape != (B, T) or positions.dtype != torch.int64:
            raise ValueError(
                f"positions: expected ({B}, {T}) int64, got {tuple(positions.shape)} {positions.dtype}"
            )
        if valid is not None and (valid.shape != (B, T) or valid.dtype != torch.bool):
            raise ValueError(f"valid: expected ({B}, {T}) bool, got {tuple(valid.shape)} {valid.dtype}")
        n_rep = dims.num_heads // dims.num_kv_heads
        cos, sin = self._rope(positions, inputs_embeds.dtype)
        if cache is None:
            if slots is not None or kv_len is not None:
                raise ValueError("slots and kv_len need a cache; got cache=None")
            mask = positions[:, None, :] <= positions[:, :, None]  # (B, T, T): key position <= query position
            if valid is not None:
                mask = mask & valid[:, None, :]
            ctx = _Context(cos, sin, mask[:, None].repeat(1, 1, n_rep, 1), None, None, None, T)
        else:
            self._check_cache(cache, inputs_embeds.dtype)
            if slots is None or slots.shape != (B,) or slots.dtype != torch.int64:
                got = None if slots is None else f"{tuple(slots.shape)} {slots.dtype}"
                raise ValueError(f"slots: expected ({B},) int64 with a cache, got {got}")
            L = cache.max_len if kv_len is None else kv_len
            if not 1 <= L <= cache.max_len:
                raise ValueError(f"kv_len: expected 1..{cache.max_len}, got {kv_len}")
            write_positions = positions if valid is None else torch.where(valid, positions, cache.max_len)
            key_positions = torch.arange(L, device=positions.device)
            mask = key_positions[None, None, :] <= positions[:, :, None]  # (B, T, L)
            ctx = _Context(cos, sin, mask[:, None].repeat(1, 1, n_rep, 1), cache, slots, write_positions, L,
                           _first_of_run(slots))
        x = inputs_embeds
        for layer in self.layers:
            x = layer(x, ctx)
        return self.norm(x)

    def _check_cache(self, cache: KVCache, dtype: torch.dtype) -> None:
        d, c = self.dims, cache.dims
        want, got = (d.num_layers, d.num_kv_heads, d.head_dim), (c.num_layers, c.num_kv_heads, c.head_dim)
        if want != got:
            raise ValueError(f"cache: expected (layers, kv_heads, head_dim) = {want}, got {got}")
        if cache.dtype != dtype:
            raise ValueError(f"cache: expected dtype {dtype} (the activations'), got {cache.dtype}")


def _first_of_run(slots: torch.Tensor) -> int | None:
    """slots[0] when the CPU `slots` are consecutive ascending rows (the cache can then be sliced, not
    gathered); None otherwise, and on other devices (no host sync there)."""
    if slots.device.type != "cpu":
        return None
    rows = slots.tolist()
    return rows[0] if rows == list(range(rows[0], rows[0] + len(rows))) else None


class Qwen2ForCausalLM(nn.Module):
    """`model` (Qwen2Model) + `lm_head` (no bias). Call `tie_weights()` when the checkpoint ties them."""

    def __init__(
        self, dims: Qwen2Dims, *, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.dims = dims
        self.model = Qwen2Model(dims, device=device, dtype=dtype)
        self.lm_head = nn.Linear(dims.hidden_size, dims.vocab_size, bias=False, device=device, dtype=dtype)

    def tie_weights(self) -> None:
        """Make `lm_head` share `embed_tokens`' weight (what `tie_word_embeddings: true` means)."""
        self.lm_head.weight = self.model.embed_tokens.weight

    @property
    def tied(self) -> bool:
        return self.lm_head.weight is self.model.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (...) -> raw embeddings (..., H)."""
        return self.model.embed_tokens(ids)

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Logits (B, T, V) at every position (see `step` for the last position only)."""
        return self.lm_head(self.model(inputs_embeds, positions, cache, slots, valid, kv_len))

    def step(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(final-normed state (B, H), logits (B, V)) at each row's last valid token.

        With `valid` the valid tokens must be a prefix of each row (right padding) and non-empty; the
        lm_head runs on B vectors only, not on B * T.
        """
        hidden = self.model(inputs_embeds, positions, cache, slots, valid, kv_len)  # (B, T, H)
        B, T, H = hidden.shape
        if valid is None:
            last = hidden[:, -1]  # (B, H)
        else:
            index = (valid.sum(dim=1) - 1).clamp(min=0)  # (B,)
            last = hidden.gather(1, index[:, None, None].expand(B, 1, H))[:, 0]  # (B, H)
        return last, self.lm_head(last)
