"""The :class:`Volume` type: a 3D image with its geometry, in Slicer's conventions.

* ``array`` axis order is **K, J, I** (slice, row, column) — exactly ``slicer.util.arrayFromVolume``.
* ``ijk_to_ras`` is the 4x4 matrix mapping voxel indices (i, j, k, 1) to **RAS** millimetres —
  exactly ``vtkMRMLScalarVolumeNode.GetIJKToRASMatrix``.

ITK/SimpleITK and DICOM use LPS. The conversion happens here (``from_sitk``/``to_sitk``) and in the
DICOM reader/writer, nowhere else.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Callable, List, Optional, Sequence, Tuple

import numpy as np

from .errors import VolumeError
from .limits import DEFAULT_MAX_VOXELS, check_voxel_limit, max_voxels  # noqa: F401 - public here too

#: Flips the first two axes: LPS <-> RAS (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
#: Air in HU: the fill outside a CT (resampling, padding, deletion), where DICOM pixel padding
#: marks "no data", and the default floor of CT values. The package's one definition.
AIR_HU = -1024.0

#: Voxel sizes (mm) and distances from the origin (mm) a CT can have: anything else is a broken
#: header, and would overflow the resampling arithmetic.
SPACING_RANGE_MM = (1e-3, 1e3)
MAX_POSITION_MM = 1e6


@dataclass
class Volume:
    """A 3D image: ``array`` (K, J, I), ``ijk_to_ras`` (4x4, RAS mm) and a plain ``meta`` dict.

    ``meta`` holds JSON-able facts (patient/study/series/frame-of-reference UIDs, modality,
    description); it never drives geometry.
    """

    array: np.ndarray
    ijk_to_ras: np.ndarray
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise VolumeError(f"a Volume array must be 3D (K, J, I); got shape {self.array.shape}")
        m = np.array(self.ijk_to_ras, dtype=np.float64)
        if m.shape != (4, 4) or not np.all(np.isfinite(m)):
            raise VolumeError(f"ijk_to_ras must be a finite 4x4 matrix; got {np.asarray(self.ijk_to_ras)!r}")
        spacing = np.linalg.norm(m[:3, :3], axis=0)
        if not (np.all(spacing >= SPACING_RANGE_MM[0]) and np.all(spacing <= SPACING_RANGE_MM[1])):
            raise VolumeError(
                f"voxel spacing (i, j, k) {spacing.tolist()} mm is outside the {SPACING_RANGE_MM[0]:g}"
                f" to {SPACING_RANGE_MM[1]:g} mm a CT can have: the geometry is broken"
            )
        if np.any(np.abs(m[:3, 3]) > MAX_POSITION_MM):
            raise VolumeError(
                f"origin {m[:3, 3].tolist()} mm (RAS) is more than {MAX_POSITION_MM:g} mm from the "
                "scanner's origin: the geometry is broken"
            )
        if not np.allclose(m[3], [0, 0, 0, 1]) or abs(np.linalg.det(m[:3, :3])) < 1e-12:
            raise VolumeError("ijk_to_ras must be affine ([0,0,0,1] last row) and invertible")
        self.ijk_to_ras = m
        self.meta = dict(self.meta or {})

    # --- geometry -----------------------------------------------------------------------------
    @property
    def shape(self) -> Tuple[int, int, int]:
        """Array shape (K, J, I)."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def spacing(self) -> np.ndarray:
        """Voxel size in mm along i, j, k (column norms of the 3x3 part)."""
        return np.linalg.norm(self.ijk_to_ras[:3, :3], axis=0)

    @property
    def origin(self) -> np.ndarray:
        """RAS position (mm) of the centre of voxel (0, 0, 0)."""
        return self.ijk_to_ras[:3, 3].copy()

    @property
    def direction(self) -> np.ndarray:
        """3x3 RAS direction cosines; column c is the unit direction of index axis i, j, k."""
        return self.ijk_to_ras[:3, :3] / self.spacing

    @property
    def ras_to_ijk(self) -> np.ndarray:
        """Inverse of ``ijk_to_ras``."""
        return np.linalg.inv(self.ijk_to_ras)

    def ijk_to_ras_points(self, ijk: np.ndarray) -> np.ndarray:
        """Map (N, 3) voxel coordinates in (i, j, k) order to (N, 3) RAS mm."""
        ijk = np.atleast_2d(np.asarray(ijk, dtype=np.float64))
        return ijk @ self.ijk_to_ras[:3, :3].T + self.ijk_to_ras[:3, 3]

    def ras_to_ijk_points(self, ras: np.ndarray) -> np.ndarray:
        """Map (N, 3) RAS mm to (N, 3) continuous voxel coordinates in (i, j, k) order."""
        ras = np.atleast_2d(np.asarray(ras, dtype=np.float64))
        inv = self.ras_to_ijk
        return ras @ inv[:3, :3].T + inv[:3, 3]

    def with_array(self, array: np.ndarray, **meta: Any) -> "Volume":
        """A new Volume with the same geometry and ``array`` (same shape), meta updated."""
        array = np.asarray(array)
        if array.shape != self.array.shape:
            raise VolumeError(f"array shape {array.shape} differs from the volume's {self.array.shape}")
        return type(self)(array, self.ijk_to_ras.copy(), {**self.meta, **meta})

    # --- SimpleITK (LPS) boundary ---------------------------------------------------------------
    @classmethod
    def from_sitk(cls, image: Any, meta: Optional[dict] = None) -> "Volume":
        """Build a Volume from a 3D SimpleITK image (LPS geometry converted to RAS here)."""
        import SimpleITK as sitk

        if image.GetDimension() != 3:
            raise VolumeError(f"expected a 3D image, got {image.GetDimension()}D")
        if image.GetNumberOfComponentsPerPixel() != 1:
            raise VolumeError("expected a scalar image, got a multi-component (vector/RGB) image")
        direction = np.array(image.GetDirection(), dtype=np.float64).reshape(3, 3)
        lps = np.eye(4)
        lps[:3, :3] = direction * np.array(image.GetSpacing(), dtype=np.float64)
        lps[:3, 3] = image.GetOrigin()
        return cls(sitk.GetArrayFromImage(image), LPS_TO_RAS @ lps, meta or {})

    def to_sitk(self) -> Any:
        """This volume as a SimpleITK image (RAS geometry converted to LPS here)."""
        import SimpleITK as sitk

        image = sitk.GetImageFromArray(np.ascontiguousarray(self.array))
        lps = LPS_TO_RAS @ self.ijk_to_ras
        spacing = self.spacing
        image.SetSpacing([float(s) for s in spacing])
        image.SetOrigin([float(o) for o in lps[:3, 3]])
        image.SetDirection([float(d) for d in (lps[:3, :3] / spacing).ravel()])
        return image


@dataclass
class LabelMap(Volume):
    """A :class:`Volume` of integer labels (a mask, the lungs, hot regions), as TorchIO's
    ``LabelMap``: :func:`resample` and :func:`resample_to` take the nearest neighbour for it by
    themselves and refuse to interpolate it, so labels are never blended."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.array.dtype.kind not in "biu":
            raise VolumeError(f"a LabelMap holds integer labels or a bool mask; got dtype {self.array.dtype}")

    @classmethod
    def like(cls, volume: Volume, array: np.ndarray, **meta: Any) -> "LabelMap":
        """``array`` (labels, K, J, I) on ``volume``'s grid."""
        array = np.asarray(array)
        if array.shape != volume.shape:
            raise VolumeError(f"array shape {array.shape} differs from the volume's {volume.shape}")
        return cls(
            array.view(np.uint8) if array.dtype == bool else array, volume.ijk_to_ras.copy(), {**volume.meta, **meta}
        )


def bbox(mask: np.ndarray) -> Optional[Tuple[slice, ...]]:
    """The bounding box of a (K, J, I) mask's non-zero voxels as slices (None when it has none),
    from its three projections: much faster than ``ndimage.find_objects`` on a whole scan."""
    box = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        box.append(slice(int(hit[0]), int(hit[-1]) + 1))
    return tuple(box)


def label_boxes(labels: np.ndarray) -> List[Optional[Tuple[slice, ...]]]:
    """``ndimage.find_objects`` of an integer labelmap (index label - 1), computed inside the
    bounding box of its non-zero voxels only, and not at all for a binary mask."""
    from scipy import ndimage

    box = bbox(labels)
    if box is None:
        return []
    inside = labels[box]
    if inside.max() == 1:
        return [box]
    offset = [b.start for b in box]
    return [
        None if found is None else tuple(slice(s.start + o, s.stop + o) for s, o in zip(found, offset))
        for found in ndimage.find_objects(inside)
    ]


def _order(volume: Volume, order: Optional[int]) -> int:
    """The interpolation order: nearest neighbour (0) for a :class:`LabelMap`, else ``order``
    (default 1, linear)."""
    if isinstance(volume, LabelMap):
        if order not in (None, 0):
            raise VolumeError(f"a LabelMap is resampled by nearest neighbour only (order 0), not order {order}")
        return 0
    return 1 if order is None else order


def same_geometry(a: Volume, b: Volume, atol_mm: float = 1e-5) -> bool:
    """True when ``a`` and ``b`` have the same shape and voxel-to-RAS mapping (within ``atol_mm``)."""
    return a.shape == b.shape and bool(np.allclose(a.ijk_to_ras, b.ijk_to_ras, atol=atol_mm, rtol=0))


def crop(volume: Volume, box: Sequence[Tuple[int, int]]) -> Volume:
    """Crop to ``box`` = ((k0, k1), (j0, j1), (i0, i1)) half-open index ranges (clipped to the
    array); the matrix's origin moves so every kept voxel keeps its RAS position."""
    lo = [max(0, int(a)) for a, _ in box]
    hi = [min(n, int(b)) for (_, b), n in zip(box, volume.shape)]
    if any(h <= l for l, h in zip(lo, hi)):
        raise VolumeError(f"crop box {box} is empty for a volume of shape {volume.shape}")
    m = volume.ijk_to_ras.copy()
    m[:3, 3] = volume.ijk_to_ras_points([lo[2], lo[1], lo[0]])[0]
    arr = volume.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]
    return type(volume)(arr.copy(), m, dict(volume.meta))


def resample(
    volume: Volume, spacing_mm: Sequence[float], order: Optional[int] = None, default_value: float = 0.0
) -> Volume:
    """Resample to a new voxel size ``spacing_mm`` (i, j, k, mm) keeping direction and covering
    the same physical extent; voxel (0,0,0)'s corner stays at the same place.

    ``order``: 0 nearest neighbour (labels), 1 linear (the default), 3 B-spline; a
    :class:`LabelMap` is always resampled by nearest neighbour.
    """
    new_spacing = np.asarray(spacing_mm, dtype=np.float64)
    if new_spacing.shape != (3,) or np.any(new_spacing <= 0):
        raise VolumeError(f"spacing_mm must be three positive numbers (i, j, k); got {spacing_mm}")
    size_ijk = np.array(resampled_shape(volume, new_spacing)[::-1])
    m = np.eye(4)
    m[:3, :3] = volume.direction * new_spacing
    corner = volume.ijk_to_ras_points([-0.5, -0.5, -0.5])[0]
    m[:3, 3] = corner + m[:3, :3] @ np.full(3, 0.5)
    reference = Volume(np.zeros(size_ijk[::-1], dtype=np.uint8), m)
    return resample_to(volume, reference, order=order, default_value=default_value)


def resampled_shape(volume: Volume, spacing_mm: Sequence[float]) -> Tuple[int, int, int]:
    """(K, J, I) of ``volume`` resampled to ``spacing_mm`` (i, j, k, mm) by :func:`resample`,
    computed without allocating and refused over the voxel limit."""
    size_ijk = np.maximum(1, np.round(np.array(volume.shape[::-1]) * volume.spacing / np.asarray(spacing_mm)))
    check_voxel_limit(size_ijk[::-1], "resampled volume")  # in floats: a huge grid cannot overflow
    return tuple(int(s) for s in size_ijk[::-1])  # type: ignore[return-value]


def resample_to(
    volume: Volume,
    reference: Volume,
    order: Optional[int] = None,
    default_value: float = 0.0,
    finish: Optional[Callable[[np.ndarray], None]] = None,
) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid (shape and ijk_to_ras); outside -> default.

    ``order``: 0 nearest neighbour, 1 linear (the default), 3 B-spline; a :class:`LabelMap` is
    always resampled by nearest neighbour (and stays a LabelMap). The result is SimpleITK's
    ``sitk.Resample`` (same pixel type; points within half a voxel outside the input take the edge
    value, points further out ``default_value``). When the two grids' axes are parallel (the
    mapping between their indices is a scaling and a shift per axis: every grid :func:`resample`
    makes) and ``order`` is 0, or 1 on float data, the same values are computed separably, slab
    by slab (:func:`_resample_separable`): far faster and lighter on a CT-sized grid.
    ``finish(array)``, when given, changes the result in place (e.g. clipping), a slab of slices
    at a time while it is in the cache on the separable path, and then no voxel lies outside.
    """
    order = _order(volume, order)
    if order not in (0, 1, 3):
        raise VolumeError(f"order must be 0, 1 or 3; got {order}")
    axes = _axis_map(volume, reference)
    if axes is not None and (order == 0 or (order == 1 and volume.array.dtype.kind == "f")):
        array = _resample_separable(volume.array, reference.shape, axes, order, default_value, finish)
        return type(volume)(array, reference.ijk_to_ras.copy(), dict(volume.meta))
    import SimpleITK as sitk

    interp = {0: sitk.sitkNearestNeighbor, 1: sitk.sitkLinear, 3: sitk.sitkBSpline}
    src = volume.to_sitk()
    ref = reference.to_sitk()
    out = sitk.Resample(src, ref, sitk.Transform(), interp[order], float(default_value), src.GetPixelID())
    array = sitk.GetArrayFromImage(out)
    if finish is not None:
        finish(array)
    return type(volume)(array, reference.ijk_to_ras.copy(), dict(volume.meta))


#: Largest off-diagonal term (input voxels per output voxel) still taken as parallel axes: over
#: 1000 voxels it moves a point by less than 1e-3 voxel.
_PARALLEL_TOL = 1e-6


def _axis_map(volume: Volume, reference: Volume) -> Optional[np.ndarray]:
    """(3, 2) rows (scale, shift) for axes K, J, I such that ``volume``'s continuous index along
    an axis is ``scale * reference index + shift``, or None when the grids' axes are not parallel."""
    m = volume.ras_to_ijk @ reference.ijk_to_ras  # reference (i, j, k) -> volume (i, j, k)
    a = m[:3, :3]
    if np.max(np.abs(a - np.diag(np.diag(a)))) > _PARALLEL_TOL:
        return None
    return np.column_stack([np.diag(a), m[:3, 3]])[::-1]


def _axis_weights(n_in: int, n_out: int, scale: float, shift: float, order: int):
    """Per output index along one axis: the two input indices, the weight of the second, and
    whether the point lies inside the input (ITK's rule: continuous index in [-0.5, n - 0.5))."""
    c = scale * np.arange(n_out, dtype=np.float64) + shift
    inside = (c >= -0.5) & (c < n_in - 0.5)
    if order == 0:
        i0 = np.clip(np.floor(c + 0.5), 0, n_in - 1).astype(np.intp)
        return i0, i0, np.zeros(n_out, dtype=np.float32), inside
    c = np.clip(c, 0, n_in - 1)
    i0 = np.minimum(np.floor(c), max(n_in - 2, 0)).astype(np.intp)
    return i0, np.minimum(i0 + 1, n_in - 1), (c - i0).astype(np.float32), inside


def _resample_separable(
    src: np.ndarray,
    shape: Sequence[int],
    axes: np.ndarray,
    order: int,
    default_value: float,
    finish: Optional[Callable[[np.ndarray], None]] = None,
    slab_bytes: int = 16 << 20,
) -> np.ndarray:
    """``src`` (K, J, I) sampled at ``index = scale * output index + shift`` per axis (``axes``
    from :func:`_axis_map`) into a new (K, J, I) array of ``shape``: nearest neighbour (order 0)
    or linear (order 1, in ``src``'s float type). One axis at a time, the most shrinking first,
    on a slab of about ``slab_bytes`` of output slices at a time, so that no temporary is larger
    than a slab; the last axis writes into the output, and ``finish`` then changes the slab. The
    slabs are shared among threads (numpy's loops run outside the GIL)."""
    from concurrent.futures import ThreadPoolExecutor

    weights = [
        _axis_weights(n_in, n_out, scale, shift, order) for n_in, n_out, (scale, shift) in zip(src.shape, shape, axes)
    ]
    out = np.empty(tuple(shape), dtype=src.dtype)
    k0, k1 = weights[0][:2]

    def fill(ks: slice) -> None:
        first = int(k0[ks].min())
        part = src[first : int(k1[ks].max()) + 1]
        steps = [(0, k0[ks] - first, k1[ks] - first, weights[0][2][ks])] + [(a,) + weights[a][:3] for a in (1, 2)]
        steps.sort(key=lambda step: len(step[1]) / part.shape[step[0]])
        for n, (axis, lo, hi, w) in enumerate(steps):
            part = _lerp_axis(part, axis, lo, hi, w, order, out[ks] if n == 2 else None)
        for axis, (*_, inside) in enumerate(weights):
            if not inside.all():
                index = [slice(None)] * 3
                index[axis] = ~(inside[ks] if axis == 0 else inside)
                part[tuple(index)] = default_value
        if finish is not None:
            finish(part)

    slab = max(1, slab_bytes // max(1, out[0].nbytes))
    slabs = [slice(start, min(start + slab, shape[0])) for start in range(0, shape[0], slab)]
    with ThreadPoolExecutor(min(len(slabs), os.cpu_count() or 1)) as pool:
        list(pool.map(fill, slabs))  # list(): a slab's error is raised here
    return out


def _lerp_axis(
    a: np.ndarray,
    axis: int,
    lo: np.ndarray,
    hi: np.ndarray,
    w: np.ndarray,
    order: int,
    out: Optional[np.ndarray] = None,
) -> np.ndarray:
    """``a`` sampled along ``axis`` (into ``out`` when given): ``a[lo]`` (order 0) or
    ``a[lo] + w * (a[hi] - a[lo])``."""
    out = np.take(a, lo, axis=axis, out=out, mode="clip")  # "clip": in range anyway, and unbuffered
    if order == 0:
        return out
    step = np.take(a, hi, axis=axis, mode="clip")
    step -= out
    step *= w.reshape([-1 if n == axis else 1 for n in range(3)]).astype(a.dtype, copy=False)
    out += step
    return out


def axis_aligned_matrix(
    spacing_mm: Sequence[float], origin_ras: Sequence[float] = (0, 0, 0), direction: Optional[np.ndarray] = None
) -> np.ndarray:
    """A 4x4 ijk_to_ras from spacing (i, j, k mm), origin (RAS mm) and optional 3x3 direction."""
    m = np.eye(4)
    d = np.eye(3) if direction is None else np.asarray(direction, dtype=np.float64)
    m[:3, :3] = d * np.asarray(spacing_mm, dtype=np.float64)
    m[:3, 3] = origin_ras
    return m
