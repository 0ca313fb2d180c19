"""The nodule outline: the nodule at a point (the heat map's peak), separated from the vessels and
pleura it touches, and what a radiologist measures on it: volume (ml), the longest and the
perpendicular diameter in a slice, and their mean (mm).

:func:`nodule_outline` makes it by one of two methods, measured side by side against the LIDC
readers' masks in ``benchmarks/outline_quality.py``:

* ``"network"`` (the default): the bundled ``nodule-outline`` 3D U-Net marks the nodule voxels in a
  block around the seed (at its card's spacing), the probability is brought back onto the CT's grid
  and the component at the seed (or the nearest one within ``search_mm``) is the outline;
* ``"classical"``: juxta-vascular / juxta-pleural separation by thresholds and morphology: the
  chest wall is the tissue a ball of :data:`WALL_RADIUS_MM` fits into (an opening), the nodule's
  core is the thickest tissue near the seed, the threshold lies 30 % of the way up from the lung's
  HU to the core's (ground glass too), and an opening whose radius follows the core's size cuts
  the vessels off.

:func:`measure_outline` measures any mask (torch-free, as is the classical method). Arrays are
(K, J, I); points are RAS mm; CT values HU.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence, Tuple

import numpy as np
from scipy import ndimage

from ..core.errors import InvalidInputError
from ..core.results import Outline
from ..core.volume import AIR_HU, LabelMap, Volume, crop, resample, resample_to

#: The bundled outline network.
OUTLINE_MODEL = "nodule-outline"
METHODS = ("network", "classical")
#: How far from the seed (mm) the nodule may lie: the heat map's peak falls within 10 mm of the
#: nodule for 0.97 of the held-out LIDC nodules (issue 23).
SEARCH_MM = 10.0
#: The network's nodule probability at the outline's edge: of 0.3, 0.4 and 0.5, the best mean
#: Dice on the validation patients' nodules (the readers outline a nodule's outer edge).
NETWORK_LEVEL = 0.4
#: Tissue into which a ball of this radius (mm) fits is chest wall, mediastinum or diaphragm.
WALL_RADIUS_MM = 12.0
_FULL = np.ones((3, 3, 3), dtype=bool)


# --------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------
def _slice_axes(points_ij: np.ndarray, plane: np.ndarray) -> Tuple[float, float, np.ndarray, np.ndarray]:
    """Longest diameter and widest perpendicular extent (mm) of contour points (N, 2: i, j voxel
    coordinates) in a slice whose in-plane axes are the columns of ``plane`` (3x2, mm per voxel);
    with the end points of each as (2, 2) i, j coordinates."""
    from scipy.spatial import ConvexHull, QhullError

    mm = points_ij @ plane.T  # (N, 3) offsets in mm
    try:
        hull = points_ij[ConvexHull(mm @ np.linalg.qr(plane)[0]).vertices]
    except (QhullError, ValueError):  # collinear points (a one-voxel line): all of them are the hull
        hull = points_ij
    hull_mm = hull @ plane.T
    d = np.linalg.norm(hull_mm[:, None] - hull_mm[None], axis=-1)
    a, b = np.unravel_index(int(np.argmax(d)), d.shape)
    long_mm = float(d[a, b])
    axis = (hull_mm[b] - hull_mm[a]) / max(long_mm, 1e-9)
    normal = np.cross(np.cross(plane[:, 0], plane[:, 1]), axis)  # in-plane, perpendicular to the long axis
    normal /= max(np.linalg.norm(normal), 1e-9)
    across = mm @ normal
    lo, hi = int(np.argmin(across)), int(np.argmax(across))
    # the short axis as drawn: its two extreme points, moved onto the line through the long axis' middle
    middle = (hull[a] + hull[b]) / 2.0 @ plane.T
    along = (mm[[lo, hi]] - middle) @ axis
    ends_mm = mm[[lo, hi]] - along[:, None] * axis
    ends_ij = np.linalg.lstsq(plane, ends_mm.T, rcond=None)[0].T
    return long_mm, float(across[hi] - across[lo]), hull[[a, b]], ends_ij


def measure_outline(mask: Volume) -> dict:
    """What a radiologist measures on a nodule mask (``mask``: non-zero = nodule, K, J, I, any
    grid): ``voxels``, ``volume_mm3``, ``volume_ml``, ``centroid_ras``, and in the slice (K plane;
    axial for an axial CT) where the nodule is longest: ``long_axis_mm`` (the longest diameter),
    ``short_axis_mm`` (the widest extent perpendicular to it), ``mean_diameter_mm`` (their mean),
    with the end points of both axes (``long_axis_ras``, ``short_axis_ras``). Diameters are taken
    on the contour at half a voxel (skimage's marching squares), so a nodule n voxels across
    measures n voxels; measurements are None for an empty mask. Torch-free."""
    from skimage.measure import find_contours

    array = np.asarray(mask.array) > 0
    voxel_mm3 = float(abs(np.linalg.det(mask.ijk_to_ras[:3, :3])))
    voxels = int(array.sum())
    out: dict = {
        "voxels": voxels,
        "volume_mm3": voxels * voxel_mm3,
        "volume_ml": voxels * voxel_mm3 / 1000.0,
        "long_axis_mm": None,
        "short_axis_mm": None,
        "mean_diameter_mm": None,
        "centroid_ras": None,
        "long_axis_ras": None,
        "short_axis_ras": None,
    }
    if not voxels:
        return out
    out["centroid_ras"] = tuple(float(v) for v in mask.ijk_to_ras_points(np.argwhere(array).mean(axis=0)[::-1])[0])
    plane = mask.ijk_to_ras[:3, :2]  # mm per voxel along i and j
    best = None
    for k in np.flatnonzero(array.any(axis=(1, 2))):
        contours = find_contours(np.pad(array[k], 1).astype(np.float32), 0.5)
        points = np.concatenate(contours)[:, ::-1] - 1.0  # (row, col) of the padded slice -> (i, j)
        long_mm, short_mm, long_ij, short_ij = _slice_axes(points, plane)
        if best is None or (long_mm, short_mm) > best[:2]:
            best = (long_mm, short_mm, k, long_ij, short_ij)
    long_mm, short_mm, k, long_ij, short_ij = best

    def ras(ij: np.ndarray) -> tuple:
        points = mask.ijk_to_ras_points(np.column_stack([ij, np.full(len(ij), k)]))
        return tuple(tuple(float(v) for v in p) for p in points)

    out.update(
        long_axis_mm=long_mm,
        short_axis_mm=short_mm,
        mean_diameter_mm=(long_mm + short_mm) / 2.0,
        long_axis_ras=ras(long_ij),
        short_axis_ras=ras(short_ij),
    )
    return out


# --------------------------------------------------------------------------------------------
# the outline
# --------------------------------------------------------------------------------------------
def _block(volume: Volume, seed_ras: np.ndarray, half_mm: float) -> Tuple[Volume, Tuple[Tuple[int, int], ...]]:
    """The CT cut to a box of ``half_mm`` around the seed (clipped to the CT), and the box."""
    c = volume.ras_to_ijk_points(seed_ras)[0]
    half = half_mm / volume.spacing
    box = tuple(
        (max(0, int(np.floor(c[a] - half[a]))), min(volume.shape[2 - a], int(np.ceil(c[a] + half[a])) + 1))
        for a in (2, 1, 0)
    )
    if any(b <= a for a, b in box):
        raise InvalidInputError(f"the outline's seed {seed_ras.tolist()} mm (RAS) lies outside the CT")
    return crop(volume, box), box


def _at_seed(mask: np.ndarray, grid: Volume, seed_ras: np.ndarray, search_mm: float) -> np.ndarray:
    """The 26-connected component of ``mask`` (on ``grid``) holding the seed, else the one nearest
    to it within ``search_mm``; empty when none is that near."""
    labels, n = ndimage.label(mask, structure=_FULL)
    if n == 0:
        return mask
    seed = grid.ras_to_ijk_points(seed_ras)[0][::-1]
    inside = np.all((seed >= -0.5) & (seed < np.asarray(mask.shape) - 0.5))
    if inside and labels[tuple(np.rint(seed).astype(int))]:
        return labels == labels[tuple(np.rint(seed).astype(int))]
    kji = np.indices(mask.shape, dtype=np.float32).reshape(3, -1).T
    offset_mm = grid.ijk_to_ras_points(kji[:, ::-1]) - seed_ras
    distance = np.linalg.norm(offset_mm, axis=1).reshape(mask.shape)
    nearest = ndimage.minimum(distance, labels, index=np.arange(1, n + 1))
    best = int(np.argmin(nearest))
    return labels == best + 1 if nearest[best] <= search_mm else np.zeros_like(mask)


def _network_probability(block: Volume, loaded: Any) -> Volume:
    """The outline network's nodule probability for a CT block, on the block's grid."""
    import torch

    grid = resample(
        block.with_array(block.array.astype(np.float32)), loaded.card.spacing_mm, order=1, default_value=AIR_HU
    )
    x = torch.from_numpy(np.ascontiguousarray(grid.array, dtype=np.float32))[None, None]
    x = loaded.prepare(x.to(loaded.device))
    with torch.inference_mode():
        if x.device.type == "cpu":
            x = x.contiguous(memory_format=torch.channels_last_3d)
        p = torch.sigmoid(loaded.module(x))[0, 0].float().cpu().numpy()
    return resample_to(grid.with_array(p), block, order=1, default_value=0.0)


def _ball_opening(mask: np.ndarray, radius_vox: float) -> np.ndarray:
    """Morphological opening of ``mask`` by a ball of ``radius_vox`` voxels (isotropic grid), by
    two Euclidean distance transforms (a large ball stays as fast as a small one)."""
    core = ndimage.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1, 1:-1] > radius_vox
    return ndimage.distance_transform_edt(~core) <= radius_vox


def _classical_mask(
    block: Volume,
    seed_ras: np.ndarray,
    lungs: Optional[np.ndarray],
    search_mm: float,
    level: float = 0.3,
    opening: float = 0.7,
    penalty: float = 0.25,
) -> np.ndarray:
    """The classical outline on ``block``'s grid (see the module's docstring): the core is the
    deepest tissue point (mm) less ``penalty`` times its distance from the seed, the threshold lies
    ``level`` of the way from the lung's HU to the core's (the readers outline a nodule's outer
    edge), the opening's radius is ``opening`` times the core's. The defaults scored best on the
    validation patients' nodules (benchmarks/outline_quality.py --split validation)."""
    step = float(np.clip(block.spacing[:2].min(), 0.5, 1.0))  # an isotropic working grid: balls are balls
    iso = resample(block.with_array(block.array.astype(np.float32)), (step,) * 3, order=1, default_value=AIR_HU)
    hu = ndimage.gaussian_filter(iso.array, 0.5 / step)
    tissue = hu > -500.0
    inside = ~_ball_opening(tissue, WALL_RADIUS_MM / step)  # the lung side of the chest wall
    if lungs is not None:
        inside &= resample_to(LabelMap.like(block, lungs), iso).array > 0
    parenchyma = hu[inside & (hu < -600.0)]
    lung_hu = float(np.median(parenchyma)) if parenchyma.size > 50 else -850.0
    # the core: the thickest tissue near the seed (ground glass too: halfway up from the lung)
    candidate = inside & (hu > lung_hu + 0.5 * (min(-100.0, lung_hu + 700.0) - lung_hu))
    depth = ndimage.distance_transform_edt(candidate) * step
    kji = np.indices(hu.shape, dtype=np.float32).reshape(3, -1).T
    distance = np.linalg.norm(iso.ijk_to_ras_points(kji[:, ::-1]) - seed_ras, axis=1).reshape(hu.shape)
    score = np.where(distance <= search_mm, depth - penalty * distance, -np.inf)
    core = np.unravel_index(int(np.argmax(score)), hu.shape)
    radius = float(depth[core])
    if not np.isfinite(score[core]) or radius <= 0:
        return np.zeros(block.shape, dtype=bool)
    ball = distance_from(iso, core) <= max(0.5 * radius, step)
    core_hu = float(np.median(hu[ball]))
    threshold = float(np.clip(lung_hu + level * (core_hu - lung_hu), -800.0, -300.0))
    foreground = inside & (hu > threshold)
    # vessels thinner than the opening's ball come off; the ball grows with the nodule
    opening = float(np.clip(opening * radius, 0.7, 4.0)) / step
    eroded = ndimage.distance_transform_edt(foreground) > opening
    labels, _ = ndimage.label(eroded, structure=_FULL)
    if labels[core] == 0:
        return np.zeros(block.shape, dtype=bool)
    nodule = (ndimage.distance_transform_edt(labels != labels[core]) <= opening) & foreground
    nodule = ndimage.binary_fill_holes(nodule)
    return resample_to(iso.with_array(nodule.astype(np.float32)), block, order=1).array >= 0.5


def distance_from(grid: Volume, kji: Sequence[int]) -> np.ndarray:
    """Distance (mm) of every voxel of ``grid`` to voxel ``kji``."""
    d = [(np.arange(n) - c) for n, c in zip(grid.shape, kji)]
    s = grid.spacing[::-1]
    return np.sqrt(
        (d[0][:, None, None] * s[0]) ** 2 + (d[1][None, :, None] * s[1]) ** 2 + (d[2][None, None, :] * s[2]) ** 2
    )


def nodule_outline(
    volume: Volume,
    seed_ras: Sequence[float],
    lungs: Optional[np.ndarray] = None,
    method: str = "network",
    model: Any = OUTLINE_MODEL,
    device: Any = None,
    search_mm: float = SEARCH_MM,
) -> Outline:
    """The outline of the nodule at ``seed_ras`` (RAS mm; e.g. a hot region's peak) in a CT
    ``volume`` (HU), with its measurements (:func:`measure_outline`).

    ``lungs``: the CT's lung mask (bool, K, J, I on its grid), used by the classical method to keep
    the chest wall out. ``method``: ``"network"`` (``model``: a name, path or ``LoadedModel`` of an
    outline network, default the bundled ``nodule-outline``; ``device`` as :func:`explain`'s) or
    ``"classical"`` (torch-free). The nodule may lie up to ``search_mm`` from the seed; farther, or
    with nothing nodule-like there, the outline is empty (``Outline.found`` is False). The mask is a
    box of the CT's grid around the seed (see :class:`Outline`).
    """
    seed = np.asarray(seed_ras, dtype=float).reshape(3)
    if not np.all(np.isfinite(seed)):
        raise InvalidInputError(f"the outline's seed {seed.tolist()} must be three finite RAS coordinates (mm)")
    if method not in METHODS:
        raise InvalidInputError(f"outline method {method!r}: use one of {', '.join(METHODS)}")
    if lungs is not None and np.shape(lungs) != volume.shape:
        raise InvalidInputError(f"lungs has shape {np.shape(lungs)}, the CT {volume.shape} (K, J, I)")
    name = None
    if method == "network":
        from .device import resolve_device
        from .models import LoadedModel, cached_model

        loaded = model if isinstance(model, LoadedModel) else cached_model(model, resolve_device(device))
        if loaded.card.output != "mask":
            raise InvalidInputError(
                f"model {loaded.card.name!r} is not an outline network (its card's output is "
                f"{loaded.card.output!r}, not 'mask')"
            )
        name = f"{loaded.card.name} {loaded.card.version}"
        half = 0.5 * float(max(np.asarray(loaded.card.patch_size) * loaded.card.spacing_mm))
    else:
        half = WALL_RADIUS_MM + 2.0 * search_mm + 6.0  # a wall ball beside a 30 mm nodule up to search_mm away
    for grow in (1.0, 1.6):  # a nodule reaching the block's side gets one larger block
        block, box = _block(volume, seed, half * grow)
        if method == "network":
            mask = _at_seed(_network_probability(block, loaded).array >= NETWORK_LEVEL, block, seed, search_mm)
            mask = ndimage.binary_fill_holes(mask)
        else:
            sub = None if lungs is None else np.asarray(lungs, bool)[tuple(slice(a, b) for a, b in box)]
            mask = _classical_mask(block, seed, sub, search_mm)
        sides = [
            mask[0].any(),
            mask[-1].any(),
            mask[:, 0].any(),
            mask[:, -1].any(),
            mask[:, :, 0].any(),
            mask[:, :, -1].any(),
        ]
        at_ct_edge = [
            box[0][0] == 0,
            box[0][1] == volume.shape[0],
            box[1][0] == 0,
            box[1][1] == volume.shape[1],
            box[2][0] == 0,
            box[2][1] == volume.shape[2],
        ]
        if not any(s and not e for s, e in zip(sides, at_ct_edge)):
            break
    outline_mask = LabelMap.like(block, mask.astype(np.uint8))
    return Outline(
        mask=outline_mask,
        seed_ras=tuple(float(v) for v in seed),
        method=method,
        model=name,
        **measure_outline(outline_mask),
    )
