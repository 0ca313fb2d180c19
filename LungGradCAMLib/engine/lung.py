"""Lung segmentation of a chest CT by HU threshold and connected components, made robust.

:func:`lung_mask` follows the classical method (threshold at -350 HU, remove the air outside the
body, keep the lungs, fill holes, close/dilate to keep juxta-pleural nodules) at a reduced working
resolution (about 2 mm) and brings the result back to the CT grid, refining its border with the
full-resolution threshold, then keeps a margin around lesions on the pleura. :func:`lung_bbox` gives the lungs' bounding box for the sliding window.

Arrays are (K, J, I) = (slice, row, column); spacings are (i, j, k) mm as :attr:`Volume.spacing`;
intensities are CT numbers in HU.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy import ndimage

from ..core.errors import VolumeError
from ..core.volume import Volume, bbox

#: In-plane (J, I) 4-connectivity: labels each axial slice on its own in one call.
_INPLANE = np.zeros((3, 3, 3), dtype=bool)
_INPLANE[1] = ndimage.generate_binary_structure(2, 1)
#: 3D 6-connectivity (face neighbours), so that lungs touching at a corner stay apart.
_FACES = ndimage.generate_binary_structure(3, 1)

# codes of the working-grid label that guides the CT-grid mask: outside, take whole, take air only
_OUT, _WHOLE, _AIR_ONLY = 0, 1, 2


def lung_mask(
    volume: Union[Volume, np.ndarray],
    threshold_hu: float = -350.0,
    dilate_mm: float = 0.0,
    closing_mm: float = 5.0,
    lesion_margin_mm: float = 3.0,
    lesion_hu: float = -650.0,
    remove_airways: bool = False,
    working_spacing_mm: float = 2.0,
    spacing_mm: Optional[Sequence[float]] = None,
    outside_air_hu: float = -950.0,
    second_lung_fraction: float = 0.1,
    min_lung_ml: float = 10.0,
) -> np.ndarray:
    """Boolean mask (K, J, I) of both lungs of a chest CT in HU, on the CT's own grid.

    Steps, on a grid of about ``working_spacing_mm`` (block averages of the CT):

    1. air = voxels below ``threshold_hu`` (HU);
    2. outside air: per axial slice, air regions touching the slice's in-plane border and mostly
       below ``outside_air_hu`` (true air, padding, the table's surroundings) are removed. Only the
       in-plane border counts, because in a slab the lungs touch the top and bottom faces; lung that
       a tight crop cuts (about -850 HU) is kept;
    3. the lungs: the largest remaining 3D component, and the second largest when it holds at least
       ``second_lung_fraction`` of the largest (one component when the lungs merge, or one lung);
       smaller ones (air in the table, stray airways) are dropped, and so is gas mostly darker than
       ``outside_air_hu`` (stomach, bowel: aerated lung is about -850 HU);
    4. optionally (``remove_airways``) the trachea and main bronchi, found by region growing from the
       trachea in the top slices, are removed where they run outside the lung parenchyma;
    5. the left and right lung are split at the mediastinum; each is closed slice by slice with a
       square of half-width ``closing_mm`` (takes in the notch of a juxta-pleural nodule up to about
       2 x ``closing_mm`` across) and has its holes filled per slice and in 3D (vessels, nodules);
    6. optional dilation of the whole mask by ``dilate_mm`` (on the working grid);
    7. dense lesions in the lungs (regions above ``lesion_hu`` at least ~3 working voxels across:
       nodules, ground glass, consolidation, the hilum) get a margin of ``lesion_margin_mm`` (on the
       CT grid) beyond the lung border, so that the rim of a nodule on the pleura, as a reader
       outlines it, stays inside. A uniform dilation would do the same at the cost of the whole
       surface.

    The mask is brought back to the CT grid before step 7: deep inside it is taken whole, along its
    border only voxels below ``threshold_hu`` are added to what the working grid filled, so the lung
    surface is as sharp as the CT's. A 512x512x300 CT takes 1-1.6 s of CPU (benchmarks/lung_mask.py).

    ``volume``: a :class:`Volume`, or a (K, J, I) array in HU with ``spacing_mm`` (i, j, k).
    Raises :class:`VolumeError` for input that does not look like a CT in HU or holds no lung.

    Example::

        >>> import LungGradCAMLib as lgc
        >>> ct = lgc.phantom.chest_ct(seed=3).volume
        >>> lungs = lgc.lung_mask(ct)
        >>> lungs.shape == ct.array.shape, lungs.dtype
        (True, dtype('bool'))
    """
    hu, spacing, lr_axis, head_up = _input(volume, spacing_mm)
    for name, value in (("dilate_mm", dilate_mm), ("closing_mm", closing_mm), ("lesion_margin_mm", lesion_margin_mm)):
        if not (np.isfinite(value) and value >= 0):
            raise VolumeError(f"lung_mask: {name} must be a non-negative number of mm; got {value!r}")
    if not (np.isfinite(working_spacing_mm) and working_spacing_mm > 0):
        raise VolumeError(f"lung_mask: working_spacing_mm must be positive; got {working_spacing_mm!r}")

    # (k, j, i) block sizes of the working grid; never finer than the CT itself
    factors = tuple(max(1, int(round(working_spacing_mm / s))) for s in spacing[::-1])
    low = _block_mean(hu, factors)
    low_spacing = spacing * np.array(factors[::-1])  # (i, j, k) mm
    voxel_ml = float(np.prod(low_spacing)) / 1000.0

    air = low < threshold_hu
    air &= ~_outside_air(air, low, outside_air_hu)
    lungs = _largest_components(air, second_lung_fraction, low, outside_air_hu)
    if lungs.sum() * voxel_ml < min_lung_ml:
        raise VolumeError(
            f"lung_mask: no lung found (less than {min_lung_ml:g} ml of air below {threshold_hu:g} HU inside "
            "the body): is this a chest CT in HU?"
        )
    if remove_airways:
        if head_up is None:
            raise VolumeError(
                "lung_mask: remove_airways needs an axial CT (slices across the head-foot "
                "axis); reformat the volume or leave remove_airways off"
            )
        airways = _central_airways(low, lungs, low_spacing, head_up)
        # they stay in ``air``: as air outside the mask, the CT-grid border does not take them back
        lungs = _largest_components(lungs & ~airways, second_lung_fraction, low, outside_air_hu)

    grow = max(lesion_margin_mm, dilate_mm)
    box = _bbox(lungs, margin=int(_radius_vox(closing_mm + grow, low_spacing).max()) + 1)
    sub = lungs[box]
    filled = np.zeros_like(sub)
    for lung in _split_left_right(sub, lr_axis):
        filled |= _fill_holes(_close(lung, closing_mm, low_spacing))
    if dilate_mm > 0:
        filled = _dilate(filled, _radius_vox(dilate_mm, low_spacing))
    other_air = air[box] & ~filled
    mask = np.zeros(hu.shape, dtype=bool)
    full_box = tuple(slice(b.start * f, min(b.stop * f, n)) for b, f, n in zip(box, factors, hu.shape))
    mask[full_box] = _to_ct_grid(filled, sub, other_air, hu[full_box], threshold_hu, factors)
    if lesion_margin_mm > 0:
        # dense lesions in the lungs (nodules, ground glass, the notch the closing filled), opened
        # in-plane to drop small vessels and the partial-volume rim along the pleura
        lesions = ndimage.binary_opening(filled & (low[box] > lesion_hu), _INPLANE)
        reach = _radius_vox(lesion_margin_mm, low_spacing) + 1
        # only lesions at the border matter: the zone is their neighbourhood, less the mask's
        # interior (taken whole already)
        zone = _dilate(lesions, reach) & ~_erode(filled, np.ones(3, dtype=int)) & ~other_air
        _add_margin(mask, zone, [b.start for b in box], factors, spacing, lesion_margin_mm)
    return mask


def lung_bbox(mask: np.ndarray, margin_vox: Union[int, Sequence[int]] = 0) -> Tuple[Tuple[int, int], ...]:
    """Bounding box of a (K, J, I) mask: ((k0, k1), (j0, j1), (i0, i1)) half-open index ranges,
    grown by ``margin_vox`` voxels (one int, or (k, j, i)) and clipped to the array — the ``box`` that
    :func:`LungGradCAMLib.core.volume.crop` takes. Raises :class:`VolumeError` for an empty mask."""
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 3:
        raise VolumeError(f"lung_bbox: expected a (K, J, I) mask; got shape {mask.shape}")
    if not mask.any():
        raise VolumeError("lung_bbox: the mask is empty (no lung voxel); check the lung mask or pass a region")
    margin = np.broadcast_to(np.asarray(margin_vox, dtype=int), (3,))
    if np.any(margin < 0):
        raise VolumeError(f"lung_bbox: margin_vox must be >= 0; got {margin_vox!r}")
    return tuple((max(0, s.start - int(m)), min(n, s.stop + int(m))) for s, m, n in zip(bbox(mask), margin, mask.shape))


# --- input ------------------------------------------------------------------------------------------
def _input(volume: Union[Volume, np.ndarray], spacing_mm: Optional[Sequence[float]]):
    """(HU array, spacing (i, j, k) mm, array axis running left-right, whether K runs toward the
    head: True/False, or None when K is not the head-foot axis) after checks."""
    if isinstance(volume, Volume):
        hu, spacing = volume.array, volume.spacing
        # the index axis (matrix column c = array axis 2 - c) most nearly along RAS x, and along S
        lr_axis = 2 - int(np.argmax(np.abs(volume.direction[0])))
        si_column = int(np.argmax(np.abs(volume.direction[2])))
        head_up = bool(volume.direction[2, 2] > 0) if si_column == 2 else None
    else:
        hu = np.asarray(volume)
        if spacing_mm is None:
            raise VolumeError("lung_mask: a numpy array needs spacing_mm (i, j, k mm); or pass a Volume")
        spacing = np.asarray(spacing_mm, dtype=np.float64).ravel()
        if spacing.shape != (3,) or not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
            raise VolumeError(f"lung_mask: spacing_mm must be three positive mm values (i, j, k); got {spacing_mm!r}")
        lr_axis, head_up = 2, True  # an axial array as Slicer holds it: I across, K toward the head
    if hu.ndim != 3:
        raise VolumeError(f"lung_mask: expected a 3D CT (K, J, I); got shape {hu.shape}")
    if hu.dtype.kind not in "iuf":
        raise VolumeError(f"lung_mask: expected CT numbers (HU), got an array of dtype {hu.dtype}")
    if hu.size < 8:
        raise VolumeError(f"lung_mask: the CT is too small to hold lungs (shape {hu.shape})")
    lo = float(hu.min())
    if not np.isfinite(lo) or not np.isfinite(float(hu.max())):
        raise VolumeError("lung_mask: the CT holds NaN or infinite values; fix or mask them first")
    if lo > -500:
        raise VolumeError(
            f"lung_mask: the lowest value is {lo:g}, but a chest CT in HU holds air (about -1000 HU): is this a "
            "chest CT in HU? Apply the DICOM rescale slope/intercept, and do not pass normalised intensities."
        )
    return hu, np.asarray(spacing, dtype=np.float64), lr_axis, head_up


def _block_mean(hu: np.ndarray, factors: Tuple[int, int, int]) -> np.ndarray:
    """Mean HU of (fk, fj, fi) blocks (float32); the remainder at each far edge is a block
    completed by repeating the last slice/row/column. One axis at a time, K first (whole planes,
    the cheapest to stride over), each as a sum of ``f`` strided views (the first two added into
    the new array directly): no padded or converted copy of the CT."""
    out = hu
    for axis, f in enumerate(factors):
        if f == 1:
            continue
        n = out.shape[axis]
        blocks = -(-n // f)

        def along(start: int, stop: Optional[int] = None, step: int = f) -> Tuple[slice, ...]:
            index = [slice(None)] * 3
            index[axis] = slice(start, stop, step)
            return tuple(index)

        parts = [out[along(start, n)] for start in range(f)]  # the later ones may be one short
        whole = [p.shape[axis] == blocks for p in parts]
        acc = np.add(parts[0], parts[1], dtype=np.float32) if whole[1] else parts[0].astype(np.float32)
        for part, full in list(zip(parts, whole))[2 if whole[1] else 1 :]:
            if full:
                acc += part
            else:  # the last block is short: it repeats the last slice
                acc[along(0, blocks - 1, 1)] += part
                acc[along(blocks - 1, blocks, 1)] += out[along(n - 1, n, 1)]
        acc *= np.float32(1.0 / f)
        out = acc
    return out.astype(np.float32, copy=False)


# --- working-grid steps ----------------------------------------------------------------------------
def _outside_air(air: np.ndarray, hu: np.ndarray, outside_air_hu: float) -> np.ndarray:
    """Air regions of each slice that touch its in-plane border and are mostly (their median)
    darker than ``outside_air_hu``; the median, because a thin strip of outside air along a crop's
    edge is mostly partial-volume rim and its mean looks like lung."""
    labels, n = ndimage.label(air, _INPLANE)
    if n == 0:
        return np.zeros_like(air)
    border = np.zeros(n + 1, dtype=bool)
    for edge in (labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]):
        border[edge] = True
    count = np.bincount(labels.ravel(), minlength=n + 1)
    dark = np.bincount(labels[hu < outside_air_hu], minlength=n + 1)
    outside = border & (2 * dark >= count)
    outside[0] = False
    return outside[labels]


def _largest_components(mask: np.ndarray, second_fraction: float, hu: np.ndarray, gas_hu: float) -> np.ndarray:
    """The largest 6-connected component, plus the second when >= ``second_fraction`` of it;
    components mostly (their median) darker than ``gas_hu`` are gas (stomach, bowel, a stray
    airway), not aerated lung, and are never chosen."""
    labels, n = ndimage.label(mask, _FACES)
    if n == 0:
        return np.zeros_like(mask)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    dark = np.bincount(labels[hu < gas_hu], minlength=n + 1)
    sizes[2 * dark >= sizes] = 0
    sizes[0] = 0
    order = np.argsort(sizes)[::-1]
    keep = [order[0]]
    if n > 1 and sizes[order[1]] > 0 and sizes[order[1]] >= second_fraction * sizes[order[0]]:
        keep.append(order[1])
    return np.isin(labels, keep) if sizes[order[0]] > 0 else np.zeros_like(mask)


def _central_airways(
    hu: np.ndarray, lungs: np.ndarray, spacing: np.ndarray, head_up: bool, max_airway_ml: float = 150.0
) -> np.ndarray:
    """The trachea and main bronchi (working grid), or nothing when no trachea is found.

    The seed is the darkest voxel of the darkest small air region of the lungs' top slice near the
    midline (the trachea lies above the apices in a chest CT); the tree is grown through air darker
    than a threshold raised from -990 HU until the tree would leak into the parenchyma (more than
    double a tree of 10 ml or more in one step, or over ``max_airway_ml``). Of the tree, the parts whose in-plane
    surroundings are mostly not lung (the trachea, the main bronchi in the mediastinum) are kept;
    bronchi inside the lung stay lung."""
    nothing = np.zeros_like(lungs)
    ks = np.flatnonzero(lungs.any(axis=(1, 2)))
    top = int(ks[-1] if head_up else ks[0])
    pixel_mm2 = float(spacing[0] * spacing[1])
    labels, n = ndimage.label(lungs[top], ndimage.generate_binary_structure(2, 1))
    if n == 0:
        return nothing
    area = np.bincount(labels.ravel())[1:] * pixel_mm2
    mean = ndimage.mean(hu[top], labels, index=np.arange(1, n + 1))
    centre_i = np.mean(np.flatnonzero(lungs.any(axis=(0, 1))))
    cols = np.asarray(ndimage.center_of_mass(lungs[top], labels, index=np.arange(1, n + 1)))[:, 1]
    # a trachea: 50-700 mm² of air averaging below -800 HU, within 30 mm of the lungs' midline
    ok = (area >= 50) & (area <= 700) & (mean < -800) & (np.abs(cols - centre_i) * spacing[0] < 30)
    if not ok.any():
        return nothing
    seed_label = int(np.argmin(np.where(ok, mean, np.inf))) + 1  # the darkest candidate
    darkest = np.argmin(np.where(labels == seed_label, hu[top], np.inf))
    seed = (top,) + tuple(int(v) for v in np.unravel_index(darkest, labels.shape))
    voxel_ml = float(np.prod(spacing)) / 1000.0

    tree = nothing
    for threshold in range(-990, -790, 10):
        grown, _ = ndimage.label(lungs & (hu < threshold), _FACES)
        if grown[seed] == 0:
            continue
        candidate = grown == grown[seed]
        size, previous = candidate.sum() * voxel_ml, tree.sum() * voxel_ml
        if size > max_airway_ml or (previous >= 10.0 and size > 2 * previous):
            break  # leaked into the parenchyma
        tree = candidate
    if not tree.any():
        return nothing
    # per slice, the airway regions whose surroundings (a ring 3-4 voxels out, beyond the lumen's
    # partial-volume rim) are mostly not lung; removed with that rim
    pieces, n = ndimage.label(tree, _INPLANE)
    inner = ndimage.grey_dilation(pieces, footprint=np.ones((1, 5, 5), dtype=bool))
    outer = ndimage.grey_dilation(pieces, footprint=np.ones((1, 9, 9), dtype=bool))
    ring = (outer > 0) & (inner == 0)
    total = np.bincount(outer[ring], minlength=n + 1)
    in_lung = np.bincount(outer[ring & lungs], minlength=n + 1)
    central = in_lung < 0.5 * np.maximum(total, 1)
    central[0] = False
    return central[inner] & lungs


def _split_left_right(mask: np.ndarray, axis: int) -> list:
    """``mask`` as its left and right lung (full-size arrays), split at the mediastinum along
    ``axis``; or ``[mask]`` for one lung.

    The split is the middle of the emptiest planes in the middle 40 % of the lungs' extent, when
    they hold at most a tenth of the fullest plane (two lungs, merged or not)."""
    others = tuple(a for a in range(3) if a != axis)
    profile = mask.sum(axis=others)
    idx = np.flatnonzero(profile)
    if idx.size < 5:
        return [mask]
    lo, hi = idx[0] + int(0.3 * (idx[-1] - idx[0])), idx[0] + int(0.7 * (idx[-1] - idx[0])) + 1
    emptiest = lo + np.flatnonzero(profile[lo:hi] == profile[lo:hi].min())
    cut = int(emptiest[len(emptiest) // 2])
    if profile[cut] > 0.1 * profile.max():
        return [mask]
    beyond = [slice(None)] * 3
    beyond[axis] = slice(cut, None)
    first = mask.copy()
    first[tuple(beyond)] = False
    return [first, mask & ~first]


def _radius_vox(radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """A radius in mm as whole voxels per (k, j, i) axis."""
    return np.round(radius_mm / spacing[::-1]).astype(int)


def _dilate(mask: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """Dilation by a box of half-width ``radius`` voxels per (k, j, i) axis, as shifted ORs (far
    cheaper than a structuring element, and than 1D filters along the slowest axis, for the few
    voxels of radius used here). Nothing beyond the edges is added."""
    return _box(mask, radius, np.logical_or)


def _erode(mask: np.ndarray, radius: Sequence[int]) -> np.ndarray:
    """Erosion by the box of :func:`_dilate`; voxels beyond the edges count as inside, so a lung cut
    by the volume's faces is not eroded there."""
    return _box(mask, radius, np.logical_and)


def _box(mask: np.ndarray, radius: Sequence[int], op) -> np.ndarray:
    out = mask
    for axis, r in enumerate(radius):
        if r <= 0:
            continue
        src, out = out, out.copy()
        for step in range(1, min(int(r), src.shape[axis] - 1) + 1):
            lo = [slice(None)] * 3
            hi = [slice(None)] * 3
            lo[axis], hi[axis] = slice(None, -step), slice(step, None)
            lo_t, hi_t = tuple(lo), tuple(hi)
            op(out[hi_t], src[lo_t], out=out[hi_t])
            op(out[lo_t], src[hi_t], out=out[lo_t])
    return out


def _close(mask: np.ndarray, radius_mm: float, spacing: np.ndarray) -> np.ndarray:
    """In-plane closing of each axial slice by a square of half-width ``radius_mm``. In-plane,
    because a 3D closing also fills the steps between slices where the lung narrows (apex,
    diaphragm) with chest wall; a square, because it is separable and cheap."""
    radius = _radius_vox(radius_mm, spacing)
    radius[0] = 0
    if not radius.any() or not mask.any():
        return mask
    return _erode(_dilate(mask, radius), radius)


def _fill_holes(mask: np.ndarray) -> np.ndarray:
    """Fill holes per axial slice (in-plane enclosed background), then in 3D."""
    for structure in (_INPLANE, _FACES):
        labels, n = ndimage.label(~mask, structure)
        if n == 0:
            continue
        touches = np.zeros(n + 1, dtype=bool)
        faces = [labels[:, 0, :], labels[:, -1, :], labels[:, :, 0], labels[:, :, -1]]
        if structure is _FACES:
            faces += [labels[0], labels[-1]]
        for face in faces:
            touches[face] = True
        hole = ~touches
        hole[0] = False
        mask = mask | hole[labels]
    return mask


def _bbox(mask: np.ndarray, margin: int) -> Tuple[slice, slice, slice]:
    box = lung_bbox(mask, margin)
    return tuple(slice(a, b) for a, b in box)  # type: ignore[return-value]


# --- back to the CT grid ----------------------------------------------------------------------------
def _to_ct_grid(
    mask: np.ndarray,
    lung_air: np.ndarray,
    other_air: np.ndarray,
    hu: np.ndarray,
    threshold_hu: float,
    factors: Tuple[int, int, int],
) -> np.ndarray:
    """The working-grid ``mask`` on the CT grid of ``hu`` (the blocks it covers), with a CT-sharp border.

    Blocks deep inside the mask, and tissue blocks the working grid filled in (vessels, nodules,
    closing, dilation), are taken whole; along the border (air blocks of the mask and the ring just
    outside it, except other air such as removed airways) only voxels below the threshold are."""
    one = np.ones(3, dtype=int)
    whole = _erode(mask, one) | (mask & ~lung_air)
    code = whole.astype(np.uint8)  # _WHOLE where whole, else _OUT
    code[_dilate(mask, one) & ~whole & ~other_air] = _AIR_ONLY
    code = _upsample(code, factors, hu.shape)
    return (code == _WHOLE) | ((code == _AIR_ONLY) & (hu < threshold_hu))


def _upsample(
    a: np.ndarray, factors: Sequence[int], shape: Sequence[int], offset: Sequence[int] = (0, 0, 0)
) -> np.ndarray:
    """Working-grid ``a`` repeated onto the CT grid, cut to ``shape`` starting ``offset`` CT voxels
    into its first block."""
    for axis, f in enumerate(factors):
        a = np.repeat(a, f, axis=axis) if f > 1 else a
    return a[tuple(slice(o, o + n) for o, n in zip(offset, shape))]


def _add_margin(
    mask: np.ndarray,
    zone: np.ndarray,
    zone_origin: Sequence[int],
    factors: Sequence[int],
    spacing: np.ndarray,
    margin_mm: float,
) -> None:
    """Add to ``mask`` (CT grid, in place) the voxels within ``margin_mm`` of it (a box of that
    half-width per axis) that lie in the working-grid ``zone``, whose voxel 0 is working voxel
    ``zone_origin``; one zone component, in its bounding box, at a time."""
    radius = np.floor(margin_mm / spacing[::-1]).astype(int)
    labels, _ = ndimage.label(zone, np.ones((3, 3, 3), dtype=bool))
    for n, region in enumerate(ndimage.find_objects(labels), start=1):
        box = tuple(
            slice((sl.start + o) * f, min((sl.stop + o) * f, size))
            for sl, o, f, size in zip(region, zone_origin, factors, mask.shape)
        )
        # the mask around the box, so mask voxels just outside it count too
        lo = [max(0, b.start - r) for b, r in zip(box, radius)]
        hi = [min(size, b.stop + r) for b, r, size in zip(box, radius, mask.shape)]
        grown = _dilate(mask[tuple(slice(a, b) for a, b in zip(lo, hi))], radius)
        near = grown[tuple(slice(b.start - a, b.stop - a) for b, a in zip(box, lo))]
        mask[box] |= near & _upsample(labels[region] == n, factors, near.shape)


# --- is it a chest CT? ------------------------------------------------------------------------------
#: The chest-CT check's limits. Measured on the real CTs of ../shared/data (a full chest CT, two
#: LIDC-IDRI slabs of 15 and 40 mm, two chest crops): largest lung cross-section 166-332 cm², lungs
#: 21-41 % of lung + tissue, 86-94 % of the lung mask aerated lung; on an upper-abdomen series,
#: whose "lungs" were stomach and bowel gas: 23 cm², 1.4 %, 28 %.
MIN_LUNG_AREA_CM2 = 40.0
MIN_LUNG_SHARE = 0.05
MIN_AERATED_SHARE = 0.30
#: HU of aerated lung (parenchyma, about -850): darker is pure gas, brighter is tissue.
AERATED_HU = (-950.0, -500.0)


@dataclass
class ChestCheck:
    """What :func:`check_chest_ct` measured (values in report.json under ``chest_check``).

    ``lung_ml``: lung mask volume (ml); ``max_lung_area_cm2``: its largest cross-section across
    the head-foot axis (cm²); ``lung_share``: lung voxels / (lung + tissue voxels above -500 HU);
    ``aerated_share``: share of the lung mask at aerated-lung HU (:data:`AERATED_HU`), low for gas;
    ``problems``: one sentence per failed limit (empty: it is a chest CT holding lungs).
    """

    lung_ml: float
    max_lung_area_cm2: float
    lung_share: float
    aerated_share: float
    problems: List[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "lung_ml": round(self.lung_ml, 1),
            "max_lung_area_cm2": round(self.max_lung_area_cm2, 1),
            "lung_share": round(self.lung_share, 4),
            "aerated_share": round(self.aerated_share, 4),
            "problems": list(self.problems),
        }


def check_chest_ct(volume: Volume, lungs: np.ndarray) -> ChestCheck:
    """Does ``volume`` (HU, K, J, I) look like a chest CT that holds lungs, given its lung mask
    ``lungs`` (bool, K, J, I; from :func:`lung_mask`)?

    Three limits: the lungs' largest cross-section across the head-foot axis is at least
    :data:`MIN_LUNG_AREA_CM2` (a thin slab through both lungs has 200 cm²; stomach and bowel gas a
    few tens); lungs are at least :data:`MIN_LUNG_SHARE` of lung plus tissue (also true of a
    chest-abdomen scan); at least :data:`MIN_AERATED_SHARE` of the mask is aerated lung (gas is
    darker; severe emphysema still leaves about half). Returns the values and what failed.
    """
    lungs = np.asarray(lungs, dtype=bool)
    if lungs.shape != volume.shape:
        raise VolumeError(f"check_chest_ct: the lung mask {lungs.shape} is not on the CT's grid {volume.shape}")
    spacing = volume.spacing  # (i, j, k) mm
    si_axis = 2 - int(np.argmax(np.abs(volume.direction[2])))  # array axis most nearly head-foot
    pixel_cm2 = float(np.prod([spacing[2 - a] for a in range(3) if a != si_axis])) / 100.0
    others = tuple(a for a in range(3) if a != si_axis)
    n_lung = int(lungs.sum())
    inside = volume.array[lungs]
    low, high = AERATED_HU
    check = ChestCheck(
        lung_ml=n_lung * float(np.prod(spacing)) / 1000.0,
        max_lung_area_cm2=float(lungs.sum(axis=others).max(initial=0)) * pixel_cm2,
        lung_share=n_lung / max(n_lung + int(np.count_nonzero(volume.array > high)), 1),
        aerated_share=float(np.mean((inside >= low) & (inside < high))) if n_lung else 0.0,
    )
    if check.max_lung_area_cm2 < MIN_LUNG_AREA_CM2:
        check.problems.append(
            f"the largest lung cross-section is {check.max_lung_area_cm2:.0f} cm² "
            f"(a chest CT has at least {MIN_LUNG_AREA_CM2:.0f})"
        )
    if check.lung_share < MIN_LUNG_SHARE:
        check.problems.append(
            f"lungs are {100 * check.lung_share:.1f} % of the body "
            f"(a chest CT has at least {100 * MIN_LUNG_SHARE:.0f} %)"
        )
    if check.aerated_share < MIN_AERATED_SHARE:
        check.problems.append(
            f"only {100 * check.aerated_share:.0f} % of the 'lungs' is aerated lung "
            f"({low:.0f} to {high:.0f} HU), the rest is gas or tissue "
            f"(a chest CT has at least {100 * MIN_AERATED_SHARE:.0f} %)"
        )
    return check
