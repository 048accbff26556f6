"""CosyVoice2's causal flow as LLaMA-Omni2 runs it: speech units + speaker vector -> 80-bin log-mel at 50 Hz.

`Flow.inference(tokens (B, N), token_lens (B,), spk (B, 192), finalize, noise) -> (mel (B, 80, M), mel_lens)`:

1. s = spk_embed_affine_layer(spk / |spk|) -> (B, 80).
2. units -> `input_embedding` (zero past each row's length) -> upsample-conformer encoder -> (B, 2N, 512)
   -> `encoder_proj` -> mu (B, 80, 2N).
3. A non-final row drops its last 3 * 2 = 6 frames (the last 3 units have no real look-ahead yet).
4. mel = CFM: 10 Euler steps on the cosine grid t_k = 1 - cos(k/10 * pi/2), from fixed noise, each step
   running the estimator on 2B rows (conditional rows with mu, s; unconditional rows with zeros) and
   combining v = 1.7 v_cond - 0.7 v_uncond.

Prompts are always empty (LLaMA-Omni2 conditions the voice on the speaker vector only), so `cond` is zero.
Rows of different lengths in one batch give the same mel as each row alone (padding masks everywhere).

Deviations from the reference (CV@81edc83 `CausalMaskedDiffWithXvec.inference`): batch-first with any
batch size; `finalize` may differ per row; the CFM noise is our own seeded buffer (the reference's values
depend on its construction-time global RNG), drawn lazily and unbounded (`NoiseSource`), one buffer per
session when streaming; the noise can be given instead (a tensor, or `NoiseSource.given`) to compare a
run with another implementation's draws; a single call is still limited to `noise_frames` (300 s), as in
the reference; unit ids outside [0, vocab) raise instead of indexing out of range.

Files: `flow.pt` is a plain state dict with the official top-level keys (`input_embedding.weight`,
`spk_embed_affine_layer.*`, `encoder.*`, `encoder_proj.*`, `decoder.estimator.*`); `load_flow` loads it key
for key (`voice_agent.model.cosy2.tiny.write_tiny_flow` writes a random one for tests). Streaming, with
its per-reply state, is `voice_agent.engine.flow_stream`; the chunk-cached estimator call is
`flow_cached`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from voice_agent.errors import CheckpointError
from voice_agent.model.cosy2.flow_cached import CachedCall
from voice_agent.model.cosy2.flow_config import N_MELS, FlowConfig
from voice_agent.model.cosy2.flow_encoder import UpsampleConformerEncoder, length_mask
from voice_agent.model.cosy2.flow_estimator import CausalUNetEstimator
from voice_agent.model.weights import load_module, load_torch_file

DEFAULT_NOISE_SEED = 1986  # seed of Flow.inference's own noise when none is given (the yaml's seed)
NOISE_BLOCK_FRAMES = 500  # 10 s of mel per lazily drawn noise block
FLOW_FILE_WHAT = "a CosyVoice2 flow state dict (flow.pt: top-level keys such as 'input_embedding.weight')"


class NoiseSource:
    """Fixed N(0, 1) noise of shape (channels, unbounded), reproducible from `seed`, drawn lazily in blocks of
    `block_frames` from `torch.Generator().manual_seed(seed)` (a 300-s buffer drawn at once would be 4.8 MB).

    `NoiseSource.given(values)` serves injected values (channels, T) instead, e.g. another implementation's
    draws; reading past frame T is an error."""

    def __init__(self, seed: int, channels: int = N_MELS, block_frames: int = NOISE_BLOCK_FRAMES):
        self.seed, self.channels, self.block_frames = seed, channels, block_frames
        self._generator: torch.Generator | None = None
        self._given = False
        self._blocks: dict[int, torch.Tensor] = {}
        self._drawn = 0  # blocks drawn so far
        self._released = 0  # blocks below this index were freed

    @classmethod
    def given(cls, values: torch.Tensor) -> NoiseSource:
        """A source that serves `values` (channels, T) for frames [0, T): one block, never drawn."""
        if values.dim() != 2 or values.size(1) < 1 or not values.is_floating_point():
            raise ValueError(f"noise: expected float values (channels, T >= 1), got {tuple(values.shape)} "
                             f"{values.dtype}")
        source = cls(0, values.size(0), values.size(1))
        source._given = True
        source._blocks[0] = values.detach().to(device="cpu", dtype=torch.float32)
        source._drawn = 1
        return source

    def frames(self, start: int, stop: int) -> torch.Tensor:
        """Noise for absolute frames [start, stop): (channels, stop - start) float32 on the CPU."""
        if not 0 <= start <= stop:
            raise ValueError(f"noise frames: expected 0 <= start <= stop, got [{start}, {stop})")
        if start < self._released * self.block_frames:
            raise ValueError(f"noise frames before {self._released * self.block_frames} were released, got {start}")
        if self._given and stop > self.block_frames:
            raise ValueError(f"noise: {self.block_frames} frames were given, frames up to {stop} are needed")
        if start == stop:
            return torch.zeros(self.channels, 0)
        while self._drawn * self.block_frames < stop:
            if self._generator is None:
                self._generator = torch.Generator().manual_seed(self.seed)
            block = torch.randn(self.channels, self.block_frames, generator=self._generator)
            self._blocks[self._drawn] = block
            self._drawn += 1
        first, last = start // self.block_frames, max(start, stop - 1) // self.block_frames
        pieces = torch.cat([self._blocks[b] for b in range(first, last + 1)], dim=1)  # (C, blocks * F)
        offset = start - first * self.block_frames
        return pieces[:, offset : offset + stop - start]

    def release_before(self, frame: int) -> None:
        """Free the blocks that lie entirely before `frame` (they can no longer be read)."""
        for b in range(self._released, frame // self.block_frames):
            self._blocks.pop(b, None)
        self._released = max(self._released, frame // self.block_frames)


class CausalCFM(nn.Module):
    """Euler solver of the conditional flow-matching ODE with classifier-free guidance (`decoder.*`)."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.estimator = CausalUNetEstimator(cfg)
        self.n_timesteps = cfg.n_timesteps
        self.cfg_rate = float(cfg.inference_cfg_rate)
        self.t_scheduler = cfg.t_scheduler

    def time_grid(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """(n_timesteps + 1,) from 0 to 1."""
        t = torch.linspace(0, 1, self.n_timesteps + 1, device=device, dtype=dtype)
        return 1 - torch.cos(t * 0.5 * torch.pi) if self.t_scheduler == "cosine" else t

    def forward(
        self,
        mu: torch.Tensor,
        mask: torch.Tensor,
        spks: torch.Tensor,
        cond: torch.Tensor,
        noise: torch.Tensor,
        cached: CachedCall | None = None,
    ) -> torch.Tensor:
        """mu, cond, noise (B, 80, T); mask (B, 1, T); spks (B, 80) -> x(t=1) (B, 80, T).

        With `cached` (flow_cached), the T frames are each row's new frames, after its cached ones."""
        B = mu.size(0)
        x = noise
        t_span = self.time_grid(mu.device, mu.dtype)
        guided = self.cfg_rate > 0
        if guided:  # rows [0, B) conditional, [B, 2B) unconditional (zero mu, speaker and cond)
            mask_in = torch.cat([mask, mask])
            mu_in = torch.cat([mu, torch.zeros_like(mu)])
            spks_in = torch.cat([spks, torch.zeros_like(spks)])
            cond_in = torch.cat([cond, torch.zeros_like(cond)])
        else:
            mask_in, mu_in, spks_in, cond_in = mask, mu, spks, cond
        padded = not bool(mask.bool().all())
        if cached is not None and not guided:
            raise ValueError("flow cache: expected classifier-free guidance (inference_cfg_rate > 0)")
        # the same for every step; a cached call carries its own
        bias = self.estimator.attention_bias(mask_in, mu.dtype) if cached is None else None
        for k in range(self.n_timesteps):
            t = t_span[k].expand(mask_in.size(0))
            ctx = cached.step(k) if cached is not None else None
            v = self.estimator(torch.cat([x, x]) if guided else x, mask_in, mu_in, t, spks_in, cond_in, bias, padded,
                               ctx)
            if cached is not None and ctx is not None:
                cached.store(k, ctx)
            if guided:
                v_cond, v_uncond = v[:B], v[B:]
                v = (1.0 + self.cfg_rate) * v_cond - self.cfg_rate * v_uncond
            x = x + (t_span[k + 1] - t_span[k]) * v
        if cached is not None:
            cached.finish()
        return x


class Flow(nn.Module):
    """`CausalMaskedDiffWithXvec` with official attribute names; see the module docstring."""

    def __init__(self, cfg: FlowConfig):
        super().__init__()
        self.cfg = cfg
        self.input_embedding = nn.Embedding(cfg.vocab_size, cfg.input_size)
        self.spk_embed_affine_layer = nn.Linear(cfg.spk_embed_dim, cfg.output_size)
        self.encoder = UpsampleConformerEncoder(cfg)
        self.encoder_proj = nn.Linear(cfg.encoder_output_size, cfg.output_size)
        self.decoder = CausalCFM(cfg)
        self.noise = NoiseSource(DEFAULT_NOISE_SEED, cfg.output_size)

    @property
    def device(self) -> torch.device:
        return self.spk_embed_affine_layer.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.spk_embed_affine_layer.weight.dtype

    def check_inputs(self, tokens: torch.Tensor, token_lens: torch.Tensor, spk: torch.Tensor) -> None:
        if tokens.dim() != 2 or tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"tokens: expected an integer tensor (B, N), got {tuple(tokens.shape)} {tokens.dtype}")
        B, N = tokens.shape
        if tuple(token_lens.shape) != (B,):
            raise ValueError(f"token_lens: expected shape ({B},), got {tuple(token_lens.shape)}")
        if tuple(spk.shape) != (B, self.cfg.spk_embed_dim):
            raise ValueError(f"spk: expected shape ({B}, {self.cfg.spk_embed_dim}), got {tuple(spk.shape)}")
        if B and (int(token_lens.min()) < 0 or int(token_lens.max()) > N):
            raise ValueError(f"token_lens: expected values in [0, {N}], got {token_lens.tolist()}")
        valid = length_mask(token_lens, N)
        if valid.any():
            ids = tokens[valid]
            lo, hi = int(ids.min()), int(ids.max())
            if lo < 0 or hi >= self.cfg.vocab_size:
                raise ValueError(f"tokens: expected unit ids in [0, {self.cfg.vocab_size}), got min {lo} max {hi}")

    @torch.inference_mode()
    def inference(
        self,
        tokens: torch.Tensor,
        token_lens: torch.Tensor,
        spk: torch.Tensor,
        finalize: bool | Sequence[bool],
        noise: torch.Tensor | NoiseSource | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Units -> mel. tokens (B, N) int; token_lens (B,); spk (B, 192); finalize per call or per row;
        noise (B, 80, >= M) or a NoiseSource (every row reads frames [0, M)), default the flow's own.
        Returns mel (B, 80, M) float32 (zero past each row's length) and mel_lens (B,) int64."""
        cfg, device, dtype = self.cfg, self.device, self.dtype
        tokens, token_lens, spk = (
            tokens.to(device),
            token_lens.to(device=device, dtype=torch.long),
            spk.to(device),
        )
        self.check_inputs(tokens, token_lens, spk)
        B = tokens.size(0)
        finals = [bool(finalize)] * B if isinstance(finalize, bool) else [bool(f) for f in finalize]
        if len(finals) != B:
            raise ValueError(f"finalize: expected one flag per row ({B}), got {len(finals)}")

        mu, mel_lens, s = self.encode(tokens, token_lens, spk, finals)
        M = mu.size(-1)
        if M > cfg.noise_frames:
            raise ValueError(f"flow call too long: expected at most {cfg.noise_frames} mel frames per call, got {M}")
        mask = length_mask(mel_lens, M)[:, None, :].to(dtype)  # (B, 1, M)
        z = self._noise(noise, B, M).to(device=device, dtype=dtype)  # (B, 80, M)
        if M == 0:
            return torch.zeros(B, cfg.output_size, 0, device=device), mel_lens
        mel = self.decoder(mu, mask, s, torch.zeros_like(mu), z)
        return (mel * mask).float(), mel_lens

    def encode(self, tokens: torch.Tensor, token_lens: torch.Tensor, spk: torch.Tensor,
               finals: Sequence[bool]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Steps 1-3 on checked inputs on the flow's device: mu (B, 80, M) (zero-masked later), mel_lens (B,),
        the projected speaker s (B, 80)."""
        cfg, device, dtype = self.cfg, self.device, self.dtype
        N = tokens.size(1)
        s = self.spk_embed_affine_layer(F.normalize(spk.to(dtype), dim=1))  # (B, 80)
        valid = length_mask(token_lens, N)  # (B, N)
        x = self.input_embedding(torch.where(valid, tokens, 0)) * valid[:, :, None].to(dtype)  # (B, N, D)
        h, h_lens = self.encoder(x, token_lens)  # (B, 2N, D), (B,)
        drop = torch.tensor([0 if f else cfg.lookahead_frames for f in finals], device=device)
        mel_lens = (h_lens - drop).clamp(min=0)  # (B,)
        M = int(mel_lens.max()) if len(finals) else 0
        mu = self.encoder_proj(h[:, :M]).transpose(1, 2)  # (B, 80, M)
        return mu, mel_lens, s

    def _noise(self, noise: torch.Tensor | NoiseSource | None, B: int, M: int) -> torch.Tensor:
        channels = self.cfg.output_size
        if noise is None or isinstance(noise, NoiseSource):
            source = noise if noise is not None else self.noise
            return source.frames(0, M)[None].expand(B, -1, -1)
        if noise.dim() != 3 or noise.size(0) != B or noise.size(1) != channels or noise.size(2) < M:
            raise ValueError(f"noise: expected shape ({B}, {channels}, >= {M}), got {tuple(noise.shape)}")
        return noise[:, :, :M]


def load_flow(
    path: str | Path,
    cfg: FlowConfig | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Flow:
    """Load an official (or tiny) `flow.pt` key for key into a Flow of `cfg` (default: official dims)."""
    cfg = cfg if cfg is not None else FlowConfig()
    state = load_torch_file(path, FLOW_FILE_WHAT)
    if not isinstance(state, dict):
        raise CheckpointError(f"malformed file {path}: expected {FLOW_FILE_WHAT}, got {type(state).__name__}")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise CheckpointError(f"malformed file {path}: key {key!r} expected a tensor, found {type(value).__name__}")
    nested = [k for k in state if k.endswith(".input_embedding.weight")]
    if "input_embedding.weight" not in state and nested:
        raise CheckpointError(
            f"malformed file {path}: expected top-level key 'input_embedding.weight' (no prefix), found {nested[0]!r}"
        )
    with torch.device("meta"):
        flow = Flow(cfg)
    flow = flow.to_empty(device=device).to(dtype)
    load_module(flow, state, source=str(path))
    return flow.eval()
