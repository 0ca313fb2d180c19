"""PNG montages: written atomically, orientation conventions, physical aspect, contours, CAM."""

from __future__ import annotations

import itertools
import sys

import matplotlib.image as mpimg
import numpy as np
import pytest

from LungGradCAMLib.core.errors import InvalidInputError, UnsupportedFormatError, VolumeError
from LungGradCAMLib.core.volume import Volume
from LungGradCAMLib.io.render import MIN_VIEW_ASPECT, ZoomView, save_montage

CENTRE = np.array([10.0, -20.0, -150.0])  # RAS of the scene's centre
EXTENT = np.array([100.0, 120.0, 120.0])  # mm along x (R), y (A), z (S)
STEP = np.array([2.0, 2.0, 3.0])  # voxel size along x, y, z
MARKER = CENTRE + np.array([25.0, 25.0, 25.0])  # right, anterior, superior of the centre
RADIUS = 9.0


def scene(axes=(0, 1, 2), signs=(-1, -1, 1)) -> Volume:
    """The same physical scene (air, one bright ball at MARKER) stored with index axis (i, j, k)
    along RAS axis ``axes[n]`` in direction ``signs[n]``."""
    direction = np.zeros((3, 3))
    for n, (axis, sign) in enumerate(zip(axes, signs)):
        direction[axis, n] = sign
    spacing = STEP[list(axes)]
    size = np.round(EXTENT[list(axes)] / spacing).astype(int)
    m = np.eye(4)
    m[:3, :3] = direction * spacing
    m[:3, 3] = CENTRE - m[:3, :3] @ ((size - 1) / 2)
    vol = Volume(np.zeros(size[::-1], np.float32), m)
    ijk = np.indices(vol.shape).reshape(3, -1).T[:, ::-1]
    inside = np.linalg.norm(vol.ijk_to_ras_points(ijk) - MARKER, axis=1) <= RADIUS
    vol.array[...] = np.where(inside, 100.0, -1000.0).reshape(vol.shape)
    return vol


def panels(png: np.ndarray):
    """(columns, rows) slices of the three image panels: runs of columns that are not figure
    background (air shows grey in the lung window, the background is black)."""
    grey = png[..., :3].mean(axis=-1)
    used = (grey > 0.1).mean(axis=0) > 0.2
    edges = np.flatnonzero(np.diff(np.r_[0, used.astype(int), 0]))
    runs = [slice(a, b) for a, b in zip(edges[::2], edges[1::2]) if b - a > 10]
    out = []
    for cols in runs:
        rows = np.flatnonzero((grey[:, cols] > 0.1).mean(axis=1) > 0.5)
        out.append((cols, slice(rows[0], rows[-1] + 1)))
    return out


def marker_box(png: np.ndarray, cols: slice, rows: slice):
    """Centre offset (x, y) from the panel centre in pixels, and (width, height) of the white ball."""
    rgb = png[rows, cols, :3]
    white = rgb.min(axis=-1) > 0.9
    ys, xs = np.nonzero(white)
    centre = np.array([(cols.stop - cols.start) / 2, (rows.stop - rows.start) / 2])
    return np.array([xs.mean(), ys.mean()]) - centre, (np.ptp(xs) + 1, np.ptp(ys) + 1)


def render(vol: Volume, path, **kw) -> np.ndarray:
    centre = np.round(vol.ras_to_ijk_points(MARKER)[0]).astype(int)
    save_montage(vol, path, centre, **kw)
    return mpimg.imread(path)


STORAGES = [
    ((0, 1, 2), (-1, -1, 1)),  # standard axial (i -> L, j -> P, k -> S)
    ((0, 1, 2), (1, 1, -1)),  # every axis flipped
    ((1, 2, 0), (1, -1, -1)),  # permuted: a sagittal-like stack
    ((2, 0, 1), (-1, 1, 1)),
]


@pytest.mark.parametrize("axes,signs", STORAGES)
def test_radiological_orientation_and_aspect(tmp_path, axes, signs):
    png = render(scene(axes, signs), tmp_path / "m.png")
    found = panels(png)
    assert len(found) == 3
    for name, (cols, rows) in zip(("axial", "coronal", "sagittal"), found):
        offset, (width, height) = marker_box(png, cols, rows)
        # axial: patient right on the image left, anterior up; coronal: right left, superior up;
        # sagittal: anterior left, superior up. The ball sits right-anterior-superior.
        assert offset[0] < -5 and offset[1] < -5, (name, offset)
        # drawn at the physical aspect ratio although k voxels are 1.5x longer
        assert 0.8 < width / height < 1.25, (name, width, height)


def test_same_picture_whatever_the_storage(tmp_path):
    pictures = [render(scene(a, s), tmp_path / f"m{n}.png") for n, (a, s) in enumerate(STORAGES)]
    for first, other in itertools.combinations(pictures, 2):
        assert first.shape == other.shape
        boxes = [[marker_box(p, c, r)[0] for c, r in panels(p)] for p in (first, other)]
        np.testing.assert_allclose(boxes[0], boxes[1], atol=2.0)


def test_phantom_montage_with_contours(tmp_path, small_phantom):
    ph = small_phantom
    nodule = ph.nodules[0]
    centre = np.round(ph.volume.ras_to_ijk_points(nodule.center_ras)[0]).astype(int)
    path = save_montage(
        ph.volume,
        tmp_path / "out" / "montage.png",
        centre,
        contours={"nodules": ph.nodule_labelmap > 0, "lungs": ph.lungs},
        title="phantom",
    )
    assert path == tmp_path / "out" / "montage.png"
    assert [p.name for p in path.parent.iterdir()] == ["montage.png"]  # no temporary left
    png = mpimg.imread(path)
    assert png.shape[0] >= 400 and png.shape[1] > 2 * png.shape[0]
    rgb = png[..., :3]
    assert rgb.std() > 0.1
    red = (rgb[..., 0] > 0.8) & (rgb[..., 1] < 0.35) & (rgb[..., 2] < 0.35)
    cyan = (rgb[..., 0] < 0.3) & (rgb[..., 1] > 0.7) & (rgb[..., 2] > 0.8)
    assert red.sum() > 20 and cyan.sum() > 200


def test_cam_overlay(tmp_path, small_phantom):
    vol = small_phantom.volume
    plain = mpimg.imread(save_montage(vol, tmp_path / "plain.png"))
    cam = np.zeros(vol.shape, np.float32)
    k, j, i = (s // 2 for s in vol.shape)
    cam[k - 4 : k + 4, j - 10 : j + 10, i - 10 : i + 10] = 1.0
    over = mpimg.imread(save_montage(vol, tmp_path / "cam.png", cam=vol.with_array(cam), cam_opacity=0.6))
    assert over.shape[1] > plain.shape[1]  # colour bar

    def coloured(png: np.ndarray) -> int:
        """Coloured pixels inside the panels: the CT is grey, only the orientation labels and
        the CAM are not."""
        sat = png[..., :3].max(axis=-1) - png[..., :3].min(axis=-1) > 0.2
        return sum(int(sat[rows, cols].sum()) for cols, rows in panels(png)[:3])  # not the colour bar

    assert coloured(over) > coloured(plain) + 1000
    # near zero the overlay is transparent: a zero CAM colours nothing
    zero = mpimg.imread(save_montage(vol, tmp_path / "zero.png", cam=np.zeros(vol.shape, np.float32)))
    assert coloured(zero) <= coloured(plain) + 100  # labels antialias a little differently


def _coloured(png: np.ndarray) -> int:
    sat = png[..., :3].max(axis=-1) - png[..., :3].min(axis=-1) > 0.2
    return sum(int(sat[rows, cols].sum()) for cols, rows in panels(png)[:3])


def test_no_tint_outside_the_cam_mask_and_a_zoomed_row_per_region(tmp_path, small_phantom):
    """overlay.png's parts: the CAM is drawn only inside ``cam_mask`` (the lungs), and each
    ZoomView adds a row of three zoomed views."""
    vol = small_phantom.volume
    cam = vol.with_array(np.ones(vol.shape, np.float32))  # heat everywhere
    zero = mpimg.imread(save_montage(vol, tmp_path / "zero.png", cam=np.zeros(vol.shape, np.float32)))
    hidden = mpimg.imread(save_montage(vol, tmp_path / "hidden.png", cam=cam, cam_mask=np.zeros(vol.shape, bool)))
    lungs = mpimg.imread(save_montage(vol, tmp_path / "lungs.png", cam=cam, cam_mask=small_phantom.lungs))
    full = mpimg.imread(save_montage(vol, tmp_path / "full.png", cam=cam))
    assert abs(_coloured(hidden) - _coloured(zero)) <= 100
    assert _coloured(zero) + 1000 < _coloured(lungs) < _coloured(full) - 1000
    k, j, i = (s // 2 for s in vol.shape)
    zooms = [
        ZoomView("heat-map region 1", (i, j, k), ((k - 2, k + 2), (j - 3, j + 3), (i - 3, i + 3))),
        ZoomView("heat-map region 2", (i // 2, j, k), ((k - 1, k + 1), (j - 1, j + 1), (i // 2 - 1, i // 2 + 1))),
    ]
    rows = mpimg.imread(save_montage(vol, tmp_path / "rows.png", cam=cam, zooms=zooms))
    assert rows.shape[0] > full.shape[0] * 1.5 and rows.shape[1] == full.shape[1]
    with pytest.raises(InvalidInputError, match="outside the volume"):
        save_montage(vol, tmp_path / "bad.png", zooms=[ZoomView("x", (10**4, 0, 0), ((0, 1),) * 3)])


def test_a_thin_slab_is_stretched_to_stay_readable(tmp_path):
    """A 15 mm slab of a 300 mm field: its coronal and sagittal views would be 1:20 strips; they
    are stretched by a whole factor to at least MIN_VIEW_ASPECT of their width."""
    m = np.diag([1.5, 1.5, 3.0, 1.0])
    slab = Volume(np.where(np.indices((5, 200, 200)).sum(0) % 40 < 20, -800.0, 40.0).astype(np.float32), m)
    png = mpimg.imread(save_montage(slab, tmp_path / "slab.png"))
    (axial_cols, axial_rows), (coronal_cols, coronal_rows) = panels(png)[:2]
    ratio = (coronal_rows.stop - coronal_rows.start) / (coronal_cols.stop - coronal_cols.start)
    assert ratio >= MIN_VIEW_ASPECT * 0.9 and ratio < 1.0  # 15 mm stretched x6: 90 mm of 300 mm


def test_oblique_volume_renders(tmp_path):
    vol = scene()
    angle = np.deg2rad(20)
    rot = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    m = vol.ijk_to_ras.copy()
    m[:3, :3] = rot @ m[:3, :3]
    png = mpimg.imread(save_montage(Volume(vol.array, m), tmp_path / "oblique.png"))
    assert len(panels(png)) == 3


def test_errors_leave_no_file(tmp_path, small_phantom):
    vol = small_phantom.volume
    bad = [
        (UnsupportedFormatError, dict(path=tmp_path / "m.jpg")),
        (InvalidInputError, dict(contours={"lungs": np.zeros((3, 3, 3), bool)})),
        (VolumeError, dict(cam=np.zeros((3, 3, 3), np.float32))),
        (InvalidInputError, dict(center_ijk=(0, 0, vol.shape[0]))),
        (InvalidInputError, dict(window=(100.0, -100.0))),
        (InvalidInputError, dict(cam_opacity=2.0)),
    ]
    for error, kw in bad:
        path = kw.pop("path", tmp_path / "m.png")
        with pytest.raises(error):
            save_montage(vol, path, **kw)
    assert list(tmp_path.iterdir()) == []


def test_no_pyplot_state(tmp_path, small_phantom):
    before = sys.modules.get("matplotlib.pyplot")
    figures = before.get_fignums() if before else []
    save_montage(small_phantom.volume, tmp_path / "m.png")
    after = sys.modules.get("matplotlib.pyplot")
    assert after is before and (after is None or after.get_fignums() == figures)
