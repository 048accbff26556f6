"""The contract between a connection and a wire format: `WireAdapter`.

`voice_agent.serve.connection.Connection` moves messages between a WebSocket and a `Session`; everything it
needs to know about a wire format is this protocol, so a new format (OpenAI Realtime, a telephony media
stream) is a new adapter and no change to the connection. An adapter is Sans-I/O and belongs to one
connection, so it may keep that connection's wire state (rates, resamplers, whether the session opened).

Its parts:
- translation: `decode(message) -> list[ClientEvent]` (raising `ProtocolError` with a stable code for a
  bad message; the connection reports it and goes on; a message that is usable in part gives its events
  and a `FieldRejected` for the part, e.g. a stop request with a bad position still stops) and
  `encode(event) -> list[message]`. Settings a client chooses are checked against the engine
  (`EngineInfo.check_turn`) as they are decoded, so a refused `update` leaves the adapter's state as it was;
- opening: a session opens with a `StartSession` event. A format with an opening message decodes it from
  that message and returns [] from `on_accept`; a format whose session opens with the connection returns
  its `StartSession` from `on_accept`. Either way the connection ends with `NoStart` when no
  `StartSession` came within `start_timeout_s` of the accept;
- auth: besides the generic `Authorization: Bearer KEY` header, a key may come from the handshake
  (`handshake_key`, e.g. a query parameter or subprotocol the format defines) or from the opening event
  (`StartSession.key`);
- the handshake's answer: `subprotocol`, chosen from what the client offered;
- whether the session emits item events (`conversation_events`) for a format that exposes the conversation;
- pacing: a format whose far end plays whatever it receives at once into an unbounded buffer (a phone
  carrier) sets `pace_lead_ms`; the connection then sends reply audio in real time from a monotonic clock,
  at most that far ahead of playback, counting each message's `audio_ms`;
- the fatal error: before the close frame the connection sends `encode(ErrorEvent(..., fatal=True))`; a
  format without an error message returns [] there.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from voice_agent.serve.protocols.events import ClientEvent, ServerEvent


class WireAdapter(Protocol):
    """One connection's wire format; see the module docstring."""

    start_timeout_s: float  # the session must open (a StartSession) within this of the accept
    subprotocol: str | None  # the WebSocket subprotocol to answer the client with (None: none)
    conversation_events: bool  # the client manages the conversation's items (the session's item events)
    pace_lead_ms: float | None  # reply audio is sent in real time, this far ahead (None: as fast as read)

    def handshake_key(self, headers: Mapping[str, str], query: Mapping[str, str]) -> str | None:
        """An API key the WebSocket handshake carries other than a Bearer header, or None."""
        ...

    def on_accept(self) -> list[ClientEvent]:
        """Events the accepted connection implies before any message (its StartSession, if the format
        has no opening message)."""
        ...

    def decode(self, message: str | bytes) -> list[ClientEvent]:
        """One wire message -> client events; raises ProtocolError for a message it cannot use."""
        ...

    def encode(self, event: ServerEvent) -> list[str | bytes]:
        """One server event -> the wire messages that carry it, in order (possibly none)."""
        ...

    def audio_ms(self, message: str | bytes) -> float:
        """The reply audio one encoded message carries, in ms (0 for control messages): what a paced sender
        (`pace_lead_ms`) counts."""
        ...
