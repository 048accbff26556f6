"""The `cosy2_decoder` directory: flow.pt + hift.pt (+ cosyvoice.yaml, voices) -> a units-to-audio decoder.

`read_cosyvoice_yaml` reads the numbers of a CosyVoice `cosyvoice.yaml` without building anything: every
tag (`!new:`, `!name:`, `!apply:`, `!!python/...`) is read as its plain mapping / sequence / scalar,
`!ref <name>` (and `!copy`) is resolved against the top-level keys (with `+ - * /` arithmetic on numbers and
string substitution otherwise), and an omegaconf `DictConfig` node with a `content:` mapping becomes that
mapping. Floats such as `1e-06` are read as numbers (YAML 1.2), as the reference's loader does.

`Cosy2Decoder.load(dir, device)` takes the flow and HiFT hyper-parameters from `cosyvoice.yaml` when the
file is present and otherwise uses the official defaults (`FlowConfig()`, `HiFTConfig()`); a section
missing from the yaml also keeps its defaults. Files other than flow.pt, hift.pt, cosyvoice.yaml,
campplus.onnx, spk2info.pt, prompt_*.wav and voices/ are ignored (the reference also loads a 1 GB text
LLM and a speech tokenizer that LLaMA-Omni2 never uses).

A decoder holds no per-session state: streaming a reply through it (flow stream + HiFT stream) is
`voice_agent.engine.vocoder.open_stream(decoder, ...)`; `voice_agent.model.cosy2.tiny` writes a random
directory for tests.
"""

from __future__ import annotations

import ast
import operator
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from voice_agent.errors import CheckpointError
from voice_agent.model.cosy2.flow import Flow, load_flow
from voice_agent.model.cosy2.flow_config import FlowConfig
from voice_agent.model.cosy2.hift import HiFT, load_hift
from voice_agent.model.cosy2.hift_config import HiFTConfig
from voice_agent.model.cosy2.voice import load_voice

YAML_FILE = "cosyvoice.yaml"
FLOW_FILE = "flow.pt"
HIFT_FILE = "hift.pt"
# Classes the reference yaml instantiates (CosyVoice @81edc83), written into the tiny yaml's tags.
TAGS = {
    ("flow",): "!new:cosyvoice.flow.flow.CausalMaskedDiffWithXvec",
    ("flow", "encoder"): "!new:cosyvoice.transformer.upsample_encoder.UpsampleConformerEncoder",
    ("flow", "decoder"): "!new:cosyvoice.flow.flow_matching.CausalConditionalCFM",
    ("flow", "decoder", "cfm_params"): "!new:omegaconf.DictConfig",
    ("flow", "decoder", "estimator"): "!new:cosyvoice.flow.decoder.ConditionalDecoder",
    ("hift",): "!new:cosyvoice.hifigan.generator.HiFTGenerator",
    ("hift", "f0_predictor"): "!new:cosyvoice.hifigan.f0_predictor.ConvRNNF0Predictor",
}
# Top-level values the official yaml refers to with `!ref`: (section path, key) -> global name.
REFS = {
    (("flow",), "spk_embed_dim"): "spk_embed_dim",
    (("flow",), "input_frame_rate"): "token_frame_rate",
    (("flow",), "token_mel_ratio"): "token_mel_ratio",
    (("hift",), "sampling_rate"): "sample_rate",
}
_FLOAT_12 = re.compile(r"^[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?$")  # YAML 1.2 floats, e.g. 1e-06
_REF = re.compile(r"<([^<>]+)>")
_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
    ast.USub: operator.neg, ast.UAdd: operator.pos,
}


@dataclass(frozen=True)
class _Ref:
    """An unresolved `!ref` / `!copy` expression such as `<sample_rate>` or `<hop> * 2`."""

    expr: str


class _Tagged:
    """A mapping or sequence written with a tag (for the yaml writer)."""

    def __init__(self, tag: str, value: dict[str, Any] | list[Any]):
        self.tag, self.value = tag, value


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads any tag as plain data (no object is ever built)."""


def _construct_any(loader: _Loader, tag_suffix: str, node: yaml.Node) -> Any:
    tag = node.tag
    if isinstance(node, yaml.ScalarNode):
        value = loader.construct_scalar(node)
        if tag in ("!ref", "!copy"):
            return _Ref(str(value))
        return value
    if isinstance(node, yaml.SequenceNode):
        items = loader.construct_sequence(node, deep=True)
        if "omegaconf.DictConfig" in tag and len(items) == 1 and isinstance(items[0], dict):
            return items[0]
        return items
    mapping = loader.construct_mapping(node, deep=True)
    if "omegaconf.DictConfig" in tag:
        for candidate in (mapping, mapping.get("kwds")):
            if isinstance(candidate, dict) and isinstance(candidate.get("content"), dict):
                return candidate["content"]
    return mapping


_Loader.add_multi_constructor("!", _construct_any)
_Loader.add_multi_constructor("tag:yaml.org,2002:python/", _construct_any)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT_12, list("-+0123456789."))


def _arith(expr: str) -> Any:
    """Evaluate a number-only arithmetic expression; raise ValueError for anything else."""
    def ev(node: ast.AST) -> Any:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return node.value
        if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.left), ev(node.right))
        if isinstance(node, ast.UnaryOp) and type(node.op) in _OPS:
            return _OPS[type(node.op)](ev(node.operand))
        raise ValueError(f"not arithmetic: {expr!r}")

    try:
        return ev(ast.parse(expr.strip(), mode="eval"))
    except SyntaxError as e:
        raise ValueError(f"not arithmetic: {expr!r}") from e


def _resolve(value: Any, top: dict[str, Any], path: str, stack: tuple[str, ...] = ()) -> Any:
    if isinstance(value, dict):
        return {k: _resolve(v, top, f"{path}.{k}" if path else str(k), stack) for k, v in value.items()}
    if isinstance(value, list):
        return [_resolve(v, top, f"{path}[{i}]", stack) for i, v in enumerate(value)]
    if not isinstance(value, _Ref):
        return value

    def lookup(name: str) -> Any:
        if name in stack:
            raise ValueError(f"{path}: circular !ref through <{name}>")
        node: Any = top
        for part in name.split("."):
            if not isinstance(node, dict) or part not in node:
                raise ValueError(f"{path}: !ref <{name}> names no top-level key "
                                 f"(expected one of {sorted(top)})")
            node = node[part]
        return _resolve(node, top, name, stack + (name,))

    whole = _REF.fullmatch(value.expr.strip())
    if whole:
        return lookup(whole.group(1))
    text = _REF.sub(lambda m: str(lookup(m.group(1))), value.expr)
    try:
        return _arith(text)
    except ValueError:
        return text


def read_cosyvoice_yaml(path: str | Path) -> dict[str, Any]:
    """Read the numbers of a cosyvoice.yaml as plain nested dicts (tags dropped, `!ref` resolved)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}: expected a cosyvoice.yaml")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_Loader)  # tags never build objects
        if not isinstance(data, dict):
            raise ValueError(f"expected a mapping at the top level, got {type(data).__name__}")
        return _resolve(data, data, "")
    except (yaml.YAMLError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"malformed file {path}: expected a cosyvoice.yaml ({e})") from e


class _Dumper(yaml.SafeDumper):
    """SafeDumper that writes `_Tagged` mappings and `_Ref` scalars with their tags."""


_Dumper.add_representer(
    _Tagged,
    lambda d, t: d.represent_sequence(t.tag, t.value, flow_style=True) if isinstance(t.value, list)
    else d.represent_mapping(t.tag, t.value, flow_style=False),
)
_Dumper.add_representer(dict, lambda d, v: d.represent_mapping("tag:yaml.org,2002:map", v, flow_style=False))
_Dumper.add_representer(list, lambda d, v: d.represent_sequence("tag:yaml.org,2002:seq", v, flow_style=True))
_Dumper.add_representer(_Ref, lambda d, r: d.represent_scalar("!ref", r.expr))


def _tag_sections(value: Any, path: tuple[str, ...]) -> Any:
    if not isinstance(value, dict):
        return value
    out = {k: _tag_sections(v, path + (k,)) for k, v in value.items()}
    for (section, key), name in REFS.items():
        if section == path and key in out:
            out[key] = _Ref(f"<{name}>")
    return _Tagged(TAGS[path], out) if path in TAGS else out


def cosyvoice_yaml_text(flow_cfg: FlowConfig, hift_cfg: HiFTConfig) -> str:
    """A cosyvoice.yaml in the official structure (tags, top-level globals with `!ref`) for these configs."""
    flow = flow_cfg.yaml_section()
    hift = hift_cfg.yaml_section()
    top: dict[str, Any] = {
        "__set_seed1": _Tagged("!apply:random.seed", [1986]),
        "sample_rate": hift_cfg.sampling_rate,
        "spk_embed_dim": flow.get("spk_embed_dim", 192),
        "token_frame_rate": flow.get("input_frame_rate", 25),
        "token_mel_ratio": flow.get("token_mel_ratio", 2),
        "flow": _tag_sections(flow, ("flow",)),
        "hift": _tag_sections(hift, ("hift",)),
    }
    header = "# cosyvoice.yaml in the official layout; voice-agent reads only its numbers\n"
    return header + yaml.dump(top, Dumper=_Dumper, sort_keys=False, width=100)


def read_decoder_configs(directory: str | Path) -> tuple[FlowConfig, HiFTConfig]:
    """Flow and HiFT hyper-parameters of a decoder directory (yaml when present, else official defaults)."""
    path = Path(directory) / YAML_FILE
    if not path.is_file():
        return FlowConfig(), HiFTConfig()
    data = read_cosyvoice_yaml(path)
    try:
        flow_cfg = FlowConfig.from_yaml(data["flow"]) if "flow" in data else FlowConfig()
        hift_cfg = HiFTConfig.from_yaml(data["hift"]) if "hift" in data else HiFTConfig()
    except (ValueError, TypeError, KeyError) as e:
        raise CheckpointError(f"malformed file {path}: {e}") from e
    return flow_cfg, hift_cfg


@dataclass
class Cosy2Decoder:
    """A loaded cosy2_decoder directory: the flow, HiFT and their configs."""

    directory: Path
    flow: Flow
    hift: HiFT
    flow_cfg: FlowConfig
    hift_cfg: HiFTConfig

    @classmethod
    def load(cls, directory: str | Path, device: str | torch.device = "cpu",
             dtype: torch.dtype = torch.float32) -> Cosy2Decoder:
        """Load flow.pt and hift.pt (HiFT always fp32, as the reference); a missing file is an error."""
        d = Path(directory)
        if not d.is_dir():
            raise CheckpointError(f"missing directory {d}: expected a cosy2_decoder directory")
        flow_cfg, hift_cfg = read_decoder_configs(d)
        flow = load_flow(d / FLOW_FILE, flow_cfg, device, dtype)
        hift = load_hift(d / HIFT_FILE, hift_cfg, device)
        return cls(d, flow, hift, flow_cfg, hift_cfg)

    def voice(self, voice: str | Path | None = None, prompt_dir: str | Path | None = None) -> torch.Tensor:
        """A speaker embedding (192,) for a voice name, embedding file or recording (see voice.py)."""
        return load_voice(voice, self.directory, prompt_dir)
