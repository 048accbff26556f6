"""HiFT vocoder (CosyVoice2 `HiFTGenerator`): 80-bin mel at 50 Hz -> 24 kHz waveform.

Contract: `HiFT.inference(mel (B, 80, T), cache_source, generators)` returns
`(speech (B, 480 T), source (B, 1, 480 T))`, batch-first, fp32. Module attribute names reproduce the official
`hift.pt` keys; weight norm is folded at load time (W = g * v / ||v||, norm over every dim but 0), so the
modules hold plain weights and `load_hift` accepts both stored spellings (`weight_g`/`weight_v` and
`parametrizations.weight.original0/1`) and the optional `generator.` prefix.

Deviation from the reference: the neural-source-filter excitation is random on every call (initial harmonic
phases and additive noise). The reference draws from the global RNG; here each batch row draws from its own
`torch.Generator` (one per session), so a session's audio is reproducible from its seed and a batched call
equals the per-session calls. The unused noise branch of the reference source module is not drawn.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from voice_agent.errors import CheckpointError
from voice_agent.model.weights import load_module, load_torch_file

SAMPLE_RATE_HZ = 24_000
MEL_FRAME_RATE_HZ = 50  # flow mel frames per second
SAMPLES_PER_FRAME = SAMPLE_RATE_HZ // MEL_FRAME_RATE_HZ  # 480 = prod(upsample_rates) * istft hop
SNAKE_EPS = 1e-9  # Snake: x + sin^2(alpha x) / (alpha + eps)
MAX_MAGNITUDE = 1e2  # iSTFT magnitude clip
GENERATOR_PREFIX = "generator."  # stripped by the reference loader
WEIGHT_NORM_SPELLINGS = {
    "weight_g": ("weight_g", "weight_v"),
    "parametrizations": ("parametrizations.weight.original0", "parametrizations.weight.original1"),
}


@dataclass(frozen=True)
class HiFTConfig:
    """HiFTGenerator hyper-parameters; defaults are the official CosyVoice2 ones."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = SAMPLE_RATE_HZ
    nsf_alpha: float = 0.1  # sine amplitude
    nsf_sigma: float = 0.003  # noise std in voiced regions
    nsf_voiced_threshold: float = 10.0  # Hz
    upsample_rates: tuple[int, ...] = (8, 5, 3)
    upsample_kernel_sizes: tuple[int, ...] = (16, 11, 7)
    istft_n_fft: int = 16
    istft_hop: int = 4
    resblock_kernel_sizes: tuple[int, ...] = (3, 7, 11)
    resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    source_resblock_kernel_sizes: tuple[int, ...] = (7, 7, 11)
    source_resblock_dilation_sizes: tuple[tuple[int, ...], ...] = ((1, 3, 5),) * 3
    lrelu_slope: float = 0.1
    audio_limit: float = 0.99
    f0_cond_channels: int = 512
    f0_num_class: int = 1

    def __post_init__(self) -> None:
        n_up = len(self.upsample_rates)
        checks = [
            (len(self.upsample_kernel_sizes) == n_up, f"{n_up} upsample_kernel_sizes",
             self.upsample_kernel_sizes),
            (len(self.source_resblock_kernel_sizes) == n_up, f"{n_up} source_resblock_kernel_sizes",
             self.source_resblock_kernel_sizes),
            (len(self.source_resblock_dilation_sizes) == n_up, f"{n_up} source_resblock_dilation_sizes",
             self.source_resblock_dilation_sizes),
            (len(self.resblock_dilation_sizes) == len(self.resblock_kernel_sizes),
             "one resblock dilation list per kernel size", self.resblock_dilation_sizes),
            (self.base_channels % (2**n_up) == 0, f"base_channels divisible by {2**n_up}",
             self.base_channels),
            (self.f0_num_class == 1, "f0_predictor num_class 1", self.f0_num_class),
            (self.samples_per_frame * MEL_FRAME_RATE_HZ == self.sampling_rate,
             f"prod(upsample_rates) * istft hop * {MEL_FRAME_RATE_HZ} Hz == sampling_rate",
             (self.upsample_rates, self.istft_hop, self.sampling_rate)),
        ]
        for ok, expected, found in checks:
            if not ok:
                raise ValueError(f"HiFTConfig: expected {expected}, got {found}")

    @property
    def samples_per_frame(self) -> int:
        return math.prod(self.upsample_rates) * self.istft_hop

    @classmethod
    def tiny(cls) -> HiFTConfig:
        """Small channels (base 32, f0 32) with the official rates, so 480 samples per frame still hold."""
        return cls(base_channels=32, f0_cond_channels=32)

    @classmethod
    def from_yaml(cls, section: Mapping[str, Any]) -> HiFTConfig:
        """Build from the `hift:` section of cosyvoice.yaml (as read by `cosy2.read_cosyvoice_yaml`)."""
        fields = cls.__dataclass_fields__
        plain = {f for f in fields if not f.startswith(("istft_", "f0_"))}
        kwargs: dict[str, Any] = {}
        for key, value in section.items():
            if key == "istft_params":
                kwargs["istft_n_fft"], kwargs["istft_hop"] = int(value["n_fft"]), int(value["hop_len"])
            elif key == "f0_predictor":
                f0_in = int(value.get("in_channels", 80))
                if f0_in != int(section.get("in_channels", 80)):
                    raise ValueError(f"hift yaml: expected f0_predictor.in_channels == in_channels, "
                                     f"got {f0_in}")
                kwargs["f0_cond_channels"] = int(value.get("cond_channels", 512))
                kwargs["f0_num_class"] = int(value.get("num_class", 1))
            elif key in plain:
                default = fields[key].default
                if isinstance(default, tuple):  # lists (of lists) of ints
                    kwargs[key] = tuple(
                        tuple(int(x) for x in v) if isinstance(v, list) else int(v) for v in value
                    )
                else:
                    kwargs[key] = float(value) if isinstance(default, float) else int(value)
            else:
                raise ValueError(f"hift yaml: unexpected key {key!r}; expected one of {sorted(plain)}, "
                                 "istft_params, f0_predictor")
        return cls(**kwargs)

    def yaml_section(self) -> dict[str, Any]:
        """The plain mapping for the `hift:` section of cosyvoice.yaml (inverse of `from_yaml`)."""
        def plain(v: Any) -> Any:
            return [plain(x) for x in v] if isinstance(v, tuple) else v

        d = {k: plain(v) for k, v in asdict(self).items() if not k.startswith(("istft_", "f0_"))}
        d["istft_params"] = {"n_fft": self.istft_n_fft, "hop_len": self.istft_hop}
        d["f0_predictor"] = {"num_class": self.f0_num_class, "in_channels": self.in_channels,
                             "cond_channels": self.f0_cond_channels}
        return d


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


class SourceModule(nn.Module):
    """SourceModuleHnNSF: harmonic sines of f0 plus noise, merged by `l_linear` and tanh."""

    def __init__(self, cfg: HiFTConfig):
        super().__init__()
        self.cfg = cfg
        self.l_linear = nn.Linear(cfg.nb_harmonics + 1, 1)

    def forward(self, f0: torch.Tensor, generators: Sequence[torch.Generator | None]) -> torch.Tensor:
        """f0 (B, N) in Hz at the audio rate -> excitation (B, 1, N)."""
        cfg = self.cfg
        B, N = f0.shape
        H = cfg.nb_harmonics + 1
        harmonics = torch.arange(1, H + 1, device=f0.device, dtype=f0.dtype)
        freq = f0[:, None, :] * harmonics[None, :, None] / cfg.sampling_rate  # (B, H, N) cycles per sample
        theta = torch.cumsum(freq, dim=-1).remainder_(1).mul_(2 * math.pi)  # (B, H, N)
        phase = torch.empty(B, H, 1, device=f0.device, dtype=f0.dtype)
        noise = torch.empty(B, H, N, device=f0.device, dtype=f0.dtype)
        for b, g in enumerate(generators):  # one draw per row: phases first, then noise (reproducible per session)
            _draw_row(phase[b], noise[b], g)
        phase[:, 0] = 0.0  # the fundamental starts at phase 0
        sine = theta.add_(phase).sin_().mul_(cfg.nsf_alpha)
        uv = (f0[:, None, :] > cfg.nsf_voiced_threshold).to(f0.dtype)  # (B, 1, N)
        noise.mul_(uv * cfg.nsf_sigma + (1 - uv) * cfg.nsf_alpha / 3)
        sine = sine.mul_(uv).add_(noise)  # (B, H, N)
        return torch.tanh(self.l_linear(sine.transpose(1, 2))).transpose(1, 2)  # (B, 1, N)


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
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """mel (B, 80, T) -> (speech (B, 480 T), source (B, 1, 480 T)).

        `cache_source` (B, 1, S) overwrites the first S samples of the excitation before decoding.
        `generators`: one per batch row, or a single one for all rows (drawn row after row); None draws
        from the global RNG.
        """
        if mel.dim() != 3 or mel.shape[1] != self.cfg.in_channels:
            raise ValueError(f"HiFT: expected mel (B, {self.cfg.in_channels}, T), got {tuple(mel.shape)}")
        B, _, T = mel.shape
        if generators is None or isinstance(generators, torch.Generator):
            generators = [generators] * B
        if len(generators) != B:
            raise ValueError(f"HiFT: expected {B} generators (one per row), got {len(generators)}")
        mel = mel.to(self.conv_pre.weight.dtype)
        f0 = self.f0_predictor(mel)  # (B, T)
        f0 = f0.repeat_interleave(self.cfg.samples_per_frame, dim=1)  # nearest up-sampling, (B, 480 T)
        source = self.m_source(f0, generators)  # (B, 1, 480 T)
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


def random_hift(cfg: HiFTConfig | None = None, seed: int = 0) -> HiFT:
    """A random HiFT in memory (default `HiFTConfig.tiny()`): seeded PyTorch default init, an f0 head giving a
    voiced/unvoiced mix (|f0| spread around 80 Hz, some frames under the 10 Hz threshold), Snake alphas in
    [0.5, 1.5]. Used by `write_tiny_hift` and, at the official shapes, by the vocoder benchmark."""
    cfg = cfg or HiFTConfig.tiny()
    gen = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = HiFT(cfg)
    with torch.no_grad():
        model.f0_predictor.classifier.bias.fill_(80.0)
        model.f0_predictor.classifier.weight.normal_(0.0, 300.0 / math.sqrt(cfg.f0_cond_channels), generator=gen)
        for act in (m for m in model.modules() if isinstance(m, Snake)):
            act.alpha.uniform_(0.5, 1.5, generator=gen)
    return model.eval()


def write_tiny_hift(
    path: str | Path,
    cfg: HiFTConfig | None = None,
    seed: int = 0,
    *,
    spelling: str = "weight_g",
    prefix: str = "",
) -> Path:
    """Write `random_hift(cfg, seed)` as a state dict in the official layout: every conv but `source_downs`
    stored weight-normed as (g, v) with random g. Same seed, same bytes. `spelling` is "weight_g"
    (old-style) or "parametrizations"; `prefix` is prepended to every key (e.g. "generator.")."""
    if spelling not in WEIGHT_NORM_SPELLINGS:
        raise ValueError(f"write_tiny_hift: expected spelling in {sorted(WEIGHT_NORM_SPELLINGS)}, "
                         f"got {spelling!r}")
    model = random_hift(cfg, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    g_suffix, v_suffix = WEIGHT_NORM_SPELLINGS[spelling]
    normed = {name for name, mod in model.named_modules()
              if isinstance(mod, (nn.Conv1d, nn.ConvTranspose1d)) and not name.startswith("source_downs.")}
    out: dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        base, _, leaf = key.rpartition(".")
        if leaf == "weight" and base in normed:
            out[f"{prefix}{base}.{g_suffix}"] = torch.rand(value.shape[:1] + (1,) * (value.dim() - 1),
                                                           generator=gen) + 0.5
            out[f"{prefix}{base}.{v_suffix}"] = value.clone()
        else:
            out[prefix + key] = value.clone()
    buffer = io.BytesIO()  # saving to memory keeps the archive name, hence the bytes, independent of `path`
    torch.save(out, buffer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path
