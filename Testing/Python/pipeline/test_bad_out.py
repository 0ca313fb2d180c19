"""The output folder of a run: never the input, never another's files, owned by one run, whole or
untouched (after a rerun, a second run into it, SIGTERM and SIGKILL)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, List

import pytest

from LungGradCAMLib import phantom
from LungGradCAMLib.core.atomic import raise_when_allowed, signals_held
from LungGradCAMLib.core.volume import Volume
from LungGradCAMLib.io.volume_files import write_volume

from bad_inputs import run_cli
from helpers import REPO
from helpers import snapshot as _snapshot


def _complete(out: Path) -> dict:
    """``out`` holds exactly the files its report lists, the report and the marker, nothing else; the report."""
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert {p.name for p in out.iterdir()} == set(report["files"]) | {"report.json", ".lunggradcam.json"}
    return report


def _ct_named_like_an_output(tmp: Path, chest: Volume):
    return write_volume(chest, tmp / "out" / "cam.nrrd"), tmp / "out", "holds the input"


def _out_is_the_dicom_folder(tmp: Path, chest: Volume):
    phantom.write_dicom_series(chest, tmp / "dicom")
    return tmp / "dicom", tmp / "dicom", "is the input"


def _out_links_to_the_inputs_folder(tmp: Path, chest: Volume):
    ct = write_volume(chest, tmp / "data" / "ct.nrrd")
    os.symlink(tmp / "data", tmp / "out")
    return ct, tmp / "out", "holds the input"


def _input_links_into_out(tmp: Path, chest: Volume):
    write_volume(chest, tmp / "out" / "scan.nrrd")
    os.symlink(tmp / "out" / "scan.nrrd", tmp / "ct.nrrd")
    return tmp / "ct.nrrd", tmp / "out", "holds the input"


def _foreign_file_in_out(tmp: Path, chest: Volume):
    (tmp / "out").mkdir()
    (tmp / "out" / "overlay.png").write_bytes(b"the user's own picture")
    return write_volume(chest, tmp / "ct.nrrd"), tmp / "out", "1 file\\(s\\) that no LungGradCAM run wrote"


OUT_CASES = {
    "ct_named_like_an_output": _ct_named_like_an_output,
    "out_is_the_dicom_folder": _out_is_the_dicom_folder,
    "out_links_to_the_inputs_folder": _out_links_to_the_inputs_folder,
    "input_links_into_out": _input_links_into_out,
    "foreign_file_in_out": _foreign_file_in_out,
}


@pytest.mark.parametrize(
    "name, command",
    [(name, "run") for name in OUT_CASES]
    + [(name, "batch") for name in ("out_is_the_dicom_folder", "out_links_to_the_inputs_folder")],
)  # batches read folders
def test_out_never_is_nor_holds_the_input_nor_replaces_anothers_file(name, command, tmp_path, chest, tiny, capsys):
    ct, out, text = OUT_CASES[name](tmp_path, chest)
    before = _snapshot(tmp_path)
    assert run_cli(ct, out, tiny, command=command) == 2
    err = capsys.readouterr().err
    assert re.search(text, err) and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before  # nothing written, nothing replaced


def test_rerun_replaces_the_previous_outputs_whole(tmp_path, chest, tiny, capsys):
    phantom.write_dicom_series(chest, tmp_path / "dicom")
    out = tmp_path / "out"
    assert run_cli(tmp_path / "dicom", out, tiny, "--dicom-seg", "--threshold", "0") == 0
    assert "segmentation.dcm" in _complete(out)["files"]
    assert run_cli(tmp_path / "dicom", out, tiny, "--threshold", "0.9") == 0
    report = _complete(out)  # the first run's DICOM SEG went with it
    assert "segmentation.dcm" not in report["files"] and report["threshold"] == 0.9
    second = _snapshot(out)
    # a run that fails while writing (a DICOM SEG needs a DICOM input) leaves the folder as it was
    assert run_cli(write_volume(chest, tmp_path / "ct.nrrd"), out, tiny, "--dicom-seg", "--threshold", "0") == 2
    assert "DICOM" in capsys.readouterr().err
    assert _snapshot(out) == second


def _start(ct: Path, out: Path, model: Path) -> subprocess.Popen:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "LungGradCAMLib.cli",
            "run",
            str(ct),
            "--out",
            str(out),
            "--model",
            str(model),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first."""
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)


def _temporaries(out: Path) -> List[Path]:
    return [p for p in out.rglob("*") if p.name.startswith(".tmp-")] if out.is_dir() else []


def test_a_second_run_into_a_busy_out_is_refused(tmp_path, chest, tiny, capsys):
    ct, out = write_volume(chest, tmp_path / "ct.nrrd"), tmp_path / "out"
    first = _start(ct, out, tiny)
    try:
        _wait_for(lambda: (out / ".lunggradcam-work").exists(), first, "it owned --out")  # made once locked
        first.send_signal(signal.SIGSTOP)  # hold it there, owning the folder
        assert run_cli(ct, out, tiny) == 2
        assert "another run is writing into this folder" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert _complete(out)["input"] == str(ct) and not (out / ".lunggradcam.lock").exists()


@pytest.mark.slow
def test_sigterm_and_sigkill_leave_no_temporaries(tmp_path, chest, tiny):
    ct, out = write_volume(chest, tmp_path / "ct.nrrd"), tmp_path / "out"
    # SIGTERM while the run has temporaries: it removes them and says so
    proc = _start(ct, out, tiny)
    _wait_for(lambda: bool(_temporaries(out)), proc, "it wrote a temporary")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    err = proc.stderr.read()
    assert "terminated" in err and "Traceback" not in err, err
    assert not _temporaries(out) and not (out / ".lunggradcam.lock").exists()
    # SIGKILL cannot be caught: the next run into the folder removes what it left
    proc = _start(ct, out, tiny)
    _wait_for(lambda: bool(_temporaries(out)), proc, "it wrote a temporary")
    proc.kill()
    proc.wait(timeout=120)
    assert _temporaries(out)
    assert run_cli(ct, out, tiny) == 0
    assert not _temporaries(out) and not (out / ".lunggradcam.lock").exists()
    _complete(out)


def test_a_signal_while_writers_start_is_raised_once_they_all_run():
    """A SIGTERM that interrupted ``Thread.start`` left a writer the pool never joined, writing
    into the work folder after the run had cleaned it up (the next run then refused the folder):
    inside ``signals_held`` the handler's exception waits for the end of the block."""

    class Stop(BaseException):
        pass

    reached = False
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: raise_when_allowed(Stop))
    try:
        with pytest.raises(Stop):
            with signals_held():
                os.kill(os.getpid(), signal.SIGUSR1)
                time.sleep(0.05)  # the handler runs here, and defers its exception
                reached = True
        assert reached
        with pytest.raises(Stop):  # outside a block: at once
            os.kill(os.getpid(), signal.SIGUSR1)
            time.sleep(0.05)
    finally:
        signal.signal(signal.SIGUSR1, previous)
