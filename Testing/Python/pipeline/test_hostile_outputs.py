"""Hostile and unlucky output folders. A run deletes, moves aside or replaces only what LungGradCAM
provably wrote there: what its marker (``.lunggradcam.json``) names, byte for byte, under one of
its own output names; never a file because another tool's ``report.json`` lists it, nor because its
name starts with ``.tmp-``. A run never writes among its input, and one that fails leaves the
folder as it was, also when it fails while moving its files in.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Callable

import pytest

from LungGradCAMLib import phantom
from LungGradCAMLib.cli import main
from LungGradCAMLib.core.errors import OutputError
from LungGradCAMLib.core.volume import Volume
from LungGradCAMLib.io.volume_files import write_volume
from LungGradCAMLib.options import ExplainOptions
from LungGradCAMLib.pipeline import run_one

from helpers import make_ctk_db, snapshot

MARKER = ".lunggradcam.json"


@pytest.fixture(scope="module")
def dicom(tmp_path_factory, chest) -> Path:
    folder = tmp_path_factory.mktemp("dicom") / "series"
    phantom.write_dicom_series(chest, folder)
    return folder


def _cli(capsys, command: str, source: Path, out: Path, model: Path, *extra: str):
    code = main([command, str(source), "--out", str(out), "--model", str(model), "--device", "cpu", *extra])
    captured = capsys.readouterr()
    return code, captured.err


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# what is LungGradCAM's in --out: only what its marker proves
# --------------------------------------------------------------------------------------------
def _others_report(out: Path, run: Callable[[], None]) -> str:
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"four years of work")
    (out / "report.json").write_text(json.dumps({"files": ["thesis.docx", "report.json"]}))
    return "thesis.docx"


def _tmp_prefixed(out: Path, run: Callable[[], None]) -> str:
    (out / ".tmp-drafts").mkdir(parents=True)
    (out / ".tmp-drafts" / "chapter1.txt").write_text("a person's notes")
    (out / ".tmp-notes.txt").write_text("a person's notes")
    return ".tmp-drafts"


def _forged_marker(out: Path, run: Callable[[], None]) -> str:
    out.mkdir()
    (out / "thesis.docx").write_bytes(b"four years of work")
    (out / MARKER).write_text(
        json.dumps(
            {
                "lunggradcam": "LungGradCAM output folder",
                "run": "0" * 32,
                "files": {"thesis.docx": _sha(b"four years of work")},
            }
        )
    )
    return "thesis.docx"


def _users_lock_file(out: Path, run: Callable[[], None]) -> str:
    out.mkdir()
    (out / ".lunggradcam.lock").write_text("not empty: not a lock a run made")
    return ".lunggradcam.lock"


def _others_error_json(out: Path, run: Callable[[], None]) -> str:
    out.mkdir()
    (out / "error.json").write_text('{"error": "another tool\'s log"}')
    return "error.json"


def _output_edited_by_hand(out: Path, run: Callable[[], None]) -> str:
    run()
    (out / "overlay.png").write_bytes(b"the picture with the user's annotations")
    return "overlay.png"


def _output_now_a_folder(out: Path, run: Callable[[], None]) -> str:
    run()  # an earlier output's name is now a folder of the user's
    (out / "cam.nrrd").unlink()
    (out / "cam.nrrd").mkdir()
    (out / "cam.nrrd" / "mine.txt").write_text("kept")
    return "cam.nrrd"


def _output_replaced_by_a_link(out: Path, run: Callable[[], None]) -> str:
    run()
    (out.parent / "elsewhere.png").write_bytes(b"a file outside --out")
    (out / "overlay.png").unlink()
    (out / "overlay.png").symlink_to(out.parent / "elsewhere.png")
    return "overlay.png"


FOREIGN = {
    "another_tools_report_lists_a_users_file": _others_report,
    "tmp_prefixed_files_of_a_user": _tmp_prefixed,
    "forged_marker_names_a_users_file": _forged_marker,
    "users_file_named_like_the_lock": _users_lock_file,
    "another_tools_error_json": _others_error_json,
    "earlier_output_edited_by_hand": _output_edited_by_hand,
    "earlier_output_now_a_folder": _output_now_a_folder,
    "earlier_output_now_a_link": _output_replaced_by_a_link,
}


@pytest.mark.parametrize("name", list(FOREIGN))
def test_run_never_touches_what_it_cannot_prove_it_wrote(name, tmp_path, chest, tiny, capsys):
    ct, out = write_volume(chest, tmp_path / "ct.nrrd"), tmp_path / "out"
    users = FOREIGN[name](out, lambda: _cli(capsys, "run", ct, out, tiny))
    before = snapshot(tmp_path)
    code, err = _cli(capsys, "run", ct, out, tiny)
    assert code == 2 and "no LungGradCAM run wrote" in err and users in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before  # nothing deleted, replaced or added


def test_batch_leaves_a_users_files_in_its_folder_alone(tmp_path, dicom, tiny, capsys):
    """A batch's folder may hold other files (each series has a folder of its own): they stay,
    whatever their names; a summary.csv the batch did not write stops it before any work."""
    out = tmp_path / "out"
    _tmp_prefixed(out, lambda: None)
    (out / "notes.txt").write_text("the user's")
    users = {k: v for k, v in snapshot(out).items()}
    assert _cli(capsys, "batch", dicom.parent, out, tiny)[0] == 0
    assert {k: v for k, v in snapshot(out).items() if k in users} == users
    (out / "summary.csv").write_text("the user's own table")
    before = snapshot(tmp_path)
    code, err = _cli(capsys, "batch", dicom.parent, out, tiny, "--threshold", "0.3")
    assert code == 2 and "summary.csv" in err and "no LungGradCAM run wrote" in err, err
    assert snapshot(tmp_path) == before


def test_rerun_replaces_its_own_outputs_and_clears_what_a_killed_run_left(tmp_path, dicom, tiny, capsys):
    out = tmp_path / "out"
    assert _cli(capsys, "run", dicom, out, tiny, "--dicom-seg", "--threshold", "0")[0] == 0
    marker = json.loads((out / MARKER).read_text())
    assert sorted(marker["files"]) == sorted(json.loads((out / "report.json").read_text())["files"])
    assert all(_sha((out / n).read_bytes()) == h for n, h in marker["files"].items())
    # as a run killed while writing leaves it: its work folder, which the marker vouches for
    (out / ".lunggradcam-work" / "new").mkdir(parents=True)
    (out / ".lunggradcam-work" / "new" / "cam.nrrd").write_bytes(b"half written")
    (out / ".lunggradcam.lock").touch()
    assert _cli(capsys, "run", dicom, out, tiny, "--threshold", "0.9")[0] == 0
    report = json.loads((out / "report.json").read_text())
    assert "segmentation.dcm" not in report["files"] and report["threshold"] == 0.9
    assert sorted(p.name for p in out.iterdir()) == sorted([*report["files"], MARKER])


# --------------------------------------------------------------------------------------------
# a failed run leaves the folder as it was, also when it fails while moving its files in
# --------------------------------------------------------------------------------------------
def _at_the_end_of_writing(action: Callable[[], None]):
    """A run's progress callback that runs ``action`` when its files are written, before they move in."""

    def progress(stage: str, done: int, total: int) -> None:
        if stage == "write" and done == total:
            action()

    return progress


def _user_folder_appears(out: Path) -> str:
    (out / "segmentation.dcm").mkdir()  # a new output's name, taken while the run works
    (out / "segmentation.dcm" / "mine.txt").write_text("kept")
    return "segmentation.dcm"


def _output_replaced_meanwhile(out: Path) -> str:
    (out / "overlay.png").write_bytes(b"the user's picture, saved over the old overlay")
    return "overlay.png"


def _under(entries: dict, name: str) -> dict:
    return {k: v for k, v in entries.items() if k == name or k.startswith(name + "/")}


@pytest.mark.parametrize("meanwhile", [_user_folder_appears, _output_replaced_meanwhile])
def test_a_run_failing_as_it_moves_its_files_in_puts_everything_back(meanwhile, tmp_path, dicom, tiny):
    out = tmp_path / "out"
    run_one(dicom, out, ExplainOptions(model=str(tiny), device="cpu", threshold=0.3))
    before = snapshot(out)
    users: dict = {}

    def change() -> None:
        name = meanwhile(out)
        users.update(name=name, entries=_under(snapshot(out), name))

    with pytest.raises(OutputError, match="no LungGradCAM run wrote|changed while the run was working"):
        run_one(
            dicom,
            out,
            ExplainOptions(model=str(tiny), device="cpu", threshold=0.0),
            dicom_seg=True,
            progress=_at_the_end_of_writing(change),
        )
    after = snapshot(out)
    assert _under(after, users["name"]) == users["entries"]  # the user's change stays as the user made it
    rest = {k: v for k, v in after.items() if k not in users["entries"]}
    # every old output back in place, byte for byte, and its marker; no new output, no work folder
    assert rest == {k: v for k, v in before.items() if k != users["name"]}


# --------------------------------------------------------------------------------------------
# never among the input
# --------------------------------------------------------------------------------------------
def _inside_dicom(root: Path, dicom: Path, chest: Volume):
    src = root / "series"
    shutil.copytree(dicom, src)
    return src, src / "out"


def _deep_inside_dicom(root: Path, dicom: Path, chest: Volume):
    src = root / "series"
    shutil.copytree(dicom, src)
    return src, src / "a" / "b" / "out"


def _inside_the_databases_folder(root: Path, dicom: Path, chest: Volume):
    shutil.copytree(dicom, root / "db" / "dicom")
    db = make_ctk_db(root / "db", root / "db" / "dicom")
    return db, root / "db" / "results"


INSIDE = {
    "out_inside_the_dicom_folder": _inside_dicom,
    "out_deep_inside_the_dicom_folder": _deep_inside_dicom,
    "out_beside_the_database_file": _inside_the_databases_folder,
}


@pytest.mark.parametrize("name, command", [(n, "run") for n in INSIDE] + [(n, "batch") for n in INSIDE])
def test_out_inside_the_input_is_refused(name, command, tmp_path, dicom, chest, tiny, capsys):
    src, out = INSIDE[name](tmp_path / "in", dicom, chest)
    before = snapshot(tmp_path)
    code, err = _cli(capsys, command, src, out, tiny)
    assert code == 2 and "is inside the input" in err and "Traceback" not in err, err
    assert snapshot(tmp_path) == before
