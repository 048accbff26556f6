"""The streaming TTS LM (`speech_generator`): fusion of LLM states with text tokens, and a Qwen2 body.

For each text token y read from the LLM, paired with the LLM state h that predicted it (the final-normed
state, §3.1 of the architecture notes), the TTS input embedding is

    r = input_proj(h)                  # Linear(H, 2H) -> ReLU -> Linear(2H, D)
    e = E_tts[y]                       # the TTS embedding row of the *LLM* token id
    g = gate([r ; e])                  # Linear(2D, D) -> Sigmoid, concatenation order r then e
    x = g * r + (1 - g) * e

`<sep>`, speech units and the TTS eos enter as raw embeddings (`embed`). Attribute names reproduce the
official keys `speech_generator.input_proj.{0,2}.*`, `speech_generator.gate.0.*`,
`speech_generator.model.model.*` and `speech_generator.model.lm_head.weight`.

Deviation from the reference: the reference re-prefills the whole TTS sequence at every read; here the
TTS LM keeps a `KVCache` slot per session across blocks and feeds only the new positions, which gives the
same logits (tested) at a fraction of the cost.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from voice_agent.model.config import Qwen2Dims
from voice_agent.model.qwen2 import KVCache, Qwen2ForCausalLM

EXTRA_TTS_POSITIONS = 2  # besides text tokens and written TTS tokens: <sep>, and one spare position


def reply_units(read_tokens: int, write_units: int, text_tokens: int, final_units: int) -> int:
    """The most TTS tokens (units, or an eos ending a block early) a reply of up to `text_tokens` text tokens
    writes: `write_units` after each read of `read_tokens` tokens (the last read may be short) and
    `final_units` after the final read."""
    return write_units * (text_tokens // read_tokens + 1) + final_units


def tts_positions(read_tokens: int, write_units: int, text_tokens: int, final_units: int) -> int:
    """TTS cache positions one reply needs: every text token (fused), `<sep>` and every TTS token written."""
    return text_tokens + EXTRA_TTS_POSITIONS + reply_units(read_tokens, write_units, text_tokens, final_units)


class SpeechGenerator(nn.Module):
    """`input_proj` + `gate` (fusion) and `model`, the TTS Qwen2ForCausalLM."""

    def __init__(
        self,
        llm_hidden: int,
        tts_dims: Qwen2Dims,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if llm_hidden < 1:
            raise ValueError(f"llm_hidden: expected a positive size, got {llm_hidden}")
        factory: dict[str, Any] = {"device": device, "dtype": dtype}
        D = tts_dims.hidden_size
        self.llm_hidden = llm_hidden
        self.dims = tts_dims
        self.input_proj = nn.Sequential(
            nn.Linear(llm_hidden, 2 * llm_hidden, **factory),
            nn.ReLU(),
            nn.Linear(2 * llm_hidden, D, **factory),
        )
        self.gate = nn.Sequential(nn.Linear(2 * D, D, **factory), nn.Sigmoid())
        self.model = Qwen2ForCausalLM(tts_dims, device=device, dtype=dtype)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        """Raw TTS embeddings (..., D) of token ids (...): `<sep>`, units, eos."""
        return self.model.embed(ids)

    def fuse(self, llm_hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """(N, H) LLM states and the (N,) text token ids they predicted -> (N, D) TTS input embeddings."""
        if llm_hidden.dim() != 2 or llm_hidden.shape[-1] != self.llm_hidden:
            raise ValueError(f"llm_hidden: expected (N, {self.llm_hidden}), got {tuple(llm_hidden.shape)}")
        if token_ids.shape != llm_hidden.shape[:1]:
            raise ValueError(
                f"token_ids: expected ({llm_hidden.shape[0]},) to pair with llm_hidden, "
                f"got {tuple(token_ids.shape)}"
            )
        r = self.input_proj(llm_hidden)  # (N, D)
        e = self.embed(token_ids)  # (N, D)
        g = self.gate(torch.cat((r, e), dim=-1))  # (N, D)
        return g * r + (1 - g) * e

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache | None = None,
        slots: torch.Tensor | None = None,
        valid: torch.Tensor | None = None,
        kv_len: int | None = None,
    ) -> torch.Tensor:
        """Logits (B, V) of the next TTS token after each row's last valid input (B, T, D).

        Feed only the positions not yet in the cache: a read block `[F F F]` (plus `<sep>` on the final
        read) or the previous unit, at the positions that follow the slot's current length.
        """
        return self.model.step(inputs_embeds, positions, cache, slots, valid, kv_len)[1]
