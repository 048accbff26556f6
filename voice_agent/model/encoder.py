"""The Whisper audio encoder (large-v3 in LLaMA-Omni2), batch-first, with openai-whisper's key names.

Contract: `WhisperEncoder` maps a log-mel (B, n_mels, 2 * n_ctx) to (B, n_ctx, n_state), computing what
openai-whisper's `AudioEncoder` computes: GELU(conv1), GELU(conv2, stride 2), + sinusoidal positions,
n_layer pre-LN blocks (self-attention without mask, exact-GELU MLP of width 4 * n_state), ln_post. Its
parameter and buffer names are whisper's `encoder.*` keys (and LLaMA-Omni2's `model.speech_encoder.*`),
so both checkpoints load key for key:

- `load_whisper_pt(path)` reads an openai-whisper `.pt` ({"dims", "model_state_dict"}), taking the
  encoder sizes from "dims" and the tensors under "encoder." (the decoder's are not read);
- `encoder_from_checkpoint(tensors, dims=...)` reads the encoder inside a LLaMA-Omni2 checkpoint. As the
  reference builds the encoder from the whisper file that config.json names before loading the
  checkpoint's weights, its sizes come from that file's "dims" (`read_whisper_dims`) when the file is at
  hand. Without it they are inferred from tensor shapes, except the head count, which no shape holds:
  heads are then taken to be 64 wide (n_head = n_state // 64, true of every openai Whisper model) and the
  log says so.

Faithful by default: the input must be the full 30-s window (2 * n_ctx = 3000 mel frames -> 1500 frames),
as openai-whisper asserts. Option that changes numbers: `forward(mel, unpadded=True)` accepts fewer frames
and adds only the first T rows of the positional embedding; the model was trained only on 30-s windows,
so its outputs then differ from the reference's.

Deviations: attention uses `scaled_dot_product_attention` (scale 1/sqrt(64), equal to whisper's two
64^-1/4 factors); LayerNorms compute in float32 and cast back (as openai-whisper; LLaMA-Omni2's plain
`nn.LayerNorm` runs them in bf16 — a rounding-level difference). For odd mel lengths the output has
(T_mel + 1) // 2 frames, as the stride-2 convolution gives.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from voice_agent.errors import CheckpointError
from voice_agent.model.weights import SafetensorsCheckpoint, load_module, load_torch_file

log = logging.getLogger(__name__)

HEAD_DIM = 64  # channels per attention head in every openai Whisper model (the fallback assumption)
OPENAI_WIDTHS = {384: "tiny", 512: "base", 768: "small", 1024: "medium", 1280: "large"}  # n_state -> model
CONV_STRIDE = 2  # conv2 halves the frame rate: 100 mel frames/s -> 50 encoder frames/s
MLP_RATIO = 4  # MLP width = 4 * n_state
LAYER_NORM_EPS = 1e-5
MAX_TIMESCALE = 10000.0  # longest period of the sinusoidal positions, in frames
WHISPER_PT_PREFIX = "encoder."  # encoder keys inside an openai-whisper .pt
CHECKPOINT_PREFIX = "model.speech_encoder."  # encoder keys inside a LLaMA-Omni2 checkpoint


@dataclass(frozen=True)
class WhisperDims:
    """Sizes of a Whisper audio encoder (openai-whisper's n_mels and n_audio_* fields)."""

    n_mels: int
    n_ctx: int  # encoder frames per window (1500 = 30 s)
    n_state: int
    n_head: int
    n_layer: int

    def __post_init__(self) -> None:
        for name in ("n_mels", "n_ctx", "n_state", "n_head", "n_layer"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"WhisperDims.{name}: expected a positive int, got {value!r}")
        if self.n_state % self.n_head or self.n_state % 2:
            raise ValueError(
                "WhisperDims: expected an even n_state divisible by n_head, "
                f"got n_state {self.n_state}, n_head {self.n_head}"
            )

    @property
    def mel_frames(self) -> int:
        """Mel frames of one full window (3000 for 30 s)."""
        return self.n_ctx * CONV_STRIDE

    @classmethod
    def from_openai(cls, dims: Any, source: str) -> WhisperDims:
        """From the "dims" dict of an openai-whisper `.pt`; CheckpointError naming `source` if malformed."""
        if not isinstance(dims, Mapping):
            found = type(dims).__name__
            raise CheckpointError(f"malformed file {source}: expected 'dims' to be a dict, got {found}")
        fields = {"n_mels": "n_mels", "n_ctx": "n_audio_ctx", "n_state": "n_audio_state",
                  "n_head": "n_audio_head", "n_layer": "n_audio_layer"}
        values = {}
        for name, key in fields.items():
            value = dims.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(
                    f"malformed file {source}: 'dims.{key}' expected a positive int, got {value!r}"
                )
            values[name] = value
        try:
            return cls(**values)
        except ValueError as e:
            raise CheckpointError(f"malformed file {source}: {e}") from e


def sinusoids(length: int, channels: int, max_timescale: float = MAX_TIMESCALE) -> torch.Tensor:
    """Whisper's positional embedding: (length, channels) float32, sin in the first half, cos in the second.

    For channel pair j < channels / 2 the angle is t * exp(-j * ln(max_timescale) / (channels / 2 - 1)).
    Computed in float64 then rounded (openai-whisper rounds to float32 earlier; the two differ by < 1e-3
    at t = 1500, and checkpoints store the buffer anyway).
    """
    if channels % 2 or channels < 4:
        raise ValueError(f"expected an even number of channels >= 4, got {channels}")
    half = channels // 2
    inv_timescales = np.exp(-np.log(max_timescale) / (half - 1) * np.arange(half))  # (C/2,)
    angles = np.arange(length)[:, None] * inv_timescales[None, :]  # (T, C/2)
    return torch.from_numpy(np.concatenate([np.sin(angles), np.cos(angles)], axis=1)).float()  # (T, C)


def encoded_frames(mel_frames: int) -> int:
    """Encoder frames for `mel_frames` mel frames (conv2: kernel 3, stride 2, padding 1)."""
    return (mel_frames + 1) // CONV_STRIDE


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the parameter/input dtype, cast back to the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class SelfAttention(nn.Module):
    """Multi-head self-attention without mask; keys `query`, `key` (no bias), `value`, `out`."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.n_head = n_head
        self.query = nn.Linear(n_state, n_state)
        self.key = nn.Linear(n_state, n_state, bias=False)
        self.value = nn.Linear(n_state, n_state)
        self.out = nn.Linear(n_state, n_state)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        """`key_mask` (B, T) bool: which keys each row may attend to (None: all)."""
        b, t, d = x.shape

        def heads(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.n_head, d // self.n_head).transpose(1, 2)  # (B, H, T, hd)

        mask = None if key_mask is None else key_mask[:, None, None, :]  # (B, 1, 1, T)
        a = F.scaled_dot_product_attention(
            heads(self.query(x)), heads(self.key(x)), heads(self.value(x)), attn_mask=mask
        )
        return self.out(a.transpose(1, 2).reshape(b, t, d))  # (B, T, D)


class EncoderBlock(nn.Module):
    """Pre-LN transformer block: x + attn(attn_ln(x)), then x + mlp(mlp_ln(x))."""

    def __init__(self, n_state: int, n_head: int):
        super().__init__()
        self.attn = SelfAttention(n_state, n_head)
        self.attn_ln = LayerNorm(n_state, eps=LAYER_NORM_EPS)
        self.mlp = nn.Sequential(
            nn.Linear(n_state, MLP_RATIO * n_state), nn.GELU(), nn.Linear(MLP_RATIO * n_state, n_state)
        )
        self.mlp_ln = LayerNorm(n_state, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_ln(x), key_mask)
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """Whisper audio encoder: log-mel (B, n_mels, 2 * n_ctx) -> (B, n_ctx, n_state)."""

    def __init__(self, n_mels: int, n_ctx: int, n_state: int, n_head: int, n_layer: int):
        super().__init__()
        self.dims = WhisperDims(n_mels, n_ctx, n_state, n_head, n_layer)
        self.conv1 = nn.Conv1d(n_mels, n_state, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(n_state, n_state, kernel_size=3, stride=CONV_STRIDE, padding=1)
        # Persistent: both the whisper .pt and the LLaMA-Omni2 safetensors store it.
        self.positional_embedding: torch.Tensor
        self.register_buffer("positional_embedding", sinusoids(n_ctx, n_state), persistent=True)
        self.blocks = nn.ModuleList(EncoderBlock(n_state, n_head) for _ in range(n_layer))
        self.ln_post = LayerNorm(n_state, eps=LAYER_NORM_EPS)

    @classmethod
    def from_dims(cls, dims: WhisperDims) -> WhisperEncoder:
        return cls(dims.n_mels, dims.n_ctx, dims.n_state, dims.n_head, dims.n_layer)

    @property
    def n_mels(self) -> int:
        return self.dims.n_mels

    @property
    def n_ctx(self) -> int:
        return self.dims.n_ctx

    @property
    def n_state(self) -> int:
        return self.dims.n_state

    def forward(
        self, mel: torch.Tensor, *, unpadded: bool = False, mel_lengths: torch.Tensor | None = None
    ) -> torch.Tensor:
        """(B, n_mels, T_mel) -> (B, (T_mel + 1) // 2, n_state), in the module's dtype.

        Faithful (default): T_mel must give exactly n_ctx frames (3000 mel frames for large-v3).
        `unpadded=True` accepts up to that many and uses positional_embedding[:T] (changes numbers).
        `mel_lengths` (B,): rows of different real lengths in one unpadded batch. Each row then sees zeros
        past its end at both convolutions and attends only to its own frames, so it equals the row encoded
        alone at its own length (outputs past a row's length are meaningless).
        """
        d = self.dims
        if mel.ndim != 3 or mel.shape[1] != d.n_mels:
            raise ValueError(f"expected a log-mel of shape (B, {d.n_mels}, T), got {tuple(mel.shape)}")
        t = encoded_frames(mel.shape[2])
        if not unpadded and t != d.n_ctx:
            raise ValueError(
                f"expected {d.mel_frames} mel frames (a padded 30-s window, {d.n_ctx} encoder frames), "
                f"got {mel.shape[2]}; pass unpadded=True to encode shorter input"
            )
        if t > d.n_ctx:
            raise ValueError(f"expected at most {d.mel_frames} mel frames, got {mel.shape[2]}")
        mel = mel.to(self.conv1.weight.dtype)
        key_mask = None
        if mel_lengths is not None:
            frames = torch.arange(mel.shape[2], device=mel.device)
            inside = frames[None, :] < mel_lengths[:, None]  # (B, T_mel)
            mel = mel * inside[:, None]
        x = F.gelu(self.conv1(mel))  # (B, D, T_mel)
        if mel_lengths is not None:
            x = x * inside[:, None]  # conv2 must see zeros past each row's end, as when alone
        x = F.gelu(self.conv2(x))  # (B, D, T)
        # (B, T, D), made contiguous once: a transposed residual stream would be copied again at every
        # LayerNorm and Linear.
        x = x.transpose(1, 2).contiguous()
        x = x + self.positional_embedding[:t].to(x.dtype)
        if mel_lengths is not None:
            enc_lengths = (mel_lengths + 1) // CONV_STRIDE  # (B,)
            key_mask = torch.arange(t, device=x.device)[None, :] < enc_lengths[:, None]  # (B, T)
        for block in self.blocks:
            x = block(x, key_mask)
        return self.ln_post(x)  # (B, T, D)


def _shape(tensors: Mapping[str, torch.Tensor], key: str, source: str, what: str) -> tuple[int, ...]:
    if key not in tensors:
        raise CheckpointError(f"missing key in {source}: {key!r} (expected {what})")
    if isinstance(tensors, SafetensorsCheckpoint):
        return tensors.shape(key)
    return tuple(tensors[key].shape)


def _build(dims: WhisperDims, device: torch.device | str, dtype: torch.dtype) -> WhisperEncoder:
    """An encoder with uninitialised storage on `device` (every tensor is then loaded from a checkpoint)."""
    with torch.device("meta"):
        encoder = WhisperEncoder.from_dims(dims)
    return encoder.to_empty(device=device).to(dtype=dtype).eval()


def _read_whisper_file(path: str | Path, *, mmap: bool) -> tuple[WhisperDims, Mapping[str, torch.Tensor]]:
    source = str(path)
    data = load_torch_file(path, "an openai-whisper checkpoint with 'dims' and 'model_state_dict'", mmap=mmap)
    if not isinstance(data, Mapping) or "dims" not in data or "model_state_dict" not in data:
        found = sorted(map(str, data)) if isinstance(data, Mapping) else type(data).__name__
        raise CheckpointError(
            f"malformed file {source}: expected keys 'dims' and 'model_state_dict', got {found}"
        )
    dims = WhisperDims.from_openai(data["dims"], source)
    state = data["model_state_dict"]
    if not isinstance(state, Mapping):
        raise CheckpointError(f"malformed file {source}: expected 'model_state_dict' to be a dict")
    return dims, state


def read_whisper_dims(path: str | Path) -> WhisperDims:
    """The encoder sizes in an openai-whisper `.pt` ("dims"); the tensors are memory-mapped, not read."""
    return _read_whisper_file(path, mmap=True)[0]


def load_whisper_pt(
    path: str | Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> WhisperEncoder:
    """The encoder of an openai-whisper `.pt` checkpoint ({"dims", "model_state_dict"}), in eval mode."""
    dims, state = _read_whisper_file(path, mmap=False)
    encoder = _build(dims, device, dtype)
    load_module(encoder, state, WHISPER_PT_PREFIX, source=str(path))
    return encoder


def encoder_from_checkpoint(
    tensors: Mapping[str, torch.Tensor],
    prefix: str = CHECKPOINT_PREFIX,
    *,
    source: str,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    dims: WhisperDims | None = None,
) -> WhisperEncoder:
    """The encoder stored under `prefix` in a checkpoint, in eval mode. Sizes: `dims` (from the whisper file,
    checked against the tensor shapes) when given, else inferred from the shapes with 64-wide heads."""
    conv1 = _shape(tensors, prefix + "conv1.weight", source, "conv1 weight (n_state, n_mels, 3)")
    pos = _shape(tensors, prefix + "positional_embedding", source, "positional_embedding (n_ctx, n_state)")
    if len(conv1) != 3 or len(pos) != 2 or pos[1] != conv1[0]:
        raise CheckpointError(
            f"malformed encoder in {source}: expected {prefix}conv1.weight (n_state, n_mels, 3) and "
            f"{prefix}positional_embedding (n_ctx, n_state), got {conv1} and {pos}"
        )
    n_state, n_mels = conv1[0], conv1[1]
    pattern = re.compile(re.escape(prefix) + r"blocks\.(\d+)\.")
    layers = {int(m.group(1)) for key in tensors if (m := pattern.match(key))}
    if not layers or layers != set(range(len(layers))):
        raise CheckpointError(
            f"malformed encoder in {source}: expected blocks 0..n-1 under '{prefix}blocks.', "
            f"got {sorted(layers)}"
        )
    found = (n_mels, pos[0], n_state, len(layers))
    if dims is not None:
        if (dims.n_mels, dims.n_ctx, dims.n_state, dims.n_layer) != found:
            raise CheckpointError(
                f"speech encoder in {source}: expected the whisper file's (n_mels, n_ctx, n_state, n_layer) "
                f"{(dims.n_mels, dims.n_ctx, dims.n_state, dims.n_layer)}, found {found} in the tensors"
            )
    else:
        if n_state % HEAD_DIM:
            raise CheckpointError(
                f"malformed encoder in {source}: expected n_state divisible by head dim {HEAD_DIM}, got {n_state} "
                "(no whisper file gives the head count, so heads are taken to be 64 wide)"
            )
        dims = WhisperDims(n_mels=n_mels, n_ctx=pos[0], n_state=n_state, n_head=n_state // HEAD_DIM,
                           n_layer=len(layers))
        known = OPENAI_WIDTHS.get(n_state)
        log.log(logging.INFO if known else logging.WARNING,
                "speech encoder in %s: no whisper file gives its dims; assuming %d-wide attention heads "
                "(n_head = %d)%s", source, HEAD_DIM, dims.n_head,
                f", as openai Whisper {known} has" if known else ", which no openai Whisper model of this "
                "width confirms")
    encoder = _build(dims, device, dtype)
    load_module(encoder, tensors, prefix, source=source)
    return encoder
