"""LLaMA-Omni2, first half: user speech in -> assistant text tokens and CosyVoice2 speech units out.

`SpeechLM.load(model_dir)` builds every module from a LLaMA-Omni2 directory, key for key:
the Whisper encoder (the checkpoint's `model.speech_encoder.*` tensors in an encoder of the dims of the
whisper file config.json names, as the reference builds it; see encoder.py for when that file is absent;
the file's own tensors only when the checkpoint has none), the k=5 adapter, the Qwen2 LLM and the TTS LM
with its fusion layers. Sizes come from the checkpoint. `speech_positions`, `reply_units` and
`tts_positions` give the prompt and cache sizes a turn needs before it runs.

The stage functions are batch-first and stateless; per-reply state and the batched steps that advance
many replies at once live in reply.py. The same steps serve the CLI (one reply) and the engine (many).

Faithful by default (architecture.md §2-3): the user's audio is padded to 30 s before the log-mel and
the encoder (300 speech embeddings per turn); the prompt is the model's own chat template; LLM decoding
defaults come from `generation_config.json` when present; the LLM state after the final norm is paired
with the token it predicted. Option that changes numbers: `unpadded=True` encodes only the real length
of the audio (rounded up to whole adapter frames), which is faster for short turns.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from voice_agent.errors import CheckpointError
from voice_agent.model import adapter as adapter_mod
from voice_agent.model import encoder as encoder_mod
from voice_agent.model import tts_lm
from voice_agent.model.config import OmniConfig, load_generation_config
from voice_agent.model.mel import HOP_LENGTH, N_SAMPLES, log_mel_rows, log_mel_spectrogram
from voice_agent.model.qwen2 import KVCache, Qwen2ForCausalLM
from voice_agent.model.sampling import GenerationSettings, unit_mask
from voice_agent.model.tokenizer import SPEECH_TOKEN_INDEX, OmniTokenizers
from voice_agent.model.tts_lm import SpeechGenerator
from voice_agent.model.weights import SafetensorsCheckpoint, load_module

log = logging.getLogger(__name__)

LLM_PREFIX = ""  # model.embed_tokens ..., model.layers ..., model.norm, lm_head
TTS_PREFIX = "speech_generator."
ENCODER_PREFIX = encoder_mod.CHECKPOINT_PREFIX  # model.speech_encoder.
PROJECTOR_PREFIX = adapter_mod.CHECKPOINT_PREFIX  # model.speech_projector.
ENCODER_STRIDE = 2  # mel frames per encoder frame
DEFAULT_MAX_NEW_TOKENS = 256  # the reference's offline script


@dataclass(frozen=True)
class SpeechFeatures:
    """One batch through mel -> encoder -> adapter; row i's speech embeddings are adapter_out[i, :lengths[i]]."""

    mel: torch.Tensor  # (B, n_mels, T_mel)
    encoder_out: torch.Tensor  # (B, T_enc, D_enc)
    adapter_out: torch.Tensor  # (B, T_enc // k, H)
    lengths: list[int]

    def row(self, i: int) -> torch.Tensor:
        return self.adapter_out[i, : self.lengths[i]]  # (T_i, H)


def _tie(lm: Qwen2ForCausalLM) -> list[str]:
    """Tie `lm` when its config says so; returns module names the checkpoint may lack."""
    if not lm.dims.tie_word_embeddings:
        return []
    lm.tie_weights()
    return ["lm_head.weight"]


def _check_tied_copy(lm: Qwen2ForCausalLM, tensors: SafetensorsCheckpoint, key: str, embed_key: str) -> None:
    """A tied model whose file also stores lm_head: the stored copy must equal the embeddings."""
    if lm.dims.tie_word_embeddings and key in tensors:
        stored, embed = tensors[key], tensors[embed_key]
        if stored.shape != embed.shape or not torch.equal(stored, embed):
            log.warning("%s is stored but differs from %s although the config ties them; using the embeddings",
                        key, embed_key)


class SpeechLM:
    """The loaded modules plus what the tokenizers and configs say (special ids, decoding defaults)."""

    def __init__(
        self,
        config: OmniConfig,
        tokenizers: OmniTokenizers,
        encoder: encoder_mod.WhisperEncoder,
        projector: adapter_mod.SpeechProjector,
        llm: Qwen2ForCausalLM,
        tts: SpeechGenerator,
        generation: GenerationSettings,
        *,
        name: str = "LLaMA-Omni2",
        unpadded: bool = False,
    ):
        self.config = config
        self.tok = tokenizers
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        self.tts = tts
        self.generation = generation
        self.name = name
        self.unpadded = unpadded
        weight = llm.lm_head.weight
        self.device, self.dtype = weight.device, weight.dtype
        # TTS sampling is restricted to speech units + TTS eos unless a caller asks for the reference's
        # unconstrained sampling.
        self.unit_allowed = unit_mask(
            config.tts.vocab_size, tokenizers.unit_offset, tokenizers.unit_vocab_size, tokenizers.tts_eos_id,
            self.device,
        )

    # ---------------------------------------------------------------- loading
    @classmethod
    def load(
        cls,
        model_dir: str | Path,
        *,
        whisper_path: str | Path | None = None,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        unpadded: bool = False,
    ) -> SpeechLM:
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise CheckpointError(f"missing directory {model_dir}: expected a LLaMA-Omni2 model directory")
        config = OmniConfig.load(model_dir)
        tokenizers = OmniTokenizers.load(model_dir, config)
        tensors = SafetensorsCheckpoint(model_dir)
        source = str(model_dir)
        device = torch.device(device)

        # As the reference: the encoder is built from the whisper file's dims, then the checkpoint's weights
        # are loaded into it; the file's own weights serve only when the checkpoint has none.
        candidates = [Path(whisper_path)] if whisper_path is not None else whisper_candidates(model_dir, config)
        whisper_file = next((p for p in candidates if p.is_file()), None)
        if whisper_path is not None and whisper_file is None:
            raise CheckpointError(f"missing file {whisper_path}: expected an openai-whisper checkpoint (large-v3.pt)")
        if any(k.startswith(ENCODER_PREFIX) for k in tensors):
            dims = encoder_mod.read_whisper_dims(whisper_file) if whisper_file is not None else None
            encoder = encoder_mod.encoder_from_checkpoint(
                tensors, prefix=ENCODER_PREFIX, source=source, device=device, dtype=dtype, dims=dims
            )
        elif whisper_file is not None:
            encoder = encoder_mod.load_whisper_pt(whisper_file, device=device, dtype=dtype)
        else:
            tried = ", ".join(str(p) for p in candidates)
            raise CheckpointError(
                f"{model_dir}: no model.speech_encoder.* tensors in the checkpoint and no whisper file found "
                f"(tried {tried}); pass the openai-whisper large-v3.pt explicitly"
            )
        if encoder.n_state != config.speech_encoder_hidden_size:
            raise CheckpointError(
                f"{source}: speech encoder width expected {config.speech_encoder_hidden_size} "
                f"(config speech_encoder_hidden_size), found {encoder.n_state}"
            )
        projector = adapter_mod.projector_from_checkpoint(
            tensors, prefix=PROJECTOR_PREFIX, k=config.speech_encoder_ds_rate, source=source,
            device=device, dtype=dtype,
        )

        llm = Qwen2ForCausalLM(config.llm, device=device, dtype=dtype)
        llm_missing = _tie(llm)
        load_module(
            llm, tensors, LLM_PREFIX, source=source, ignore=llm_missing,
            exclude_prefixes=(TTS_PREFIX, ENCODER_PREFIX, PROJECTOR_PREFIX),
        )
        _check_tied_copy(llm, tensors, "lm_head.weight", "model.embed_tokens.weight")

        tts = SpeechGenerator(config.llm.hidden_size, config.tts, device=device, dtype=dtype)
        tts_missing = ["model." + n for n in _tie(tts.model)]
        load_module(tts, tensors, TTS_PREFIX, source=source, ignore=tts_missing)
        _check_tied_copy(
            tts.model, tensors, TTS_PREFIX + "model.lm_head.weight", TTS_PREFIX + "model.model.embed_tokens.weight"
        )
        if tokenizers.tts_vocab_size > config.tts.vocab_size:
            raise CheckpointError(
                f"{model_dir / 'tts_tokenizer'}: {tokenizers.tts_vocab_size} tokens do not fit the TTS LM's "
                f"vocab_size {config.tts.vocab_size} (config.json speech_generator)"
            )

        generation = GenerationSettings.from_generation_config(
            load_generation_config(model_dir),
            config_eos_token_id=list(tokenizers.llm_eos_ids),
            where=str(model_dir / "generation_config.json"),
        )
        for module in (encoder, projector, llm, tts):
            module.eval().requires_grad_(False)
        return cls(config, tokenizers, encoder, projector, llm, tts, generation,
                   name=model_dir.name, unpadded=unpadded)

    # ---------------------------------------------------------------- sizes and caches
    def speech_positions(self, samples: int) -> int:
        """LLM positions (speech embeddings) that `samples` samples of 16 kHz audio take in the prompt:
        `lengths` of `speech_features`, without running it (300 for any turn unless `unpadded`)."""
        if not self.unpadded:
            return self.encoder.n_ctx // self.config.speech_encoder_ds_rate
        return self._unpadded_samples(samples) // self._samples_per_position

    @property
    def _samples_per_position(self) -> int:
        """Input samples per speech embedding (100 ms): k encoder frames of two mel hops each."""
        return ENCODER_STRIDE * self.config.speech_encoder_ds_rate * HOP_LENGTH

    def _unpadded_samples(self, samples: int) -> int:
        """What an unpadded row of `samples` samples is encoded at: whole speech embeddings, 1 .. 30 s."""
        step = self._samples_per_position
        return min(N_SAMPLES, max(step, -(-samples // step) * step))

    def reply_units(self, text_tokens: int, final_units: int) -> int:
        """The most TTS tokens a reply of up to `text_tokens` text tokens writes (see tts_lm.reply_units)."""
        cfg = self.config
        return tts_lm.reply_units(cfg.read_tokens, cfg.write_units, text_tokens, final_units)

    def tts_positions(self, text_tokens: int, final_units: int) -> int:
        """TTS cache positions one such reply needs (see tts_lm.tts_positions)."""
        cfg = self.config
        return tts_lm.tts_positions(cfg.read_tokens, cfg.write_units, text_tokens, final_units)

    def new_llm_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache(self.config.llm, slots, max_len, self.device, self.dtype)

    def new_tts_cache(self, slots: int, max_len: int) -> KVCache:
        return KVCache(self.config.tts, slots, max_len, self.device, self.dtype)

    # ---------------------------------------------------------------- speech in
    @torch.inference_mode()
    def speech_features(self, audios: list[np.ndarray]) -> SpeechFeatures:
        """16 kHz float32 mono audio per row -> mel, encoder output and adapter output, batched."""
        if not self.unpadded:
            # Each row zero-padded to 30 s inside the log-mel, without building the padded batch.
            rows = [torch.as_tensor(np.asarray(a, dtype=np.float32))[:N_SAMPLES].to(self.device)
                    for a in audios]
            mel = log_mel_rows(rows, n_mels=self.encoder.n_mels, num_samples=N_SAMPLES)  # (B, M, 3000)
            enc = self.encoder(mel.to(self.dtype))  # (B, 1500, D_enc)
            lengths = [enc.shape[1]] * len(audios)
        else:
            # Each row at its own length in whole adapter frames (k encoder frames = 2k mel frames), its
            # mel computed alone, then batched with per-row lengths: a row equals the row encoded alone.
            sizes = [self._unpadded_samples(len(a)) for a in audios]
            mels = []
            for audio, n in zip(audios, sizes, strict=True):
                row = torch.zeros(1, n)
                clip = torch.as_tensor(np.asarray(audio, dtype=np.float32))[:n]
                row[0, : len(clip)] = clip
                mels.append(log_mel_spectrogram(row.to(self.device), n_mels=self.encoder.n_mels, pad_to=n)[0])
            mel = torch.zeros(len(audios), self.encoder.n_mels, max(m.shape[1] for m in mels), device=self.device)
            for i, m in enumerate(mels):
                mel[i, :, : m.shape[1]] = m
            mel_lengths = torch.tensor([m.shape[1] for m in mels], device=self.device)
            enc = self.encoder(mel.to(self.dtype), unpadded=True, mel_lengths=mel_lengths)  # (B, T_enc, D_enc)
            lengths = [m.shape[1] // ENCODER_STRIDE for m in mels]  # whole adapter frames by construction
        enc_lengths = torch.tensor(lengths, device=self.device)
        out, out_lengths = self.projector(enc, enc_lengths)  # (B, T_enc // k, H)
        return SpeechFeatures(mel, enc, out, [int(x) for x in out_lengths])

    # ---------------------------------------------------------------- prompt
    def embed_prompt(self, ids: list[int], speech: list[torch.Tensor]) -> torch.Tensor:
        """Splice: text spans embedded with the LLM table, the i-th speech block at the i-th -200.

        Returns (L, H). The reference cuts the spliced sequence to its first `tokenizer_model_max_length`
        positions; a longer prompt is an error here instead (the engine's context policy keeps it short).
        """
        pieces: list[torch.Tensor] = []
        span: list[int] = []
        used = 0
        embed = self.llm.model.embed_tokens
        for token in ids:
            if token == SPEECH_TOKEN_INDEX:
                if span:
                    pieces.append(embed(torch.tensor(span, device=self.device)))
                    span = []
                if used >= len(speech):
                    raise ValueError(f"prompt has more speech placeholders than the {len(speech)} speech blocks given")
                pieces.append(speech[used].to(self.dtype))
                used += 1
            else:
                span.append(token)
        if span:
            pieces.append(embed(torch.tensor(span, device=self.device)))
        if used != len(speech):
            raise ValueError(f"prompt has {used} speech placeholders, expected {len(speech)}")
        return torch.cat(pieces, dim=0)  # (L, H)


def whisper_candidates(model_dir: Path, config: OmniConfig) -> list[Path]:
    """Where the whisper file that config.json names may be, first found wins. The reference opens the
    config's path relative to the working directory (`models/speech_encoder/large-v3.pt`, the repository
    root); for the usual layout (`models/<model>/`) the same file is `../speech_encoder/large-v3.pt` from
    the model directory, which is tried first so that a model elsewhere never picks up an unrelated file
    from the working directory."""
    name = Path(config.speech_encoder).name if config.speech_encoder else "large-v3.pt"
    candidates = [model_dir.parent / "speech_encoder" / name]
    if config.speech_encoder:
        candidates += [model_dir.parent.parent / config.speech_encoder, Path(config.speech_encoder)]
    return list(dict.fromkeys(candidates))
