"""The two tokenizers of a LLaMA-Omni2 checkpoint: the LLM's, and the TTS LM's (`tts_tokenizer/`).

`OmniTokenizers.load(model_dir)` reads both with transformers `AutoTokenizer`, checks the files first (a
missing or malformed file raises CheckpointError naming it), and looks up every id the model needs from
the tokenizers and `config.json` — nothing is hard-coded:

- `speech_token_id` (`<speech>` in the LLM tokenizer), `llm_eos_ids` (the config's eos, then `<|im_end|>`),
- `tts_eos_id` / `tts_pad_id` (the TTS tokenizer's eos / pad), `sep_id` (`<sep>`), `tts_vocab_size`
  (len of the TTS tokenizer), `unit_offset` = tts_vocab_size - unit_vocab_size, and `unit_of(id)`.

`build_prompt` renders the model's own chat template exactly as the reference does (user turns are the text
"<speech>", assistant turns their earlier reply; `add_generation_prompt=True`), tokenizes it without added
specials, and replaces every `<speech>` id with SPEECH_TOKEN_INDEX (-200), the placeholder where the
adapter's speech embeddings are spliced in.

Slow vs fast: the reference loads with `use_fast=False` (transformers 4.43's pure-Python Qwen2Tokenizer).
transformers 5 ignores `use_fast` and always builds the Rust `tokenizers` BPE from vocab.json + merges.txt.
For a byte-level BPE both give the same ids (NFC normalisation, the same pre-tokenizer split, merges
applied by rank, added tokens matched first); tests/test_tokenizer.py checks this against a plain-Python
BPE. We therefore load with the library default and pass no `use_fast`. The checkpoint's `config.json` is
not a transformers model type, so an empty config is passed and the class comes from
`tokenizer_config.json` (`tokenizer_class`), as it did in the reference.

`IncrementalDetokenizer` turns a stream of LLM ids into text deltas whose concatenation equals
`decode(all ids)`: byte-level tokens can end inside a UTF-8 character, so text is held back while the
decoded tail ends in U+FFFD (an incomplete character) and released once the character completes.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from voice_agent.errors import CheckpointError, PromptError
from voice_agent.model.config import OmniConfig
from voice_agent.model.weights import read_json

SPEECH_TOKEN = "<speech>"  # the user-turn content in the chat template (DEFAULT_SPEECH_TOKEN)
SPEECH_TOKEN_INDEX = -200  # replaces SPEECH_TOKEN's id in a prompt; the speech features go there
SEP_TOKEN = "<sep>"  # TTS read/write boundary marker
IM_END_TOKEN = "<|im_end|>"
IM_START_TOKEN = "<|im_start|>"
TTS_TOKENIZER_DIR = "tts_tokenizer"
REPLACEMENT_CHAR = "\ufffd"  # what a partial UTF-8 character decodes to

REQUIRED_FILES = {
    "tokenizer_config.json": "a transformers tokenizer config (tokenizer_class, specials, chat_template)",
    "vocab.json": "a byte-level BPE vocabulary: a JSON object token -> id",
}
OPTIONAL_JSON_FILES = {
    "added_tokens.json": "a JSON object added token -> id",
    "special_tokens_map.json": "a JSON object of special tokens",
    "tokenizer.json": "a tokenizers serialisation",
}
MERGES_FILE = "merges.txt"


@dataclass(frozen=True)
class Turn:
    """One message of a conversation: a user turn (its audio is spliced in) or an assistant text reply."""

    role: str  # "user" | "assistant"
    text: str = ""

    @classmethod
    def user(cls) -> Turn:
        return cls("user")

    @classmethod
    def assistant(cls, text: str) -> Turn:
        return cls("assistant", text)


def _check_merges(path: Path, vocab: dict[str, Any]) -> None:
    if not path.is_file():
        raise CheckpointError(f"missing file {path}: expected byte-level BPE merges, one 'a b' pair per line")
    try:
        lines = path.read_text(encoding="utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"malformed file {path}: expected UTF-8 text of BPE merges ({e})") from e
    for number, line in enumerate(lines, start=1):
        if not line or (number == 1 and line.startswith("#version")):
            continue
        parts = line.split(" ")
        if len(parts) != 2 or not all(parts):
            raise CheckpointError(f"malformed file {path}: line {number} expected 'a b', got {line!r}")
        for token in (*parts, parts[0] + parts[1]):
            if token not in vocab:
                raise CheckpointError(f"malformed file {path}: line {number}: {token!r} is not in vocab.json")


def check_tokenizer_files(directory: Path) -> dict[str, Any]:
    """Check a Qwen2 tokenizer folder's files; return its tokenizer_config.json."""
    if not directory.is_dir():
        files = ", ".join([*REQUIRED_FILES, MERGES_FILE])
        raise CheckpointError(f"missing directory {directory}: expected a tokenizer ({files})")
    config = read_json(directory / "tokenizer_config.json", REQUIRED_FILES["tokenizer_config.json"])
    vocab = read_json(directory / "vocab.json", REQUIRED_FILES["vocab.json"])
    bad = next(((k, v) for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)), None)
    if bad is not None:
        path = directory / "vocab.json"
        raise CheckpointError(f"malformed file {path}: expected integer ids, got {bad[0]!r}: {bad[1]!r}")
    _check_merges(directory / MERGES_FILE, vocab)
    for name, what in OPTIONAL_JSON_FILES.items():
        if (directory / name).exists():
            read_json(directory / name, what)
    return config


def load_tokenizer(directory: Path) -> Any:
    """Check the files of `directory`, then load it with AutoTokenizer."""
    from transformers import AutoTokenizer, PretrainedConfig

    check_tokenizer_files(directory)
    try:
        # An empty model config: the class is the one named in tokenizer_config.json.
        return AutoTokenizer.from_pretrained(str(directory), config=PretrainedConfig(), local_files_only=True)
    except Exception as e:  # transformers raises many types for a bad tokenizer folder
        raise CheckpointError(f"malformed tokenizer in {directory}: {type(e).__name__}: {e}") from e


def token_id(tokenizer: Any, token: str, where: Path, what: str) -> int:
    """The id of `token` in `tokenizer`, or CheckpointError if it is not a single token there."""
    tid = tokenizer.convert_tokens_to_ids(token)
    if not isinstance(tid, int) or tokenizer.convert_ids_to_tokens(tid) != token:
        raise CheckpointError(f"tokenizer in {where}: expected the token {token!r} ({what}), not found")
    return tid


class IncrementalDetokenizer:
    """Streams text deltas for a growing id sequence; the deltas concatenate to `tokenizer.decode(ids)`."""

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._pending: list[int] = []  # ids after the last character boundary
        self.text = ""  # everything emitted so far

    def push(self, ids: int | Iterable[int]) -> str:
        """Add one or more ids; return the newly completed text (possibly "")."""
        self._pending.extend([ids] if isinstance(ids, int) else ids)
        text = self.tokenizer.decode(self._pending, skip_special_tokens=self.skip_special_tokens)
        if text.endswith(REPLACEMENT_CHAR):  # a character may still be incomplete: hold it back
            return ""
        self._pending.clear()
        self.text += text
        return text

    def flush(self) -> str:
        """Release whatever is held (an unfinished character decodes to U+FFFD, as decode() gives)."""
        text = self.tokenizer.decode(self._pending, skip_special_tokens=self.skip_special_tokens)
        self._pending.clear()
        self.text += text
        return text


class OmniTokenizers:
    """The LLM and TTS tokenizers of one checkpoint with the special ids the model needs."""

    def __init__(self, llm: Any, tts: Any, config: OmniConfig, model_dir: Path):
        self.llm, self.tts, self.model_dir = llm, tts, model_dir
        tts_dir = model_dir / TTS_TOKENIZER_DIR
        if not isinstance(getattr(llm, "chat_template", None), str):
            raise CheckpointError(f"tokenizer in {model_dir}: expected a chat_template, found none")
        self.speech_token_id = token_id(llm, SPEECH_TOKEN, model_dir, "the user-speech placeholder")
        self.im_end_id = token_id(llm, IM_END_TOKEN, model_dir, "the end of a chat turn")
        config_eos = config.raw.get("eos_token_id")
        listed = config_eos if isinstance(config_eos, list) else [config_eos]
        eos = [e for e in listed if isinstance(e, int)]
        self.llm_eos_ids: tuple[int, ...] = tuple(dict.fromkeys([*eos, self.im_end_id]))
        self.sep_id = token_id(tts, SEP_TOKEN, tts_dir, "the TTS read/write boundary")
        for name in ("eos", "pad"):
            if not isinstance(getattr(tts, f"{name}_token_id"), int):
                raise CheckpointError(f"tokenizer in {tts_dir}: expected a {name}_token, got none")
        self.tts_eos_id: int = tts.eos_token_id
        self.tts_pad_id: int = tts.pad_token_id
        self.tts_vocab_size = len(tts)
        self.unit_vocab_size = config.unit_vocab_size
        self.unit_offset = self.tts_vocab_size - self.unit_vocab_size
        highest_special = max(self.sep_id, self.tts_eos_id, self.tts_pad_id)
        if self.unit_offset <= highest_special:
            raise CheckpointError(
                f"tokenizer in {tts_dir}: expected {self.unit_vocab_size} unit tokens after the special ids "
                f"(up to {highest_special}), but it has only {self.tts_vocab_size} tokens"
            )
        for which, tok, dims in (("LLM", llm, config.llm), ("TTS", tts, config.tts)):
            if dims.vocab_size < len(tok):
                raise CheckpointError(
                    f"{model_dir / 'config.json'}: {which} vocab_size {dims.vocab_size} is smaller than the "
                    f"{len(tok)} tokens of its tokenizer"
                )

    @classmethod
    def load(cls, model_dir: str | Path, config: OmniConfig | None = None) -> OmniTokenizers:
        model_dir = Path(model_dir)
        config = config if config is not None else OmniConfig.load(model_dir)
        llm, tts = load_tokenizer(model_dir), load_tokenizer(model_dir / TTS_TOKENIZER_DIR)
        return cls(llm, tts, config, model_dir)

    def unit_of(self, tts_id: int) -> int | None:
        """The speech unit of a TTS token id, or None if the id is not a unit token."""
        unit = tts_id - self.unit_offset
        return unit if 0 <= unit < self.unit_vocab_size else None

    def build_prompt(self, turns: Sequence[Turn], system: str | None = None) -> list[int]:
        """Prompt ids for a conversation ending with a user turn; user turns become SPEECH_TOKEN_INDEX."""
        if len(turns) % 2 != 1:
            raise PromptError(f"expected an odd number of turns ending with a user turn, got {len(turns)}")
        messages = [] if system is None else [{"role": "system", "content": system}]
        for i, turn in enumerate(turns):
            expected = "user" if i % 2 == 0 else "assistant"
            if turn.role != expected:
                raise PromptError(f"turn {i}: expected role {expected!r}, got {turn.role!r}")
            content = SPEECH_TOKEN if turn.role == "user" else turn.text
            messages.append({"role": turn.role, "content": content})
        text = self.llm.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = self.llm.encode(text, add_special_tokens=False)
        prompt = [SPEECH_TOKEN_INDEX if t == self.speech_token_id else t for t in ids]
        placeholders, users = prompt.count(SPEECH_TOKEN_INDEX), (len(turns) + 1) // 2
        if placeholders != users:
            raise PromptError(
                f"expected {users} {SPEECH_TOKEN} placeholder(s), one per user turn, found {placeholders}: "
                f"a system or assistant text contains {SPEECH_TOKEN!r}"
            )
        return prompt

    def role_header(self, role: str) -> list[int]:
        """The ids that open a chat message of `role` (`<|im_start|>role\\n`)."""
        return list(self.llm.encode(f"{IM_START_TOKEN}{role}\n", add_special_tokens=False))

    def text_ids(self, text: str) -> list[int]:
        """A message's text content as ids; special tokens written in it are read as plain text, so a client
        cannot forge a role marker or the speech placeholder."""
        return list(self.llm(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])

    def decode(self, ids: Iterable[int]) -> str:
        """LLM ids to text, special tokens dropped (as the reference's batch_decode)."""
        return self.llm.decode(list(ids), skip_special_tokens=True)

    def detokenizer(self) -> IncrementalDetokenizer:
        """A streaming decoder of LLM ids equal to `decode` over the whole stream."""
        return IncrementalDetokenizer(self.llm, skip_special_tokens=True)
