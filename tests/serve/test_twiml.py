"""TwiML, Twilio's request signature and the public stream URL: pure functions, table-tested. The signature
table holds Twilio's own documented examples (token 12345), so the maths is checked against the real thing."""

from __future__ import annotations

import xml.etree.ElementTree as ET

import pytest

from voice_agent.serve.twiml import (
    connect_stream_twiml,
    public_stream_url,
    twilio_signature,
    valid_twilio_signature,
)

DOC_URL = "https://mycompany.com/myapp.php?foo=1&bar=2"


def doc_params(number: str) -> dict[str, str]:
    return {"CallSid": "CA1234567890ABCDE", "Caller": number, "Digits": "1234", "From": number,
            "To": "+18005551212"}


# Twilio's documented examples: the security guide and the twilio-php request-validation guide, across
# revisions of the docs (they changed the phone number, and the signature with it).
DOCUMENTED = [
    (doc_params("+14158675310"), "GvWf1cFY/Q7PnoempGyD5oXAezc="),
    (doc_params("+14158675309"), "RSOYDt4T1cUTdK1PDd93/VVr8B8="),
    (doc_params("+12349013030"), "0/KCTR6DLpKmkAf8muzZqo1nDgQ="),
]


@pytest.mark.parametrize(("params", "signature"), DOCUMENTED)
def test_signature_matches_twilios_documented_examples(params: dict[str, str], signature: str) -> None:
    assert twilio_signature(DOC_URL, params, "12345") == signature
    assert valid_twilio_signature(DOC_URL, params, signature, "12345")
    reordered = dict(reversed(list(params.items())))  # parameters are sorted by name, whatever their order
    assert valid_twilio_signature(DOC_URL, reordered, signature, "12345")


# (url, params, signature, token) -> invalid
INVALID = [
    (DOC_URL, doc_params("+14158675310"), "GvWf1cFY/Q7PnoempGyD5oXAezc=", "54321"),  # wrong token
    (DOC_URL, {**doc_params("+14158675310"), "Digits": "1235"}, "GvWf1cFY/Q7PnoempGyD5oXAezc=", "12345"),
    ("https://mycompany.com/myapp.php?foo=1&bar=3", doc_params("+14158675310"), "GvWf1cFY/Q7PnoempGyD5oXAezc=",
     "12345"),
    (DOC_URL, doc_params("+14158675310"), "", "12345"),  # unsigned
    (DOC_URL, doc_params("+14158675310"), None, "12345"),
    (DOC_URL, doc_params("+14158675310"), "GvWf1cFY/Q7PnoempGyD5oXAezc=", ""),  # no token configured
    (DOC_URL, doc_params("+14158675310"), "ünïcode", "12345"),
]


@pytest.mark.parametrize(("url", "params", "signature", "token"), INVALID)
def test_wrong_or_missing_signatures_are_refused(url: str, params: dict[str, str], signature: str | None,
                                                 token: str) -> None:
    assert not valid_twilio_signature(url, params, signature, token)


def test_websocket_upgrade_signature_is_over_the_wss_url_alone() -> None:
    url = "wss://agent.example.com/twilio"
    sig = twilio_signature(url, {}, "tok")
    assert valid_twilio_signature(url, {}, sig, "tok")
    assert not valid_twilio_signature("https://agent.example.com/twilio", {}, sig, "tok")
    # a proxy may add or drop the default port
    assert valid_twilio_signature("wss://agent.example.com:443/twilio", {}, sig, "tok")
    assert valid_twilio_signature(url, {}, twilio_signature("wss://agent.example.com:443/twilio", {}, "tok"), "tok")
    assert not valid_twilio_signature("wss://agent.example.com:8443/twilio", {}, sig, "tok")


def test_connect_stream_twiml() -> None:
    xml = connect_stream_twiml("wss://agent.example.com/twilio",
                               {"voice": "en", "instructions": 'Say "hi" & <be> brief\'s', "key": "sk-1"})
    assert xml.startswith('<?xml version="1.0" encoding="UTF-8"?><Response><Connect><Stream url="wss://')
    root = ET.fromstring(xml)
    assert root.tag == "Response" and [c.tag for c in root] == ["Connect"]
    [stream] = list(root[0])
    assert stream.tag == "Stream" and stream.get("url") == "wss://agent.example.com/twilio"
    assert [(p.tag, p.get("name"), p.get("value")) for p in stream] == [
        ("Parameter", "voice", "en"), ("Parameter", "instructions", 'Say "hi" & <be> brief\'s'),
        ("Parameter", "key", "sk-1")]
    assert "&amp;" in xml and "&quot;" in xml and "&lt;be&gt;" in xml
    assert ET.fromstring(connect_stream_twiml("wss://h/twilio", {}))[0][0].get("url") == "wss://h/twilio"


# (configured base, headers, path) -> url
URLS = [
    ("https://agent.example.com", {}, "/twilio", "wss://agent.example.com/twilio"),
    ("https://agent.example.com/", {"host": "internal:8000"}, "twilio", "wss://agent.example.com/twilio"),
    ("https://example.com/voice/", {}, "/twilio", "wss://example.com/voice/twilio"),
    ("http://localhost:8000", {}, "/twilio", "ws://localhost:8000/twilio"),
    ("wss://agent.example.com", {}, "/twilio", "wss://agent.example.com/twilio"),
    (None, {"host": "internal:8000", "x-forwarded-proto": "https", "x-forwarded-host": "agent.example.com"},
     "/twilio", "wss://agent.example.com/twilio"),
    (None, {"X-Forwarded-Proto": "https, http", "X-Forwarded-Host": "a.example.com, b"}, "/twilio",
     "wss://a.example.com/twilio"),
    (None, {"x-forwarded-proto": "http", "host": "localhost:8000"}, "/twilio", "ws://localhost:8000/twilio"),
    (None, {"host": "agent.example.com"}, "/telephony/telnyx", "wss://agent.example.com/telephony/telnyx"),
]


@pytest.mark.parametrize(("base", "headers", "path", "url"), URLS)
def test_public_stream_url(base: str | None, headers: dict[str, str], path: str, url: str) -> None:
    assert public_stream_url(base, headers, path) == url


@pytest.mark.parametrize(("base", "headers"), [(None, {}), ("agent.example.com", {}), ("ftp://x", {})])
def test_public_stream_url_without_a_host_is_an_error(base: str | None, headers: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="public URL: expected"):
        public_stream_url(base, headers, "/twilio")
