"""Conversation: the template pieces, KV bookkeeping across turns, cuts after interruptions, context policy."""

from __future__ import annotations

import pytest

from voice_agent.engine.conversation import (
    ContextOverflow,
    ContextPolicy,
    Conversation,
    PromptFormat,
    Speech,
    heard_tokens,
)
from voice_agent.errors import PromptFormatError

S = -200  # the speech placeholder
HEAD, USER_TAIL, REPLY_TAIL = [1, 2, 3, 4], [5, 6, 7], [5, 8, 9]
EOS = 5


def fake_render(n: int) -> list[int]:
    """A Qwen-like template: head [S] user_tail ( reply_tail [S] user_tail )*."""
    ids = list(HEAD)
    for i in range(n):
        if i:
            ids += REPLY_TAIL
        ids += [S, *USER_TAIL]
    return ids


def make(budget: int = 1000, low_water: float = 0.5) -> Conversation:
    return Conversation(PromptFormat.derive(fake_render, S), ContextPolicy(budget, low_water))


def flat(conv: Conversation, start: int = 0) -> list[object]:
    """Positions as a flat list: token ids, and ('speech', features, index) per speech position."""
    out: list[object] = []
    for item in conv.suffix(start):
        if isinstance(item, Speech):
            out += [("speech", item.features, i) for i in range(item.length)]
        else:
            out += item
    return out


def test_prompt_format_cuts_the_template_pieces() -> None:
    fmt = PromptFormat.derive(fake_render, S)
    assert (list(fmt.head), list(fmt.user_tail), list(fmt.reply_tail)) == (HEAD, USER_TAIL, REPLY_TAIL)
    assert fmt.render_ids(3, S, [[20, 21], [22]]) == [
        *HEAD, S, *USER_TAIL, 20, 21, *REPLY_TAIL, S, *USER_TAIL, 22, *REPLY_TAIL, S, *USER_TAIL
    ]


def test_prompt_format_refuses_a_template_that_is_not_prefix_stable() -> None:
    def numbered(n: int) -> list[int]:  # the system line changes with the number of turns
        return [100 + n, *fake_render(n)[1:]]

    with pytest.raises(PromptFormatError, match="prefix-stable"):
        PromptFormat.derive(numbered, S)


def test_second_turn_prefills_only_the_new_positions() -> None:
    conv = make()
    new = conv.begin_turn(Speech("a", 3), max_new_tokens=10)
    assert new.start == 0 and new.length == len(HEAD) + 3 + len(USER_TAIL)
    conv.prefilled()
    start = conv.reply_start
    assert conv.kv_len == start == new.length
    # The reply 30 31 32 <eos>: every sampled token but the last was fed to the LLM.
    conv.finish_reply([30, 31, 32, EOS], kv_reply_tokens=3, eos_ids=[EOS])
    assert conv.exchanges[0].reply == [30, 31, 32]
    assert conv.kv_len == start + 3
    new = conv.begin_turn(Speech("b", 2), max_new_tokens=10)
    assert new.start == start + 3
    assert flat(conv, new.start) == [*REPLY_TAIL, ("speech", "b", 0), ("speech", "b", 1), *USER_TAIL]
    # The whole sequence is the template's rendering with the kept reply.
    whole = [x if not isinstance(x, tuple) else S for x in flat(conv) if not (isinstance(x, tuple) and x[2])]
    assert whole == PromptFormat.derive(fake_render, S).render_ids(2, S, [[30, 31, 32]])


def test_a_reply_stopped_by_max_tokens_feeds_its_last_token_next_turn() -> None:
    conv = make()
    conv.begin_turn(Speech("a", 2), 4)
    conv.prefilled()
    start = conv.reply_start
    conv.finish_reply([40, 41, 42, 43], kv_reply_tokens=3, eos_ids=[EOS])  # 43 was sampled, never fed
    new = conv.begin_turn(Speech("b", 1), 4)
    assert new.start == start + 3
    assert flat(conv, new.start)[:1 + len(REPLY_TAIL)] == [43, *REPLY_TAIL]


def test_cut_reply_keeps_what_was_heard_and_lowers_kv() -> None:
    conv = make()
    conv.begin_turn(Speech("a", 2), 8)
    conv.prefilled()
    start = conv.reply_start
    conv.finish_reply([50, 51, 52, 53, 54], kv_reply_tokens=4, eos_ids=[EOS])
    conv.cut_reply(2)
    assert conv.exchanges[-1].reply == [50, 51]
    assert conv.kv_len == start + 2
    new = conv.begin_turn(Speech("b", 1), 8)
    assert new.start == start + 2 and flat(conv, new.start)[: len(REPLY_TAIL)] == REPLY_TAIL


def test_abort_turn_forgets_the_user_turn() -> None:
    conv = make()
    conv.begin_turn(Speech("a", 2), 8)
    conv.prefilled()
    conv.finish_reply([60, 61], 1, [EOS])
    length = conv.length
    conv.begin_turn(Speech("b", 2), 8)
    conv.prefilled()
    conv.abort_turn()
    # The aborted turn's prefill had fed the reply's last token (61), so the whole reply is now in the KV.
    assert len(conv.exchanges) == 1 and conv.length == conv.kv_len == length


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


def test_context_policy_drops_the_oldest_exchanges_and_keeps_the_head() -> None:
    budget, speech, max_new = 200, 30, 20
    conv = make(budget=budget, low_water=0.5)
    for i in range(5):
        conv.begin_turn(Speech(f"t{i}", speech), max_new_tokens=max_new)
        assert conv.length + max_new <= budget  # room for the whole reply
        assert conv.exchanges[-1].speech.features == f"t{i}"  # the new turn is never dropped
        assert flat(conv)[: len(HEAD)] == HEAD  # nor is the system block
        conv.prefilled()
        conv.finish_reply([70 + i] * 10 + [EOS], kv_reply_tokens=10, eos_ids=[EOS])
    # An exchange takes 30 + 3 + 10 + 3 = 46 positions, so five cannot all stay in 200.
    assert conv.dropped > 0
    kept = [ex.speech.features for ex in conv.exchanges]
    assert kept == [f"t{i}" for i in range(5 - len(kept), 5)]  # the newest ones, in order


def test_context_policy_trims_to_the_low_water_mark_then_reuses_kv_again() -> None:
    conv = make(budget=200, low_water=0.5)
    trims = []
    for i in range(6):
        new = conv.begin_turn(Speech(f"t{i}", 30), max_new_tokens=20)
        trims.append(new.trimmed)
        if new.trimmed:
            assert new.start == len(HEAD)  # the kept history is re-prefilled once, after the head
            assert conv.length + 20 <= 100 or len(conv.exchanges) == 1
        else:
            assert new.start > len(HEAD) or i == 0
        conv.prefilled()
        conv.finish_reply([80 + i] * 10, kv_reply_tokens=9, eos_ids=[EOS])
    assert any(trims) and trims.count(0) >= 3  # not every turn re-prefills


def test_a_turn_that_cannot_fit_alone_is_refused_and_leaves_history_alone() -> None:
    conv = make(budget=60)
    conv.begin_turn(Speech("a", 10), 5)
    conv.prefilled()
    conv.finish_reply([1, 2], 1, [EOS])
    before = (conv.length, conv.kv_len, len(conv.exchanges))
    with pytest.raises(ContextOverflow, match="expected at most 60"):
        conv.begin_turn(Speech("b", 50), 5)
    assert (conv.length, conv.kv_len, len(conv.exchanges)) == before


def test_conversation_renders_like_the_model_chat_template(tmp_path_factory: pytest.TempPathFactory) -> None:
    from voice_agent.model import tiny
    from voice_agent.model.tokenizer import SPEECH_TOKEN_INDEX, OmniTokenizers, Turn

    root = tmp_path_factory.mktemp("tiny-tok")
    paths = tiny.make_tiny(root)
    tok = OmniTokenizers.load(paths.model_dir)

    def render(n: int) -> list[int]:
        return tok.build_prompt([Turn.user()] + [t for _ in range(n - 1) for t in (Turn.assistant(""), Turn.user())])

    conv = Conversation(PromptFormat.derive(render, SPEECH_TOKEN_INDEX), ContextPolicy(4096))
    texts = ["Hello! How can I help you today?", "The weather is nice."]
    for i, text in enumerate(texts):
        conv.begin_turn(Speech(i, 3), 16)
        conv.prefilled()
        ids = tok.llm.encode(text, add_special_tokens=False) + [tok.im_end_id]
        conv.finish_reply(ids, len(ids) - 1, tok.llm_eos_ids)
    conv.begin_turn(Speech(2, 3), 16)
    got = [SPEECH_TOKEN_INDEX if isinstance(x, tuple) else x for x in flat(conv) if not (isinstance(x, tuple) and x[2])]
    turns = [Turn.user(), Turn.assistant(texts[0]), Turn.user(), Turn.assistant(texts[1]), Turn.user()]
    assert got == tok.build_prompt(turns)
