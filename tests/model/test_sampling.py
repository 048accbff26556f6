"""Sampling: transformers' processors reproduced per row, seeds, masks, and generation_config semantics."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from voice_agent.errors import CheckpointError
from voice_agent.model.sampling import (
    GREEDY,
    TTS_SAMPLING,
    GenerationSettings,
    SamplingParams,
    exponential_rows,
    make_generator,
    process_logits,
    sample,
    unit_mask,
)

V = 120

# A Qwen2.5-Instruct style generation_config.json.
QWEN_FILE = {
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.05,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "transformers_version": "4.37.0",
}


def transformers_scores(logits: torch.Tensor, p: SamplingParams, history: list[int]) -> torch.Tensor:
    """transformers' own processors for one row, in `generate`'s order."""
    ids = torch.tensor([history], dtype=torch.long)
    scores = logits[None].clone()
    if p.repetition_penalty != 1.0 and history:
        scores = RepetitionPenaltyLogitsProcessor(float(p.repetition_penalty))(ids, scores)
    if not p.greedy:
        if p.temperature != 1.0:
            scores = TemperatureLogitsWarper(float(p.temperature))(ids, scores)
        if p.top_k:
            scores = TopKLogitsWarper(p.top_k)(ids, scores)
        if p.top_p < 1.0:
            scores = TopPLogitsWarper(p.top_p)(ids, scores)
    return scores[0]


ROWS = [
    SamplingParams(repetition_penalty=1.3),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.8, repetition_penalty=1.05),
    SamplingParams(temperature=1.4, top_p=0.5),
    SamplingParams(top_k=7),
    SamplingParams(do_sample=False, temperature=0.7, top_k=3, repetition_penalty=1.2),
    SamplingParams(temperature=0.0, top_p=0.3),
    TTS_SAMPLING,
]


def test_processed_logits_equal_transformers_processors_row_by_row() -> None:
    torch.manual_seed(0)
    logits = torch.randn(len(ROWS), V) * 3
    history = [torch.randint(0, V, (n,)).tolist() for n in (5, 9, 0, 3, 12, 4, 6)]
    got = process_logits(logits, ROWS, history)
    for b, p in enumerate(ROWS):
        want = transformers_scores(logits[b], p, history[b])
        assert torch.equal(torch.isinf(got[b]), torch.isinf(want)), f"row {b}: different tokens filtered"
        torch.testing.assert_close(got[b], want, atol=1e-6, rtol=1e-6)
    assert torch.isinf(got[1]).sum() >= V - 20  # top-k 20 then top-p 0.8 acted
    assert not torch.isinf(got[4]).any()  # greedy: the warpers are inert, only the penalty acts
    torch.testing.assert_close(
        got[4], transformers_scores(logits[4], SamplingParams(repetition_penalty=1.2), history[4])
    )


def test_greedy_is_argmax_of_the_penalised_logits() -> None:
    torch.manual_seed(1)
    logits = torch.randn(4, V)
    assert torch.equal(sample(logits, GREEDY), logits.argmax(-1))
    top = logits.argmax(-1).tolist()
    penalised = sample(
        logits, SamplingParams(do_sample=False, repetition_penalty=50.0), history=[[t] for t in top]
    )
    assert all(int(a) != b for a, b in zip(penalised, top, strict=True))
    # temperature <= 0 is greedy even with do_sample
    assert torch.equal(
        sample(logits, SamplingParams(temperature=0.0), [make_generator(3)] * 4), logits.argmax(-1)
    )


def draws(logits: torch.Tensor, params: SamplingParams, seed: int, n: int) -> list[int]:
    gen = make_generator(seed)
    return [int(sample(logits[None], params, [gen])[0]) for _ in range(n)]


def test_same_seed_same_samples_and_different_seeds_differ() -> None:
    logits = torch.zeros(V)
    a, b, c = (
        draws(logits, TTS_SAMPLING, 5, 30),
        draws(logits, TTS_SAMPLING, 5, 30),
        draws(logits, TTS_SAMPLING, 6, 30),
    )
    assert a == b
    assert a != c


def test_a_rows_samples_do_not_depend_on_its_batch_mates() -> None:
    torch.manual_seed(2)
    logits = torch.randn(3, V)
    gens = [make_generator(s) for s in (10, 11, 12)]
    batched = [sample(logits, TTS_SAMPLING, gens).tolist() for _ in range(10)]
    gen_alone = make_generator(11)
    alone = [int(sample(logits[1:2], TTS_SAMPLING, [gen_alone])[0]) for _ in range(10)]
    assert [row[1] for row in batched] == alone


def test_exponential_rows_equal_exponential_draws_from_each_generator() -> None:
    # The CPU fast path (uniform draws, transformed as a whole) gives exactly what exponential_ gives,
    # row by row, and leaves every generator where exponential_ would.
    for n in (1, 50, 6561):
        fast = [make_generator(s) for s in (3, 4, 5)]
        slow = [make_generator(s) for s in (3, 4, 5)]
        got = exponential_rows(n, fast, torch.device("cpu"), torch.float32)
        want = torch.stack([torch.empty(n).exponential_(generator=g) for g in slow])
        assert got.shape == (3, n) and got.dtype == torch.float32
        assert torch.equal(got, want)
        assert all(torch.equal(a.get_state(), b.get_state()) for a, b in zip(fast, slow, strict=True))
    for dtype in (torch.float32, torch.float64):  # the global RNG; float64 draws take exponential_ itself
        torch.manual_seed(9)
        got = exponential_rows(40, [None], torch.device("cpu"), dtype)
        torch.manual_seed(9)
        assert torch.equal(got[0], torch.empty(40, dtype=dtype).exponential_())


def test_samples_follow_the_filtered_distribution() -> None:
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    params = SamplingParams(top_k=3)
    counts = torch.bincount(torch.tensor(draws(logits, params, 0, 4000)), minlength=5).float()
    assert counts[3] == 0 and counts[4] == 0
    expected = torch.softmax(logits[:3], -1) * 4000
    assert torch.all((counts[:3] - expected).abs() < 5 * expected.sqrt())


def test_unit_mask_is_respected() -> None:
    mask = unit_mask(V, unit_offset=100, unit_count=15, eos_token_id=3)
    assert mask.sum() == 16 and mask[3] and mask[100] and mask[114] and not mask[99] and not mask[115]
    logits = torch.zeros(8, V)
    logits[:, :100] = 10.0  # text tokens are far more likely: only the mask keeps them out
    gens = [make_generator(s) for s in range(8)]
    for _ in range(20):
        picked = sample(logits, TTS_SAMPLING, gens, allowed=mask)
        assert mask[picked].all()
    unconstrained = sample(logits, TTS_SAMPLING, gens)  # the reference's sampling over the whole vocab
    assert (unconstrained < 100).all()
    with pytest.raises(ValueError, match="inside a vocab"):
        unit_mask(V, 110, 15, 3)


def test_generation_config_semantics() -> None:
    qwen = SamplingParams.from_generation_config(QWEN_FILE)
    assert qwen == SamplingParams(True, 0.7, 20, 0.8, 1.05)
    assert SamplingParams.from_generation_config({**QWEN_FILE, "num_beams": 1, "min_p": None}) == qwen
    # The reference's greedy call: warpers inert, the file's repetition penalty still applies.
    greedy = SamplingParams.from_generation_config(
        QWEN_FILE, do_sample=False, temperature=0.0, top_k=None, top_p=None
    )
    assert greedy.greedy and greedy.repetition_penalty == 1.05
    # No file: transformers' defaults (greedy, no penalty); a file without top_k gets the default 50.
    assert SamplingParams.from_generation_config(None).greedy
    assert SamplingParams.from_generation_config(None).repetition_penalty == 1.0
    assert SamplingParams.from_generation_config({"do_sample": True}).top_k == 50
    assert SamplingParams.from_generation_config({"do_sample": True, "top_k": None}).top_k == 0
    settings = GenerationSettings.from_generation_config(
        QWEN_FILE, config_eos_token_id=151645, max_new_tokens=256
    )
    assert settings.eos_token_ids == (151645, 151643) and settings.max_new_tokens == 256
    fallback = GenerationSettings.from_generation_config(None, config_eos_token_id=151645)
    assert fallback.eos_token_ids == (151645,) and fallback.sampling.greedy


@pytest.mark.parametrize(
    ("file", "match"),
    [
        ({"top_k": "20"}, "'top_k' expected an int"),
        ({"top_p": 1.5}, "'top_p' out of range"),
        ({"repetition_penalty": 0}, "'repetition_penalty' out of range"),
        ({"do_sample": 1}, "'do_sample' expected a bool"),
        ({"do_sample": True, "temperature": 0.0}, "'temperature' expected > 0"),
        ({"eos_token_id": ["x"]}, "'eos_token_id' expected"),
        ({"no_repeat_ngram_size": 3}, "'no_repeat_ngram_size' = 3 is not supported"),
        ({"num_beams": 4}, "'num_beams' = 4 is not supported"),
    ],
)
def test_bad_generation_config_fields_name_the_field(file: dict, match: str) -> None:
    with pytest.raises(CheckpointError, match=match):
        GenerationSettings.from_generation_config(
            file, config_eos_token_id=2, where="m/generation_config.json"
        )


def test_invalid_sampling_params_and_batch_arguments() -> None:
    with pytest.raises(ValueError, match="top_k"):
        SamplingParams(top_k=-1)
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0 - 1e-3)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=float("nan"))
    logits = torch.zeros(2, V)
    with pytest.raises(ValueError, match="expected 2 SamplingParams"):
        sample(logits, [GREEDY])
    with pytest.raises(ValueError, match="generators: expected 2"):
        sample(logits, TTS_SAMPLING, [None])
    with pytest.raises(ValueError, match="history\\[0\\]: expected token ids"):
        sample(logits, SamplingParams(repetition_penalty=1.1), history=[[V], []])
    with pytest.raises(ValueError, match="allowed: expected"):
        sample(logits, TTS_SAMPLING, allowed=torch.ones(V + 1, dtype=torch.bool))
