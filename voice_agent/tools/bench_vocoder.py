"""`voice-agent bench vocoder`: per-block flow and HiFT cost of streaming one spoken reply.

A reply of N random units is streamed in live blocks of 10 units, three times: in the faithful mode (the
flow recomputes over every unit so far, as the reference does: per-block cost grows with the reply), in the
bounded mode (`--context-units` of left context: per-block cost stays flat) and in the bounded mode with the
chunk cache (the estimator runs on the current chunk only; the server's default). It prints per-block times
and estimator frames against reply length, medians of the first and last blocks, the real-time factor, and
how far the mel and waveform of the other modes are from the faithful ones (same speaker, same flow noise,
same HiFT excitation seeds).

Weights: `--decoder-dir` loads a cosy2_decoder directory; `--preset tiny` builds the tiny set; `--preset real`
builds random weights at the official shapes in memory (timings are real, deviations are those of a random
network, not of the trained one).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voice_agent.audio import OUTPUT_SAMPLE_RATE, SAMPLES_PER_UNIT
from voice_agent.engine.flow_stream import DEFAULT_CONTEXT_UNITS, FlowStream
from voice_agent.engine.vocoder import EXCITATION_SEED_SALT, UNITS_PER_BLOCK, HiFTStream
from voice_agent.errors import VoiceAgentError
from voice_agent.model.cosy2.decoder import Cosy2Decoder
from voice_agent.model.cosy2.flow import Flow
from voice_agent.model.cosy2.flow_config import FlowConfig
from voice_agent.model.cosy2.hift import HiFT
from voice_agent.model.cosy2.hift_config import HiFTConfig
from voice_agent.model.cosy2.tiny import random_hift, write_tiny_cosy2_decoder

EDGE_BLOCKS = 5  # blocks averaged at the start and at the end of the reply


@dataclass
class BlockTiming:
    units_so_far: int
    window_units: int  # units the flow's encoder saw for this block
    frames: int  # mel frames the estimator ran on for this block
    flow_s: float
    hift_s: float


@dataclass
class StreamRun:
    timings: list[BlockTiming]
    mel: torch.Tensor  # (80, 2 N)
    audio: np.ndarray  # (960 N,)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="voice-agent bench vocoder", description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--decoder-dir", default=None, help="a cosy2_decoder directory (flow.pt, hift.pt, ...)")
    src.add_argument("--preset", choices=["tiny", "real"], default="tiny",
                     help="random weights: tiny dims, or the official dims built in memory")
    p.add_argument("--reply-units", type=int, default=200, help="units in the reply (25 per second)")
    p.add_argument("--context-units", type=int, default=DEFAULT_CONTEXT_UNITS,
                   help="left context of the bounded mode, in units")
    p.add_argument("--block", type=int, default=UNITS_PER_BLOCK, help="units per push")
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    return p


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_models(args: argparse.Namespace, device: torch.device) -> tuple[Flow, HiFT, torch.Tensor, str]:
    """(flow, hift, speaker (192,), description) for the chosen weights."""
    spk = torch.randn(192, generator=torch.Generator().manual_seed(args.seed))
    if args.decoder_dir is not None:
        decoder = Cosy2Decoder.load(args.decoder_dir, device)
        try:
            spk, voice = decoder.voice(), "default voice"
        except VoiceAgentError as e:
            voice = f"random speaker ({e})"
        return decoder.flow, decoder.hift, spk, f"{args.decoder_dir}, {voice}"
    if args.preset == "tiny":
        with tempfile.TemporaryDirectory() as tmp:
            decoder = Cosy2Decoder.load(write_tiny_cosy2_decoder(Path(tmp) / "cosy2_decoder", args.seed), device)
            spk = decoder.voice()
        return decoder.flow, decoder.hift, spk, "tiny preset"
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        flow = Flow(FlowConfig()).to(device).eval()  # PyTorch default init at the official shapes
    hift = random_hift(HiFTConfig(), args.seed).to(device)
    return flow, hift, spk, "real preset (random weights, official shapes)"


def stream_once(flow: Flow, hift: HiFT, spk: torch.Tensor, units: Sequence[int], block: int,
                context_units: int | None, seed: int, cached: bool = False) -> StreamRun:
    """Stream `units` in blocks through flow then HiFT, timing each stage per block."""
    device = hift.conv_pre.weight.device
    flow_stream = FlowStream(flow, spk, seed, context_units=context_units, cached=cached)
    hift_stream = HiFTStream(hift, seed ^ EXCITATION_SEED_SALT)
    timings, mels, chunks = [], [], []
    starts = list(range(0, len(units), block))
    for b in starts:
        final = b == starts[-1]
        _sync(device)
        t0 = time.perf_counter()
        mel = flow_stream.push(list(units[b:b + block]), final)  # (80, T_new)
        _sync(device)
        t1 = time.perf_counter()
        chunks.append(hift_stream.push(mel, final))
        _sync(device)
        t2 = time.perf_counter()
        mels.append(mel.float().cpu())
        timings.append(BlockTiming(min(b + block, len(units)), flow_stream.last_window_units,
                                   flow_stream.last_frames, t1 - t0, t2 - t1))
    return StreamRun(timings, torch.cat(mels, dim=1), np.concatenate(chunks))


def _median_ms(values: Sequence[float]) -> float:
    return 1000 * statistics.median(values) if values else float("nan")


def _deviation(label: str, ref: np.ndarray, other: np.ndarray) -> str:
    diff = other - ref
    rms = float(np.sqrt(np.mean(diff**2)))
    rel = rms / max(float(np.std(ref)), 1e-12)
    err = float(np.sum(diff**2))
    snr = 10 * np.log10(float(np.sum(ref**2)) / err) if err > 0 else float("inf")
    return f"{label}: max |diff| {np.abs(diff).max():.3g}, rms {rms:.3g}, rms/std {rel:.3g}, SNR {snr:.1f} dB"


def report(runs: dict[str, StreamRun], n_units: int) -> None:
    """Per-block table, then per mode: first / last block medians, RTF, deviation from the first mode."""
    names = list(runs)
    rows = len(runs[names[0]].timings)
    step = max(1, rows // 10)
    print(f"{'block':>5} {'units':>6} | " + " | ".join(f"{n[:24]:>24} ms (frames)" for n in names) + " | hift ms")
    for i in sorted(set(range(0, rows, step)) | {rows - 1}):
        cells = [f"{1000 * r.timings[i].flow_s:>27.1f} {r.timings[i].frames:>8}" for r in runs.values()]
        row = runs[names[0]].timings[i]
        print(f"{i:>5} {row.units_so_far:>6} | " + " | ".join(cells) + f" | {1000 * row.hift_s:>7.1f}")
    body = slice(0, rows - 1) if rows > 1 else slice(0, rows)  # the final flush block is shorter
    for name, run in runs.items():
        t = run.timings[body]
        first, last = t[:EDGE_BLOCKS], t[-EDGE_BLOCKS:]
        total = sum(x.flow_s + x.hift_s for x in run.timings)
        print(f"{name}: median flow ms first {len(first)} blocks {_median_ms([x.flow_s for x in first]):.1f}, "
              f"last {len(last)} {_median_ms([x.flow_s for x in last]):.1f}; "
              f"median hift ms {_median_ms([x.hift_s for x in t]):.1f}; "
              f"RTF {total / (n_units * SAMPLES_PER_UNIT / OUTPUT_SAMPLE_RATE):.3f}")
    ref = runs[names[0]]
    for name in names[1:]:
        print(_deviation(f"mel ({name} vs {names[0]})", ref.mel.numpy(), runs[name].mel.numpy()))
        print(_deviation(f"waveform ({name} vs {names[0]})", ref.audio, runs[name].audio))


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.reply_units < 1 or args.block < 1 or args.context_units < 0:
        raise SystemExit("bench vocoder: expected --reply-units >= 1, --block >= 1, --context-units >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    flow, hift, spk, what = load_models(args, device)
    rng = np.random.default_rng(args.seed)
    units = [int(u) for u in rng.integers(0, flow.cfg.vocab_size, args.reply_units)]
    print(f"weights: {what}; device {device}; threads {torch.get_num_threads()}; reply {args.reply_units} units "
          f"({args.reply_units * SAMPLES_PER_UNIT / OUTPUT_SAMPLE_RATE:.1f} s) in blocks of {args.block}")
    stream_once(flow, hift, spk, units[: 2 * args.block], args.block, None, args.seed)  # warm-up
    n = args.context_units
    runs = {
        "faithful": stream_once(flow, hift, spk, units, args.block, None, args.seed),
        f"bounded ({n} units)": stream_once(flow, hift, spk, units, args.block, n, args.seed),
        f"bounded ({n}) + cache": stream_once(flow, hift, spk, units, args.block, n, args.seed, cached=True),
    }
    report(runs, args.reply_units)
    return 0
