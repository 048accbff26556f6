"""voice-agent: a self-hosted full-duplex speech-to-speech voice agent for the LLaMA-Omni2 models."""

__version__ = "0.1.0"
