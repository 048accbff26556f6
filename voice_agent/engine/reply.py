"""One assistant reply in progress, and the batched steps that advance many replies at once.

A `Reply` holds one session's decoding state for one turn: its LLM and TTS cache slots and lengths, the
sampled text tokens with the LLM states that predicted them, the read/write schedule, and the sampling
settings with the session's own seeded generators. Three batched steps advance replies:

- `prefill(lm, replies, embeds, llm_cache)`: the new prompt tokens of each reply (rows of different
  lengths and start positions in one call), then the first text token;
- `decode_text(lm, replies, llm_cache)`: one LLM step for every reply that has a text token to feed;
- `decode_tts(lm, replies, tts_cache)`: one TTS step for every reply whose schedule has a block in
  progress; a row feeds either a whole read (the previous TTS token, the fused text tokens, `<sep>` on
  the final read) or the previous TTS token alone.

Each step appends what happened to the reply's `outbox` (text token ids, units, block ends, done), which
the caller drains. Text may run ahead of speech: the schedule queues reads that fall due while a block
is written, so the TTS sequence (and every number) is the same as the reference's strict alternation.
`reads` records every read whose block has started, in order, with the units it wrote in
`schedule.unit_blocks` at the same index; `text_lead` counts text tokens no started block has read yet.

Options that change the numbers (benchmarks only): `ForcedLength` makes a reply exactly N text tokens
long (the LLM's eos ids are masked until the N-th token, as transformers' `min_new_tokens`) and makes every
TTS block write its full quota (the TTS eos is masked: W units per block, `final_units` after the final
read). `final_units` alone caps what the TTS writes after the final read (the reference's 1024).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch

from voice_agent.engine.schedule import FINAL_UNIT_LIMIT, Read, ReadWriteSchedule
from voice_agent.model.qwen2 import KVCache
from voice_agent.model.sampling import GREEDY, TTS_SAMPLING, SamplingParams, sample
from voice_agent.model.speech_lm import SpeechLM


@dataclass(frozen=True)
class ForcedLength:
    """Benchmark reply lengths: exactly `text_tokens` text tokens and `final_units` units after the final
    read, every other block writing its W units (eos masked for both LMs). Changes the numbers."""

    text_tokens: int
    final_units: int

    def __post_init__(self) -> None:
        for name in ("text_tokens", "final_units"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ForcedLength.{name}: expected a positive int, got {value!r}")


@dataclass(frozen=True)
class TextToken:
    token: int
    kind: Literal["text"] = "text"


@dataclass(frozen=True)
class UnitToken:
    unit: int
    kind: Literal["unit"] = "unit"


@dataclass(frozen=True)
class BlockEnd:
    """A TTS block ended; `units` are the units it wrote; `final` when it was the last block."""

    units: tuple[int, ...]
    final: bool
    kind: Literal["block"] = "block"


@dataclass(frozen=True)
class ReplyEnd:
    reason: Literal["eos", "max_tokens"]
    kind: Literal["done"] = "done"


ReplyOut = TextToken | UnitToken | BlockEnd | ReplyEnd


@dataclass
class Reply:
    """Decoding state of one reply. `llm_len` / `tts_len` are the filled lengths of the cache slots."""

    llm_slot: int
    tts_slot: int
    max_new_tokens: int
    text_params: SamplingParams
    tts_params: SamplingParams
    text_generator: torch.Generator | None = None
    tts_generator: torch.Generator | None = None
    llm_len: int = 0
    tts_len: int = 0
    keep_first_logits: bool = False
    min_new_tokens: int = 0  # the LLM's eos ids are masked until this many text tokens exist
    tts_eos_allowed: bool = True
    schedule: ReadWriteSchedule = field(default_factory=ReadWriteSchedule)
    reads: list[Read] = field(default_factory=list)  # reads whose blocks have started, in order
    text_ids: list[int] = field(default_factory=list)
    hiddens: list[torch.Tensor] = field(default_factory=list)  # (H,) state that predicted text_ids[i]
    next_token: int | None = None  # sampled, not yet fed to the LLM
    tts_unfed: int | None = None  # last sampled TTS id (unit or eos), not yet fed to the TTS LM
    finish_reason: Literal["eos", "max_tokens"] | None = None
    first_logits: torch.Tensor | None = None
    outbox: list[ReplyOut] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        lm: SpeechLM,
        *,
        llm_slot: int,
        tts_slot: int,
        llm_len: int = 0,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        seed: int = 0,
        keep_first_logits: bool = False,
        final_units: int = FINAL_UNIT_LIMIT,
        forced: ForcedLength | None = None,
    ) -> Reply:
        """A reply with the model's decoding defaults; `temperature` 0 makes text AND units greedy.

        `final_units` caps the units written after the final read; `forced` overrides it and
        `max_new_tokens` (see ForcedLength)."""
        defaults = lm.generation.sampling
        if temperature is None:
            text_params = defaults
        elif temperature <= 0:  # greedy; the model's repetition penalty still applies, as in generate
            text_params = SamplingParams(do_sample=False, repetition_penalty=defaults.repetition_penalty)
        else:
            text_params = SamplingParams(
                do_sample=True, temperature=temperature, top_k=defaults.top_k, top_p=defaults.top_p,
                repetition_penalty=defaults.repetition_penalty,
            )
        tts_params = GREEDY if text_params.greedy else TTS_SAMPLING
        generators = [torch.Generator(device=lm.device).manual_seed(seed + i) for i in (0, 1)]
        cfg = lm.config
        if forced is not None:
            max_new_tokens, final_units = forced.text_tokens, forced.final_units
        return cls(
            llm_slot=llm_slot,
            tts_slot=tts_slot,
            llm_len=llm_len,
            max_new_tokens=max_new_tokens or lm.generation.max_new_tokens or 256,
            text_params=text_params,
            tts_params=tts_params,
            text_generator=generators[0],
            tts_generator=generators[1],
            keep_first_logits=keep_first_logits,
            min_new_tokens=0 if forced is None else forced.text_tokens,
            tts_eos_allowed=forced is None,
            schedule=ReadWriteSchedule(cfg.read_tokens, cfg.write_units, final_units),
        )

    @property
    def wants_text(self) -> bool:
        return self.next_token is not None and self.finish_reason is None

    @property
    def wants_tts(self) -> bool:
        return self.schedule.block is not None

    @property
    def done(self) -> bool:
        return self.schedule.done

    @property
    def units(self) -> list[int]:
        return self.schedule.units

    @property
    def text_lead(self) -> int:
        """Text tokens that no started TTS block has read yet (how far text runs ahead of speech)."""
        return len(self.text_ids) - (self.reads[-1].stop if self.reads else 0)

    def drain(self) -> list[ReplyOut]:
        out, self.outbox = self.outbox, []
        return out


def _eos_ban(lm: SpeechLM, banned: Sequence[bool], eos_ids: Sequence[int], base: torch.Tensor | None,
             V: int) -> torch.Tensor | None:
    """(B, V) allowed-token mask with `eos_ids` off in the banned rows (None when no row is banned)."""
    if not any(banned):
        return base
    allowed = (base if base is not None else torch.ones(V, dtype=torch.bool, device=lm.device))
    allowed = allowed.expand(len(banned), V).clone()  # (B, V)
    rows = torch.tensor(banned, device=lm.device)
    for eos in eos_ids:
        allowed[:, eos] &= ~rows
    return allowed


def _take_text(lm: SpeechLM, replies: Sequence[Reply], hidden: torch.Tensor, logits: torch.Tensor) -> None:
    """Sample each reply's next text token from (B, V) logits; pair it with the (B, H) state."""
    history = [r.text_ids for r in replies]
    eos_ids = lm.generation.eos_token_ids
    banned = [len(r.text_ids) + 1 < r.min_new_tokens for r in replies]
    allowed = _eos_ban(lm, banned, eos_ids, None, logits.shape[-1])
    tokens = sample(
        logits.float(), [r.text_params for r in replies], [r.text_generator for r in replies], history, allowed
    ).tolist()
    for b, (reply, token) in enumerate(zip(replies, tokens, strict=True)):
        if reply.keep_first_logits and reply.first_logits is None:
            reply.first_logits = logits[b].float().cpu()
        reply.text_ids.append(token)
        reply.hiddens.append(hidden[b])
        reply.outbox.append(TextToken(token))
        if token in eos_ids:
            reply.finish_reason = "eos"
        elif len(reply.text_ids) >= reply.max_new_tokens:
            reply.finish_reason = "max_tokens"
        reply.next_token = None if reply.finish_reason else token
        # A reply cut by its length limit stops speaking soon after (not with forced benchmark lengths).
        cut = reply.finish_reason == "max_tokens" and reply.tts_eos_allowed
        read = reply.schedule.text_token(finished=reply.finish_reason is not None, cut=cut)
        if read is not None:
            reply.reads.append(read)


def _rows(items: Sequence[torch.Tensor], starts: Sequence[int], device: torch.device):
    """Right-pad (L_i, D) rows into (B, T, D) with positions from each row's start and a valid mask."""
    B, T = len(items), max(x.shape[0] for x in items)
    D = items[0].shape[-1]
    x = items[0].new_zeros(B, T, D)
    valid = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b, item in enumerate(items):
        x[b, : item.shape[0]] = item
        valid[b, : item.shape[0]] = True
    positions = torch.tensor(starts, device=device)[:, None] + torch.arange(T, device=device)[None]  # (B, T)
    kv_len = max(s + x_.shape[0] for s, x_ in zip(starts, items, strict=True))
    return x, positions, valid, kv_len


@torch.inference_mode()
def prefill(lm: SpeechLM, replies: Sequence[Reply], embeds: Sequence[torch.Tensor], llm_cache: KVCache) -> None:
    """Feed each reply's new prompt embeddings (L_i, H) after its `llm_len`, then sample its first token."""
    x, positions, valid, kv_len = _rows(embeds, [r.llm_len for r in replies], lm.device)
    slots = torch.tensor([r.llm_slot for r in replies], device=lm.device)
    hidden, logits = lm.llm.step(x, positions, llm_cache, slots, valid, kv_len)  # (B, H), (B, V)
    for reply, e in zip(replies, embeds, strict=True):
        reply.llm_len += e.shape[0]
    _take_text(lm, replies, hidden, logits)


@torch.inference_mode()
def decode_text(lm: SpeechLM, replies: Sequence[Reply], llm_cache: KVCache) -> None:
    """One LLM step for every reply (each must want text): feed its last token, sample the next."""
    tokens = torch.tensor([r.next_token for r in replies], device=lm.device)
    x = lm.llm.embed(tokens)[:, None]  # (B, 1, H)
    positions = torch.tensor([[r.llm_len] for r in replies], device=lm.device)  # (B, 1)
    slots = torch.tensor([r.llm_slot for r in replies], device=lm.device)
    kv_len = max(r.llm_len for r in replies) + 1
    hidden, logits = lm.llm.step(x, positions, llm_cache, slots, None, kv_len)
    for reply in replies:
        reply.llm_len += 1
    _take_text(lm, replies, hidden, logits)


def _tts_inputs(lm: SpeechLM, reply: Reply) -> torch.Tensor:
    """What a reply feeds the TTS LM this step: (L, D)."""
    pieces = []
    if reply.tts_unfed is not None:
        pieces.append(lm.tts.embed(torch.tensor([reply.tts_unfed], device=lm.device)))
        reply.tts_unfed = None
    block = reply.schedule.block
    assert block is not None, "decode_tts: a reply without a block in progress"
    if reply.schedule.units_left == block.max_units:  # the block starts: feed the read
        hidden = torch.stack(reply.hiddens[block.start : block.stop])  # (k, H)
        ids = torch.tensor(reply.text_ids[block.start : block.stop], device=lm.device)
        pieces.append(lm.tts.fuse(hidden, ids))
        if block.append_sep:
            pieces.append(lm.tts.embed(torch.tensor([lm.tok.sep_id], device=lm.device)))
    return torch.cat(pieces, dim=0)


@torch.inference_mode()
def decode_tts(lm: SpeechLM, replies: Sequence[Reply], tts_cache: KVCache, *, constrained: bool = True) -> None:
    """One TTS step for every reply with a block in progress; sample one TTS token each."""
    inputs = [_tts_inputs(lm, r) for r in replies]
    x, positions, valid, kv_len = _rows(inputs, [r.tts_len for r in replies], lm.device)
    slots = torch.tensor([r.tts_slot for r in replies], device=lm.device)
    logits = lm.tts(x, positions, tts_cache, slots, valid, kv_len)  # (B, V_tts)
    for reply, item in zip(replies, inputs, strict=True):
        reply.tts_len += item.shape[0]
    banned = [not r.tts_eos_allowed for r in replies]
    allowed = _eos_ban(lm, banned, [lm.tok.tts_eos_id], lm.unit_allowed if constrained else None, logits.shape[-1])
    ids = sample(
        logits.float(), [r.tts_params for r in replies], [r.tts_generator for r in replies], None, allowed
    ).tolist()
    for reply, tts_id in zip(replies, ids, strict=True):
        reply.tts_unfed = tts_id
        eos = tts_id == lm.tok.tts_eos_id
        unit = None if eos else lm.tok.unit_of(tts_id)
        if unit is not None:
            reply.outbox.append(UnitToken(unit))
        block = reply.schedule.block
        if not reply.schedule.wrote(unit, eos=eos):
            assert block is not None
            reply.outbox.append(BlockEnd(tuple(reply.schedule.unit_blocks[-1]), block.final))
            if block.final:
                assert reply.finish_reason is not None
                reply.outbox.append(ReplyEnd(reply.finish_reason))
            else:
                read = reply.schedule.next_read()
                if read is not None:
                    reply.reads.append(read)
