"""engine/files.py: the download command the demo banner and the page show, pasteable as shown."""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from voice_agent.engine.files import download_command

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def venv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A venv-like bin/ with a python and the console script, as the interpreter running the server."""
    bin_dir = tmp_path / "checkout" / ".venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "python").touch()
    script = bin_dir / "voice-agent"
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    return bin_dir


def test_script_under_the_working_directory_is_shown_relative(venv: Path) -> None:
    assert download_command(venv.parents[1]) == ".venv/bin/voice-agent download"


def test_script_elsewhere_is_shown_absolute(venv: Path, tmp_path: Path) -> None:
    assert download_command(tmp_path / "elsewhere") == f"{venv / 'voice-agent'} download"


def test_script_that_path_finds_is_shown_bare(venv: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", f"{venv}{os.pathsep}/usr/bin")
    assert download_command(tmp_path) == "voice-agent download"


def test_paths_with_spaces_are_quoted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "my venv" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "voice-agent").touch()
    monkeypatch.setattr(sys, "executable", str(bin_dir / "python"))
    command = download_command(tmp_path / "elsewhere")
    assert shlex.split(command) == [str(bin_dir / "voice-agent"), "download"]


def test_without_the_script_the_interpreter_runs_the_cli(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "executable", str(tmp_path / "bin" / "python3"))
    assert download_command(tmp_path) == f"{tmp_path / 'bin' / 'python3'} -m voice_agent.cli download"


@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_the_real_command_runs_as_pasted(where: str, tmp_path: Path) -> None:
    """This interpreter's command, pasted into a shell in the checkout or in another directory (with
    --help instead of downloading)."""
    cwd = REPO if where == "checkout" else tmp_path
    command = download_command(cwd)
    done = subprocess.run(f"{command} --help", shell=True, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (command, done.stderr)
    assert "--models-dir" in done.stdout
