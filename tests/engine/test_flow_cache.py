"""Tests of the flow's chunk cache: cached streaming equals the full recompute, batches equal rows alone,
bounded caches stay bounded and are closer to the recompute than the plain bounded window; given noise
equal to the seeded draws gives the same mel in every streaming mode."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from voice_agent.engine.flow_cache import FlowCache
from voice_agent.engine.flow_stream import FlowStream, max_cached_frames, push_many
from voice_agent.model.cosy2.flow import Flow, NoiseSource, load_flow
from voice_agent.model.cosy2.flow_config import FlowConfig

CFG = FlowConfig.tiny()
SMALL = CFG.with_chunks(5, 10)  # same weights, 5-unit / 10-frame chunks: many completed chunks in a short reply


@pytest.fixture(scope="module")
def flow(flow_path: Path) -> Flow:
    return load_flow(flow_path, CFG)


@pytest.fixture(scope="module")
def small(flow_path: Path) -> Flow:
    return load_flow(flow_path, SMALL)


def _units(n: int, seed: int) -> list[int]:
    return torch.randint(0, CFG.vocab_size, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def _spk(seed: int) -> torch.Tensor:
    return torch.randn(CFG.spk_embed_dim, generator=torch.Generator().manual_seed(seed))


def _stream(flow: Flow, units: list[int], blocks: list[int], context: int | None, cached: bool,
            seed: int = 3) -> tuple[torch.Tensor, FlowStream]:
    """Push `units` in blocks of the given sizes (the last push final); the mel and the stream."""
    stream = FlowStream(flow, _spk(seed), seed, context, cached=cached)
    out, at = [], 0
    for i, size in enumerate(blocks):
        out.append(stream.push(units[at : at + size], final=i == len(blocks) - 1))
        at += size
    assert at == len(units)
    return torch.cat(out, dim=1), stream


def _rel_rms(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a - ref).pow(2).mean().sqrt() / ref.std())


@pytest.mark.parametrize("blocks", [[10] * 12 + [7], [3, 17, 1, 30, 9, 40, 27]])
def test_cached_stream_equals_the_full_recompute(small: Flow, blocks: list[int]) -> None:
    units = _units(sum(blocks), 1)
    full, _ = _stream(small, units, blocks, None, cached=False)
    cached, stream = _stream(small, units, blocks, None, cached=True)
    assert cached.shape == full.shape == (80, 2 * len(units))
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5), float((cached - full).abs().max())
    assert stream.cache is None  # the final push frees it


def test_cached_stream_equals_the_recompute_at_the_official_chunk_sizes(flow: Flow) -> None:
    units = _units(130, 2)  # crosses the 100-frame chunk twice
    blocks = [10] * 13
    full, _ = _stream(flow, units, blocks, None, cached=False)
    cached, _ = _stream(flow, units, blocks, None, cached=True)
    assert torch.allclose(cached, full, atol=1e-5, rtol=1e-5), float((cached - full).abs().max())


def test_cache_holds_only_completed_chunks(small: Flow) -> None:
    stream = FlowStream(small, _spk(0), 0, None, cached=True)
    units = _units(60, 4)
    stream.push(units[:10], final=False)  # 10 units -> 14 frames: one complete 10-frame chunk
    assert stream.cache is not None and (stream.cache.first, stream.cache.done) == (0, 10)
    stream.push(units[10:12], final=False)  # 12 units -> 18 frames: still one complete chunk
    assert stream.cache.done == 10
    stream.push(units[12:40], final=False)  # 40 units -> 74 frames: seven chunks
    assert stream.cache.done == 70
    steps = CFG.n_timesteps
    assert len(stream.cache.kv) == len(stream.cache.tails) == steps
    blocks = CFG.estimator_n_blocks * (2 + CFG.estimator_num_mid_blocks)
    heads, d = CFG.estimator_num_heads, CFG.estimator_attention_head_dim
    assert tuple(stream.cache.kv[0].shape) == (blocks, 2, 2, heads, 70, d)
    assert max_cached_frames(SMALL, None, 60) == 120 and max_cached_frames(SMALL, None, 64) == 120
    held = sum(t.numel() * t.element_size() for t in stream.cache.kv)
    assert held == FlowCache.bytes_for(small.cfg, 70)


def test_batched_cached_streams_equal_each_stream_alone(small: Flow) -> None:
    """Rows with different cache lengths, windows, block sizes and a recompute row share one call."""
    specs = [(None, True, 0), (20, True, 1), (None, False, 2), (5, True, 3)]  # (context, cached, seed)

    def streams() -> list[FlowStream]:
        return [FlowStream(small, _spk(seed), seed, context, cached=cached) for context, cached, seed in specs]

    together, alone = streams(), streams()
    replies = [_units(n, 10 + i) for i, n in enumerate((70, 55, 40, 63))]
    starts = [0, 2, 1, 0]  # rows join the batch at different pushes: different cache lengths
    sizes = [7, 10, 13, 6]
    at = [0] * 4
    for push in range(12):
        live = [i for i in range(4) if push >= starts[i] and at[i] < len(replies[i])]
        if not live:
            break
        blocks = [replies[i][at[i] : at[i] + sizes[i]] for i in live]
        finals = [at[i] + sizes[i] >= len(replies[i]) for i in live]
        got = push_many([together[i] for i in live], blocks, finals)
        for i, block, final, mel in zip(live, blocks, finals, got, strict=True):
            want = alone[i].push(block, final)
            assert mel.shape == want.shape
            assert torch.allclose(mel, want, atol=1e-5, rtol=1e-5), (i, push, float((mel - want).abs().max()))
            at[i] += sizes[i]
    assert all(a >= len(r) for a, r in zip(at, replies, strict=True))


def test_bounded_cache_stays_bounded_and_is_closer_to_faithful(small: Flow) -> None:
    units = _units(150, 5)
    blocks = [10] * 15
    full, _ = _stream(small, units, blocks, None, cached=False)
    context = 20  # units: the window starts on a 5-unit boundary at or before token_offset - 20
    stream = FlowStream(small, _spk(3), 3, context, cached=True)
    out, peak = [], 0
    for i, size in enumerate(blocks):
        out.append(stream.push(units[10 * i : 10 * i + size], final=i == len(blocks) - 1))
        if stream.cache is not None:
            assert stream.cache.first >= 2 * stream.window_start(stream.token_offset)
            assert 0 < stream.cache.frames <= max_cached_frames(SMALL, context, len(units)) == 40
            peak = max(peak, stream.cache.frames)
    assert peak == 40  # the bound is reached
    cached = torch.cat(out, dim=1)
    bounded, _ = _stream(small, units, blocks, context, cached=False)
    assert 0 < _rel_rms(cached, full) < _rel_rms(bounded, full)


def test_uncached_flow_without_chunks_falls_back_to_the_recompute(flow_path: Path) -> None:
    unchunked = load_flow(flow_path, CFG.with_chunks(0, 0))
    stream = FlowStream(unchunked, _spk(0), 0, None, cached=True)
    assert stream.cache is None  # bidirectional everywhere: nothing is ever final
    units = _units(30, 6)
    got = torch.cat([stream.push(units[:20], False), stream.push(units[20:], True)], dim=1)
    want, _ = _stream(unchunked, units, [20, 10], None, cached=False, seed=0)
    assert torch.equal(got, want)


def test_bytes_for_scales_with_frames_and_dtype() -> None:
    official = FlowConfig()
    per_frame = FlowCache.bytes_for(official, 1)
    assert per_frame == 10 * 2 * 56 * 2 * 512 * 4  # steps, rows, blocks, key + value, heads * head_dim, fp32
    assert FlowCache.bytes_for(official, 200, torch.bfloat16) == 100 * per_frame


@pytest.mark.parametrize(("context", "cached"), [(None, False), (10, False), (None, True), (10, True)])
def test_injected_noise_equal_to_the_seeded_draws_gives_the_same_mel(small: Flow, context: int | None,
                                                                      cached: bool) -> None:
    """The noise a stream would draw, given from outside, gives bit for bit the same mel in every mode
    (faithful, bounded, cached); other noise gives other mel."""
    units, spk, seed = _units(33, 7), _spk(7), 4

    def stream(noise: torch.Tensor | None) -> torch.Tensor:
        s = FlowStream(small, spk, seed, context, cached=cached, noise=noise)
        starts = range(0, len(units), 10)
        return torch.cat([s.push(units[b : b + 10], final=b == starts[-1]) for b in starts], dim=1)

    drawn = NoiseSource(seed).frames(0, 2 * len(units))  # (80, 66): what the seeded stream reads
    default = stream(None)
    assert torch.equal(stream(drawn.clone()), default)
    other = stream(torch.randn(drawn.shape, generator=torch.Generator().manual_seed(99)))
    assert (other - default).abs().max() > 0.1
    with pytest.raises(ValueError, match="frames were given"):
        stream(drawn[:, :40])
    with pytest.raises(ValueError, match=r"noise: expected \(80, frames\)"):
        FlowStream(small, spk, seed, noise=drawn[:40])
