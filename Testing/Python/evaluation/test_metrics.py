"""metrics.py against cases small enough to compute by hand."""

from __future__ import annotations

import numpy as np
import pytest

from LungGradCAMLib.core.errors import InvalidInputError
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.evaluation import metrics


def line(values) -> np.ndarray:
    """A 1 x 1 x N volume (K, J, I) holding ``values`` along I."""
    return np.asarray(values, dtype=np.float64).reshape(1, 1, -1)


# --- Dice / IoU -----------------------------------------------------------------------------------


def test_dice_and_iou_by_hand():
    a = np.zeros((4, 4, 4), bool)
    b = np.zeros((4, 4, 4), bool)
    a[0:2, 0:2, 0:2] = True  # 8 voxels
    b[1:3, 0:2, 0:3] = True  # 12 voxels, 4 shared with a (k=1, j 0..1, i 0..1)
    assert metrics.dice(a, b) == pytest.approx(2 * 4 / 20)
    assert metrics.iou(a, b) == pytest.approx(4 / 16)
    assert metrics.dice(a, a) == 1.0 and metrics.iou(a, ~a) == 0.0
    empty = np.zeros_like(a)
    assert metrics.dice(empty, empty) == 1.0 and metrics.iou(empty, empty) == 1.0


def test_shape_and_geometry_mismatch_are_refused():
    with pytest.raises(InvalidInputError, match="shape"):
        metrics.dice(np.zeros((2, 2, 2)), np.zeros((2, 2, 3)))
    a = Volume(np.zeros((2, 2, 2)), np.eye(4))
    b = Volume(np.zeros((2, 2, 2)), axis_aligned_matrix((2, 1, 1)))
    with pytest.raises(InvalidInputError, match="geometry"):
        metrics.mean_dice(a, b)
    with pytest.raises(InvalidInputError, match="3D"):
        metrics.iou(np.zeros((2, 2)), np.zeros((2, 2)))


# --- mean-Dice --------------------------------------------------------------------------------------


def test_cam_to_8bit_scaling():
    assert metrics.cam_to_8bit(line([0.0, 0.5, 1.0])).ravel().tolist() == [0, 128, 255]
    # min-max: an offset and a scale change nothing; a constant CAM is all zero
    assert metrics.cam_to_8bit(line([3.0, 4.0, 5.0])).ravel().tolist() == [0, 128, 255]
    assert metrics.cam_to_8bit(line([0.7, 0.7])).ravel().tolist() == [0, 0]
    # 1/255 steps land exactly on the 8-bit levels
    assert metrics.cam_to_8bit(line(np.arange(256) / 255)).ravel().tolist() == list(range(256))


def test_mean_dice_of_a_perfect_cam_is_255_of_256():
    truth = np.zeros((4, 4, 4), bool)
    truth[1:3, 1:3, 1:3] = True
    # CAM8 is 255 inside, 0 outside: B_t equals the truth for t = 0..254, and is empty for t = 255
    assert metrics.mean_dice(truth.astype(float), truth) == pytest.approx(255 / 256)
    assert metrics.best_dice(truth.astype(float), truth) == (1.0, 0)


def test_mean_dice_three_levels_by_hand():
    truth = line([1, 1, 0, 0])
    cam = line([1.0, 0.5, 0.5, 0.0])  # CAM8 = 255, 128, 128, 0
    # t = 0..127: B = {0,1,2}, Dice = 2*2/(2+3) = 0.8; t = 128..254: B = {0}, Dice = 2/3; t = 255: 0
    expected = (128 * 0.8 + 127 * (2 / 3)) / 256
    assert metrics.mean_dice(cam, truth) == pytest.approx(expected)
    curve = metrics.dice_curve(cam, truth)
    assert curve.shape == (256,)
    assert curve[127] == pytest.approx(0.8) and curve[128] == pytest.approx(2 / 3) and curve[255] == 0
    assert metrics.best_dice(cam, truth) == (pytest.approx(0.8), 0)


def test_dice_curve_equals_256_explicit_thresholds():
    rng = np.random.default_rng(3)
    cam = rng.random((5, 6, 7)) ** 2
    truth = rng.random((5, 6, 7)) > 0.7
    cam8 = metrics.cam_to_8bit(cam)
    slow = [metrics.dice(truth, cam8 > t) for t in range(256)]
    np.testing.assert_allclose(metrics.dice_curve(cam, truth), slow)
    assert metrics.best_dice(cam, truth).dice == pytest.approx(max(slow))
    assert metrics.best_dice(cam, truth).threshold == int(np.argmax(slow))


def test_mean_dice_within_mask_ignores_outside_voxels():
    truth = line([1, 0, 0, 0])
    cam = line([0.5, 0.0, 0.0, 9.0])  # the outlier at i = 3 would squash the scaling
    within = line([1, 1, 1, 0])
    # inside the mask CAM8 = 255, 0, 0: perfect for t = 0..254
    assert metrics.mean_dice(cam, truth, within=within) == pytest.approx(255 / 256)
    assert metrics.mean_dice(cam, truth) < 0.1


# --- pointing games ---------------------------------------------------------------------------------


def test_pointing_game_hit_and_miss():
    truth = line([0, 1, 1, 0])
    assert metrics.pointing_game(line([0.1, 0.9, 0.2, 0.0]), truth)
    assert not metrics.pointing_game(line([0.1, 0.2, 0.2, 0.9]), truth)
    # ties: the first maximum in C order decides
    assert not metrics.pointing_game(line([1.0, 1.0, 0.0, 0.0]), truth)


def test_pointing_game_tolerance_in_mm_on_a_flipped_anisotropic_grid():
    truth = np.zeros((3, 4, 5), bool)
    truth[0, 0, 0] = True
    cam = np.zeros((3, 4, 5))
    cam[2, 0, 3] = 1.0  # 3 voxels along I, 2 along K from the truth
    m = axis_aligned_matrix((2.0, 1.0, 4.0), (10, -5, 3), np.diag([-1.0, 1.0, -1.0]))
    distance = np.hypot(3 * 2.0, 2 * 4.0)  # 10 mm
    cam_v, truth_v = Volume(cam, m), Volume(truth.astype(np.uint8), m)
    assert metrics.peak_distance_mm(cam_v, truth_v) == pytest.approx(distance)
    assert not metrics.pointing_game(cam_v, truth_v, tolerance_mm=9.9)
    assert metrics.pointing_game(cam_v, truth_v, tolerance_mm=10.0)
    # arrays need the spacing (i, j, k mm) given explicitly
    assert metrics.pointing_game(cam, truth, tolerance_mm=10.0, spacing=(2.0, 1.0, 4.0))
    assert not metrics.pointing_game(cam, truth)
    with pytest.raises(InvalidInputError, match="spacing"):
        metrics.pointing_game(cam, truth, tolerance_mm=10.0)


def test_pointing_game_refuses_empty_truth_and_nan():
    with pytest.raises(InvalidInputError, match="empty"):
        metrics.pointing_game(line([1, 0]), line([0, 0]))
    with pytest.raises(InvalidInputError, match="NaN"):
        metrics.pointing_game(line([np.nan, 0]), line([1, 0]))


def test_energy_pointing_game_by_hand():
    cam = line([1.0, 2.0, 3.0, 4.0])
    truth = line([1, 0, 1, 0])
    assert metrics.energy_pointing_game(cam, truth) == pytest.approx(4 / 10)
    assert metrics.energy_pointing_game(cam, truth, within=line([1, 1, 1, 0])) == pytest.approx(4 / 6)
    assert metrics.energy_pointing_game(line([0, 0, 0, 0]), truth) == 0.0
    with pytest.raises(InvalidInputError, match="negative"):
        metrics.energy_pointing_game(line([-1, 1, 0, 0]), truth)


# --- deletion / insertion -----------------------------------------------------------------------------


def first_voxel_is_tissue(batch: np.ndarray) -> np.ndarray:
    """A 'model' that only looks at voxel (0, 0, 0): 1 when it is tissue (> -500 HU)."""
    assert batch.ndim == 4 and batch.dtype == np.float32
    return (batch[:, 0, 0, 0] > -500).astype(np.float64)


def test_deletion_and_insertion_by_hand():
    ct = line([0.0, 0.0, 0.0, 0.0])  # soft tissue, 0 HU
    good = line([4.0, 3.0, 2.0, 1.0])  # hottest = the voxel the model looks at
    bad = line([1.0, 2.0, 3.0, 4.0])
    deletion = metrics.deletion_curve(ct, good, first_voxel_is_tissue, steps=4, batch_size=2)
    np.testing.assert_allclose(deletion.fractions, [0, 0.25, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(deletion.scores, [1, 0, 0, 0, 0])
    assert deletion.auc == pytest.approx(0.125)
    late = metrics.deletion_curve(ct, bad, first_voxel_is_tissue, steps=4)
    np.testing.assert_allclose(late.scores, [1, 1, 1, 1, 0])
    assert late.auc == pytest.approx(0.875)
    insertion = metrics.insertion_curve(ct, good, first_voxel_is_tissue, steps=4, baseline="air")
    np.testing.assert_allclose(insertion.scores, [0, 1, 1, 1, 1])
    assert insertion.auc == pytest.approx(0.875)


def test_curves_accept_torch_scores_and_a_blur_baseline():
    import torch

    ct = Volume(np.zeros((2, 3, 4), np.float32), axis_aligned_matrix((1.0, 1.0, 2.0)))
    cam = np.arange(24, dtype=float).reshape(2, 3, 4)

    def mean_hu(batch: np.ndarray):
        return torch.from_numpy(batch).mean(dim=(1, 2, 3))

    # blurring a constant volume changes nothing: the curve stays flat at 0 HU
    flat = metrics.deletion_curve(ct, cam, mean_hu, steps=3, baseline="blur", blur_sigma_mm=3.0)
    np.testing.assert_allclose(flat.scores, 0.0, atol=1e-6)
    # a constant baseline of 100 HU reached in three equal steps: mean 0, 800/24, 1600/24, 100
    ramp = metrics.deletion_curve(ct, cam, mean_hu, steps=3, baseline=100.0)
    np.testing.assert_allclose(ramp.scores, [0, 100 / 3, 200 / 3, 100], rtol=1e-5)
    assert ramp.auc == pytest.approx(50.0, rel=1e-5)


def test_curves_reject_bad_arguments():
    ct, cam = np.zeros((1, 2, 2)), np.ones((1, 2, 2))
    with pytest.raises(InvalidInputError, match="spacing"):
        metrics.deletion_curve(ct, cam, first_voxel_is_tissue, baseline="blur")
    with pytest.raises(InvalidInputError, match="baseline"):
        metrics.insertion_curve(ct, cam, first_voxel_is_tissue, baseline="noise")
    with pytest.raises(InvalidInputError, match="scores"):
        metrics.deletion_curve(ct, cam, lambda b: np.zeros(1), steps=3)
    with pytest.raises(InvalidInputError, match="shape"):
        metrics.deletion_curve(ct, np.ones((1, 2, 3)), first_voxel_is_tissue)


# --- FROC -----------------------------------------------------------------------------------------


def test_froc_by_hand():
    """Three operating points over 2 scans and 3 nodules: 16, 4 and 1 false positives (8, 2 and
    0.5 per scan) at sensitivities 1, 2/3 and 1/3. At r false positives per scan the best point
    with at most r counts; below the lowest point the sensitivity is 0."""
    hits = np.array([[1, 1, 1], [1, 1, 0], [0, 1, 0]], bool)
    f = metrics.froc(hits, [16, 4, 1], n_scans=2)
    np.testing.assert_allclose(f.fp_per_scan, [8, 2, 0.5])
    np.testing.assert_allclose(f.sensitivity, [1, 2 / 3, 1 / 3])
    assert f.rates == (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
    np.testing.assert_allclose(f.at, [0, 0, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 1])
    assert f.cpm == pytest.approx(3 / 7)
    # a point that finds fewer with more false positives never wins
    worse = metrics.froc(np.vstack([hits, [[0, 0, 0]]]), [16, 4, 1, 2], n_scans=2)
    np.testing.assert_allclose(worse.at, f.at)
    with pytest.raises(InvalidInputError, match="one row per entry"):
        metrics.froc(hits, [1, 2], n_scans=2)
    with pytest.raises(InvalidInputError, match="scans and nodules"):
        metrics.froc(hits, [1, 2, 3], n_scans=0)


def test_group_bootstrap_resamples_whole_groups():
    from LungGradCAMLib.evaluation.evaluate import group_bootstrap

    values = np.array([1.0, 1.0, 1.0, 0.0])  # group a always 1, group b always 0
    ci = group_bootstrap(["a", "a", "a", "b"], lambda i: values[i].mean(), n_boot=200)
    # a replicate holds 0, 1 or 2 copies of each group: its mean is 0, 1 or 0.75
    assert ci.shape == (2,) and ci[0] == 0.0 and ci[1] == 1.0
    both = group_bootstrap(["a", "b"], lambda i: np.array([len(i), np.nan]), n_boot=50)
    assert both.shape == (2, 2) and np.all(both[:, 0] == 2) and np.isnan(both[:, 1]).all()
