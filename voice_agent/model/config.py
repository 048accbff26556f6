"""Model dimensions read from a LLaMA-Omni2 checkpoint's `config.json`.

Sizes travel inside the checkpoint; nothing here is a second copy of them. The field names are those of
the official files (a Qwen2 config at the top level for the LLM, and a `speech_generator` dict for the
TTS LM), and every variant (0.5B ... 32B, Bilingual) and the tiny test model load through this one path.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voice_agent.errors import CheckpointError
from voice_agent.model.weights import read_json

CONFIG_FILE = "config.json"
GENERATION_CONFIG_FILE = "generation_config.json"


def _get(d: dict[str, Any], key: str, kind: type, where: str, default: Any = ...) -> Any:
    if key not in d:
        if default is ...:
            raise CheckpointError(f"{where}: missing field {key!r} (expected {kind.__name__})")
        return default
    value = d[key]
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise CheckpointError(f"{where}: field {key!r} expected {kind.__name__}, got {value!r}")
    return value


@dataclass(frozen=True)
class Qwen2Dims:
    """The shape of a Qwen2 decoder (the LLM, or the TTS LM)."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1e6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def __post_init__(self) -> None:
        if self.hidden_size % self.num_heads:
            raise CheckpointError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_heads}"
            )
        if self.num_heads % self.num_kv_heads:
            raise CheckpointError(
                f"num_attention_heads {self.num_heads} is not a multiple of num_key_value_heads {self.num_kv_heads}"
            )

    @classmethod
    def from_hf(cls, d: dict[str, Any], where: str) -> Qwen2Dims:
        heads = _get(d, "num_attention_heads", int, where)
        rope = d.get("rope_parameters")  # transformers >= 5 writes rope_theta inside rope_parameters
        if "rope_theta" not in d and isinstance(rope, dict) and "rope_theta" in rope:
            d = {**d, "rope_theta": rope["rope_theta"]}
        return cls(
            hidden_size=_get(d, "hidden_size", int, where),
            num_layers=_get(d, "num_hidden_layers", int, where),
            num_heads=heads,
            num_kv_heads=_get(d, "num_key_value_heads", int, where, heads),
            intermediate_size=_get(d, "intermediate_size", int, where),
            vocab_size=_get(d, "vocab_size", int, where),
            rms_norm_eps=_get(d, "rms_norm_eps", float, where, 1e-6),
            rope_theta=_get(d, "rope_theta", float, where, 1e6),
            tie_word_embeddings=_get(d, "tie_word_embeddings", bool, where, False),
            max_position_embeddings=_get(d, "max_position_embeddings", int, where, 32768),
        )

    def to_hf(self) -> dict[str, Any]:
        """The Qwen2 config fields, as written in an official config.json."""
        return {
            "hidden_size": self.hidden_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "intermediate_size": self.intermediate_size,
            "vocab_size": self.vocab_size,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": self.tie_word_embeddings,
            "max_position_embeddings": self.max_position_embeddings,
            "hidden_act": "silu",
        }


def parse_stream_params(value: Any, where: str) -> tuple[int, int]:
    """Parse `stream_params` ("(3,10)" in the official files; a list is accepted too) without eval."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        read, write = value
    elif isinstance(value, str) and (m := re.fullmatch(r"\s*[\(\[]\s*(\d+)\s*,\s*(\d+)\s*[\)\]]\s*", value)):
        read, write = int(m.group(1)), int(m.group(2))
    else:
        raise CheckpointError(f"{where}: field 'stream_params' expected \"(R,W)\" with two integers, got {value!r}")
    if read < 1 or write < 1:
        raise CheckpointError(f"{where}: field 'stream_params' expected positive integers, got {value!r}")
    return read, write


@dataclass(frozen=True)
class OmniConfig:
    """What a LLaMA-Omni2 `config.json` says about the model's shape."""

    llm: Qwen2Dims
    tts: Qwen2Dims
    speech_encoder_hidden_size: int
    speech_encoder_ds_rate: int
    unit_vocab_size: int
    read_tokens: int  # R: text tokens read per TTS call
    write_units: int  # W: units written per TTS call
    tokenizer_model_max_length: int
    speech_encoder_type: str = "whisper"
    speech_projector_type: str = "linear"
    speech_encoder: str | None = None  # the openai-whisper .pt path the reference builds the encoder from
    eos_token_id: int | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any], where: str = CONFIG_FILE) -> OmniConfig:
        gen = _get(d, "speech_generator", dict, where)
        read, write = parse_stream_params(d.get("stream_params", "(3,10)"), where)
        encoder_type = _get(d, "speech_encoder_type", str, where, "whisper")
        if "whisper" not in encoder_type.lower():
            raise CheckpointError(
                f"{where}: field 'speech_encoder_type' expected a whisper encoder, got {encoder_type!r}"
            )
        projector = _get(d, "speech_projector_type", str, where, "linear")
        if projector != "linear":
            raise CheckpointError(f"{where}: field 'speech_projector_type' expected 'linear', got {projector!r}")
        eos = d.get("eos_token_id")
        return cls(
            llm=Qwen2Dims.from_hf(d, where),
            tts=Qwen2Dims.from_hf(gen, f"{where} (speech_generator)"),
            speech_encoder_hidden_size=_get(d, "speech_encoder_hidden_size", int, where),
            speech_encoder_ds_rate=_get(d, "speech_encoder_ds_rate", int, where, 5),
            unit_vocab_size=_get(d, "unit_vocab_size", int, where),
            read_tokens=read,
            write_units=write,
            tokenizer_model_max_length=_get(d, "tokenizer_model_max_length", int, where, 4096),
            speech_encoder_type=encoder_type,
            speech_projector_type=projector,
            speech_encoder=d.get("speech_encoder") if isinstance(d.get("speech_encoder"), str) else None,
            eos_token_id=eos if isinstance(eos, int) else None,
            raw=d,
        )

    @classmethod
    def load(cls, model_dir: str | Path) -> OmniConfig:
        path = Path(model_dir) / CONFIG_FILE
        return cls.from_dict(read_json(path, "a LLaMA-Omni2 model config"), str(path))


def load_generation_config(model_dir: str | Path) -> dict[str, Any] | None:
    """The model's `generation_config.json` as a dict, or None when the file is absent."""
    path = Path(model_dir) / GENERATION_CONFIG_FILE
    if not path.exists():
        return None
    return read_json(path, "a transformers generation config")
