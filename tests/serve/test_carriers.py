"""Telnyx, Plivo and Vonage media streams, Sans-I/O: tables of wire messages -> events / errors, and events
-> wire messages. Messages are written from each carrier's documentation, not from the adapters."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable

import numpy as np
import pytest

from voice_agent.audio import (
    Resampler,
    float_to_alaw,
    float_to_pcm16,
    float_to_pcm16be,
    float_to_ulaw,
    pcm16_to_float,
    pcm16be_to_float,
    resample,
    ulaw_to_float,
)
from voice_agent.engine.api import EngineInfo
from voice_agent.errors import ProtocolError
from voice_agent.serve.protocols.events import (
    AudioFrame,
    ClientEvent,
    Dtmf,
    EndSession,
    FieldRejected,
    Interrupted,
    PlaybackProgress,
    ResponseAudio,
    ResponseFinished,
    ResponseStarted,
    StartSession,
)
from voice_agent.serve.protocols.plivo import PlivoProtocol
from voice_agent.serve.protocols.telephony import CarrierProtocol, WireState, phone_line_settings
from voice_agent.serve.protocols.telnyx import REORDER_WINDOW, TelnyxProtocol
from voice_agent.serve.protocols.vonage import VonageProtocol
from voice_agent.serve.settings import SessionSettings

ENGINE = EngineInfo("LLaMA-Omni2-test", False, "cpu", "float32", voices=("en", "zh"), max_new_tokens=512)


def tone(n: int, rate: int, hz: float = 440.0) -> np.ndarray:
    return (0.4 * np.sin(2 * np.pi * hz * np.arange(n) / rate)).astype(np.float32)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def pcm_of(events: list[ClientEvent]) -> np.ndarray:
    frames = [e.pcm for e in events if isinstance(e, AudioFrame)]
    return np.concatenate(frames) if frames else np.zeros(0, np.float32)


def reply(p: CarrierProtocol, seconds: float = 1.0, chunk: int = 2000) -> list[str | bytes]:
    """The messages of one whole reply of `seconds` (24 kHz, in `chunk`-sample pieces)."""
    audio = tone(int(24_000 * seconds), 24_000)
    out = p.encode(ResponseStarted("r1", ""))
    for i in range(0, len(audio), chunk):
        out += p.encode(ResponseAudio("r1", audio[i : i + chunk], i / 24))
    return out + p.encode(ResponseFinished("r1", "eos", "", seconds * 1000, {}))


# ---- Telnyx ------------------------------------------------------------------------------------------

TX_SID = "32DE0DEA-53CB-4B21-89A4-9E1819C043BC"


def tx_start(encoding: str = "PCMU", rate: object = 8000, params: object = None, seq: str = "1") -> str:
    start: dict[str, object] = {"user_id": "u1", "call_control_id": "v3:abc", "client_state": "aGk=",
                                "media_format": {"encoding": encoding, "sample_rate": rate, "channels": 1}}
    if params is not None:
        start["custom_parameters"] = params
    return json.dumps({"event": "start", "sequence_number": seq, "start": start, "stream_id": TX_SID})


def tx_media(seq: int | None, payload: bytes | str, track: str = "inbound") -> str:
    obj: dict[str, object] = {"event": "media", "stream_id": TX_SID, "media": {
        "track": track, "chunk": "1", "timestamp": "5",
        "payload": payload if isinstance(payload, str) else b64(payload)}}
    if seq is not None:
        obj["sequence_number"] = str(seq)
    return json.dumps(obj)


def tx_opened(**kw: object) -> TelnyxProtocol:
    p = TelnyxProtocol(SessionSettings(), ENGINE)
    assert p.decode(json.dumps({"event": "connected", "version": "1.0.0"})) == []
    p.decode(tx_start(**kw))  # type: ignore[arg-type]
    return p


def test_telnyx_start_and_media_formats() -> None:
    p = TelnyxProtocol(SessionSettings(), ENGINE, lead_ms=200.0)
    assert p.pace_lead_ms == 200.0 and p.on_accept() == []
    [ev, rejected] = p.decode(tx_start(params={"voice": "zh", "key": "sk", "who": "x"}))
    assert isinstance(ev, StartSession) and (ev.sample_rate_hz, ev.key, ev.settings.turn.voice) == (8000, "sk", "zh")
    assert isinstance(rejected, FieldRejected) and rejected.param == "start.custom_parameters.who"
    assert (p.stream_id, p.call_id, p.codec.encoding) == (TX_SID, "v3:abc", "mulaw")
    for encoding, rate, codec in (("PCMA", 8000, "alaw"), ("L16", "16000", "l16"), ("pcmu", 16000, "mulaw")):
        q = tx_opened(encoding=encoding, rate=rate)
        assert (q.codec.encoding, q.codec.rate_hz) == (codec, int(rate))


@pytest.mark.parametrize(("encoding", "rate", "encode", "decode"), [
    ("PCMU", 8000, float_to_ulaw, ulaw_to_float),
    ("PCMA", 8000, float_to_alaw, None),
    ("L16", 16000, float_to_pcm16be, pcm16be_to_float),
    ("L16", 8000, float_to_pcm16be, pcm16be_to_float),
])
def test_telnyx_media_in_each_codec_is_one_continuous_16khz_stream(
        encoding: str, rate: int, encode: Callable[[np.ndarray], bytes],
        decode: Callable[[bytes], np.ndarray] | None) -> None:
    p = tx_opened(encoding=encoding, rate=rate)
    wire = encode(tone(rate, rate))  # 1 s
    step = len(wire) // 50  # 20 ms frames
    got = pcm_of([e for i in range(50) for e in p.decode(tx_media(2 + i, wire[i * step : (i + 1) * step]))])
    if decode is not None:
        expected = decode(wire)
        if rate != 16000:
            expected = Resampler(rate, 16000).process(expected)
        np.testing.assert_allclose(got, expected, atol=1e-5)
    assert abs(len(got) - 16000) < 100


def test_telnyx_reorders_frames_by_sequence_number() -> None:
    p = tx_opened()
    frames = [bytes([i]) * 160 for i in range(6)]  # seq 2..7, each frame one distinct code
    order = [2, 4, 3, 6, 5, 7]
    got: list[ClientEvent] = []
    for seq in order:
        got += p.decode(tx_media(seq, frames[seq - 2]))
    whole = pcm_of(tx_opened().decode(tx_media(2, b"".join(frames))))
    np.testing.assert_allclose(pcm_of(got), whole, atol=1e-5)  # as if sent in order in one piece
    assert p.late_frames == 0


def test_telnyx_control_messages_fill_their_place_in_the_sequence() -> None:
    p = tx_opened()
    assert len(p.decode(tx_media(2, b"\xff" * 160))) == 1
    assert p.decode(tx_media(4, b"\xff" * 160)) == []  # waits for 3
    mark = json.dumps({"event": "mark", "sequence_number": "3", "stream_id": TX_SID, "mark": {"name": "r:20"}})
    events = p.decode(mark)
    assert isinstance(events[0], AudioFrame) and events[1] == PlaybackProgress("r", 20.0)
    dtmf = json.dumps({"event": "dtmf", "sequence_number": "5", "stream_id": TX_SID, "dtmf": {"digit": "7"}})
    assert p.decode(dtmf) == [Dtmf("7")]
    assert len(p.decode(tx_media(6, b"\xff" * 160))) == 1


def test_telnyx_gives_up_a_missing_frame_after_the_window_and_drops_it_late() -> None:
    p = tx_opened()
    p.decode(tx_media(2, b"\xff" * 160))
    held = [p.decode(tx_media(4 + i, b"\xff" * 160)) for i in range(REORDER_WINDOW)]
    assert all(h == [] for h in held)  # 3 is missing: up to the window is held
    released = p.decode(tx_media(4 + REORDER_WINDOW, b"\xff" * 160))
    assert sum(isinstance(e, AudioFrame) for e in released) == REORDER_WINDOW + 1
    assert p.decode(tx_media(3, b"\xff" * 160)) == [] and p.late_frames == 1  # too late: dropped
    assert p.decode(tx_media(3, b"\xff" * 160)) == [] and p.late_frames == 2


def test_telnyx_stop_releases_held_frames_then_ends() -> None:
    p = tx_opened()
    p.decode(tx_media(2, b"\xff" * 160))
    assert p.decode(tx_media(4, b"\xff" * 160)) == []
    events = p.decode(json.dumps({"event": "stop", "sequence_number": "5", "stream_id": TX_SID,
                                  "stop": {"user_id": "u1", "call_control_id": "v3:abc"}}))
    assert isinstance(events[0], AudioFrame) and isinstance(events[-1], EndSession)


def test_telnyx_error_frames_and_outbound_track_are_no_events() -> None:
    p = tx_opened()
    err = json.dumps({"event": "error", "sequence_number": "2", "stream_id": TX_SID,
                      "payload": {"code": 100002, "title": "Unknown error", "detail": "x"}})
    assert p.decode(err) == []
    assert p.decode(tx_media(3, b"\xff" * 160, track="outbound")) == []
    assert len(p.decode(tx_media(4, b"\xff" * 160))) == 1  # 2 and 3 filled their places


def test_telnyx_outbound_frames_marks_and_clear() -> None:
    p = tx_opened()
    out = reply(p)
    media = [json.loads(m) for m in out if json.loads(m)["event"] == "media"]
    assert all(list(m) == ["event", "media"] and len(base64.b64decode(m["media"]["payload"])) == 160 for m in media)
    assert len(media) == 50
    marks = [json.loads(m)["mark"]["name"] for m in out if json.loads(m)["event"] == "mark"]
    assert marks[-1] == "r1:1000" and all(p.audio_ms(m) == (20.0 if '"media"' in m else 0.0) for m in out)
    assert p.encode(Interrupted("r1", 10.0)) == ['{"event":"clear"}']
    q = tx_opened(encoding="L16", rate=16000)
    frames = [base64.b64decode(json.loads(m)["media"]["payload"]) for m in reply(q) if '"media"' in m]
    assert all(len(f) == 640 for f in frames) and len(frames) == 50  # 20 ms of L16 at 16 kHz
    sent = pcm16be_to_float(b"".join(frames))[:16000]
    np.testing.assert_allclose(sent, resample(tone(24_000, 24_000), 24_000, 16_000), atol=2 / 32768)


TX_ERRORS: list[tuple[list[str], str | bytes, str, str]] = [
    ([], b"\x00" * 160, "bad_message", "expected a JSON text frame (telnyx sends no binary frames)"),
    ([], "{", "bad_json", "expected a JSON text message"),
    ([], '{"event": "hangup"}', "unknown_type", "event: expected one of ('connected', 'start', 'media'"),
    ([], tx_media(2, b"\xff" * 160), "start_required", "expected the telnyx start message first, got 'media'"),
    ([], tx_start(encoding="OPUS"), "bad_field", "start.media_format.encoding: expected one of ('PCMU', 'PCMA', "),
    ([], tx_start(rate=24000), "bad_field", "start.media_format.sample_rate: expected one of (8000, 16000)"),
    ([], json.dumps({"event": "start", "start": {}}), "bad_field", "stream_id: expected a string"),
    ([], tx_start(seq="one"), "bad_field", "sequence_number: expected a non-negative integer, got 'one'"),
    ([tx_start()], tx_start(), "duplicate_start", "expected one start per call, got a second"),
    ([tx_start()], tx_media(2, "**"), "bad_audio", "media.payload: expected base64 audio"),
    ([tx_start(encoding="L16")], tx_media(2, b"\x00" * 3), "bad_audio", "whole samples (2 bytes each), got 3"),
    ([tx_start()], tx_media(2, b"\xff" * 9000), "frame_too_large", "expected at most 8000 bytes"),
    ([tx_start()], json.dumps({"event": "media", "stream_id": "other", "media": {}}), "bad_field",
     "stream_id: expected this call's stream"),
    ([tx_start()], json.dumps({"event": "mark", "mark": {"name": "nope"}}), "bad_field", "mark.name: expected"),
    ([tx_start()], json.dumps({"event": "dtmf", "dtmf": {"digit": "E"}}), "bad_field", "dtmf.digit: expected"),
]


@pytest.mark.parametrize(("before", "message", "code", "text"), TX_ERRORS)
def test_telnyx_malformed_input(before: list[str], message: str | bytes, code: str, text: str) -> None:
    check_error(TelnyxProtocol(SessionSettings(), ENGINE), before, message, code, text)


def check_error(p: CarrierProtocol, before: list[str], message: str | bytes, code: str, text: str) -> None:
    for m in before:
        p.decode(m)
    state = p.state
    with pytest.raises(ProtocolError) as info:
        p.decode(message)
    assert info.value.code == code and not info.value.fatal
    assert text in str(info.value), str(info.value)
    assert p.state is state


# ---- Plivo -------------------------------------------------------------------------------------------

PV_SID = "87654321-4321-4321-4321-cba987654321"


def pv_start(encoding: str = "audio/x-mulaw", rate: object = 8000, headers: object = None) -> str:
    obj: dict[str, object] = {"event": "start", "sequenceNumber": 1, "start": {
        "callId": "12345678-1234-1234-1234-123456789abc", "streamId": PV_SID, "accountId": "MAXX",
        "tracks": ["inbound"], "mediaFormat": {"encoding": encoding, "sampleRate": rate}}}
    if headers is not None:
        obj["extra_headers"] = headers
    return json.dumps(obj)


def pv_media(payload: bytes | str) -> str:
    return json.dumps({"event": "media", "sequenceNumber": 2, "streamId": PV_SID, "media": {
        "track": "inbound", "timestamp": "1700000000000", "chunk": 1,
        "payload": payload if isinstance(payload, str) else b64(payload)}})


def pv_opened(**kw: object) -> PlivoProtocol:
    p = PlivoProtocol(SessionSettings(), ENGINE)
    p.decode(pv_start(**kw))  # type: ignore[arg-type]
    return p


def test_plivo_start_reads_extra_headers_as_parameters() -> None:
    p = PlivoProtocol(SessionSettings(), ENGINE)
    [ev] = p.decode(pv_start(headers="voice=zh;silence_ms=900;key=abc123"))
    assert isinstance(ev, StartSession) and (ev.settings.turn.voice, ev.settings.vad.silence_ms, ev.key) == (
        "zh", 900, "abc123")
    assert (p.stream_id, p.call_id) == (PV_SID, "12345678-1234-1234-1234-123456789abc")
    [ev, rejected] = PlivoProtocol(SessionSettings(), ENGINE).decode(pv_start(headers="voice=en,userId=7"))
    assert isinstance(rejected, FieldRejected) and rejected.param == "extra_headers.userId"
    [ev] = PlivoProtocol(SessionSettings(), ENGINE).decode(pv_start())
    assert isinstance(ev, StartSession) and ev.settings == phone_line_settings(SessionSettings())


def test_plivo_media_dtmf_checkpoint_echo_and_clear_ack() -> None:
    p = pv_opened(encoding="audio/x-l16", rate=16000)
    wire = float_to_pcm16(tone(16000, 16000))
    got = pcm_of([e for i in range(0, len(wire), 640) for e in p.decode(pv_media(wire[i : i + 640]))])
    np.testing.assert_allclose(got, pcm16_to_float(wire), atol=1e-6)  # 16 kHz in: no resampling
    assert p.decode(json.dumps({"event": "dtmf", "sequenceNumber": 3, "streamId": PV_SID,
                                "dtmf": {"track": "inbound", "digit": "9"}})) == [Dtmf("9")]
    played = json.dumps({"event": "playedStream", "sequenceNumber": 4, "streamId": PV_SID, "name": "r1:480"})
    assert p.decode(played) == [PlaybackProgress("r1", 480.0)]
    assert p.decode(json.dumps({"event": "clearedAudio", "sequenceNumber": 5, "streamId": PV_SID})) == []


def test_plivo_outbound_play_audio_checkpoint_and_clear_audio() -> None:
    p = pv_opened()
    out = reply(p)
    plays = [json.loads(m) for m in out if json.loads(m)["event"] == "playAudio"]
    assert len(plays) == 50 and all(
        m["streamId"] == PV_SID and m["media"]["contentType"] == "audio/x-mulaw" and m["media"]["sampleRate"] == 8000
        and len(base64.b64decode(m["media"]["payload"])) == 160 for m in plays)
    checkpoints = [json.loads(m) for m in out if json.loads(m)["event"] == "checkpoint"]
    assert checkpoints[-1] == {"event": "checkpoint", "streamId": PV_SID, "name": "r1:1000"}
    assert all(p.audio_ms(m) == (20.0 if '"playAudio"' in m else 0.0) for m in out)
    [clear] = p.encode(Interrupted("r1", 100.0))
    assert json.loads(clear) == {"event": "clearAudio", "streamId": PV_SID}
    assert p.decode(json.dumps({"event": "playedStream", "streamId": PV_SID, "name": "r1:1000"})) == []
    q = pv_opened(encoding="audio/x-l16", rate=16000)
    plays = [json.loads(m) for m in reply(q) if '"playAudio"' in m]
    assert all(m["media"]["contentType"] == "audio/x-l16" and m["media"]["sampleRate"] == 16000
               and len(base64.b64decode(m["media"]["payload"])) == 640 for m in plays)


PV_ERRORS: list[tuple[list[str], str | bytes, str, str]] = [
    ([], b"\x00", "bad_message", "plivo sends no binary frames"),
    ([], '{"event": "playAudio"}', "unknown_type", "event: expected one of ('start', 'media', 'dtmf', "),
    ([], pv_media(b"\xff" * 160), "start_required", "expected the plivo start message first, got 'media'"),
    ([], pv_start(encoding="audio/x-alaw"), "bad_field", "start.mediaFormat.encoding: expected one of"),
    ([], pv_start(rate=16000), "bad_field", "start.mediaFormat.sampleRate: expected one of (8000,) (Hz), got 16000"),
    ([], pv_start(encoding="audio/x-l16", rate=None), "bad_field", "expected one of (8000, 16000) (Hz), got None"),
    ([pv_start()], pv_start(), "duplicate_start", "got a second"),
    ([pv_start()], pv_media("not base64!"), "bad_audio", "expected base64 audio"),
    ([pv_start()], json.dumps({"event": "media", "streamId": "x", "media": {}}), "bad_field", "streamId"),
    ([pv_start()], json.dumps({"event": "playedStream", "name": 3}), "bad_field", "playedStream.name: expected"),
]


@pytest.mark.parametrize(("before", "message", "code", "text"), PV_ERRORS)
def test_plivo_malformed_input(before: list[str], message: str | bytes, code: str, text: str) -> None:
    check_error(PlivoProtocol(SessionSettings(), ENGINE), before, message, code, text)


# ---- Vonage ------------------------------------------------------------------------------------------


def vg_connected(rate: int = 16000, **headers: object) -> str:
    return json.dumps({"event": "websocket:connected", "content-type": f"audio/l16;rate={rate}", **headers})


def vg_opened(rate: int = 16000) -> VonageProtocol:
    p = VonageProtocol(SessionSettings(), ENGINE)
    p.decode(vg_connected(rate))
    return p


def test_vonage_session_opens_on_connected_with_headers_as_parameters() -> None:
    p = VonageProtocol(SessionSettings(), ENGINE)
    assert p.on_accept() == [] and p.state is WireState.AWAITING_START
    [ev] = p.decode(vg_connected(voice="en", silence_ms=1000, key="sk"))
    assert isinstance(ev, StartSession)
    assert (ev.sample_rate_hz, ev.settings.vad.silence_ms, ev.key) == (16000, 1000, "sk")
    events = VonageProtocol(SessionSettings(), ENGINE).decode(vg_connected(8000, caller={"n": 1}))
    assert isinstance(events[0], StartSession) and events[0].sample_rate_hz == 8000
    assert isinstance(events[1], FieldRejected) and events[1].param == "headers.caller"


def test_vonage_binary_audio_in_and_out_is_640_byte_frames() -> None:
    p = vg_opened()
    wire = float_to_pcm16(tone(16000, 16000))
    got = pcm_of([e for i in range(0, len(wire), 640) for e in p.decode(wire[i : i + 640])])
    np.testing.assert_allclose(got, pcm16_to_float(wire), atol=1e-6)
    out = reply(p)
    frames = [m for m in out if isinstance(m, bytes)]
    assert len(frames) == 50 and all(len(f) == 640 for f in frames)
    assert all(p.audio_ms(m) == (20.0 if isinstance(m, bytes) else 0.0) for m in out)
    notes = [json.loads(m) for m in out if isinstance(m, str)]
    assert notes[-1] == {"action": "notify", "payload": {"mark": "r1:1000"}}
    sent = pcm16_to_float(b"".join(frames))[:16000]
    np.testing.assert_allclose(sent, resample(tone(24_000, 24_000), 24_000, 16_000), atol=2 / 32768)
    q = vg_opened(8000)
    assert all(len(f) == 320 for f in reply(q) if isinstance(f, bytes))
    assert len(q.decode(b"\x00" * 320)) == 1


def test_vonage_dtmf_notify_echo_clear() -> None:
    p = vg_opened()
    assert p.decode(json.dumps({"event": "websocket:dtmf", "digit": "*", "duration": 260})) == [Dtmf("*")]
    note = json.dumps({"event": "websocket:notify", "payload": {"mark": "r9:40"}})
    assert p.decode(note) == [PlaybackProgress("r9", 40.0)]
    assert p.encode(Interrupted("r9", 40.0)) == ['{"action":"clear"}']
    assert p.decode(note) == []  # an echo for the cleared reply
    assert p.decode(json.dumps({"event": "websocket:cleared"})) == []


VG_ERRORS: list[tuple[list[str], str | bytes, str, str]] = [
    ([], b"\x00" * 640, "start_required", "expected the vonage start message first, got 640 bytes of audio"),
    ([], json.dumps({"event": "websocket:dtmf", "digit": "1"}), "start_required", "got 'websocket:dtmf'"),
    ([], json.dumps({"event": "websocket:hello"}), "unknown_type", "expected one of ('websocket:connected', "),
    ([], json.dumps({"event": "websocket:connected", "content-type": "audio/l16;rate=44100"}), "bad_field",
     "content-type: expected 'audio/l16;rate=R' with R one of (8000, 16000), got 'audio/l16;rate=44100'"),
    ([], json.dumps({"event": "websocket:connected"}), "bad_field", "got None"),
    ([], "nope", "bad_json", "expected a JSON text message"),
    ([vg_connected()], b"\x00" * 639, "bad_audio", "expected binary frames of 640 bytes (20 ms of L16 at 16000 Hz)"),
    ([vg_connected()], b"\x00" * 1280, "bad_audio", "got 1280 bytes"),
    ([vg_connected()], vg_connected(), "duplicate_start", "got a second"),
    ([vg_connected()], json.dumps({"event": "websocket:notify"}), "bad_field", "websocket:notify.payload: expected"),
    ([vg_connected()], json.dumps({"event": "websocket:notify", "payload": {"mark": "x"}}), "bad_field",
     "websocket:notify.payload.mark: expected a marker name"),
    ([vg_connected()], json.dumps({"event": "websocket:dtmf", "digit": "12"}), "bad_field", "got '12'"),
]


@pytest.mark.parametrize(("before", "message", "code", "text"), VG_ERRORS)
def test_vonage_malformed_input(before: list[str], message: str | bytes, code: str, text: str) -> None:
    check_error(VonageProtocol(SessionSettings(), ENGINE), before, message, code, text)
