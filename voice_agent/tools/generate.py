"""`voice-agent generate`: one spoken question in, the streamed reply out (text, units, and audio).

Prints the text as it is generated and, after each read, how many units the TTS LM wrote. With
`--vocoder-dir` the units are turned into 24 kHz speech block by block, as the server does, and written
to `--output`. `--temperature 0` makes text and units greedy, so runs repeat exactly.

`--dump out.npz` writes the intermediate arrays for inspection and comparison with other implementations
(key: dtype [shape]):

- mel: float32 [n_mels, T_mel], the encoder input; encoder_out: float32 [T_enc, D_enc];
  adapter_out: float32 [T_enc / 5, H]; prompt_ids: int64, the prompt with -200 at the speech placeholder
- llm_logits: float32 [N_text, V], the LLM logits of every generated position, in order (the logits the
  token was sampled from, before repetition penalty and masks); first_logits: float32 [V], its first row
- text_ids: int64 [N_text]; tts_hidden: float32 [N_text, H], the LLM states fed to the TTS model
- read_ids: int64 [n_reads, R], the text tokens of each read (right-padded with -1);
  read_final: bool [n_reads], whether the read is the final one (it appends `<sep>`)
- tts_fused: float32 [N_read, D], the fused TTS input of every text token read, in read order
- tts_ids: int64 [n_tts_steps], every id the TTS LM sampled, in order (units as unit offset + unit, the TTS
  eos as its id): the raw TTS output before it is mapped to units
- units: int64, all speech units; unit_blocks: int64 [n_reads], units written after each read
- flow_mel: float32 [80, T], the mel of the whole reply, non-streaming; wav: float32, the streamed 24 kHz
  waveform in order (both with --vocoder-dir)
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from voice_agent.audio import INPUT_SAMPLE_RATE, MAX_INPUT_SECONDS, OUTPUT_SAMPLE_RATE, load_audio
from voice_agent.engine.flow_stream import FlowStream
from voice_agent.engine.reply import BlockEnd, Reply, TextToken, decode_text, decode_tts, prefill
from voice_agent.engine.schedule import FINAL_UNIT_LIMIT
from voice_agent.engine.vocoder import open_stream
from voice_agent.model.speech_lm import SpeechLM
from voice_agent.model.tokenizer import Turn

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ReplyTrace:
    """What a traced `run_reply` records besides the reply: each LLM step's logits and each sampled TTS id."""

    llm_logits: list[torch.Tensor] = field(default_factory=list)  # (V,) float32 per generated text token
    tts_ids: list[int] = field(default_factory=list)


@contextmanager
def _recording_logits(lm: SpeechLM, trace: ReplyTrace | None) -> Iterator[None]:
    """Record the LLM head's output of every step (one row per call: the reply is alone in its batch)."""
    if trace is None:
        yield
        return

    def keep(_module: torch.nn.Module, _inputs: object, logits: torch.Tensor) -> None:
        assert logits.dim() == 2 and logits.shape[0] == 1, f"expected logits (1, V), got {tuple(logits.shape)}"
        trace.llm_logits.append(logits[0].detach().to("cpu", torch.float32, copy=True))

    handle = lm.llm.lm_head.register_forward_hook(keep)
    try:
        yield
    finally:
        handle.remove()


def run_reply(lm: SpeechLM, audio: np.ndarray, *, temperature: float | None, max_new_tokens: int | None,
              seed: int, on_text=None, on_block=None, keep_first_logits: bool = False,
              final_units: int | None = None, trace: ReplyTrace | None = None):
    """Run one turn for one session; returns (reply, features, prompt_ids).

    `final_units` lowers the cap on units written after the final read (1024, as the reference); random
    test models rarely sample the TTS eos, so tests use a small cap. `trace` records every step's LLM
    logits and sampled TTS id."""
    features = lm.speech_features([audio])
    prompt_ids = lm.tok.build_prompt([Turn.user()])
    embeds = lm.embed_prompt(prompt_ids, [features.row(0)])  # (L, H)
    reply = Reply.start(lm, llm_slot=0, tts_slot=0, temperature=temperature, max_new_tokens=max_new_tokens,
                        seed=seed, keep_first_logits=keep_first_logits,
                        final_units=FINAL_UNIT_LIMIT if final_units is None else final_units)
    max_text = reply.max_new_tokens
    llm_cache = lm.new_llm_cache(1, embeds.shape[0] + max_text + 1)
    tts_cache = lm.new_tts_cache(1, lm.tts_positions(max_text, reply.schedule.final_units))
    with _recording_logits(lm, trace):
        prefill(lm, [reply], [embeds], llm_cache)
        while True:
            for out in reply.drain():
                if isinstance(out, TextToken) and on_text:
                    on_text(out.token)
                elif isinstance(out, BlockEnd) and on_block:
                    on_block(out)
            if reply.done:
                break
            if reply.wants_tts:  # the reference writes each block before reading more text
                decode_tts(lm, [reply], tts_cache)
                if trace is not None and reply.tts_unfed is not None:
                    trace.tts_ids.append(reply.tts_unfed)
            elif reply.wants_text:
                decode_text(lm, [reply], llm_cache)
            else:  # pragma: no cover - the schedule always leaves one of the two
                raise RuntimeError("reply stalled: neither text nor speech to generate")
    return reply, features, prompt_ids


@torch.inference_mode()
def read_arrays(lm: SpeechLM, reply: Reply) -> dict[str, np.ndarray]:
    """The reads of a finished reply: their text tokens, final flags and fused TTS inputs (each read's
    fusion computed again with the same call and shapes as in the run)."""
    reads = reply.reads
    width = max((r.num_tokens for r in reads), default=0)
    ids = np.full((len(reads), width), -1, dtype=np.int64)
    fused = []
    for i, r in enumerate(reads):
        ids[i, : r.num_tokens] = reply.text_ids[r.start : r.stop]
        hidden = torch.stack(reply.hiddens[r.start : r.stop])  # (k, H)
        fused.append(lm.tts.fuse(hidden, torch.tensor(reply.text_ids[r.start : r.stop], device=lm.device)))
    D = lm.config.tts.hidden_size
    return {
        "read_ids": ids,
        "read_final": np.asarray([r.final for r in reads], dtype=bool),
        "tts_fused": torch.cat(fused).float().cpu().numpy() if fused else np.zeros((0, D), np.float32),
    }


class ReplyVocoder:
    """Units -> 24 kHz speech for one reply, block by block as the server streams it."""

    def __init__(self, directory: str, voice: str | None, device: str, seed: int):
        from voice_agent.model.cosy2.decoder import Cosy2Decoder

        self.decoder = Cosy2Decoder.load(directory, device=device)
        self.spk = self.decoder.voice(voice)
        self.seed = seed
        # the reference's full recompute: a whole-reply cache would hold 4.6 MB per frame at the official size
        self.stream = open_stream(self.decoder, self.spk, seed, context_units=None, cached=False)
        self.sample_rate = OUTPUT_SAMPLE_RATE

    def push(self, units: list[int], final: bool) -> np.ndarray:
        return self.stream.push(units, final)

    def offline_mel(self, units: list[int]) -> np.ndarray:
        """The mel of the whole reply in one non-streaming call (finalize), same noise as the stream."""
        whole = FlowStream(self.decoder.flow, self.spk, self.seed)
        return whole.push(list(units), True).float().cpu().numpy()


def run_generate(args: argparse.Namespace) -> int:
    audio = load_audio(args.input, rate=INPUT_SAMPLE_RATE, max_seconds=MAX_INPUT_SECONDS)
    torch.manual_seed(args.seed)
    t0 = time.perf_counter()
    lm = SpeechLM.load(args.model_dir, whisper_path=args.whisper, device=args.device,
                       dtype=DTYPES[args.dtype], unpadded=args.unpadded)
    print(f"[loaded {lm.name} in {time.perf_counter() - t0:.2f} s on {lm.device} ({args.dtype})]", file=sys.stderr)

    vocoder = ReplyVocoder(args.vocoder_dir, args.voice, args.device, args.seed) if args.vocoder_dir else None
    detok = lm.tok.detokenizer()
    wav_chunks: list[np.ndarray] = []

    def on_text(token: int) -> None:
        sys.stdout.write(detok.push(token))
        sys.stdout.flush()

    def on_block(block: BlockEnd) -> None:
        print(f" [+{len(block.units)} units]", end="", flush=True)
        if vocoder is not None:
            wav_chunks.append(vocoder.push(list(block.units), block.final))

    trace = ReplyTrace() if args.dump else None
    t1 = time.perf_counter()
    reply, features, prompt_ids = run_reply(
        lm, audio, temperature=args.temperature, max_new_tokens=args.max_new_tokens, seed=args.seed,
        on_text=on_text, on_block=on_block, keep_first_logits=args.dump is not None,
        final_units=args.max_final_units, trace=trace,
    )
    sys.stdout.write(detok.flush())
    elapsed = time.perf_counter() - t1
    print(f"\n[{len(reply.text_ids)} text tokens, {len(reply.units)} units in {len(reply.schedule.unit_blocks)} "
          f"writes, finished by {reply.finish_reason}, {elapsed:.2f} s]")

    wav = np.concatenate(wav_chunks) if wav_chunks else np.zeros(0, np.float32)
    if vocoder is not None:
        import soundfile as sf

        sf.write(args.output, wav, vocoder.sample_rate, subtype="PCM_16")
        print(f"[wrote {args.output}: {len(wav) / vocoder.sample_rate:.2f} s at {vocoder.sample_rate} Hz]")
    if args.dump:
        assert trace is not None
        arrays = {
            "mel": features.mel[0].float().cpu().numpy(),
            "encoder_out": features.encoder_out[0].float().cpu().numpy(),
            "adapter_out": features.row(0).float().cpu().numpy(),
            "prompt_ids": np.asarray(prompt_ids, dtype=np.int64),
            "llm_logits": torch.stack(trace.llm_logits).numpy(),
            "first_logits": reply.first_logits.numpy().astype(np.float32),
            "text_ids": np.asarray(reply.text_ids, dtype=np.int64),
            "tts_hidden": torch.stack(reply.hiddens).float().cpu().numpy(),
            **read_arrays(lm, reply),
            "tts_ids": np.asarray(trace.tts_ids, dtype=np.int64),
            "units": np.asarray(reply.units, dtype=np.int64),
            "unit_blocks": np.asarray([len(b) for b in reply.schedule.unit_blocks], dtype=np.int64),
        }
        if vocoder is not None:
            arrays["flow_mel"] = vocoder.offline_mel(reply.units)
            arrays["wav"] = wav.astype(np.float32)
        Path(args.dump).parent.mkdir(parents=True, exist_ok=True)
        np.savez(args.dump, **arrays)
        print(f"[dumped {', '.join(arrays)} to {args.dump}]")
    return 0
