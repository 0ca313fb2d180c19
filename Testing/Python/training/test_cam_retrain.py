"""The heat-map retraining test (LungGradCAMLib.training.cam_retrain): truth masks of phantom patches, masks
for background patches, what is multiplied, the four trainings end to end, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import ndimage

from LungGradCAMLib.core.errors import DataError, InvalidInputError
from LungGradCAMLib.engine.models import ModelCard
from LungGradCAMLib.training import cam_retrain as cr
from LungGradCAMLib.training.data import PatchSet, phantom_patches
from LungGradCAMLib.training.train import TrainConfig

SIZE = (16, 16, 16)


def _card(**kwargs) -> ModelCard:
    # small3d_cnn has no BatchNorm, whose running statistics lag too far behind on a few dozen patches
    base = dict(
        architecture="small3d_cnn",
        kwargs={"channels": [4, 8, 8], "hidden": [16, 8], "dropout": 0.0, "num_classes": 2},
        class_names=["background", "nodule"],
        cam_class="nodule",
        target_layer="features.act3",
        patch_size=list(SIZE),
        spacing_mm=[1.5, 1.5, 1.5],
        hu_window=[-1000.0, 400.0],
        normalisation="minmax",
        name="tiny",
    )
    base.update(kwargs)
    return ModelCard(**base).validate()


@pytest.fixture
def one_thread():
    """Tiny models train several times faster on one thread than on cores shared with other jobs."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def phantom_set() -> PatchSet:
    return phantom_patches([0, 1], SIZE, positives_per_nodule=1, negatives_per_kind=1)


def test_phantom_patch_masks_hold_the_nodules(phantom_set):
    masks = cr.phantom_patch_masks(phantom_set)
    assert masks.shape == phantom_set.patches.shape and masks.dtype == bool
    has_lesion = masks.reshape(len(masks), -1).any(axis=1)
    # phantom_patches keeps every nodule voxel out of background patches and centres positives on nodules
    np.testing.assert_array_equal(has_lesion, phantom_set.labels == 1)
    for patch, mask in zip(phantom_set.patches[has_lesion], masks[has_lesion]):
        # the mask sits on the nodule: denser than the 2-voxel shell around it (lung, or the
        # partial-volume rim where a nodule touches the chest wall)
        shell = ndimage.binary_dilation(mask, iterations=2) & ~mask
        assert patch[mask].mean() > patch[shell].mean() + 50
    # positives are jittered by at most a quarter patch: the nodule covers a voxel near the centre
    centre = np.array(SIZE) // 2
    for mask in masks[has_lesion]:
        assert np.abs(np.argwhere(mask) - centre).max(axis=1).min() <= SIZE[0] // 4


def test_phantom_patch_masks_refuse_foreign_patches(phantom_set):
    tampered = phantom_set.subset(range(len(phantom_set)))
    tampered.patches = tampered.patches.copy()
    tampered.patches[3] += 50
    with pytest.raises(DataError, match="does not match"):
        cr.phantom_patch_masks(tampered)
    other = phantom_set.subset([0, 1])
    other.patients = np.array(["LIDC-IDRI-0001", "LIDC-IDRI-0001"])
    with pytest.raises(DataError, match="phantom"):
        cr.phantom_patch_masks(other)


def test_fill_empty_masks_borrows_lesion_masks():
    masks = np.zeros((6, 4, 4, 4), bool)
    masks[0, 1, 1, 1] = masks[1, 2:, 2:, 2:] = True
    filled = cr.fill_empty_masks(masks, seed=3)
    np.testing.assert_array_equal(filled[:2], masks[:2])
    for m in filled[2:]:
        assert any(np.array_equal(m, masks[d]) for d in (0, 1))
    np.testing.assert_array_equal(filled, cr.fill_empty_masks(masks, seed=3))
    assert not masks[2:].any()  # the input is not changed
    with pytest.raises(DataError):
        cr.fill_empty_masks(np.zeros((3, 4, 4, 4), bool))


def test_model_inputs_are_the_normalised_patch():
    hu = np.array([-1500, -1000, -300, 400, 900], np.int16).reshape(1, 1, 1, 5)
    x = cr.model_inputs(hu, _card())
    np.testing.assert_allclose(x.ravel(), [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-6)
    # so a multiplied-out voxel (x * 0) reads as the window's low end: air


def _separable_set(n: int = 64, seed: int = 0):
    """Noise patches (lung-like, -800 +- 60 HU); half hold a 0 HU ball (radius 3 voxels) near the
    centre, whose voxels are the truth mask. The ball alone separates the classes; outside it the
    two classes are drawn from one distribution."""
    rng = np.random.default_rng(seed)
    patches = rng.normal(-800, 60, (n,) + SIZE)
    labels = np.arange(n) % 2
    masks = np.zeros(patches.shape, bool)
    k, j, i = np.indices(SIZE)
    for s in np.flatnonzero(labels == 1):
        c = np.array(SIZE) // 2 + rng.integers(-3, 4, 3)
        ball = (k - c[0]) ** 2 + (j - c[1]) ** 2 + (i - c[2]) ** 2 <= 9
        patches[s][ball] = rng.normal(0, 30, ball.sum())
        masks[s] = ball
    data = PatchSet(
        np.rint(patches).astype(np.int16),
        labels,
        [f"p{s:02d}" for s in range(n)],
        ["background", "nodule"],
        (1.5, 1.5, 1.5),
    )
    return data, masks


@pytest.mark.slow
def test_cam_retrain_end_to_end_truth_separates_inverted_does_not(tmp_path, one_thread):
    data, masks = _separable_set()
    cfg = TrainConfig(epochs=12, batch_size=8, lr=3e-3, patience=20, augment=False, amp=False, seed=0)
    result = cr.cam_retrain(data, masks, _card(), tmp_path, config=cfg, val_fraction=0.5, device="cpu", n_boot=100)
    assert set(result.accuracy) == set(cr.VARIANTS)
    assert all(0.0 <= v <= 1.0 for v in result.accuracy.values())
    assert result.chance == pytest.approx(0.5, abs=0.1)
    # the ball is all the classifier needs: alone it suffices, and without it nothing is left
    assert result.accuracy["original"] >= 0.9
    assert result.accuracy["truth"] >= 0.9
    assert result.accuracy["inverted"] <= 0.75
    saved = json.loads((tmp_path / "cam_retrain.json").read_text())
    assert saved["accuracy"] == pytest.approx(result.accuracy)
    assert saved["data"]["validation"]["patches"] == 32
    assert set(saved["cam_blank_patches"]) == {"background", "nodule"}
    for variant in cr.VARIANTS:
        assert (tmp_path / variant / "best.safetensors").is_file()
    # the retrained models take the products as they are: no second normalisation
    card = ModelCard.load(tmp_path / "cam" / "best.json")
    assert card.normalisation == "none" and card.hu_window == [0.0, 1.0]


def test_cam_retrain_refuses_bad_input(tmp_path):
    data, masks = _separable_set(8)
    with pytest.raises(InvalidInputError, match="shape"):
        cr.cam_retrain(data, masks[:4], _card(), tmp_path)
    with pytest.raises(InvalidInputError, match="mask_dilation"):
        cr.cam_retrain(data, masks, _card(), tmp_path, mask_dilation=-1)
    three = _card(class_names=["a", "b", "c"], cam_class="c", kwargs={"num_classes": 3})
    with pytest.raises(InvalidInputError, match="two-class"):
        cr.cam_retrain(data, masks, three, tmp_path)
    one_class = data.subset(np.flatnonzero(data.labels == 1))
    with pytest.raises(DataError, match="one class"):
        cr.cam_retrain(one_class, masks[data.labels == 1], _card(), tmp_path)


def test_evaluate_cli_cam_retrain(tmp_path, phantom_set, one_thread):
    import torch

    from LungGradCAMLib.cli import main
    from LungGradCAMLib.engine.models import build_model, save_model

    card = _card()
    torch.manual_seed(0)
    model = save_model(build_model(card.architecture, **card.kwargs), card, tmp_path / "tiny.safetensors")
    cache = phantom_set.save(tmp_path / "patches.npz")
    out = tmp_path / "out"
    rc = main(
        [
            "evaluate",
            "--cam-retrain",
            "--model",
            str(model),
            "--cache",
            str(cache),
            "--phantom-seeds",
            "0-1",
            "--out",
            str(out),
            "--retrain-epochs",
            "1",
            "--retrain-no-augment",
            "--val-fraction",
            "0.5",
            "--bootstrap",
            "20",
            "--device",
            "cpu",
            "--retrain-arch-kwargs",
            '{"channels": [2, 2, 2]}',
            "--mask-dilation",
            "1",
        ]
    )
    assert rc == 0
    saved = json.loads((out / "cam_retrain.json").read_text())
    assert set(saved["accuracy"]) == set(cr.VARIANTS)
    assert all(0.0 <= v <= 1.0 for v in saved["accuracy"].values())
    assert saved["settings"]["kwargs"]["channels"] == [2, 2, 2] and saved["settings"]["mask_dilation_vox"] == 1
    assert saved["data"]["train"]["patients"] == 1 and saved["data"]["validation"]["patients"] == 1
    assert (
        main(
            [
                "evaluate",
                "--cam-retrain",
                "--model",
                str(model),
                "--cache",
                str(cache),
                "--out",
                str(out),
                "--retrain-arch-kwargs",
                "[1]",
            ]
        )
        == 2
    )
