"""`voice-agent bench calls`: how evenly a running server paces reply audio to phone calls.

Runs simulated Twilio Media Streams calls against a server the user started (`--url ws://HOST:PORT/twilio`),
at each concurrency of `--calls` (default 1, then 8): every call connects, streams its line in real time
(20 ms mu-law frames from a monotonic clock, silence between words: a phone line never stops), speaks one
fixed espeak-ng utterance, and listens to the reply until the line has been quiet for `--quiet-ms`; then it
sends `stop`. The far end behaves as Twilio does: it plays what arrives in real time and echoes each `mark`
once the audio before it has played (at once on `clear`).

Printed per concurrency, over the media frames the calls received:
- inter-frame arrival gap (ms): p50 / p99 / max, within each reply;
- the largest burst: audio received ahead of real time, i.e. the most audio queued at a player that started
  with the reply's first frame, against the server's lead (`--lead-ms`, the server's --telephony-lead-ms);
  a paced server stays near lead + one frame, a server that sends a reply as fast as it makes it does not;
- first-audio latency: the end of the utterance (its last audible sample on the line) to the first reply
  frame, on the caller's clock;
- underruns: time a real-time player starting at the first frame would have waited for audio, worst call.

A minimal Twilio caller lives here because the package cannot import the tests: the four-carrier simulator
with its jitter-buffered speaker is tests/telephony_sim.py, which uses the figures below.
Needs espeak-ng (apt).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from voice_agent.audio import float_to_ulaw, read_audio, resample
from voice_agent.errors import ConfigError

LINE_RATE_HZ = 8000  # Twilio: mu-law 8 kHz mono
FRAME_MS = 20
FRAME_SAMPLES = LINE_RATE_HZ * FRAME_MS // 1000  # 160 (one mu-law byte each)
MULAW_BYTES_PER_MS = LINE_RATE_HZ // 1000  # 8
SILENCE_LEVEL = 1e-3  # below this, an utterance's tail is trailing silence
UTTERANCE = "Hello, can you tell me when the pharmacy opens tomorrow?"
LEAD_IN_MS = 400  # silence on the line before the caller speaks
TICK_S = 0.005  # the far end's play head moves this often


# ---- figures (tests/telephony_sim.py uses these too) ------------------------------------------------------
def percentile(values: Sequence[float], q: float) -> float:
    """The `q`-th percentile (0..100, linear interpolation); nan for no values."""
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def gaps_ms(arrivals_s: Sequence[float]) -> list[float]:
    """Milliseconds between consecutive arrivals."""
    return [float(g) for g in np.diff(np.asarray(arrivals_s, dtype=np.float64)) * 1000.0]


def ahead_ms(frames: Sequence[tuple[float, float]]) -> float:
    """The most audio (ms) ever queued at a real-time player that starts with the first frame: frames are
    (arrival s, audio ms). A sender paced `lead` ahead of playback stays near lead + one frame."""
    level, peak, last = 0.0, 0.0, None
    for t, ms in frames:
        if last is not None:
            level = max(0.0, level - (t - last) * 1000.0)
        level += ms
        peak, last = max(peak, level), t
    return peak


def underrun_ms(frames: Sequence[tuple[float, float]]) -> float:
    """The time (ms) a real-time player starting with the first frame waits for audio, in all."""
    waited, play_end = 0.0, None
    for t, ms in frames:
        if play_end is not None and t > play_end:
            waited += (t - play_end) * 1000.0
        play_end = max(play_end or t, t) + ms / 1000.0
    return waited


def speech_ulaw(text: str, workdir: Path) -> bytes:
    """`text` spoken by espeak-ng (en-us) as mu-law 8 kHz, trailing silence trimmed."""
    if shutil.which("espeak-ng") is None:
        raise ConfigError("bench calls needs espeak-ng for the caller's speech (apt install espeak-ng)")
    wav = workdir / "utterance.wav"
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(wav), text], check=True, capture_output=True)
    samples, rate = read_audio(wav)
    line = resample(samples, rate, LINE_RATE_HZ)
    loud = np.flatnonzero(np.abs(line) >= SILENCE_LEVEL)
    return float_to_ulaw(line[: loud[-1] + 1] if loud.size else line[:0])


# ---- one call --------------------------------------------------------------------------------------------
@dataclass
class CallResult:
    speech_end_s: float | None = None  # when the frame with the utterance's last sample went out
    frames: list[tuple[float, float]] = field(default_factory=list)  # reply media: (arrival s, audio ms)
    marks: int = 0
    clears: int = 0
    error: str | None = None
    close_code: int | None = None

    @property
    def first_audio_ms(self) -> float | None:
        if self.speech_end_s is None or not self.frames:
            return None
        return (self.frames[0][0] - self.speech_end_s) * 1000.0


class TwilioCaller:
    """One Twilio Media Streams call: the line, Twilio's playback of what arrives, and its mark echoes."""

    def __init__(self, url: str, index: int, speech: bytes, quiet_s: float, max_reply_s: float) -> None:
        self.url, self.speech, self.quiet_s, self.max_reply_s = url, speech, quiet_s, max_reply_s
        self.stream_sid, self.call_sid = f"MZbench{index:026d}", f"CAbench{index:026d}"
        self.result = CallResult()
        self._seq = 0
        self._play_end = 0.0  # when the audio received so far has finished playing
        self._pending: list[tuple[float, str]] = []  # (due, name): marks echoed once their audio has played

    def _next(self) -> str:
        self._seq += 1
        return str(self._seq)

    async def run(self) -> CallResult:
        from websockets.asyncio.client import connect
        from websockets.exceptions import ConnectionClosed

        try:
            async with connect(self.url, open_timeout=30, max_size=None) as ws:
                await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
                await ws.send(json.dumps({
                    "event": "start", "sequenceNumber": self._next(), "streamSid": self.stream_sid,
                    "start": {"streamSid": self.stream_sid, "accountSid": "ACbench", "callSid": self.call_sid,
                              "tracks": ["inbound"], "customParameters": {},
                              "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1}}}))
                tasks = [asyncio.create_task(self._line(ws)), asyncio.create_task(self._far_end(ws))]
                try:
                    await self._receive(ws)
                finally:
                    for task in tasks:
                        task.cancel()
                    await asyncio.gather(*tasks, return_exceptions=True)
                await ws.send(json.dumps({"event": "stop", "sequenceNumber": self._next(), "streamSid": self.stream_sid,
                                          "stop": {"accountSid": "ACbench", "callSid": self.call_sid}}))
                try:
                    await asyncio.wait_for(ws.wait_closed(), 5.0)
                except asyncio.TimeoutError:
                    pass
                if ws.protocol.close_rcvd is not None:
                    self.result.close_code = ws.protocol.close_rcvd.code
        except (OSError, ConnectionClosed, asyncio.TimeoutError) as e:
            self.result.error = f"{type(e).__name__}: {e}"
        return self.result

    async def _line(self, ws: Any) -> None:
        """Lead-in silence, the utterance, then silence: 20 ms frames from the monotonic clock."""
        queued = bytes([0xFF]) * (LEAD_IN_MS * MULAW_BYTES_PER_MS) + self.speech  # 0xFF: mu-law silence
        speech_end = len(queued)
        start, sent, chunk = time.monotonic(), 0, 0
        while True:
            frame = queued[sent: sent + FRAME_SAMPLES].ljust(FRAME_SAMPLES, b"\xff")
            chunk += 1
            await ws.send(json.dumps({
                "event": "media", "sequenceNumber": self._next(), "streamSid": self.stream_sid,
                "media": {"track": "inbound", "chunk": str(chunk), "timestamp": str((chunk - 1) * FRAME_MS),
                          "payload": base64.b64encode(frame).decode()}}))
            sent += FRAME_SAMPLES
            if self.result.speech_end_s is None and sent >= speech_end:
                self.result.speech_end_s = time.monotonic()
            await asyncio.sleep(max(0.0, start + chunk * FRAME_MS / 1000 - time.monotonic()))

    async def _far_end(self, ws: Any) -> None:
        """Echo each mark once the audio queued before it has played."""
        while True:
            now = time.monotonic()
            due = [name for t, name in self._pending if t <= now]
            self._pending = [(t, name) for t, name in self._pending if t > now]
            for name in due:
                await self._echo(ws, name)
            await asyncio.sleep(TICK_S)

    async def _echo(self, ws: Any, name: str) -> None:
        await ws.send(json.dumps({"event": "mark", "sequenceNumber": self._next(), "streamSid": self.stream_sid,
                                  "mark": {"name": name}}))

    async def _receive(self, ws: Any) -> None:
        """Read until the reply is over: quiet for quiet_s after audio, or max_reply_s after the speech."""
        while True:
            now = time.monotonic()
            if self.result.frames:
                deadline = max(self.result.frames[-1][0] + self.quiet_s, self._play_end)
            elif self.result.speech_end_s is not None:
                deadline = self.result.speech_end_s + self.max_reply_s
            else:
                deadline = now + 1.0
            if self.result.speech_end_s is not None and now > self.result.speech_end_s + self.max_reply_s:
                return
            try:
                message = await asyncio.wait_for(ws.recv(), max(0.001, deadline - now))
            except asyncio.TimeoutError:
                if self.result.frames:
                    return
                continue
            now = time.monotonic()
            if isinstance(message, bytes):
                raise ValueError(f"the server sent a binary frame ({len(message)} bytes); Twilio wants JSON text")
            event = json.loads(message)
            kind = event.get("event")
            if kind == "media" and self.result.speech_end_s is not None:
                ms = len(base64.b64decode(event["media"]["payload"])) / MULAW_BYTES_PER_MS
                self.result.frames.append((now, ms))
                self._play_end = max(self._play_end, now) + ms / 1000.0
            elif kind == "mark":
                self.result.marks += 1
                self._pending.append((max(self._play_end, now), event["mark"]["name"]))
            elif kind == "clear":
                self.result.clears += 1
                self._play_end = now
                for _, name in self._pending:
                    await self._echo(ws, name)
                self._pending = []


# ---- the benchmark ---------------------------------------------------------------------------------------
async def run_calls(url: str, n: int, speech: bytes, stagger_s: float, quiet_s: float,
                    max_reply_s: float) -> list[CallResult]:
    async def one(i: int) -> CallResult:
        await asyncio.sleep(i * stagger_s)
        return await TwilioCaller(url, i, speech, quiet_s, max_reply_s).run()

    return list(await asyncio.gather(*(one(i) for i in range(n))))


def report(n: int, results: list[CallResult], lead_ms: float) -> list[str]:
    errors = [r.error for r in results if r.error]
    answered = [r for r in results if r.frames]
    gaps = [g for r in answered for g in gaps_ms([t for t, _ in r.frames])]
    firsts = [r.first_audio_ms for r in answered if r.first_audio_ms is not None]
    bursts = [ahead_ms(r.frames) for r in answered]
    stalls = [underrun_ms(r.frames) for r in answered]
    sizes = [ms for r in answered for _, ms in r.frames]
    lengths = [sum(ms for _, ms in r.frames) / 1000.0 for r in answered]
    lines = [f"[{n} call{'s' if n != 1 else ''}] {len(answered)} replies, {len(results) - len(answered)} "
             f"without audio, {len(errors)} errors"]
    lines += [f"  error: {e}" for e in errors[:3]]
    if not answered:
        return lines
    reply_s = sum(sizes) / 1000.0
    lines += [
        f"  media frames: {len(sizes)} ({reply_s:.1f} s of audio), {sum(1 for s in sizes if s == FRAME_MS)} of "
        f"{FRAME_MS} ms; marks {sum(r.marks for r in answered)}, clears {sum(r.clears for r in answered)}",
        f"  reply audio per call s: min {min(lengths):.2f} / median {percentile(lengths, 50):.2f} / "
        f"max {max(lengths):.2f}",
        f"  inter-frame gap ms: p50 {percentile(gaps, 50):.1f} / p99 {percentile(gaps, 99):.1f} / "
        f"max {max(gaps, default=float('nan')):.1f}",
        f"  largest burst ahead of real time: {max(bursts):.0f} ms (lead {lead_ms:g} ms + one frame = "
        f"{lead_ms + FRAME_MS:g} ms); median call {percentile(bursts, 50):.0f} ms",
        f"  first audio ms after the end of speech: p50 {percentile(firsts, 50):.0f} / "
        f"p90 {percentile(firsts, 90):.0f} / max {max(firsts):.0f}",
        f"  underruns (a real-time player waiting for audio): worst call {max(stalls):.0f} ms, "
        f"{sum(1 for s in stalls if s > 0)} of {len(stalls)} calls",
        f"  close codes after stop: {sorted({r.close_code for r in results}, key=str)}",
    ]
    return lines


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="voice-agent bench calls", description=__doc__.splitlines()[0])
    p.add_argument("--url", default="ws://127.0.0.1:8000/twilio", help="the server's Twilio stream URL")
    p.add_argument("--calls", type=int, nargs="+", default=[1, 8], help="concurrent calls per step")
    p.add_argument("--text", default=UTTERANCE, help="what every caller says (espeak-ng, en-us)")
    p.add_argument("--lead-ms", type=float, default=160.0, help="the server's --telephony-lead-ms (for the report)")
    p.add_argument("--stagger-ms", type=float, default=100.0, help="between call starts within a step")
    p.add_argument("--quiet-ms", type=float, default=3000.0,
                   help="a reply is over after this long without audio (longer than the worst stall)")
    p.add_argument("--max-reply-s", type=float, default=30.0, help="stop listening this long after the speech")
    args = p.parse_args(list(argv))
    if not args.url.startswith(("ws://", "wss://")):
        p.error(f"--url: expected ws://... or wss://..., got {args.url!r}")
    if any(n < 1 for n in args.calls):
        p.error(f"--calls: expected counts >= 1, got {args.calls}")
    return args


def bench_calls_main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        speech = speech_ulaw(args.text, Path(tmp))
    print(f"bench calls: {args.url}; utterance {len(speech) / MULAW_BYTES_PER_MS / 1000:.2f} s; "
          f"calls {args.calls}; quiet {args.quiet_ms:g} ms ends a reply")
    failed = False
    for n in args.calls:
        results = asyncio.run(run_calls(args.url, n, speech, args.stagger_ms / 1000, args.quiet_ms / 1000,
                                        args.max_reply_s))
        print("\n".join(report(n, results, args.lead_ms)), flush=True)
        failed = failed or any(r.error or not r.frames for r in results)
    return 1 if failed else 0
