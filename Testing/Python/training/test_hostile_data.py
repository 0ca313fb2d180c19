"""Hostile and broken tables: training data from CSV files, and the CSV and JSON a batch or a
training run writes.

A ``nodules.csv`` or manifest row that is short, holds a word where a number belongs, a value no
nodule or scan can have, or an ID that climbs out of ``--path`` is refused with the file and line
(``DataError``; the CLI: one message, exit 2). ``summary.csv`` cells that a spreadsheet would run
as a formula are written as text; ``train``'s ``report.json`` is strict JSON.
"""

from __future__ import annotations

import csv
import json
import re
import warnings
from pathlib import Path

import numpy as np
import pytest

from LungGradCAMLib.cli import main
from LungGradCAMLib.core.errors import DataError
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.io.dicom_write import write_dicom_series
from LungGradCAMLib.io.volume_files import write_volume
from LungGradCAMLib.training import data, lidc

from helpers import write_voi_folder


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in what should be strict JSON"))


# --------------------------------------------------------------------------------------------
# nodules.csv of a LIDC VOI folder
# --------------------------------------------------------------------------------------------
def _edit_row(root: Path, change) -> None:
    """Apply ``change(row)`` to the second data row (line 3) of ``root/nodules.csv``."""
    with open(root / "nodules.csv", newline="") as f:
        rows = list(csv.reader(f))
    rows[2] = change(rows[2])
    with open(root / "nodules.csv", "w", newline="") as f:
        csv.writer(f).writerows(rows)


def _cell(column: int, value: str):
    return lambda row: row[:column] + [value] + row[column + 1 :]


def _outside(root: Path, patient: str) -> str:
    """A VOI pair outside the folder, where ``patient`` as an ID would lead (so a read would succeed)."""
    target = (root / "image" / f"{patient}_R_1.nii.gz").resolve()
    for folder in (target.parent, (root / "nodule_mask" / f"{patient}_R_1.nii.gz").resolve().parent):
        folder.mkdir(parents=True, exist_ok=True)
        write_volume(Volume(np.ones((4, 8, 8), np.int16), axis_aligned_matrix((1, 1, 1))), folder / target.name)
    return patient


NODULES = {  # columns: patient_id, nodule_id, Diagnosis, diameter_mm, Malignancy_value
    "short_row": (lambda root: lambda row: row[:2], "3 cell|2 cell"),
    "rating_a_word": (lambda root: _cell(4, "abc"), "Malignancy_value must be a number"),
    "rating_infinite": (lambda root: _cell(4, "inf"), "Malignancy_value must be a number from 1 to 5"),
    "rating_out_of_scale": (lambda root: _cell(4, "9"), "Malignancy_value must be a number from 1 to 5"),
    "diameter_negative": (lambda root: _cell(3, "-5"), "diameter_mm must be a number from"),
    "diameter_1e308": (lambda root: _cell(3, "1e308"), "diameter_mm must be a number from"),
    "patient_climbs_out": (lambda root: _cell(0, _outside(root, "../../escaped")), "not a plain name"),
    "patient_absolute": (lambda root: _cell(0, _outside(root, str(root.parent / "abs" / "x"))), "not a plain name"),
}


@pytest.mark.parametrize("name", list(NODULES))
def test_nodules_csv_rows_that_cannot_be_true_are_refused_with_their_line(name, tmp_path, capsys):
    root = tmp_path / "vois"
    write_voi_folder(root, [("P1", 1, "Benign", 3), ("P2", 1, "Malign", 5), ("P3", 1, "Benign", 4)])
    make, text = NODULES[name]
    _edit_row(root, make(root))
    with pytest.raises(DataError) as err:
        lidc.lidc_voi_records(root)
    assert re.search(text, str(err.value)) and "nodules.csv line 3" in str(err.value), str(err.value)
    code = main(
        [
            "train",
            "--source",
            "lidc-vois",
            "--path",
            str(root),
            "--out",
            str(tmp_path / "out"),
            "--epochs",
            "1",
            "--no-progress",
        ]
    )
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "nodules.csv line 3" in lines[0], lines
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# manifests and LUNA16 tables
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "rows, text",
    [
        (["ct.nrrd,nodule,1,2,3", "ct.nrrd"], "line 3: 1 cell"),  # a short row
        (["ct.nrrd,nodule,1e300,2,3"], "line 2: x, y, z must be numbers from"),  # 1e300 mm away
        (["ct.nrrd,nodule,1,2,3,surplus"], "line 2: 6 cell"),  # a long row
    ],
)
def test_manifest_rows_that_cannot_be_true_are_refused_with_their_line(rows, text, tmp_path):
    (tmp_path / "m.csv").write_text("\n".join(["image,label,x,y,z", *rows]) + "\n")
    with pytest.raises(DataError, match=re.escape(text)):
        data.manifest_samples(tmp_path / "m.csv", ["background", "nodule"])


def test_luna16_points_1e300_mm_away_are_refused(tmp_path):
    (tmp_path / "subset0").mkdir()
    scan = Volume(np.zeros((4, 8, 8), np.int16), axis_aligned_matrix((1, 1, 1)))
    write_volume(scan, tmp_path / "subset0" / "1.2.3.mha")
    (tmp_path / "subset0" / "1.2.3.mhd").write_text("")  # the scan's name is what the table matches
    (tmp_path / "annotations.csv").write_text("seriesuid,coordX,coordY,coordZ,diameter_mm\n1.2.3,1e300,0,0,5\n")
    with pytest.raises(DataError, match="annotations.csv line 2: coordX, coordY, coordZ must be numbers from"):
        data.luna16_samples(tmp_path)


# --------------------------------------------------------------------------------------------
# what LungGradCAM writes: summary.csv, train's report.json
# --------------------------------------------------------------------------------------------
FORMULAS = [
    '=HYPERLINK("http://attacker.example/","open me")',
    "@SUM(1+1)*cmd|' /C calc'!A0",
    "-2+3+cmd|' /C calc'!A0",
    "+1+cmd|' /C calc'!A0",
]


def test_summary_cells_a_spreadsheet_would_run_are_written_as_text(tmp_path, tiny, capsys):
    """Series whose UIDs are formulas (a hostile file can hold any text there; one slice each, so
    they fail fast and are listed as failed)."""
    for n, uid in enumerate(FORMULAS):
        hu = np.random.default_rng(n).integers(-1000, 1000, (1, 8, 8)).astype(np.float32)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            write_dicom_series(Volume(hu, axis_aligned_matrix((1, 1, 2))), tmp_path / "in" / f"s{n}", series_uid=uid)
    assert (
        main(["batch", str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--model", str(tiny), "--device", "cpu"])
        == 1
    )
    with open(tmp_path / "out" / "summary.csv", newline="") as f:
        cells = [cell for row in csv.reader(f) for cell in row]
    assert not [c for c in cells if c[:1] in ("=", "+", "-", "@")], cells  # none starts a formula
    assert {"'" + uid for uid in FORMULAS} <= set(cells)  # the UIDs as text (a folder name may be one too)


def test_spreadsheet_cell_keeps_numbers_and_plain_text():
    from LungGradCAMLib.pipeline.batch import spreadsheet_cell

    kept = ["-0.5", "+3", "1e-3", 12, "done", ""]
    assert [spreadsheet_cell(v) for v in kept] == kept
    assert [spreadsheet_cell(v) for v in ("=1+1", "-1+1", "@A1", "\t=1")] == ["'=1+1", "'-1+1", "'@A1", "'\t=1"]


def test_train_writes_strict_json_where_a_metric_is_undefined(tmp_path, capsys):
    """An untrained model that calls no patch a nodule: its precision (0/0) is undefined."""
    from helpers import TRAIN_ARGS, spheres_patches

    cache = spheres_patches().save(tmp_path / "spheres.npz")
    out = tmp_path / "train"
    assert (
        main(
            [
                "train",
                *TRAIN_ARGS,
                "--path",
                str(cache),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--lr",
                "1e-9",
                "--seed",
                "1",
            ]
        )
        == 0
    )
    report = _strict((out / "report.json").read_text())
    assert report["metrics"]["precision"]["value"] is None  # undefined, written as null
    for line in (out / "log.jsonl").read_text().splitlines() + capsys.readouterr().out.splitlines():
        _strict(line)
