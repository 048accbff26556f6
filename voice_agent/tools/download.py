"""`voice-agent download`: fetch the official model files into `models/`, unchanged.

What is fetched (see models/README.md for sizes):
- `ICTNLP/<model>` -> models/<model>/ : config, safetensors (single or sharded), both tokenizers and
  generation_config.json when the repository has one.
- `ICTNLP/cosy2_decoder` -> models/cosy2_decoder/ : flow.pt, hift.pt, campplus.onnx, cosyvoice.yaml and
  spk2info.pt when present. The CosyVoice2 text LLM (`CosyVoice-BlankEN/`, ~1 GB) and the speech
  tokenizer ONNX are not used by voice-agent and are skipped.
- the reference's voice prompt recordings `prompt_en.wav` / `prompt_zh.wav` (from the LLaMA-Omni2
  repository on GitHub) -> models/cosy2_decoder/, from which the default voices are computed once with
  CAM++ and cached (voice.py).
- with `--whisper`: openai-whisper's large-v3.pt -> models/speech_encoder/large-v3.pt, checked against
  the SHA-256 in its URL. Needed only for user transcripts (its text decoder, model/transcribe.py): every
  LLaMA-Omni2 checkpoint carries the encoder weights.

Downloads resume; files already present are kept. `plan(args)` lists what would be fetched, so what a
download asks for can be checked without a network.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from voice_agent.errors import DownloadError, VoiceAgentError

MODELS = tuple(
    f"LLaMA-Omni2-{size}{suffix}"
    for size in ("0.5B", "1.5B", "3B", "7B", "14B")
    for suffix in ("", "-Bilingual")
) + ("LLaMA-Omni2-32B-Bilingual",)
DEFAULT_MODEL = "LLaMA-Omni2-0.5B"
HF_ORG = "ICTNLP"
DECODER_REPO = f"{HF_ORG}/cosy2_decoder"
DECODER_DIR = "cosy2_decoder"
MODEL_FILES = (
    "config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
    "vocab.json", "merges.txt", "tokenizer.json", "tokenizer_config.json", "added_tokens.json",
    "special_tokens_map.json", "tts_tokenizer/*",
)
DECODER_FILES = ("flow.pt", "hift.pt", "campplus.onnx", "cosyvoice.yaml", "spk2info.pt")
WHISPER_URL = (
    "https://openaipublic.azureedge.net/main/whisper/models/"
    "e5b1a55b89c1367dacf97e3e19bfd829a01529dbfdeefa8caeb59b3f1b81dadb/large-v3.pt"
)
WHISPER_PATH = Path("speech_encoder") / "large-v3.pt"
PROMPT_URL = "https://raw.githubusercontent.com/ictnlp/LLaMA-Omni2/main/llama_omni2/inference/{name}"
PROMPT_FILES = ("prompt_en.wav", "prompt_zh.wav")


@dataclass(frozen=True)
class HubJob:
    repo_id: str
    local_dir: Path
    allow_patterns: tuple[str, ...]
    revision: str | None = None


@dataclass(frozen=True)
class UrlJob:
    url: str
    path: Path
    sha256: str | None = None  # checked when known


def add_download_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=DEFAULT_MODEL, choices=MODELS,
                   help=f"LLaMA-Omni2 variant (default {DEFAULT_MODEL})")
    p.add_argument("--models-dir", default="models", help="where to put the files (default ./models)")
    p.add_argument("--revision", default=None, help="a commit or tag of the model repository")
    p.add_argument("--no-decoder", action="store_true", help="skip ICTNLP/cosy2_decoder")
    p.add_argument("--whisper", action="store_true",
                   help="also fetch openai-whisper large-v3.pt (3 GB; its text decoder makes user transcripts)")


def plan(args: argparse.Namespace) -> list[HubJob | UrlJob]:
    root = Path(args.models_dir)
    jobs: list[HubJob | UrlJob] = [HubJob(f"{HF_ORG}/{args.model}", root / args.model, MODEL_FILES, args.revision)]
    if not args.no_decoder:
        jobs.append(HubJob(DECODER_REPO, root / DECODER_DIR, DECODER_FILES))
        jobs += [UrlJob(PROMPT_URL.format(name=name), root / DECODER_DIR / name) for name in PROMPT_FILES]
    if args.whisper:
        jobs.append(UrlJob(WHISPER_URL, root / WHISPER_PATH, WHISPER_URL.rsplit("/", 2)[-2]))
    return jobs


def _hub_fetch(job: HubJob) -> None:
    from huggingface_hub import snapshot_download

    snapshot_download(
        repo_id=job.repo_id, local_dir=str(job.local_dir), allow_patterns=list(job.allow_patterns),
        revision=job.revision,
    )


def _url_fetch(job: UrlJob) -> None:
    from tqdm import tqdm

    if job.path.is_file() and (job.sha256 is None or _sha256(job.path) == job.sha256):
        return
    job.path.parent.mkdir(parents=True, exist_ok=True)
    partial = job.path.with_suffix(job.path.suffix + ".partial")
    with urllib.request.urlopen(job.url) as response, open(partial, "wb") as out:
        total = int(response.headers.get("Content-Length", 0)) or None
        with tqdm(total=total, unit="B", unit_scale=True, desc=job.path.name) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                bar.update(len(chunk))
    if job.sha256 is not None and _sha256(partial) != job.sha256:
        raise DownloadError(f"{job.url}: SHA-256 mismatch, expected {job.sha256}; the partial file is {partial}")
    partial.replace(job.path)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def run(jobs: list[HubJob | UrlJob], hub_fetch: Callable[[HubJob], None] = _hub_fetch,
        url_fetch: Callable[[UrlJob], None] = _url_fetch) -> None:
    for job in jobs:
        if isinstance(job, HubJob):
            print(f"fetching {job.repo_id} ({', '.join(job.allow_patterns)}) -> {job.local_dir}", file=sys.stderr)
            try:
                hub_fetch(job)
            except VoiceAgentError:
                raise
            except Exception as e:  # network, auth, missing repository: say which and why
                raise DownloadError(f"downloading {job.repo_id} failed: {type(e).__name__}: {e}") from e
        else:
            print(f"fetching {job.url} -> {job.path}", file=sys.stderr)
            try:
                url_fetch(job)
            except VoiceAgentError:
                raise
            except Exception as e:
                raise DownloadError(f"downloading {job.url} failed: {type(e).__name__}: {e}") from e


def download_main(args: argparse.Namespace) -> int:
    jobs = plan(args)
    run(jobs)
    model_dir = Path(args.models_dir) / args.model
    print(f"done. Start the server with: voice-agent serve --model-dir {model_dir}", file=sys.stderr)
    return 0
