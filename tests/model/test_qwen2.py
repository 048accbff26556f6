"""Qwen2 decoder: parity with transformers, and cached/batched runs equal plain full runs."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import Qwen2Config
from transformers import Qwen2ForCausalLM as HFQwen2ForCausalLM

from voice_agent.errors import CheckpointError
from voice_agent.model import qwen2
from voice_agent.model.config import Qwen2Dims
from voice_agent.model.qwen2 import KVCache, Qwen2ForCausalLM
from voice_agent.model.weights import load_module

VOCAB = 300
TOL: dict[str, Any] = {"atol": 1e-5, "rtol": 1e-5}


def hf_reference(tied: bool = False, seed: int = 0) -> HFQwen2ForCausalLM:
    """A tiny transformers Qwen2 with every parameter random (biases and norm weights included)."""
    torch.manual_seed(seed)
    fields: dict[str, Any] = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tied,
        "max_position_embeddings": 128,
    }
    config = Qwen2Config(**fields)
    model = HFQwen2ForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def ours_from(hf: HFQwen2ForCausalLM) -> Qwen2ForCausalLM:
    fields = hf.config.to_dict()
    # transformers >= 5 writes rope_theta inside `rope_parameters`; official (4.43) files have it on top.
    fields.setdefault("rope_theta", (fields.get("rope_parameters") or {}).get("rope_theta"))
    dims = Qwen2Dims.from_hf(fields, "tiny Qwen2Config")
    assert dims.rope_theta == 10000.0
    model = Qwen2ForCausalLM(dims).eval()
    ignore: tuple[str, ...] = ()
    if dims.tie_word_embeddings:
        model.tie_weights()
        ignore = ("lm_head.weight",)
    load_module(model, hf.state_dict(), source="transformers Qwen2ForCausalLM", ignore=ignore)
    return model


@pytest.fixture(scope="module")
def pair() -> tuple[HFQwen2ForCausalLM, Qwen2ForCausalLM]:
    hf = hf_reference()
    return hf, ours_from(hf)


def full(model: Qwen2ForCausalLM, ids: list[int]) -> torch.Tensor:
    """Logits (T, V) of a plain full-sequence forward over one row."""
    x = torch.tensor([ids])
    return model(model.embed(x), torch.arange(len(ids))[None])[0]


def ids_of(seed: int, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


@torch.no_grad()
def test_official_keys_and_shapes() -> None:
    dims = Qwen2Dims(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=VOCAB
    )
    shapes = {k: tuple(v.shape) for k, v in Qwen2ForCausalLM(dims).state_dict().items()}
    assert shapes["model.embed_tokens.weight"] == (VOCAB, 64)
    assert shapes["model.layers.1.self_attn.k_proj.weight"] == (32, 64)
    assert shapes["model.layers.1.self_attn.k_proj.bias"] == (32,)
    assert "model.layers.0.self_attn.o_proj.bias" not in shapes
    assert shapes["model.layers.0.mlp.down_proj.weight"] == (64, 128)
    assert shapes["model.norm.weight"] == (64,)
    assert shapes["lm_head.weight"] == (VOCAB, 64)
    assert len(shapes) == 2 + 2 * 12 + 1


@torch.no_grad()
@pytest.mark.parametrize("tied", [False, True])
def test_full_forward_matches_transformers(tied: bool) -> None:
    hf = hf_reference(tied=tied, seed=1)
    ours = ours_from(hf)
    assert ours.tied == tied
    ids = torch.randint(0, VOCAB, (2, 11))
    out = hf(ids, output_hidden_states=True)
    positions = torch.arange(11).expand(2, 11)
    torch.testing.assert_close(ours(ours.embed(ids), positions), out.logits, **TOL)
    torch.testing.assert_close(ours.model(ours.embed(ids), positions), out.hidden_states[-1], **TOL)


def test_loading_a_wrong_shape_names_the_key(pair) -> None:
    hf, _ = pair
    dims = Qwen2Dims(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=4, intermediate_size=128, vocab_size=VOCAB
    )
    with pytest.raises(CheckpointError, match="k_proj.weight"):
        load_module(Qwen2ForCausalLM(dims), hf.state_dict(), source="hf")


@torch.no_grad()
def test_incremental_decode_equals_full_forward(pair) -> None:
    _, model = pair
    ids = ids_of(2, 12)
    expected = full(model, ids)
    cache = KVCache(model.dims, slots=3, max_len=32)
    slot = torch.tensor([1])
    logits = model(model.embed(torch.tensor([ids[:5]])), torch.arange(5)[None], cache, slot)[0]
    torch.testing.assert_close(logits, expected[:5], **TOL)
    for t in range(5, 12):
        hidden, step_logits = model.step(
            model.embed(torch.tensor([[ids[t]]])), torch.tensor([[t]]), cache, slot, kv_len=t + 1
        )
        torch.testing.assert_close(step_logits[0], expected[t], **TOL)


@torch.no_grad()
def test_batched_prefill_with_right_padding_equals_rows_alone(pair) -> None:
    _, model = pair
    rows = [ids_of(3, 5), ids_of(4, 2), ids_of(5, 7)]
    T = 7
    x = torch.tensor([r + [0] * (T - len(r)) for r in rows])
    valid = torch.tensor([[t < len(r) for t in range(T)] for r in rows])
    # Padding sits at position 0: it must not overwrite the real token there.
    positions = torch.where(valid, torch.arange(T), 0)
    cache = KVCache(model.dims, slots=4, max_len=16)
    slots = torch.tensor([2, 0, 3])
    logits = model(model.embed(x), positions, cache, slots, valid)
    last_hidden, last_logits = model.step(model.embed(x), positions, None, None, valid)
    for b, r in enumerate(rows):
        alone = full(model, r)
        torch.testing.assert_close(logits[b, : len(r)], alone, **TOL)
        torch.testing.assert_close(last_logits[b], alone[-1], **TOL)
    # The cache holds each row's prefix only: continuing every row by one token matches a full run.
    nxt = [11, 22, 33]
    step_positions = torch.tensor([[len(r)] for r in rows])
    _, step_logits = model.step(model.embed(torch.tensor(nxt)[:, None]), step_positions, cache, slots)
    for b, r in enumerate(rows):
        torch.testing.assert_close(step_logits[b], full(model, r + [nxt[b]])[-1], **TOL)


@torch.no_grad()
def test_one_batched_decode_step_at_different_positions(pair) -> None:
    _, model = pair
    prefixes = [ids_of(6, 3), ids_of(7, 9), ids_of(8, 6)]
    cache = KVCache(model.dims, slots=3, max_len=20)
    slots = torch.tensor([2, 1, 0])
    for b, prefix in enumerate(prefixes):  # prefill each session alone
        model(model.embed(torch.tensor([prefix])), torch.arange(len(prefix))[None], cache, slots[b : b + 1])
    nxt = torch.tensor([[5], [6], [7]])
    positions = torch.tensor([[len(p)] for p in prefixes])
    hidden, logits = model.step(model.embed(nxt), positions, cache, slots, kv_len=10)
    for b, prefix in enumerate(prefixes):
        seq = prefix + [int(nxt[b, 0])]
        torch.testing.assert_close(logits[b], full(model, seq)[-1], **TOL)
        state = model.model(model.embed(torch.tensor([seq])), torch.arange(len(seq))[None])[0, -1]
        torch.testing.assert_close(hidden[b], state, **TOL)


@torch.no_grad()
def test_truncating_a_slot_then_decoding_equals_a_fresh_run(pair) -> None:
    _, model = pair
    ids = ids_of(9, 10)
    cache = KVCache(model.dims, slots=2, max_len=16)
    slot = torch.tensor([0])
    model(model.embed(torch.tensor([ids])), torch.arange(10)[None], cache, slot)
    # Keep 4 tokens (the caller lowers the slot's length), then decode a different continuation.
    new = [41, 42, 43]
    got = model(model.embed(torch.tensor([new])), torch.arange(4, 7)[None], cache, slot)[0]
    torch.testing.assert_close(got, full(model, ids[:4] + new)[4:], **TOL)


@torch.no_grad()
def test_full_forward_without_cache_ignores_padding(pair) -> None:
    _, model = pair
    rows = [ids_of(10, 4), ids_of(11, 6)]
    x = torch.tensor([rows[0] + [1, 1], rows[1]])
    valid = torch.tensor([[True] * 4 + [False] * 2, [True] * 6])
    logits = model(model.embed(x), torch.arange(6).expand(2, 6), valid=valid)
    torch.testing.assert_close(logits[0, :4], full(model, rows[0]), **TOL)
    torch.testing.assert_close(logits[1], full(model, rows[1]), **TOL)


@torch.no_grad()
def test_a_slot_reused_by_a_new_session_needs_no_clearing(pair) -> None:
    # The engine hands a closed session's slot to the next one as it is: the old entries past the new
    # session's length are never attended to, and the neighbouring slot is untouched.
    _, model = pair
    old, new, other = ids_of(12, 8), ids_of(14, 3), ids_of(15, 5)
    cache = KVCache(model.dims, slots=2, max_len=12)
    model(model.embed(torch.tensor([old])), torch.arange(8)[None], cache, torch.tensor([0]))
    model(model.embed(torch.tensor([other])), torch.arange(5)[None], cache, torch.tensor([1]))
    model(model.embed(torch.tensor([new])), torch.arange(3)[None], cache, torch.tensor([0]))
    steps = model.embed(torch.tensor([[7], [9]]))  # (2, 1, H): one decode step of both sessions
    _, logits = model.step(steps, torch.tensor([[3], [5]]), cache, torch.tensor([0, 1]), kv_len=6)
    torch.testing.assert_close(logits[0], full(model, new + [7])[-1], **TOL)
    torch.testing.assert_close(logits[1], full(model, other + [9])[-1], **TOL)


def test_cache_memory_accounting() -> None:
    dims = Qwen2Dims(
        hidden_size=896, num_layers=24, num_heads=14, num_kv_heads=2, intermediate_size=4864, vocab_size=10
    )
    assert (
        KVCache.token_bytes(dims, torch.bfloat16) == 2 * 24 * 2 * 64 * 2
    )  # 12 KiB per token (0.5B / TTS LM)
    small = Qwen2Dims(
        hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=128, vocab_size=10
    )
    cache = KVCache(small, slots=3, max_len=5, dtype=torch.float16)
    assert cache.bytes_per_token == 2 * 2 * 2 * 16 * 2
    assert cache.nbytes == cache.bytes_per_token * 3 * (5 + 1)  # one scratch position per slot


def test_bad_inputs_are_rejected_with_what_was_expected(pair) -> None:
    _, model = pair
    x = torch.zeros(2, 3, 64)
    positions = torch.arange(3).expand(2, 3)
    cache = KVCache(model.dims, slots=2, max_len=4)
    with pytest.raises(ValueError, match="inputs_embeds: expected"):
        model(torch.zeros(2, 3, 32), positions)
    with pytest.raises(ValueError, match="positions: expected"):
        model(x, positions.int())
    with pytest.raises(ValueError, match="slots: expected"):
        model(x, positions, cache)
    with pytest.raises(ValueError, match="kv_len: expected"):
        model(x, positions, cache, torch.tensor([0, 1]), kv_len=9)
    with pytest.raises(ValueError, match="cache: expected dtype"):
        model(x.double(), positions, cache, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="slots >= 1"):
        KVCache(model.dims, slots=0, max_len=4)


@torch.no_grad()
def test_bfloat16_weights_and_cache_track_float32(pair) -> None:
    _, model = pair
    half = ours_from(hf_reference()).to(torch.bfloat16)
    ids = ids_of(13, 8)
    cache = KVCache(half.dims, slots=1, max_len=8, dtype=torch.bfloat16)
    slot = torch.tensor([0])
    half(half.embed(torch.tensor([ids[:7]])), torch.arange(7)[None], cache, slot)
    _, logits = half.step(half.embed(torch.tensor([[ids[7]]])), torch.tensor([[7]]), cache, slot)
    assert logits.dtype == torch.bfloat16
    reference = full(model, ids)[-1]
    assert (logits[0].float() - reference).abs().max() < 0.05 * reference.abs().max()


@torch.no_grad()
def test_consecutive_slots_read_the_cache_in_place_with_the_same_numbers(pair) -> None:
    # Slots 1, 2, 3 are one slice of the cache (read as a view); 3, 1, 2 must be gathered. Same numbers.
    _, model = pair
    prompts = [ids_of(20, 5), ids_of(21, 3), ids_of(22, 7)]

    def run(slots: list[int]) -> torch.Tensor:
        cache = KVCache(model.dims, slots=4, max_len=16)
        x = torch.stack([model.embed(torch.tensor(p + [0] * (7 - len(p)))) for p in prompts])  # (3, 7, H)
        valid = torch.tensor([[t < len(p) for t in range(7)] for p in prompts])
        logits = [model.step(x, torch.arange(7).expand(3, 7), cache, torch.tensor(slots), valid, 8)[1]]
        for t in range(3):
            positions = torch.tensor([[len(p) + t] for p in prompts])
            logits.append(model.step(model.embed(torch.tensor([[5 + t]] * 3)), positions, cache,
                                     torch.tensor(slots), kv_len=7 + t + 1)[1])
        return torch.stack(logits)  # (4, 3, V)

    assert qwen2._first_of_run(torch.tensor([1, 2, 3])) == 1 and qwen2._first_of_run(torch.tensor([3, 1, 2])) is None
    in_place, gathered = run([1, 2, 3]), run([3, 1, 2])
    assert torch.equal(in_place, gathered)
    for b, p in enumerate(prompts):
        torch.testing.assert_close(in_place[-1, b], full(model, p + [5, 6, 7])[-1], **TOL)
