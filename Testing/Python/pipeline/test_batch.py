"""`lunggradcam batch`: a cohort, failures recorded, resumable, SIGKILL-safe, sharded under torchrun."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import LungGradCAMLib as lgc
from LungGradCAMLib import phantom, pipeline
from LungGradCAMLib.cli import main
from LungGradCAMLib.io.inputs import load_input

from helpers import REPO, make_tiny_model, small_chest


def _tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in folder.rglob("*") if p.is_file()):
        h.update(str(f.relative_to(folder)).encode())
        h.update(f.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three small phantom CT series and one broken series (a single slice) in one DICOM tree."""
    root = tmp_path_factory.mktemp("cohort")
    tree = root / "dicom"
    uids = []
    for seed in (1, 2, 3):
        ph = small_chest(seed)
        files = phantom.write_dicom_series(ph.volume, tree / f"patient{seed}", patient_id=f"LIDC-IDRI-000{seed}")
        uids.append(load_input(files[0].parent).meta["series_uid"])
    broken = small_chest(4)
    files = phantom.write_dicom_series(broken.volume, root / "tmp-broken")
    (tree / "broken").mkdir()
    files[0].rename(tree / "broken" / "only-slice.dcm")
    model = make_tiny_model(root, patch=(16, 16, 16), spacing=(6.0, 6.0, 6.0))
    return tree, sorted(uids), model


def _summary(out: Path):
    with open(out / "summary.csv", newline="") as fh:
        return {row["series_uid"]: row for row in csv.DictReader(fh)}


def test_batch_records_failures_and_resumes(cohort, tmp_path, capsys):
    tree, uids, model = cohort
    before = _tree_hash(tree)
    out = tmp_path / "out"
    code = main(["batch", str(tree), "--out", str(out), "--model", str(model), "--device", "cpu"])
    assert code == 1  # one series failed, the others went on
    rows = _summary(out)
    assert len(rows) == 4
    done = [u for u, r in rows.items() if r["status"] == "done"]
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert sorted(done) == uids
    assert len(failed) == 1 and "single slice" in failed[0]["error"]
    for uid in uids:  # folders are named by series UID, and complete
        folder = out / pipeline.safe_name(uid)
        assert {"cam.nrrd", "segmentation.seg.nrrd", "report.json", "overlay.png"} <= {p.name for p in folder.iterdir()}
    assert "1 failed" in capsys.readouterr().out
    assert _tree_hash(tree) == before  # inputs untouched

    # resume: finished series are skipped (their files are not rewritten)
    stamp = {uid: (out / pipeline.safe_name(uid) / "report.json").stat().st_mtime_ns for uid in uids}
    unfinished = out / pipeline.safe_name(uids[1])  # as a run killed while moving its files in leaves it:
    work = unfinished / ".lunggradcam-work"  # the old outputs moved aside, report first; the new ones not yet in
    (work / "old").mkdir(parents=True)
    (work / "new").mkdir()
    for f in [f for f in unfinished.iterdir() if not f.name.startswith(".lunggradcam")]:
        f.rename(work / "old" / f.name)
    (work / "new" / "cam.nrrd").write_bytes(b"half written")
    capsys.readouterr()
    main(["batch", str(tree), "--out", str(out), "--model", str(model), "--device", "cpu"])
    printed = capsys.readouterr().out  # what was skipped, and why
    assert "  2 series skipped: already done with the same options and model" in printed
    assert (
        "  1 series skipped: failed before with the same options for a reason of its own data "
        "(--redo-failed retries it)" in printed
    )
    assert not work.exists()
    for i, uid in enumerate(uids):
        now = (out / pipeline.safe_name(uid) / "report.json").stat().st_mtime_ns
        assert (now == stamp[uid]) == (i != 1)
    assert [r["status"] for r in _summary(out).values()].count("done") == 3


@pytest.mark.slow
def test_batch_survives_sigkill(cohort, tmp_path):
    """Kill `lunggradcam batch` with SIGKILL mid-run, start it again: the cohort finishes whole."""
    tree, uids, model = cohort
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "LungGradCAMLib.cli",
        "batch",
        str(tree),
        "--out",
        str(out),
        "--model",
        str(model),
        "--device",
        "cpu",
    ]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # wait until the first series is finished: the next one is being read or explained
    while time.time() < deadline and proc.poll() is None and not list(out.glob("*/report.json")):
        time.sleep(0.01)
    assert proc.poll() is None, f"the batch ended (status {proc.returncode}) before it could be killed mid-run"
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    again = subprocess.run(
        cmd, cwd=REPO, check=False, timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    rows = _summary(out)
    assert sorted(u for u, r in rows.items() if r["status"] == "done") == uids
    assert again.returncode == (1 if any(r["status"] == "failed" for r in rows.values()) else 0)
    for uid in uids:  # every output file is complete and readable
        folder = out / pipeline.safe_name(uid)
        assert lgc.read_volume(folder / "cam.nrrd").shape == (28, 64, 64)
        assert not list(folder.glob(".tmp-*"))


@pytest.mark.slow
def test_batch_torchrun_two_processes(cohort, tmp_path):
    tree, uids, model = cohort
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            "-m",
            "LungGradCAMLib.cli",
            "batch",
            str(tree),
            "--out",
            str(out),
            "--model",
            str(model),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    rows = _summary(out)  # rank 0 merged every rank's series
    assert sorted(u for u, r in rows.items() if r["status"] == "done") == uids, result.stderr[-2000:]
    assert [r["status"] for r in rows.values()].count("failed") == 1


def _uid_of(folder: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(next(folder.iterdir()), stop_before_pixels=True).SeriesInstanceUID)


def test_batch_goes_on_past_unreadable_files(cohort, tmp_path, caplog):
    """A file nobody can open (a link to itself) beside a series fails that series only, naming
    it; one in a folder of its own is reported; the other series are done."""
    tree, _, model = cohort
    mine = tmp_path / "tree"
    for name in ("patient1", "patient2"):
        shutil.copytree(tree / name, mine / name)
    os.symlink("IMG-loop.dcm", mine / "patient1" / "IMG-loop.dcm")
    (mine / "stray").mkdir()
    os.symlink("loop.dcm", mine / "stray" / "loop.dcm")
    out = tmp_path / "out"
    assert main(["batch", str(mine), "--out", str(out), "--model", str(model), "--device", "cpu"]) == 1
    rows = _summary(out)
    first, second = _uid_of(mine / "patient1"), _uid_of(mine / "patient2")
    assert set(rows) == {first, second}
    assert rows[first]["status"] == "failed" and "IMG-loop.dcm: cannot read the file" in rows[first]["error"]
    assert rows[second]["status"] == "done"
    assert "stray/loop.dcm: cannot read the file" in caplog.text


def test_batch_records_no_failure_that_is_the_runs_own(cohort, tmp_path, capsys, monkeypatch):
    """A wrong model, device, method or threshold stops the batch before its first series and
    records nothing; a series that ran out of memory is recorded to be retried: the corrected run
    does them all, without --redo-failed."""
    tree, uids, model = cohort
    out = tmp_path / "out"
    good = {"--model": str(model), "--device": "cpu"}
    for bad in (
        {"--model": str(tmp_path / "missing.safetensors")},
        {"--device": "meta"},
        {"--method": "nope"},
        {"--threshold": "2"},
    ):
        options = [v for item in {**good, **bad}.items() for v in item]
        assert main(["batch", str(tree), "--out", str(out), *options]) == 2, bad
        assert "error:" in capsys.readouterr().err and not list(out.rglob("*.json")), bad
    monkeypatch.setenv("LUNGGRADCAM_MAX_BYTES", "1000")  # no series fits: the machine's fault, not theirs
    assert main(["batch", str(tree), "--out", str(out), *[v for item in good.items() for v in item]]) == 1
    rows = _summary(out)
    assert all(rows[uid]["status"] == "failed" and "LUNGGRADCAM_MAX_BYTES" in rows[uid]["error"] for uid in uids)
    monkeypatch.delenv("LUNGGRADCAM_MAX_BYTES")
    assert main(["batch", str(tree), "--out", str(out), *[v for item in good.items() for v in item]]) == 1
    rows = _summary(out)
    assert sorted(u for u, r in rows.items() if r["status"] == "done") == uids
    assert [r["error"] for r in rows.values() if r["status"] == "failed"] == [
        next(r["error"] for r in rows.values() if "single slice" in r["error"])
    ]


def test_prefetched_reads_the_next_series_while_this_one_is_used():
    """pipeline.prefetched: load n + 1 runs (in a background thread) while future n is used; a
    load's error comes out of its own future and the rest go on."""
    import threading

    started = [threading.Event() for _ in range(4)]

    def load(n: int) -> int:
        started[n].set()
        if n == 2:
            raise lgc.LungGradCAMError("series 2 is broken")
        return n

    seen = []
    for n, future in enumerate(pipeline.prefetched([lambda n=n: load(n) for n in range(4)])):
        if n + 1 < 4:  # the consumer still holds series n: without prefetching this would time out
            assert started[n + 1].wait(timeout=30)
        try:
            seen.append(future.result())
        except lgc.LungGradCAMError as exc:
            seen.append(str(exc))
    assert seen == [0, 1, "series 2 is broken", 3]
    assert list(pipeline.prefetched([])) == []


def _stamps(out: Path, uids) -> dict:
    return {uid: (out / pipeline.safe_name(uid) / "report.json").stat().st_mtime_ns for uid in uids}


@pytest.mark.slow
def test_batch_redoes_a_series_whose_options_changed(cohort, tmp_path, capsys):
    """Each report records the options; a rerun with other result options redoes the series, a
    rerun that changes only where or how fast (batch size) skips them."""
    tree, uids, model = cohort
    out = tmp_path / "out"
    args = ["batch", str(tree), "--out", str(out), "--model", str(model), "--device", "cpu"]
    main(args + ["--threshold", "0.5"])
    first = _stamps(out, uids)
    report = json.loads((out / pipeline.safe_name(uids[0]) / "report.json").read_text())
    assert report["options"]["threshold"] == 0.5 and report["options"]["method"] is None  # the card's own
    assert report["method"] == "gradcam"
    assert report["result_key"]["model_sha256"] == lgc.load_model(model).card.sha256

    main(args + ["--threshold", "0.5", "--batch-size", "3"])  # same result options: skipped
    assert _stamps(out, uids) == first
    capsys.readouterr()
    main(args + ["--threshold", "0.3"])  # another threshold: every series again
    again = _stamps(out, uids)
    assert all(again[uid] != first[uid] for uid in uids)
    assert "3 of 4 series done" in capsys.readouterr().out
    report = json.loads((out / pipeline.safe_name(uids[0]) / "report.json").read_text())
    assert report["options"]["threshold"] == 0.3 and report["threshold"] == pytest.approx(0.3)
    # the failed series was failed with the old options: it was tried again, and failed again
    error = json.loads(next(out.glob("*/error.json")).read_text())
    assert error["result_key"]["threshold"] == 0.3


def test_summary_names_the_folder_and_the_input_of_each_series(cohort, tmp_path):
    tree, uids, model = cohort
    out = tmp_path / "out"
    main(["batch", str(tree), "--out", str(out), "--model", str(model), "--device", "cpu"])
    rows = _summary(out)
    for uid in uids:
        row = rows[uid]
        assert (out / row["output"] / "report.json").is_file()
        assert Path(row["input"]).is_dir() and Path(row["input"]).parent == tree  # patient<seed>/
        assert row["patient_id"] == "LIDC-IDRI-000" + Path(row["input"]).name[-1]  # from its DICOM
        assert re.fullmatch(
            r"[1-9]\d* hot regions?|no region above threshold 0\.50 \(highest heat 0\.[0-4]\d\)", row["outcome"]
        ), row["outcome"]
    broken = next(r for r in rows.values() if r["status"] == "failed")
    assert Path(broken["input"]) == tree / "broken"


def test_series_with_an_empty_uid_gets_its_own_folder(tmp_path, cohort):
    """A series whose SeriesInstanceUID is empty is written into a folder of its own, never into
    --out itself beside summary.csv."""
    import pydicom

    _, _, model = cohort
    tree = tmp_path / "dicom"
    ph = small_chest(1)
    for f in phantom.write_dicom_series(ph.volume, tree / "no-uid"):
        ds = pydicom.dcmread(f)
        ds.SeriesInstanceUID = ""
        ds.save_as(f)
    out = tmp_path / "out"
    assert main(["batch", str(tree), "--out", str(out), "--model", str(model), "--device", "cpu"]) == 0
    assert pipeline.safe_name("") != "" and "/" not in pipeline.safe_name("")
    rows = list(_summary(out).values())
    assert len(rows) == 1 and rows[0]["status"] == "done"
    folder = out / rows[0]["output"]
    assert folder.parent == out and folder != out and (folder / "report.json").is_file()
    assert sorted(p.name for p in out.iterdir()) == sorted([folder.name, "summary.csv", ".lunggradcam.json"])
