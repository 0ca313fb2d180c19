"""segment_cam on synthetic CAMs with known blobs, and .seg.nrrd files read back by slicerio/SimpleITK."""

from __future__ import annotations

import numpy as np
import pytest

from LungGradCAMLib.core.errors import InvalidInputError, UnsupportedFormatError, VolumeError
from LungGradCAMLib.core.results import Explanation, Segmentation
from LungGradCAMLib.core.volume import LPS_TO_RAS, Volume, axis_aligned_matrix
from LungGradCAMLib.io.segnrrd import PALETTE, write_segmentation
from LungGradCAMLib.pipeline.segment import segment_cam

SPACING = (0.7, 0.8, 2.5)  # i, j, k mm: anisotropic
VOXEL_MM3 = 0.7 * 0.8 * 2.5
#: i and j flipped (an LPS-like grid seen in RAS), origin away from zero
FLIPPED = axis_aligned_matrix(SPACING, (50.0, 60.0, -30.0), np.diag([-1.0, -1.0, 1.0]))


def blobs() -> np.ndarray:
    """A: 36 voxels at 0.9 with a 0.95 peak; B: 24 voxels at 0.7; C: one voxel at 0.8."""
    cam = np.zeros((12, 14, 16), np.float32)
    cam[2:5, 3:6, 4:8] = 0.9
    cam[3, 4, 5] = 0.95
    cam[8:10, 9:12, 10:14] = 0.7
    cam[0, 0, 15] = 0.8
    return cam


def explanation(cam: Volume, **kw) -> Explanation:
    return Explanation({"nodule": 0.9, "no nodule": 0.1}, "nodule", cam, "gradcam", "nodule", **kw)


def test_regions_volumes_and_ras_positions_on_a_flipped_anisotropic_grid():
    seg = segment_cam(Volume(blobs(), FLIPPED), threshold=0.5, min_volume_mm3=2.0)
    assert seg.threshold == 0.5
    assert [r.label for r in seg.regions] == [1, 2]  # C (1 voxel = 1.4 mm³) dropped
    a, b = seg.regions
    assert (a.voxels, b.voxels) == (36, 24)
    assert a.volume_mm3 == pytest.approx(36 * VOXEL_MM3) and a.volume_ml == pytest.approx(36 * VOXEL_MM3 / 1000)
    assert (a.peak_cam, b.peak_cam) == (pytest.approx(0.95), pytest.approx(0.7))
    assert a.mean_cam == pytest.approx((35 * 0.9 + 0.95) / 36)
    # centroid of A: i 5.5, j 4, k 3 -> x = 50 - 0.7*5.5, y = 60 - 0.8*4, z = -30 + 2.5*3
    assert a.centroid_ras == pytest.approx((46.15, 56.8, -22.5))
    assert a.peak_ras == pytest.approx((50 - 0.7 * 5, 56.8, -22.5))
    assert a.bbox_ijk == ((2, 5), (3, 6), (4, 8))
    assert a.bbox_ras[0] == pytest.approx((50 - 0.7 * 7, 60 - 0.8 * 5, -25.0))
    assert a.bbox_ras[1] == pytest.approx((50 - 0.7 * 4, 60 - 0.8 * 3, -20.0))
    assert (a.name, a.color, b.color) == ("heat-map region 1", PALETTE[0], PALETTE[1])
    assert a.mean_hu is None and a.score is None
    labels = seg.labelmap.array
    np.testing.assert_array_equal(seg.labelmap.ijk_to_ras, FLIPPED)
    assert labels.dtype == np.uint8
    assert np.count_nonzero(labels[2:5, 3:6, 4:8] == 1) == 36 and np.count_nonzero(labels == 2) == 24
    assert labels[0, 0, 15] == 0


def test_hottest_first_and_max_regions():
    cam = Volume(blobs(), FLIPPED)
    every = segment_cam(cam, min_volume_mm3=0, max_regions=None)
    assert [r.peak_cam for r in every.regions] == pytest.approx([0.95, 0.8, 0.7])
    assert [r.voxels for r in every.regions] == [36, 1, 24]
    two = segment_cam(cam, min_volume_mm3=0, max_regions=2)
    assert [r.voxels for r in two.regions] == [36, 1]
    assert set(np.unique(two.labelmap.array)) == {0, 1, 2}
    # equal peaks: the larger region comes first
    flat = blobs()
    flat[flat > 0] = 0.9
    assert [r.voxels for r in segment_cam(Volume(flat, FLIPPED), min_volume_mm3=0).regions] == [36, 24, 1]


def test_regions_are_26_connected():
    cam = np.zeros((4, 4, 4), np.float32)
    cam[1, 1, 1] = cam[2, 2, 2] = 1.0  # touching only at a corner
    seg = segment_cam(Volume(cam, np.eye(4)), min_volume_mm3=0)
    assert len(seg.regions) == 1 and seg.regions[0].voxels == 2


def test_oblique_grid_volume_and_centroid():
    angle = np.deg2rad(30)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    m = axis_aligned_matrix((1.0, 2.0, 3.0), (5.0, -7.0, 11.0), rotation)
    cam = np.zeros((6, 6, 6), np.float32)
    cam[1:3, 2:4, 3:5] = 0.8
    (region,) = segment_cam(Volume(cam, m), min_volume_mm3=0).regions
    assert region.volume_mm3 == pytest.approx(8 * 6.0)
    expected = (m @ [3.5, 2.5, 1.5, 1.0])[:3]
    assert region.centroid_ras == pytest.approx(tuple(expected))
    corners = np.array([(m @ [i, j, k, 1])[:3] for i in (3, 4) for j in (2, 3) for k in (1, 2)])
    assert region.bbox_ras[0] == pytest.approx(tuple(corners.min(0)))
    assert region.bbox_ras[1] == pytest.approx(tuple(corners.max(0)))


def test_otsu_and_percentile_thresholds():
    from skimage.filters import threshold_otsu

    rng = np.random.default_rng(0)
    cam = (0.1 + 0.05 * rng.random((12, 14, 16))).astype(np.float32)
    cam[blobs() > 0] = 0.8
    volume = Volume(cam, FLIPPED)
    otsu = segment_cam(volume, threshold="otsu", min_volume_mm3=0)
    assert otsu.threshold == pytest.approx(threshold_otsu(cam))
    assert [r.voxels for r in otsu.regions] == [36, 24, 1]
    p99 = segment_cam(volume, threshold="p99", min_volume_mm3=0, max_regions=None)
    assert p99.threshold == pytest.approx(np.percentile(cam, 99))
    assert segment_cam(volume, threshold=("percentile", 99), min_volume_mm3=0).threshold == p99.threshold
    assert sum(r.voxels for r in p99.regions) == np.count_nonzero(cam >= p99.threshold)
    # percentiles are taken inside `within`
    within = np.zeros(cam.shape, bool)
    within[:6] = True
    inside = segment_cam(volume, threshold="p90", within=within, min_volume_mm3=0)
    assert inside.threshold == pytest.approx(np.percentile(cam[within], 90))


def test_lung_mask_ct_and_score_map_from_the_explanation():
    cam = Volume(blobs(), FLIPPED)
    lungs = np.ones(cam.shape, bool)
    lungs[8:] = False  # B lies outside the lungs
    hu = np.full(cam.shape, -800.0, np.float32)
    hu[2:5, 3:6, 4:8] = 40.0
    hu[2, 3, 4] = 100.0
    score = np.zeros(cam.shape, np.float32)
    score[2:5, 3:6, 4:8] = 0.3
    score[4, 5, 7] = 0.6
    ex = explanation(cam, ct=cam.with_array(hu), lung_mask=lungs, score_map=cam.with_array(score))
    seg = segment_cam(ex, min_volume_mm3=0)
    assert [r.voxels for r in seg.regions] == [36, 1]
    a = seg.regions[0]
    assert a.mean_hu == pytest.approx((35 * 40 + 100) / 36) and a.max_hu == pytest.approx(100.0)
    assert a.score == pytest.approx(0.6) and seg.regions[1].score == 0.0
    assert [r.voxels for r in segment_cam(ex, within=False, min_volume_mm3=0).regions] == [36, 1, 24]
    # an explicit ct overrides the explanation's
    other = segment_cam(ex, min_volume_mm3=0, ct=cam.with_array(np.zeros(cam.shape, np.int16)))
    assert other.regions[0].mean_hu == 0.0


def test_an_all_zero_cam_has_no_region():
    seg = segment_cam(Volume(np.zeros((4, 5, 6), np.float32), FLIPPED), threshold=0.0)
    assert seg.regions == [] and not seg.labelmap.array.any()
    assert segment_cam(Volume(np.zeros((4, 5, 6), np.float32), FLIPPED), threshold="otsu").regions == []


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"threshold": 1.5}, InvalidInputError, "not a level"),
        ({"threshold": [0.5]}, InvalidInputError, "not a level"),
        ({"threshold": "p200"}, InvalidInputError, "percentile"),
        ({"threshold": "mean"}, InvalidInputError, "not understood"),
        ({"within": np.ones((2, 2, 2), bool)}, InvalidInputError, "within"),
        ({"min_volume_mm3": -1}, InvalidInputError, "min_volume_mm3"),
        ({"max_regions": 0}, InvalidInputError, "max_regions"),
        ({"ct": Volume(np.zeros((12, 14, 16)), np.eye(4))}, VolumeError, "geometry"),
    ],
)
def test_bad_arguments_are_refused(kwargs, error, match):
    with pytest.raises(error, match=match):
        segment_cam(Volume(blobs(), FLIPPED), **kwargs)


def test_bad_cams_are_refused():
    with pytest.raises(InvalidInputError, match="Volume"):
        segment_cam(blobs())
    with pytest.raises(InvalidInputError, match="normalise"):
        segment_cam(Volume(blobs() * 10, FLIPPED), threshold=0.5)
    nan = blobs()
    nan[0, 0, 0] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        segment_cam(Volume(nan, FLIPPED))
    # an unnormalised CAM is fine with a relative threshold
    assert len(segment_cam(Volume(blobs() * 10, FLIPPED), threshold="otsu", min_volume_mm3=0).regions) == 3


# --- .seg.nrrd ------------------------------------------------------------------------------------

OBLIQUE = axis_aligned_matrix(
    (0.7, 0.8, 2.5),
    (-12.0, 30.0, 7.0),
    np.array([[0.0, -1.0, 0.0], [np.cos(0.3), 0.0, np.sin(0.3)], [np.sin(0.3), 0.0, -np.cos(0.3)]]),
)


@pytest.mark.parametrize("matrix", [FLIPPED, OBLIQUE], ids=["flipped", "oblique"])
def test_seg_nrrd_round_trip_with_slicerio_and_simpleitk(tmp_path, matrix):
    import SimpleITK as sitk
    import slicerio

    seg = segment_cam(Volume(blobs(), matrix), min_volume_mm3=0)
    path = write_segmentation(seg, tmp_path / "out" / "hot.seg.nrrd", names={2: "second"})
    assert [p.name for p in path.parent.iterdir()] == ["hot.seg.nrrd"]  # no temporary left

    read = slicerio.read_segmentation(str(path))
    np.testing.assert_allclose(read["ijkToLPS"], LPS_TO_RAS @ matrix, atol=1e-9)
    assert read["masterRepresentation"] == "Binary labelmap"
    voxels = read["voxels"].transpose(2, 1, 0)  # i, j, k -> K, J, I
    np.testing.assert_array_equal(voxels, seg.labelmap.array)
    segments = read["segments"]
    assert [s["name"] for s in segments] == ["heat-map region 1", "second", "heat-map region 3"]
    assert [s["labelValue"] for s in segments] == [1, 2, 3]
    for segment, region in zip(segments, seg.regions):
        assert np.count_nonzero(slicerio.segment_mask(read, segment["id"])) == region.voxels
        assert segment["color"] == pytest.approx(list(region.color))
        (k0, k1), (j0, j1), (i0, i1) = region.bbox_ijk
        assert segment["extent"] == [i0, i1 - 1, j0, j1 - 1, k0, k1 - 1]

    image = Volume.from_sitk(sitk.ReadImage(str(path)))
    np.testing.assert_allclose(image.ijk_to_ras, matrix, atol=1e-9)
    np.testing.assert_array_equal(image.array, seg.labelmap.array)


def test_a_lung_mask_as_a_one_segment_file(tmp_path):
    import slicerio

    mask = np.zeros((5, 6, 7), bool)
    mask[1:4, 1:5, 2:6] = True
    path = write_segmentation(
        Volume(mask, FLIPPED), tmp_path / "lungs.seg.nrrd", names={1: "lungs"}, colors={1: (0.5, 0.7, 1.0)}
    )
    read = slicerio.read_segmentation(str(path))
    (segment,) = read["segments"]
    assert (segment["name"], segment["color"]) == ("lungs", [0.5, 0.7, 1.0])
    assert np.count_nonzero(slicerio.segment_mask(read, "lungs")) == mask.sum()
    # a Segmentation without region records names its labels generically
    empty = Segmentation(Volume(mask.astype(np.uint8) * 3, FLIPPED))
    read = slicerio.read_segmentation(str(write_segmentation(empty, tmp_path / "x.seg.nrrd")))
    assert [(s["name"], s["labelValue"]) for s in read["segments"]] == [("segment 3", 3)]


def test_write_segmentation_refuses_bad_input(tmp_path):
    seg = segment_cam(Volume(blobs(), FLIPPED))
    with pytest.raises(UnsupportedFormatError, match="seg.nrrd"):
        write_segmentation(seg, tmp_path / "hot.nrrd")
    with pytest.raises(InvalidInputError, match="integer"):
        write_segmentation(Volume(blobs(), FLIPPED), tmp_path / "float.seg.nrrd")
    with pytest.raises(InvalidInputError, match="Segmentation"):
        write_segmentation(blobs(), tmp_path / "array.seg.nrrd")
    assert list(tmp_path.iterdir()) == []
