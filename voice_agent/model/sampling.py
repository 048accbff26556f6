"""Batched next-token choice with per-row settings, following transformers' `generate` semantics.

Per row, the logits (fp32) go through, in transformers' order:
    allowed-token mask (ours, optional) -> repetition penalty -> temperature -> top-k -> top-p,
then greedy rows take the argmax and sampling rows draw from the softmax. Temperature, top-k and top-p
act only when the row samples (transformers applies its warpers only with `do_sample`); the repetition
penalty acts in greedy mode too. The penalty covers the ids in that row's `history`: pass the GENERATED
ids only, since the reference calls `generate` with `inputs_embeds` and transformers then penalises
generated tokens only, never the prompt.

Each sampling row draws with its own `torch.Generator` (one seeded generator per session), so a
session's samples depend on its seed and logits only, never on which other sessions share the batch.
The draw uses the exponential race (argmax of p / q, q ~ Exp(1)), which samples the same distribution as
transformers' `torch.multinomial` but not the same stream of numbers for a given seed.

TTS defaults (`TTS_SAMPLING`): temperature 1.0, top-k 50, top-p 1.0, as the reference's TTS `generate`
gets from transformers' defaults. The reference samples over the whole TTS vocabulary; by default we
restrict the TTS to speech units + TTS eos (`unit_mask`), which changes the numbers (renormalised over
units). Pass `allowed=None` to sample exactly as the reference does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache
from typing import Any

import torch

from voice_agent.errors import CheckpointError

# transformers' GenerationConfig defaults for the fields `generate` reads when a file leaves them out.
HF_DEFAULTS: dict[str, Any] = {
    "do_sample": False,
    "temperature": 1.0,
    "top_k": 50,
    "top_p": 1.0,
    "repetition_penalty": 1.0,
}

# Other generation fields that would change decoding when active; a file that activates one is refused
# rather than decoded differently. Each maps to the test of "inactive".
UNSUPPORTED: dict[str, Any] = {
    "num_beams": lambda v: v in (None, 1),
    "no_repeat_ngram_size": lambda v: not v,
    "min_length": lambda v: not v,
    "min_new_tokens": lambda v: not v,
    "typical_p": lambda v: v is None or v >= 1.0,
    "min_p": lambda v: v is None,
    "top_h": lambda v: v is None,
    "epsilon_cutoff": lambda v: not v,
    "eta_cutoff": lambda v: not v,
    "bad_words_ids": lambda v: not v,
    "suppress_tokens": lambda v: not v,
    "begin_suppress_tokens": lambda v: not v,
    "sequence_bias": lambda v: not v,
    "forced_bos_token_id": lambda v: v is None,
    "forced_eos_token_id": lambda v: v is None,
}


@dataclass(frozen=True)
class SamplingParams:
    """How one row chooses its next token. Greedy when `do_sample` is False or `temperature` <= 0.

    `top_k` 0 and `top_p` 1.0 switch those filters off; `repetition_penalty` 1.0 switches the penalty off.
    """

    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.do_sample, bool):
            raise ValueError(f"SamplingParams.do_sample: expected a bool, got {self.do_sample!r}")
        for name in ("temperature", "top_p", "repetition_penalty"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"SamplingParams.{name}: expected a finite number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"SamplingParams.top_k: expected an int >= 0 (0 = off), got {self.top_k!r}")
        if not 0.0 <= self.top_p <= 1.0:
            raise ValueError(
                f"SamplingParams.top_p: expected a number in [0, 1] (1 = off), got {self.top_p!r}"
            )
        if not self.repetition_penalty > 0:
            raise ValueError(
                "SamplingParams.repetition_penalty: expected a number > 0 (1 = off), "
                f"got {self.repetition_penalty!r}"
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature <= 0

    @classmethod
    def from_generation_config(
        cls, config: Mapping[str, Any] | None, where: str = "generation_config.json", **call_kwargs: Any
    ) -> SamplingParams:
        """The settings `generate` would use given a `generation_config.json` dict (None when absent).

        `call_kwargs` are `generate` keyword arguments (do_sample, temperature, top_k, top_p,
        repetition_penalty); as in transformers they override the file, and an explicit None switches a
        filter off. Fields the file leaves out take transformers' defaults (top_k 50 among them).
        """
        file = dict(config or {})
        for key, inactive in UNSUPPORTED.items():
            if key in file and not inactive(file[key]):
                raise CheckpointError(f"{where}: field {key!r} = {file[key]!r} is not supported")
        values = dict(HF_DEFAULTS)
        for source, label in ((file, where), (call_kwargs, f"{where} (call arguments)")):
            for key in HF_DEFAULTS:
                if key in source:
                    values[key] = _check_field(source[key], key, label)
        unknown = set(call_kwargs) - set(HF_DEFAULTS)
        if unknown:
            raise ValueError(
                f"from_generation_config: unknown argument(s) {sorted(unknown)}, expected {list(HF_DEFAULTS)}"
            )
        do_sample = bool(values["do_sample"])
        temperature = 1.0 if values["temperature"] is None else float(values["temperature"])
        if do_sample and temperature <= 0:
            # transformers refuses this combination too (its temperature warper needs a positive value).
            raise CheckpointError(
                f"{where}: field 'temperature' expected > 0 with do_sample true, got {temperature}"
            )
        return cls(
            do_sample=do_sample,
            temperature=temperature,
            top_k=0 if values["top_k"] is None else int(values["top_k"]),
            top_p=1.0 if values["top_p"] is None else float(values["top_p"]),
            repetition_penalty=1.0
            if values["repetition_penalty"] is None
            else float(values["repetition_penalty"]),
        )


def _check_field(value: Any, key: str, where: str) -> Any:
    """Type- and range-check one generation field (None passes: it switches the field off)."""
    if value is None:
        return None
    if key == "do_sample":
        ok = isinstance(value, bool)
    elif key == "top_k":
        ok = isinstance(value, int) and not isinstance(value, bool)
    else:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok:
        expected = {"do_sample": "a bool", "top_k": "an int"}.get(key, "a number")
        raise CheckpointError(f"{where}: field {key!r} expected {expected}, got {value!r}")
    try:
        replace(SamplingParams(), **{key: value})
    except ValueError as e:
        raise CheckpointError(f"{where}: field {key!r} out of range ({e})") from e
    return value


@dataclass(frozen=True)
class GenerationSettings:
    """A model's decoding defaults: sampling settings, the stop (eos) ids, and max_new_tokens if given."""

    sampling: SamplingParams
    eos_token_ids: tuple[int, ...]
    max_new_tokens: int | None = None

    @classmethod
    def from_generation_config(
        cls,
        config: Mapping[str, Any] | None,
        *,
        config_eos_token_id: int | Sequence[int] | None,
        where: str = "generation_config.json",
        **call_kwargs: Any,
    ) -> GenerationSettings:
        """Read a `generation_config.json` dict (None when absent) as `generate` applies it.

        Stop ids: the file's `eos_token_id` (an int or a list) when present, else the model config's
        `config_eos_token_id` (what transformers derives when the model has no generation config).
        """
        call_kwargs = dict(call_kwargs)
        max_new = call_kwargs.pop("max_new_tokens", (config or {}).get("max_new_tokens"))
        if max_new is not None and (isinstance(max_new, bool) or not isinstance(max_new, int) or max_new < 1):
            raise CheckpointError(f"{where}: field 'max_new_tokens' expected a positive int, got {max_new!r}")
        sampling = SamplingParams.from_generation_config(config, where, **call_kwargs)
        eos = (config or {}).get("eos_token_id")
        source = where
        if eos is None:
            eos, source = config_eos_token_id, f"{where} (model config fallback)"
        ids = [eos] if isinstance(eos, int) else eos
        if (
            ids is None
            or not isinstance(ids, Sequence)
            or not ids
            or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids)
        ):
            raise CheckpointError(
                f"{source}: field 'eos_token_id' expected an id or a list of ids, got {eos!r}"
            )
        return cls(sampling=sampling, eos_token_ids=tuple(ids), max_new_tokens=max_new)


# The reference TTS `generate` call: do_sample, temperature 1.0, top_p 1.0, transformers' default top_k 50.
TTS_SAMPLING = SamplingParams(do_sample=True, temperature=1.0, top_k=50, top_p=1.0)
GREEDY = SamplingParams(do_sample=False)


def unit_mask(
    vocab_size: int,
    unit_offset: int,
    unit_count: int,
    eos_token_id: int,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """(V,) bool: True for the speech-unit ids [unit_offset, unit_offset + unit_count) and the TTS eos."""
    if unit_offset < 0 or unit_count < 1 or unit_offset + unit_count > vocab_size:
        raise ValueError(
            f"unit_mask: expected units [{unit_offset}, {unit_offset + unit_count}) "
            f"inside a vocab of {vocab_size}"
        )
    if not 0 <= eos_token_id < vocab_size:
        raise ValueError(f"unit_mask: expected eos id in [0, {vocab_size}), got {eos_token_id}")
    mask = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    mask[unit_offset : unit_offset + unit_count] = True
    mask[eos_token_id] = True
    return mask


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded generator for one session (it must live on the device of the logits)."""
    return torch.Generator(device=device).manual_seed(seed)


def _per_row(params: SamplingParams | Sequence[SamplingParams], B: int) -> list[SamplingParams]:
    rows = [params] * B if isinstance(params, SamplingParams) else list(params)
    if len(rows) != B:
        raise ValueError(f"params: expected {B} SamplingParams (one per row), got {len(rows)}")
    return rows


def _history_mask(
    history: Sequence[Sequence[int] | torch.Tensor | None], B: int, V: int, device: torch.device
) -> torch.Tensor:
    """(B, V) bool: True where the id occurs in that row's history (ids as lists or int tensors)."""
    if len(history) != B:
        raise ValueError(f"history: expected {B} entries (one per row), got {len(history)}")
    rows: list[torch.Tensor] = []
    ids: list[torch.Tensor] = []
    for b, h in enumerate(history):
        if h is None or len(h) == 0:
            continue
        if isinstance(h, torch.Tensor):
            row_ids = h.to(device=device, dtype=torch.int64).reshape(-1)
        else:
            bad = [i for i in h if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < V]
            if bad:
                raise ValueError(f"history[{b}]: expected token ids in [0, {V}), got {bad[:5]}")
            row_ids = torch.tensor(list(h), dtype=torch.int64).to(device)
        rows.append(torch.full_like(row_ids, b))
        ids.append(row_ids)
    mask = torch.zeros(B, V, dtype=torch.bool, device=device)
    if ids:
        mask[torch.cat(rows), torch.cat(ids)] = True
    return mask


def process_logits(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    history: Sequence[Sequence[int] | torch.Tensor | None] | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B, V) fp32 scores after mask, penalty and (sampling rows only) the warpers."""
    if logits.dim() != 2:
        raise ValueError(f"logits: expected (B, V), got {tuple(logits.shape)}")
    B, V = logits.shape
    rows = _per_row(params, B)
    device = logits.device
    scores = logits.float()
    if allowed is not None:
        if allowed.dtype != torch.bool or allowed.shape not in ((V,), (B, V)):
            raise ValueError(
                f"allowed: expected ({V},) or ({B}, {V}) bool, got {tuple(allowed.shape)} {allowed.dtype}"
            )
        scores = scores.masked_fill(~allowed, -math.inf)

    def column(values: list[float] | list[bool] | list[int]) -> torch.Tensor:
        first = values[0]
        dtype = (
            torch.bool
            if isinstance(first, bool)
            else torch.int64
            if isinstance(first, int)
            else torch.float32
        )
        return torch.tensor(values, dtype=dtype, device=device)[:, None]  # (B, 1)

    if history is not None and any(p.repetition_penalty != 1.0 for p in rows):
        penalty = column([float(p.repetition_penalty) for p in rows])
        penalised = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(_history_mask(history, B, V, device), penalised, scores)

    # The warpers act on sampling rows only; each is skipped for a row where transformers would skip it.
    temperatures = [float(p.temperature) if not p.greedy else 1.0 for p in rows]
    if any(t != 1.0 for t in temperatures):
        scores = scores / column(temperatures)

    top_ks = [min(p.top_k, V) if not p.greedy and p.top_k > 0 else 0 for p in rows]
    if any(top_ks):
        top = torch.topk(scores, max(top_ks), dim=-1).values  # (B, max k), descending
        kth = top.gather(1, column([max(k, 1) - 1 for k in top_ks]))  # (B, 1); ties with it are kept
        scores = scores.masked_fill(column([k > 0 for k in top_ks]) & (scores < kth), -math.inf)

    top_ps = [float(p.top_p) if not p.greedy else 1.0 for p in rows]
    if any(p < 1.0 for p in top_ps):
        ascending, order = torch.sort(scores, descending=False)  # (B, V)
        cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= column([1.0 - p if p < 1.0 else 0.0 for p in top_ps])
        drop[:, -1:] = False  # keep at least one token
        drop = drop.scatter(1, order, drop)
        scores = scores.masked_fill(column([p < 1.0 for p in top_ps]) & drop, -math.inf)
    return scores


def sample(
    logits: torch.Tensor,
    params: SamplingParams | Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None] | None = None,
    history: Sequence[Sequence[int] | torch.Tensor | None] | None = None,
    allowed: torch.Tensor | None = None,
) -> torch.Tensor:
    """(B, V) logits -> (B,) int64 next ids. Rows without a generator draw from torch's default RNG."""
    B = logits.shape[0]
    rows = _per_row(params, B)
    if generators is not None and len(generators) != B:
        raise ValueError(
            f"generators: expected {B} entries (one per row, None allowed), got {len(generators)}"
        )
    scores = process_logits(logits, rows, history, allowed)  # (B, V) fp32
    sampling_rows = [b for b, p in enumerate(rows) if not p.greedy]
    if len(sampling_rows) < B:
        chosen = scores.argmax(dim=-1)  # (B,), kept for the greedy rows
    else:  # every row samples: no argmax to take
        chosen = torch.empty(B, dtype=torch.int64, device=logits.device)
    if not sampling_rows:
        return chosen
    probs = scores[sampling_rows].softmax(dim=-1)  # (Bs, V)
    noise = exponential_rows(probs.shape[1], [None if generators is None else generators[b] for b in sampling_rows],
                             probs.device, probs.dtype)  # (Bs, V)
    noise.clamp_min_(torch.finfo(noise.dtype).tiny)  # an exact 0 would turn p = 0 into 0 / 0
    drawn = (probs / noise).argmax(dim=-1)  # (Bs,)
    chosen[torch.tensor(sampling_rows, device=logits.device)] = drawn
    return chosen


def exponential_rows(
    n: int, generators: Sequence[torch.Generator | None], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """(len(generators), n) Exp(1) draws, row i from `generators[i]` (None: torch's default RNG): the same
    numbers as `torch.empty(n).exponential_(generator=g)` row by row, leaving each generator in the same state.

    On the CPU, `exponential_` draws element by element (-log1p(-u), u a float64 uniform); drawing the
    uniforms with `uniform_` and transforming them as a whole is the same arithmetic, about 2.5x faster.
    The vectorised float64 log1p may differ from the scalar one in the last float64 bit, which rounding to
    float32 hides, so this path serves float32 (and narrower) draws only. The equivalence is checked once
    against this torch build; elsewhere (or if it fails) rows use `exponential_` itself.
    """
    fast = torch.device(device).type == "cpu" and torch.finfo(dtype).bits <= 32
    if fast and _cpu_exponential_is_log1p_of_uniform():
        uniform = torch.empty(len(generators), n, dtype=torch.float64)
        for row, generator in zip(uniform, generators, strict=True):
            row.uniform_(generator=generator)
        return _exponential_from_uniform(uniform).to(dtype)
    noise = torch.empty(len(generators), n, dtype=dtype, device=device)
    for row, generator in zip(noise, generators, strict=True):
        row.exponential_(generator=generator)
    return noise


def _exponential_from_uniform(uniform: torch.Tensor) -> torch.Tensor:
    """-log1p(-u), in place on float64 uniforms u in [0, 1): torch's CPU exponential transform."""
    return uniform.neg_().log1p_().neg_()


@lru_cache(maxsize=1)
def _cpu_exponential_is_log1p_of_uniform() -> bool:
    """Whether this torch build's CPU `exponential_` equals `_exponential_from_uniform` of `uniform_` float64
    draws (values and generator state), on a few thousand draws of fixed seeds."""
    for seed, n in ((0, 3), (1, 1000), (2, 4099)):
        a, b = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
        want = torch.empty(n).exponential_(generator=a)
        got = _exponential_from_uniform(torch.empty(n, dtype=torch.float64).uniform_(generator=b)).float()
        if not (torch.equal(want, got) and torch.equal(a.get_state(), b.get_state())):
            return False
    return True
