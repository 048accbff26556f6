"""The client side of the `/v1/realtime` tests: the real server on the tiny model, speech as the wire wants
it, a microphone that streams in real time, and a recorder of the raw server events.

- `realtime_server` runs the app as `voice-agent serve` builds it on a machine without weights (the embedded
  tiny demo model, or plain random tiny weights whose replies run for tens of seconds) under uvicorn in a
  thread, so one server can serve every test of a module, each test in its own event loop.
- `espeak_pcm` is English speech from espeak-ng as GA `audio/pcm`: PCM16 little-endian mono at 24 kHz.
- `Microphone` sends queued speech, then silence, CHUNK_MS at a time from a monotonic clock: a microphone
  never stops, and the server's VAD works on the audio's own time.
- `Recorder` reads the raw JSON of every server event, in arrival order, and checks each against the GA
  server event types of the `openai` package (what openai-agents does with each event it receives).
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import threading
import time
import typing
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from pydantic import ValidationError
from serving import free_socket

from voice_agent.audio import OUTPUT_SAMPLE_RATE, PCM16_BYTES, float_to_pcm16, read_audio, resample
from voice_agent.engine.build import build_engine
from voice_agent.engine.files import demo_cache_dir
from voice_agent.model.tiny import make_tiny
from voice_agent.serve.app import build_app, uvicorn_options
from voice_agent.serve.config import ServerConfig

WIRE_RATE_HZ = OUTPUT_SAMPLE_RATE  # GA audio/pcm: 24 kHz, in and out
BYTES_PER_MS = WIRE_RATE_HZ // 1000 * PCM16_BYTES  # 48
CHUNK_MS = 40  # one input_audio_buffer.append
CHUNK_BYTES = CHUNK_MS * BYTES_PER_MS
SERVER_START_S = 60.0  # building and warming the tiny model on a slow shared CPU
EVENT_TIMEOUT_S = 30.0  # the longest wait for one awaited server event

DELTA_TYPES = ("response.output_audio.delta", "response.output_audio_transcript.delta")
TRANSCRIPTION_PREFIX = "conversation.item.input_audio_transcription."


def silence(ms: int) -> bytes:
    return bytes(ms * BYTES_PER_MS)


def audio_ms(pcm: bytes) -> float:
    return len(pcm) / BYTES_PER_MS


def espeak_pcm(text: str, path: Path) -> bytes:
    """`text` spoken by espeak-ng (en-us) as PCM16 mono 24 kHz bytes."""
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
    samples, rate = read_audio(path)
    return float_to_pcm16(resample(samples, rate, WIRE_RATE_HZ))


def b64(pcm: bytes) -> str:
    return base64.b64encode(pcm).decode()


@contextmanager
def realtime_server(workdir: Path, *, long_replies: bool = False, **config: Any) -> Iterator[str]:
    """The real app on a free port, serving the embedded demo model (no weights under `workdir`); yields
    "127.0.0.1:PORT" once the engine is ready. `long_replies`: plain random tiny weights instead of the
    demo's shaped ones, whose replies run to the engine's limit (tens of seconds of audio, generated over
    as many seconds), so a reply is still generating when the user barges in. `config`: ServerConfig's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)  # no models/ here
        mp.setenv("VOICE_AGENT_CACHE", str(workdir / "cache"))
        if long_replies:
            make_tiny(demo_cache_dir(), seed=0)
        sock = free_socket()
        port = sock.getsockname()[1]
        cfg = ServerConfig(port=port, log_level="warning", **config)
        engine = build_engine(*cfg.engine_options())
        server = uvicorn.Server(uvicorn.Config(build_app(cfg, engine), **uvicorn_options(cfg)))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + SERVER_START_S
            while not (server.started and engine.ready):
                assert thread.is_alive(), "uvicorn stopped while starting"
                assert time.monotonic() < deadline, f"the server was not ready within {SERVER_START_S:g} s"
                time.sleep(0.05)
            yield f"127.0.0.1:{port}"
        finally:
            server.should_exit = True
            thread.join(timeout=30)


class Microphone:
    """Streams to `send` (one call per CHUNK_MS of PCM16 24 kHz) in real time: queued audio first, silence
    when none is queued. Paced from a monotonic clock, so a slow send makes the next ones come sooner."""

    def __init__(self, send: Callable[[bytes], Awaitable[None]]) -> None:
        self._send = send
        self._queued = bytearray()
        self.sent_ms = 0.0  # audio sent so far, speech and silence

    def say(self, pcm: bytes) -> None:
        """Queue `pcm` (after what is queued)."""
        self._queued += pcm

    @property
    def quiet(self) -> bool:
        """Whether everything queued has been sent (only silence goes out now)."""
        return not self._queued

    async def run(self) -> None:
        start = time.monotonic()
        while True:
            chunk = bytes(self._queued[:CHUNK_BYTES])
            del self._queued[:CHUNK_BYTES]
            chunk += silence(CHUNK_MS)[len(chunk):]
            await self._send(chunk)
            self.sent_ms += CHUNK_MS
            await asyncio.sleep(max(0.0, start + self.sent_ms / 1000 - time.monotonic()))

    async def until_quiet(self, timeout: float = EVENT_TIMEOUT_S) -> None:
        async with asyncio.timeout(timeout):
            while not self.quiet:
                await asyncio.sleep(0.01)


@asynccontextmanager
async def microphone(send: Callable[[bytes], Awaitable[None]]) -> AsyncIterator[Microphone]:
    mic = Microphone(send)
    task = asyncio.create_task(mic.run())
    try:
        yield mic
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        except Exception:  # the connection closed under it; the test has its own verdict
            pass


_server_event_types: dict[str, Any] = {}  # GA server event type -> the openai package's pydantic model


def ga_server_event_problem(event: dict) -> str | None:
    """Why `event` is not a valid GA server event of the `openai` package (None when it is)."""
    if not _server_event_types:
        from openai.types.realtime import RealtimeServerEvent

        union = typing.get_args(RealtimeServerEvent)[0]  # Annotated[Union[...], discriminator]
        for model in typing.get_args(union):
            for name in typing.get_args(model.model_fields["type"].annotation):
                _server_event_types[name] = model
    model = _server_event_types.get(event.get("type"))  # type: ignore[arg-type]
    if model is None:
        return f"no GA server event has type {event.get('type')!r}"
    try:
        model.model_validate(event)
    except ValidationError as e:
        return str(e)
    return None


class Recorder:
    """Every server event of one connection, raw, in arrival order. `recv` returns one text message."""

    def __init__(self, recv: Callable[[], Awaitable[str | bytes]]) -> None:
        self._recv = recv
        self.events: list[dict] = []
        self.invalid: list[tuple[dict, str]] = []  # (event, why) for events the GA types refuse

    async def next(self, timeout: float = EVENT_TIMEOUT_S) -> dict:
        async with asyncio.timeout(timeout):
            message = await self._recv()
        event = json.loads(message)
        assert isinstance(event, dict), f"expected a JSON object, got {message!r:.200}"
        self.events.append(event)
        problem = ga_server_event_problem(event)
        if problem is not None:
            self.invalid.append((event, problem))
        return event

    async def until(self, kind: str, timeout: float = EVENT_TIMEOUT_S, **match: Any) -> dict:
        """Read until an event of type `kind` whose top-level fields equal `match` arrives; returns it."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            try:
                event = await self.next(max(left, 0.001))
            except TimeoutError:
                raise AssertionError(f"no {kind} {match or ''} within {timeout:g} s; got:\n{self.dump()}") from None
            if event["type"] == kind and all(event.get(k) == v for k, v in match.items()):
                return event

    async def seen_or_until(self, kind: str, timeout: float = EVENT_TIMEOUT_S, **match: Any) -> dict:
        """The first event of type `kind` (with `match`) already read, else the next one to arrive."""
        seen = self.of(kind, **match)
        return seen[0] if seen else await self.until(kind, timeout, **match)

    def of(self, kind: str, **match: Any) -> list[dict]:
        return [e for e in self.events if e["type"] == kind and all(e.get(k) == v for k, v in match.items())]

    def index(self, event: dict) -> int:
        return next(i for i, e in enumerate(self.events) if e is event)

    def dump(self, events: list[dict] | None = None, limit: int = 60) -> str:
        """The events (default: all so far) one JSON line each, long strings cut, the last `limit`."""
        def short(value: Any) -> Any:
            if isinstance(value, str) and len(value) > 60:
                return value[:40] + f"...({len(value)} chars)"
            if isinstance(value, dict):
                return {k: short(v) for k, v in value.items()}
            if isinstance(value, list):
                return [short(v) for v in value]
            return value
        chosen = self.events if events is None else events
        return "\n".join(json.dumps(short(e)) for e in chosen[-limit:])

    def assert_clean(self) -> None:
        """No `error` event, and every event valid against the GA types."""
        errors = self.of("error")
        assert not errors, f"unexpected error events:\n{self.dump(errors)}"
        assert not self.invalid, "events the openai package's GA types refuse:\n" + "\n".join(
            f"{self.dump([e])}\n  {why}" for e, why in self.invalid)


def event_order(events: list[dict]) -> list[str]:
    """The event types in order, each run of audio / transcript deltas as one "deltas" entry, and the user
    transcription events left out (they come when the transcript is ready; checked apart)."""
    order: list[str] = []
    for e in events:
        kind = e["type"]
        if kind.startswith(TRANSCRIPTION_PREFIX):
            continue
        if kind in DELTA_TYPES:
            kind = "deltas"
            if order and order[-1] == kind:
                continue
        order.append(kind)
    return order


RESPONSE_ORDER = [  # protocols.md 5.3, from response.created on, for a spoken reply in the conversation
    "response.created",
    "response.output_item.added",
    "conversation.item.added",
    "response.content_part.added",
    "deltas",
    "response.output_audio.done",
    "response.output_audio_transcript.done",
    "response.content_part.done",
    "response.output_item.done",
    "conversation.item.done",
    "response.done",
]
OUT_OF_BAND_ORDER = [kind for kind in RESPONSE_ORDER if not kind.startswith("conversation.item.")]


def reply_audio(events: list[dict], item_id: str) -> bytes:
    """The reply audio of assistant item `item_id`, decoded from its output_audio deltas."""
    return b"".join(base64.b64decode(e["delta"]) for e in events
                    if e["type"] == "response.output_audio.delta" and e["item_id"] == item_id)


def reply_transcript(events: list[dict], item_id: str) -> str:
    return "".join(e["delta"] for e in events
                   if e["type"] == "response.output_audio_transcript.delta" and e["item_id"] == item_id)


def assert_spoken_reply(rec: Recorder, created: dict, done: dict, *, in_conversation: bool = True) -> str:
    """Check one spoken response between its `response.created` and `response.done` events (both in
    `rec.events`): the GA order, one output item at output_index 0 whose deltas are at content_index 0, the
    transcript equal to its deltas, audio present. Returns the assistant item's id."""
    span = rec.events[rec.index(created): rec.index(done) + 1]
    order = event_order(span)
    expected = RESPONSE_ORDER if in_conversation else OUT_OF_BAND_ORDER
    assert order == expected, f"expected {expected}\ngot      {order}\n{rec.dump(span)}"
    response_id = created["response"]["id"]
    assert created["response"]["status"] == "in_progress", rec.dump([created])
    assert done["response"]["id"] == response_id, rec.dump([created, done])
    added = next(e for e in span if e["type"] == "response.output_item.added")
    item = added["item"]
    item_id = item["id"]
    assert (added["response_id"], added["output_index"]) == (response_id, 0), rec.dump([added])
    assert (item["type"], item["role"], item["status"]) == ("message", "assistant", "in_progress"), rec.dump([added])
    for e in span:
        if e["type"].startswith(("response.output_audio", "response.content_part")):
            where = (e["response_id"], e["item_id"], e["output_index"], e["content_index"])
            assert where == (response_id, item_id, 0, 0), rec.dump([e])
    part = next(e for e in span if e["type"] == "response.content_part.added")["part"]
    assert part["type"] == "audio", rec.dump([part])
    audio = reply_audio(span, item_id)
    assert len(audio) > 0 and len(audio) % PCM16_BYTES == 0, f"reply audio: {len(audio)} bytes"
    transcript = reply_transcript(span, item_id)
    transcript_done = next(e for e in span if e["type"] == "response.output_audio_transcript.done")
    assert transcript_done["transcript"] == transcript, rec.dump([transcript_done])
    part_done = next(e for e in span if e["type"] == "response.content_part.done")["part"]
    assert part_done["type"] == "audio" and part_done.get("transcript") == transcript, rec.dump([part_done])
    item_done = next(e for e in span if e["type"] == "response.output_item.done")
    assert item_done["item"]["id"] == item_id and item_done["item"]["status"] == "completed", rec.dump([item_done])
    if in_conversation:
        conv_added = next(e for e in span if e["type"] == "conversation.item.added")
        conv_done = next(e for e in span if e["type"] == "conversation.item.done")
        assert conv_added["item"]["id"] == conv_done["item"]["id"] == item_id, rec.dump([conv_added, conv_done])
    response = done["response"]
    assert response["status"] == "completed", rec.dump([done])
    assert [o["id"] for o in response["output"]] == [item_id], rec.dump([done])
    content = response["output"][0]["content"]
    assert [c["type"] for c in content] == ["output_audio"], rec.dump([done])
    assert content[0].get("transcript") == transcript, rec.dump([done])
    usage = response["usage"]
    assert usage["output_tokens"] > 0 and usage["total_tokens"] >= usage["output_tokens"], rec.dump([done])
    return item_id
