"""DICOM headers, read without pixel data: each file's :class:`Header` and its 2D images as
:class:`Frame` objects (LPS geometry as DICOM stores it; single- and multi-frame files), the
candidate files of a source (:func:`source_files`) and their headers read by a thread pool
(:func:`scan_headers`). :mod:`.dicom_series` groups the frames into series, :mod:`.dicom_pixels`
decodes them, :mod:`.dicom` stacks them into a :class:`~LungGradCAMLib.core.volume.Volume`."""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np

from ..core.errors import DicomDecodeError, NoSeriesFoundError
from ..core.paths import is_special, open_regular

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
_MEDIA_STORAGE_DIRECTORY = "1.2.840.10008.1.3.10"
_IMPLICIT_LE, _EXPLICIT_LE = "1.2.840.10008.1.2", "1.2.840.10008.1.2.1"

PathLike = Union[str, "os.PathLike[str]"]
ProgressFn = Callable[[int, int], None]


# --------------------------------------------------------------------------------------------
# headers
# --------------------------------------------------------------------------------------------
@dataclass
class Frame:
    """One 2D image: a single-frame file or one frame of a multi-frame file (LPS geometry)."""

    path: Path
    frame: Optional[int]  # index in a multi-frame file, None for single-frame files
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
    header: "Header"


@dataclass
class Header:
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


def read_dataset(path: Path, header_only: bool = False):
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
        raise DicomDecodeError(
            f"{path}: cannot read the file ({exc.strerror or exc}); check that it exists and that you may read it"
        ) from None
    except Exception as exc:  # pydicom raises many types on corrupt files
        raise DicomDecodeError(
            f"{path}: unreadable DICOM file ({type(exc).__name__}: {exc}); remove it or replace it with an intact copy"
        ) from None


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
        return [
            int.from_bytes(data[i : i + size], order, signed=vr in ("SS", "SL"))
            for i in range(0, len(data) - size + 1, size)
        ]
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
        values = [v - (1 << bits_allocated) if v is not None and v >= 1 << (bits_allocated - 1) else v for v in values]
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


def _read_header(path: Path) -> List[Frame]:
    """The image frames of one file ([] for non-DICOM and non-image objects)."""
    ds, stop, head = read_dataset(path, header_only=True)
    if ds is None:
        return []
    meta = getattr(ds, "file_meta", None)
    sop_class = str(_one(ds, "SOPClassUID") or (meta.get("MediaStorageSOPClassUID", "") if meta is not None else ""))
    if "Rows" not in ds or "Columns" not in ds or sop_class == _MEDIA_STORAGE_DIRECTORY:
        if not sop_class and not meta:  # no meta elements and no SOP class: garbage after "DICM"
            raise DicomDecodeError(
                f"{path}: unreadable DICOM file (no File Meta Information and no SOP Class); "
                "remove it or replace it with an intact copy"
            )
        if "Image Storage" in uid_name(sop_class):
            raise DicomDecodeError(
                f"{path}: {uid_name(sop_class)} object without Rows/Columns: the file "
                "is truncated or damaged; copy it again from its source"
            )
        return []  # DICOMDIR, SR, RTSTRUCT, ...: not images
    syntax = str(meta.get("TransferSyntaxUID", _IMPLICIT_LE)) if meta is not None else _IMPLICIT_LE
    has_pixels, pixel_offset, pixel_length = _pixel_element(syntax, stop, head)
    bits_allocated = _int(_one(ds, "BitsAllocated")) or 16
    pixel_representation = _int(_one(ds, "PixelRepresentation")) or 0
    header = Header(
        path=path,
        transfer_syntax=syntax,
        has_pixels=has_pixels,
        pixel_offset=pixel_offset,
        pixel_length=pixel_length,
        bits_allocated=bits_allocated,
        bits_stored=_int(_one(ds, "BitsStored")) or bits_allocated,
        pixel_representation=pixel_representation,
        samples_per_pixel=_int(_one(ds, "SamplesPerPixel")) or 1,
        study_uid=str(_one(ds, "StudyInstanceUID") or ""),
        patient_id=str(ds.get("PatientID", "")),
        modality=str(_one(ds, "Modality") or ""),
        description=str(ds.get("SeriesDescription", "")),
        series_number=_int(_one(ds, "SeriesNumber")),
        frame_of_reference_uid=str(_one(ds, "FrameOfReferenceUID") or ""),
    )
    rows, cols = _int(_one(ds, "Rows")) or 0, _int(_one(ds, "Columns")) or 0
    n_frames = _int(_one(ds, "NumberOfFrames")) or 1
    # Native frames need rows * cols * bytes each, encapsulated ones at least an 8-byte item
    # header: a count the file cannot hold is refused before one record per frame is made.
    if n_frames > 1:
        frame_bytes = max(1, rows * cols * bits_allocated // 8) if pixel_length is not None else 8
        available = pixel_length if pixel_length is not None else path.stat().st_size
        if n_frames * frame_bytes > available:
            raise DicomDecodeError(
                f"{path}: declares {n_frames} frames but holds {available} bytes of pixel "
                "data, too few for that many; the file is damaged, replace it"
            )
    series_uid = str(_one(ds, "SeriesInstanceUID") or "")
    padding = _padding_range(ds, bits_allocated, pixel_representation)
    acquisition = _int(_one(ds, "AcquisitionNumber"))
    if n_frames == 1 and "PerFrameFunctionalGroupsSequence" not in ds:
        spacing = _vector(_raw(ds, "PixelSpacing"), 2)
        return [
            Frame(
                path,
                None,
                1,
                series_uid,
                _vector(_raw(ds, "ImagePositionPatient"), 3),
                _vector(_raw(ds, "ImageOrientationPatient"), 6),
                None if spacing is None else (spacing[0], spacing[1]),
                rows,
                cols,
                _float(_one(ds, "RescaleSlope"), 1.0),
                _float(_one(ds, "RescaleIntercept"), 0.0),
                padding,
                acquisition,
                header,
            )
        ]
    per_frame = ds.get("PerFrameFunctionalGroupsSequence") or []
    if len(per_frame) != n_frames:
        # Multi-frame without per-frame positions (legacy NM/US-style): listed, but unplaceable.
        return [
            Frame(
                path,
                index,
                n_frames,
                series_uid,
                None,
                None,
                None,
                rows,
                cols,
                _float(_one(ds, "RescaleSlope"), 1.0),
                _float(_one(ds, "RescaleIntercept"), 0.0),
                padding,
                acquisition,
                header,
            )
            for index in range(n_frames)
        ]
    frames = []
    for index, item in enumerate(per_frame):
        spacing = _vector(_functional(ds, item, "PixelMeasuresSequence", "PixelSpacing"), 2)
        frames.append(
            Frame(
                path,
                index,
                n_frames,
                series_uid,
                _vector(_functional(ds, item, "PlanePositionSequence", "ImagePositionPatient"), 3),
                _vector(_functional(ds, item, "PlaneOrientationSequence", "ImageOrientationPatient"), 6),
                None if spacing is None else (spacing[0], spacing[1]),
                rows,
                cols,
                _float(_first(_functional(ds, item, "PixelValueTransformationSequence", "RescaleSlope")), 1.0),
                _float(_first(_functional(ds, item, "PixelValueTransformationSequence", "RescaleIntercept")), 0.0),
                padding,
                _int(_first(_functional(ds, item, "FrameContentSequence", "FrameAcquisitionNumber"))),
                header,
            )
        )
    return frames


def source_files(source: Union[PathLike, Iterable[PathLike]]) -> Tuple[str, List[Path]]:
    """(description of the source for messages, the candidate files)."""
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        if root.is_dir():
            files = []
            for folder, dirs, names in os.walk(root):
                dirs.sort()
                files.extend(
                    Path(folder) / n
                    for n in sorted(names)  # a FIFO would block open()
                    if n.upper() != "DICOMDIR" and not is_special(Path(folder) / n)
                )
            return str(root), files
        if not root.exists() and not root.is_symlink():
            raise NoSeriesFoundError(f"{root}: no such file or folder; give a DICOM folder or files")
        return str(root), [root]
    files = [Path(p) for p in source]
    return (f"{len(files)} files" if len(files) != 1 else str(files[0])), files


def scan_headers(files: Sequence[Path], workers: int, unreadable: Optional[Dict[Path, str]] = None) -> List[Frame]:
    """The frames of ``files``; with ``unreadable``, a file whose header cannot be read is recorded
    there (path -> message) instead of raising."""

    def read(path: Path) -> List[Frame]:
        try:
            return _read_header(path)
        except DicomDecodeError as exc:
            if unreadable is None:
                raise
            unreadable[path] = str(exc)
            return []

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return [frame for frames in pool.map(read, files) for frame in frames]


def uid_name(uid: str) -> str:
    from pydicom.uid import UID

    return UID(uid).name
