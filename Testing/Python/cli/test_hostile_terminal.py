"""What reaches the terminal. A command prints its one message (or its results), a note for each of
LungGradCAM's own warnings, and nothing else: no other library's warnings (numpy's RuntimeWarning,
pydicom's WARNING lines and UserWarnings) unless ``-v``; and what a file says (a SeriesDescription,
a model card's text) only escaped, so that it can neither clear the screen nor forge a line such as
"lunggradcam run: error: ...". Run as a user runs it: a separate process, its real stderr.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from LungGradCAMLib.core.volume import Volume
from LungGradCAMLib.io.dicom_write import write_dicom_series
from LungGradCAMLib.io.volume_files import write_volume

from helpers import REPO

#: A description that tries to clear the screen, set the window title, ring and forge a message.
FORGED = "kernel B\nlunggradcam run: error: forged\x1b[2J\x1b]0;pwned\x07"


def _series(volume: Volume, folder: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the values written on purpose
        return write_dicom_series(volume, folder, **kwargs)


def _lunggradcam(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "LungGradCAMLib.cli", *args], cwd=REPO, capture_output=True, text=True, timeout=600
    )


def _no_control(text: str) -> None:
    assert not [c for c in text if (ord(c) < 32 and c != "\n") or c == "\x7f"], repr(text[-2000:])


def test_a_description_cannot_forge_a_line_or_drive_the_terminal(tmp_path, chest, tiny):
    for n, description in enumerate(("kernel A", FORGED)):  # two CT series: the error lists both
        _series(chest, tmp_path / "in" / f"s{n}", series_description=description)
    done = _lunggradcam(
        "run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", str(tiny), "--device", "cpu"
    )
    assert done.returncode == 2
    err = done.stderr
    _no_control(err)
    lines = err.splitlines()
    assert lines[0].startswith("lunggradcam run: error: ") and "2 CT series" in lines[0], err
    assert all(line.startswith("  ") for line in lines[1:]), err  # no line of the listing reads as a message
    assert "\\nlunggradcam run: error: forged\\x1b[2J" in err


def test_one_note_for_a_resampled_series_and_no_other_librarys_warnings(tmp_path, chest, tiny):
    """A slice missing (resampled: LungGradCAM's note) from a series whose description holds escape
    sequences (pydicom warns once per file, as a log line and as a UserWarning)."""
    files = _series(chest, tmp_path / "in", series_description="kernel \x1b[2J")
    files[14].unlink()
    args = ["run", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", str(tiny), "--device", "cpu"]
    done = _lunggradcam(*args)
    assert done.returncode == 0, done.stderr
    _no_control(done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("lunggradcam run: note: series ") and "resampled" in lines[0], lines
    shutil.rmtree(tmp_path / "out")
    verbose = _lunggradcam("-v", *args)  # with -v the other libraries' warnings are there, one escaped line each
    assert verbose.returncode == 0, verbose.stderr
    _no_control(verbose.stderr)
    assert "pydicom" in verbose.stderr or "UserWarning" in verbose.stderr


def test_values_no_ct_holds_end_in_one_message_without_runtime_warnings(tmp_path, chest, tiny):
    array = chest.array.copy()
    array[0, 0, :10], array[0, 1, :10] = 3e38, -3e38  # finite float32, but float32 arithmetic overflows
    ct = write_volume(chest.with_array(array.astype(np.float32)), tmp_path / "ct.nrrd")
    done = _lunggradcam("run", str(ct), "--out", str(tmp_path / "out"), "--model", str(tiny), "--device", "cpu")
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "not HU" in done.stderr, done.stderr


@pytest.mark.parametrize(
    "field, value",
    [
        ("intended_use", "Research only.\x1b[2J\nlunggradcam run: error: forged"),
        ("class_names", ["background", "nod\x1b[31mule"]),
    ],
)
def test_a_model_cards_text_never_reaches_the_terminal_raw(field, value, tmp_path, chest, tiny):
    model = tmp_path / "hostile.safetensors"
    model.write_bytes(tiny.read_bytes())
    card = json.loads(tiny.with_suffix(".json").read_text())
    card[field] = value
    if field == "class_names":
        card["cam_class"] = value[1]
    model.with_suffix(".json").write_text(json.dumps(card))
    ct = write_volume(chest, tmp_path / "ct.nrrd")
    done = _lunggradcam("run", str(ct), "--out", str(tmp_path / "out"), "--model", str(model), "--device", "cpu")
    _no_control(done.stdout + done.stderr)
    assert "forged" not in done.stdout
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "printable text" in done.stderr, done.stderr
