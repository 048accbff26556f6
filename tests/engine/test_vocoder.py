"""Streaming vocoder: the reference cache scheme, chunk sizes, joins, batching, determinism, given draws."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from voice_agent.engine.vocoder import (
    CROSSFADE_WINDOW,
    EXCITATION_SEED_SALT,
    HELD_BACK_SAMPLES,
    HiFTStream,
    StreamPhase,
    open_stream,
    vocode_many,
    vocode_mels,
)
from voice_agent.model.cosy2.decoder import Cosy2Decoder
from voice_agent.model.cosy2.flow import NoiseSource
from voice_agent.model.cosy2.hift import Excitation, HiFT, draw_excitation, load_hift
from voice_agent.model.cosy2.hift_config import HiFTConfig
from voice_agent.model.cosy2.tiny import write_tiny_hift

TINY = HiFTConfig.tiny()
BLOCKS = (14, 20, 20, 9)  # mel frames per call in the live schedule: 7 units, then 10, 10, then the rest


@pytest.fixture(scope="module")
def hift(tmp_path_factory: pytest.TempPathFactory) -> HiFT:
    return load_hift(write_tiny_hift(tmp_path_factory.mktemp("hift") / "hift.pt", TINY, seed=1), TINY)


def smooth_mel(frames: int, seed: int) -> torch.Tensor:
    """A log-mel-like (80, T) that changes slowly over time."""
    g = torch.Generator().manual_seed(seed)
    knots = torch.randn(1, 80, frames // 8 + 2, generator=g)
    return torch.nn.functional.interpolate(knots, size=frames, mode="linear")[0] - 5.0


def mel_blocks(seed: int, blocks: tuple[int, ...] = BLOCKS) -> list[torch.Tensor]:
    mel = smooth_mel(sum(blocks), seed)
    return list(torch.split(mel, list(blocks), dim=1))


def reference_token2wav(hift: HiFT, blocks: list[torch.Tensor], seed: int) -> list[np.ndarray]:
    """The reference per-call scheme written out directly: concatenate the cached mel, vocode with the
    cached source, cross-fade the first 3840 samples with the cached speech, hold back the last 3840."""
    generator = torch.Generator().manual_seed(seed)
    window = torch.from_numpy(np.hamming(2 * 3840))
    cache = None
    out = []
    for i, new in enumerate(blocks):
        final = i == len(blocks) - 1
        mel = new[None] if cache is None else torch.cat([cache["mel"], new[None]], dim=2)
        source = torch.zeros(1, 1, 0) if cache is None else cache["source"]
        speech, s = hift.inference(mel, source, generator)
        speech = speech.clone()
        if cache is not None:
            speech[:, :3840] = speech[:, :3840] * window[:3840] + cache["speech"] * window[3840:]
        if final:
            out.append(speech[0].numpy())
        else:
            cache = {"mel": mel[:, :, -8:], "source": s[:, :, -3840:], "speech": speech[:, -3840:]}
            out.append(speech[0, :-3840].numpy())
    return out


def test_constants_follow_the_physics() -> None:
    assert HELD_BACK_SAMPLES == 8 * 480 == 3840
    assert CROSSFADE_WINDOW.shape == (7680,) and np.allclose(CROSSFADE_WINDOW, CROSSFADE_WINDOW[::-1])
    overlap = CROSSFADE_WINDOW[:3840] + CROSSFADE_WINDOW[3840:]
    assert 1.07 < overlap.max() < 1.09  # the reference's Hamming halves do not sum to one


def test_stream_equals_reference_cache_scheme(hift: HiFT) -> None:
    stream = HiFTStream(hift, seed=11)
    blocks = mel_blocks(0)
    ours = [stream.push(b, final=i == len(blocks) - 1) for i, b in enumerate(blocks)]
    expected = reference_token2wav(hift, blocks, seed=11)
    assert [len(c) for c in ours] == [2880, 9600, 9600, (8 + 9) * 480]
    assert sum(len(c) for c in ours) == 480 * sum(BLOCKS)
    for a, b in zip(ours, expected, strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-7)
    assert stream.phase is StreamPhase.DONE
    with pytest.raises(ValueError, match="after its final one"):
        stream.push(blocks[0], final=True)


def seeded_excitation(seed: int, call_frames: list[int]) -> list[Excitation]:
    """The draws a stream seeded with `seed` makes, one per HiFT call of `call_frames` mel frames."""
    g = torch.Generator().manual_seed(seed)
    return [draw_excitation(g, TINY.nb_harmonics + 1, 480 * frames) for frames in call_frames]


def test_given_excitation_equal_to_the_seeded_draws_gives_the_same_stream(hift: HiFT) -> None:
    blocks = mel_blocks(1)
    calls = [BLOCKS[0]] + [8 + t for t in BLOCKS[1:]]  # every call after the first re-vocodes 8 cached frames

    def run(excitation: list[Excitation] | None) -> np.ndarray:
        stream = HiFTStream(hift, seed=11, excitation=excitation)
        return np.concatenate([stream.push(b, final=i == len(blocks) - 1) for i, b in enumerate(blocks)])

    seeded = run(None)
    np.testing.assert_array_equal(run(seeded_excitation(11, calls)), seeded)
    other = seeded_excitation(12, calls)
    assert np.abs(run(other) - seeded).max() > 1e-3
    with pytest.raises(ValueError, match="ran out"):
        run(seeded_excitation(11, calls[:2]))


def test_open_stream_with_given_noise_and_excitation_equals_the_seeded_session(decoder_dir: Path) -> None:
    decoder = Cosy2Decoder.load(decoder_dir)
    spk, seed = decoder.voice("en"), 5
    units = [int(u) for u in np.random.default_rng(3).integers(0, 6561, 23)]
    blocks = [units[b:b + 10] for b in range(0, 23, 10)]

    def run(**given: torch.Tensor | list[Excitation]) -> np.ndarray:
        stream = open_stream(decoder, spk, seed, **given)
        return np.concatenate([stream.push(b, final=i == len(blocks) - 1) for i, b in enumerate(blocks)])

    seeded = run()
    noise = NoiseSource(seed).frames(0, 2 * len(units))  # (80, 46): the flow's draws
    excitation = seeded_excitation(seed ^ EXCITATION_SEED_SALT, [14, 8 + 20, 8 + 12])  # 7, 10, then 3 + 3 units
    np.testing.assert_array_equal(run(noise=noise, excitation=excitation), seeded)
    np.testing.assert_array_equal(run(noise=noise), seeded)
    assert np.abs(run(noise=noise + 0.5, excitation=excitation) - seeded).max() > 1e-3
    assert np.abs(run(noise=noise, excitation=seeded_excitation(1, [14, 28, 20])) - seeded).max() > 1e-3


class FakeClockHiFT(HiFT):
    """Fake vocoder: ignores its network and plays a ~106 Hz sine of absolute time, read from mel bin 0
    (which the test fills with the absolute frame index). Any lost, repeated or misaligned sample in the
    stream's bookkeeping shows up as a jump in an otherwise smooth signal."""

    amplitude, period = 0.5, 227  # samples; not a divisor of 480, so a repeated frame shifts the phase

    def decode(self, mel: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        n = torch.arange(mel.shape[-1] * 480, dtype=torch.float64)
        start = mel[:, 0, :1].double() * 480  # (B, 1) absolute sample index of the first frame
        return (self.amplitude * torch.sin(2 * np.pi * (start + n) / self.period)).float()


def joins_and_inside(chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Absolute sample-to-sample jumps at the joins between chunks, and everywhere else."""
    jumps = np.abs(np.diff(np.concatenate(chunks)))
    joins = np.cumsum([len(c) for c in chunks])[:-1] - 1
    return jumps[joins], np.delete(jumps, joins)


def test_no_discontinuity_at_block_joins(hift: HiFT) -> None:
    fake = FakeClockHiFT(TINY)
    fake.load_state_dict(hift.state_dict())
    sizes = (14, 20, 20, 20, 20, 12)
    mel = smooth_mel(sum(sizes), 1)
    mel[0] = torch.arange(sum(sizes), dtype=torch.float32)  # the clock
    blocks = list(torch.split(mel, list(sizes), dim=1))
    stream = HiFTStream(fake, seed=3)
    chunks = [stream.push(b, final=i == len(blocks) - 1) for i, b in enumerate(blocks)]
    assert sum(len(c) for c in chunks) == 480 * sum(sizes)
    at_joins, inside = joins_and_inside(chunks)
    slope = fake.amplitude * 2 * np.pi / fake.period  # largest step of the sine itself
    bump = 0.08 * fake.amplitude  # the Hamming halves sum to 1.08 at the ends of the cross-fade
    bound = 1.08 * slope + bump + 1e-4  # the reference's own worst case inside a cross-fade
    assert at_joins.max() <= bound and inside.max() <= bound
    # The measure can fail: playing every call whole (no hold-back) repeats 8 frames at each join.
    whole = [fake.decode(torch.cat([blocks[i - 1][:, -8:], b], 1)[None] if i else b[None], None)[0].numpy()
             for i, b in enumerate(blocks)]
    assert joins_and_inside(whole)[0].max() > 2 * bound


def test_short_first_block_waits_for_the_cache_length(hift: HiFT) -> None:
    stream = HiFTStream(hift, seed=0)
    mel = smooth_mel(30, 2)
    assert len(stream.push(mel[:, :5], final=False)) == 0 and stream.phase is StreamPhase.WARMUP
    assert len(stream.push(mel[:, 5:10], final=False)) == 10 * 480 - HELD_BACK_SAMPLES
    assert len(stream.push(mel[:, 10:10], final=False)) == 0  # nothing new: nothing emitted
    assert len(stream.push(mel[:, 10:], final=True)) == (8 + 20) * 480


def test_streams_are_deterministic_per_seed(hift: HiFT) -> None:
    blocks = mel_blocks(3)

    def run(seed: int) -> np.ndarray:
        stream = HiFTStream(hift, seed)
        return np.concatenate([stream.push(b, final=i == len(blocks) - 1) for i, b in enumerate(blocks)])

    assert np.array_equal(run(5), run(5))
    assert not np.array_equal(run(5), run(6))


def test_batched_sessions_equal_each_alone(hift: HiFT) -> None:
    """Three sessions, two in step (batched together) and one a block behind; float64 so that convolution
    rounding of batched calls cannot hide a mix-up."""
    model = HiFT(TINY).double()
    model.load_state_dict(hift.state_dict())
    model.eval()
    sessions = [mel_blocks(s) for s in (10, 11, 12)]
    sessions[2] = [smooth_mel(10, 13)[:, :4]] + sessions[2]  # a short first block: one call behind
    seeds = (1, 2, 3)
    alone = []
    for seed, blocks in zip(seeds, sessions, strict=True):
        stream = HiFTStream(model, seed)
        alone.append([stream.push(b, final=i == len(blocks) - 1) for i, b in enumerate(blocks)])
    streams = [HiFTStream(model, seed) for seed in seeds]
    together: list[list[np.ndarray]] = [[], [], []]
    for step in range(max(len(b) for b in sessions)):
        rows = [i for i in range(3) if step < len(sessions[i])]
        outs = vocode_mels(model, [streams[i] for i in rows], [sessions[i][step] for i in rows],
                           [step == len(sessions[i]) - 1 for i in rows])
        for i, out in zip(rows, outs, strict=True):
            together[i].append(out)
    for a, b in zip(alone, together, strict=True):
        assert [len(x) for x in a] == [len(x) for x in b]
        np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), rtol=0, atol=1e-6)


# ---- flow in front: units -> audio ---------------------------------------------------------------


def test_unit_blocks_give_the_live_chunk_sizes_and_batch_equals_alone(decoder_dir: Path) -> None:
    decoder = Cosy2Decoder.load(decoder_dir, dtype=torch.float64)
    decoder.hift.double()
    spk = decoder.voice("en").double()
    rng = np.random.default_rng(0)
    replies = [[int(u) for u in rng.integers(0, 6561, n)] for n in (23, 23, 3)]
    blocks = [[r[b:b + 10] for b in range(0, len(r), 10)] for r in replies]
    alone = []
    for seed, bs in enumerate(blocks):
        stream = open_stream(decoder, spk, seed)
        alone.append([stream.push(b, final=i == len(bs) - 1) for i, b in enumerate(bs)])
    assert [len(c) for c in alone[0]] == [2880, 9600, 9600]  # 7 units, 10, then 3 + 3 held + 8 cached frames
    assert sum(len(c) for c in alone[0]) == 23 * 960
    assert [len(c) for c in alone[2]] == [3 * 960]  # a single final call: no cache, nothing held back
    streams = [open_stream(decoder, spk, seed) for seed in range(3)]
    together: list[list[np.ndarray]] = [[], [], []]
    for step in range(3):
        rows = [i for i in range(3) if step < len(blocks[i])]
        outs = vocode_many([streams[i] for i in rows], [blocks[i][step] for i in rows],
                           [step == len(blocks[i]) - 1 for i in rows])
        for i, out in zip(rows, outs, strict=True):
            together[i].append(out)
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(np.concatenate(a), np.concatenate(b), rtol=0, atol=1e-6)
    assert not np.allclose(np.concatenate(alone[0]), np.concatenate(alone[1]))  # other seed, other audio


def test_bench_vocoder_prints_per_block_figures(capsys: pytest.CaptureFixture[str]) -> None:
    from voice_agent.tools.bench_vocoder import main

    assert main(["--preset", "tiny", "--reply-units", "30", "--context-units", "10"]) == 0
    out = capsys.readouterr().out
    assert "reply 30 units (1.2 s) in blocks of 10" in out
    assert "faithful: median flow ms" in out and "bounded (10 units): median flow ms" in out
    assert "bounded (10) + cache: median flow ms" in out
    assert "mel (bounded (10 units) vs faithful)" in out and "waveform (bounded (10 units) vs faithful)" in out
    assert "mel (bounded (10) + cache vs faithful)" in out
