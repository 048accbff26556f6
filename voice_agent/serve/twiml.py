"""TwiML for a Twilio call, Twilio's request signature, and the public URL of the media stream: pure functions.

- `connect_stream_twiml(stream_url, parameters)`: the answer to Twilio's voice webhook that connects the
  call to a bidirectional media stream. Twilio drops the query string of a `<Stream url>`, so settings and
  the API key travel as `<Parameter>` elements; they arrive in the stream's `start.customParameters`.
- `twilio_signature(url, params, auth_token)`: the `X-Twilio-Signature` Twilio sends with each request,
  base64(HMAC-SHA1(auth token, url + every POST parameter sorted by name, as name + value)). A WebSocket
  upgrade has no POST parameters: its signature is over the URL alone, in its `wss://` form.
  `valid_twilio_signature` compares in constant time, and accepts the URL with or without its default port
  (Twilio's own helper libraries do the same, as proxies differ on whether they keep `:443`).
- `public_stream_url(base_url, headers, path)`: the `wss://` URL Twilio must connect to: from a configured
  public URL, else from the proxy's X-Forwarded-Proto / X-Forwarded-Host, else from Host. Always `wss://`,
  except `ws://` where the configured URL or the forwarded scheme is plainly `http` (local testing).
Facts: twilio.com/docs/voice/twiml/stream, twilio.com/docs/usage/webhooks/webhooks-security.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit
from xml.sax.saxutils import escape

SIGNATURE_HEADER = "X-Twilio-Signature"
_ATTRIBUTE_ENTITIES = {'"': "&quot;", "'": "&apos;"}
_DEFAULT_PORTS = {"https": 443, "wss": 443, "http": 80, "ws": 80}


def connect_stream_twiml(stream_url: str, parameters: Mapping[str, str]) -> str:
    """`<Response><Connect><Stream url=...>` with one `<Parameter name value>` per entry, XML-escaped."""
    params = "".join(f"<Parameter name={_attr(name)} value={_attr(value)}/>" for name, value in parameters.items())
    return ('<?xml version="1.0" encoding="UTF-8"?>'
            f"<Response><Connect><Stream url={_attr(stream_url)}>{params}</Stream></Connect></Response>")


def twilio_signature(url: str, params: Mapping[str, str], auth_token: str) -> str:
    """The X-Twilio-Signature of a request to `url` with POST parameters `params` (empty for a GET or a
    WebSocket upgrade)."""
    data = url + "".join(name + params[name] for name in sorted(params))
    digest = hmac.new(auth_token.encode("utf-8"), data.encode("utf-8"), hashlib.sha1).digest()
    return base64.b64encode(digest).decode("ascii")


def valid_twilio_signature(url: str, params: Mapping[str, str], signature: str | None, auth_token: str) -> bool:
    """Whether `signature` is Twilio's for this request (constant-time; False when missing or empty)."""
    if not signature or not auth_token:
        return False
    given = signature.encode("utf-8", "replace")
    return any(hmac.compare_digest(twilio_signature(candidate, params, auth_token).encode("ascii"), given)
               for candidate in _port_variants(url))


def public_stream_url(base_url: str | None, headers: Mapping[str, str], path: str) -> str:
    """The WebSocket URL of `path` as the carrier must call it; raises ValueError with no host to use."""
    path = "/" + path.lstrip("/")
    if base_url:
        parts = urlsplit(base_url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.netloc:
            raise ValueError(f"public URL: expected https://host[/prefix], got {base_url!r}")
        scheme = "ws" if parts.scheme in ("http", "ws") else "wss"
        return urlunsplit((scheme, parts.netloc, parts.path.rstrip("/") + path, "", ""))
    proto = _first(_header(headers, "x-forwarded-proto"))
    host = _first(_header(headers, "x-forwarded-host")) or _first(_header(headers, "host"))
    if not host:
        raise ValueError("public URL: expected a configured public URL, X-Forwarded-Host or Host, got none")
    scheme = "ws" if proto.lower() in ("http", "ws") else "wss"
    return f"{scheme}://{host}{path}"


def _attr(value: str) -> str:
    return '"' + escape(value, _ATTRIBUTE_ENTITIES) + '"'


def _header(headers: Mapping[str, str], name: str) -> str:
    value = headers.get(name)
    if value is None:  # a plain dict is case-sensitive; starlette's Headers is not
        value = next((v for k, v in headers.items() if k.lower() == name), None)
    return value or ""


def _first(value: str) -> str:
    """The first of a proxy chain's comma-separated values."""
    return value.split(",")[0].strip()


def _port_variants(url: str) -> list[str]:
    """`url` as given, and with its default port removed or added."""
    parts = urlsplit(url)
    default = _DEFAULT_PORTS.get(parts.scheme)
    if default is None or not parts.hostname:
        return [url]
    host = parts.netloc.rsplit("@", 1)[-1]
    userinfo = parts.netloc[: len(parts.netloc) - len(host)]
    try:
        port = parts.port
    except ValueError:
        return [url]
    if port is None:
        other = f"{userinfo}{host}:{default}"
    elif port == default:
        other = userinfo + host.rsplit(":", 1)[0]
    else:
        return [url]
    return [url, urlunsplit((parts.scheme, other, parts.path, parts.query, parts.fragment))]
