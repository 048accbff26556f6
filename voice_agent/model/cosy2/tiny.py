"""Random-weight CosyVoice2 decoder files for tests and benchmarks, in the official layouts.

`write_tiny_cosy2_decoder(DIR, seed)` writes a tiny `cosy2_decoder` directory (flow.pt, hift.pt,
cosyvoice.yaml, voices/) that `Cosy2Decoder.load` reads with the same code as the official files; it is
the decoder part of `voice_agent.model.tiny.make_tiny`. The pieces: `write_tiny_flow` (a flow state dict,
`random_flow_state`), `write_tiny_hift` (`random_hift` stored weight-normed, either spelling),
`write_tiny_voices` (random default voices). Same seed, same bytes, whatever the path.

Values: the flow gets LeCun-normal matrices, unit LayerNorms and an output bias at log-mel level
(`TINY_MEL_LEVEL`), so its mel looks like a log-mel; the HiFT keeps PyTorch's seeded default init with an f0
head that gives a voiced / unvoiced mix. `random_hift` also builds the official-shape HiFT of the benchmarks.
`quiet=True` (the server's demo model) makes the HiFT's output soft, low-passed noise far below full scale
(`quiet_hift_state`); without it nothing changes.
"""

from __future__ import annotations

import io
import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
from torch import nn

from voice_agent.model.cosy2.decoder import FLOW_FILE, HIFT_FILE, YAML_FILE, cosyvoice_yaml_text
from voice_agent.model.cosy2.flow import Flow
from voice_agent.model.cosy2.flow_config import FlowConfig
from voice_agent.model.cosy2.flow_encoder import RelPositionMultiHeadedAttention
from voice_agent.model.cosy2.hift import WEIGHT_NORM_SPELLINGS, HiFT, Snake
from voice_agent.model.cosy2.hift_config import HiFTConfig
from voice_agent.model.cosy2.voice import EMBEDDING_DIM, PROMPT_WAVS, VOICES_DIR

TINY_MEL_LEVEL = -6.0  # tiny random flow: final_proj bias, so mel ~ noise + level (log-mel range)
# The demo's quiet HiFT (`quiet_hift_state`): conv_post's log-magnitude channels get this gain on g and a
# bias falling from QUIET_LOG_MAGNITUDE by QUIET_LOG_MAGNITUDE_SLOPE per STFT bin (1.5 kHz at n_fft 16).
QUIET_GAIN = 0.02
QUIET_LOG_MAGNITUDE = -1.0
QUIET_LOG_MAGNITUDE_SLOPE = 1.0


def _save(state: dict[str, torch.Tensor], path: str | Path) -> Path:
    """torch.save through memory: the archive name, hence the bytes, do not depend on `path`."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(buffer.getvalue())
    return path


def random_flow_state(cfg: FlowConfig, seed: int) -> OrderedDict[str, torch.Tensor]:
    """Random weights of sensible size: LeCun-normal matrices, unit LayerNorms, output at log-mel level."""
    g = torch.Generator().manual_seed(seed)

    def normal(shape: torch.Size, std: float, mean: float = 0.0) -> torch.Tensor:
        return torch.randn(shape, generator=g) * std + mean

    with torch.device("meta"):
        flow = Flow(cfg)
    state: OrderedDict[str, torch.Tensor] = OrderedDict()
    for prefix, module in flow.named_modules():
        for name, p in module.named_parameters(recurse=False):
            key = f"{prefix}.{name}" if prefix else name
            if isinstance(module, nn.LayerNorm):
                value = normal(p.shape, 0.05, 1.0 if name == "weight" else 0.0)
            elif isinstance(module, nn.Embedding):
                value = normal(p.shape, 1.0)
            elif isinstance(module, RelPositionMultiHeadedAttention):  # pos_bias_u / pos_bias_v
                value = normal(p.shape, 0.1)
            elif name == "bias":
                value = (
                    normal(p.shape, 0.5, TINY_MEL_LEVEL)
                    if key == "decoder.estimator.final_proj.bias"
                    else normal(p.shape, 0.02)
                )
            else:
                fan_in = p[0].numel()
                gain = 0.3 if key == "decoder.estimator.final_proj.weight" else 1.0
                value = normal(p.shape, gain / fan_in**0.5)
            state[key] = value.float()
    expected = set(flow.state_dict())
    if set(state) != expected:
        raise AssertionError(f"tiny flow init missed keys: {sorted(expected ^ set(state))}")
    return state


def write_tiny_flow(path: str | Path, cfg: FlowConfig | None = None, seed: int = 0) -> FlowConfig:
    """Write a random-weight `flow.pt` for `cfg` (default `FlowConfig.tiny()`); same seed -> same bytes."""
    if cfg is not None and not isinstance(cfg, FlowConfig):
        raise TypeError(f"write_tiny_flow: cfg expected a FlowConfig or None, got {type(cfg).__name__}")
    cfg = cfg if cfg is not None else FlowConfig.tiny()
    _save(random_flow_state(cfg, seed), path)
    return cfg


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
    quiet: bool = False,
) -> Path:
    """Write `random_hift(cfg, seed)` as a state dict in the official layout: every conv but `source_downs`
    stored weight-normed as (g, v) with random g. Same seed, same bytes. `spelling` is "weight_g"
    (old-style) or "parametrizations"; `prefix` is prepended to every key (e.g. "generator."); `quiet`
    applies `quiet_hift_state`."""
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
    if quiet:
        quiet_hift_state(out, model.cfg, g_suffix, prefix)
    return _save(out, path)


def quiet_hift_state(state: dict[str, torch.Tensor], cfg: HiFTConfig, g_suffix: str, prefix: str = "") -> None:
    """Quiet a stored random HiFT in place: conv_post's log-magnitude outputs (its first n_fft / 2 + 1
    channels) become nearly constant, QUIET_LOG_MAGNITUDE at the lowest bin and falling with frequency,
    while its phase outputs stay random. The iSTFT then gives soft low-passed noise, whatever the mel."""
    bins = cfg.istft_n_fft // 2 + 1
    state[f"{prefix}conv_post.{g_suffix}"][:bins] *= QUIET_GAIN
    state[f"{prefix}conv_post.bias"][:bins] = QUIET_LOG_MAGNITUDE - QUIET_LOG_MAGNITUDE_SLOPE * torch.arange(bins)


def write_tiny_voices(decoder_dir: str | Path, seed: int = 0) -> list[Path]:
    """Save random default voices (`voices/en.npy`, `voices/zh.npy`, float32 [192]) for the tiny set."""
    rng = np.random.default_rng(seed)
    out = []
    for name in sorted(PROMPT_WAVS):
        path = Path(decoder_dir) / VOICES_DIR / f"{name}.npy"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.save(path, rng.standard_normal(EMBEDDING_DIM).astype(np.float32))
        out.append(path)
    return out


def write_tiny_cosy2_decoder(directory: str | Path, seed: int = 0, *, quiet: bool = False) -> Path:
    """Write a tiny decoder directory: flow.pt, hift.pt, cosyvoice.yaml and default voices.

    Same seed, same bytes. `quiet`: the demo model's quiet HiFT (`quiet_hift_state`)."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    flow_cfg, hift_cfg = FlowConfig.tiny(), HiFTConfig.tiny()
    write_tiny_flow(d / FLOW_FILE, flow_cfg, seed)
    write_tiny_hift(d / HIFT_FILE, hift_cfg, seed, quiet=quiet)
    (d / YAML_FILE).write_text(cosyvoice_yaml_text(flow_cfg, hift_cfg), encoding="utf-8")
    write_tiny_voices(d, seed)
    return d
