"""Phone calls end to end: the carrier simulator (tests/telephony_sim.py, written from the carriers' documents)
against the real server on the tiny model, over Twilio's, Telnyx's, Plivo's and Vonage's wires.

The caller speaks espeak-ng English on a line that streams 20 ms frames in real time and never stops; the
far end plays the reply in real time behind a jitter buffer and answers the server's playback markers as the
carrier does. Two servers, as `voice-agent serve` builds them without weights: the embedded demo model (a
short reply, for a whole turn) and plain random tiny weights (replies that run for tens of seconds, for the
barge-in). Every test ends with the caller hanging up the carrier's way, then checks that the server closed
cleanly (Twilio, Telnyx: `stop` -> close 1000) and released the engine session (its /metrics).

A carrier whose route is not in the app yet is skipped with that reason.

Needs: espeak-ng (apt).
"""

from __future__ import annotations

import asyncio
import shutil
from collections.abc import Iterator

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from realtime_client import realtime_server
from telephony_sim import CARRIERS, FRAME_MS, Call, Received, espeak_speech, heard

from voice_agent.serve.config import ServerConfig
from voice_agent.tools.bench_calls import ahead_ms, gaps_ms, percentile

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt)")

PATHS = {"twilio": "/twilio", "telnyx": "/telephony/telnyx", "plivo": "/telephony/plivo",
         "vonage": "/telephony/vonage"}
FIRST = "Hello, can you hear me? I would like to book a table for two."
SECOND = "wait I would rather hear a joke about the weather instead"  # no pause: one turn
LEAD_MS = ServerConfig().telephony_lead_ms
BURST_SLACK_MS = 60  # scheduling on a shared 2-core machine: the client and server loops share the CPUs
LEAD_IN_S = 0.5  # line silence before the first word
QUIET_S = 1.5  # no audio this long after a reply: it is over (the demo reply is one piece)
RELEASE_TIMEOUT_S = 10.0


def app_paths() -> set[str]:
    """The carrier paths the app serves: /twilio, and /telephony/<name> for each carrier it knows."""
    from fakes import FakeEngine

    from voice_agent.serve import app

    paths = {getattr(route, "path", "") for route in app.build_app(ServerConfig(), FakeEngine()).routes}
    carriers = getattr(app, "CARRIERS", {}) if "/telephony/{carrier:str}" in paths else {}
    return paths | {f"/telephony/{name}" for name in carriers}


@pytest.fixture(scope="module")
def routes() -> set[str]:
    return app_paths()


@pytest.fixture(scope="module")
def speech(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[np.ndarray, int]]:
    folder = tmp_path_factory.mktemp("speech")
    return {text: espeak_speech(text, folder / f"{i}.wav") for i, text in enumerate((FIRST, SECOND))}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The demo model: a short reply."""
    with realtime_server(tmp_path_factory.mktemp("demo")) as addr:
        yield addr


@pytest.fixture(scope="module")
def long_reply_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Plain random tiny weights: replies still generating seconds after they start."""
    with realtime_server(tmp_path_factory.mktemp("long"), long_replies=True) as addr:
        yield addr


def call_to(carrier: str, addr: str, routes: set[str], **kwargs: object) -> Call:
    path = PATHS[carrier]
    if path not in routes:
        pytest.skip(f"the app has no {path} route yet ({carrier} telephony adapter not landed)")
    return CARRIERS[carrier](f"ws://{addr}{path}", **kwargs)  # type: ignore[arg-type]


# ---- what the server must do on every carrier ---------------------------------------------------------------
def frame_bytes(call: Call) -> int:
    return FRAME_MS * call.line_rate_hz // 1000 * (2 if call.carrier == "vonage" else 1)


def check_reply_frames(call: Call, media: list[Received]) -> None:
    """20 ms frames in the carrier's format (the last of a reply may be shorter), carrying sound."""
    assert media, f"{call.carrier}: no reply audio\n{call.dump()}"
    assert all(r.audio_ms == FRAME_MS for r in media[:-1]), \
        f"{call.carrier}: reply frames of {sorted({r.audio_ms for r in media})} ms, expected {FRAME_MS}\n" \
        f"{call.dump(records=media)}"
    assert 0 < media[-1].audio_ms <= FRAME_MS, call.dump(records=media[-3:])
    if call.carrier == "plivo":  # the codec the stream started with
        formats = {(r.message["media"]["contentType"], r.message["media"]["sampleRate"]) for r in media}
        assert formats == {("audio/x-mulaw", 8000)}, formats
    if call.carrier == "vonage":
        assert {len(r.message) for r in media[:-1]} <= {frame_bytes(call)}, {len(r.message) for r in media}
    audio = heard(call, media)
    assert float(np.sqrt(np.mean(audio**2))) > 1e-3, f"{call.carrier}: the reply is silent"


def check_paced(call: Call, media: list[Received]) -> None:
    """Real time, at most the lead ahead: never a burst of the whole reply."""
    frames = [(r.t, r.audio_ms) for r in media]
    burst = ahead_ms(frames)
    gaps = gaps_ms([r.t for r in media])
    figures = (f"{len(media)} frames; gaps ms p50 {percentile(gaps, 50):.1f} p99 {percentile(gaps, 99):.1f} "
               f"max {max(gaps, default=0):.1f}; burst {burst:.0f} ms")
    assert burst <= LEAD_MS + FRAME_MS + BURST_SLACK_MS, f"{call.carrier}: audio {figures} ahead of real time " \
        f"(lead {LEAD_MS} ms)\n{call.dump(records=media[:30])}"
    if len(media) >= 25:  # a reply long enough to have a steady rate: about one frame per 20 ms
        elapsed_ms = (media[-1].t - media[0].t) * 1000
        assert elapsed_ms >= sum(r.audio_ms for r in media[:-1]) - LEAD_MS - BURST_SLACK_MS, figures


def check_markers(call: Call) -> None:
    """A marker after audio, each one answered once the audio before it played (or flushed)."""
    assert call.server_marks, f"{call.carrier}: the server sent no playback marker\n{call.dump()}"
    kinds = call.kinds()
    assert kinds.index("media") < kinds.index("mark"), f"{call.carrier}: a marker before any audio\n{call.dump()}"
    marks = [m for _, m in call.server_marks]
    hashable = [repr(m) for m in marks]
    assert len(set(hashable)) == len(hashable), f"{call.carrier}: marker names repeat: {marks}"
    last_media = max(i for i, k in enumerate(kinds) if k == "media")
    assert "mark" in kinds[last_media:], f"{call.carrier}: no marker after the last audio\n{call.dump()}"


async def released(addr: str, timeout: float = RELEASE_TIMEOUT_S) -> dict[str, float]:
    """Wait until the server has no open session and no engine session; returns the last figures read."""
    figures: dict[str, float] = {}
    async with httpx.AsyncClient(base_url=f"http://{addr}") as client:
        deadline = asyncio.get_running_loop().time() + timeout
        while True:
            text = (await client.get("/metrics")).text
            figures = {}
            for family in text_string_to_metric_families(text):
                for sample in family.samples:
                    if sample.name in ("voice_agent_sessions_active", "voice_agent_engine_sessions"):
                        figures[sample.name] = figures.get(sample.name, 0.0) + sample.value
            if not any(figures.values()):
                return figures
            if asyncio.get_running_loop().time() > deadline:
                raise AssertionError(f"sessions still open {timeout:g} s after the call ended: {figures}")
            await asyncio.sleep(0.1)


async def hang_up_cleanly(call: Call, addr: str) -> None:
    await call.hang_up()
    if call.carrier in ("twilio", "telnyx"):  # `stop` ends the call: the server closes, normally
        assert call.closed_by_server and call.close_code == 1000, \
            f"{call.carrier}: after stop, expected the server to close with 1000, got " \
            f"{call.close_code} {call.close_reason!r} (closed by server: {call.closed_by_server})\n{call.dump(10)}"
    else:  # the carrier closed the socket
        assert call.closed
    await released(addr)


# ---- a whole turn -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("carrier", list(PATHS))
async def test_call_with_one_turn(carrier: str, server: str, routes: set[str],
                                  speech: dict[str, tuple[np.ndarray, int]]) -> None:
    async with call_to(carrier, server, routes, custom={"caller": "sim"}) as call:
        await asyncio.sleep(LEAD_IN_S)
        await call.dtmf("5")  # reported to the session; the call goes on
        utt = await call.speak(*speech[FIRST])
        assert utt.end_t is not None
        first_audio = await call.until_audio(after=0.0, ms=FRAME_MS)
        await call.until_quiet(QUIET_S)
        await call.wait_for(lambda: len(call.echoes) >= len(call.server_marks), 5.0, "every marker answered")
        media = call.media()
        assert first_audio >= utt.end_t, f"{call.carrier}: reply audio before the caller finished\n{call.dump()}"
        assert not call.violations, f"{call.carrier}: " + "\n".join(call.violations[:5])
        assert not [t for t, _ in call.clears if t >= first_audio], \
            f"{call.carrier}: a clear with nobody interrupting the reply\n{call.dump()}"
        check_reply_frames(call, media)
        check_paced(call, media)
        check_markers(call)
        assert all(not e.cleared for e in call.echoes)
        await hang_up_cleanly(call, server)


# ---- barge-in ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("carrier", list(PATHS))
async def test_barge_in_clears_the_reply_and_the_next_one_follows(
        carrier: str, long_reply_server: str, routes: set[str], speech: dict[str, tuple[np.ndarray, int]]) -> None:
    async with call_to(carrier, long_reply_server, routes) as call:
        await asyncio.sleep(LEAD_IN_S)
        first = await call.speak(*speech[FIRST])
        await call.until_audio(after=0.0, ms=1000)  # the reply is playing and goes on
        await call.until_played(600)
        assert not call.clears, call.dump()
        barge = call.say(*speech[SECOND])
        cleared_at = await call.until_clear(after=0.0, timeout=20.0)
        await call.wait_for(lambda: barge.sent, 20.0, "the barge-in spoken")
        assert barge.start_t is not None and barge.end_t is not None and first.end_t is not None
        assert cleared_at >= barge.start_t, f"{call.carrier}: clear before the caller spoke again\n{call.dump()}"
        before = call.media(before=cleared_at)
        late = call.media(after=cleared_at, before=barge.end_t)
        assert not late, f"{call.carrier}: {len(late)} frames of the interrupted reply after its clear\n" \
            f"{call.dump(records=call.received[-len(late) - 5:])}"
        check_paced(call, before)
        # the next reply: after the caller finished
        second_audio = await call.until_audio(after=barge.end_t, ms=400, timeout=30.0)
        assert second_audio >= barge.end_t
        after = call.media(after=barge.end_t)
        check_reply_frames(call, after[:-1] if len(after) > 1 else after)
        check_paced(call, after)
        assert not call.violations, f"{call.carrier}: " + "\n".join(call.violations[:5])
        assert len(call.clears) == 1, f"{call.carrier}: {len(call.clears)} clears\n{call.dump()}"
        # hanging up in the middle of the second reply: the call still ends cleanly
        await hang_up_cleanly(call, long_reply_server)


# ---- the end of a call ------------------------------------------------------------------------------------
@pytest.mark.parametrize("carrier", list(PATHS))
async def test_hang_up_before_speaking_releases_the_session(carrier: str, server: str, routes: set[str]) -> None:
    async with call_to(carrier, server, routes) as call:
        await asyncio.sleep(0.3)
        await hang_up_cleanly(call, server)
        assert not call.media() and not call.violations, call.dump()


def test_simulator_speaker_echoes_marks_after_their_audio() -> None:
    """The simulator's own contract (no server): marks come back when the audio before them has played, a
    mark with nothing queued at once, and a flush returns the marks it dropped."""
    from telephony_sim import Speaker

    s = Speaker(jitter_ms=40)
    s.push_mark(0.0, "idle")
    assert s.advance(0.0) == ["idle"]
    s.push_audio(0.0, 20)
    s.push_audio(0.01, 20)
    s.push_mark(0.01, "a")
    s.push_audio(0.02, 20)
    s.push_mark(0.02, "b")
    assert s.advance(0.035) == []  # jitter buffer filled at 0.01; 25 ms played
    s.push_audio(0.051, 20)  # 41 ms played: "a" reached, returned by the next advance
    assert s.advance(0.052) == ["a"]
    assert s.played_ms == pytest.approx(42, abs=1.5)
    dropped, dropped_ms = s.clear(0.06)
    assert dropped == ["b"] and dropped_ms == pytest.approx(30, abs=1.5)
    s.push_mark(0.07, "c")
    assert s.advance(0.07) == ["c"]
    assert s.buffered_ms == 0

