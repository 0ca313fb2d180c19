"""The bad-input corpus: damaged, unusable and odd inputs a hospital folder can hold, generated here
(no patient data is committed).

For every failing case:
  (a) the library call raises its specific :class:`LungGradCAMError` subclass with a message that
      names the problem and the file, folder or series;
  (b) ``lunggradcam run INPUT --out OUT`` returns 2, prints that message on stderr without a
      traceback and leaves no output (OUT is not created);
  (c) every file of the input is byte-identical afterwards (and no file appears or disappears).
Inputs the loader accepts by design (gantry tilt, non-DICOM files or a named pipe beside the
series) give the correct volume, and ``lunggradcam run`` completes on the tilted series.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
import warnings
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

import LungGradCAMLib as lgc
from LungGradCAMLib import phantom
from LungGradCAMLib.cli import main
from LungGradCAMLib.io.ctkdb import DicomDatabase
from LungGradCAMLib.io.dicom import DicomResampledWarning, load_dicom_series
from LungGradCAMLib.io.dicom_write import write_dicom_series
from LungGradCAMLib.core.errors import (AmbiguousSeriesError, DatabaseError, DicomDecodeError, InvalidInputError,
                                        LungGradCAMError, NoSeriesFoundError, ResourceError, SeriesGeometryError, VolumeError)
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.io.volume_files import read_volume, write_volume
from LungGradCAMLib.engine.models import ModelCard, build_model
from LungGradCAMLib.io.inputs import load_input

from helpers import REPO, run_on_read_only_mount
from helpers import snapshot as _snapshot
from dicom_damage import drop_pixels, edit, short_pixels, truncate, truncate_header
from helpers import make_database
from helpers import make_tiny_model

AXIAL = axis_aligned_matrix((0.8, 0.8, 2.5), (-10.0, 20.0, -40.0))
CORONAL = axis_aligned_matrix((0.8, 2.5, 0.8), (0.0, 0.0, 0.0),
                              np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]))


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------
def _hu(shape=(4, 16, 16), seed=0) -> np.ndarray:
    return np.rint(np.random.default_rng(seed).normal(-300, 300, shape)).clip(-1000, 2000).astype(np.float32)


def _series(folder: Path, shape=(4, 16, 16), seed=0, matrix=AXIAL, **kwargs) -> List[Path]:
    return write_dicom_series(Volume(_hu(shape, seed), matrix), folder, **kwargs)


def _uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SeriesInstanceUID)


@dataclass
class Made:
    """A built bad input: what ``lunggradcam run`` gets, the library call that must fail (or
    succeed), and strings (file, folder, series) the message must contain."""

    input: Path
    call: Callable[[], Any]
    names: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)


@dataclass
class Case:
    make: Callable[[Path], Made]
    error: type
    text: str  # regular expression the message must match


# --------------------------------------------------------------------------------------------
# the failing cases
# --------------------------------------------------------------------------------------------
def _one_bad_file(change: Callable[[Path], None]) -> Callable[[Path], Made]:
    """A 4-slice series whose second file is damaged by ``change``; the message names that file."""
    def make(root: Path) -> Made:
        files = _series(root)
        change(files[1])
        return Made(root, lambda: load_dicom_series(root), [str(files[1])])
    return make


def _every_file(change: Callable[[Path], None]) -> Callable[[Path], Made]:
    def make(root: Path) -> Made:
        files = _series(root)
        for f in files:
            change(f)
        return Made(root, lambda: load_dicom_series(root), [str(files[0])])
    return make


def _mpeg2(f: Path) -> None:
    def change(ds):
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML  # video: no pixel decoder for it
        ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + bytes(60)])
        ds["PixelData"].VR = "OB"
    edit(f, change)


def _garbage(f: Path) -> None:
    f.write_bytes(bytes(128) + b"DICM" + bytes(range(256)) * 2)


def _no_position(f: Path) -> None:
    edit(f, lambda ds: delattr(ds, "ImagePositionPatient"))


def _parallel_cosines(f: Path) -> None:
    edit(f, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]))


def _nan_slope(f: Path) -> None:
    edit(f, lambda ds: setattr(ds, "RescaleSlope", "NaN"))


def _non_ct_only(root: Path) -> Made:
    files = _series(root)
    for f in files:
        edit(f, lambda ds: setattr(ds, "Modality", "MR"))
    return Made(root, lambda: load_dicom_series(root), [str(root), _uid(files[0]), "MR"])


def _single_slice(root: Path) -> Made:
    files = _series(root, shape=(1, 16, 16))
    return Made(root, lambda: load_dicom_series(root), [str(files[0]), _uid(files[0])])


def _duplicate_positions(root: Path) -> Made:
    files = _series(root)

    def other_pixels(ds):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PixelData = (ds.pixel_array + 7).astype("<i2").tobytes()
    copy = edit(files[2], other_pixels, root / "rescan.dcm")
    return Made(root, lambda: load_dicom_series(root), [str(files[2]), str(copy), _uid(files[0])])


def _gap(root: Path) -> Made:
    files = _series(root, shape=(12, 8, 8))
    for f in files[3:8]:
        f.unlink()
    return Made(root, lambda: load_dicom_series(root), [_uid(files[0]), files[2].name, files[8].name])


def _mixed_orientations(root: Path) -> Made:
    uid = generate_uid()
    _series(root / "axial", series_uid=uid)
    _series(root / "coronal", shape=(3, 16, 16), seed=1, matrix=CORONAL, series_uid=uid)
    return Made(root, lambda: load_dicom_series(root), [f"{uid}#1", f"{uid}#2"])


def _two_ct_series(root: Path) -> Made:
    # two patients' CTs in one tree: each series is named with its patient and folder
    a = _series(root / "a", series_description="lung kernel", patient_id="LIDC-IDRI-0001")
    b = _series(root / "b", shape=(5, 16, 16), seed=1, series_description="soft kernel", patient_id="LIDC-IDRI-0002")
    return Made(root, lambda: load_dicom_series(root), [_uid(a[0]), _uid(b[0]), "lung kernel", "soft kernel",
                                                         f"patient 'LIDC-IDRI-0001'  in {root / 'a'}",
                                                         f"patient 'LIDC-IDRI-0002'  in {root / 'b'}"])


def _empty_folder(root: Path) -> Made:
    root.mkdir(parents=True)
    return Made(root, lambda: load_dicom_series(root), [str(root)])


def _only_non_dicom(root: Path) -> Made:
    root.mkdir(parents=True)
    (root / "README.txt").write_text("scan notes\n")
    (root / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return Made(root, lambda: load_dicom_series(root), [str(root)])


def _not_a_volume_file(root: Path) -> Made:
    root.mkdir(parents=True)
    path = root / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return Made(path, lambda: load_input(path), [str(path)])


def _unreadable_chmod(root: Path) -> Made:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading (see unreadable_symlink_loop)")
    files = _series(root)
    files[1].chmod(0)
    return Made(root, lambda: load_dicom_series(root), [str(files[1])])


def _unreadable_symlink_loop(root: Path) -> Made:
    """A file that nobody, root included, can open: a symbolic link to itself (ELOOP)."""
    _series(root)
    loop = root / "IMG99999.dcm"
    os.symlink(loop.name, loop)
    return Made(root, lambda: load_dicom_series(root), [str(loop)])


def _dicom_over_voxel_limit(root: Path) -> Made:
    files = _series(root)
    return Made(root, lambda: load_dicom_series(root), [_uid(files[0])], env={"LUNGGRADCAM_MAX_VOXELS": "1000"})


def _dicom_declares_huge_slices(root: Path) -> Made:
    """Every header claims 65535 x 65535 pixels: refused from the headers, nothing allocated."""
    files = _series(root)
    for f in files:
        edit(f, lambda ds: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535)))
    return Made(root, lambda: load_dicom_series(root), [_uid(files[0])])


def _zero_rows(root: Path) -> Made:
    files = _series(root)
    for f in files:
        edit(f, lambda ds: setattr(ds, "Rows", 0))
    return Made(root, lambda: load_dicom_series(root), [str(files[0])])


def _absurd_frame_count(root: Path) -> Made:
    """One 16x16 image whose header declares 20000 frames (8 KB of pixel data for 512 bytes)."""
    root.mkdir(parents=True)
    f = _series(root, shape=(2, 16, 16))[0]
    (root / "IMG00001.dcm").unlink()
    edit(f, lambda ds: setattr(ds, "NumberOfFrames", 20000))
    return Made(root, lambda: load_dicom_series(root), [str(f)])


def _nrrd(root: Path, name: str, array: np.ndarray) -> Path:
    root.mkdir(parents=True)
    return write_volume(Volume(array, AXIAL), root / name)


def _nrrd_nan_inf(root: Path) -> Made:
    array = _hu()
    array[1, 2, 3], array[2, 3, 4] = np.nan, np.inf
    path = _nrrd(root, "ct.nrrd", array)
    return Made(path, lambda: read_volume(path), [str(path), "2 voxels"])


def _nrrd_over_voxel_limit(root: Path) -> Made:
    path = _nrrd(root, "ct.nrrd", _hu())
    return Made(path, lambda: read_volume(path), [str(path)], env={"LUNGGRADCAM_MAX_VOXELS": "1000"})


NRRD_HEADER = ("NRRD0004\ntype: short\ndimension: {dim}\nspace: left-posterior-superior\nsizes: {sizes}\n"
               "space directions: {dirs}\nendian: little\nencoding: raw\nspace origin: ({origin})\n\n")


def _nrrd_huge_header(root: Path) -> Made:
    """A 300-byte file whose header declares 4000^3 voxels: refused before allocating 128 GB."""
    root.mkdir(parents=True)
    path = root / "huge.nrrd"
    path.write_bytes(NRRD_HEADER.format(dim=3, sizes="4000 4000 4000", dirs="(1,0,0) (0,1,0) (0,0,1)",
                                        origin="0,0,0").encode() + bytes(100))
    return Made(path, lambda: read_volume(path), [str(path), "64000000000 voxels"])


def _nrrd_truncated_data(root: Path) -> Made:
    root.mkdir(parents=True)
    path = root / "short.nrrd"
    path.write_bytes(NRRD_HEADER.format(dim=3, sizes="10 10 10", dirs="(1,0,0) (0,1,0) (0,0,1)",
                                        origin="0,0,0").encode() + bytes(100))
    return Made(path, lambda: read_volume(path), [str(path)])


def _nrrd_2d(root: Path) -> Made:
    root.mkdir(parents=True)
    path = root / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(_hu()[0].astype(np.int16)), str(path))
    return Made(path, lambda: read_volume(path), [str(path)])


def _corrupt_sqlite(root: Path) -> Made:
    root.mkdir(parents=True)
    path = root / "ctkDICOM.sql"
    _series(root / "dicom")
    make_database(root, sorted((root / "dicom").iterdir()))
    data = bytearray(path.read_bytes())
    data[16:100] = bytes(range(84))  # page size, format numbers and counters overwritten
    path.write_bytes(bytes(data))
    return Made(path, lambda: DicomDatabase(path), [str(path)])


def _foreign_sqlite(root: Path) -> Made:
    root.mkdir(parents=True)
    path = root / "ctkDICOM.sql"
    with closing(sqlite3.connect(path)) as db, db:
        db.executescript("CREATE TABLE bookmarks (id INTEGER PRIMARY KEY, url TEXT);"
                         "INSERT INTO bookmarks (url) VALUES ('https://example.org');")
    return Made(root, lambda: DicomDatabase(root), [str(path), "Patients", "Images"])


def _database_files_deleted(root: Path) -> Made:
    files = _series(root / "dicom" / "s1")
    make_database(root, files)
    uid = _uid(files[0])
    files[1].unlink()
    files[3].unlink()
    return Made(root, lambda: DicomDatabase(root).load(uid), [uid, str(files[1]), str(files[3]), "2 of 4 files"])


#: Bytes of a file that a hostile header points at: they must never appear in a message.
SECRET = b"TOPSECRET-" * 205  # 2050 bytes: a little more than the 4 x 16 x 16 shorts the headers below declare


def _nrrd_pointing(value: str, beside: bool = False) -> Callable[[Path], Made]:
    """A detached NRRD header ``sub/ct.nhdr`` whose ``data file:`` is ``value`` (formatted with
    {root}); ``root/secret.raw`` holds SECRET, and with ``beside`` so does ``sub/data.raw``, a
    link to it."""
    def make(root: Path) -> Made:
        (root / "sub").mkdir(parents=True)
        (root / "secret.raw").write_bytes(SECRET)
        if beside:
            os.symlink(root / "secret.raw", root / "sub" / "data.raw")
        path = root / "sub" / "ct.nhdr"
        header = NRRD_HEADER.format(dim=3, sizes="16 16 4", dirs="(1,0,0) (0,1,0) (0,0,1)", origin="0,0,0")
        path.write_text(header.rstrip("\n") + f"\ndata file: {value.format(root=root)}\n\n")
        return Made(path, lambda: read_volume(path), [str(path), value.format(root=root).split()[0]])
    return make


def _mhd_pointing_elsewhere(root: Path) -> Made:
    (root / "sub").mkdir(parents=True)
    (root / "secret.raw").write_bytes(SECRET)
    path = root / "sub" / "ct.mhd"
    path.write_text("ObjectType = Image\nNDims = 3\nDimSize = 16 16 4\nElementSpacing = 1 1 1\n"
                    "ElementType = MET_SHORT\nElementDataFile = ../secret.raw\n")
    return Made(path, lambda: read_volume(path), [str(path), "../secret.raw"])


def _nifti(root: Path, name: str, array: np.ndarray, patch: Dict[int, tuple] = ()) -> Path:
    """``array`` as NIfTI-1 (float32, 1 x 1 x 2.5 mm), then ``patch``: header byte offset ->
    (struct format, value) written over the raw header."""
    import gzip
    import struct

    root.mkdir(parents=True)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 2.5))
    path = root / name
    sitk.WriteImage(image, str(root / "plain.nii"))
    raw = bytearray((root / "plain.nii").read_bytes())
    (root / "plain.nii").unlink()
    for offset, (fmt, value) in dict(patch).items():
        raw[offset:offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
    return path


def _nifti_nan_inf(root: Path) -> Made:
    array = _hu()
    array[1, 2, 3], array[3, 15, 0] = np.nan, -np.inf  # NIfTI's reader would make them 0 HU
    path = _nifti(root, "ct.nii.gz", array)
    return Made(path, lambda: read_volume(path), [str(path), "2 voxels", "i, j, k = 3, 2, 1"])


def _nifti_header(offset: int, value: float, shown: str) -> Callable[[Path], Made]:
    def make(root: Path) -> Made:
        path = _nifti(root, "ct.nii", _hu(), {offset: ("<f", value)})
        return Made(path, lambda: read_volume(path), [str(path), shown])
    return make


def _volume_with(matrix: np.ndarray) -> Callable[[Path], Made]:
    def make(root: Path) -> Made:
        root.mkdir(parents=True)
        image = Volume(_hu(), np.eye(4)).to_sitk()
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix
        image.SetSpacing([float(v) for v in np.linalg.norm(lps[:3, :3], axis=0)])
        image.SetOrigin([float(v) for v in lps[:3, 3]])
        path = root / "ct.nrrd"
        sitk.WriteImage(image, str(path))
        return Made(path, lambda: read_volume(path), [str(path)])
    return make


def _dicom_huge_pixel_spacing(root: Path) -> Made:
    files = _series(root)
    for f in files:
        edit(f, lambda ds: setattr(ds, "PixelSpacing", [1e30, 1e30]))
    return Made(root, lambda: load_dicom_series(root), [str(files[0])])


def _nrrd_over_byte_limit(root: Path) -> Made:
    path = _nrrd(root, "ct.nrrd", _hu())
    return Made(path, lambda: read_volume(path), [str(path)], env={"LUNGGRADCAM_MAX_BYTES": "1000"})


CASES: Dict[str, Case] = {
    "truncated_file": Case(_one_bad_file(truncate), DicomDecodeError, "truncated"),
    "truncated_header": Case(_one_bad_file(truncate_header), DicomDecodeError, "truncated or damaged"),
    "missing_pixel_data": Case(_one_bad_file(drop_pixels), DicomDecodeError, "without Pixel Data"),
    "pixel_data_short": Case(_one_bad_file(short_pixels), DicomDecodeError,
                             "Pixel Data holds 256 bytes but .*16x16 .*need 512"),
    "transfer_syntax_without_decoder": Case(_one_bad_file(_mpeg2), DicomDecodeError,
                                            "no decoder available for transfer syntax .*MPEG2"),
    "garbage_after_dicm": Case(_one_bad_file(_garbage), DicomDecodeError, "unreadable DICOM"),
    "missing_position": Case(_one_bad_file(_no_position), SeriesGeometryError, "lacks ImagePositionPatient"),
    "invalid_orientation": Case(_every_file(_parallel_cosines), SeriesGeometryError,
                                "invalid ImageOrientationPatient"),
    "non_ct_modality_only": Case(_non_ct_only, NoSeriesFoundError, "no CT series"),
    "single_slice": Case(_single_slice, SeriesGeometryError, "single slice"),
    "duplicate_positions_different_pixels": Case(_duplicate_positions, SeriesGeometryError,
                                                 "same position .* different pixels"),
    "gap_of_many_slices": Case(_gap, SeriesGeometryError, "about 5 slices are missing.*max_gap_slices=2"),
    "mixed_orientations": Case(_mixed_orientations, SeriesGeometryError, "mixes slices of different orientation"),
    "two_ct_series": Case(_two_ct_series, AmbiguousSeriesError, "2 CT series found; pick one"),
    "empty_folder": Case(_empty_folder, NoSeriesFoundError, "no DICOM images found"),
    "only_non_dicom_files": Case(_only_non_dicom, NoSeriesFoundError, "no DICOM images found"),
    "not_a_volume_file": Case(_not_a_volume_file, NoSeriesFoundError, "no DICOM images found"),
    "unreadable_chmod_000": Case(_unreadable_chmod, DicomDecodeError, "cannot read the file"),
    "unreadable_symlink_loop": Case(_unreadable_symlink_loop, DicomDecodeError, "cannot read the file"),
    "dicom_over_voxel_limit": Case(_dicom_over_voxel_limit, VolumeError, "1024 voxels exceeds the limit of 1000"),
    "dicom_declares_huge_slices": Case(_dicom_declares_huge_slices, VolumeError, "voxels exceeds the limit"),
    "nrrd_nan_inf": Case(_nrrd_nan_inf, VolumeError, "NaN or infinite"),
    "nrrd_over_voxel_limit": Case(_nrrd_over_voxel_limit, VolumeError, "1024 voxels exceeds the limit of 1000"),
    "nrrd_header_declares_huge_volume": Case(_nrrd_huge_header, VolumeError, "exceeds the limit"),
    "nrrd_truncated_data": Case(_nrrd_truncated_data, VolumeError, "cannot read the volume"),
    "nrrd_2d_image": Case(_nrrd_2d, VolumeError, "expected a 3D image, got 2D"),
    "corrupt_sqlite_database": Case(_corrupt_sqlite, DatabaseError, "not an SQLite database"),
    "foreign_sqlite_database": Case(_foreign_sqlite, DatabaseError, "not a Slicer \\(CTK\\) DICOM database"),
    "database_files_deleted": Case(_database_files_deleted, DatabaseError, "files of series .* are missing"),
    "zero_rows": Case(_zero_rows, DicomDecodeError, "Rows x Columns is 0 x 16"),
    "nan_rescale_slope": Case(_one_bad_file(_nan_slope), DicomDecodeError, "RescaleSlope nan .* not finite"),
    # a damaged slice is named, not split off as a stack of its own and replaced by interpolation
    "one_slice_with_invalid_orientation": Case(_one_bad_file(_parallel_cosines), SeriesGeometryError,
                                               "invalid ImageOrientationPatient"),
    # refused from the header: one record per declared frame would let 2**31 frames exhaust memory
    "absurd_number_of_frames": Case(_absurd_frame_count, DicomDecodeError, "declares 20000 frames"),
    # headers that point elsewhere: only one regular data file beside the header is read
    "nrrd_data_file_outside_its_folder": Case(_nrrd_pointing("../secret.raw"), VolumeError, "not beside the header"),
    "nrrd_data_file_absolute": Case(_nrrd_pointing("{root}/secret.raw"), VolumeError, "not beside the header"),
    "nrrd_data_file_is_a_link_out": Case(_nrrd_pointing("data.raw", beside=True), VolumeError,
                                         "not beside the header"),
    "nrrd_data_file_is_a_device": Case(_nrrd_pointing("/dev/zero"), VolumeError, "not beside the header"),
    "nrrd_data_file_list": Case(_nrrd_pointing("LIST"), VolumeError, "lists or numbered patterns"),
    "mhd_data_file_outside_its_folder": Case(_mhd_pointing_elsewhere, VolumeError, "not beside the header"),
    # silent data changes: refused, naming the file
    "nifti_nan_inf_voxels": Case(_nifti_nan_inf, VolumeError, "NaN or infinite"),
    "nifti_pixdim_zero": Case(_nifti_header(80, 0.0, "pixdim"), VolumeError, "voxel size pixdim = \\[0.0, 1.0, 2.5\\]"),
    "nifti_pixdim_nan": Case(_nifti_header(88, float("nan"), "pixdim"), VolumeError, "voxel size pixdim .*nan"),
    "nifti_scl_slope_nan": Case(_nifti_header(112, float("nan"), "scl_slope"), VolumeError, "is not finite"),
    "nrrd_spacing_1e30": Case(_volume_with(axis_aligned_matrix((1e30, 1, 2.5))), VolumeError,
                              "voxel spacing .* outside"),
    "nrrd_origin_1e30": Case(_volume_with(axis_aligned_matrix((1, 1, 2.5), (1e30, 0, 0))), VolumeError,
                             "origin .* more than"),
    "dicom_pixel_spacing_1e30": Case(_dicom_huge_pixel_spacing, SeriesGeometryError, "PixelSpacing"),
    # the memory limit, set low: the message names it and how to change it
    "nrrd_over_byte_limit": Case(_nrrd_over_byte_limit, ResourceError, "more than the limit LUNGGRADCAM_MAX_BYTES"),
}


# --------------------------------------------------------------------------------------------
# the tests
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A whole-volume tiny model (one pass over the CT at 8 mm): fast on CPU."""
    return make_tiny_model(tmp_path_factory.mktemp("model"), name="whole", patch=None, spacing=(8.0, 8.0, 8.0))


def _build(case: Case, tmp_path: Path, monkeypatch) -> Made:
    made = case.make(tmp_path / "in")
    for key, value in made.env.items():
        monkeypatch.setenv(key, value)
    return made


@pytest.mark.parametrize("name", list(CASES))
def test_library_raises_specific_error_naming_the_input(name, tmp_path, monkeypatch):
    case = CASES[name]
    made = _build(case, tmp_path, monkeypatch)
    before = _snapshot(tmp_path / "in")
    with pytest.raises(case.error, match=case.text) as err:
        made.call()
    assert isinstance(err.value, LungGradCAMError)
    for text in made.names:
        assert text in str(err.value), f"{text!r} not named in: {err.value}"
    assert "TOPSECRET" not in str(err.value)
    assert _snapshot(tmp_path / "in") == before


@pytest.mark.parametrize("name", list(CASES))
def test_cli_exits_2_with_the_message_and_writes_nothing(name, tmp_path, monkeypatch, capsys, tiny):
    case = CASES[name]
    made = _build(case, tmp_path, monkeypatch)
    before = _snapshot(tmp_path / "in")
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:  # one message, no RuntimeWarning beside it
        warnings.simplefilter("always")
        code = main(["run", str(made.input), "--out", str(out), "--model", str(tiny), "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 2, captured.err
    assert "Traceback" not in captured.err + captured.out and "TOPSECRET" not in captured.err
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    assert captured.err.startswith("lunggradcam run: error: ")
    with pytest.raises(case.error) as err:  # the library's own message reaches the user, whole
        made.call()
    assert str(err.value) in captured.err
    assert not out.exists(), sorted(p.name for p in out.rglob("*"))
    assert _snapshot(tmp_path / "in") == before


# --------------------------------------------------------------------------------------------
# inputs that are accepted by design: the result is correct
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def chest():
    return phantom.chest_ct(seed=3, shape=(28, 64, 64), spacing_mm=(4.5, 4.5, 8.0)).volume


def _expected(volume: Volume) -> np.ndarray:
    """HU as stored (int16 with intercept -1024) and read back (air floor -1024)."""
    return np.maximum(np.rint(volume.array.astype(np.float64)), -1024).astype(np.float32)


def _tilt(root: Path, chest: Volume):
    """Gantry tilt: slice k drifts k/4 pixel along the column direction. Documented behaviour:
    resampled onto the slice normal with a DicomResampledWarning; slice k = source slice k shifted
    by k/4 rows (air where the shift leaves the field of view)."""
    files = phantom.write_dicom_series(chest, root)
    step = 0.25 * chest.spacing[1]
    for k, f in enumerate(files):
        def drift(ds, k=k):
            ipp = [float(v) for v in ds.ImagePositionPatient]
            col = [float(v) for v in ds.ImageOrientationPatient[3:]]
            ds.ImagePositionPatient = [f"{p + k * step * c:.6f}" for p, c in zip(ipp, col)]
        edit(f, drift)

    def check(volume: Volume) -> None:
        assert "gantry tilt of 8.0 degrees" in volume.meta["resampled"]
        assert volume.shape == chest.shape and np.allclose(volume.ijk_to_ras, chest.ijk_to_ras, atol=1e-4)
        expected = _expected(chest)
        for k in (0, 4, 8, 20):  # shifts of 0, 1, 2 and 5 whole rows: exact
            s = k // 4
            assert np.allclose(volume.array[k, s:], expected[k, :expected.shape[1] - s], atol=1e-3)
            assert np.all(volume.array[k, :s] == -1024)
    return check


def _non_dicom_beside(root: Path, chest: Volume):
    files = phantom.write_dicom_series(chest, root / "series", shuffle_names=True)
    (root / "README.txt").write_text("exported from PACS\n")
    (root / "series" / "notes.json").write_text('{"reader": "x"}')
    (root / "series" / "thumb.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(200))
    (root / "series" / "empty.dcm").write_bytes(b"")
    (root / "series" / "folder.dcm").mkdir()  # a folder named like a DICOM file
    (root / "DICOMDIR").write_bytes(files[0].read_bytes())  # skipped by name
    return _same_as(chest)


def _named_pipe_beside(root: Path, chest: Volume):
    """A FIFO named like a slice: opening it would block forever; it is skipped."""
    phantom.write_dicom_series(chest, root)
    os.mkfifo(root / "IMG99999.dcm")
    return _same_as(chest)


def _socket_beside(root: Path, chest: Volume):
    """A Unix socket named like a slice (a live one: bound, not listening): skipped like a FIFO."""
    import socket

    phantom.write_dicom_series(chest, root)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(root / "IMG99998.dcm"))  # the socket file stays after close
    server.close()
    return _same_as(chest)


def _same_as(chest: Volume):
    def check(volume: Volume) -> None:
        assert np.array_equal(volume.array, _expected(chest))
        assert np.allclose(volume.ijk_to_ras, chest.ijk_to_ras, atol=1e-6)
    return check


OK_CASES = {"gantry_tilt": _tilt, "non_dicom_files_beside": _non_dicom_beside,
            "named_pipe_beside": _named_pipe_beside, "unix_socket_beside": _socket_beside}


def _within(seconds: float, fn: Callable[[], Any], root: Path) -> Any:
    """``fn()`` in a thread; if it has not returned after ``seconds``, open every FIFO under ``root``
    for writing (which releases a reader blocked on it) and fail."""
    result: dict = {}

    def target():
        try:
            result["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the caller
            result["error"] = exc
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        for p in root.rglob("*"):
            if p.is_fifo():
                os.close(os.open(p, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(30)
        pytest.fail(f"blocked for more than {seconds} s")
    if "error" in result:
        raise result["error"]
    return result["value"]


@pytest.mark.parametrize("name", list(OK_CASES))
def test_accepted_inputs_give_the_correct_volume(name, tmp_path, chest, tiny, capsys):
    root = tmp_path / "in"
    check = OK_CASES[name](root, chest)
    before = _snapshot(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = _within(60, lambda: load_dicom_series(root), root)
    check(volume)
    resampled = [w for w in caught if issubclass(w.category, DicomResampledWarning)]
    assert bool(resampled) == (name == "gantry_tilt")
    if name != "gantry_tilt":  # the others load exactly the clean series: one end-to-end run is enough
        assert _snapshot(root) == before
        return

    out = tmp_path / "out"
    code = _within(120, lambda: main(["run", str(root), "--out", str(out), "--model", str(tiny),
                                      "--device", "cpu"]), root)
    assert code == 0, capsys.readouterr().err
    assert {"report.json", "cam.nrrd", "segmentation.seg.nrrd", "lungs.seg.nrrd"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob(".tmp-*"))
    cam = read_volume(out / "cam.nrrd")
    assert lgc.same_geometry(cam, volume, atol_mm=1e-6)
    assert _snapshot(root) == before


# --------------------------------------------------------------------------------------------
# a FIFO, a device or /dev/stdin where a file is expected: refused at once, never opened to read
# --------------------------------------------------------------------------------------------
def _fifo(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    os.mkfifo(path)
    return path


def _fifo_ct(root: Path) -> Made:
    path = _fifo(root / "ct.nrrd")
    return Made(path, lambda: read_volume(path), [str(path), "named pipe"])


def _fifo_ct_without_suffix(root: Path) -> Made:
    path = _fifo(root / "ct")
    return Made(path, lambda: load_input(path), [str(path), "named pipe"])


def _fifo_data_file(root: Path) -> Made:
    _fifo(root / "data.raw")
    path = root / "ct.nhdr"
    header = NRRD_HEADER.format(dim=3, sizes="16 16 4", dirs="(1,0,0) (0,1,0) (0,0,1)", origin="0,0,0")
    path.write_text(header.rstrip("\n") + "\ndata file: data.raw\n\n")
    return Made(path, lambda: read_volume(path), [str(path), "data.raw", "named pipe"])


def _database_file_is_fifo(root: Path) -> Made:
    files = _series(root / "dicom")
    make_database(root, files)
    files[2].unlink()
    _fifo(files[2])
    uid = _uid(files[0])
    return Made(root, lambda: DicomDatabase(root).load(uid), [str(files[2]), "named pipe"])


SPECIAL = {
    "fifo_as_the_ct": Case(_fifo_ct, VolumeError, "named pipe"),
    "fifo_as_the_ct_without_suffix": Case(_fifo_ct_without_suffix, InvalidInputError, "named pipe"),
    "fifo_as_detached_data": Case(_fifo_data_file, VolumeError, "named pipe"),
    "fifo_in_the_dicom_database": Case(_database_file_is_fifo, DicomDecodeError, "not a regular file"),
}


@pytest.mark.parametrize("name", list(SPECIAL))
def test_special_files_are_refused_without_blocking(name, tmp_path, capsys, tiny):
    case = SPECIAL[name]
    made = case.make(tmp_path / "in")
    with pytest.raises(case.error, match=case.text) as err:
        _within(60, made.call, tmp_path)
    for text in made.names:
        assert text in str(err.value)
    out = tmp_path / "out"
    code = _within(60, lambda: main(["run", str(made.input), "--out", str(out), "--model", str(tiny),
                                     "--device", "cpu"]), tmp_path)
    cli_err = capsys.readouterr().err
    assert code == 2 and all(text in cli_err for text in made.names), cli_err
    assert not out.exists()


def test_dev_stdin_as_the_ct_is_refused(tmp_path, tiny):
    """stdin a pipe that nobody writes to: reading it would wait forever."""
    proc = subprocess.Popen([sys.executable, "-m", "LungGradCAMLib.cli", "run", "/dev/stdin", "--out",
                             str(tmp_path / "out"), "--model", str(tiny), "--device", "cpu"],
                            cwd=REPO, stdin=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 2 and "/dev/stdin is a named pipe" in err and "Traceback" not in err, err
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------------------
# the output folder: never the input, never another's files, owned by one run, whole or untouched
# --------------------------------------------------------------------------------------------
def _run(ct: Path, out: Path, model: Path, *extra: str, command: str = "run") -> int:
    """``lunggradcam run`` in this process; an option argparse refuses gives its exit status."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            code = main([command, str(ct), "--out", str(out), "--model", str(model), "--device", "cpu", *extra])
        except SystemExit as exc:
            code = exc.code
    assert not [w for w in caught if issubclass(w.category, RuntimeWarning)], [str(w.message) for w in caught]
    return code


def _complete(out: Path) -> dict:
    """``out`` holds exactly the files its report lists, the report and the marker, nothing else; the report."""
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in JSON"))
    assert {p.name for p in out.iterdir()} == set(report["files"]) | {"report.json", ".lunggradcam.json"}
    return report


def _ct_named_like_an_output(tmp: Path, chest: Volume):
    return write_volume(chest, tmp / "out" / "cam.nrrd"), tmp / "out", "holds the input"


def _out_is_the_dicom_folder(tmp: Path, chest: Volume):
    phantom.write_dicom_series(chest, tmp / "dicom")
    return tmp / "dicom", tmp / "dicom", "is the input"


def _out_links_to_the_inputs_folder(tmp: Path, chest: Volume):
    ct = write_volume(chest, tmp / "data" / "ct.nrrd")
    os.symlink(tmp / "data", tmp / "out")
    return ct, tmp / "out", "holds the input"


def _input_links_into_out(tmp: Path, chest: Volume):
    write_volume(chest, tmp / "out" / "scan.nrrd")
    os.symlink(tmp / "out" / "scan.nrrd", tmp / "ct.nrrd")
    return tmp / "ct.nrrd", tmp / "out", "holds the input"


def _foreign_file_in_out(tmp: Path, chest: Volume):
    (tmp / "out").mkdir()
    (tmp / "out" / "overlay.png").write_bytes(b"the user's own picture")
    return write_volume(chest, tmp / "ct.nrrd"), tmp / "out", "1 file\\(s\\) that no LungGradCAM run wrote"


OUT_CASES = {"ct_named_like_an_output": _ct_named_like_an_output, "out_is_the_dicom_folder": _out_is_the_dicom_folder,
             "out_links_to_the_inputs_folder": _out_links_to_the_inputs_folder,
             "input_links_into_out": _input_links_into_out, "foreign_file_in_out": _foreign_file_in_out}


@pytest.mark.parametrize("name, command", [(name, "run") for name in OUT_CASES] + [
    (name, "batch") for name in ("out_is_the_dicom_folder", "out_links_to_the_inputs_folder")])  # batches read folders
def test_out_never_is_nor_holds_the_input_nor_replaces_anothers_file(name, command, tmp_path, chest, tiny, capsys):
    ct, out, text = OUT_CASES[name](tmp_path, chest)
    before = _snapshot(tmp_path)
    assert _run(ct, out, tiny, command=command) == 2
    err = capsys.readouterr().err
    assert re.search(text, err) and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before  # nothing written, nothing replaced


def test_rerun_replaces_the_previous_outputs_whole(tmp_path, chest, tiny, capsys):
    phantom.write_dicom_series(chest, tmp_path / "dicom")
    out = tmp_path / "out"
    assert _run(tmp_path / "dicom", out, tiny, "--dicom-seg", "--threshold", "0") == 0
    assert "segmentation.dcm" in _complete(out)["files"]
    assert _run(tmp_path / "dicom", out, tiny, "--threshold", "0.9") == 0
    report = _complete(out)  # the first run's DICOM SEG went with it
    assert "segmentation.dcm" not in report["files"] and report["threshold"] == 0.9
    second = _snapshot(out)
    # a run that fails while writing (a DICOM SEG needs a DICOM input) leaves the folder as it was
    assert _run(write_volume(chest, tmp_path / "ct.nrrd"), out, tiny, "--dicom-seg", "--threshold", "0") == 2
    assert "DICOM" in capsys.readouterr().err
    assert _snapshot(out) == second


def _start(ct: Path, out: Path, model: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "LungGradCAMLib.cli", "run", str(ct), "--out", str(out),
                             "--model", str(model), "--device", "cpu"],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def _wait_for(condition: Callable[[], bool], proc: subprocess.Popen, what: str) -> None:
    """Poll ``condition`` until it holds; fail if ``proc`` ends first."""
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the run ended (status {proc.returncode}) before {what}: {proc.stderr.read()[-2000:]}")
        time.sleep(0.005)


def _temporaries(out: Path) -> List[Path]:
    return [p for p in out.rglob("*") if p.name.startswith(".tmp-")] if out.is_dir() else []


def test_a_second_run_into_a_busy_out_is_refused(tmp_path, chest, tiny, capsys):
    ct, out = write_volume(chest, tmp_path / "ct.nrrd"), tmp_path / "out"
    first = _start(ct, out, tiny)
    try:
        _wait_for(lambda: (out / ".lunggradcam-work").exists(), first, "it owned --out")  # made once locked
        first.send_signal(signal.SIGSTOP)  # hold it there, owning the folder
        assert _run(ct, out, tiny) == 2
        assert "another run is writing into this folder" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stderr.read()
    assert _complete(out)["input"] == str(ct) and not (out / ".lunggradcam.lock").exists()


@pytest.mark.slow
def test_sigterm_and_sigkill_leave_no_temporaries(tmp_path, chest, tiny):
    ct, out = write_volume(chest, tmp_path / "ct.nrrd"), tmp_path / "out"
    # SIGTERM while the run has temporaries: it removes them and says so
    proc = _start(ct, out, tiny)
    _wait_for(lambda: bool(_temporaries(out)), proc, "it wrote a temporary")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    err = proc.stderr.read()
    assert "terminated" in err and "Traceback" not in err, err
    assert not _temporaries(out) and not (out / ".lunggradcam.lock").exists()
    # SIGKILL cannot be caught: the next run into the folder removes what it left
    proc = _start(ct, out, tiny)
    _wait_for(lambda: bool(_temporaries(out)), proc, "it wrote a temporary")
    proc.kill()
    proc.wait(timeout=120)
    assert _temporaries(out)
    assert _run(ct, out, tiny) == 0
    assert not _temporaries(out) and not (out / ".lunggradcam.lock").exists()
    _complete(out)


# --------------------------------------------------------------------------------------------
# options and paths that can be checked before the work: exit 2 at once, one message
# --------------------------------------------------------------------------------------------
def _model_variant(tmp: Path, tiny: Path, card: Callable[[dict], Any], weights: Optional[bytes] = None) -> Path:
    """A copy of the tiny model whose card JSON text is ``card(card_dict)`` (and other weights)."""
    path = tmp / "variant.safetensors"
    path.write_bytes(weights if weights is not None else tiny.read_bytes())
    data = json.loads(tiny.with_suffix(".json").read_text())
    data["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    changed = card(data)
    path.with_suffix(".json").write_text(changed if isinstance(changed, str) else json.dumps(changed))
    return path


def _two_channel_model(tmp: Path, tiny: Path) -> Path:
    from safetensors.torch import save

    module = build_model("gradcam3d_cnn", width=2, in_channels=2)
    weights = save({k: v.contiguous() for k, v in module.state_dict().items()})
    return _model_variant(tmp, tiny, lambda c: {**c, "kwargs": {"width": 2, "in_channels": 2}}, weights)


BAD_OPTIONS = {
    # name: (make(tmp, ct, tiny) -> (ct, out, model, extra args, env), message)
    "device_meta": (lambda t, ct, m: (ct, t / "out", m, ["--device", "meta"], {}), "unknown device 'meta'"),
    "device_xpu": (lambda t, ct, m: (ct, t / "out", m, ["--device", "xpu"], {}), "unknown device 'xpu'"),
    "batch_size_0": (lambda t, ct, m: (ct, t / "out", m, ["--batch-size", "0"], {}), "give a positive whole number"),
    "batch_size_negative": (lambda t, ct, m: (ct, t / "out", m, ["--batch-size", "-3"], {}),
                            "give a positive whole number"),
    "roi_of_nan_size": (lambda t, ct, m: (ct, t / "out", m, ["--roi", "0,0,0,nan"], {}), "finite"),
    "out_is_a_file": (lambda t, ct, m: (ct, t / "report.txt", m, [], {}), "report.txt is a file, not a folder"),
    "out_name_over_255_bytes": (lambda t, ct, m: (ct, t / ("x" * 300) / "out", m, [], {}), "more than the 255"),
    "input_name_over_255_bytes": (lambda t, ct, m: (t / ("y" * 300 + ".nrrd"), t / "out", m, [], {}),
                                  "more than the 255"),
    "model_with_two_input_channels": (lambda t, ct, m: (ct, t / "out", _two_channel_model(t, m), [], {}),
                                      "takes 2 input channels"),
    "model_card_nested_200000_deep": (lambda t, ct, m: (ct, t / "out", _model_variant(
        t, m, lambda c: "[" * 200_000 + "]" * 200_000), [], {}), "nested too deeply"),
    "model_over_the_size_limit": (lambda t, ct, m: (ct, t / "out", _model_variant(t, m, lambda c: c), [],
                                                    {"LUNGGRADCAM_MAX_MODEL_BYTES": "1000"}),
                                  "over the model size limit .* refusing to allocate"),
}


@pytest.mark.parametrize("name", list(BAD_OPTIONS))
def test_bad_options_and_paths_exit_2_at_once(name, tmp_path, chest, tiny, capsys, monkeypatch):
    make, text = BAD_OPTIONS[name]
    (tmp_path / "report.txt").write_text("the user's notes\n")
    ct, out, model, extra, env = make(tmp_path, write_volume(chest, tmp_path / "ct.nrrd"), tiny)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    before = _snapshot(tmp_path)
    assert _run(ct, out, model, *extra) == 2
    err = capsys.readouterr().err
    assert re.search(text, err) and "Traceback" not in err, err
    assert _snapshot(tmp_path) == before


@contextlib.contextmanager
def _unwritable(folder: Path, how: str):
    """``folder`` made unwritable: "immutable" (chattr +i), "permissions" (chmod, not for root)."""
    folder.mkdir()
    if how == "permissions":
        if os.geteuid() == 0:
            pytest.skip("root writes whatever the permissions say (see immutable, read_only_mount)")
        folder.chmod(0o555)
    elif subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here (needs root and a file system that has it)")
    try:
        yield folder
    finally:
        if how == "permissions":
            folder.chmod(0o755)
        else:
            subprocess.run(["chattr", "-i", str(folder)], check=True)


def _not_a_chest(tmp: Path) -> Path:
    """A CT the run would refuse only after reading it: an unwritable --out must be named first."""
    return write_volume(Volume(np.zeros((8, 16, 16), np.float32), AXIAL), tmp / "zeros.nrrd")


@pytest.mark.parametrize("how", ["immutable", "permissions"])
def test_unwritable_out_fails_before_the_work(how, tmp_path, tiny, capsys):
    ct = _not_a_chest(tmp_path)
    with _unwritable(tmp_path / "locked", how) as locked:
        assert _run(ct, locked / "out", tiny) == 2
        err = capsys.readouterr().err
        assert f"{locked / 'out'}: cannot write there" in err and "Traceback" not in err, err
        assert not (locked / "out").exists()


def test_out_on_a_read_only_mount_fails_before_the_work(tmp_path, tiny):
    ct = _not_a_chest(tmp_path)
    (tmp_path / "ro").mkdir()
    result = run_on_read_only_mount(tmp_path / "ro", [sys.executable, "-m", "LungGradCAMLib.cli", "run", ct, "--out",
                                                      tmp_path / "ro" / "out", "--model", tiny, "--device", "cpu"],
                                    cwd=REPO, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr
    assert "cannot write there (Read-only file system)" in result.stderr and "Traceback" not in result.stderr


# --------------------------------------------------------------------------------------------
# memory bombs: small files that declare huge work. Run in a child process whose address space
# is limited (RLIMIT_AS), so that a regression fails there instead of taking the machine.
# --------------------------------------------------------------------------------------------
#: Bytes of address space the child may add to what it has mapped after its imports: the
#: control run needs about 0.3 GB; every bomb declares at least 1 GB. glibc reserves 64 MiB of
#: address space per thread's malloc arena (reserved, not used memory), so the child runs with
#: MALLOC_ARENA_MAX=2: otherwise the count of threads torch and the writers start decides the test.
HEADROOM = 500_000_000
LIMITED = """
import contextlib, io, json, resource, sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot, numpy, pydicom, scipy.ndimage, SimpleITK, skimage.measure, torch
from LungGradCAMLib.engine import cam, lung, models, sliding
from LungGradCAMLib import cli, pipeline
from LungGradCAMLib.pipeline import segment
from LungGradCAMLib.io import render
pages = int(open("/proc/self/statm").read().split()[0])
limit = pages * resource.getpagesize() + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
for name, args in json.loads(sys.argv[2]).items():
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(args)
        except BaseException as exc:  # MemoryError, SystemExit, ...: what a regression raises
            code = f"{type(exc).__name__}: {exc}"
    print(json.dumps({name: {"code": code, "stderr": err.getvalue()[-3000:]}}), flush=True)
"""


def _gzip_zeros(prefix: bytes, n_zeros: int, chunk: int = 1 << 24) -> bytes:
    """A valid gzip file of ``prefix`` then ``n_zeros`` zero bytes (a multiple of ``chunk``),
    made without compressing them all: after a full flush, every chunk of zeros compresses to the
    same bytes."""
    import struct
    import zlib

    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    head = c.compress(prefix) + c.flush(zlib.Z_FULL_FLUSH)
    block = c.compress(bytes(chunk)) + c.flush(zlib.Z_FULL_FLUSH)
    crc = zlib.crc32(prefix)
    for _ in range(n_zeros // chunk):
        crc = zlib.crc32(bytes(chunk), crc)
    return (b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x02\xff" + head + block * (n_zeros // chunk) + c.flush()
            + struct.pack("<II", crc, (len(prefix) + n_zeros) & 0xFFFFFFFF))


def _bomb_nrrd_dev_zero(tmp: Path, tiny: Path):
    """A 200-byte detached header whose data file is /dev/zero, declaring a billion voxels."""
    (tmp / "sub").mkdir()
    path = tmp / "sub" / "ct.nhdr"
    path.write_text("NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1000 1000 1000\nspacings: 1 1 1\n"
                    "encoding: raw\ndata file: /dev/zero\n\n")
    return [str(path), "--model", str(tiny)], "not beside the header"


def _bomb_nrrd_gzip(tmp: Path, tiny: Path):
    """A 1 MB gzip NRRD of a billion zero voxels."""
    header = b"NRRD0004\ntype: uchar\ndimension: 3\nsizes: 1024 1024 1024\nspacings: 1 1 1\nencoding: gzip\n\n"
    path = tmp / "ct.nrrd"
    path.write_bytes(header + _gzip_zeros(b"", 1 << 30))
    return [str(path), "--model", str(tiny)], r"needs 2\.15 GB of memory, more than the memory this process can get"


def _bomb_nifti_gzip(tmp: Path, tiny: Path):
    """A 1 MB .nii.gz of a billion zero voxels: a valid NIfTI header, its dimensions made 1024^3."""
    import struct

    sitk.WriteImage(sitk.Image([1, 1, 1], sitk.sitkUInt8), str(tmp / "one.nii"))
    header = bytearray((tmp / "one.nii").read_bytes()[:352])
    header[42:48] = struct.pack("<3h", 1024, 1024, 1024)
    path = tmp / "ct.nii.gz"
    path.write_bytes(_gzip_zeros(bytes(header), 1 << 30))
    return [str(path), "--model", str(tiny)], r"needs 2\.15 GB of memory"


def _bomb_dicom_jpegls(tmp: Path, tiny: Path):
    """Three tiny JPEG-LS files whose headers declare 20000 x 20000 pixels each."""
    files = _series(tmp / "dicom", shape=(3, 16, 16), compression="jpeg-ls")
    for f in files:
        edit(f, lambda ds: (setattr(ds, "Rows", 20000), setattr(ds, "Columns", 20000)))
    return [str(tmp / "dicom"), "--model", str(tiny)], r"series .*\(1200000000 voxels\) needs .* GB of memory"


def _bomb_model_deflate(tmp: Path, tiny: Path):
    """A torch model file (a zip) whose first tensor's entry unpacks to 512 MiB of zeros, 3 MB on disk."""
    import torch
    import zipfile

    card = ModelCard.load(tiny.with_suffix(".json"))
    card.kwargs = {"width": 24}
    torch.save(build_model("gradcam3d_cnn", width=24).state_dict(), tmp / "plain.pt")
    path = tmp / "bomb.pt"
    with zipfile.ZipFile(tmp / "plain.pt") as src, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED,
                                                                   compresslevel=1) as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("/data/0"):
                with dst.open(info.filename, "w", force_zip64=True) as f:
                    for _ in range(32):
                        f.write(bytes(1 << 24))
            else:
                dst.writestr(info.filename, data)
    card.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    card.save(path.with_suffix(".json"))
    ct = write_volume(Volume(_hu((8, 16, 16)), AXIAL), tmp / "ct.nrrd")
    return [str(ct), "--model", str(path)], r"unpack to 5388\d+ bytes, more than the \d+ the card's network can hold"


def _bomb_card(change: Dict[str, Any], expected: str):
    """The tiny model with a card asking for a grid or patch far larger than memory."""
    def make(tmp: Path, tiny: Path):
        model = _model_variant(tmp, tiny, lambda c: {**c, **change})
        ct = phantom.chest_ct(seed=3, shape=(28, 64, 64), spacing_mm=(4.5, 4.5, 8.0)).volume
        return [str(write_volume(ct, tmp / "ct.nrrd")), "--model", str(model)], expected
    return make


BOMBS = {
    "nrrd_data_file_dev_zero": _bomb_nrrd_dev_zero,
    "nrrd_gzip_billion_voxels": _bomb_nrrd_gzip,
    "nifti_gzip_billion_voxels": _bomb_nifti_gzip,
    "dicom_jpegls_20000_square": _bomb_dicom_jpegls,
    "model_deflate_512MiB_tensor": _bomb_model_deflate,
    "card_patch_512_cubed": _bomb_card({"patch_size": [512, 512, 512]},
                                       r"one \[512, 512, 512\]-voxel patch through gradcam3d_cnn needs .* GB of memory"),
    "card_spacing_0_27_mm": _bomb_card({"spacing_mm": [0.27, 0.27, 0.27]},
                                       r"explaining this CT .*\(830, 1067, 1067\) on the model's .* needs .* GB"),
}


@pytest.fixture(scope="module")
def bomb_results(tmp_path_factory, tiny):
    """Every bomb, and a control run that must succeed, through ``lunggradcam run`` in one child
    process with RLIMIT_AS = its mapped size after the imports + HEADROOM."""
    if not sys.platform.startswith("linux"):
        pytest.skip("RLIMIT_AS is enforced on Linux")
    runs = {}
    for name, make in BOMBS.items():
        tmp = tmp_path_factory.mktemp(name)
        args, expected = make(tmp, tiny)
        runs[name] = (["run", args[0], "--out", str(tmp / "out"), *args[1:], "--device", "cpu"], expected, tmp)
    control = tmp_path_factory.mktemp("control")
    chest = phantom.chest_ct(seed=3, shape=(28, 64, 64), spacing_mm=(4.5, 4.5, 8.0)).volume
    runs["control"] = (["run", str(write_volume(chest, control / "ct.nrrd")), "--out", str(control / "out"),
                        "--model", str(tiny), "--device", "cpu"], "", control)
    result = subprocess.run([sys.executable, "-c", LIMITED, str(HEADROOM),
                             json.dumps({name: args for name, (args, _, _) in runs.items()})],
                            cwd=REPO, capture_output=True, text=True, timeout=900,
                            env={**os.environ, "MALLOC_ARENA_MAX": "2"})
    done = {}
    for line in result.stdout.splitlines():
        if line.startswith("{"):
            done.update(json.loads(line))
    return runs, done, result


@pytest.mark.slow
def test_the_memory_limit_lets_a_real_run_through(bomb_results):
    runs, done, result = bomb_results
    assert "control" in done, f"the child died (status {result.returncode}): {result.stderr[-3000:]}"
    assert done["control"]["code"] == 0, done["control"]["stderr"]
    assert (runs["control"][2] / "out" / "report.json").is_file()


@pytest.mark.parametrize("name", list(BOMBS))
def test_memory_bombs_are_refused_before_allocating(name, bomb_results):
    runs, done, result = bomb_results
    assert name in done, f"the child died at or before {name} (status {result.returncode}): {result.stderr[-3000:]}"
    code, err = done[name]["code"], done[name]["stderr"]
    assert code == 2 and "Traceback" not in err, (code, err)
    assert re.search(runs[name][1], err), err
    # the limit and how to change it (a model's file is bounded by its card's network instead)
    assert re.search("LUNGGRADCAM_MAX_BYTES|not beside the header|the card's network can hold", err), err
    assert not (runs[name][2] / "out").exists()
