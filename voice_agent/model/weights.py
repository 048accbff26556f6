"""Reading checkpoint files and loading tensors into modules, key for key.

Every failure names the file or key and says what was expected and what was found:

- `SafetensorsCheckpoint` reads a single `model.safetensors` or shards listed in
  `model.safetensors.index.json`, lazily (one tensor at a time, so a 7B checkpoint never sits in memory
  twice).
- `load_torch_file` reads a pickled torch file (`large-v3.pt`, `flow.pt`, `hift.pt`) with
  `weights_only=True` (optionally memory-mapped, to read a few fields of a large file).
- `load_module` copies tensors into a module's parameters and persistent buffers, checking that no key is
  missing, none is unexpected, and every shape matches.
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from voice_agent.errors import CheckpointError

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def read_json(path: Path, what: str) -> dict[str, Any]:
    """Read a JSON object from `path`; `what` says what the file should hold (for the error)."""
    if not path.is_file():
        raise CheckpointError(f"missing file {path}: expected {what}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"malformed file {path}: expected {what} as JSON ({e})") from e
    if not isinstance(data, dict):
        raise CheckpointError(f"malformed file {path}: expected {what} as a JSON object, got {type(data).__name__}")
    return data


class SafetensorsCheckpoint(Mapping[str, torch.Tensor]):
    """A read-only mapping key -> tensor over one or several safetensors files, read lazily."""

    def __init__(self, model_dir: str | Path):
        self.model_dir = Path(model_dir)
        index_path = self.model_dir / INDEX_FILE
        single_path = self.model_dir / SINGLE_FILE
        self._file_of: dict[str, Path] = {}
        if index_path.is_file():
            index = read_json(index_path, "a safetensors index with a 'weight_map' object")
            weight_map = index.get("weight_map")
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"malformed file {index_path}: expected a non-empty 'weight_map' object")
            for key, shard in weight_map.items():
                self._file_of[key] = self.model_dir / str(shard)
            for shard in sorted(set(self._file_of.values())):
                if not shard.is_file():
                    raise CheckpointError(f"missing file {shard}: listed as a shard in {index_path}")
        elif single_path.is_file():
            for key in self._open(single_path).keys():
                self._file_of[key] = single_path
        else:
            raise CheckpointError(
                f"missing file in {self.model_dir}: expected {SINGLE_FILE} or {INDEX_FILE} with its shards"
            )
        self._handles: dict[Path, Any] = {}

    def _open(self, path: Path) -> Any:
        try:
            return safe_open(str(path), framework="pt", device="cpu")
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"malformed file {path}: expected a safetensors file ({e})") from e

    def _handle(self, path: Path) -> Any:
        if path not in self._handles:
            self._handles[path] = self._open(path)
        return self._handles[path]

    def __getitem__(self, key: str) -> torch.Tensor:
        path = self._file_of[key]
        try:
            return self._handle(path).get_tensor(key)
        except (SafetensorError, OSError, ValueError, KeyError) as e:
            raise CheckpointError(f"malformed file {path}: cannot read tensor {key!r} ({e})") from e

    def __iter__(self):
        return iter(self._file_of)

    def __len__(self) -> int:
        return len(self._file_of)

    def __contains__(self, key: object) -> bool:
        return key in self._file_of

    def shape(self, key: str) -> tuple[int, ...]:
        """The stored shape of `key`, without reading the data."""
        return tuple(self._handle(self._file_of[key]).get_slice(key).get_shape())


def load_torch_file(path: str | Path, what: str, *, mmap: bool = False) -> Any:
    """Load a pickled torch file with `weights_only=True`; errors name the file and `what` it should be.

    `mmap`: map the tensors' storage instead of reading it (for a zip-format file; others are read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"missing file {path}: expected {what}")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mmap and zipfile.is_zipfile(path))
    except Exception as e:  # torch raises many types for truncated or foreign files
        raise CheckpointError(f"malformed file {path}: expected {what} ({type(e).__name__}: {e})") from e


def with_prefix(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, str]:
    """Map module-relative names to the full keys in `tensors` that start with `prefix`."""
    return {key[len(prefix):]: key for key in tensors if key.startswith(prefix)}


def load_module(
    module: torch.nn.Module,
    tensors: Mapping[str, torch.Tensor],
    prefix: str = "",
    *,
    source: str,
    ignore: Iterable[str] = (),
    rename: Mapping[str, str] | None = None,
    exclude_prefixes: Iterable[str] = (),
) -> None:
    """Copy `tensors[prefix + name]` into every parameter and persistent buffer `name` of `module`.

    `source` names the file(s) in errors. `ignore` lists module-relative names that may be absent from the
    checkpoint (they keep their current value) and checkpoint names under `prefix` that are allowed to be
    unused. `rename` maps a module name to the checkpoint's name when they differ. Checkpoint names under
    `prefix` that start with one of `exclude_prefixes` (module-relative) belong to other modules and are
    not considered. Raises CheckpointError on
    a missing key, an unexpected key under `prefix`, or a shape mismatch (naming key, expected and found).
    """
    ignore = set(ignore)
    rename = dict(rename or {})
    targets = module.state_dict(keep_vars=True)
    excluded = tuple(exclude_prefixes)
    available = {k: v for k, v in with_prefix(tensors, prefix).items() if not (excluded and k.startswith(excluded))}
    used: set[str] = set()
    missing = []
    for name, target in targets.items():
        stored_name = rename.get(name, name)
        if stored_name not in available:
            if name not in ignore:
                missing.append(prefix + stored_name)
            continue
        key = available[stored_name]
        used.add(stored_name)
        shape = tensors.shape(key) if isinstance(tensors, SafetensorsCheckpoint) else tuple(tensors[key].shape)
        if tuple(shape) != tuple(target.shape):
            raise CheckpointError(
                f"shape mismatch in {source}: key {key!r} expected {tuple(target.shape)}, found {tuple(shape)}"
            )
        with torch.no_grad():
            target.copy_(tensors[key].to(dtype=target.dtype))
    if missing:
        shown = ", ".join(repr(k) for k in missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise CheckpointError(f"missing key(s) in {source}: {shown} ({len(missing)} in all)")
    unexpected = sorted(set(available) - used - ignore)
    if unexpected:
        shown = ", ".join(repr(prefix + k) for k in unexpected[:8]) + (" ..." if len(unexpected) > 8 else "")
        raise CheckpointError(f"unexpected key(s) in {source}: {shown} ({len(unexpected)} in all)")
