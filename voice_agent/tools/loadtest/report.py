"""The load test's output: the table on stdout, the run's JSON file, its PNG plots, and the A/B table.

The JSON file (`loadtest.json`, schema in docs/loadtest.md, version `records.SCHEMA_VERSION`) holds the
run's settings, every step's summary (stats.StepSummary) and every turn (records.TurnRecord) tagged with
its step and phase ("warmup", "measured", or "outside" the window); `read_run` reads it back and refuses
another schema version. Plots are drawn on matplotlib `Figure`s (the Agg canvas; no pyplot, no display).
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from voice_agent.errors import VoiceAgentError
from voice_agent.tools.loadtest.records import SCHEMA_VERSION, TurnRecord
from voice_agent.tools.loadtest.stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    CONFIDENCE,
    GAP_THRESHOLDS_MS,
    QUANTILES,
    StepSummary,
    compare,
)

PHASES = ("warmup", "measured", "outside")
JSON_NAME = "loadtest.json"
PLOT_NAMES = ("first_audio_vs_callers.png", "first_audio_cdf.png", "underruns_vs_callers.png", "timeline.png")
DPI = 100
TIMELINE_TURNS = 8  # the caller's first turns drawn: more and a 20 ms gap is lost on the axis


class RunFileError(VoiceAgentError):
    """A run file (--compare) that is not a loadtest JSON of this schema."""

    code = "bad_run_file"


@dataclass
class Turn:
    step: int
    phase: str  # one of PHASES
    record: TurnRecord

    def to_json(self) -> dict[str, Any]:
        return {"step": self.step, "phase": self.phase, **self.record.to_json()}


@dataclass
class Run:
    """Everything one run measured: its settings (`info`), the steps' summaries and every turn."""

    info: dict[str, Any]
    steps: list[StepSummary] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)

    def measured(self, step: int) -> list[TurnRecord]:
        return [t.record for t in self.turns if t.step == step and t.phase == "measured"]

    def first_audio(self, step: int) -> list[float]:
        """The latency population of a step: measured, answered, not early."""
        return [r.first_audio_ms for r in self.measured(step)
                if r.error is None and not r.early and r.first_audio_ms is not None]

    def to_json(self) -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "tool": "voice-agent loadtest", "run": self.info,
                "steps": [s.to_json() for s in self.steps], "turns": [t.to_json() for t in self.turns]}


def write_run(run: Run, path: Path) -> None:
    """Write the run's JSON (atomically: a half-written file never replaces a whole one)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(run.to_json(), indent=1, allow_nan=False) + "\n")
    tmp.replace(path)


def _record(row: dict[str, Any]) -> TurnRecord:
    fields = {k: v for k, v in row.items() if k not in ("step", "phase")}
    fields["reply_chunks"] = [(float(t), float(d)) for t, d in fields.get("reply_chunks", [])]
    return TurnRecord(**fields)


def read_run(path: Path) -> Run:
    """A run's JSON file back as a `Run`; RunFileError names what does not fit."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RunFileError(f"{path}: expected a loadtest JSON file, got {type(e).__name__}: {e}") from None
    if not isinstance(doc, dict) or doc.get("schema_version") != SCHEMA_VERSION:
        got = doc.get("schema_version") if isinstance(doc, dict) else type(doc).__name__
        raise RunFileError(f"{path}: expected schema_version {SCHEMA_VERSION}, got {got!r}")
    try:
        turns = [Turn(int(row["step"]), str(row["phase"]), _record(row)) for row in doc["turns"]]
        return Run(doc["run"], [StepSummary.from_json(s) for s in doc["steps"]], turns)
    except (KeyError, TypeError, ValueError) as e:
        raise RunFileError(f"{path}: expected loadtest schema {SCHEMA_VERSION} fields, got {e!r}") from None


# ---- the table ---------------------------------------------------------------------------------------------
def _ms(v: float | None) -> str:
    return "-" if v is None else f"{v:.0f}"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def _pct(v: float | None) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


def format_table(steps: Sequence[StepSummary]) -> str:
    """The p50 / p90 / p95 / p99 table of every step, then continuity, errors and the SLO."""
    head = (f"{'N':>4} {'turns':>5} {'early':>5} {'fail':>4} | {'first audio ms  p50':>19} {'p90':>6} {'p95':>6} "
            f"{'p99':>6} | {'speech stopped p50':>18} {'p95':>6} | {'first text p50':>14} {'p95':>6}")
    lines = [head, "-" * len(head)]
    for s in steps:
        fa, ss, ft = s.first_audio_ms, s.speech_stopped_ms, s.first_text_ms
        lines.append(f"{s.callers:>4} {s.turns:>5} {s.early:>5} {s.failed:>4} | {_ms(fa['p50']):>19} "
                     f"{_ms(fa['p90']):>6} {_ms(fa['p95']):>6} {_ms(fa['p99']):>6} | {_ms(ss['p50']):>18} "
                     f"{_ms(ss['p95']):>6} | {_ms(ft['p50']):>14} {_ms(ft['p95']):>6}")
    gaps = " ".join(f"{'<=' + str(x):>6}" for x in GAP_THRESHOLDS_MS)
    head2 = (f"{'N':>4} {'replies':>7} | {'underrun share':>14} {'no gap over ms ' + gaps:>36} | "
             f"{'RTF p50':>7} {'p95':>5} | {'barge-ins':>9} {'->interrupted p50':>17} | SLO")
    lines += ["", head2, "-" * len(head2)]
    for s in steps:
        shares = " ".join(f"{_pct(s.no_gap_over_ms[str(x)]):>6}" for x in GAP_THRESHOLDS_MS)
        slo = "-" if s.slo is None else ("holds" if s.slo["holds"] else "FAILS " + "; ".join(
            c["clause"] for c in s.slo["checks"] if not c["holds"]))
        lines.append(f"{s.callers:>4} {s.replies:>7} | {_pct(s.underrun_share):>14} {shares:>36} | "
                     f"{_ratio(s.rtf['p50']):>7} {_ratio(s.rtf['p95']):>5} | "
                     f"{s.barge_ins:>9} {_ms(s.barge_onset_to_interrupted_ms['p50']):>17} | {slo}")
    for s in steps:
        for text, count in s.errors.items():
            lines.append(f"  N={s.callers}: {count} x {text}")
        if s.cut:
            lines.append(f"  N={s.callers}: {s.cut} turns cut short by the run's end (left out)")
    return "\n".join(lines)


def format_comparison(a: Run, b: Run, *, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> str:
    """B/A of first-audio percentiles per N that both runs measured, with bootstrap intervals."""
    lines = [f"first audio, B/A per percentile; {CONFIDENCE:.0%} interval from {resamples} two-sample bootstrap "
             f"resamples (seed {seed})",
             f"  A: {a.info.get('url', '?')} {a.info.get('protocol', '?')} ({a.info.get('started_at', '?')})",
             f"  B: {b.info.get('url', '?')} {b.info.get('protocol', '?')} ({b.info.get('started_at', '?')})",
             f"{'N':>4} {'pct':>4} {'A ms':>7} {'B ms':>7} {'B/A':>6} {'interval':>15}  verdict"]
    b_steps = {s.callers: s for s in b.steps}
    common = [s for s in a.steps if s.callers in b_steps]
    if not common:
        lines.append(f"  no N in common: A has {[s.callers for s in a.steps]}, B has {[s.callers for s in b.steps]}")
    for sa in common:
        sb = b_steps[sa.callers]
        for r in compare(a.first_audio(sa.step), b.first_audio(sb.step), resamples=resamples, seed=seed):
            interval = "-" if r.low is None else f"[{r.low:.2f}, {r.high:.2f}]"
            note = f" (n={min(r.n_a, r.n_b)}: near the extreme value)" if r.few else ""
            ratio = "-" if r.ratio is None else f"{r.ratio:.2f}"
            lines.append(f"{sa.callers:>4} {'p' + str(r.quantile):>4} {_ms(r.a):>7} {_ms(r.b):>7} {ratio:>6} "
                         f"{interval:>15}  {r.verdict}{note}")
        lines.append(f"{sa.callers:>4} underrun share A {_pct(sa.underrun_share)}, B {_pct(sb.underrun_share)}; "
                     f"failed A {sa.failed}/{sa.turns}, B {sb.failed}/{sb.turns}")
    return "\n".join(lines)


# ---- the plots ---------------------------------------------------------------------------------------------
def _figure(width: float = 7.0, height: float = 4.5) -> Any:
    from matplotlib.figure import Figure  # Figure draws on the Agg canvas: no pyplot, no display

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _callers_axis(ax: Any, steps: Sequence[StepSummary]) -> None:
    ns = sorted({s.callers for s in steps})
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.minorticks_off()
    ax.set_xlabel("concurrent callers (N)")
    ax.grid(True, alpha=0.3)


def plot_percentiles(steps: Sequence[StepSummary], path: Path, slo_ms: float | None = None) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    for q in QUANTILES:
        points = [(s.callers, s.first_audio_ms[f"p{q}"]) for s in steps if s.first_audio_ms[f"p{q}"] is not None]
        ax.plot([n for n, _ in points], [v for _, v in points], marker="o", label=f"p{q}")
    if slo_ms is not None:
        ax.axhline(slo_ms, color="red", linestyle="--", linewidth=1, label=f"SLO p95 {slo_ms:g} ms")
    _callers_axis(ax, steps)
    ax.set_ylabel("first audio after end of speech (ms)")
    ax.set_title("Time to first audio vs concurrent callers")
    ax.legend()
    fig.savefig(path)


def plot_cdf(run: Run, path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    for s in run.steps:
        values = sorted(run.first_audio(s.step))
        if values:
            ax.step(values, [(i + 1) / len(values) for i in range(len(values))], where="post",
                    label=f"N={s.callers} ({len(values)} turns)")
    ax.set_xlabel("first audio after end of speech (ms)")
    ax.set_ylabel("share of turns")
    ax.set_ylim(0, 1.02)
    ax.grid(True, alpha=0.3)
    ax.set_title("CDF of time to first audio, per step")
    if ax.get_legend_handles_labels()[0]:
        ax.legend()
    fig.savefig(path)


def plot_underruns(steps: Sequence[StepSummary], path: Path) -> None:
    fig = _figure()
    ax = fig.add_subplot()
    series: list[tuple[str, list[float | None]]] = [("any underrun", [s.underrun_share for s in steps])]
    for x in GAP_THRESHOLDS_MS:
        clean = [s.no_gap_over_ms[str(x)] for s in steps]
        series.append((f"gap > {x} ms", [None if c is None else 1 - c for c in clean]))
    for label, shares in series:
        points = [(s.callers, v) for s, v in zip(steps, shares, strict=True) if v is not None]
        ax.plot([n for n, _ in points], [100 * v for _, v in points], marker="o", label=label)
    _callers_axis(ax, steps)
    ax.set_ylabel("share of replies (%)")
    ax.set_ylim(bottom=0)
    ax.set_title("Playback underruns vs concurrent callers")
    ax.legend()
    fig.savefig(path)


def playback(record: TurnRecord) -> tuple[list[tuple[float, float]], list[tuple[float, float]]]:
    """A reply's simulated playback, in ms after the end of speech: (audio playing, underrun gaps) as
    (start, end) spans. Playback starts at `reply_started_ms` (first byte + jitter buffer) and plays each
    chunk when it has arrived and the one before has played."""
    if not record.reply_chunks:
        return [], []
    first = record.reply_chunks[0][0]
    play = record.reply_started_ms if record.reply_started_ms is not None else first + record.jitter_ms
    spans: list[tuple[float, float]] = []
    gaps: list[tuple[float, float]] = []
    for arrival, audio_ms in record.reply_chunks:
        if arrival > play:
            if spans:
                gaps.append((play, arrival))
            play = arrival
        if spans and math.isclose(spans[-1][1], play):
            spans[-1] = (spans[-1][0], play + audio_ms)
        else:
            spans.append((play, play + audio_ms))
        play += audio_ms
    return spans, gaps


def plot_timeline(records: Sequence[TurnRecord], path: Path) -> None:
    """One caller's turns on its own clock: speech sent, reply audio arrivals, playback and its gaps."""
    fig = _figure(10.0, 3.6)
    ax = fig.add_subplot()
    records = sorted(records, key=lambda r: r.turn)[:TIMELINE_TURNS]
    origin = min((r.speech_end - r.speech_s for r in records), default=0.0)
    rows = {"speech": 3, "arrivals": 2, "playback": 1}
    labelled: set[str] = set()

    def bar(row: str, spans: list[tuple[float, float]], color: str, label: str) -> None:
        if spans:  # the edge keeps a 20 ms gap visible on a minute-long axis
            ax.broken_barh([(a, b - a) for a, b in spans], (rows[row] - 0.35, 0.7), facecolor=color,
                           edgecolor=color, linewidth=1, label=None if label in labelled else label)
            labelled.add(label)

    for r in records:
        end = r.speech_end - origin  # s on the plot
        bar("speech", [(end - r.speech_s, end)], "tab:blue", "caller speech")
        spans, gaps = playback(r)
        bar("playback", [(end + a / 1000, end + b / 1000) for a, b in spans], "tab:green", "reply playing")
        bar("playback", [(end + a / 1000, end + b / 1000) for a, b in gaps], "tab:red", "underrun (gap)")
        bar("arrivals", [(end + t / 1000, end + (t + d) / 1000) for t, d in r.reply_chunks], "tab:olive",
            "reply audio received")
        if r.first_audio_ms is not None:
            ax.annotate(f"{r.first_audio_ms:.0f} ms", (end + r.first_audio_ms / 1000, rows["arrivals"] + 0.4),
                        fontsize=7, ha="left", va="bottom")
    ax.set_yticks(list(rows.values()), list(rows))
    ax.set_ylim(0.3, 3.9)
    ax.set_xlabel("seconds since the caller first spoke (caller's monotonic clock)")
    caller = records[0].caller if records else "?"
    ax.set_title(f"Caller {caller}: speech, reply audio, playback gaps (labels: first audio after end of speech)")
    ax.grid(True, axis="x", alpha=0.3)
    if labelled:
        ax.legend(loc="upper right", fontsize=7, ncols=4)
    fig.savefig(path)


def timeline_records(run: Run) -> list[TurnRecord]:
    """The turns of the caller drawn on the timeline: caller 0 of the last step that has replies."""
    for s in reversed(run.steps):
        records = [t.record for t in run.turns if t.step == s.step and t.record.caller == 0]
        if any(r.reply_chunks for r in records):
            return records
    return [t.record for t in run.turns if t.record.caller == 0 and t.step == (run.turns[0].step if run.turns else 0)]


def write_plots(run: Run, out: Path, slo_ms: float | None = None) -> list[Path]:
    """The four PNGs of a run into `out`; returns their paths."""
    paths = [out / name for name in PLOT_NAMES]
    plot_percentiles(run.steps, paths[0], slo_ms)
    plot_cdf(run, paths[1])
    plot_underruns(run.steps, paths[2])
    plot_timeline(timeline_records(run), paths[3])
    return paths
