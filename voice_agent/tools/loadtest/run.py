"""`voice-agent loadtest`: N simulated callers against one running server, step by step, and the report.

A step runs N callers (caller.run_caller, each its own connection) started `--stagger-ms` apart, and
measures it in three phases, on the harness's monotonic clock:

1. warm-up: each caller's first `--warmup-turns` turns are left out (a cold connection, a cold cache);
2. the window opens once every caller has finished its warm-up turns (or has stopped, or WARMUP_CAP_S after
   the last caller started) and stays open `--window-s` seconds; the turns whose speech ended inside it are
   the step's measured turns. With `--turns K` there is no window: each caller makes its warm-up turns
   plus K, and every one of those K is measured;
3. after the window, turns whose speech ended inside it may still finish (up to GRACE_S); then the step's
   callers are stopped and the next step starts with fresh connections.

A run is one step (`--callers N`), a list of steps (`--ramp 1,2,4,8`), or `--ramp auto`: N = 1, 2, 4, ...
doubling until a step fails the SLO or N would pass `--callers` (default AUTO_MAX_CALLERS); the report
names the largest N that held the SLO (every step up to it held).

Safety: the harness talks only to the URL it is given; at most MAX_CALLERS connections at once (one per
caller, one step at a time); a run stops by itself after `--duration` seconds in all (at most
MAX_DURATION_S), each caller after MAX_TURNS_PER_STEP turns. Ctrl-C stops the callers and still writes the
table, the JSON and the plots of what was measured so far (exit status 130).

Exit status: 0 when the SLO held (at the one step, or at some N of a ramp), 1 when it did not, 2 for a
usage error, 130 when interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO, cast

from voice_agent.errors import VoiceAgentError
from voice_agent.tools.loadtest import dialects
from voice_agent.tools.loadtest.records import TurnRecord, Utterance
from voice_agent.tools.loadtest.report import (
    JSON_NAME,
    Run,
    Turn,
    format_comparison,
    format_table,
    read_run,
    write_plots,
    write_run,
)
from voice_agent.tools.loadtest.stats import (
    DEFAULT_SLO,
    SloClause,
    evaluate_slo,
    largest_holding,
    parse_slo,
    percentile,
    summarize,
)

PROTOCOLS = ("native", "openai", "twilio")
MAX_CALLERS = 128  # connections at once, whatever the options say
AUTO_MAX_CALLERS = 64  # where --ramp auto stops doubling unless --callers says less
MAX_DURATION_S = 3600.0  # the longest run --duration allows
DEFAULT_DURATION_S = 900.0  # the whole run, every step
MAX_TURNS_PER_STEP = 1000  # per caller
DEFAULT_WINDOW_S = 30.0
DEFAULT_WARMUP_TURNS = 1
DEFAULT_STAGGER_MS = 250.0
WARMUP_CAP_S = 60.0  # after the last caller started, the window opens even if a caller is still warming up
GRACE_S = 20.0  # after the window: how long turns whose speech ended inside it may take to finish
SEED_STRIDE = 10_000  # caller seed = seed + SEED_STRIDE * step + caller
PROGRESS_EVERY_S = 0.5  # the live line on a terminal
PROGRESS_LOG_EVERY_S = 10.0  # a new line when stderr is not a terminal


class LoadtestError(VoiceAgentError):
    """A loadtest option that cannot be used."""

    code = "bad_loadtest_option"


# ---- options -----------------------------------------------------------------------------------------------
def endpoint_url(url: str, protocol: str) -> str:
    """The WebSocket URL the callers call (dialects.endpoint_url: the protocol's path when the URL has none)."""
    try:
        return dialects.endpoint_url(url, cast(dialects.Protocol, protocol))
    except ValueError as e:
        raise LoadtestError(f"URL: {e}") from None


def parse_ramp(text: str) -> list[int] | None:
    """`"1,2,4,8"` -> [1, 2, 4, 8]; `"auto"` -> None."""
    if text.strip() == "auto":
        return None
    try:
        steps = [int(p) for p in text.split(",") if p.strip()]
    except ValueError:
        raise LoadtestError(f"--ramp: expected N,N,... (e.g. 1,2,4,8) or auto, got {text!r}") from None
    if not steps or any(not 1 <= n <= MAX_CALLERS for n in steps):
        raise LoadtestError(f"--ramp: expected caller counts in 1..{MAX_CALLERS}, got {text!r}")
    return steps


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voice-agent loadtest", description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_loadtest_arguments(p)
    return p


def add_loadtest_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `voice-agent loadtest` (cli.py registers them on its subcommand)."""
    p.add_argument("url", nargs="?", help="the server, e.g. ws://127.0.0.1:8000 (the protocol's path is added "
                                          "when the URL has none: /ws, /v1/realtime, /twilio)")
    p.add_argument("--callers", type=int, default=None,
                   help=f"concurrent callers (one step; default 1); with --ramp auto the largest N tried "
                        f"(default {AUTO_MAX_CALLERS})")
    p.add_argument("--protocol", choices=PROTOCOLS, default="native")
    p.add_argument("--turns", type=int, default=None,
                   help="measured turns per caller per step, after the warm-up (instead of the --window-s window)")
    p.add_argument("--duration", type=float, default=DEFAULT_DURATION_S,
                   help=f"the whole run stops after this many seconds (at most {MAX_DURATION_S:g})")
    p.add_argument("--stagger-ms", type=float, default=DEFAULT_STAGGER_MS, help="between caller starts")
    p.add_argument("--ramp", default=None, help="steps of N: 1,2,4,8 or auto (double until the SLO fails)")
    p.add_argument("--warmup-turns", type=int, default=DEFAULT_WARMUP_TURNS,
                   help="each caller's first turns per step, left out of the figures")
    p.add_argument("--window-s", type=float, default=DEFAULT_WINDOW_S, help="measurement window per step")
    p.add_argument("--slo", default=DEFAULT_SLO, help="what a step must hold (see docs/loadtest.md)")
    p.add_argument("--barge-in", type=float, default=0.0,
                   help="share of turns where the caller talks over the reply at a random point")
    p.add_argument("--speech", default=None, help="a directory of WAV/FLAC questions (default: the bundled ones)")
    p.add_argument("--key", default=None, help="the server's API key, if it needs one")
    p.add_argument("--out", default="loadtest-out", help="directory for loadtest.json and the PNG plots")
    p.add_argument("--seed", type=int, default=0, help="utterance order, barge-in points (per caller)")
    p.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="compare two runs' first-audio percentiles (B/A with bootstrap intervals) and exit")


@dataclass(frozen=True)
class Plan:
    """A validated run: what to call, the steps, and the bounds."""

    url: str
    protocol: str
    steps: tuple[int, ...] | None  # None: auto (doubling from 1 up to max_callers)
    max_callers: int
    turns: int | None
    duration_s: float
    stagger_s: float
    warmup_turns: int
    window_s: float
    slo: tuple[SloClause, ...]
    barge_in: float
    key: str | None
    seed: int

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Plan:
        if args.url is None:
            raise LoadtestError("expected a server URL (e.g. ws://127.0.0.1:8000) or --compare A.json B.json, "
                                "got neither")
        steps = parse_ramp(args.ramp) if args.ramp is not None else None
        if args.ramp is not None and steps is not None and args.callers is not None:
            raise LoadtestError(f"expected --callers N or --ramp {args.ramp}, got both (--callers {args.callers})")
        auto_max = AUTO_MAX_CALLERS if args.callers is None else args.callers
        if args.ramp is None:
            steps = [1 if args.callers is None else args.callers]
        bounds: list[tuple[str, float | None, float, float]] = [
            ("--callers", args.callers, 1, MAX_CALLERS), ("--turns", args.turns, 1, MAX_TURNS_PER_STEP),
            ("--warmup-turns", args.warmup_turns, 0, MAX_TURNS_PER_STEP),
            ("--duration", args.duration, 1.0, MAX_DURATION_S), ("--window-s", args.window_s, 1.0, MAX_DURATION_S),
            ("--stagger-ms", args.stagger_ms, 0.0, 60_000.0), ("--barge-in", args.barge_in, 0.0, 1.0)]
        for name, number, low, high in bounds:
            if number is not None and not (math.isfinite(number) and low <= number <= high):
                raise LoadtestError(f"{name}: expected {low:g}..{high:g}, got {number:g}")
        return cls(url=endpoint_url(args.url, args.protocol), protocol=args.protocol,
                   steps=None if steps is None else tuple(steps), max_callers=auto_max, turns=args.turns,
                   duration_s=args.duration, stagger_s=args.stagger_ms / 1000, warmup_turns=args.warmup_turns,
                   window_s=args.window_s, slo=parse_slo(args.slo), barge_in=args.barge_in, key=args.key,
                   seed=args.seed)

    def info(self) -> dict[str, Any]:
        """The settings as the JSON's `run` object records them (never the key)."""
        return {"url": self.url, "protocol": self.protocol, "ramp": "auto" if self.steps is None else list(self.steps),
                "max_callers": self.max_callers, "turns": self.turns, "duration_s": self.duration_s,
                "stagger_ms": self.stagger_s * 1000, "warmup_turns": self.warmup_turns, "window_s": self.window_s,
                "slo": ",".join(map(str, self.slo)), "barge_in": self.barge_in, "seed": self.seed,
                "key_given": self.key is not None}


# ---- one step ----------------------------------------------------------------------------------------------
@dataclass
class CallerLog:
    records: list[TurnRecord] = field(default_factory=list)
    started: bool = False
    done: bool = False


@dataclass
class StepState:
    """One step as it runs: its callers' turns as they arrive, and the window once known."""

    index: int
    callers: int
    started_at: float
    logs: list[CallerLog]
    window_open: float | None = None
    window_close: float | None = None
    summarized: bool = False

    def warmed_up(self, warmup_turns: int) -> bool:
        return all(log.done or len(log.records) >= warmup_turns for log in self.logs) and all(
            log.started for log in self.logs)

    def phase(self, record: TurnRecord, plan: Plan) -> str:
        """warmup / measured / outside for one of the step's records (turns numbered from 0).

        A failed turn ends its caller (run_caller reports the failure as its last record), so it counts
        against the step wherever it falls up to the window's close, warm-up included: a caller that drops
        out at this load is a failure of this load, not a cold start."""
        if record.error is not None and not record.cut:
            if plan.turns is not None or self.window_close is None:
                return "measured"
            return "measured" if record.speech_end <= self.window_close else "outside"
        if record.turn < plan.warmup_turns:
            return "warmup"
        if plan.turns is not None:
            return "measured" if record.turn < plan.warmup_turns + plan.turns else "outside"
        if self.window_open is None or self.window_close is None:
            return "outside"
        return "measured" if self.window_open <= record.speech_end <= self.window_close else "outside"

    def turns(self, plan: Plan) -> list[Turn]:
        return [Turn(self.index, self.phase(r, plan), r) for log in self.logs for r in log.records]

    def measured(self, plan: Plan) -> list[TurnRecord]:
        return [t.record for t in self.turns(plan) if t.phase == "measured"]


def caller_failure(caller: int, protocol: str, text: str) -> TurnRecord:
    """A record for a caller that stopped with an exception (run_caller reports failures itself; this is
    for a bug): a failed turn numbered -1, with no speech, at the time it stopped."""
    return TurnRecord(caller=caller, turn=-1, protocol=protocol, utterance="", speech_s=0.0,
                      speech_end=time.monotonic(),
                      speech_stopped_ms=None, first_text_ms=None, first_audio_ms=None, reply_audio_ms=0.0,
                      reply_done_ms=None, rtf=None, server_timings={}, early=False, underruns=0,
                      underrun_total_ms=0.0, underrun_worst_ms=0.0, max_gap_ms=0.0, error=text)


CallerFn = Callable[..., Any]  # caller.run_caller's signature (a parameter so tests can pass a fake)


async def run_step(plan: Plan, state: StepState, corpus: Sequence[Utterance], run_deadline: float,
                   run_caller: CallerFn, progress: Progress) -> None:
    """Run one step to its end (window closed and grace spent, turns done, or the run's deadline)."""
    n = state.callers
    stagger_total = (n - 1) * plan.stagger_s
    caller_deadline = min(run_deadline, state.started_at + stagger_total + WARMUP_CAP_S + plan.window_s + GRACE_S)
    if plan.turns is not None:  # no window: the callers run their turns out, within the run's bound
        caller_deadline = run_deadline
    max_turns = plan.warmup_turns + (plan.turns if plan.turns is not None else MAX_TURNS_PER_STEP)

    async def one(i: int) -> None:
        log = state.logs[i]
        await asyncio.sleep(max(0.0, state.started_at + i * plan.stagger_s - time.monotonic()))
        log.started = True
        try:
            await run_caller(plan.url, plan.protocol, caller=i, corpus=corpus, deadline=caller_deadline,
                             max_turns=max_turns, barge_in=plan.barge_in, key=plan.key,
                             seed=plan.seed + SEED_STRIDE * state.index + i, on_turn=log.records.append)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # one caller's failure is a figure of the step, not the end of the run
            log.records.append(caller_failure(i, plan.protocol, f"caller stopped: {type(e).__name__}: {e}"[:200]))
        finally:
            log.done = True

    tasks = [asyncio.create_task(one(i)) for i in range(n)]
    try:
        while not all(t.done() for t in tasks):
            now = time.monotonic()
            if now >= run_deadline or now >= caller_deadline + GRACE_S:  # the run's bound; a caller that hangs
                break
            if state.window_open is None and plan.turns is None and (
                    state.warmed_up(plan.warmup_turns) or now >= state.started_at + stagger_total + WARMUP_CAP_S):
                state.window_open = now
                state.window_close = min(now + plan.window_s, run_deadline)
            if state.window_close is not None and now >= state.window_close:
                # every caller whose in-window turns are all reported (one after the close, or done) may stop
                if all(log.done or (log.records and log.records[-1].speech_end > state.window_close)
                       for log in state.logs) or now >= state.window_close + GRACE_S:
                    break
            progress.update(state, plan)
            await asyncio.sleep(0.05)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if plan.turns is not None:
            state.window_open = state.started_at + stagger_total
            state.window_close = time.monotonic()
        elif state.window_close is not None:
            state.window_close = min(state.window_close, time.monotonic())
        progress.update(state, plan, final=True)


# ---- the live line -----------------------------------------------------------------------------------------
class Progress:
    """One line on stderr, rewritten in place on a terminal (a new line every PROGRESS_LOG_EVERY_S if not)."""

    def __init__(self, stream: TextIO, run_started: float, duration_s: float) -> None:
        self.stream, self.run_started, self.duration_s = stream, run_started, duration_s
        self.tty = stream.isatty()
        self.last = -math.inf

    def update(self, state: StepState, plan: Plan, final: bool = False) -> None:
        now = time.monotonic()
        if not final and now - self.last < (PROGRESS_EVERY_S if self.tty else PROGRESS_LOG_EVERY_S):
            return
        self.last = now
        turns = state.turns(plan)
        measured = [t.record for t in turns if t.phase == "measured"]
        firsts = [r.first_audio_ms for r in measured if r.first_audio_ms is not None and not r.early and not r.error]
        p50, p95 = percentile(firsts, 50), percentile(firsts, 95)
        if state.window_open is None:
            phase = "warming up" if plan.turns is None else "running"
        elif state.window_close is not None and now < state.window_close:
            phase = f"window {now - state.window_open:.0f}/{plan.window_s:g} s"
        else:
            phase = "finishing" if not final else "done"
        line = (f"[step {state.index + 1} N={state.callers}] {phase}: callers {sum(log.started for log in state.logs)}"
                f"/{state.callers}, turns {len(measured)} measured + {sum(t.phase == 'warmup' for t in turns)} "
                f"warm-up, first audio p50 {'-' if p50 is None else f'{p50:.0f}'} / p95 "
                f"{'-' if p95 is None else f'{p95:.0f}'} ms, underruns {sum(r.underruns > 0 for r in measured)}, "
                f"failed {sum(1 for r in measured if r.error)} | {now - self.run_started:.0f}/{self.duration_s:g} s")
        if self.tty:
            self.stream.write("\r" + line + "\x1b[K" + ("\n" if final else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


# ---- the run -----------------------------------------------------------------------------------------------
@dataclass
class RunState:
    plan: Plan
    started_at: float  # monotonic
    steps: list[StepState] = field(default_factory=list)
    stopped_by: str = "completed"

    def finish_step(self, state: StepState, run: Run) -> None:
        """Summarize a step (once) into `run`, SLO included."""
        if state.summarized:
            return
        state.summarized = True
        window_s = 0.0 if state.window_open is None or state.window_close is None else max(
            0.0, state.window_close - state.window_open)
        summary = summarize(state.measured(self.plan), step=state.index, callers=state.callers, window_s=window_s)
        summary.slo = evaluate_slo(self.plan.slo, summary).to_json()
        run.steps.append(summary)
        run.turns.extend(state.turns(self.plan))


async def run_steps(plan: Plan, rs: RunState, run: Run, corpus: Sequence[Utterance], run_caller: CallerFn,
                    progress: Progress) -> None:
    deadline = rs.started_at + plan.duration_s
    n = 1
    index = 0
    while True:
        if plan.steps is not None:
            if index >= len(plan.steps):
                return
            n = plan.steps[index]
        elif n > plan.max_callers:
            rs.stopped_by = f"auto ramp reached --callers {plan.max_callers}"
            return
        if time.monotonic() >= deadline:
            rs.stopped_by = f"--duration {plan.duration_s:g} s reached"
            return
        state = StepState(index, n, time.monotonic(), [CallerLog() for _ in range(n)])
        rs.steps.append(state)
        await run_step(plan, state, corpus, deadline, run_caller, progress)
        rs.finish_step(state, run)
        if time.monotonic() >= deadline:
            rs.stopped_by = f"--duration {plan.duration_s:g} s reached"
            return
        slo = run.steps[-1].slo
        if plan.steps is None and (slo is None or not slo["holds"]):
            rs.stopped_by = f"auto ramp: the SLO failed at N={n}"
            return
        index += 1
        n *= 2


def execute(plan: Plan, corpus: Sequence[Utterance], out: Path, *, run_caller: CallerFn | None = None,
            stdout: TextIO | None = None, stderr: TextIO | None = None) -> int:
    """Run the plan, then print the table and write the JSON and the plots (also after Ctrl-C)."""
    stdout, stderr = stdout or sys.stdout, stderr or sys.stderr
    if run_caller is None:
        from voice_agent.tools.loadtest.caller import run_caller as real_caller

        run_caller = real_caller
    out.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    rs = RunState(plan, started)
    run = Run({**plan.info(), "started_at": datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec="seconds")})
    progress = Progress(stderr, started, plan.duration_s)
    interrupted = False
    try:
        asyncio.run(run_steps(plan, rs, run, corpus, cast(CallerFn, run_caller), progress))
    except KeyboardInterrupt:
        interrupted = True
        rs.stopped_by = "interrupted (Ctrl-C)"
        stderr.write("\nloadtest: interrupted; writing what was measured\n")
    for state in rs.steps:  # an interrupted step: summarized over what it measured
        if state.window_close is not None:
            state.window_close = min(state.window_close, time.monotonic())
        rs.finish_step(state, run)
    best = largest_holding(run.steps)
    run.info.update(elapsed_s=round(time.monotonic() - started, 3), stopped_by=rs.stopped_by,
                    interrupted=interrupted, largest_n_holding_slo=best)
    write_run(run, out / JSON_NAME)
    p95_limit = next((c.limit for c in plan.slo if c.metric == "p95_first_audio_ms"), None)
    plots = write_plots(run, out, p95_limit)
    print(f"voice-agent loadtest {plan.url} ({plan.protocol}): {rs.stopped_by} after "
          f"{run.info['elapsed_s']:.0f} s", file=stdout)
    print(format_table(run.steps), file=stdout)
    slo = ",".join(map(str, plan.slo))
    if len(run.steps) > 1 or plan.steps is None:
        print(f"largest N holding the SLO ({slo}): {best if best is not None else 'none'}", file=stdout)
    else:
        print(f"SLO ({slo}): {'holds' if best is not None else 'fails'}", file=stdout)
    print(f"wrote {out / JSON_NAME} and {', '.join(p.name for p in plots)}", file=stdout)
    if interrupted:
        return 130
    return 0 if best is not None else 1


def run_loadtest(args: argparse.Namespace) -> int:
    """`voice-agent loadtest` with parsed options; a bad option raises a VoiceAgentError saying what it
    expected (cli.main prints it and exits 2)."""
    if args.compare is not None:
        a, b = (read_run(Path(p)) for p in args.compare)
        print(format_comparison(a, b))
        return 0
    plan = Plan.from_args(args)
    from voice_agent.tools.loadtest.corpus import load_corpus

    return execute(plan, load_corpus(args.speech), Path(args.out))


def loadtest_main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(None if argv is None else list(argv))
    try:
        return run_loadtest(args)
    except VoiceAgentError as e:
        print(f"voice-agent loadtest: error: {e}", file=sys.stderr)
        return 2
