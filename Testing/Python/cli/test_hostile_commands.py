"""Hostile and unlucky output folders of the commands beside ``run`` and ``batch``: ``train``,
``evaluate`` (and ``--cam-retrain``), ``demo``, a patch cache (``--cache``) and the batch's
summary. Each command owns its ``--out`` as ``run`` does (``core/atomic.py``'s marker): a folder
holding a file no LungGradCAM run provably wrote is refused before any work and left as it is, a
re-run replaces only its own earlier outputs (subfolders included), and a run that fails or is
interrupted part-way leaves the folder as it was (a training keeps its work for ``--resume``).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from LungGradCAMLib.cli import main
from LungGradCAMLib.core.atomic import atomic_path
from LungGradCAMLib.core.errors import OutputError
from LungGradCAMLib.engine.models import build_model, save_model
from LungGradCAMLib.io.volume_files import write_volume
from LungGradCAMLib.training.data import PatchSet

from helpers import REPO, TRAIN_ARGS, gapped_series_batch, snapshot, spheres_card, spheres_patches

MARKER, WORK = ".lunggradcam.json", ".lunggradcam-work"


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """Labelled 16^3 patches of 8 patients (a patch cache, as ``--cache`` writes it)."""
    return spheres_patches().save(tmp_path_factory.mktemp("data") / "spheres.npz")


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    """An untrained model whose card fits the patches."""
    torch.manual_seed(0)
    card = spheres_card()
    return save_model(
        build_model(card.architecture, **card.kwargs), card, tmp_path_factory.mktemp("model") / "spheres.safetensors"
    )


def _strict(text: str):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f"not strict JSON: {c}"))


def _vouched(out: Path) -> None:
    """The folder holds its marker and exactly the files it names, each byte for byte."""
    marker = json.loads((out / MARKER).read_text())
    present = {k: v for k, v in snapshot(out).items() if v[0] != "type"}  # files (folders are listed too)
    assert present == {
        MARKER: ("file", hashlib.sha256((out / MARKER).read_bytes()).hexdigest()),
        **{name: ("file", digest) for name, digest in marker["files"].items()},
    }


def _refused(capsys, code: int, *names: str) -> str:
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    assert "no LungGradCAM run wrote" in err or "did not write" in err or "holds the input" in err, err
    for name in names:
        assert name in err, err
    return err


# --------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------
def _train(out: Path, data: Path, *extra: str) -> int:
    return main(
        ["train", *TRAIN_ARGS, "--path", str(data), "--out", str(out), "--epochs", "1", "--device", "cpu", *extra]
    )


def test_train_refuses_a_folder_with_a_users_files_before_any_work(tmp_path, capsys):
    out = tmp_path / "out"
    (out / "fold1").mkdir(parents=True)
    (out / "best.safetensors").write_bytes(b"the user's own model")
    (out / "loss.png").write_bytes(b"another tool's plot")
    (out / "fold1" / "notes.txt").write_text("the user's notes")
    before = snapshot(tmp_path)
    # a phantom source with a new cache: refused before the patches are built (no cache made)
    code = main(
        [
            "train",
            "--phantom-seeds",
            "0-3",
            "--patch-size",
            "16",
            "16",
            "16",
            "--cache",
            str(tmp_path / "new.npz"),
            "--out",
            str(out),
            "--epochs",
            "1",
            "--no-progress",
        ]
    )
    _refused(capsys, code, "best.safetensors", "loss.png", "fold1")  # no marker: the whole folder is the user's
    assert snapshot(tmp_path) == before


def test_train_rerun_replaces_its_own_outputs_subfolders_included(tmp_path, cache, capsys):
    out = tmp_path / "out"
    assert _train(out, cache) == 0
    _vouched(out)
    assert {"best.safetensors", "resume.pt", "report.json", "loss.png"} <= {p.name for p in out.iterdir()}
    assert _train(out, cache, "--folds", "2") == 0  # its own outputs of one split give way to the folds'
    _vouched(out)
    assert sorted(p.name for p in out.iterdir()) == sorted([MARKER, "cv_report.json", "fold1", "fold2"])
    assert (out / "fold2" / "best.safetensors").is_file() and (out / "fold1" / "loss.png").is_file()
    assert _train(out, cache) == 0  # and back: the fold folders were its own
    _vouched(out)
    assert not (out / "fold1").exists() and (out / "best.safetensors").is_file()
    # a user's file beside them, or an output edited by hand, stops the next one before its work
    (out / "report.json").write_text('{"edited": "by hand"}')
    before = snapshot(tmp_path)
    _refused(capsys, _train(out, cache), "report.json")
    assert snapshot(tmp_path) == before


def test_an_interrupted_training_leaves_the_folder_as_it_was_and_resumes(tmp_path, cache, capsys):
    """SIGTERM part-way: --out keeps the last complete training's outputs, byte for byte; the
    interrupted one's checkpoints stay in the work folder, and --resume goes on from them."""
    out = tmp_path / "out"
    assert _train(out, cache) == 0
    before = snapshot(out)
    args = [
        sys.executable,
        "-m",
        "LungGradCAMLib.cli",
        "train",
        *TRAIN_ARGS,
        "--path",
        str(cache),
        "--out",
        str(out),
        "--epochs",
        "500",
        "--patience",
        "500",
        "--seed",
        "1",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    proc = subprocess.Popen(
        args,
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    log = out / WORK / "new" / "log.jsonl"
    deadline = time.monotonic() + 120
    while not log.is_file() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in err, err
    after = snapshot(out)
    assert {k: v for k, v in after.items() if not k.startswith(WORK)} == before  # as it was
    interrupted = [json.loads(line) for line in log.read_text().splitlines()]
    assert interrupted and (out / WORK / "new" / "resume.pt").is_file()
    assert not (out / ".lunggradcam.lock").exists()
    # --resume goes on from the last finished epoch, as an uninterrupted training would
    epochs = len(interrupted) + 1
    assert _train(out, cache, "--seed", "1", "--epochs", str(epochs), "--patience", "500", "--resume") == 0
    _vouched(out)
    history = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [h["epoch"] for h in history] == list(range(1, epochs + 1))
    assert history[:-1] == interrupted  # the interrupted epochs, as they were logged
    assert json.loads((out / "last.json").read_text())["training"]["epochs_run"] == epochs


def test_train_cache_never_replaces_what_is_there(tmp_path, cache, capsys):
    phantom = ["train", "--phantom-seeds", "0-3", "--patch-size", "16", "16", "16", "--epochs", "1", "--no-progress"]
    # a broken link, a folder: refused before the patches are built, left as they are
    (tmp_path / "link.npz").symlink_to(tmp_path / "elsewhere.npz")
    (tmp_path / "folder.npz").mkdir()
    before = snapshot(tmp_path)
    for name, what in (("link.npz", "broken link"), ("folder.npz", "folder")):
        code = main([*phantom, "--cache", str(tmp_path / name), "--out", str(tmp_path / "out")])
        err = capsys.readouterr().err
        assert code == 2 and what in err and "never replaces" in err, err
    # a cache inside --out: refused before the work (the folder holds only the training's outputs)
    code = main([*phantom, "--cache", str(tmp_path / "out" / "patches.npz"), "--out", str(tmp_path / "out")])
    assert code == 2 and "holds the input" in capsys.readouterr().err
    # a file of the user's that is no cache: read, refused, never rebuilt over
    (tmp_path / "mine.npz").write_bytes(b"the user's own archive")
    code = main([*phantom, "--cache", str(tmp_path / "mine.npz"), "--out", str(tmp_path / "out")])
    assert code == 2 and "not a patch cache written by LungGradCAM" in capsys.readouterr().err
    assert (tmp_path / "mine.npz").read_bytes() == b"the user's own archive"
    assert snapshot(tmp_path) == {**before, "mine.npz": snapshot(tmp_path)["mine.npz"]}
    # a file made there while the patches were built: the new cache is not saved over it
    (tmp_path / "late.npz").write_bytes(b"made meanwhile")
    with pytest.raises(OutputError, match="never overwrites a file it did not write"):
        PatchSet.load(cache).save(tmp_path / "late.npz")
    assert (tmp_path / "late.npz").read_bytes() == b"made meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".tmp-")) == []


def test_a_file_that_appears_while_it_is_written_is_never_replaced(tmp_path):
    """``atomic_path(replace=False)``: how a patch cache and a DICOM database are published."""
    target = tmp_path / "ctkDICOM.sql"
    with pytest.raises(OutputError, match="exists"):
        with atomic_path(target, replace=False) as tmp:
            tmp.write_bytes(b"ours")
            target.write_bytes(b"another program's")  # made while ours was written
    assert target.read_bytes() == b"another program's" and os.listdir(tmp_path) == ["ctkDICOM.sql"]
    with atomic_path(tmp_path / "new.sql", replace=False) as tmp:
        tmp.write_bytes(b"ours")
    assert (tmp_path / "new.sql").read_bytes() == b"ours"


# --------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------
def _evaluate(out: Path, model: Path, data: Path, *extra: str) -> list:
    return [
        "evaluate",
        "--model",
        str(model),
        "--source",
        "patches",
        "--path",
        str(data),
        "--out",
        str(out),
        "--bootstrap",
        "20",
        "--device",
        "cpu",
        *extra,
    ]


def test_evaluate_owns_its_folder(tmp_path, cache, model, capsys):
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    log.write_text(
        "".join(json.dumps({"epoch": e, "train_loss": 1 / e, "val_loss": 1.1 / e}) + "\n" for e in (1, 2, 3))
    )
    out.mkdir()
    (out / "report.json").write_text('{"files": ["thesis.docx"]}')  # another tool's
    before = snapshot(tmp_path)
    _refused(capsys, main(_evaluate(out, model, cache)), "report.json")
    assert snapshot(tmp_path) == before
    (out / "report.json").unlink()
    assert main(_evaluate(out, model, cache, "--log", str(log))) == 0
    printed = [line for line in capsys.readouterr().out.splitlines() if not line.startswith("scoring ")]
    assert set(_strict(printed[0])) >= {"accuracy", "precision", "roc_auc"}  # strict JSON (an undefined metric: null)
    assert printed[-1] == f"wrote {out / 'report.json'}, {out / 'roc.png'}, {out / 'loss.png'}"
    _vouched(out)
    assert main(_evaluate(out, model, cache, "--decision-threshold", "0.3")) == 0  # no --log: its loss.png goes
    _vouched(out)
    assert sorted(p.name for p in out.iterdir()) == [MARKER, "report.json", "roc.png"]
    assert _strict((out / "report.json").read_text())["threshold"] == 0.3
    # a folder of another command (a training, which holds the model), a folder holding the model
    train = tmp_path / "train"
    assert _train(train, cache) == 0
    _refused(capsys, main(_evaluate(train, train / "best.safetensors", cache)), "holds the input")
    _refused(capsys, main(_evaluate(train, model, cache)), "best.safetensors")
    # --cam-retrain: the same ownership, before any training
    (out / "mine.txt").write_text("the user's")
    before = snapshot(tmp_path)
    _refused(
        capsys,
        main(
            [
                "evaluate",
                "--cam-retrain",
                "--model",
                str(model),
                "--phantom-seeds",
                "0-1",
                "--out",
                str(out),
                "--device",
                "cpu",
            ]
        ),
        "mine.txt",
    )
    assert snapshot(tmp_path) == before


def test_evaluate_prints_strict_json_when_a_metric_is_undefined(tmp_path, cache, model, capsys):
    """A threshold no probability reaches: no positive prediction, so precision is 0/0. The
    printed line is strict JSON (null), as report.json is; main printed ``NaN``. (``--threshold``,
    the decision threshold's older name, still works.)"""
    assert main(_evaluate(tmp_path / "out", model, cache, "--threshold", "1")) == 0
    printed = _strict(next(line for line in capsys.readouterr().out.splitlines() if line.startswith("{")))
    assert printed["precision"] is None and printed["recall"] == 0
    assert _strict((tmp_path / "out" / "report.json").read_text())["metrics"]["precision"]["value"] is None


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), nothing kills
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_an_evaluation_failing_part_way_leaves_the_folder_as_it_was(tmp_path, cache, model):
    """A file size limit between the sizes of its files: report.json and roc.png are written,
    loss.png fails; the earlier evaluation stays, byte for byte, and one message says why."""
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    log.write_text(
        "".join(
            json.dumps({"epoch": e, "train_loss": 1 / e + 0.1 * np.sin(e), "val_loss": 1.1 / e}) + "\n"
            for e in range(1, 61)
        )
    )  # a long, jagged curve: loss.png is the biggest file
    assert main(_evaluate(out, model, cache, "--log", str(log))) == 0
    sizes = {p.name: p.stat().st_size for p in out.iterdir()}
    limit = max(sizes["report.json"], sizes["roc.png"]) + 4096
    assert sizes["loss.png"] > limit + 4096  # the test's premise: only the last file is too big
    before = snapshot(out)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "LungGradCAMLib.cli",
            *_evaluate(out, model, cache, "--log", str(log), "--threshold", "0.3"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=_file_size_limit(limit),
    )
    assert proc.returncode == 2 and "cannot write the outputs (File too large)" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and snapshot(out) == before


# --------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_demo_owns_its_folder_and_its_subfolders(tmp_path, chest, tiny, capsys):
    ct = write_volume(chest, tmp_path / "ct.nrrd")
    broken = tmp_path / "broken.nrrd"  # a CT that can be found but not read: the demo fails at its end
    broken.write_bytes(ct.read_bytes()[:-20000])
    out = tmp_path / "demo"
    demo = ["demo", "--out", str(out), "--model", str(tiny), "--device", "cpu"]
    # a folder of the user's named dicom/: refused before any work
    (out / "dicom").mkdir(parents=True)
    before = snapshot(tmp_path)
    _refused(capsys, main(demo), "dicom")
    assert snapshot(tmp_path) == before
    (out / "dicom").rmdir()
    assert main([*demo, "--ct", str(ct)]) == 0
    _vouched(out)
    assert {"dicom", "result", "ct", "phantom.nrrd", "montage.png"} <= {p.name for p in out.iterdir()}
    assert (out / "ct" / "cam.nrrd").is_file() and (out / "result" / MARKER).is_file()
    # a user's file among the phantom's DICOM files of the demo's own folder: refused, left as it is
    (out / "dicom" / "mine.dcm").write_bytes(b"the user's own slice")
    before = snapshot(tmp_path)
    _refused(capsys, main(demo), "dicom/mine.dcm")
    assert snapshot(tmp_path) == before
    (out / "dicom" / "mine.dcm").unlink()
    # a failure at the end (the phantom's run done, its CT unreadable): the folder as it was
    before = snapshot(out)
    assert main([*demo, "--seed", "8", "--ct", str(broken)]) == 2
    assert "Traceback" not in capsys.readouterr().err and snapshot(out) == before
    # a re-run replaces its own outputs: ct/ (its own) goes, the phantom of seed 8 comes
    assert main([*demo, "--seed", "8"]) == 0
    _vouched(out)
    assert not (out / "ct").exists() and snapshot(out)["phantom.nrrd"] != before["phantom.nrrd"]
    assert "phantom seed 8" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------
# the batch's summary tells what this run did
# --------------------------------------------------------------------------------------------
def test_the_summary_says_failed_when_this_runs_attempt_failed_beside_an_older_report(tmp_path, chest, tiny):
    """A series done without --dicom-seg, then tried with it (a filled gap: no DICOM SEG possible):
    its folder keeps the earlier report beside this run's error.json; the summary says failed."""
    import csv

    out, args = gapped_series_batch(tmp_path, chest, tiny)

    def row() -> dict:
        with open(out / "summary.csv", newline="") as fh:
            (only,) = csv.DictReader(fh)
        return only

    assert main(args) == 0 and row()["status"] == "done"
    assert main(args + ["--dicom-seg"]) == 1
    status = row()
    assert status["status"] == "failed" and "resampled" in status["error"], status
    assert (out / status["output"] / "report.json").is_file()  # the earlier result stays, as it was
    assert main(args) == 0 and row()["status"] == "done"  # with the first options it is done (skipped)


@pytest.mark.parametrize("value", ["5", "-0.1", "otsu", "p99", "nan"])
def test_evaluate_refuses_a_decision_threshold_that_is_no_probability(tmp_path, capsys, value):
    """evaluate's threshold is a probability, not run's heat-map level (otsu, pNN): refused at parse
    time, naming what it is, before anything is read or written."""
    assert main(["evaluate", "--model", "default", "--out", str(tmp_path / "out"), "--decision-threshold", value]) == 2
    assert not (tmp_path / "out").exists()
    assert "is not a probability in [0, 1]" in capsys.readouterr().err
