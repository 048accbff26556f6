"""Native protocol, Sans-I/O: tables of wire messages -> events / errors, and events -> wire messages."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from voice_agent.audio import resample
from voice_agent.engine.api import EngineInfo, TurnSettings
from voice_agent.errors import ProtocolError
from voice_agent.serve.protocols.events import (
    AudioFrame,
    ErrorEvent,
    FieldRejected,
    Interrupted,
    InterruptRequest,
    PlaybackProgress,
    ResponseAudio,
    ResponseFinished,
    ResponseStarted,
    ResponseText,
    SessionStarted,
    SettingsUpdated,
    SpeechStarted,
    SpeechStopped,
    StartSession,
    UpdateSettings,
    UserTranscript,
)
from voice_agent.serve.protocols.native import NativeProtocol, WireState, settings_json
from voice_agent.serve.settings import SessionSettings
from voice_agent.serve.vad import VadSettings

START = json.dumps({"type": "start"})
ENGINE = EngineInfo("LLaMA-Omni2-test", False, "cpu", "float32", voices=("en", "zh"), max_new_tokens=512)


def opened(defaults: SessionSettings | None = None, **start: object) -> NativeProtocol:
    p = NativeProtocol(defaults or SessionSettings())
    p.decode(json.dumps({"type": "start", **start}))
    return p


def pcm(n: int) -> bytes:
    return (np.arange(n, dtype="<i2") * 10).tobytes()


# (messages before, message, error code, text the message must contain)
ERRORS = [
    ([], "hello", "bad_json", "expected a JSON text message, got 'hello'"),
    ([], "[1, 2]", "bad_message", "expected a JSON object with a string 'type'"),
    ([], '{"kind": "start"}', "bad_message", "string 'type'"),
    ([], '{"type": "dance"}', "unknown_type", "type: expected one of ('start', 'update', 'playback', "),
    ([], pcm(320), "start_required", "expected a 'start' message first, got 640 bytes of audio"),
    ([], '{"type": "playback", "response_id": "r", "played_ms": 1}', "start_required", "got 'playback'"),
    ([], '{"type": "start", "sample_rate": 44}', "bad_field", "sample_rate: expected one of (8000, 16000"),
    ([], '{"type": "start", "sample_rate": "16000"}', "bad_field", "got '16000'"),
    ([], '{"type": "start", "frame_ms": 5}', "bad_field", "frame_ms: expected an integer 10..100"),
    ([], '{"type": "start", "sample_rate": 44100, "frame_ms": 25}', "bad_field", "whole samples at 44100 Hz"),
    ([], '{"type": "start", "vad": {"silence_ms": 5}}', "bad_field", "silence_ms: expected an int"),
    ([], '{"type": "start", "vad": {"kind": "silero"}}', "bad_field",
     "vad.kind: expected 'webrtc' (the server's detector), got 'silero'"),
    ([], '{"type": "start", "vad": {"loudness": 3}}', "bad_field", "vad: expected options among"),
    ([], '{"type": "start", "vad": {"max_turn_ms": 31000}}', "bad_field",
     "max_turn_ms: expected an integer 1000..30000"),
    ([], '{"type": "start", "temperature": "hot"}', "bad_field", "temperature: expected a number, got 'hot'"),
    ([], '{"type": "start", "seed": 1.5}', "bad_field", "seed: expected an integer, got 1.5"),
    ([], '{"type": "start", "transcribe": "yes"}', "bad_field", "transcribe: expected true or false, got 'yes'"),
    ([], '{"type": "start", "vad": [1]}', "bad_field", "vad: expected an object, got list"),
    ([], '{"type": "start", "temperature": 9}', "bad_field", "temperature: expected a number in [0, 2], got 9"),
    ([], '{"type": "start", "temperature": NaN}', "bad_field", "temperature: expected a number in [0, 2], got nan"),
    ([], json.dumps({"type": "start", "seed": 2**70}), "bad_field",
     f"seed: expected an integer in [0, {2**63 - 1}] (2**63 - 1), got {2**70}"),
    ([], '{"type": "start", "seed": -1}', "bad_field", "seed: expected an integer in [0, "),
    ([], '{"type": "start", "voice": "default"}', "bad_field",
     "voice: expected one of ['en', 'zh'] (GET /api/info lists them), got 'default'"),
    ([], '{"type": "start", "voice": "../../../../etc/passwd"}', "bad_field", "voice: expected one of ['en', 'zh']"),
    ([], json.dumps({"type": "start", "voice": "x" * 100_000}), "bad_field",
     "voice: expected a name of 1..200 characters, got 'xxxxx"),
    ([], '{"type": "start", "voice": ""}', "bad_field", "voice: expected a name of 1..200 characters, got ''"),
    ([], '{"type": "start", "max_new_tokens": 513}', "bad_field",
     "max_new_tokens: expected an integer 1..512, got 513"),
    ([], '{"type": "start", "max_new_tokens": 0}', "bad_field", "max_new_tokens: expected an integer >= 1, got 0"),
    ([START], '{"type": "update", "voice": "nobody"}', "bad_field", "voice: expected one of ['en', 'zh']"),
    ([START], '{"type": "update", "max_new_tokens": 4096}', "bad_field", "expected an integer 1..512, got 4096"),
    ([], '{"type": "start", "voice": 3}', "bad_field", "voice: expected a string, got 3"),
    ([], '{"type": "start", "key": 123}', "bad_field", "key: expected a string, got int"),
    ([], '{"type": "start", "colour": "red"}', "bad_field", "got unknown ['colour']"),
    ([START], START, "duplicate_start", "expected one 'start' per connection"),
    ([START], pcm(320)[:-1], "bad_audio", "expected PCM16 audio (an even number of bytes), got 639 bytes"),
    ([START], pcm(4 * 320 + 1), "frame_too_large", "expected at most 2560 bytes per message"),
    ([START], '{"type": "playback", "played_ms": 3}', "bad_field", "playback.response_id: expected a string"),
    ([START], '{"type": "playback", "response_id": "r", "played_ms": -1}', "bad_field", "got -1"),
    ([START], '{"type": "playback", "response_id": "r", "played_ms": NaN}', "bad_field", "got nan"),
    ([START], '{"type": "update", "vad": {"min_interruption_ms": -5}}', "bad_field", "min_interruption_ms"),
]


@pytest.mark.parametrize("before, message, code, text", ERRORS)
def test_bad_input_gets_a_typed_error(before: list, message: str | bytes, code: str, text: str) -> None:
    p = NativeProtocol(SessionSettings(), ENGINE)
    for m in before:
        p.decode(m)
    with pytest.raises(ProtocolError) as info:
        p.decode(message)
    assert info.value.code == code
    assert text in str(info.value)
    assert len(str(info.value)) < 300  # a client's long string is never echoed back whole
    assert not info.value.fatal


def test_turn_options_the_engine_serves_are_accepted() -> None:
    p = NativeProtocol(SessionSettings(turn=TurnSettings(voice="/srv/voices/operator.npy")),
                       dataclasses.replace(ENGINE, default_voice="/srv/voices/operator.npy"))
    msg = {"type": "start", "voice": "zh", "max_new_tokens": 512, "seed": 2**63 - 1, "temperature": 0}
    (event,) = p.decode(json.dumps(msg))
    assert isinstance(event, StartSession)
    assert event.settings.turn == TurnSettings(voice="zh", temperature=0, max_new_tokens=512, seed=2**63 - 1)
    (update,) = p.decode(json.dumps({"type": "update", "voice": "/srv/voices/operator.npy"}))  # the server default
    assert isinstance(update, UpdateSettings) and update.settings.turn.voice == "/srv/voices/operator.npy"


def test_a_refused_update_keeps_the_settings() -> None:
    p = NativeProtocol(SessionSettings(), ENGINE)
    p.decode(json.dumps({"type": "start", "voice": "zh"}))
    with pytest.raises(ProtocolError):
        p.decode(json.dumps({"type": "update", "voice": "default", "seed": 1}))
    (update,) = p.decode(json.dumps({"type": "update", "seed": 2}))
    assert isinstance(update, UpdateSettings) and update.settings.turn == TurnSettings(voice="zh", seed=2)


@pytest.mark.parametrize("played", ['"x"', "NaN", "-1", "Infinity", "[]"])
def test_an_interrupt_with_a_bad_played_ms_still_stops_and_reports_the_field(played: str) -> None:
    events = opened().decode(f'{{"type": "interrupt", "played_ms": {played}}}')
    assert events[0] == InterruptRequest(None)  # stop, estimating what was played
    assert isinstance(events[1], FieldRejected) and events[1].code == "bad_field"
    assert events[1].message.startswith("interrupt.played_ms: expected a number of milliseconds >= 0, got")


def test_bad_start_leaves_the_protocol_waiting_for_a_good_one() -> None:
    p = NativeProtocol(SessionSettings())
    with pytest.raises(ProtocolError):
        p.decode('{"type": "start", "sample_rate": 44}')
    assert p.state is WireState.AWAITING_START
    (event,) = p.decode(START)
    assert isinstance(event, StartSession) and p.state is WireState.OPEN


def test_start_applies_overrides_on_server_defaults() -> None:
    p = NativeProtocol(SessionSettings())
    msg = {"type": "start", "sample_rate": 48000, "frame_ms": 10, "output_sample_rate": 48000, "voice": "alt",
           "key": "k" * 8, "vad": {"silence_ms": 800, "min_interruption_ms": 250, "aggressiveness": 3}}
    (event,) = p.decode(json.dumps(msg))
    assert isinstance(event, StartSession)
    assert (event.sample_rate_hz, event.frame_ms, event.output_sample_rate_hz) == (48000, 10, 48000)
    assert event.key == "k" * 8
    s = event.settings
    assert (s.vad.silence_ms, s.vad.aggressiveness, s.min_interruption_ms) == (800, 3, 250)
    assert s.turn.voice == "alt"
    assert s.vad.prefix_padding_ms == SessionSettings().vad.prefix_padding_ms  # untouched default


# (client message after start, expected event)
CONTROL = [
    ('{"type": "playback", "response_id": "resp_1", "played_ms": 1500}', PlaybackProgress("resp_1", 1500.0)),
    ('{"type": "interrupt"}', InterruptRequest(None)),
    ('{"type": "interrupt", "played_ms": 20.5}', InterruptRequest(20.5)),
]


@pytest.mark.parametrize("message, expected", CONTROL)
def test_control_messages_decode(message: str, expected: object) -> None:
    assert opened().decode(message) == [expected]


def test_update_overrides_the_current_settings() -> None:
    p = opened(vad={"silence_ms": 800})
    (event,) = p.decode('{"type": "update", "voice": "alt"}')
    assert isinstance(event, UpdateSettings)
    assert event.settings.vad.silence_ms == 800 and event.settings.turn.voice == "alt"


def test_audio_at_16k_decodes_exactly() -> None:
    (frame,) = opened().decode(pcm(320))
    assert isinstance(frame, AudioFrame) and frame.pcm.dtype == np.float32
    np.testing.assert_array_equal(frame.pcm * 32768, np.arange(320) * 10)


def test_audio_at_48k_is_resampled_to_16k_streaming() -> None:
    p = opened(sample_rate=48000)
    t = np.arange(48000) / 48000
    x = (0.5 * np.sin(2 * np.pi * 300 * t) * 32767).astype("<i2")
    frames = [p.decode(x[i : i + 960].tobytes())[0] for i in range(0, 48000, 960)]
    out = np.concatenate([f.pcm for f in frames if isinstance(f, AudioFrame)])
    assert 15900 <= len(out) <= 16000  # the streaming filter holds back a few samples
    reference = resample(x.astype(np.float32) / 32768, 48000, 16000)  # the whole signal at once
    np.testing.assert_allclose(out, reference[: len(out)], atol=1e-5)


# The wire form of SessionSettings() (what session.started echoes and `update` accepts).
DEFAULT_SETTINGS_JSON = {
    "vad": {"kind": "webrtc", "aggressiveness": 2, "frame_ms": 20, "speech_start_ms": 150, "silence_ms": 500,
            "prefix_padding_ms": 300, "max_turn_ms": 30000, "silero_threshold": 0.5, "speculate_ms": 0,
            "min_interruption_ms": 400},
    "voice": None, "temperature": None, "max_new_tokens": None, "seed": None, "transcribe": False,
}

# (server event, expected JSON)
ENCODED = [
    (SessionStarted("s1", 16000, 24000, 20, "m", True, SessionSettings()),
     {"type": "session.started", "session_id": "s1", "sample_rate": 16000, "output_sample_rate": 24000,
      "frame_ms": 20, "model": "m", "demo": True, "settings": DEFAULT_SETTINGS_JSON}),
    (SettingsUpdated(SessionSettings(turn=TurnSettings(voice="x"))),
     {"type": "session.updated", "settings": {**DEFAULT_SETTINGS_JSON, "voice": "x"}}),
    (SpeechStarted(120.0, "item_1"), {"type": "speech.started", "at_ms": 120.0, "item_id": "item_1"}),
    (SpeechStopped(900.0, 780.0, True, response_id="resp_1", item_id="item_1"),
     {"type": "speech.stopped", "at_ms": 900.0, "duration_ms": 780.0, "turn": True, "reason": "silence",
      "response_id": "resp_1", "item_id": "item_1"}),
    (SpeechStopped(900.0, 180.0, False), {"type": "speech.stopped", "at_ms": 900.0, "duration_ms": 180.0,
                                          "turn": False, "reason": "silence", "response_id": None,
                                          "item_id": None}),
    (UserTranscript("item_1", delta="Hel"), {"type": "transcript", "item_id": "item_1", "delta": "Hel", "text": "",
                                             "final": False, "error": None}),
    (UserTranscript("item_1", text="Hello", final=True, audio_seconds=1.0),
     {"type": "transcript", "item_id": "item_1", "delta": "", "text": "Hello", "final": True, "error": None}),
    (ResponseStarted("resp_1"), {"type": "response.started", "response_id": "resp_1"}),
    (ResponseText("resp_1", "Hi"), {"type": "text.delta", "response_id": "resp_1", "text": "Hi"}),
    (ResponseFinished("resp_1", "eos", "Hi", 1234.567, {"first_audio": 310.0}),
     {"type": "response.done", "response_id": "resp_1", "reason": "eos", "text": "Hi", "audio_ms": 1234.57,
      "timings": {"first_audio": 310.0}}),
    (Interrupted("resp_1", 640.0), {"type": "interrupted", "response_id": "resp_1", "played_ms": 640.0}),
    (ErrorEvent("bad_json", "nope", True),
     {"type": "error", "code": "bad_json", "message": "nope", "fatal": True}),
]


@pytest.mark.parametrize("event, expected", ENCODED)
def test_server_events_encode(event: object, expected: dict) -> None:
    (message,) = opened().encode(event)  # type: ignore[arg-type]
    assert json.loads(message) == expected


def test_audio_out_at_24k_is_pcm16_passthrough() -> None:
    x = np.array([0.0, 0.5, -0.5, 1.5], np.float32)
    (message,) = opened().encode(ResponseAudio("resp_1", x, 0.0))
    assert isinstance(message, bytes)
    np.testing.assert_array_equal(np.frombuffer(message, "<i2"), [0, 16384, -16384, 32767])


def test_audio_out_at_48k_is_resampled_and_flushed_at_response_done() -> None:
    p = opened(output_sample_rate=48000)
    p.encode(ResponseStarted("resp_1"))
    x = (0.3 * np.sin(2 * np.pi * 440 * np.arange(24000) / 24000)).astype(np.float32)
    blocks = [ResponseAudio("resp_1", x[i : i + 2400], 0.0) for i in range(0, 24000, 2400)]
    sizes = [len(m) for block in blocks for m in p.encode(block)]
    tail = p.encode(ResponseFinished("resp_1", "eos", "", 1000.0, {}))
    assert isinstance(tail[0], bytes) and json.loads(tail[1])["type"] == "response.done"
    assert (sum(sizes) + len(tail[0])) // 2 == 48000  # exactly twice the samples, once flushed


# Every field of the settings echo: (its path in the JSON, a value other than the default).
ROUND_TRIP = [
    (("vad", "kind"), "silero"),  # the server's choice: set in the server defaults, echoed, accepted back
    (("vad", "aggressiveness"), 3),
    (("vad", "frame_ms"), 30),
    (("vad", "speech_start_ms"), 200),
    (("vad", "silence_ms"), 800),
    (("vad", "prefix_padding_ms"), 100),
    (("vad", "max_turn_ms"), 12_000),
    (("vad", "silero_threshold"), 0.3),
    (("vad", "speculate_ms"), 350),
    (("vad", "min_interruption_ms"), 250),
    (("voice",), "alt"),
    (("temperature",), 0.7),
    (("max_new_tokens",), 64),
    (("seed",), 7),
    (("transcribe",), True),
]


def _at(obj: dict, path: tuple[str, ...]) -> object:
    for key in path:
        obj = obj[key]
    return obj


def _message(path: tuple[str, ...], value: object) -> dict:
    return {path[0]: {path[1]: value}} if len(path) == 2 else {path[0]: value}


def test_the_round_trip_table_covers_every_echoed_field() -> None:
    echo = settings_json(SessionSettings())
    paths = {("vad", k) for k in echo["vad"]} | {(k,) for k in echo if k != "vad"}
    assert paths == {path for path, _ in ROUND_TRIP}


@pytest.mark.parametrize("path, value", ROUND_TRIP)
def test_what_session_started_echoes_update_accepts_unchanged(path: tuple[str, ...], value: object) -> None:
    if path == ("vad", "kind"):
        defaults, start = SessionSettings(vad=VadSettings(kind="silero")), {}
    else:
        defaults, start = SessionSettings(), _message(path, value)
    p = NativeProtocol(defaults)
    (started,) = p.decode(json.dumps({"type": "start", **start}))
    assert isinstance(started, StartSession)
    (message,) = p.encode(SessionStarted("s1", 16000, 24000, 20, "m", False, started.settings))
    echo = json.loads(message)["settings"]
    assert _at(echo, path) == value

    for q in (p, opened(defaults)):  # the same connection, and a fresh one on the same server
        (updated,) = q.decode(json.dumps({"type": "update", **echo}))
        assert isinstance(updated, UpdateSettings) and updated.settings == started.settings
        (message,) = q.encode(SettingsUpdated(updated.settings))
        assert json.loads(message)["settings"] == echo


def test_update_refuses_another_detector_than_the_servers() -> None:
    p = opened()
    echo = settings_json(p.settings)
    echo["vad"]["kind"] = "silero"
    with pytest.raises(ProtocolError, match="vad.kind: expected 'webrtc' \\(the server's detector\\), got 'silero'"):
        p.decode(json.dumps({"type": "update", **echo}))
