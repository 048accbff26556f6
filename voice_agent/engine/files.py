"""Which model files the server runs: `--model-dir`, else the first model in models/, else the embedded
tiny random-weight demo model, written once into a cache directory by `make_tiny(..., demo=True)`
(official layout; a short, quiet reply with visible text, see `model/tiny_demo.py`)."""

from __future__ import annotations

import logging
import os
import shlex
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from voice_agent import __version__
from voice_agent.errors import CheckpointError, VoiceAgentError

log = logging.getLogger(__name__)

MODELS_DIR = "models"  # where `voice-agent download` puts the weights, relative to the working directory
COMMAND = "voice-agent"  # the console script pyproject.toml installs beside the interpreter
DEMO_SEED = 0
# Bump when what make_tiny writes for the demo changes: the cache key holds it. 3: the whisper file's text
# decoder is usable (large-v3's vocabulary, for user transcripts).
DEMO_FORMAT = 3


def demo_cache_dir() -> Path:
    """Where the embedded tiny demo model is written ($VOICE_AGENT_CACHE, else the user cache directory)."""
    root = os.environ.get("VOICE_AGENT_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "voice-agent"
    )
    return Path(root) / f"demo-tiny-v{__version__}-format{DEMO_FORMAT}-seed{DEMO_SEED}"


def download_command(cwd: Path | None = None) -> str:
    """A `voice-agent download` command line to paste into a shell in `cwd` (the server's working directory,
    where the weights must land: models/ there is where the server looks).

    The script is the `voice-agent` beside the running interpreter, however the server was started:
    plain `voice-agent` when PATH finds that same script (an activated venv); relative to `cwd` when it lies
    under it (`.venv/bin/voice-agent download` after the README's install: pasted in another directory it
    fails instead of downloading where the server does not look); else its absolute path. Without that
    script (the package run from a source tree), the interpreter with `-m voice_agent.cli`.
    """
    cwd = (cwd or Path.cwd()).resolve()
    bin_dir = Path(os.path.abspath(sys.executable)).parent.resolve()  # the venv's python itself is a link
    script = bin_dir / COMMAND
    if not script.is_file():
        return f"{shlex.quote(os.path.abspath(sys.executable))} -m voice_agent.cli download"
    found = shutil.which(COMMAND)
    if found is not None and Path(found).resolve() == script.resolve():
        return f"{COMMAND} download"
    shown = str(script.relative_to(cwd)) if script.is_relative_to(cwd) else str(script)
    return f"{shlex.quote(shown)} download"


def ensure_demo_model(root: Path | None = None) -> Path:
    """Write the tiny random-weight checkpoint set once (atomically) and return its directory."""
    from voice_agent.model.tiny import make_tiny

    root = root or demo_cache_dir()
    if (root / "LLaMA-Omni2-tiny" / "config.json").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=root.name + ".", dir=root.parent))
    make_tiny(tmp, seed=DEMO_SEED, demo=True)
    try:
        os.replace(tmp, root)
    except OSError:  # another process wrote it first
        shutil.rmtree(tmp, ignore_errors=True)
    return root


@dataclass(frozen=True)
class ModelPaths:
    model_dir: Path
    vocoder_dir: Path | None
    whisper: Path | None
    demo: bool


def resolve_model_paths(model_dir: str | None, vocoder_dir: str | None, whisper: str | None,
                        models_dir: Path = Path(MODELS_DIR)) -> ModelPaths:
    """The model to serve: `model_dir`, else the first LLaMA-Omni2 directory in models/, else the demo."""
    demo = False
    if model_dir is not None:
        chosen = Path(model_dir)
        if not (chosen / "config.json").is_file():
            raise CheckpointError(f"--model-dir {chosen}: expected a LLaMA-Omni2 directory with config.json")
    else:
        found = sorted(d for d in models_dir.glob("*") if d.is_dir() and (d / "config.json").is_file()) \
            if models_dir.is_dir() else []
        if found:
            chosen = found[0]
            if len(found) > 1:
                log.info("engine: several models in %s, serving %s", models_dir, chosen.name)
        else:
            root = ensure_demo_model()
            chosen, demo = root / "LLaMA-Omni2-tiny", True
            vocoder_dir = vocoder_dir or str(root / "cosy2_decoder")
    if vocoder_dir is None:
        for candidate in (models_dir / "cosy2_decoder", chosen.parent / "cosy2_decoder"):
            if (candidate / "flow.pt").is_file():
                vocoder_dir = str(candidate)
                break
    return ModelPaths(chosen, Path(vocoder_dir) if vocoder_dir else None, Path(whisper) if whisper else None, demo)


def directory_voices(directory: Path | None) -> list[str]:
    if directory is None:
        return []
    from voice_agent.model.cosy2.voice import available_voices

    try:
        return available_voices(directory)
    except (OSError, VoiceAgentError):
        return []
