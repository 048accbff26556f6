"""OpenAI Realtime (GA) adapter, Sans-I/O: tables of client events -> events / errors, server events -> GA events.

Where the `openai` package is installed, every encoded server event is also validated against its GA pydantic
type (`openai.types.realtime.RealtimeServerEvent`), as openai-agents does with each event it receives."""

from __future__ import annotations

import base64
import dataclasses
import json
from typing import Any

import numpy as np
import pytest

from voice_agent.audio import (
    G711_SAMPLE_RATE,
    INPUT_SAMPLE_RATE,
    OUTPUT_SAMPLE_RATE,
    alaw_to_float,
    float_to_alaw,
    float_to_pcm16,
    float_to_ulaw,
    pcm16_to_float,
    resample,
    ulaw_to_float,
)
from voice_agent.engine.api import EngineInfo, TurnSettings
from voice_agent.errors import ProtocolError
from voice_agent.serve.protocols.events import (
    AudioFrame,
    CancelResponse,
    ClearInput,
    CommitInput,
    CreateItem,
    CreateResponse,
    DeleteItem,
    ErrorEvent,
    FieldRejected,
    InputCleared,
    InputCommitted,
    Interrupted,
    Item,
    ItemAdded,
    ItemDeleted,
    ItemDone,
    ItemRetrieved,
    ItemTruncated,
    ResponseAudio,
    ResponseFinished,
    ResponseOptions,
    ResponseStarted,
    ResponseText,
    RetrieveItem,
    ServerEvent,
    SessionStarted,
    SettingsUpdated,
    SpeechStarted,
    SpeechStopped,
    StartSession,
    TruncateItem,
    UpdateSettings,
    UserTranscript,
)
from voice_agent.serve.protocols.openai import (
    BetaInterfaceRefused,
    OpenAIRealtimeProtocol,
    RealtimeRequestError,
)
from voice_agent.serve.settings import SessionSettings
from voice_agent.serve.vad import VadSettings

ENGINE = EngineInfo("LLaMA-Omni2-test", False, "cpu", "float32", voices=("en", "zh"), max_new_tokens=512)
try:
    from openai.types.realtime import RealtimeServerEvent
    from pydantic import TypeAdapter

    GA_EVENT: Any = TypeAdapter(RealtimeServerEvent)
except ImportError:  # the openai package is a test extra; the REQUIRED table below still checks every event
    GA_EVENT = None

# protocols.md §5.2: the fields without defaults in the GA types
REQUIRED = {
    "session.created": ("session",), "session.updated": ("session",),
    "input_audio_buffer.speech_started": ("audio_start_ms", "item_id"),
    "input_audio_buffer.speech_stopped": ("audio_end_ms", "item_id"),
    "input_audio_buffer.committed": ("item_id",), "input_audio_buffer.cleared": (),
    "conversation.item.added": ("item",), "conversation.item.done": ("item",),
    "conversation.item.deleted": ("item_id",), "conversation.item.retrieved": ("item",),
    "conversation.item.truncated": ("item_id", "content_index", "audio_end_ms"),
    "conversation.item.input_audio_transcription.delta": ("item_id",),
    "conversation.item.input_audio_transcription.completed": ("item_id", "content_index", "transcript", "usage"),
    "conversation.item.input_audio_transcription.failed": ("item_id", "content_index", "error"),
    "response.created": ("response",), "response.done": ("response",),
    "response.output_item.added": ("response_id", "output_index", "item"),
    "response.output_item.done": ("response_id", "output_index", "item"),
    "response.content_part.added": ("response_id", "item_id", "output_index", "content_index", "part"),
    "response.content_part.done": ("response_id", "item_id", "output_index", "content_index", "part"),
    "response.output_audio.delta": ("response_id", "item_id", "output_index", "content_index", "delta"),
    "response.output_audio.done": ("response_id", "item_id", "output_index", "content_index"),
    "response.output_audio_transcript.delta": ("response_id", "item_id", "output_index", "content_index", "delta"),
    "response.output_audio_transcript.done": ("response_id", "item_id", "output_index", "content_index",
                                              "transcript"),
    "response.output_text.delta": ("response_id", "item_id", "output_index", "content_index", "delta"),
    "response.output_text.done": ("response_id", "item_id", "output_index", "content_index", "text"),
    "error": ("error",),
}


def adapter(defaults: SessionSettings | None = None, engine: EngineInfo | None = ENGINE,
            **headers: str) -> OpenAIRealtimeProtocol:
    return OpenAIRealtimeProtocol(defaults or SessionSettings(), engine, headers=headers, query={"model": "gpt-x"})


def send(p: OpenAIRealtimeProtocol, type_: str, **fields: Any) -> list[Any]:
    return p.decode(json.dumps({"type": type_, **fields}))


def wire(p: OpenAIRealtimeProtocol, event: ServerEvent) -> list[dict[str, Any]]:
    """Encode, check every message against §5.2 (and the GA types when installed), return the objects."""
    out = []
    for message in p.encode(event):
        assert isinstance(message, str)
        obj = json.loads(message)
        assert obj["event_id"].startswith("event_") and isinstance(obj["type"], str)
        missing = [k for k in REQUIRED[obj["type"]] if k not in obj]
        assert not missing, f"{obj['type']} lacks {missing}"
        if GA_EVENT is not None:
            GA_EVENT.validate_python(obj)
        out.append(obj)
    return out


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def sine(rate: int, seconds: float = 0.5, freq_hz: float = 440.0) -> np.ndarray:
    t = np.arange(int(rate * seconds)) / rate
    return (0.4 * np.sin(2 * np.pi * freq_hz * t)).astype(np.float32)


def started(p: OpenAIRealtimeProtocol) -> list[dict[str, Any]]:
    return wire(p, SessionStarted("sess_1", 24_000, 24_000, 20, "LLaMA-Omni2-test", False, p.settings))


# ---- handshake -----------------------------------------------------------------------------------------


def test_session_opens_with_the_connection_and_session_created_is_first() -> None:
    p = adapter()
    [start] = p.on_accept()
    assert isinstance(start, StartSession) and start.settings == SessionSettings()
    [created] = started(p)
    session = created["session"]
    assert created["type"] == "session.created" and created["event_id"] == "event_1"
    assert session["type"] == "realtime" and session["object"] == "realtime.session" and session["id"] == "sess_1"
    assert session["model"] == "gpt-x"  # the URL's model=, whatever it is
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300, "silence_duration_ms": 500,
        "idle_timeout_ms": None, "create_response": True, "interrupt_response": True}
    assert session["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert session["output_modalities"] == ["audio"] and session["tools"] == [] and session["tool_choice"] == "auto"


def test_a_browser_gets_the_realtime_subprotocol_and_its_key_is_read() -> None:
    offered = {"Sec-WebSocket-Protocol": "realtime, openai-insecure-api-key.sk-123"}
    p = OpenAIRealtimeProtocol(SessionSettings(), ENGINE, headers=offered, query={})
    assert p.subprotocol == "realtime"
    assert p.handshake_key(offered, {}) == "sk-123"
    assert p.handshake_key({"sec-websocket-protocol": "realtime"}, {}) is None
    assert adapter().subprotocol is None


@pytest.mark.parametrize("headers", [{"OpenAI-Beta": "realtime=v1"},
                                     {"sec-websocket-protocol": "realtime, openai-beta.realtime-v1"}])
def test_a_beta_client_is_refused_on_accept(headers: dict[str, str]) -> None:
    p = OpenAIRealtimeProtocol(SessionSettings(), ENGINE, headers=headers, query={})
    with pytest.raises(BetaInterfaceRefused, match="retired beta interface") as e:
        p.on_accept()
    assert e.value.code == "beta_api_shape_disabled" and e.value.fatal
    assert isinstance(e.value, ProtocolError)


def test_without_a_model_query_the_engine_model_is_reported() -> None:
    p = OpenAIRealtimeProtocol(SessionSettings(), ENGINE, headers={}, query={})
    assert started(p)[0]["session"]["model"] == "LLaMA-Omni2-test"


# ---- client events: errors -----------------------------------------------------------------------------

# (message, error code, param, text the message must contain)
ERRORS: list[tuple[str | bytes, str, str | None, str]] = [
    ("hello", "bad_json", None, "expected a JSON text message, got 'hello'"),
    (b"\x00\x01", "bad_message", None, "expected JSON text messages (audio goes base64 in input_audio_buffer.append)"),
    ("[1]", "bad_message", None, "expected a JSON object with a string 'type'"),
    ('{"type": "dance"}', "unknown_type", "type", "expected a GA client event (session.update, "),
    ('{"type": "response.audio.delta"}', "unknown_type", "type", "got 'response.audio.delta'"),
    ('{"type": "session.update", "event_id": 5}', "bad_field", "event_id", "event_id: expected a string, got 5"),
    ('{"type": "session.update"}', "bad_field", "session", "session: expected an object, got null"),
    ('{"type": "session.update", "session": {"type": "transcription"}}', "bad_field", "session.type",
     "expected 'realtime' (transcription sessions are not served here)"),
    ('{"type": "session.update", "session": {"output_modalities": ["video"]}}', "bad_field",
     "session.output_modalities", "expected ['audio'] or ['text'], got [\"video\"]"),
    ('{"type": "session.update", "session": {"instructions": 3}}', "bad_field", "session.instructions",
     "expected a string or null, got 3"),
    ('{"type": "session.update", "session": {"max_output_tokens": 0}}', "bad_field", "session.max_output_tokens",
     "expected an integer >= 1 or 'inf', got 0"),
    ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/pcm", "rate": 16000}}}}}',
     "bad_field", "session.audio.input.format.rate", "expected 24000 (audio/pcm is 24000 Hz only), got 16000"),
    ('{"type": "session.update", "session": {"audio": {"input": {"format": {"type": "audio/opus"}}}}}',
     "bad_field", "session.audio.input.format", "expected {'type': one of ('audio/pcm', 'audio/pcmu', "),
    ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"type": "magic"}}}}}',
     "bad_field", "session.audio.input.turn_detection.type", "expected 'server_vad', 'semantic_vad'"),
    ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"threshold": 2}}}}}',
     "bad_field", "session.audio.input.turn_detection.threshold", "expected a number in [0, 1], got 2"),
    ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"silence_duration_ms": 5}}}}}',
     "bad_field", "session.audio.input.turn_detection", "silence_ms: expected an integer 50..10000, got 5"),
    ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"prefix_padding_ms": "x"}}}}}',
     "bad_field", "session.audio.input.turn_detection.prefix_padding_ms",
     "expected an integer number of milliseconds, got 'x'"),
    ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"create_response": "yes"}}}}}',
     "bad_field", "session.audio.input.turn_detection.create_response", "expected true, false or null"),
    ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": {"idle_timeout_ms": 5}}}}}',
     "bad_field", "session.audio.input.turn_detection.idle_timeout_ms", "expected an integer 1000..600000"),
    ('{"type": "session.update", "session": {"audio": {"input": {"turn_detection": '
     '{"type": "semantic_vad", "eagerness": "eager"}}}}}', "bad_field",
     "session.audio.input.turn_detection.eagerness", "expected one of ('low', 'medium', 'high', 'auto')"),
    ('{"type": "session.update", "session": {"audio": {"input": {"transcription": {"language": 7}}}}}',
     "bad_field", "session.audio.input.transcription.language", "expected a string, got 7"),
    ('{"type": "session.update", "session": {"audio": {"output": {"voice": 3}}}}', "bad_field",
     "session.audio.output.voice", "expected a voice name or {'id': name}, got 3"),
    ('{"type": "session.update", "session": {"audio": {"output": {"speed": 4}}}}', "bad_field",
     "session.audio.output.speed", "expected a number in [0.25, 1.5], got 4"),
    ('{"type": "session.update", "session": {"tools": {}}}', "bad_field", "session.tools", "expected a list"),
    ('{"type": "input_audio_buffer.append"}', "bad_field", "audio", "audio: expected base64 audio (a string)"),
    ('{"type": "input_audio_buffer.append", "audio": "***"}', "bad_audio", "audio", "expected base64 audio, got '***'"),
    ('{"type": "input_audio_buffer.append", "audio": "AA=="}', "bad_audio", "audio",
     "expected PCM16 audio (an even number of bytes), got 1 bytes"),
    (json.dumps({"type": "input_audio_buffer.append", "audio": "A" * (21 * 1024 * 1024)}), "frame_too_large", "audio",
     "expected at most 15728640 bytes of audio per event (15 MiB)"),
    ('{"type": "conversation.item.create"}', "bad_field", "item", "item: expected an object, got null"),
    ('{"type": "conversation.item.create", "item": {"type": "function_call"}}', "bad_field", "item.type",
     "expected 'message' (function calls and other items are not served)"),
    ('{"type": "conversation.item.create", "item": {"role": "robot", "content": []}}', "bad_field", "item.role",
     "expected 'user', 'assistant' or 'system', got 'robot'"),
    ('{"type": "conversation.item.create", "item": {"role": "user", "content": []}}', "bad_field", "item.content",
     "expected a non-empty list of content parts"),
    ('{"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_image"}]}}',
     "bad_field", "item.content[0].type", "expected one of ('input_text', 'input_audio') for a user item"),
    ('{"type": "conversation.item.create", "item": {"role": "system", "content": [{"type": "output_text"}]}}',
     "bad_field", "item.content[0].type", "for a system item, got 'output_text'"),
    ('{"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_text"}]}}',
     "bad_field", "item.content[0].text", "expected a string, got null"),
    ('{"type": "conversation.item.create", "item": {"id": "", "role": "user", "content": []}}', "bad_field",
     "item.id", "expected a string of 1..64 characters, got ''"),
    ('{"type": "conversation.item.create", "previous_item_id": 3, "item": {}}', "bad_field", "previous_item_id",
     "expected an item id (a string), 'root' or null, got 3"),
    ('{"type": "conversation.item.create", "item": {"role": "user", "content": '
     '[{"type": "input_audio", "audio": "AAAA"}, {"type": "input_text", "text": "x"}]}}', "bad_field",
     "item.content", "expected one input_audio part, or input_text parts"),
    ('{"type": "conversation.item.create", "item": {"role": "user", "content": [{"type": "input_audio", '
     '"audio": "!"}]}}', "bad_audio", "item.content[0].audio", "expected base64 audio"),
    ('{"type": "conversation.item.delete"}', "bad_field", "item_id", "item_id: expected an item id"),
    ('{"type": "conversation.item.retrieve", "item_id": 4}', "bad_field", "item_id", "got 4"),
    ('{"type": "conversation.item.truncate", "item_id": "a", "audio_end_ms": -1}', "bad_field", "audio_end_ms",
     "expected a number of milliseconds >= 0, got -1"),
    ('{"type": "conversation.item.truncate", "item_id": "a", "audio_end_ms": 5, "content_index": "0"}',
     "bad_field", "content_index", "expected an integer >= 0, got '0'"),
    ('{"type": "response.create", "response": []}', "bad_field", "response", "response: expected an object"),
    ('{"type": "response.create", "response": {"conversation": "conv_9"}}', "bad_field", "response.conversation",
     "expected 'auto' or 'none', got 'conv_9'"),
    ('{"type": "response.create", "response": {"metadata": {"a": 1}}}', "bad_field", "response.metadata",
     "expected at most 16 string pairs"),
    ('{"type": "response.create", "response": {"instructions": 1}}', "bad_field", "response.instructions",
     "expected a string or null, got 1"),
    ('{"type": "response.create", "response": {"max_output_tokens": "lots"}}', "bad_field",
     "response.max_output_tokens", "expected an integer >= 1 or 'inf', got 'lots'"),
    ('{"type": "response.cancel", "response_id": 9}', "bad_field", "response_id", "got 9"),
]


@pytest.mark.parametrize(("message", "code", "param", "text"), ERRORS)
def test_bad_client_events_are_typed_errors(message: str | bytes, code: str, param: str | None, text: str) -> None:
    p = adapter()
    before = (p.settings, p.config)
    with pytest.raises(RealtimeRequestError) as e:
        p.decode(message)
    assert e.value.code == code and not e.value.fatal
    assert e.value.param == param
    assert text in str(e.value)
    assert (p.settings, p.config) == before  # a refused message changes nothing


def test_an_error_carries_the_client_event_id() -> None:
    with pytest.raises(RealtimeRequestError) as e:
        adapter().decode('{"type": "conversation.item.delete", "event_id": "evt_7"}')
    assert e.value.event_id == "evt_7"
    [obj] = wire(adapter(), ErrorEvent(e.value.code, str(e.value), event_id="evt_7", param=e.value.param))
    assert obj["error"] == {"type": "invalid_request_error", "code": "bad_field", "message": str(e.value),
                            "param": "item_id", "event_id": "evt_7"}


# ---- client events: good ---------------------------------------------------------------------------------


def test_control_events_carry_their_event_ids() -> None:
    p = adapter()
    assert send(p, "input_audio_buffer.commit", event_id="e1") == [CommitInput("e1")]
    assert send(p, "input_audio_buffer.clear") == [ClearInput(None)]
    assert send(p, "conversation.item.delete", item_id="i1", event_id="e2") == [DeleteItem("i1", "e2")]
    assert send(p, "conversation.item.retrieve", item_id="i1") == [RetrieveItem("i1")]
    assert send(p, "conversation.item.truncate", item_id="i1", content_index=0, audio_end_ms=1500) == [
        TruncateItem("i1", 1500.0, 0)]
    assert send(p, "response.cancel") == [CancelResponse(None)]
    assert send(p, "response.cancel", response_id="resp_1", event_id="e3") == [CancelResponse("resp_1", "e3")]


OPENAI_AGENTS_DEFAULTS = {  # what openai-agents' RealtimeRunner sends first, by default
    "type": "realtime", "model": "gpt-realtime", "output_modalities": ["audio"], "instructions": "Be brief.",
    "audio": {"input": {"format": {"type": "audio/pcm", "rate": 24000},
                        "transcription": {"model": "gpt-4o-mini-transcribe"},
                        "turn_detection": {"type": "semantic_vad", "interrupt_response": True},
                        "noise_reduction": None},
              "output": {"format": {"type": "audio/pcm", "rate": 24000}, "voice": "ash", "speed": 1.0}},
    "max_output_tokens": "inf", "tracing": "auto", "tools": [], "tool_choice": "auto",
}
POPULAR_DEFAULTS = [
    OPENAI_AGENTS_DEFAULTS,
    {"type": "realtime", "model": "gpt-realtime"},  # clients that rely on the server's turn detection
    {"type": "realtime", "tracing": None, "truncation": "auto", "include": [], "prompt": None,
     "audio": {"input": {"turn_detection": {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                                            "silence_duration_ms": 500, "create_response": True,
                                            "interrupt_response": True}},
               "output": {"voice": "marin"}}},
]


@pytest.mark.parametrize("session", POPULAR_DEFAULTS)
def test_what_popular_clients_send_by_default_gives_no_error(session: dict[str, Any]) -> None:
    events = send(adapter(), "session.update", session=session)
    assert len(events) == 1 and isinstance(events[0], UpdateSettings)


def test_openai_agents_defaults_map_onto_our_settings_and_are_echoed() -> None:
    p = adapter()
    started(p)
    [update] = send(p, "session.update", session=OPENAI_AGENTS_DEFAULTS)
    s = update.settings
    assert s.turn_detection and s.create_response and s.interrupt_response and s.transcribe
    assert s.instructions == "Be brief." and s.turn.voice is None and s.turn.max_new_tokens is None
    [updated] = wire(p, SettingsUpdated(s))
    session = updated["session"]
    assert session["model"] == "gpt-realtime" and session["tracing"] == "auto"
    assert session["audio"]["output"]["voice"] == "ash"  # echoed as asked, played with the default voice
    assert session["audio"]["input"]["turn_detection"] == {
        "type": "semantic_vad", "eagerness": "auto", "create_response": True, "interrupt_response": True}
    assert session["audio"]["input"]["transcription"] == {"model": "gpt-4o-mini-transcribe"}
    assert session["max_output_tokens"] == "inf"


def update(p: OpenAIRealtimeProtocol, **session: Any) -> list[Any]:
    return send(p, "session.update", session={"type": "realtime", **session})


def td(**fields: Any) -> dict[str, Any]:
    return {"input": {"turn_detection": fields}}


# (defaults, session.update audio, expected VadSettings changes, expected SessionSettings changes)
TURN_DETECTION = [
    (SessionSettings(), td(type="server_vad", threshold=0.9, prefix_padding_ms=200, silence_duration_ms=700,
                           idle_timeout_ms=6000, create_response=False, interrupt_response=False),
     {"aggressiveness": 3, "prefix_padding_ms": 200, "silence_ms": 700},
     {"idle_timeout_ms": 6000, "create_response": False, "interrupt_response": False}),
    (SessionSettings(), td(type="server_vad", threshold=0.1), {"aggressiveness": 0}, {}),
    (SessionSettings(), td(type="server_vad", threshold=0.3), {"aggressiveness": 1}, {}),
    (SessionSettings(vad=VadSettings(kind="silero")), td(type="server_vad", threshold=0.7),
     {"kind": "silero", "silero_threshold": 0.7}, {}),
    (SessionSettings(vad=VadSettings(kind="silero")), td(type="server_vad", threshold=1.0),
     {"kind": "silero", "silero_threshold": 0.99}, {}),
    (SessionSettings(), td(type="semantic_vad", eagerness="high"), {"silence_ms": 300}, {}),
    (SessionSettings(), td(type="semantic_vad", eagerness="low", create_response=False), {"silence_ms": 1000},
     {"create_response": False}),
    (SessionSettings(vad=VadSettings(silence_ms=800)), td(type="semantic_vad", eagerness="medium"),
     {"silence_ms": 800}, {}),
    (SessionSettings(), {"input": {"turn_detection": None}}, {}, {"turn_detection": False}),
]


@pytest.mark.parametrize(("defaults", "audio", "vad", "changes"), TURN_DETECTION)
def test_turn_detection_maps_onto_the_detector(defaults: SessionSettings, audio: dict[str, Any],
                                               vad: dict[str, Any], changes: dict[str, Any]) -> None:
    p = adapter(defaults)
    [ev] = update(p, audio=audio)
    expected = dataclasses.replace(defaults, vad=dataclasses.replace(defaults.vad, **vad), **changes)
    assert ev.settings == expected
    started(p)
    echoed = wire(p, SettingsUpdated(ev.settings))[0]["session"]["audio"]["input"]["turn_detection"]
    given = audio["input"]["turn_detection"]
    assert (echoed is None) == (given is None)
    if given is not None:
        assert echoed["type"] == given["type"]
        assert {k: echoed[k] for k in given} == given  # what the client set is what it reads back


# (session fields, expected FieldRejected messages' fragments, check on the settings)
REPORTED = [
    ({"audio": {"output": {"speed": 1.2}}}, ["only 1.0 is served, got 1.2"], None),
    ({"tools": [{"type": "function", "name": "f"}]}, ["tool calls are not served; the model will not call the 1"],
     None),
    ({"tool_choice": "required"}, ["session.tool_choice: expected 'auto' or 'none'"], None),
    ({"audio": {"input": {"transcription": {"model": "whisper-1", "prompt": "names: Zoë"}}}},
     ["transcription.prompt: not served"], lambda s: s.transcribe),
    ({"audio": {"output": {"voice": "robot"}}}, ["expected one of ['en', 'zh'] or an OpenAI voice name, got 'robot'"],
     lambda s: s.turn.voice is None),
    ({"voice": "alloy", "modalities": ["audio"]},
     ["session.modalities: a beta field, ignored; the GA interface uses session.output_modalities",
      "session.voice: a beta field, ignored; the GA interface uses session.audio.output.voice"], None),
    ({"flavour": 1}, ["session: unknown fields ['flavour'] ignored"], None),
]


@pytest.mark.parametrize(("session", "messages", "check"), REPORTED)
def test_accepted_but_unserved_fields_are_reported_not_refused(session: dict[str, Any], messages: list[str],
                                                               check: Any) -> None:
    events = update(adapter(), **session)
    assert isinstance(events[0], UpdateSettings)
    notes = events[1:]
    assert len(notes) == len(messages)
    for note, text in zip(notes, messages, strict=True):
        assert isinstance(note, FieldRejected) and note.code == "unsupported_parameter" and text in note.message
    if check is not None:
        assert check(events[0].settings)


def test_session_fields_map_onto_settings() -> None:
    p = adapter()
    [ev] = update(p, instructions="Hi", output_modalities=["text"], max_output_tokens=4096,
                  audio={"output": {"voice": "zh"}, "input": {"transcription": None}})
    assert ev.settings.instructions == "Hi" and ev.settings.modality == "text" and not ev.settings.transcribe
    assert ev.settings.turn == TurnSettings(voice="zh", max_new_tokens=512)  # clamped to the engine's limit
    [ev] = update(p, max_output_tokens=100, audio={"output": {"voice": {"id": "custom-1"}}})
    assert ev.settings.turn == TurnSettings(voice=None, max_new_tokens=100)  # earlier fields stay
    assert ev.settings.instructions == "Hi" and ev.settings.modality == "text"
    [ev] = update(p, max_output_tokens="inf", output_modalities=["audio", "text"])
    assert ev.settings.turn.max_new_tokens is None and ev.settings.modality == "audio"


# ---- audio in ----------------------------------------------------------------------------------------------


def append(p: OpenAIRealtimeProtocol, data: bytes) -> np.ndarray:
    events = send(p, "input_audio_buffer.append", audio=b64(data))
    assert all(isinstance(e, AudioFrame) for e in events)
    return np.concatenate([e.pcm for e in events]) if events else np.zeros(0, np.float32)


@pytest.mark.parametrize(("fmt", "rate", "encode"), [
    ({"type": "audio/pcm", "rate": 24000}, 24_000, float_to_pcm16),
    ({"type": "audio/pcmu"}, G711_SAMPLE_RATE, float_to_ulaw),
    ({"type": "audio/pcma"}, G711_SAMPLE_RATE, float_to_alaw),
    ("g711_ulaw", G711_SAMPLE_RATE, float_to_ulaw),  # a beta format name is read too
])
def test_input_audio_is_decoded_and_resampled_as_a_stream(fmt: Any, rate: int, encode: Any) -> None:
    p = adapter()
    update(p, audio={"input": {"format": fmt}})
    x = sine(rate)
    chunks = [append(p, encode(x[i : i + 317])) for i in range(0, len(x), 317)]  # odd-sized chunks
    streamed = np.concatenate(chunks)
    decoded = {24_000: pcm16_to_float, G711_SAMPLE_RATE: ulaw_to_float if encode is float_to_ulaw else alaw_to_float}
    whole = resample(decoded[rate](encode(x)), rate, INPUT_SAMPLE_RATE)
    assert streamed.dtype == np.float32
    assert np.allclose(streamed, whole[: len(streamed)], atol=1e-5)  # state kept across messages
    assert len(whole) - len(streamed) < 80  # only the filter's look-ahead (~2 ms at the lower rate) is held back


def test_empty_append_gives_no_event() -> None:
    assert send(adapter(), "input_audio_buffer.append", audio="") == []


# ---- conversation items and responses ---------------------------------------------------------------------


def test_item_create_makes_items_of_every_role() -> None:
    p = adapter()
    [ev] = send(p, "conversation.item.create", event_id="e1", previous_item_id="root", item={
        "id": "msg_1", "type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]})
    assert ev == CreateItem(Item("msg_1", "user", text="hi"), "root", "e1")
    [ev] = send(p, "conversation.item.create", item={
        "type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "a"},
                                                            {"type": "text", "text": "b"}]})
    assert ev.item.id.startswith("item_") and ev.item.text == "a\nb" and ev.item.kind == "text"
    [ev] = send(p, "conversation.item.create", item={
        "type": "message", "role": "assistant", "content": [{"type": "output_audio", "transcript": "said"}]})
    assert ev.item.role == "assistant" and ev.item.text == "said" and ev.item.kind == "audio"
    [ev] = send(p, "conversation.item.create", item={
        "type": "message", "role": "system", "content": [{"type": "input_text", "text": "be nice"}]})
    assert ev.item == Item(ev.item.id, "system", text="be nice")


def test_item_create_decodes_input_audio_in_the_session_format() -> None:
    p = adapter()
    update(p, audio={"input": {"format": {"type": "audio/pcmu"}}})
    x = sine(G711_SAMPLE_RATE)
    [ev] = send(p, "conversation.item.create", item={"type": "message", "role": "user", "content": [
        {"type": "input_audio", "audio": b64(float_to_ulaw(x)), "transcript": "hello"}]})
    item = ev.item
    assert item.kind == "audio" and item.text == "hello" and item.audio is not None
    assert item.audio.dtype == np.float32 and len(item.audio) == len(x) * 2  # 8 kHz -> 16 kHz, whole
    assert np.allclose(item.audio, resample(ulaw_to_float(float_to_ulaw(x)), 8000, 16000))


def test_response_create_options() -> None:
    p = adapter()
    assert send(p, "response.create") == [CreateResponse(ResponseOptions())]
    [ev] = send(p, "response.create", event_id="e9", response={
        "instructions": None, "conversation": "none", "metadata": {"topic": "weather"},
        "output_modalities": ["text"], "max_output_tokens": 10_000, "audio": {"output": {"voice": "en"}}})
    assert ev == CreateResponse(ResponseOptions(None, False, {"topic": "weather"}, "text",
                                                TurnSettings(voice="en", max_new_tokens=512)), "e9")
    events = send(p, "response.create", response={"input": [], "tools": [{"type": "function"}],
                                                  "audio": {"output": {"voice": "ash"}}})
    assert isinstance(events[0], CreateResponse) and events[0].options.turn == TurnSettings(voice=None)
    assert [e.message.split(":")[0] for e in events[1:]] == ["response.tools", "response.input"]


# ---- server events ------------------------------------------------------------------------------------------


def test_every_simple_server_event_has_its_ga_shape() -> None:
    p = adapter()
    started(p)
    user = Item("item_u", "user", audio=np.zeros(160, np.float32), kind="audio")
    table: list[tuple[ServerEvent, list[dict[str, Any]]]] = [
        (SpeechStarted(312.4, "item_u"), [{"type": "input_audio_buffer.speech_started", "audio_start_ms": 312,
                                           "item_id": "item_u"}]),
        (SpeechStopped(1500.0, 1200.0, True, item_id="item_u"),
         [{"type": "input_audio_buffer.speech_stopped", "audio_end_ms": 1500, "item_id": "item_u"}]),
        (InputCommitted("item_u", "item_0"), [{"type": "input_audio_buffer.committed", "item_id": "item_u",
                                               "previous_item_id": "item_0"}]),
        (InputCleared(), [{"type": "input_audio_buffer.cleared"}]),
        (ItemDeleted("item_u"), [{"type": "conversation.item.deleted", "item_id": "item_u"}]),
        (ItemTruncated("item_a", 0, 1234.6), [{"type": "conversation.item.truncated", "item_id": "item_a",
                                               "content_index": 0, "audio_end_ms": 1235}]),
        (UserTranscript("item_u", delta="he"), [{"type": "conversation.item.input_audio_transcription.delta",
                                                 "item_id": "item_u", "content_index": 0, "delta": "he"}]),
        (UserTranscript("item_u", text="hello", final=True, audio_seconds=1.25),
         [{"type": "conversation.item.input_audio_transcription.completed", "item_id": "item_u",
           "content_index": 0, "transcript": "hello", "usage": {"type": "duration", "seconds": 1.25}}]),
        (UserTranscript("item_u", error="no decoder"),
         [{"type": "conversation.item.input_audio_transcription.failed", "item_id": "item_u", "content_index": 0,
           "error": {"type": "server_error", "code": "transcription_failed", "message": "no decoder"}}]),
        (ErrorEvent("engine_error", "boom"), [{"type": "error", "error": {
            "type": "server_error", "code": "engine_error", "message": "boom", "param": None, "event_id": None}}]),
        (Interrupted("resp_1", 300.0), []),
    ]
    for event, expected in table:
        got = [{k: v for k, v in m.items() if k != "event_id"} for m in wire(p, event)]
        assert got == expected, event
    user_json = {"id": "item_u", "type": "message", "object": "realtime.item", "status": "completed",
                 "role": "user", "content": [{"type": "input_audio", "transcript": None}]}
    added = wire(p, ItemAdded(user, "item_0"))
    assert [m["type"] for m in added] == ["conversation.item.added", "conversation.item.done"]
    assert added[0]["item"] == user_json and added[0]["previous_item_id"] == "item_0"
    assert [m["type"] for m in wire(p, ItemAdded(user, None, done=False))] == ["conversation.item.added"]
    assert wire(p, ItemDone(user))[0]["item"] == user_json
    assert wire(p, ItemRetrieved(Item("s", "system", text="x")))[0]["item"]["content"] == [
        {"type": "input_text", "text": "x"}]


def test_event_ids_are_unique() -> None:
    p = adapter()
    ids = [m["event_id"] for _ in range(5) for m in wire(p, InputCleared())]
    assert len(set(ids)) == 5


IN_BAND_ORDER = [
    "response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added",
    "response.output_audio_transcript.delta", "response.output_audio.delta", "response.output_audio_transcript.delta",
    "response.output_audio.delta", "response.output_audio.done", "response.output_audio_transcript.done",
    "response.content_part.done", "response.output_item.done", "conversation.item.done", "response.done",
]


def one_response(p: OpenAIRealtimeProtocol, options: ResponseOptions = ResponseOptions(),
                 reason: str = "eos", cause: Any = "") -> list[dict[str, Any]]:
    audio = sine(OUTPUT_SAMPLE_RATE, 0.1)
    events: list[ServerEvent] = [
        ResponseStarted("resp_1", "item_a", options, "item_u" if options.keep else None),
        ResponseText("resp_1", "Hello"), ResponseAudio("resp_1", audio, 0.0),
        ResponseText("resp_1", " there"), ResponseAudio("resp_1", audio, 100.0),
        ResponseFinished("resp_1", reason, "Hello there", 200.0, {}, item_id="item_a", input_tokens=40,
                         output_tokens=3, cause=cause),
    ]
    return [m for e in events for m in wire(p, e)]


def test_an_in_band_audio_response_follows_the_canonical_order() -> None:
    p = adapter()
    started(p)
    wire(p, InputCommitted("item_u", None))
    messages = one_response(p, ResponseOptions(metadata={"k": "v"}))
    assert [m["type"] for m in messages] == IN_BAND_ORDER
    created, added, item_added, part_added = messages[:4]
    assert created["response"]["status"] == "in_progress" and created["response"]["output"] == []
    assert created["response"]["metadata"] == {"k": "v"} and created["response"]["conversation_id"] == "conv_sess_1"
    assert created["response"]["usage"] is None
    assert added["item"]["status"] == "in_progress" and added["item"]["role"] == "assistant"
    assert item_added["previous_item_id"] == "item_u"
    assert part_added["part"] == {"type": "audio", "transcript": ""}
    for m in messages[1:-1]:
        assert m.get("response_id", "resp_1") == "resp_1"
        if "content_index" in m:
            assert (m["item_id"], m["output_index"], m["content_index"]) == ("item_a", 0, 0)
    audio = np.concatenate([pcm16_to_float(base64.b64decode(m["delta"])) for m in messages
                            if m["type"] == "response.output_audio.delta"])
    assert np.array_equal(float_to_pcm16(audio), float_to_pcm16(np.concatenate([sine(24_000, 0.1)] * 2)))
    done = messages[-1]["response"]
    assert done["status"] == "completed" and done["status_details"] is None and done["metadata"] == {"k": "v"}
    assert done["output"] == [{"id": "item_a", "type": "message", "object": "realtime.item", "status": "completed",
                               "role": "assistant", "content": [{"type": "output_audio",
                                                                 "transcript": "Hello there"}]}]
    assert done["usage"] == {"total_tokens": 48, "input_tokens": 40, "output_tokens": 8,
                             "input_token_details": {"cached_tokens": 0},
                             "output_token_details": {"text_tokens": 3, "audio_tokens": 5}}
    assert messages[9]["transcript"] == "Hello there"


def test_an_out_of_band_response_touches_no_conversation() -> None:
    p = adapter()
    started(p)
    messages = one_response(p, ResponseOptions(keep=False, metadata={"purpose": "classify"}))
    assert [m["type"] for m in messages] == [t for t in IN_BAND_ORDER if not t.startswith("conversation.")]
    assert messages[0]["response"]["conversation_id"] is None
    assert messages[-1]["response"]["metadata"] == {"purpose": "classify"}


def test_a_text_response_streams_text_events() -> None:
    p = adapter()
    messages = one_response(p, ResponseOptions(modality="text"))
    assert [m["type"] for m in messages] == [
        "response.created", "response.output_item.added", "conversation.item.added", "response.content_part.added",
        "response.output_text.delta", "response.output_text.delta", "response.output_text.done",
        "response.content_part.done", "response.output_item.done", "conversation.item.done", "response.done"]
    assert messages[6]["text"] == "Hello there"
    assert messages[-1]["response"]["output"][0]["content"] == [{"type": "output_text", "text": "Hello there"}]


@pytest.mark.parametrize(("reason", "cause", "status", "details"), [
    ("max_tokens", "", "incomplete", {"type": "incomplete", "reason": "max_output_tokens"}),
    ("cancelled", "turn_detected", "cancelled", {"type": "cancelled", "reason": "turn_detected"}),
    ("cancelled", "client_cancelled", "cancelled", {"type": "cancelled", "reason": "client_cancelled"}),
    ("error", "", "failed", {"type": "failed", "error": {"type": "server_error", "code": "engine_error",
                                                        "message": "the response failed (see the error event)"}}),
])
def test_an_unfinished_response_says_why(reason: str, cause: str, status: str, details: dict[str, Any]) -> None:
    messages = one_response(adapter(), reason=reason, cause=cause)
    done = messages[-1]["response"]
    assert done["status"] == status and done["status_details"] == details
    assert done["output"][0]["status"] == "incomplete"
    assert [m["item"]["status"] for m in messages if m["type"].endswith("item.done")] == ["incomplete"] * 2


@pytest.mark.parametrize(("fmt", "decode"), [("audio/pcmu", ulaw_to_float), ("audio/pcma", alaw_to_float)])
def test_g711_output_is_8khz_with_a_resampler_per_response(fmt: str, decode: Any) -> None:
    p = adapter()
    update(p, audio={"output": {"format": {"type": fmt}}})
    for _ in range(2):  # a second response starts from a fresh resampler: same bytes
        messages = one_response(p)
        deltas = [m for m in messages if m["type"] == "response.output_audio.delta"]
        got = np.concatenate([decode(base64.b64decode(m["delta"])) for m in deltas])
        x = np.concatenate([sine(OUTPUT_SAMPLE_RATE, 0.1)] * 2)
        expected = resample(x, OUTPUT_SAMPLE_RATE, G711_SAMPLE_RATE)
        assert len(got) == len(expected)  # the tail is flushed before output_audio.done
        assert np.max(np.abs(got - expected)) < 0.02  # G.711 quantization only
        assert messages[0]["response"]["audio"]["output"]["format"] == {"type": fmt}
