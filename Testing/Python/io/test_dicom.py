"""load_dicom_series / list_dicom_series: real CT, compressed and Enhanced objects, ordering,
HU, padding, resampling, and every bad input with its specific error."""

from __future__ import annotations

import hashlib
import io
import os
import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import generate_uid

from LungGradCAMLib.core.errors import (
    AmbiguousSeriesError,
    DicomDecodeError,
    LungGradCAMError,
    NoSeriesFoundError,
    SeriesGeometryError,
    VolumeError,
)
from LungGradCAMLib.core.volume import Volume, axis_aligned_matrix
from LungGradCAMLib.io.dicom import DicomResampledWarning, load_dicom_series
from LungGradCAMLib.io.dicom_series import SeriesInfo, list_dicom_series
from LungGradCAMLib.io.dicom_write import save_dicom_file, write_dicom_series

from dicom_damage import drop_pixels, short_pixels, truncate, truncate_header
from helpers import PYDICOM_3, data_path, encoder_available

AXIAL = axis_aligned_matrix((0.8, 0.8, 2.5), (-10.0, 20.0, -40.0))


def _hu(shape=(8, 16, 16), seed=0) -> np.ndarray:
    return np.rint(np.random.default_rng(seed).normal(-200, 300, shape)).clip(-1000, 2000).astype(np.float32)


def _series(folder: Path, hu=None, matrix=AXIAL, **kwargs):
    hu = _hu() if hu is None else hu
    return hu, write_dicom_series(Volume(hu, matrix), folder, **kwargs)


def _edit(path: Path, change, name: Path = None) -> Path:
    """Apply ``change(ds)`` to a copy of the file at ``name`` (default: in place)."""
    ds = pydicom.dcmread(path)
    change(ds)
    out = name or path
    save_dicom_file(ds, out, enforce_file_format=ds.preamble is not None)
    return out


def _sitk(folder: Path) -> Volume:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(folder)))
    return Volume.from_sitk(reader.Execute())


def _hashes(folder: Path) -> dict:
    return {
        p: hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


# --------------------------------------------------------------------------------------------
# real CT
# --------------------------------------------------------------------------------------------
REAL = {
    "lidc1": ("lidc", "LIDC-IDRI-0001"),
    "lidc2": ("lidc", "LIDC-IDRI-0002"),
    "totalseg": ("totalsegmentator", "abdomen_dicom_series"),
    "full_chest": ("full_chest_ct", "dicom"),
}


def _real_folder(key: str) -> Path:
    folder = data_path(*REAL[key])
    return next(p.parent for p in sorted(folder.rglob("*")) if p.is_file() and p.suffix != ".xml")


@pytest.mark.parametrize("key", sorted(REAL))
def test_real_series_match_simpleitk(key):
    folder = _real_folder(key)
    ours, theirs = load_dicom_series(folder), _sitk(folder)
    assert ours.array.dtype == np.float32
    assert np.allclose(ours.ijk_to_ras, theirs.ijk_to_ras, atol=1e-4, rtol=0)
    # identical HU, except that values below air (padding) become -1024
    assert np.array_equal(ours.array, np.maximum(theirs.array, -1024).astype(np.float32))
    assert ours.meta["modality"] == "CT" and ours.meta["n_slices"] == ours.shape[0]


def test_lidc_slabs_spacing_and_padding():
    lidc1 = load_dicom_series(_real_folder("lidc1"))
    assert lidc1.shape == (16, 512, 512) and np.allclose(lidc1.spacing, (0.703125, 0.703125, 2.5))
    lidc2_folder = _real_folder("lidc2")
    lidc2 = load_dicom_series(lidc2_folder, min_hu=None)
    assert lidc2.shape == (12, 512, 512) and np.allclose(lidc2.spacing, (0.681641, 0.681641, 1.25), atol=1e-6)
    # LIDC-0002 pads with stored -2000 (Pixel Padding Value): air in our volume, -3024 in SimpleITK's
    assert _sitk(lidc2_folder).array.min() == -3024 and lidc2.array.min() == -1024
    # LIDC-0001 declares -2000 but pads with -2048 HU: only the air floor (min_hu) catches it
    assert load_dicom_series(_real_folder("lidc1"), min_hu=None).array.min() == -2048
    assert lidc1.array.min() == -1024
    assert lidc1.meta["patient_id"] == "LIDC-IDRI-0001"
    assert lidc1.meta["series_uid"].endswith("179049373636438705059720603192")


def test_totalsegmentator_names_out_of_order_are_sorted_by_position():
    folder = _real_folder("totalseg")
    files = sorted(folder.iterdir())
    z_by_name = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert z_by_name != sorted(z_by_name)  # name order is not slice order along the normal
    volume = load_dicom_series(files)  # a file list works too
    assert volume.shape == (20, 512, 512) and np.allclose(volume.spacing, (0.9765625, 0.9765625, 2.0))
    assert volume.ijk_to_ras[2, 3] == pytest.approx(min(z_by_name))
    lowest = pydicom.dcmread(files[int(np.argmin(z_by_name))])
    assert np.array_equal(volume.array[0], lowest.pixel_array.astype(np.float32) - 1024)


def test_full_chest_ct():
    folder = _real_folder("full_chest")
    calls = []
    volume = load_dicom_series(folder, progress=lambda done, total: calls.append((done, total)))
    assert volume.shape == (141, 512, 512) and np.allclose(volume.spacing, (0.9765625, 0.9765625, 2.0))
    assert calls[-1] == (141, 141) and len(calls) == 141
    assert -1024 <= volume.array.min() and volume.array.max() > 1000  # bone


# --------------------------------------------------------------------------------------------
# compressed and Enhanced objects
# --------------------------------------------------------------------------------------------
def _stack_of(source: str, folder: Path, n: int = 3, spacing: float = 5.0) -> Path:
    """A series of ``n`` slices made from one real single-slice file (new positions and UIDs)."""
    folder.mkdir(parents=True)
    series = generate_uid()
    ds0 = pydicom.dcmread(source)
    origin = [float(v) for v in ds0.ImagePositionPatient]
    for k in range(n):

        def move(ds, k=k):
            ds.SeriesInstanceUID = series
            ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
            ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * spacing]
            ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]

        _edit(Path(source), move, folder / f"{k}.dcm")
    return folder


def test_jpeg2000_real_ct_matches_uncompressed(tmp_path):
    j2k = _stack_of(get_testdata_file("693_J2KR.dcm"), tmp_path / "j2k")
    raw = _stack_of(get_testdata_file("693_UNCR.dcm"), tmp_path / "raw")
    a, b = load_dicom_series(j2k), load_dicom_series(raw)
    assert a.shape == (3, 512, 512) and np.array_equal(a.array, b.array)
    assert np.array_equal(a.array, np.maximum(_sitk(j2k).array, -1024))  # GDCM's decoder agrees


def test_jpeg_lossless_from_gdcm_encoder(tmp_path):
    """JPEG lossless (process 14) written by GDCM's encoder, decoded by pydicom's handlers."""
    hu, files = _series(tmp_path / "s", hu=_hu((3, 32, 32)))
    for f in files:
        stored = pydicom.dcmread(f).pixel_array
        writer = sitk.ImageFileWriter()
        writer.SetImageIO("GDCMImageIO")
        writer.SetFileName(str(tmp_path / "gdcm.dcm"))
        writer.SetUseCompression(True)
        writer.SetCompressor("JPEG")
        writer.Execute(sitk.GetImageFromArray(stored[None]))
        encoded = pydicom.dcmread(tmp_path / "gdcm.dcm")
        assert encoded.file_meta.TransferSyntaxUID == pydicom.uid.JPEGLosslessSV1

        def transplant(ds, encoded=encoded):
            ds.file_meta.TransferSyntaxUID = encoded.file_meta.TransferSyntaxUID
            ds.PixelData = encoded.PixelData
            ds["PixelData"].VR = "OB"

        _edit(f, transplant)
    (tmp_path / "gdcm.dcm").unlink()
    assert np.array_equal(load_dicom_series(tmp_path / "s").array, hu)


def test_jpeg_baseline_8bit(tmp_path):
    """Lossy 8-bit JPEG baseline slices (Pillow's encoder) decode within the codecs' +-1 rounding."""
    from PIL import Image

    _, files = _series(tmp_path, hu=_hu((2, 32, 32)))
    gray = (np.add.outer(np.arange(32), np.arange(32)) * 4).astype(np.uint8)
    for f in files:
        buffer = io.BytesIO()
        Image.fromarray(gray).save(buffer, format="JPEG", quality=95)

        def to_jpeg(ds, data=buffer.getvalue()):
            ds.file_meta.TransferSyntaxUID = pydicom.uid.JPEGBaseline8Bit
            ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
            ds.RescaleSlope, ds.RescaleIntercept = 4, -1024
            ds.PixelData = encapsulate([data])
            ds["PixelData"].VR = "OB"

        _edit(f, to_jpeg)
    volume = load_dicom_series(tmp_path)
    reference = np.asarray(Image.open(buffer), dtype=np.float32) * 4 - 1024
    assert np.abs(volume.array - reference).max() <= 4 * 1  # one stored step


@pytest.mark.parametrize("syntax", [None, pydicom.uid.RLELossless, pydicom.uid.JPEGLSLossless])
def test_enhanced_ct_multiframe_uses_functional_groups(tmp_path, syntax):
    source = get_testdata_file("eCT_Supplemental.dcm")
    volume = load_dicom_series([source])
    ds = pydicom.dcmread(source)
    assert volume.shape == (2, 512, 512) and np.allclose(volume.spacing, (0.388672, 0.388672, 10.0))
    # IOP (-1,0,0 / 0,1,0) makes the normal -z (LPS): frame 2 (z -149) comes first
    expected = np.array([[0.388672, 0, 0, -99.5], [0, -0.388672, 0, 301.5], [0, 0, -10.0, -149.0], [0, 0, 0, 1]])
    assert np.allclose(volume.ijk_to_ras, expected, atol=1e-6)
    assert np.array_equal(volume.array, np.maximum(ds.pixel_array[::-1].astype(np.float32) - 1024, -1024))
    if syntax is not None:  # the same object compressed: per-frame decoding of encapsulated data
        if not encoder_available(syntax):
            pytest.skip(f"no encoder for {syntax.name} with pydicom {pydicom.__version__}")
        ds.compress(syntax)
        save_dicom_file(ds, tmp_path / "enhanced.dcm")
        assert np.array_equal(load_dicom_series(tmp_path / "enhanced.dcm").array, volume.array)


def test_multiframe_without_positions_is_listed_but_not_placed():
    source = get_testdata_file("emri_small.dcm")
    (info,) = list_dicom_series([source])
    assert (info.modality, info.n_slices, info.n_files) == ("MR", 10, 1)
    with pytest.raises(SeriesGeometryError, match="lacks ImagePositionPatient"):
        load_dicom_series([source], series_uid=info.series_uid)


# --------------------------------------------------------------------------------------------
# ordering, HU, padding, resampling
# --------------------------------------------------------------------------------------------
def test_order_by_position_not_instance_number_or_name(tmp_path):
    hu, files = _series(tmp_path, shuffle_names=True)
    rng = np.random.default_rng(1)
    for f, number in zip(files, rng.permutation(len(files)) + 1):
        _edit(f, lambda ds, n=int(number): setattr(ds, "InstanceNumber", n))
    volume = load_dicom_series(tmp_path)
    assert np.array_equal(volume.array, hu) and np.allclose(volume.ijk_to_ras, AXIAL)


def test_per_slice_slope_and_intercept(tmp_path):
    hu = _hu() * 2  # even HU: exact with slope 2 too
    uids = dict(study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    _, a = _series(tmp_path / "a", hu=hu, **uids)
    _, b = _series(tmp_path / "b", hu=hu, slope=2.0, intercept=-2048.0, **uids)
    files = [(a if k % 2 else b)[k] for k in range(len(a))]
    volume = load_dicom_series(files)
    assert np.array_equal(volume.array, np.maximum(hu, -1024))


def test_pixel_padding_value_and_range(tmp_path):
    hu = _hu()
    hu[:, 0, :] = -3024.0
    hu[:, 1, :] = -2500.0
    _, files = _series(tmp_path, hu=hu, pixel_padding_value=-2000)
    only_value = load_dicom_series(tmp_path, min_hu=None).array
    assert np.all(only_value[:, 0, :] == -1024) and np.all(only_value[:, 1, :] == -2500)
    for f in files:
        _edit(f, lambda ds: ds.add_new(0x00280121, "SS", -1000))  # Pixel Padding Range Limit
    ranged = load_dicom_series(tmp_path, min_hu=None).array
    assert np.all(ranged[:, :2, :] == -1024)
    assert np.array_equal(ranged[:, 2:, :], hu[:, 2:, :])


def test_missing_slice_is_interpolated_with_a_warning(tmp_path):
    hu, files = _series(tmp_path)
    files[3].unlink()
    with pytest.warns(DicomResampledWarning, match="1 missing slice"):
        volume = load_dicom_series(tmp_path)
    assert volume.shape == hu.shape and np.allclose(volume.ijk_to_ras, AXIAL)
    assert np.allclose(volume.array[3], (hu[2] + hu[4]) / 2, atol=1e-3)
    assert np.array_equal(volume.array[[0, 1, 2, 4, 5, 6, 7]], hu[[0, 1, 2, 4, 5, 6, 7]])
    assert "resampled" in volume.meta


def test_irregular_spacing_is_resampled(tmp_path):
    hu, files = _series(tmp_path)
    _edit(
        files[2],
        lambda ds: setattr(
            ds,
            "ImagePositionPatient",
            [float(v) for v in ds.ImagePositionPatient[:2]] + [float(ds.ImagePositionPatient[2]) + 0.5],
        ),
    )
    with pytest.warns(DicomResampledWarning, match="spacing varies"):
        volume = load_dicom_series(tmp_path)
    assert volume.shape == hu.shape and np.allclose(volume.ijk_to_ras, AXIAL)
    w = 0.5 / 3.0  # slice 2 now sits 0.5 mm above its place, 3 mm from slice 1: interpolate
    assert np.allclose(volume.array[2], w * hu[1] + (1 - w) * hu[2], atol=1e-2)
    assert np.array_equal(volume.array[[0, 1, 3, 4]], hu[[0, 1, 3, 4]])


def test_gap_of_many_slices(tmp_path):
    hu, files = _series(tmp_path, hu=_hu((12, 8, 8)))
    for f in files[3:8]:
        f.unlink()
    before = _hashes(tmp_path)
    with pytest.raises(SeriesGeometryError, match="5 slices are missing.*max_gap_slices=2"):
        load_dicom_series(tmp_path)
    with pytest.warns(DicomResampledWarning):
        assert load_dicom_series(tmp_path, max_gap_slices=5).shape == (12, 8, 8)
    assert _hashes(tmp_path) == before


def test_gantry_tilt_is_corrected_by_resampling(tmp_path):
    """Slices acquired on a tilted gantry: each slice's position drifts along the column axis. The
    content is a linear HU ramp in patient space, so the corrected volume is known exactly."""
    n, rows, cols, dz, ps = 6, 20, 16, 2.5, 1.0
    tilt = np.tan(np.radians(15.0)) * dz  # mm of in-plane (column direction) drift per slice
    _, files = _series(
        tmp_path,
        hu=np.zeros((n, rows, cols), np.float32),
        matrix=axis_aligned_matrix((ps, ps, dz), (0, 0, 0), np.diag([-1.0, -1.0, 1.0])),
    )

    def ramp(x, y, z):  # HU as a function of LPS mm
        return 100.0 + 4.0 * x + 6.0 * y + 3.0 * z

    j, i = np.mgrid[0:rows, 0:cols].astype(np.float64)
    for k, f in enumerate(files):

        def tilt_slice(ds, k=k):
            y0 = k * tilt
            ds.ImagePositionPatient = [0.0, y0, k * dz]
            stored = np.rint(ramp(i * ps, y0 + j * ps, k * dz)) + 1024
            ds.PixelData = stored.astype("<i2").tobytes()

        _edit(f, tilt_slice)
    with pytest.warns(DicomResampledWarning, match="gantry tilt of 15.0 degrees"):
        volume = load_dicom_series(tmp_path)
    assert volume.shape == (n, rows, cols)
    assert np.allclose(volume.ijk_to_ras, axis_aligned_matrix((ps, ps, dz), (0, 0, 0), np.diag([-1.0, -1.0, 1.0])))
    kk = np.arange(n)[:, None, None]
    expected = ramp(i[None] * ps, j[None] * ps, kk * dz)
    inside = (j[None] - kk * tilt / ps) >= 0  # rows whose source lies inside the tilted slice
    assert np.allclose(volume.array[inside], np.broadcast_to(expected, volume.shape)[inside], atol=0.51)
    assert np.all(volume.array[~np.broadcast_to(inside, volume.shape)] <= expected.max())


def test_duplicate_positions(tmp_path):
    hu, files = _series(tmp_path)
    copy = _edit(files[4], lambda ds: setattr(ds, "SOPInstanceUID", generate_uid()), tmp_path / "copy.dcm")
    assert np.array_equal(load_dicom_series(tmp_path).array, hu)  # identical pixels: dropped

    def alter(ds):
        ds.PixelData = (ds.pixel_array + 1).astype("<i2").tobytes()

    _edit(copy, alter)
    with pytest.raises(SeriesGeometryError, match="same position") as err:
        load_dicom_series(tmp_path)
    assert "copy.dcm" in str(err.value) and files[4].name in str(err.value)


def test_sequential_acquisitions_stay_one_volume_overlapping_ones_split(tmp_path):
    hu, files = _series(tmp_path / "seq")
    for k, f in enumerate(files):
        _edit(f, lambda ds, k=k: setattr(ds, "AcquisitionNumber", 1 + k // 4))
    assert np.array_equal(load_dicom_series(tmp_path / "seq").array, hu)
    uids = dict(study_uid=generate_uid(), series_uid=generate_uid(), frame_of_reference_uid=generate_uid())
    uid = uids["series_uid"]
    _, first = _series(tmp_path / "rep", **uids)
    _, second = _series(tmp_path / "rep2", hu=_hu(seed=5), **uids)
    for f in second:
        _edit(f, lambda ds: setattr(ds, "AcquisitionNumber", 2))
        shutil.move(str(f), tmp_path / "rep" / f"second-{f.name}")
    parts = list_dicom_series(tmp_path / "rep")
    assert [(p.key, p.acquisition, p.n_slices) for p in parts] == [(f"{uid}#1", 1, 8), (f"{uid}#2", 2, 8)]
    with pytest.raises(SeriesGeometryError, match="overlapping acquisitions"):
        load_dicom_series(tmp_path / "rep")
    assert np.array_equal(load_dicom_series(tmp_path / "rep", series_uid=f"{uid}#2").array, _hu(seed=5))


def test_mixed_orientations_in_one_series(tmp_path):
    uid = generate_uid()
    coronal = axis_aligned_matrix((0.8, 2.5, 0.8), (0, 0, 0), np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]]))
    hu_axial, _ = _series(tmp_path, series_uid=uid)
    hu_coronal, _ = _series(tmp_path / "sub", hu=_hu((5, 16, 16), seed=3), matrix=coronal, series_uid=uid)
    with pytest.raises(SeriesGeometryError, match=f"{uid}#1") as err:
        load_dicom_series(tmp_path)
    assert f"{uid}#2" in str(err.value)
    parts = {p.n_slices: p for p in list_dicom_series(tmp_path)}
    assert np.array_equal(load_dicom_series(tmp_path, series_uid=parts[8].key).array, hu_axial)
    assert np.array_equal(load_dicom_series(tmp_path, series_uid=parts[5].key).array, hu_coronal)
    with pytest.raises(SeriesGeometryError):  # the bare UID names both stacks
        load_dicom_series(tmp_path, series_uid=uid)


def test_two_ct_series_are_ambiguous_and_can_be_picked(tmp_path):
    hu_a, a = _series(tmp_path / "a", series_description="lung kernel")
    hu_b, b = _series(tmp_path / "b", hu=_hu((6, 16, 16), seed=2), series_description="soft kernel")
    with pytest.raises(AmbiguousSeriesError) as err:
        load_dicom_series(tmp_path)
    uid_a, uid_b = (pydicom.dcmread(x[0], stop_before_pixels=True).SeriesInstanceUID for x in (a, b))
    message = str(err.value)
    for text in (uid_a, uid_b, "lung kernel", "soft kernel", "8 slice(s)", "6 slice(s)", "CT"):
        assert text in message
    # the user must pick one: each series with its patient ID and folder (issue 24), never the name
    assert f"patient 'LGC-PHANTOM'  in {tmp_path / 'a'}" in message and f"in {tmp_path / 'b'}" in message
    assert "LungGradCAM^Phantom" not in message  # the patient name
    assert np.array_equal(load_dicom_series(tmp_path, series_uid=uid_b).array, hu_b)
    infos = list_dicom_series(tmp_path)
    assert all(isinstance(i, SeriesInfo) for i in infos) and {i.series_uid for i in infos} == {uid_a, uid_b}
    info_a = next(i for i in infos if i.series_uid == uid_a)
    assert (info_a.n_files, info_a.rows, info_a.cols, info_a.modality, info_a.key) == (8, 16, 16, "CT", uid_a)
    assert info_a.files == tuple(sorted(a)) and info_a.pixel_spacing == (0.8, 0.8)
    with pytest.raises(NoSeriesFoundError, match="no series '1.2.3'"):
        load_dicom_series(tmp_path, series_uid="1.2.3")


def test_non_dicom_files_dicomdir_and_non_images_are_ignored(tmp_path):
    hu, files = _series(tmp_path / "patient" / "study" / "series")
    (tmp_path / "README.txt").write_text("not DICOM")
    (tmp_path / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    (tmp_path / "DICOMDIR").write_bytes(files[0].read_bytes())  # skipped by name

    def to_structure_set(ds):
        for keyword in (
            "Rows",
            "Columns",
            "PixelData",
            "BitsAllocated",
            "BitsStored",
            "HighBit",
            "PixelRepresentation",
            "SamplesPerPixel",
            "PhotometricInterpretation",
        ):
            delattr(ds, keyword)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"  # RT Structure Set
        ds.Modality = "RTSTRUCT"

    _edit(files[0], to_structure_set, tmp_path / "rtstruct.dcm")
    before = _hashes(tmp_path)
    assert np.array_equal(load_dicom_series(tmp_path).array, hu)
    assert [i.n_slices for i in list_dicom_series(tmp_path)] == [8]
    assert _hashes(tmp_path) == before


def test_file_without_preamble_implicit_vr(tmp_path):
    hu, files = _series(tmp_path)

    def strip(ds):
        ds.preamble = None
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
        if not PYDICOM_3:  # pydicom 2 writes "like the original" in the encoding it read, whatever the meta says
            ds.is_implicit_VR, ds.is_little_endian = True, True

    _edit(files[2], strip)
    ds = files[2].read_bytes()
    assert ds[128:132] != b"DICM"
    assert np.array_equal(load_dicom_series(tmp_path).array, hu)


def test_elements_stored_as_un_use_their_dictionary_vr(tmp_path):
    """Some anonymisers rewrite standard elements with VR UN; their bytes keep the real encoding."""
    hu, files = _series(tmp_path)
    data = files[3].read_bytes()
    for group, element, vr in ((0x0028, 0x0010, b"US"), (0x0020, 0x0032, b"DS"), (0x0028, 0x1052, b"DS")):
        tag = group.to_bytes(2, "little") + element.to_bytes(2, "little")
        at = data.index(tag + vr)
        length = int.from_bytes(data[at + 6 : at + 8], "little")
        un = tag + b"UN\x00\x00" + length.to_bytes(4, "little")  # explicit VR UN: 4-byte length
        data = data[:at] + un + data[at + 8 :]
    files[3].write_bytes(data)
    assert pydicom.dcmread(files[3], stop_before_pixels=True).get_item(0x00280010).VR == "UN"
    assert np.array_equal(load_dicom_series(tmp_path).array, hu)


# --------------------------------------------------------------------------------------------
# bad inputs: each raises its specific error naming the file or series; inputs stay untouched
# --------------------------------------------------------------------------------------------
def _broken(tmp_path: Path, change) -> tuple:
    _, files = _series(tmp_path, hu=_hu((4, 16, 16)))
    change(files[1])
    return files[1], _hashes(tmp_path)


def _unknown_syntax(f: Path) -> None:
    def change(ds):
        ds.file_meta.TransferSyntaxUID = pydicom.uid.MPEG2MPML  # video: pydicom has no decoder
        ds.PixelData = encapsulate([b"\xff\x0a" + bytes(64)])
        ds["PixelData"].VR = "OB"

    _edit(f, change)


def _garbage(f: Path) -> None:
    f.write_bytes(bytes(128) + b"DICM" + os.urandom(300))


def _colour(f: Path) -> None:
    def change(ds):
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.PixelData = bytes(16 * 16 * 3)

    _edit(f, change)


def _no_position(f: Path) -> None:
    _edit(f, lambda ds: delattr(ds, "ImagePositionPatient"))


def _parallel_cosines(f: Path) -> None:
    _edit(f, lambda ds: setattr(ds, "ImageOrientationPatient", [1, 0, 0, 1, 0, 0]))


def _zero_rows(f: Path) -> None:
    _edit(f, lambda ds: setattr(ds, "Rows", 0))


def _nan_slope(f: Path) -> None:
    _edit(f, lambda ds: setattr(ds, "RescaleSlope", "NaN"))


def _infinite_intercept(f: Path) -> None:
    _edit(f, lambda ds: setattr(ds, "RescaleIntercept", "1e400"))


def _absurd_frames(f: Path) -> None:
    _edit(f, lambda ds: setattr(ds, "NumberOfFrames", 2_000_000_000))


@pytest.mark.parametrize(
    "change, error, text",
    [
        (truncate, DicomDecodeError, "truncated"),
        (truncate_header, DicomDecodeError, "truncated or damaged"),
        (drop_pixels, DicomDecodeError, "without Pixel Data"),
        (short_pixels, DicomDecodeError, "Pixel Data holds 256 bytes"),
        (_unknown_syntax, DicomDecodeError, "no decoder available"),
        (_garbage, DicomDecodeError, "unreadable DICOM"),
        (_colour, DicomDecodeError, "colour"),
        (_no_position, SeriesGeometryError, "lacks ImagePositionPatient"),
        (_parallel_cosines, SeriesGeometryError, "invalid ImageOrientationPatient"),
        (_zero_rows, DicomDecodeError, "Rows x Columns is 0 x 16"),
        (_nan_slope, DicomDecodeError, "RescaleSlope nan"),
        (_infinite_intercept, DicomDecodeError, "RescaleIntercept inf"),
        (_absurd_frames, DicomDecodeError, "declares 2000000000 frames"),
    ],
)
def test_bad_file_names_the_file(tmp_path, change, error, text):
    bad, before = _broken(tmp_path, change)
    with pytest.raises(error, match=text) as err:
        load_dicom_series(tmp_path)
    assert str(bad) in str(err.value) and isinstance(err.value, LungGradCAMError)
    assert _hashes(tmp_path) == before


def test_unreadable_files(tmp_path):
    _, files = _series(tmp_path, hu=_hu((3, 8, 8)))
    os.symlink(tmp_path / "gone.dcm", tmp_path / "link.dcm")
    with pytest.raises(DicomDecodeError, match="link.dcm: cannot read the file"):
        load_dicom_series(tmp_path)
    with pytest.raises(DicomDecodeError, match="nothere.dcm: cannot read the file"):
        load_dicom_series(files + [tmp_path / "nothere.dcm"])
    (tmp_path / "link.dcm").unlink()
    if os.geteuid() != 0:  # root reads anything
        files[0].chmod(0)
        with pytest.raises(DicomDecodeError, match=files[0].name):
            load_dicom_series(tmp_path)


def test_empty_and_non_ct_and_single_slice(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(NoSeriesFoundError, match="no DICOM images"):
        load_dicom_series(tmp_path / "empty")
    with pytest.raises(NoSeriesFoundError, match="no such file or folder"):
        load_dicom_series(tmp_path / "absent")
    hu, files = _series(tmp_path / "mr", hu=_hu((3, 8, 8)) - 1500)
    for f in files:
        _edit(f, lambda ds: setattr(ds, "Modality", "MR"))
    with pytest.raises(NoSeriesFoundError, match="no CT series") as err:
        load_dicom_series(tmp_path / "mr")
    assert "MR" in str(err.value)
    uid = list_dicom_series(tmp_path / "mr")[0].series_uid
    assert np.array_equal(load_dicom_series(tmp_path / "mr", series_uid=uid).array, hu)  # no HU floor for MR
    _, one = _series(tmp_path / "one", hu=_hu((1, 8, 8)))
    with pytest.raises(SeriesGeometryError, match="single slice") as err:
        load_dicom_series(tmp_path / "one")
    assert str(one[0]) in str(err.value)


def test_voxel_limit_is_checked_before_decoding(tmp_path, monkeypatch):
    _series(tmp_path, hu=_hu((4, 16, 16)))
    monkeypatch.setenv("LUNGGRADCAM_MAX_VOXELS", "1000")
    with pytest.raises(VolumeError, match="exceeds the limit"):
        load_dicom_series(tmp_path)
