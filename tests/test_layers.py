"""The package's layers, read from its imports with `ast`: no import cycles, and no import points upward.

Layers, lowest first: `errors` and `audio` (and the package root) < `model` < `engine` < `serve` < `tools`
< `cli`. A module may import its own layer and the layers below it. Every import counts: top-level,
inside functions (the lazy imports that keep `voice-agent --help` light) and under `TYPE_CHECKING`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "voice_agent"
LAYERS = {"__init__": 0, "errors": 0, "audio": 1, "model": 2, "engine": 3, "serve": 4, "tools": 5, "cli": 6}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, known: set[str]) -> set[str]:
    """The package modules `path` imports (`from a.b import c` counts a.b.c when c is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "voice_agent"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "voice_agent":
            assert node.level == 0, f"{path}: expected absolute imports, got a relative one"
            for a in node.names:
                sub = f"{node.module}.{a.name}"
                found.add(sub if sub in known else node.module)
    return {m for m in found if m in known}


def layer_of(module: str) -> int:
    parts = module.split(".")
    return LAYERS["__init__"] if len(parts) == 1 else LAYERS[parts[1]]


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(p, known) - {m} for m, p in mods.items()}


def cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(g[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return found


def test_every_top_level_module_has_a_layer() -> None:
    tops = {m.split(".")[1] for m in modules() if "." in m}
    assert tops <= set(LAYERS), f"expected every module under a known layer, got new {sorted(tops - set(LAYERS))}"


def test_no_import_cycles() -> None:
    assert cycles(graph()) == []


def test_no_upward_imports() -> None:
    upward = sorted(f"{m} -> {d}" for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m))
    assert upward == []


@pytest.mark.parametrize(
    ("edges", "expected"),
    [({"a": {"b"}, "b": {"a"}, "c": set()}, [["a", "b"]]), ({"a": {"b"}, "b": {"c"}, "c": set()}, [])],
)
def test_the_cycle_finder_finds_cycles(edges: dict[str, set[str]], expected: list[list[str]]) -> None:
    assert cycles(edges) == expected


def test_the_graph_sees_lazy_and_type_checking_imports(tmp_path: Path) -> None:
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from voice_agent.engine import api\n"
                    "def f():\n    from voice_agent.serve.app import build_app\n")
    assert imports_of(path, {"voice_agent.engine.api", "voice_agent.serve.app"}) == {
        "voice_agent.engine.api", "voice_agent.serve.app"}
