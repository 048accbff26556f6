"""The CFM velocity estimator: a causal 1-D U-Net with transformer blocks (`decoder.estimator.*`).

`CausalUNetEstimator(x, mask, mu, t, spks, cond) -> v`, all channels-first: x, mu, cond (B, 80, T),
mask (B, 1, T), t (B,), spks (B, 80) -> (B, 80, T). One resolution (channels [256]), so the "down" and "up"
stages keep the length:

  time: sinusoid(320) of 1000 t -> `time_mlp.linear_1` -> SiLU -> `time_mlp.linear_2` -> (B, 1024)
  input: [x | mu | spks broadcast | cond] -> (B, 320, T)
  `down_blocks.0`: resnet 320->256, n_blocks transformer blocks, skip, causal conv k=3
  `mid_blocks.{i}`: resnet 256->256, n_blocks transformer blocks
  `up_blocks.0`: [x | skip] -> resnet 512->256, n_blocks transformer blocks, causal conv k=3
  `final_block` (causal conv + LayerNorm + Mish), `final_proj` (1x1 conv), times mask.

Every convolution is causal (left padding only) and every attention uses the chunk mask (chunk 100
frames, full left context) combined with the padding mask, so frame t depends on frames up to the end of
its own chunk only. Key names follow the official weights: resnets have `block1.block.{0,2}`,
`block2.block.{0,2}`, `mlp.1`, `res_conv`; transformer blocks `norm1`, `attn1.to_{q,k,v}` (no bias),
`attn1.to_out.0`, `norm3`, `ff.net.0.proj`, `ff.net.2`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voice_agent.model.cosy2.flow_cached import StepContext
from voice_agent.model.cosy2.flow_config import FlowConfig
from voice_agent.model.cosy2.flow_encoder import chunk_mask

TIME_SCALE = 1000.0  # t in [0, 1] is scaled by 1000 before the sinusoid
TIME_BASE = 10000.0
CONV_KERNEL = 3  # causal conv width in blocks and after each stage
LN_EPS = 1e-5
FF_MULT = 4  # transformer feed-forward width multiplier


def time_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) -> (B, dim): [sin(1000 t f_m), cos(1000 t f_m)], f_m = exp(-m ln(10000) / (dim/2 - 1))."""
    half = dim // 2
    freq = torch.exp(torch.arange(half, device=t.device, dtype=torch.float32) * -(math.log(TIME_BASE) / (half - 1)))
    angle = TIME_SCALE * t.float()[:, None] * freq[None, :]  # (B, half)
    return torch.cat([angle.sin(), angle.cos()], dim=-1).to(t.dtype)


class TimestepEmbedding(nn.Module):
    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class CausalConv1d(nn.Conv1d):
    """Conv1d with (kernel - 1) zeros of left padding and none on the right: (B, C, T) -> (B, C', T)."""

    def __init__(self, dim_in: int, dim_out: int, kernel: int):
        super().__init__(dim_in, dim_out, kernel)
        self.left = kernel - 1

    def forward(self, x: torch.Tensor, ctx: StepContext | None = None) -> torch.Tensor:
        """With a cached call's `ctx`, the left padding is the cached input frames before x."""
        return super().forward(F.pad(x, (self.left, 0)) if ctx is None else ctx.conv_input(x))


class CausalBlock1D(nn.Module):
    """y = Mish(LayerNorm_channels(CausalConv(x * mask))) * mask; keys `block.0` (conv), `block.2` (norm).

    `mask` None means every position is valid (the multiplications by ones are skipped; same numbers)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.block = nn.ModuleDict(
            {"0": CausalConv1d(dim_in, dim_out, CONV_KERNEL), "2": nn.LayerNorm(dim_out, eps=LN_EPS)}
        )

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: StepContext | None = None) -> torch.Tensor:
        h = self.block["0"](_masked(x, mask), ctx)  # (B, C, T)
        h = self.block["2"](h.transpose(1, 2)).transpose(1, 2)  # LayerNorm over channels
        return _masked(F.mish(h), mask)


def _masked(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return x if mask is None else x * mask


class CausalResnetBlock1D(nn.Module):
    """h = block1(x); h += mlp(t_emb); h = block2(h); y = h + res_conv(x * mask)."""

    def __init__(self, dim_in: int, dim_out: int, time_dim: int):
        super().__init__()
        self.mlp = nn.ModuleDict({"1": nn.Linear(time_dim, dim_out)})
        self.block1 = CausalBlock1D(dim_in, dim_out)
        self.block2 = CausalBlock1D(dim_out, dim_out)
        self.res_conv = nn.Conv1d(dim_in, dim_out, 1)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, t_emb: torch.Tensor,
                ctx: StepContext | None = None) -> torch.Tensor:
        h = self.block1(x, mask, ctx)
        h = h + self.mlp["1"](F.mish(t_emb))[:, :, None]  # (B, C, 1) broadcast over time
        h = self.block2(h, mask, ctx)
        return h + self.res_conv(_masked(x, mask))


class Attention(nn.Module):
    """Multi-head self-attention with an additive bias; q/k/v without bias, `to_out.0` with bias."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.heads, self.head_dim = heads, head_dim
        inner = heads * head_dim
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.ModuleList([nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, ctx: StepContext | None = None) -> torch.Tensor:
        """x (B, T, C); bias (B or 1, 1, T, T) additive, None when every key is visible -> (B, T, C).
        With a cached call's `ctx`, the cached keys and values come first and `ctx` holds the mask."""
        B, T, _ = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(B, T, self.heads, self.head_dim).transpose(1, 2)  # (B, H, T, d)

        q, k, v = heads(self.to_q(x)), heads(self.to_k(x)), heads(self.to_v(x))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias) if ctx is None else ctx.attend(q, k, v)
        return self.to_out[0](out.transpose(1, 2).reshape(B, T, self.heads * self.head_dim))


class GELUProj(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x))  # exact (erf) GELU


class FeedForward(nn.Module):
    """`net.0.proj` Linear + GELU, (net.1 is dropout, no weights), `net.2` Linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleDict({"0": GELUProj(dim, FF_MULT * dim), "2": nn.Linear(FF_MULT * dim, dim)})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net["2"](self.net["0"](x))


class BasicTransformerBlock(nn.Module):
    """h += Attn(LN1(h)); h += FF(LN3(h))."""

    def __init__(self, dim: int, heads: int, head_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=LN_EPS)
        self.attn1 = Attention(dim, heads, head_dim)
        self.norm3 = nn.LayerNorm(dim, eps=LN_EPS)
        self.ff = FeedForward(dim)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None, ctx: StepContext | None = None) -> torch.Tensor:
        x = x + self.attn1(self.norm1(x), bias, ctx)
        return x + self.ff(self.norm3(x))


def _transformers(cfg: FlowConfig) -> nn.ModuleList:
    c = cfg.estimator_channels
    return nn.ModuleList(
        BasicTransformerBlock(c, cfg.estimator_num_heads, cfg.estimator_attention_head_dim)
        for _ in range(cfg.estimator_n_blocks)
    )


class UNetStage(nn.ModuleList):
    """One U-Net stage, keys `0` (resnet), `1` (transformer blocks) and, in the down and up stages, `2` (a causal
    conv applied after the transformers)."""

    def __init__(self, resnet: CausalResnetBlock1D, blocks: nn.ModuleList, conv: CausalConv1d | None = None):
        super().__init__([resnet, blocks] if conv is None else [resnet, blocks, conv])

    @property
    def resnet(self) -> CausalResnetBlock1D:
        m = self[0]
        assert isinstance(m, CausalResnetBlock1D), f"stage key 0: expected a resnet, got {type(m).__name__}"
        return m

    @property
    def blocks(self) -> nn.ModuleList:
        m = self[1]
        assert isinstance(m, nn.ModuleList), f"stage key 1: expected transformer blocks, got {type(m).__name__}"
        return m

    def transform(
        self, x: torch.Tensor, mask: torch.Tensor | None, t_emb: torch.Tensor, bias: torch.Tensor | None,
        ctx: StepContext | None = None,
    ) -> torch.Tensor:
        """Resnet then transformer blocks: (B, C_in, T) -> (B, C, T)."""
        h = self.resnet(x, mask, t_emb, ctx).transpose(1, 2).contiguous()  # (B, T, C), dense for the linears
        for block in self.blocks:
            h = block(h, bias, ctx)
        return h.transpose(1, 2)  # (B, C, T)

    def conv(self, x: torch.Tensor, mask: torch.Tensor | None, ctx: StepContext | None = None) -> torch.Tensor:
        m = self[2]
        assert isinstance(m, CausalConv1d), f"stage key 2: expected a causal conv, got {type(m).__name__}"
        return m(_masked(x, mask), ctx)


def _stage(m: nn.Module) -> UNetStage:
    assert isinstance(m, UNetStage), f"expected a U-Net stage, got {type(m).__name__}"
    return m


class CausalUNetEstimator(nn.Module):
    """The velocity field v(x, t | mu, spks, cond) of the conditional flow matching ODE."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        c, time_dim = cfg.estimator_channels, cfg.time_embed_dim
        self.in_channels = cfg.estimator_in_channels
        self.chunk = cfg.decoder_chunk_frames
        self.time_mlp = TimestepEmbedding(self.in_channels, time_dim)
        self.down_blocks = nn.ModuleList(
            [UNetStage(CausalResnetBlock1D(self.in_channels, c, time_dim), _transformers(cfg),
                       CausalConv1d(c, c, CONV_KERNEL))]
        )
        self.mid_blocks = nn.ModuleList(
            UNetStage(CausalResnetBlock1D(c, c, time_dim), _transformers(cfg))
            for _ in range(cfg.estimator_num_mid_blocks)
        )
        self.up_blocks = nn.ModuleList(
            [UNetStage(CausalResnetBlock1D(2 * c, c, time_dim), _transformers(cfg), CausalConv1d(c, c, CONV_KERNEL))]
        )
        self.final_block = CausalBlock1D(c, c)
        self.final_proj = nn.Conv1d(c, cfg.estimator_out_channels, 1)

    def attention_bias(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        """mask (B, 1, T) -> additive bias, 0 where visible, dtype-min elsewhere: (B, 1, T, T), or (1, 1, T, T)
        when no row is padded (shared by every row), or None when moreover every key is visible."""
        T = mask.size(-1)
        if bool(mask.bool().all()):
            if T <= self.chunk or self.chunk <= 0:
                return None
            visible = chunk_mask(T, self.chunk, mask.device)[None]  # (1, T, T)
        else:
            visible = chunk_mask(T, self.chunk, mask.device)[None] & mask.bool()  # (B, T, T)
        return ((1.0 - visible.to(dtype)) * torch.finfo(dtype).min)[:, None]

    def forward(
        self,
        x: torch.Tensor,
        mask: torch.Tensor,
        mu: torch.Tensor,
        t: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        bias: torch.Tensor | None = None,
        padded: bool | None = None,
        ctx: StepContext | None = None,
    ) -> torch.Tensor:
        """`bias` (from `attention_bias(mask)`) and `padded` (whether any mask entry is 0) are derived from
        `mask` when not given; a solver calling with the same mask many times passes them once computed.
        `ctx` (flow_cached): x holds only the new frames of a cached call; the cached frames come from it."""
        T = x.size(-1)
        if padded is None:
            padded = not bool(mask.bool().all())
            bias = self.attention_bias(mask, x.dtype) if ctx is None else None
        m = mask if padded else None  # no padding: skip the multiplications by ones
        t_emb = self.time_mlp(time_sinusoid(t, self.in_channels).to(x.dtype))  # (B, 4C)
        h = torch.cat([x, mu, spks[:, :, None].expand(-1, -1, T), cond], dim=1)  # (B, 320, T)

        down = _stage(self.down_blocks[0])
        skip = down.transform(h, m, t_emb, bias, ctx)
        h = down.conv(skip, m, ctx)
        for mid in self.mid_blocks:
            h = _stage(mid).transform(h, m, t_emb, bias, ctx)
        up = _stage(self.up_blocks[0])
        h = up.transform(torch.cat([h, skip], dim=1), m, t_emb, bias, ctx)  # (B, 2C, T) in
        h = up.conv(h, m, ctx)
        h = self.final_block(h, m, ctx)
        return _masked(self.final_proj(_masked(h, m)), m)
