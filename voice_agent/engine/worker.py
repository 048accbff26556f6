"""The model side of the engine: every session's model state and the step, run by the model thread only.

`ModelWorker` is synchronous and knows nothing of threads or asyncio: the engine (thread.py) calls
`open / submit / cancel / close` with commands from the sessions and `step()` in a loop; each turn's events
leave through the `emit` callable it was submitted with. Tests drive it directly, step by step.

A step is schedule -> run -> postprocess (policy in scheduler.py): admit (encode + prefill new turns),
one batched LLM decode, one batched TTS step, postprocess (text deltas, unit chunks), one batched vocoder
call, then finish the turns whose audio is complete. A stage that raises fails only the turns in it.

`on_step`, when set, is called after every step with its duration in seconds and the rows each stage
ran (`admit`, `text`, `tts`, `vocode`; 0 when the stage did not run): plain numbers for whoever
watches the engine (the server's metrics), on the model thread, so it must be quick.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

import numpy as np
import torch

from voice_agent.audio import INPUT_SAMPLE_RATE
from voice_agent.engine.api import (
    ROOT,
    AudioChunk,
    EngineEvent,
    HistoryItem,
    ResponseDone,
    TextDelta,
    TranscriptEvent,
    TranscriptFailed,
    TurnError,
    TurnSettings,
    TurnTimings,
    UnitBlock,
)
from voice_agent.engine.config import EngineConfig, Models
from voice_agent.engine.conversation import (
    ContextPolicy,
    Conversation,
    Message,
    PromptFormat,
    Speech,
    flatten_items,
    heard_tokens,
)
from voice_agent.engine.flow_cache import FlowCache
from voice_agent.engine.flow_stream import max_cached_frames
from voice_agent.engine.reply import (
    BlockEnd,
    ForcedLength,
    Reply,
    ReplyEnd,
    TextToken,
    UnitToken,
    decode_text,
    decode_tts,
    prefill,
)
from voice_agent.engine.scheduler import Scheduler, TurnPhase, TurnView
from voice_agent.engine.transcripts import Transcripts
from voice_agent.engine.turns import Heard, SessionRun, StepStats, TurnRun, heard_of, replies_of
from voice_agent.engine.vocoder import open_stream
from voice_agent.errors import error_code
from voice_agent.model.qwen2 import KVCache
from voice_agent.model.tokenizer import SPEECH_TOKEN_INDEX, Turn

log = logging.getLogger(__name__)

WARMUP_SESSION = "warm-up"
MAX_FORMATS = 64  # prompt formats (one per distinct system prompt) kept
# Transcript tokens decoded per step (one decoder forward each): a turn that arrives meanwhile waits for at most
# that step, so it is kept to one token; an idle engine steps again at once, so transcripts still finish quickly.
TRANSCRIPT_TOKENS_PER_STEP = 1


class ModelWorker:
    """Sessions' model state, live turns, the static KV caches, and the step."""

    def __init__(self, models: Models, config: EngineConfig,
                 on_done: Callable[[TurnTimings], None] | None = None):
        self.lm, self.decoder, self.config = models.lm, models.decoder, config
        self.voice_table: dict[str, torch.Tensor] = dict(models.voices)
        cfg = self.lm.config
        self.context_tokens = config.context_tokens or cfg.tokenizer_model_max_length
        N = config.max_reply_tokens
        reply_units = self.lm.reply_units(N, config.final_units)  # W units per read and the final block
        self.tts_positions = self.lm.tts_positions(N, config.final_units)  # every text token, <sep>, every unit
        dtype = self.lm.dtype
        self.bytes_per_session = (self.context_tokens * KVCache.token_bytes(cfg.llm, dtype)
                                  + self.tts_positions * KVCache.token_bytes(cfg.tts, dtype))
        if self.decoder is not None and config.flow_cache:
            flow = self.decoder.flow
            frames = max_cached_frames(flow.cfg, config.flow_context_units, reply_units)
            self.bytes_per_session += FlowCache.bytes_for(flow.cfg, frames, flow.dtype)
        sched = config.scheduler
        self.scheduler = Scheduler(sched)
        self.sessions: dict[str, SessionRun] = {}
        self.turns: dict[int, TurnRun] = {}  # live turns by id (= arrival order)
        self.stats = StepStats()
        self.on_done = on_done
        self.on_step: Callable[[float, Mapping[str, int]], None] | None = None
        self._formats: dict[str | None, PromptFormat] = {}
        self._voices: dict[str, torch.Tensor] = {}
        self._arrivals = 0
        self.to_encode: list[tuple[SessionRun, Message]] = []  # speech to encode for a transcript
        self.transcripts = Transcripts(models.transcriber, models.transcriber_unavailable)
        self.llm_cache: KVCache | None = None
        self.tts_cache: KVCache | None = None

    def allocate(self, slots: int) -> None:
        """Allocate the static caches: one LLM and one TTS row per session slot."""
        self.llm_cache = self.lm.new_llm_cache(slots, self.context_tokens)
        self.tts_cache = self.lm.new_tts_cache(slots, self.tts_positions)

    @property
    def busy(self) -> bool:
        """Work is left: a turn, speech to encode for a transcript, or a transcript to decode."""
        return bool(self.turns or self.to_encode or self.transcripts.busy)

    @property
    def _llm_cache(self) -> KVCache:
        assert self.llm_cache is not None, "ModelWorker.allocate must run before the first step"
        return self.llm_cache

    @property
    def _tts_cache(self) -> KVCache:
        assert self.tts_cache is not None, "ModelWorker.allocate must run before the first step"
        return self.tts_cache

    def warm_up(self) -> TurnError | None:
        """Run one short synthetic turn through every stage (lazy initialisation, kernel selection) before
        serving; returns its error, if any (e.g. a default voice that cannot be loaded)."""
        cfg = self.lm.config
        forced = ForcedLength(cfg.read_tokens, min(cfg.write_units, self.config.final_units))
        events: list[EngineEvent] = []
        on_done, self.on_done = self.on_done, None
        on_step, self.on_step = self.on_step, None
        try:
            self.open(WARMUP_SESSION, 0, None)
            audio = np.zeros(INPUT_SAMPLE_RATE // 2, dtype=np.float32)  # 0.5 s of silence
            self.submit(WARMUP_SESSION, TurnSettings(seed=0), audio, TurnTimings(time.monotonic()), forced,
                        events.append)
            while self.busy:
                self.step()
        finally:
            self.sessions.pop(WARMUP_SESSION, None)
            self.on_done, self.on_step = on_done, on_step
            self.stats = StepStats()
        return next((e for e in events if isinstance(e, TurnError)), None)

    # ---------------------------------------------------------------- commands
    def open(self, session_id: str, slot: int, system_prompt: str | None,
             on_transcript: Callable[[TranscriptEvent], None] | None = None) -> None:
        session = SessionRun(session_id, slot, None, on_transcript=on_transcript)
        try:
            policy = ContextPolicy(self.context_tokens, self.config.context_low_water)
            session.fmt = self._format(system_prompt)
            session.conversation = Conversation(session.fmt, policy)
        except Exception as e:  # noqa: BLE001 - reported on every turn of this session
            session.broken = f"the session's prompt cannot be built: {e}"
        self.sessions[session_id] = session

    def add_item(self, session_id: str, item: HistoryItem, after: str | None) -> None:
        """Insert a message (see EngineSession.add_item); user speech is encoded at the next step that
        needs it, or at once when it is to be transcribed."""
        session = self.sessions.get(session_id)
        if session is None or session.conversation is None:
            return
        content: list[int] | Speech
        if item.audio is not None:
            content = Speech(None, self.lm.speech_positions(len(item.audio)), item.audio)
        else:
            content = self.lm.tok.text_ids(item.text or "")
        message = Message(item.id, item.role, content, transcribe=item.transcribe and item.audio is not None)
        session.conversation.insert(message, after, ROOT)
        if message.transcribe:
            self.to_encode.append((session, message))

    def delete_item(self, session_id: str, item_id: str) -> None:
        session = self.sessions.get(session_id)
        if session is not None and session.conversation is not None:
            session.conversation.delete(item_id)

    def truncate_item(self, session_id: str, item_id: str, audio_ms: float) -> None:
        """Cut a reply the model generated to what `audio_ms` of its audio said (a running reply: cancel it)."""
        session = self.sessions.get(session_id)
        if session is None or session.conversation is None:
            return
        turn = session.turn
        if turn is not None and turn.item_id == item_id:
            self.cancel(session_id, audio_ms)
            return
        conv = session.conversation
        i = conv.index(item_id)
        heard = conv.messages[i].heard if i is not None else None
        if heard is not None:
            conv.cut(item_id, heard_tokens(audio_ms, heard.reads, heard.blocks, heard.text_tokens, True))

    def set_instructions(self, session_id: str, text: str | None) -> None:
        session = self.sessions.get(session_id)
        if session is None or session.conversation is None:
            return
        try:
            session.fmt = self._format(text)
        except Exception as e:  # noqa: BLE001 - reported on every turn of this session
            session.broken = f"the session's prompt cannot be built: {e}"
            return
        if session.turn is None:
            session.conversation.use_format(session.fmt)

    def submit(self, session_id: str, settings: TurnSettings, audio: np.ndarray, timings: TurnTimings,
               forced: ForcedLength | None, emit: Callable[[EngineEvent], None], *, item_id: str | None = None,
               reply_id: str | None = None, transcribe: bool = False, speculative: bool = False) -> None:
        """A user speech turn: the speech joins the history, then a reply to it. A speculative turn's
        transcript waits for its confirmation (a discarded turn must leave nothing behind)."""
        self._arrivals += 1
        user = item_id or f"turn_{self._arrivals}"
        self.add_item(session_id, HistoryItem(user, "user", audio=audio, transcribe=transcribe and not speculative),
                      None)
        self.respond(session_id, settings, timings, forced, emit, item_id=reply_id or f"reply_{self._arrivals}")
        session = self.sessions[session_id]
        turn = session.turn
        if turn is not None:
            turn.user_item = user
            turn.speculative = speculative
            turn.transcribe = transcribe
            session.unconfirmed = turn if speculative else None
            conv = session.conversation
            i = conv.index(user) if conv is not None and speculative and transcribe else None
            if conv is not None and i is not None:
                conv.messages[i].hold_encoder = True

    def respond(self, session_id: str, settings: TurnSettings, timings: TurnTimings, forced: ForcedLength | None,
                emit: Callable[[EngineEvent], None], *, item_id: str, instructions: str | None = None,
                keep: bool = True) -> None:
        """A reply to the history as it is (see EngineSession.respond)."""
        session = self.sessions[session_id]
        if session.broken:
            emit(TurnError("prompt_error", session.broken))
            return
        try:
            fmt = None if instructions is None else self._format(instructions)
        except Exception as e:  # noqa: BLE001 - this reply's instructions cannot be rendered
            emit(TurnError("prompt_error", f"the response's instructions cannot be built: {e}"))
            return
        self._arrivals += 1
        max_new = forced.text_tokens if forced else settings.max_new_tokens or self.config.max_new_tokens
        turn = TurnRun(self._arrivals, session, item_id, keep, fmt, settings, timings, forced, emit, max_new)
        session.turn, session.last_reply = turn, None
        self.turns[turn.id] = turn

    def cancel(self, session_id: str, played_ms: float | None) -> None:
        session = self.sessions.get(session_id)
        if session is None or session.conversation is None:
            return
        turn = session.turn
        if turn is None:  # the reply already ended: cut it to what was heard, until the next turn
            if played_ms is not None and session.last_reply is not None:
                self.truncate_item(session_id, session.last_reply, played_ms)
            return
        text = ""
        if turn.reply is not None:
            r = turn.reply
            h = heard_of(r)
            keep = h.text_tokens if played_ms is None else heard_tokens(played_ms, h.reads, h.blocks,
                                                                         h.text_tokens, r.done)
            text = self._join(turn, r.text_ids[:keep], h)
        else:
            self._forget_user(turn)
        self._restore(turn)
        turn.timings.done = time.monotonic()
        self._end(turn, ResponseDone(text, "cancelled", turn.timings, turn.audio_ms, turn.input_tokens,
                                     len(turn.reply.text_ids) if turn.reply is not None else 0))

    def confirm(self, session_id: str) -> None:
        """The last speculative turn is confirmed: an ordinary turn from now on (if it still runs), and its
        transcript starts."""
        session = self.sessions.get(session_id)
        turn = session.unconfirmed if session is not None else None
        if session is None or turn is None:
            return
        session.unconfirmed = None
        if turn.speculative:
            turn.speculative = False
            turn.timings.confirmed = time.monotonic()
        conv = session.conversation
        i = conv.index(turn.user_item) if conv is not None and turn.user_item is not None else None
        if not turn.transcribe or conv is None or i is None:
            return
        message = conv.messages[i]
        message.transcribe, message.hold_encoder = True, False
        if isinstance(message.content, Speech) and message.encoder_out is not None:  # encoded while speculative
            self._start_transcript(session, message.id, message.encoder_out, message.audio_seconds)
            message.encoder_out = None

    def discard(self, session_id: str) -> None:
        """Drop the last speculative turn as if it had never been submitted (see EngineSession.discard): a
        running one ends at once; one that already ended takes its reply and user item out of the history."""
        session = self.sessions.get(session_id)
        turn = session.unconfirmed if session is not None else None
        if session is None or turn is None:
            return
        session.unconfirmed = None
        self.stats.discarded += 1
        # Nothing to drop from the transcripts: a speculative turn's only starts at its confirmation.
        if session.turn is not turn:  # it ended before the caller spoke again
            conv = session.conversation
            if conv is not None:
                conv.delete(turn.item_id)
                if turn.user_item is not None:
                    conv.delete(turn.user_item)
            if session.last_reply == turn.item_id:
                session.last_reply = None
            return
        self._forget_user(turn)
        self._restore(turn)
        turn.timings.done = time.monotonic()
        self._end(turn, ResponseDone("", "discarded", turn.timings, turn.audio_ms, turn.input_tokens,
                                     len(turn.reply.text_ids) if turn.reply is not None else 0, speculative=True))

    def close(self, session_id: str) -> None:
        self.cancel(session_id, None)
        self.sessions.pop(session_id, None)
        self.to_encode = [(s, m) for s, m in self.to_encode if s.id != session_id]
        self.transcripts.forget(session_id)

    def close_all(self) -> None:
        for turn in list(self.turns.values()):
            self._fail(turn, "engine_stopped", "the engine is shutting down")
        self.sessions.clear()

    def fail_all(self, code: str, message: str) -> None:
        for turn in list(self.turns.values()):
            self._fail(turn, code, message)

    # ---------------------------------------------------------------- the step
    @torch.inference_mode()
    def step(self) -> bool:
        """One step; False when it found nothing to run (e.g. only speculative turns that wait for slack or
        for their confirmation), so the caller may wait for a command instead of spinning."""
        if not self.busy:
            return False
        now = time.monotonic()
        began, before = time.perf_counter(), replace(self.stats)
        live, encoded = len(self.turns), bool(self.to_encode)
        plan = self.scheduler.schedule([self._view(t, now) for t in self.turns.values()])
        self.stats.steps += 1

        def pick(ids: Sequence[int], ready: Callable[[TurnRun], bool]) -> list[TurnRun]:
            turns = [t for t in (self.turns.get(i) for i in ids) if t is not None and ready(t)]
            # rows in slot order: consecutive slots read their KV as one view (qwen2.KVCache)
            return sorted(turns[: plan.max_batch], key=lambda t: t.session.slot)

        admit = pick(plan.admit, lambda t: t.reply is None)
        self._encode_pending([(t.session, m) for t in admit for m in self._pending(t.session)])
        self._guard(admit, self._admit)
        self._guard(pick(plan.text, lambda t: t.reply is not None and t.reply.wants_text
                         and self.scheduler.text_allowed(t.reply.text_lead)), self._text)
        self._guard(pick(plan.tts, lambda t: t.reply is not None and t.reply.wants_tts), self._tts)
        self._guard(pick(plan.vocode, lambda t: bool(t.chunks)), self._vocode)
        for turn in list(self.turns.values()):
            if turn.reply is not None and turn.reply.done and not turn.chunks:
                self._finish(turn)
        transcribed = self._transcribe()
        s = self.stats
        rows = {"admit": s.admitted - before.admitted, "text": s.text_rows - before.text_rows,
                "tts": s.tts_rows - before.tts_rows, "vocode": s.vocode_rows - before.vocode_rows}
        if self.on_step is not None:
            self.on_step(time.perf_counter() - began, rows)
        return transcribed or encoded or any(rows.values()) or len(self.turns) != live

    def _guard(self, turns: list[TurnRun], stage: Callable[[list[TurnRun]], None]) -> None:
        if not turns:
            return
        try:
            stage(turns)
        except Exception as e:  # noqa: BLE001 - the stage's turns fail, the others go on
            log.exception("engine: stage %s failed for %d turn(s)", stage.__name__, len(turns))
            for turn in turns:
                if turn.id in self.turns:
                    self._fail(turn, error_code(e), f"{type(e).__name__}: {e}")

    def _view(self, t: TurnRun, now: float) -> TurnView:
        r = t.reply
        if r is None:
            conv = t.session.conversation
            assert conv is not None
            pending = (conv.prompt_length if t.fmt is None else conv.prompt_length - len(conv.fmt.system)
                       + len(t.fmt.system)) - conv.kv_len
            return TurnView(t.id, TurnPhase.QUEUED, t.id, prompt_tokens=max(1, pending), speculative=t.speculative)
        started = t.timings.first_audio is not None
        ahead = t.audio_ms - 1000.0 * (now - t.timings.first_audio) if t.timings.first_audio is not None else 0.0
        paused = t.speculative and t.audio_ms >= self.config.speculation_hold_ms
        return TurnView(t.id, t.phase, t.id, 0, r.wants_text, r.wants_tts, r.text_lead, bool(t.chunks), started, ahead,
                        t.speculative, paused)

    # ---------------------------------------------------------------- speech in, transcripts out
    def _pending(self, session: SessionRun) -> list[Message]:
        conv = session.conversation
        if conv is None:
            return []
        return [m for m in conv.messages if isinstance(m.content, Speech) and not m.content.encoded]

    def _encode_pending(self, messages: list[tuple[SessionRun, Message]]) -> None:
        """Encode user speech (mel, encoder, adapter) in one batch: the (session, message) pairs given (what the
        turns being admitted read) and any waiting for a transcript; a transcript job starts for each that
        wants one."""
        waiting, self.to_encode = self.to_encode, []
        batch = {id(m): (s, m) for s, m in [*messages, *waiting]
                 if isinstance(m.content, Speech) and not m.content.encoded}
        if not batch:
            return
        owners = [s for s, _ in batch.values()]
        rows = [m for _, m in batch.values()]
        speeches = [m.content for m in rows]
        assert all(isinstance(sp, Speech) for sp in speeches)
        features = self.lm.speech_features([sp.audio for sp in speeches])  # type: ignore[union-attr]
        k = self.lm.projector.k
        for i, (session, m, sp) in enumerate(zip(owners, rows, speeches, strict=True)):
            assert isinstance(sp, Speech)
            if features.lengths[i] != sp.length:
                raise RuntimeError(f"speech of {len(sp.audio)} samples encoded to {features.lengths[i]} positions, "
                                   f"expected {sp.length}")
            sp.features, seconds, sp.audio = features.row(i), len(sp.audio) / INPUT_SAMPLE_RATE, None
            if m.transcribe or m.hold_encoder:
                enc = features.encoder_out[i] if not self.lm.unpadded else features.encoder_out[i, : sp.length * k]
                # padded: the whole 30-s window, as Whisper's decoder was trained on
                if m.transcribe:
                    self._start_transcript(session, m.id, enc, seconds)
                else:  # a speculative turn's: its transcript starts if the turn is confirmed
                    m.encoder_out, m.audio_seconds = enc.clone(), seconds

    def _start_transcript(self, session: SessionRun, item_id: str, encoder_out: torch.Tensor, seconds: float) -> None:
        emit = session.on_transcript
        if emit is None:
            return
        if self.transcripts.unavailable:
            if not session.transcripts_failed:  # once per session: some clients log every failure as an error
                session.transcripts_failed = True
                emit(TranscriptFailed(item_id, "transcription_unavailable", self.transcripts.unavailable))
            return
        self.transcripts.submit(session.id, item_id, encoder_out, seconds, emit)

    def _transcribe(self) -> bool:
        """Decode transcripts when no reply waits for its first audio (or first units, without a vocoder),
        one token per step."""
        if not self.transcripts.busy:
            return False

        def waiting(t: TurnRun) -> bool:
            first = t.timings.first_audio if self.decoder is not None else t.timings.first_units
            return t.reply is None or first is None

        if any(waiting(t) for t in self.turns.values()):
            return False
        self.transcripts.step(TRANSCRIPT_TOKENS_PER_STEP)
        return True

    # ---------------------------------------------------------------- admission
    def _admit(self, turns: list[TurnRun]) -> None:
        lm, cfg = self.lm, self.config
        now = time.monotonic()
        ready: list[TurnRun] = []
        embeds: list[torch.Tensor] = []
        for t in turns:
            t.timings.encoder_done = now
            conv, s = t.session.conversation, t.settings
            assert conv is not None and s.seed is not None
            try:
                spk = self._voice(s.voice) if self.decoder is not None else None
                if t.fmt is not None:
                    conv.use_format(t.fmt)
                new = conv.begin_reply(t.max_new_tokens)
            except Exception as e:  # noqa: BLE001 - a bad voice or an overlong turn fails this turn only
                self._fail(t, error_code(e, "turn_rejected"), str(e))
                continue
            t.after = conv.messages[-1].id if conv.messages else ROOT
            t.input_tokens = conv.prompt_length
            ids, speech = flatten_items(new.items, SPEECH_TOKEN_INDEX)
            embeds.append(lm.embed_prompt(ids, speech))
            t.reply = Reply.start(lm, llm_slot=t.session.slot, tts_slot=t.session.slot, llm_len=new.start,
                                  temperature=s.temperature, max_new_tokens=t.max_new_tokens, seed=s.seed,
                                  final_units=cfg.final_units, forced=t.forced)
            t.reply_start = conv.prompt_length
            t.detok = lm.tok.detokenizer()
            if spk is not None:
                assert self.decoder is not None
                t.vocoder = open_stream(self.decoder, spk, s.seed, cfg.flow_context_units, cfg.flow_cache)
            ready.append(t)
        if ready:
            prefill(lm, replies_of(ready), embeds, self._llm_cache)
            self.stats.admitted += len(ready)
            self.stats.prefill_tokens += sum(e.shape[0] for e in embeds)
            for t in ready:
                assert t.session.conversation is not None and t.reply is not None
                t.session.conversation.prefilled()
                assert t.reply.llm_len == t.reply_start, "prefill and conversation disagree on the prompt length"
                self._drain(t)

    def _text(self, turns: list[TurnRun]) -> None:
        decode_text(self.lm, replies_of(turns), self._llm_cache)
        self.stats.text_rows += len(turns)
        self.stats.text_calls += 1
        for t in turns:
            self._drain(t)

    def _tts(self, turns: list[TurnRun]) -> None:
        decode_tts(self.lm, replies_of(turns), self._tts_cache)
        self.stats.tts_rows += len(turns)
        self.stats.tts_calls += 1
        for t in turns:
            self._drain(t)

    def _drain(self, t: TurnRun) -> None:
        """Postprocess: a reply's outbox -> text deltas and unit chunks."""
        assert t.reply is not None
        W = self.lm.config.write_units
        now = time.monotonic()
        for out in t.reply.drain():
            if isinstance(out, TextToken):
                if t.timings.first_text is None:
                    t.timings.first_text = now
                delta = t.detok.push(out.token)
                if delta:
                    t.emit(TextDelta(delta))
            elif isinstance(out, UnitToken):
                t.pending_units.append(out.unit)
                if len(t.pending_units) >= W:  # a long (final) block streams in chunks of W units
                    self._chunk(t, False, now)
            elif isinstance(out, BlockEnd):
                if t.pending_units or out.final:
                    self._chunk(t, out.final, now)
            elif isinstance(out, ReplyEnd):
                tail = t.detok.flush()
                if tail:
                    t.emit(TextDelta(tail))

    def _chunk(self, t: TurnRun, final: bool, now: float) -> None:
        units = tuple(t.pending_units)
        t.pending_units.clear()
        if units:
            if t.timings.first_units is None:
                t.timings.first_units = now
            t.emit(UnitBlock(units))
        t.chunks.append((units, final))

    def _vocode(self, turns: list[TurnRun]) -> None:
        if self.decoder is None:  # units only
            for t in turns:
                t.chunks.clear()
            return
        from voice_agent.engine.vocoder import vocode_many

        jobs = [t.chunks.popleft() for t in turns]
        pcms = vocode_many([t.vocoder for t in turns], [u for u, _ in jobs], [f for _, f in jobs])
        self.stats.vocode_rows += len(turns)
        self.stats.vocode_calls += 1
        now = time.monotonic()
        for t, pcm in zip(turns, pcms, strict=True):
            if len(pcm):
                if t.timings.first_audio is None:
                    t.timings.first_audio = now
                t.emit(AudioChunk(np.asarray(pcm, dtype=np.float32), t.audio_ms))
                t.samples_sent += len(pcm)

    # ---------------------------------------------------------------- endings
    def _join(self, t: TurnRun, ids: list[int], heard: Heard) -> str:
        """A reply's kept `ids` join the history (unless out of band); returns its text."""
        conv, r = t.session.conversation, t.reply
        assert conv is not None and r is not None
        eos = self.lm.generation.eos_token_ids
        kept = ids[:-1] if ids and ids[-1] in eos else list(ids)
        if t.keep:
            message = Message(t.item_id, "assistant", kept, heard=heard)
            conv.add_reply(message, t.after, ROOT, t.reply_start, r.llm_len - t.reply_start, eos)
            t.session.last_reply = t.item_id
        else:
            conv.end_reply()
        return self.lm.tok.decode(kept)

    def _restore(self, t: TurnRun) -> None:
        """Back to the session's own system block after a reply with its own instructions."""
        conv = t.session.conversation
        if conv is None:
            return
        conv.end_reply()
        if t.session.fmt is not None and conv.fmt is not t.session.fmt:
            conv.use_format(t.session.fmt)

    def _finish(self, t: TurnRun) -> None:
        r = t.reply
        assert r is not None and r.finish_reason is not None
        text = self._join(t, r.text_ids, heard_of(r))
        self._restore(t)
        t.timings.done = time.monotonic()
        self._end(t, ResponseDone(text, r.finish_reason, t.timings, t.audio_ms, t.input_tokens, len(r.text_ids)))

    def _forget_user(self, t: TurnRun) -> None:
        conv = t.session.conversation
        if t.user_item is not None and conv is not None:
            conv.delete(t.user_item)

    def _fail(self, t: TurnRun, code: str, message: str) -> None:
        self._forget_user(t)
        self._restore(t)
        self._end(t, TurnError(code, message))

    def _end(self, t: TurnRun, event: EngineEvent) -> None:
        """Free everything the turn holds and send its last event."""
        self.turns.pop(t.id, None)
        if t.session.turn is t:
            t.session.turn = None
        t.reply, t.vocoder = None, None
        t.chunks.clear()
        if isinstance(event, ResponseDone) and self.on_done is not None:
            self.on_done(t.timings)
        t.emit(event)

    # ---------------------------------------------------------------- prompt and voice
    def _format(self, system: str | None) -> PromptFormat:
        if system not in self._formats:
            tok = self.lm.tok

            def render(n: int) -> list[int]:
                turns = [Turn.user()] + [t for _ in range(n - 1) for t in (Turn.assistant(""), Turn.user())]
                return tok.build_prompt(turns, system)

            if len(self._formats) >= MAX_FORMATS:  # per-response instructions: keep the cache bounded
                self._formats.pop(next(iter(self._formats)))
            self._formats[system] = PromptFormat.derive(render, SPEECH_TOKEN_INDEX, tok.role_header)
        return self._formats[system]

    def _voice(self, name: str | None) -> torch.Tensor:
        from voice_agent.model.cosy2.voice import DEFAULT_VOICE

        key = name or self.config.default_voice or DEFAULT_VOICE
        if key in self.voice_table:
            return self.voice_table[key]
        if key not in self._voices:
            assert self.decoder is not None, "voices need the cosy2_decoder"
            self._voices[key] = self.decoder.voice(key)
        return self._voices[key]
