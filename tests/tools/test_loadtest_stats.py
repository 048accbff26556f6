"""`voice-agent loadtest` figures and report: percentiles, a step's summary, the SLO, the bootstrap A/B, the
JSON file's round trip and the plots, all from synthetic TurnRecords (no server)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from voice_agent.tools.loadtest.records import SCHEMA_VERSION, TurnRecord
from voice_agent.tools.loadtest.report import (
    JSON_NAME,
    PLOT_NAMES,
    Run,
    RunFileError,
    Turn,
    format_comparison,
    format_table,
    playback,
    read_run,
    write_plots,
    write_run,
)
from voice_agent.tools.loadtest.stats import (
    DEFAULT_SLO,
    MIN_TURNS,
    SLO_METRICS,
    SloError,
    StepSummary,
    compare,
    evaluate_slo,
    largest_holding,
    parse_slo,
    percentile,
    percentiles,
    summarize,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def record(caller: int = 0, turn: int = 0, first_audio_ms: float | None = 500.0, **kw: Any) -> TurnRecord:
    """A plausible answered turn: 2 s of speech ending at 10 + 8 * turn s, 1 s of reply in 20 ms chunks."""
    start = 0.0 if first_audio_ms is None else first_audio_ms
    chunks = [] if first_audio_ms is None else [(start + 20.0 * i, 20.0) for i in range(50)]
    fields: dict[str, Any] = dict(
        caller=caller, turn=turn, protocol="native", utterance="q01_pharmacy", speech_s=2.0,
        speech_end=10.0 + 8.0 * turn, speech_stopped_ms=300.0, first_text_ms=None if first_audio_ms is None else
        first_audio_ms - 50, first_audio_ms=first_audio_ms, reply_audio_ms=1000.0 if chunks else 0.0,
        reply_done_ms=None if first_audio_ms is None else first_audio_ms + 1000, rtf=0.5 if chunks else None,
        server_timings={"first_audio_ms": 120.0}, early=False, underruns=0, underrun_total_ms=0.0,
        underrun_worst_ms=0.0, max_gap_ms=20.0, jitter_ms=60.0,
        reply_started_ms=None if first_audio_ms is None else first_audio_ms + 60, reply_chunks=chunks)
    fields.update(kw)
    return TurnRecord(**fields)


# ---- percentiles -------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("values", "q", "expected"), [
    ([100.0], 50, 100.0),
    ([100.0], 99, 100.0),
    ([100.0, 200.0], 50, 150.0),  # linear interpolation between the two ranks
    ([1.0, 2.0, 3.0, 4.0, 5.0], 50, 3.0),
    ([1.0, 2.0, 3.0, 4.0, 5.0], 90, 4.6),  # rank 0.9 * 4 = 3.6: 4 + 0.6 * (5 - 4)
    ([5.0, 1.0, 4.0, 2.0, 3.0], 95, 4.8),  # order does not matter
    (list(range(1, 101)), 99, 99.01),  # rank 98.01
    (list(range(1, 101)), 95, 95.05),
    ([], 50, None),
])
def test_percentile_is_linear_interpolation_between_ranks(values: list[float], q: float,
                                                          expected: float | None) -> None:
    got = percentile(values, q)
    assert got == (None if expected is None else pytest.approx(expected))


def test_percentiles_table_and_the_turns_each_needs() -> None:
    assert percentiles([10.0, 20.0, 30.0]) == {"p50": 20.0, "p90": pytest.approx(28.0), "p95": pytest.approx(29.0),
                                               "p99": pytest.approx(29.8)}
    assert percentiles([]) == {"p50": None, "p90": None, "p95": None, "p99": None}
    assert MIN_TURNS == {50: 2, 90: 10, 95: 20, 99: 100}
    with pytest.raises(ValueError, match="expected a percentile in"):
        percentile([1.0], 101)


# ---- one step ----------------------------------------------------------------------------------------------
def test_summary_leaves_early_replies_and_failures_out_of_latency() -> None:
    records = [record(turn=i, first_audio_ms=100.0 * (i + 1)) for i in range(4)]  # 100..400 ms
    records += [record(turn=4, first_audio_ms=-300.0, early=True)]  # began before the caller finished
    records += [record(turn=5, first_audio_ms=None, error="connection closed 1011")]
    records += [record(turn=6, first_audio_ms=None)]  # no error, but never answered
    s = summarize(records, step=0, callers=2, window_s=30.0)
    assert (s.turns, s.answered, s.early, s.failed) == (7, 4, 1, 2)
    assert s.error_share == pytest.approx(2 / 7)
    assert s.first_audio_ms["p50"] == pytest.approx(250.0)
    assert s.replies == 5  # continuity covers the early reply too
    assert s.errors == {"connection closed 1011": 1, "no reply audio": 1}


def test_summary_underrun_share_and_gap_thresholds() -> None:
    records = [record(turn=0), record(turn=1, underruns=1, underrun_total_ms=40.0, underrun_worst_ms=40.0),
               record(turn=2, underruns=2, underrun_total_ms=180.0, underrun_worst_ms=120.0),
               record(turn=3, underruns=1, underrun_total_ms=300.0, underrun_worst_ms=300.0)]
    s = summarize(records, step=0, callers=1, window_s=10.0)
    assert s.underrun_share == pytest.approx(0.75)
    assert s.no_gap_over_ms == {"50": pytest.approx(0.5), "100": pytest.approx(0.5), "200": pytest.approx(0.75)}
    assert s.rtf["p50"] == pytest.approx(0.5)
    assert s.reply_audio_s_mean == pytest.approx(1.0)


def test_summary_barge_in_figures() -> None:
    records = [record(turn=0, barge_in=True, barge_onset_to_last_audio_ms=80.0, barge_onset_to_interrupted_ms=150.0,
                      next_turn_answered=True),
               record(turn=1, barge_in=True, barge_onset_to_last_audio_ms=120.0, barge_onset_to_interrupted_ms=250.0,
                      next_turn_answered=False),
               record(turn=2)]
    s = summarize(records, step=0, callers=1, window_s=10.0)
    assert s.barge_ins == 2
    assert s.barge_onset_to_last_audio_ms["p50"] == pytest.approx(100.0)
    assert s.barge_onset_to_interrupted_ms["p50"] == pytest.approx(200.0)
    assert s.next_turn_answered_share == pytest.approx(0.5)


def test_an_empty_step_has_no_figures() -> None:
    s = summarize([], step=3, callers=8, window_s=0.0)
    assert (s.turns, s.error_share, s.underrun_share, s.first_audio_ms["p95"]) == (0, None, None, None)


# ---- the SLO -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("text", "expected"), [
    ("p95_first_audio_ms<=800", [("p95_first_audio_ms", "<=", 800.0)]),
    (" p95_first_audio_ms <= 800 , underrun_share<=0.01 ",
     [("p95_first_audio_ms", "<=", 800.0), ("underrun_share", "<=", 0.01)]),
    ("p50_speech_stopped_ms<400,error_share<=0,gap_over_100ms_share<=0.05",
     [("p50_speech_stopped_ms", "<", 400.0), ("error_share", "<=", 0.0), ("gap_over_100ms_share", "<=", 0.05)]),
    ("p99_rtf<1,next_turn", None),
])
def test_parse_slo(text: str, expected: list[tuple[str, str, float]] | None) -> None:
    if expected is None:
        with pytest.raises(SloError):
            parse_slo(text)
        return
    assert [(c.metric, c.op, c.limit) for c in parse_slo(text)] == expected


@pytest.mark.parametrize(("text", "message"), [
    ("", "expected METRIC<=NUMBER"),
    ("p95_first_audio_ms=800", "expected METRIC OP NUMBER with OP one of <=, <, >=, > (e.g. p95_first_audio_ms<=800), "
                               "got 'p95_first_audio_ms=800'"),
    ("p97_first_audio_ms<=800", "SLO clause 1: expected a metric, one of p50_first_audio_ms"),
    ("p95_first_audio_ms<=800,underrun_share<=lots", "SLO clause 2: expected a number after '<=', got 'lots'"),
    ("p95_first_audio_ms<=nan", "expected a finite number"),
])
def test_a_bad_slo_says_what_was_expected_and_what_came(text: str, message: str) -> None:
    with pytest.raises(SloError) as info:
        parse_slo(text)
    assert message in str(info.value)
    assert "got" in str(info.value)
    assert info.value.code == "bad_slo"


def test_the_default_slo_parses_and_every_metric_has_a_value() -> None:
    assert [str(c) for c in parse_slo(DEFAULT_SLO)] == DEFAULT_SLO.split(",")
    s = summarize([record(turn=i, barge_in=True, barge_onset_to_last_audio_ms=10.0, barge_onset_to_interrupted_ms=20.0)
                   for i in range(3)], step=0, callers=1, window_s=5.0)
    for metric in SLO_METRICS:
        result = evaluate_slo(parse_slo(f"{metric}<=1e9"), s)
        assert result.checks[0][1] is not None, metric


def test_evaluate_slo() -> None:
    fast = summarize([record(turn=i, first_audio_ms=300.0 + i) for i in range(20)], step=0, callers=1, window_s=5.0)
    slow = summarize([record(turn=i, first_audio_ms=900.0 + i,
                             underruns=1, underrun_worst_ms=30.0) for i in range(20)], step=1, callers=2, window_s=5.0)
    empty = summarize([], step=2, callers=4, window_s=5.0)
    clauses = parse_slo(DEFAULT_SLO)
    assert evaluate_slo(clauses, fast).holds
    result = evaluate_slo(clauses, slow)
    assert not result.holds
    assert result.failures() == ["p95_first_audio_ms<=800 (got 918)", "underrun_share<=0.01 (got 1)"]
    assert not evaluate_slo(clauses, empty).holds  # no value never holds
    assert evaluate_slo(parse_slo("p50_first_audio_ms>=900"), slow).holds
    steps = []
    for summary in (fast, slow, fast):
        summary.slo = evaluate_slo(clauses, summary).to_json()
        steps.append(summary)
    assert largest_holding(steps) == 1  # the first failure ends what holds
    assert largest_holding(steps[1:]) is None


# ---- A/B ---------------------------------------------------------------------------------------------------
def test_compare_identical_runs_contains_one_and_is_deterministic() -> None:
    values = [200.0 + 37.0 * (i % 11) + 3.0 * i for i in range(60)]
    first = compare(values, values, resamples=500, seed=7)
    assert first == compare(values, values, resamples=500, seed=7)  # same seed, same intervals
    for r in first:
        assert r.ratio == pytest.approx(1.0)
        assert r.low is not None and r.high is not None and r.low <= 1.0 <= r.high, r
        assert r.verdict == "no clear difference"
    assert compare(values, values, resamples=500, seed=8) != first  # the seed is what makes it repeatable


def test_compare_sees_a_real_difference() -> None:
    a = [300.0 + 5.0 * (i % 13) for i in range(80)]
    b = [v * 1.5 for v in a]
    ratios = {r.quantile: r for r in compare(a, b, resamples=400)}
    assert ratios[50].ratio == pytest.approx(1.5)
    assert ratios[50].low is not None and ratios[50].low > 1.0
    assert ratios[50].verdict == "B higher"
    assert ratios[99].few and not ratios[50].few  # 80 turns cannot resolve p99
    faster = {r.quantile: r for r in compare(b, a, resamples=400)}
    assert faster[50].verdict == "B lower"


def test_compare_without_values_has_no_interval() -> None:
    for r in compare([], [100.0]):
        assert (r.ratio, r.low, r.high, r.verdict) == (None, None, None, "no data")


# ---- the report --------------------------------------------------------------------------------------------
def synthetic_run(seed: float = 0.0) -> Run:
    """A two-step ramp, N = 1 and 2: warm-up, measured and outside turns, one with underruns and a gap."""
    run = Run({"url": "ws://127.0.0.1:1/ws", "protocol": "native", "started_at": "2026-01-01T00:00:00+00:00"})
    for step, n in enumerate((1, 2)):
        measured = []
        for caller in range(n):
            for turn in range(6):
                phase = "warmup" if turn == 0 else ("outside" if turn == 5 else "measured")
                kw: dict[str, Any] = {}
                if turn == 3:
                    chunks = [(400.0 + 20.0 * i, 20.0) for i in range(20)] + [(900.0 + 20.0 * i, 20.0)
                                                                             for i in range(20)]
                    kw = dict(reply_chunks=chunks, underruns=1, underrun_total_ms=40.0, underrun_worst_ms=40.0,
                              max_gap_ms=120.0)
                r = record(caller, turn, first_audio_ms=300.0 + 100 * n + 10 * turn + seed, **kw)
                run.turns.append(Turn(step, phase, r))
                if phase == "measured":
                    measured.append(r)
        summary = summarize(measured, step=step, callers=n, window_s=30.0)
        summary.slo = evaluate_slo(parse_slo(DEFAULT_SLO), summary).to_json()
        run.steps.append(summary)
    return run


def test_json_round_trip(tmp_path: Path) -> None:
    run = synthetic_run()
    path = tmp_path / JSON_NAME
    write_run(run, path)
    doc = json.loads(path.read_text())
    assert doc["schema_version"] == SCHEMA_VERSION
    assert set(doc["turns"][0]) == {"step", "phase", *TurnRecord.__dataclass_fields__}
    assert set(doc["steps"][0]) == set(StepSummary.__dataclass_fields__)
    back = read_run(path)
    assert back.info == run.info
    assert back.steps == run.steps
    assert back.turns == run.turns  # reply_chunks come back as tuples
    assert back.first_audio(1) == run.first_audio(1)


def test_read_run_refuses_another_schema(tmp_path: Path) -> None:
    path = tmp_path / "old.json"
    path.write_text(json.dumps({"schema_version": SCHEMA_VERSION + 1, "run": {}, "steps": [], "turns": []}))
    with pytest.raises(RunFileError, match=f"expected schema_version {SCHEMA_VERSION}, got {SCHEMA_VERSION + 1}"):
        read_run(path)
    path.write_text("not json")
    with pytest.raises(RunFileError, match="expected a loadtest JSON file"):
        read_run(path)


def test_plots_are_written_as_pngs(tmp_path: Path) -> None:
    paths = write_plots(synthetic_run(), tmp_path, slo_ms=800.0)
    assert [p.name for p in paths] == list(PLOT_NAMES)
    for p in paths:
        assert p.read_bytes()[:8] == PNG_MAGIC, p
        assert p.stat().st_size > 5000, p  # something was drawn


def test_plots_of_a_run_without_replies(tmp_path: Path) -> None:
    run = Run({"url": "ws://x/ws"}, [summarize([], step=0, callers=1, window_s=0.0)],
              [Turn(0, "measured", record(first_audio_ms=None, error="refused"))])
    for p in write_plots(run, tmp_path):
        assert p.read_bytes()[:8] == PNG_MAGIC, p


def test_playback_puts_gaps_where_the_buffer_ran_dry() -> None:
    r = record(first_audio_ms=100.0, reply_started_ms=160.0,
               reply_chunks=[(100.0, 40.0), (120.0, 40.0), (400.0, 40.0)])
    spans, gaps = playback(r)
    assert spans == [(160.0, 240.0), (400.0, 440.0)]
    assert gaps == [(240.0, 400.0)]


def test_table_and_comparison_text() -> None:
    a, b = synthetic_run(), synthetic_run(seed=300.0)
    table = format_table(a.steps)
    assert "first audio ms  p50" in table and "underrun share" in table and "FAILS underrun_share<=0.01" in table
    assert table.splitlines()[2].split()[:4] == ["1", "4", "0", "0"]  # N, turns, early, failed
    text = format_comparison(a, b, resamples=200)
    assert "B/A" in text and "B higher" in text
    assert "near the extreme value" in text  # 4-8 turns per step cannot resolve p90+
