"""Twilio Media Streams (and its Exotel dialect), Sans-I/O: tables of wire messages -> events / errors, and
events -> wire messages. Messages are written from Twilio's documentation, not from the adapter."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from voice_agent.audio import Resampler, float_to_pcm16, float_to_ulaw, pcm16_to_float, resample, ulaw_to_float
from voice_agent.engine.api import EngineInfo
from voice_agent.errors import ProtocolError
from voice_agent.serve.protocols.events import (
    AudioFrame,
    Dtmf,
    EndSession,
    ErrorEvent,
    FieldRejected,
    Interrupted,
    PlaybackProgress,
    ResponseAudio,
    ResponseFinished,
    ResponseStarted,
    ResponseText,
    StartSession,
)
from voice_agent.serve.protocols.telephony import (
    PHONE_MIN_INTERRUPTION_MS,
    PHONE_SILENCE_MS,
    PHONE_VAD_AGGRESSIVENESS,
    WireState,
    phone_line_settings,
    silero_available,
)
from voice_agent.serve.protocols.twilio import ExotelProtocol, TwilioProtocol
from voice_agent.serve.settings import SessionSettings

SID = "MZ18ad3ab5a668481ce02b83e7395059f0"
ENGINE = EngineInfo("LLaMA-Omni2-test", False, "cpu", "float32", voices=("en", "zh"), max_new_tokens=512)
CONNECTED = json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"})


def start(params: object = None, **media_format: object) -> str:
    body: dict[str, object] = {
        "streamSid": SID, "accountSid": "AC123", "callSid": "CA123", "tracks": ["inbound"],
        "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000, "channels": 1, **media_format},
    }
    if params is not None:
        body["customParameters"] = params
    return json.dumps({"event": "start", "sequenceNumber": "1", "start": body, "streamSid": SID})


def media(payload: bytes | str, sid: str = SID, track: str = "inbound") -> str:
    text = payload if isinstance(payload, str) else base64.b64encode(payload).decode()
    return json.dumps({"event": "media", "sequenceNumber": "3", "streamSid": sid,
                       "media": {"track": track, "chunk": "1", "timestamp": "5", "payload": text}})


def mark(name: object) -> str:
    return json.dumps({"event": "mark", "sequenceNumber": "4", "streamSid": SID, "mark": {"name": name}})


def dtmf(digit: object) -> str:
    return json.dumps({"event": "dtmf", "streamSid": SID, "sequenceNumber": "5",
                       "dtmf": {"track": "inbound_track", "digit": digit}})


STOP = json.dumps({"event": "stop", "sequenceNumber": "9", "streamSid": SID,
                   "stop": {"accountSid": "AC123", "callSid": "CA123"}})


def opened(params: object = None) -> TwilioProtocol:
    p = TwilioProtocol(SessionSettings(), ENGINE)
    p.decode(CONNECTED)
    p.decode(start(params))
    return p


def tone(n: int, rate: int, hz: float = 440.0) -> np.ndarray:
    return (0.4 * np.sin(2 * np.pi * hz * np.arange(n) / rate)).astype(np.float32)


def payloads(messages: list[str | bytes], event: str = "media") -> list[bytes]:
    out = []
    for m in messages:
        obj = json.loads(m)
        if obj["event"] == event:
            out.append(base64.b64decode(obj["media"]["payload"]))
    return out


def marks(messages: list[str | bytes]) -> list[str]:
    return [json.loads(m)["mark"]["name"] for m in messages if json.loads(m)["event"] == "mark"]


# ---- client -> server --------------------------------------------------------------------------------


def test_adapter_shape() -> None:
    p = TwilioProtocol(SessionSettings(), lead_ms=120.0)
    assert (p.pace_lead_ms, p.subprotocol, p.conversation_events) == (120.0, None, False)
    assert p.on_accept() == [] and p.handshake_key({"x": "y"}, {"key": "k"}) is None
    assert p.decode(CONNECTED) == [] and p.state is WireState.AWAITING_START


def test_start_opens_the_session_with_phone_line_settings() -> None:
    p = TwilioProtocol(SessionSettings(), ENGINE)
    [ev] = p.decode(start())
    assert isinstance(ev, StartSession)
    assert (ev.sample_rate_hz, ev.output_sample_rate_hz, ev.frame_ms, ev.key) == (8000, 8000, 20, None)
    assert ev.settings == phone_line_settings(SessionSettings())
    assert (p.state, p.stream_id, p.call_id) == (WireState.OPEN, SID, "CA123")


def test_phone_line_settings() -> None:
    base = SessionSettings()
    s = phone_line_settings(base, silero=False)
    assert (s.vad.kind, s.vad.aggressiveness, s.vad.silence_ms, s.min_interruption_ms) == (
        "webrtc", PHONE_VAD_AGGRESSIVENESS, PHONE_SILENCE_MS, PHONE_MIN_INTERRUPTION_MS)
    assert phone_line_settings(base, silero=True).vad.kind == "silero"
    assert phone_line_settings(base).vad.kind == ("silero" if silero_available() else "webrtc")
    assert s.turn == base.turn and s.vad.max_turn_ms == base.vad.max_turn_ms
    longer = SessionSettings(min_interruption_ms=900)
    assert phone_line_settings(longer, silero=False).min_interruption_ms == 900  # never shortened


def test_custom_parameters_set_voice_instructions_silence_and_key() -> None:
    p = TwilioProtocol(SessionSettings(), ENGINE)
    [ev] = p.decode(start({"voice": "zh", "instructions": "Be brief.", "silence_ms": "1200", "key": "sk-1"}))
    assert isinstance(ev, StartSession)
    assert (ev.settings.turn.voice, ev.settings.instructions, ev.settings.vad.silence_ms, ev.key) == (
        "zh", "Be brief.", 1200, "sk-1")


# (custom parameters, the param reported, text of its message); the call opens anyway with the default
REJECTED_PARAMETERS = [
    ({"colour": "blue"}, "start.customParameters.colour", "expected names among ('voice', 'instructions'"),
    ({"voice": "klingon"}, "start.customParameters.voice", "voice: expected one of ['en', 'zh']"),
    ({"silence_ms": "soon"}, "start.customParameters.silence_ms", "expected an integer number of milli"),
    ({"silence_ms": "20"}, "start.customParameters.silence_ms", "silence_ms: expected an integer 50..10000"),
    ({"instructions": " "}, "start.customParameters.instructions", "expected 1..8000 characters"),
    ({"voice": ["en"]}, "start.customParameters.voice", "expected a string, got list"),
    ("voice=en", "start.customParameters", "expected an object of name -> value, got str"),
]


@pytest.mark.parametrize(("params", "param", "text"), REJECTED_PARAMETERS)
def test_unusable_custom_parameters_are_reported_and_the_call_opens(params: object, param: str, text: str) -> None:
    p = TwilioProtocol(SessionSettings(), ENGINE)
    events = p.decode(start(params))
    assert isinstance(events[0], StartSession) and events[0].settings == phone_line_settings(SessionSettings())
    [rejected] = events[1:]
    assert isinstance(rejected, FieldRejected) and rejected.code == "bad_field"
    assert rejected.param == param and text in rejected.message, rejected.message
    assert p.state is WireState.OPEN


def test_media_becomes_16khz_audio_with_one_resampler_across_frames() -> None:
    p = opened()
    signal = tone(8000, 8000)  # 1 s at 8 kHz: 50 frames of 20 ms
    wire = float_to_ulaw(signal)
    got = []
    for i in range(0, len(wire), 160):
        [ev] = p.decode(media(wire[i : i + 160]))
        assert isinstance(ev, AudioFrame) and ev.pcm.dtype == np.float32
        got.append(ev.pcm)
    streamed = np.concatenate(got)
    whole = Resampler(8000, 16000).process(ulaw_to_float(wire))  # the whole signal at once
    assert len(streamed) == len(whole) > 15_900
    np.testing.assert_allclose(streamed, whole, atol=1e-5)


def test_outbound_track_media_is_ignored() -> None:
    assert opened().decode(media(b"\xff" * 160, track="outbound")) == []


def test_mark_echo_becomes_playback_progress() -> None:
    assert opened().decode(mark("resp_3:1240")) == [PlaybackProgress("resp_3", 1240.0)]
    assert opened().decode(mark("resp:with:colons:20.5")) == [PlaybackProgress("resp:with:colons", 20.5)]


def test_dtmf_and_stop() -> None:
    p = opened()
    assert p.decode(dtmf("5")) == [Dtmf("5")]
    assert p.decode(dtmf("#")) == [Dtmf("#")]
    assert p.decode(dtmf("a")) == [Dtmf("A")]
    [end] = p.decode(STOP)
    assert isinstance(end, EndSession) and "call ended" in end.reason


# (messages before, message, error code, text the message must contain)
ERRORS: list[tuple[list[str], str | bytes, str, str]] = [
    ([], "hello", "bad_json", "expected a JSON text message, got 'hello'"),
    ([], "[1]", "bad_message", "expected a JSON object with a string 'event'"),
    ([], '{"type": "start"}', "bad_message", "string 'event'"),
    ([], b"\xff" * 160, "bad_message", "expected a JSON text frame (twilio sends no binary frames), got a binary"),
    ([], '{"event": "dance"}', "unknown_type", "event: expected one of ('connected', 'start', 'media', "),
    ([], media(b"\xff" * 160), "start_required", "expected the twilio start message first, got 'media'"),
    ([], mark("r:1"), "start_required", "got 'mark'"),
    ([], dtmf("1"), "start_required", "got 'dtmf'"),
    ([], STOP, "start_required", "got 'stop'"),
    ([], '{"event": "start"}', "bad_field", "start: expected an object, got nothing"),
    ([], '{"event": "start", "start": {"callSid": "CA1"}}', "bad_field", "start.streamSid: expected a string"),
    ([], start(encoding="audio/x-alaw"), "bad_field", "start.mediaFormat.encoding: expected one of "
     "('audio/x-mulaw',), got 'audio/x-alaw'"),
    ([], start(sampleRate=16000), "bad_field", "start.mediaFormat.sampleRate: expected one of (8000,)"),
    ([], start(channels=2), "bad_field", "start.mediaFormat.channels: expected 1, got 2"),
    ([start()], start(), "duplicate_start", "expected one start per call, got a second"),
    ([start()], media("%%%not base64%%%"), "bad_audio", "media.payload: expected base64 audio, got '%%%"),
    ([start()], media(""), "bad_audio", "expected mulaw audio of whole samples (1 bytes each), got 0 bytes"),
    ([start()], media(b"\xff" * 8001), "frame_too_large", "expected at most 8000 bytes of audio per message"),
    ([start()], media(b"\xff" * 160, sid="MZother"), "bad_field", "streamSid: expected this call's stream"),
    ([start()], json.dumps({"event": "media", "streamSid": SID}), "bad_field", "media: expected an object"),
    ([start()], '{"event": "media", "media": {"payload": 5}}', "bad_field", "media.payload: expected a base64"),
    ([start()], mark("no-separator"), "bad_field", "mark.name: expected a marker name '<response id>:<ms>'"),
    ([start()], mark("r:-5"), "bad_field", "this server sent, got 'r:-5'"),
    ([start()], mark("r:soon"), "bad_field", "got 'r:soon'"),
    ([start()], mark(7), "bad_field", "mark.name: expected a marker name"),
    ([start()], '{"event": "mark"}', "bad_field", "mark: expected an object"),
    ([start()], dtmf("x"), "bad_field", "dtmf.digit: expected one of 0-9 * # A-D, got 'x'"),
    ([start()], dtmf(5), "bad_field", "got int"),
]


@pytest.mark.parametrize(("before", "message", "code", "text"), ERRORS)
def test_malformed_input_is_a_protocol_error_and_the_call_goes_on(
        before: list[str], message: str | bytes, code: str, text: str) -> None:
    p = TwilioProtocol(SessionSettings(), ENGINE)
    for m in before:
        p.decode(m)
    state = p.state
    with pytest.raises(ProtocolError) as info:
        p.decode(message)
    assert info.value.code == code and not info.value.fatal
    assert text in str(info.value), str(info.value)
    assert p.state is state
    if state is WireState.OPEN:  # the call survives: the next good frame is audio as usual
        assert isinstance(p.decode(media(b"\xff" * 160))[0], AudioFrame)


# ---- server -> client --------------------------------------------------------------------------------


def test_reply_audio_goes_out_in_20ms_mulaw_frames_with_a_mark_after_each_chunk() -> None:
    """(and every 100 ms within a chunk: see the next test)"""
    p = opened()
    assert p.encode(ResponseStarted("resp_1", "item_1")) == []
    audio = tone(24_000, 24_000)  # 1 s of reply
    out: list[str | bytes] = []
    for i in range(0, len(audio), 2_000):  # 83.3 ms chunks: frames straddle chunks
        chunk = p.encode(ResponseAudio("resp_1", audio[i : i + 2000], i / 24))
        assert chunk and json.loads(chunk[-1])["event"] == "mark"
        out += chunk
    out += p.encode(ResponseFinished("resp_1", "eos", "hi", 1000.0, {}))
    frames = payloads(out)
    assert all(len(f) == 160 for f in frames)  # 20 ms of mu-law at 8 kHz
    assert len(frames) == 50  # 8000 samples, the last frame padded
    for m in out:
        obj = json.loads(m)
        assert obj["streamSid"] == SID and list(obj) in (["event", "streamSid", "media"],
                                                         ["event", "streamSid", "mark"])
        assert p.audio_ms(m) == (20.0 if obj["event"] == "media" else 0.0)
    ends = [float(n.rpartition(":")[2]) for n in marks(out)]
    assert ends == sorted(ends) and ends[-1] == 1000.0  # the last mark: the whole reply
    assert all(n.startswith("resp_1:") for n in marks(out))
    # the frames are the whole reply resampled at once (state kept across chunks), mu-law coded
    whole = resample(audio, 24_000, 8_000)
    sent = ulaw_to_float(b"".join(frames))[: len(whole)]
    step = np.abs(ulaw_to_float(float_to_ulaw(whole)) - whole).max() * 2 + 1e-6  # one quantisation step
    assert np.abs(sent - whole).max() <= step


def test_a_mark_name_counts_the_audio_framed_so_far() -> None:
    p = opened()
    p.encode(ResponseStarted("r", ""))
    first = p.encode(ResponseAudio("r", tone(2400, 24_000), 0.0))  # 100 ms in, ~96 ms out (filter delay)
    n = len(payloads(first))
    assert marks(first) == [f"r:{n * 20}"]
    assert p.encode(ResponseAudio("r", tone(10, 24_000), 100.0)) == []  # not a whole frame yet: no mark


def test_a_long_chunk_gets_a_mark_every_100_ms_so_a_cut_is_that_precise() -> None:
    p = opened()
    p.encode(ResponseStarted("r", ""))
    out = p.encode(ResponseAudio("r", tone(12_000, 24_000), 0.0))  # one 500 ms chunk (as an engine block)
    events = [json.loads(m)["event"] for m in out]
    n = len(payloads(out))
    assert n >= 20 and events[:6] == ["media"] * 5 + ["mark"]  # 5 frames (100 ms), then a mark
    assert [float(x.rpartition(":")[2]) for x in marks(out)][:4] == [100.0, 200.0, 300.0, 400.0]
    assert marks(out)[-1] == f"r:{n * 20}" and events[-1] == "mark"


def test_interrupted_sends_clear_and_forgets_the_reply() -> None:
    p = opened()
    p.encode(ResponseStarted("r1", ""))
    p.encode(ResponseAudio("r1", tone(4800, 24_000), 0.0))
    [clear] = p.encode(Interrupted("r1", 120.0))
    assert json.loads(clear) == {"event": "clear", "streamSid": SID} and p.audio_ms(clear) == 0.0
    assert p.encode(ResponseAudio("r1", tone(4800, 24_000), 200.0)) == []  # late audio of the cut reply
    assert p.encode(ResponseFinished("r1", "cancelled", "", 200.0, {})) == []  # no tail flushed
    assert p.decode(mark("r1:180")) == []  # Twilio echoes the marks the clear dropped: ignored
    p.encode(ResponseStarted("r2", ""))
    out = p.encode(ResponseAudio("r2", tone(4800, 24_000), 0.0))
    assert payloads(out) and marks(out)[0].startswith("r2:")
    assert p.decode(mark(marks(out)[0])) == [PlaybackProgress("r2", float(marks(out)[0].split(":")[1]))]


def test_events_without_a_wire_message_encode_to_nothing() -> None:
    p = opened()
    for event in (ResponseText("r", "hi"), ErrorEvent("bad_json", "x"), ErrorEvent("x", "y", fatal=True),
                  ResponseFinished("unknown", "eos", "", 0.0, {})):
        assert p.encode(event) == []


def test_audio_without_response_started_still_frames() -> None:
    p = opened()
    out = p.encode(ResponseAudio("r", tone(4800, 24_000), 0.0))
    assert payloads(out) and marks(out)


# ---- Exotel: Twilio's events in snake_case, PCM16 ----------------------------------------------------


def exotel_start(**extra: object) -> str:
    return json.dumps({"event": "start", "sequence_number": "1", "stream_sid": "EX1", "start": {
        "stream_sid": "EX1", "call_sid": "CA9", "account_sid": "AC9", "from": "+1", "to": "+2",
        "custom_parameters": {"voice": "en", **extra},
        "media_format": {"encoding": "audio/x-raw", "sample_rate": "8000", "bit_rate": "16"}}})


def test_exotel_dialect_both_ways() -> None:
    p = ExotelProtocol(SessionSettings(), ENGINE)
    assert p.decode(json.dumps({"event": "connected"})) == []
    [ev] = p.decode(exotel_start())
    assert isinstance(ev, StartSession) and ev.settings.turn.voice == "en" and ev.sample_rate_hz == 8000
    signal = tone(8000, 8000)
    wire = float_to_pcm16(signal)
    got = []
    for i in range(0, len(wire), 1600):  # ~100 ms chunks
        msg = json.dumps({"event": "media", "sequence_number": "3", "stream_sid": "EX1",
                          "media": {"chunk": "2", "timestamp": "200",
                                    "payload": base64.b64encode(wire[i : i + 1600]).decode()}})
        got.append(p.decode(msg)[0].pcm)  # type: ignore[union-attr]
    whole = Resampler(8000, 16000).process(pcm16_to_float(wire))
    np.testing.assert_allclose(np.concatenate(got), whole, atol=1e-5)
    with pytest.raises(ProtocolError, match="whole samples"):
        p.decode(json.dumps({"event": "media", "media": {"payload": base64.b64encode(b"abc").decode()}}))
    p.encode(ResponseStarted("r", ""))
    audio = tone(24_000, 24_000)
    out = p.encode(ResponseAudio("r", audio, 0.0)) + p.encode(ResponseFinished("r", "eos", "", 1000.0, {}))
    frames = [base64.b64decode(json.loads(m)["media"]["payload"]) for m in out if '"media"' in m]
    assert all(len(f) == 1600 for f in frames) and len(frames) == 10  # 100 ms of PCM16 at 8 kHz
    assert all(p.audio_ms(m) == (100.0 if '"event":"media"' in m else 0.0) for m in out)
    assert json.loads(out[0])["stream_sid"] == "EX1"
    whole_out = resample(audio, 24_000, 8_000)
    sent = np.frombuffer(b"".join(frames), "<i2")[: len(whole_out)].astype(int)
    assert np.abs(sent - np.frombuffer(float_to_pcm16(whole_out), "<i2")).max() <= 1  # chunked == at once
    [clear] = p.encode(Interrupted("r", 10.0))
    assert json.loads(clear) == {"event": "clear", "stream_sid": "EX1"}
    assert p.decode(json.dumps({"event": "dtmf", "stream_sid": "EX1", "dtmf": {"digit": "5", "duration": "100"}})) \
        == [Dtmf("5")]
    assert isinstance(p.decode(json.dumps({"event": "stop", "stream_sid": "EX1"}))[0], EndSession)
