"""User transcripts, scheduled around the engine's replies.

The model thread submits a user audio item's Whisper encoder output once the turn has encoded it
(`submit`), and calls `step(max_tokens)` when it has time: the worker calls it only while no reply waits
for its first audio, so a transcript never delays a reply's first sound. Jobs run in submission order,
each to its end before the next starts, one decoder forward per step (model/transcribe.py); `emit` gets
`TranscriptDelta`s as text appears, then one `TranscriptDone`, or one `TranscriptFailed` (no decoder
weights, or the job raised: the other jobs go on). `forget(owner)` drops a closed session's jobs.

Pure scheduling: no threads, no asyncio; `emit` is called on the caller's thread.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from voice_agent.engine.api import TranscriptDelta, TranscriptDone, TranscriptEvent, TranscriptFailed
from voice_agent.errors import error_code

if TYPE_CHECKING:
    import torch

    from voice_agent.model.transcribe import Transcriber, TranscriptJob

log = logging.getLogger(__name__)

UNAVAILABLE = "transcription_unavailable"
FAILED = "transcription_failed"
NO_DECODER = "user transcripts: this engine has no Whisper text decoder"


@dataclass
class _Entry:
    owner: str
    item_id: str
    job: TranscriptJob
    audio_seconds: float
    emit: Callable[[TranscriptEvent], None]


class Transcripts:
    """The queue of transcript jobs. `transcriber` None: every submission fails at once with `unavailable`
    (why there is no decoder and how to get one) as its message; `unavailable` is '' when there is one."""

    def __init__(self, transcriber: Transcriber | None, unavailable: str) -> None:
        self.transcriber = transcriber
        self.unavailable = "" if transcriber is not None else unavailable or NO_DECODER
        self._queue: deque[_Entry] = deque()

    @property
    def busy(self) -> bool:
        """Whether a job waits for steps."""
        return bool(self._queue)

    def __len__(self) -> int:
        return len(self._queue)

    def submit(self, owner: str, item_id: str, encoder_out: torch.Tensor, audio_seconds: float,
               emit: Callable[[TranscriptEvent], None]) -> None:
        """Queue a transcript of one row of encoder output, (T, D) (the row is copied at once).
        `owner` is the session, for `forget`."""
        if self.transcriber is None:
            emit(TranscriptFailed(item_id, UNAVAILABLE, self.unavailable))
            return
        try:
            job = self.transcriber.start(encoder_out)
        except Exception as e:  # a bad row fails this item, never the engine
            log.exception("transcripts: item %s could not start", item_id)
            emit(TranscriptFailed(item_id, error_code(e, FAILED), f"transcription failed: {e}"))
            return
        self._queue.append(_Entry(owner, item_id, job, audio_seconds, emit))

    def step(self, max_tokens: int) -> int:
        """Run up to `max_tokens` decoder steps over the queued jobs, oldest first; returns the steps run."""
        steps = 0
        while self._queue and steps < max_tokens:
            entry = self._queue[0]
            steps += 1
            try:
                delta = entry.job.step()
            except Exception as e:
                self._queue.popleft()
                log.exception("transcripts: item %s failed", entry.item_id)
                entry.emit(TranscriptFailed(entry.item_id, error_code(e, FAILED), f"transcription failed: {e}"))
                continue
            if delta:
                entry.emit(TranscriptDelta(entry.item_id, delta))
            if entry.job.done:
                self._queue.popleft()
                entry.emit(TranscriptDone(entry.item_id, entry.job.text, entry.audio_seconds))
        return steps

    def forget(self, owner: str) -> None:
        """Drop the jobs of session `owner` (closed): they emit nothing more."""
        self._queue = deque(entry for entry in self._queue if entry.owner != owner)
