"""One session's conversation as the LLM sees it, and what of it sits in the session's KV cache slot.

Pure Python (no torch): speech features are opaque objects with a length, so the bookkeeping is tested
without a model.

Sequence. A conversation is rendered exactly as the model's chat template renders it, token for token:

    head  [speech_1] user_tail  reply_1  reply_tail  [speech_2] user_tail  reply_2 ...  [speech_n] user_tail

`head` is the system block plus `<|im_start|>user\\n`, `user_tail` is `<|im_end|>\\n<|im_start|>assistant\\n`
and `reply_tail` is `<|im_end|>\\n<|im_start|>user\\n`; `PromptFormat.derive` cuts these three pieces out of
the template's own renderings and refuses a template that is not prefix-stable. A speech block takes as
many positions as the adapter gave (300 for a padded 30-s turn).

Deviation from the reference: the reference re-sends the whole history each turn with the assistant's
replies as *text*, re-tokenized. Here a reply keeps the ids the model generated (its eos dropped, as the
reference strips `<|im_end|>` before the template adds it back), so the KV of earlier turns is reused as is
and a new turn prefills only its new positions. The two agree whenever the generated split is the
tokenizer's canonical one; KV reuse is exactly equal to re-running this same sequence from scratch.

KV bookkeeping. `kv_len` is how many leading positions of `sequence()` are in the KV slot. The token the
LLM sampled last is never fed, so after a reply `kv_len` stops one short of it; the next turn feeds
`sequence()[kv_len:]`, i.e. what is left of the reply, `reply_tail`, the new speech and `user_tail`.

Interruption. When the listener heard only `played_ms` of a reply, `heard_tokens` maps that to the text
tokens the TTS had read before the heard units (a block's units speak its read; a partly heard block keeps
the floor of the same fraction of its read), `cut_reply` keeps those tokens and lowers `kv_len` to match.

Context policy (`ContextPolicy`, documented in one place): a session's KV slot holds `budget_tokens`
positions. A new turn must fit with room for its whole reply: `length + max_new_tokens <= budget_tokens`.
When it does not, the oldest exchanges (a user turn with its reply) are dropped, never the system block,
until the conversation plus the reply room uses at most `low_water` of the budget (or only the new turn is
left), and the KV after the head is invalidated: that turn re-prefills the kept history once, and the
following turns again prefill only their new positions. A single turn that cannot fit even alone is
refused (`ContextOverflow`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from voice_agent.audio import UNIT_MS
from voice_agent.errors import PromptFormatError, TurnRejected


class ContextOverflow(TurnRejected):
    """A turn that cannot fit in the session's context even with all earlier history dropped."""

    code = "context_overflow"


@dataclass(frozen=True)
class Speech:
    """One user turn's speech embeddings: `features` is opaque here (the engine's (T, H) tensor)."""

    features: Any
    length: int

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"Speech: expected at least one position, got {self.length}")


Item = list[int] | Speech  # a run of token ids, or one speech block


@dataclass(frozen=True)
class PromptFormat:
    """The chat template's token pieces around user speech and assistant replies."""

    head: tuple[int, ...]
    user_tail: tuple[int, ...]
    reply_tail: tuple[int, ...]

    @classmethod
    def derive(cls, render: Callable[[int], list[int]], speech_index: int) -> PromptFormat:
        """Cut the pieces from `render(n)`: the prompt of n user turns with empty replies between them,
        speech placeholders written as `speech_index`. Checks that 1, 2 and 3 turns concatenate."""
        one, two, three = render(1), render(2), render(3)
        if one.count(speech_index) != 1:
            raise PromptFormatError(f"a one-turn prompt expected one speech placeholder, got {one.count(speech_index)}")
        cut = one.index(speech_index)
        head, user_tail = tuple(one[:cut]), tuple(one[cut + 1 :])
        n = len(one)
        if two[:n] != one or two[n:][-(len(user_tail) + 1):] != [speech_index, *user_tail]:
            raise PromptFormatError("the chat template is not prefix-stable: 2 turns do not extend 1 turn")
        reply_tail = tuple(two[n : len(two) - len(user_tail) - 1])
        fmt = cls(head, user_tail, reply_tail)
        if fmt.render_ids(3, speech_index) != three:
            raise PromptFormatError("the chat template is not prefix-stable: 3 turns do not extend 2 turns")
        return fmt

    def render_ids(self, turns: int, speech_index: int, replies: Sequence[Sequence[int]] = ()) -> list[int]:
        """The prompt of `turns` user turns with the given replies (default empty) between them."""
        ids = list(self.head)
        for i in range(turns):
            if i:
                ids += [*(replies[i - 1] if i - 1 < len(replies) else ()), *self.reply_tail]
            ids += [speech_index, *self.user_tail]
        return ids


@dataclass(frozen=True)
class ContextPolicy:
    """How many KV positions a session may use, and how far to trim when a turn would not fit."""

    budget_tokens: int
    low_water: float = 0.5

    def __post_init__(self) -> None:
        if self.budget_tokens < 2:
            raise ValueError(f"ContextPolicy.budget_tokens: expected >= 2, got {self.budget_tokens}")
        if not 0.0 < self.low_water <= 1.0:
            raise ValueError(f"ContextPolicy.low_water: expected in (0, 1], got {self.low_water}")


@dataclass
class Exchange:
    """A user turn and the assistant's reply to it (kept ids, eos dropped)."""

    speech: Speech
    reply: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class NewInput:
    """What a turn must prefill: `items` from position `start` (= kv_len before the prefill)."""

    start: int
    items: list[Item]
    trimmed: int  # exchanges dropped to make room for this turn

    @property
    def length(self) -> int:
        return sum(_size(item) for item in self.items)


def _size(item: Item) -> int:
    return item.length if isinstance(item, Speech) else len(item)


class Conversation:
    """History and KV bookkeeping of one session (see the module docstring)."""

    def __init__(self, fmt: PromptFormat, policy: ContextPolicy):
        if len(fmt.head) + len(fmt.user_tail) + 1 > policy.budget_tokens:
            raise ValueError(f"context budget {policy.budget_tokens} is smaller than the prompt template")
        self.fmt, self.policy = fmt, policy
        self.exchanges: list[Exchange] = []
        self.kv_len = 0
        self.dropped = 0  # exchanges dropped by the context policy so far

    # ---------------------------------------------------------------- the sequence
    def items(self) -> list[Item]:
        """The whole conversation as runs of ids and speech blocks, in order."""
        out: list[Item] = [list(self.fmt.head)]
        for i, ex in enumerate(self.exchanges):
            if i:
                out[-1] = out[-1] + list(self.fmt.reply_tail)  # type: ignore[operator]
            out += [ex.speech, list(self.fmt.user_tail) + ex.reply]
        return out

    @property
    def length(self) -> int:
        return sum(_size(item) for item in self.items())

    @property
    def reply_start(self) -> int:
        """Position of the last reply's first token."""
        if not self.exchanges:
            raise RuntimeError("reply_start: the conversation has no turn yet")
        return self.length - len(self.exchanges[-1].reply)

    def suffix(self, start: int) -> list[Item]:
        """The items from position `start` on (a speech block is never split: `start` may not fall inside one)."""
        out: list[Item] = []
        pos = 0
        for item in self.items():
            n = _size(item)
            if pos + n > start:
                if isinstance(item, Speech):
                    if start > pos:
                        raise ValueError(f"suffix: position {start} falls inside a speech block at {pos}")
                    out.append(item)
                else:
                    out.append(item[max(0, start - pos) :])
            pos += n
        return [item for item in out if _size(item)]

    # ---------------------------------------------------------------- turns
    def begin_turn(self, speech: Speech, max_new_tokens: int) -> NewInput:
        """Append a user turn (trimming the oldest history if needed); return what to prefill."""
        budget, fmt = self.policy.budget_tokens, self.fmt
        alone = len(fmt.head) + speech.length + len(fmt.user_tail) + max_new_tokens
        if alone > budget:
            raise ContextOverflow(
                f"a turn of {speech.length} speech positions with room for {max_new_tokens} reply tokens needs "
                f"{alone} context positions, expected at most {budget}"
            )
        self.exchanges.append(Exchange(speech))
        trimmed = 0
        if self.length + max_new_tokens > budget:
            target = max(alone, int(self.policy.low_water * budget))
            while len(self.exchanges) > 1 and self.length + max_new_tokens > target:
                self.exchanges.pop(0)
                trimmed += 1
            self.dropped += trimmed
            self.kv_len = min(self.kv_len, len(fmt.head))
        return NewInput(self.kv_len, self.suffix(self.kv_len), trimmed)

    def prefilled(self) -> None:
        """The new input of `begin_turn` is now in the KV slot."""
        self.kv_len = self.length

    def finish_reply(self, ids: Sequence[int], kv_reply_tokens: int, eos_ids: Sequence[int] = ()) -> None:
        """Record the last turn's reply: its kept `ids` (a trailing eos is dropped) of which the first
        `kv_reply_tokens` were fed to the LLM (their KV follows the prompt)."""
        if not self.exchanges:
            raise RuntimeError("finish_reply: no turn is open")
        kept = list(ids)
        if kept and kept[-1] in eos_ids:
            kept.pop()
        start = self.reply_start
        self.exchanges[-1].reply = kept
        if self.kv_len >= start:  # the prompt is in the KV; so are the reply tokens that were fed
            self.kv_len = start + min(max(kv_reply_tokens, 0), len(kept))

    def cut_reply(self, keep_tokens: int) -> None:
        """Keep only the first `keep_tokens` tokens of the last reply (what the listener heard)."""
        if not self.exchanges:
            raise RuntimeError("cut_reply: no turn to cut")
        start = self.reply_start
        ex = self.exchanges[-1]
        ex.reply = ex.reply[: max(0, keep_tokens)]
        self.kv_len = min(self.kv_len, start + len(ex.reply))

    def abort_turn(self) -> None:
        """Forget the last user turn and its reply (a turn that failed or was cancelled before prefill)."""
        if not self.exchanges:
            return
        self.exchanges.pop()
        self.kv_len = min(self.kv_len, self.length)


def flatten_items(items: Sequence[list[int] | Speech], speech_token: int) -> tuple[list[int], list[Any]]:
    """Prompt items -> token ids, with `speech_token` where each speech segment goes, and the segments'
    features in order (what the model's prompt embedding takes)."""
    ids: list[int] = []
    speech: list[Any] = []
    for item in items:
        if isinstance(item, Speech):
            ids.append(speech_token)
            speech.append(item.features)
        else:
            ids += item
    return ids, speech


def heard_tokens(played_ms: float, reads: Sequence[tuple[int, int]], unit_blocks: Sequence[int],
                 text_tokens: int, finished: bool) -> int:
    """Text tokens the listener heard after `played_ms` of a reply's audio.

    `reads[i]` = (start, stop) text tokens read before block i, which wrote `unit_blocks[i]` units. A fully
    heard block counts its whole read; a partly heard one the floor of the heard fraction of it. When the
    whole reply was generated and every unit heard, all `text_tokens` count (including any the last
    read covered).
    """
    if len(reads) != len(unit_blocks):
        raise ValueError(f"heard_tokens: expected one unit count per read, got {len(reads)} reads and "
                         f"{len(unit_blocks)} blocks")
    units = math.floor(max(0.0, played_ms) / UNIT_MS + 1e-6)
    if finished and units >= sum(unit_blocks):
        return text_tokens
    kept = 0
    for (start, stop), n in zip(reads, unit_blocks, strict=True):
        if n == 0 and units == 0:  # a silent block at the point where listening stopped
            break
        if units >= n:
            kept, units = stop, units - n
            continue
        kept = start + (stop - start) * units // n
        break
    return kept
