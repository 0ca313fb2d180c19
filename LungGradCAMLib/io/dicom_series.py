"""DICOM series and their parts: frames grouped by SeriesInstanceUID and split into parts where
orientation, size, pixel spacing or overlapping acquisitions differ (:class:`SeriesInfo`,
:func:`series_parts`); :func:`list_dicom_series` lists them and :func:`select_part` picks the one
to load (the only CT series, or the one named)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.errors import AmbiguousSeriesError, NoSeriesFoundError, SeriesGeometryError
from ..core.text import escaped
from .dicom_headers import Frame, PathLike, scan_headers, source_files

#: Positions closer than this along the normal are duplicates; spacing deviations and in-plane
#: drifts below it are rounding of the decimal strings DICOM stores positions in.
POSITION_TOL_MM = 0.01
#: Direction cosines that differ by less than this are the same orientation.
ORIENTATION_TOL = 1e-4


# --------------------------------------------------------------------------------------------
# series and their parts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SeriesInfo:
    """One loadable stack of a DICOM series (facts from the headers; no pixels read).

    ``part`` is 0 when the series forms one stack; a series whose slices differ in orientation,
    size, pixel spacing or (overlapping) acquisition is split into parts 1, 2, ... and ``key`` is
    then ``"<series_uid>#<part>"``. ``orientation`` is ImageOrientationPatient (LPS cosines),
    ``pixel_spacing`` is (row spacing, column spacing) in mm.
    """

    series_uid: str
    study_uid: str
    patient_id: str
    modality: str
    description: str
    series_number: Optional[int]
    n_files: int
    n_slices: int
    rows: int
    cols: int
    orientation: Optional[Tuple[float, ...]]
    pixel_spacing: Optional[Tuple[float, float]]
    acquisition: Optional[int]
    part: int = 0
    files: Tuple[Path, ...] = field(default=(), repr=False)

    @property
    def key(self) -> str:
        """The name :func:`load_dicom_series` accepts as ``series_uid`` for exactly this stack."""
        return self.series_uid if self.part == 0 else f"{self.series_uid}#{self.part}"

    def describe(self) -> str:
        """One line for listings and error messages (no patient data; what the files say escaped)."""
        return (
            f"{escaped(self.key or '(no SeriesInstanceUID)', 80)}  '{escaped(self.description, 80)}'  "
            f"{escaped(self.modality or '?', 16)}  {self.n_slices} slice(s)  {self.rows}x{self.cols}"
        )

    def describe_for_choice(self) -> str:
        """:meth:`describe` with the patient ID and the series' folder, to tell the series of two
        patients apart when the user must pick one (for the user's terminal, never for logs)."""
        folder = os.path.commonpath([str(f.parent) for f in self.files]) if self.files else "?"
        return f"{self.describe()}  patient {self.patient_id or '(no PatientID)'!r}  in {folder}"


def valid_orientation(iop: Optional[np.ndarray]) -> bool:
    """Two unit, orthogonal direction cosines."""
    return (
        iop is not None
        and abs(np.linalg.norm(iop[:3]) - 1) < 1e-3
        and abs(np.linalg.norm(iop[3:]) - 1) < 1e-3
        and abs(float(iop[:3] @ iop[3:])) < 1e-3
    )


def _damaged(f: Frame) -> bool:
    """No pixels or an impossible orientation: not a stack of its own, an error of its series."""
    return f.rows <= 0 or f.cols <= 0 or (f.iop is not None and not valid_orientation(f.iop))


def _same(a: Optional[np.ndarray], b: Optional[np.ndarray], tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.max(np.abs(a - b)) <= tol)


def slice_normal(iop: np.ndarray) -> np.ndarray:
    n = np.cross(iop[:3], iop[3:])
    return n / np.linalg.norm(n)


def _has_duplicates(frames: List[Frame]) -> bool:
    if any(f.ipp is None or f.iop is None or _damaged(f) for f in frames):
        return False
    normal = slice_normal(frames[0].iop)
    d = np.sort([float(f.ipp @ normal) for f in frames])
    return bool(np.any(np.diff(d) < POSITION_TOL_MM))


def _split(frames: List[Frame]) -> List[List[Frame]]:
    """Split one series' frames into stacks of one orientation, size and pixel spacing; split by
    acquisition only when acquisitions overlap in space (a sequential scan's acquisitions tile
    the volume and stay together). Damaged frames join the largest stack, whose loading then
    names them, instead of vanishing as a one-slice stack."""
    stacks: List[List[Frame]] = []
    for f in frames:
        if _damaged(f):
            continue
        for stack in stacks:
            g = stack[0]
            if (
                (g.rows, g.cols) == (f.rows, f.cols)
                and _same(g.iop, f.iop, ORIENTATION_TOL)
                and _same(
                    None if g.pixel_spacing is None else np.array(g.pixel_spacing),
                    None if f.pixel_spacing is None else np.array(f.pixel_spacing),
                    1e-4,
                )
            ):
                stack.append(f)
                break
        else:
            stacks.append([f])
    out = []
    for stack in stacks:
        acquisitions: Dict[Optional[int], List[Frame]] = {}
        for f in stack:
            acquisitions.setdefault(f.acquisition, []).append(f)
        if (
            len(acquisitions) > 1
            and _has_duplicates(stack)
            and not any(_has_duplicates(a) for a in acquisitions.values())
        ):
            out.extend(acquisitions[k] for k in sorted(acquisitions, key=lambda a: (a is None, a)))
        else:
            out.append(stack)
    damaged = [f for f in frames if _damaged(f)]
    if damaged:
        if out:
            max(out, key=len).extend(damaged)
        else:
            out.append(damaged)
    return out


def _info(frames: List[Frame], part: int) -> SeriesInfo:
    f, h = frames[0], frames[0].header
    return SeriesInfo(
        series_uid=f.series_uid,
        study_uid=h.study_uid,
        patient_id=h.patient_id,
        modality=h.modality,
        description=h.description,
        series_number=h.series_number,
        n_files=len({fr.path for fr in frames}),
        n_slices=len(frames),
        rows=f.rows,
        cols=f.cols,
        orientation=None if f.iop is None else tuple(float(x) for x in f.iop),
        pixel_spacing=None if f.pixel_spacing is None else (float(f.pixel_spacing[0]), float(f.pixel_spacing[1])),
        acquisition=f.acquisition if len({fr.acquisition for fr in frames}) == 1 else None,
        part=part,
        files=tuple(sorted({fr.path for fr in frames})),
    )


def series_parts(frames: List[Frame]) -> List[Tuple[SeriesInfo, List[Frame]]]:
    by_series: Dict[str, List[Frame]] = {}
    for f in frames:
        by_series.setdefault(f.series_uid, []).append(f)
    out = []
    for uid in sorted(by_series):
        stacks = _split(by_series[uid])
        stacks.sort(key=lambda s: (-len(s), str(s[0].path)))
        for n, stack in enumerate(stacks, start=1):
            out.append((_info(stack, 0 if len(stacks) == 1 else n), stack))
    out.sort(
        key=lambda p: (p[0].study_uid, p[0].series_number is None, p[0].series_number or 0, p[0].series_uid, p[0].part)
    )
    return out


def list_dicom_series(
    source: Union[PathLike, Iterable[PathLike]],
    *,
    workers: Optional[int] = None,
    unreadable: Optional[Dict[Path, str]] = None,
) -> List[SeriesInfo]:
    """Every image stack under ``source`` (a folder searched recursively, or a list of files),
    sorted by study, series number and UID. Reads headers only. A file that cannot be read raises
    :class:`DicomDecodeError`, or with ``unreadable`` (a dict) is recorded there (path -> message)
    and the listing goes on."""
    _, files = source_files(source)
    return [info for info, _ in series_parts(scan_headers(files, thread_count(workers), unreadable))]


def thread_count(workers: Optional[int]) -> int:
    return max(1, int(workers) if workers else min(8, os.cpu_count() or 1))


def _listing(parts: Sequence[SeriesInfo]) -> str:
    return "\n".join("  " + p.describe() for p in parts)


def select_part(
    parts: List[Tuple[SeriesInfo, List[Frame]]], series_uid: Optional[str], where: str
) -> Tuple[SeriesInfo, List[Frame]]:
    infos = [p[0] for p in parts]
    if not parts:
        raise NoSeriesFoundError(
            f"{where}: no DICOM images found (files that are not DICOM, DICOMDIR "
            "and non-image objects are ignored); point to the folder of the CT series"
        )
    if series_uid is not None:
        chosen = [p for p in parts if series_uid in (p[0].key, p[0].series_uid)]
        if not chosen:
            raise NoSeriesFoundError(f"{where}: no series '{series_uid}'; the series found are:\n" + _listing(infos))
    else:
        ct = [p for p in parts if p[0].modality.upper() == "CT"]
        if not ct:
            raise NoSeriesFoundError(
                f"{where}: no CT series (LungGradCAM needs a CT; pass series_uid to load another modality "
                f"anyway); found only:\n{_listing(infos)}"
            )
        chosen = [p for p in ct if p[0].n_slices > 1] or ct
        if len({p[0].series_uid for p in chosen}) > 1:
            raise AmbiguousSeriesError(
                f"{where}: {len({p[0].series_uid for p in chosen})} CT series found; pick one by passing "
                f"its UID (series_uid= in Python, --series on the command line):\n"
                + "\n".join("  " + p[0].describe_for_choice() for p in chosen)
            )
    if len(chosen) > 1:
        raise SeriesGeometryError(
            f"{where}: series {chosen[0][0].series_uid} mixes slices of different orientation, size, "
            f"pixel spacing or overlapping acquisitions; pick one stack by passing its key "
            f"(series_uid= in Python, --series on the command line):\n{_listing([p[0] for p in chosen])}"
        )
    return chosen[0]


__all__ = ["SeriesInfo", "list_dicom_series"]
