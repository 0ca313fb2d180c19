"""A FIFO, a device or /dev/stdin where a file is expected: refused at once, never opened to read."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from LungGradCAMLib.cli import main
from LungGradCAMLib.core.errors import DicomDecodeError, InvalidInputError, VolumeError
from LungGradCAMLib.io.ctkdb import DicomDatabase
from LungGradCAMLib.io.inputs import load_input
from LungGradCAMLib.io.volume_files import read_volume

from bad_inputs import NRRD_HEADER, Case, Made, dicom_series, uid_of, within
from helpers import REPO, make_database


def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _fifo_ct(root: Path) -> Made:
    path = _fifo(root / "ct.nrrd")
    return Made(path, lambda: read_volume(path), [str(path), "named pipe"])


def _fifo_ct_without_suffix(root: Path) -> Made:
    path = _fifo(root / "ct")
    return Made(path, lambda: load_input(path), [str(path), "named pipe"])


def _fifo_data_file(root: Path) -> Made:
    _fifo(root / "data.raw")
    path = root / "ct.nhdr"
    header = NRRD_HEADER.format(dim=3, sizes="16 16 4", dirs="(1,0,0) (0,1,0) (0,0,1)", origin="0,0,0")
    path.write_text(header.rstrip("\n") + "\ndata file: data.raw\n\n")
    return Made(path, lambda: read_volume(path), [str(path), "data.raw", "named pipe"])


def _database_file_is_fifo(root: Path) -> Made:
    files = dicom_series(root / "dicom")
    make_database(root, files)
    files[2].unlink()
    _fifo(files[2])
    uid = uid_of(files[0])
    return Made(root, lambda: DicomDatabase(root).load(uid), [str(files[2]), "named pipe"])


SPECIAL = {
    "fifo_as_the_ct": Case(_fifo_ct, VolumeError, "named pipe"),
    "fifo_as_the_ct_without_suffix": Case(_fifo_ct_without_suffix, InvalidInputError, "named pipe"),
    "fifo_as_detached_data": Case(_fifo_data_file, VolumeError, "named pipe"),
    "fifo_in_the_dicom_database": Case(_database_file_is_fifo, DicomDecodeError, "not a regular file"),
}


@pytest.mark.parametrize("name", list(SPECIAL))
def test_special_files_are_refused_without_blocking(name, tmp_path, capsys, tiny):
    case = SPECIAL[name]
    made = case.make(tmp_path / "in")
    with pytest.raises(case.error, match=case.text) as err:
        within(60, made.call, tmp_path)
    for text in made.names:
        assert text in str(err.value)
    out = tmp_path / "out"
    code = within(
        60, lambda: main(["run", str(made.input), "--out", str(out), "--model", str(tiny), "--device", "cpu"]), tmp_path
    )
    cli_err = capsys.readouterr().err
    assert code == 2 and all(text in cli_err for text in made.names), cli_err
    assert not out.exists()


def test_dev_stdin_as_the_ct_is_refused(tmp_path, tiny):
    """stdin a pipe that nobody writes to: reading it would wait forever."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "LungGradCAMLib.cli",
            "run",
            "/dev/stdin",
            "--out",
            str(tmp_path / "out"),
            "--model",
            str(tiny),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        stdin=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "/dev/stdin is a named pipe" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()
