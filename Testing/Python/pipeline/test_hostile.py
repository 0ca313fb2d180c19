"""Hostile files: model files that would run code, DICOM fields and UIDs that try to shape paths or
the terminal, and patient data that must never reach logs, progress or outputs.

(Pickle payloads, unknown architectures and huge declared sizes at the ``load_model`` level are in
test_models.py; here they go through ``lunggradcam run``.)
"""

from __future__ import annotations

import csv
import hashlib
import json
import logging
import os
import pickle
import re
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from LungGradCAMLib.cli import main
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.engine.models import ModelCard
from LungGradCAMLib.io.dicom import load_dicom_series
from LungGradCAMLib.io.dicom_series import list_dicom_series
from LungGradCAMLib.io.dicom_write import write_dicom_series
from LungGradCAMLib.io.volume_files import write_volume

from helpers import REPO, make_tiny_model, small_chest

SECRET_NAME = "Qxzwv^Secretname"
SECRET_ID = "PID-SECRET-4242"
#: path separators, "..", terminal escapes, a bell, a newline and 300 more characters (no backslash:
#: in DICOM text it separates values)
HOSTILE_TEXT = "../../../outside/evil/name\x1b[2J\x07\n" + "D" * 300
#: SeriesInstanceUIDs no valid file holds, but a hostile one can (none may shape a path)
HOSTILE_UIDS = [
    "..",
    "/etc/cron.d/lunggradcam",
    "~/.ssh/authorized_keys",
    ".hidden",
    "9" * 300,
    "a\x1b[2Jb\x07c",
    "1.2.826.0.1.3680043.10.1/7",
    "1.2.826.0.1.3680043.10.1_7",
    "summary.csv",
    ".tmp-0000-summary.csv",
]  # the names of the batch's own files
#: the longest valid UID (64 characters, as LIDC's): its series splits into two stacks, <uid>#1 and #2
LONG_UID = "1.3.6.1.4.1.14519.5.2.1.6279.6001.179049373636438705059720603192"
FOLDER_NAME = re.compile(r"^[0-9A-Za-z][0-9A-Za-z._-]{0,63}$")


def _tiny_ct(shape=(1, 8, 8), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 1000, shape).astype(np.float32)


def _write(volume: Volume, folder: Path, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values written on purpose
        return write_dicom_series(volume, folder, **kwargs)


def _snapshot(root: Path, skip: Path) -> dict:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(root.rglob("*"))
        if skip not in p.parents and p != skip
    }


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"), name="whole", patch=None, spacing=(8.0, 8.0, 8.0))


@pytest.fixture(scope="module")
def hostile_tree(tmp_path_factory):
    """A DICOM tree: one chest series that runs to the end, with hostile patient fields, hostile
    descriptions and a UID that is a relative path; single-slice series (they fail fast) under
    hostile UIDs; and a 64-character UID split into two stacks."""
    root = tmp_path_factory.mktemp("hostile")
    tree = root / "dicom"
    chest = small_chest(5).volume
    _write(
        chest,
        tree / "s0",
        patient_name=SECRET_NAME,
        patient_id=SECRET_ID,
        series_description=HOSTILE_TEXT,
        study_description=HOSTILE_TEXT,
        series_uid="../../../escaped",
    )
    for n, uid in enumerate(HOSTILE_UIDS):
        _write(
            Volume(_tiny_ct(seed=n), axis_aligned_matrix((1, 1, 2))),
            tree / f"s{n + 1}",
            series_uid=uid,
            patient_name=SECRET_NAME,
            patient_id=SECRET_ID,
            series_description=HOSTILE_TEXT,
        )
    _write(Volume(_tiny_ct(), axis_aligned_matrix((1, 1, 2))), tree / "long" / "axial", series_uid=LONG_UID)
    coronal = np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    _write(
        Volume(_tiny_ct(seed=9), axis_aligned_matrix((1, 2, 1), (0, 0, 0), coronal)),
        tree / "long" / "coronal",
        series_uid=LONG_UID,
    )
    return root, tree


def test_hostile_fields_are_read_as_data(hostile_tree):
    """The hostile values really reach the library (so the checks below can fail)."""
    _, tree = hostile_tree
    volume = load_dicom_series(tree / "s0")
    assert volume.meta["patient_id"] == SECRET_ID and volume.meta["series_uid"] == "../../../escaped"
    assert volume.meta["description"] == HOSTILE_TEXT
    keys = {info.key for info in list_dicom_series(tree)}
    assert keys == {"../../../escaped", *HOSTILE_UIDS, f"{LONG_UID}#1", f"{LONG_UID}#2"}


@pytest.mark.slow
def test_batch_output_names_come_from_uids_sanitised_and_inside_out(hostile_tree, model, tmp_path):
    root, tree = hostile_tree
    before = _snapshot(root, skip=tmp_path)
    out = tmp_path / "out"
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "LungGradCAMLib.cli",
            "-v",
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
        capture_output=True,
        timeout=600,
    )
    stdout, stderr = result.stdout.decode("utf-8", "replace"), result.stderr.decode("utf-8", "replace")
    assert result.returncode == 1, stderr[-3000:]  # one series done, the single slices failed
    assert "Traceback" not in stderr

    with open(out / "summary.csv", newline="") as fh:
        rows = {row["series_uid"]: row for row in csv.DictReader(fh)}
    assert set(rows) == {"../../../escaped", *HOSTILE_UIDS, f"{LONG_UID}#1", f"{LONG_UID}#2"}
    assert rows["../../../escaped"]["status"] == "done"
    assert all(r["status"] == "failed" for uid, r in rows.items() if uid != "../../../escaped")
    # one folder per series, never shared, each a plain name directly inside --out
    outputs = [r["output"] for r in rows.values()]
    assert len(set(outputs)) == len(outputs)
    assert sorted(p.name for p in out.iterdir()) == sorted(outputs + ["summary.csv", ".lunggradcam.json"])
    for uid, row in rows.items():
        folder = out / row["output"]
        assert FOLDER_NAME.match(row["output"]), row["output"]
        assert folder.resolve().parent == out.resolve() and folder.is_dir() and not folder.is_symlink()
        record = folder / ("report.json" if row["status"] == "done" else "error.json")
        data = json.loads(record.read_text())
        assert data.get("series_instance_uid", data.get("series_uid")) == uid  # its own series' result
    # the description never shapes a name; nothing escaped --out; the input tree is untouched
    assert not any("outside" in p.name or "DDDD" in p.name or "evil" in p.name for p in out.rglob("*"))
    assert _snapshot(root, skip=tmp_path) == before
    assert {p.name for p in tmp_path.iterdir()} == {"out"}

    # patient name and ID: not in log lines or progress, not in any output file, but for the
    # summary's patient_id column (issue 24: the cohort's table says whose series each row is)
    for secret in (SECRET_NAME, SECRET_ID, "Qxzwv"):
        assert secret not in stdout and secret not in stderr
        for f in out.rglob("*"):
            if f.is_file() and f.name != "summary.csv":
                assert secret.encode() not in f.read_bytes(), f
    summary = [{k: v for k, v in row.items() if k != "patient_id"} for row in rows.values()]
    assert not any(secret in str(summary) for secret in (SECRET_NAME, SECRET_ID, "Qxzwv"))
    assert SECRET_ID in {row["patient_id"] for row in rows.values()}


def test_run_logs_without_patient_data(hostile_tree, model, tmp_path, capsys, caplog):
    _, tree = hostile_tree
    caplog.set_level(logging.DEBUG)
    code = main(
        ["-v", "run", str(tree / "s0"), "--out", str(tmp_path / "out"), "--model", str(model), "--device", "cpu"]
    )
    captured = capsys.readouterr()
    assert code == 0, captured.err
    logged = caplog.text + "".join(str(r.args) for r in caplog.records)
    for secret in (SECRET_NAME, SECRET_ID, "Qxzwv"):
        assert secret not in captured.out and secret not in captured.err and secret not in logged
        for f in (tmp_path / "out").iterdir():
            assert secret.encode() not in f.read_bytes(), f


def test_error_messages_do_not_drive_the_terminal(tmp_path, capsys):
    """Two CT series whose descriptions hold escape sequences: the error lists them, escaped."""
    for n in range(2):
        _write(
            Volume(_tiny_ct((3, 8, 8), seed=n), axis_aligned_matrix((1, 1, 2))),
            tmp_path / "in" / f"s{n}",
            series_description=f"kernel {n} \x1b[2J\x1b]0;pwned\x07",
        )
    assert main(["run", str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "2 CT series" in err and "\\x1b[2J" in err and "\\x07" in err
    assert not any(ord(c) < 32 and c not in "\n\t" for c in err)


class _Payload:
    """Unpickling this object creates (opens for writing) the file ``target``."""

    def __init__(self, target: Path):
        self.target = str(target)

    def __reduce__(self):
        return (open, (self.target, "w"))


def _pickle_payload(folder: Path, target: Path) -> Path:
    """A .pt whose "tensor" would open ``target`` for writing if unpickled, with a valid card."""
    path = folder / "hostile.pt"
    torch.save({"features.conv1.weight": _Payload(target)}, path)
    ModelCard(
        architecture="gradcam3d_cnn",
        kwargs={"width": 2},
        class_names=["background", "nodule"],
        cam_class="nodule",
        target_layer="features.act6",
        patch_size=None,
        spacing_mm=[8.0, 8.0, 8.0],
        name="hostile",
    ).save(path.with_suffix(".json"))
    return path


def _tiny_weights(folder: Path, target: Path) -> Path:
    return make_tiny_model(folder, name="hostile", patch=None)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize(
    "make, card_change, message",
    [
        (_pickle_payload, {}, "refused to load"),
        (_tiny_weights, {"architecture": "remote_code_net"}, "unknown architecture"),
        (_tiny_weights, {"kwargs": {"width": 10**6}}, "refusing to allocate"),
    ],
    ids=["pickle_payload", "unknown_architecture", "huge_declared_size"],
)
def test_hostile_model_files_through_the_cli(tmp_path, capsys, make, card_change, message):
    target = tmp_path / "pwned"
    weights = make(tmp_path, target)
    card_path = weights.with_suffix(".json")
    card = json.loads(card_path.read_text())
    card.update(card_change)
    card["sha256"] = hashlib.sha256(weights.read_bytes()).hexdigest()  # only the loader's checks stand in the way
    card_path.write_text(json.dumps(card))
    ct = write_volume(Volume(_tiny_ct((4, 8, 8)), axis_aligned_matrix((1, 1, 2))), tmp_path / "ct.nrrd")
    assert main(["run", str(ct), "--out", str(tmp_path / "out"), "--model", str(weights), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert message in err and str(weights.with_suffix("")) in err and "Traceback" not in err
    assert not target.exists() and not (tmp_path / "out").exists()
    if make is _pickle_payload:  # the payload is live: plain unpickling does create the file
        with open(tmp_path / "probe.pkl", "wb") as f:
            pickle.dump(_Payload(tmp_path / "control"), f)
        with open(tmp_path / "probe.pkl", "rb") as f:
            pickle.load(f).close()
        assert (tmp_path / "control").exists()


@pytest.mark.parametrize("where", ["input", "out"])
def test_paths_that_are_not_utf8_are_refused(where, tmp_path, model):
    """ITK aborts the process (SIGABRT) on such a name: it is refused before it gets there."""
    root = os.fsencode(tmp_path)
    ct = write_volume(small_chest(5).volume, tmp_path / "ct.nrrd")
    if where == "input":
        ct = Path(os.fsdecode(root + b"/ct\xff.nrrd"))
        (tmp_path / "ct.nrrd").rename(ct)
    out = root + (b"/out\xff" if where == "out" else b"/out")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "LungGradCAMLib.cli",
            "run",
            os.fsencode(ct),
            "--out",
            out,
            "--model",
            str(model),
            "--device",
            "cpu",
        ],
        cwd=REPO,
        capture_output=True,
        timeout=600,
    )
    err = result.stderr.decode("utf-8", "replace")
    assert result.returncode == 2, (result.returncode, err[-2000:])
    assert "holds bytes that are not UTF-8 text" in err and "\\xff" in err and "Traceback" not in err
    assert not os.path.exists(out)


def test_report_is_strict_json_when_the_card_has_nan_metrics(tmp_path, model, capsys):
    """NaN and Infinity are not JSON: a card's metrics holding them are written as null."""
    weights = tmp_path / "nan.safetensors"
    weights.write_bytes(model.read_bytes())
    card = json.loads(model.with_suffix(".json").read_text())
    card["metrics"] = {
        "roc_auc": {"value": float("nan"), "ci95": [float("-inf"), float("inf")]},
        "accuracy": float("nan"),
    }
    weights.with_suffix(".json").write_text(json.dumps(card))  # Python writes NaN, as a careless tool does
    ct = write_volume(small_chest(5).volume, tmp_path / "ct.nrrd")
    assert main(["run", str(ct), "--out", str(tmp_path / "out"), "--model", str(weights), "--device", "cpu"]) == 0

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    report = json.loads((tmp_path / "out" / "report.json").read_text(), parse_constant=refuse)
    assert report["model"]["metrics"] == {"roc_auc": {"value": None, "ci95": [None, None]}, "accuracy": None}
