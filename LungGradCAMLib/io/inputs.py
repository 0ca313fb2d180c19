"""The input resolver: a CT from a volume file, a DICOM folder or a Slicer DICOM database."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Optional, Union

from ..core.errors import InvalidInputError
from ..core.paths import check_path, is_special, kind
from ..core.volume import Volume
from .ctkdb import DATABASE_FILENAME, DicomDatabase
from .dicom import load_dicom_series
from .volume_files import SUPPORTED_SUFFIXES, read_volume


def is_database(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() == ".sql" or (path / DATABASE_FILENAME).is_file()


def is_volume_file(path: Path) -> bool:
    return path.is_file() and any(path.name.lower().endswith(s) for s in SUPPORTED_SUFFIXES)


def input_tree(path: Union[str, os.PathLike]) -> Path:
    """What a run reads from ``path`` as a whole, for the check that it never writes there: a
    Slicer DICOM database's folder (given as its ``.sql`` file too), else ``path`` itself."""
    path = Path(path)
    return path.parent if path.is_file() and is_database(path) else path


def check_input(source: Union[str, os.PathLike], series_uid: Optional[str] = None) -> Path:
    """``source`` as a path after the checks that need no reading: a path ITK can take (UTF-8,
    short names), it exists, it is no FIFO, socket or device (reading one would block or never
    end), and ``series_uid`` is only given for a DICOM folder or database (a volume file holds one
    series)."""
    path = check_path(source, "input")
    if not path.exists():
        raise InvalidInputError(f"{path}: no such file or folder")
    if is_special(path):
        raise InvalidInputError(
            f"{path} is a {kind(path.stat().st_mode)}: give a DICOM folder, a Slicer DICOM database or a volume file"
        )
    if series_uid is not None and is_volume_file(path):
        raise InvalidInputError(
            f"{path} is a volume file, which holds one series: leave out --series "
            "(series_uid), which picks a series of a DICOM folder or database"
        )
    return path


def load_input(
    source: Union[str, os.PathLike],
    series_uid: Optional[str] = None,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Volume:
    """A CT from a volume file (.nrrd/.nii.gz/.mha...), a DICOM folder, or a Slicer DICOM
    database (its folder holding ``ctkDICOM.sql``, or the ``.sql`` file; needs ``series_uid``
    when it holds several CT series). ``progress(done, total)`` counts DICOM files read."""
    path = check_input(source, series_uid)
    if is_database(path):
        db = DicomDatabase(path)
        return db.load(series_uid, progress=progress) if series_uid else db.load_single_ct(progress=progress)
    if is_volume_file(path):
        return read_volume(path)
    return load_dicom_series(path if path.is_dir() else [path], series_uid=series_uid, progress=progress)
