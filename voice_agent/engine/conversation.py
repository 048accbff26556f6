"""One session's conversation as the LLM sees it, and what of it sits in the session's KV cache slot.

Pure Python (no torch): speech features are opaque objects with a length, so the bookkeeping is tested
without a model.

Sequence. A conversation is an ordered list of `Message`s (user speech or text, assistant replies, system
text), each with the id its client chose. It is rendered exactly as the model's chat template renders it:

    system  header(role_1) content_1 footer  header(role_2) content_2 footer ...  [header(assistant)]

`system` is the system block (the template's default one when no prompt is given), `header(role)` is
`<|im_start|>role\\n`, `footer` is `<|im_end|>\\n`, and a reply being generated follows the generation prompt
`header(assistant)`. `PromptFormat.derive` cuts these pieces out of the template's own renderings of speech
turns and refuses a template that is not prefix-stable or whose pieces do not join up. A speech message takes
as many positions as the adapter gives (300 for a padded 30-s turn); its length is known before it is
encoded (`Speech.features` is None until then). Text content is tokenized on its own, special tokens
written in it read as plain text, so a message cannot forge a role marker.

Deviation from the reference: the reference re-sends the whole history each turn with the assistant's
replies as *text*, re-tokenized. Here a reply keeps the ids the model generated (its eos dropped, as the
reference strips `<|im_end|>` before the template adds it back), so the KV of earlier turns is reused as is
and a new reply prefills only its new positions. The two agree whenever the generated split is the
tokenizer's canonical one; KV reuse is exactly equal to re-running this same sequence from scratch.

KV bookkeeping. `kv_len` is how many leading positions of the current rendering are in the KV slot. Every
edit (insert, delete, a cut, a new system block) lowers it to the edit's position, so the next reply
prefills from there. The token the LLM sampled last is never fed, so after a reply `kv_len` stops one short
of it. A reply that joins no history (out of band, failed, or cancelled before any token) leaves `kv_len` at
most the history's length, since its generation prompt is not part of the history.

Interruption. When the listener heard only `played_ms` of a reply, `heard_tokens` maps that to the text
tokens the TTS had read before the heard units (a block's units speak its read; a partly heard block keeps
the floor of the same fraction of its read), and `cut` keeps those tokens of the message.

Context policy (`ContextPolicy`, documented in one place): a session's KV slot holds `budget_tokens`
positions. A reply must fit with room for all of it: `prompt length + max_new_tokens <= budget_tokens`.
When it does not, the oldest messages are dropped (never the system block, never the newest message)
until the conversation plus the reply room uses at most `low_water` of the budget (or only the newest
message is left), and the KV after the system block is invalidated: that reply re-prefills the kept
history once, and the following replies again prefill only their new positions. A reply that cannot fit
even with the newest message alone is refused (`ContextOverflow`) and the history is left as it was.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from voice_agent.audio import UNIT_MS
from voice_agent.errors import PromptFormatError, TurnRejected

ROLES = ("user", "assistant", "system")


class ContextOverflow(TurnRejected):
    """A reply that cannot fit in the session's context even with all earlier history dropped."""

    code = "context_overflow"


@dataclass(eq=False)
class Speech:
    """One user message's speech: `length` positions; `features` (the engine's (T, H) tensor, opaque here)
    once encoded, None before (then `audio` holds what to encode)."""

    features: Any
    length: int
    audio: Any = None

    def __post_init__(self) -> None:
        if self.length < 1:
            raise ValueError(f"Speech: expected at least one position, got {self.length}")

    @property
    def encoded(self) -> bool:
        return self.features is not None


Item = list[int] | Speech  # a run of token ids, or one speech block


@dataclass(eq=False)
class Message:
    """One conversation item. `content`: token ids (text) or a `Speech`. `heard`: for a reply the model
    generated, what maps its audio to its text (opaque here; the worker's `Heard`), for later cuts."""

    id: str
    role: str
    content: list[int] | Speech
    heard: Any = None
    transcribe: bool = False
    encoder_out: Any = None  # kept for a transcript that waits for its turn's confirmation (speculation)
    hold_encoder: bool = False  # keep `encoder_out` when encoded
    audio_seconds: float = 0.0  # the speech's length, once encoded

    @property
    def size(self) -> int:
        return self.content.length if isinstance(self.content, Speech) else len(self.content)


@dataclass(frozen=True)
class PromptFormat:
    """The chat template's token pieces: the system block, a header per role, and the footer."""

    system: tuple[int, ...]
    headers: dict[str, tuple[int, ...]]
    footer: tuple[int, ...]

    @classmethod
    def derive(cls, render: Callable[[int], list[int]], speech_index: int,
               header: Callable[[str], Sequence[int]]) -> PromptFormat:
        """Cut the pieces from `render(n)`: the prompt of n user speech turns with empty replies between
        them (placeholders written as `speech_index`), given each role's `header` ids. Checks that 1, 2 and 3
        turns concatenate and that the headers join the pieces."""
        one, two, three = render(1), render(2), render(3)
        if one.count(speech_index) != 1:
            raise PromptFormatError(f"a one-turn prompt expected one speech placeholder, got {one.count(speech_index)}")
        cut = one.index(speech_index)
        head, user_tail = one[:cut], one[cut + 1 :]
        n = len(one)
        if two[:n] != one or two[n:][-(len(user_tail) + 1):] != [speech_index, *user_tail]:
            raise PromptFormatError("the chat template is not prefix-stable: 2 turns do not extend 1 turn")
        reply_tail = two[n : len(two) - len(user_tail) - 1]
        headers = {role: tuple(header(role)) for role in ROLES}
        user, assistant = list(headers["user"]), list(headers["assistant"])
        if head[-len(user):] != user or user_tail[-len(assistant):] != assistant:
            raise PromptFormatError("the chat template's turns do not start with the role headers "
                                    f"{user} / {assistant}")
        fmt = cls(tuple(head[: -len(user)]), headers, tuple(user_tail[: -len(assistant)]))
        if reply_tail != [*fmt.footer, *user]:
            raise PromptFormatError("the chat template does not end a reply with the footer of a user turn")
        if fmt.render_ids(3, speech_index) != three:
            raise PromptFormatError("the chat template is not prefix-stable: 3 turns do not extend 2 turns")
        return fmt

    def with_system(self, system: Sequence[int]) -> PromptFormat:
        return PromptFormat(tuple(system), self.headers, self.footer)

    def render_ids(self, turns: int, speech_index: int, replies: Sequence[Sequence[int]] = ()) -> list[int]:
        """The prompt of `turns` user speech turns with the given replies (default empty) between them."""
        ids = list(self.system)
        for i in range(turns):
            if i:
                ids += [*self.headers["assistant"], *(replies[i - 1] if i - 1 < len(replies) else ()),
                        *self.footer]
            ids += [*self.headers["user"], speech_index, *self.footer]
        return ids + list(self.headers["assistant"])


@dataclass(frozen=True)
class ContextPolicy:
    """How many KV positions a session may use, and how far to trim when a reply would not fit."""

    budget_tokens: int
    low_water: float = 0.5

    def __post_init__(self) -> None:
        if self.budget_tokens < 2:
            raise ValueError(f"ContextPolicy.budget_tokens: expected >= 2, got {self.budget_tokens}")
        if not 0.0 < self.low_water <= 1.0:
            raise ValueError(f"ContextPolicy.low_water: expected in (0, 1], got {self.low_water}")


@dataclass(frozen=True)
class NewInput:
    """What a reply must prefill: `items` from position `start` (= kv_len before the prefill)."""

    start: int
    items: list[Item]
    trimmed: int  # messages dropped to make room for this reply

    @property
    def length(self) -> int:
        return sum(_size(item) for item in self.items)


def _size(item: Item) -> int:
    return item.length if isinstance(item, Speech) else len(item)


@dataclass
class Conversation:
    """History and KV bookkeeping of one session (see the module docstring)."""

    fmt: PromptFormat
    policy: ContextPolicy
    messages: list[Message] = field(default_factory=list)
    kv_len: int = 0
    dropped: int = 0  # messages dropped by the context policy so far

    def __post_init__(self) -> None:
        if len(self.fmt.system) + len(self.fmt.headers["assistant"]) + 1 > self.policy.budget_tokens:
            raise ValueError(f"context budget {self.policy.budget_tokens} is smaller than the prompt template")

    # ---------------------------------------------------------------- the sequence
    def _rendered(self, m: Message) -> int:
        return len(self.fmt.headers[m.role]) + m.size + len(self.fmt.footer)

    def items(self, generation: bool = False) -> list[Item]:
        """The conversation as runs of ids and speech blocks, in order; with the generation prompt."""
        out: list[Item] = []
        run = list(self.fmt.system)
        for m in self.messages:
            run += self.fmt.headers[m.role]
            if isinstance(m.content, Speech):
                out += [run, m.content]
                run = []
            else:
                run += m.content
            run += self.fmt.footer
        if generation:
            run += self.fmt.headers["assistant"]
        return [item for item in [*out, run] if _size(item)]

    @property
    def length(self) -> int:
        """Positions of the history (without a generation prompt)."""
        return len(self.fmt.system) + sum(self._rendered(m) for m in self.messages)

    @property
    def prompt_length(self) -> int:
        """Positions a reply's prompt takes: the history and the generation prompt."""
        return self.length + len(self.fmt.headers["assistant"])

    def index(self, message_id: str) -> int | None:
        return next((i for i, m in enumerate(self.messages) if m.id == message_id), None)

    def position(self, index: int) -> int:
        """Where message `index` starts (its header); len(messages) gives the end of the history."""
        return len(self.fmt.system) + sum(self._rendered(m) for m in self.messages[:index])

    def suffix(self, start: int, generation: bool = False) -> list[Item]:
        """The items from position `start` on (a speech block is never split: `start` may not fall inside one)."""
        out: list[Item] = []
        pos = 0
        for item in self.items(generation):
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

    # ---------------------------------------------------------------- edits
    def _lower(self, position: int) -> None:
        self.kv_len = min(self.kv_len, position)

    def insert(self, message: Message, after: str | None, root: str) -> None:
        """Insert after message `after` (None: at the end; `root`: first; unknown: at the end)."""
        if after == root:
            i = 0
        else:
            found = None if after is None else self.index(after)
            i = len(self.messages) if found is None else found + 1
        self._lower(self.position(i))
        self.messages.insert(i, message)

    def delete(self, message_id: str) -> bool:
        i = self.index(message_id)
        if i is None:
            return False
        self._lower(self.position(i))
        del self.messages[i]
        return True

    def cut(self, message_id: str, keep_tokens: int) -> bool:
        """Keep only the first `keep_tokens` tokens of a text message (what the listener heard)."""
        i = self.index(message_id)
        if i is None or isinstance(self.messages[i].content, Speech):
            return False
        m = self.messages[i]
        assert isinstance(m.content, list)
        keep = max(0, min(keep_tokens, len(m.content)))
        if keep < len(m.content):
            self._lower(self.position(i) + len(self.fmt.headers[m.role]) + keep)
            m.content = m.content[:keep]
        return True

    def use_format(self, fmt: PromptFormat) -> None:
        """Render with `fmt` from now on (a new system block invalidates the KV after their common prefix)."""
        if fmt.system != self.fmt.system:
            common = 0
            for a, b in zip(fmt.system, self.fmt.system, strict=False):
                if a != b:
                    break
                common += 1
            self._lower(common)
        self.fmt = fmt

    # ---------------------------------------------------------------- replies
    def begin_reply(self, max_new_tokens: int) -> NewInput:
        """Make room for a reply (trimming the oldest history if needed); return what to prefill."""
        budget, fmt = self.policy.budget_tokens, self.fmt
        gen = len(fmt.headers["assistant"])
        newest = self._rendered(self.messages[-1]) if self.messages else 0
        alone = len(fmt.system) + newest + gen + max_new_tokens
        if alone > budget:
            raise ContextOverflow(
                f"a reply to a message of {newest} positions with room for {max_new_tokens} reply tokens needs "
                f"{alone} context positions, expected at most {budget}"
            )
        trimmed = 0
        if self.prompt_length + max_new_tokens > budget:
            target = max(alone, int(self.policy.low_water * budget))
            while len(self.messages) > 1 and self.prompt_length + max_new_tokens > target:
                self.messages.pop(0)
                trimmed += 1
            self.dropped += trimmed
            self._lower(len(fmt.system))
        return NewInput(self.kv_len, self.suffix(self.kv_len, generation=True), trimmed)

    def prefilled(self) -> None:
        """The new input of `begin_reply` is now in the KV slot."""
        self.kv_len = self.prompt_length

    def add_reply(self, message: Message, after: str | None, root: str, reply_start: int,
                  kv_reply_tokens: int, eos_ids: Sequence[int] = ()) -> None:
        """Record a finished reply as `message` (token ids, a trailing eos dropped) after message `after`,
        of which the first `kv_reply_tokens` were fed to the LLM at `reply_start` (their KV follows the
        prompt when nothing before it changed while the reply ran)."""
        assert isinstance(message.content, list)
        if message.content and message.content[-1] in eos_ids:
            message.content = message.content[:-1]
        kv = self.kv_len
        at_end = after == (self.messages[-1].id if self.messages else root)
        in_kv = at_end and kv >= reply_start and self.length + len(self.fmt.headers["assistant"]) == reply_start
        self.end_reply()
        self.insert(message, after, root)
        if in_kv:
            self.kv_len = reply_start + min(max(kv_reply_tokens, 0), len(message.content))

    def end_reply(self) -> None:
        """A reply ended without joining the history: its generation prompt leaves the KV's valid part."""
        self._lower(self.length)


def flatten_items(items: Sequence[list[int] | Speech], speech_token: int) -> tuple[list[int], list[Any]]:
    """Prompt items -> token ids, with `speech_token` where each speech segment goes, and the segments'
    features in order (what the model's prompt embedding takes)."""
    ids: list[int] = []
    speech: list[Any] = []
    for item in items:
        if isinstance(item, Speech):
            if not item.encoded:
                raise ValueError("flatten_items: a speech block is not encoded yet")
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
