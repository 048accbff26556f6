"""A phone call simulator: the carrier's side of a media-stream WebSocket, written from the carriers' own
documents (not from our adapters), to drive the real server as Twilio, Telnyx, Plivo or Vonage would.

What every carrier does here, as a phone line does:
- the line never stops: 20 ms frames go out from a monotonic clock (a late frame makes the next ones come
  sooner), speech when some is queued (`say`), silence otherwise;
- the far end's speaker (`Speaker`) plays what the server sends in order, in real time, behind a small
  jitter buffer; a playback marker the server sends after audio is echoed once the audio queued before it
  has played (at once when nothing is queued); a flush drops the buffered audio;
- every message received is recorded with its arrival time on the monotonic clock (`received`), and so are
  the marks the server sent, the echoes, the flushes and the speaker's underruns.

Wire facts, per carrier (../shared/reference/protocols.md 2 and 5.5, and the pages named below):
- Twilio Media Streams (twilio.com/docs/voice/media-streams/websocket-messages): JSON text frames only.
  `connected` {protocol "Call", version "1.0.0"}, then `start` {sequenceNumber "1", streamSid, start {streamSid,
  accountSid, callSid, tracks, customParameters, mediaFormat {audio/x-mulaw, 8000, 1}}}, then `media`
  {sequenceNumber, streamSid, media {track "inbound", chunk, timestamp (ms since start), payload (base64
  mu-law)}} every 20 ms, `dtmf` {dtmf {track "inbound_track", digit}}, `stop` {stop {accountSid, callSid}};
  numbers are strings. From the server it accepts `media` {streamSid, media {payload}}, `mark` {streamSid,
  mark {name}} and `clear` {streamSid}; a mark is echoed as `mark` {sequenceNumber, streamSid, mark {name}}
  once played, and the marks a `clear` drops are echoed at once. A binary frame is Twilio's warning 31950,
  any other message its error 31924: both are recorded as `violations`.
- Telnyx (developers.telnyx.com, "Stream call media over WebSocket"): the same shape in snake_case:
  `connected` {version}, `start` {sequence_number, stream_id, start {call_control_id, call_session_id,
  custom_parameters, media_format {encoding PCMU, sample_rate 8000, channels 1}}}, `media` {sequence_number,
  stream_id, media {track, chunk, timestamp, payload}}, `dtmf`, `stop` {stop {call_control_id}}. Media frame
  order is not guaranteed: this line swaps two adjacent frames now and then (`reorder_every`). From the
  server: `media` {media {payload}} in the stream's codec, `mark` {mark {name}} (echoed as `mark` when the
  audio before it has played, at once when none is queued) and `clear` (queued marks are echoed).
- Plivo (plivo.com/docs/voice-agents/audio-streaming): no `connected`; `start` {sequenceNumber, start {callId,
  streamId, accountId, tracks, mediaFormat {encoding audio/x-mulaw, sampleRate 8000}}, extra_headers},
  `media` {sequenceNumber, streamId, media {track, timestamp, chunk, payload}}, `dtmf`. From the server:
  `playAudio` {media {contentType, sampleRate, payload}}, `checkpoint` {streamId, name} answered by
  `playedStream` {streamId, name} only once the audio before it played, and `clearAudio` {streamId} answered
  by `clearedAudio` (the checkpoints it drops are never answered). The call's end is the socket closing
  (Plivo reports it to the status callback URL, not on the socket).
- Vonage (developer.vonage.com/en/voice/voice-api/concepts/websockets): a text `websocket:connected`
  {content-type "audio/l16;rate=16000", plus the NCCO's headers}, then binary frames of 16-bit little-endian
  PCM at 16 kHz, 640 bytes = 20 ms each way; `websocket:dtmf` {digit, duration}. From the server: binary
  audio, `{"action": "clear"}` answered by `websocket:cleared`, `{"action": "notify", "payload": ...}`
  answered by `websocket:notify` {payload} once the audio before it played. The call's end is the socket
  closing. What Vonage does with the notifies a clear drops is not documented: they are dropped here.

`espeak_speech` is English speech from espeak-ng (apt) for the line.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import count
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar

import numpy as np
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from voice_agent.audio import float_to_pcm16, float_to_ulaw, pcm16_to_float, read_audio, resample, ulaw_to_float

FRAME_MS = 20  # one media frame, both ways, on every carrier
TICK_S = 0.005  # how often the speaker's play head is moved (mark echoes are this late at most)
JITTER_MS = 60  # the speaker starts playing once this much is buffered, or this long after audio arrived
SILENCE_LEVEL = 1e-3  # below this, a sample of an utterance's tail is trailing silence (trimmed)
CONNECT_TIMEOUT_S = 30.0
WAIT_TIMEOUT_S = 30.0
POLL_S = 0.01


def espeak_speech(text: str, path: Path) -> tuple[np.ndarray, int]:
    """`text` spoken by espeak-ng (en-us), written to `path` as WAV: (mono float32 samples, rate in Hz)."""
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
    return read_audio(path)


def trimmed(samples: np.ndarray) -> np.ndarray:
    """`samples` without trailing silence: the utterance ends on its last audible sample."""
    loud = np.flatnonzero(np.abs(samples) >= SILENCE_LEVEL)
    return samples[: loud[-1] + 1] if loud.size else samples[:0]


def ms_of(samples: int, rate_hz: int) -> float:
    return samples * 1000.0 / rate_hz


# ---- records ---------------------------------------------------------------------------------------------
@dataclass
class Received:
    """One message from the server: arrival time (monotonic s), what it is, and the message itself (the
    parsed JSON object, or the bytes of a binary frame)."""

    t: float
    kind: str  # "media", "mark", "clear", or the message's own event/action name; "binary" on a JSON-only wire
    message: Any
    audio_ms: float = 0.0  # the audio it carries


@dataclass
class Echo:
    """A playback marker the line answered: when, which, and whether a flush dropped it (not played)."""

    t: float
    mark: Any
    cleared: bool


@dataclass
class Utterance:
    """Speech queued on the line. `start_t` / `end_t`: when the frames holding its first and last audible
    samples went out (None until then)."""

    first_sample: int  # index in the line's outgoing sample stream
    end_sample: int
    start_t: float | None = None
    end_t: float | None = None

    @property
    def sent(self) -> bool:
        return self.end_t is not None


@dataclass
class _Queued:
    audio_ms: float = 0.0  # > 0: audio; 0 with a mark: a playback marker
    mark: Any = None
    is_mark: bool = False


class Speaker:
    """The caller's earpiece: plays received audio in order at real-time speed behind a jitter buffer.

    Times are monotonic seconds. `push_audio` / `push_mark` queue; `advance(now)` moves the play head and
    returns the marks whose preceding audio has played since the last call (a mark pushed with nothing
    queued comes back from the next `advance`); `clear(now)` drops everything queued and returns the marks
    dropped. `played_ms` is the playback position (audio played since the call began); `dry`
    lists (when the speaker ran dry, when audio came again) for every pause in playback.
    """

    def __init__(self, jitter_ms: float = JITTER_MS) -> None:
        self.jitter_s = jitter_ms / 1000.0
        self.queue: deque[_Queued] = deque()
        self.buffered_ms = 0.0
        self.played_ms = 0.0
        self.playing = False
        self._clock = 0.0  # while playing: the time up to which playback is accounted
        self._waiting_since: float | None = None  # audio arrived at an idle speaker at this time
        self._dry_since: float | None = None
        self._reached: list[Any] = []  # marks played, not yet returned by `advance`
        self.dry: list[tuple[float, float]] = []

    def push_audio(self, now: float, audio_ms: float) -> None:
        self._advance(now)
        if self._dry_since is not None:
            self.dry.append((self._dry_since, now))
            self._dry_since = None
        if not self.playing and self._waiting_since is None:
            self._waiting_since = now
        self.queue.append(_Queued(audio_ms=audio_ms))
        self.buffered_ms += audio_ms

    def push_mark(self, now: float, mark: Any) -> None:
        """Queue a marker: reached at once when no audio is playing or queued."""
        self._advance(now)
        if self.buffered_ms <= 0:
            self._reached.append(mark)
        else:
            self.queue.append(_Queued(mark=mark, is_mark=True))

    def advance(self, now: float) -> list[Any]:
        """Move the play head to `now`: the marks reached since the last call."""
        self._advance(now)
        reached, self._reached = self._reached, []
        return reached

    def _advance(self, now: float) -> None:
        reached = self._reached
        if not self.playing and self.buffered_ms > 0 and self._waiting_since is not None and (
                self.buffered_ms >= self.jitter_s * 1000 or now - self._waiting_since >= self.jitter_s):
            self.playing, self._clock, self._waiting_since = True, now, None
        if not self.playing:
            return
        elapsed_ms = (now - self._clock) * 1000.0
        while self.queue:
            head = self.queue[0]
            if head.is_mark:
                reached.append(self.queue.popleft().mark)
                continue
            if head.audio_ms > elapsed_ms:
                head.audio_ms -= elapsed_ms
                self.buffered_ms -= elapsed_ms
                self.played_ms += elapsed_ms
                self._clock = now
                return
            elapsed_ms -= head.audio_ms
            self.buffered_ms -= head.audio_ms
            self.played_ms += head.audio_ms
            self.queue.popleft()
        # ran dry: playback stopped when the last audio ended
        self.playing = False
        self.buffered_ms = 0.0
        self._dry_since = now - elapsed_ms / 1000.0

    def clear(self, now: float) -> tuple[list[Any], float]:
        """Flush: (the markers dropped, the ms of audio dropped). Markers already played stay reached."""
        self._advance(now)
        dropped = [q.mark for q in self.queue if q.is_mark]
        dropped_ms = self.buffered_ms
        self.queue.clear()
        self.buffered_ms = 0.0
        self.playing, self._waiting_since = False, None
        self._dry_since = None  # a flush is not an underrun
        return dropped, dropped_ms


# ---- the call ----------------------------------------------------------------------------------------------
class Call:
    """One simulated phone call to `url` (ws://host:port/path). Use as `async with TwilioCall(url) as call:`.

    The subclasses give the carrier's wire: the handshake, how a 20 ms frame of line audio is sent, what a
    server message means, and how the call ends.
    """

    carrier: ClassVar[str]
    line_rate_hz: ClassVar[int]

    def __init__(self, url: str, *, jitter_ms: float = JITTER_MS, custom: dict[str, str] | None = None,
                 headers: dict[str, str] | None = None) -> None:
        self.url = url
        self.custom = dict(custom or {})
        self.headers = dict(headers or {})
        self.speaker = Speaker(jitter_ms)
        self.frame_samples = self.line_rate_hz * FRAME_MS // 1000
        self.received: list[Received] = []
        self.server_marks: list[tuple[float, Any]] = []  # (arrival, marker) in order
        self.echoes: list[Echo] = []
        self.clears: list[tuple[float, float]] = []  # (arrival, ms of buffered audio dropped)
        self.violations: list[str] = []  # messages the carrier would refuse or flag
        self.utterances: list[Utterance] = []
        self.frames_sent = 0
        self.started_t = 0.0  # when the line's first frame went out
        self.close_code: int | None = None  # the close code the server sent (None: it did not close first)
        self.close_reason = ""
        self.closed_by_server = False
        self._ws: ClientConnection | None = None
        self._line = np.zeros(0, dtype=np.float32)  # queued line audio, at line_rate_hz
        self._sent_samples = 0  # line samples sent (or being sent): _line starts at this index
        self._seq = count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._closed = asyncio.Event()

    # -- the carrier's wire (subclasses) --
    async def _handshake(self) -> None:
        raise NotImplementedError

    async def _send_frame(self, samples: np.ndarray, chunk: int, timestamp_ms: int) -> None:
        raise NotImplementedError

    def _on_text(self, now: float, message: dict[str, Any]) -> None:
        raise NotImplementedError

    def _on_binary(self, now: float, data: bytes) -> None:
        self.violations.append(f"binary frame of {len(data)} bytes on a JSON-only wire")
        self._record(now, "binary", data)

    async def _echo(self, mark: Any, cleared: bool) -> None:
        raise NotImplementedError

    async def hang_up(self, timeout: float = 5.0) -> None:
        """The caller hangs up: the carrier's end-of-call, then the socket closes."""
        raise NotImplementedError

    # -- lifecycle --
    async def __aenter__(self) -> Call:
        self._ws = await connect(self.url, open_timeout=CONNECT_TIMEOUT_S, max_size=None,
                                 additional_headers=self.headers or None)
        await self._handshake()
        self.started_t = time.monotonic()
        self._tasks = [asyncio.create_task(self._run_line()), asyncio.create_task(self._run_receive()),
                       asyncio.create_task(self._run_speaker())]
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()

    @property
    def ws(self) -> ClientConnection:
        assert self._ws is not None, "the call is not connected"
        return self._ws

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    async def send_json(self, message: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(message))

    def next_seq(self) -> int:
        return next(self._seq)

    # -- the caller's voice --
    def say(self, samples: np.ndarray, rate_hz: int) -> Utterance:
        """Queue speech (mono float at `rate_hz`, trailing silence trimmed) after what is queued; returns its
        record, whose times fill in as its frames go out."""
        speech = trimmed(resample(np.asarray(samples, dtype=np.float32), rate_hz, self.line_rate_hz))
        first = self._sent_samples + self._line.size  # after what is queued; on an idle line, the next frame
        self._line = np.concatenate([self._line, speech])
        utt = Utterance(first_sample=first, end_sample=first + speech.size)
        self.utterances.append(utt)
        return utt

    async def speak(self, samples: np.ndarray, rate_hz: int, timeout: float = WAIT_TIMEOUT_S) -> Utterance:
        """`say`, then wait until its last frame has gone out."""
        utt = self.say(samples, rate_hz)
        await self.wait_for(lambda: utt.sent, timeout, f"utterance sent ({utt})")
        return utt

    async def dtmf(self, digit: str) -> None:
        raise NotImplementedError

    # -- waiting and reading the record --
    async def wait_for(self, ready: Callable[[], bool], timeout: float = WAIT_TIMEOUT_S, what: str = "") -> None:
        deadline = time.monotonic() + timeout
        while not ready():
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.carrier}: no {what} within {timeout:g} s; received:\n{self.dump()}")
            await asyncio.sleep(POLL_S)

    def media(self, after: float = 0.0, before: float = float("inf")) -> list[Received]:
        return [r for r in self.received if r.kind == "media" and after <= r.t < before]

    def audio_ms(self, after: float = 0.0, before: float = float("inf")) -> float:
        return sum(r.audio_ms for r in self.media(after, before))

    async def until_audio(self, after: float, ms: float = FRAME_MS, timeout: float = WAIT_TIMEOUT_S) -> float:
        """Wait until `ms` of reply audio arrived after time `after`; returns the first such arrival's time."""
        await self.wait_for(lambda: self.audio_ms(after) >= ms, timeout, f"{ms:g} ms of audio after {after:.3f}")
        return self.media(after)[0].t

    async def until_played(self, ms: float, timeout: float = WAIT_TIMEOUT_S) -> None:
        """Wait until the speaker's position reaches `ms` (all audio played since the call began)."""
        await self.wait_for(lambda: self.speaker.played_ms >= ms, timeout, f"{ms:g} ms played")

    async def until_quiet(self, quiet_s: float = 1.0, timeout: float = WAIT_TIMEOUT_S) -> None:
        """Wait until no audio arrived for `quiet_s` and the speaker has played all of it (the reply ended)."""
        def quiet() -> bool:
            last = self.media()
            return (not self.speaker.buffered_ms and bool(last)
                    and time.monotonic() - last[-1].t >= quiet_s)
        await self.wait_for(quiet, timeout, f"a quiet line for {quiet_s:g} s")

    async def until_clear(self, after: float, timeout: float = WAIT_TIMEOUT_S) -> float:
        """Wait for a flush from the server after time `after`; returns its arrival time."""
        await self.wait_for(lambda: any(t >= after for t, _ in self.clears), timeout, f"a clear after {after:.3f}")
        return next(t for t, _ in self.clears if t >= after)

    async def until_closed(self, timeout: float = 5.0) -> None:
        await self.wait_for(self._closed.is_set, timeout, "close from the server")

    def kinds(self) -> list[str]:
        return [r.kind for r in self.received]

    def dump(self, limit: int = 40, records: list[Received] | None = None) -> str:
        """The last `limit` messages received, one line each (payloads cut), with arrival times relative to
        the call's start."""
        def short(value: Any) -> Any:
            if isinstance(value, str) and len(value) > 40:
                return value[:24] + f"...({len(value)} chars)"
            if isinstance(value, dict):
                return {k: short(v) for k, v in value.items()}
            return value
        chosen = (self.received if records is None else records)[-limit:]
        lines = []
        for r in chosen:
            body = f"<{len(r.message)} bytes>" if isinstance(r.message, bytes) else json.dumps(short(r.message))
            lines.append(f"{(r.t - self.started_t) * 1000:9.1f} ms  {body}")
        return "\n".join(lines)

    # -- the three loops --
    async def _run_line(self) -> None:
        """20 ms frames from the monotonic clock: queued audio, else silence. A phone line never stops."""
        start = time.monotonic()
        chunk = 0
        try:
            while True:
                n = self.frame_samples
                frame = self._line[:n]
                self._line = self._line[n:]  # _line starts at stream index _sent_samples, always
                if frame.size < n:
                    frame = np.concatenate([frame, np.zeros(n - frame.size, np.float32)])
                lo, self._sent_samples = self._sent_samples, self._sent_samples + n
                chunk += 1
                await self._send_frame(frame, chunk, chunk * FRAME_MS - FRAME_MS)
                now = time.monotonic()
                for utt in self.utterances:
                    if utt.start_t is None and lo <= utt.first_sample < self._sent_samples:
                        utt.start_t = now
                    if utt.end_t is None and lo < utt.end_sample <= self._sent_samples:
                        utt.end_t = now
                self.frames_sent += 1
                await asyncio.sleep(max(0.0, start + self.frames_sent * FRAME_MS / 1000 - time.monotonic()))
        except ConnectionClosed:
            return

    async def _run_receive(self) -> None:
        try:
            async for message in self.ws:
                now = time.monotonic()
                if isinstance(message, bytes):
                    self._on_binary(now, message)
                    continue
                try:
                    parsed = json.loads(message)
                except json.JSONDecodeError:
                    self.violations.append(f"not JSON: {message[:80]!r}")
                    self._record(now, "invalid", message)
                    continue
                if not isinstance(parsed, dict):
                    self.violations.append(f"not a JSON object: {message[:80]!r}")
                    self._record(now, "invalid", parsed)
                    continue
                self._on_text(now, parsed)
        except ConnectionClosed:
            pass
        finally:
            rcvd = self.ws.protocol.close_rcvd
            if rcvd is not None:
                self.close_code, self.close_reason = rcvd.code, rcvd.reason
                self.closed_by_server = self.ws.protocol.close_rcvd_then_sent is True
            self._closed.set()

    async def _run_speaker(self) -> None:
        try:
            while True:
                for mark in self.speaker.advance(time.monotonic()):
                    await self._answer(mark, cleared=False)
                await asyncio.sleep(TICK_S)
        except ConnectionClosed:
            return

    # -- helpers for the subclasses --
    def _record(self, now: float, kind: str, message: Any, audio_ms: float = 0.0) -> None:
        self.received.append(Received(now, kind, message, audio_ms))

    def _play(self, now: float, message: Any, audio_ms: float) -> None:
        self._record(now, "media", message, audio_ms)
        self.speaker.push_audio(now, audio_ms)

    def _mark(self, now: float, message: Any, mark: Any) -> None:
        self._record(now, "mark", message)
        self.server_marks.append((now, mark))
        self.speaker.push_mark(now, mark)  # answered by the speaker loop once reached

    def _flush(self, now: float, message: Any) -> list[Any]:
        self._record(now, "clear", message)
        dropped, dropped_ms = self.speaker.clear(now)
        self.clears.append((now, dropped_ms))
        return dropped

    def _spawn_answer(self, mark: Any, cleared: bool) -> None:
        task = asyncio.create_task(self._answer(mark, cleared))
        self._tasks.append(task)

    async def _answer(self, mark: Any, cleared: bool) -> None:
        self.echoes.append(Echo(time.monotonic(), mark, cleared))
        try:
            await self._echo(mark, cleared)
        except ConnectionClosed:
            pass


# ---- Twilio ------------------------------------------------------------------------------------------------
class TwilioCall(Call):
    """Twilio Media Streams, bidirectional (`<Connect><Stream>`): mu-law 8 kHz in JSON text frames."""

    carrier = "twilio"
    line_rate_hz = 8000

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        tag = f"{time.monotonic_ns():032x}"[-32:]
        self.stream_sid, self.call_sid, self.account_sid = f"MZ{tag}", f"CA{tag}", f"AC{tag}"

    async def _handshake(self) -> None:
        await self.send_json({"event": "connected", "protocol": "Call", "version": "1.0.0"})
        await self.send_json({
            "event": "start", "sequenceNumber": str(self.next_seq()), "streamSid": self.stream_sid,
            "start": {"streamSid": self.stream_sid, "accountSid": self.account_sid, "callSid": self.call_sid,
                      "tracks": ["inbound"], "customParameters": self.custom,
                      "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}},
        })

    async def _send_frame(self, samples: np.ndarray, chunk: int, timestamp_ms: int) -> None:
        await self.send_json({
            "event": "media", "sequenceNumber": str(self.next_seq()), "streamSid": self.stream_sid,
            "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(timestamp_ms),
                      "payload": base64.b64encode(float_to_ulaw(samples)).decode()},
        })

    def _on_text(self, now: float, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event in ("media", "mark", "clear") and message.get("streamSid") != self.stream_sid:
            self.violations.append(f"{event} without this stream's streamSid: {str(message)[:120]}")
        if event == "media":
            try:
                payload = base64.b64decode(message["media"]["payload"], validate=True)
            except (KeyError, TypeError, ValueError) as e:
                self.violations.append(f"media without a base64 payload ({e!r}): {str(message)[:120]}")
                self._record(now, "invalid", message)
                return
            self._play(now, message, ms_of(len(payload), 8000))
        elif event == "mark":
            name = (message.get("mark") or {}).get("name")
            if not isinstance(name, str):
                self.violations.append(f"mark without a name: {message}")
            self._mark(now, message, name)
        elif event == "clear":
            for mark in self._flush(now, message):  # Twilio answers the marks a clear drops
                self._spawn_answer(mark, cleared=True)
        else:
            self.violations.append(f"31924: unexpected message {str(message)[:120]}")
            self._record(now, str(event), message)

    async def _echo(self, mark: Any, cleared: bool) -> None:
        await self.send_json({"event": "mark", "sequenceNumber": str(self.next_seq()), "streamSid": self.stream_sid,
                              "mark": {"name": mark}})

    async def dtmf(self, digit: str) -> None:
        await self.send_json({"event": "dtmf", "streamSid": self.stream_sid, "sequenceNumber": str(self.next_seq()),
                              "dtmf": {"track": "inbound_track", "digit": digit}})

    async def hang_up(self, timeout: float = 5.0) -> None:
        """`stop`, then wait for the server to close the socket (Twilio closes it after `timeout`)."""
        await self.send_json({"event": "stop", "sequenceNumber": str(self.next_seq()), "streamSid": self.stream_sid,
                              "stop": {"accountSid": self.account_sid, "callSid": self.call_sid}})
        try:
            await asyncio.wait_for(self._closed.wait(), timeout)
        except TimeoutError:
            await self.ws.close()


# ---- Telnyx ------------------------------------------------------------------------------------------------
class TelnyxCall(Call):
    """Telnyx media streaming, bidirectional RTP mode: PCMU 8 kHz, snake_case JSON; frames now and then out
    of order (`reorder_every`: one adjacent pair swapped per that many frames; 0: never)."""

    carrier = "telnyx"
    line_rate_hz = 8000

    def __init__(self, url: str, *, reorder_every: int = 25, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        tag = f"{time.monotonic_ns():x}"
        self.stream_id, self.call_control_id = f"stream-{tag}", f"v3:call-{tag}"
        self.reorder_every = reorder_every
        self._held: dict[str, Any] | None = None  # a frame held back to go after the next one
        self.reordered = 0

    async def _handshake(self) -> None:
        await self.send_json({"event": "connected", "version": "1.0.0"})
        await self.send_json({
            "event": "start", "sequence_number": str(self.next_seq()), "stream_id": self.stream_id,
            "start": {"user_id": "sim-user", "call_control_id": self.call_control_id,
                      "call_session_id": f"session-{self.stream_id}", "from": "+15550100", "to": "+15550199",
                      "custom_parameters": self.custom,
                      "media_format": {"encoding": "PCMU", "sample_rate": 8000, "channels": 1}},
        })

    async def _send_frame(self, samples: np.ndarray, chunk: int, timestamp_ms: int) -> None:
        frame = {"event": "media", "sequence_number": str(self.next_seq()), "stream_id": self.stream_id,
                 "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str(timestamp_ms),
                           "payload": base64.b64encode(float_to_ulaw(samples)).decode()}}
        if self._held is not None:
            await self.send_json(frame)
            await self.send_json(self._held)  # the earlier frame arrives second
            self._held = None
            self.reordered += 1
        elif self.reorder_every and chunk % self.reorder_every == 0:
            self._held = frame
        else:
            await self.send_json(frame)

    def _on_text(self, now: float, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "media":
            try:
                payload = base64.b64decode(message["media"]["payload"], validate=True)
            except (KeyError, TypeError, ValueError) as e:
                self.violations.append(f"media without a base64 payload ({e!r}): {str(message)[:120]}")
                self._record(now, "invalid", message)
                return
            self._play(now, message, ms_of(len(payload), 8000))
        elif event == "mark":
            self._mark(now, message, (message.get("mark") or {}).get("name"))
        elif event == "clear":
            for mark in self._flush(now, message):  # "a clear frame also returns queued marks"
                self._spawn_answer(mark, cleared=True)
        else:
            self.violations.append(f"unexpected message {str(message)[:120]}")
            self._record(now, str(event), message)

    async def _echo(self, mark: Any, cleared: bool) -> None:
        await self.send_json({"event": "mark", "sequence_number": str(self.next_seq()), "stream_id": self.stream_id,
                              "mark": {"name": mark}})

    async def dtmf(self, digit: str) -> None:
        await self.send_json({"event": "dtmf", "stream_id": self.stream_id, "sequence_number": str(self.next_seq()),
                              "occurred_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                              "dtmf": {"digit": digit}})

    async def hang_up(self, timeout: float = 5.0) -> None:
        await self.send_json({"event": "stop", "sequence_number": str(self.next_seq()), "stream_id": self.stream_id,
                              "stop": {"user_id": "sim-user", "call_control_id": self.call_control_id}})
        try:
            await asyncio.wait_for(self._closed.wait(), timeout)
        except TimeoutError:
            await self.ws.close()


# ---- Plivo -------------------------------------------------------------------------------------------------
class PlivoCall(Call):
    """Plivo audio streams, bidirectional: mu-law 8 kHz in (`contentType audio/x-mulaw;rate=8000`), playAudio
    out in the codec each message names."""

    carrier = "plivo"
    line_rate_hz = 8000

    def __init__(self, url: str, **kwargs: Any) -> None:
        super().__init__(url, **kwargs)
        tag = f"{time.monotonic_ns():032x}"[-12:]
        self.stream_id, self.call_id = f"20170ada-f610-433b-8758-{tag}", f"12345678-1234-1234-1234-{tag}"

    async def _handshake(self) -> None:
        extra = ";".join(f"{k}={v}" for k, v in self.custom.items())
        await self.send_json({
            "event": "start", "sequenceNumber": self.next_seq(),
            "start": {"callId": self.call_id, "streamId": self.stream_id, "accountId": "MAXXXXXXXXXXXXXXXXXX",
                      "tracks": ["inbound"], "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000}},
            "extra_headers": extra,
        })

    async def _send_frame(self, samples: np.ndarray, chunk: int, timestamp_ms: int) -> None:
        await self.send_json({
            "event": "media", "sequenceNumber": self.next_seq(), "streamId": self.stream_id,
            "media": {"track": "inbound", "timestamp": str(int(time.time() * 1000)), "chunk": chunk,
                      "payload": base64.b64encode(float_to_ulaw(samples)).decode()},
        })

    def _on_text(self, now: float, message: dict[str, Any]) -> None:
        event = message.get("event")
        if event == "playAudio":
            media = message.get("media") or {}
            try:
                payload = base64.b64decode(media["payload"], validate=True)
                content_type, rate = str(media["contentType"]), int(media["sampleRate"])
            except (KeyError, TypeError, ValueError) as e:
                self.violations.append(f"playAudio without payload/contentType/sampleRate ({e!r}): "
                                       f"{str(message)[:120]}")
                self._record(now, "invalid", message)
                return
            if content_type == "audio/x-mulaw" and rate == 8000:
                ms = ms_of(len(payload), rate)
            elif content_type == "audio/x-l16" and rate in (8000, 16000):
                ms = ms_of(len(payload) // 2, rate)
            else:
                self.violations.append(f"playAudio in an unsupported format {content_type} {rate}")
                self._record(now, "invalid", message)
                return
            self._play(now, message, ms)
        elif event == "checkpoint":
            if message.get("streamId") != self.stream_id:
                self.violations.append(f"checkpoint for another stream: {message}")
            self._mark(now, message, message.get("name"))
        elif event == "clearAudio":
            if message.get("streamId") != self.stream_id:
                self.violations.append(f"clearAudio for another stream: {message}")
            self._flush(now, message)  # dropped checkpoints are never answered
            self._spawn_reply({"sequenceNumber": self.next_seq(), "event": "clearedAudio", "streamId": self.stream_id})
        else:
            self.violations.append(f"unexpected message {str(message)[:120]}")
            self._record(now, str(event), message)

    def _spawn_reply(self, message: dict[str, Any]) -> None:
        self._tasks.append(asyncio.create_task(self.send_json(message)))

    async def _echo(self, mark: Any, cleared: bool) -> None:
        if not cleared:
            await self.send_json({"event": "playedStream", "sequenceNumber": self.next_seq(),
                                  "streamId": self.stream_id, "name": mark})

    async def dtmf(self, digit: str) -> None:
        await self.send_json({"event": "dtmf", "sequenceNumber": self.next_seq(), "streamId": self.stream_id,
                              "dtmf": {"track": "inbound", "digit": digit,
                                       "timestamp": str(int(time.time() * 1000))}})

    async def hang_up(self, timeout: float = 5.0) -> None:
        """The call ends: Plivo closes the socket (no end message on it)."""
        await self.ws.close(1000)
        await asyncio.wait_for(self._closed.wait(), timeout)


# ---- Vonage ------------------------------------------------------------------------------------------------
class VonageCall(Call):
    """Vonage Voice API WebSocket endpoint: binary L16 at 16 kHz, 640-byte frames; JSON text events."""

    carrier = "vonage"
    line_rate_hz = 16000
    FRAME_BYTES = 640  # 20 ms of 16-bit 16 kHz

    async def _handshake(self) -> None:
        await self.send_json({"event": "websocket:connected", "content-type": "audio/l16;rate=16000", **self.custom})

    async def _send_frame(self, samples: np.ndarray, chunk: int, timestamp_ms: int) -> None:
        await self.ws.send(float_to_pcm16(samples))

    def _on_binary(self, now: float, data: bytes) -> None:
        if len(data) % 2:
            self.violations.append(f"binary audio of an odd length {len(data)}")
        self._play(now, data, ms_of(len(data) // 2, 16000))

    def _on_text(self, now: float, message: dict[str, Any]) -> None:
        action = message.get("action")
        if action == "clear":
            self._flush(now, message)
            self._tasks.append(asyncio.create_task(self.send_json({"event": "websocket:cleared"})))
        elif action == "notify":
            self._mark(now, message, message.get("payload"))
        else:
            self.violations.append(f"unexpected message {str(message)[:120]}")
            self._record(now, str(action), message)

    async def _echo(self, mark: Any, cleared: bool) -> None:
        if not cleared:
            await self.send_json({"event": "websocket:notify", "payload": mark})

    async def dtmf(self, digit: str) -> None:
        await self.send_json({"event": "websocket:dtmf", "digit": digit, "duration": 260})

    async def hang_up(self, timeout: float = 5.0) -> None:
        """The call ends: Vonage closes the socket."""
        await self.ws.close(1000)
        await asyncio.wait_for(self._closed.wait(), timeout)


CARRIERS: dict[str, type[Call]] = {c.carrier: c for c in (TwilioCall, TelnyxCall, PlivoCall, VonageCall)}


def heard(call: Call, records: list[Received]) -> np.ndarray:
    """The audio of `records` (media received by `call`) decoded to float at the call's line rate."""
    parts = []
    for r in records:
        if isinstance(r.message, bytes):
            parts.append(pcm16_to_float(r.message))
        elif call.carrier == "plivo" and r.message["media"]["contentType"] == "audio/x-l16":
            parts.append(pcm16_to_float(base64.b64decode(r.message["media"]["payload"])))
        else:
            parts.append(ulaw_to_float(base64.b64decode(r.message["media"]["payload"])))
    return np.concatenate(parts) if parts else np.zeros(0, np.float32)
