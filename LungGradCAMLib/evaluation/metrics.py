"""Is the heat map right? Overlap, localisation and faithfulness metrics for 3D CAMs.

Every function accepts :class:`Volume` objects or numpy arrays (axis order K, J, I); the CAM and
the truth must have the same shape (and, when both are Volumes, the same geometry). Truth masks are
taken as ``truth != 0``. Distances are in mm. Classification metrics (accuracy, AUC, confidence
intervals) live in :mod:`LungGradCAMLib.evaluation.evaluate`.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.errors import InvalidInputError
from ..core.volume import AIR_HU, Volume, same_geometry

ArrayOrVolume = Union[np.ndarray, Volume]


def _array(x: ArrayOrVolume, what: str) -> np.ndarray:
    array = x.array if isinstance(x, Volume) else np.asarray(x)
    if array.ndim != 3:
        raise InvalidInputError(f"{what} must be a 3D (K, J, I) array or Volume, got shape {array.shape}")
    return array


def _pair(a: ArrayOrVolume, b: ArrayOrVolume, names: Tuple[str, str]) -> Tuple[np.ndarray, np.ndarray]:
    """The two arrays, after checking they share a shape (and geometry when both are Volumes)."""
    x, y = _array(a, names[0]), _array(b, names[1])
    if x.shape != y.shape:
        raise InvalidInputError(
            f"{names[0]} has shape {x.shape} but {names[1]} has {y.shape} (K, J, I); "
            f"resample one onto the other's grid first"
        )
    if isinstance(a, Volume) and isinstance(b, Volume) and not same_geometry(a, b):
        raise InvalidInputError(
            f"{names[0]} and {names[1]} have the same shape but different ijk_to_ras geometry; "
            "resample one onto the other (volume.resample_to)"
        )
    return x, y


def _cam(array: np.ndarray) -> np.ndarray:
    cam = np.asarray(array, dtype=np.float64)
    if not np.all(np.isfinite(cam)):
        raise InvalidInputError("the CAM holds NaN or infinite values; recompute or clean it")
    return cam


def _within(within: Optional[ArrayOrVolume], shape: Tuple[int, ...]) -> Optional[np.ndarray]:
    if within is None:
        return None
    mask = _array(within, "within")
    if mask.shape != shape:
        raise InvalidInputError(f"within has shape {mask.shape} but the CAM has {shape} (K, J, I)")
    return mask != 0


def _spacing_kji(x: ArrayOrVolume, spacing: Optional[Sequence[float]], why: str) -> np.ndarray:
    """Voxel size (mm) in K, J, I order from ``spacing`` (given as i, j, k) or the Volume."""
    if spacing is not None:
        s = np.asarray(spacing, dtype=np.float64)
        if s.shape != (3,) or np.any(s <= 0):
            raise InvalidInputError(f"spacing must be three positive numbers (i, j, k mm), got {spacing}")
        return s[::-1]
    if isinstance(x, Volume):
        return x.spacing[::-1]
    raise InvalidInputError(f"{why} needs voxel sizes: pass Volumes or spacing=(i, j, k) in mm")


# --- overlap --------------------------------------------------------------------------------------


def dice(a: ArrayOrVolume, b: ArrayOrVolume) -> float:
    """Dice = 2|A ∩ B| / (|A| + |B|) of two masks (non-zero = inside); 1.0 when both are empty."""
    x, y = _pair(a, b, ("a", "b"))
    x, y = x != 0, y != 0
    total = int(np.count_nonzero(x)) + int(np.count_nonzero(y))
    return 1.0 if total == 0 else 2.0 * np.count_nonzero(x & y) / total


def iou(a: ArrayOrVolume, b: ArrayOrVolume) -> float:
    """Intersection over union |A ∩ B| / |A ∪ B| of two masks; 1.0 when both are empty."""
    x, y = _pair(a, b, ("a", "b"))
    x, y = x != 0, y != 0
    union = int(np.count_nonzero(x | y))
    return 1.0 if union == 0 else np.count_nonzero(x & y) / union


def cam_to_8bit(cam: ArrayOrVolume, within: Optional[ArrayOrVolume] = None) -> np.ndarray:
    """The CAM scaled to 8 bits by min-max: ``floor(255 * (c - min) / (max - min) + 0.5)``, uint8.

    ``min``/``max`` are taken over the voxels inside ``within`` (all voxels by default); voxels
    outside it are scaled the same way and clipped to 0..255. A constant CAM maps to 0.
    """
    c = _cam(_array(cam, "cam"))
    mask = _within(within, c.shape)
    values = c if mask is None else c[mask]
    lo, hi = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if hi <= lo:
        return np.zeros(c.shape, dtype=np.uint8)
    return np.clip(np.floor(255.0 * (c - lo) / (hi - lo) + 0.5), 0, 255).astype(np.uint8)


def dice_curve(cam: ArrayOrVolume, truth: ArrayOrVolume, within: Optional[ArrayOrVolume] = None) -> np.ndarray:
    """Dice(truth, B_t) for t = 0..255, where B_t = CAM8 > t and CAM8 = :func:`cam_to_8bit`.

    With ``within``, only voxels inside that mask count (for the scaling and both masks). Computed
    from two 256-bin histograms and their reverse cumulative sums, in one pass over the volume.
    """
    c, t = _pair(cam, truth, ("cam", "truth"))
    mask = _within(within, c.shape)
    cam8 = cam_to_8bit(c, mask)
    truth_mask = t != 0
    if mask is not None:
        cam8, truth_mask = cam8[mask], truth_mask[mask]
    all_hist = np.bincount(cam8.ravel(), minlength=256)
    truth_hist = np.bincount(cam8[truth_mask].ravel(), minlength=256)
    # |{v > t}| = sum of the histogram above t: reverse cumulative sum, shifted by one bin
    above = np.concatenate([np.cumsum(all_hist[::-1])[::-1][1:], [0]])
    hits = np.concatenate([np.cumsum(truth_hist[::-1])[::-1][1:], [0]])
    denominator = int(truth_mask.sum()) + above
    # both masks empty (no truth, nothing above t) counts as perfect agreement, as in dice()
    return np.where(denominator == 0, 1.0, 2.0 * hits / np.maximum(denominator, 1))


def mean_dice(cam: ArrayOrVolume, truth: ArrayOrVolume, within: Optional[ArrayOrVolume] = None) -> float:
    """Guan & Loew's mean-Dice: the mean over t = 0..255 of Dice(truth, CAM8 > t).

    CAM8 is the CAM min-max scaled to 8 bits (:func:`cam_to_8bit`). A CAM equal to the truth mask
    scores 255/256 (t = 255 selects nothing). See :func:`dice_curve` for ``within``.
    """
    return float(dice_curve(cam, truth, within).mean())


class BestDice(NamedTuple):
    """The best single-threshold Dice and its 8-bit threshold t (binarisation CAM8 > t)."""

    dice: float
    threshold: int


def best_dice(cam: ArrayOrVolume, truth: ArrayOrVolume, within: Optional[ArrayOrVolume] = None) -> BestDice:
    """The highest Dice(truth, CAM8 > t) over t = 0..255, and the smallest t reaching it."""
    curve = dice_curve(cam, truth, within)
    t = int(np.argmax(curve))
    return BestDice(float(curve[t]), t)


# --- localisation ---------------------------------------------------------------------------------


def _peak(cam: ArrayOrVolume, truth: ArrayOrVolume) -> Tuple[np.ndarray, np.ndarray]:
    """The truth mask and the (k, j, i) index of the CAM's first maximum (C order)."""
    c, t = _pair(cam, truth, ("cam", "truth"))
    t = t != 0
    if not t.any():
        raise InvalidInputError("the truth mask is empty: the pointing game needs a target")
    return t, np.array(np.unravel_index(int(np.argmax(_cam(c))), c.shape))


def peak_distance_mm(cam: ArrayOrVolume, truth: ArrayOrVolume, spacing: Optional[Sequence[float]] = None) -> float:
    """Distance in mm from the CAM's maximum voxel to the nearest truth voxel (centre to centre).

    0 when the maximum lies inside the truth. On ties the first maximum in K, J, I (C) order is
    used. Voxel sizes come from ``spacing`` (i, j, k mm) or the CAM/truth Volume.
    """
    t, peak = _peak(cam, truth)
    if t[tuple(peak)]:
        return 0.0
    size = _spacing_kji(cam if isinstance(cam, Volume) else truth, spacing, "a distance in mm")
    return float(np.sqrt((((np.argwhere(t) - peak) * size) ** 2).sum(axis=1).min()))


def pointing_game(
    cam: ArrayOrVolume, truth: ArrayOrVolume, tolerance_mm: float = 0.0, spacing: Optional[Sequence[float]] = None
) -> bool:
    """A hit when the CAM's maximum voxel is inside the truth, or within ``tolerance_mm`` of it.

    See :func:`peak_distance_mm` (ties, ``spacing``); with ``tolerance_mm=0`` no spacing is needed.
    """
    if tolerance_mm < 0:
        raise InvalidInputError(f"tolerance_mm must be >= 0, got {tolerance_mm}")
    if tolerance_mm == 0:
        t, peak = _peak(cam, truth)
        return bool(t[tuple(peak)])
    return peak_distance_mm(cam, truth, spacing) <= tolerance_mm


def energy_pointing_game(cam: ArrayOrVolume, truth: ArrayOrVolume, within: Optional[ArrayOrVolume] = None) -> float:
    """Share of the CAM's mass inside the truth: sum(CAM over truth ∩ W) / sum(CAM over W).

    W is ``within`` (e.g. the lungs) or the whole volume. The CAM must be non-negative; a CAM
    with no mass in W scores 0.
    """
    c, t = _pair(cam, truth, ("cam", "truth"))
    c = _cam(c)
    if c.min() < 0:
        raise InvalidInputError("the CAM has negative values; energy needs a non-negative CAM (clip or rescale it)")
    mask = _within(within, c.shape)
    if mask is not None:
        c = np.where(mask, c, 0.0)
    total = float(c.sum())
    return 0.0 if total == 0 else float(c[t != 0].sum()) / total


# --- faithfulness ---------------------------------------------------------------------------------


class Curve(NamedTuple):
    """A deletion/insertion curve: the fraction of voxels changed (0..1), the model's score at each
    fraction, and the area under it (trapezoid rule over the fraction)."""

    fractions: np.ndarray
    scores: np.ndarray
    auc: float


def _perturbation_curve(
    insert: bool,
    volume: ArrayOrVolume,
    cam: ArrayOrVolume,
    score_fn: Callable[[np.ndarray], object],
    steps: int,
    baseline: Union[str, float],
    blur_sigma_mm: float,
    spacing: Optional[Sequence[float]],
    batch_size: int,
) -> Curve:
    from scipy.integrate import trapezoid
    from scipy.ndimage import gaussian_filter

    x, c = _pair(volume, cam, ("volume", "cam"))
    c = _cam(c)
    if steps < 1 or batch_size < 1:
        raise InvalidInputError(f"steps and batch_size must be >= 1, got {steps} and {batch_size}")
    x = np.asarray(x, dtype=np.float32)
    if baseline == "air":
        base = np.full_like(x, AIR_HU)
    elif baseline == "blur":
        sigma = blur_sigma_mm / _spacing_kji(volume if isinstance(volume, Volume) else cam, spacing, "blur")
        base = gaussian_filter(x, sigma).astype(np.float32)
    elif isinstance(baseline, (int, float)):
        base = np.full_like(x, float(baseline))
    else:
        raise InvalidInputError(f"baseline must be 'air', 'blur' or a number (HU), got {baseline!r}")

    # rank 0 = hottest voxel; a stable sort keeps ties in K, J, I order so the curve is reproducible
    rank = np.empty(c.size, dtype=np.int64)
    rank[np.argsort(-c.ravel(), kind="stable")] = np.arange(c.size)
    rank = rank.reshape(c.shape)
    fractions = np.linspace(0.0, 1.0, steps + 1)
    counts = np.round(fractions * c.size).astype(np.int64)
    first, second = (base, x) if insert else (x, base)
    scores = []
    for start in range(0, len(counts), batch_size):
        # changed voxels (rank < n) take `second`, the rest keep `first`
        batch = np.stack([np.where(rank < n, second, first) for n in counts[start : start + batch_size]])
        out = score_fn(batch)
        if hasattr(out, "detach"):  # a torch tensor
            out = out.detach().cpu().numpy()
        out = np.asarray(out, dtype=np.float64).reshape(-1)
        if out.shape[0] != batch.shape[0]:
            raise InvalidInputError(f"score_fn returned {out.shape[0]} scores for a batch of {batch.shape[0]}")
        scores.append(out)
    scores_array = np.concatenate(scores)
    return Curve(fractions, scores_array, float(trapezoid(scores_array, fractions)))


def deletion_curve(
    volume: ArrayOrVolume,
    cam: ArrayOrVolume,
    score_fn: Callable[[np.ndarray], object],
    steps: int = 20,
    baseline: Union[str, float] = "air",
    blur_sigma_mm: float = 10.0,
    spacing: Optional[Sequence[float]] = None,
    batch_size: int = 8,
) -> Curve:
    """Deletion: replace the hottest voxels by ``baseline`` in ``steps`` equal steps (0..100 %)
    and follow the model's score; a faithful CAM makes it fall fast (low area is good).

    ``volume``: the model's input (CT in HU, K, J, I). ``score_fn`` takes a float32 batch
    (B, K, J, I) in the same units and returns B scores (numpy or torch). ``baseline``: ``"air"``
    (-1024 HU), ``"blur"`` (a Gaussian blur of the volume, sigma ``blur_sigma_mm`` mm; needs
    ``spacing`` (i, j, k mm) or a Volume), or a constant.
    """
    return _perturbation_curve(False, volume, cam, score_fn, steps, baseline, blur_sigma_mm, spacing, batch_size)


def insertion_curve(
    volume: ArrayOrVolume,
    cam: ArrayOrVolume,
    score_fn: Callable[[np.ndarray], object],
    steps: int = 20,
    baseline: Union[str, float] = "blur",
    blur_sigma_mm: float = 10.0,
    spacing: Optional[Sequence[float]] = None,
    batch_size: int = 8,
) -> Curve:
    """Insertion: start from ``baseline`` and reveal the hottest voxels of ``volume`` in ``steps``
    equal steps; a faithful CAM makes the score rise fast (high area is good). Arguments as in
    :func:`deletion_curve`."""
    return _perturbation_curve(True, volume, cam, score_fn, steps, baseline, blur_sigma_mm, spacing, batch_size)


# --- detection: FROC ------------------------------------------------------------------------------

#: LUNA16's FROC operating points: false positives (here: false hot regions) per scan.
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


class Froc(NamedTuple):
    """A FROC over operating points (e.g. heat-map thresholds): ``sensitivity`` and
    ``fp_per_scan`` at each point; ``at``: the sensitivity at each of ``rates`` false positives per
    scan; ``cpm``: their mean (LUNA16's competition performance metric)."""

    sensitivity: np.ndarray
    fp_per_scan: np.ndarray
    rates: Tuple[float, ...]
    at: np.ndarray
    cpm: float


def froc(hits: np.ndarray, false_positives: Sequence[float], n_scans: int, rates: Sequence[float] = FROC_RATES) -> Froc:
    """The FROC of a detector run at several operating points over ``n_scans`` scans.

    ``hits``: bool (points, nodules), whether each nodule was found at each operating point;
    ``false_positives``: (points,) the false detections summed over all scans at each point. The
    sensitivity at a rate r is that of the best operating point with at most r false positives
    per scan (0 when none has so few): a point the detector can be run at, not an interpolation.
    ``cpm`` is the mean over ``rates`` (LUNA16: 1/8, 1/4, 1/2, 1, 2, 4, 8 per scan).
    """
    found = np.asarray(hits, dtype=bool)
    fps = np.asarray(false_positives, dtype=np.float64).reshape(-1)
    if found.ndim != 2 or found.shape[0] != fps.size:
        raise InvalidInputError(
            f"hits must be (points, nodules) with one row per entry of false_positives; got "
            f"{found.shape} and {fps.size}"
        )
    if n_scans < 1 or found.shape[1] < 1:
        raise InvalidInputError(f"a FROC needs scans and nodules; got {n_scans} scans and {found.shape[1]} nodules")
    sensitivity = found.mean(axis=1)
    per_scan = fps / n_scans
    at = np.array([sensitivity[per_scan <= r].max(initial=0.0) for r in rates])
    return Froc(sensitivity, per_scan, tuple(float(r) for r in rates), at, float(at.mean()))
