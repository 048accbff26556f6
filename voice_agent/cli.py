"""The `voice-agent` command line: serve, download, make-tiny, generate, bench, loadtest.

Heavy imports (torch, transformers) happen inside each subcommand so `voice-agent --help` is instant.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def _cmd_make_tiny(args: argparse.Namespace) -> int:
    from voice_agent.model.tiny import run

    return run(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from voice_agent.tools.generate import run_generate

    return run_generate(args)


def _cmd_bench(args: argparse.Namespace) -> int:
    if args.what == "model":
        from voice_agent.tools.bench import bench_model_main

        return bench_model_main(args.rest)
    if args.what == "vocoder":
        from voice_agent.tools.bench_vocoder import main as bench_vocoder_main

        return bench_vocoder_main(args.rest)
    if args.what == "calls":
        from voice_agent.tools.bench_calls import bench_calls_main

        return bench_calls_main(args.rest)
    from voice_agent.tools.bench import bench_engine_main

    return bench_engine_main(args.rest)


def _cmd_loadtest(args: argparse.Namespace) -> int:
    from voice_agent.tools.loadtest.run import run_loadtest

    return run_loadtest(args)


def _cmd_serve(args: argparse.Namespace) -> int:
    from voice_agent.serve.app import run_server
    from voice_agent.serve.config import ServerConfig

    run_server(ServerConfig.from_args(args))
    return 0


def _cmd_download(args: argparse.Namespace) -> int:
    from voice_agent.tools.download import download_main

    return download_main(args)


def _make_tiny_arguments(p: argparse.ArgumentParser) -> None:
    """Kept here (not imported from model.tiny) so `voice-agent --help` does not import torch."""
    p.add_argument("dir", type=Path, help="output directory (gets the official models/ layout)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the weights (same seed, same bytes)")
    p.add_argument("--untied", action="store_true", help="write a distinct LLM lm_head")
    p.add_argument("--sharded", action="store_true", help="write sharded safetensors with an index")
    p.add_argument("--generation-config", action="store_true", help="also write a generation_config.json")
    p.add_argument("--bf16", action="store_true", help="bfloat16 weights, as the official files")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="voice-agent", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    from voice_agent.serve.config import DTYPES, ServerConfig  # light: no torch
    from voice_agent.tools.download import add_download_arguments

    p = sub.add_parser("serve", help="run the voice agent server (page at /, WebSocket at /ws)")
    ServerConfig.add_arguments(p)
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("download", help="download the official model files into models/")
    add_download_arguments(p)
    p.set_defaults(func=_cmd_download)

    p = sub.add_parser("make-tiny", help="write a tiny random-weight checkpoint set in the official layout")
    _make_tiny_arguments(p)
    p.set_defaults(func=_cmd_make_tiny)

    p = sub.add_parser("generate", help="speech in -> text and speech units (and a WAV with --vocoder-dir)")
    p.add_argument("--model-dir", required=True, help="a LLaMA-Omni2 model directory")
    p.add_argument("--input", required=True, help="input speech (WAV/FLAC, any rate and channel count)")
    p.add_argument("--whisper", default=None,
                   help="openai-whisper large-v3.pt: the encoder's dims (its weights only if the checkpoint has none)")
    p.add_argument("--vocoder-dir", default=None, help="a cosy2_decoder directory: also write the reply audio")
    p.add_argument("--output", default="reply.wav", help="reply WAV path (with --vocoder-dir)")
    p.add_argument("--voice", default=None, help="voice name or embedding file (with --vocoder-dir)")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None, help="0 = greedy (text and units)")
    p.add_argument("--max-final-units", type=int, default=None,
                   help="cap on units written after the final read (default 1024, as the reference)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--unpadded", action="store_true", help="encode only the real audio length (changes numbers)")
    p.add_argument("--dump", default=None,
                   help="write intermediate arrays to this .npz (mel, encoder and adapter outputs, per-step LLM "
                        "logits, text ids, every read's ids and final flag, fused TTS inputs, raw TTS ids, units; keys:"
                        " voice_agent.tools.generate)")
    p.set_defaults(func=_cmd_generate)

    p = sub.add_parser("bench", help="benchmarks: model, vocoder, engine, calls (phone-call pacing)")
    p.add_argument("what", choices=["model", "vocoder", "engine", "calls"])
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark (--help for them)")
    p.set_defaults(func=_cmd_bench)

    from voice_agent.tools.loadtest.run import add_loadtest_arguments  # argparse only: no heavy imports

    p = sub.add_parser("loadtest", help="simulated callers over the network: time to first audio, underruns, "
                       "capacity", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    add_loadtest_arguments(p)
    p.set_defaults(func=_cmd_loadtest)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from voice_agent.errors import VoiceAgentError

    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except VoiceAgentError as e:
        print(f"voice-agent: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
