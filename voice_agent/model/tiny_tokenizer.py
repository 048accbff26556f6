"""Tiny Qwen2-style tokenizer files for the tiny checkpoint set (`voice_agent.model.tiny`), written in the
official file layout so tests run the real tokenizer loading code.

The tokenizers are byte-level BPE in the Qwen2 style: the 256 byte symbols, merges learned from a short
English text (`learn_merges`), then the specials. Ids: BPE tokens, `<|endoftext|>`, `<|im_start|>`,
`<|im_end|>`, then `<speech>` (LLM) / `<sep>` (TTS) at the same id, then (TTS only) unit tokens
"<0>".."<6560>" (`TinyVocab`). `write_tokenizer` writes vocab.json, merges.txt, tokenizer_config.json (with
the Qwen2.5-Instruct chat template), added_tokens.json and special_tokens_map.json.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import regex

UNIT_VOCAB_SIZE = 6561  # CosyVoice2 speech units, as real
NUM_MERGES = 120
ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPEECH, SEP = "<speech>", "<sep>"
DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# The Qwen2 pre-tokenizer split (contractions, letter runs, single digits, punctuation runs, whitespace).
PRETOKENIZE_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
MERGE_CORPUS = (
    "Hello! How can I help you today? I am a helpful assistant and I am happy to answer your question. "
    "The weather is nice today, so you could go for a walk in the park. Here is what I think about that: "
    "there are many things that you can do with your time, and the best one is the one that you enjoy. "
    "Thank you for asking. Is there anything else that I can help you with? Let me know what you would "
    "like to talk about, and I will do my best to give you a good answer."
)
CHAT_TEMPLATE = (  # the Qwen2.5-Instruct layout (architecture.md §2.5), tools left out
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\n" + DEFAULT_SYSTEM + "<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}{%- if not (loop.first and message['role'] == 'system') %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def byte_symbols() -> list[str]:
    """The GPT-2 byte-level alphabet: the symbol of byte b at index b."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}  # these map to themselves
    shifted = iter(range(256, 512))  # the others to 256, 257, ... in byte order
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Byte-level BPE training: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    symbol = byte_symbols()
    pieces = regex.findall(PRETOKENIZE_PATTERN, text)
    words = Counter(tuple(symbol[b] for b in piece.encode()) for piece in pieces)
    merges: list[tuple[str, str]] = []
    for _ in range(num_merges):
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in zip(word, word[1:], strict=False):
                pairs[pair] += count
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        # Byte-level symbols never contain a space: a word is its symbols joined by spaces while merging.
        joined = regex.compile(r"(?<!\S)" + regex.escape(" ".join(best)) + r"(?!\S)")
        merged = (joined.sub("".join(best), " ".join(word)) for word in words)
        words = Counter({tuple(m.split(" ")): n for m, n in zip(merged, words.values(), strict=True)})
    return merges


@dataclass(frozen=True)
class TinyVocab:
    """The BPE vocabulary and the added tokens of both tiny tokenizers."""

    bpe: dict[str, int]
    merges: list[tuple[str, str]]
    llm_added: list[tuple[str, bool]]  # (content, special) in id order after the BPE tokens
    tts_added: list[tuple[str, bool]]

    @classmethod
    def build(cls) -> TinyVocab:
        merges = learn_merges(MERGE_CORPUS, NUM_MERGES)
        tokens = byte_symbols()
        order = sorted(range(256), key=lambda b: (tokens[b] != chr(b), b))  # printable bytes first, as GPT-2
        bpe = {tokens[b]: i for i, b in enumerate(order)}
        for a, b in merges:
            bpe.setdefault(a + b, len(bpe))
        specials = [(ENDOFTEXT, True), (IM_START, True), (IM_END, True)]
        units = [(f"<{u}>", False) for u in range(UNIT_VOCAB_SIZE)]
        return cls(bpe, merges, [*specials, (SPEECH, True)], [*specials, (SEP, True), *units])

    def encode(self, text: str) -> list[int]:
        """Ids of `text` (no special tokens) as the written tokenizer gives them: pre-tokenize, then in each
        piece merge the adjacent pair of lowest merge rank until none is left."""
        symbol, rank = byte_symbols(), {pair: i for i, pair in enumerate(self.merges)}
        ids: list[int] = []
        for piece in regex.findall(PRETOKENIZE_PATTERN, text):
            word = [symbol[b] for b in piece.encode()]
            while len(word) > 1:
                pairs = enumerate(zip(word, word[1:], strict=False))
                best, i = min((rank.get(pair, len(rank)), i) for i, pair in pairs)
                if best == len(rank):
                    break
                word[i : i + 2] = [word[i] + word[i + 1]]
            ids += [self.bpe[w] for w in word]
        return ids

    def special_id(self, token: str) -> int:
        """Id of one of the specials shared by both tokenizers."""
        return len(self.bpe) + [ENDOFTEXT, IM_START, IM_END].index(token)


def write_json(path: Path, data: Any) -> None:
    """Sorted, indented JSON, as the hub files are written (same data, same bytes)."""
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")


def write_tokenizer(out_dir: Path, vocab: TinyVocab, added: list[tuple[str, bool]], eos: str) -> None:
    """Write a Qwen2-style tokenizer (vocab.json, merges.txt, tokenizer_config.json, added_tokens.json,
    special_tokens_map.json) with `added` after the BPE tokens and `eos` as its eos token."""
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json(out_dir / "vocab.json", vocab.bpe)
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in vocab.merges), encoding="utf-8"
    )
    first = len(vocab.bpe)
    write_json(out_dir / "added_tokens.json", {t: first + i for i, (t, _) in enumerate(added)})
    extra_specials = [t for t, special in added if special and t not in (ENDOFTEXT, eos)]

    def token(content: str, special: bool) -> dict[str, Any]:
        return dict(content=content, lstrip=False, normalized=not special, rstrip=False, single_word=False)

    write_json(out_dir / "special_tokens_map.json", {
        "additional_special_tokens": extra_specials, "eos_token": token(eos, True),
        "pad_token": token(ENDOFTEXT, True),
    })
    decoder = {str(first + i): token(t, s) | {"special": s} for i, (t, s) in enumerate(added)}
    write_json(out_dir / "tokenizer_config.json", {
        "add_prefix_space": False, "added_tokens_decoder": decoder,
        "additional_special_tokens": extra_specials,
        "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
        "eos_token": eos, "errors": "replace", "model_max_length": 4096, "pad_token": ENDOFTEXT,
        "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer", "unk_token": None,
    })
