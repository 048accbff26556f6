"""Random-weight models at real shapes, built in memory for benchmarks (no download, no checkpoint file).

`build_preset(name, device, dtype, seed)` returns a `SpeechLM` and a `Cosy2Decoder` whose module trees
are the ones the loaders build, at the shapes of

- `tiny`: the test checkpoint of `voice-agent make-tiny` (same dims as voice_agent.model.tiny),
- `0.5b`: LLaMA-Omni2-0.5B (Qwen2.5-0.5B LLM, 896 x 24), with the official flow and HiFT,
- `7b`: LLaMA-Omni2-7B (Qwen2.5-7B LLM, 3584 x 28, untied head), with the official flow and HiFT;

every preset has the real Whisper-large-v3 encoder except `tiny`, and the real TTS LM shape (896 x 24,
vocab 158227) except `tiny`. Shapes come from architecture.md §1.2-1.4.

The tokenizers are the tiny ones (written to a temporary directory and loaded): only ids change, never
a shape — the LLM's and the TTS's output layers keep the real vocabulary sizes. Weights are N(0, 0.02)
(norm gains 1) from a seeded generator on the target device, so the 7B preset builds in seconds on a GPU;
the flow keeps PyTorch's default init and the HiFT `random_hift`'s. Numbers are meaningless; timings are
what these are for. A voice table {"en": random (192,)} comes with the decoder.
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from voice_agent.model import tiny, tiny_tokenizer
from voice_agent.model.adapter import SpeechProjector
from voice_agent.model.config import OmniConfig, Qwen2Dims
from voice_agent.model.cosy2.decoder import Cosy2Decoder
from voice_agent.model.cosy2.flow import Flow
from voice_agent.model.cosy2.flow_config import FlowConfig
from voice_agent.model.cosy2.hift import HiFT
from voice_agent.model.cosy2.hift_config import HiFTConfig
from voice_agent.model.cosy2.tiny import random_hift
from voice_agent.model.encoder import WhisperEncoder
from voice_agent.model.qwen2 import Qwen2ForCausalLM
from voice_agent.model.sampling import GenerationSettings
from voice_agent.model.speech_lm import SpeechLM
from voice_agent.model.tokenizer import TTS_TOKENIZER_DIR, OmniTokenizers, load_tokenizer
from voice_agent.model.tts_lm import SpeechGenerator

INIT_STD = 0.02
UNIT_VOCAB_SIZE = 6561
TTS_REAL = Qwen2Dims(896, 24, 14, 2, 4864, 158227, tie_word_embeddings=True)
WHISPER_LARGE_V3 = dict(n_mels=128, n_ctx=1500, n_state=1280, n_head=20, n_layer=32)
PROJECTOR_HIDDEN_REAL = 2048
SPEAKER_DIM = 192


@dataclass(frozen=True)
class Preset:
    llm: Qwen2Dims | None  # None: the tiny dims with the tiny vocabulary
    tts: Qwen2Dims | None
    whisper: dict[str, int]
    projector_hidden: int
    real_decoder: bool  # official flow / HiFT shapes (else the tiny ones)


PRESETS: dict[str, Preset] = {
    "tiny": Preset(None, None, dict(n_mels=128, n_ctx=1500, n_state=tiny.WHISPER_N_AUDIO_STATE,
                                    n_head=tiny.WHISPER_N_AUDIO_STATE // tiny.WHISPER_HEAD_DIM,
                                    n_layer=tiny.WHISPER_DIMS["n_audio_layer"]),
                   tiny.PROJECTOR_HIDDEN, False),
    "0.5b": Preset(Qwen2Dims(896, 24, 14, 2, 4864, 151936, tie_word_embeddings=True), TTS_REAL,
                   WHISPER_LARGE_V3, PROJECTOR_HIDDEN_REAL, True),
    "7b": Preset(Qwen2Dims(3584, 28, 28, 4, 18944, 152064, tie_word_embeddings=False), TTS_REAL,
                 WHISPER_LARGE_V3, PROJECTOR_HIDDEN_REAL, True),
}


def _config(llm: Qwen2Dims, tts: Qwen2Dims, whisper: dict[str, int], eos_id: int) -> OmniConfig:
    return OmniConfig.from_dict({
        **llm.to_hf(), "eos_token_id": eos_id,
        "speech_generator": tts.to_hf(), "speech_encoder_hidden_size": whisper["n_state"],
        "speech_encoder_ds_rate": tiny.DS_RATE, "unit_vocab_size": UNIT_VOCAB_SIZE, "stream_params": "(3,10)",
        "tokenizer_model_max_length": 4096,
    }, where="preset")


def _tokenizers(llm: Qwen2Dims | None, tts: Qwen2Dims | None) -> tuple[Qwen2Dims, Qwen2Dims, Any, Any, int]:
    """(LLM dims, TTS dims, LLM tokenizer, TTS tokenizer, eos id): the tiny tokenizers, and the tiny dims
    when the preset has none."""
    vocab = tiny_tokenizer.TinyVocab.build()
    if llm is None or tts is None:
        llm_len, tts_len = len(vocab.bpe) + len(vocab.llm_added), len(vocab.bpe) + len(vocab.tts_added)
        llm_vocab = -(-llm_len // tiny.LLM_VOCAB_MULTIPLE) * tiny.LLM_VOCAB_MULTIPLE
        llm = Qwen2Dims(**tiny.LLM_SHAPE, vocab_size=llm_vocab, tie_word_embeddings=True)
        tts = Qwen2Dims(**tiny.TTS_SHAPE, vocab_size=tts_len, tie_word_embeddings=True)
    with tempfile.TemporaryDirectory(prefix="voice-agent-preset-") as tmp:
        d = Path(tmp)
        tiny_tokenizer.write_tokenizer(d, vocab, vocab.llm_added, eos=tiny_tokenizer.IM_END)
        tiny_tokenizer.write_tokenizer(d / TTS_TOKENIZER_DIR, vocab, vocab.tts_added, eos=tiny_tokenizer.ENDOFTEXT)
        llm_tok, tts_tok = load_tokenizer(d), load_tokenizer(d / TTS_TOKENIZER_DIR)
    return llm, tts, llm_tok, tts_tok, int(llm_tok.convert_tokens_to_ids(tiny_tokenizer.IM_END))


def _randomize(module: nn.Module, generator: torch.Generator) -> None:
    """N(0, INIT_STD) weights and biases; LayerNorm / RMSNorm gains 1 and LayerNorm biases 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 1)[-1]
            owner = module.get_submodule(name.rsplit(".", 1)[0]) if "." in name else module
            if isinstance(owner, nn.LayerNorm) or "norm" in type(owner).__name__.lower():
                p.fill_(1.0 if leaf == "weight" else 0.0)
            else:
                p.normal_(0.0, INIT_STD, generator=generator)


def build_preset(
    name: str,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
    *,
    unpadded: bool = False,
) -> tuple[SpeechLM, Cosy2Decoder, dict[str, torch.Tensor]]:
    """(SpeechLM, Cosy2Decoder, voices) with random weights at the shapes of preset `name`."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}: expected one of {sorted(PRESETS)}")
    preset, device = PRESETS[name], torch.device(device)
    llm_dims, tts_dims, llm_tok, tts_tok, eos_id = _tokenizers(preset.llm, preset.tts)
    config = _config(llm_dims, tts_dims, preset.whisper, eos_id)
    tokenizers = OmniTokenizers(llm_tok, tts_tok, config, Path(f"<preset {name}>"))
    generator = torch.Generator(device=device if device.type != "meta" else "cpu").manual_seed(seed)
    with torch.device(device):
        encoder = WhisperEncoder(**preset.whisper).to(dtype)
        projector = SpeechProjector(preset.whisper["n_state"], tiny.DS_RATE, preset.projector_hidden,
                                    llm_dims.hidden_size).to(dtype)
    llm = Qwen2ForCausalLM(llm_dims, device=device, dtype=dtype)
    tts = SpeechGenerator(llm_dims.hidden_size, tts_dims, device=device, dtype=dtype)
    for causal in (llm, tts.model):
        if causal.dims.tie_word_embeddings:
            causal.tie_weights()
    if device.type != "meta":  # "meta": shapes only (tests)
        for module in (encoder, projector, llm, tts):
            _randomize(module, generator)
    generation = GenerationSettings.from_generation_config(
        None, config_eos_token_id=list(tokenizers.llm_eos_ids), where="preset"
    )
    for module in (encoder, projector, llm, tts):
        module.eval().requires_grad_(False)
    lm = SpeechLM(config, tokenizers, encoder, projector, llm, tts, generation, name=f"preset-{name}",
                  unpadded=unpadded)

    flow_cfg = FlowConfig() if preset.real_decoder else FlowConfig.tiny()
    hift_cfg = HiFTConfig() if preset.real_decoder else HiFTConfig.tiny()
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        flow = Flow(flow_cfg).eval().requires_grad_(False)
    if device.type == "meta":
        with torch.device(device):
            hift = HiFT(hift_cfg)
    else:
        hift = random_hift(hift_cfg, seed).to(device)
    hift = hift.eval().requires_grad_(False)
    decoder = Cosy2Decoder(Path(f"<preset {name}>"), flow, hift, flow_cfg, hift_cfg)
    voice = torch.randn(SPEAKER_DIM, generator=torch.Generator().manual_seed(seed))
    return lm, decoder, {"en": voice}
