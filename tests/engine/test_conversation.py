"""Conversation: the template pieces, KV bookkeeping across replies and edits, cuts after interruptions,
out-of-band replies, the context policy, and rendering equal to the model's chat template."""

from __future__ import annotations

import pytest

from voice_agent.engine.conversation import (
    ContextOverflow,
    ContextPolicy,
    Conversation,
    Message,
    PromptFormat,
    Speech,
    heard_tokens,
)
from voice_agent.errors import PromptFormatError

S = -200  # the speech placeholder
ROOT = "root"
SYSTEM, FOOTER = [1, 2], [5, 6]
HEADERS = {"user": [3, 4], "assistant": [3, 7], "system": [3, 9]}
EOS = 5


def header(role: str) -> list[int]:
    return HEADERS[role]


def fake_render(n: int) -> list[int]:
    """A Qwen-like template: system (user [S] footer assistant reply footer)* user [S] footer assistant."""
    ids = list(SYSTEM)
    for i in range(n):
        if i:
            ids += [*HEADERS["assistant"], *FOOTER]
        ids += [*HEADERS["user"], S, *FOOTER]
    return ids + HEADERS["assistant"]


def make(budget: int = 1000, low_water: float = 0.5) -> Conversation:
    return Conversation(PromptFormat.derive(fake_render, S, header), ContextPolicy(budget, low_water))


def flat(conv: Conversation, start: int = 0, generation: bool = True) -> list[object]:
    """Positions as a flat list: token ids, and ('speech', features, index) per speech position."""
    out: list[object] = []
    for item in conv.suffix(start, generation):
        if isinstance(item, Speech):
            out += [("speech", item.features, i) for i in range(item.length)]
        else:
            out += item
    return out


def user(mid: str, length: int = 2) -> Message:
    return Message(mid, "user", Speech(mid, length))


def reply(conv: Conversation, mid: str, ids: list[int], fed: int) -> None:
    """Run one reply: prefill, then record `ids` of which `fed` were fed to the LLM."""
    conv.begin_reply(16)
    conv.prefilled()
    start = conv.prompt_length
    after = conv.messages[-1].id if conv.messages else ROOT
    conv.add_reply(Message(mid, "assistant", ids), after, ROOT, start, fed, [EOS])


def test_prompt_format_cuts_the_template_pieces() -> None:
    fmt = PromptFormat.derive(fake_render, S, header)
    assert (list(fmt.system), list(fmt.footer)) == (SYSTEM, FOOTER)
    assert {k: list(v) for k, v in fmt.headers.items()} == HEADERS
    assert fmt.render_ids(3, S) == fake_render(3)
    assert fmt.render_ids(2, S, [[20, 21]]) == [*SYSTEM, *HEADERS["user"], S, *FOOTER, *HEADERS["assistant"], 20, 21,
                                               *FOOTER, *HEADERS["user"], S, *FOOTER, *HEADERS["assistant"]]


def test_prompt_format_refuses_a_template_that_is_not_prefix_stable() -> None:
    def numbered(n: int) -> list[int]:  # the system line changes with the number of turns
        return [100 + n, *fake_render(n)[1:]]

    with pytest.raises(PromptFormatError, match="prefix-stable"):
        PromptFormat.derive(numbered, S, header)


def test_prompt_format_refuses_headers_that_do_not_join_the_pieces() -> None:
    with pytest.raises(PromptFormatError, match="role headers"):
        PromptFormat.derive(fake_render, S, lambda role: [3, 99])


def test_second_reply_prefills_only_the_new_positions() -> None:
    conv = make()
    conv.insert(user("u1", 3), None, ROOT)
    new = conv.begin_reply(10)
    assert new.start == 0 and new.length == len(SYSTEM) + 2 + 3 + 2 + 2
    conv.prefilled()
    start = conv.prompt_length
    # The reply 30 31 32 <eos>: every sampled token but the last was fed to the LLM.
    conv.add_reply(Message("a1", "assistant", [30, 31, 32, EOS]), "u1", ROOT, start, 3, [EOS])
    assert conv.messages[-1].content == [30, 31, 32]
    assert conv.kv_len == start + 3
    conv.insert(user("u2", 2), None, ROOT)
    new = conv.begin_reply(10)
    assert new.start == start + 3
    assert flat(conv, new.start) == [*FOOTER, *HEADERS["user"], ("speech", "u2", 0), ("speech", "u2", 1),
                                     *FOOTER, *HEADERS["assistant"]]
    whole = [x if not isinstance(x, tuple) else S for x in flat(conv) if not (isinstance(x, tuple) and x[2])]
    assert whole == PromptFormat.derive(fake_render, S, header).render_ids(2, S, [[30, 31, 32]])


def test_a_reply_stopped_by_max_tokens_feeds_its_last_token_next_time() -> None:
    conv = make()
    conv.insert(user("u1"), None, ROOT)
    reply(conv, "a1", [40, 41, 42, 43], fed=3)  # 43 was sampled, never fed
    kv = conv.kv_len
    conv.insert(user("u2", 1), None, ROOT)
    new = conv.begin_reply(4)
    assert new.start == kv and flat(conv, new.start)[: 1 + len(FOOTER)] == [43, *FOOTER]


def test_cut_keeps_what_was_heard_and_lowers_kv() -> None:
    conv = make()
    conv.insert(user("u1"), None, ROOT)
    reply(conv, "a1", [50, 51, 52, 53, 54], fed=4)
    start = conv.position(1) + len(HEADERS["assistant"])
    assert conv.cut("a1", 2)
    assert conv.messages[-1].content == [50, 51] and conv.kv_len == start + 2
    assert not conv.cut("nope", 1) and not conv.cut("u1", 1)  # unknown, or speech: nothing to cut


def test_text_and_system_items_render_in_place_and_edits_lower_kv() -> None:
    conv = make()
    conv.insert(Message("t1", "user", [60, 61]), None, ROOT)
    reply(conv, "a1", [62, EOS], fed=1)
    kv = conv.kv_len
    conv.insert(Message("sys", "system", [63]), ROOT, ROOT)  # first, before t1
    assert [m.id for m in conv.messages] == ["sys", "t1", "a1"] and conv.kv_len == len(SYSTEM)
    assert kv > len(SYSTEM)
    conv.kv_len = conv.length  # pretend it was all prefilled again
    conv.insert(Message("mid", "assistant", [64]), "t1", ROOT)  # between t1 and a1
    assert [m.id for m in conv.messages] == ["sys", "t1", "mid", "a1"] and conv.kv_len == conv.position(2)
    assert flat(conv, generation=False) == [*SYSTEM, *HEADERS["system"], 63, *FOOTER, *HEADERS["user"], 60, 61,
                                            *FOOTER, *HEADERS["assistant"], 64, *FOOTER, *HEADERS["assistant"],
                                            62, *FOOTER]
    conv.kv_len = conv.length
    assert conv.delete("sys") and conv.kv_len == len(SYSTEM)
    assert not conv.delete("sys")
    conv.insert(Message("x", "user", [65]), "unknown-id", ROOT)  # unknown: at the end
    assert conv.messages[-1].id == "x"


def test_an_out_of_band_reply_leaves_history_and_kv_as_they_were() -> None:
    conv = make()
    conv.insert(user("u1"), None, ROOT)
    reply(conv, "a1", [70, 71, EOS], fed=2)
    before = ([m.id for m in conv.messages], conv.length)
    conv.begin_reply(8)
    conv.prefilled()  # the generation prompt is in the KV...
    conv.end_reply()  # ...but joins nothing
    assert ([m.id for m in conv.messages], conv.length) == before and conv.kv_len <= conv.length
    conv.insert(user("u2", 1), None, ROOT)
    assert flat(conv, conv.kv_len)[: len(HEADERS["user"])] == HEADERS["user"]


def test_a_reply_whose_history_changed_while_it_ran_joins_after_its_message_without_kv() -> None:
    conv = make()
    conv.insert(user("u1"), None, ROOT)
    conv.begin_reply(8)
    conv.prefilled()
    start = conv.prompt_length
    conv.insert(Message("late", "user", [80]), None, ROOT)  # typed while the reply ran
    conv.add_reply(Message("a1", "assistant", [81, 82]), "u1", ROOT, start, 2, [EOS])
    assert [m.id for m in conv.messages] == ["u1", "a1", "late"]
    assert conv.kv_len <= conv.position(1)  # a1's KV sits where "late"'s header is now expected


def test_a_new_system_block_lowers_kv_to_the_common_prefix() -> None:
    conv = make()
    conv.insert(user("u1"), None, ROOT)
    reply(conv, "a1", [90, EOS], fed=1)
    conv.use_format(conv.fmt.with_system([1, 8, 8]))
    assert conv.kv_len == 1 and flat(conv, generation=False)[:3] == [1, 8, 8]


@pytest.mark.parametrize(
    ("played_ms", "finished", "expected"),
    [
        (0.0, False, 0),  # nothing heard
        (39.0, False, 0),  # less than one unit
        (200.0, False, 1),  # 5 of block 0's 10 units: floor(3 * 5 / 10)
        (400.0, False, 3),  # block 0 whole
        (599.0, False, 4),  # block 1: 4 of 10 units -> 3 + floor(3 * 4 / 10)
        (800.0, False, 6),  # blocks 0 and 1
        (10_000.0, False, 8),  # everything written so far (the last read covers 6..8)
        (10_000.0, True, 9),  # finished and all heard: every token, including one never read
    ],
)
def test_heard_tokens_maps_played_audio_to_text(played_ms: float, finished: bool, expected: int) -> None:
    reads, blocks = [(0, 3), (3, 6), (6, 8)], [10, 10, 7]
    assert heard_tokens(played_ms, reads, blocks, 9, finished) == expected


def test_heard_tokens_steps_over_a_silent_block_only_when_later_audio_was_heard() -> None:
    assert heard_tokens(400.0, [(0, 3), (3, 6), (6, 7)], [10, 0, 5], 7, False) == 3
    assert heard_tokens(440.0, [(0, 3), (3, 6), (6, 7)], [10, 0, 5], 7, False) == 6


def test_context_policy_drops_the_oldest_messages_and_keeps_the_system_block() -> None:
    budget, speech, max_new = 200, 30, 20
    conv = make(budget=budget, low_water=0.5)
    for i in range(5):
        conv.insert(Message(f"t{i}", "user", Speech(f"t{i}", speech)), None, ROOT)
        conv.begin_reply(max_new)
        assert conv.prompt_length + max_new <= budget  # room for the whole reply
        assert conv.messages[-1].id == f"t{i}"  # the newest message is never dropped
        assert flat(conv)[: len(SYSTEM)] == SYSTEM  # nor is the system block
        conv.prefilled()
        conv.add_reply(Message(f"a{i}", "assistant", [70 + i] * 10 + [EOS]), f"t{i}", ROOT,
                       conv.prompt_length, 10, [EOS])
    assert conv.dropped > 0
    users = [m.id for m in conv.messages if m.role == "user"]
    assert users == [f"t{i}" for i in range(5 - len(users), 5)]  # the newest ones, in order


def test_context_policy_trims_to_the_low_water_mark_then_reuses_kv_again() -> None:
    conv = make(budget=200, low_water=0.5)
    trims = []
    for i in range(6):
        conv.insert(Message(f"t{i}", "user", Speech(f"t{i}", 30)), None, ROOT)
        new = conv.begin_reply(20)
        trims.append(new.trimmed)
        if new.trimmed:
            assert new.start == len(SYSTEM)  # the kept history is re-prefilled once, after the system block
            assert conv.prompt_length + 20 <= 100 or len(conv.messages) == 1
        else:
            assert new.start > len(SYSTEM) or i == 0
        conv.prefilled()
        conv.add_reply(Message(f"a{i}", "assistant", [80 + i] * 10), f"t{i}", ROOT, conv.prompt_length, 9, [EOS])
    assert any(trims) and trims.count(0) >= 3  # not every reply re-prefills


def test_a_reply_that_cannot_fit_is_refused_and_leaves_history_alone() -> None:
    conv = make(budget=60)
    conv.insert(user("u1", 10), None, ROOT)
    reply(conv, "a1", [1, 2], fed=1)
    conv.insert(user("u2", 50), None, ROOT)
    before = (conv.length, conv.kv_len, len(conv.messages))
    with pytest.raises(ContextOverflow, match="expected at most 60"):
        conv.begin_reply(5)
    assert (conv.length, conv.kv_len, len(conv.messages)) == before


def test_conversation_renders_like_the_model_chat_template(tmp_path_factory: pytest.TempPathFactory) -> None:
    from voice_agent.model import tiny
    from voice_agent.model.tokenizer import SPEECH_TOKEN, SPEECH_TOKEN_INDEX, OmniTokenizers, Turn

    root = tmp_path_factory.mktemp("tiny-tok")
    paths = tiny.make_tiny(root)
    tok = OmniTokenizers.load(paths.model_dir)

    def render(n: int) -> list[int]:
        return tok.build_prompt([Turn.user()] + [t for _ in range(n - 1) for t in (Turn.assistant(""), Turn.user())])

    conv = Conversation(PromptFormat.derive(render, SPEECH_TOKEN_INDEX, tok.role_header), ContextPolicy(4096))
    messages = [("user", None), ("assistant", "Hello! How can I help you today?"), ("system", "Be brief."),
                ("user", "What is the weather like?"), ("assistant", "The weather is nice."), ("user", None)]
    for i, (role, text) in enumerate(messages):
        content = Speech(i, 3) if text is None else tok.text_ids(text)
        conv.insert(Message(f"m{i}", role, content), None, "root")
    got = [SPEECH_TOKEN_INDEX if isinstance(x, tuple) else x for x in flat(conv) if not (isinstance(x, tuple) and x[2])]
    chat = [{"role": role, "content": SPEECH_TOKEN if text is None else text} for role, text in messages]
    text = tok.llm.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    expected = [SPEECH_TOKEN_INDEX if t == tok.speech_token_id else t
                for t in tok.llm.encode(text, add_special_tokens=False)]
    assert got == expected
