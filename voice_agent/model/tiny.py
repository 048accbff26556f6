"""Write a tiny random-weight LLaMA-Omni2 checkpoint set in the official on-disk layout.

`make_tiny(DIR, seed)` (CLI: `voice-agent make-tiny DIR [--seed N]`) writes

    DIR/LLaMA-Omni2-tiny/      config.json, model.safetensors (or shards + model.safetensors.index.json),
                               [generation_config.json], vocab.json, merges.txt, tokenizer_config.json,
                               added_tokens.json, special_tokens_map.json, tts_tokenizer/ (same file kinds)
    DIR/speech_encoder/large-v3.pt   openai-whisper format {"dims": ..., "model_state_dict": ...}
    DIR/cosy2_decoder/         flow.pt, hift.pt, cosyvoice.yaml, voices/ (voice_agent.model.cosy2.tiny)

so tests run the same loading code as the official files. Every key of the official state dict is present
at tiny shapes (`omni_shapes`, the one key/shape table, derived from the dims). Values: N(0, 0.02) for
matrices and biases, ones for norm gains, the real Whisper sinusoids for the encoder positional embedding.
Each tensor is drawn from a generator seeded by (seed, key), so a tensor does not depend on which other
keys are written (tied/untied, sharded or not give identical shared tensors); the same seed gives the same
bytes. Weights are float32 by default (exact comparisons in tests); `dtype=torch.bfloat16` mirrors the
official files. The encoder tensors of the Whisper .pt are the `model.speech_encoder.*` tensors, unchanged; its text
decoder (float16, as the official file's) has large-v3's vocabulary and text context at tiny width, so
openai-whisper's decoding runs on it (and transcribes random text).

The tokenizers are byte-level BPE in the Qwen2 style, written by `tiny_tokenizer`; the LLM vocab_size is
padded above the tokenizer length as Qwen pads its embedding table. The decoder directory is written by
`cosy2.tiny`.
"""

from __future__ import annotations

import argparse
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from voice_agent.model.config import Qwen2Dims
from voice_agent.model.cosy2.tiny import write_tiny_cosy2_decoder
from voice_agent.model.tiny_demo import shape_demo_llm, shape_demo_tts, shape_demo_whisper_decoder
from voice_agent.model.tiny_tokenizer import (
    ENDOFTEXT,
    IM_END,
    UNIT_VOCAB_SIZE,
    TinyVocab,
    write_json,
    write_tokenizer,
)

# Shapes of the tiny model (architecture.md §1.3-1.7 give the real ones).
WHISPER_HEAD_DIM = 64  # every Whisper model; n_head = n_state // 64
LLM_SHAPE = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128)
TTS_SHAPE = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64)
WHISPER_N_AUDIO_STATE = 128
WHISPER_N_VOCAB = 51866  # large-v3's text vocabulary
WHISPER_N_TEXT_CTX = 448  # large-v3's text positions
WHISPER_DIMS = {  # openai-whisper ModelDimensions; n_audio_ctx 1500 = 30 s at 50 Hz, as real
    "n_mels": 128, "n_audio_ctx": 1500, "n_audio_state": WHISPER_N_AUDIO_STATE,
    "n_audio_head": WHISPER_N_AUDIO_STATE // WHISPER_HEAD_DIM, "n_audio_layer": 2,
    # the text decoder transcribes (model/transcribe.py): openai-whisper's tokenizer and decoding need
    # large-v3's real vocabulary (51866 = 51765 + 1 + 100 languages) and text context; widths stay tiny
    # (cross-attention reads the encoder output, so n_text_state is n_audio_state, as in every Whisper)
    "n_vocab": WHISPER_N_VOCAB, "n_text_ctx": WHISPER_N_TEXT_CTX, "n_text_state": WHISPER_N_AUDIO_STATE,
    "n_text_head": WHISPER_N_AUDIO_STATE // WHISPER_HEAD_DIM, "n_text_layer": 1,
}
PROJECTOR_HIDDEN = 128  # linear1 output (2048 in the real files)
DS_RATE = 5  # adapter frame stacking k
LLM_VOCAB_MULTIPLE = 64  # LLM embedding rows are padded up to a multiple of this
INIT_STD = 0.02

MODEL_DIR = "LLaMA-Omni2-tiny"
TTS_TOKENIZER_DIR = "tts_tokenizer"
ENCODER_DIR = "speech_encoder"
ENCODER_FILE = "large-v3.pt"
COSY2_DIR = "cosy2_decoder"
SPEECH_ENCODER_FIELD = "models/speech_encoder/large-v3.pt"  # as written in the official config.json

def qwen2_shapes(prefix: str, d: Qwen2Dims) -> dict[str, tuple[int, ...]]:
    """Keys of a transformers Qwen2Model state dict under `prefix`."""
    H, I, kv = d.hidden_size, d.intermediate_size, d.kv_dim  # noqa: E741
    shapes: dict[str, tuple[int, ...]] = {f"{prefix}embed_tokens.weight": (d.vocab_size, H)}
    for i in range(d.num_layers):
        p = f"{prefix}layers.{i}."
        shapes |= {
            f"{p}self_attn.q_proj.weight": (H, H), f"{p}self_attn.q_proj.bias": (H,),
            f"{p}self_attn.k_proj.weight": (kv, H), f"{p}self_attn.k_proj.bias": (kv,),
            f"{p}self_attn.v_proj.weight": (kv, H), f"{p}self_attn.v_proj.bias": (kv,),
            f"{p}self_attn.o_proj.weight": (H, H),
            f"{p}mlp.gate_proj.weight": (I, H), f"{p}mlp.up_proj.weight": (I, H),
            f"{p}mlp.down_proj.weight": (H, I),
            f"{p}input_layernorm.weight": (H,), f"{p}post_attention_layernorm.weight": (H,),
        }
    shapes[f"{prefix}norm.weight"] = (H,)
    return shapes


def _whisper_block(p: str, n: int, cross: bool) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    for attn in ("attn", "cross_attn") if cross else ("attn",):
        shapes |= {
            f"{p}{attn}.query.weight": (n, n), f"{p}{attn}.query.bias": (n,), f"{p}{attn}.key.weight": (n, n),
            f"{p}{attn}.value.weight": (n, n), f"{p}{attn}.value.bias": (n,),
            f"{p}{attn}.out.weight": (n, n), f"{p}{attn}.out.bias": (n,),
            f"{p}{attn}_ln.weight": (n,), f"{p}{attn}_ln.bias": (n,),
        }
    return shapes | {
        f"{p}mlp.0.weight": (4 * n, n), f"{p}mlp.0.bias": (4 * n,), f"{p}mlp.2.weight": (n, 4 * n),
        f"{p}mlp.2.bias": (n,), f"{p}mlp_ln.weight": (n,), f"{p}mlp_ln.bias": (n,),
    }


def whisper_encoder_shapes(prefix: str, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Keys of openai-whisper's AudioEncoder under `prefix`."""
    n = dims["n_audio_state"]
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}conv1.weight": (n, dims["n_mels"], 3), f"{prefix}conv1.bias": (n,),
        f"{prefix}conv2.weight": (n, n, 3), f"{prefix}conv2.bias": (n,),
        f"{prefix}positional_embedding": (dims["n_audio_ctx"], n),
    }
    for i in range(dims["n_audio_layer"]):
        shapes |= _whisper_block(f"{prefix}blocks.{i}.", n, cross=False)
    return shapes | {f"{prefix}ln_post.weight": (n,), f"{prefix}ln_post.bias": (n,)}


def whisper_decoder_shapes(prefix: str, dims: dict[str, int]) -> dict[str, tuple[int, ...]]:
    """Keys of openai-whisper's TextDecoder under `prefix` (the transcript decoder, model/transcribe.py)."""
    n = dims["n_text_state"]
    shapes: dict[str, tuple[int, ...]] = {
        f"{prefix}token_embedding.weight": (dims["n_vocab"], n),
        f"{prefix}positional_embedding": (dims["n_text_ctx"], n),
    }
    for i in range(dims["n_text_layer"]):
        shapes |= _whisper_block(f"{prefix}blocks.{i}.", n, cross=True)
    return shapes | {f"{prefix}ln.weight": (n,), f"{prefix}ln.bias": (n,)}


def omni_shapes(
    llm: Qwen2Dims, tts: Qwen2Dims, whisper: dict[str, int], projector_hidden: int, ds_rate: int,
    lm_head: bool,
) -> dict[str, tuple[int, ...]]:
    """Every key of a LLaMA-Omni2 model.safetensors with its shape (architecture.md §1.4)."""
    H, T, E = llm.hidden_size, tts.hidden_size, whisper["n_audio_state"]
    shapes = qwen2_shapes("model.", llm)
    shapes |= whisper_encoder_shapes("model.speech_encoder.", whisper)
    shapes |= {
        "model.speech_projector.linear1.weight": (projector_hidden, E * ds_rate),
        "model.speech_projector.linear1.bias": (projector_hidden,),
        "model.speech_projector.linear2.weight": (H, projector_hidden),
        "model.speech_projector.linear2.bias": (H,),
    }
    if lm_head:
        shapes["lm_head.weight"] = (llm.vocab_size, H)
    shapes |= {
        "speech_generator.input_proj.0.weight": (2 * H, H), "speech_generator.input_proj.0.bias": (2 * H,),
        "speech_generator.input_proj.2.weight": (T, 2 * H), "speech_generator.input_proj.2.bias": (T,),
        "speech_generator.gate.0.weight": (T, 2 * T), "speech_generator.gate.0.bias": (T,),
    }
    shapes |= qwen2_shapes("speech_generator.model.model.", tts)
    shapes["speech_generator.model.lm_head.weight"] = (tts.vocab_size, T)
    return shapes


def whisper_sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional embedding: sin of the first half of channels, cos of the second."""
    increment = math.log(max_timescale) / (channels // 2 - 1)
    inv_timescales = torch.exp(-increment * torch.arange(channels // 2))  # (C/2,)
    scaled_time = torch.arange(length)[:, None] * inv_timescales[None, :]  # (T, C/2)
    return torch.cat([torch.sin(scaled_time), torch.cos(scaled_time)], dim=1)  # (T, C)


def _is_norm_gain(key: str) -> bool:
    return key.endswith(("norm.weight", "ln.weight", "ln_post.weight"))


def random_tensor(key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    """The float32 value of `key`: a function of (seed, key, shape) only."""
    if key.endswith("speech_encoder.positional_embedding") or key == "encoder.positional_embedding":
        return whisper_sinusoids(*shape)
    if _is_norm_gain(key):
        return torch.ones(shape)
    # CPU generators keep 32 bits of the seed, so (seed, key) is hashed into 32 bits.
    generator = torch.Generator().manual_seed(zlib.crc32(f"{seed}/{key}".encode()))
    return torch.randn(shape, generator=generator) * INIT_STD


@dataclass(frozen=True)
class TinyPaths:
    root: Path
    model_dir: Path  # root/LLaMA-Omni2-tiny
    tts_tokenizer_dir: Path
    speech_encoder: Path  # root/speech_encoder/large-v3.pt
    cosy2_decoder: Path  # root/cosy2_decoder


def _model_config(vocab: TinyVocab, llm: Qwen2Dims, tts: Qwen2Dims, dtype: torch.dtype) -> dict[str, Any]:
    tts_eos, dtype_name = vocab.special_id(ENDOFTEXT), str(dtype).removeprefix("torch.")
    common = {
        "attention_dropout": 0.0, "initializer_range": INIT_STD, "sliding_window": None,
        "use_sliding_window": False, "use_cache": True, "torch_dtype": dtype_name,
    }
    generator = {
        **tts.to_hf(), **common, "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2",
        "bos_token_id": tts_eos, "eos_token_id": tts_eos, "max_window_layers": tts.num_layers,
        "use_mrope": False,
    }
    return {
        **llm.to_hf(), **common,
        "architectures": ["Omni2Speech2SQwen2ForCausalLM"], "model_type": "omni2_speech2s_qwen2",
        "bos_token_id": vocab.special_id(ENDOFTEXT), "eos_token_id": vocab.special_id(IM_END),
        "max_window_layers": llm.num_layers, "speech_encoder": SPEECH_ENCODER_FIELD,
        "speech_encoder_type": "whisper", "speech_encoder_ds_rate": DS_RATE,
        "speech_encoder_hidden_size": WHISPER_DIMS["n_audio_state"], "speech_projector_type": "linear",
        "speech_generator": generator, "unit_vocab_size": UNIT_VOCAB_SIZE, "stream_params": "(3,10)",
        "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right",
    }


def _generation_config(vocab: TinyVocab) -> dict[str, Any]:
    """A Qwen2.5-Instruct-style generation_config.json (values of the public 0.5B-Instruct file)."""
    eot, im_end = vocab.special_id(ENDOFTEXT), vocab.special_id(IM_END)
    return {
        "bos_token_id": eot, "do_sample": True, "eos_token_id": [im_end, eot], "pad_token_id": eot,
        "repetition_penalty": 1.1, "temperature": 0.7, "top_k": 20, "top_p": 0.8,
    }


def _save_safetensors(tensors: dict[str, torch.Tensor], model_dir: Path, sharded: bool) -> None:
    metadata = {"format": "pt"}
    if not sharded:
        save_file(tensors, str(model_dir / "model.safetensors"), metadata=metadata)
        return
    keys = sorted(tensors)
    sizes = [tensors[k].numel() * tensors[k].element_size() for k in keys]
    total, running = sum(sizes), 0
    shards: list[list[str]] = [[], []]
    for key, size in zip(keys, sizes, strict=True):
        shards[0 if running < total / 2 else 1].append(key)
        running += size
    weight_map: dict[str, str] = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file({k: tensors[k] for k in shard}, str(model_dir / name), metadata=metadata)
        weight_map |= {k: name for k in shard}
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    write_json(model_dir / "model.safetensors.index.json", index)


def make_tiny(
    out_dir: str | Path,
    seed: int = 0,
    *,
    tied: bool = True,
    store_lm_head: bool = True,
    sharded: bool = False,
    with_generation_config: bool = False,
    dtype: torch.dtype = torch.float32,
    whisper_head_dim: int = WHISPER_HEAD_DIM,
    demo: bool = False,
) -> TinyPaths:
    """Write the tiny checkpoint set under `out_dir` (see the module docstring) and return its paths.

    `tied`: tie_word_embeddings of the LLM; with `store_lm_head` a tied lm_head is stored equal to the
    embedding, without it omitted; untied writes a distinct lm_head. The TTS lm_head is always stored, equal
    to the TTS embedding. `sharded` splits the weights into two shards plus an index. `whisper_head_dim`
    sets the encoder's head count in the whisper file's dims (n_state // head dim); no tensor shape
    depends on it. `demo` writes the server's embedded demo model instead: the same keys and shapes with a
    few tensors shaped for a short, quiet, readable reply and transcript (`tiny_demo`); without it nothing
    changes.
    """
    root = Path(out_dir)
    model_dir, encoder_path = root / MODEL_DIR, root / ENCODER_DIR / ENCODER_FILE
    model_dir.mkdir(parents=True, exist_ok=True)
    encoder_path.parent.mkdir(parents=True, exist_ok=True)

    vocab = TinyVocab.build()
    write_tokenizer(model_dir, vocab, vocab.llm_added, eos=IM_END)
    write_tokenizer(model_dir / TTS_TOKENIZER_DIR, vocab, vocab.tts_added, eos=ENDOFTEXT)
    llm_len, tts_len = len(vocab.bpe) + len(vocab.llm_added), len(vocab.bpe) + len(vocab.tts_added)
    llm_vocab = -(-llm_len // LLM_VOCAB_MULTIPLE) * LLM_VOCAB_MULTIPLE  # padded, as Qwen's
    llm = Qwen2Dims(**LLM_SHAPE, vocab_size=llm_vocab, tie_word_embeddings=tied)
    tts = Qwen2Dims(**TTS_SHAPE, vocab_size=tts_len, tie_word_embeddings=True)
    write_json(model_dir / "config.json", _model_config(vocab, llm, tts, dtype))
    if with_generation_config:
        write_json(model_dir / "generation_config.json", _generation_config(vocab))

    shapes = omni_shapes(llm, tts, WHISPER_DIMS, PROJECTOR_HIDDEN, DS_RATE, lm_head=store_lm_head or not tied)
    tensors = {key: random_tensor(key, shape, seed).to(dtype) for key, shape in shapes.items()}
    if tied and store_lm_head:
        tensors["lm_head.weight"] = tensors["model.embed_tokens.weight"].clone()
    tts_embedding = tensors["speech_generator.model.model.embed_tokens.weight"]
    tensors["speech_generator.model.lm_head.weight"] = tts_embedding.clone()
    if demo:
        shape_demo_llm(tensors, vocab, llm.num_layers)
        shape_demo_tts(tensors, vocab, tts.num_layers)
    _save_safetensors(tensors, model_dir, sharded)

    prefix = "model.speech_encoder."
    whisper_state = {k.replace(prefix, "encoder."): t.clone() for k, t in tensors.items() if prefix in k}
    decoder_shapes = whisper_decoder_shapes("decoder.", WHISPER_DIMS)
    # float16 as the official file (the 51866-row embedding is most of the file's size)
    decoder_state = {key: random_tensor(key, shape, seed) for key, shape in decoder_shapes.items()}
    if demo:
        shape_demo_whisper_decoder(decoder_state)
    whisper_state |= {key: t.half() for key, t in decoder_state.items()}
    dims = WHISPER_DIMS | {"n_audio_head": WHISPER_N_AUDIO_STATE // whisper_head_dim}
    torch.save({"dims": dims, "model_state_dict": whisper_state}, str(encoder_path))

    cosy2_dir = write_tiny_cosy2_decoder(root / COSY2_DIR, seed, quiet=demo)
    return TinyPaths(root, model_dir, model_dir / TTS_TOKENIZER_DIR, encoder_path, cosy2_dir)


def run(args: argparse.Namespace) -> int:
    """`voice-agent make-tiny`: write the set and print where it went."""
    paths = make_tiny(
        args.dir, args.seed, tied=not args.untied, sharded=args.sharded,
        with_generation_config=args.generation_config, dtype=torch.bfloat16 if args.bf16 else torch.float32,
    )
    print(f"model:          {paths.model_dir}")
    print(f"speech encoder: {paths.speech_encoder}")
    print(f"cosy2 decoder:  {paths.cosy2_decoder}")
    return 0
