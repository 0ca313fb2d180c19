"""Tests of LungGradCAMLib.engine.preprocess: windowing, normalisation, gamma, CLAHE, Sobel, noise score,
resampling (SimpleITK and torch paths) and the model card's preprocessing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from LungGradCAMLib.core.errors import InvalidInputError
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix, resample
from LungGradCAMLib.engine import preprocess as pp
from LungGradCAMLib.io.volume_files import read_volume

from helpers import data_path


def _ct(seed: int = 0, shape=(12, 32, 40)) -> np.ndarray:
    """A small HU block: air around a soft-tissue body (40 HU) holding a lung (-850 HU), with noise."""
    rng = np.random.default_rng(seed)
    a = np.full(shape, -1000.0, dtype=np.float32)
    a[:, 4:-4, 4:-4] = 40.0
    a[:, 10:-10, 10:-10] = -850.0
    return a + rng.normal(0, 10, shape).astype(np.float32)


def test_clip_and_minmax_with_window_maps_window_to_unit_interval():
    a = np.array([-2000.0, -1000.0, -300.0, 400.0, 3000.0], dtype=np.float32).reshape(1, 1, 5)
    np.testing.assert_allclose(pp.clip_hu(a, (-1000, 400)).ravel(), [-1000, -1000, -300, 400, 400])
    np.testing.assert_allclose(pp.minmax_normalise(a, (-1000, 400)).ravel(), [0, 0, 0.5, 1, 1])


def test_minmax_without_window_is_per_sample_and_matches_torch():
    a = np.stack([_ct(0), _ct(1) * 2 + 500])[:, None]  # (N=2, C=1, K, J, I)
    out = pp.minmax_normalise(a)
    for n in range(2):
        assert out[n].min() == pytest.approx(0.0) and out[n].max() == pytest.approx(1.0)
        np.testing.assert_allclose(out[n, 0], pp.minmax_normalise(a[n, 0]), atol=1e-6)
    np.testing.assert_allclose(pp.minmax_normalise(torch.from_numpy(a)).numpy(), out, atol=1e-6)
    assert np.all(pp.minmax_normalise(np.full((2, 3, 4), 7.0)) == 0)  # constant -> 0, no NaN


def test_zscore_zero_mean_unit_std_per_sample():
    a = np.stack([_ct(0), _ct(1) * 3])[:, None]
    out = pp.zscore_normalise(a)
    np.testing.assert_allclose(out.mean(axis=(-3, -2, -1)), 0, atol=1e-4)
    np.testing.assert_allclose(out.std(axis=(-3, -2, -1)), 1, atol=1e-4)
    np.testing.assert_allclose(pp.zscore_normalise(torch.from_numpy(a)).numpy(), out, atol=1e-4)
    assert np.all(pp.zscore_normalise(np.ones((2, 3, 4))) == 0)


def test_gamma_default_1_35_darkens_mid_grey():
    a = np.array([0.0, 0.25, 0.5, 1.0, 1.2], dtype=np.float32).reshape(1, 1, 5)
    out = pp.gamma_correct(a)
    np.testing.assert_allclose(out.ravel(), [0, 0.25**1.35, 0.5**1.35, 1, 1], rtol=1e-6)
    np.testing.assert_allclose(pp.gamma_correct(torch.from_numpy(a)).numpy(), out, rtol=1e-6)
    with pytest.raises(InvalidInputError, match="gamma"):
        pp.gamma_correct(a, gamma=-1)


def test_volume_in_volume_out_keeps_geometry():
    m = axis_aligned_matrix((0.7, 0.7, 2.5), (10, -20, 30))
    vol = Volume(_ct(), m, {"modality": "CT"})
    for out in (
        pp.clip_hu(vol, (-1000, 400)),
        pp.minmax_normalise(vol, (-1000, 400)),
        pp.zscore_normalise(vol),
        pp.sobel_magnitude(vol),
        pp.noise_score(vol) and vol,
        pp.apply_card_preprocessing(vol, {"hu_window": (-1000, 400), "gamma": 1.35}),
    ):
        assert isinstance(out, Volume)
        np.testing.assert_array_equal(out.ijk_to_ras, m)
        assert out.meta["modality"] == "CT"


def test_clahe_raises_local_contrast_slicewise_and_3d():
    # a low-contrast gradient image: CLAHE must spread its histogram
    k, j, i = np.mgrid[0:6, 0:64, 0:64]
    a = (0.45 + 0.1 * i / 63 + 0.01 * np.sin(j / 3.0)).astype(np.float32)
    for mode in ("slice", "3d"):
        out = pp.clahe(a, mode=mode)
        assert out.shape == a.shape and out.dtype == np.float32
        assert 0 <= out.min() and out.max() <= 1
        assert out.std() > 3 * a.std()
    # slice mode equalises each slice on its own: identical slices give identical outputs
    out = pp.clahe(a, mode="slice")
    np.testing.assert_allclose(out[0], out[5])
    torch_out = pp.clahe(torch.from_numpy(a)[None, None], mode="slice")
    np.testing.assert_allclose(torch_out[0, 0].numpy(), out, atol=1e-6)
    with pytest.raises(InvalidInputError, match="clahe mode"):
        pp.clahe(a, mode="2.5d")


def test_sobel_unit_step_and_torch_agrees_with_scipy():
    a = np.zeros((8, 8, 8), dtype=np.float32)
    a[:, :, 4:] = 1.0
    mag = pp.sobel_magnitude(a)
    np.testing.assert_allclose(mag[:, :, 3:5], 1.0, atol=1e-6)  # a unit step gives 1
    assert np.all(mag[:, :, :3] == 0) and np.all(mag[:, :, 5:] == 0)
    ref = np.sqrt(sum(ndimage.sobel(a, axis=ax) ** 2 for ax in range(3))) / 16
    np.testing.assert_allclose(mag, ref, atol=1e-6)

    batch = np.random.default_rng(0).random((2, 1, 7, 9, 10)).astype(np.float32)
    np.testing.assert_allclose(
        pp.sobel_magnitude(torch.from_numpy(batch)).numpy(), pp.sobel_magnitude(batch), atol=1e-5
    )
    # batch members do not bleed into each other
    np.testing.assert_allclose(pp.sobel_magnitude(batch)[1, 0], pp.sobel_magnitude(batch[1, 0]), atol=1e-6)

    enhanced = pp.sobel_enhance(a * 0.5, weight=0.5)
    assert enhanced[0, 0, 3] == pytest.approx(0.25)  # 0 + 0.5 * (0.5 step)
    assert enhanced[0, 0, 0] == 0 and enhanced[0, 0, 7] == pytest.approx(0.5)


def test_noise_score_of_white_noise_is_20_sigma_squared():
    # in-plane Laplacian [1, -2, 1] on two axes: 16 + 4 * 1 = 20 times the noise variance
    sigma = 15.0
    noise = np.random.default_rng(0).normal(0, sigma, (6, 128, 128))
    assert pp.noise_score(noise) == pytest.approx(20 * sigma**2, rel=0.03)
    per_slice = pp.noise_score(noise, per_slice=True)
    assert per_slice.shape == (6,)
    np.testing.assert_allclose(per_slice, 20 * sigma**2, rtol=0.05)


def test_noise_score_flags_the_noisy_slice_and_honours_mask():
    a = _ct(3, shape=(10, 48, 48)).astype(np.float64)
    a[6] += np.random.default_rng(1).normal(0, 60, a[6].shape)
    scores = pp.noise_score(a, per_slice=True)
    assert np.flatnonzero(pp.flag_noisy(scores)).tolist() == [6]
    mask = np.zeros(a.shape, dtype=bool)
    mask[:, 14:-14, 14:-14] = True  # inside the uniform "lung": only noise is left
    masked = pp.noise_score(a, mask=mask, per_slice=True)
    np.testing.assert_allclose(masked[:6], 20 * 10**2, rtol=0.35)
    assert pp.noise_score(a, mask=mask) < pp.noise_score(a)  # the body edges add Laplacian energy
    empty = np.zeros(a.shape, dtype=bool)
    empty[2] = True
    assert np.isnan(pp.noise_score(a, mask=empty, per_slice=True)[0])
    with pytest.raises(InvalidInputError, match="mask is empty"):
        pp.noise_score(a, mask=np.zeros(a.shape, dtype=bool))
    assert not pp.flag_noisy([np.nan, np.nan]).any()


def test_apply_card_preprocessing_all_kinds_and_orders():
    a = _ct()
    card = {"hu_window": (-1000, 400), "normalisation": "minmax"}
    out = pp.apply_card_preprocessing(a, card)
    np.testing.assert_allclose(out, pp.minmax_normalise(a, (-1000, 400)))
    full = {"hu_window": (-1000, 400), "normalisation": "zscore", "gamma": 1.35, "clahe": True, "sobel": 0.3}
    expected = pp.zscore_normalise(
        pp.sobel_enhance(pp.clahe(pp.gamma_correct(pp.minmax_normalise(a, (-1000, 400)), 1.35), "slice"), 0.3)
    )
    np.testing.assert_allclose(pp.apply_card_preprocessing(a, full), expected, atol=1e-5)
    t = pp.apply_card_preprocessing(torch.from_numpy(a)[None, None], full)
    assert isinstance(t, torch.Tensor) and t.shape == (1, 1) + a.shape
    np.testing.assert_allclose(t[0, 0].numpy(), expected, atol=1e-4)

    class Card:  # attribute access, as on a ModelCard dataclass
        hu_window = (-1000, 400)
        normalisation = "none"

    np.testing.assert_allclose(pp.apply_card_preprocessing(a, Card()), np.clip(a, -1000, 400))
    with pytest.raises(InvalidInputError, match="normalisation"):
        pp.apply_card_preprocessing(a, {"normalisation": "max"})
    with pytest.raises(InvalidInputError, match="need normalised"):
        pp.apply_card_preprocessing(a, {"normalisation": "none", "gamma": 1.35})
    with pytest.raises(InvalidInputError, match="hu_window"):
        pp.apply_card_preprocessing(a, {"hu_window": (400, -1000)})
    with pytest.raises(InvalidInputError, match="K, J, I"):
        pp.minmax_normalise(np.zeros((4, 4)))


def test_real_chest_crop_preprocessing_and_noise():
    vol = read_volume(data_path("totalsegmentator", "chest_crop_pulmonary.nii.gz"))
    out = pp.apply_card_preprocessing(vol, {"hu_window": (-1000, 400), "gamma": 1.35, "clahe": "slice"})
    assert isinstance(out, Volume) and out.shape == vol.shape
    assert 0 <= out.array.min() and out.array.max() <= 1
    # lung (air-like) voxels stay darker than soft tissue after every step
    air, tissue = vol.array < -700, (vol.array > 0) & (vol.array < 100)
    assert out.array[air].mean() < out.array[tissue].mean() - 0.2
    # a slice with added noise (sigma 150 HU) is the one flagged among the real slices,
    # whose own scores vary 8-fold with the anatomy
    noisy = vol.array.astype(np.float32)
    noisy[50] += np.random.default_rng(0).normal(0, 150, noisy[50].shape).astype(np.float32)
    flags = pp.flag_noisy(pp.noise_score(noisy, per_slice=True))
    assert np.flatnonzero(flags).tolist() == [50]
    resampled = resample(vol, (3.0, 3.0, 3.0))
    np.testing.assert_allclose(resampled.shape, np.round(np.array(vol.shape) / 2), atol=1)
