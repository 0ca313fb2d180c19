"""A bad Slicer DICOM database (ctkDICOM.sql): damaged, someone else's SQLite file, files of a series
deleted; each refused with its specific error (checked as bad_inputs.py says)."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Dict

from LungGradCAMLib.core.errors import DatabaseError
from LungGradCAMLib.io.ctkdb import DicomDatabase

from bad_inputs import Case, Made, case_tests, dicom_series, uid_of
from helpers import make_database


def _corrupt_sqlite(root: Path) -> Made:
    root.mkdir(parents=True)
    path = root / "ctkDICOM.sql"
    dicom_series(root / "dicom")
    make_database(root, sorted((root / "dicom").iterdir()))
    data = bytearray(path.read_bytes())
    data[16:100] = bytes(range(84))  # page size, format numbers and counters overwritten
    path.write_bytes(bytes(data))
    return Made(path, lambda: DicomDatabase(path), [str(path)])


def _foreign_sqlite(root: Path) -> Made:
    root.mkdir(parents=True)
    path = root / "ctkDICOM.sql"
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript(
            "CREATE TABLE bookmarks (id INTEGER PRIMARY KEY, url TEXT);"
            "INSERT INTO bookmarks (url) VALUES ('https://example.org');"
        )
    return Made(root, lambda: DicomDatabase(root), [str(path), "Patients", "Images"])


def _database_files_deleted(root: Path) -> Made:
    files = dicom_series(root / "dicom" / "s1")
    make_database(root, files)
    uid = uid_of(files[0])
    files[1].unlink()
    files[3].unlink()
    return Made(root, lambda: DicomDatabase(root).load(uid), [uid, str(files[1]), str(files[3]), "2 of 4 files"])


CASES: Dict[str, Case] = {
    "corrupt_sqlite_database": Case(_corrupt_sqlite, DatabaseError, "not an SQLite database"),
    "foreign_sqlite_database": Case(_foreign_sqlite, DatabaseError, "not a Slicer \\(CTK\\) DICOM database"),
    "database_files_deleted": Case(_database_files_deleted, DatabaseError, "files of series .* are missing"),
}

test_library_raises_specific_error_naming_the_input, test_cli_exits_2_with_the_message_and_writes_nothing = case_tests(
    CASES
)
