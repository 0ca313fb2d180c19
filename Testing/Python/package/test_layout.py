"""The package's layout, read from its source (ast): the parts and the one-way imports between
them, with no cycle, no torch where it must not be, Slicer only in the Slicer layer, and modules
of a readable size.

Parts, lowest first; a module may import its own part and the parts below it, never one above:

    core        Volume, LabelMap, results, errors, limits, paths, atomic writes (no torch)
    io          DICOM read and write, Slicer's DICOM database, DICOM SEG, seg.nrrd, inputs, PNG (no torch)
    phantom     the synthetic chest CT (phantom/: core and io only)
    engine      CAM methods, sliding window, lung mask, preprocessing, models, device, torchrun
    options     ExplainOptions (options.py: what every face passes on)
    pipeline    explain, hot regions, outputs, batch, bench
    evaluation  classification and heat-map metrics, a model's evaluation
    training    data sources, fit, the heat-map retraining test
    cli, mrml   the command line (parsing only) and the Slicer node conversion

Every import counts, at module level or inside a function (a lazy import for an optional path is
still a dependency of the module), except those under ``if TYPE_CHECKING:``.
"""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Dict, Iterator, List, Set, Tuple

import pytest

from helpers import REPO

PACKAGE = REPO / "LungGradCAMLib"
SLICER_MODULE = REPO / "LungGradCAM" / "LungGradCAM.py"

RANKS = {
    "core": 0,
    "io": 1,
    "phantom": 2,
    "engine": 3,
    "options": 3,
    "pipeline": 4,
    "evaluation": 5,
    "training": 6,
    "cli": 7,
    "mrml": 7,
}
#: Outside packages only some parts may import (by top-level name).
FORBIDDEN = {
    "core": {"torch", "slicer", "vtk", "qt", "ctk"},
    "io": {"torch", "slicer", "vtk", "qt", "ctk"},
}
SLICER_NAMES = {"slicer", "vtk", "qt", "ctk", "slicer_app_standin"}
#: Parts the engine never imports: it works on arrays and Volumes given to it.
ENGINE_NEVER = {"io", "pipeline", "training", "evaluation", "cli", "mrml"}
#: Lines a Python file may have (as `ruff format` writes it: issue 26 asks for every module under 700).
MAX_LINES = 700
#: Where the project's Python files are: the engine, the Slicer module, the tests, the benchmarks.
PYTHON_ROOTS = ("LungGradCAMLib", "LungGradCAM", "Testing", "benchmarks")


def _modules() -> Dict[str, Path]:
    """Dotted name (without the package) -> file, for every module of the package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _type_checking_nodes(tree: ast.AST) -> Set[int]:
    skip: Set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.dump(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(name: str, path: Path) -> Iterator[Tuple[str, int]]:
    """(imported name, line): package modules as dotted names without the package
    ("core.volume"), others as "<top-level name>"."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skip = _type_checking_nodes(tree)
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "LungGradCAMLib":
                    yield alias.name.partition(".")[2], node.lineno
                else:
                    yield "<" + alias.name.split(".")[0] + ">", node.lineno
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                top = node.module.split(".")[0]
                if top != "LungGradCAMLib":
                    yield "<" + top + ">", node.lineno
                    continue
                base = node.module.partition(".")[2]
            else:
                base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
            for alias in node.names:  # "from . import x" and "from .engine import cam" name modules
                candidate = f"{base}.{alias.name}" if base else alias.name
                yield (candidate if candidate in MODULES else base), node.lineno


def _part(module: str) -> str:
    return module.split(".")[0] if module else ""


GRAPH: Dict[str, List[Tuple[str, int]]] = {m: list(_imports(m, p)) for m, p in MODULES.items()}


def _where(module: str, line: int) -> str:
    return f"{MODULES[module].relative_to(REPO)}:{line}"


def test_every_module_is_in_a_part():
    for module in MODULES:
        assert module == "" or _part(module) in RANKS, f"{module}: in no part of the layout (add it to RANKS)"


def test_no_module_imports_a_part_above_its_own():
    wrong = [
        f"{_where(m, line)} ({_part(m)}) imports {target} ({_part(target)})"
        for m, imports in GRAPH.items()
        if m
        for target, line in imports
        if not target.startswith("<") and target and RANKS[_part(target)] > RANKS[_part(m)]
    ]
    assert not wrong, "imports from a part above:\n" + "\n".join(wrong)


def test_the_engine_never_reads_files_trains_or_talks_to_slicer():
    wrong = [
        f"{_where(m, line)} imports {target}"
        for m, imports in GRAPH.items()
        if _part(m) == "engine"
        for target, line in imports
        if _part(target) in ENGINE_NEVER or target.strip("<>") in SLICER_NAMES
    ]
    assert not wrong, "\n".join(wrong)


@pytest.mark.parametrize("part", sorted(FORBIDDEN))
def test_core_and_io_import_no_torch_nor_slicer(part):
    wrong = [
        f"{_where(m, line)} imports {target.strip('<>')}"
        for m, imports in GRAPH.items()
        if _part(m) == part
        for target, line in imports
        if target.strip("<>") in FORBIDDEN[part]
    ]
    assert not wrong, "\n".join(wrong)


def test_only_the_slicer_layer_imports_slicer():
    wrong = [
        f"{_where(m, line)} imports {target.strip('<>')}"
        for m, imports in GRAPH.items()
        if m != "mrml"
        for target, line in imports
        if target.strip("<>") in SLICER_NAMES
    ]
    assert not wrong, "only mrml.py (and the Slicer module, LungGradCAM/) may import Slicer:\n" + "\n".join(wrong)
    uses = {
        n.names[0].name.split(".")[0]
        for n in ast.walk(ast.parse(SLICER_MODULE.read_text()))
        if isinstance(n, ast.Import)
    }
    assert "slicer" in uses  # the check above looks where it should


def test_no_import_cycle():
    """Between modules (every import, lazy ones too) and between parts."""
    edges = {
        m: {t for t, _ in imports if t in MODULES and t != m and not (m == "" or t == "")}
        for m, imports in GRAPH.items()
    }
    # a package's __init__ re-exporting its own modules is the package itself, not a cycle
    edges = {m: {t for t in ts if not t.startswith(m + ".") or m == ""} for m, ts in edges.items()}
    cycle = _find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)
    part_edges: Dict[str, Set[str]] = {}
    for m, ts in edges.items():
        for t in ts:
            if _part(m) != _part(t):
                part_edges.setdefault(_part(m), set()).add(_part(t))
    cycle = _find_cycle(part_edges)
    assert cycle is None, "import cycle between parts: " + " -> ".join(cycle)


def _find_cycle(edges: Dict[str, Set[str]]):
    state: Dict[str, int] = {}
    stack: List[str] = []

    def visit(node: str):
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt) :] + [nxt]
            if state.get(nxt) is None:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if state.get(node) is None:
            found = visit(node)
            if found:
                return found
    return None


def test_cycle_finder_finds_one():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}}) is None


def test_python_files_are_of_a_readable_size():
    files = [path for root in PYTHON_ROOTS for path in sorted((REPO / root).rglob("*.py"))]
    assert SLICER_MODULE in files and PACKAGE / "mrml.py" in files  # it looks where it should
    lines = {str(path.relative_to(REPO)): len(path.read_text().splitlines()) for path in files}
    over = {name: n for name, n in lines.items() if n > MAX_LINES}
    assert not over, f"Python files over {MAX_LINES} lines (split them by what they do): {over}"


def test_the_package_answers_dir_help_and_tab_completion():
    """Slicer's Python console and Jupyter call dir() (tab completion) and help() on the package:
    every lazily exported name and part is listed, and each resolves."""
    import pydoc

    import LungGradCAMLib as lgc

    names = dir(lgc)
    assert {"explain", "DicomDatabase", "metrics", "pipeline", "make_dicom_database"} <= set(names)
    assert names == sorted(names)
    assert "DicomDatabase" in pydoc.render_doc(lgc)
    for name in ("explain", "DicomDatabase", "metrics"):
        assert getattr(lgc, name) is not None
