"""`voice-agent download` asks for the official files, and only those; tested without a network by
recording what it asks the hub for."""

from __future__ import annotations

import fnmatch

import pytest

from voice_agent.cli import build_parser
from voice_agent.tools import download

OFFICIAL_DECODER = ["flow.pt", "hift.pt", "campplus.onnx", "cosyvoice.yaml", "spk2info.pt",
                    "speech_tokenizer_v2.onnx", "CosyVoice-BlankEN/model.safetensors", "llm.pt"]
OFFICIAL_MODEL = ["config.json", "model-00001-of-00004.safetensors", "model.safetensors.index.json", "vocab.json",
                  "merges.txt", "tokenizer_config.json", "added_tokens.json", "special_tokens_map.json",
                  "tts_tokenizer/vocab.json", "tts_tokenizer/tokenizer_config.json", "README.md", ".gitattributes"]


def asked(argv: list[str]):
    args = build_parser().parse_args(["download", *argv])
    hub, urls = [], []
    download.run(download.plan(args), hub_fetch=hub.append, url_fetch=urls.append)
    return hub, urls


def selected(job, files):
    return [f for f in files if any(fnmatch.fnmatch(f, p) for p in job.allow_patterns)]


def test_default_fetches_the_model_and_the_decoder(tmp_path):
    hub, urls = asked(["--models-dir", str(tmp_path)])
    assert [j.repo_id for j in hub] == ["ICTNLP/LLaMA-Omni2-0.5B", "ICTNLP/cosy2_decoder"]
    assert hub[0].local_dir == tmp_path / "LLaMA-Omni2-0.5B" and hub[1].local_dir == tmp_path / "cosy2_decoder"
    assert [u.path for u in urls] == [tmp_path / "cosy2_decoder" / "prompt_en.wav",
                                      tmp_path / "cosy2_decoder" / "prompt_zh.wav"]
    assert all(u.url.startswith("https://raw.githubusercontent.com/ictnlp/LLaMA-Omni2/") for u in urls)
    assert selected(hub[1], OFFICIAL_DECODER) == ["flow.pt", "hift.pt", "campplus.onnx", "cosyvoice.yaml",
                                                  "spk2info.pt"]
    assert set(selected(hub[0], OFFICIAL_MODEL)) == set(OFFICIAL_MODEL) - {"README.md", ".gitattributes"}


def test_named_model_revision_and_whisper(tmp_path):
    hub, urls = asked(["--model", "LLaMA-Omni2-7B-Bilingual", "--revision", "abc", "--whisper", "--no-decoder",
                       "--models-dir", str(tmp_path)])
    assert [(j.repo_id, j.revision) for j in hub] == [("ICTNLP/LLaMA-Omni2-7B-Bilingual", "abc")]
    assert [u.path for u in urls] == [tmp_path / "speech_encoder" / "large-v3.pt"]  # no decoder, no prompts
    assert urls[0].url.endswith("/large-v3.pt") and urls[0].sha256 and urls[0].sha256 in urls[0].url


def test_unknown_model_is_refused():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["download", "--model", "LLaMA-Omni2-2B"])


def test_a_failed_fetch_is_a_clear_error(tmp_path):
    args = build_parser().parse_args(["download", "--models-dir", str(tmp_path)])

    def offline(job):
        raise OSError("network unreachable")

    with pytest.raises(download.DownloadError, match="ICTNLP/LLaMA-Omni2-0.5B.*network unreachable"):
        download.run(download.plan(args), hub_fetch=offline)
