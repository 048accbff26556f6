"""Server configuration: one frozen, validated dataclass built from CLI options and environment variables.

Every field `name` is the option `--name-with-dashes` of `voice-agent serve` and the environment variable
`VOICE_AGENT_NAME`; a command-line value wins over the environment, which wins over the default. Values
are validated when the config is built, and every error names the option / variable, what was expected
and what was found. The VAD / barge-in fields are the server's defaults; each client may override
them in its start message (see docs/protocol.md).
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from voice_agent.audio import MAX_TURN_MS
from voice_agent.engine.api import DEFAULT_MAX_REPLY_TOKENS, TurnSettings
from voice_agent.engine.build import ModelChoice
from voice_agent.engine.config import EngineConfig
from voice_agent.engine.schedule import FINAL_UNIT_LIMIT
from voice_agent.errors import ConfigError, VoiceAgentError
from voice_agent.serve.settings import SessionSettings
from voice_agent.serve.vad import VadSettings

ENV_PREFIX = "VOICE_AGENT_"
SECRETS = ("api_key", "twilio_auth_token")  # options whose values no message repeats
DTYPES = ("float32", "bfloat16", "float16")
VAD_KINDS = ("webrtc", "silero")
MAX_REPLY_TOKENS = 4096  # text tokens; the TTS cache grows with it
# A client that stops reading also stops answering uvicorn's keepalive pings, which close it with 1011 after
# serve.app.WS_PING_TIMEOUT_S (20 s); the slow-client rule (4001) must come well before that.
MAX_SLOW_CLIENT_MS = 10_000


def _opt(
    default: Any, help: str, parse: Callable[[str], Any] = str, choices: tuple[str, ...] | None = None
) -> Any:
    return field(default=default, metadata={"help": help, "parse": parse, "choices": choices})


@dataclass(frozen=True)
class ServerConfig:
    """Everything `voice-agent serve` needs; see the module docstring for how it is built."""

    host: str = _opt("127.0.0.1", "interface to listen on (0.0.0.0 for all)")
    port: int = _opt(8000, "TCP port", int)
    model_dir: str | None = _opt(None, "LLaMA-Omni2 model directory (default: look in models/; "
                                       "none found: the embedded tiny demo model)")
    vocoder_dir: str | None = _opt(None, "cosy2_decoder directory (flow.pt, hift.pt)")
    whisper: str | None = _opt(None, "openai-whisper large-v3.pt giving the speech encoder's dims (and its weights "
                                    "when the checkpoint has none)")
    device: str = _opt("cpu", "torch device, e.g. cpu or cuda:0")
    dtype: str = _opt("float32", "model dtype", choices=DTYPES)
    max_sessions: int = _opt(4, "concurrent conversations the engine admits", int)
    context_tokens: int = _opt(0, "KV positions per conversation; older turns are dropped beyond it "
                                  "(0: the model's tokenizer_model_max_length)", int)
    kv_budget_mb: int = _opt(0, "KV and flow cache memory for all conversations in MiB; fewer sessions are admitted "
                                "if it is smaller than max-sessions needs (0: no limit)", int)
    max_reply_tokens: int = _opt(DEFAULT_MAX_REPLY_TOKENS, "the longest reply a client may ask for with "
                                 f"max_new_tokens (text tokens, 1..{MAX_REPLY_TOKENS}; sizes the TTS cache)", int)
    final_units: int = _opt(FINAL_UNIT_LIMIT, "speech units the TTS may still write once the reply's text has "
                            f"ended (25 per second; 1..{FINAL_UNIT_LIMIT}, the reference's limit)", int)
    encoder_input: str = _opt("padded", "speech encoder input: 'padded' to 30 s as the reference (faithful), "
                                        "or 'unpadded', the real length (faster; changes numbers)",
                              choices=("padded", "unpadded"))
    flow_context_units: int = _opt(100, "speech units of left context the flow recomputes per block "
                                        "(0: the reference's full recompute, cost growing with the reply)", int)
    flow_cache: str = _opt("on", "'on': the flow keeps each completed 2-s chunk's state and computes only the "
                                 "current chunk per block (fast; at the official size 4.6 MB per cached frame, "
                                 "0.9 GB per session with the default window); 'off': recompute the window "
                                 "every block", choices=("on", "off"))
    system_prompt: str | None = _opt(None, "system prompt of every conversation (default: the model's)")
    transcripts: str = _opt("on", "'on': transcribe users' speech with Whisper large-v3's text decoder (needs its "
                                  "weights: voice-agent download --whisper; native sessions get them unless they "
                                  "say transcribe: false, OpenAI Realtime sessions when they ask); 'off': never "
                                  "load the decoder", choices=("on", "off"))
    voice: str | None = _opt(None, "default voice name (clients may choose another)")
    api_key: str | None = _opt(None, "if set, every WebSocket needs it (Authorization: Bearer KEY, "
                                     "or 'key' in the start message)")
    auth_max_failures: int = _opt(10, "failed API-key attempts from one peer (IP address) within auth-cooldown-s "
                                      "after which its handshakes are refused (HTTP 429)", int)
    auth_cooldown_s: int = _opt(60, "how long a peer that reached auth-max-failures is refused, from its last "
                                    "failure (s)", int)
    max_connections_per_peer: int = _opt(16, "open WebSocket connections one peer (IP address) may hold; more "
                                             "are closed with 1013", int)
    idle_timeout_s: int = _opt(60, "a session that receives no audio for this long is closed with 4004 (s; 0: never)",
                               int)
    max_session_s: int = _opt(3600, "a session is closed with 4005 once it has lasted this long (s; 0: no limit)", int)
    vad: str = _opt("webrtc", "voice activity detector (silero needs: pip install silero-vad)",
                    choices=VAD_KINDS)
    vad_aggressiveness: int = _opt(2, "webrtcvad aggressiveness 0..3", int)
    vad_frame_ms: int = _opt(20, "webrtcvad frame length: 10, 20 or 30 ms", int)
    speech_start_ms: int = _opt(150, "voiced audio before speech counts as started (ms)", int)
    silence_ms: int = _opt(500, "silence that ends the user's turn (ms)", int)
    prefix_padding_ms: int = _opt(300, "audio kept before the start of speech (ms)", int)
    max_turn_ms: int = _opt(MAX_TURN_MS, "a user turn is cut at this length, prefix padding included (ms; at "
                                          f"most {MAX_TURN_MS}, Whisper's window)", int)
    min_interruption_ms: int = _opt(400, "user speech during a reply shorter than this does not "
                                         "interrupt it (ms)", int)
    speculate_ms: int = _opt(300, "speculative endpointing: a pause this long (at least prefix-padding-ms) starts "
                                "the reply while the turn's end is not yet confirmed; its output is held until "
                                "the pause reaches silence-ms, or dropped if the caller goes on (ms; 0: off)", int)
    send_queue_messages: int = _opt(256, "unsent messages at which a client counts as behind; a connection's "
                                         "backlog never exceeds twice this", int)
    slow_client_ms: int = _opt(2000, "a client that stays behind this long is closed (ms)", int)
    static_dir: str | None = _opt(None, "directory of the bundled page (default: the package's static/)")
    log_level: str = _opt("info", "log level", choices=("critical", "error", "warning", "info", "debug"))
    log_format: str = _opt("text", "log lines as 'text' or 'json' (one object per line, uvicorn's too)",
                           choices=("text", "json"))
    metrics_port: int = _opt(0, "serve Prometheus /metrics on this port, without the API key, and not on the "
                                "main port (0: on the main port, behind --api-key when one is set)", int)
    public_url: str | None = _opt(None, "the server's public base URL as callers' carriers reach it, e.g. "
                                        "https://voice.example.com (default: from X-Forwarded-Proto/Host, else Host); "
                                        "TwiML's stream URL and Twilio signature checks use it")
    twilio_auth_token: str | None = _opt(None, "the Twilio account's auth token: /twilio/voice and /twilio then "
                                               "need a valid X-Twilio-Signature (unsigned calls are refused)")
    telephony_lead_ms: int = _opt(160, "phone calls: reply audio is sent in real time, in 20 ms frames, this far "
                                       "ahead of playback (ms)", int)
    call_silence_s: int = _opt(10, "phone calls: after a reply has played, this long without the caller speaking "
                                   "makes the agent speak up (s; 0: never; the call still ends after idle-timeout-s "
                                   "without audio)", int)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, expected: str) -> None:
            if not ok:
                value = getattr(self, name)
                got = f"{len(value)} characters" if name in SECRETS else repr(value)  # never echo a secret
                raise ConfigError(f"{_where(name)}: expected {expected}, got {got}")

        for f in fields(self):
            value = getattr(self, f.name)
            if f.metadata["parse"] is int:
                need(isinstance(value, int) and not isinstance(value, bool), f.name, "an integer")
            elif value is not None:
                need(isinstance(value, str), f.name, "a string")
        need(0 <= self.port <= 65535, "port", "a port number 0..65535")
        need(0 <= self.metrics_port <= 65535 and (self.metrics_port == 0 or self.metrics_port != self.port),
             "metrics_port", "0 or a port number 1..65535 other than --port")
        need(1 <= self.max_sessions <= 4096, "max_sessions", "an integer 1..4096")
        need(self.context_tokens == 0 or 512 <= self.context_tokens <= 131_072, "context_tokens",
             "0 or an integer 512..131072")
        need(self.kv_budget_mb >= 0, "kv_budget_mb", "an integer >= 0")
        need(0 <= self.flow_context_units <= 7500, "flow_context_units", "an integer 0..7500")
        need(8 <= self.send_queue_messages <= 100_000, "send_queue_messages", "an integer 8..100000")
        need(10 <= self.slow_client_ms <= MAX_SLOW_CLIENT_MS, "slow_client_ms", f"an integer 10..{MAX_SLOW_CLIENT_MS}")
        need(self.api_key is None or len(self.api_key) >= 8, "api_key", "at least 8 characters")
        need(1 <= self.max_reply_tokens <= MAX_REPLY_TOKENS, "max_reply_tokens", f"an integer 1..{MAX_REPLY_TOKENS}")
        need(1 <= self.final_units <= FINAL_UNIT_LIMIT, "final_units", f"an integer 1..{FINAL_UNIT_LIMIT}")
        need(1 <= self.auth_max_failures <= 10_000, "auth_max_failures", "an integer 1..10000")
        need(1 <= self.auth_cooldown_s <= 86_400, "auth_cooldown_s", "an integer 1..86400")
        need(1 <= self.max_connections_per_peer <= 100_000, "max_connections_per_peer", "an integer 1..100000")
        need(0 <= self.idle_timeout_s <= 86_400, "idle_timeout_s", "an integer 0..86400")
        need(20 <= self.telephony_lead_ms <= 2000, "telephony_lead_ms", "an integer 20..2000")
        need(0 <= self.call_silence_s <= 3600, "call_silence_s", "an integer 0..3600")
        need(self.public_url is None or self.public_url.startswith(("http://", "https://", "ws://", "wss://")),
             "public_url", "a URL starting with https://, http://, wss:// or ws://")
        need(self.twilio_auth_token is None or len(self.twilio_auth_token) >= 8, "twilio_auth_token",
             "at least 8 characters")
        need(0 <= self.max_session_s <= 7 * 86_400, "max_session_s", "an integer 0..604800")
        for f in fields(self):
            choices = f.metadata["choices"]
            need(choices is None or getattr(self, f.name) in choices, f.name, f"one of {choices}")
        try:
            self.session_defaults()
        except VoiceAgentError as e:
            raise ConfigError(f"VAD / turn options ({_where('silence_ms')} and friends): {e}") from None

    def session_defaults(self) -> SessionSettings:
        """The settings a client gets when its start message overrides nothing."""
        vad = VadSettings(
            kind=self.vad,  # type: ignore[arg-type]
            aggressiveness=self.vad_aggressiveness,
            frame_ms=self.vad_frame_ms,
            speech_start_ms=self.speech_start_ms,
            silence_ms=self.silence_ms,
            prefix_padding_ms=self.prefix_padding_ms,
            max_turn_ms=self.max_turn_ms,
            speculate_ms=self.speculate_ms,
        )
        return SessionSettings(vad=vad, turn=TurnSettings(voice=self.voice),
                               min_interruption_ms=self.min_interruption_ms, transcribe=self.transcripts == "on")

    def engine_options(self) -> tuple[ModelChoice, EngineConfig]:
        """What `voice_agent.engine.build.build_engine` needs: the model to load and the engine's limits."""
        model = ModelChoice(self.model_dir, self.vocoder_dir, self.whisper, self.device, self.dtype,
                            unpadded=self.encoder_input == "unpadded", transcripts=self.transcripts == "on")
        engine = EngineConfig(
            max_sessions=self.max_sessions,
            max_new_tokens=min(EngineConfig.max_new_tokens, self.max_reply_tokens),
            max_reply_tokens=self.max_reply_tokens,
            final_units=self.final_units,
            default_voice=self.voice,
            context_tokens=self.context_tokens or None,
            kv_budget_bytes=self.kv_budget_mb * 2**20 or None,
            flow_context_units=self.flow_context_units or None,
            flow_cache=self.flow_cache == "on",
        )
        return model, engine

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        """Add one option per field; defaults stay None so `from_args` can tell "not given"."""
        for f in fields(cls):
            env = ENV_PREFIX + f.name.upper()
            parser.add_argument(
                "--" + f.name.replace("_", "-"),
                dest=f.name,
                default=None,
                choices=f.metadata["choices"],
                help=f"{f.metadata['help']} [env {env}; default {f.default!r}]",
            )

    @classmethod
    def from_args(cls, ns: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """Command-line values, then VOICE_AGENT_* variables, then defaults."""
        environ = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = getattr(ns, f.name, None)
            source = "--" + f.name.replace("_", "-")
            if raw is None:
                raw, source = environ.get(ENV_PREFIX + f.name.upper()), ENV_PREFIX + f.name.upper()
            if raw is None or raw == "":
                continue
            try:
                values[f.name] = f.metadata["parse"](raw) if isinstance(raw, str) else raw
            except ValueError:
                raise ConfigError(f"{source}: expected {f.metadata['parse'].__name__}, got {raw!r}") from None
        return cls(**values)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> ServerConfig:
        """Environment variables and defaults only."""
        return cls.from_args(argparse.Namespace(), environ)


def _where(name: str) -> str:
    return f"--{name.replace('_', '-')} / {ENV_PREFIX}{name.upper()}"
