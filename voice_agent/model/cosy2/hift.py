"""HiFT vocoder (CosyVoice2 `HiFTGenerator`): 80-bin mel at 50 Hz -> 24 kHz waveform.

Contract: `HiFT.inference(mel (B, 80, T), cache_source, generators, excitation)` returns
`(speech (B, 480 T), source (B, 1, 480 T))`, batch-first, fp32. Module attribute names reproduce the official
`hift.pt` keys; weight norm is folded at load time (W = g * v / ||v||, norm over every dim but 0), so the
modules hold plain weights and `load_hift` accepts both stored spellings (`weight_g`/`weight_v` and
`parametrizations.weight.original0/1`) and the optional `generator.` prefix.

Deviation from the reference: the neural-source-filter excitation is random on every call (initial harmonic
phases and additive noise). The reference draws from the global RNG; here each batch row draws from its own
`torch.Generator` (one per session), so a session's audio is reproducible from its seed and a batched call
equals the per-session calls. The unused noise branch of the reference source module is not drawn. A row's
draws can be given instead (`Excitation`, e.g. another implementation's; `draw_excitation` returns what the
seeded path would draw).

Hyper-parameters: `hift_config.HiFTConfig`. Random weights for tests: `cosy2.tiny`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from voice_agent.errors import CheckpointError
from voice_agent.model.cosy2.hift_config import HiFTConfig
from voice_agent.model.weights import load_module, load_torch_file

SNAKE_EPS = 1e-9  # Snake: x + sin^2(alpha x) / (alpha + eps)
MAX_MAGNITUDE = 1e2  # iSTFT magnitude clip
GENERATOR_PREFIX = "generator."  # stripped by the reference loader
WEIGHT_NORM_SPELLINGS = {
    "weight_g": ("weight_g", "weight_v"),
    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
}


class Snake(nn.Module):
    """Snake activation with a per-channel linear-scale alpha."""

    def __init__(self, channels: int):
        super().__init__()
        self.alpha = nn.Parameter(torch.ones(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        alpha = self.alpha[None, :, None]  # (1, C, 1)
        y = torch.mul(x, alpha)  # one buffer, updated in place: the same operations as the formula
        return y.sin_().square_().div_(alpha + SNAKE_EPS).add_(x)


class ResBlock(nn.Module):
    """Three (Snake, dilated conv, Snake, conv) residual stages."""

    def __init__(self, channels: int, kernel_size: int, dilations: Sequence[int]):
        super().__init__()
        self.convs1 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, dilation=d, padding=d * (kernel_size - 1) // 2)
            for d in dilations
        )
        self.convs2 = nn.ModuleList(
            nn.Conv1d(channels, channels, kernel_size, padding=(kernel_size - 1) // 2) for _ in dilations
        )
        self.activations1 = nn.ModuleList(Snake(channels) for _ in dilations)
        self.activations2 = nn.ModuleList(Snake(channels) for _ in dilations)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv1, conv2, act1, act2 in zip(
            self.convs1, self.convs2, self.activations1, self.activations2, strict=True
        ):
            x = x + conv2(act2(conv1(act1(x))))
        return x


class F0Predictor(nn.Module):
    """ConvRNNF0Predictor: 5 x (conv k3, ELU) then a linear head; |.| gives f0 in Hz per mel frame."""

    def __init__(self, in_channels: int, cond_channels: int):
        super().__init__()
        layers: list[nn.Module] = []
        for i in range(5):
            c_in = in_channels if i == 0 else cond_channels
            layers += [nn.Conv1d(c_in, cond_channels, 3, padding=1), nn.ELU()]
        self.condnet = nn.Sequential(*layers)
        self.classifier = nn.Linear(cond_channels, 1)

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        h = self.condnet(mel).transpose(1, 2)  # (B, T, C)
        return self.classifier(h).squeeze(-1).abs()  # (B, T)


def _draw_row(phase: torch.Tensor, noise: torch.Tensor, g: torch.Generator | None) -> None:
    """Fill one row's initial phases (H, 1) with U(-pi, pi) and its noise (H, N) with N(0, 1) from `g` (None:
    the global RNG): the same values as drawing fresh float32 tensors on the generator's device."""
    dev = g.device if g is not None else noise.device
    if dev == noise.device and noise.dtype == torch.float32:
        phase.uniform_(generator=g).mul_(2).sub_(1).mul_(math.pi)
        noise.normal_(generator=g)
        return
    phase.copy_((torch.rand(phase.shape, generator=g, device=dev) * 2 - 1) * math.pi)
    noise.copy_(torch.randn(noise.shape, generator=g, device=dev))


@dataclass(frozen=True)
class Excitation:
    """One row's random draws of the source excitation, given instead of drawn (to compare a run with
    another implementation's): `phase` (H, 1), each harmonic's initial phase in radians (the fundamental's
    is set to 0 whatever is given, as the reference does), and `noise` (H, N), standard normal, over the
    row's N = 480 T samples (scaled inside by the voiced / unvoiced amplitude)."""

    phase: torch.Tensor
    noise: torch.Tensor


def draw_excitation(generator: torch.Generator | None, harmonics: int, samples: int,
                    device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> Excitation:
    """The draws the seeded path makes for one row from `generator` (phases first, then noise)."""
    phase = torch.empty(harmonics, 1, device=device, dtype=dtype)
    noise = torch.empty(harmonics, samples, device=device, dtype=dtype)
    _draw_row(phase, noise, generator)
    return Excitation(phase, noise)


class SourceModule(nn.Module):
    """SourceModuleHnNSF: harmonic sines of f0 plus noise, merged by `l_linear` and tanh."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    def forward(self, f0: torch.Tensor, generators: Sequence[torch.Generator | None],
                excitation: Sequence[Excitation | None] | None = None) -> torch.Tensor:
        """f0 (B, N) in Hz at the audio rate -> excitation (B, 1, N). Row b draws from `generators[b]`, or
        takes `excitation[b]` when given."""
        cfg = self.cfg
        B, N = f0.shape
        H = cfg.nb_harmonics + 1
        harmonics = torch.arange(1, H + 1, device=f0.device, dtype=f0.dtype)
        freq = f0[:, None, :] * harmonics[None, :, None] / cfg.sampling_rate  # (B, H, N) cycles per sample
        theta = torch.cumsum(freq, dim=-1).remainder_(1).mul_(2 * math.pi)  # (B, H, N)
        phase = torch.empty(B, H, 1, device=f0.device, dtype=f0.dtype)
        noise = torch.empty(B, H, N, device=f0.device, dtype=f0.dtype)
        for b, g in enumerate(generators):  # one draw per row: phases first, then noise (reproducible per session)
            given = excitation[b] if excitation is not None else None
            if given is None:
                _draw_row(phase[b], noise[b], g)
                continue
            if tuple(given.phase.shape) != (H, 1) or tuple(given.noise.shape) != (H, N):
                raise ValueError(f"excitation row {b}: expected phase ({H}, 1) and noise ({H}, {N}), got "
                                 f"{tuple(given.phase.shape)} and {tuple(given.noise.shape)}")
            phase[b].copy_(given.phase)
            noise[b].copy_(given.noise)
        phase[:, 0] = 0.0  # the fundamental starts at phase 0
        sine = theta.add_(phase).sin_().mul_(cfg.nsf_alpha)
        uv = (f0[:, None, :] > cfg.nsf_voiced_threshold).to(f0.dtype)  # (B, 1, N)
        noise.mul_(uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3)
        sine = sine.mul_(uv).add_(noise)  # (B, H, N)
        return torch.tanh(self.l_linear(sine.transpose(1, 2))).transpose(1, 2)  # (B, 1, N)


class HiFT(nn.Module):
    """HiFTGenerator: neural source filter + iSTFTNet."""

    stft_window: torch.Tensor  # (n_fft,) periodic Hann, not stored in hift.pt

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        n_up = len(cfg.upsample_rates)
        n_bins = cfg.istft_n_fft // 2 + 1
        self.f0_predictor = F0Predictor(cfg.in_channels, cfg.f0_cond_channels)
        self.m_source = SourceModule(cfg)
        self.conv_pre = nn.Conv1d(cfg.in_channels, cfg.base_channels, 7, padding=3)
        chans = [cfg.base_channels // 2**i for i in range(n_up + 1)]
        self.ups = nn.ModuleList(
            nn.ConvTranspose1d(chans[i], chans[i + 1], k, u, padding=(k - u) // 2)
            for i, (u, k) in enumerate(zip(cfg.upsample_rates, cfg.upsample_kernel_sizes, strict=True))
        )
        # The source STFT (hop = istft hop) is brought down to each up-sampling stage's rate.
        down_rates = [math.prod(cfg.upsample_rates[i + 1:]) for i in range(n_up)]  # (15, 3, 1)
        self.source_downs = nn.ModuleList(
            nn.Conv1d(2 * n_bins, chans[i + 1], 1) if u == 1
            else nn.Conv1d(2 * n_bins, chans[i + 1], 2 * u, u, padding=u // 2)
            for i, u in enumerate(down_rates)
        )
        source_kd = zip(cfg.source_resblock_kernel_sizes, cfg.source_resblock_dilation_sizes, strict=True)
        self.source_resblocks = nn.ModuleList(
            ResBlock(chans[i + 1], k, d) for i, (k, d) in enumerate(source_kd)
        )
        main_kd = list(zip(cfg.resblock_kernel_sizes, cfg.resblock_dilation_sizes, strict=True))
        self.resblocks = nn.ModuleList(ResBlock(chans[i + 1], k, d) for i in range(n_up) for k, d in main_kd)
        self.conv_post = nn.Conv1d(chans[-1], 2 * n_bins, 7, padding=3)
        window = torch.hann_window(cfg.istft_n_fft, periodic=True)
        self.register_buffer("stft_window", window, persistent=False)

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """mel (B, 80, T), excitation (B, 1, 480 T) -> waveform (B, 480 T) clamped to the audio limit."""
        cfg = self.cfg
        n_fft, hop = cfg.istft_n_fft, cfg.istft_hop
        spec = torch.stft(source.squeeze(1), n_fft, hop, n_fft, window=self.stft_window, return_complex=True)
        s_stft = torch.cat([spec.real, spec.imag], dim=1)  # (B, 2 (n_fft/2+1), 120 T + 1)
        x = self.conv_pre(mel)
        n_k = len(cfg.resblock_kernel_sizes)
        for i, up in enumerate(self.ups):
            x = up(F.leaky_relu(x, cfg.lrelu_slope))
            if i == len(self.ups) - 1:
                x = F.pad(x, (1, 0), mode="reflect")  # (B, C, 120 T + 1)
            x = x + self.source_resblocks[i](self.source_downs[i](s_stft))
            x = sum(self.resblocks[i * n_k + j](x) for j in range(n_k)) / n_k
        x = self.conv_post(F.leaky_relu(x))  # default slope 0.01, as the reference
        n_bins = n_fft // 2 + 1
        magnitude = torch.exp(x[:, :n_bins]).clamp(max=MAX_MAGNITUDE)
        phase = torch.sin(x[:, n_bins:])
        spec = torch.complex(magnitude * torch.cos(phase), magnitude * torch.sin(phase))
        speech = torch.istft(spec, n_fft, hop, n_fft, window=self.stft_window)  # (B, 480 T)
        return speech.clamp(-cfg.audio_limit, cfg.audio_limit)

    @torch.inference_mode()
    def inference(
        self,
        mel: torch.Tensor,
        cache_source: torch.Tensor | None = None,
        generators: torch.Generator | Sequence[torch.Generator | None] | None = None,
        excitation: Sequence[Excitation | None] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) -> (speech (B, 480 T), source (B, 1, 480 T)).

        `cache_source` (B, 1, S) overwrites the first S samples of the excitation before decoding.
        `generators`: one per batch row, or a single one for all rows (drawn row after row); None draws
        from the global RNG. `excitation`: one entry per row, the row's given draws, or None to draw.
        """
        if mel.dim() != 3 or mel.shape[1] != self.cfg.in_channels:
            raise ValueError(f"HiFT: expected mel (B, {self.cfg.in_channels}, T), got {tuple(mel.shape)}")
        B, _, T = mel.shape
        if generators is None or isinstance(generators, torch.Generator):
            generators = [generators] * B
        if len(generators) != B:
            raise ValueError(f"HiFT: expected {B} generators (one per row), got {len(generators)}")
        if excitation is not None and len(excitation) != B:
            raise ValueError(f"HiFT: expected {B} excitation entries (one per row), got {len(excitation)}")
        mel = mel.to(self.conv_pre.weight.dtype)
        f0 = self.f0_predictor(mel)  # (B, T)
        f0 = f0.repeat_interleave(self.cfg.samples_per_frame, dim=1)  # nearest up-sampling, (B, 480 T)
        source = self.m_source(f0, generators, excitation)  # (B, 1, 480 T)
        if cache_source is not None and cache_source.shape[-1] > 0:
            S = cache_source.shape[-1]
            if cache_source.shape[0] != B or S > source.shape[-1]:
                raise ValueError(f"HiFT: expected cache_source ({B}, 1, <= {source.shape[-1]}), "
                                 f"got {tuple(cache_source.shape)}")
            source[:, :, :S] = cache_source.reshape(B, 1, S).to(source)
        return self.decode(mel, source), source


def fold_weight_norm(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """W = g * v / ||v|| with the norm over every dim except dim 0."""
    norm = v.reshape(v.shape[0], -1).norm(dim=1).reshape((-1,) + (1,) * (v.dim() - 1))
    return g * v / norm


def convert_state_dict(state: Mapping[str, torch.Tensor], source: str) -> dict[str, torch.Tensor]:
    """Strip the `generator.` prefix and fold either weight-norm spelling into plain `.weight` tensors."""
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"malformed file {source}: expected a state dict of tensors, "
                              f"got {type(state).__name__}")
    flat = {(k[len(GENERATOR_PREFIX):] if k.startswith(GENERATOR_PREFIX) else k): v for k, v in state.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in flat.items():
        for g_suffix, v_suffix in WEIGHT_NORM_SPELLINGS.values():
            if key.endswith("." + v_suffix):
                if key[: -len(v_suffix)] + g_suffix not in flat:
                    raise CheckpointError(f"malformed file {source}: key {key!r} has no partner "
                                          f"{key[: -len(v_suffix)] + g_suffix!r}")
                break
            if key.endswith("." + g_suffix):
                base = key[: -len(g_suffix)]
                if base + v_suffix not in flat:
                    raise CheckpointError(f"malformed file {source}: key {key!r} has no partner "
                                          f"{base + v_suffix!r}")
                g, v = flat[key].float(), flat[base + v_suffix].float()
                if g.shape != (v.shape[0],) + (1,) * (v.dim() - 1):
                    raise CheckpointError(f"shape mismatch in {source}: key {key!r} expected "
                                          f"{(v.shape[0],) + (1,) * (v.dim() - 1)}, found {tuple(g.shape)}")
                out[base + "weight"] = fold_weight_norm(g, v)
                break
        else:
            out[key] = value
    return out


def load_hift(path: str | Path, cfg: HiFTConfig | None = None, device: str | torch.device = "cpu") -> HiFT:
    """Load `hift.pt` (either weight-norm spelling, optional `generator.` prefix) into a fp32 HiFT."""
    cfg = cfg or HiFTConfig()
    state = load_torch_file(path, "a HiFT state dict (hift.pt)")
    model = HiFT(cfg)
    load_module(model, convert_state_dict(state, str(path)), source=str(path))
    return model.to(device).eval()
