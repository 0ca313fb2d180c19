"""Volume geometry: LPS/RAS conversion at the SimpleITK boundary, file round trips, crop, resample."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

import LungGradCAMLib as lgc
from LungGradCAMLib.core.errors import LungGradCAMError, UnsupportedFormatError, VolumeError
from LungGradCAMLib.core.volume import crop, max_voxels, resample, resample_to


def _oblique_matrix(flip: bool = False) -> np.ndarray:
    rot = Rotation.from_euler("xyz", [17.0, -8.0, 31.0], degrees=True).as_matrix()
    if flip:
        rot = rot @ np.diag([-1.0, 1.0, -1.0])  # axis-flipped: left-handed index axes
    m = np.eye(4)
    m[:3, :3] = rot * np.array([0.7, 0.8, 2.5])
    m[:3, 3] = [-123.4, 56.7, -890.1]
    return m


MATRICES = {
    "slicer_axial": np.diag([-0.7, -0.7, 2.5, 1.0]),
    "identity": np.eye(4),
    "oblique": _oblique_matrix(),
    "oblique_flipped": _oblique_matrix(flip=True),
}


@pytest.fixture
def array():
    rng = np.random.default_rng(1)
    return rng.normal(-500, 300, size=(7, 9, 11)).astype(np.float32)


def test_properties():
    m = np.diag([-0.7, -0.8, 2.5, 1.0])
    m[:3, 3] = [10, 20, 30]
    v = lgc.Volume(np.zeros((3, 4, 5)), m)
    np.testing.assert_allclose(v.spacing, [0.7, 0.8, 2.5])
    np.testing.assert_allclose(v.origin, [10, 20, 30])
    np.testing.assert_allclose(v.direction, np.diag([-1.0, -1.0, 1.0]))
    # voxel (i=1, j=2, k=3) -> RAS
    np.testing.assert_allclose(v.ijk_to_ras_points([1, 2, 3]), [[10 - 0.7, 20 - 1.6, 30 + 7.5]])
    np.testing.assert_allclose(v.ras_to_ijk_points(v.ijk_to_ras_points([1, 2, 3])), [[1, 2, 3]])


def test_lps_ras_against_simpleitk():
    """SimpleITK's physical points are LPS: ours must be the same point with x, y negated."""
    m = MATRICES["oblique"]
    v = lgc.Volume(np.zeros((4, 5, 6), np.float32), m)
    img = v.to_sitk()
    for ijk in [(0, 0, 0), (5, 4, 3), (2, 1, 3)]:
        lps = np.array(img.TransformIndexToPhysicalPoint(ijk))
        ras = v.ijk_to_ras_points(ijk)[0]
        np.testing.assert_allclose(ras, lps * [-1, -1, 1], atol=1e-9)
    assert img.GetSize() == (6, 5, 4)  # SimpleITK is (i, j, k); our array is (k, j, i)


@pytest.mark.parametrize("name", sorted(MATRICES))
@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz", ".mha"])
def test_file_round_trip(tmp_path, array, name, suffix):
    v = lgc.Volume(array, MATRICES[name], {"modality": "CT"})
    path = lgc.write_volume(v, tmp_path / f"vol{suffix}")
    w = lgc.read_volume(path)
    np.testing.assert_array_equal(w.array, array)
    # NRRD and MHA store the geometry as decimal doubles: exact within 1e-6 mm. NIfTI stores the
    # sform as float32, so an origin near -890 mm is only good to ~1e-4 mm (a format limit).
    atol = 1e-4 if suffix == ".nii.gz" else 1e-6
    np.testing.assert_allclose(w.ijk_to_ras, v.ijk_to_ras, atol=atol, rtol=0)
    assert lgc.same_geometry(v, w, atol_mm=atol)
    assert not list(tmp_path.glob(".tmp-*")), "temporary files left behind"


def test_read_rejects_nan_and_bad_suffix(tmp_path, array):
    array = array.copy()
    array[1, 2, 3] = np.nan
    path = tmp_path / "nan.nrrd"
    sitk.WriteImage(lgc.Volume(array, np.eye(4)).to_sitk(), str(path))
    with pytest.raises(VolumeError, match="NaN or infinite"):
        lgc.read_volume(path)
    with pytest.raises(UnsupportedFormatError, match="unsupported volume format"):
        lgc.read_volume(tmp_path / "x.png")
    with pytest.raises(VolumeError, match="no such file"):
        lgc.read_volume(tmp_path / "missing.nrrd")
    (tmp_path / "junk.nrrd").write_bytes(b"not a nrrd at all")
    with pytest.raises(VolumeError, match="cannot read"):
        lgc.read_volume(tmp_path / "junk.nrrd")


def test_voxel_limit(tmp_path, array, monkeypatch):
    path = lgc.write_volume(lgc.Volume(array, np.eye(4)), tmp_path / "v.nrrd")
    monkeypatch.setenv("LUNGGRADCAM_MAX_VOXELS", "100")
    assert max_voxels() == 100
    with pytest.raises(VolumeError, match="exceeds the limit"):
        lgc.read_volume(path)


def test_bad_construction():
    with pytest.raises(VolumeError):
        lgc.Volume(np.zeros((3, 3)), np.eye(4))
    with pytest.raises(VolumeError):
        lgc.Volume(np.zeros((3, 3, 3)), np.zeros((4, 4)))
    assert issubclass(VolumeError, LungGradCAMError)


def test_crop_keeps_ras_positions(array):
    v = lgc.Volume(array, MATRICES["oblique_flipped"])
    c = crop(v, ((2, 5), (1, 9), (3, 100)))
    assert c.shape == (3, 8, 8)
    np.testing.assert_array_equal(c.array, array[2:5, 1:9, 3:])
    # voxel (0,0,0) of the crop is voxel (i=3, j=1, k=2) of the original
    np.testing.assert_allclose(c.ijk_to_ras_points([0, 0, 0]), v.ijk_to_ras_points([3, 1, 2]), atol=1e-9)
    with pytest.raises(VolumeError, match="empty"):
        crop(v, ((5, 5), (0, 1), (0, 1)))


def test_resample_preserves_extent_and_values():
    # a linear ramp along i is reproduced by linear interpolation
    k, j, i = np.meshgrid(np.arange(10), np.arange(12), np.arange(16), indexing="ij")
    v = lgc.Volume((i * 2.0).astype(np.float32), np.diag([-1.0, -1.0, 2.0, 1.0]))
    r = resample(v, (0.5, 0.5, 1.0))
    assert r.shape == (20, 24, 32)
    np.testing.assert_allclose(r.spacing, [0.5, 0.5, 1.0])
    # corners of the physical box stay put
    np.testing.assert_allclose(r.ijk_to_ras_points([-0.5, -0.5, -0.5]), v.ijk_to_ras_points([-0.5, -0.5, -0.5]))
    # interior voxels: value = 2 * (continuous i of the original)
    ras = r.ijk_to_ras_points([[9, 5, 5]])
    i_orig = v.ras_to_ijk_points(ras)[0, 0]
    assert r.array[5, 5, 9] == pytest.approx(2 * i_orig, abs=1e-4)
    back = resample_to(r, v)
    assert lgc.same_geometry(back, v)
    np.testing.assert_allclose(back.array[:, :, 1:-1], v.array[:, :, 1:-1], atol=1e-4)
    with pytest.raises(VolumeError):
        resample(v, (0, 1, 1))


def _sitk_resample(volume, reference, order, default):
    """What resample_to computed before its separable path: SimpleITK's Resample."""
    interp = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear}[order]
    src = volume.to_sitk()
    out = sitk.Resample(src, reference.to_sitk(), sitk.Transform(), interp, float(default), src.GetPixelID())
    return sitk.GetArrayFromImage(out)


@pytest.mark.parametrize("name", sorted(MATRICES))
@pytest.mark.parametrize("order", [0, 1])
def test_separable_resampling_equals_simpleitk(name, order):
    """resample_to's separable path (grids with parallel axes) gives SimpleITK's values: linear
    within 1e-6 of the value range (float32 rounding), nearest neighbour exactly, and the default
    value outside, going down to a model grid, back up, and onto a shifted grid that overhangs.
    (Nearest neighbour can differ where a point falls exactly halfway between two voxels, where
    SimpleITK's own rounding decides; these spacings have no such point.)"""
    rng = np.random.default_rng(7)
    src = lgc.Volume(rng.normal(-400, 500, size=(23, 29, 31)).astype(np.float32), MATRICES[name])
    if order == 0:
        src = src.with_array((src.array > -300).astype(np.uint8) * 3)
    coarse = resample(src.with_array(np.zeros(src.shape, np.uint8)), (1.53, 1.91, 3.07))
    shifted = src.ijk_to_ras.copy()
    shifted[:3, 3] = src.ijk_to_ras_points([[-3.3, 2.6, 4.2]])[0]  # overhangs two faces
    outside = 7 if order == 0 else -1024
    for reference in (coarse, lgc.Volume(np.zeros((20, 26, 35), np.uint8), shifted)):
        fast = resample_to(src, reference, order=order, default_value=outside)
        slow = _sitk_resample(src, reference, order, outside)
        assert fast.array.dtype == slow.dtype and lgc.same_geometry(fast, reference)
        assert (slow == outside).any() or reference is coarse
        if order == 0:
            np.testing.assert_array_equal(fast.array, slow)
        else:
            np.testing.assert_allclose(fast.array, slow, rtol=0, atol=1e-6 * np.abs(src.array).max())
        # and back onto the source grid (the CAM's way home)
        back = lgc.Volume(fast.array, reference.ijk_to_ras)
        np.testing.assert_allclose(
            resample_to(back, src, order=order).array,
            _sitk_resample(back, src, order, 0),
            rtol=0,
            atol=1e-6 * np.abs(src.array).max(),
        )


def test_resampling_between_grids_with_turned_axes_uses_simpleitk():
    """Axes that are not parallel (a grid turned by 10 degrees) take SimpleITK's general path."""
    rng = np.random.default_rng(8)
    src = lgc.Volume(rng.normal(size=(9, 10, 11)).astype(np.float32), np.diag([0.9, 0.9, 2.0, 1.0]))
    turned = np.eye(4)
    turned[:3, :3] = Rotation.from_euler("z", 10, degrees=True).as_matrix() * 1.2
    reference = lgc.Volume(np.zeros((8, 9, 9), np.uint8), turned)
    np.testing.assert_array_equal(resample_to(src, reference).array, _sitk_resample(src, reference, 1, 0))


def test_separable_resampling_in_several_slabs_equals_simpleitk():
    """An output of more than one 16 MB slab (so several threads fill it) gives SimpleITK's values."""
    rng = np.random.default_rng(9)
    src = lgc.Volume(rng.random((20, 40, 40), dtype=np.float32), np.diag([6.0, 6.0, 7.0, 1.0]))
    fine = resample(src.with_array(np.zeros(src.shape, np.uint8)), (0.9, 0.9, 2.0))
    assert np.prod(fine.shape) * 4 > (16 << 20)  # two slabs at least
    np.testing.assert_allclose(resample_to(src, fine).array, _sitk_resample(src, fine, 1, 0), rtol=0, atol=1e-6)


def test_a_label_map_is_resampled_by_nearest_neighbour_by_itself():
    """LabelMap (TorchIO's kind): resample/resample_to pick order 0 without being told, keep the
    kind and the labels, and refuse to interpolate; a LabelMap holds integers or a mask."""
    from LungGradCAMLib.core.volume import LabelMap, Volume

    labels = np.zeros((6, 6, 6), dtype=np.uint8)
    labels[2:4, 2:4, 2:4] = 3
    ct = Volume(np.zeros((6, 6, 6), np.float32), np.diag([1.0, 1.0, 1.0, 1.0]))
    label_map = LabelMap.like(ct, labels)
    fine = resample(label_map, (0.4, 0.4, 0.4))
    assert isinstance(fine, LabelMap) and set(np.unique(fine.array)) == {0, 3}
    back = resample_to(fine, label_map)
    assert isinstance(back, LabelMap) and np.array_equal(back.array, labels)
    as_float = resample(ct.with_array(labels.astype(np.float32)), (0.4, 0.4, 0.4))
    assert len(np.unique(as_float.array)) > 2  # what a label map is protected from
    with pytest.raises(VolumeError, match="nearest neighbour"):
        resample(label_map, (0.4, 0.4, 0.4), order=1)
    with pytest.raises(VolumeError, match="integer labels"):
        LabelMap.like(ct, np.zeros((6, 6, 6), np.float32))
    assert LabelMap.like(ct, labels > 0).array.dtype == np.uint8
