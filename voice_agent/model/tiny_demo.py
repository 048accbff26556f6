"""The embedded demo model: the tiny random checkpoint with a few tensors shaped so that a reply is short,
quiet and readable.

The server runs the tiny set when no weights exist (`engine/files.py`). With purely random weights every
reply runs to max_new_tokens of unprintable text and the TTS writes its full 1024-unit final block, a minute
of clipped noise. `make_tiny(..., demo=True)` keeps every key, shape and dtype of the official layout and
the random values of every other tensor, and overwrites these, so the unchanged model code gives:

- LLM: the reply `DEMO_REPLY`, then `<|im_end|>`, whatever was asked. The chain `\\n` (the last prompt
  token, after `<|im_start|>assistant`), the reply's tokens, `<|im_end|>` get one residual axis each: the
  embedding of chain token k is `LLM_CHAIN_NORM * e_k` (the lm_head is the tied embedding, so these are
  also the output rows), and one MLP unit of the last layer per chain token reads axis k and writes
  `e_{k+1} - e_k` at the same size. The final-normed state of token k is then about 8 e_{k+1} (RMS 1 over
  64 dims), whose logit for token k+1 is `8 * LLM_CHAIN_NORM` while every other token's stays within a
  few tenths of 0: greedy, and sampled at any allowed temperature, the sentence is the reply.
- TTS LM: the TTS eos right after `<sep>`, i.e. speech ends with the text. The last residual axis is
  written only by the `<sep>` and eos embeddings (their rows lie on it; every other embedding row, the
  fusion projection, and each layer's o_proj and down_proj have zero there). After `<sep>` the eos logit
  is about `sqrt(32) * TTS_EOS_NORM`, far above any unit's; after anything else it is exactly 0, a
  typical unit's, so blocks still write their W units.
- HiFT: quiet, low-passed noise instead of full-scale noise (`cosy2.tiny.quiet_hift_state`).
- Whisper text decoder (user transcripts): `DEMO_TRANSCRIPT`, then eot, whatever was said, by the LLM's
  chain construction on its one block: `<|notimestamps|>` (the last prompt token), the transcript's
  tokens and eot get one residual axis each, and one MLP unit per chain token writes the next token's
  axis; the final LayerNorm puts about sqrt(n_state) on it, so its logit beats every other by far.
"""

from __future__ import annotations

import torch

from voice_agent.model.tiny_tokenizer import ENDOFTEXT, IM_END, SEP, TinyVocab

DEMO_REPLY = "Hello! I am the demo model."  # distinct tokens: each names its successor
DEMO_REPLY_AFTER = "\n"  # the prompt's last token, after "<|im_start|>assistant"
LLM_CHAIN_NORM = 4.0  # chain embedding size; the next token wins by 8x this in logits
TTS_SEP_NORM = 2.0  # <sep> on the eos axis: after <sep> the state lies almost on it
TTS_EOS_NORM = 4.0  # eos logit after <sep>, about sqrt(32) * this
DEMO_TRANSCRIPT = " Demo model transcript, not your words."  # distinct whisper tokens, none suppressed
WHISPER_CHAIN_NORM = 4.0  # chain embedding size in the whisper decoder


def demo_chain(vocab: TinyVocab) -> list[int]:
    """The LLM ids the demo LLM walks: the prompt's last token, the reply's tokens, `<|im_end|>`."""
    chain = [*vocab.encode(DEMO_REPLY_AFTER), *vocab.encode(DEMO_REPLY), vocab.special_id(IM_END)]
    if len(set(chain)) != len(chain):
        raise ValueError(f"demo reply {DEMO_REPLY!r}: expected distinct tokens, got ids {chain}")
    return chain


def shape_demo_llm(tensors: dict[str, torch.Tensor], vocab: TinyVocab, num_layers: int) -> None:
    """Make the LLM walk `demo_chain` (module docstring), in place; the lm_head stays the tied embedding."""
    chain = demo_chain(vocab)
    embed = tensors["model.embed_tokens.weight"]  # (V, H)
    H = embed.shape[1]
    mlp = f"model.layers.{num_layers - 1}.mlp."
    gate, up, down = (tensors[mlp + name] for name in ("gate_proj.weight", "up_proj.weight", "down_proj.weight"))
    if len(chain) > min(H, gate.shape[0]):
        raise ValueError(f"demo reply: {len(chain)} chain tokens need as many axes and MLP units, "
                         f"have {H} and {gate.shape[0]}")
    normed = H**0.5  # an input on one axis reads sqrt(H) there after RMSNorm
    act = torch.nn.functional.silu(torch.tensor(normed)) * normed  # unit k's activation on its own token
    for k, token in enumerate(chain):
        embed[token] = 0.0
        embed[token, k] = LLM_CHAIN_NORM
        gate[k], up[k], down[:, k] = 0.0, 0.0, 0.0
        gate[k, k] = up[k, k] = 1.0
        if k + 1 < len(chain):  # <|im_end|> ends the reply: it needs no successor
            down[k + 1, k] = LLM_CHAIN_NORM / act
            down[k, k] = -LLM_CHAIN_NORM / act
    if "lm_head.weight" in tensors:
        tensors["lm_head.weight"] = embed.clone()


def shape_demo_tts(tensors: dict[str, torch.Tensor], vocab: TinyVocab, num_layers: int) -> None:
    """Make the TTS LM write its eos right after `<sep>` and only there (module docstring), in place."""
    prefix = "speech_generator."
    embed = tensors[prefix + "model.model.embed_tokens.weight"]  # (V_tts, D)
    axis = embed.shape[1] - 1
    sep = len(vocab.bpe) + [token for token, _ in vocab.tts_added].index(SEP)
    eos = vocab.special_id(ENDOFTEXT)
    embed[:, axis] = 0.0
    for token, norm in ((sep, TTS_SEP_NORM), (eos, TTS_EOS_NORM)):
        embed[token] = 0.0
        embed[token, axis] = norm
    tensors[prefix + "input_proj.2.weight"][axis] = 0.0
    tensors[prefix + "input_proj.2.bias"][axis] = 0.0
    for i in range(num_layers):
        layer = f"{prefix}model.model.layers.{i}."
        tensors[layer + "self_attn.o_proj.weight"][axis] = 0.0
        tensors[layer + "mlp.down_proj.weight"][axis] = 0.0
    tensors[prefix + "model.lm_head.weight"] = embed.clone()


def shape_demo_whisper_decoder(state: dict[str, torch.Tensor], prefix: str = "decoder.") -> None:
    """Make a one-block Whisper text decoder transcribe `DEMO_TRANSCRIPT` (module docstring), in place."""
    from whisper.tokenizer import get_tokenizer

    tokenizer = get_tokenizer(True, num_languages=100)  # large-v3's vocabulary (n_vocab 51866)
    chain = [tokenizer.no_timestamps, *tokenizer.encode(DEMO_TRANSCRIPT), tokenizer.eot]
    embed = state[prefix + "token_embedding.weight"]  # (V, D)
    D = embed.shape[1]
    mlp = prefix + "blocks.0.mlp."
    up, up_bias, down = state[mlp + "0.weight"], state[mlp + "0.bias"], state[mlp + "2.weight"]  # (4D, D), (D, 4D)
    if len(set(chain)) != len(chain) or len(chain) > D:
        raise ValueError(f"demo transcript {DEMO_TRANSCRIPT!r}: expected at most {D} distinct tokens, got {chain}")
    normed = (D - 1) ** 0.5  # an input on one axis reads about this there after LayerNorm
    act = torch.nn.functional.gelu(torch.tensor(normed))
    for k, token in enumerate(chain):
        embed[token] = 0.0
        embed[token, k] = WHISPER_CHAIN_NORM
        up[k], up_bias[k], down[:, k] = 0.0, 0.0, 0.0
        up[k, k] = 1.0
        if k + 1 < len(chain):  # eot ends the transcript: it needs no successor
            down[k + 1, k] = WHISPER_CHAIN_NORM / act
            down[k, k] = -WHISPER_CHAIN_NORM / act
