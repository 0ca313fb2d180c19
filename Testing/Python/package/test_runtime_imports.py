"""The package runs on its runtime dependencies alone (``pip install LungGradCAMLib``, ``make demo``):
no module imports a package that only the test extra installs.

Two checks: every module of the package imported, and a whole ``lunggradcam run`` (DICOM in,
every output including the DICOM SEG out), in a subprocess whose sys.path hides the packages only
the test extra installs; and every import statement of the package (those inside functions too) resolved to the
standard library, the package itself or a declared runtime dependency.
"""

from __future__ import annotations

import ast
import importlib.metadata as md
import json
import os
import re
import subprocess
import sys
import sysconfig
from pathlib import Path
from typing import Dict, Iterable, Set

import pytest

from helpers import REPO, make_tiny_model

PACKAGE = REPO / "LungGradCAMLib"
#: Imports only the Slicer layer makes (LungGradCAMLib/mrml.py runs inside Slicer or on slicer-core).
SLICER_ONLY = {"slicer", "vtk"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: str, extra: str = "") -> Set[str]:
    """Names a distribution requires: its runtime requirements, or those of ``extra``."""
    names = set()
    for requirement in md.distribution(dist).requires or []:
        name, _, marker = requirement.partition(";")
        wanted = re.search(r"""extra\s*==\s*["']([^"']+)["']""", marker)
        if (wanted.group(1) if wanted else "") == extra:
            names.add(_norm(re.match(r"[A-Za-z0-9._-]+", name.strip()).group(0)))
    return names


def _closure(names: Iterable[str]) -> Set[str]:
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        try:
            found.add(name)
            todo += _requirements(name)
        except md.PackageNotFoundError:
            pass  # a requirement for another platform or Python
    return found


def _top_level_modules() -> Dict[str, Set[str]]:
    """Import name -> the (normalised) distributions that provide it."""
    return {module: {_norm(d) for d in dists} for module, dists in md.packages_distributions().items()}


RUNTIME = _closure(_requirements("LungGradCAMLib"))
TEST_ONLY = _closure(_requirements("LungGradCAMLib", "test")) - RUNTIME
HIDDEN = sorted(m for m, dists in _top_level_modules().items() if dists <= TEST_ONLY)


def _run_hidden(code: str, tmp_path: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a Python whose sys.path is the checkout and a view of site-packages without
    the test-only packages (``python -S``: no site, no .pth files)."""
    site = Path(sysconfig.get_paths()["purelib"])
    view = tmp_path / "site-packages"
    view.mkdir()
    hidden_dists = {d.replace("-", "_") for d in TEST_ONLY}
    for entry in site.iterdir():
        name = entry.name.split(".")[0]
        dist = re.sub(r"-[^-]+\.(dist|egg)-info$", "", entry.name)
        if name in HIDDEN or _norm(dist).replace("-", "_") in hidden_dists or entry.suffix == ".pth":
            continue
        (view / entry.name).symlink_to(entry)
    script = tmp_path / "hidden.py"
    script.write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(view)])}
    return subprocess.run(
        [sys.executable, "-S", str(script)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600
    )


def test_test_only_packages_are_known():
    """The hidden set holds what the test extra adds (so the checks below can fail)."""
    assert {"pytest", "slicer", "monai", "captum", "hypothesis"} <= set(HIDDEN)
    assert {"torch", "numpy", "pydicom", "slicerio", "highdicom", "SimpleITK"}.isdisjoint(HIDDEN)


def test_every_module_imports_without_test_only_packages(tmp_path):
    done = _run_hidden(
        """
import importlib, json, pkgutil
import LungGradCAMLib
missing = {}
for info in pkgutil.walk_packages(LungGradCAMLib.__path__, "LungGradCAMLib."):
    if info.name.endswith(".__main__"):  # python -m LungGradCAMLib.cli: runs the command line
        continue
    try:
        importlib.import_module(info.name)
    except ModuleNotFoundError as exc:
        missing[info.name] = exc.name
try:
    import pytest
except ModuleNotFoundError:
    missing["(check) pytest"] = "pytest"
print(json.dumps(missing))
""",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr
    # only the Slicer layer needs Slicer; the hiding works
    assert json.loads(done.stdout.splitlines()[-1]) == {"LungGradCAMLib.mrml": "slicer", "(check) pytest": "pytest"}


@pytest.mark.slow
def test_a_whole_run_needs_no_test_only_package(tmp_path, small_phantom):
    """`lunggradcam run` from DICOM with every output (seg.nrrd, overlay, DICOM SEG; then NIfTI)."""
    from LungGradCAMLib import phantom

    dicom = tmp_path / "dicom"
    phantom.write_dicom_series(small_phantom.volume, dicom)
    model = make_tiny_model(tmp_path)
    done = _run_hidden(
        f"""
import sys
from LungGradCAMLib.cli import main
common = ["--model", {str(model)!r}, "--device", "cpu", "--batch-size", "16", "--threshold", "0.3"]
sys.exit(main(["run", {str(dicom)!r}, "--out", {str(tmp_path / "out")!r}, "--dicom-seg", *common])
         or main(["run", {str(dicom)!r}, "--out", {str(tmp_path / "nifti")!r}, "--format", "nii.gz", *common]))
""",
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p.name for p in (tmp_path / "out").iterdir()} == {
        "cam.nrrd",
        "segmentation.seg.nrrd",
        "lungs.seg.nrrd",
        "overlay.png",
        "segmentation.dcm",
        "report.json",
        ".lunggradcam.json",
    }
    assert {p.name for p in (tmp_path / "nifti").iterdir()} == {
        "cam.nii.gz",
        "segmentation.nii.gz",
        "lungs.nii.gz",
        "overlay.png",
        "report.json",
        ".lunggradcam.json",
    }


def _imports(path: Path) -> Set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            names.add(node.module.split(".")[0])
    return names


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: str(p.relative_to(PACKAGE)))
def test_every_import_is_a_runtime_dependency(path):
    """Imports inside functions too: each is the standard library, the package, or a package a
    runtime dependency provides (mrml.py alone may import Slicer)."""
    providers = _top_level_modules()
    allowed = SLICER_ONLY if path.name == "mrml.py" else set()
    for name in sorted(_imports(path)):
        if name in sys.stdlib_module_names or name == "LungGradCAMLib" or name in allowed:
            continue
        assert providers.get(name, set()) & RUNTIME, (
            f"{path.relative_to(REPO)} imports {name!r}, which no runtime dependency provides: add it to "
            "[project] dependencies in pyproject.toml, or make it optional with a message naming what to install"
        )
