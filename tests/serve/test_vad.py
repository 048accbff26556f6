"""Turn detection: start threshold, end of turn within one frame of the silence limit, padding, chunking.

"Speech" here is a 440 Hz tone (fakes.tone), which webrtcvad flags as speech in every mode (and digital
silence never); rule tests use FakeEnergyClassifier so the expected frame indices are exact.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import types

import numpy as np
import pytest
from fakes import FakeEnergyClassifier, silence, tone

from voice_agent.audio import INPUT_SAMPLE_RATE, INPUT_SAMPLES_PER_MS, MAX_INPUT_SAMPLES, MAX_TURN_MS
from voice_agent.engine.sessions import check_turn_audio
from voice_agent.errors import VadSettingsError, VadUnavailable
from voice_agent.serve.vad import (
    SILERO_FRAME_SAMPLES,
    TurnDetector,
    VadPause,
    VadResumed,
    VadSettings,
    VadSpeechStarted,
    VadSpeechStopped,
    VadState,
    make_classifier,
)


def fake_detector(**kw: object) -> TurnDetector:
    settings = VadSettings(**kw)  # type: ignore[arg-type]
    return TurnDetector(settings, FakeEnergyClassifier(settings.frame_ms))


def run(det: TurnDetector, audio: np.ndarray, chunk: int = 320) -> list:
    events = []
    for i in range(0, len(audio), chunk):
        events += det.feed(audio[i : i + chunk])
    return events


@pytest.mark.parametrize("frame_ms", [10, 20, 30])
@pytest.mark.parametrize("silence_ms", [200, 500, 730])
def test_end_of_turn_is_within_one_frame_of_the_silence_limit_webrtc(frame_ms: int, silence_ms: int) -> None:
    det = TurnDetector(VadSettings(frame_ms=frame_ms, silence_ms=silence_ms, speech_start_ms=60))
    events = run(det, np.concatenate([silence(300), tone(800), silence(silence_ms + 400)]))
    starts = [e for e in events if isinstance(e, VadSpeechStarted)]
    stops = [e for e in events if isinstance(e, VadSpeechStopped)]
    assert len(starts) == 1 and len(stops) == 1, events
    stop = stops[0]
    assert silence_ms <= stop.end_of_turn_ms < silence_ms + frame_ms
    assert abs(starts[0].at_ms - 300) <= frame_ms
    # webrtcvad keeps calling a few frames "speech" after the tone stops; never more than 200 ms.
    assert 1100 - frame_ms <= stop.at_ms <= 1100 + 200


@pytest.mark.parametrize("silence_ms", [100, 500, 1000])
def test_end_of_turn_exact_frame_with_fake_classifier(silence_ms: int) -> None:
    det = fake_detector(frame_ms=20, silence_ms=silence_ms, speech_start_ms=100, prefix_padding_ms=0)
    events = run(det, np.concatenate([silence(200), tone(600), silence(2000)]))
    stop = next(e for e in events if isinstance(e, VadSpeechStopped))
    assert stop.at_ms == 800.0
    assert stop.detected_ms == 800.0 + silence_ms  # 20 ms frames divide every limit here
    assert stop.reason == "silence"


def test_speech_shorter_than_start_threshold_is_ignored() -> None:
    det = fake_detector(speech_start_ms=200)
    assert run(det, np.concatenate([silence(100), tone(180), silence(1000)])) == []
    assert det.state is VadState.SILENCE


def test_speech_start_is_dated_to_first_voiced_frame() -> None:
    det = fake_detector(speech_start_ms=200)
    events = run(det, np.concatenate([silence(100), tone(400)]))
    assert events == [VadSpeechStarted(at_ms=100.0)]
    assert det.state is VadState.SPEECH
    assert det.voiced_ms == 400.0


def test_turn_audio_has_prefix_padding_and_trimmed_trailing_silence() -> None:
    det = fake_detector(speech_start_ms=100, prefix_padding_ms=300, silence_ms=500)
    events = run(det, np.concatenate([silence(1000), tone(700), silence(800)]))
    stop = next(e for e in events if isinstance(e, VadSpeechStopped))
    # 300 ms before speech + 700 ms speech + 300 ms of trailing pad (symmetric with the prefix)
    assert len(stop.audio) == int(1.3 * INPUT_SAMPLE_RATE)
    assert np.abs(stop.audio[: 300 * 16]).max() == 0.0
    assert np.abs(stop.audio[300 * 16 : 1000 * 16]).min() >= 0.0 and np.abs(stop.audio[310 * 16]) > 0


def test_events_do_not_depend_on_chunking() -> None:
    audio = np.concatenate([silence(250), tone(500), silence(300), tone(300), silence(900)])
    reference = run(TurnDetector(VadSettings()), audio, chunk=320)
    rng = np.random.default_rng(0)
    det = TurnDetector(VadSettings())
    events, i = [], 0
    while i < len(audio):
        n = int(rng.integers(1, 2000))
        events += det.feed(audio[i : i + n])
        i += n
    assert [type(e) for e in events] == [type(e) for e in reference]
    for a, b in zip(events, reference, strict=True):
        assert a.at_ms == b.at_ms
        if isinstance(a, VadSpeechStopped):
            np.testing.assert_array_equal(a.audio, b.audio)


def test_short_pause_inside_speech_does_not_end_turn() -> None:
    det = fake_detector(silence_ms=500)
    events = run(det, np.concatenate([tone(400), silence(300), tone(400), silence(600)]))
    stops = [e for e in events if isinstance(e, VadSpeechStopped)]
    assert len(stops) == 1 and stops[0].at_ms == 1100.0


def test_a_pause_candidate_carries_exactly_the_audio_the_end_of_turn_will() -> None:
    det = fake_detector(silence_ms=500, speculate_ms=200, prefix_padding_ms=300)  # candidates after 300 ms
    audio = np.concatenate([tone(400), silence(350), tone(400, hz=300), silence(600)])
    events = run(det, audio)
    kinds = [type(e).__name__ for e in events]
    assert kinds == ["VadSpeechStarted", "VadPause", "VadResumed", "VadPause", "VadSpeechStopped"]
    first, resumed, second, stop = events[1:]
    assert first.at_ms == 400.0 and first.detected_ms == 700.0  # not earlier than the 300 ms trailing pad
    assert resumed.at_ms == 740.0  # the frame 740..760 ms holds the first 10 ms of the new tone
    assert second.at_ms == stop.at_ms == 1160.0 and second.detected_ms == 1460.0 and stop.detected_ms == 1660.0
    assert np.array_equal(second.audio, stop.audio)  # the same samples in: the same reply out
    assert len(first.audio) < len(stop.audio)


def test_no_candidates_without_speculation_or_when_the_pause_limit_comes_first() -> None:
    audio = np.concatenate([tone(400), silence(600)])
    assert not [e for e in run(fake_detector(silence_ms=500), audio) if isinstance(e, (VadPause, VadResumed))]
    late = fake_detector(silence_ms=500, speculate_ms=600)  # a candidate after the end of turn: none
    assert [type(e) for e in run(late, audio)] == [VadSpeechStarted, VadSpeechStopped]


def test_max_turn_length_cuts_the_turn() -> None:
    det = fake_detector(max_turn_ms=1000, prefix_padding_ms=0, speech_start_ms=100)
    events = run(det, tone(2500))
    stops = [e for e in events if isinstance(e, VadSpeechStopped)]
    assert stops[0].reason == "max_length"
    assert len(stops[0].audio) == INPUT_SAMPLE_RATE
    assert det.state is VadState.SPEECH  # the speech goes on: a new turn started after the cut


@pytest.mark.parametrize("frame_samples", [160, 320, 480, SILERO_FRAME_SAMPLES])  # webrtc 10/20/30 ms, silero
@pytest.mark.parametrize("prefix_padding_ms", [0, 300, 2000])
def test_a_turn_at_the_length_limit_fits_the_engine_input(frame_samples: int, prefix_padding_ms: int) -> None:
    settings = VadSettings(max_turn_ms=MAX_TURN_MS, prefix_padding_ms=prefix_padding_ms)
    det = TurnDetector(settings, FakeEnergyClassifier(frame_samples=frame_samples))
    events = run(det, np.concatenate([silence(3000), tone(MAX_TURN_MS + 1000)]), chunk=4000)
    stop = next(e for e in events if isinstance(e, VadSpeechStopped))
    assert stop.reason == "max_length"
    assert MAX_INPUT_SAMPLES - frame_samples < len(stop.audio) <= MAX_INPUT_SAMPLES  # prefix padding included
    check_turn_audio(stop.audio)  # the real engine's input check takes it


def test_padding_rounded_up_to_frames_still_fits_a_short_turn_limit() -> None:
    # 32-ms frames: 16 frames of padding + 15 of the starting run = 992 ms, all of max_turn_ms at once
    settings = VadSettings(max_turn_ms=1000, prefix_padding_ms=500, speech_start_ms=480)
    clf = FakeEnergyClassifier(frame_samples=SILERO_FRAME_SAMPLES)
    events = run(TurnDetector(settings, clf), np.concatenate([silence(1000), tone(3000)]))
    stop = next(e for e in events if isinstance(e, VadSpeechStopped))
    assert stop.reason == "max_length" and len(stop.audio) <= 1000 * INPUT_SAMPLES_PER_MS


def test_webrtcvad_gets_rounded_clipped_int16(monkeypatch: pytest.MonkeyPatch) -> None:
    class FakeVad:  # records what webrtcvad would be given
        def __init__(self, mode: int) -> None:
            self.frames: list[tuple[bytes, int]] = []

        def is_speech(self, pcm: bytes, rate: int) -> bool:
            self.frames.append((pcm, rate))
            return True

    monkeypatch.setitem(sys.modules, "webrtcvad", types.SimpleNamespace(Vad=FakeVad))
    clf = make_classifier(VadSettings(frame_ms=10))
    frame = np.zeros(160, np.float32)
    frame[:6] = [0.5, -0.5, 1.5, -1.5, 1.0, -1.0]
    assert clf.is_speech(frame)
    ((pcm, rate),) = clf._vad.frames  # type: ignore[attr-defined]
    assert rate == INPUT_SAMPLE_RATE and len(pcm) == 160 * 2
    np.testing.assert_array_equal(np.frombuffer(pcm, "<i2")[:7], [16384, -16384, 32767, -32768, 32767, -32768, 0])


def test_feed_rejects_multichannel_audio() -> None:
    with pytest.raises(ValueError, match=r"expected mono audio of shape \(T,\), got shape \(2, 10\)"):
        TurnDetector(VadSettings()).feed(np.zeros((2, 10), np.float32))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"frame_ms": 25}, r"frame_ms: expected one of \(10, 20, 30\), got 25"),
        ({"aggressiveness": 4}, r"aggressiveness: expected an integer 0..3, got 4"),
        ({"silence_ms": 10}, r"silence_ms: expected an integer 50..10000, got 10"),
        ({"silence_ms": 500.5}, r"silence_ms: expected an integer 50..10000, got 500.5"),
        ({"kind": "energy"}, r"kind: expected 'webrtc' or 'silero', got 'energy'"),
        ({"prefix_padding_ms": True}, r"prefix_padding_ms: expected an integer 0..2000, got True"),
        ({"max_turn_ms": 120_000}, r"max_turn_ms: expected an integer 1000..30000, got 120000"),
        ({"max_turn_ms": 1000, "prefix_padding_ms": 900}, r"max_turn_ms: expected more than prefix_padding_ms "
                                                           r"\+ speech_start_ms \(1050\), got 1000"),
    ],
)
def test_bad_settings_raise_typed_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(VadSettingsError, match=message):
        VadSettings(**kwargs)


def test_silero_without_package_gives_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "silero_vad", None)  # as if not installed
    with pytest.raises(VadUnavailable, match="pip install silero-vad"):
        make_classifier(VadSettings(kind="silero"))


def test_silero_ignores_white_noise_that_webrtcvad_calls_speech() -> None:
    pytest.importorskip("silero_vad")
    settings = VadSettings(kind="silero", speech_start_ms=64, silence_ms=300)
    noise = np.random.default_rng(0).normal(0, 0.1, INPUT_SAMPLE_RATE).astype(np.float32)
    assert run(TurnDetector(settings), noise) == []
    assert [type(e) for e in run(TurnDetector(VadSettings(speech_start_ms=60)), noise)] == [VadSpeechStarted]


@pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="needs espeak-ng (apt)")
def test_silero_finds_real_speech_and_its_end(tmp_path) -> None:
    pytest.importorskip("silero_vad")
    from voice_agent.audio import load_audio

    wav = tmp_path / "s.wav"
    subprocess.run(["espeak-ng", "-w", str(wav), "Hello there, how are you doing today?"], check=True)
    speech = load_audio(str(wav))
    audio = np.concatenate([silence(500), speech, silence(1000)])
    events = run(TurnDetector(VadSettings(kind="silero", speech_start_ms=64, silence_ms=500)), audio)
    assert [type(e) for e in events][:1] == [VadSpeechStarted] and type(events[-1]).__name__ == "VadSpeechStopped"
