"""Streaming vocoding per session: units -> flow mel -> HiFT with the reference cache scheme.

Per session (architecture reference 5.4, identical to LLaMA-Omni2's `token2wav`): the last 8 mel frames,
the last 3840 excitation samples and the last 3840 speech samples are cached. Each call vocodes
[cached mel | new mel] with the cached excitation written over the start of the new one, cross-fades the
first 3840 samples with the cached speech (symmetric Hamming window of 7680; its halves sum to about
1.08, as in the reference), emits everything but the last 3840 samples (160 ms held back for the next
cross-fade) and, on the final call, flushes everything.

`HiFTStream` is that scheme on mel input; `VocoderStream` puts a flow stream in front of it (the flow stream
holds back the last 3 units for look-ahead); `open_stream(decoder, spk, seed, ...)` opens one for a loaded
`Cosy2Decoder`. `vocode_mels` / `vocode_many` run several sessions in one HiFT call when their mel lengths
and cache states match; rows draw their excitation noise from their own session generator, so a batched
call equals the per-session calls. The random draws (flow noise, HiFT excitation) are seeded per session
and can be given instead, to compare a run with another implementation's.

Deviations (never reached by the live 10-unit schedule): a first non-final call with fewer than 8 new mel
frames is held until 8 frames are available (the reference would fail its cross-fade later); a non-final
call with no new frames emits nothing and leaves the cache untouched.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from enum import Enum

import numpy as np
import torch

from voice_agent.audio import SAMPLES_PER_MEL_FRAME
from voice_agent.engine.flow_stream import LIVE_BLOCK_UNITS, FlowStream, push_many
from voice_agent.model.cosy2.decoder import Cosy2Decoder
from voice_agent.model.cosy2.hift import Excitation, HiFT

MEL_CACHE_FRAMES = 8  # mel frames re-vocoded at the start of the next call
SOURCE_CACHE_SAMPLES = MEL_CACHE_FRAMES * SAMPLES_PER_MEL_FRAME  # 3840 excitation samples
SPEECH_CACHE_SAMPLES = SOURCE_CACHE_SAMPLES  # 3840 speech samples kept for the cross-fade
HELD_BACK_SAMPLES = SPEECH_CACHE_SAMPLES  # audio a non-final call withholds (160 ms)
CROSSFADE_WINDOW = np.hamming(2 * SPEECH_CACHE_SAMPLES)  # symmetric, float64, (7680,)
UNITS_PER_BLOCK = LIVE_BLOCK_UNITS  # 10 units the TTS LM writes per burst in the live schedule
# A session seeds its flow noise with `seed` and its HiFT excitation with `seed ^ EXCITATION_SEED_SALT`, so the
# two generators never replay the same random stream.
EXCITATION_SEED_SALT = 0x48494654


class StreamPhase(Enum):
    """WARMUP: nothing vocoded yet (no cache). CACHED: a cache from the last call. DONE: final call made."""

    WARMUP = "warmup"
    CACHED = "cached"
    DONE = "done"


class HiFTStream:
    """One session's HiFT cache and excitation generator; `push(mel, final)` returns new audio.

    `excitation` (optional) gives the excitation draws instead: one `Excitation` per HiFT call this stream
    makes, in order (each over the call's mel frames, the 8 re-vocoded ones included); the seeded generator
    is then not used."""

    def __init__(self, hift: HiFT, seed: int, excitation: Iterable[Excitation] | None = None):
        self.hift = hift
        device = hift.conv_pre.weight.device
        self.generator = torch.Generator(device=device).manual_seed(seed)
        self.excitation: Iterator[Excitation] | None = None if excitation is None else iter(excitation)
        self.phase = StreamPhase.WARMUP
        dtype = hift.conv_pre.weight.dtype
        self.pending = torch.zeros(hift.cfg.in_channels, 0, device=device, dtype=dtype)  # (80, t) not vocoded yet
        self.mel_cache: torch.Tensor | None = None  # (80, 8)
        self.source_cache: torch.Tensor | None = None  # (1, 3840)
        self.speech_cache: np.ndarray | None = None  # (3840,) float32

    def push(self, mel: torch.Tensor, final: bool) -> np.ndarray:
        """mel (80, T_new) -> float32 24 kHz samples to play now."""
        return vocode_mels(self.hift, [self], [mel], [final])[0]


def _plan(stream: HiFTStream, mel: torch.Tensor, final: bool) -> torch.Tensor | None:
    """Update pending frames; return the full mel (80, T) to vocode now, or None when nothing is due."""
    new = torch.cat([stream.pending, mel.to(stream.pending)], dim=1)  # (80, t)
    stream.pending = new[:, :0]
    if stream.phase is StreamPhase.WARMUP:
        if final:
            stream.phase = StreamPhase.DONE
            return new if new.shape[1] > 0 else None
        if new.shape[1] < MEL_CACHE_FRAMES:
            stream.pending = new
            return None
        return new
    if new.shape[1] == 0 and not final:
        return None
    assert stream.mel_cache is not None, "a cached stream holds its mel cache"
    return torch.cat([stream.mel_cache, new], dim=1)  # (80, 8 + t)


def _finish(stream: HiFTStream, mel: torch.Tensor, speech: torch.Tensor, source: torch.Tensor,
            final: bool) -> np.ndarray:
    """Cross-fade with the cached speech, update the cache, return the samples to emit."""
    out = speech.float().cpu().numpy()  # (N,)
    if stream.phase is StreamPhase.CACHED:
        assert stream.speech_cache is not None, "a cached stream holds its speech cache"
        half = SPEECH_CACHE_SAMPLES
        faded = out[:half] * CROSSFADE_WINDOW[:half] + stream.speech_cache * CROSSFADE_WINDOW[half:]
        out = np.concatenate([faded.astype(np.float32), out[half:]])
    if final:
        stream.phase = StreamPhase.DONE
        stream.mel_cache = stream.source_cache = stream.speech_cache = None
        return out
    stream.phase = StreamPhase.CACHED
    stream.mel_cache = mel[:, -MEL_CACHE_FRAMES:]
    stream.source_cache = source[:, -SOURCE_CACHE_SAMPLES:]
    stream.speech_cache = out[-SPEECH_CACHE_SAMPLES:].copy()
    return out[:-HELD_BACK_SAMPLES]


def vocode_mels(hift: HiFT, streams: Sequence[HiFTStream], mels: Sequence[torch.Tensor],
                finals: Sequence[bool]) -> list[np.ndarray]:
    """Advance several sessions by one mel block each; sessions with equal shapes share one HiFT call."""
    if not len(streams) == len(mels) == len(finals):
        raise ValueError(f"vocode_mels: expected equal counts, got {len(streams)} streams, "
                         f"{len(mels)} mels, {len(finals)} finals")
    if len({id(s) for s in streams}) != len(streams):
        raise ValueError("vocode_mels: expected each session at most once per call")
    n_mels = hift.cfg.in_channels
    for i, (stream, mel) in enumerate(zip(streams, mels, strict=True)):  # validate before any state changes
        if stream.hift is not hift:
            raise ValueError(f"vocode_mels: session {i} belongs to another HiFT model")
        if stream.phase is StreamPhase.DONE:
            raise ValueError(f"vocode_mels: session {i} expected no call after its final one, got another")
        if mel.dim() != 2 or mel.shape[0] != n_mels:
            raise ValueError(f"vocode_mels: session {i} expected mel ({n_mels}, T), got {tuple(mel.shape)}")
    results: list[np.ndarray] = [np.zeros(0, dtype=np.float32) for _ in streams]
    groups: dict[tuple[int, bool], list[tuple[int, torch.Tensor]]] = {}
    for i, (stream, mel, final) in enumerate(zip(streams, mels, finals, strict=True)):
        cached = stream.phase is StreamPhase.CACHED
        full = _plan(stream, mel, final)
        if full is not None:
            groups.setdefault((full.shape[1], cached), []).append((i, full))
    for (_, cached), rows in groups.items():
        batch = torch.stack([full for _, full in rows])  # (B, 80, T)
        sources = [streams[i].source_cache for i, _ in rows]
        cache = torch.stack([c for c in sources if c is not None]) if cached else None  # (B, 1, 3840)
        given = [_next_excitation(streams[i]) for i, _ in rows]
        speech, source = hift.inference(batch, cache, [streams[i].generator for i, _ in rows],
                                        given if any(e is not None for e in given) else None)
        for row, (i, full) in enumerate(rows):
            results[i] = _finish(streams[i], full, speech[row], source[row], finals[i])
    return results


def _next_excitation(stream: HiFTStream) -> Excitation | None:
    if stream.excitation is None:
        return None
    given = next(stream.excitation, None)
    if given is None:
        raise ValueError("vocode_mels: the stream's given excitation draws ran out")
    return given


class VocoderStream:
    """One session from units to audio: a flow stream feeding a `HiFTStream` (whose excitation generator is
    seeded with `seed`; see `EXCITATION_SEED_SALT`; `excitation` gives its draws instead)."""

    def __init__(self, flow_stream: FlowStream, hift: HiFT, seed: int,
                 excitation: Iterable[Excitation] | None = None):
        self.flow_stream = flow_stream
        self.hift_stream = HiFTStream(hift, seed, excitation)

    @property
    def phase(self) -> StreamPhase:
        return self.hift_stream.phase

    def push(self, units: Sequence[int] | torch.Tensor, final: bool) -> np.ndarray:
        """New units (e.g. a 10-unit block) -> float32 24 kHz samples to play now."""
        mel = self.flow_stream.push(units, final)  # (80, T_new)
        return self.hift_stream.push(mel, final)


def vocode_many(streams: Sequence[VocoderStream], unit_blocks: Sequence[Sequence[int]],
                finals: Sequence[bool]) -> list[np.ndarray]:
    """Advance several sessions by one unit block each, batching the flow and HiFT where shapes allow."""
    if not streams:
        return []
    hift = streams[0].hift_stream.hift
    mels = push_many([s.flow_stream for s in streams], [list(u) for u in unit_blocks], list(finals))
    return vocode_mels(hift, [s.hift_stream for s in streams], mels, finals)


def open_stream(decoder: Cosy2Decoder, spk: torch.Tensor, seed: int, context_units: int | None = None,
                cached: bool = True, *, noise: torch.Tensor | None = None,
                excitation: Iterable[Excitation] | None = None) -> VocoderStream:
    """A new session of `decoder`: units in, 24 kHz audio out. The flow noise is seeded with `seed`, the
    HiFT excitation with `seed ^ EXCITATION_SEED_SALT`; `noise` (80, >= 2 * units) and `excitation` give
    those draws instead. `context_units` bounds the flow's window, `cached` keeps completed chunks (see
    flow_stream)."""
    flow_stream = FlowStream(decoder.flow, spk, seed, context_units=context_units, cached=cached, noise=noise)
    return VocoderStream(flow_stream, decoder.hift, seed ^ EXCITATION_SEED_SALT, excitation)
