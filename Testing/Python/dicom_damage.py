"""Ways to damage one DICOM file, shared by the DICOM reader's tests and the bad-input corpus."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import pydicom

from LungGradCAMLib.io.dicom_write import save_dicom_file


def edit(path: Path, change: Callable[[Any], None], to: Optional[Path] = None) -> Path:
    """Apply ``change(ds)`` to the file, saving it in place or at ``to``."""
    ds = pydicom.dcmread(path)
    change(ds)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom warns about the invalid values we write on purpose
        save_dicom_file(ds, to or path)
    return to or path


def truncate(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:-100])


def truncate_header(f: Path) -> None:
    f.write_bytes(f.read_bytes()[:400])


def drop_pixels(f: Path) -> None:
    edit(f, lambda ds: delattr(ds, "PixelData"))


def short_pixels(f: Path) -> None:
    edit(f, lambda ds: setattr(ds, "PixelData", ds.PixelData[: len(ds.PixelData) // 2]))
