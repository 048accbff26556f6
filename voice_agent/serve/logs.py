"""Server logs: one line per record, as text or JSON (`--log-format`), for our loggers and uvicorn's.

A record may carry structured fields: `log_event(logger, level, "session.closed", id="s1", ...)` puts
them in `record.fields`. The text format writes `TIME LEVEL LOGGER MESSAGE name=value ...`, quoting a
value (as a JSON string) when it holds spaces, quotes, `=` or control characters, so one record is
always one line. The JSON format writes one object per line: `time` (ISO 8601, UTC), `level`, `logger`,
`message`, the fields, and `exception` (the traceback) when there is one.

Never logged: audio and keys. No code here or in the server logs a key; as a second line of defence the
formatters replace the configured API key with `[redacted]` wherever it would appear (a client that
pastes it into a field whose error message echoes it, say).

`logging_config(config)` is the `logging.config.dictConfig` the server applies before loading the model
and hands to uvicorn (`voice_agent.serve.app.run_server`): one stderr handler with the chosen formatter
for the `voice_agent` and `uvicorn` loggers at `--log-level`, and for everything else at WARNING.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from voice_agent.serve.config import ServerConfig

REDACTED = "[redacted]"
FIELDS = "fields"  # the LogRecord attribute holding a record's structured fields
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.:/[]()+,@")


def log_event(logger: logging.Logger, level: int, event: str, **fields: Any) -> None:
    """Log `event` (a short dotted name such as `session.opened`) with structured `fields`."""
    logger.log(level, event, extra={FIELDS: fields})


class _Redacting(logging.Formatter):
    """A formatter that knows the secrets it must never write."""

    def __init__(self, secrets: Sequence[str] = ()) -> None:
        super().__init__()
        self.secrets = tuple(s for s in secrets if s)

    def clean(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        return text

    def parts(self, record: logging.LogRecord) -> tuple[str, dict[str, Any], str | None]:
        """(message, fields, traceback) with every secret removed."""
        fields = {k: self.clean(v) if isinstance(v, str) else v for k, v in getattr(record, FIELDS, {}).items()}
        trace = None
        if record.exc_info:
            trace = self.clean(self.formatException(record.exc_info))
        elif record.exc_text:
            trace = self.clean(record.exc_text)
        return self.clean(record.getMessage()), fields, trace


class TextFormatter(_Redacting):
    """`TIME LEVEL LOGGER MESSAGE name=value ...`, one line per record (a traceback follows it)."""

    def format(self, record: logging.LogRecord) -> str:
        message, fields, trace = self.parts(record)
        line = f"{self.formatTime(record)} {record.levelname} {record.name} {_text(message)}"
        if fields:
            line += " " + " ".join(f"{k}={_text(v)}" for k, v in fields.items())
        return line if trace is None else f"{line}\n{trace}"


class JsonFormatter(_Redacting):
    """One JSON object per record and line."""

    def format(self, record: logging.LogRecord) -> str:
        message, fields, trace = self.parts(record)
        obj: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        obj.update((k, v) for k, v in fields.items() if k not in obj)
        if trace is not None:
            obj["exception"] = trace
        return json.dumps(obj, ensure_ascii=False, default=str)


def _text(value: Any) -> str:
    """A value as one token of a text log line."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6g}"
    text = str(value)
    if text and all(c in _PLAIN for c in text):
        return text
    return json.dumps(text, ensure_ascii=False)


def logging_config(config: ServerConfig) -> dict[str, Any]:
    """The dictConfig of the server's logging (see the module docstring)."""
    formatter = JsonFormatter if config.log_format == "json" else TextFormatter
    level = config.log_level.upper()
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"server": {"()": formatter,
                                  "secrets": [s for s in (config.api_key, config.twilio_auth_token) if s]}},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "stream": "ext://sys.stderr",
                                "formatter": "server"}},
        "loggers": {
            "voice_agent": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn": {"handlers": ["stderr"], "level": level, "propagate": False},
            "uvicorn.error": {"level": level},
            "uvicorn.access": {"level": level},
        },
        "root": {"handlers": ["stderr"], "level": "WARNING"},
    }
