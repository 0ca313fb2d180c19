"""DICOM CT series <-> :class:`Volume`.

Reading (:func:`load_dicom_series`; :func:`~LungGradCAMLib.io.dicom_series.list_dicom_series` lists
the series; the headers are :mod:`.dicom_headers`'s, the series and their parts
:mod:`.dicom_series`'s, the pixels :mod:`.dicom_pixels`'s, the geometry this module's):

* ``source`` is a folder (searched recursively) or a list of files. Files that are not DICOM, DICOMDIR
  and non-image objects (SR, RTSTRUCT, ...) are ignored; unreadable DICOM is reported by name.
* Slices are grouped by SeriesInstanceUID and a series is split into *parts* when its slices differ
  in orientation, size or pixel spacing, or when several acquisitions overlap in space. A part of a
  split series is named ``"<SeriesInstanceUID>#<n>"``.
* Slices are ordered by the projection of ImagePositionPatient on the slice normal (the cross product
  of the two ImageOrientationPatient cosines), never by InstanceNumber or file name; the slice
  spacing comes from the positions, not from SliceThickness.
* HU = stored * RescaleSlope + RescaleIntercept (per slice), float32. Pixel Padding Value (and the
  range to Pixel Padding Range Limit) becomes -1024 HU, and CT values below ``min_hu`` (default
  -1024, air) are raised to it: scanners pad outside the reconstruction circle with -2048/-3024.
* Irregular spacing, a few missing slices (up to ``max_gap_slices`` in one gap) and gantry tilt
  (positions that drift in-plane) are resampled onto a regular grid along the slice normal, with a
  :class:`DicomResampledWarning` that says what was done; larger gaps raise
  :class:`SeriesGeometryError`. Duplicate positions with identical pixels are dropped; with
  different pixels they are an error.
* Compressed transfer syntaxes decode through pydicom's handlers (pylibjpeg, pylibjpeg-libjpeg,
  pylibjpeg-openjpeg, pylibjpeg-rle, pyjpegls); Enhanced (multi-frame) CT uses the per-frame and
  shared functional groups.
* Headers are read first (pixel data skipped), then pixel data is decoded by a thread pool straight
  into one preallocated float32 array.

Geometry is DICOM's LPS until the single conversion to RAS in :func:`_ijk_to_ras`;
:func:`~LungGradCAMLib.io.dicom_write.write_dicom_series` does the inverse once. Arrays are (K, J, I) = (slice, row, column).
"""

from __future__ import annotations

import functools
import logging
import warnings
from typing import Iterable, List, Optional, Tuple, Union

import numpy as np

from ..core.errors import DicomDecodeError, LungGradCAMWarning, SeriesGeometryError, VolumeError
from ..core.volume import AIR_HU, LPS_TO_RAS, SPACING_RANGE_MM, Volume, check_voxel_limit
from .dicom_headers import Frame, PathLike, ProgressFn, scan_headers, source_files
from .dicom_pixels import decode_frames
from .dicom_series import POSITION_TOL_MM, select_part, series_parts, slice_normal, thread_count, valid_orientation

log = logging.getLogger(__name__)


class DicomResampledWarning(LungGradCAMWarning):
    """A series was resampled onto a regular grid (irregular spacing, missing slices, gantry tilt)."""


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------
def _ijk_to_ras(
    origin_lps: np.ndarray, iop: np.ndarray, pixel_spacing: Tuple[float, float], k_step_lps: np.ndarray
) -> np.ndarray:
    """The one LPS -> RAS conversion of the reader. Column i follows IOP's row cosine scaled by
    the column spacing (PixelSpacing[1]); column j the column cosine scaled by PixelSpacing[0]."""
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * pixel_spacing[1]
    lps[:3, 1] = iop[3:] * pixel_spacing[0]
    lps[:3, 2] = k_step_lps
    lps[:3, 3] = origin_lps
    return LPS_TO_RAS @ lps


def _check_frames(frames: List[Frame], key: str) -> None:
    """Refuse, naming the file, what cannot become voxels in space: empty images, non-finite
    rescaling, missing or invalid position, orientation or pixel spacing."""
    for f in frames:
        if f.rows <= 0 or f.cols <= 0:
            raise DicomDecodeError(
                f"{f.path}: Rows x Columns is {f.rows} x {f.cols}; an image needs at least one "
                "pixel: the file is damaged, replace it"
            )
        if not (np.isfinite(f.slope) and np.isfinite(f.intercept)) or f.slope == 0:
            raise DicomDecodeError(
                f"{f.path}: RescaleSlope {f.slope} / RescaleIntercept {f.intercept} cannot map "
                "stored values to HU (zero or not finite): the file is damaged, replace it"
            )
        if f.ipp is None or f.iop is None or f.pixel_spacing is None:
            missing = [
                n
                for n, v in (
                    ("ImagePositionPatient", f.ipp),
                    ("ImageOrientationPatient", f.iop),
                    ("PixelSpacing", f.pixel_spacing),
                )
                if v is None
            ]
            where = f"{f.path}" if f.frame is None else f"frame {f.frame + 1} of {f.path} (multi-frame)"
            raise SeriesGeometryError(
                f"series {key}: {where} lacks {', '.join(missing)}; the slices cannot be placed in space"
            )
        if not (
            SPACING_RANGE_MM[0] <= min(f.pixel_spacing) <= max(f.pixel_spacing) <= SPACING_RANGE_MM[1]
        ) or not valid_orientation(f.iop):
            raise SeriesGeometryError(
                f"series {key}: {f.path} has invalid ImageOrientationPatient "
                f"{list(f.iop)} or PixelSpacing {list(f.pixel_spacing)}"
            )


def _deduplicate(frames: List[Frame], d: np.ndarray, hu: np.ndarray, key: str):
    """Drop repeated positions whose pixels are identical; different pixels are an error."""
    keep = [0]
    for n in range(1, len(frames)):
        if d[n] - d[keep[-1]] < POSITION_TOL_MM:
            if not np.array_equal(hu[n], hu[keep[-1]]):
                raise SeriesGeometryError(
                    f"series {key}: {frames[keep[-1]].path} and {frames[n].path} are at the same position "
                    f"({d[n]:.3f} mm along the slice normal) but hold different pixels; remove the slices "
                    "that do not belong (another reconstruction or acquisition) and load again"
                )
            continue
        keep.append(n)
    if len(keep) == len(frames):
        return frames, d, hu
    log.info("series %s: dropped %d duplicate slice(s) with identical pixels", key, len(frames) - len(keep))
    return [frames[n] for n in keep], d[keep], hu[keep]


def _regularise(
    hu: np.ndarray, d: np.ndarray, offsets: np.ndarray, pixel_spacing: Tuple[float, float], spacing: float
) -> np.ndarray:
    """Resample slices at normal positions ``d`` with in-plane ``offsets`` (mm along the row and
    column cosines) onto slices ``spacing`` apart from d[0], all aligned with slice 0 (linear)."""
    from scipy import ndimage

    n_out = int(round((d[-1] - d[0]) / spacing)) + 1
    check_voxel_limit((n_out,) + hu.shape[1:], "resampled DICOM series", bytes_per_voxel=4)
    out = np.empty((n_out,) + hu.shape[1:], dtype=np.float32)
    tilted = bool(np.any(np.abs(offsets) > POSITION_TOL_MM))

    @functools.lru_cache(maxsize=2)  # consecutive output slices share their source slices
    def aligned(s: int) -> np.ndarray:
        if not tilted:
            return hu[s]
        # the output's (j, i) comes from the source's (j - v / row spacing, i - u / column spacing)
        shift = (offsets[s, 1] / pixel_spacing[0], offsets[s, 0] / pixel_spacing[1])
        return ndimage.shift(hu[s], shift, order=1, mode="constant", cval=AIR_HU)

    for k in range(n_out):
        z = d[0] + k * spacing
        s = int(np.clip(np.searchsorted(d, z, side="right") - 1, 0, len(d) - 2))
        w = np.float32(np.clip((z - d[s]) / (d[s + 1] - d[s]), 0.0, 1.0))
        out[k] = (1 - w) * aligned(s) + w * aligned(s + 1)
    return out


def _stack(frames: List[Frame], hu: np.ndarray, key: str, max_gap_slices: int):
    """Order-independent geometry of sorted ``frames`` -> (array, ijk_to_ras, note or '')."""
    iop, pixel_spacing = frames[0].iop, frames[0].pixel_spacing
    normal = slice_normal(iop)
    d = np.array([float(f.ipp @ normal) for f in frames])
    n_read = len(frames)
    frames, d, hu = _deduplicate(frames, d, hu, key)
    if len(frames) < 2:
        raise SeriesGeometryError(
            f"series {key}: all {n_read} slices are copies of {frames[0].path}; a volume needs at least two positions"
        )
    gaps = np.diff(d)
    # the typical spacing among gaps that are not missing slices (a median alone fails on short
    # series with a gap: 2.5 and 5.0 mm would give 3.75)
    spacing = float(np.median(gaps[gaps <= 1.5 * gaps.min()]))
    missing = np.rint(gaps / spacing).astype(int) - 1
    if missing.max() > max_gap_slices:
        n = int(np.argmax(missing))
        raise SeriesGeometryError(
            f"series {key}: about {missing[n]} slices are missing between {frames[n].path.name} and "
            f"{frames[n + 1].path.name} ({gaps[n]:.2f} mm gap for {spacing:.2f} mm slices; the limit is "
            f"max_gap_slices={max_gap_slices}); find the missing files or raise max_gap_slices to "
            "interpolate across the gap"
        )
    ipp = np.array([f.ipp for f in frames])
    drift = (ipp - ipp[0]) - np.outer(d - d[0], normal)
    offsets = np.stack([drift @ iop[:3], drift @ iop[3:]], axis=1)
    irregular = bool(np.max(np.abs(gaps - spacing)) > POSITION_TOL_MM)
    tilted = bool(np.max(np.abs(offsets)) > POSITION_TOL_MM)
    if not irregular and not tilted:
        step = (d[-1] - d[0]) / (len(d) - 1)
        return hu, _ijk_to_ras(ipp[0], iop, pixel_spacing, normal * step), ""
    reasons = []
    if irregular:
        reasons.append(
            f"slice spacing varies from {gaps.min():.6g} to {gaps.max():.6g} mm"
            + (f" ({int(missing.clip(0).sum())} missing slice(s))" if missing.max() > 0 else "")
        )
    if tilted:
        shift = float(np.linalg.norm(offsets[-1]))
        angle = float(np.degrees(np.arctan2(shift, d[-1] - d[0])))
        reasons.append(f"gantry tilt of {angle:.1f} degrees (slices drift {shift:.1f} mm in-plane)")
    spacing = (d[-1] - d[0]) / int(round((d[-1] - d[0]) / spacing))
    array = _regularise(hu, d, offsets, pixel_spacing, spacing)
    note = (
        f"series {key}: {' and '.join(reasons)}; resampled onto {array.shape[0]} regular slices "
        f"{spacing:.6g} mm apart along the slice normal (linear interpolation)"
    )
    return array, _ijk_to_ras(ipp[0], iop, pixel_spacing, normal * spacing), note


def load_dicom_series(
    source: Union[PathLike, Iterable[PathLike]],
    series_uid: Optional[str] = None,
    *,
    max_gap_slices: int = 2,
    min_hu: Optional[float] = AIR_HU,
    workers: Optional[int] = None,
    progress: Optional[ProgressFn] = None,
) -> Volume:
    """Load one DICOM series as a float32 HU :class:`Volume` (array K, J, I; ijk_to_ras in RAS mm).

    ``source``: a folder (searched recursively) or a list of files. ``series_uid``: a
    SeriesInstanceUID or a part key ``"<uid>#<n>"`` from :func:`list_dicom_series`; without it the
    only CT series is taken (several -> :class:`AmbiguousSeriesError` listing them).
    ``max_gap_slices``: most consecutive missing slices that are interpolated (more ->
    :class:`SeriesGeometryError`). ``min_hu``: CT values below it are raised to it (None keeps
    them). ``workers``: decoding threads (default min(8, CPUs)). ``progress(done, total)`` is called
    per decoded file.

    ``meta`` holds patient_id, study_uid, series_uid, frame_of_reference_uid, modality,
    description, series_number, n_slices, source (where it was read, for messages) and
    source_files (the paths of its files, in slice order).

    Example (a phantom written as DICOM stands in for a real series)::

        >>> import LungGradCAMLib as lgc
        >>> files = lgc.phantom.write_dicom_series(lgc.phantom.chest_ct(seed=3).volume, "dicom")
        >>> [series.modality for series in lgc.list_dicom_series("dicom")]
        ['CT']
        >>> ct = lgc.load_dicom_series("dicom")
        >>> ct.array.shape, ct.spacing.tolist()  # (K, J, I) voxels; (i, j, k) mm
        ((96, 192, 192), [1.8, 1.8, 2.5])
    """
    workers = thread_count(workers)
    where, files = source_files(source)
    info, frames = select_part(series_parts(scan_headers(files, workers)), series_uid, where)
    _check_frames(frames, info.key)
    normal = slice_normal(frames[0].iop)
    frames = sorted(frames, key=lambda f: (float(f.ipp @ normal), str(f.path), f.frame or 0))
    if len(frames) < 2:
        raise SeriesGeometryError(
            f"series {info.key}: a single slice ({frames[0].path}) is not a volume; "
            "load the whole series (at least two slices)"
        )
    shape = (len(frames), frames[0].rows, frames[0].cols)
    # the float32 volume, and each decoding thread's file: its stored pixels and the decoder's copies
    per_file = max(f.n_frames for f in frames) * frames[0].rows * frames[0].cols * 2 * 3
    decoding = per_file * min(workers, len({f.path for f in frames}))
    check_voxel_limit(shape, f"series {info.key}", bytes_per_voxel=4 + decoding / float(np.prod(shape)))
    hu = np.empty(shape, dtype=np.float32)
    decode_frames(frames, hu, min_hu if info.modality.upper() == "CT" else None, workers, progress)
    array, ijk_to_ras, note = _stack(frames, hu, info.key, max_gap_slices)
    if note:
        warnings.warn(note, DicomResampledWarning, stacklevel=2)
    h = frames[0].header
    meta = {
        "patient_id": h.patient_id,
        "study_uid": h.study_uid,
        "series_uid": info.series_uid,
        "frame_of_reference_uid": h.frame_of_reference_uid,
        "modality": h.modality,
        "description": h.description,
        "series_number": h.series_number,
        "n_slices": int(array.shape[0]),
        "source": where,
        "source_files": list(dict.fromkeys(str(f.path) for f in frames)),
    }
    if info.part:
        meta["series_part"] = info.key
    if note:
        meta["resampled"] = note
    try:
        return Volume(array, ijk_to_ras, meta)
    except VolumeError as exc:  # positions or slice spacing no CT has
        raise SeriesGeometryError(f"series {info.key} ({where}): {exc}") from None


__all__ = ["DicomResampledWarning", "load_dicom_series"]
