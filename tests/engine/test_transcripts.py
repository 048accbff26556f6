"""The transcript queue: submission order, the step budget, failures kept to their item, closed sessions
forgotten, no decoder reported at once; and one real tiny-decoder run through it."""

from __future__ import annotations

import pytest
import torch

from voice_agent.engine.api import TranscriptDelta, TranscriptDone, TranscriptEvent, TranscriptFailed
from voice_agent.engine.build import load_transcriber
from voice_agent.engine.transcripts import Transcripts
from voice_agent.errors import CheckpointError
from voice_agent.model.speech_lm import SpeechLM
from voice_agent.model.tiny import make_tiny
from voice_agent.model.transcribe import Transcriber


class FakeJob:
    """Returns `deltas` one per step; raises at step `fail_at` (1-based) if given."""

    def __init__(self, deltas: list[str], fail_at: int | None = None) -> None:
        self.deltas, self.fail_at = list(deltas), fail_at
        self.text, self.done, self.steps = "", False, 0

    def step(self) -> str:
        self.steps += 1
        if self.steps == self.fail_at:
            raise RuntimeError("decoder blew up")
        delta = self.deltas[self.steps - 1]
        self.text += delta
        self.done = self.steps == len(self.deltas)
        return delta


class FakeTranscriber:
    """Hands out jobs by the first value of the row."""

    def __init__(self, jobs: dict[int, FakeJob]) -> None:
        self.jobs = jobs

    def start(self, encoder_out: torch.Tensor) -> FakeJob:
        if encoder_out.ndim != 2:
            raise ValueError(f"encoder output: expected (T, D), got {tuple(encoder_out.shape)}")
        return self.jobs[int(encoder_out[0, 0])]


def row(n: int) -> torch.Tensor:
    return torch.full((3, 4), float(n))


class Log:
    def __init__(self) -> None:
        self.events: list[TranscriptEvent] = []

    def __call__(self, event: TranscriptEvent) -> None:
        self.events.append(event)


def test_jobs_run_in_submission_order_within_the_step_budget():
    jobs = {1: FakeJob(["", "Hello", " there"]), 2: FakeJob(["Hi", "!"])}
    queue, log = Transcripts(FakeTranscriber(jobs), "unused"), Log()  # type: ignore[arg-type]
    queue.submit("s1", "a", row(1), 1.5, log)
    queue.submit("s2", "b", row(2), 0.5, log)
    assert queue.busy and len(queue) == 2
    assert queue.step(2) == 2 and log.events == [TranscriptDelta("a", "Hello")]  # empty deltas are not sent
    assert queue.step(2) == 2  # the budget runs on into the next job
    assert log.events[1:] == [TranscriptDelta("a", " there"), TranscriptDone("a", "Hello there", 1.5),
                              TranscriptDelta("b", "Hi")]
    assert jobs[2].steps == 1
    assert queue.step(10) == 1 and not queue.busy
    assert log.events[-2:] == [TranscriptDelta("b", "!"), TranscriptDone("b", "Hi!", 0.5)]
    assert queue.step(10) == 0


def test_a_failing_job_fails_its_item_only():
    jobs = {1: FakeJob(["x", "y"], fail_at=2), 2: FakeJob(["ok"])}
    queue, log = Transcripts(FakeTranscriber(jobs), "unused"), Log()  # type: ignore[arg-type]
    queue.submit("s", "a", row(1), 1.0, log)
    queue.submit("s", "bad-row", torch.zeros(5), 1.0, log)  # refused at start: fails at once
    queue.submit("s", "b", row(2), 2.0, log)
    assert log.events == [TranscriptFailed("bad-row", "transcription_failed",
                                           "transcription failed: encoder output: expected (T, D), got (5,)")]
    assert queue.step(10) == 3
    assert log.events[1:] == [
        TranscriptDelta("a", "x"),
        TranscriptFailed("a", "transcription_failed", "transcription failed: decoder blew up"),
        TranscriptDelta("b", "ok"), TranscriptDone("b", "ok", 2.0),
    ]


def test_forget_drops_a_closed_sessions_jobs():
    jobs = {1: FakeJob(["one"]), 2: FakeJob(["two"]), 3: FakeJob(["three"])}
    queue, log = Transcripts(FakeTranscriber(jobs), "unused"), Log()  # type: ignore[arg-type]
    for n, owner in [(1, "gone"), (2, "kept"), (3, "gone")]:
        queue.submit(owner, f"item{n}", row(n), 1.0, log)
    queue.forget("gone")
    assert len(queue) == 1
    queue.step(10)
    assert log.events == [TranscriptDelta("item2", "two"), TranscriptDone("item2", "two", 1.0)]
    assert jobs[1].steps == jobs[3].steps == 0


def test_without_a_decoder_every_item_fails_at_once_with_the_reason():
    queue, log = Transcripts(None, "no Whisper large-v3.pt; `voice-agent download --whisper` fetches it"), Log()
    queue.submit("s", "a", row(1), 1.0, log)
    assert not queue.busy and queue.step(5) == 0
    assert log.events == [TranscriptFailed("a", "transcription_unavailable",
                                           "no Whisper large-v3.pt; `voice-agent download --whisper` fetches it")]
    assert queue.unavailable and Transcripts(None, "").unavailable  # a reason even when none was given
    assert Transcripts(FakeTranscriber({}), "ignored").unavailable == ""  # type: ignore[arg-type]


def test_the_tiny_whisper_decoder_through_the_queue(tmp_path):
    transcriber = Transcriber.load(make_tiny(tmp_path, seed=1).speech_encoder, language="en")
    queue, log = Transcripts(transcriber, "unused"), Log()
    queue.submit("s", "a", torch.randn(50, 128), 1.0, log)
    while queue.busy:
        assert queue.step(7) <= 7
    *deltas, done = log.events
    assert isinstance(done, TranscriptDone) and done.item_id == "a" and done.audio_seconds == 1.0
    assert all(isinstance(d, TranscriptDelta) and d.delta for d in deltas)
    assert "".join(d.delta for d in deltas if isinstance(d, TranscriptDelta)) == done.text != ""


def test_load_transcriber_never_raises(tmp_path):
    paths = make_tiny(tmp_path / "set", seed=0)
    lm = SpeechLM.load(paths.model_dir)
    found, reason = load_transcriber(lm, paths.model_dir, None)  # ../speech_encoder/large-v3.pt, as config.json
    assert found is not None and reason == ""
    missing, reason = load_transcriber(lm, paths.model_dir, tmp_path / "nowhere.pt")
    assert missing is None and "voice-agent download --whisper" in reason and "nowhere.pt" in reason
    (tmp_path / "junk.pt").write_bytes(b"junk")
    bad, reason = load_transcriber(lm, paths.model_dir, tmp_path / "junk.pt")
    assert bad is None and "malformed" in reason
    with pytest.raises(CheckpointError):  # the same file fails loudly when loaded directly
        Transcriber.load(tmp_path / "junk.pt")
