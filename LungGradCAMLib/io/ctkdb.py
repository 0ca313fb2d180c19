"""Slicer's DICOM database (CTK's ``ctkDICOM.sql``), read directly and read-only.

Slicer indexes imported DICOM files in an SQLite file ``ctkDICOM.sql`` inside its DICOM database
folder (CTK schema, ``SchemaInfo.Version`` 0.6 to 0.8.x). The tables used here:
``Patients(UID, PatientsName, PatientID, PatientsBirthDate)``, ``Studies(StudyInstanceUID,
PatientsUID, StudyDate, StudyDescription, ModalitiesInStudy)``, ``Series(SeriesInstanceUID,
StudyInstanceUID, SeriesNumber, SeriesDate, SeriesDescription, Modality, BodyPartExamined,
FrameOfReferenceUID)`` and ``Images(SOPInstanceUID, Filename, SeriesInstanceUID)``, where
``Filename`` is relative to the database folder for files inside it and absolute otherwise.

The file is opened for each query and closed right after, so that nothing is ever written (no
``-wal``/``-shm`` files, no journal) and no lock is held that would block Slicer using the same
database: a database in rollback-journal mode (CTK's default) with SQLite's ``mode=ro`` URI, which
only takes shared locks; one in write-ahead-log (WAL) mode with ``immutable=1`` (no locks, no
``-shm``), unless a ``-wal`` file beside it holds changes a writer (Slicer) has not yet copied
into it, which only ``mode=ro`` reads. Either works on read-only media.
"""

from __future__ import annotations

import os
import re
import sqlite3
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional, Sequence, Union

from ..core.errors import AmbiguousSeriesError, DatabaseError, NoSeriesFoundError
from ..core.paths import check_path, kind
from ..core.text import escaped
from ..core.volume import Volume

DATABASE_FILENAME = "ctkDICOM.sql"
#: Schema versions (major.minor) whose tables and columns this reader knows.
SUPPORTED_SCHEMAS = ("0.6", "0.7", "0.8")
_REQUIRED = {
    "Patients": ("UID", "PatientsName", "PatientID", "PatientsBirthDate"),
    "Studies": ("StudyInstanceUID", "PatientsUID", "StudyDate", "StudyDescription", "ModalitiesInStudy"),
    "Series": (
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "SeriesNumber",
        "SeriesDate",
        "SeriesDescription",
        "Modality",
        "BodyPartExamined",
        "FrameOfReferenceUID",
    ),
    "Images": ("SOPInstanceUID", "Filename", "SeriesInstanceUID"),
}


@dataclass(frozen=True)
class PatientRecord:
    """A row of ``Patients``; ``uid`` is the database's integer key (not a DICOM UID)."""

    uid: int
    patient_id: str
    name: str
    birth_date: str
    n_studies: int


@dataclass(frozen=True)
class StudyRecord:
    """A row of ``Studies``; ``patient_uid`` is :attr:`PatientRecord.uid`."""

    study_uid: str
    patient_uid: int
    date: str
    description: str
    modalities: str
    n_series: int


@dataclass(frozen=True)
class SeriesRecord:
    """A row of ``Series`` with its number of indexed images."""

    series_uid: str
    study_uid: str
    number: Optional[int]
    date: str
    description: str
    modality: str
    body_part: str
    frame_of_reference_uid: str
    n_images: int


def _text(value: Any) -> str:
    return "" if value is None else str(value)


class DicomDatabase:
    """Read-only view of a Slicer DICOM database: ``path`` is its folder or its ``ctkDICOM.sql``.

    Raises :class:`DatabaseError` when the path is missing, is not an SQLite file, is not a ctkDICOM
    database or has an unknown schema version.

    Example (a database made here stands in for Slicer's own folder, e.g.
    ``~/Documents/SlicerDICOMDatabase``)::

        >>> import LungGradCAMLib as lgc
        >>> files = lgc.phantom.write_dicom_series(lgc.phantom.chest_ct(seed=3).volume, "dicom")
        >>> summary = lgc.make_dicom_database("dicom", "SlicerDICOMDatabase")
        >>> db = lgc.DicomDatabase("SlicerDICOMDatabase")
        >>> [(series.modality, series.n_images) for series in db.ct_series()]
        [('CT', 96)]
        >>> ct = db.load(db.ct_series()[0].series_uid)
    """

    def __init__(self, path: Union[str, "os.PathLike[str]"]) -> None:
        path = check_path(Path(path).expanduser(), "DICOM database")
        if path.is_dir():
            path = path / DATABASE_FILENAME
            if not path.is_file():
                raise DatabaseError(
                    f"{path.parent}: not a Slicer DICOM database folder (no {DATABASE_FILENAME}); "
                    "give the folder shown in Slicer's DICOM module settings"
                )
        elif not path.is_file():
            what = f"a {kind(path.stat().st_mode)}, not a database" if path.exists() else "no such file or folder"
            raise DatabaseError(f"{path}: {what}; give Slicer's DICOM database folder or its {DATABASE_FILENAME}")
        self.path = path.resolve()
        #: Folder that relative ``Images.Filename`` entries start from.
        self.folder = self.path.parent
        self.schema_version = self._check_schema()

    def __repr__(self) -> str:
        return f"DicomDatabase({str(self.path)!r}, schema {self.schema_version})"

    # --- queries ------------------------------------------------------------------------------
    def _uri(self) -> str:
        """The SQLite URI that reads the database without writing anything (see the module notes)."""
        try:
            with open(self.path, "rb") as f:
                wal_mode = f.read(20)[18:20] == b"\x02\x02"  # the header's read/write versions: 2 = WAL
        except OSError:
            wal_mode = False  # SQLite reports why it cannot read the file
        wal = Path(f"{self.path}-wal")
        pending = wal.is_file() and wal.stat().st_size > 0
        return f"{self.path.as_uri()}?" + ("immutable=1" if wal_mode and not pending else "mode=ro")

    def _query(self, sql: str, params: Sequence[Any] = ()) -> List[tuple]:
        """Run one SELECT on a fresh read-only connection, fetch everything, close (no lock kept)."""
        uri = self._uri()
        try:
            with closing(sqlite3.connect(uri, uri=True, timeout=10.0)) as conn:
                return conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.DatabaseError as exc:  # also OperationalError: locked, unreadable, no table
            wal = (
                " (its -wal file, changes not yet in the database, needs a writable folder to be read: "
                "copy the database folder)"
                if "mode=ro" in uri and Path(f"{self.path}-wal").is_file()
                else ""
            )
            raise DatabaseError(
                f"{self.path}: cannot read the database ({exc}){wal}; it is corrupt, not a "
                "Slicer DICOM database, or locked by another program"
            ) from None

    def _check_schema(self) -> str:
        try:
            tables = {row[0] for row in self._query("SELECT name FROM sqlite_master WHERE type = 'table'")}
        except DatabaseError as exc:
            if Path(f"{self.path}-wal").is_file():  # its message says what the write-ahead log needs
                raise exc from None
            raise DatabaseError(
                f"{self.path}: not an SQLite database (corrupt, or not Slicer's "
                f"{DATABASE_FILENAME}); give the folder of Slicer's DICOM database"
            ) from None
        missing = [t for t in ("SchemaInfo",) + tuple(_REQUIRED) if t not in tables]
        if missing:
            raise DatabaseError(
                f"{self.path}: an SQLite file but not a Slicer (CTK) DICOM database: no table(s) {', '.join(missing)}"
            )
        rows = self._query("SELECT Version FROM SchemaInfo")
        version = _text(rows[0][0]).strip() if rows else ""
        match = re.match(r"^(\d+\.\d+)(\.\d+)?$", version)
        if not match or match.group(1) not in SUPPORTED_SCHEMAS:
            raise DatabaseError(
                f"{self.path}: DICOM database schema version {version or '(none)'!r} is not supported "
                f"(known: {', '.join(s + '.x' for s in SUPPORTED_SCHEMAS)}); update LungGradCAM, or load "
                "the series from its DICOM folder instead"
            )
        for table, columns in _REQUIRED.items():
            present = {row[1] for row in self._query(f"PRAGMA table_info('{table}')")}
            absent = [c for c in columns if c not in present]
            if absent:
                raise DatabaseError(
                    f"{self.path}: table {table} lacks column(s) {', '.join(absent)} of schema "
                    f"{version}; the database is damaged or not made by Slicer/CTK"
                )
        return version

    def patients(self) -> List[PatientRecord]:
        """All patients, by name then key."""
        rows = self._query(
            "SELECT p.UID, p.PatientID, p.PatientsName, p.PatientsBirthDate, "
            "(SELECT COUNT(*) FROM Studies s WHERE s.PatientsUID = p.UID) "
            "FROM Patients p ORDER BY p.PatientsName, p.UID"
        )
        return [PatientRecord(int(r[0]), _text(r[1]), _text(r[2]), _text(r[3]), int(r[4])) for r in rows]

    def studies(self, patient: Union[PatientRecord, int, None] = None) -> List[StudyRecord]:
        """Studies of ``patient`` (a record or its integer key), or all of them, by date."""
        sql = (
            "SELECT s.StudyInstanceUID, s.PatientsUID, s.StudyDate, s.StudyDescription, s.ModalitiesInStudy, "
            "(SELECT COUNT(*) FROM Series r WHERE r.StudyInstanceUID = s.StudyInstanceUID) FROM Studies s"
        )
        params: tuple = ()
        if patient is not None:
            sql += " WHERE s.PatientsUID = ?"
            params = (patient.uid if isinstance(patient, PatientRecord) else int(patient),)
        rows = self._query(sql + " ORDER BY s.StudyDate, s.StudyInstanceUID", params)
        return [StudyRecord(_text(r[0]), int(r[1]), _text(r[2]), _text(r[3]), _text(r[4]), int(r[5])) for r in rows]

    def series(self, study: Union[StudyRecord, str, None] = None) -> List[SeriesRecord]:
        """Series of ``study`` (a record or its StudyInstanceUID), or all of them, by number."""
        sql = (
            "SELECT r.SeriesInstanceUID, r.StudyInstanceUID, r.SeriesNumber, r.SeriesDate, r.SeriesDescription, "
            "r.Modality, r.BodyPartExamined, r.FrameOfReferenceUID, "
            "(SELECT COUNT(*) FROM Images i WHERE i.SeriesInstanceUID = r.SeriesInstanceUID) FROM Series r"
        )
        params: tuple = ()
        if study is not None:
            sql += " WHERE r.StudyInstanceUID = ?"
            params = (study.study_uid if isinstance(study, StudyRecord) else str(study),)
        rows = self._query(sql + " ORDER BY r.StudyInstanceUID, r.SeriesNumber, r.SeriesInstanceUID", params)
        return [
            SeriesRecord(
                _text(r[0]),
                _text(r[1]),
                None if r[2] is None else int(r[2]),
                _text(r[3]),
                _text(r[4]),
                _text(r[5]),
                _text(r[6]),
                _text(r[7]),
                int(r[8]),
            )
            for r in rows
        ]

    def ct_series(self) -> List[SeriesRecord]:
        """All series whose Modality is CT."""
        return [s for s in self.series() if s.modality.upper() == "CT"]

    def files(self, series_uid: str) -> List[Path]:
        """Absolute paths of the series' files (``Filename`` relative entries resolved against the
        database folder). Raises :class:`NoSeriesFoundError` for an unknown series and
        :class:`DatabaseError` naming the files that no longer exist."""
        uid = series_uid.split("#", 1)[0]  # a part key of load_dicom_series names the same files
        rows = self._query("SELECT Filename FROM Images WHERE SeriesInstanceUID = ? ORDER BY Filename", (uid,))
        if not rows:
            known = self._query("SELECT COUNT(*) FROM Series WHERE SeriesInstanceUID = ?", (uid,))[0][0]
            raise NoSeriesFoundError(
                f"{self.path}: series {uid} "
                + ("has no images in the database" if known else "is not in the database")
                + "; list the series with DicomDatabase(...).series()"
            )
        names = [_text(r[0]) for r in rows if _text(r[0])]
        if not names:
            raise DatabaseError(
                f"{self.path}: series {uid} has no local files (only URLs of a remote store); "
                "retrieve it into the database with Slicer's DICOM module first"
            )
        paths = [Path(n) if os.path.isabs(n) else self.folder / n for n in names]
        missing = [p for p in paths if not p.exists()]
        if missing:
            shown = ", ".join(str(p) for p in missing[:5]) + (", ..." if len(missing) > 5 else "")
            raise DatabaseError(
                f"{self.path}: {len(missing)} of {len(paths)} files of series {uid} are missing (deleted or "
                f"moved): {shown}; re-import the series in Slicer's DICOM module or remove it from the database"
            )
        return paths

    def load(self, series_uid: str, **kwargs: Any) -> Volume:
        """The series as a HU :class:`Volume` via :func:`~LungGradCAMLib.io.dicom.load_dicom_series`
        (``kwargs`` are passed on; ``series_uid`` may be a part key ``"<uid>#<n>"``)."""
        from .dicom import load_dicom_series

        return load_dicom_series(self.files(series_uid), series_uid=series_uid, **kwargs)

    def describe_for_choice(self, series: SeriesRecord) -> str:
        """One line naming a series, its patient ID and its files' folder, to tell the series of
        two patients apart when the user must pick one (for the user's terminal, never for logs)."""
        patients = {p.uid: p.patient_id for p in self.patients()}
        study = next((s for s in self.studies() if s.study_uid == series.study_uid), None)
        patient = patients.get(study.patient_uid, "") if study is not None else ""
        names = [
            _text(r[0])
            for r in self._query("SELECT Filename FROM Images WHERE SeriesInstanceUID = ?", (series.series_uid,))
            if _text(r[0])
        ]
        paths = [str(Path(n).parent if os.path.isabs(n) else (self.folder / n).parent) for n in names]
        folder = os.path.commonpath(paths) if paths else "?"
        return (
            f"{escaped(series.series_uid, 80)}  '{escaped(series.description, 80)}'  "
            f"{series.n_images} image(s)  patient '{escaped(patient or '(no PatientID)', 80)}'  in {escaped(folder)}"
        )

    def load_single_ct(self, **kwargs: Any) -> Volume:
        """The database's only CT series (none -> :class:`NoSeriesFoundError`, several ->
        :class:`AmbiguousSeriesError` listing them)."""
        ct = self.ct_series()
        if not ct:
            raise NoSeriesFoundError(f"{self.path}: no CT series in the database")
        if len(ct) > 1:
            listing = "\n".join(f"  {self.describe_for_choice(s)}" for s in ct)
            raise AmbiguousSeriesError(
                f"{self.path}: {len(ct)} CT series; pick one by its UID "
                f"(series_uid= in Python, --series on the command line):\n{listing}"
            )
        return self.load(ct[0].series_uid, **kwargs)


__all__ = ["DicomDatabase", "PatientRecord", "StudyRecord", "SeriesRecord", "DATABASE_FILENAME"]
