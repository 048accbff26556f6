"""The bundled page in real headless Chromium against the real server, with a fake microphone.

The microphone is a WAV spoken by espeak-ng: a first utterance, a pause long enough for the server to
end the turn and start the reply, then a second utterance while the reply is playing. The page must
capture speech, get the turn ended by the server, receive text and audio interleaved, play audio
(non-zero played samples), and on the second utterance stop playback at once and show `interrupted`;
the second utterance then becomes the next turn.

The engine is the real one, built as `voice-agent serve` builds it on a machine without weights: the
embedded tiny random-weight demo model (written by `make_tiny` in the official layout), here with plain
random weights so that replies are long (see `engine_factory`). Its replies are noise and gibberish, but
every byte goes through the real model path, and the page shows the demo banner.

Needs: apt packages chromium, chromium-driver, espeak-ng (skipped, with the reason, when missing).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import uvicorn

from voice_agent.audio import load_audio
from voice_agent.engine.api import Engine
from voice_agent.engine.build import build_engine
from voice_agent.engine.files import demo_cache_dir
from voice_agent.model.tiny import make_tiny
from voice_agent.serve.app import build_app, uvicorn_options
from voice_agent.serve.config import ServerConfig

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
WAV_RATE = 16_000
LEAD_S, GAP_S, TAIL_S = 0.6, 1.6, 6.0  # silence before, between and after the two utterances
FIRST = "Hello, can you hear me?"
SECOND = "Stop. Tell me a joke instead."
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--disable-dev-shm-usage", "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
    "--autoplay-policy=no-user-gesture-required",
]

pytestmark = pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists() and shutil.which("espeak-ng")),
    reason="needs apt packages chromium, chromium-driver and espeak-ng",
)


@pytest.fixture
def engine_factory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[], Engine]:
    """The real engine with no weights present, serving its demo model from the cache. The cache holds the
    plain random tiny set rather than the demo's shaped one (whose reply is 1.6 s): random replies run to
    the 1024-unit final flush, about 40 s of audio, so the second utterance lands during playback."""
    monkeypatch.chdir(tmp_path)  # no models/ here
    monkeypatch.setenv("VOICE_AGENT_CACHE", str(tmp_path / "cache"))
    make_tiny(demo_cache_dir(), seed=0)
    return lambda: build_engine(*ServerConfig().engine_options())


def speak(text: str, path: Path) -> np.ndarray:
    """espeak-ng speech as 16 kHz float32 mono."""
    subprocess.run(["espeak-ng", "-v", "en-us", "-w", str(path), text], check=True, capture_output=True)
    return load_audio(str(path))


@pytest.fixture
def mic_wav(tmp_path: Path) -> Path:
    first, second = speak(FIRST, tmp_path / "first.wav"), speak(SECOND, tmp_path / "second.wav")
    gap = lambda s: np.zeros(int(s * WAV_RATE), np.float32)  # noqa: E731
    audio = np.concatenate([gap(LEAD_S), first, gap(GAP_S), second, gap(TAIL_S)])
    path = tmp_path / "mic.wav"
    sf.write(path, audio, WAV_RATE, subtype="PCM_16")
    return path


@pytest.fixture
def server_url(engine_factory: Callable[[], Engine]) -> Iterator[str]:
    """The real app under uvicorn in a thread (selenium is synchronous)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = ServerConfig(port=port, log_level="warning")
    server = uvicorn.Server(uvicorn.Config(build_app(config, engine_factory()), **uvicorn_options(config)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}/"
    server.should_exit = True
    thread.join(timeout=10)


def test_page_talks_is_interrupted_and_takes_the_next_turn(server_url: str, mic_wav: Path, tmp_path: Path) -> None:
    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    options = Options()
    options.binary_location = CHROMIUM
    for flag in [*CHROMIUM_FLAGS, f"--use-file-for-fake-audio-capture={mic_wav}",
                 f"--user-data-dir={tmp_path / 'profile'}"]:
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.get(server_url)
        WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "demo-banner").is_displayed())
        driver.find_element(By.ID, "start").click()
        done = ("const s = window.voiceAgent; return s.interrupted.length >= 1 && (s.played['resp_2'] || 0) > 0"
                " && s.transcripts.some((t) => t.final)")
        try:
            WebDriverWait(driver, 30, poll_frequency=0.1).until(lambda d: d.execute_script(done))
        except Exception:
            print(driver.execute_script("return JSON.stringify(window.voiceAgent)"))
            print(driver.get_log("browser"))
            raise
        stats = driver.execute_script("return window.voiceAgent")
        transcript = driver.find_element(By.ID, "transcript").text
        first_user = driver.execute_script(
            "const li = document.querySelector('#transcript li.user'); "
            "return {item: li.dataset.item, text: li.querySelector('.text').textContent}")
    finally:
        driver.quit()

    # The page captured the fake microphone's speech and streamed it.
    assert stats["micRmsMax"] > 0.01 and stats["framesSent"] > 50
    # The server found speech and ended the turn.
    events = stats["events"]
    assert events.index("speech.started") < events.index("speech.stopped") < events.index("response.started")
    # Text and audio arrived interleaved: text after audio had begun, and audio after that text.
    order = "".join(stats["order"])
    first_audio = order.index("a")
    assert "t" in order[first_audio:] and "a" in order[order.index("t", first_audio):], order
    # Played for real: the worklet output non-zero samples before the interruption.
    assert stats["played"]["resp_1"] > 0
    # The second utterance interrupted the first reply during playback; playback stopped at once.
    interrupted = stats["interrupted"][0]
    assert interrupted["rid"] == "resp_1" and interrupted["played_ms"] > 0
    flushed = next(f for f in stats["flushed"] if f["rid"] == "resp_1")
    assert flushed["dropped"] > 0  # there was still queued audio, and it was dropped
    assert stats["progressAfterCut"] == 0  # nothing of resp_1 played after the cut
    assert "interrupted after" in transcript
    # ... and the second utterance became the next turn, which played.
    assert stats["responsesStarted"] >= 2 and stats["played"]["resp_2"] > 0
    assert stats["errors"] == []
    # The user's words (Whisper's text decoder on the turn's encoder output) replaced the placeholder.
    final = next(t for t in stats["transcripts"] if t["final"])
    assert final["error"] is None and final["item_id"] == first_user["item"]
    assert first_user["text"] == final["text"] and "(you spoke" not in first_user["text"]
