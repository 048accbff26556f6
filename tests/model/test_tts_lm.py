"""TTS LM: official keys, the fusion equations, and KV-cached streaming equal to a full re-prefill."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from voice_agent.engine.schedule import ReadWriteSchedule
from voice_agent.model.config import Qwen2Dims
from voice_agent.model.qwen2 import KVCache
from voice_agent.model.sampling import TTS_SAMPLING, make_generator, sample, unit_mask
from voice_agent.model.tts_lm import SpeechGenerator

LLM_HIDDEN = 64
TEXT_VOCAB = 200  # ids shared with the (fake) LLM
EOS, SEP, UNIT_OFFSET, UNIT_COUNT = 200, 201, 202, 150
TTS_DIMS = Qwen2Dims(
    hidden_size=32,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    intermediate_size=64,
    vocab_size=UNIT_OFFSET + UNIT_COUNT,
)
TOL: dict[str, Any] = {"atol": 1e-5, "rtol": 1e-5}


@pytest.fixture(scope="module")
def generator_model() -> SpeechGenerator:
    torch.manual_seed(0)
    model = SpeechGenerator(LLM_HIDDEN, TTS_DIMS).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3)
    return model


def test_official_keys() -> None:
    keys = set(SpeechGenerator(LLM_HIDDEN, TTS_DIMS).state_dict())
    assert {"input_proj.0.weight", "input_proj.0.bias", "input_proj.2.weight", "input_proj.2.bias"} <= keys
    assert {"gate.0.weight", "gate.0.bias", "model.model.embed_tokens.weight", "model.lm_head.weight"} <= keys
    assert "model.model.layers.1.self_attn.q_proj.bias" in keys
    assert not any(k.startswith(("input_proj.1", "gate.1")) for k in keys)
    shapes = {k: tuple(v.shape) for k, v in SpeechGenerator(LLM_HIDDEN, TTS_DIMS).state_dict().items()}
    assert shapes["input_proj.0.weight"] == (2 * LLM_HIDDEN, LLM_HIDDEN)
    assert shapes["input_proj.2.weight"] == (32, 2 * LLM_HIDDEN)
    assert shapes["gate.0.weight"] == (32, 64)


@torch.no_grad()
def test_fuse_follows_the_gated_formula(generator_model: SpeechGenerator) -> None:
    sd = generator_model.state_dict()
    h = torch.randn(5, LLM_HIDDEN)
    y = torch.tensor([3, 17, 199, 0, 42])
    r = torch.relu(h @ sd["input_proj.0.weight"].T + sd["input_proj.0.bias"])
    r = r @ sd["input_proj.2.weight"].T + sd["input_proj.2.bias"]
    e = sd["model.model.embed_tokens.weight"][y]
    g = torch.sigmoid(torch.cat([r, e], dim=-1) @ sd["gate.0.weight"].T + sd["gate.0.bias"])
    torch.testing.assert_close(generator_model.fuse(h, y), g * r + (1 - g) * e)
    with pytest.raises(ValueError, match="token_ids: expected"):
        generator_model.fuse(h, y[:4])


class Session:
    """One response's TTS side, fed through a KV-cache slot (as an engine would)."""

    def __init__(self, model: SpeechGenerator, slot: int, seed: int, n_text: int, final_units: int = 15):
        self.model = model
        self.slot = slot
        self.gen = make_generator(seed)
        data = torch.Generator().manual_seed(seed)
        self.states = torch.randn(n_text, LLM_HIDDEN, generator=data)  # LLM states paired with each token
        self.tokens = torch.randint(0, TEXT_VOCAB, (n_text,), generator=data)
        self.schedule = ReadWriteSchedule(3, 10, final_units=final_units)
        self.next_text = 0
        self.inputs: list[torch.Tensor] = []  # every TTS input embedding so far, (D,) each
        self.length = 0  # positions already in the cache
        self.logits: list[torch.Tensor] = []  # (V,) per generated TTS token
        self.prefix_lengths: list[int] = []  # sequence length each generated token was predicted from

    def pending(self) -> torch.Tensor:
        """(n, D) inputs not yet in the cache; advances the LLM side until a read starts if needed."""
        while self.schedule.block is None and not self.schedule.done:
            read = self.schedule.text_token(finished=self.next_text == len(self.tokens) - 1)
            self.next_text += 1
            if read is not None:
                new = self.model.fuse(
                    self.states[read.start : read.stop], self.tokens[read.start : read.stop]
                )
                self.inputs += list(new)
                if read.append_sep:
                    self.inputs.append(self.model.embed(torch.tensor(SEP)))
        return torch.stack(self.inputs[self.length :])

    def took(self, logits: torch.Tensor, token: int) -> None:
        self.length = len(self.inputs)
        self.logits.append(logits)
        self.prefix_lengths.append(self.length)
        eos = token == EOS
        self.schedule.wrote(None if eos else token - UNIT_OFFSET, eos=eos)
        self.inputs.append(self.model.embed(torch.tensor(token)))


def run_batched(model: SpeechGenerator, sessions: list[Session], cache: KVCache) -> None:
    """Lockstep steps over the live sessions: reads (several positions) and units (one) share a call."""
    allowed = unit_mask(TTS_DIMS.vocab_size, UNIT_OFFSET, UNIT_COUNT, EOS)
    while live := [s for s in sessions if not s.schedule.done]:
        chunks = [s.pending() for s in live]
        T = max(len(c) for c in chunks)
        x = torch.zeros(len(live), T, TTS_DIMS.hidden_size)
        valid = torch.zeros(len(live), T, dtype=torch.bool)
        positions = torch.zeros(len(live), T, dtype=torch.int64)
        for b, (s, c) in enumerate(zip(live, chunks, strict=True)):
            x[b, : len(c)] = c
            valid[b, : len(c)] = True
            positions[b, : len(c)] = torch.arange(s.length, s.length + len(c))
        slots = torch.tensor([s.slot for s in live])
        kv_len = max(s.length + len(c) for s, c in zip(live, chunks, strict=True))
        logits = model(x, positions, cache, slots, valid, kv_len)  # (B, V)
        tokens = sample(logits, TTS_SAMPLING, [s.gen for s in live], allowed=allowed)
        for b, s in enumerate(live):
            s.took(logits[b], int(tokens[b]))


@torch.no_grad()
def test_cached_streaming_equals_full_reprefill_per_block(generator_model: SpeechGenerator) -> None:
    model = generator_model
    session = Session(model, slot=1, seed=7, n_text=8)
    run_batched(model, [session], KVCache(model.dims, slots=2, max_len=64))
    blocks = session.schedule.unit_blocks
    assert len(blocks) == 3  # reads after tokens 3, 6 and the finishing token 8 (2 tokens + <sep>)
    assert all(len(b) <= 10 for b in blocks[:2]) and 0 < len(blocks[2]) <= 15
    assert all(0 <= u < UNIT_COUNT for b in blocks for u in b)
    # The reference: each TTS call re-prefills the whole sequence so far, without any cache.
    seq = torch.stack(session.inputs)  # (N, D)
    assert len(session.prefix_lengths) == len(session.logits) > 5
    for logits, n in zip(session.logits, session.prefix_lengths, strict=True):
        full = model.model(seq[None, :n], torch.arange(n)[None])  # (1, n, V) logits, no cache
        torch.testing.assert_close(logits, full[0, -1], **TOL)


@torch.no_grad()
def test_two_sessions_batched_equal_each_alone(generator_model: SpeechGenerator) -> None:
    model = generator_model
    together = [Session(model, slot=2, seed=11, n_text=7), Session(model, slot=0, seed=12, n_text=4)]
    run_batched(model, together, KVCache(model.dims, slots=3, max_len=64))
    for s in together:
        alone = Session(model, slot=1, seed=s.gen.initial_seed(), n_text=len(s.tokens))
        run_batched(model, [alone], KVCache(model.dims, slots=2, max_len=64))
        assert alone.schedule.unit_blocks == s.schedule.unit_blocks
        torch.testing.assert_close(torch.stack(alone.logits), torch.stack(s.logits), **TOL)
