"""The load test's measuring core: the playback simulation, trimming, the corpus, each dialect's reading of
the wire (tables), one turn's figures from known times, and one caller per protocol against the real server
on the tiny demo model (figures checked for presence, never timed)."""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
from realtime_client import realtime_server
from serving import free_socket

from voice_agent.errors import AudioInputError, ConfigError
from voice_agent.tools.loadtest.caller import (
    Microphone,
    Reply,
    Spoken,
    Turn,
    run_caller,
    simulate_playback,
    turn_record,
)
from voice_agent.tools.loadtest.corpus import TRIM_FRAME_SAMPLES, load_corpus, trim_silence
from voice_agent.tools.loadtest.dialects import (
    FRAME_SAMPLES,
    TWILIO_QUIET_S,
    Heard,
    Kind,
    NativeClient,
    OpenAIClient,
    TwilioClient,
    endpoint_url,
)
from voice_agent.tools.loadtest.records import SCHEMA_VERSION, TurnRecord, Utterance

KEY = "loadtest-key-0123"


# ---- playback ---------------------------------------------------------------------------------------------
def test_a_paced_reply_plays_without_underruns() -> None:
    paced = [(i * 20.0, 20.0) for i in range(50)]  # one 20 ms chunk every 20 ms
    p = simulate_playback(paced, jitter_ms=0.0)
    assert (p.started, p.ended, p.underruns, p.underrun_total_ms, p.underrun_worst_ms, p.max_gap_ms) == \
        (0.0, 1000.0, 0, 0.0, 0.0, 20.0)


def test_a_late_chunk_is_an_underrun_of_the_wait_and_play_resumes_at_its_arrival() -> None:
    chunks = [(0.0, 40.0), (20.0, 40.0), (200.0, 40.0), (210.0, 40.0), (400.0, 20.0)]
    p = simulate_playback(chunks, jitter_ms=60.0)
    # plays from 60; buffer dry at 140, chunk at 200 (60 ms); then dry at 280, chunk at 400 (120 ms)
    assert (p.started, p.ended, p.underruns, p.underrun_total_ms, p.underrun_worst_ms, p.max_gap_ms) == \
        (60.0, 420.0, 2, 180.0, 120.0, 190.0)


def test_the_jitter_buffer_absorbs_a_gap_shorter_than_itself() -> None:
    chunks = [(0.0, 20.0), (70.0, 20.0)]  # 50 ms late by real time, inside a 60 ms buffer
    assert simulate_playback(chunks, jitter_ms=60.0).underruns == 0
    assert simulate_playback(chunks, jitter_ms=0.0).underrun_total_ms == 50.0


def test_no_audio_plays_nothing() -> None:
    p = simulate_playback([], jitter_ms=60.0)
    assert (p.started, p.ended, p.underruns, p.max_gap_ms) == (None, None, 0, 0.0)


# ---- trimming and the corpus ------------------------------------------------------------------------------
def test_trimming_keeps_whole_10ms_frames_from_the_first_to_the_last_loud_one() -> None:
    x = np.concatenate([np.zeros(1000), np.full(1600, 0.5), np.zeros(800)]).astype(np.float32)
    y = trim_silence(x)
    # loud from 1000 to 2600: frames 6 (960..1120, 120 loud samples) to 16 (2560..2720, 40 loud samples)
    assert y.size == 2720 - 960
    np.testing.assert_array_equal(y, x[960:2720])


def test_trimming_drops_a_tail_40_db_under_the_speech_and_anything_under_the_floor() -> None:
    speech, breath = np.full(3200, 0.5), np.full(1600, 0.5 * 10 ** (-45 / 20))  # 45 dB down
    x = np.concatenate([speech, breath]).astype(np.float32)
    assert trim_silence(x).size == 3200
    assert trim_silence(np.full(16000, 5e-4, np.float32)).size == 0  # all under TRIM_FLOOR_RMS
    assert trim_silence(np.zeros(0, np.float32)).size == 0
    odd = np.concatenate([np.zeros(TRIM_FRAME_SAMPLES), np.full(50, 0.5)]).astype(np.float32)
    assert trim_silence(odd).size == 50  # a last partial frame is judged on its own samples


def test_the_bundled_corpus_is_ten_trimmed_16khz_questions() -> None:
    corpus = load_corpus(None)
    assert len(corpus) == 10 and len({u.name for u in corpus}) == 10
    for u in corpus:
        assert u.pcm16k.dtype == np.float32 and u.pcm16k.ndim == 1
        assert 1.0 <= u.seconds <= 3.0, (u.name, u.seconds)
        assert trim_silence(u.pcm16k).size == u.pcm16k.size, f"{u.name} has silence left at an end"
    sources = (Path(__file__).parents[2] / "voice_agent/tools/loadtest/corpus/SOURCES.md").read_text()
    assert all(f"{u.name}.wav" in sources for u in corpus)


def test_user_speech_is_resampled_and_trimmed(tmp_path: Path) -> None:
    rate = 44100
    tone = 0.3 * np.sin(2 * np.pi * 220 * np.arange(rate) / rate)  # 1 s
    sf.write(tmp_path / "b.flac", np.concatenate([np.zeros(rate // 2), tone, np.zeros(rate)]), rate)
    sf.write(tmp_path / "a.wav", tone, rate, subtype="PCM_16")
    (tmp_path / "notes.txt").write_text("not speech")
    corpus = load_corpus(str(tmp_path))
    assert [u.name for u in corpus] == ["a", "b"]
    assert all(abs(u.seconds - 1.0) <= 0.011 for u in corpus), [u.seconds for u in corpus]


def test_missing_empty_or_silent_speech_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="expected a directory"):
        load_corpus(str(tmp_path / "nowhere"))
    with pytest.raises(ConfigError, match="found none"):
        load_corpus(str(tmp_path))
    sf.write(tmp_path / "quiet.wav", np.zeros(16000), 16000)
    with pytest.raises(AudioInputError, match="quiet.wav"):
        load_corpus(str(tmp_path))


# ---- the dialects -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(("url", "protocol", "expected"), [
    ("ws://h:8000", "native", "ws://h:8000/ws"),
    ("http://h:8000/", "twilio", "ws://h:8000/twilio"),
    ("https://h", "openai", "wss://h/v1/realtime?model=voice-agent"),
    ("ws://h:8000/v1/realtime?model=x", "openai", "ws://h:8000/v1/realtime?model=x"),
    ("ws://h:8000/proxy/ws", "native", "ws://h:8000/proxy/ws"),
])
def test_a_url_without_a_path_gets_the_protocols_endpoint(url: str, protocol: str, expected: str) -> None:
    assert endpoint_url(url, protocol) == expected  # type: ignore[arg-type]


def kinds(heard: list[Heard]) -> list[tuple[Kind, float]]:
    return [(h.kind, h.audio_ms) for h in heard]


def test_native_messages() -> None:
    c = NativeClient("ws://h", key=None, jitter_ms=60.0)
    assert kinds(c.decode(json.dumps({"type": "response.started", "response_id": "r1"}), 1.0)) == \
        [(Kind.REPLY_STARTED, 0.0)]
    assert kinds(c.decode(bytes(960), 1.1)) == [(Kind.AUDIO, 20.0)]  # PCM16 24 kHz: 48 bytes a ms
    done = c.decode(json.dumps({"type": "response.done", "response_id": "r1", "reason": "eos",
                                "timings": {"first_audio": 700, "done": None}}), 1.2)
    assert done == [Heard(Kind.REPLY_DONE, 1.2, "r1", timings={"first_audio": 700.0, "done": None})]
    assert c.decode(json.dumps({"type": "speech.stopped", "turn": False, "response_id": None}), 1.3) == []
    assert c.decode(json.dumps({"type": "interrupted", "response_id": "r1", "played_ms": 10}), 1.4) == \
        [Heard(Kind.INTERRUPTED, 1.4, "r1")]
    assert c.decode(bytes(960), 1.5) == []  # in flight after `interrupted`: dropped, as clients must
    error = c.decode(json.dumps({"type": "error", "code": "internal_error", "message": "m", "fatal": True}), 1.6)
    assert error == [Heard(Kind.ERROR, 1.6, text="internal_error: m", fatal=True)]


def test_openai_messages() -> None:
    c = OpenAIClient("ws://h", key=KEY, jitter_ms=60.0)
    assert c._headers() == {"Authorization": f"Bearer {KEY}"}
    delta = {"type": "response.output_audio.delta", "response_id": "r", "delta": base64.b64encode(bytes(480)).decode()}
    assert kinds(c.decode(json.dumps(delta), 1.0)) == [(Kind.AUDIO, 10.0)]
    cancelled = {"type": "response.done", "response": {"id": "r", "status": "cancelled"}}
    assert [(h.kind, h.cancelled) for h in c.decode(json.dumps(cancelled), 2.0)] == \
        [(Kind.INTERRUPTED, False), (Kind.REPLY_DONE, True)]
    assert [h.kind for h in c.decode(json.dumps({"type": "input_audio_buffer.speech_stopped"}), 3.0)] == \
        [Kind.SPEECH_STOPPED]
    assert [len(json.loads(m)["audio"]) for m in c.encode_frame(np.zeros(FRAME_SAMPLES, np.float32))] != []


def test_twilio_plays_marks_before_echoing_them_and_clear_echoes_them_at_once() -> None:
    c = TwilioClient("ws://h", key=KEY, jitter_ms=60.0)
    media = json.dumps({"event": "media", "media": {"payload": base64.b64encode(bytes(160)).decode()}})
    assert kinds(c.decode(media, 10.0)) == [(Kind.REPLY_STARTED, 0.0), (Kind.AUDIO, 20.0)]
    assert kinds(c.decode(media, 10.01)) == [(Kind.AUDIO, 20.0)]
    assert c.decode(json.dumps({"event": "mark", "mark": {"name": "r:40"}}), 10.02) == []
    assert c.due_marks(10.09) == [] and c.due_marks(10.1) == ["r:40"]  # plays 10.06 .. 10.10
    assert c.quiet(10.01 + TWILIO_QUIET_S - 0.01) == []
    assert c.quiet(10.01 + TWILIO_QUIET_S) == [Heard(Kind.REPLY_DONE, 10.01)]  # at the last frame's time
    c.decode(media, 20.0)
    c.decode(json.dumps({"event": "mark", "mark": {"name": "r2:20"}}), 20.0)
    assert [(h.kind, h.cancelled) for h in c.decode(json.dumps({"event": "clear"}), 20.01)] == \
        [(Kind.INTERRUPTED, False), (Kind.REPLY_DONE, True)]
    assert c.due_marks(20.01) == ["r2:20"]
    frame = json.loads(c.encode_frame(np.zeros(FRAME_SAMPLES, np.float32))[0])
    assert frame["event"] == "media" and len(base64.b64decode(frame["media"]["payload"])) > 0


# ---- the caller's clock and one turn's figures ------------------------------------------------------------
async def test_the_microphone_dates_speech_by_its_samples_in_the_frames_it_sends() -> None:
    sent: list[tuple[float, np.ndarray]] = []

    async def send(frame: np.ndarray) -> None:
        sent.append((time.monotonic(), frame))

    mic = Microphone(send, lambda: None)
    task = asyncio.create_task(mic.run())
    await asyncio.sleep(0.05)
    spoken = mic.say(Utterance("u", np.full(FRAME_SAMPLES + 80, 0.25, np.float32)))  # one frame + 5 ms
    while spoken.end is None:
        await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    task.cancel()
    speech = [i for i, (_, f) in enumerate(sent) if f.any()]
    assert len(speech) == 2 and speech[1] == speech[0] + 1
    first_t, last_t = sent[speech[0]][0], sent[speech[1]][0]
    assert spoken.start == pytest.approx(first_t - 0.02, abs=2e-3)
    assert spoken.end == pytest.approx(last_t - 0.02 + 80 / 16000, abs=2e-3)
    assert np.count_nonzero(sent[speech[1]][1]) == 80  # the last frame padded with silence
    assert all(f.shape == (FRAME_SAMPLES,) for _, f in sent)


def test_a_turns_figures_are_ms_after_its_end_of_speech() -> None:
    spoken = Spoken(Utterance("q", np.ones(16000, np.float32)), start=99.0, end=100.0)
    reply = Reply(100.5, "r1", chunks=[(100.8, 40.0), (100.82, 40.0), (101.0, 40.0)], first_text=100.7,
                  done=101.1, timings={"first_audio": 750.0})
    turn = Turn(3, spoken, replies=[reply], speech_stopped=100.6)
    r = turn_record(turn, caller=2, protocol="native", jitter_ms=60.0, error=None)
    assert (r.caller, r.turn, r.utterance, r.speech_s, r.speech_end) == (2, 3, "q", 1.0, 100.0)
    assert (r.speech_stopped_ms, r.first_text_ms, r.first_audio_ms, r.reply_done_ms) == \
        pytest.approx((600.0, 700.0, 800.0, 1100.0))
    assert r.reply_audio_ms == 120.0 and r.rtf == pytest.approx(300.0 / 120.0)
    # plays from 860; dry at 940 before the chunk at 1000: one underrun of 60 ms
    assert (r.underruns, r.underrun_total_ms, r.max_gap_ms) == (1, pytest.approx(60.0), pytest.approx(180.0))
    assert r.server_timings == {"first_audio": 750.0} and not r.early and not r.barge_in and r.error is None
    early = turn_record(Turn(0, spoken, replies=[Reply(99.5, None, chunks=[(99.9, 20.0)], done=100.2)]),
                        caller=0, protocol="openai", jitter_ms=60.0, error=None)
    assert early.early and early.first_audio_ms == pytest.approx(-100.0)


def test_a_barged_turn_measures_from_the_onset() -> None:
    spoken = Spoken(Utterance("q", np.ones(16000, np.float32)), start=99.0, end=100.0)
    reply = Reply(100.5, "r1", chunks=[(101.0, 500.0), (101.5, 500.0), (102.2, 500.0)], interrupted=102.5,
                  done=102.6, cancelled=True)
    turn = Turn(0, spoken, replies=[reply], barge_onset=102.0, barged=reply)
    r = turn_record(turn, caller=0, protocol="native", jitter_ms=60.0, error=None)
    assert r.barge_in and r.barge_onset_to_last_audio_ms == pytest.approx(200.0)
    assert r.barge_onset_to_interrupted_ms == pytest.approx(500.0)
    assert r.reply_audio_ms == 1500.0


def test_a_record_is_json_with_every_field() -> None:
    r = turn_record(Turn(0, Spoken(Utterance("q", np.ones(160, np.float32)), 1.0, 2.0)), caller=0,
                    protocol="twilio", jitter_ms=60.0, error="no reply")
    row = json.loads(json.dumps(r.to_json()))
    assert set(row) == {f for f in TurnRecord.__dataclass_fields__} and SCHEMA_VERSION == 1
    assert row["error"] == "no reply" and row["first_audio_ms"] is None


# ---- against the real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The embedded demo model (a short reply), with an API key every dialect must present."""
    with realtime_server(tmp_path_factory.mktemp("loadtest"), api_key=KEY) as addr:
        yield addr


async def test_one_caller_per_protocol_gets_answered_turns(server: str) -> None:
    corpus = load_corpus(None)
    records: dict[str, list[TurnRecord]] = {"native": [], "openai": [], "twilio": []}
    deadline = time.monotonic() + 25.0  # a bound; each caller hangs up after its one turn has played
    started = time.monotonic()
    await asyncio.gather(*(
        run_caller(f"ws://{server}", protocol, caller=i, corpus=corpus, deadline=deadline, max_turns=1,  # type: ignore[arg-type]
                   barge_in=0.0, key=KEY, seed=i, on_turn=records[protocol].append)
        for i, protocol in enumerate(records)))
    assert time.monotonic() < deadline, "the callers ran to the deadline instead of hanging up after one turn"
    print(f"three callers, one turn each: {time.monotonic() - started:.1f} s")
    for protocol, rows in records.items():
        assert len(rows) == 1, (protocol, rows)
        r = rows[0]
        assert r.error is None and not r.cut, (protocol, r)
        assert r.first_audio_ms is not None and r.first_audio_ms > 0 and r.reply_audio_ms > 0, (protocol, r)
        assert r.reply_done_ms is not None and r.rtf is not None and r.reply_started_ms is not None
        assert (r.speech_stopped_ms is not None) == (protocol != "twilio"), (protocol, r)
        assert (r.first_text_ms is not None) == (protocol != "twilio"), (protocol, r)
        assert bool(r.server_timings) == (protocol == "native"), (protocol, r)
        json.dumps(r.to_json())


async def test_a_refused_or_unreachable_call_is_one_failed_record(server: str) -> None:
    sock = free_socket()  # bound, never listening: nothing answers
    closed = f"ws://127.0.0.1:{sock.getsockname()[1]}"
    for url, protocol, key in ((closed, "native", None), (f"ws://{server}", "native", "wrong-key-9876"),
                               (f"ws://{server}", "openai", "wrong-key-9876"),
                               (f"ws://{server}", "twilio", "wrong-key-9876")):
        rows: list[TurnRecord] = []
        await run_caller(url, protocol, caller=0, corpus=load_corpus(None), deadline=time.monotonic() + 10,  # type: ignore[arg-type]
                         max_turns=None, barge_in=0.0, key=key, seed=0, on_turn=rows.append)
        assert len(rows) == 1 and rows[0].error and rows[0].first_audio_ms is None, (url, protocol, rows)
    sock.close()


async def test_a_barge_in_is_interrupted_and_the_next_turn_answered(tmp_path: Path) -> None:
    """Plain random tiny weights: replies still going seconds after they start, so there is one to cut."""
    corpus = load_corpus(None)
    records: dict[str, list[TurnRecord]] = {"native": [], "openai": [], "twilio": []}
    with realtime_server(tmp_path, long_replies=True) as addr:
        deadline = time.monotonic() + 10.0  # turn 0 barged at ~4.5 s, turn 1 answered at ~7.5 s
        await asyncio.gather(*(
            run_caller(f"ws://{addr}", protocol, caller=i, corpus=corpus, deadline=deadline, max_turns=3,  # type: ignore[arg-type]
                       barge_in=1.0, key=None, seed=i, on_turn=records[protocol].append)
            for i, protocol in enumerate(records)))
    for protocol, rows in records.items():
        assert [r.turn for r in rows] == list(range(len(rows))) and len(rows) >= 2, (protocol, rows)
        first = rows[0]
        assert first.error is None and first.barge_in and first.first_audio_ms is not None, (protocol, first)
        assert first.barge_onset_to_interrupted_ms is not None and first.barge_onset_to_interrupted_ms > 0
        assert first.barge_onset_to_last_audio_ms is not None, (protocol, first)
        assert first.next_turn_answered is True, (protocol, rows)
