"""``--dicom-seg`` wherever a DICOM series comes from: a real LIDC-IDRI series through ``batch``
(which hands the loader the series' files, not a folder), a Slicer DICOM database through ``run``;
and a series that cannot give a DICOM SEG is not held against it when the option is left out."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pydicom

from LungGradCAMLib import phantom
from LungGradCAMLib.cli import main

from helpers import data_path, gapped_series_batch, make_ctk_db

SEGMENTATION_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def _summary(out: Path) -> dict:
    with open(out / "summary.csv", newline="") as fh:
        return {row["series_uid"]: row for row in csv.DictReader(fh)}


def _check_seg(folder: Path, source_files) -> None:
    """``folder/segmentation.dcm`` is a DICOM SEG of the report's regions on the source series."""
    report = json.loads((folder / "report.json").read_text())
    assert "segmentation.dcm" in report["files"] and report["regions"]
    seg = pydicom.dcmread(folder / "segmentation.dcm")
    sources = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(f, stop_before_pixels=True) for f in source_files)}
    first = next(iter(sources.values()))
    assert seg.Modality == "SEG" and seg.SOPClassUID == SEGMENTATION_STORAGE
    assert seg.StudyInstanceUID == first.StudyInstanceUID == report["study_instance_uid"]
    assert seg.FrameOfReferenceUID == first.FrameOfReferenceUID
    assert seg.ReferencedSeriesSequence[0].SeriesInstanceUID == report["series_instance_uid"]
    assert len(seg.SegmentSequence) == len(report["regions"])
    referenced = {
        str(f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        for f in seg.PerFrameFunctionalGroupsSequence
    }
    assert referenced and referenced <= set(sources)  # every frame points at one of the CT's slices


def test_batch_dicom_seg_on_a_real_lidc_series(tmp_path, capsys):
    patient = data_path("lidc", "LIDC-IDRI-0002")
    out = tmp_path / "out"
    code = main(["batch", str(patient), "--out", str(out), "--device", "cpu", "--dicom-seg", "--threshold", "0.3"])
    rows = _summary(out)
    assert code == 0 and [r["status"] for r in rows.values()] == ["done"], (rows, capsys.readouterr().err)
    row = next(iter(rows.values()))
    _check_seg(out / row["output"], sorted(patient.rglob("*.dcm")))


def test_run_dicom_seg_from_a_slicer_database(tmp_path, chest, tiny, capsys):
    files = phantom.write_dicom_series(chest, tmp_path / "db" / "dicom")
    db = make_ctk_db(tmp_path / "db", tmp_path / "db" / "dicom")
    out = tmp_path / "out"
    code = main(
        ["run", str(db), "--out", str(out), "--model", str(tiny), "--device", "cpu", "--dicom-seg", "--threshold", "0"]
    )
    assert code == 0, capsys.readouterr().err
    _check_seg(out, files)


def test_a_series_that_cannot_give_a_dicom_seg_is_done_without_the_option(tmp_path, chest, tiny, capsys):
    """A slice missing from the middle: the loader fills the gap, so no DICOM SEG can reference
    the slices. That is a failure of --dicom-seg on this series, not of the series: a later batch
    without the option does it (it used to be skipped as a data error for good)."""
    out, args = gapped_series_batch(tmp_path, chest, tiny)
    assert main(args + ["--dicom-seg"]) == 1
    (row,) = _summary(out).values()
    assert row["status"] == "failed" and "resampled" in row["error"], row
    error = out / row["output"] / "error.json"
    recorded = error.stat().st_mtime_ns
    assert main(args + ["--dicom-seg"]) == 1  # the same options: the recorded failure stands, not redone
    assert error.stat().st_mtime_ns == recorded
    assert main(args) == 0
    (row,) = _summary(out).values()
    assert row["status"] == "done", row
    report = json.loads((out / row["output"] / "report.json").read_text())
    assert "segmentation.dcm" not in report["files"] and np.isclose(report["threshold"], 0.0)
