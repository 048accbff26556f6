"""The phone-call routes on a real server (FakeEngine): TwiML from POST /twilio/voice, Twilio's signature on
the webhook and on the media stream's upgrade, the API key reaching only Twilio, and unknown carriers."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlencode

import httpx
import pytest
import websockets
from fakes import FakeEngine
from serving import free_socket, running

from voice_agent.serve.app import build_app, uvicorn_options
from voice_agent.serve.config import ServerConfig
from voice_agent.serve.twiml import twilio_signature

TOKEN = "twilio-auth-token-1"
KEY = "api-key-for-tests"
PUBLIC = "https://voice.example.com"


@asynccontextmanager
async def serve(engine: FakeEngine, **config: object) -> AsyncIterator[str]:
    cfg = ServerConfig(**config)  # type: ignore[arg-type]
    async with running(build_app(cfg, engine), uvicorn_options(cfg), free_socket()) as addr:
        yield addr


def parameters(twiml: str) -> dict[str, str]:
    return dict(re.findall(r'<Parameter name="([^"]*)" value="([^"]*)"/>', twiml))


async def test_the_voice_webhook_answers_twiml_with_the_stream_and_its_parameters() -> None:
    async with serve(FakeEngine(), public_url=PUBLIC, api_key=KEY) as addr, httpx.AsyncClient() as http:
        r = await http.post(f"http://{addr}/twilio/voice?voice=en", data={"CallSid": "CA1", "instructions": "Hi <&>"})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/xml")
    assert '<Stream url="wss://voice.example.com/twilio">' in r.text
    # No token configured: nothing proves the caller is Twilio, so the API key is not handed out.
    assert parameters(r.text) == {"voice": "en", "instructions": "Hi &lt;&amp;&gt;"}


async def test_with_an_auth_token_only_signed_webhooks_get_twiml_and_only_they_get_the_key() -> None:
    async with serve(FakeEngine(), public_url=PUBLIC, api_key=KEY, twilio_auth_token=TOKEN) as addr, \
            httpx.AsyncClient() as http:
        form = {"CallSid": "CA1", "From": "+15551234567"}
        unsigned = await http.post(f"http://{addr}/twilio/voice?voice=en", data=form)
        wrong = await http.post(f"http://{addr}/twilio/voice?voice=en", data=form,
                                headers={"X-Twilio-Signature": twilio_signature(f"{PUBLIC}/twilio/voice", form, TOKEN)})
        signature = twilio_signature(f"{PUBLIC}/twilio/voice?voice=en", form, TOKEN)
        signed = await http.post(f"http://{addr}/twilio/voice?voice=en", data=form,
                                 headers={"X-Twilio-Signature": signature})
    assert unsigned.status_code == 403 and wrong.status_code == 403 and "X-Twilio-Signature" in unsigned.text
    assert signed.status_code == 200 and parameters(signed.text) == {"voice": "en", "key": KEY}


async def test_with_an_auth_token_an_unsigned_media_stream_is_refused_before_the_upgrade() -> None:
    engine = FakeEngine()
    async with serve(engine, public_url=PUBLIC, twilio_auth_token=TOKEN) as addr:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"ws://{addr}/twilio"):
                pass
        assert refused.value.response.status_code == 403
        bad = {"X-Twilio-Signature": twilio_signature(f"{PUBLIC}/other", {}, TOKEN)}
        with pytest.raises(websockets.InvalidStatus):
            async with websockets.connect(f"ws://{addr}/twilio", additional_headers=bad):
                pass
        good = {"X-Twilio-Signature": twilio_signature("wss://voice.example.com/twilio", {}, TOKEN)}
        async with websockets.connect(f"ws://{addr}/twilio", additional_headers=good) as ws:
            await ws.send(json.dumps({"event": "connected", "protocol": "Call", "version": "1.0.0"}))
            await ws.send(json.dumps({"event": "start", "sequenceNumber": "1", "streamSid": "MZ1", "start": {
                "streamSid": "MZ1", "accountSid": "AC1", "callSid": "CA1", "tracks": ["inbound"],
                "customParameters": {}, "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": 8000,
                                                        "channels": 1}}}))
            await ws.send(json.dumps({"event": "stop", "sequenceNumber": "2", "streamSid": "MZ1",
                                      "stop": {"accountSid": "AC1", "callSid": "CA1"}}))
            with pytest.raises(websockets.ConnectionClosedOK):  # the call ended: a normal close
                await ws.recv()
    assert engine.sessions and engine.open_count == 0  # the session opened, and was released


async def test_an_unknown_carrier_is_refused_with_the_list_of_carriers() -> None:
    async with serve(FakeEngine()) as addr:
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"ws://{addr}/telephony/{urlencode({'x': 'y'})}"):
                pass
    assert refused.value.response.status_code == 404
    assert b"telnyx" in refused.value.response.body
