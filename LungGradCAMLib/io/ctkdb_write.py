"""Making a Slicer DICOM database outside Slicer: a folder of DICOM files in, ``ctkDICOM.sql`` out.

The file has the tables and columns of CTK's DICOM schema 0.8.1 (``Libs/DICOM/Core/Resources/
dicom-schema.sql`` of the CTK commit Slicer 5.8.1 pins), which Slicer 5.6 to 5.10 use: ``SchemaInfo``,
``Patients``, ``Studies``, ``Series``, ``Images``, ``Directories``, ``ColumnDisplayProperties`` and
``DisplayedFieldGeneratorRules``, with CTK's indexes. One row per patient (PatientsName +
PatientID), study, series and file, filled from the files' headers as CTK fills them; ``Images.Filename``
is relative to the database folder for a file inside it and absolute otherwise (CTK's rule). The
``Displayed*`` columns are left empty, as CTK leaves them until its displayed-field generator
runs (Slicer runs it when it shows the database); the column display properties are not written
(CTK's browser then shows every column under its field name).

:class:`~LungGradCAMLib.io.ctkdb.DicomDatabase` reads what this writes, and so do
``lunggradcam run``/``batch`` (a database folder as the CT). The DICOM files are only read.
"""

from __future__ import annotations

import datetime
import os
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterable, Union

from ..core.atomic import atomic_path
from ..core.errors import NoSeriesFoundError, OutputError
from .ctkdb import DATABASE_FILENAME

#: The schema version written (CTK's ``SchemaInfo.Version``).
SCHEMA_VERSION = "0.8.1"

_TABLES = {
    "Images": "'SOPInstanceUID' VARCHAR(64) NOT NULL, 'Filename' VARCHAR(1024) NULL, 'URL' VARCHAR(2048) NULL, "
    "'SeriesInstanceUID' VARCHAR(64) NOT NULL, 'InsertTimestamp' VARCHAR(20) NOT NULL, "
    "'DisplayedFieldsUpdatedTimestamp' DATETIME NULL, PRIMARY KEY ('SOPInstanceUID')",
    "Patients": "'UID' INTEGER PRIMARY KEY AUTOINCREMENT, 'PatientsName' VARCHAR(255) NULL, "
    "'PatientID' VARCHAR(255) NULL, 'PatientsBirthDate' DATE NULL, 'PatientsBirthTime' TIME NULL, "
    "'PatientsSex' VARCHAR(1) NULL, 'PatientsAge' VARCHAR(10) NULL, 'PatientsComments' VARCHAR(255) NULL, "
    "'InsertTimestamp' VARCHAR(20) NOT NULL, 'DisplayedPatientsName' VARCHAR(255) NULL, "
    "'DisplayedNumberOfStudies' INT NULL, 'DisplayedLastStudyDate' DATE NULL, "
    "'DisplayedFieldsUpdatedTimestamp' DATETIME NULL, 'Connections' VARCHAR(2048) NULL",
    "Studies": "'StudyInstanceUID' VARCHAR(64) NOT NULL, 'PatientsUID' INT NOT NULL, 'StudyID' VARCHAR(255) NULL, "
    "'StudyDate' DATE NULL, 'StudyTime' VARCHAR(20) NULL, 'StudyDescription' VARCHAR(255) NULL, "
    "'AccessionNumber' VARCHAR(255) NULL, 'ModalitiesInStudy' VARCHAR(255) NULL, "
    "'InstitutionName' VARCHAR(255) NULL, 'ReferringPhysician' VARCHAR(255) NULL, "
    "'PerformingPhysiciansName' VARCHAR(255) NULL, 'InsertTimestamp' VARCHAR(20) NOT NULL, "
    "'DisplayedNumberOfSeries' INT NULL, 'DisplayedFieldsUpdatedTimestamp' DATETIME NULL, "
    "PRIMARY KEY ('StudyInstanceUID')",
    "Series": "'SeriesInstanceUID' VARCHAR(64) NOT NULL, 'StudyInstanceUID' VARCHAR(64) NOT NULL, "
    "'SeriesNumber' INT NULL, 'SeriesDate' DATE NULL, 'SeriesTime' VARCHAR(20) NULL, "
    "'SeriesDescription' VARCHAR(255) NULL, 'Modality' VARCHAR(20) NULL, "
    "'BodyPartExamined' VARCHAR(255) NULL, 'FrameOfReferenceUID' VARCHAR(64) NULL, "
    "'AcquisitionNumber' INT NULL, 'ContrastAgent' VARCHAR(255) NULL, 'ScanningSequence' VARCHAR(45) NULL, "
    "'EchoNumber' INT NULL, 'TemporalPosition' INT NULL, 'InsertTimestamp' VARCHAR(20) NOT NULL, "
    "'DisplayedCount' INT NULL, 'DisplayedSize' VARCHAR(20) NULL, 'DisplayedNumberOfFrames' INT NULL, "
    "'DisplayedFieldsUpdatedTimestamp' DATETIME NULL, PRIMARY KEY ('SeriesInstanceUID')",
    "Directories": "'Dirname' VARCHAR(1024), PRIMARY KEY ('Dirname')",
    "ColumnDisplayProperties": "'TableName' VARCHAR(64) NOT NULL, 'FieldName' VARCHAR(64) NOT NULL, "
    "'DisplayedName' VARCHAR(255) NULL, 'Visibility' INT NULL DEFAULT 1, "
    "'Weight' INT NULL, 'Format' VARCHAR(255) NULL, PRIMARY KEY ('TableName', 'FieldName')",
    "DisplayedFieldGeneratorRules": "'Name' VARCHAR(64) NOT NULL, 'Enabled' INT NULL DEFAULT 1, "
    "'Options' VARCHAR(255) NULL, PRIMARY KEY ('Name')",
}
_INDEXES = (
    ("ImagesFilenameIndex", "Images", "Filename"),
    ("ImagesSeriesIndex", "Images", "SeriesInstanceUID"),
    ("SeriesStudyIndex", "Series", "StudyInstanceUID"),
    ("StudiesPatientIndex", "Studies", "PatientsUID"),
)
#: (column, DICOM keyword) of the rows CTK fills from each file's header.
_PATIENT = (
    ("PatientsName", "PatientName"),
    ("PatientID", "PatientID"),
    ("PatientsBirthDate", "PatientBirthDate"),
    ("PatientsBirthTime", "PatientBirthTime"),
    ("PatientsSex", "PatientSex"),
    ("PatientsAge", "PatientAge"),
    ("PatientsComments", "PatientComments"),
)
_STUDY = (
    ("StudyID", "StudyID"),
    ("StudyDate", "StudyDate"),
    ("StudyTime", "StudyTime"),
    ("StudyDescription", "StudyDescription"),
    ("AccessionNumber", "AccessionNumber"),
    ("ModalitiesInStudy", "Modality"),
    ("InstitutionName", "InstitutionName"),
    ("ReferringPhysician", "ReferringPhysicianName"),
    ("PerformingPhysiciansName", "PerformingPhysicianName"),
)
_SERIES = (
    ("SeriesNumber", "SeriesNumber"),
    ("SeriesDate", "SeriesDate"),
    ("SeriesTime", "SeriesTime"),
    ("SeriesDescription", "SeriesDescription"),
    ("Modality", "Modality"),
    ("BodyPartExamined", "BodyPartExamined"),
    ("FrameOfReferenceUID", "FrameOfReferenceUID"),
    ("AcquisitionNumber", "AcquisitionNumber"),
    ("ContrastAgent", "ContrastBolusAgent"),
    ("ScanningSequence", "ScanningSequence"),
    ("EchoNumber", "EchoNumbers"),
    ("TemporalPosition", "TemporalPositionIdentifier"),
)


@dataclass(frozen=True)
class DatabaseSummary:
    """What :func:`make_dicom_database` indexed: the ``ctkDICOM.sql`` path and the counts."""

    path: Path
    patients: int
    studies: int
    series: int
    files: int
    skipped: int

    def __str__(self) -> str:
        return (
            f"{self.files} file(s) of {self.series} series, {self.studies} study(ies), {self.patients} "
            f"patient(s) indexed into {self.path}"
            + (f"; {self.skipped} unreadable file(s) skipped" if self.skipped else "")
        )


def _value(ds: "pydicom.Dataset", keyword: str) -> Union[str, int, None]:  # noqa: F821
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    if hasattr(value, "__len__") and not isinstance(value, str) and keyword != "PatientName":
        value = value[0] if len(value) else None  # a multi-valued element: CTK keeps the first
    return value if isinstance(value, int) else str(value)


def _check_new(folder: Path) -> Path:
    target = folder / DATABASE_FILENAME
    if target.exists() or target.is_symlink():
        raise OutputError(
            f"{target} exists; LungGradCAM never overwrites a database: remove it, or choose another folder"
        )
    return target


def _create_tables(db: sqlite3.Connection) -> None:
    db.execute("CREATE TABLE 'SchemaInfo' ( 'Version' VARCHAR(1024) NOT NULL )")
    db.execute("INSERT INTO SchemaInfo VALUES (?)", (SCHEMA_VERSION,))
    for table, columns in _TABLES.items():
        db.execute(f"CREATE TABLE '{table}' ( {columns} )")
    for name, table, column in _INDEXES:
        db.execute(f"CREATE INDEX '{name}' ON '{table}' ('{column}')")


def create_dicom_database(database_folder: Union[str, "os.PathLike[str]"]) -> Path:
    """An empty Slicer DICOM database (CTK's schema) in ``database_folder`` (made when missing), as
    Slicer makes one before anything is imported; returns its ``ctkDICOM.sql``. An existing one is
    never overwritten (:class:`OutputError`)."""
    folder = Path(database_folder)
    target = _check_new(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(target, replace=False) as tmp:  # never over one made meanwhile
        with closing(sqlite3.connect(tmp)) as db, db:
            _create_tables(db)
    return target


def make_dicom_database(
    source: Union[str, "os.PathLike[str]", Iterable["os.PathLike[str]"]],
    database_folder: Union[str, "os.PathLike[str]"],
) -> DatabaseSummary:
    """Index the DICOM image series under ``source`` (a folder, searched recursively, or a list of
    files) into a new ``ctkDICOM.sql`` in ``database_folder`` (made when missing), with CTK's
    schema (see the module notes), so that Slicer's DICOM module,
    :class:`~LungGradCAMLib.io.ctkdb.DicomDatabase` and ``lunggradcam run``/``batch`` open it.

    Only image series are indexed (SR, SEG and other objects without pixels are left out); a file
    that cannot be read is skipped and counted. The files themselves are only read: put them in
    ``database_folder`` first if the database should travel with them (then their names are
    stored relative to it). Raises :class:`OutputError` when the folder already holds a
    ``ctkDICOM.sql`` (never overwritten) and :class:`NoSeriesFoundError` when nothing is found.
    """
    import pydicom

    from .dicom_series import list_dicom_series

    folder = Path(database_folder)
    target = _check_new(folder)
    unreadable: Dict[Path, str] = {}
    series = list_dicom_series(source, unreadable=unreadable)
    if not series:
        raise NoSeriesFoundError(f"{source}: no DICOM image series found; give the folder that holds the DICOM files")
    folder.mkdir(parents=True, exist_ok=True)
    root = folder.resolve()
    stamp = datetime.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    files = 0
    with atomic_path(target, replace=False) as tmp:  # never over one made meanwhile
        with closing(sqlite3.connect(tmp)) as db, db:
            _create_tables(db)
            patients: Dict[tuple, int] = {}
            done = set()
            for info in series:
                if info.series_uid in done:  # the parts of a split series share its rows
                    continue
                done.add(info.series_uid)
                for path in info.files:
                    ds = pydicom.dcmread(path, stop_before_pixels=True)
                    key = (_value(ds, "PatientName"), _value(ds, "PatientID"))
                    if key not in patients:
                        patients[key] = db.execute(
                            "INSERT INTO Patients (" + ", ".join(c for c, _ in _PATIENT) + ", InsertTimestamp) "
                            "VALUES (" + ", ".join("?" * (len(_PATIENT) + 1)) + ")",
                            [_value(ds, k) for _, k in _PATIENT] + [stamp],
                        ).lastrowid
                    db.execute(
                        "INSERT OR IGNORE INTO Studies (StudyInstanceUID, PatientsUID, "
                        + ", ".join(c for c, _ in _STUDY)
                        + ", InsertTimestamp) VALUES ("
                        + ", ".join("?" * (len(_STUDY) + 3))
                        + ")",
                        [str(ds.StudyInstanceUID), patients[key]] + [_value(ds, k) for _, k in _STUDY] + [stamp],
                    )
                    db.execute(
                        "INSERT OR IGNORE INTO Series (SeriesInstanceUID, StudyInstanceUID, "
                        + ", ".join(c for c, _ in _SERIES)
                        + ", InsertTimestamp) VALUES ("
                        + ", ".join("?" * (len(_SERIES) + 3))
                        + ")",
                        [info.series_uid, str(ds.StudyInstanceUID)] + [_value(ds, k) for _, k in _SERIES] + [stamp],
                    )
                    resolved = Path(path).resolve()
                    name = resolved.relative_to(root).as_posix() if root in resolved.parents else str(resolved)
                    files += db.execute(
                        "INSERT OR IGNORE INTO Images (SOPInstanceUID, Filename, SeriesInstanceUID, "
                        "InsertTimestamp) VALUES (?, ?, ?, ?)",
                        (str(ds.SOPInstanceUID), name, info.series_uid, stamp),
                    ).rowcount
                    db.execute("INSERT OR IGNORE INTO Directories VALUES (?)", (str(resolved.parent),))
            counts = [db.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0] for t in ("Patients", "Studies", "Series")]
    return DatabaseSummary(target, *counts, files=files, skipped=len(unreadable))


__all__ = ["DatabaseSummary", "SCHEMA_VERSION", "create_dicom_database", "make_dicom_database"]
