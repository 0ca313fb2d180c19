"""The README's Python blocks, run as written, so that the documented API cannot drift.

Each ```python block of README.md runs in a fresh namespace holding only ``lgc`` (the README's
``import LungGradCAMLib as lgc``, which its first block makes and the others take as made), in a
folder that holds what the blocks
name: ``path/to/dicom`` (the Slicer self-test's phantom, one 20 mm nodule, as a DICOM series) and,
with that folder as HOME, ``~/Documents/SlicerDICOMDatabase`` (a Slicer DICOM database of it). The
models are the bundled ones the blocks name. A block that needs the 3D Slicer application
(``slicer.util.getModuleLogic``, a scene with a CT node) is skipped with that reason:
slicer_module/test_slicer_logic.py runs the same Logic calls on slicer-core.
"""

from __future__ import annotations

import re
from typing import List, Tuple

import pytest

from helpers import REPO

README = REPO / "README.md"


def _python_blocks() -> List[Tuple[int, str]]:
    """(line of the opening fence, code) of each ```python block of the README."""
    text = README.read_text(encoding="utf-8")
    return [
        (text.count("\n", 0, m.start()) + 1, m.group(1))
        for m in re.finditer(r"^```python\n(.*?)^```$", text, re.M | re.S)
    ]


BLOCKS = _python_blocks()


def test_the_readme_has_its_python_blocks():
    """The three blocks: the library, Slicer's DICOM database, Slicer's Python console."""
    assert len(BLOCKS) >= 3
    assert any("lgc.explain(" in code for _, code in BLOCKS)


@pytest.fixture(scope="module")
def readme_world(tmp_path_factory, nodule_chest):
    """A folder holding the files the README's blocks name (see the module's docstring)."""
    import LungGradCAMLib as lgc

    root = tmp_path_factory.mktemp("readme")
    lgc.phantom.write_dicom_series(nodule_chest.volume, root / "path" / "to" / "dicom")
    lgc.make_dicom_database(root / "path" / "to" / "dicom", root / "Documents" / "SlicerDICOMDatabase")
    return root


@pytest.mark.slow
@pytest.mark.parametrize("line, code", BLOCKS, ids=[f"README.md:{line}" for line, _ in BLOCKS])
def test_readme_python_block_runs(line, code, readme_world, monkeypatch, capsys):
    if re.search(r"^\s*[^#\n]*\bslicer\.", code, re.M):
        pytest.skip(
            "needs the 3D Slicer application (slicer.util.getModuleLogic, a scene with a CT node); "
            "slicer_module/test_slicer_logic.py runs the same Logic calls on slicer-core"
        )
    monkeypatch.chdir(readme_world)
    monkeypatch.setenv("HOME", str(readme_world))
    import LungGradCAMLib

    namespace = {"__name__": "readme", "lgc": LungGradCAMLib}
    exec(compile(code, f"{README}:{line}", "exec"), namespace)  # noqa: S102 - the README's own code
    assert capsys.readouterr().out.strip(), "every block prints what it shows"
