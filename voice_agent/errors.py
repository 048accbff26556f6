"""Typed errors shared across the package.

Every error a user can cause (a bad file, bad audio, a bad message) is one of these, with a message
that names the thing and says what was expected and what was found, and a stable machine-readable
`code`. `error_code` is the one place an exception becomes a code (the wire `error` events and the
engine's `TurnError`s); `voice_agent.serve.app.close_for` is the one place one becomes a close code.
"""

from __future__ import annotations


class VoiceAgentError(Exception):
    """Base class of every error voice-agent raises on purpose."""

    code = "error"


def error_code(exc: BaseException, default: str = "engine_error") -> str:
    """The stable code of an exception: its own for ours, `default` for anything else (a bug)."""
    return exc.code if isinstance(exc, VoiceAgentError) else default


class CheckpointError(VoiceAgentError):
    """A model file is missing, unreadable, or does not match the expected layout."""

    code = "checkpoint_error"


class AudioInputError(VoiceAgentError):
    """Input audio is unreadable, empty, or too long."""

    code = "audio_input_error"


class PromptError(VoiceAgentError):
    """A conversation that cannot be rendered into a LLaMA-Omni2 prompt."""

    code = "prompt_error"


class VoiceError(VoiceAgentError):
    """A voice name or voice file cannot be turned into a speaker embedding."""

    code = "voice_error"


class ConfigError(VoiceAgentError):
    """A server option or environment variable has an invalid value."""

    code = "config_error"


class VadSettingsError(VoiceAgentError, ValueError):
    """A VAD setting is out of range."""

    code = "bad_vad_settings"


class VadUnavailable(VoiceAgentError):
    """The chosen VAD backend is not installed."""

    code = "vad_unavailable"


class ProtocolError(VoiceAgentError):
    """A client message could not be used. `code` is stable and machine-readable; `fatal` errors end
    the connection, the others are reported and the session continues."""

    def __init__(self, code: str, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal


class SessionStateError(RuntimeError):
    """A trigger arrived in a state that has no transition for it (a bug, not a client error)."""


class Unauthorized(VoiceAgentError):
    """No API key, or a wrong one, where the server requires one."""

    code = "unauthorized"


class NotReady(VoiceAgentError):
    """The model is still loading."""

    code = "not_ready"


class SlowClient(VoiceAgentError):
    """A client did not read its messages for too long."""

    code = "slow_client"


class NoStart(VoiceAgentError):
    """A connection did not open its session in time."""

    code = "start_timeout"


class TooManyErrors(VoiceAgentError):
    """A connection sent too many bad messages."""

    code = "too_many_errors"


class AuthCoolDown(VoiceAgentError):
    """A peer failed the API key too often and is refused for a while (`retry_after_s`)."""

    code = "auth_cooldown"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class TooManyConnections(VoiceAgentError):
    """A peer already holds as many connections as it may."""

    code = "too_many_connections"


class IdleTimeout(VoiceAgentError):
    """A session received no audio for too long."""

    code = "idle_timeout"


class SessionTooLong(VoiceAgentError):
    """A session reached the longest a session may last."""

    code = "session_too_long"


class SessionEnded(VoiceAgentError):
    """The client ended the session in its own protocol (a phone call hung up); a normal close."""

    code = "session_ended"


class AdmissionError(VoiceAgentError):
    """The engine is full (sessions or KV memory); the reason says which limit was hit."""

    code = "server_full"


class TurnRejected(VoiceAgentError):
    """A turn was refused: a turn is already running, the audio is unusable, or settings are invalid."""

    code = "turn_rejected"


class PromptFormatError(ValueError):
    """The chat template does not render turns as a prefix-stable concatenation."""


class DownloadError(VoiceAgentError):
    """A model file could not be fetched."""

    code = "download_error"
