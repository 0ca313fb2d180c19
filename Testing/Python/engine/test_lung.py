"""Tests of LungGradCAMLib.engine.lung: lung_mask on phantoms (against their true lungs) and on real CT
(LIDC slabs with reader-outlined nodules, the full chest CT, TotalSegmentator chest crops), and
lung_bbox."""

from __future__ import annotations

import glob

import numpy as np
import pytest

from LungGradCAMLib import phantom
from LungGradCAMLib.core.errors import VolumeError
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix, crop
from LungGradCAMLib.engine.lung import lung_bbox, lung_mask
from LungGradCAMLib.io.volume_files import read_volume

from helpers import data_path


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def volume_l(mask: np.ndarray, volume: Volume) -> float:
    return np.count_nonzero(mask) * float(np.prod(volume.spacing)) / 1e6


@pytest.fixture(scope="module")
def chest_phantoms():
    """Two default-size phantoms: seed 1 with random nodules, seed 7 with juxta-pleural ones."""
    return [
        phantom.chest_ct(seed=1),
        phantom.chest_ct(seed=7, n_nodules=4, nodule_options={"placements": ["juxta-pleural"]}),
    ]


@pytest.fixture(scope="module")
def phantom_masks(chest_phantoms):
    """lung_mask of each phantom, with the default settings."""
    return [lung_mask(p.volume) for p in chest_phantoms]


@pytest.fixture(scope="module")
def full_chest():
    from LungGradCAMLib.io.dicom import load_dicom_series

    volume = load_dicom_series(data_path("full_chest_ct", "dicom"))
    return volume, lung_mask(volume)


# --- phantoms -----------------------------------------------------------------------------------
def test_phantom_dice_against_true_lungs(chest_phantoms, phantom_masks):
    for p, mask in zip(chest_phantoms, phantom_masks):
        assert mask.shape == p.volume.shape and mask.dtype == bool
        assert dice(mask, p.lungs) >= 0.97


def test_phantom_nodules_stay_in_the_mask(chest_phantoms, phantom_masks):
    for p, mask in zip(chest_phantoms, phantom_masks):
        nodules = p.nodule_labelmap > 0
        # nearly all nodule voxels, and the centre of every nodule of 8 mm or more: a juxta-pleural
        # nodule has the chest wall's HU, so where it sits flush in a bend of the wall (as the
        # smallest ones here do) its voxels on the wall are as ambiguous as the wall's own border
        assert np.count_nonzero(nodules & mask) >= 0.93 * np.count_nonzero(nodules)
        for spec in p.nodules:
            i, j, k = np.round(p.volume.ras_to_ijk_points(spec.center_ras)[0]).astype(int)
            if spec.diameter_mm >= 8:
                assert mask[k, j, i], f"{spec.placement} nodule {spec.diameter_mm:.0f} mm lost"
    # without the closing and the lesion margin, juxta-pleural nodules lose voxels: the steps matter
    p, full = chest_phantoms[1], phantom_masks[1]
    bare = lung_mask(p.volume, closing_mm=0, lesion_margin_mm=0)
    nodules = p.nodule_labelmap > 0
    assert np.count_nonzero(nodules & ~bare) > 2 * np.count_nonzero(nodules & ~full)
    assert not np.any(bare & ~full)  # the full mask contains the bare one


def test_numpy_input_and_flipped_storage_agree(chest_phantoms, phantom_masks):
    p, mask = chest_phantoms[0], phantom_masks[0]
    np.testing.assert_array_equal(lung_mask(p.volume.array, spacing_mm=p.volume.spacing), mask)
    # the same CT stored with I and K reversed (the matrix follows): the same voxels, reversed
    m = p.volume.ijk_to_ras.copy()
    m[:3, 3] = p.volume.ijk_to_ras_points([p.volume.shape[2] - 1, 0, p.volume.shape[0] - 1])[0]
    m[:3, 0] *= -1
    m[:3, 2] *= -1
    flipped = Volume(p.volume.array[::-1, :, ::-1].copy(), m)
    assert dice(lung_mask(flipped)[::-1, :, ::-1], mask) > 0.99


def test_dilation_grows_the_mask(chest_phantoms, phantom_masks):
    p, base = chest_phantoms[0], phantom_masks[0]
    grown = lung_mask(p.volume, dilate_mm=4.0)
    assert not np.any(base & ~grown)
    assert np.count_nonzero(grown) > 1.05 * np.count_nonzero(base)


# --- real CT --------------------------------------------------------------------------------------
def _lidc(patient: str):
    import SimpleITK as sitk

    from LungGradCAMLib.io.dicom import load_dicom_series
    from LungGradCAMLib.training.lidc import lidc_nodules

    folder = glob.glob(str(data_path("lidc", f"LIDC-IDRI-{patient}") / "*" / "*"))[0]
    xml = glob.glob(str(data_path("lidc", f"LIDC-IDRI-{patient}") / "*.xml"))[0]
    ours = load_dicom_series(folder)
    # SimpleITK keeps the pixel padding (-2048 / -3024 HU): it must count as outside air
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(folder))
    raw = Volume.from_sitk(reader.Execute())
    # every voxel any reader outlined (consensus of one reading)
    outlined = np.zeros(ours.shape, dtype=bool)
    for nodule in lidc_nodules(xml, ours, consensus=1e-6):
        outlined |= nodule.mask
    return ours, raw, outlined


@pytest.mark.parametrize("patient", ["0001", "0002"])
def test_lidc_slab_holds_every_outlined_nodule_voxel(patient):
    ours, raw, outlined = _lidc(patient)
    assert outlined.any()
    assert raw.array.min() <= -2048  # the padding is really there
    for volume in (ours, raw):
        mask = lung_mask(volume)
        assert not np.any(outlined & ~mask), f"{np.count_nonzero(outlined & ~mask)} outlined voxels outside"
        # a slab: the lungs touch the top and bottom faces and are kept there
        assert mask[0].any() and mask[-1].any()
        assert not np.any(mask & (raw.array <= -2000))  # no padding
        assert np.median(volume.array[mask]) < -700  # lung, not soft tissue
        ml = volume_l(mask, volume) * 1000
        assert 150 < ml < 1500, ml


def test_full_chest_ct_both_lungs_plausible_volume(full_chest):
    full_chest, mask = full_chest
    assert 2.0 < volume_l(mask, full_chest) < 8.0
    # two lungs: the middle of the left-right extent is (nearly) empty at mid-height, both sides full
    i_cols = np.flatnonzero(mask.any(axis=(0, 1)))
    mid = (i_cols[0] + i_cols[-1]) // 2
    k = mask.shape[0] // 2
    halves = mask[k, :, :mid].sum(), mask[k, :, mid:].sum()
    assert min(halves) > 0.3 * max(halves)
    hu = full_chest.array
    assert np.median(hu[mask]) < -700
    # no outside air, table or bowel gas: nothing of the mask within 15 voxels of the in-plane border
    assert not mask[:, :15].any() and not mask[:, -15:].any()
    assert not mask[:, :, :15].any() and not mask[:, :, -15:].any()


def test_full_chest_ct_airway_removal(full_chest):
    full_chest, with_airways = full_chest
    without = lung_mask(full_chest, remove_airways=True)
    # (the lesion margins near the cut airways may move by a voxel or two)
    assert np.count_nonzero(without & ~with_airways) < 1e-3 * np.count_nonzero(with_airways)
    removed_ml = (np.count_nonzero(with_airways) - np.count_nonzero(without)) * np.prod(full_chest.spacing) / 1000
    assert 15 < removed_ml < 200, removed_ml
    # the top slice (above the apices) holds only the trachea: in the default mask, gone without airways
    top = full_chest.shape[0] - 1
    assert with_airways[top].any() and not without[top].any()
    assert 2.0 < volume_l(without, full_chest) < 8.0


@pytest.mark.parametrize("name", ["chest_crop_pulmonary.nii.gz", "chest_crop_aorta.nii.gz"])
def test_totalsegmentator_crops_are_sensible(name):
    vol = read_volume(data_path("totalsegmentator", name))
    mask = lung_mask(vol)
    hu = vol.array
    assert 1.0 < volume_l(mask, vol) < 5.0
    # the crop cuts the lungs: they touch its in-plane border and are kept there
    assert mask[:, :, 0].any() or mask[:, :, -1].any()
    # the mask is lung: dark voxels, and nearly all of the dark lung-like voxels of the middle slices
    assert np.mean(hu[mask] < -500) > 0.85
    mid = slice(vol.shape[0] // 3, 2 * vol.shape[0] // 3)
    lungish = (hu[mid] < -700) & (hu[mid] > -980)
    assert np.count_nonzero(lungish & mask[mid]) > 0.95 * np.count_nonzero(lungish)
    # airway removal works on crops too (the pulmonary crop's top slice holds several air
    # regions, only a later one trachea-like: the search once indexed past its candidates)
    without = lung_mask(vol, remove_airways=True)
    assert np.count_nonzero(without & ~mask) < 1e-3 * mask.sum()  # margins near the cut may move a voxel
    assert 0.9 * mask.sum() < without.sum() <= mask.sum()
    # gas in the stomach/bowel of the lowest slices is not lung
    gas = hu[:5] < -950
    assert np.count_nonzero(gas & mask[:5]) < 0.05 * max(1, np.count_nonzero(gas))


# --- errors and lung_bbox --------------------------------------------------------------------------
def test_errors_name_the_problem():
    m = axis_aligned_matrix((1.0, 1.0, 2.0))
    with pytest.raises(VolumeError, match="is this a chest CT in HU"):
        lung_mask(Volume(np.random.default_rng(0).random((8, 32, 32)).astype(np.float32), m))
    body = np.full((8, 40, 40), -1000.0, dtype=np.float32)
    body[:, 5:-5, 5:-5] = 40.0  # soft tissue, no lung inside
    with pytest.raises(VolumeError, match="no lung found"):
        lung_mask(Volume(body, m))
    gas = body.copy()
    gas[:, 12:28, 12:28] = -1000.0  # 33 ml of pure gas (bowel, stomach), not aerated lung
    coarse = axis_aligned_matrix((2.0, 2.0, 4.0))
    with pytest.raises(VolumeError, match="no lung found"):
        lung_mask(Volume(gas, coarse))
    gas[:, 12:28, 12:28] = -850.0  # the same pocket at the density of lung is taken
    assert lung_mask(Volume(gas, coarse))[:, 14:26, 14:26].all()
    with pytest.raises(VolumeError, match="spacing_mm"):
        lung_mask(body)
    with pytest.raises(VolumeError, match="3D"):
        lung_mask(body[0], spacing_mm=(1, 1, 1))
    nan = body.copy()
    nan[0, 0, 0] = np.nan
    with pytest.raises(VolumeError, match="NaN"):
        lung_mask(nan, spacing_mm=(1, 1, 2))
    with pytest.raises(VolumeError, match="dilate_mm"):
        lung_mask(body, spacing_mm=(1, 1, 2), dilate_mm=-1)


def test_lung_bbox_margins_clipping_and_crop():
    mask = np.zeros((10, 20, 30), dtype=bool)
    mask[3:5, 6:9, 10:20] = True
    assert lung_bbox(mask) == ((3, 5), (6, 9), (10, 20))
    assert lung_bbox(mask, 2) == ((1, 7), (4, 11), (8, 22))
    assert lung_bbox(mask, (5, 0, 15)) == ((0, 10), (6, 9), (0, 30))
    vol = Volume(mask.astype(np.uint8), axis_aligned_matrix((0.5, 0.5, 2.0), (10, 20, 30)))
    cropped = crop(vol, lung_bbox(mask, 1))
    assert cropped.array.sum() == mask.sum() and cropped.shape == (4, 5, 12)
    with pytest.raises(VolumeError, match="empty"):
        lung_bbox(np.zeros((4, 4, 4), dtype=bool))
    with pytest.raises(VolumeError, match="margin_vox"):
        lung_bbox(mask, -1)


@pytest.mark.parametrize(
    "shape, factors",
    [((7, 10, 11), (2, 3, 3)), ((9, 8, 13), (3, 2, 4)), ((6, 6, 6), (1, 2, 2)), ((5, 7, 9), (2, 2, 2))],
)
def test_block_mean_equals_the_mean_of_edge_padded_blocks(shape, factors):
    """The working grid's block means, with the far edge's short blocks completed by repeating the
    last slice, row or column: against numpy's padded reshape-and-mean."""
    from LungGradCAMLib.engine.lung import _block_mean

    hu = np.random.default_rng(2).normal(-500, 300, size=shape).astype(np.float32)
    padded = np.pad(hu, [(0, (-n) % f) for n, f in zip(shape, factors)], mode="edge").astype(np.float64)
    k, j, i = (n // f for n, f in zip(padded.shape, factors))
    expected = padded.reshape(k, factors[0], j, factors[1], i, factors[2]).mean(axis=(1, 3, 5))
    result = _block_mean(hu, factors)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, rtol=0, atol=1e-3)  # HU, float32 sums
