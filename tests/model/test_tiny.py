"""The tiny checkpoint set: official layout and keys, tie variants, shards, determinism, the Whisper .pt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from voice_agent.model.config import OmniConfig, load_generation_config
from voice_agent.model.tiny import (
    UNIT_VOCAB_SIZE,
    WHISPER_DIMS,
    make_tiny,
    whisper_sinusoids,
)
from voice_agent.model.weights import SafetensorsCheckpoint, load_torch_file

ENCODER_PREFIX = "model.speech_encoder."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0)


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


TOKENIZER_FILES = {
    "vocab.json", "merges.txt", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json",
}


def test_writes_the_official_layout(tiny):
    names = {p.name for p in tiny.model_dir.iterdir()}
    assert names == {"config.json", "model.safetensors", "tts_tokenizer"} | TOKENIZER_FILES
    assert {p.name for p in tiny.tts_tokenizer_dir.iterdir()} == TOKENIZER_FILES
    assert tiny.speech_encoder == tiny.root / "speech_encoder" / "large-v3.pt"
    assert tiny.speech_encoder.is_file() and load_generation_config(tiny.model_dir) is None
    assert tiny.cosy2_decoder == tiny.root / "cosy2_decoder"  # written by voice_agent.model.cosy2.tiny
    assert (tiny.cosy2_decoder / "flow.pt").is_file() and (tiny.cosy2_decoder / "hift.pt").is_file()


def test_config_json_has_the_official_fields(tiny):
    raw = json.loads((tiny.model_dir / "config.json").read_text())
    assert raw["model_type"] == "omni2_speech2s_qwen2"
    assert raw["architectures"] == ["Omni2Speech2SQwen2ForCausalLM"]
    assert raw["speech_encoder"] == "models/speech_encoder/large-v3.pt"
    assert raw["stream_params"] == "(3,10)" and raw["tokenizer_padding_side"] == "right"
    assert raw["speech_projector_type"] == "linear" and raw["speech_encoder_hidden_size"] == 128
    cfg = OmniConfig.load(tiny.model_dir)
    assert (cfg.read_tokens, cfg.write_units, cfg.unit_vocab_size) == (3, 10, 6561)
    assert cfg.speech_encoder_ds_rate == 5 and cfg.tokenizer_model_max_length == 4096
    assert (cfg.llm.hidden_size, cfg.llm.num_layers, cfg.llm.num_heads, cfg.llm.num_kv_heads) == (64, 2, 4, 2)
    assert (cfg.tts.hidden_size, cfg.tts.num_layers, cfg.tts.num_heads, cfg.tts.num_kv_heads) == (32, 2, 4, 2)
    assert cfg.llm.tie_word_embeddings and cfg.tts.tie_word_embeddings
    vocab = json.loads((tiny.model_dir / "vocab.json").read_text())
    added = json.loads((tiny.model_dir / "added_tokens.json").read_text())
    tts_added = json.loads((tiny.tts_tokenizer_dir / "added_tokens.json").read_text())
    assert cfg.eos_token_id == added["<|im_end|>"] and raw["bos_token_id"] == added["<|endoftext|>"]
    llm_len = len(vocab) + len(added)
    assert cfg.llm.vocab_size % 64 == 0 and llm_len < cfg.llm.vocab_size < llm_len + 64
    assert cfg.tts.vocab_size == len(vocab) + len(tts_added)
    gen = raw["speech_generator"]
    assert gen["eos_token_id"] == gen["bos_token_id"] == tts_added["<|endoftext|>"]
    assert tts_added["<sep>"] == added["<speech>"] and tts_added["<0>"] == added["<speech>"] + 1


def qwen2_reference_shapes(prefix: str, dims, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Keys and shapes of transformers' own Qwen2Model (an independent source of the key table)."""
    from transformers import Qwen2Config, Qwen2Model

    config = Qwen2Config(
        hidden_size=dims.hidden_size, num_hidden_layers=dims.num_layers, num_attention_heads=dims.num_heads,
        num_key_value_heads=dims.num_kv_heads, intermediate_size=dims.intermediate_size,
        vocab_size=vocab_size,
    )
    return {prefix + k: tuple(v.shape) for k, v in Qwen2Model(config).state_dict().items()}


def test_every_official_key_is_stored_at_its_tiny_shape(tiny):
    import whisper

    ckpt = SafetensorsCheckpoint(tiny.model_dir)
    cfg = OmniConfig.load(tiny.model_dir)
    d = whisper.ModelDimensions(**WHISPER_DIMS)
    encoder = whisper.model.AudioEncoder(
        d.n_mels, d.n_audio_ctx, d.n_audio_state, d.n_audio_head, d.n_audio_layer
    )
    expected = qwen2_reference_shapes("model.", cfg.llm, cfg.llm.vocab_size)
    expected |= qwen2_reference_shapes("speech_generator.model.model.", cfg.tts, cfg.tts.vocab_size)
    expected |= {ENCODER_PREFIX + k: tuple(v.shape) for k, v in encoder.state_dict().items()}
    expected |= {
        "model.speech_projector.linear1.weight": (128, 128 * 5),
        "model.speech_projector.linear1.bias": (128,),
        "model.speech_projector.linear2.weight": (64, 128), "model.speech_projector.linear2.bias": (64,),
        "lm_head.weight": (cfg.llm.vocab_size, 64),
        "speech_generator.input_proj.0.weight": (128, 64), "speech_generator.input_proj.0.bias": (128,),
        "speech_generator.input_proj.2.weight": (32, 128), "speech_generator.input_proj.2.bias": (32,),
        "speech_generator.gate.0.weight": (32, 64), "speech_generator.gate.0.bias": (32,),
        "speech_generator.model.lm_head.weight": (cfg.tts.vocab_size, 32),
    }
    assert {k: ckpt.shape(k) for k in ckpt} == expected


def test_values_are_small_normals_unit_norm_gains_and_whisper_sinusoids(tiny):
    import whisper

    ckpt = SafetensorsCheckpoint(tiny.model_dir)
    assert ckpt["model.embed_tokens.weight"].dtype == torch.float32
    assert 0.015 < ckpt["model.layers.0.mlp.down_proj.weight"].std().item() < 0.025
    gains = ["model.norm.weight", "model.layers.1.input_layernorm.weight", ENCODER_PREFIX + "ln_post.weight",
             ENCODER_PREFIX + "blocks.0.attn_ln.weight", "speech_generator.model.model.norm.weight"]
    for key in gains:
        assert torch.equal(ckpt[key], torch.ones_like(ckpt[key])), key
    pos = ckpt[ENCODER_PREFIX + "positional_embedding"]
    assert torch.equal(pos, whisper.model.sinusoids(1500, 128))
    assert torch.equal(pos, whisper_sinusoids(1500, 128))


def test_tts_lm_head_is_stored_equal_to_its_embedding(tiny):
    ckpt = SafetensorsCheckpoint(tiny.model_dir)
    emb = ckpt["speech_generator.model.model.embed_tokens.weight"]
    assert torch.equal(ckpt["speech_generator.model.lm_head.weight"], emb)
    assert emb.shape[0] == OmniConfig.load(tiny.model_dir).tts.vocab_size


@pytest.mark.parametrize(("tied", "store"), [(True, True), (True, False), (False, True)])
def test_lm_head_follows_the_tie_options(tmp_path, tiny, tied, store):
    paths = tiny if tied and store else make_tiny(tmp_path, seed=0, tied=tied, store_lm_head=store)
    ckpt = SafetensorsCheckpoint(paths.model_dir)
    assert OmniConfig.load(paths.model_dir).llm.tie_word_embeddings is tied
    if tied and not store:
        assert "lm_head.weight" not in ckpt
    else:
        same = torch.equal(ckpt["lm_head.weight"], ckpt["model.embed_tokens.weight"])
        assert same is tied


def test_same_seed_writes_the_same_bytes_and_another_seed_other_weights(tmp_path, tiny):
    again = make_tiny(tmp_path / "a", seed=0)
    a, b = tree_bytes(tiny.root), tree_bytes(again.root)
    assert a.keys() == b.keys()
    assert [name for name in a if a[name] != b[name]] == []
    other = make_tiny(tmp_path / "b", seed=7)
    x, y = SafetensorsCheckpoint(tiny.model_dir), SafetensorsCheckpoint(other.model_dir)
    for key in ("model.layers.0.self_attn.q_proj.weight", "speech_generator.gate.0.weight"):
        assert not torch.equal(x[key], y[key]), key
    assert torch.equal(x[ENCODER_PREFIX + "positional_embedding"], y[ENCODER_PREFIX + "positional_embedding"])
    assert (tiny.model_dir / "vocab.json").read_bytes() == (other.model_dir / "vocab.json").read_bytes()


def test_sharded_and_single_files_hold_identical_tensors(tmp_path, tiny):
    sharded = make_tiny(tmp_path, seed=0, sharded=True)
    assert not (sharded.model_dir / "model.safetensors").exists()
    index = json.loads((sharded.model_dir / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) >= 2 and all((sharded.model_dir / s).is_file() for s in shards)
    single, split = SafetensorsCheckpoint(tiny.model_dir), SafetensorsCheckpoint(sharded.model_dir)
    assert set(single) == set(split)
    assert all(torch.equal(single[k], split[k]) for k in single)
    total_bytes = sum(single[k].numel() * single[k].element_size() for k in single)
    assert index["metadata"]["total_size"] == total_bytes


def test_whisper_pt_loads_in_openai_whisper_with_the_checkpoint_encoder(tiny):
    import whisper

    model = whisper.load_model(str(tiny.speech_encoder), device="cpu")
    assert model.dims.n_audio_state == 128 and model.dims.n_audio_head == 2 and model.dims.n_mels == 128
    ckpt = SafetensorsCheckpoint(tiny.model_dir)
    encoder_state = model.encoder.state_dict()
    assert {ENCODER_PREFIX + k for k in encoder_state} == {k for k in ckpt if k.startswith(ENCODER_PREFIX)}
    for k, v in encoder_state.items():
        assert torch.equal(v, ckpt[ENCODER_PREFIX + k]), k
    raw = load_torch_file(tiny.speech_encoder, "an openai-whisper checkpoint")
    assert raw["dims"] == WHISPER_DIMS


def test_generation_config_and_bf16_options(tmp_path):
    paths = make_tiny(tmp_path, seed=0, with_generation_config=True, dtype=torch.bfloat16)
    gen = load_generation_config(paths.model_dir)
    cfg = json.loads((paths.model_dir / "config.json").read_text())
    assert gen is not None and cfg["eos_token_id"] in gen["eos_token_id"] and gen["repetition_penalty"] > 1
    assert cfg["torch_dtype"] == "bfloat16"
    ckpt = SafetensorsCheckpoint(paths.model_dir)
    assert ckpt["model.embed_tokens.weight"].dtype == torch.bfloat16
    raw = load_torch_file(paths.speech_encoder, "an openai-whisper checkpoint")
    assert torch.equal(raw["model_state_dict"]["encoder.conv1.weight"], ckpt[ENCODER_PREFIX + "conv1.weight"])


def test_cli_writes_the_set(tmp_path, capsys):
    from voice_agent.cli import main

    assert main(["make-tiny", str(tmp_path), "--seed", "3", "--sharded"]) == 0
    assert (tmp_path / "LLaMA-Omni2-tiny" / "model.safetensors.index.json").is_file()
    assert "LLaMA-Omni2-tiny" in capsys.readouterr().out
    assert OmniConfig.load(tmp_path / "LLaMA-Omni2-tiny").unit_vocab_size == UNIT_VOCAB_SIZE
