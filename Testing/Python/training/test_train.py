"""Training: class weights, augmentation, fit (checkpoints, log, resume), the CLI with
cross-validation, and a real 2-process DistributedDataParallel run on CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from LungGradCAMLib.cli import main as cli_main
from LungGradCAMLib.core.errors import InvalidInputError
from LungGradCAMLib.engine.models import load_model
from LungGradCAMLib.evaluation.evaluate import predict, roc_auc
from LungGradCAMLib.training.augment import augment, enhance_vessels
from LungGradCAMLib.training.data import PatchSet
from LungGradCAMLib.training.train import TrainConfig, class_weights, fit

from helpers import TRAIN_ARGS, spheres_card, spheres_patches


def test_class_weights_formula():
    w = class_weights(np.array([0, 0, 0, 1]), 2)
    assert w == pytest.approx([4 / (2 * 3), 4 / (2 * 1)])
    assert class_weights(np.array([0, 0]), 2)[1] == 0


def test_augment_identity_flips_and_determinism():
    x = torch.randn(3, 1, 8, 10, 12)
    g = torch.Generator().manual_seed(0)
    still = dict(rotate_deg=0, zoom=(1, 1), shear=0, scale=0, shift=0, noise=0)
    same = augment(x, g, flip=False, rot90=False, **still)
    assert torch.allclose(same, x, atol=1e-5)
    flipped = augment(x, g, flip=True, rot90=False, **still)
    for n in range(3):  # each sample is one of the 8 axis flips of itself
        assert any(
            torch.allclose(flipped[n], x[n].flip(dims), atol=1e-5)
            for dims in [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]
        )
    cube = torch.randn(8, 1, 6, 6, 6)
    turned = augment(cube, g, flip=False, rot90=True, **still)
    swapped = [torch.allclose(turned[n], cube[n].transpose(2, 3), atol=1e-5) for n in range(8)]
    kept = [torch.allclose(turned[n], cube[n], atol=1e-5) for n in range(8)]
    assert all(s or k for s, k in zip(swapped, kept)) and any(swapped) and any(kept)
    a = augment(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, augment(x, torch.Generator().manual_seed(5)))
    assert not torch.allclose(a, augment(x, torch.Generator().manual_seed(6)))
    assert a.shape == x.shape


def test_enhance_vessels_brightens_tissue_but_not_the_lesion():
    """Contrast as augmentation (HU): in the chosen samples, tissue outside the lesion and its
    one-voxel rim gains the same amount, scaled by its density from -600 HU (0) to -200 HU (1);
    air-filled lung, the lesion and the other samples are unchanged; reproducible."""
    hu = torch.full((8, 6, 6, 6), -850.0)
    hu[:, :, :, 0] = 40.0  # a vessel along one face
    hu[:, :, 0, 3] = -400.0  # partial volume: half weight
    hu[:, 2:4, 2:4, 2:4] = 30.0
    lesion = torch.zeros(hu.shape, dtype=torch.bool)
    lesion[:, 2:4, 2:4, 2:4] = True
    out = enhance_vessels(hu, lesion, torch.Generator().manual_seed(0), max_hu=600.0, p=0.5)
    gain = out[:, 0, 1, 0] - hu[:, 0, 1, 0]
    changed = gain > 0
    assert 0 < changed.sum() < 8 and gain.max() <= 600.0
    assert torch.allclose(out[:, 0, 0, 3] - hu[:, 0, 0, 3], gain / 2)
    assert torch.equal(out[:, 1:5, 1:5, 1:5], hu[:, 1:5, 1:5, 1:5])  # the lesion and its rim
    assert torch.equal(out[:, :, 5, 5], hu[:, :, 5, 5])  # aerated lung
    assert torch.equal(out[~changed], hu[~changed])
    assert torch.equal(out, enhance_vessels(hu, lesion, torch.Generator().manual_seed(0), max_hu=600.0, p=0.5))
    # without outlines (N, 1, 1, 1): a positive's whole patch counts as the lesion
    whole = enhance_vessels(hu, torch.ones(8, 1, 1, 1, dtype=torch.bool), torch.Generator().manual_seed(0))
    assert torch.equal(whole, hu)


@pytest.fixture(scope="module")
def spheres():
    return spheres_patches()


def test_fit_learns_writes_and_loads(tmp_path, spheres):
    cfg = TrainConfig(epochs=4, batch_size=16, lr=1e-2, patience=10, augment=False, seed=0)
    result = fit(spheres, spheres_patches(2, 8, seed=2), spheres_card(), tmp_path, cfg, progress=False)
    assert len(result.history) == 4 and 1 <= result.best_epoch <= 4
    # balls vs tubes: it learns (few batches, so BatchNorm running statistics lag; hence 0.8)
    assert result.history[-1]["train_loss"] < 0.3 * result.history[0]["train_loss"]
    assert max(h["val_auc"] for h in result.history) > 0.8
    lines = (tmp_path / "log.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
    loaded = load_model(result.best_path, device="cpu")
    assert loaded.card.training["best_epoch"] == result.best_epoch
    assert loaded.card.training["train"]["classes"] == spheres.counts()
    assert load_model(result.last_path).card.training["epoch"] == 4


def test_init_starts_from_a_model_s_weights_and_contrast_augmentation_trains(tmp_path, spheres):
    """--init: fine-tuning starts from the given model's weights (with lr 0 they stay as they were);
    contrast enhancement runs inside the training loop; a model of other widths is refused."""
    first = fit(
        spheres, spheres, spheres_card(), tmp_path / "a", TrainConfig(epochs=1, batch_size=16, seed=0), progress=False
    )
    tuned = fit(
        spheres,
        spheres,
        spheres_card(),
        tmp_path / "b",
        TrainConfig(epochs=1, batch_size=16, lr=0.0, seed=1, init=str(first.best_path), contrast_hu=600.0),
        progress=False,
    )
    before, after = (load_model(p).module.state_dict() for p in (first.best_path, tuned.last_path))
    assert all(torch.equal(before[k], after[k]) for k in before if k.endswith("weight") and "bn" not in k)
    wide = spheres_card()
    wide.kwargs = {"width": 8, "num_classes": 2}
    with pytest.raises(InvalidInputError, match="do not fit"):
        fit(spheres, spheres, wide, tmp_path / "c", TrainConfig(epochs=1, init=str(first.best_path)), progress=False)


def test_resume_continues_exactly(tmp_path, spheres):
    train = spheres.subset(np.flatnonzero(spheres.patients != "p7"))
    val = spheres.subset(np.flatnonzero(spheres.patients == "p7"))
    cfg = TrainConfig(epochs=2, batch_size=16, seed=1)
    whole = fit(train, val, spheres_card(), tmp_path / "whole", cfg, progress=False)
    fit(train, val, spheres_card(), tmp_path / "parts", TrainConfig(epochs=1, batch_size=16, seed=1), progress=False)
    resumed = fit(train, val, spheres_card(), tmp_path / "parts", cfg, resume=True, progress=False)
    assert [h["epoch"] for h in resumed.history] == [1, 2]
    assert resumed.history[0] == json.loads((tmp_path / "whole" / "log.jsonl").read_text().splitlines()[0]) | {
        "seconds": resumed.history[0]["seconds"]
    }
    a = load_model(whole.last_path).module.state_dict()
    b = load_model(resumed.last_path).module.state_dict()
    assert all(torch.allclose(a[k].float(), b[k].float(), atol=1e-5) for k in a)
    with pytest.raises(Exception, match="another model or data set"):
        other = spheres_card()
        other.kwargs["width"] = 8
        fit(train, val, other, tmp_path / "parts", cfg, resume=True, progress=False)


def test_cli_cross_validation(tmp_path, spheres, capsys):
    cache = spheres.save(tmp_path / "spheres.npz")
    out = tmp_path / "cv"
    assert (
        cli_main(
            [
                "train",
                *TRAIN_ARGS,
                "--path",
                str(cache),
                "--out",
                str(out),
                "--epochs",
                "1",
                "--folds",
                "2",
                "--name",
                "cv",
            ]
        )
        == 0
    )
    cv = json.loads((out / "cv_report.json").read_text())
    assert cv["folds"] == 2 and len(cv["metrics"]["roc_auc"]["folds"]) == 2
    card = json.loads((out / "fold1" / "best.json").read_text())
    split = card["training"]["split"]
    assert not set(split["train_patients"]) & set(split["test_patients"])
    assert "ci95" in card["metrics"]["roc_auc"] and card["training"]["command"].startswith("lunggradcam ")
    assert (out / "fold2" / "roc.png").is_file() and (out / "fold2" / "loss.png").is_file()
    assert cli_main(["train", *TRAIN_ARGS, "--path", str(cache), "--out", str(out), "--arch-kwargs", "{width"]) == 2
    assert "argument --arch-kwargs: not valid JSON" in capsys.readouterr().err  # at parse time
    assert cli_main(["train", *TRAIN_ARGS, "--path", str(cache), "--out", str(out), "--arch", "vgg3d"]) == 2
    assert "unknown architecture 'vgg3d'" in capsys.readouterr().err


@pytest.mark.slow
def test_ddp_two_processes_gloo(tmp_path, spheres):
    cache = spheres.save(tmp_path / "spheres.npz")
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "LungGradCAMLib.cli",
        "train",
        *TRAIN_ARGS,
        "--path",
        str(cache),
        "--out",
        str(out),
        "--epochs",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    card = json.loads((out / "best.json").read_text())
    assert card["training"]["world_size"] == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 2
    # the card's AUC is the saved model's on every held-out patient (not one rank's share of them)
    best = load_model(out / "best.safetensors", device="cpu")
    split = best.card.training["split"]
    assert split["test_patients"] and not set(split["test_patients"]) & set(split["train_patients"])
    data = PatchSet.load(cache)
    test = data.subset(np.flatnonzero(np.isin(data.patients, split["test_patients"])))
    truth = (test.labels == best.card.cam_class_index).astype(np.int64)
    expected = roc_auc(truth, predict(best, test)[:, best.card.cam_class_index])
    assert best.card.metrics["roc_auc"]["value"] == pytest.approx(expected, abs=1e-9)


def test_fit_leaves_the_global_random_state_and_cudnn_flags_as_they_were(tmp_path):
    """fit seeds torch and numpy and makes cuDNN deterministic for itself only: the caller's random
    streams and flags go on afterwards as if it had not run."""
    data = spheres_patches(n_patients=2, per_class=1)
    torch.manual_seed(123)
    np.random.seed(456)
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = True, False
    torch_state, numpy_state = torch.get_rng_state(), np.random.get_state()
    try:
        fit(
            data.subset(np.arange(0, 4)),
            data.subset(np.arange(2, 4)),
            spheres_card(),
            tmp_path,
            TrainConfig(epochs=1, batch_size=4, seed=7, amp=False),
            progress=False,
            device="cpu",
        )
        assert torch.equal(torch.get_rng_state(), torch_state)
        after = np.random.get_state()
        assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1]) and after[2:] == numpy_state[2:]
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
    finally:
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = False, False
