"""DICOM pixel data decoded straight into one float32 HU array (K, J, I) by a thread pool
(:func:`decode_frames`): native little-endian data read in place, compressed transfer syntaxes
through pydicom's handlers (:func:`decoder_available` says whether one is installed)."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from ..core.errors import DicomDecodeError
from ..core.paths import open_regular
from ..core.volume import AIR_HU
from .dicom_headers import Frame, Header, ProgressFn, read_dataset, uid_name

_DECODER_HINT = (
    "install the decoders with `pip install pylibjpeg pylibjpeg-libjpeg pylibjpeg-openjpeg "
    "pylibjpeg-rle pyjpegls` (or python-gdcm), or convert the series to an uncompressed "
    "transfer syntax (e.g. `gdcmconv --raw`)"
)


# --------------------------------------------------------------------------------------------
# pixels
# --------------------------------------------------------------------------------------------
def _decode_native(h: Header, n_frames: int, rows: int, cols: int) -> np.ndarray:
    dtype = np.dtype("<i2" if h.pixel_representation == 1 else "<u2")
    expected = n_frames * rows * cols * 2
    if h.pixel_length is not None and h.pixel_length != 0xFFFFFFFF and h.pixel_length < expected:
        raise DicomDecodeError(
            f"{h.path}: Pixel Data holds {h.pixel_length} bytes but {n_frames} frame(s) of "
            f"{rows}x{cols} 16-bit pixels need {expected}; the file is damaged, replace it"
        )
    with open_regular(h.path) as f:
        f.seek(h.pixel_offset)
        raw = f.read(expected)
    if len(raw) < expected:
        raise DicomDecodeError(
            f"{h.path}: file is truncated ({len(raw)} of {expected} bytes of pixel "
            "data present); copy the file again from its source"
        )
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

        return any(
            handler.supports_transfer_syntax(UID(transfer_syntax)) and handler.is_available()
            for handler in config.pixel_data_handlers
        )
    try:
        decoder = get_decoder(transfer_syntax)
    except NotImplementedError:
        return False
    return decoder is not None and decoder.is_available


def _decode_pydicom(h: Header, n_frames: int, rows: int, cols: int) -> np.ndarray:
    if not decoder_available(h.transfer_syntax):
        raise DicomDecodeError(
            f"{h.path}: no decoder available for transfer syntax {h.transfer_syntax} "
            f"({uid_name(h.transfer_syntax)}); {_DECODER_HINT}"
        )
    ds = read_dataset(h.path)[0]
    try:
        arr = ds.pixel_array
    except Exception as exc:  # decoder plugins raise assorted types
        raise DicomDecodeError(
            f"{h.path}: cannot decode the pixel data ({uid_name(h.transfer_syntax)}): "
            f"{exc}; the file may be damaged, or {_DECODER_HINT}"
        ) from None
    return np.asarray(arr).reshape(n_frames, rows, cols)


def _decode_file(frames: List[Tuple[int, Frame]], out: np.ndarray, min_hu: Optional[float]) -> None:
    """Decode one file and write its frames' HU into ``out[index]``."""
    first = frames[0][1]
    h = first.header
    if not h.has_pixels:
        raise DicomDecodeError(f"{h.path}: image without Pixel Data (7FE0,0010); the file is incomplete, replace it")
    if h.samples_per_pixel != 1:
        raise DicomDecodeError(f"{h.path}: {h.samples_per_pixel} samples per pixel (colour); a CT slice has one")
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


def decode_frames(
    frames: List[Frame], out: np.ndarray, min_hu: Optional[float], workers: int, progress: Optional[ProgressFn]
) -> None:
    by_file: Dict[Path, List[Tuple[int, Frame]]] = {}
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
