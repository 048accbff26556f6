"""The engine: one owner of the model serving every session with step-level batching.

One thread (the model thread) owns the model, the KV caches and every session's model-side state; nothing
else touches them. It also loads the model: on a CPU, torch ops run from a second thread make OpenMP
throttle its spinning, and batch-1 steps then run about 3x slower (measured), so keep other torch work
(a torch VAD, say) out of the process's other threads or give them one thread. Sessions live on the
asyncio side (`LocalSession` in sessions.py, the `EngineSession` of api.py): their calls only post commands to
the model thread and never block the loop.

The model thread loops: apply the posted commands (open, item edits, submit / respond, cancel, close), in
order, then one step,
schedule -> run -> postprocess (scheduler.py has the policy):

1. admit: the new turns' audio through mel, encoder and adapter in one batch, their new prompt positions
   (conversation.py) prefilled in one call, which also samples each turn's first text token;
2. text: one batched LLM decode step; 3. tts: one batched TTS LM step;
4. postprocess: text tokens -> `TextDelta`s, units -> unit chunks (a chunk ends with its TTS block, and a
   long final block is cut every W units so its audio streams) -> `UnitBlock`s;
5. vocode: one flow + HiFT call (`vocode_many`) for every turn with a chunk ready -> `AudioChunk`s;
6. a turn whose units are all vocoded ends with `ResponseDone` and its reply joins the conversation.

A cancel is applied before the next step runs, so it takes effect within one step: the turn's reply is
cut to what the listener heard (conversation.heard_tokens), its TTS slot, vocoder stream and queued
chunks are dropped, and its stream ends with `ResponseDone(reason="cancelled")`. `cancel(played_ms)` after
the turn has ended still cuts the last reply, until the next turn starts.

KV: one LLM slot per session for its lifetime (`context_tokens` positions) and one TTS slot per session,
reused by each reply; both caches are static and allocated when the model loads. Admission (`SlotPool`)
refuses a session beyond `max_sessions` or beyond what `kv_budget_bytes` holds. An idle engine waits
`admit_window_ms` after a command for others, so turns submitted together are prefilled together.

Watching it (the server's metrics; nothing here knows of them): `stats()` is a snapshot of plain numbers
(sessions, queued commands, cache bytes in use, CUDA memory), safe to read from any thread; `on_step`,
when set, gets every step's duration and rows per stage on the model thread (`ModelWorker.on_step`).

Options that change numbers: `flow_context_units` (default: the bounded flow window of flow_stream;
None recomputes the whole reply each block, as the reference) and `flow_cache` (cached completed chunks:
equal to the recompute with a whole-reply window, closer to it than the plain bounded window otherwise);
`final_units` caps the units written after the final read (the reference's 1024); `ForcedLength`
(benchmarks) fixes reply lengths.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import random
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from voice_agent.engine.api import EngineInfo, TranscriptEvent, TurnError, TurnSettings, TurnTimings
from voice_agent.engine.config import EngineConfig, Models
from voice_agent.engine.files import directory_voices
from voice_agent.engine.scheduler import SlotPool, slots_for_budget
from voice_agent.engine.sessions import (
    AddItem,
    Cancel,
    Close,
    Confirm,
    DeleteItem,
    Discard,
    LocalSession,
    Open,
    Respond,
    SetInstructions,
    Stop,
    Submit,
    TruncateItem,
)
from voice_agent.errors import AdmissionError, TurnRejected, error_code

log = logging.getLogger(__name__)

RECENT_TURNS = 1024  # timings kept for metrics
IDLE_POLL_S = 0.005  # a step with nothing to run (turns waiting for confirmation) waits this long for a command


class Engine:
    """The model thread and the sessions it serves (implements events.Engine)."""

    def __init__(self, load: Callable[[], Models], config: EngineConfig, info: EngineInfo):
        self.config = config
        # What a client may ask of this engine follows from its config (api.EngineInfo.check_turn).
        self.info = replace(info, default_voice=config.default_voice, max_new_tokens=config.max_reply_tokens)
        self._load = load
        self._commands: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: SlotPool | None = None
        self._ids = 0
        self._ids_lock = threading.Lock()
        self.load_error: BaseException | None = None
        self.worker: Any = None  # the ModelWorker, once loaded (read it only while the engine is idle)
        self.recent: deque[TurnTimings] = deque(maxlen=RECENT_TURNS)
        self.on_step: Callable[[float, Mapping[str, int]], None] | None = None  # see the module docstring

    @classmethod
    def from_models(cls, models: Models, config: EngineConfig | None = None, *, demo: bool = False) -> Engine:
        """An engine over already built models (tests). On a CPU, prefer `Engine(load, ...)` so the models are
        built in the model thread (see the module docstring)."""
        lm = models.lm
        directory = getattr(models.decoder, "directory", None)
        voices = tuple(sorted(set(models.voices) | set(directory_voices(directory))))
        info = EngineInfo(lm.name, demo, str(lm.device), str(lm.dtype).removeprefix("torch."), voices)
        return cls(lambda: models, config or EngineConfig(), info)

    # ---------------------------------------------------------------- lifecycle
    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start_thread(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._main, name="voice-agent-engine", daemon=True)
            self._thread.start()

    async def start(self) -> None:
        """Start the model thread; the model loads and warms up in it (`ready` turns True when done)."""
        self.start_thread()

    def wait_ready(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; raises the load error if loading failed."""
        while not self._ready.wait(0.05):
            if self.load_error is not None:
                raise self.load_error
            if not self.alive:
                raise RuntimeError("the engine thread is not running")
            if timeout is not None:
                timeout -= 0.05
                if timeout <= 0:
                    raise TimeoutError("the engine did not load in time")

    def shutdown(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._commands.put(Stop())
            self._thread.join(timeout)

    async def aclose(self) -> None:
        await asyncio.get_running_loop().run_in_executor(None, self.shutdown)

    # ---------------------------------------------------------------- sessions
    def open_session(self, *, system_prompt: str | None = None,
                     on_transcript: Callable[[TranscriptEvent], None] | None = None) -> LocalSession:
        if not self.ready or self._pool is None:
            reason = f"failed to load: {self.load_error}" if self.load_error else "still loading the model"
            raise AdmissionError(f"the engine is not ready ({reason})")
        with self._ids_lock:
            self._ids += 1
            session_id = f"s{self._ids}"
        slot = self._pool.acquire(session_id)
        session = LocalSession(self, session_id, slot)
        self.post(Open(session, system_prompt, None if on_transcript is None else _on_loop(on_transcript)))
        return session

    def post(self, command: Any) -> None:
        self._commands.put(command)

    def release(self, session: LocalSession) -> None:
        if self._pool is not None:
            self._pool.release(session.slot)

    def check_settings(self, settings: TurnSettings, forced: Any | None) -> None:
        """Refuse settings the engine cannot serve, before anything is queued."""
        cfg = self.config
        self.info.check_turn(settings)
        if forced is not None and (forced.text_tokens > cfg.max_reply_tokens or forced.final_units > cfg.final_units):
            raise TurnRejected(f"forced length {forced} exceeds the engine's max_reply_tokens {cfg.max_reply_tokens} "
                               f"or final_units {cfg.final_units}")

    def stats(self) -> dict[str, Any]:
        """Sessions in use, first-audio latency of recent turns (ms after the end of speech), commands not
        yet applied, KV and flow cache bytes of the sessions in use, and on CUDA the memory torch holds."""
        firsts = sorted(t.first_audio - t.speech_end for t in list(self.recent) if t.first_audio is not None)
        pick = (lambda q: round(1000.0 * firsts[min(len(firsts) - 1, int(q * len(firsts)))], 1)) if firsts else None
        return {
            "sessions": 0 if self._pool is None else self._pool.in_use,
            "max_sessions": 0 if self._pool is None else self._pool.slots,
            "turns": len(self.recent),
            "first_audio_ms_p50": pick(0.5) if pick else None,
            "first_audio_ms_p95": pick(0.95) if pick else None,
            **self._usage(),
        }

    def _usage(self) -> dict[str, int | None]:
        per_session = 0 if self.worker is None else self.worker.bytes_per_session
        cuda = self.info.device.startswith("cuda") and self.worker is not None
        if cuda:
            import torch
        return {
            "commands": self._commands.qsize(),
            "cache_bytes_per_session": per_session,
            "cache_bytes": per_session * (0 if self._pool is None else self._pool.in_use),
            "cuda_allocated_bytes": torch.cuda.memory_allocated(self.info.device) if cuda else None,
            "cuda_reserved_bytes": torch.cuda.memory_reserved(self.info.device) if cuda else None,
        }

    # ---------------------------------------------------------------- the model thread
    def _main(self) -> None:
        from voice_agent.engine.worker import ModelWorker

        try:
            if self.config.threads:
                import torch

                torch.set_num_threads(self.config.threads)
            models = self._load()
            worker = ModelWorker(models, self.config, on_done=self.recent.append)
            slots = slots_for_budget(self.config.max_sessions, worker.bytes_per_session, self.config.kv_budget_bytes)
            worker.allocate(slots)
            limit = (f"max_sessions {self.config.max_sessions}" if slots == self.config.max_sessions else
                     f"the KV budget of {(self.config.kv_budget_bytes or 0) / (1 << 30):.2f} GiB at "
                     f"{worker.context_tokens} tokens per session")
            self._pool = SlotPool(slots, limit)
            log.info("engine: %d session slots, %.1f MiB of KV and flow cache per session", slots,
                     worker.bytes_per_session / 2**20)
            self.worker = worker
            worker.on_step = self._stepped
            if self.config.warm_up:
                error = worker.warm_up()
                if error is not None:
                    log.warning("engine: the warm-up turn failed (%s: %s); turns may fail the same way",
                                error.code, error.message)
        except BaseException as e:  # noqa: BLE001 - reported through load_error and the log
            log.exception("engine: loading the model failed")
            self.load_error = e
            return
        self._ready.set()
        window = self.config.admit_window_ms / 1000.0
        stalled = False  # the last step found nothing to run (only turns that wait: speculation)
        while True:
            idle = not worker.busy
            try:  # a stalled engine waits a little for a command instead of spinning
                command = self._commands.get(block=idle or stalled, timeout=IDLE_POLL_S if stalled and not idle
                                             else None)
            except queue.Empty:
                command = None
            # No turn in flight (at most background work: transcripts): wait the admission window as an idle
            # engine does, so turns that arrive together still start in one batch.
            deadline = time.monotonic() + window if not worker.turns else 0.0
            while command is not None:
                if isinstance(command, Stop):
                    worker.close_all()
                    return
                self._apply(worker, command)
                try:  # an idle engine collects what arrives together, so those turns start in one batch
                    wait = deadline - time.monotonic()
                    command = self._commands.get(timeout=wait) if wait > 0 else self._commands.get_nowait()
                except queue.Empty:
                    command = None
            try:
                stalled = not worker.step()
            except Exception:  # noqa: BLE001 - a failing step fails its turns, not the engine
                log.exception("engine: step failed; failing the running turns")
                worker.fail_all("engine_error", "the engine failed while generating this turn")

    def _stepped(self, seconds: float, rows: Mapping[str, int]) -> None:
        observer = self.on_step
        if observer is None:
            return
        try:
            observer(seconds, rows)
        except Exception:  # noqa: BLE001 - a broken observer must not fail turns
            log.exception("engine: the step observer failed; it is removed")
            self.on_step = None

    def _apply(self, worker: Any, command: Any) -> None:
        try:
            if isinstance(command, Open):
                worker.open(command.session.id, command.session.slot, command.system_prompt, command.on_transcript)
            elif isinstance(command, Submit):
                worker.submit(command.session.id, _seeded(command.settings), command.audio, command.timings,
                              command.forced, command.emit, item_id=command.item_id, reply_id=command.reply_id,
                              transcribe=command.transcribe, speculative=command.speculative)
            elif isinstance(command, Confirm):
                worker.confirm(command.session.id)
            elif isinstance(command, Discard):
                worker.discard(command.session.id)
            elif isinstance(command, Respond):
                worker.respond(command.session.id, _seeded(command.settings), command.timings, None, command.emit,
                               item_id=command.item_id, instructions=command.instructions, keep=command.keep)
            elif isinstance(command, AddItem):
                worker.add_item(command.session.id, command.item, command.after)
            elif isinstance(command, DeleteItem):
                worker.delete_item(command.session.id, command.item_id)
            elif isinstance(command, TruncateItem):
                worker.truncate_item(command.session.id, command.item_id, command.audio_ms)
            elif isinstance(command, SetInstructions):
                worker.set_instructions(command.session.id, command.text)
            elif isinstance(command, Cancel):
                worker.cancel(command.session.id, command.played_ms)
            elif isinstance(command, Close):
                worker.close(command.session.id)
                self.release(command.session)
                command.closed()
        except Exception as e:  # noqa: BLE001 - a bad command fails only its own turn
            log.exception("engine: command %s failed", type(command).__name__)
            if isinstance(command, (Submit, Respond)):
                command.emit(TurnError(error_code(e), str(e)))


def _seeded(settings: TurnSettings) -> TurnSettings:
    """A turn's settings with a seed (a random one unless the client chose it)."""
    if settings.seed is not None:
        return settings
    return replace(settings, seed=random.SystemRandom().randrange(1 << 31))


def _on_loop(callback: Callable[[Any], None]) -> Callable[[Any], None]:
    """`callback` called on the current event loop, from any thread (a closed loop drops the call)."""
    loop = asyncio.get_running_loop()

    def post(event: Any) -> None:
        try:
            loop.call_soon_threadsafe(callback, event)
        except RuntimeError:
            pass

    return post
