"""From a CAM heat map to a segmentation of its hot regions.

``segment_cam`` thresholds a CAM (absolute level, percentile or Otsu), optionally inside a mask
(the lungs by default), splits the result into 26-connected regions, drops small ones, keeps the
hottest N and measures each (volume, CAM, HU, RAS position, bounding box, the model's score).
:func:`~LungGradCAMLib.io.segnrrd.write_segmentation` writes it as a Slicer segmentation file.

All arrays are in the library's axis order **K, J, I**; positions are **RAS** mm.
"""

from __future__ import annotations

from typing import Any, List, Optional, Tuple, Union

import numpy as np
from scipy import ndimage

from ..core.errors import InvalidInputError, VolumeError
from ..core.results import Explanation, Region, Segmentation
from ..core.volume import LabelMap, Volume, bbox, same_geometry
from ..io.segnrrd import PALETTE
from ..options import DEFAULTS, Threshold, parse_threshold

#: 26-connectivity: voxels touching by a face, an edge or a corner belong to one region.
_FULL_3X3X3 = np.ones((3, 3, 3), dtype=bool)


def _cam_volume(explanation_or_cam: Union[Explanation, Volume]) -> Volume:
    if isinstance(explanation_or_cam, Explanation):
        return explanation_or_cam.cam
    if isinstance(explanation_or_cam, Volume):
        return explanation_or_cam
    raise InvalidInputError(
        f"segment_cam: expected an Explanation or a CAM Volume, got {type(explanation_or_cam).__name__}; "
        "wrap a bare array as Volume(array, ijk_to_ras) so regions can be placed in RAS"
    )


def _on_grid(volume: Optional[Volume], cam: Volume, what: str) -> Optional[np.ndarray]:
    """``volume``'s array, after checking it lies on the CAM's voxel grid."""
    if volume is None:
        return None
    if not same_geometry(volume, cam):
        raise VolumeError(
            f"segment_cam: {what} {volume.shape} does not have the CAM's geometry {cam.shape}; "
            f"resample it onto the CAM (volume.resample_to) first"
        )
    return volume.array


def _mask_array(mask: Union[np.ndarray, Volume], shape: Tuple[int, ...], what: str) -> np.ndarray:
    array = mask.array if isinstance(mask, Volume) else np.asarray(mask)
    if array.shape != tuple(shape):
        raise InvalidInputError(
            f"segment_cam: {what} has shape {array.shape}, the CAM has {tuple(shape)} (K, J, I); "
            "pass a mask on the CAM's voxel grid"
        )
    return array.astype(bool, copy=False)


def threshold_level(values: np.ndarray, threshold: Any) -> float:
    """The CAM level that ``threshold`` means for ``values`` (the CAM voxels considered).

    ``threshold`` (read by :func:`~LungGradCAMLib.options.parse_threshold`): an absolute level in
    [0, 1]; ``"otsu"`` (``skimage.filters.threshold_otsu``); or a percentile of ``values``:
    ``"p99"`` / ``("percentile", 99)``. Voxels ``>= level`` are hot.
    """
    threshold = parse_threshold(threshold)
    if not isinstance(threshold, str):
        return threshold
    if threshold == "otsu":
        from skimage.filters import threshold_otsu

        if values.size == 0 or values.min() == values.max():
            return float(values.max()) if values.size else 1.0
        return float(threshold_otsu(values))
    return float(np.percentile(values, float(threshold[1:]))) if values.size else 1.0


def segment_cam(
    explanation_or_cam: Union[Explanation, Volume],
    threshold: Threshold = DEFAULTS["threshold"],
    within: Union[np.ndarray, Volume, None, bool] = None,
    min_volume_mm3: float = 10.0,
    max_regions: Optional[int] = 10,
    ct: Optional[Volume] = None,
    score_map: Optional[Volume] = None,
) -> Segmentation:
    """Segment the hot regions of a CAM.

    ``explanation_or_cam``: an :class:`Explanation` (its ``cam``, ``ct``, ``lung_mask`` and
    ``score_map`` are used) or a CAM :class:`Volume` (float, [0, 1], K, J, I).
    ``threshold``: see :func:`threshold_level`; percentiles and Otsu are taken over the voxels
    inside ``within``. Hot voxels are ``cam >= level`` and ``cam > 0``.
    ``within``: bool mask (K, J, I) restricting the regions; ``None`` = the Explanation's lung mask
    when it has one, else everywhere; ``False`` = everywhere.
    ``min_volume_mm3``: regions smaller than this (in mm³) are dropped.
    ``max_regions``: keep the N hottest regions (``None`` = all).
    ``ct``/``score_map``: override the Explanation's CT (HU) and score map (model probability per
    voxel); both must have the CAM's geometry.

    Regions are 26-connected, ordered hottest first (peak CAM, then volume) and labelled 1..N;
    ``Segmentation.threshold`` is the level used, ``Segmentation.peak`` the hottest region's peak
    or, with no region, the highest CAM value inside ``within``. Volumes use the voxel volume |det(ijk_to_ras)|
    in mm³, so oblique grids are measured correctly.

    Example (a heat map made by hand; usually ``lgc.segment_cam(lgc.explain(ct))``)::

        >>> import numpy as np
        >>> import LungGradCAMLib as lgc
        >>> heat = np.zeros((40, 64, 64), np.float32)
        >>> heat[18:24, 28:36, 28:36] = 0.8  # one hot block of 6 x 8 x 8 voxels
        >>> cam = lgc.Volume(heat, np.diag([0.5, 0.5, 1.0, 1.0]))  # (i, j, k) spacing 0.5, 0.5, 1 mm
        >>> segmentation = lgc.segment_cam(cam, threshold=0.5)
        >>> [(region.name, round(region.volume_ml, 3)) for region in segmentation.regions]
        [('heat-map region 1', 0.096)]
    """
    cam_volume = _cam_volume(explanation_or_cam)
    cam = np.asarray(cam_volume.array, dtype=np.float32)
    low, high = (float(cam.min()), float(cam.max())) if cam.size else (0.0, 0.0)
    if not np.isfinite([low, high]).all():  # NaN and inf reach the min or the max
        raise InvalidInputError("segment_cam: the CAM holds NaN or infinite values; recompute or clean it")
    explanation = explanation_or_cam if isinstance(explanation_or_cam, Explanation) else None
    if min_volume_mm3 < 0:
        raise InvalidInputError(f"segment_cam: min_volume_mm3 must be >= 0, got {min_volume_mm3}")
    if max_regions is not None and max_regions < 1:
        raise InvalidInputError(f"segment_cam: max_regions must be >= 1 or None, got {max_regions}")

    if within is None and explanation is not None:
        within = explanation.lung_mask
    mask = None if within is None or within is False else _mask_array(within, cam.shape, "within")
    if ct is None and explanation is not None:
        ct = explanation.ct
    if score_map is None and explanation is not None:
        score_map = explanation.score_map
    hu = _on_grid(ct, cam_volume, "the CT")
    scores = _on_grid(score_map, cam_volume, "the score map")

    threshold = parse_threshold(threshold)
    absolute = not isinstance(threshold, str)
    if absolute and (low < 0 or high > 1):
        raise InvalidInputError(
            f"segment_cam: the CAM spans [{low:g}, {high:g}], not [0, 1], so an absolute "
            "threshold is meaningless; normalise the CAM or use 'otsu' / 'p99'"
        )
    # an absolute level needs no values; Otsu and percentiles take those inside the mask
    level = threshold_level(np.empty(0) if absolute else cam if mask is None else cam[mask], threshold)
    # a zero voxel carries no evidence: never hot, so an all-zero CAM yields no region at any level
    hot = cam >= level if level > 0 else cam > 0
    if mask is not None:
        hot &= mask

    # label and measure inside the hot voxels' bounding box only: on a whole scan that is a
    # fraction of the volume, and every pass below (label, nonzero, find_objects) shrinks with it
    sub = bbox(hot) or (slice(0, 0),) * 3
    labels, n = ndimage.label(hot[sub], structure=_FULL_3X3X3)
    cam_sub = cam[sub]
    labelled = labels > 0
    # intp labels and float64 values keep np.ufunc.at on its fast, cast-free path
    owner = labels[labelled].astype(np.intp)
    voxel_mm3 = float(abs(np.linalg.det(cam_volume.ijk_to_ras[:3, :3])))
    counts = np.bincount(owner, minlength=n + 1)
    peaks = _label_max(cam_sub[labelled], owner, n)
    index = np.arange(1, n + 1)[counts[1:] * voxel_mm3 >= min_volume_mm3]
    # lexsort: the last key is primary -> hottest peak first, larger region first on ties
    keep = index[np.lexsort((-counts[index], -peaks[index]))][:max_regions]
    lut = np.zeros(n + 1, dtype=np.uint8 if len(keep) < 256 else np.uint16)
    lut[keep] = np.arange(1, len(keep) + 1)
    labelmap = np.zeros(cam.shape, dtype=lut.dtype)
    labelmap[sub] = lut[labels]
    offset = np.array([s.start for s in sub])
    regions = _measure(
        labelmap[sub],
        len(keep),
        offset,
        cam_sub,
        None if hu is None else hu[sub],
        None if scores is None else scores[sub],
        cam_volume,
        voxel_mm3,
    )
    # the highest heat looked at: the hottest region's peak, else (nothing kept) one masked pass
    peak = regions[0].peak_cam if regions else float(high if mask is None else np.max(cam, where=mask, initial=0.0))
    return Segmentation(LabelMap.like(cam_volume, labelmap, kind="labelmap"), regions, level, peak)


def _label_max(values: np.ndarray, owner: np.ndarray, n: int) -> np.ndarray:
    """Per-label maximum of ``values`` (index 0..n; -inf where a label has no voxel)."""
    out = np.full(n + 1, -np.inf)
    np.maximum.at(out, owner, np.asarray(values, dtype=np.float64))
    return out


def _measure(
    labels: np.ndarray,
    n: int,
    offset: np.ndarray,
    cam: np.ndarray,
    hu: Optional[np.ndarray],
    scores: Optional[np.ndarray],
    geometry: Volume,
    voxel_mm3: float,
) -> List[Region]:
    """One :class:`Region` per label 1..n of ``labels``, a box of the volume starting at voxel
    ``offset`` (k, j, i); ``cam``/``hu``/``scores`` are the same box. One bincount / ufunc.at per
    statistic over the labelled voxels: no per-region or per-voxel Python loop."""
    if n == 0:
        return []
    labelled = labels > 0
    where = np.flatnonzero(labelled)
    owner = labels[labelled].astype(np.intp)
    values = cam[labelled].astype(np.float64)
    counts = np.bincount(owner, minlength=n + 1)[1:]
    label_peaks = _label_max(values, owner, n)
    peaks = label_peaks[1:]
    means = np.bincount(owner, values, n + 1)[1:] / counts
    # the first peak voxel of each region in C order: the smallest flat index holding its maximum
    at_peak = values == label_peaks[owner]
    first = np.full(n + 1, labels.size, dtype=np.int64)
    np.minimum.at(first, owner[at_peak], where[at_peak])
    peak_kji = np.column_stack(np.unravel_index(first[1:], labels.shape)) + offset
    # one index axis at a time (k, j, i from the flat index) keeps memory at one extra array
    strides = np.cumprod((1,) + labels.shape[:0:-1])[::-1]
    centroid_kji = (
        np.column_stack(
            [
                np.bincount(owner, (where // stride) % size, n + 1)[1:] / counts
                for stride, size in zip(strides, labels.shape)
            ]
        )
        + offset
    )
    centroids = geometry.ijk_to_ras_points(centroid_kji[:, ::-1])
    peak_ras = geometry.ijk_to_ras_points(peak_kji[:, ::-1])
    none = [None] * n
    if hu is not None:
        hu_values = hu[labelled].astype(np.float64)
        mean_hu = np.bincount(owner, hu_values, n + 1)[1:] / counts
        max_hu = _label_max(hu_values, owner, n)[1:]
    else:
        mean_hu, max_hu = none, none
    region_scores = none if scores is None else _label_max(scores[labelled], owner, n)[1:]
    regions = []
    for r, box in enumerate(ndimage.find_objects(labels, max_label=n)):
        bbox_ijk = tuple((int(s.start + o), int(s.stop + o)) for s, o in zip(box, offset))
        # RAS box of the voxel centres at the 8 corners of the IJK box (covers oblique grids)
        (k0, k1), (j0, j1), (i0, i1) = bbox_ijk
        corners = [[i, j, k] for k in (k0, k1 - 1) for j in (j0, j1 - 1) for i in (i0, i1 - 1)]
        corners_ras = geometry.ijk_to_ras_points(corners)
        volume_mm3 = float(counts[r]) * voxel_mm3
        regions.append(
            Region(
                label=r + 1,
                name=f"heat-map region {r + 1}",
                voxels=int(counts[r]),
                volume_mm3=volume_mm3,
                volume_ml=volume_mm3 / 1000.0,
                peak_cam=float(peaks[r]),
                mean_cam=float(means[r]),
                mean_hu=None if mean_hu[r] is None else float(mean_hu[r]),
                max_hu=None if max_hu[r] is None else float(max_hu[r]),
                centroid_ras=tuple(float(v) for v in centroids[r]),
                peak_ras=tuple(float(v) for v in peak_ras[r]),
                bbox_ijk=bbox_ijk,
                bbox_ras=(
                    tuple(float(v) for v in corners_ras.min(axis=0)),
                    tuple(float(v) for v in corners_ras.max(axis=0)),
                ),
                color=PALETTE[r % len(PALETTE)],
                score=None if region_scores[r] is None else float(region_scores[r]),
            )
        )
    return regions
