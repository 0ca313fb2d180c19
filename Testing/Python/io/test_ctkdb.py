"""DicomDatabase on SQLite files built with CTK's ctkDICOM schema (a faithful subset of its columns),
holding relative and absolute Filename entries, opened strictly read-only."""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from contextlib import closing
from pathlib import Path

import numpy as np
import pydicom
import pytest

from LungGradCAMLib.core.errors import AmbiguousSeriesError, DatabaseError, NoSeriesFoundError
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.io.ctkdb import DicomDatabase, PatientRecord, SeriesRecord, StudyRecord
from LungGradCAMLib.io.dicom import load_dicom_series
from LungGradCAMLib.io.dicom_write import write_dicom_series

from helpers import REPO, STAMP, data_path, make_database, run_on_read_only_mount


def _hu(shape, seed):
    return np.rint(np.random.default_rng(seed).normal(-300, 300, shape)).clip(-1000, 2000).astype(np.float32)


@pytest.fixture
def two_series(tmp_path):
    """A database folder holding one series inside it (relative names) and indexing one outside
    (absolute names), of two patients."""
    inside = write_dicom_series(
        Volume(_hu((6, 16, 16), 0), axis_aligned_matrix((0.8, 0.8, 2.5))),
        tmp_path / "db" / "dicom" / "a",
        patient_id="PA",
        patient_name="Alpha^A",
        series_description="inside",
    )
    outside = write_dicom_series(
        Volume(_hu((4, 12, 12), 1), axis_aligned_matrix((1.0, 1.0, 2.0))),
        tmp_path / "elsewhere",
        patient_id="PB",
        patient_name="Beta^B",
        series_description="outside",
    )
    db = make_database(tmp_path / "db", inside + outside)
    return tmp_path / "db", db, inside, outside


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_browse_files_and_load(two_series):
    folder, db_file, inside, outside = two_series
    names = sqlite3.connect(db_file).execute("SELECT Filename FROM Images").fetchall()
    assert any(not Path(n).is_absolute() for (n,) in names) and any(Path(n).is_absolute() for (n,) in names)
    db = DicomDatabase(folder)
    assert db.schema_version == "0.8.1" and db.path == db_file.resolve()
    patients = db.patients()
    assert [(p.patient_id, p.name, p.n_studies) for p in patients] == [("PA", "Alpha^A", 1), ("PB", "Beta^B", 1)]
    assert all(isinstance(p, PatientRecord) for p in patients)
    (study,) = db.studies(patients[0])
    assert isinstance(study, StudyRecord) and study.n_series == 1 and study.modalities == "CT"
    assert db.studies(patients[1].uid)[0].study_uid != study.study_uid and len(db.studies()) == 2
    (series,) = db.series(study)
    assert isinstance(series, SeriesRecord)
    assert (series.description, series.modality, series.n_images, series.number) == ("inside", "CT", 6, 1)
    assert db.series(study.study_uid) == [series] and len(db.ct_series()) == 2
    files = db.files(series.series_uid)
    assert all(p.is_absolute() for p in files) and sorted(files) == sorted(p.resolve() for p in inside)
    other = next(s for s in db.series() if s.description == "outside")
    assert sorted(db.files(other.series_uid)) == sorted(p.resolve() for p in outside)
    loaded = db.load(series.series_uid)
    reference = load_dicom_series(inside[0].parent)
    assert np.array_equal(loaded.array, reference.array) and np.allclose(loaded.ijk_to_ras, reference.ijk_to_ras)
    assert DicomDatabase(db_file).load(other.series_uid).shape == (4, 12, 12)  # the .sql file works too


def test_read_only_and_no_lock_held(two_series):
    folder, db_file, _, _ = two_series
    before, listing = _digest(db_file), sorted(p.name for p in folder.iterdir())
    mtime = db_file.stat().st_mtime_ns
    db = DicomDatabase(folder)
    with closing(sqlite3.connect(db_file, isolation_level=None)) as writer:
        writer.execute("BEGIN IMMEDIATE")  # Slicer writing: a RESERVED lock
        writer.execute("UPDATE Series SET SeriesDescription = 'renamed' WHERE SeriesDescription = 'inside'")
        assert len(db.patients()) == 2 and {s.description for s in db.series()} == {"inside", "outside"}
        writer.execute("ROLLBACK")
        for s in db.series():
            db.files(s.series_uid)
        writer.execute("BEGIN EXCLUSIVE")  # would time out if we still held a SHARED lock
        writer.execute("ROLLBACK")
    assert _digest(db_file) == before and db_file.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in folder.iterdir()) == listing  # no journal or WAL files left


def test_real_lidc_series_indexed_by_absolute_path(tmp_path):
    folders = [
        next(p.parent for p in data_path("lidc", name).rglob("*.dcm")) for name in ("LIDC-IDRI-0001", "LIDC-IDRI-0002")
    ]
    make_database(tmp_path / "db", [f for folder in folders for f in sorted(folder.glob("*.dcm"))], version="0.7.0")
    db = DicomDatabase(tmp_path / "db")
    assert [p.patient_id for p in db.patients()] == ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    with pytest.raises(AmbiguousSeriesError, match="2 CT series"):
        db.load_single_ct()
    for folder in folders:
        uid = folder.name
        assert np.array_equal(db.load(uid).array, load_dicom_series(folder).array)


def test_load_single_ct(two_series, tmp_path):
    _, _, inside, _ = two_series
    make_database(tmp_path / "one", inside)
    assert DicomDatabase(tmp_path / "one").load_single_ct().shape == (6, 16, 16)
    with pytest.raises(AmbiguousSeriesError):
        DicomDatabase(two_series[0]).load_single_ct()


def test_deleted_files_are_named(two_series):
    folder, db_file, inside, _ = two_series
    before = _digest(db_file)
    inside[2].unlink()
    db = DicomDatabase(folder)
    uid = pydicom.dcmread(inside[0], stop_before_pixels=True).SeriesInstanceUID
    with pytest.raises(DatabaseError, match=r"1 of 6 files .* missing") as err:
        db.load(uid)
    assert inside[2].name in str(err.value)
    shutil.rmtree(inside[0].parent)
    with pytest.raises(DatabaseError, match="6 of 6 files"):
        db.files(uid)
    with pytest.raises(NoSeriesFoundError, match="not in the database"):
        db.files("1.2.3.4")
    assert _digest(db_file) == before


def test_url_only_series(tmp_path):
    path = make_database(tmp_path / "db", [])
    with closing(sqlite3.connect(path)) as db, db:
        db.execute(
            "INSERT INTO Series (SeriesInstanceUID, StudyInstanceUID, Modality, InsertTimestamp) "
            "VALUES ('1.2.3', '1.2', 'CT', ?)",
            (STAMP,),
        )
        db.execute("INSERT INTO Images VALUES ('1.2.3.1', '', 'https://pacs/1.2.3.1', '1.2.3', ?, NULL)", (STAMP,))
    with pytest.raises(DatabaseError, match="no local files"):
        DicomDatabase(path).files("1.2.3")


def _sqlite(path: Path, script: str) -> None:
    with closing(sqlite3.connect(path)) as db:
        db.executescript(script)


def _without_filename(path: Path) -> None:
    make_database(path.parent, [])
    _sqlite(path, "DROP INDEX ImagesFilenameIndex; ALTER TABLE Images DROP COLUMN Filename;")


@pytest.mark.parametrize(
    "make, text",
    [
        (lambda p: p.write_bytes(b"SQLite format 2\x00" + bytes(2000)), "not an SQLite database"),
        (lambda p: p.write_bytes(bytes(range(256)) * 20), "not an SQLite database"),
        (lambda p: _sqlite(p, "CREATE TABLE notes (id INTEGER, text TEXT);"), "not a Slicer \\(CTK\\) DICOM database"),
        (lambda p: make_database(p.parent, [], version="2.0.0"), "schema version '2.0.0' is not supported"),
        (lambda p: make_database(p.parent, [], version="garbage"), "schema version 'garbage' is not supported"),
        (_without_filename, "table Images lacks column\\(s\\) Filename"),
    ],
)
def test_bad_databases(tmp_path, make, text):
    path = tmp_path / "db" / "ctkDICOM.sql"
    path.parent.mkdir()
    make(path)
    before = _digest(path)
    with pytest.raises(DatabaseError, match=text) as err:
        DicomDatabase(path.parent)
    assert str(path) in str(err.value)
    assert _digest(path) == before


def test_missing_paths(tmp_path):
    with pytest.raises(DatabaseError, match="no ctkDICOM.sql"):
        DicomDatabase(tmp_path)
    with pytest.raises(DatabaseError, match="no such file or folder"):
        DicomDatabase(tmp_path / "absent")


def _journal(db_file: Path, mode: str) -> None:
    """Set the database's journal mode (stored in the file: WAL stays after the connection closes)."""
    with closing(sqlite3.connect(db_file)) as db:
        assert db.execute(f"PRAGMA journal_mode={mode}").fetchone()[0] == mode


def _state(folder: Path) -> dict:
    return {p.name: _digest(p) for p in folder.iterdir() if p.is_file()}


@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_nothing_is_written_beside_the_database(two_series, mode):
    """Rollback-journal and write-ahead-log (WAL) databases alike: no -wal, -shm or journal file
    appears, no byte changes."""
    folder, db_file, inside, _ = two_series
    _journal(db_file, mode)
    before = _state(folder)
    db = DicomDatabase(folder)
    uid = next(s.series_uid for s in db.series() if s.description == "inside")
    assert len(db.patients()) == 2 and db.load(uid).shape == (6, 16, 16)
    assert _state(folder) == before


def test_wal_changes_not_yet_in_the_file_are_read(two_series):
    """While Slicer holds a WAL database open, its last changes are only in the -wal file."""
    folder, db_file, _, _ = two_series
    _journal(db_file, "wal")
    with closing(sqlite3.connect(db_file)) as slicer:
        slicer.execute("PRAGMA wal_autocheckpoint=0")
        slicer.execute("UPDATE Series SET SeriesDescription = 'renamed' WHERE SeriesDescription = 'inside'")
        slicer.commit()
        assert Path(f"{db_file}-wal").stat().st_size > 0
        assert {s.description for s in DicomDatabase(folder).series()} == {"renamed", "outside"}


#: Loads series argv 3 from the database argv 1 (so that every module is imported), then, as user
#: nobody when run as root and argv 4 is "nobody", from its read-only copy argv 2.
READ_COPY = """
import os, sys
from LungGradCAMLib.io.ctkdb import DicomDatabase
DicomDatabase(sys.argv[1]).load(sys.argv[3])
if os.geteuid() == 0 and sys.argv[4] == "nobody":
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
db = DicomDatabase(sys.argv[2])
print(len(db.patients()), db.load(sys.argv[3]).shape)
"""


@contextlib.contextmanager
def _read_only_copy(folder: Path, how: str):
    """A copy of the database folder that cannot be written: on a read-only mount (even root
    cannot write there), or with read-only permissions (in a folder every user can reach: root,
    who ignores permissions, reads it as user nobody). Yields (copy, a function like
    subprocess.run that runs a command there)."""
    with tempfile.TemporaryDirectory() as tmp:
        os.chmod(tmp, 0o755)
        copy = Path(tmp) / "media"
        shutil.copytree(folder, copy)
        if how == "mount":
            yield copy, lambda command, **kw: run_on_read_only_mount(copy, command, **kw)
            return
        for path in [copy, *copy.rglob("*")]:
            path.chmod(0o555 if path.is_dir() else 0o444)
        try:
            yield copy, lambda command, **kw: subprocess.run([str(c) for c in command], **kw)
        finally:
            for path in [copy, *copy.rglob("*")]:
                path.chmod(0o755 if path.is_dir() else 0o644)


@pytest.mark.parametrize("how", ["mount", "permissions"])
@pytest.mark.parametrize("mode", ["delete", "wal"])
def test_read_only_copy(two_series, mode, how):
    """The database folder on read-only media: it is read, nothing is written."""
    folder, db_file, inside, _ = two_series
    _journal(db_file, mode)
    uid = str(pydicom.dcmread(inside[0], stop_before_pixels=True).SeriesInstanceUID)
    with _read_only_copy(folder, how) as (copy, run):
        before = _state(copy)
        result = run(
            [sys.executable, "-c", READ_COPY, folder, copy, uid, "nobody" if how == "permissions" else "-"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert result.returncode == 0, result.stderr
        assert result.stdout.split("\n")[0] == "2 (6, 16, 16)"
        assert _state(copy) == before


#: CTK's DICOM schema 0.8.1 (Libs/DICOM/Core/Resources/dicom-schema.sql at the CTK commit Slicer 5.8.1
#: pins): each table's columns, in order, as CTK creates them.
CTK_0_8_1 = {
    "SchemaInfo": ["Version"],
    "Images": [
        "SOPInstanceUID",
        "Filename",
        "URL",
        "SeriesInstanceUID",
        "InsertTimestamp",
        "DisplayedFieldsUpdatedTimestamp",
    ],
    "Patients": [
        "UID",
        "PatientsName",
        "PatientID",
        "PatientsBirthDate",
        "PatientsBirthTime",
        "PatientsSex",
        "PatientsAge",
        "PatientsComments",
        "InsertTimestamp",
        "DisplayedPatientsName",
        "DisplayedNumberOfStudies",
        "DisplayedLastStudyDate",
        "DisplayedFieldsUpdatedTimestamp",
        "Connections",
    ],
    "Studies": [
        "StudyInstanceUID",
        "PatientsUID",
        "StudyID",
        "StudyDate",
        "StudyTime",
        "StudyDescription",
        "AccessionNumber",
        "ModalitiesInStudy",
        "InstitutionName",
        "ReferringPhysician",
        "PerformingPhysiciansName",
        "InsertTimestamp",
        "DisplayedNumberOfSeries",
        "DisplayedFieldsUpdatedTimestamp",
    ],
    "Series": [
        "SeriesInstanceUID",
        "StudyInstanceUID",
        "SeriesNumber",
        "SeriesDate",
        "SeriesTime",
        "SeriesDescription",
        "Modality",
        "BodyPartExamined",
        "FrameOfReferenceUID",
        "AcquisitionNumber",
        "ContrastAgent",
        "ScanningSequence",
        "EchoNumber",
        "TemporalPosition",
        "InsertTimestamp",
        "DisplayedCount",
        "DisplayedSize",
        "DisplayedNumberOfFrames",
        "DisplayedFieldsUpdatedTimestamp",
    ],
    "Directories": ["Dirname"],
    "ColumnDisplayProperties": ["TableName", "FieldName", "DisplayedName", "Visibility", "Weight", "Format"],
    "DisplayedFieldGeneratorRules": ["Name", "Enabled", "Options"],
}


def test_dicom_db_makes_a_slicer_database_from_a_folder(tmp_path, capsys):
    """`lunggradcam dicom-db FOLDER --out DB` (make_dicom_database): CTK's tables and columns, one row
    per patient, study, series and file, names relative inside the database folder and absolute
    outside; DicomDatabase and `run` read it; the DICOM files are untouched; never overwritten."""
    from LungGradCAMLib.cli import main

    inside = write_dicom_series(
        Volume(_hu((6, 16, 16), 0), axis_aligned_matrix((0.8, 0.8, 2.5))),
        tmp_path / "db" / "dicom",
        patient_id="LIDC-IDRI-0001",
        series_description="a",
    )
    outside = write_dicom_series(
        Volume(_hu((4, 12, 12), 1), axis_aligned_matrix((1.0, 1.0, 2.0))),
        tmp_path / "incoming" / "b",
        patient_id="LIDC-IDRI-0002",
        series_description="b",
    )
    (tmp_path / "incoming" / "notes.txt").write_text("not DICOM\n")
    before = {p: _digest(p) for p in inside + outside}
    (tmp_path / "empty").mkdir()
    assert main(["dicom-db", str(tmp_path / "empty"), "--out", str(tmp_path / "db")]) == 2
    assert "no DICOM image series found" in capsys.readouterr().err and not (tmp_path / "db" / "ctkDICOM.sql").exists()
    assert main(["dicom-db", str(tmp_path), "--out", str(tmp_path / "db")]) == 0
    out = capsys.readouterr().out
    assert f"10 file(s) of 2 series, 2 study(ies), 2 patient(s) indexed into {tmp_path / 'db' / 'ctkDICOM.sql'}" in out
    path = tmp_path / "db" / "ctkDICOM.sql"
    with closing(sqlite3.connect(path)) as db:
        tables = {t for (t,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")} - {"sqlite_sequence"}
        assert tables == set(CTK_0_8_1)
        for table, columns in CTK_0_8_1.items():
            assert [row[1] for row in db.execute(f"PRAGMA table_info('{table}')")] == columns, table
        assert db.execute("SELECT Version FROM SchemaInfo").fetchall() == [("0.8.1",)]
        names = sorted(n for (n,) in db.execute("SELECT Filename FROM Images"))
    assert names[:4] == sorted(str(p.resolve()) for p in outside)  # outside the database folder: absolute
    assert names[4:] == sorted(p.relative_to(tmp_path / "db").as_posix() for p in inside)
    db = DicomDatabase(tmp_path / "db")
    assert sorted(p.patient_id for p in db.patients()) == ["LIDC-IDRI-0001", "LIDC-IDRI-0002"]
    for series, files in zip(sorted(db.ct_series(), key=lambda s: s.description), (inside, outside)):
        assert np.array_equal(db.load(series.series_uid).array, load_dicom_series(files[0].parent).array)
    assert {p: _digest(p) for p in inside + outside} == before
    # the ambiguous-series message tells the two patients' series apart by patient and folder
    with pytest.raises(AmbiguousSeriesError, match="patient 'LIDC-IDRI-0002'  in " + str(tmp_path / "incoming" / "b")):
        db.load_single_ct()
    stamp = _digest(path)
    assert main(["dicom-db", str(tmp_path / "incoming"), "--out", str(tmp_path / "db")]) == 2
    assert "exists; LungGradCAM never overwrites a database" in capsys.readouterr().err and _digest(path) == stamp
