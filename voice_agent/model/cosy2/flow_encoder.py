"""The flow's upsample-conformer encoder: embedded units (B, N, D) -> hidden states (B, 2N, D).

Module and parameter names reproduce the official `encoder.*` keys of CosyVoice2's `flow.pt`:
`embed.out.{0,1}`, `pre_lookahead_layer.conv{1,2}`, `encoders.{i}`, `up_layer.conv`, `up_embed.out.{0,1}`,
`up_encoders.{i}`, `after_norm`; each conformer layer has `self_attn.linear_{q,k,v,out,pos}`,
`self_attn.pos_bias_{u,v}`, `feed_forward.w_{1,2}`, `norm_mha`, `norm_ff`.

Pipeline (pre-norm conformer without macaron FFN or conv module, ESPnet relative positions):
  Linear + LayerNorm, x * sqrt(D) -> look-ahead conv (sees 3 future units) -> conformer layers with chunk
  attention (chunk 50 units, full left context) -> nearest x2 upsample + causal conv -> Linear + LayerNorm,
  x * sqrt(D) -> conformer layers (chunk 100 frames) -> LayerNorm.

Deviation from the reference, needed for batches: positions past a row's length are zeroed before the
look-ahead conv, so the last real units see zeros ahead exactly as in a batch-of-one call (the reference
only runs batch 1 and would otherwise read padding through the look-ahead).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from voice_agent.model.cosy2.flow_config import FlowConfig

POS_BASE = 10000.0  # sinusoid base of the relative positional table
LN_EPS_LAYER = 1e-12  # norm_mha / norm_ff inside conformer layers
LN_EPS_EMBED = 1e-5  # embed / up_embed / after_norm
LOOKAHEAD_SLOPE = 0.01  # LeakyReLU slope after the look-ahead conv


def chunk_mask(size: int, chunk: int, device: torch.device | None = None) -> torch.Tensor:
    """(size, size) bool: query i may see key j iff j < min((i // chunk + 1) * chunk, size).

    Full left context, bidirectional inside the current chunk; chunk 0 means no chunking.
    """
    idx = torch.arange(size, device=device)
    if chunk <= 0:
        return torch.ones(size, size, dtype=torch.bool, device=device)
    end = (idx // chunk + 1) * chunk  # (size,) first invisible key of each query
    return idx[None, :] < end[:, None]


def length_mask(lengths: torch.Tensor, size: int) -> torch.Tensor:
    """(B, size) bool, True at positions < length."""
    return torch.arange(size, device=lengths.device)[None, :] < lengths[:, None]


def relative_positions(size: int, dim: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """(1, 2*size-1, dim) sinusoids for relative distances r = size-1, ..., 0, ..., -(size-1).

    PE(r)[2m] = sin(r w_m), PE(r)[2m+1] = cos(r w_m), w_m = POS_BASE^(-2m/dim).
    """
    position = torch.arange(size, dtype=torch.float32, device=device)[:, None]  # (size, 1) r >= 0
    freq = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(POS_BASE) / dim))
    angle = position * freq  # (size, dim/2)
    positive = torch.stack([angle.sin(), angle.cos()], dim=-1).flatten(1)  # (size, dim) interleaved
    negative = torch.stack([(-angle).sin(), (-angle).cos()], dim=-1).flatten(1)
    table = torch.cat([positive.flip(0), negative[1:]], dim=0)  # (2*size-1, dim), r descending
    return table[None].to(dtype)


class RelPositionMultiHeadedAttention(nn.Module):
    """Transformer-XL attention: score(i,j) = [(q_i+u).k_j + (q_i+v).p_{i-j}] / sqrt(d_k)."""

    def __init__(self, n_head: int, n_feat: int):
        super().__init__()
        self.h = n_head
        self.d_k = n_feat // n_head
        self.linear_q = nn.Linear(n_feat, n_feat)
        self.linear_k = nn.Linear(n_feat, n_feat)
        self.linear_v = nn.Linear(n_feat, n_feat)
        self.linear_out = nn.Linear(n_feat, n_feat)
        self.linear_pos = nn.Linear(n_feat, n_feat, bias=False)
        self.pos_bias_u = nn.Parameter(torch.zeros(n_head, self.d_k))
        self.pos_bias_v = nn.Parameter(torch.zeros(n_head, self.d_k))

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        return x.view(x.size(0), x.size(1), self.h, self.d_k).transpose(1, 2)  # (B, H, T, d_k)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        """x (B, T, D); mask (B, T, T) bool, True = visible; pos_emb (1, 2T-1, D) -> (B, T, D)."""
        B, T, _ = x.shape
        q = self._heads(self.linear_q(x))
        k = self._heads(self.linear_k(x))
        v = self._heads(self.linear_v(x))
        p = self._heads(self.linear_pos(pos_emb))  # (1, H, 2T-1, d_k)
        content = torch.matmul(q + self.pos_bias_u[:, None, :], k.transpose(-2, -1))  # (B, H, T, T)
        position = torch.matmul(q + self.pos_bias_v[:, None, :], p.transpose(-2, -1))  # (B, H, T, 2T-1)
        # Column c of `position` is distance r = T-1-c; score(i, j) needs r = i-j, i.e. c = T-1-i+j,
        # which is a strided view: row step (2T-1) - 1, column step 1, start T-1.
        position = position.contiguous()
        position = position.as_strided(
            (B, self.h, T, T),
            (self.h * T * (2 * T - 1), T * (2 * T - 1), 2 * T - 2, 1),
            position.storage_offset() + T - 1,
        )
        scores = (content + position) / math.sqrt(self.d_k)
        hidden = ~mask[:, None]  # (B, 1, T, T)
        attn = torch.softmax(scores.masked_fill(hidden, float("-inf")), dim=-1).masked_fill(hidden, 0.0)
        out = torch.matmul(attn, v).transpose(1, 2).reshape(B, T, self.h * self.d_k)  # (B, T, D)
        return self.linear_out(out)


class PositionwiseFeedForward(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w_1 = nn.Linear(dim, hidden)
        self.w_2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w_2(F.silu(self.w_1(x)))


class ConformerEncoderLayer(nn.Module):
    """x += MHA_rel(LN(x)); x += FFN(LN(x)) (pre-norm, no macaron FFN, no conv module)."""

    def __init__(self, dim: int, heads: int, hidden: int):
        super().__init__()
        self.self_attn = RelPositionMultiHeadedAttention(heads, dim)
        self.feed_forward = PositionwiseFeedForward(dim, hidden)
        self.norm_mha = nn.LayerNorm(dim, eps=LN_EPS_LAYER)
        self.norm_ff = nn.LayerNorm(dim, eps=LN_EPS_LAYER)

    def forward(self, x: torch.Tensor, mask: torch.Tensor, pos_emb: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.norm_mha(x), mask, pos_emb)
        return x + self.feed_forward(self.norm_ff(x))


class LinearEmbed(nn.Module):
    """`out.0` Linear, `out.1` LayerNorm, then x * sqrt(D) and the relative position table."""

    def __init__(self, dim_in: int, dim: int):
        super().__init__()
        self.out = nn.Sequential(nn.Linear(dim_in, dim), nn.LayerNorm(dim, eps=LN_EPS_EMBED))
        self.scale = math.sqrt(dim)
        self.dim = dim

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.out(x) * self.scale  # (B, T, D)
        return x, relative_positions(x.size(1), self.dim, x.device, x.dtype)


class PreLookaheadLayer(nn.Module):
    """y = x + conv2(causal pad 2, leaky_relu(conv1(x right-padded by `lookahead`)))."""

    def __init__(self, channels: int, lookahead: int):
        super().__init__()
        self.lookahead = lookahead
        self.conv1 = nn.Conv1d(channels, channels, kernel_size=lookahead + 1)
        self.conv2 = nn.Conv1d(channels, channels, kernel_size=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, T, C) -> (B, T, C)."""
        h = F.pad(x.transpose(1, 2), (0, self.lookahead))  # (B, C, T + lookahead)
        h = F.leaky_relu(self.conv1(h), LOOKAHEAD_SLOPE)  # (B, C, T)
        h = self.conv2(F.pad(h, (2, 0)))  # (B, C, T)
        return x + h.transpose(1, 2)


class Upsample1D(nn.Module):
    """Nearest-neighbour x stride in time, then a causal conv of kernel 2*stride+1."""

    def __init__(self, channels: int, stride: int):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(channels, channels, 2 * stride + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, T) -> (B, C, stride*T)."""
        x = x.repeat_interleave(self.stride, dim=2)
        return self.conv(F.pad(x, (2 * self.stride, 0)))


class UpsampleConformerEncoder(nn.Module):
    """Embedded units (B, N, D) with lengths (B,) -> (B, ratio*N, D) hidden states, lengths * ratio."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        dim, heads, hidden = cfg.encoder_output_size, cfg.encoder_attention_heads, cfg.encoder_linear_units
        self.chunk = cfg.encoder_chunk_tokens
        self.stride = cfg.token_mel_ratio
        self.embed = LinearEmbed(cfg.input_size, dim)
        self.pre_lookahead_layer = PreLookaheadLayer(dim, cfg.pre_lookahead_len)
        self.encoders = nn.ModuleList(ConformerEncoderLayer(dim, heads, hidden) for _ in range(cfg.encoder_num_blocks))
        self.up_layer = Upsample1D(dim, self.stride)
        self.up_embed = LinearEmbed(cfg.input_size, dim)
        self.up_encoders = nn.ModuleList(
            ConformerEncoderLayer(dim, heads, hidden) for _ in range(cfg.encoder_num_up_blocks)
        )
        self.after_norm = nn.LayerNorm(dim, eps=LN_EPS_EMBED)

    def forward(self, xs: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = xs.shape
        valid = length_mask(lengths, T)  # (B, T)
        xs, pos_emb = self.embed(xs)
        xs = xs * valid[:, :, None].to(xs.dtype)  # padding reads as zeros through the look-ahead
        xs = self.pre_lookahead_layer(xs)
        mask = chunk_mask(T, self.chunk, xs.device)[None] & valid[:, None, :]  # (B, T, T)
        for layer in self.encoders:
            xs = layer(xs, mask, pos_emb)

        xs = self.up_layer(xs.transpose(1, 2)).transpose(1, 2)  # (B, stride*T, D)
        lengths = lengths * self.stride
        T = xs.size(1)
        valid = length_mask(lengths, T)
        xs, pos_emb = self.up_embed(xs)
        mask = chunk_mask(T, self.chunk * self.stride, xs.device)[None] & valid[:, None, :]
        for layer in self.up_encoders:
            xs = layer(xs, mask, pos_emb)
        return self.after_norm(xs), lengths
