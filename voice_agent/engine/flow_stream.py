"""Streaming the flow for one reply: units arrive in blocks, mel frames leave once each.

`FlowStream(flow, spk (192,), seed, context_units=None).push(units, final) -> mel (80, T_new)` follows the
live schedule of LLaMA-Omni2's vocoder (`SpeechDecoder.process_unit_chunk`): append the units, run the
flow, keep the mel from frame 2 * token_offset, then set token_offset = len(units) - 3 after a non-final
call (the last 3 units lack look-ahead and are re-synthesised next time) or len(units) after the final
one. A first block of 10 units emits 14 frames, each later block of 10 emits 20, the final call the rest.

Two modes:

- faithful (`context_units=None`): every call recomputes the flow over ALL units so far, as the reference
  does (cost O(n^2) over a reply). The emitted frames equal an offline `finalize=True` run only where a
  call already held the whole chunk (50 units / 100 frames) of a frame: attention is bidirectional inside
  a chunk, so frames of a chunk still being filled are computed from part of it. The reference has the
  same property; the fixed noise makes re-computed prefixes identical. Like the reference, a reply is
  limited to `noise_frames` (300 s) and attention memory grows with the square of its length.
- bounded (`context_units=N`): the flow runs on units [start, n) with start the chunk boundary at or
  before token_offset - N, so every call holds at least N and fewer than N + 50 units of left context
  and the per-block cost stops growing with the reply. Starting on a chunk boundary keeps the chunk grid
  of the window equal to the absolute one, and the noise is read at absolute frame positions, so the
  only difference from the faithful mode is the lost left context (`bounded_context_deviation` measures
  it; `DEFAULT_CONTEXT_UNITS` was chosen with it).

Either mode can run cached (`cached=True`; `model.cosy2.flow_cached` with a `flow_cache.FlowCache` per
stream): the estimator keeps the keys, values and conv edges of completed chunks and computes only the
frames from the last chunk boundary on, instead of the whole window (per-block cost: the current chunk,
at most 100 frames + 6, instead of 200-300 frames).
Faithful + cached gives the faithful mel up to float rounding. Bounded + cached keeps the cached chunks
inside the window: the estimator's context was computed with more left context than a recompute of the
window would have, so it is closer to faithful than bounded alone (`bounded_context_deviation` measures
both). The cost is memory (`FlowCache.bytes_for`). A flow without chunking (chunk size 0) cannot be
cached and always recomputes.

Each stream draws its own fixed noise from `torch.Generator().manual_seed(seed)`, lazily in blocks
(`model.cosy2.flow.NoiseSource`); in bounded mode blocks before the window are freed, so memory stays flat.
`noise=` (80, >= 2 * reply units) replaces the seeded draws with given values (to compare a run with
another implementation's); the values are read at the same absolute frames as the seeded ones.
`push_many` runs several streams in one padded flow call and gives each the same mel as its own `push`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

import torch

from voice_agent.engine.flow_cache import FlowCache
from voice_agent.model.cosy2.flow import Flow, NoiseSource
from voice_agent.model.cosy2.flow_cached import CachedCall
from voice_agent.model.cosy2.flow_config import FlowConfig
from voice_agent.model.cosy2.flow_estimator import CONV_KERNEL

DEFAULT_CONTEXT_UNITS = 100  # bounded mode: at least 4 s of left context (see bounded_context_deviation)
LIVE_BLOCK_UNITS = 10  # units per push in the reference's live path


def _align_units(cfg: FlowConfig) -> int:
    """Units between boundaries of both the encoder's and the estimator's chunk grids."""
    chunks = [c for c in (cfg.encoder_chunk_tokens * cfg.token_mel_ratio, cfg.decoder_chunk_frames) if c > 0]
    return math.lcm(cfg.token_mel_ratio, *chunks) // cfg.token_mel_ratio


def cacheable(cfg: FlowConfig) -> bool:
    """Whether completed chunks are final (a flow without chunking attends to everything, always)."""
    return cfg.encoder_chunk_tokens > 0 and cfg.decoder_chunk_frames > 0


def max_cached_frames(cfg: FlowConfig, context_units: int | None, reply_units: int) -> int:
    """The most frames a cached stream holds between pushes, for replies of up to `reply_units`."""
    if not cacheable(cfg):
        return 0
    align = _align_units(cfg)
    grid = cfg.token_mel_ratio * align
    whole = cfg.token_mel_ratio * reply_units // grid * grid
    if context_units is None:
        return whole
    # after a push the window start is > token_offset - context - align, and the cache ends at or
    # before 2 * token_offset, so it holds fewer than 2 * (context + align) frames, whole chunks
    return min((cfg.token_mel_ratio * (context_units + align) - 1) // grid * grid, whole)


class StreamState(Enum):
    OPEN = "open"  # accepts pushes
    FINISHED = "finished"  # the final push was made


@dataclass(frozen=True)
class _Job:
    units: list[int]  # all units of the reply after this push
    start: int  # first unit the flow sees
    stop: int  # frames up to 2 * stop are emitted
    final: bool


class FlowStream:
    """The flow state of one spoken reply (see the module docstring)."""

    def __init__(self, flow: Flow, spk: torch.Tensor, seed: int, context_units: int | None = None,
                 cached: bool = False, noise: torch.Tensor | None = None):
        cfg = flow.cfg
        if tuple(spk.shape) != (cfg.spk_embed_dim,):
            raise ValueError(f"spk: expected shape ({cfg.spk_embed_dim},), got {tuple(spk.shape)}")
        if context_units is not None and (not isinstance(context_units, int) or context_units < 0):
            raise ValueError(f"context_units: expected None or an integer >= 0, got {context_units!r}")
        if noise is not None and (noise.dim() != 2 or noise.size(0) != cfg.output_size):
            raise ValueError(f"noise: expected ({cfg.output_size}, frames), got {tuple(noise.shape)}")
        self.flow, self.spk, self.context_units = flow, spk, context_units
        self.noise = NoiseSource(seed, cfg.output_size) if noise is None else NoiseSource.given(noise)
        self.units: list[int] = []
        self.token_offset = 0  # units whose frames were emitted
        self.state = StreamState.OPEN
        self.last_window_units = 0  # units the flow's encoder saw in the last push
        self.last_frames = 0  # mel frames the estimator ran on in the last push (the per-block cost)
        self._align = _align_units(cfg)
        self.cache = FlowCache() if cached and cacheable(cfg) else None

    def push(self, units: Sequence[int] | torch.Tensor, final: bool) -> torch.Tensor:
        """Append `units` and return the newly determined mel frames (80, T_new), float32."""
        return push_many([self], [units], [final])[0]

    def window_start(self, offset: int) -> int:
        if self.context_units is None:
            return 0
        start = max(0, offset - self.context_units)
        return start // self._align * self._align

    def _plan(self, units: Sequence[int] | torch.Tensor, final: bool) -> _Job:
        if self.state is not StreamState.OPEN:
            raise ValueError("push: expected an open stream, got one whose final push was already made")
        if isinstance(units, torch.Tensor):
            if units.dim() != 1 or units.dtype.is_floating_point:
                raise ValueError(f"units: expected a 1-D integer tensor, got {tuple(units.shape)} {units.dtype}")
            units = units.tolist()
        new = [int(u) for u in units]
        vocab = self.flow.cfg.vocab_size
        bad = [u for u in new if not 0 <= u < vocab]
        if bad:
            raise ValueError(f"units: expected ids in [0, {vocab}), got {bad[:5]}")
        total = self.units + new
        n = len(total)
        stop = n if final else max(0, n - self.flow.cfg.pre_lookahead_len)
        return _Job(total, self.window_start(self.token_offset), stop, final)

    def _commit(self, job: _Job) -> None:
        self.last_window_units = len(job.units) - job.start if job.stop > self.token_offset else 0
        self.units = job.units
        self.token_offset = max(self.token_offset, job.stop)
        ratio = self.flow.cfg.token_mel_ratio
        self.noise.release_before(ratio * job.start)
        if job.final:
            self.cache, self.state = None, StreamState.FINISHED
        elif self.cache is not None:  # what the next window will not see is freed now
            self.cache.drop_before(ratio * self.window_start(self.token_offset))



def push_many(
    streams: Sequence[FlowStream], unit_blocks: Sequence[Sequence[int] | torch.Tensor], finals: Sequence[bool]
) -> list[torch.Tensor]:
    """Push one block into each stream with a single padded flow call; each result equals its own push."""
    if not len(streams) == len(unit_blocks) == len(finals):
        raise ValueError(
            f"push_many: expected equal counts, got {len(streams)} streams, "
            f"{len(unit_blocks)} unit blocks, {len(finals)} final flags"
        )
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("push_many: expected distinct streams")
    if streams and any(s.flow is not streams[0].flow for s in streams):
        raise ValueError("push_many: expected streams of one flow")
    jobs = [s._plan(u, bool(f)) for s, u, f in zip(streams, unit_blocks, finals, strict=True)]
    for s in streams:
        s.last_frames = 0
    ratio = streams[0].flow.cfg.token_mel_ratio if streams else 1
    out = [torch.zeros(s.flow.cfg.output_size, 0, device=s.flow.device) for s in streams]
    rows = [i for i, (s, j) in enumerate(zip(streams, jobs, strict=True)) if j.stop > s.token_offset]
    cached = [i for i in rows if streams[i].cache is not None]
    if cached:
        for i, mel in zip(cached, _push_cached([streams[i] for i in cached], [jobs[i] for i in cached]), strict=True):
            out[i] = mel
        rows = [i for i in rows if streams[i].cache is None]
    if rows:
        flow = streams[0].flow
        tokens, lens = _window_tokens([jobs[i] for i in rows])
        noise = torch.zeros(len(rows), flow.cfg.output_size, ratio * tokens.size(1))
        for r, i in enumerate(rows):
            job = jobs[i]
            noise[r, :, : ratio * lens[r]] = streams[i].noise.frames(ratio * job.start, ratio * len(job.units))
        spk = torch.stack([streams[i].spk.float().cpu() for i in rows])  # (B, 192)
        mel, mel_lens = flow.inference(tokens, torch.tensor(lens), spk, [jobs[i].final for i in rows], noise)
        for r, i in enumerate(rows):
            job, stream = jobs[i], streams[i]
            stream.last_frames = int(mel_lens[r])
            begin, end = ratio * (stream.token_offset - job.start), ratio * (job.stop - job.start)
            assert end == int(mel_lens[r]), f"frame bookkeeping: expected {end} frames, flow gave {int(mel_lens[r])}"
            out[i] = mel[r, :, begin:end]
    for s, j in zip(streams, jobs, strict=True):
        s._commit(j)
    return out


def _window_tokens(jobs: Sequence[_Job]) -> tuple[torch.Tensor, list[int]]:
    """Each job's window units [start, n) as a zero-padded (B, N) batch, and the window lengths."""
    lens = [len(j.units) - j.start for j in jobs]
    tokens = torch.zeros(len(jobs), max(lens), dtype=torch.long)
    for r, j in enumerate(jobs):
        tokens[r, : lens[r]] = torch.tensor(j.units[j.start :], dtype=torch.long)
    return tokens, lens


@torch.inference_mode()
def _push_cached(streams: Sequence[FlowStream], jobs: Sequence[_Job]) -> list[torch.Tensor]:
    """The flow call of cached streams: encode each window, run the estimator on the frames from each
    cache's end, store the chunks this call completes; returns each stream's emitted mel."""
    flow = streams[0].flow
    cfg, device, dtype = flow.cfg, flow.device, flow.dtype
    ratio = cfg.token_mel_ratio
    tokens, lens = _window_tokens(jobs)
    spk = torch.stack([s.spk.float().cpu() for s in streams])  # (B, 192)
    tokens, token_lens, spk = tokens.to(device), torch.tensor(lens, device=device), spk.to(device)
    flow.check_inputs(tokens, token_lens, spk)
    mu, mel_lens, s = flow.encode(tokens, token_lens, spk, [j.final for j in jobs])  # window frames
    # row r: new frames [done, end) in absolute frames; window frame w is absolute ratio * start + w
    spans = []
    for stream, job, m in zip(streams, jobs, mel_lens.tolist(), strict=True):
        cache = stream.cache
        assert cache is not None
        cache.drop_before(ratio * job.start)
        end = ratio * job.start + int(m)
        if not ratio * job.start <= cache.done <= ratio * stream.token_offset < end:
            raise AssertionError(f"flow cache bookkeeping: window {ratio * job.start}, cache end {cache.done}, "
                                 f"emitted {ratio * stream.token_offset}, call end {end}")
        spans.append((cache.done, end))
    T = max(e - d for d, e in spans)
    if T > cfg.noise_frames:
        raise ValueError(f"flow call too long: expected at most {cfg.noise_frames} mel frames per call, got {T}")
    B = len(jobs)
    mu_new = mu.new_zeros(B, cfg.output_size, T)
    noise = torch.zeros(B, cfg.output_size, T)
    for r, ((done, end), job, stream) in enumerate(zip(spans, jobs, streams, strict=True)):
        lo = done - ratio * job.start
        mu_new[r, :, : end - done] = mu[r, :, lo : lo + end - done]
        noise[r, :, : end - done] = stream.noise.frames(done, end)
    new_lens = torch.tensor([e - d for d, e in spans], device=device)
    mask = (torch.arange(T, device=device)[None, :] < new_lens[:, None])[:, None, :].to(dtype)  # (B, 1, T)
    grid = ratio * streams[0]._align  # frames: chunk boundaries of both the encoder and the estimator
    commit = [0 if job.final else max(0, end // grid * grid - done) for (done, end), job in zip(spans, jobs,
                                                                                                   strict=True)]
    call = CachedCall([st.cache for st in streams], [e - d for d, e in spans], commit,  # type: ignore[misc]
                      cfg.decoder_chunk_frames, CONV_KERNEL, device, dtype)
    mel = flow.decoder(mu_new * mask, mask, s, torch.zeros_like(mu_new), noise.to(device=device, dtype=dtype),
                       cached=call)
    mel = (mel * mask).float()
    out = []
    for r, ((done, end), job, stream) in enumerate(zip(spans, jobs, streams, strict=True)):
        stream.last_frames = end - done
        out.append(mel[r, :, ratio * stream.token_offset - done : ratio * job.stop - done])
    return out


# ---- measurement helpers (used by tests and the benchmark) -----------------------------------------


def _default_spk(flow: Flow, seed: int) -> torch.Tensor:
    return torch.randn(flow.cfg.spk_embed_dim, generator=torch.Generator().manual_seed(seed))


def stream_reply(
    flow: Flow,
    units: Sequence[int],
    block: int = LIVE_BLOCK_UNITS,
    context_units: int | None = None,
    spk: torch.Tensor | None = None,
    seed: int = 0,
) -> list[torch.Tensor]:
    """Push `units` in blocks of `block` (the last push final) and return the emitted mel blocks."""
    stream = FlowStream(flow, spk if spk is not None else _default_spk(flow, seed), seed, context_units)
    starts = list(range(0, len(units), block)) or [0]
    return [stream.push(list(units[b : b + block]), final=b == starts[-1]) for b in starts]


@dataclass(frozen=True)
class FlowDeviation:
    """How far bounded-context mel is from faithful (full recompute) mel over one reply."""

    context_units: int
    frames: int
    max_abs: float  # max |bounded - faithful|
    rms: float  # root-mean-square difference
    rel_rms: float  # rms / standard deviation of the faithful mel


def bounded_context_deviation(
    flow: Flow,
    units: Sequence[int],
    context_units: int,
    block: int = LIVE_BLOCK_UNITS,
    spk: torch.Tensor | None = None,
    seed: int = 0,
) -> FlowDeviation:
    """Stream `units` in both modes with the same speaker and noise and compare the mel."""
    full = torch.cat(stream_reply(flow, units, block, None, spk, seed), dim=1)  # (80, 2n)
    bounded = torch.cat(stream_reply(flow, units, block, context_units, spk, seed), dim=1)
    diff = (bounded - full).abs()
    rms = float(diff.pow(2).mean().sqrt())
    return FlowDeviation(context_units, full.size(1), float(diff.max()), rms, rms / float(full.std()))


def flow_block_times(
    flow: Flow,
    reply_units: Sequence[int],
    block: int = LIVE_BLOCK_UNITS,
    context_units: int | None = None,
    spk: torch.Tensor | None = None,
    seed: int = 0,
) -> list[float]:
    """Wall-clock seconds of each push when streaming `reply_units` in blocks of `block`."""
    stream = FlowStream(flow, spk if spk is not None else _default_spk(flow, seed), seed, context_units)
    starts = list(range(0, len(reply_units), block)) or [0]
    sync = torch.cuda.synchronize if flow.device.type == "cuda" else (lambda: None)
    times = []
    for b in starts:
        sync()
        t0 = time.perf_counter()
        stream.push(list(reply_units[b : b + block]), final=b == starts[-1])
        sync()
        times.append(time.perf_counter() - t0)
    return times
