"""The demo set (`make_tiny(..., demo=True)`): the official layout with a few tensors shaped, the rest of
the files unchanged, and the encoder the demo's chain relies on. Its behaviour through the engine:
tests/engine/test_demo.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from voice_agent.model.tiny import make_tiny
from voice_agent.model.tiny_demo import DEMO_REPLY, DEMO_REPLY_AFTER, DEMO_TRANSCRIPT, demo_chain
from voice_agent.model.tiny_tokenizer import MERGE_CORPUS, TinyVocab
from voice_agent.model.tokenizer import load_tokenizer
from voice_agent.model.weights import SafetensorsCheckpoint, load_torch_file

SHAPED_MODEL_KEYS = {
    "model.embed_tokens.weight", "lm_head.weight",
    "model.layers.1.mlp.gate_proj.weight", "model.layers.1.mlp.up_proj.weight",
    "model.layers.1.mlp.down_proj.weight",
    "speech_generator.model.model.embed_tokens.weight", "speech_generator.model.lm_head.weight",
    "speech_generator.input_proj.2.weight", "speech_generator.input_proj.2.bias",
    *(f"speech_generator.model.model.layers.{i}.{key}" for i in (0, 1)
      for key in ("self_attn.o_proj.weight", "mlp.down_proj.weight")),
}
SHAPED_HIFT_KEYS = {"conv_post.weight_g", "conv_post.bias"}
SHAPED_WHISPER_KEYS = {"decoder.token_embedding.weight", "decoder.blocks.0.mlp.0.weight",
                       "decoder.blocks.0.mlp.0.bias", "decoder.blocks.0.mlp.2.weight"}


@pytest.fixture(scope="module")
def sets(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("sets")
    return make_tiny(root / "plain", seed=0).root, make_tiny(root / "demo", seed=0, demo=True).root


def tensors(root: Path) -> dict[str, torch.Tensor]:
    checkpoint = SafetensorsCheckpoint(root / "LLaMA-Omni2-tiny")
    return {key: checkpoint[key] for key in checkpoint.keys()}


def changed(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> set[str]:
    assert a.keys() == b.keys()
    assert all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
    return {k for k in a if not torch.equal(a[k], b[k])}


def test_demo_set_shapes_only_its_tensors_and_keeps_every_other_file(sets: tuple[Path, Path]) -> None:
    plain, demo = sets
    files = sorted(p.relative_to(plain) for p in plain.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(demo) for p in demo.rglob("*") if p.is_file())
    differ = {f.as_posix() for f in files if (plain / f).read_bytes() != (demo / f).read_bytes()}
    assert differ == {"LLaMA-Omni2-tiny/model.safetensors", "cosy2_decoder/hift.pt", "speech_encoder/large-v3.pt"}
    assert changed(tensors(plain), tensors(demo)) == SHAPED_MODEL_KEYS
    hift = [load_torch_file(root / "cosy2_decoder" / "hift.pt", "hift") for root in (plain, demo)]
    assert changed(*hift) == SHAPED_HIFT_KEYS
    whisper = [load_torch_file(root / "speech_encoder" / "large-v3.pt", "whisper")["model_state_dict"]
               for root in (plain, demo)]
    assert changed(*whisper) == SHAPED_WHISPER_KEYS


@pytest.mark.parametrize("frames", [1500, 35])
def test_demo_whisper_decoder_transcribes_the_demo_transcript(sets: tuple[Path, Path], frames: int) -> None:
    from voice_agent.model.transcribe import Transcriber

    job = Transcriber.load(sets[1] / "speech_encoder" / "large-v3.pt").start(torch.randn(frames, 128))
    deltas = []
    while not job.done:
        deltas.append(job.step())
    assert job.text == "".join(deltas) == DEMO_TRANSCRIPT.strip()
    assert job.steps == 1 + len(deltas) - 1 and len(deltas) < 16  # language detection, then a short chain


def test_demo_tied_heads_stay_equal_to_their_embeddings(sets: tuple[Path, Path]) -> None:
    t = tensors(sets[1])
    assert torch.equal(t["lm_head.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(t["speech_generator.model.lm_head.weight"],
                       t["speech_generator.model.model.embed_tokens.weight"])


@pytest.mark.parametrize("text", [DEMO_REPLY, DEMO_REPLY_AFTER, MERGE_CORPUS, "Don't  stop!\n\n 42 cafés."])
def test_tiny_vocab_encodes_as_the_written_tokenizer(sets: tuple[Path, Path], text: str) -> None:
    tokenizer = load_tokenizer(sets[0] / "LLaMA-Omni2-tiny")
    assert TinyVocab.build().encode(text) == tokenizer.encode(text)


def test_demo_chain_starts_after_the_generation_prompt_and_ends_at_im_end(sets: tuple[Path, Path]) -> None:
    tokenizer = load_tokenizer(sets[0] / "LLaMA-Omni2-tiny")
    chain = demo_chain(TinyVocab.build())
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True,
                                           tokenize=False)
    assert chain[0] == tokenizer.encode(prompt)[-1]
    assert tokenizer.decode(chain[1:-1]) == DEMO_REPLY
    assert chain[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
