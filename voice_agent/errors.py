"""Typed errors shared across the package.

Every error a user can cause (a bad file, bad audio, a bad message) is one of these, with a message
that names the thing and says what was expected and what was found.
"""

from __future__ import annotations


class VoiceAgentError(Exception):
    """Base class of every error voice-agent raises on purpose."""

    code = "error"


class CheckpointError(VoiceAgentError):
    """A model file is missing, unreadable, or does not match the expected layout."""

    code = "checkpoint_error"


class AudioInputError(VoiceAgentError):
    """Input audio is unreadable, empty, or too long."""

    code = "audio_input_error"
