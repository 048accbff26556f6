"""OmniTokenizers on the tiny checkpoint: special ids, the prompt layout, streaming text, bad files."""

from __future__ import annotations

import json
import math
import random
import shutil
import unicodedata
from pathlib import Path

import pytest
import regex

from voice_agent.errors import CheckpointError, PromptError
from voice_agent.model.tiny import make_tiny
from voice_agent.model.tiny_tokenizer import PRETOKENIZE_PATTERN, byte_symbols
from voice_agent.model.tokenizer import SPEECH_TOKEN_INDEX, OmniTokenizers, Turn

DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
SYSTEM = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n"
USER = "<|im_start|>user\n<speech><|im_end|>\n"
GENERATE = "<|im_start|>assistant\n"
TEXTS = [
    "Hello! How can I help you today?",
    "I'm sure they'll say it's 42, isn't it?\n\nNew  lines\tand   spaces ",
    "Café crème, naïve façade — 日本語のテキスト, emoji 🎉👍🏽, Ελληνικά, русский.",
    "e\u0301 (decomposed) 12345 <|im_end|> tail<speech>x",
]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return make_tiny(tmp_path_factory.mktemp("tiny"), seed=0).model_dir


@pytest.fixture(scope="module")
def tok(tiny_dir) -> OmniTokenizers:
    return OmniTokenizers.load(tiny_dir)


@pytest.fixture()
def copy_dir(tiny_dir, tmp_path) -> Path:
    """A copy of the tiny model folder without its weights, free to damage."""
    return Path(shutil.copytree(tiny_dir, tmp_path / "m", ignore=shutil.ignore_patterns("*.safetensors")))


def test_special_ids_are_consistent(tok, tiny_dir):
    llm, tts = tok.llm, tok.tts
    config = json.loads((tiny_dir / "config.json").read_text())
    assert tok.unit_offset + 6561 == tok.tts_vocab_size == len(tts)
    assert tok.tts_vocab_size == config["speech_generator"]["vocab_size"]
    assert tok.sep_id == tok.speech_token_id
    assert llm.convert_ids_to_tokens(tok.speech_token_id) == "<speech>"
    assert tts.convert_ids_to_tokens(tok.sep_id) == "<sep>"
    assert tok.llm_eos_ids == (config["eos_token_id"],) == (tok.im_end_id,)
    assert llm.convert_ids_to_tokens(tok.im_end_id) == "<|im_end|>"
    assert tok.tts_eos_id == tok.tts_pad_id == config["speech_generator"]["eos_token_id"]
    assert tts.convert_ids_to_tokens(tok.tts_eos_id) == "<|endoftext|>"
    assert tok.unit_offset == tok.sep_id + 1  # units follow <sep>, as in the official id layout


def test_unit_of_maps_exactly_the_unit_range(tok):
    assert tok.unit_of(tok.unit_offset) == 0 and tok.unit_of(tok.tts_vocab_size - 1) == 6560
    assert tok.unit_of(tok.unit_offset - 1) is None and tok.unit_of(tok.tts_vocab_size) is None
    assert tok.unit_of(tok.tts_eos_id) is None and tok.unit_of(0) is None
    for unit in (0, 7, 6560):  # unit tokens are non-special "<u>" strings that survive skip_special_tokens
        tid = tok.unit_offset + unit
        assert tok.tts.decode([tid, tok.tts_eos_id], skip_special_tokens=True) == f"<{unit}>"


def expected_prompt(tok: OmniTokenizers, text: str) -> list[int]:
    ids = tok.llm.encode(text, add_special_tokens=False)
    return [SPEECH_TOKEN_INDEX if t == tok.speech_token_id else t for t in ids]


def test_one_turn_prompt_is_the_qwen25_layout(tok):
    prompt = tok.build_prompt([Turn.user()])
    assert prompt == expected_prompt(tok, SYSTEM + USER + GENERATE)
    assert prompt.count(SPEECH_TOKEN_INDEX) == 1 and tok.speech_token_id not in prompt
    rendered = tok.llm.decode([tok.speech_token_id if t == SPEECH_TOKEN_INDEX else t for t in prompt])
    assert rendered == SYSTEM + USER + GENERATE


def test_two_turn_prompt_carries_the_previous_reply_as_text(tok):
    reply = "Sure, the answer is 42 — très bien."
    prompt = tok.build_prompt([Turn.user(), Turn.assistant(reply), Turn.user()])
    text = SYSTEM + USER + f"<|im_start|>assistant\n{reply}<|im_end|>\n" + USER + GENERATE
    assert prompt == expected_prompt(tok, text)
    assert prompt.count(SPEECH_TOKEN_INDEX) == 2


def test_system_prompt_replaces_the_default(tok):
    prompt = tok.build_prompt([Turn.user()], system="Be brief.")
    assert prompt == expected_prompt(tok, "<|im_start|>system\nBe brief.<|im_end|>\n" + USER + GENERATE)


@pytest.mark.parametrize(
    ("turns", "message"),
    [
        ([], "odd number"),
        ([Turn.user(), Turn.assistant("hi")], "odd number"),
        ([Turn.assistant("hi"), Turn.user(), Turn.user()], "expected role 'user'"),
        ([Turn.user(), Turn.assistant("say <speech>"), Turn.user()], "placeholder"),
    ],
)
def test_bad_conversations_raise_prompt_error(tok, turns, message):
    with pytest.raises(PromptError, match=message):
        tok.build_prompt(turns)


def reference_bpe(model_dir: Path, text: str) -> list[int]:
    """Plain-Python byte-level BPE, the algorithm of the reference's slow Qwen2Tokenizer."""
    vocab = json.loads((model_dir / "vocab.json").read_text())
    added = json.loads((model_dir / "added_tokens.json").read_text())
    lines = (model_dir / "merges.txt").read_text().split("\n")[1:]
    ranks = {tuple(line.split(" ")): rank for rank, line in enumerate(line for line in lines if line)}
    symbols = byte_symbols()
    ids: list[int] = []
    split = "(" + "|".join(regex.escape(t) for t in sorted(added, key=len, reverse=True)) + ")"
    for chunk in regex.split(split, unicodedata.normalize("NFC", text)):
        if chunk in added:
            ids.append(added[chunk])
            continue
        for piece in regex.findall(PRETOKENIZE_PATTERN, chunk):
            word = [symbols[b] for b in piece.encode()]
            while len(word) > 1:
                pairs = enumerate(zip(word, word[1:], strict=False))
                rank, i = min((ranks.get(pair, math.inf), i) for i, pair in pairs)
                if rank == math.inf:
                    break
                word[i : i + 2] = [word[i] + word[i + 1]]
            ids.extend(vocab[t] for t in word)
    return ids


@pytest.mark.parametrize("text", TEXTS)
def test_ids_equal_a_plain_python_bpe(tok, tiny_dir, text):
    ids = tok.llm.encode(text, add_special_tokens=False)
    assert ids == reference_bpe(tiny_dir, text)
    assert len(tok.llm.encode(TEXTS[0], add_special_tokens=False)) < len(TEXTS[0]) // 2  # merges apply


def stream(tok: OmniTokenizers, ids: list[int], chunk: int = 1) -> list[str]:
    detok = tok.detokenizer()
    deltas = [detok.push(ids[i : i + chunk]) for i in range(0, len(ids), chunk)]
    return [*deltas, detok.flush()]


@pytest.mark.parametrize("text", TEXTS)
def test_detokenizer_never_splits_a_character(tok, text):
    ids = tok.llm.encode(text, add_special_tokens=False)
    deltas = stream(tok, ids)
    assert "".join(deltas) == tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    assert len([d for d in deltas if d]) > 1  # it does stream


def test_detokenizer_reproduces_decode_on_random_id_streams(tok):
    rng = random.Random(0)
    symbol_ids = [tok.llm.convert_tokens_to_ids(s) for s in byte_symbols()]
    high_bytes, any_id = [symbol_ids[b] for b in range(0x80, 0x100)], range(len(tok.llm))
    texts = [tok.llm.encode(t, add_special_tokens=False) for t in TEXTS]
    for trial in range(300):
        kind = trial % 3
        if kind == 0:  # any id, specials included
            ids = [rng.choice(any_id) for _ in range(rng.randrange(1, 40))]
        elif kind == 1:  # mostly lone UTF-8 lead/continuation bytes: incomplete and invalid characters
            ids = [rng.choice(high_bytes if rng.random() < 0.8 else any_id) for _ in range(30)]
        else:  # real multi-byte text, cut and spliced at random points
            a, b = rng.choice(texts), rng.choice(texts)
            ids = a[: rng.randrange(len(a) + 1)] + b[rng.randrange(len(b) + 1) :]
        assert "".join(stream(tok, ids, chunk=rng.choice([1, 1, 2, 3]))) == tok.decode(ids), ids


@pytest.mark.parametrize("where", ["", "tts_tokenizer"])
@pytest.mark.parametrize("name", ["vocab.json", "merges.txt", "tokenizer_config.json"])
def test_missing_tokenizer_file_names_it(copy_dir, where, name):
    (copy_dir / where / name).unlink()
    with pytest.raises(CheckpointError, match=f"missing file .*{name}"):
        OmniTokenizers.load(copy_dir)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("vocab.json", "{not json", "vocab.json"),
        ("vocab.json", '{"a": "zero"}', "integer ids"),
        ("merges.txt", "#version: 0.2\nĠ t h\n", "line 2 expected 'a b'"),
        ("merges.txt", "#version: 0.2\nĠ zz\n", "'zz' is not in vocab.json"),
        ("tokenizer_config.json", "[1, 2]", "tokenizer_config.json"),
        ("added_tokens.json", "", "added_tokens.json"),
        ("special_tokens_map.json", "{", "special_tokens_map.json"),
    ],
)
def test_malformed_tokenizer_file_names_it(copy_dir, name, content, message):
    (copy_dir / "tts_tokenizer" / name).write_text(content, encoding="utf-8")
    with pytest.raises(CheckpointError, match=message) as info:
        OmniTokenizers.load(copy_dir)
    assert "tts_tokenizer" in str(info.value)


def test_malformed_config_json_names_it(copy_dir):
    (copy_dir / "config.json").write_text('{"model_type": "omni2_speech2s_qwen2"', encoding="utf-8")
    with pytest.raises(CheckpointError, match="malformed file .*config.json"):
        OmniTokenizers.load(copy_dir)


def edit_json(path: Path, edit) -> None:
    data = json.loads(path.read_text(encoding="utf-8"))
    edit(data)
    path.write_text(json.dumps(data), encoding="utf-8")


def test_missing_chat_template_is_named(copy_dir):
    edit_json(copy_dir / "tokenizer_config.json", lambda c: c.pop("chat_template"))
    with pytest.raises(CheckpointError, match="chat_template"):
        OmniTokenizers.load(copy_dir)


def test_missing_speech_token_is_named(copy_dir):
    def drop(c):
        added = c["added_tokens_decoder"]
        c["added_tokens_decoder"] = {k: v for k, v in added.items() if v["content"] != "<speech>"}
        c["additional_special_tokens"].remove("<speech>")

    edit_json(copy_dir / "tokenizer_config.json", drop)
    with pytest.raises(CheckpointError, match="'<speech>'"):
        OmniTokenizers.load(copy_dir)


def test_unit_vocab_larger_than_the_tts_tokenizer_is_rejected(copy_dir):
    edit_json(copy_dir / "config.json", lambda c: c.update(unit_vocab_size=100000))
    with pytest.raises(CheckpointError, match="unit tokens"):
        OmniTokenizers.load(copy_dir)
