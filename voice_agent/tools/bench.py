"""Benchmarks that print figures (never timed assertions): `voice-agent bench engine` and `bench model`.

`bench engine`: N concurrent synthetic turns through the engine (no network, no server): first-audio
latency p50/p95/p99 (from submission), the longest gap between a turn's audio chunks, the per-turn
real-time factor (generation time / audio length), aggregate throughput, and the mean batch per call.
`--sequential` runs the same turns one after another; `--compare` runs both and prints the batching
ratio (sequential wall time / concurrent wall time). Reply lengths are forced (`--text-tokens`,
`--final-units`: eos masked, every block full) so runs compare across models and settings.
`--transcribe` submits every turn with a user transcript (Whisper's text decoder: the model's large-v3.pt
with `--model-dir`, random weights at large-v3's text shapes with a preset, whose transcripts always run
to openai-whisper's 224-token limit) and adds when each transcript was done; compare its first-audio
figures with a run without it.

`bench model`: per-stage times of the model alone, batched: log-mel, encoder, adapter, prefill, text
decode (tokens/s), TTS decode (units/s), and flow + HiFT per 10-unit block.

Models: `--model-dir` (plus `--vocoder-dir`), or `--preset tiny|0.5b|7b`, random weights at the real
shapes built in memory (voice_agent.model.presets). Figures from random weights measure speed only.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from voice_agent.audio import INPUT_SAMPLE_RATE
from voice_agent.engine.api import (
    AudioChunk,
    ResponseDone,
    TranscriptDelta,
    TranscriptDone,
    TranscriptEvent,
    TranscriptFailed,
    TurnError,
    TurnSettings,
)
from voice_agent.serve.config import DTYPES

WARMUP = (3, 5)  # text tokens, final units of the warm-up turn
TRANSCRIPT_WAIT_S = 600.0  # how long the bench waits for transcripts after the last reply


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", choices=["tiny", "0.5b", "7b"], default=None,
                   help="random weights at these shapes (default tiny when no --model-dir)")
    p.add_argument("--model-dir", default=None, help="a LLaMA-Omni2 model directory")
    p.add_argument("--vocoder-dir", default=None, help="a cosy2_decoder directory (with --model-dir)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--unpadded", action="store_true", help="encode only the real audio length (changes numbers)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--seed", type=int, default=0)


def _load(args: argparse.Namespace) -> tuple[Any, Any, dict[str, Any]]:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    if args.model_dir:
        from voice_agent.model.cosy2.decoder import Cosy2Decoder
        from voice_agent.model.speech_lm import SpeechLM

        lm = SpeechLM.load(args.model_dir, device=args.device, dtype=dtype, unpadded=args.unpadded)
        decoder = Cosy2Decoder.load(args.vocoder_dir, args.device) if args.vocoder_dir else None
        return lm, decoder, {}
    from voice_agent.model.presets import build_preset

    return build_preset(args.preset or "tiny", args.device, dtype, args.seed, unpadded=args.unpadded)


def _sync(device: Any) -> None:
    import torch

    if getattr(device, "type", str(device)).startswith("cuda"):
        torch.cuda.synchronize()


def _pct(values: Sequence[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, max(0, int(round(q * (len(s) - 1)))))] if s else float("nan")


def synthetic_audio(seconds: float, seed: int) -> np.ndarray:
    """A voiced-looking test signal: a 150 Hz buzz with a slow envelope plus a little noise, 16 kHz."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(seconds * INPUT_SAMPLE_RATE)) / INPUT_SAMPLE_RATE
    envelope = 0.5 + 0.5 * np.sin(2 * np.pi * 3.0 * t + seed)
    buzz = np.sign(np.sin(2 * np.pi * (150 + 10 * seed) * t)) * 0.1 * envelope
    return (buzz + 0.01 * rng.standard_normal(len(t))).astype(np.float32)


# ---------------------------------------------------------------------------------------------- engine
@dataclass
class TurnRecord:
    submitted: float
    first_units: float | None = None
    first_audio: float | None = None
    chunk_times: list[float] = field(default_factory=list)
    chunk_ms: list[float] = field(default_factory=list)  # audio each chunk carries
    done: float | None = None
    audio_ms: float = 0.0
    units: int = 0
    error: str | None = None
    transcribe: bool = False
    transcript_first: float | None = None  # first TranscriptDelta
    transcript_done: float | None = None  # TranscriptDone or TranscriptFailed
    transcript_error: str | None = None

    def on_transcript(self, event: TranscriptEvent) -> None:
        now = time.monotonic()
        if isinstance(event, TranscriptDelta):
            self.transcript_first = self.transcript_first or now
        elif isinstance(event, TranscriptDone):
            self.transcript_done = now
        elif isinstance(event, TranscriptFailed):
            self.transcript_done, self.transcript_error = now, f"{event.code}: {event.message}"


class TranscriptRouter:
    """A session's `on_transcript`: hands each event to the record of the turn whose item it names."""

    def __init__(self) -> None:
        self.records: dict[str, TurnRecord] = {}

    def __call__(self, event: TranscriptEvent) -> None:
        record = self.records.get(event.item_id)
        if record is not None:
            record.on_transcript(event)


async def _run_turn(session: Any, audio: np.ndarray, seed: int, forced: Any,
                    router: TranscriptRouter | None = None, item_id: str | None = None) -> TurnRecord:
    rec = TurnRecord(time.monotonic(), transcribe=router is not None)
    if router is not None and item_id is not None:
        router.records[item_id] = rec
    stream = session.submit_turn(audio, TurnSettings(temperature=0.8, seed=seed), speech_end=rec.submitted,
                                 item_id=item_id, transcribe=router is not None, forced=forced)
    async for event in stream:
        now = time.monotonic()
        if isinstance(event, AudioChunk):
            rec.first_audio = rec.first_audio or now
            rec.chunk_times.append(now)
            rec.chunk_ms.append(event.duration_ms)
        elif event.kind == "unit_block":
            rec.first_units = rec.first_units or now
            rec.units += len(event.units)
        elif isinstance(event, ResponseDone):
            rec.done, rec.audio_ms = now, event.audio_ms
        elif isinstance(event, TurnError):
            rec.done, rec.error = now, f"{event.code}: {event.message}"
    return rec


async def _run_engine(engine: Any, args: argparse.Namespace, sequential: bool) -> tuple[list[TurnRecord], float]:
    from voice_agent.engine.reply import ForcedLength

    forced = ForcedLength(args.text_tokens, args.final_units)
    routers = [TranscriptRouter() if args.transcribe else None for _ in range(args.sessions)]
    sessions = [engine.open_session(on_transcript=router) for router in routers]
    audios = [synthetic_audio(args.audio_seconds, i) for i in range(args.sessions)]

    async def conversation(i: int) -> list[TurnRecord]:
        if not sequential and args.arrival_ms > 0:  # turn ends spread evenly over the window
            await asyncio.sleep(args.arrival_ms / 1000 * i / max(1, args.sessions))
        return [await _run_turn(sessions[i], audios[i], args.seed + 1000 * i + k, forced, routers[i], f"user-{k}")
                for k in range(args.turns)]

    t0 = time.monotonic()
    if sequential:
        records = [r for i in range(args.sessions) for r in await conversation(i)]
    else:
        records = [r for rs in await asyncio.gather(*(conversation(i) for i in range(args.sessions))) for r in rs]
    wall = time.monotonic() - t0
    deadline = time.monotonic() + TRANSCRIPT_WAIT_S
    while any(r.transcribe and r.transcript_done is None for r in records) and time.monotonic() < deadline:
        await asyncio.sleep(0.01)  # closing a session drops its transcripts
    for s in sessions:
        await s.close()
    return records, wall


def playback_stall_ms(chunk_times: Sequence[float], chunk_ms: Sequence[float]) -> float:
    """Silence a listener hears inside a reply: playback starts with the first chunk and plays each chunk
    when it has arrived and the one before it has played out; time waiting for a late chunk is a stall."""
    stall, play_end = 0.0, None
    for t, ms in zip(chunk_times, chunk_ms, strict=True):
        t_ms = 1000 * t
        if play_end is not None and t_ms > play_end:
            stall += t_ms - play_end
        play_end = max(play_end if play_end is not None else t_ms, t_ms) + ms
    return stall


def _report(label: str, records: list[TurnRecord], wall: float, stats: Any) -> None:
    errors = [r.error for r in records if r.error]
    ok = [r for r in records if not r.error and r.first_audio is not None and r.done is not None]
    first = [1000 * (r.first_audio - r.submitted) for r in ok]  # type: ignore[operator]
    gaps = [1000 * (b - a) for r in ok for a, b in zip(r.chunk_times[:-1], r.chunk_times[1:], strict=True)]
    ok = ok or [r for r in records if not r.error and r.done is not None]  # units only (no vocoder)
    units = [1000 * (r.first_units - r.submitted) for r in ok if r.first_units is not None]
    rtf = [(r.done - r.submitted) / (r.audio_ms / 1000) for r in ok if r.audio_ms > 0]  # type: ignore[operator]
    audio_s = sum(r.audio_ms for r in ok) / 1000
    print(f"[{label}] {len(records)} turns, {len(errors)} errors, wall {wall:.2f} s")
    if errors:
        print(f"  first error: {errors[0]}")
    if units:
        print(f"  first unit block ms: p50 {_pct(units, 0.5):.1f}  p95 {_pct(units, 0.95):.1f}")
    if first:
        print(f"  first audio ms: p50 {_pct(first, 0.5):.1f}  p95 {_pct(first, 0.95):.1f}  p99 {_pct(first, 0.99):.1f}")
        print(f"  max gap between audio chunks: {max(gaps, default=0.0):.1f} ms")
        stalls = [playback_stall_ms(r.chunk_times, r.chunk_ms) for r in ok]
        print(f"  playback stalls (a chunk later than the audio before it ran out): "
              f"{sum(x > 0 for x in stalls)} of {len(stalls)} turns, worst {max(stalls, default=0.0):.1f} ms")
    if rtf:
        print(f"  real-time factor per turn (generation time / audio): mean {statistics.mean(rtf):.3f}  "
              f"max {max(rtf):.3f}")
    if ok:
        print(f"  throughput: {audio_s / wall:.3f} s of audio per s, {sum(r.units for r in ok) / wall:.1f} units/s "
              f"({audio_s:.1f} s of audio in all)")
    asked = [r for r in records if r.transcribe]
    if asked:
        done = [r for r in asked if r.transcript_done is not None and r.transcript_error is None]
        failed = [r.transcript_error for r in asked if r.transcript_error]
        late = len(asked) - len(done) - len(failed)
        after = [1000 * (r.transcript_done - r.submitted) for r in done]  # type: ignore[operator]
        first_text = [1000 * (r.transcript_first - r.submitted) for r in done if r.transcript_first is not None]
        print(f"  transcripts: {len(done)} done, {len(failed)} failed, {late} not done in {TRANSCRIPT_WAIT_S:.0f} s")
        if failed:
            print(f"  first transcript failure: {failed[0]}")
        if after:
            print(f"  transcript done ms (from submission): p50 {_pct(after, 0.5):.1f}  p95 {_pct(after, 0.95):.1f}  "
                  f"max {max(after):.1f}; first transcript text ms p50 {_pct(first_text, 0.5):.1f}")
    if stats is not None and stats.steps:
        def mean(rows: int, calls: int) -> float:
            return rows / calls if calls else 0.0

        print(f"  steps {stats.steps}; mean rows per call: text {mean(stats.text_rows, stats.text_calls):.2f}, "
              f"tts {mean(stats.tts_rows, stats.tts_calls):.2f}, "
              f"vocoder {mean(stats.vocode_rows, stats.vocode_calls):.2f}")


def bench_engine_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="voice-agent bench engine",
                                description="concurrent synthetic turns through the engine: latency, RTF, throughput")
    _model_args(p)
    p.add_argument("--sessions", type=int, default=8, help="concurrent sessions (turns in flight at once)")
    p.add_argument("--turns", type=int, default=1, help="turns per session, one after another")
    p.add_argument("--text-tokens", type=int, default=24, help="forced reply length in text tokens")
    p.add_argument("--final-units", type=int, default=20, help="forced units after the final read")
    p.add_argument("--audio-seconds", type=float, default=2.0, help="length of each synthetic user turn")
    p.add_argument("--flow-context-units", type=int, default=100, help="bounded flow window (-1: whole reply)")
    p.add_argument("--arrival-ms", type=float, default=0.0,
                   help="concurrent mode: spread the sessions' turn starts evenly over this window")
    p.add_argument("--no-flow-cache", action="store_true", help="recompute the flow window every block")
    p.add_argument("--no-audio", action="store_true", help="units only: leave the vocoder out")
    p.add_argument("--transcribe", action="store_true",
                   help="submit every turn with a user transcript (Whisper's text decoder); compare first audio")
    p.add_argument("--whisper", default=None,
                   help="with --model-dir and --transcribe: the openai-whisper large-v3.pt (default: the model's)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--sequential", action="store_true", help="run the same turns one after another")
    mode.add_argument("--compare", action="store_true", help="run concurrent, then sequential; print the ratio")
    args = p.parse_args(argv)

    from voice_agent.engine.api import EngineInfo
    from voice_agent.engine.config import EngineConfig, Models
    from voice_agent.engine.reply import ForcedLength
    from voice_agent.engine.thread import Engine

    def load() -> Models:  # in the engine's model thread: torch runs in that one thread only
        lm, decoder, voices = _load(args)
        models = Models(lm, None if args.no_audio else decoder, voices)
        if args.transcribe:
            models.transcriber, models.transcriber_unavailable = _load_transcriber(args, lm)
        return models

    config = EngineConfig(
        max_sessions=args.sessions + 1, max_reply_tokens=max(args.text_tokens, 256),
        max_new_tokens=min(256, max(args.text_tokens, 1)), final_units=max(args.final_units, WARMUP[1]),
        flow_context_units=None if args.flow_context_units < 0 else args.flow_context_units,
        flow_cache=not args.no_flow_cache,
    )
    name = args.model_dir or f"preset-{args.preset or 'tiny'}"
    engine = Engine(load, config, EngineInfo(name, False, args.device, args.dtype, ("en",)))

    async def run() -> int:
        await engine.start()
        await asyncio.get_running_loop().run_in_executor(None, engine.wait_ready)
        lm = engine.worker.lm
        print(f"model {lm.name} on {lm.device} ({args.dtype}); {args.sessions} sessions x {args.turns} turn(s), "
              f"{args.text_tokens} text tokens + {args.final_units} final units per reply, "
              f"{args.audio_seconds:.1f} s user audio, {'unpadded' if args.unpadded else 'padded'} encoder input"
              f"{', no vocoder' if engine.worker.decoder is None else ''}"
              f", flow window {'whole reply' if args.flow_context_units < 0 else f'{args.flow_context_units} units'}"
              f"{'' if args.no_flow_cache else ' + chunk cache'}"
              f"{f'; turn starts spread over {args.arrival_ms:.0f} ms' if args.arrival_ms > 0 else ''}"
              f"{'; with user transcripts' if args.transcribe else ''}")
        warm = engine.open_session()
        await _run_turn(warm, synthetic_audio(1.0, 99), 0, ForcedLength(*WARMUP))
        await warm.close()
        walls = {}
        modes = [False, True] if args.compare else [args.sequential]
        for sequential in modes:
            before = _copy_stats(engine.worker.stats)
            records, wall = await _run_engine(engine, args, sequential)
            label = "sequential" if sequential else "concurrent"
            _report(label, records, wall, _diff_stats(engine.worker.stats, before))
            walls[label] = wall
        if args.compare:
            print(f"batching ratio (sequential wall / concurrent wall): "
                  f"{walls['sequential'] / walls['concurrent']:.2f}x")
        print(f"memory: {engine.worker.bytes_per_session / 2**20:.1f} MiB of KV and flow cache per session; "
              f"peak {_peak_memory(args.device)}")
        await engine.aclose()
        return 0

    return asyncio.run(run())


def _load_transcriber(args: argparse.Namespace, lm: Any) -> tuple[Any | None, str]:
    """The model's Whisper text decoder (`--model-dir`), or a random one at the text shapes that go with
    the preset's encoder: large-v3's (32 layers of 1280) for the real encoder, the tiny file's for `tiny`."""
    from pathlib import Path

    from voice_agent.engine.build import load_transcriber

    if args.model_dir:
        return load_transcriber(lm, Path(args.model_dir), Path(args.whisper) if args.whisper else None)
    from whisper.model import ModelDimensions

    from voice_agent.model import tiny
    from voice_agent.model.transcribe import Transcriber

    n = lm.encoder.n_state
    text = {"n_vocab": tiny.WHISPER_N_VOCAB, "n_text_ctx": tiny.WHISPER_N_TEXT_CTX, "n_text_state": n,
            "n_text_head": n // tiny.WHISPER_HEAD_DIM, "n_text_layer": 1 if n == tiny.WHISPER_N_AUDIO_STATE else 32}
    enc = lm.encoder.dims
    audio = {"n_mels": enc.n_mels, "n_audio_ctx": enc.n_ctx, "n_audio_state": n, "n_audio_head": enc.n_head,
             "n_audio_layer": enc.n_layer}
    dims = ModelDimensions(**audio, **text)
    return Transcriber.random(dims, device=lm.device, dtype=lm.dtype, seed=args.seed), ""


def _peak_memory(device: str) -> str:
    """Peak memory of this process: allocated on a CUDA device, else resident set size."""
    import torch

    if torch.device(device).type == "cuda":
        return f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB allocated on {device}"
    import resource

    return f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB resident"  # ru_maxrss: KiB


def _copy_stats(stats: Any) -> Any:
    from dataclasses import replace

    return replace(stats)


def _diff_stats(now: Any, before: Any) -> Any:
    from dataclasses import fields, replace

    return replace(now, **{f.name: getattr(now, f.name) - getattr(before, f.name) for f in fields(now)})


# ---------------------------------------------------------------------------------------------- model
def _timed(fn: Callable[[], Any], device: Any, repeats: int) -> tuple[float, Any]:
    """Best wall time of `repeats` calls (after one warm-up call) and the last result."""
    out = fn()
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        _sync(device)
        best = min(best, time.perf_counter() - t0)
    return best, out


def bench_model_main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="voice-agent bench model", description="per-stage model times")
    _model_args(p)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8], help="batch sizes to measure")
    p.add_argument("--steps", type=int, default=24, help="decode steps timed per stage")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats of each one-shot stage (best kept)")
    p.add_argument("--audio-seconds", type=float, default=3.0)
    args = p.parse_args(argv)

    import torch

    lm, decoder, voices = _load(args)
    print(f"model {lm.name} on {lm.device} ({args.dtype}), {'unpadded' if args.unpadded else 'padded 30-s'} "
          f"encoder input, {args.audio_seconds:.1f} s of speech; best of {args.repeats}")
    with torch.inference_mode():
        for B in args.batch:
            _bench_model_batch(lm, decoder, voices, B, args)
    return 0


def _bench_model_batch(lm: Any, decoder: Any, voices: dict[str, Any], B: int, args: argparse.Namespace) -> None:
    import torch

    from voice_agent.engine.reply import ForcedLength, Reply, decode_text, decode_tts, prefill
    from voice_agent.model.mel import HOP_LENGTH, log_mel_spectrogram
    from voice_agent.model.tokenizer import Turn

    dev, repeats, steps = lm.device, args.repeats, args.steps
    feats = lm.speech_features([synthetic_audio(args.audio_seconds, i) for i in range(B)])
    n = feats.mel.shape[-1] * HOP_LENGTH
    wave = torch.zeros(B, n, device=dev)
    t_mel, mel = _timed(lambda: log_mel_spectrogram(wave, n_mels=lm.encoder.n_mels, pad_to=n), dev, repeats)
    mel = mel.to(lm.dtype)
    t_enc, enc = _timed(lambda: lm.encoder(mel, unpadded=lm.unpadded), dev, repeats)
    lengths = torch.tensor(feats.lengths, device=dev) * lm.config.speech_encoder_ds_rate
    t_ad, _ = _timed(lambda: lm.projector(enc, lengths), dev, repeats)
    ids = lm.tok.build_prompt([Turn.user()])
    embeds = [lm.embed_prompt(ids, [feats.row(i)]) for i in range(B)]
    L = embeds[0].shape[0]
    cache = lm.new_llm_cache(B, L + steps + 2)
    tts_cache = lm.new_tts_cache(B, 3 * steps + 64)
    forced = ForcedLength(steps + 1, 16)

    def fresh() -> list[Reply]:
        return [Reply.start(lm, llm_slot=i, tts_slot=i, temperature=0.8, seed=i, forced=forced) for i in range(B)]

    t_pre, _ = _timed(lambda: prefill(lm, fresh(), embeds, cache), dev, repeats)
    replies = fresh()
    prefill(lm, replies, embeds, cache)
    _sync(dev)
    t0 = time.perf_counter()
    for _ in range(steps):
        decode_text(lm, replies, cache)
    _sync(dev)
    t_text = (time.perf_counter() - t0) / steps
    tts_steps = 0
    t0 = time.perf_counter()
    while tts_steps < steps and all(r.wants_tts for r in replies):
        decode_tts(lm, replies, tts_cache)
        tts_steps += 1
    _sync(dev)
    t_tts = (time.perf_counter() - t0) / max(1, tts_steps)
    print(f"batch {B}: mel {1000 * t_mel:.1f} ms, encoder {1000 * t_enc:.1f} ms, adapter {1000 * t_ad:.2f} ms, "
          f"prefill {L} positions x {B} {1000 * t_pre:.1f} ms")
    print(f"         text decode {1000 * t_text:.2f} ms/step = {B / t_text:.0f} tokens/s; "
          f"TTS {1000 * t_tts:.2f} ms/step = {B / t_tts:.0f} units/s")
    if decoder is not None:
        t_voc = _vocoder_block_time(decoder, voices, B, repeats, dev)
        print(f"         flow + HiFT per 10-unit block: {1000 * t_voc:.1f} ms ({0.4 * B / t_voc:.2f} s of audio per s)")


def _vocoder_block_time(decoder: Any, voices: dict[str, Any], B: int, repeats: int, device: Any) -> float:
    from voice_agent.engine.vocoder import open_stream, vocode_many

    spk = voices.get("en")
    if spk is None:
        spk = decoder.voice(None)
    best = float("inf")
    for r in range(repeats + 1):
        streams = [open_stream(decoder, spk, i, 100) for i in range(B)]
        vocode_many(streams, [list(range(10))] * B, [False] * B)  # the first block (shorter output)
        _sync(device)
        t0 = time.perf_counter()
        vocode_many(streams, [list(range(10, 20))] * B, [False] * B)
        _sync(device)
        if r:
            best = min(best, time.perf_counter() - t0)
    return best
