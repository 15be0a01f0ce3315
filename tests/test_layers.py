"""The package's layers import one way, top to bottom, and no module reaches around them.

Layers, top first (a module may import its own layer and those below it):
  4  the top: aqua_alloc/__init__.py, lifecycle.py (what enable/disable wire), cli.py, demo.py,
     auto.py, _startup.py, __main__.py
  3  aqua_alloc/hf/ (HuggingFace integration) and aqua_alloc/coordinator/ (lending between
     processes); neither imports the other
  2  aqua_alloc/memory/ (native binding, settings, allocator, lending, topology, sim)
  1  aqua_alloc/obs/ (events, traces, summaries, plots)

Every import counts, also those inside functions, and so does a module named by string to
importlib or looked up in sys.modules.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "aqua_alloc"
TOP = 4
RANK = {"hf": 3, "coordinator": 3, "memory": 2, "obs": 1}


def layer_of(module: str) -> tuple[int, str]:
    """(rank, folder) of a dotted module name inside aqua_alloc."""
    parts = module.split(".")
    if len(parts) > 1 and parts[1] in RANK:
        return RANK[parts[1]], parts[1]
    return TOP, "top"


def module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """(line, module) of every aqua_alloc module the file imports or names as a module string."""
    tree = ast.parse(path.read_text(), str(path))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            # `from aqua_alloc.memory import allocator` imports a submodule too
            found += [(node.lineno, f"{target}.{alias.name}") for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("aqua_alloc."):
            if all(part.isidentifier() for part in node.value.split(".")):
                found.append((node.lineno, node.value))
    return [(line, name) for line, name in found if name.split(".")[0] == "aqua_alloc" and is_module(name)]


def is_module(name: str) -> bool:
    """Whether a dotted name is a module or package of aqua_alloc (not a class or a string)."""
    path = PACKAGE.parent.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


SOURCES = sorted(p for p in PACKAGE.rglob("*.py") if "data" not in p.parts)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_imports_run_one_way(path):
    rank, folder = layer_of(module_name(path))
    upward = []
    for line, name in imported_modules(path):
        target_rank, target_folder = layer_of(name)
        if name == "aqua_alloc" and rank < TOP:
            upward.append(f"line {line}: {name} (the top package)")
        elif target_rank > rank or (target_rank == rank and target_folder != folder):
            upward.append(f"line {line}: {name} ({target_folder})")
    assert upward == [], f"{path.relative_to(PACKAGE)} ({folder}) imports upward or sideways"


def test_every_module_is_in_a_layer():
    folders = {p.parent.name for p in SOURCES if p.parent != PACKAGE}
    assert folders == set(RANK), "a new folder needs a rank here, and a line in the README's layout"


def test_no_benchmark_harness_in_the_library():
    harness = ("serve_bench", "serve_trace", "serve_harness", "serve_options")
    assert not [p.name for p in SOURCES if p.stem.startswith(harness)]
