"""Bad DICOM series: damaged files, impossible geometry, several series, unreadable files, headers
that declare too much; each refused with its specific error (checked as bad_inputs.py says). Inputs
the loader accepts by design (gantry tilt, non-DICOM files or a named pipe beside the series) give
the correct volume, and ``lunggradcam run`` completes on the tilted series."""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

import LungGradCAMLib as lgc
from LungGradCAMLib import phantom
from LungGradCAMLib.cli import main
from LungGradCAMLib.core.errors import (
    AmbiguousSeriesError,
    DicomDecodeError,
    NoSeriesFoundError,
    SeriesGeometryError,
    VolumeError,
)
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.io.dicom import DicomResampledWarning, load_dicom_series
from LungGradCAMLib.io.volume_files import read_volume

from bad_inputs import Case, Made, case_tests, dicom_series, uid_of, within
from dicom_damage import drop_pixels, edit, short_pixels, truncate, truncate_header
from helpers import snapshot as _snapshot

CORONAL = axis_aligned_matrix((0.8, 2.5, 0.8), (0.0, 0.0, 0.0), np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]))


def _one_bad_file(change: Callable[[Path], None]) -> Callable[[Path], Made]:
    """A 4-slice series whose second file is damaged by ``change``; the message names that file."""

    def make(root: Path) -> Made:
        files = dicom_series(root)
        change(files[1])
        return Made(root, lambda: load_dicom_series(root), [str(files[1])])

    return make


def _every_file(change: Callable[[Path], None]) -> Callable[[Path], Made]:
    def make(root: Path) -> Made:
        files = dicom_series(root)
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
    files = dicom_series(root)
    for f in files:
        edit(f, lambda ds: setattr(ds, "Modality", "MR"))
    return Made(root, lambda: load_dicom_series(root), [str(root), uid_of(files[0]), "MR"])


def _single_slice(root: Path) -> Made:
    files = dicom_series(root, shape=(1, 16, 16))
    return Made(root, lambda: load_dicom_series(root), [str(files[0]), uid_of(files[0])])


def _duplicate_positions(root: Path) -> Made:
    files = dicom_series(root)

    def other_pixels(ds):
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.PixelData = (ds.pixel_array + 7).astype("<i2").tobytes()

    copy = edit(files[2], other_pixels, root / "rescan.dcm")
    return Made(root, lambda: load_dicom_series(root), [str(files[2]), str(copy), uid_of(files[0])])


def _gap(root: Path) -> Made:
    files = dicom_series(root, shape=(12, 8, 8))
    for f in files[3:8]:
        f.unlink()
    return Made(root, lambda: load_dicom_series(root), [uid_of(files[0]), files[2].name, files[8].name])


def _mixed_orientations(root: Path) -> Made:
    uid = generate_uid()
    dicom_series(root / "axial", series_uid=uid)
    dicom_series(root / "coronal", shape=(3, 16, 16), seed=1, matrix=CORONAL, series_uid=uid)
    return Made(root, lambda: load_dicom_series(root), [f"{uid}#1", f"{uid}#2"])


def _two_ct_series(root: Path) -> Made:
    # two patients' CTs in one tree: each series is named with its patient and folder
    a = dicom_series(root / "a", series_description="lung kernel", patient_id="LIDC-IDRI-0001")
    b = dicom_series(
        root / "b", shape=(5, 16, 16), seed=1, series_description="soft kernel", patient_id="LIDC-IDRI-0002"
    )
    return Made(
        root,
        lambda: load_dicom_series(root),
        [
            uid_of(a[0]),
            uid_of(b[0]),
            "lung kernel",
            "soft kernel",
            f"patient 'LIDC-IDRI-0001'  in {root / 'a'}",
            f"patient 'LIDC-IDRI-0002'  in {root / 'b'}",
        ],
    )


def _empty_folder(root: Path) -> Made:
    root.mkdir(parents=True)
    return Made(root, lambda: load_dicom_series(root), [str(root)])


def _only_non_dicom(root: Path) -> Made:
    root.mkdir(parents=True)
    (root / "README.txt").write_text("scan notes\n")
    (root / "scan.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return Made(root, lambda: load_dicom_series(root), [str(root)])


def _unreadable_chmod(root: Path) -> Made:
    if os.geteuid() == 0:
        pytest.skip("running as root: chmod 000 does not stop root from reading (see unreadable_symlink_loop)")
    files = dicom_series(root)
    files[1].chmod(0)
    return Made(root, lambda: load_dicom_series(root), [str(files[1])])


def _unreadable_symlink_loop(root: Path) -> Made:
    """A file that nobody, root included, can open: a symbolic link to itself (ELOOP)."""
    dicom_series(root)
    loop = root / "IMG99999.dcm"
    os.symlink(loop.name, loop)
    return Made(root, lambda: load_dicom_series(root), [str(loop)])


def _dicom_over_voxel_limit(root: Path) -> Made:
    files = dicom_series(root)
    return Made(root, lambda: load_dicom_series(root), [uid_of(files[0])], env={"LUNGGRADCAM_MAX_VOXELS": "1000"})


def _dicom_declares_huge_slices(root: Path) -> Made:
    """Every header claims 65535 x 65535 pixels: refused from the headers, nothing allocated."""
    files = dicom_series(root)
    for f in files:
        edit(f, lambda ds: (setattr(ds, "Rows", 65535), setattr(ds, "Columns", 65535)))
    return Made(root, lambda: load_dicom_series(root), [uid_of(files[0])])


def _zero_rows(root: Path) -> Made:
    files = dicom_series(root)
    for f in files:
        edit(f, lambda ds: setattr(ds, "Rows", 0))
    return Made(root, lambda: load_dicom_series(root), [str(files[0])])


def _absurd_frame_count(root: Path) -> Made:
    """One 16x16 image whose header declares 20000 frames (8 KB of pixel data for 512 bytes)."""
    root.mkdir(parents=True)
    f = dicom_series(root, shape=(2, 16, 16))[0]
    (root / "IMG00001.dcm").unlink()
    edit(f, lambda ds: setattr(ds, "NumberOfFrames", 20000))
    return Made(root, lambda: load_dicom_series(root), [str(f)])


def _dicom_huge_pixel_spacing(root: Path) -> Made:
    files = dicom_series(root)
    for f in files:
        edit(f, lambda ds: setattr(ds, "PixelSpacing", [1e30, 1e30]))
    return Made(root, lambda: load_dicom_series(root), [str(files[0])])


CASES: Dict[str, Case] = {
    "truncated_file": Case(_one_bad_file(truncate), DicomDecodeError, "truncated"),
    "truncated_header": Case(_one_bad_file(truncate_header), DicomDecodeError, "truncated or damaged"),
    "missing_pixel_data": Case(_one_bad_file(drop_pixels), DicomDecodeError, "without Pixel Data"),
    "pixel_data_short": Case(
        _one_bad_file(short_pixels), DicomDecodeError, "Pixel Data holds 256 bytes but .*16x16 .*need 512"
    ),
    "transfer_syntax_without_decoder": Case(
        _one_bad_file(_mpeg2), DicomDecodeError, "no decoder available for transfer syntax .*MPEG2"
    ),
    "garbage_after_dicm": Case(_one_bad_file(_garbage), DicomDecodeError, "unreadable DICOM"),
    "missing_position": Case(_one_bad_file(_no_position), SeriesGeometryError, "lacks ImagePositionPatient"),
    "invalid_orientation": Case(_every_file(_parallel_cosines), SeriesGeometryError, "invalid ImageOrientationPatient"),
    "non_ct_modality_only": Case(_non_ct_only, NoSeriesFoundError, "no CT series"),
    "single_slice": Case(_single_slice, SeriesGeometryError, "single slice"),
    "duplicate_positions_different_pixels": Case(
        _duplicate_positions, SeriesGeometryError, "same position .* different pixels"
    ),
    "gap_of_many_slices": Case(_gap, SeriesGeometryError, "about 5 slices are missing.*max_gap_slices=2"),
    "mixed_orientations": Case(_mixed_orientations, SeriesGeometryError, "mixes slices of different orientation"),
    "two_ct_series": Case(_two_ct_series, AmbiguousSeriesError, "2 CT series found; pick one"),
    "empty_folder": Case(_empty_folder, NoSeriesFoundError, "no DICOM images found"),
    "only_non_dicom_files": Case(_only_non_dicom, NoSeriesFoundError, "no DICOM images found"),
    "unreadable_chmod_000": Case(_unreadable_chmod, DicomDecodeError, "cannot read the file"),
    "unreadable_symlink_loop": Case(_unreadable_symlink_loop, DicomDecodeError, "cannot read the file"),
    "dicom_over_voxel_limit": Case(_dicom_over_voxel_limit, VolumeError, "1024 voxels exceeds the limit of 1000"),
    "dicom_declares_huge_slices": Case(_dicom_declares_huge_slices, VolumeError, "voxels exceeds the limit"),
    "zero_rows": Case(_zero_rows, DicomDecodeError, "Rows x Columns is 0 x 16"),
    "nan_rescale_slope": Case(_one_bad_file(_nan_slope), DicomDecodeError, "RescaleSlope nan .* not finite"),
    # a damaged slice is named, not split off as a stack of its own and replaced by interpolation
    "one_slice_with_invalid_orientation": Case(
        _one_bad_file(_parallel_cosines), SeriesGeometryError, "invalid ImageOrientationPatient"
    ),
    # refused from the header: one record per declared frame would let 2**31 frames exhaust memory
    "absurd_number_of_frames": Case(_absurd_frame_count, DicomDecodeError, "declares 20000 frames"),
    "dicom_pixel_spacing_1e30": Case(_dicom_huge_pixel_spacing, SeriesGeometryError, "PixelSpacing"),
}

test_library_raises_specific_error_naming_the_input, test_cli_exits_2_with_the_message_and_writes_nothing = case_tests(
    CASES
)


# --------------------------------------------------------------------------------------------
# inputs that are accepted by design: the result is correct
# --------------------------------------------------------------------------------------------
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
            assert np.allclose(volume.array[k, s:], expected[k, : expected.shape[1] - s], atol=1e-3)
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


OK_CASES = {
    "gantry_tilt": _tilt,
    "non_dicom_files_beside": _non_dicom_beside,
    "named_pipe_beside": _named_pipe_beside,
    "unix_socket_beside": _socket_beside,
}


@pytest.mark.parametrize("name", list(OK_CASES))
def test_accepted_inputs_give_the_correct_volume(name, tmp_path, chest, tiny, capsys):
    root = tmp_path / "in"
    check = OK_CASES[name](root, chest)
    before = _snapshot(root)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        volume = within(60, lambda: load_dicom_series(root), root)
    check(volume)
    resampled = [w for w in caught if issubclass(w.category, DicomResampledWarning)]
    assert bool(resampled) == (name == "gantry_tilt")
    if name != "gantry_tilt":  # the others load exactly the clean series: one end-to-end run is enough
        assert _snapshot(root) == before
        return

    out = tmp_path / "out"
    code = within(
        120, lambda: main(["run", str(root), "--out", str(out), "--model", str(tiny), "--device", "cpu"]), root
    )
    assert code == 0, capsys.readouterr().err
    assert {"report.json", "cam.nrrd", "segmentation.seg.nrrd", "lungs.seg.nrrd"} <= {p.name for p in out.iterdir()}
    assert not list(out.glob(".tmp-*"))
    cam = read_volume(out / "cam.nrrd")
    assert lgc.same_geometry(cam, volume, atol_mm=1e-6)
    assert _snapshot(root) == before
