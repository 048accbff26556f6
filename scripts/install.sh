#!/usr/bin/env bash
# Install voice-agent into ./.venv on a fresh Linux machine.
#   scripts/install.sh          the server (torch from PyPI unless a torch is already in the venv)
#   scripts/install.sh --test   also the test tools, headless Chromium and espeak-ng (apt, needs root/sudo)
# The order matters: torch first and alone, then the project (which lists openai-whisper's real
# dependencies), then openai-whisper without its dependencies, last: its declared triton dependency is 1 GB
# and unused, and pip checks for missing dependencies only in an install that resolves them.
set -euo pipefail
cd "$(dirname "$0")/.."

extra=""
if [[ "${1:-}" == "--test" ]]; then
  extra="[test]"
  if ! command -v chromium >/dev/null || ! command -v chromedriver >/dev/null || ! command -v espeak-ng >/dev/null; then
    sudo=""; [[ $(id -u) -ne 0 ]] && sudo="sudo"
    $sudo apt-get update -q
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends \
      chromium chromium-driver espeak-ng
  fi
fi

python3 -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
# VOICE_AGENT_TORCH_INDEX picks the wheel index, e.g. https://download.pytorch.org/whl/cpu for the CPU-only
# build (plain PyPI serves the CUDA build on Linux).
torch_index=()
[[ -n "${VOICE_AGENT_TORCH_INDEX:-}" ]] && torch_index=(--index-url "$VOICE_AGENT_TORCH_INDEX")
python -c "import torch" 2>/dev/null || pip install -q "${torch_index[@]}" "torch==${VOICE_AGENT_TORCH_VERSION:-2.13.0}"
# setuptools' "Editable installation" notice only says that a folder named voice_agent in the working
# directory would shadow the package: here that folder is the package.
PYTHONWARNINGS="ignore:Editable installation" pip install -q -e ".${extra}"
python -c "import whisper" 2>/dev/null || pip install -q --no-deps openai-whisper==20250625
python -c "import torch, whisper, transformers, webrtcvad; print('voice-agent installed: torch', torch.__version__)"
if [[ -n "$extra" ]]; then  # the Realtime clients of the tests and the server share one websockets
  python -c "import openai, agents.realtime, websockets; print('test clients: openai', openai.__version__, 'websockets', websockets.__version__)"
fi
