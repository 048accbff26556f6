"""The load test's figures: percentiles, one ramp step's summary, the SLO, and the A/B comparison of two runs.

Percentiles are numpy's default ("linear", Hyndman & Fan type 7): sort the n values, take rank
q/100 * (n - 1) and interpolate linearly between its two neighbours. p50 of [100, 200] is 150; p99 of
fewer than 100 values lies between the two largest, so it says little more than the max: `MIN_TURNS`
names how many values a percentile needs before at least one value lies above it, and the report marks
figures read from fewer.

A step's turns split three ways: failed (an error, or no reply audio at all), early (the reply began
before the caller finished speaking: counted, left out of every latency figure), and answered. Latency
percentiles are over answered turns; continuity figures (underruns, gaps) are over every reply with audio,
early ones included, since the caller hears those too. "Underrun share" is the share of replies whose
simulated playback ran dry at least once; "no gap over X ms" the share whose longest underrun was at most
X ms (the playback gap the caller hears, not the network's arrival gap, which is `max_gap_ms`).

`compare(a, b)` is a two-sample percentile bootstrap: `BOOTSTRAP_RESAMPLES` resamples of each run's
values (with replacement, sizes kept), a fixed `BOOTSTRAP_SEED`, and the central `CONFIDENCE` interval of
the ratio B/A of each percentile. The runs are resampled independently, not as pairs: under load a
turn's latency depends on what the other callers were doing at that moment, which no second run repeats,
so turn i of A has no partner in B. An interval that contains 1.0 means the two runs do not differ
beyond what their own spread explains.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from voice_agent.errors import VoiceAgentError
from voice_agent.tools.loadtest.records import TurnRecord

QUANTILES = (50, 90, 95, 99)
MIN_TURNS = {q: math.ceil(100 / (100 - q)) for q in QUANTILES}  # values needed for one to lie above pq
GAP_THRESHOLDS_MS = (50, 100, 200)  # "no gap over X ms": the longest playback underrun of a reply
BOOTSTRAP_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
BOOTSTRAP_BLOCK = 250  # resamples drawn at once (bounds memory: block x n values)
CONFIDENCE = 0.95
DEFAULT_SLO = "p95_first_audio_ms<=800,underrun_share<=0.01,error_share<=0.01"

Percentiles = dict[str, float | None]  # {"p50": ..., "p90": ..., "p95": ..., "p99": ...}; None: no values


class SloError(VoiceAgentError, ValueError):
    """An --slo string that cannot be read."""

    code = "bad_slo"


def percentile(values: Sequence[float], q: float) -> float | None:
    """The `q`-th percentile (0..100) of `values` by linear interpolation (type 7); None for no values."""
    if not 0 <= q <= 100:
        raise ValueError(f"expected a percentile in [0, 100], got {q}")
    if len(values) == 0:
        return None
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def percentiles(values: Sequence[float]) -> Percentiles:
    """p50 / p90 / p95 / p99 of `values` (each None when there are no values)."""
    return {f"p{q}": percentile(values, q) for q in QUANTILES}


def _share(hits: int, total: int) -> float | None:
    return hits / total if total else None


# ---- one step ----------------------------------------------------------------------------------------------
@dataclass
class StepSummary:
    """The figures of one ramp step: `callers` at once, over the turns measured in its window."""

    step: int
    callers: int
    window_s: float  # how long the measurement window lasted
    turns: int  # turns measured (every kind but cut)
    answered: int  # turns with reply audio, not early: the latency figures' population
    early: int  # replies that began before the caller finished speaking
    failed: int  # turns with an error or without any reply audio
    error_share: float | None  # failed / turns
    first_audio_ms: Percentiles  # true end of speech -> first reply audio byte (the headline)
    speech_stopped_ms: Percentiles  # true end of speech -> the server's speech-stopped event
    first_text_ms: Percentiles  # true end of speech -> first reply text
    replies: int  # replies with audio, early ones included: the continuity figures' population
    underrun_share: float | None  # share of replies whose playback ran dry at least once
    no_gap_over_ms: dict[str, float | None]  # {"50": share of replies whose worst underrun <= 50 ms, ...}
    underrun_worst_ms: Percentiles  # the worst underrun per reply
    max_gap_ms: Percentiles  # the longest wait between two arriving audio chunks per reply (network)
    rtf: Percentiles  # reply wall time from first byte to done / reply audio length (< 1: faster than real time)
    reply_audio_s_mean: float | None
    barge_ins: int
    barge_onset_to_last_audio_ms: Percentiles  # caller talks over the reply -> last reply audio (or clear)
    barge_onset_to_interrupted_ms: Percentiles  # -> the server's interrupted event
    next_turn_answered_share: float | None  # after a barge-in, share of next turns that got a reply
    cut: int = 0  # turns the run's end cut short: left out of every figure
    errors: dict[str, int] = field(default_factory=dict)  # error text -> count (the first 80 characters)
    slo: dict[str, Any] | None = None  # SloResult.to_json(), once evaluated

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, row: dict[str, Any]) -> StepSummary:
        names = {f.name for f in cls.__dataclass_fields__.values()}
        missing = names - row.keys() - {"cut", "errors", "slo"}
        if missing:
            raise ValueError(f"expected a step with {sorted(names)}, got one without {sorted(missing)}")
        return cls(**{k: v for k, v in row.items() if k in names})


def summarize(records: Sequence[TurnRecord], *, step: int, callers: int, window_s: float) -> StepSummary:
    """The figures of the turns measured in one step (warm-up turns already left out). Turns the run's end
    cut short are counted (`cut`) and left out of everything else: they are neither failures nor whole turns."""
    cut = [r for r in records if r.cut]
    records = [r for r in records if not r.cut]
    failed = [r for r in records if r.error is not None or (r.first_audio_ms is None and not r.early)]
    ok = [r for r in records if r.error is None]
    early = [r for r in ok if r.early]
    answered = [r for r in ok if not r.early and r.first_audio_ms is not None]
    replies = [r for r in ok if r.first_audio_ms is not None]
    barged = [r for r in ok if r.barge_in]
    after_barge = [r.next_turn_answered for r in barged if r.next_turn_answered is not None]
    errors: dict[str, int] = {}
    for r in failed:
        text = (r.error or "no reply audio")[:80]
        errors[text] = errors.get(text, 0) + 1

    def values(rows: Sequence[TurnRecord], get: Callable[[TurnRecord], float | None]) -> list[float]:
        return [v for v in map(get, rows) if v is not None]

    return StepSummary(
        step=step, callers=callers, window_s=window_s, turns=len(records), answered=len(answered),
        early=len(early), failed=len(failed), error_share=_share(len(failed), len(records)),
        first_audio_ms=percentiles(values(answered, lambda r: r.first_audio_ms)),
        speech_stopped_ms=percentiles(values(answered, lambda r: r.speech_stopped_ms)),
        first_text_ms=percentiles(values(answered, lambda r: r.first_text_ms)),
        replies=len(replies),
        underrun_share=_share(sum(1 for r in replies if r.underruns > 0), len(replies)),
        no_gap_over_ms={str(x): _share(sum(1 for r in replies if r.underrun_worst_ms <= x), len(replies))
                        for x in GAP_THRESHOLDS_MS},
        underrun_worst_ms=percentiles(values(replies, lambda r: r.underrun_worst_ms)),
        max_gap_ms=percentiles(values(replies, lambda r: r.max_gap_ms)),
        rtf=percentiles(values(replies, lambda r: r.rtf)),
        reply_audio_s_mean=float(np.mean([r.reply_audio_ms for r in replies])) / 1000 if replies else None,
        barge_ins=len(barged),
        barge_onset_to_last_audio_ms=percentiles(values(barged, lambda r: r.barge_onset_to_last_audio_ms)),
        barge_onset_to_interrupted_ms=percentiles(values(barged, lambda r: r.barge_onset_to_interrupted_ms)),
        next_turn_answered_share=_share(sum(after_barge), len(after_barge)),
        cut=len(cut), errors=errors,
    )


# ---- the SLO -----------------------------------------------------------------------------------------------
_PERCENTILE_FIGURES = ("first_audio", "speech_stopped", "first_text", "underrun_worst", "max_gap",
                       "barge_onset_to_last_audio", "barge_onset_to_interrupted")
_SHARES: dict[str, Callable[[StepSummary], float | None]] = {
    "underrun_share": lambda s: s.underrun_share,
    "error_share": lambda s: s.error_share,
    "early_share": lambda s: _share(s.early, s.turns),
    **{f"gap_over_{x}ms_share": (lambda s, x=x: None if s.no_gap_over_ms[str(x)] is None
                                  else 1.0 - float(s.no_gap_over_ms[str(x)]))  # type: ignore[misc]
       for x in GAP_THRESHOLDS_MS},
}
SLO_METRICS: tuple[str, ...] = (
    *(f"p{q}_{name}_ms" for name in _PERCENTILE_FIGURES for q in QUANTILES),
    *(f"p{q}_rtf" for q in QUANTILES),
    *_SHARES,
)
_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    "<=": lambda v, limit: v <= limit, "<": lambda v, limit: v < limit,
    ">=": lambda v, limit: v >= limit, ">": lambda v, limit: v > limit,
}
_CLAUSE = re.compile(r"^\s*([A-Za-z0-9_]+)\s*(<=|>=|<|>)\s*(\S+)\s*$")


def slo_value(summary: StepSummary, metric: str) -> float | None:
    """The value of one SLO metric on a step (None: the step has no values for it)."""
    if metric in _SHARES:
        return _SHARES[metric](summary)
    match = re.fullmatch(r"p(\d+)_(.+?)(_ms)?", metric)
    if metric not in SLO_METRICS or match is None:
        raise SloError(f"expected one of {', '.join(SLO_METRICS)}; got {metric!r}")
    figure = match[2] + ("_ms" if match[3] else "")
    table: Percentiles = getattr(summary, figure)
    return table[f"p{match[1]}"]


@dataclass(frozen=True)
class SloClause:
    metric: str
    op: str
    limit: float

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.limit:g}"


def parse_slo(text: str) -> tuple[SloClause, ...]:
    """`"p95_first_audio_ms<=800,underrun_share<=0.01"` -> its clauses; SloError says what is wrong."""
    parts = [p for p in text.split(",") if p.strip()]
    if not parts:
        raise SloError(f"expected METRIC<=NUMBER[,METRIC<=NUMBER...] (e.g. {DEFAULT_SLO!r}), got {text!r}")
    clauses = []
    for i, part in enumerate(parts, 1):
        match = _CLAUSE.match(part)
        if match is None:
            raise SloError(f"SLO clause {i}: expected METRIC OP NUMBER with OP one of <=, <, >=, > "
                           f"(e.g. p95_first_audio_ms<=800), got {part.strip()!r}")
        metric, op, number = match.groups()
        if metric not in SLO_METRICS:
            raise SloError(f"SLO clause {i}: expected a metric, one of {', '.join(SLO_METRICS)}; got {metric!r}")
        try:
            limit = float(number)
        except ValueError:
            raise SloError(f"SLO clause {i}: expected a number after {op!r}, got {number!r}") from None
        if not math.isfinite(limit):
            raise SloError(f"SLO clause {i}: expected a finite number after {op!r}, got {number!r}")
        clauses.append(SloClause(metric, op, limit))
    return tuple(clauses)


@dataclass
class SloResult:
    holds: bool
    checks: list[tuple[str, float | None, bool]]  # (clause, the step's value, held); no value never holds

    def to_json(self) -> dict[str, Any]:
        return {"holds": self.holds,
                "checks": [{"clause": c, "value": v, "holds": ok} for c, v, ok in self.checks]}

    def failures(self) -> list[str]:
        return [f"{c} (got {'no value' if v is None else f'{v:.4g}'})" for c, v, ok in self.checks if not ok]


def evaluate_slo(clauses: Sequence[SloClause], summary: StepSummary) -> SloResult:
    """Whether a step holds every clause. A clause whose figure has no value (no turns answered) fails."""
    checks = []
    for clause in clauses:
        value = slo_value(summary, clause.metric)
        checks.append((str(clause), value, value is not None and _OPERATORS[clause.op](value, clause.limit)))
    return SloResult(all(ok for _, _, ok in checks), checks)


def largest_holding(steps: Sequence[StepSummary]) -> int | None:
    """The largest N of the steps (in ramp order) before the first that fails its SLO; None if the first fails."""
    best = None
    for s in steps:
        if s.slo is None or not s.slo["holds"]:
            break
        best = s.callers
    return best


# ---- A/B ---------------------------------------------------------------------------------------------------
@dataclass
class Ratio:
    """Run B's percentile over run A's, with the bootstrap interval."""

    quantile: int
    a: float | None
    b: float | None
    ratio: float | None  # b / a
    low: float | None
    high: float | None
    n_a: int
    n_b: int

    @property
    def verdict(self) -> str:
        if self.low is None or self.high is None:
            return "no data"
        if self.high < 1.0:
            return "B lower"
        if self.low > 1.0:
            return "B higher"
        return "no clear difference"

    @property
    def few(self) -> bool:
        """Fewer values than the percentile needs in either run (then it is about the extreme value)."""
        return min(self.n_a, self.n_b) < MIN_TURNS[self.quantile]


def _bootstrap(values: np.ndarray, rng: np.random.Generator, resamples: int) -> np.ndarray:
    """(len(QUANTILES), resamples): each percentile of each resample of `values`."""
    out = []
    for start in range(0, resamples, BOOTSTRAP_BLOCK):
        block = min(BOOTSTRAP_BLOCK, resamples - start)
        idx = rng.integers(0, values.size, size=(block, values.size))  # (R, n)
        out.append(np.percentile(values[idx], QUANTILES, axis=1))  # (Q, R)
    return np.concatenate(out, axis=1)


def compare(a: Sequence[float], b: Sequence[float], *, resamples: int = BOOTSTRAP_RESAMPLES,
            seed: int = BOOTSTRAP_SEED, confidence: float = CONFIDENCE) -> list[Ratio]:
    """Per percentile, B/A with its two-sample bootstrap interval (same inputs and seed: same answer)."""
    if resamples < 1:
        raise ValueError(f"expected at least 1 resample, got {resamples}")
    if not 0 < confidence < 1:
        raise ValueError(f"expected a confidence in (0, 1), got {confidence}")
    va, vb = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if va.size == 0 or vb.size == 0:
        return [Ratio(q, percentile(a, q), percentile(b, q), None, None, None, va.size, vb.size) for q in QUANTILES]
    rng = np.random.default_rng(seed)
    qa, qb = _bootstrap(va, rng, resamples), _bootstrap(vb, rng, resamples)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratios = qb / qa  # (Q, R)
    tail = (1 - confidence) / 2 * 100
    result = []
    for i, q in enumerate(QUANTILES):
        pa, pb = float(np.percentile(va, q)), float(np.percentile(vb, q))
        finite = ratios[i][np.isfinite(ratios[i])]
        low, high = (None, None) if finite.size == 0 else (float(np.percentile(finite, tail)),
                                                            float(np.percentile(finite, 100 - tail)))
        result.append(Ratio(q, pa, pb, pb / pa if pa else None, low, high, va.size, vb.size))
    return result
