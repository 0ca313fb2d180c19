"""Bad volume files (NRRD, NIfTI, MetaImage, a file that is none): NaN voxels, impossible sizes and
geometry, headers that point at data elsewhere, limits; each refused with its specific error
(checked as bad_inputs.py says)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Dict

import numpy as np
import SimpleITK as sitk

from LungGradCAMLib.core.errors import NoSeriesFoundError, ResourceError, VolumeError
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.io.inputs import load_input
from LungGradCAMLib.io.volume_files import read_volume, write_volume

from bad_inputs import AXIAL, NRRD_HEADER, Case, Made, case_tests, random_hu


def _not_a_volume_file(root: Path) -> Made:
    root.mkdir(parents=True)
    path = root / "scan.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(64))
    return Made(path, lambda: load_input(path), [str(path)])


def _nrrd(root: Path, name: str, array: np.ndarray) -> Path:
    root.mkdir(parents=True)
    return write_volume(Volume(array, AXIAL), root / name)


def _nrrd_nan_inf(root: Path) -> Made:
    array = random_hu()
    array[1, 2, 3], array[2, 3, 4] = np.nan, np.inf
    path = _nrrd(root, "ct.nrrd", array)
    return Made(path, lambda: read_volume(path), [str(path), "2 voxels"])


def _nrrd_over_voxel_limit(root: Path) -> Made:
    path = _nrrd(root, "ct.nrrd", random_hu())
    return Made(path, lambda: read_volume(path), [str(path)], env={"LUNGGRADCAM_MAX_VOXELS": "1000"})


def _nrrd_huge_header(root: Path) -> Made:
    """A 300-byte file whose header declares 4000^3 voxels: refused before allocating 128 GB."""
    root.mkdir(parents=True)
    path = root / "huge.nrrd"
    path.write_bytes(
        NRRD_HEADER.format(dim=3, sizes="4000 4000 4000", dirs="(1,0,0) (0,1,0) (0,0,1)", origin="0,0,0").encode()
        + bytes(100)
    )
    return Made(path, lambda: read_volume(path), [str(path), "64000000000 voxels"])


def _nrrd_truncated_data(root: Path) -> Made:
    root.mkdir(parents=True)
    path = root / "short.nrrd"
    path.write_bytes(
        NRRD_HEADER.format(dim=3, sizes="10 10 10", dirs="(1,0,0) (0,1,0) (0,0,1)", origin="0,0,0").encode()
        + bytes(100)
    )
    return Made(path, lambda: read_volume(path), [str(path)])


def _nrrd_2d(root: Path) -> Made:
    root.mkdir(parents=True)
    path = root / "slice.nrrd"
    sitk.WriteImage(sitk.GetImageFromArray(random_hu()[0].astype(np.int16)), str(path))
    return Made(path, lambda: read_volume(path), [str(path)])


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
    path.write_text(
        "ObjectType = Image\nNDims = 3\nDimSize = 16 16 4\nElementSpacing = 1 1 1\n"
        "ElementType = MET_SHORT\nElementDataFile = ../secret.raw\n"
    )
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
        raw[offset : offset + struct.calcsize(fmt)] = struct.pack(fmt, value)
    path.write_bytes(gzip.compress(bytes(raw)) if name.endswith(".gz") else bytes(raw))
    return path


def _nifti_nan_inf(root: Path) -> Made:
    array = random_hu()
    array[1, 2, 3], array[3, 15, 0] = np.nan, -np.inf  # NIfTI's reader would make them 0 HU
    path = _nifti(root, "ct.nii.gz", array)
    return Made(path, lambda: read_volume(path), [str(path), "2 voxels", "i, j, k = 3, 2, 1"])


def _nifti_header(offset: int, value: float, shown: str) -> Callable[[Path], Made]:
    def make(root: Path) -> Made:
        path = _nifti(root, "ct.nii", random_hu(), {offset: ("<f", value)})
        return Made(path, lambda: read_volume(path), [str(path), shown])

    return make


def _volume_with(matrix: np.ndarray) -> Callable[[Path], Made]:
    def make(root: Path) -> Made:
        root.mkdir(parents=True)
        image = Volume(random_hu(), np.eye(4)).to_sitk()
        lps = np.diag([-1.0, -1.0, 1.0, 1.0]) @ matrix
        image.SetSpacing([float(v) for v in np.linalg.norm(lps[:3, :3], axis=0)])
        image.SetOrigin([float(v) for v in lps[:3, 3]])
        path = root / "ct.nrrd"
        sitk.WriteImage(image, str(path))
        return Made(path, lambda: read_volume(path), [str(path)])

    return make


def _nrrd_over_byte_limit(root: Path) -> Made:
    path = _nrrd(root, "ct.nrrd", random_hu())
    return Made(path, lambda: read_volume(path), [str(path)], env={"LUNGGRADCAM_MAX_BYTES": "1000"})


CASES: Dict[str, Case] = {
    "not_a_volume_file": Case(_not_a_volume_file, NoSeriesFoundError, "no DICOM images found"),
    "nrrd_nan_inf": Case(_nrrd_nan_inf, VolumeError, "NaN or infinite"),
    "nrrd_over_voxel_limit": Case(_nrrd_over_voxel_limit, VolumeError, "1024 voxels exceeds the limit of 1000"),
    "nrrd_header_declares_huge_volume": Case(_nrrd_huge_header, VolumeError, "exceeds the limit"),
    "nrrd_truncated_data": Case(_nrrd_truncated_data, VolumeError, "cannot read the volume"),
    "nrrd_2d_image": Case(_nrrd_2d, VolumeError, "expected a 3D image, got 2D"),
    # headers that point elsewhere: only one regular data file beside the header is read
    "nrrd_data_file_outside_its_folder": Case(_nrrd_pointing("../secret.raw"), VolumeError, "not beside the header"),
    "nrrd_data_file_absolute": Case(_nrrd_pointing("{root}/secret.raw"), VolumeError, "not beside the header"),
    "nrrd_data_file_is_a_link_out": Case(_nrrd_pointing("data.raw", beside=True), VolumeError, "not beside the header"),
    "nrrd_data_file_is_a_device": Case(_nrrd_pointing("/dev/zero"), VolumeError, "not beside the header"),
    "nrrd_data_file_list": Case(_nrrd_pointing("LIST"), VolumeError, "lists or numbered patterns"),
    "mhd_data_file_outside_its_folder": Case(_mhd_pointing_elsewhere, VolumeError, "not beside the header"),
    # silent data changes: refused, naming the file
    "nifti_nan_inf_voxels": Case(_nifti_nan_inf, VolumeError, "NaN or infinite"),
    "nifti_pixdim_zero": Case(_nifti_header(80, 0.0, "pixdim"), VolumeError, "voxel size pixdim = \\[0.0, 1.0, 2.5\\]"),
    "nifti_pixdim_nan": Case(_nifti_header(88, float("nan"), "pixdim"), VolumeError, "voxel size pixdim .*nan"),
    "nifti_scl_slope_nan": Case(_nifti_header(112, float("nan"), "scl_slope"), VolumeError, "is not finite"),
    "nrrd_spacing_1e30": Case(
        _volume_with(axis_aligned_matrix((1e30, 1, 2.5))), VolumeError, "voxel spacing .* outside"
    ),
    "nrrd_origin_1e30": Case(
        _volume_with(axis_aligned_matrix((1, 1, 2.5), (1e30, 0, 0))), VolumeError, "origin .* more than"
    ),
    # the memory limit, set low: the message names it and how to change it
    "nrrd_over_byte_limit": Case(_nrrd_over_byte_limit, ResourceError, "more than the limit LUNGGRADCAM_MAX_BYTES"),
}

test_library_raises_specific_error_naming_the_input, test_cli_exits_2_with_the_message_and_writes_nothing = case_tests(
    CASES
)
