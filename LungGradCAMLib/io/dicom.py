"""DICOM CT series <-> :class:`Volume`.

Reading (:func:`load_dicom_series`, :func:`list_dicom_series`):

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
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.errors import (AmbiguousSeriesError, DicomDecodeError, LungGradCAMWarning, NoSeriesFoundError,
                           SeriesGeometryError, VolumeError)
from ..core.paths import is_special, open_regular
from ..core.text import escaped
from ..core.volume import AIR_HU, LPS_TO_RAS, SPACING_RANGE_MM, Volume, check_voxel_limit

log = logging.getLogger(__name__)

#: Positions closer than this along the normal are duplicates; spacing deviations and in-plane
#: drifts below it are rounding of the decimal strings DICOM stores positions in.
POSITION_TOL_MM = 0.01
#: Direction cosines that differ by less than this are the same orientation.
ORIENTATION_TOL = 1e-4

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_IMPLICIT_LE, _EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"
_DECODER_HINT = ("install the decoders with `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
                 "pylibjpeg-rle pyjpegls` (or python-gdcm), or convert the series to an uncompressed "
                 "transfer syntax (e.g. `gdcmconv --raw`)")

PathLike = Union[str, "os.PathLike[str]"]
ProgressFn = Callable[[int, int], None]


class DicomResampledWarning(LungGradCAMWarning):
    """A series was resampled onto a regular grid (irregular spacing, missing slices, gantry tilt)."""


# --------------------------------------------------------------------------------------------
# headers
# --------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    """One 2D image: a single-frame file or one frame of a multi-frame file (LPS geometry)."""

    path: Path
    frame: Optional[int]          # index in a multi-frame file, None for single-frame files
    n_frames: int
    series_uid: str
    ipp: Optional[np.ndarray]
    iop: Optional[np.ndarray]
    pixel_spacing: Optional[Tuple[float, float]]  # (row spacing, column spacing) mm
    rows: int
    cols: int
    slope: float
    intercept: float
    padding: Optional[Tuple[int, int]]  # inclusive stored-value range that means "no data"
    acquisition: Optional[int]
    header: "_Header"


@dataclass
class _Header:
    """Per-file facts the decoder and the series listing need (shared by a file's frames)."""

    path: Path
    transfer_syntax: str
    has_pixels: bool
    pixel_offset: Optional[int]  # file offset of native Pixel Data's value, None when encapsulated
    pixel_length: Optional[int]
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    samples_per_pixel: int
    study_uid: str
    patient_id: str
    modality: str
    description: str
    series_number: Optional[int]
    frame_of_reference_uid: str


def _plausible_without_preamble(head: bytes) -> bool:
    """Old files without the 128-byte preamble start with a group 0002 or 0008 element."""
    return len(head) == 4 and head[:2] in (b"\x02\x00", b"\x08\x00") and head[3] == 0


def _read_dataset(path: Path, header_only: bool = False):
    """(pydicom dataset or None when ``path`` is not DICOM, file offset where reading stopped, the
    next 12 bytes there). ``header_only`` stops before Pixel Data and skips large values."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    kwargs = {"stop_before_pixels": True, "defer_size": 4096} if header_only else {}
    try:
        with open_regular(path) as f:  # a FIFO or device named like a slice would block or never end
            try:
                ds = pydicom.dcmread(f, **kwargs)
            except InvalidDicomError:
                f.seek(0)
                if not _plausible_without_preamble(f.read(4)):
                    return None, 0, b""
                f.seek(0)
                ds = pydicom.dcmread(f, force=True, **kwargs)
            # pydicom leaves the file at the start of the element where it stopped (Pixel Data).
            stop = f.tell()
            return ds, stop, f.read(12)
    except OSError as exc:
        raise DicomDecodeError(f"{path}: cannot read the file ({exc.strerror or exc}); check that it "
                               "exists and that you may read it") from None
    except Exception as exc:  # pydicom raises many types on corrupt files
        raise DicomDecodeError(f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc}); "
                               "remove it or replace it with an intact copy") from None


def _pixel_element(syntax: str, stop: int, head: bytes) -> Tuple[bool, Optional[int], Optional[int]]:
    """(has Pixel Data, offset of its value, its length) from the bytes where the header ended;
    offset and length only for native little-endian data, which is read without pydicom."""
    if head[:4] not in (b"\xe0\x7f\x10\x00", b"\x7f\xe0\x00\x10"):
        return False, None, None
    if syntax == _EXPLICIT_LE and len(head) == 12:  # explicit VR: tag, VR, 2 reserved, length
        return True, stop + 12, int.from_bytes(head[8:12], "little")
    if syntax == _IMPLICIT_LE and len(head) >= 8:  # implicit VR: tag, length
        return True, stop + 8, int.from_bytes(head[4:8], "little")
    return True, None, None


def _raw(ds, keyword: str) -> Optional[list]:
    """Values of a numeric, UID or code-string element, parsed straight from its bytes.

    Converting elements through pydicom costs more than parsing the whole header (the header pass
    is what a series load waits on), so the ~20 geometry and pixel-format values are read here;
    text that may need a character set (patient ID, description) still goes through pydicom.
    """
    from pydicom.datadict import dictionary_VR, tag_for_keyword
    from pydicom.multival import MultiValue

    tag = tag_for_keyword(keyword)
    element = ds.get_item(tag)
    if element is None:
        return None
    if not getattr(element, "is_raw", False):  # already converted by pydicom
        value = element.value
        return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]
    data = element.value
    if not data:
        return None
    vr = element.VR if element.VR not in (None, "UN") else dictionary_VR(tag)  # implicit VR, or UN
    if vr in ("US", "SS", "US or SS", "UL", "SL"):
        size = 4 if vr in ("UL", "SL") else 2
        order = "little" if element.is_little_endian else "big"
        return [int.from_bytes(data[i:i + size], order, signed=vr in ("SS", "SL"))
                for i in range(0, len(data) - size + 1, size)]
    return [v.strip() for v in data.decode("latin-1").strip(" \0").split("\\")]  # DS, IS, UI, CS: ASCII


def _first(values: Optional[list]):
    return values[0] if values else None


def _one(ds, keyword: str):
    return _first(_raw(ds, keyword))


def _float(value, default: float) -> float:
    try:
        return float(value) if value is not None and value != "" else default
    except (TypeError, ValueError):
        return default


def _int(value) -> Optional[int]:
    try:
        return int(value) if value is not None and value != "" else None
    except (TypeError, ValueError):
        return None


def _vector(value, n: int) -> Optional[np.ndarray]:
    try:
        v = np.array([float(x) for x in value], dtype=np.float64)
    except (TypeError, ValueError):
        return None
    return v if v.shape == (n,) and np.all(np.isfinite(v)) else None


def _padding_range(ds, bits_allocated: int, pixel_representation: int) -> Optional[Tuple[int, int]]:
    """Stored-value range of Pixel Padding Value (.. Pixel Padding Range Limit), inclusive."""
    values = [_int(_one(ds, "PixelPaddingValue")), _int(_one(ds, "PixelPaddingRangeLimit"))]
    if values[0] is None:
        return None
    # The tag's VR (US or SS) is often written unsigned for signed pixels (LIDC: 63536 = -2000).
    if pixel_representation == 1:
        values = [v - (1 << bits_allocated) if v is not None and v >= 1 << (bits_allocated - 1) else v
                  for v in values]
    lo = values[0] if values[1] is None else min(values)
    hi = values[0] if values[1] is None else max(values)
    return lo, hi


def _functional(ds, item, sequence: str, keyword: str):
    """``keyword`` from the per-frame item, the shared functional groups, then the top level."""
    shared = ds.get("SharedFunctionalGroupsSequence")
    for container in (item, shared[0] if shared else None):
        seq = container.get(sequence) if container is not None else None
        if seq and keyword in seq[0]:
            return _raw(seq[0], keyword)
    return _raw(ds, keyword)


def _read_header(path: Path) -> List[_Frame]:
    """The image frames of one file ([] for non-DICOM and non-image objects)."""
    ds, stop, head = _read_dataset(path, header_only=True)
    if ds is None:
        return []
    meta = getattr(ds, "file_meta", None)
    sop_class = str(_one(ds, "SOPClassUID") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    if "Rows" not in ds or "Columns" not in ds or sop_class == _MEDIA_STORAGE_DIRECTORY:
        if not sop_class and not meta:  # no meta elements and no SOP class: garbage after "DICM"
            raise DicomDecodeError(f"{path}: unreadable DICOM file (no File Meta Information and no SOP Class); "
                                   "remove it or replace it with an intact copy")
        if "Image Storage" in _uid_name(sop_class):
            raise DicomDecodeError(f"{path}: {_uid_name(sop_class)} object without Rows/Columns: the file "
                                   "is truncated or damaged; copy it again from its source")
        return []  # DICOMDIR, SR, RTSTRUCT, ...: not images
    syntax = str(meta.get("TransferSyntaxUID", _IMPLICIT_LE)) if meta is not None else _IMPLICIT_LE
    has_pixels, pixel_offset, pixel_length = _pixel_element(syntax, stop, head)
    bits_allocated = _int(_one(ds, "BitsAllocated")) or 16
    pixel_representation = _int(_one(ds, "PixelRepresentation")) or 0
    header = _Header(
        path=path, transfer_syntax=syntax, has_pixels=has_pixels, pixel_offset=pixel_offset,
        pixel_length=pixel_length,
        bits_allocated=bits_allocated, bits_stored=_int(_one(ds, "BitsStored")) or bits_allocated,
        pixel_representation=pixel_representation,
        samples_per_pixel=_int(_one(ds, "SamplesPerPixel")) or 1,
        study_uid=str(_one(ds, "StudyInstanceUID") or ""), patient_id=str(ds.get("PatientID", "")),
        modality=str(_one(ds, "Modality") or ""), description=str(ds.get("SeriesDescription", "")),
        series_number=_int(_one(ds, "SeriesNumber")),
        frame_of_reference_uid=str(_one(ds, "FrameOfReferenceUID") or ""))
    rows, cols = _int(_one(ds, "Rows")) or 0, _int(_one(ds, "Columns")) or 0
    n_frames = _int(_one(ds, "NumberOfFrames")) or 1
    # Native frames need rows * cols * bytes each, encapsulated ones at least an 8-byte item
    # header: a count the file cannot hold is refused before one record per frame is made.
    if n_frames > 1:
        frame_bytes = max(1, rows * cols * bits_allocated // 8) if pixel_length is not None else 8
        available = pixel_length if pixel_length is not None else path.stat().st_size
        if n_frames * frame_bytes > available:
            raise DicomDecodeError(f"{path}: declares {n_frames} frames but holds {available} bytes of pixel "
                                   "data, too few for that many; the file is damaged, replace it")
    series_uid = str(_one(ds, "SeriesInstanceUID") or "")
    padding = _padding_range(ds, bits_allocated, pixel_representation)
    acquisition = _int(_one(ds, "AcquisitionNumber"))
    if n_frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        spacing = _vector(_raw(ds, "PixelSpacing"), 2)
        return [_Frame(path, None, 1, series_uid, _vector(_raw(ds, "ImagePositionPatient"), 3),
                       _vector(_raw(ds, "ImageOrientationPatient"), 6),
                       None if spacing is None else (spacing[0], spacing[1]), rows, cols,
                       _float(_one(ds, "RescaleSlope"), 1.0), _float(_one(ds, "RescaleIntercept"), 0.0),
                       padding, acquisition, header)]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n_frames:
        # Multi-frame without per-frame positions (legacy NM/US-style): listed, but unplaceable.
        return [_Frame(path, index, n_frames, series_uid, None, None, None, rows, cols,
                       _float(_one(ds, "RescaleSlope"), 1.0), _float(_one(ds, "RescaleIntercept"), 0.0),
                       padding, acquisition, header) for index in range(n_frames)]
    frames = []
    for index, item in enumerate(per_frame):
        spacing = _vector(_functional(ds, item, "PixelMeasuresSequence", "PixelSpacing"), 2)
        frames.append(_Frame(
            path, index, n_frames, series_uid,
            _vector(_functional(ds, item, "PlanePositionSequence", "ImagePositionPatient"), 3),
            _vector(_functional(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
            None if spacing is None else (spacing[0], spacing[1]), rows, cols,
            _float(_first(_functional(ds, item, "PixelValueTransformationSequence", "RescaleSlope")), 1.0),
            _float(_first(_functional(ds, item, "PixelValueTransformationSequence", "RescaleIntercept")), 0.0),
            padding, _int(_first(_functional(ds, item, "FrameContentSequence", "FrameAcquisitionNumber"))),
            header))
    return frames


def _source_files(source: Union[PathLike, Iterable[PathLike]]) -> Tuple[str, List[Path]]:
    """(description of the source for messages, the candidate files)."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            files = []
            for folder, dirs, names in os.walk(root):
                dirs.sort()
                files.extend(Path(folder) / n for n in sorted(names)  # a FIFO would block open()
                             if n.upper() != "DICOMDIR" and not is_special(Path(folder) / n))
            return str(root), files
        if not root.exists() and not root.is_symlink():
            raise NoSeriesFoundError(f"{root}: no such file or folder; give a DICOM folder or files")
        return str(root), [root]
    files = [Path(p) for p in source]
    return (f"{len(files)} files" if len(files) != 1 else str(files[0])), files


def _scan(files: Sequence[Path], workers: int, unreadable: Optional[Dict[Path, str]] = None) -> List[_Frame]:
    """The frames of ``files``; with ``unreadable``, a file whose header cannot be read is recorded
    there (path -> message) instead of raising."""
    def read(path: Path) -> List[_Frame]:
        try:
            return _read_header(path)
        except DicomDecodeError as exc:
            if unreadable is None:
                raise
            unreadable[path] = str(exc)
            return []

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [frame for frames in pool.map(read, files) for frame in frames]


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
        return (f"{escaped(self.key or '(no SeriesInstanceUID)', 80)}  '{escaped(self.description, 80)}'  "
                f"{escaped(self.modality or '?', 16)}  {self.n_slices} slice(s)  {self.rows}x{self.cols}")

    def describe_for_choice(self) -> str:
        """:meth:`describe` with the patient ID and the series' folder, to tell the series of two
        patients apart when the user must pick one (for the user's terminal, never for logs)."""
        folder = os.path.commonpath([str(f.parent) for f in self.files]) if self.files else "?"
        return f"{self.describe()}  patient {self.patient_id or '(no PatientID)'!r}  in {folder}"


def _valid_orientation(iop: Optional[np.ndarray]) -> bool:
    """Two unit, orthogonal direction cosines."""
    return (iop is not None and abs(np.linalg.norm(iop[:3]) - 1) < 1e-3 and abs(np.linalg.norm(iop[3:]) - 1) < 1e-3
            and abs(float(iop[:3] @ iop[3:])) < 1e-3)


def _damaged(f: _Frame) -> bool:
    """No pixels or an impossible orientation: not a stack of its own, an error of its series."""
    return f.rows <= 0 or f.cols <= 0 or (f.iop is not None and not _valid_orientation(f.iop))


def _same(a: Optional[np.ndarray], b: Optional[np.ndarray], tol: float) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return bool(np.max(np.abs(a - b)) <= tol)


def _normal(iop: np.ndarray) -> np.ndarray:
    n = np.cross(iop[:3], iop[3:])
    return n / np.linalg.norm(n)


def _has_duplicates(frames: List[_Frame]) -> bool:
    if any(f.ipp is None or f.iop is None or _damaged(f) for f in frames):
        return False
    normal = _normal(frames[0].iop)
    d = np.sort([float(f.ipp @ normal) for f in frames])
    return bool(np.any(np.diff(d) < POSITION_TOL_MM))


def _split(frames: List[_Frame]) -> List[List[_Frame]]:
    """Split one series' frames into stacks of one orientation, size and pixel spacing; split by
    acquisition only when acquisitions overlap in space (a sequential scan's acquisitions tile
    the volume and stay together). Damaged frames join the largest stack, whose loading then
    names them, instead of vanishing as a one-slice stack."""
    stacks: List[List[_Frame]] = []
    for f in frames:
        if _damaged(f):
            continue
        for stack in stacks:
            g = stack[0]
            if ((g.rows, g.cols) == (f.rows, f.cols) and _same(g.iop, f.iop, ORIENTATION_TOL)
                    and _same(None if g.pixel_spacing is None else np.array(g.pixel_spacing),
                              None if f.pixel_spacing is None else np.array(f.pixel_spacing), 1e-4)):
                stack.append(f)
                break
        else:
            stacks.append([f])
    out = []
    for stack in stacks:
        acquisitions: Dict[Optional[int], List[_Frame]] = {}
        for f in stack:
            acquisitions.setdefault(f.acquisition, []).append(f)
        if (len(acquisitions) > 1 and _has_duplicates(stack)
                and not any(_has_duplicates(a) for a in acquisitions.values())):
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


def _info(frames: List[_Frame], part: int) -> SeriesInfo:
    f, h = frames[0], frames[0].header
    return SeriesInfo(
        series_uid=f.series_uid, study_uid=h.study_uid, patient_id=h.patient_id, modality=h.modality,
        description=h.description, series_number=h.series_number,
        n_files=len({fr.path for fr in frames}), n_slices=len(frames), rows=f.rows, cols=f.cols,
        orientation=None if f.iop is None else tuple(float(x) for x in f.iop),
        pixel_spacing=None if f.pixel_spacing is None else (float(f.pixel_spacing[0]), float(f.pixel_spacing[1])),
        acquisition=f.acquisition if len({fr.acquisition for fr in frames}) == 1 else None,
        part=part, files=tuple(sorted({fr.path for fr in frames})))


def _parts(frames: List[_Frame]) -> List[Tuple[SeriesInfo, List[_Frame]]]:
    by_series: Dict[str, List[_Frame]] = {}
    for f in frames:
        by_series.setdefault(f.series_uid, []).append(f)
    out = []
    for uid in sorted(by_series):
        stacks = _split(by_series[uid])
        stacks.sort(key=lambda s: (-len(s), str(s[0].path)))
        for n, stack in enumerate(stacks, start=1):
            out.append((_info(stack, 0 if len(stacks) == 1 else n), stack))
    out.sort(key=lambda p: (p[0].study_uid, p[0].series_number is None, p[0].series_number or 0,
                            p[0].series_uid, p[0].part))
    return out


def list_dicom_series(source: Union[PathLike, Iterable[PathLike]], *, workers: Optional[int] = None,
                      unreadable: Optional[Dict[Path, str]] = None) -> List[SeriesInfo]:
    """Every image stack under ``source`` (a folder searched recursively, or a list of files),
    sorted by study, series number and UID. Reads headers only. A file that cannot be read raises
    :class:`DicomDecodeError`, or with ``unreadable`` (a dict) is recorded there (path -> message)
    and the listing goes on."""
    _, files = _source_files(source)
    return [info for info, _ in _parts(_scan(files, _workers(workers), unreadable))]


def _workers(workers: Optional[int]) -> int:
    return max(1, int(workers) if workers else min(8, os.cpu_count() or 1))


def _listing(parts: Sequence[SeriesInfo]) -> str:
    return "\n".join("  " + p.describe() for p in parts)


def _select(parts: List[Tuple[SeriesInfo, List[_Frame]]], series_uid: Optional[str],
            where: str) -> Tuple[SeriesInfo, List[_Frame]]:
    infos = [p[0] for p in parts]
    if not parts:
        raise NoSeriesFoundError(f"{where}: no DICOM images found (files that are not DICOM, DICOMDIR "
                                 "and non-image objects are ignored); point to the folder of the CT series")
    if series_uid is not None:
        chosen = [p for p in parts if series_uid in (p[0].key, p[0].series_uid)]
        if not chosen:
            raise NoSeriesFoundError(f"{where}: no series '{series_uid}'; the series found are:\n"
                                     + _listing(infos))
    else:
        ct = [p for p in parts if p[0].modality.upper() == "CT"]
        if not ct:
            raise NoSeriesFoundError(
                f"{where}: no CT series (LungGradCAM needs a CT; pass series_uid to load another modality "
                f"anyway); found only:\n{_listing(infos)}")
        chosen = [p for p in ct if p[0].n_slices > 1] or ct
        if len({p[0].series_uid for p in chosen}) > 1:
            raise AmbiguousSeriesError(
                f"{where}: {len({p[0].series_uid for p in chosen})} CT series found; pick one by passing "
                f"its UID (series_uid= in Python, --series on the command line):\n"
                + "\n".join("  " + p[0].describe_for_choice() for p in chosen))
    if len(chosen) > 1:
        raise SeriesGeometryError(
            f"{where}: series {chosen[0][0].series_uid} mixes slices of different orientation, size, "
            f"pixel spacing or overlapping acquisitions; pick one stack by passing its key "
            f"(series_uid= in Python, --series on the command line):\n{_listing([p[0] for p in chosen])}")
    return chosen[0]


# --------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------
def _decode_native(h: _Header, n_frames: int, rows: int, cols: int) -> np.ndarray:
    dtype = np.dtype("<i2" if h.pixel_representation == 1 else "<u2")
    expected = n_frames * rows * cols * 2
    if h.pixel_length is not None and h.pixel_length != 0xFFFFFFFF and h.pixel_length < expected:
        raise DicomDecodeError(
            f"{h.path}: Pixel Data holds {h.pixel_length} bytes but {n_frames} frame(s) of "
            f"{rows}x{cols} 16-bit pixels need {expected}; the file is damaged, replace it")
    with open_regular(h.path) as f:
        f.seek(h.pixel_offset)
        raw = f.read(expected)
    if len(raw) < expected:
        raise DicomDecodeError(f"{h.path}: file is truncated ({len(raw)} of {expected} bytes of pixel "
                               "data present); copy the file again from its source")
    arr = np.frombuffer(raw, dtype=dtype).reshape(n_frames, rows, cols)
    if h.pixel_representation == 1 and h.bits_stored < 16:
        # Sign-extend from BitsStored, as pydicom does for signed native data.
        shift = 16 - h.bits_stored
        arr = np.right_shift(np.left_shift(arr, shift), shift)
    return arr


def decoder_available(transfer_syntax: str) -> bool:
    """Whether the installed pydicom can decode ``transfer_syntax`` (with its plugins): pydicom 3's
    decoders, or pydicom 2's pixel data handlers (Slicer 5.8 and 5.10 bundle pydicom 2.4.4)."""
    from pydicom.uid import UID

    try:
        from pydicom.pixels import get_decoder  # pydicom >= 3
    except ImportError:  # pydicom 2.x
        from pydicom import config

        return any(handler.supports_transfer_syntax(UID(transfer_syntax)) and handler.is_available()
                   for handler in config.pixel_data_handlers)
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        return False
    return decoder is not None and decoder.is_available


def _decode_pydicom(h: _Header, n_frames: int, rows: int, cols: int) -> np.ndarray:
    if not decoder_available(h.transfer_syntax):
        raise DicomDecodeError(f"{h.path}: no decoder available for transfer syntax {h.transfer_syntax} "
                               f"({_uid_name(h.transfer_syntax)}); {_DECODER_HINT}")
    ds = _read_dataset(h.path)[0]
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder plugins raise assorted types
        raise DicomDecodeError(f"{h.path}: cannot decode the pixel data ({_uid_name(h.transfer_syntax)}): "
                               f"{exc}; the file may be damaged, or {_DECODER_HINT}") from None
    return np.asarray(arr).reshape(n_frames, rows, cols)


def _uid_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name


def _decode_file(frames: List[Tuple[int, _Frame]], out: np.ndarray, min_hu: Optional[float]) -> None:
    """Decode one file and write its frames' HU into ``out[index]``."""
    first = frames[0][1]
    h = first.header
    if not h.has_pixels:
        raise DicomDecodeError(f"{h.path}: image without Pixel Data (7FE0,0010); the file is incomplete, "
                               "replace it")
    if h.samples_per_pixel != 1:
        raise DicomDecodeError(f"{h.path}: {h.samples_per_pixel} samples per pixel (colour); a CT "
                               "slice has one")
    native = h.pixel_offset is not None and h.bits_allocated == 16
    decode = _decode_native if native else _decode_pydicom
    stored = decode(h, first.n_frames, first.rows, first.cols)
    for index, frame in frames:
        raw = stored[frame.frame or 0]
        dst = out[index]
        # one pass each, straight into float32 (no float64 temporaries)
        if frame.slope != 1.0:
            np.multiply(raw, np.float32(frame.slope), out=dst, casting="unsafe")
            dst += np.float32(frame.intercept)
        else:
            np.add(raw, np.float32(frame.intercept), out=dst, casting="unsafe")
        if frame.padding is not None:
            lo, hi = frame.padding
            dst[(raw >= lo) & (raw <= hi)] = AIR_HU
        if min_hu is not None:
            np.maximum(dst, np.float32(min_hu), out=dst)


def _decode_all(frames: List[_Frame], out: np.ndarray, min_hu: Optional[float], workers: int,
                progress: Optional[ProgressFn]) -> None:
    by_file: Dict[Path, List[Tuple[int, _Frame]]] = {}
    for index, frame in enumerate(frames):
        by_file.setdefault(frame.path, []).append((index, frame))
    jobs = list(by_file.values())
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_decode_file, job, out, min_hu) for job in jobs]
        try:
            for done, future in enumerate(futures, start=1):
                future.result()
                if progress is not None:
                    progress(done, len(futures))
        except BaseException:
            for future in futures:
                future.cancel()
            raise


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------
def _ijk_to_ras(origin_lps: np.ndarray, iop: np.ndarray, pixel_spacing: Tuple[float, float],
                k_step_lps: np.ndarray) -> np.ndarray:
    """The one LPS -> RAS conversion of the reader. Column i follows IOP's row cosine scaled by
    the column spacing (PixelSpacing[1]); column j the column cosine scaled by PixelSpacing[0]."""
    lps = np.eye(4)
    lps[:3, 0] = iop[:3] * pixel_spacing[1]
    lps[:3, 1] = iop[3:] * pixel_spacing[0]
    lps[:3, 2] = k_step_lps
    lps[:3, 3] = origin_lps
    return LPS_TO_RAS @ lps


def _check_frames(frames: List[_Frame], key: str) -> None:
    """Refuse, naming the file, what cannot become voxels in space: empty images, non-finite
    rescaling, missing or invalid position, orientation or pixel spacing."""
    for f in frames:
        if f.rows <= 0 or f.cols <= 0:
            raise DicomDecodeError(f"{f.path}: Rows x Columns is {f.rows} x {f.cols}; an image needs at least one "
                                   "pixel: the file is damaged, replace it")
        if not (np.isfinite(f.slope) and np.isfinite(f.intercept)) or f.slope == 0:
            raise DicomDecodeError(f"{f.path}: RescaleSlope {f.slope} / RescaleIntercept {f.intercept} cannot map "
                                   "stored values to HU (zero or not finite): the file is damaged, replace it")
        if f.ipp is None or f.iop is None or f.pixel_spacing is None:
            missing = [n for n, v in (("ImagePositionPatient", f.ipp), ("ImageOrientationPatient", f.iop),
                                      ("PixelSpacing", f.pixel_spacing)) if v is None]
            where = f"{f.path}" if f.frame is None else f"frame {f.frame + 1} of {f.path} (multi-frame)"
            raise SeriesGeometryError(f"series {key}: {where} lacks {', '.join(missing)}; the slices "
                                      "cannot be placed in space")
        if not (SPACING_RANGE_MM[0] <= min(f.pixel_spacing) <= max(f.pixel_spacing) <= SPACING_RANGE_MM[1]) \
                or not _valid_orientation(f.iop):
            raise SeriesGeometryError(f"series {key}: {f.path} has invalid ImageOrientationPatient "
                                      f"{list(f.iop)} or PixelSpacing {list(f.pixel_spacing)}")


def _deduplicate(frames: List[_Frame], d: np.ndarray, hu: np.ndarray, key: str):
    """Drop repeated positions whose pixels are identical; different pixels are an error."""
    keep = [0]
    for n in range(1, len(frames)):
        if d[n] - d[keep[-1]] < POSITION_TOL_MM:
            if not np.array_equal(hu[n], hu[keep[-1]]):
                raise SeriesGeometryError(
                    f"series {key}: {frames[keep[-1]].path} and {frames[n].path} are at the same position "
                    f"({d[n]:.3f} mm along the slice normal) but hold different pixels; remove the slices "
                    "that do not belong (another reconstruction or acquisition) and load again")
            continue
        keep.append(n)
    if len(keep) == len(frames):
        return frames, d, hu
    log.info("series %s: dropped %d duplicate slice(s) with identical pixels", key, len(frames) - len(keep))
    return [frames[n] for n in keep], d[keep], hu[keep]


def _regularise(hu: np.ndarray, d: np.ndarray, offsets: np.ndarray, pixel_spacing: Tuple[float, float],
                spacing: float) -> np.ndarray:
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


def _stack(frames: List[_Frame], hu: np.ndarray, key: str, max_gap_slices: int):
    """Order-independent geometry of sorted ``frames`` -> (array, ijk_to_ras, note or '')."""
    iop, pixel_spacing = frames[0].iop, frames[0].pixel_spacing
    normal = _normal(iop)
    d = np.array([float(f.ipp @ normal) for f in frames])
    n_read = len(frames)
    frames, d, hu = _deduplicate(frames, d, hu, key)
    if len(frames) < 2:
        raise SeriesGeometryError(f"series {key}: all {n_read} slices are copies of {frames[0].path}; "
                                  "a volume needs at least two positions")
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
            "interpolate across the gap")
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
        reasons.append(f"slice spacing varies from {gaps.min():.6g} to {gaps.max():.6g} mm"
                       + (f" ({int(missing.clip(0).sum())} missing slice(s))" if missing.max() > 0 else ""))
    if tilted:
        shift = float(np.linalg.norm(offsets[-1]))
        angle = float(np.degrees(np.arctan2(shift, d[-1] - d[0])))
        reasons.append(f"gantry tilt of {angle:.1f} degrees (slices drift {shift:.1f} mm in-plane)")
    spacing = (d[-1] - d[0]) / int(round((d[-1] - d[0]) / spacing))
    array = _regularise(hu, d, offsets, pixel_spacing, spacing)
    note = (f"series {key}: {' and '.join(reasons)}; resampled onto {array.shape[0]} regular slices "
            f"{spacing:.6g} mm apart along the slice normal (linear interpolation)")
    return array, _ijk_to_ras(ipp[0], iop, pixel_spacing, normal * spacing), note


def load_dicom_series(source: Union[PathLike, Iterable[PathLike]], series_uid: Optional[str] = None, *,
                      max_gap_slices: int = 2, min_hu: Optional[float] = AIR_HU,
                      workers: Optional[int] = None, progress: Optional[ProgressFn] = None) -> Volume:
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
    """
    workers = _workers(workers)
    where, files = _source_files(source)
    info, frames = _select(_parts(_scan(files, workers)), series_uid, where)
    _check_frames(frames, info.key)
    normal = _normal(frames[0].iop)
    frames = sorted(frames, key=lambda f: (float(f.ipp @ normal), str(f.path), f.frame or 0))
    if len(frames) < 2:
        raise SeriesGeometryError(f"series {info.key}: a single slice ({frames[0].path}) is not a volume; "
                                  "load the whole series (at least two slices)")
    shape = (len(frames), frames[0].rows, frames[0].cols)
    # the float32 volume, and each decoding thread's file: its stored pixels and the decoder's copies
    per_file = max(f.n_frames for f in frames) * frames[0].rows * frames[0].cols * 2 * 3
    decoding = per_file * min(workers, len({f.path for f in frames}))
    check_voxel_limit(shape, f"series {info.key}", bytes_per_voxel=4 + decoding / float(np.prod(shape)))
    hu = np.empty(shape, dtype=np.float32)
    _decode_all(frames, hu, min_hu if info.modality.upper() == "CT" else None, workers, progress)
    array, ijk_to_ras, note = _stack(frames, hu, info.key, max_gap_slices)
    if note:
        warnings.warn(note, DicomResampledWarning, stacklevel=2)
    h = frames[0].header
    meta = {"patient_id": h.patient_id, "study_uid": h.study_uid, "series_uid": info.series_uid,
            "frame_of_reference_uid": h.frame_of_reference_uid, "modality": h.modality,
            "description": h.description, "series_number": h.series_number,
            "n_slices": int(array.shape[0]), "source": where,
            "source_files": list(dict.fromkeys(str(f.path) for f in frames))}
    if info.part:
        meta["series_part"] = info.key
    if note:
        meta["resampled"] = note
    try:
        return Volume(array, ijk_to_ras, meta)
    except VolumeError as exc:  # positions or slice spacing no CT has
        raise SeriesGeometryError(f"series {info.key} ({where}): {exc}") from None


__all__ = ["SeriesInfo", "DicomResampledWarning", "list_dicom_series", "load_dicom_series"]
