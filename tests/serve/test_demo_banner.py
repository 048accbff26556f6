"""The console banner of the demo model names the download command the page also shows."""

from __future__ import annotations

from fakes import FakeEngine

from voice_agent.engine.files import download_command
from voice_agent.serve.app import DOWNLOAD_COMMAND, demo_banner


def test_demo_banner_shows_the_pasteable_download_command() -> None:
    banner = demo_banner(FakeEngine(demo=True))
    assert banner is not None and "DEMO model" in banner
    assert DOWNLOAD_COMMAND == download_command()
    assert DOWNLOAD_COMMAND in [line.strip() for line in banner.splitlines()]  # on a line of its own
    assert demo_banner(FakeEngine(demo=False)) is None
