"""Hyper-parameters of the HiFT vocoder (CosyVoice2 `HiFTGenerator`), read from and written to the `hift:`
section of cosyvoice.yaml.

Rates come from `voice_agent.audio` (24 kHz out, 50 mel frames per second); `HiFTConfig` checks that its
up-sampling (prod(upsample_rates) * istft hop) gives the 480 samples per mel frame they imply.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from voice_agent.audio import MEL_FRAME_RATE_HZ, OUTPUT_SAMPLE_RATE


@dataclass(frozen=True)
class HiFTConfig:
    """HiFTGenerator hyper-parameters; defaults are the official CosyVoice2 ones."""

    in_channels: int = 80
    base_channels: int = 512
    nb_harmonics: int = 8
    sampling_rate: int = OUTPUT_SAMPLE_RATE
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
