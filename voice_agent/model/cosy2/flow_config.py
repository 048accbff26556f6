"""Hyper-parameters of the CosyVoice2 causal flow (units -> 80-bin mel) as LLaMA-Omni2 runs it.

`FlowConfig` holds every number the flow needs. The defaults are the official values (CosyVoice2
`cosyvoice.yaml`, confirmed by the `flow.pt` weight shapes); `FlowConfig.from_yaml` reads the numbers from
the `flow:` section of a parsed `cosyvoice.yaml` (plain nested dicts, `!new:` tags dropped, `!ref`
resolved) and `yaml_section` writes that section back.

Numbers that are not in the yaml, and where they come from:

- chunk sizes: LLaMA-Omni2 overrides the yaml and sets the encoder chunk to `2 * input_frame_rate` = 50
  units and the estimator chunk to `50 * token_mel_ratio` = 100 mel frames, with unlimited left context.
  `from_yaml` derives them the same way and ignores the yaml's `static_chunk_size`,
  `num_decoding_left_chunks` and `use_dynamic_chunk` (dynamic chunks are a training option).
- `encoder_num_up_blocks` (4) is hard-coded in the reference encoder; `yaml_section` writes a
  `num_up_blocks` field only when a (tiny) config differs from 4, and `from_yaml` reads it if present.
- `n_timesteps` (10) and `noise_frames` (15000 = 300 s) are hard-coded in the reference.
- the reference hard-codes 512 channels for the look-ahead and upsampling layers; here they follow
  `encoder_output_size`, which is the same thing for the official model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

from voice_agent.audio import MEL_FRAME_RATE_HZ, MEL_FRAMES_PER_UNIT, UNIT_RATE_HZ

N_MELS = 80  # mel bins the flow writes and HiFT reads
NOISE_SECONDS = 300  # the reference's fixed CFM noise buffer covers 300 s
NOISE_FRAMES = NOISE_SECONDS * MEL_FRAME_RATE_HZ  # 15000 frames
CHUNK_SECONDS = 2  # LLaMA-Omni2: encoder chunk = 2 s of units, estimator chunk = 2 s of mel
OFFICIAL_UP_BLOCKS = 4  # conformer layers after upsampling, hard-coded in the reference encoder


@dataclass(frozen=True)
class FlowConfig:
    """Every hyper-parameter of the flow. Defaults are the official CosyVoice2 values."""

    vocab_size: int = 6561  # speech-unit vocabulary
    input_size: int = 512  # unit embedding width (= encoder input)
    output_size: int = N_MELS  # mel bins
    spk_embed_dim: int = 192  # CAM++ speaker vector
    input_frame_rate: int = UNIT_RATE_HZ  # units per second
    token_mel_ratio: int = MEL_FRAMES_PER_UNIT  # mel frames per unit (= encoder upsampling stride)
    pre_lookahead_len: int = 3  # units of look-ahead in the encoder's first conv
    # Upsample-conformer encoder.
    encoder_output_size: int = 512
    encoder_attention_heads: int = 8
    encoder_linear_units: int = 2048
    encoder_num_blocks: int = 6
    encoder_num_up_blocks: int = OFFICIAL_UP_BLOCKS
    encoder_chunk_tokens: int = CHUNK_SECONDS * UNIT_RATE_HZ  # 50 units; 0 = full context
    # Causal U-Net estimator of the CFM.
    estimator_in_channels: int = 4 * N_MELS  # x, mu, speaker, cond
    estimator_out_channels: int = N_MELS
    estimator_channels: int = 256
    estimator_attention_head_dim: int = 64
    estimator_num_heads: int = 8
    estimator_n_blocks: int = 4  # transformer blocks per stage
    estimator_num_mid_blocks: int = 12
    decoder_chunk_frames: int = CHUNK_SECONDS * MEL_FRAME_RATE_HZ  # 100 mel frames; 0 = full context
    # Conditional flow matching solver.
    n_timesteps: int = 10  # Euler steps
    t_scheduler: str = "cosine"  # t_k = 1 - cos(k/n * pi/2); "linear" is t_k = k/n
    inference_cfg_rate: float = 0.7  # v = (1 + r) v_cond - r v_uncond
    noise_frames: int = NOISE_FRAMES  # longest single flow call, in mel frames

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if f.type == "int":
                if not isinstance(value, int) or isinstance(value, bool):
                    raise ValueError(f"FlowConfig.{f.name}: expected an integer, got {value!r}")
                minimum = (
                    0
                    if f.name
                    in (
                        "encoder_chunk_tokens",
                        "decoder_chunk_frames",
                        "pre_lookahead_len",
                        "estimator_num_mid_blocks",
                    )
                    else 1
                )
                if value < minimum:
                    raise ValueError(f"FlowConfig.{f.name}: expected >= {minimum}, got {value}")
        if self.encoder_output_size % self.encoder_attention_heads:
            raise ValueError(
                f"FlowConfig: encoder_output_size {self.encoder_output_size} is not a multiple of "
                f"encoder_attention_heads {self.encoder_attention_heads}"
            )
        if (self.encoder_output_size // self.encoder_attention_heads) % 2:
            raise ValueError("FlowConfig: encoder head dim must be even (sinusoidal relative positions)")
        if self.input_size != self.encoder_output_size:
            raise ValueError(
                f"FlowConfig: input_size {self.input_size} must equal encoder_output_size "
                f"{self.encoder_output_size} (the reference upsampling embed reads input_size channels)"
            )
        if self.estimator_in_channels != 4 * self.output_size:
            raise ValueError(
                f"FlowConfig: estimator_in_channels expected 4 * output_size = {4 * self.output_size} "
                f"(x, mu, speaker, cond), got {self.estimator_in_channels}"
            )
        if self.estimator_out_channels != self.output_size:
            raise ValueError(
                f"FlowConfig: estimator_out_channels expected output_size {self.output_size}, "
                f"got {self.estimator_out_channels}"
            )
        if self.estimator_in_channels % 2:
            raise ValueError("FlowConfig: estimator_in_channels must be even (sinusoidal time embedding)")
        if self.t_scheduler not in ("cosine", "linear"):
            raise ValueError(f"FlowConfig.t_scheduler: expected 'cosine' or 'linear', got {self.t_scheduler!r}")
        if not isinstance(self.inference_cfg_rate, (int, float)) or self.inference_cfg_rate < 0:
            raise ValueError(f"FlowConfig.inference_cfg_rate: expected a number >= 0, got {self.inference_cfg_rate!r}")

    @property
    def lookahead_frames(self) -> int:
        """Mel frames dropped at the end of a non-final call (3 units * 2 = 6)."""
        return self.pre_lookahead_len * self.token_mel_ratio

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.estimator_channels

    @classmethod
    def tiny(cls) -> FlowConfig:
        """Small dims for tests; rates, chunk sizes, mel bins, vocabulary and solver stay official."""
        return cls(
            input_size=64,
            encoder_output_size=64,
            encoder_attention_heads=2,
            encoder_linear_units=128,
            encoder_num_blocks=2,
            encoder_num_up_blocks=2,
            estimator_channels=64,
            estimator_attention_head_dim=32,
            estimator_num_heads=2,
            estimator_n_blocks=1,
            estimator_num_mid_blocks=1,
        )

    def with_chunks(self, encoder_chunk_tokens: int, decoder_chunk_frames: int) -> FlowConfig:
        """A copy with other chunk sizes (they change numbers, not weights)."""
        return replace(self, encoder_chunk_tokens=encoder_chunk_tokens, decoder_chunk_frames=decoder_chunk_frames)

    # ---- cosyvoice.yaml ---------------------------------------------------------------------------

    @classmethod
    def from_yaml(cls, section: Mapping[str, Any]) -> FlowConfig:
        """Read the `flow:` section of a parsed cosyvoice.yaml; absent fields keep the official default."""
        if not isinstance(section, Mapping):
            raise ValueError(f"flow: expected a mapping, got {type(section).__name__}")
        d = cls()
        enc = _sub(section, "encoder", "flow")
        dec = _sub(section, "decoder", "flow")
        est = _sub(dec, "estimator", "flow.decoder")
        cfm = _sub(dec, "cfm_params", "flow.decoder")
        if "content" in cfm:  # `!new:omegaconf.DictConfig` with a `content:` mapping
            cfm = _sub(cfm, "content", "flow.decoder.cfm_params")
        channels = est.get("channels", [d.estimator_channels])
        if not isinstance(channels, (list, tuple)) or len(channels) != 1:
            raise ValueError(
                f"flow.decoder.estimator.channels: expected a one-element list (one U-Net level), got {channels!r}"
            )
        channel = _num(channels[0], int, "flow.decoder.estimator.channels[0]")
        solver = cfm.get("solver", "euler")
        if solver != "euler":
            raise ValueError(f"flow.decoder.cfm_params.solver: expected 'euler', got {solver!r}")
        frame_rate = _int(section, "input_frame_rate", d.input_frame_rate, "flow")
        ratio = _int(section, "token_mel_ratio", d.token_mel_ratio, "flow")
        output_size = _int(section, "output_size", d.output_size, "flow")
        spk_emb_dim = _int(dec, "spk_emb_dim", output_size, "flow.decoder")
        if spk_emb_dim != output_size:
            raise ValueError(f"flow.decoder.spk_emb_dim: expected output_size {output_size}, got {spk_emb_dim}")
        return cls(
            vocab_size=_int(section, "vocab_size", d.vocab_size, "flow"),
            input_size=_int(section, "input_size", d.input_size, "flow"),
            output_size=output_size,
            spk_embed_dim=_int(section, "spk_embed_dim", d.spk_embed_dim, "flow"),
            input_frame_rate=frame_rate,
            token_mel_ratio=ratio,
            pre_lookahead_len=_int(section, "pre_lookahead_len", d.pre_lookahead_len, "flow"),
            encoder_output_size=_int(enc, "output_size", d.encoder_output_size, "flow.encoder"),
            encoder_attention_heads=_int(enc, "attention_heads", d.encoder_attention_heads, "flow.encoder"),
            encoder_linear_units=_int(enc, "linear_units", d.encoder_linear_units, "flow.encoder"),
            encoder_num_blocks=_int(enc, "num_blocks", d.encoder_num_blocks, "flow.encoder"),
            encoder_num_up_blocks=_int(enc, "num_up_blocks", d.encoder_num_up_blocks, "flow.encoder"),
            encoder_chunk_tokens=CHUNK_SECONDS * frame_rate,
            estimator_in_channels=_int(est, "in_channels", d.estimator_in_channels, "flow.decoder.estimator"),
            estimator_out_channels=_int(est, "out_channels", d.estimator_out_channels, "flow.decoder.estimator"),
            estimator_channels=channel,
            estimator_attention_head_dim=_int(
                est, "attention_head_dim", d.estimator_attention_head_dim, "flow.decoder.estimator"
            ),
            estimator_num_heads=_int(est, "num_heads", d.estimator_num_heads, "flow.decoder.estimator"),
            estimator_n_blocks=_int(est, "n_blocks", d.estimator_n_blocks, "flow.decoder.estimator"),
            estimator_num_mid_blocks=_int(est, "num_mid_blocks", d.estimator_num_mid_blocks, "flow.decoder.estimator"),
            decoder_chunk_frames=CHUNK_SECONDS * frame_rate * ratio,
            t_scheduler=str(cfm.get("t_scheduler", d.t_scheduler)),
            inference_cfg_rate=_num(
                cfm.get("inference_cfg_rate", d.inference_cfg_rate),
                float,
                "flow.decoder.cfm_params.inference_cfg_rate",
            ),
        )

    def yaml_section(self) -> dict[str, Any]:
        """The `flow:` section (plain nested dicts, official field names) that `from_yaml` reads back.

        Chunk sizes are not written (they are derived from `input_frame_rate`), so a config whose chunks
        differ from `2 * input_frame_rate` does not round-trip.
        """
        encoder: dict[str, Any] = {
            "output_size": self.encoder_output_size,
            "attention_heads": self.encoder_attention_heads,
            "linear_units": self.encoder_linear_units,
            "num_blocks": self.encoder_num_blocks,
            "dropout_rate": 0.1,
            "positional_dropout_rate": 0.1,
            "attention_dropout_rate": 0.1,
            "normalize_before": True,
            "input_layer": "linear",
            "pos_enc_layer_type": "rel_pos_espnet",
            "selfattention_layer_type": "rel_selfattn",
            "input_size": self.input_size,
            "use_cnn_module": False,
            "macaron_style": False,
        }
        if self.encoder_num_up_blocks != OFFICIAL_UP_BLOCKS:
            encoder["num_up_blocks"] = self.encoder_num_up_blocks
        return {
            "input_size": self.input_size,
            "output_size": self.output_size,
            "spk_embed_dim": self.spk_embed_dim,
            "output_type": "mel",
            "vocab_size": self.vocab_size,
            "input_frame_rate": self.input_frame_rate,
            "only_mask_loss": True,
            "token_mel_ratio": self.token_mel_ratio,
            "pre_lookahead_len": self.pre_lookahead_len,
            "encoder": encoder,
            "decoder": {
                "in_channels": 3 * self.output_size,
                "n_spks": 1,
                "spk_emb_dim": self.output_size,
                "cfm_params": {
                    "content": {
                        "sigma_min": 1e-06,
                        "solver": "euler",
                        "t_scheduler": self.t_scheduler,
                        "training_cfg_rate": 0.2,
                        "inference_cfg_rate": self.inference_cfg_rate,
                        "reg_loss_type": "l1",
                    }
                },
                "estimator": {
                    "in_channels": self.estimator_in_channels,
                    "out_channels": self.estimator_out_channels,
                    "causal": True,
                    "channels": [self.estimator_channels],
                    "dropout": 0.0,
                    "attention_head_dim": self.estimator_attention_head_dim,
                    "n_blocks": self.estimator_n_blocks,
                    "num_mid_blocks": self.estimator_num_mid_blocks,
                    "num_heads": self.estimator_num_heads,
                    "act_fn": "gelu",
                },
            },
        }

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _sub(d: Mapping[str, Any], key: str, where: str) -> Mapping[str, Any]:
    value = d.get(key, {})
    if not isinstance(value, Mapping):
        raise ValueError(f"{where}.{key}: expected a mapping, got {value!r}")
    return value


def _num(value: Any, kind: type, where: str) -> Any:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{where}: expected a number, got {value!r}")
    if kind is int and value != int(value):
        raise ValueError(f"{where}: expected an integer, got {value!r}")
    return kind(value)


def _int(d: Mapping[str, Any], key: str, default: int, where: str) -> int:
    return _num(d[key], int, f"{where}.{key}") if key in d else default
