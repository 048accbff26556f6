"""Engine: batched == sequential, multi-turn KV reuse == re-running the conversation, cancellation,
history cuts, the context policy in use, admission, the asyncio API, the server's build_engine, and
conversation items (text turns, edits, out-of-band replies, per-reply instructions)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from voice_agent.engine.api import (
    AudioChunk,
    HistoryItem,
    ResponseDone,
    TextDelta,
    TurnError,
    TurnSettings,
    TurnTimings,
    UnitBlock,
)
from voice_agent.engine.build import build_engine
from voice_agent.engine.config import EngineConfig, Models
from voice_agent.engine.files import demo_cache_dir
from voice_agent.engine.reply import ForcedLength, Reply
from voice_agent.engine.thread import Engine
from voice_agent.engine.worker import ModelWorker
from voice_agent.errors import AdmissionError, TurnRejected
from voice_agent.model.cosy2.decoder import Cosy2Decoder
from voice_agent.model.speech_lm import SpeechLM
from voice_agent.model.tiny import make_tiny

SHORT = ForcedLength(text_tokens=6, final_units=12)  # 2 reads: a 10-unit block, then 12 final units


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny checkpoint set (the plain test one, not the demo's shaping), written where build_engine looks
    for its demo model."""
    cache = tmp_path_factory.mktemp("cache")
    root = cache / demo_cache_dir().name
    make_tiny(root, seed=0)
    return root


@pytest.fixture(scope="module")
def models(tiny_root: Path) -> Models:
    torch.manual_seed(0)
    lm = SpeechLM.load(tiny_root / "LLaMA-Omni2-tiny")
    return Models(lm, Cosy2Decoder.load(tiny_root / "cosy2_decoder"))


def speech(seed: int, seconds: float = 1.0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    t = np.arange(int(16000 * seconds)) / 16000
    return (0.2 * np.sin(2 * np.pi * (120 + 40 * seed) * t) + 0.02 * rng.standard_normal(len(t))).astype(np.float32)


@dataclass
class Capture:
    events: list[Any] = field(default_factory=list)
    reply: Reply | None = None

    @property
    def done(self) -> Any:
        return self.events[-1] if self.events and isinstance(self.events[-1], (ResponseDone, TurnError)) else None

    def units(self) -> list[int]:
        return [u for e in self.events if isinstance(e, UnitBlock) for u in e.units]

    def audio(self) -> np.ndarray:
        return np.concatenate([e.pcm for e in self.events if isinstance(e, AudioChunk)] or [np.zeros(0, np.float32)])

    def text(self) -> str:
        return "".join(e.text for e in self.events if isinstance(e, TextDelta))


def make_worker(models: Models, **overrides: Any) -> ModelWorker:
    config = EngineConfig(**{"max_sessions": 4, "final_units": 64, **overrides})
    worker = ModelWorker(models, config)
    worker.allocate(config.max_sessions)
    return worker


def submit(worker: ModelWorker, sid: str, audio: np.ndarray, seed: int, temperature: float = 0.8,
           forced: ForcedLength | None = SHORT) -> Capture:
    from voice_agent.engine.api import TurnTimings

    cap = Capture()
    worker.submit(sid, TurnSettings(temperature=temperature, seed=seed), audio, TurnTimings(0.0), forced,
                  cap.events.append)
    return cap


def run(worker: ModelWorker, caps: dict[str, Capture], max_steps: int = 500) -> None:
    """Step until idle, keeping a reference to each session's Reply."""
    for _ in range(max_steps):
        if not worker.busy:
            return
        worker.step()
        for sid, cap in caps.items():
            turn = worker.sessions[sid].turn
            if cap.reply is None and turn is not None and turn.reply is not None:
                cap.reply = turn.reply
    raise AssertionError("the worker did not finish")


def test_batched_turns_equal_the_same_turns_run_one_by_one(models: Models) -> None:
    jobs = [("a", speech(1), 11, 0.8), ("b", speech(2, 1.5), 12, 0.0), ("c", speech(3, 0.7), 13, 1.2)]
    batched = make_worker(models)
    caps = {}
    for slot, (sid, audio, seed, temp) in enumerate(jobs):
        batched.open(sid, slot, None)
        caps[sid] = submit(batched, sid, audio, seed, temp)
    run(batched, caps)
    assert batched.stats.admitted == 3 and batched.stats.tts_rows > batched.stats.tts_calls  # really batched
    for slot, (sid, audio, seed, temp) in enumerate(jobs):
        alone = make_worker(models)
        alone.open(sid, slot, None)
        cap = submit(alone, sid, audio, seed, temp)
        run(alone, {sid: cap})
        got = caps[sid]
        assert isinstance(got.done, ResponseDone) and isinstance(cap.done, ResponseDone)
        assert got.reply is not None and cap.reply is not None
        assert got.reply.text_ids == cap.reply.text_ids and got.text() == cap.text() == got.done.text
        assert got.units() == cap.units() and len(got.units()) == 22
        a, b = got.audio(), cap.audio()
        assert len(a) == len(b) > 0
        # Equal up to fp32 rounding, which the NSF source amplifies: its phase integrates f0 (hundreds of Hz
        # from the tiny random HiFT) over every sample, so the waveforms agree closely but not bit for bit.
        rel = float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))
        print(f"session {sid}: relative rms difference batched vs alone {rel:.2e}")
        assert rel < 0.05 and got.done.audio_ms == pytest.approx(len(got.audio()) / 24.0)


def test_flow_cache_gives_the_recompute_audio_and_counts_toward_admission(models: Models) -> None:
    from voice_agent.engine.flow_cache import FlowCache
    from voice_agent.engine.flow_stream import max_cached_frames

    caps = {}
    for cached in (True, False):
        worker = make_worker(models, flow_cache=cached)
        worker.open("a", 0, None)
        caps[cached] = submit(worker, "a", speech(4), 21, forced=ForcedLength(text_tokens=30, final_units=12))
        run(worker, {"a": caps[cached]})
    on, off = caps[True], caps[False]
    assert on.units() == off.units() and len(on.units()) > 100  # a reply crossing the 50-unit chunk twice
    a, b = on.audio(), off.audio()
    assert len(a) == len(b) > 0
    rel = float(np.sqrt(np.mean((a - b) ** 2)) / np.sqrt(np.mean(b**2)))
    print(f"relative rms difference cached vs recomputed flow {rel:.2e}")
    assert rel < 0.05  # see the batched test
    flow = models.decoder.flow
    worker_on, worker_off = make_worker(models), make_worker(models, flow_cache=False)
    reply_units = 10 * (512 // 3 + 1) + 64  # max_reply_tokens 512, final_units 64
    extra = FlowCache.bytes_for(flow.cfg, max_cached_frames(flow.cfg, 100, reply_units), flow.dtype)
    assert worker_on.bytes_per_session - worker_off.bytes_per_session == extra > 0


def test_multi_turn_kv_reuse_equals_rerunning_the_whole_conversation(models: Models) -> None:
    def two_turns(drop_kv: bool) -> tuple[Capture, int, int]:
        worker = make_worker(models)
        worker.open("s", 0, None)
        first = submit(worker, "s", speech(4), 21, temperature=0.0)
        run(worker, {"s": first})
        conv = worker.sessions["s"].conversation
        assert conv is not None
        if drop_kv:
            conv.kv_len = 0  # no cached positions: the next prefill recomputes the whole conversation
        before = worker.stats.prefill_tokens
        second = submit(worker, "s", speech(5), 22, temperature=0.0)
        run(worker, {"s": second})
        return second, worker.stats.prefill_tokens - before, conv.length

    reused, reused_prefill, length = two_turns(drop_kv=False)
    rerun, rerun_prefill, _ = two_turns(drop_kv=True)
    assert reused_prefill < rerun_prefill < length  # only the new positions were prefilled
    assert reused.reply is not None and rerun.reply is not None
    assert reused.reply.text_ids == rerun.reply.text_ids and reused.units() == rerun.units()
    torch.testing.assert_close(torch.stack(reused.reply.hiddens), torch.stack(rerun.reply.hiddens),
                               atol=1e-5, rtol=1e-4)
    # The history matters: the same second turn in a fresh session gives different states.
    fresh = make_worker(models)
    fresh.open("s", 0, None)
    alone = submit(fresh, "s", speech(5), 22, temperature=0.0)
    run(fresh, {"s": alone})
    assert alone.reply is not None
    assert not torch.allclose(alone.reply.hiddens[0], reused.reply.hiddens[0], atol=1e-4)


def test_cancel_mid_block_frees_everything_and_cuts_history_to_what_was_heard(models: Models) -> None:
    worker = make_worker(models)
    worker.open("s", 0, None)
    cap = submit(worker, "s", speech(6), 31, forced=ForcedLength(12, 40))
    turn = worker.sessions["s"].turn
    assert turn is not None
    for _ in range(200):  # run into the second block: one chunk vocoded, a few units of the next written
        worker.step()
        assert turn.reply is not None
        blocks = turn.reply.schedule.unit_blocks
        if len(blocks) == 2 and 0 < len(blocks[1]) < 10 and turn.audio_ms > 0:
            break
    reply, conv = turn.reply, worker.sessions["s"].conversation
    assert conv is not None and reply is not None and reply.wants_tts
    worker.cancel("s", played_ms=200.0)  # 5 units of the first block: floor(3 * 5 / 10) = 1 token heard
    done = cap.done
    assert isinstance(done, ResponseDone) and done.reason == "cancelled"
    assert not worker.busy and worker.turns == {} and worker.sessions["s"].turn is None
    assert turn.reply is None and turn.vocoder is None and not turn.chunks  # nothing of the turn is kept
    assert conv.messages[-1].content == reply.text_ids[:1]
    assert done.text == models.lm.tok.decode(reply.text_ids[:1])
    assert conv.kv_len == conv.length - len(conv.fmt.footer)  # the heard token was fed: only the footer is new
    n_events = len(cap.events)
    worker.step()
    assert len(cap.events) == n_events  # nothing arrives after the end
    # The session goes on: the next turn prefills from the cut point.
    before = worker.stats.prefill_tokens
    nxt = submit(worker, "s", speech(7), 32)
    run(worker, {"s": nxt})
    assert isinstance(nxt.done, ResponseDone) and nxt.done.reason == "max_tokens"
    assert worker.stats.prefill_tokens - before < conv.length


def test_cancel_after_the_reply_ended_still_cuts_it(models: Models) -> None:
    worker = make_worker(models)
    worker.open("s", 0, None)
    cap = submit(worker, "s", speech(8), 41)
    run(worker, {"s": cap})
    conv = worker.sessions["s"].conversation
    assert conv is not None and len(conv.messages[-1].content) == 6
    n_events = len(cap.events)
    worker.cancel("s", played_ms=400.0)  # the first block (3 tokens) heard
    assert conv.messages[-1].content == cap.reply.text_ids[:3]  # type: ignore[union-attr]
    assert conv.kv_len == conv.length - len(conv.fmt.footer)
    assert len(cap.events) == n_events  # a late cut sends nothing


def test_context_budget_drops_the_oldest_turns_and_the_session_goes_on(models: Models) -> None:
    worker = make_worker(models, context_tokens=700)  # a padded turn takes 300 speech positions
    worker.open("s", 0, None)
    conv = worker.sessions["s"].conversation
    assert conv is not None
    head, trimmed_turns = len(conv.fmt.system), 0
    for i in range(4):
        before, dropped = worker.stats.prefill_tokens, conv.dropped
        cap = submit(worker, "s", speech(10 + i), 50 + i, forced=ForcedLength(3, 5))
        run(worker, {"s": cap})
        assert isinstance(cap.done, ResponseDone), cap.done
        assert conv.length <= 700
        prefilled = worker.stats.prefill_tokens - before
        reply_start = conv.position(len(conv.messages) - 1) + len(conv.fmt.headers["assistant"])
        if conv.dropped > dropped:  # the kept history is re-prefilled once, after the system block
            trimmed_turns += 1
            assert prefilled == reply_start - head
        else:
            assert prefilled < reply_start - head or i == 0
    assert trimmed_turns >= 1 and sum(m.role == "user" for m in conv.messages) < 4


def test_a_turn_too_long_for_the_context_fails_alone(models: Models) -> None:
    worker = make_worker(models, context_tokens=200)
    worker.open("s", 0, None)
    cap = submit(worker, "s", speech(1), 1)
    run(worker, {"s": cap})
    assert isinstance(cap.done, TurnError) and cap.done.code == "context_overflow"
    assert worker.sessions["s"].conversation.messages == []  # type: ignore[union-attr]


# ---------------------------------------------------------------------------------------------- asyncio API
async def collect(stream: Any) -> list[Any]:
    return [event async for event in stream]


async def started(models: Models, **overrides: Any) -> Engine:
    engine = Engine.from_models(models, EngineConfig(**{"final_units": 64, **overrides}))
    await engine.start()
    await asyncio.get_running_loop().run_in_executor(None, engine.wait_ready, 60.0)
    return engine


async def test_a_turn_streams_text_units_audio_then_done_with_timings(models: Models) -> None:
    engine = await started(models)
    try:
        session = engine.open_session()
        events = await collect(session.submit_turn(speech(1), TurnSettings(seed=3, temperature=0.5), forced=SHORT))
        kinds = [e.kind for e in events]
        assert kinds[-1] == "response_done" and kinds.count("response_done") == 1
        assert kinds.index("text_delta") < kinds.index("unit_block") < kinds.index("audio_chunk")
        chunks = [e for e in events if isinstance(e, AudioChunk)]
        for a, b in zip(chunks[:-1], chunks[1:], strict=True):
            assert b.start_ms == pytest.approx(a.start_ms + a.duration_ms)
        done = events[-1]
        assert done.audio_ms == pytest.approx(sum(c.duration_ms for c in chunks))
        t = done.timings
        marks = [t.speech_end, t.submitted, t.encoder_done, t.first_text, t.first_units, t.first_audio, t.done]
        assert all(m is not None for m in marks) and marks == sorted(marks)
        assert engine.stats()["turns"] == 1 and engine.stats()["first_audio_ms_p50"] is not None
        await session.close()
    finally:
        await engine.aclose()


async def test_cancel_ends_the_stream_within_one_step(models: Models) -> None:
    engine = await started(models)
    try:
        session = engine.open_session()
        stream = session.submit_turn(speech(2), TurnSettings(seed=4), forced=ForcedLength(30, 60))
        after: list[Any] = []
        async for event in stream:
            if after or isinstance(event, AudioChunk):
                if not after:
                    steps = engine.worker.stats.steps
                    session.cancel(played_ms=0.0)
                after.append(event)
        done = after[-1]
        assert isinstance(done, ResponseDone) and done.reason == "cancelled" and done.text == ""
        assert engine.worker.stats.steps - steps <= 2  # the step in flight, then the cancel
        assert engine.worker.turns == {}
        again = await collect(session.submit_turn(speech(3), TurnSettings(seed=5), forced=ForcedLength(3, 5)))
        assert isinstance(again[-1], ResponseDone) and again[-1].reason == "max_tokens"
        await session.close()
    finally:
        await engine.aclose()


async def test_admission_and_turn_refusals(models: Models) -> None:
    engine = Engine.from_models(models, EngineConfig(max_sessions=2, final_units=64))
    with pytest.raises(AdmissionError, match="not ready"):
        engine.open_session()
    await engine.start()
    await asyncio.get_running_loop().run_in_executor(None, engine.wait_ready, 60.0)
    try:
        a, b = engine.open_session(), engine.open_session()
        with pytest.raises(AdmissionError, match=r"2 of 2 sessions in use \(max_sessions 2\)"):
            engine.open_session()
        await b.close()
        c = engine.open_session()  # the slot came back
        stream = a.submit_turn(speech(1), TurnSettings(seed=1), forced=ForcedLength(3, 5))
        with pytest.raises(TurnRejected, match="already running"):
            a.submit_turn(speech(1), TurnSettings())
        with pytest.raises(TurnRejected, match="1-D float"):
            c.submit_turn(np.zeros((2, 100), np.float32), TurnSettings())
        with pytest.raises(TurnRejected, match="samples"):
            c.submit_turn(np.zeros(0, np.float32), TurnSettings())
        with pytest.raises(TurnRejected, match="voice"):
            c.submit_turn(speech(1), TurnSettings(voice="nobody"))
        with pytest.raises(TurnRejected, match="max_new_tokens"):
            c.submit_turn(speech(1), TurnSettings(max_new_tokens=4000))
        assert isinstance((await collect(stream))[-1], ResponseDone)
        await a.close()
        await c.close()
        assert engine.stats()["sessions"] == 0
    finally:
        await engine.aclose()


async def test_unpadded_encoder_input_reaches_the_model(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from voice_agent.serve.config import ServerConfig

    monkeypatch.setenv("VOICE_AGENT_CACHE", str(tiny_root.parent))
    engine = build_engine(*ServerConfig(encoder_input="unpadded", max_sessions=1).engine_options())
    await engine.start()
    await asyncio.get_running_loop().run_in_executor(None, engine.wait_ready, 60.0)
    try:
        assert engine.worker.lm.unpadded
    finally:
        await engine.aclose()


async def test_build_engine_serves_the_demo_model_when_no_weights_exist(
    tiny_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from voice_agent.serve.config import ServerConfig

    monkeypatch.setenv("VOICE_AGENT_CACHE", str(tiny_root.parent))
    monkeypatch.chdir(tmp_path)  # no models/ here
    assert demo_cache_dir() == tiny_root
    engine = build_engine(*ServerConfig(max_sessions=1).engine_options())
    assert engine.info.demo and engine.info.model_name == "LLaMA-Omni2-tiny" and "en" in engine.info.voices
    assert not engine.ready
    await engine.start()
    await asyncio.get_running_loop().run_in_executor(None, engine.wait_ready, 60.0)
    try:
        session = engine.open_session()
        events: list[Any] = []
        async for event in session.submit_turn(speech(1), TurnSettings(seed=1, max_new_tokens=2)):
            if isinstance(event, AudioChunk) and not any(isinstance(e, AudioChunk) for e in events):
                session.cancel()  # the reference's final block may run to 1024 units: stop at first audio
            events.append(event)
        assert isinstance(events[-1], ResponseDone) and events[-1].reason == "cancelled"
        await session.close()
    finally:
        await engine.aclose()


def test_server_options_reach_the_engine(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from voice_agent.errors import ConfigError
    from voice_agent.serve.config import ServerConfig

    monkeypatch.setenv("VOICE_AGENT_CACHE", str(tiny_root.parent))
    engine = build_engine(*ServerConfig(context_tokens=1024, kv_budget_mb=64, flow_context_units=0, max_sessions=3,
                                       flow_cache="off").engine_options())
    assert engine.config.context_tokens == 1024
    assert engine.config.flow_cache is False
    assert engine.config.kv_budget_bytes == 64 * 2**20
    assert engine.config.flow_context_units is None  # 0: the reference's full recompute
    assert engine.config.max_sessions == 3
    defaults = build_engine(*ServerConfig().engine_options()).config
    assert (defaults.context_tokens, defaults.kv_budget_bytes, defaults.flow_context_units) == (None, None, 100)
    assert defaults.flow_cache is True
    with pytest.raises(ConfigError, match="flow-cache"):
        ServerConfig(flow_cache="yes")
    with pytest.raises(ConfigError, match="context-tokens"):
        ServerConfig(context_tokens=100)
    with pytest.raises(ConfigError, match="encoder-input"):
        ServerConfig(encoder_input="short")


# ---------------------------------------------------------------------------------------------- items
GREEDY = TurnSettings(temperature=0.0, seed=3)


def respond_to(worker: ModelWorker, item_id: str, *, keep: bool = True, instructions: str | None = None,
            forced: ForcedLength | None = ForcedLength(5, 8)) -> Capture:
    cap = Capture()
    worker.respond("s", GREEDY, TurnTimings(0.0), forced, cap.events.append, item_id=item_id, keep=keep,
                   instructions=instructions)
    run(worker, {"s": cap})
    assert isinstance(cap.done, ResponseDone), cap.done
    return cap


def item_session(models: Models, items: list[HistoryItem]) -> ModelWorker:
    worker = make_worker(models)
    worker.open("s", 0, None)
    for item in items:
        worker.add_item("s", item, None)
    return worker


def ids(worker: ModelWorker) -> list[str]:
    conv = worker.sessions["s"].conversation
    assert conv is not None
    return [m.id for m in conv.messages]


HISTORY = [HistoryItem("sys", "system", text="Answer in one word."), HistoryItem("u1", "user", text="Hello there"),
           HistoryItem("a1", "assistant", text="Hi."), HistoryItem("u2", "user", audio=speech(2))]


def test_a_text_turn_is_read_as_text_and_its_reply_joins_the_history(models: Models) -> None:
    worker = item_session(models, [HistoryItem("u1", "user", text="What time is it?")])
    cap = respond_to(worker, "a1")
    assert cap.done.output_tokens == 5 and cap.done.input_tokens > 0 and cap.audio().size > 0
    assert ids(worker) == ["u1", "a1"]
    other = item_session(models, [HistoryItem("u1", "user", text="Tell me a story.")])
    text = respond_to(other, "a1").reply
    assert text is not None and cap.reply is not None  # the words reach the LLM: its states differ
    assert not torch.allclose(text.hiddens[0], cap.reply.hiddens[0])


def test_kv_reuse_after_edits_equals_rerunning_the_whole_conversation(models: Models) -> None:
    def last_reply(drop_kv: bool) -> tuple[Capture, int]:
        worker = item_session(models, HISTORY)
        respond_to(worker, "a2")
        worker.add_item("s", HistoryItem("u3", "user", text="And then?"), None)
        worker.delete_item("s", "a1")
        worker.add_item("s", HistoryItem("note", "system", text="Be kind."), "u1")
        conv = worker.sessions["s"].conversation
        assert conv is not None
        if drop_kv:
            conv.kv_len = 0
        before = worker.stats.prefill_tokens
        cap = respond_to(worker, "a3")
        assert ids(worker) == ["sys", "u1", "note", "u2", "a2", "u3", "a3"]
        return cap, worker.stats.prefill_tokens - before

    reused, reused_prefill = last_reply(False)
    rerun, rerun_prefill = last_reply(True)
    assert 0 < reused_prefill < rerun_prefill
    assert reused.reply is not None and rerun.reply is not None
    assert reused.reply.text_ids == rerun.reply.text_ids
    torch.testing.assert_close(torch.stack(reused.reply.hiddens), torch.stack(rerun.reply.hiddens),
                               atol=1e-5, rtol=1e-4)


def test_an_out_of_band_reply_leaves_the_history_as_it_was(models: Models) -> None:
    with_oob = item_session(models, HISTORY)
    respond_to(with_oob, "oob", keep=False, instructions="Summarise the conversation.")
    assert ids(with_oob) == [item.id for item in HISTORY]
    after = respond_to(with_oob, "a2")
    plain = item_session(models, HISTORY)
    expected = respond_to(plain, "a2")
    assert after.reply is not None and expected.reply is not None
    assert after.reply.text_ids == expected.reply.text_ids
    torch.testing.assert_close(torch.stack(after.reply.hiddens), torch.stack(expected.reply.hiddens),
                               atol=1e-5, rtol=1e-4)


def test_per_reply_instructions_change_that_reply_only(models: Models) -> None:
    worker = item_session(models, HISTORY)
    own = respond_to(worker, "a2", instructions="Speak like a pirate.")
    conv, run_session = worker.sessions["s"].conversation, worker.sessions["s"]
    assert conv is not None and conv.fmt is run_session.fmt  # back to the session's system block
    plain = item_session(models, HISTORY)
    default = respond_to(plain, "a2")
    assert own.reply is not None and default.reply is not None
    assert not torch.allclose(own.reply.hiddens[0], default.reply.hiddens[0])


def test_truncate_cuts_a_finished_reply_and_set_instructions_rebuilds_the_prompt(models: Models) -> None:
    worker = item_session(models, [HistoryItem("u1", "user", audio=speech(1))])
    cap = respond_to(worker, "a1", forced=ForcedLength(9, 8))
    conv = worker.sessions["s"].conversation
    assert conv is not None and len(conv.messages[-1].content) == 9
    worker.truncate_item("s", "a1", 400.0)  # the first block: 3 tokens heard
    assert conv.messages[-1].content == cap.reply.text_ids[:3]  # type: ignore[union-attr]
    worker.truncate_item("s", "a1", 10_000.0)  # never grows back
    assert len(conv.messages[-1].content) == 3
    worker.truncate_item("s", "missing", 10.0)  # unknown ids are ignored
    worker.set_instructions("s", "You are a terse assistant.")
    assert conv.kv_len < len(conv.fmt.system) + 1
    assert isinstance(respond_to(worker, "a2").done, ResponseDone)


def test_a_speech_turn_that_fails_forgets_its_user_item(models: Models) -> None:
    worker = make_worker(models, context_tokens=200)
    worker.open("s", 0, None)
    cap = Capture()
    worker.submit("s", GREEDY, speech(1), TurnTimings(0.0), ForcedLength(3, 5), cap.events.append, item_id="u1")
    run(worker, {"s": cap})
    assert cap.done.code == "context_overflow" and ids(worker) == []


@pytest.mark.parametrize("bad", [dict(role="robot", text="x"), dict(role="assistant", audio=np.zeros(10)),
                                 dict(role="user"), dict(role="user", text="a", audio=np.zeros(3))])
def test_history_items_are_checked_when_built(bad: dict[str, Any]) -> None:
    with pytest.raises(TurnRejected, match="expected"):
        HistoryItem("x", **bad)


# ---------------------------------------------------------------------------------------------- speculation
def speculate(worker: ModelWorker, audio: np.ndarray, *, speculative: bool, forced: ForcedLength = SHORT) -> Capture:
    cap = Capture()
    worker.submit("s", GREEDY, audio, TurnTimings(0.0), forced, cap.events.append, item_id="u2",
                  speculative=speculative)
    return cap


def test_a_confirmed_speculative_turn_gives_exactly_the_ordinary_turns_reply(models: Models) -> None:
    replies = {}
    for speculative in (False, True):
        worker = item_session(models, HISTORY[:3])
        cap = speculate(worker, speech(9), speculative=speculative)
        for _ in range(3):  # it runs before its confirmation (there is slack)...
            worker.step()
        if speculative:
            worker.confirm("s")  # ...and goes on as an ordinary turn
            assert worker.sessions["s"].turn.timings.confirmed is not None  # type: ignore[union-attr]
        run(worker, {"s": cap})
        assert isinstance(cap.done, ResponseDone) and cap.done.reason == "max_tokens"
        replies[speculative] = cap
    ordinary, confirmed = replies[False], replies[True]
    assert ordinary.reply is not None and confirmed.reply is not None
    assert confirmed.reply.text_ids == ordinary.reply.text_ids and confirmed.text() == ordinary.text()
    assert confirmed.units() == ordinary.units()
    a, b = confirmed.audio(), ordinary.audio()
    assert len(a) == len(b) > 0 and float(np.abs(a - b).max()) == 0.0  # same seeds, same batch: bit for bit


@pytest.mark.parametrize("ended", [False, True])
def test_a_discarded_speculative_turn_leaves_no_trace(models: Models, ended: bool) -> None:
    worker = item_session(models, HISTORY[:3])
    respond_to(worker, "a1b")
    conv = worker.sessions["s"].conversation
    assert conv is not None
    before = ([m.id for m in conv.messages], conv.length, conv.kv_len)
    cap = speculate(worker, speech(9), speculative=True)
    if ended:  # the whole reply was made during the pause, before the caller went on
        run(worker, {"s": cap})
        assert isinstance(cap.done, ResponseDone) and cap.done.reason == "max_tokens"
        worker.discard("s")
    else:
        for _ in range(4):
            worker.step()
        worker.discard("s")  # the caller spoke again: within one step, nothing of the turn is left
        assert isinstance(cap.done, ResponseDone) and cap.done.reason == "discarded" and cap.done.speculative
    assert not worker.busy and worker.sessions["s"].turn is None and worker.stats.discarded == 1
    # The history is as it was; the KV may keep the footer of the last reply, which the speculative prefill fed
    # and which belongs to that history anyway.
    assert ([m.id for m in conv.messages], conv.length) == before[:2] and conv.kv_len <= conv.length
    # The next reply equals the one a session that never speculated gives.
    after = speculate(worker, speech(10), speculative=False)
    run(worker, {"s": after})
    plain = item_session(models, HISTORY[:3])
    respond_to(plain, "a1b")
    expected = speculate(plain, speech(10), speculative=False)
    run(plain, {"s": expected})
    assert after.reply is not None and expected.reply is not None
    assert after.reply.text_ids == expected.reply.text_ids
    torch.testing.assert_close(torch.stack(after.reply.hiddens), torch.stack(expected.reply.hiddens),
                               atol=1e-5, rtol=1e-4)


def test_a_speculative_turns_transcript_waits_for_its_confirmation(tiny_root: Path, models: Models) -> None:
    from voice_agent.engine.api import TranscriptDone
    from voice_agent.engine.build import load_transcriber

    transcriber, reason = load_transcriber(models.lm, tiny_root / "LLaMA-Omni2-tiny", None)
    assert transcriber is not None, reason
    with_transcripts = Models(models.lm, models.decoder, transcriber=transcriber, transcriber_unavailable="")
    for confirmed in (False, True):
        worker = make_worker(with_transcripts)
        heard: list[Any] = []
        worker.open("s", 0, None, heard.append)
        cap = Capture()
        worker.submit("s", GREEDY, speech(9), TurnTimings(0.0), SHORT, cap.events.append, item_id="u",
                      transcribe=True, speculative=True)
        run(worker, {"s": cap})  # the whole reply is made during the pause
        assert heard == []  # encoded, but no transcript while the turn may still be dropped
        worker.confirm("s") if confirmed else worker.discard("s")
        for _ in range(2000):
            if not worker.busy:
                break
            worker.step()
        done = [e for e in heard if isinstance(e, TranscriptDone)]
        assert (len(done) == 1 and done[0].item_id == "u") if confirmed else heard == []

