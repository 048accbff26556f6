"""openai-agents' RealtimeRunner against the real server at /v1/realtime, with its default session settings.

openai-agents validates every server event against the GA pydantic types and logs "Failed to validate
server event" (and emits an error event) for one it refuses (protocols.md 5.1). One spoken turn with its
defaults (semantic_vad, voice `ash`, user transcripts by `gpt-4o-mini-transcribe`) must get through without
any of that, play reply audio and end the agent's turn. The server is the embedded demo model; the user
speaks with espeak-ng's voice, streamed in real time through `session.send_audio`.

Needs: espeak-ng (apt) and the test extra's openai-agents.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
from collections.abc import Iterator
from typing import Any

import pytest
from realtime_client import (
    EVENT_TIMEOUT_S,
    RESPONSE_ORDER,
    espeak_pcm,
    event_order,
    ga_server_event_problem,
    microphone,
    realtime_server,
    silence,
)

realtime = pytest.importorskip("agents.realtime", reason="needs the test extra's openai-agents")

pytestmark = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt)")

KEY = "sk-test-0123456789"
SPOKEN = "Hello, can you hear me?"
LEAD_MS = 300


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with realtime_server(tmp_path_factory.mktemp("demo"), api_key=KEY) as addr:
        yield addr


@pytest.fixture(autouse=True)
def no_tracing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The SDK's own trace export would try to reach OpenAI."""
    monkeypatch.setenv("OPENAI_AGENTS_DISABLE_TRACING", "1")


def _transcript_in(history: dict[str, Any], raw: list[dict]) -> bool:
    """Whether the session's history holds the user item's transcript yet (openai-agents fills it in from the
    transcription event)."""
    done = [e for e in raw if e["type"] == "conversation.item.input_audio_transcription.completed"]
    if not done:
        return False
    item = history.get(done[0]["item_id"])
    content = getattr(item, "content", None) or []
    return any(getattr(part, "transcript", None) for part in content)


async def test_runner_turn_with_default_settings(server: str, tmp_path: Any,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="openai.agents")
    speech = espeak_pcm(SPOKEN, tmp_path / "spoken.wav")
    agent = realtime.RealtimeAgent(name="Assistant", instructions="Be brief.")
    runner = realtime.RealtimeRunner(agent, config={"tracing_disabled": True})
    session = await runner.run(model_config={
        "url": f"ws://{server}/v1/realtime?model=gpt-realtime",
        "headers": {"Authorization": f"Bearer {KEY}"},
    })
    kinds: list[str] = []  # session event types, in order
    raw: list[dict] = []  # the server's events as received, in order
    reply_audio = bytearray()
    history: dict[str, Any] = {}  # the session's conversation, by item id, from its history events
    ended = transcribed = False  # the agent's turn ended; the user transcript came (it may come after the reply)
    async with session:
        async with microphone(session.send_audio) as mic:
            mic.say(silence(LEAD_MS) + speech)
            async with asyncio.timeout(EVENT_TIMEOUT_S):
                async for event in session:
                    kinds.append(event.type)
                    if event.type == "raw_model_event" and event.data.type == "raw_server_event":
                        raw.append(event.data.data)
                        transcribed = transcribed or raw[-1]["type"].startswith(
                            "conversation.item.input_audio_transcription.")
                    elif event.type == "history_updated":
                        history = {item.item_id: item for item in event.history}
                    elif event.type == "history_added":
                        history[event.item.item_id] = event.item
                    elif event.type == "audio":
                        reply_audio += event.audio.data
                    elif event.type == "agent_end":
                        ended = True
                    if ended and transcribed and history.get(next(
                            (e["item_id"] for e in raw if e["type"] == "input_audio_buffer.committed"), "")) \
                            is not None and _transcript_in(history, raw):
                        break

    refused = [r.getMessage() for r in caplog.records if "Failed to validate server event" in r.getMessage()]
    assert not refused, "openai-agents refused server events:\n" + "\n".join(refused)
    problems = [(e, p) for e in raw if (p := ga_server_event_problem(e)) is not None]
    assert not problems, f"events the GA types refuse: {problems}"
    assert "error" not in kinds, f"session events: {kinds}\nserver events: {[e['type'] for e in raw]}"
    assert not [e for e in raw if e["type"] == "error"], [e for e in raw if e["type"] == "error"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text

    # openai-agents retrieves the user item itself once its transcript is in: the answer may come anywhere
    order = [kind for kind in event_order(raw) if kind != "conversation.item.retrieved"]
    order = [kind for i, kind in enumerate(order) if kind != "deltas" or order[i - 1] != "deltas"]
    turn = order[order.index("input_audio_buffer.speech_started"):]
    expected = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
                "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done",
                *RESPONSE_ORDER]
    assert order[0] == "session.created" and "session.updated" in order[: order.index(turn[0])], order
    assert turn == expected, f"expected {expected}\ngot      {turn}"
    assert len(reply_audio) > 0 and "audio_end" in kinds, kinds
    assert kinds.index("agent_start") < kinds.index("audio") < kinds.index("agent_end"), kinds
    done = next(e for e in raw if e["type"] == "response.done")
    assert done["response"]["status"] == "completed", done
    updated = next(e for e in raw if e["type"] == "session.updated")["session"]
    assert updated["audio"]["input"]["turn_detection"]["type"] == "semantic_vad", updated
    assert updated["audio"]["output"]["voice"] == "ash", updated
    user_id = next(e for e in raw if e["type"] == "input_audio_buffer.committed")["item_id"]
    reply_id = next(e for e in raw if e["type"] == "response.output_item.added")["item"]["id"]
    roles = {item_id: (item.type, getattr(item, "role", None)) for item_id, item in history.items()}
    assert roles == {user_id: ("message", "user"), reply_id: ("message", "assistant")}, history
    # ... and filled in from the server's events: the user transcript, the reply's transcript
    user_transcript = next(e for e in raw if e["type"] == "conversation.item.input_audio_transcription.completed")
    assert [c.transcript for c in history[user_id].content] == [user_transcript["transcript"]], history
    assert [(c.type, c.transcript) for c in history[reply_id].content] == [
        ("audio", done["response"]["output"][0]["content"][0]["transcript"])], history
    assert history[reply_id].status == "completed", history
