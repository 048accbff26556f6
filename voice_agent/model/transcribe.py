"""User transcripts from Whisper large-v3's own text decoder, fed the encoder output a turn already has.

LLaMA-Omni2 never writes down what the user said. Whisper large-v3's encoder is LLaMA-Omni2's speech
encoder, so its text decoder, given the encoder output the turn computed anyway, transcribes the turn
without a second pass through the 32-layer encoder.

`Transcriber.load(path)` reads only the `decoder.*` tensors of an openai-whisper checkpoint
({"dims", "model_state_dict"}, `voice-agent download --whisper`) into openai-whisper's own `TextDecoder`,
inside a `Whisper` whose audio encoder is an identity: its input is already encoded. The encoder tensors
of the file are memory-mapped and never read. Decoding is openai-whisper's own, unchanged: its tokenizer
(the bundled multilingual vocabulary), its language detection, its logit filters (SuppressBlank,
SuppressTokens), its GreedyDecoder and its kv-cache hooks, with `DecodingOptions(task="transcribe",
temperature=0, without_timestamps=True)`.

Deviation: openai-whisper's `DecodingTask.run` decodes in one loop; here `Transcriber.start(row)` returns a
`TranscriptJob` whose `step()` runs one decoder forward, so an engine interleaves transcription with its
other work on its one model thread. The steps are the forwards `run` makes, in its order and at its
shapes (language detection on `<|startoftranscript|>` when no language is set, the initial tokens, then
one token per step), so the tokens equal `whisper.decode` on the same features. A row may have fewer
than 1500 frames (an unpadded turn): the decoder cross-attends any length, and the identity encoder
keeps openai-whisper's code from re-encoding such a row.
"""

from __future__ import annotations

import codecs
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from whisper.decoding import DecodingOptions, DecodingTask, detect_language
from whisper.model import ModelDimensions, TextDecoder, Whisper

from voice_agent.errors import CheckpointError
from voice_agent.model.weights import load_module, load_torch_file

log = logging.getLogger(__name__)

DECODER_PREFIX = "decoder."  # the text decoder's keys in an openai-whisper model_state_dict
GET_WEIGHTS = "voice-agent download --whisper"  # fetches models/speech_encoder/large-v3.pt
INIT_STD = 0.02  # random decoders (`Transcriber.random`)
WHAT = "an openai-whisper checkpoint (large-v3.pt) with 'dims' and 'model_state_dict'"


class _DecoderOnlyWhisper(Whisper):
    """openai-whisper's model holding only its text decoder; the encoder stage passes features through."""

    def __init__(self, dims: ModelDimensions, decoder: TextDecoder) -> None:
        torch.nn.Module.__init__(self)  # not Whisper.__init__: it would allocate the audio encoder
        self.dims = dims
        self.encoder = torch.nn.Identity()
        self.decoder = decoder


def _read_decoder(path: Path) -> tuple[ModelDimensions, Mapping[str, torch.Tensor]]:
    """The dims and the `decoder.*` tensors of an openai-whisper file (memory-mapped, not read)."""
    data = load_torch_file(path, WHAT, mmap=True)
    if not isinstance(data, Mapping) or not isinstance(data.get("dims"), Mapping) \
            or not isinstance(data.get("model_state_dict"), Mapping):
        raise CheckpointError(f"malformed file {path}: expected {WHAT}")
    try:
        dims = ModelDimensions(**data["dims"])
    except TypeError as e:
        raise CheckpointError(f"malformed file {path}: 'dims': {e}") from e
    state = {k: v for k, v in data["model_state_dict"].items() if k.startswith(DECODER_PREFIX)}
    if not state:
        raise CheckpointError(f"{path}: no Whisper text decoder weights ({DECODER_PREFIX}*) in this file; "
                              f"`{GET_WEIGHTS}` fetches openai-whisper's large-v3.pt")
    return dims, state


def _cast(decoder: TextDecoder, dtype: torch.dtype) -> TextDecoder:
    """`decoder` in `dtype`, but for its LayerNorms: whisper's compute in float32 with float32 parameters."""
    decoder.to(dtype)
    for module in decoder.modules():
        if isinstance(module, torch.nn.LayerNorm):
            module.float()
    return decoder


class Transcriber:
    """Whisper's text decoder on one device and dtype, with the decoding options of every job."""

    def __init__(self, model: Whisper, *, language: str | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.options = DecodingOptions(task="transcribe", language=language, temperature=0.0,
                                       without_timestamps=True, fp16=False)
        # The stateless parts of openai-whisper's decoding (tokenizer, initial tokens, logit filters, greedy
        # decoder), built once; a job keeps its own tokens and kv cache.
        self.task = DecodingTask(model, self.options)
        weight = model.decoder.token_embedding.weight
        self.device, self.dtype = weight.device, weight.dtype

    @classmethod
    def load(cls, path: str | Path, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             language: str | None = None) -> Transcriber:
        """The text decoder of openai-whisper checkpoint `path`; CheckpointError (saying how to get the
        file) when it is absent or holds no decoder weights."""
        path = Path(path)
        if not path.is_file():
            raise CheckpointError(f"missing file {path}: expected {WHAT} for user transcripts; "
                                  f"`{GET_WEIGHTS}` fetches it")
        dims, state = _read_decoder(path)
        with torch.device("meta"):
            decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                  dims.n_text_layer)
        decoder = _cast(decoder.to_empty(device=device), dtype)
        load_module(decoder, state, DECODER_PREFIX, source=str(path))
        # The causal mask is a non-persistent buffer: the meta build left it empty. As TextDecoder makes it.
        mask = torch.empty(dims.n_text_ctx, dims.n_text_ctx, device=device).fill_(-float("inf")).triu_(1)
        decoder.register_buffer("mask", mask, persistent=False)
        return cls(_DecoderOnlyWhisper(dims, decoder), language=language)

    @classmethod
    def random(cls, dims: ModelDimensions, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               seed: int = 0) -> Transcriber:
        """A decoder of `dims` with random weights (N(0, 0.02), unit LayerNorm gains), for benchmarks: it
        never samples eot, so every transcript runs to openai-whisper's limit of n_text_ctx // 2 tokens."""
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.device(device):
            decoder = TextDecoder(dims.n_vocab, dims.n_text_ctx, dims.n_text_state, dims.n_text_head,
                                  dims.n_text_layer)
        with torch.no_grad():
            for module in decoder.modules():
                if isinstance(module, torch.nn.LayerNorm):
                    module.reset_parameters()  # ones and zeros
                else:
                    for param in module.parameters(recurse=False):
                        param.normal_(0.0, INIT_STD, generator=generator)
        return cls(_DecoderOnlyWhisper(dims, _cast(decoder, dtype)))

    @property
    def dims(self) -> ModelDimensions:
        return self.model.dims

    def start(self, encoder_out: torch.Tensor) -> TranscriptJob:
        """A job transcribing one row of Whisper encoder output, (T, D) with T <= n_audio_ctx frames
        (1500 padded, fewer unpadded). The row is copied: the caller's batch may be freed."""
        T_max, D = self.dims.n_audio_ctx, self.dims.n_audio_state
        if encoder_out.ndim != 2 or encoder_out.shape[1] != D or not 1 <= encoder_out.shape[0] <= T_max:
            raise ValueError(f"encoder output: expected (T, {D}) with 1 <= T <= {T_max}, "
                             f"got {tuple(encoder_out.shape)}")
        features = encoder_out.to(self.device, self.dtype, copy=True)[None]  # (1, T, D)
        return TranscriptJob(self, features)


class TranscriptJob:
    """One row's transcript, decoded one forward per `step()`. `text` is what the steps returned so far,
    joined; when `done` it is the transcript (`whisper.decode(...).text`)."""

    def __init__(self, transcriber: Transcriber, features: torch.Tensor) -> None:
        self._t = transcriber
        self.features = features  # (1, T, D)
        self.tokens = torch.tensor([transcriber.task.initial_tokens], device=features.device)  # (1, L)
        self.language: str | None = transcriber.options.language
        self.text = ""
        self.done = False
        self.steps = 0
        self._cache: dict[Any, torch.Tensor] = {}
        self._sampled = 0
        self._sum_logprobs = torch.zeros(1, device=features.device)
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")  # as tiktoken's decode
        self._decoded = ""  # every sampled text token's bytes, decoded

    @torch.inference_mode()
    def step(self) -> str:
        """Run one decoder forward; return the text it added ('' when a token ends inside a character,
        is whitespace not yet followed by text, or the step detected the language)."""
        if self.done:
            raise ValueError("transcript job: step() after done")
        task, model = self._t.task, self._t.model
        self.steps += 1
        if self.language is None:  # detect_language's forward on <|startoftranscript|>, outside the cache
            language_tokens, probs = detect_language(model, self.features, task.tokenizer)
            self.tokens[:, task.sot_index + 1] = language_tokens
            self.language = max(probs[0], key=probs[0].get)
            return ""
        # PyTorchInference.logits, with the hooks on only for this forward: jobs share the decoder modules.
        new = self.tokens if not self._cache else self.tokens[:, -1:]
        cache, hooks = model.install_kv_cache_hooks(self._cache)
        try:
            logits = model.decoder(new, self.features, kv_cache=cache)[:, -1]  # (1, n_vocab)
        finally:
            for hook in hooks:
                hook.remove()
        self._cache = cache
        for logit_filter in task.logit_filters:
            logit_filter.apply(logits, self.tokens)
        self.tokens, completed = task.decoder.update(self.tokens, logits, self._sum_logprobs)
        self._sampled += 1
        self.done = bool(completed) or self.tokens.shape[-1] > task.n_ctx or self._sampled >= task.sample_len
        token = int(self.tokens[0, -1])
        if token != task.tokenizer.eot:
            self._decoded += self._utf8.decode(self._token_bytes(token))
        if self.done:
            self._decoded += self._utf8.decode(b"", final=True)
            self._cache = {}
        # The transcript is stripped (as DecodingTask.run): leading whitespace never shows, trailing
        # whitespace shows once text follows it.
        shown = self._decoded.strip() if self.done else self._decoded.lstrip().rstrip()
        delta = shown[len(self.text):]
        self.text = shown
        return delta

    def _token_bytes(self, token: int) -> bytes:
        tokenizer = self._t.task.tokenizer
        if token >= tokenizer.timestamp_begin:  # Tokenizer.decode drops timestamps
            return b""
        return tokenizer.encoding.decode_single_token_bytes(token)
