"""write_dicom_series: a valid CT Image Storage series that SimpleITK/GDCM, pydicom, Slicer's own
reader and our loader read back with identical HU (after int16 rounding) and geometry."""

from __future__ import annotations

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from LungGradCAMLib.core.errors import VolumeError
from LungGradCAMLib.core.volume import LPS_TO_RAS, Volume, axis_aligned_matrix
from LungGradCAMLib.io.dicom import load_dicom_series
from LungGradCAMLib.io.dicom_write import write_dicom_series

from helpers import PYDICOM_3, encoder_available

OBLIQUE = Rotation.from_euler("xyz", [20, -10, 35], degrees=True).as_matrix()
GEOMETRIES = {
    "axial_ras": axis_aligned_matrix((0.7, 0.8, 2.5), (10.0, -20.0, 30.0)),
    "axial_lps": axis_aligned_matrix((0.6, 0.6, 1.25), (120.0, 140.0, -80.0), np.diag([-1.0, -1.0, 1.0])),
    "oblique": axis_aligned_matrix((0.7, 0.8, 2.5), (10.0, -20.0, 30.0), OBLIQUE),
    "coronal": axis_aligned_matrix(
        (0.9, 2.0, 0.9), (-50.0, 5.0, 60.0), np.array([[1.0, 0, 0], [0, 0, 1.0], [0, -1.0, 0]])
    ),
}


def _hu(shape=(7, 20, 24), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).normal(-300, 400, shape).clip(-1024, 3000).astype(np.float32)


def _expected(hu: np.ndarray, slope: float = 1.0, intercept: float = -1024.0) -> np.ndarray:
    """What a reader returns: the stored int16 rounding, then our loader's floor at -1024 HU."""
    hu = hu.astype(np.float64)  # as the writer computes
    return np.maximum(np.rint((hu - intercept) / slope) * slope + intercept, -1024).astype(np.float32)


def _sitk_read(files) -> Volume:
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(str(files[0].parent)))
    return Volume.from_sitk(reader.Execute())


@pytest.mark.parametrize("name", sorted(GEOMETRIES))
def test_round_trip_ours_and_simpleitk(tmp_path, name):
    hu = _hu()
    volume = Volume(hu, GEOMETRIES[name])
    files = write_dicom_series(volume, tmp_path, shuffle_names=True)
    assert len(files) == hu.shape[0] and all(f.is_file() for f in files)
    ours = load_dicom_series(tmp_path)
    assert np.allclose(ours.ijk_to_ras, volume.ijk_to_ras, atol=1e-6, rtol=0)
    assert np.array_equal(ours.array, _expected(hu))
    theirs = _sitk_read(files)
    assert np.allclose(theirs.ijk_to_ras, volume.ijk_to_ras, atol=1e-6, rtol=0)
    assert np.array_equal(np.maximum(theirs.array, -1024), _expected(hu))


def test_shuffled_names_do_not_follow_slice_order(tmp_path):
    files = write_dicom_series(Volume(_hu((12, 8, 8)), GEOMETRIES["axial_ras"]), tmp_path, shuffle_names=True)
    assert [f.name for f in files] != sorted(f.name for f in files)
    z = [float(pydicom.dcmread(f, stop_before_pixels=True).ImagePositionPatient[2]) for f in files]
    assert z == sorted(z)  # returned in k order, whatever the names
    again = write_dicom_series(Volume(_hu((12, 8, 8)), GEOMETRIES["axial_ras"]), tmp_path / "plain")
    assert [f.name for f in again] == sorted(f.name for f in again)


def test_pydicom_sees_valid_ct_files(tmp_path):
    hu = _hu((3, 10, 12))
    volume = Volume(hu, GEOMETRIES["oblique"])
    files = write_dicom_series(
        volume, tmp_path, slope=0.5, intercept=-1000.0, patient_id="P1", series_description="test series"
    )
    lps = LPS_TO_RAS @ volume.ijk_to_ras
    uids = set()
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        assert ds.preamble is not None and ds.file_meta.TransferSyntaxUID == pydicom.uid.ExplicitVRLittleEndian
        assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" == ds.file_meta.MediaStorageSOPClassUID
        assert ds.SOPInstanceUID == ds.file_meta.MediaStorageSOPInstanceUID
        assert ds.Modality == "CT" and ds.PatientID == "P1" and ds.SeriesDescription == "test series"
        assert ds.InstanceNumber == k + 1 and (ds.Rows, ds.Columns) == (10, 12)
        for tag in (
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "FrameOfReferenceUID",
            "PatientName",
            "StudyDate",
            "ReferringPhysicianName",
            "PositionReferenceIndicator",
            "ImageType",
        ):
            assert tag in ds
        uids.add((ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID))
        assert np.allclose([float(v) for v in ds.ImagePositionPatient], lps[:3, 3] + k * lps[:3, 2], atol=1e-6)
        assert np.allclose(
            [float(v) for v in ds.ImageOrientationPatient],
            np.concatenate([lps[:3, 0] / 0.7, lps[:3, 1] / 0.8]),
            atol=1e-9,
        )
        assert [float(v) for v in ds.PixelSpacing] == [0.8, 0.7]  # (row spacing = j, column spacing = i)
        assert float(ds.SliceThickness) == float(ds.SpacingBetweenSlices) == 2.5
        assert ds.pixel_array.dtype == np.int16
        hu_k = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        assert np.array_equal(hu_k, np.rint((hu[k].astype(np.float64) + 1000.0) / 0.5) * 0.5 - 1000.0)
    assert len(uids) == 1  # one study, series and frame of reference


def test_slope_intercept_and_padding_round_trip(tmp_path):
    hu = _hu((5, 16, 16))
    hu[:, :3, :] = -3024.0  # outside the reconstruction circle
    volume = Volume(hu, GEOMETRIES["axial_lps"])
    write_dicom_series(volume, tmp_path, slope=2.0, intercept=-3072.0, pixel_padding_value=24)
    ds = pydicom.dcmread(next(tmp_path.iterdir()))
    assert ds.PixelPaddingValue == 24 and ds.pixel_array[0, 0] == 24
    raw = load_dicom_series(tmp_path, min_hu=None)
    assert np.all(raw.array[:, :3, :] == -1024.0)  # padding -> air, not -3024 tissue
    expected = np.rint((hu.astype(np.float64) + 3072.0) / 2.0) * 2.0 - 3072.0
    assert np.array_equal(raw.array[:, 3:, :], expected[:, 3:, :])


@pytest.mark.parametrize(
    "compression, syntax",
    [
        ("rle", pydicom.uid.RLELossless),
        ("jpeg-ls", pydicom.uid.JPEGLSLossless),
        ("jpeg2000", pydicom.uid.JPEG2000Lossless),
    ],
)
def test_compressed_series_decode_identically(tmp_path, compression, syntax):
    if compression != "rle" and not PYDICOM_3:  # Slicer's pydicom 2.4 encodes RLE only: said plainly
        with pytest.raises(VolumeError, match=f"{compression} encoding needs pydicom 3"):
            write_dicom_series(Volume(_hu((2, 34, 40)), GEOMETRIES["oblique"]), tmp_path, compression=compression)
        assert not any(tmp_path.iterdir())
        return
    if not encoder_available(syntax):
        pytest.skip(f"no {compression} encoder installed (pyjpegls / pylibjpeg-openjpeg)")
    hu = _hu((4, 34, 40))
    files = write_dicom_series(Volume(hu, GEOMETRIES["oblique"]), tmp_path, compression=compression)
    assert pydicom.dcmread(files[0]).file_meta.TransferSyntaxUID == syntax
    assert np.array_equal(load_dicom_series(tmp_path).array, _expected(hu))
    assert np.array_equal(np.maximum(_sitk_read(files).array, -1024), _expected(hu))  # GDCM agrees


def test_slicer_archetype_reader_reads_it_back(tmp_path):
    """The reader Slicer's DICOM scalar volume plugin uses (vtkMRMLVolumeArchetypeStorageNode)."""
    slicer = pytest.importorskip("slicer")
    import vtk
    from vtk.util.numpy_support import vtk_to_numpy

    hu = _hu((6, 20, 24))
    volume = Volume(hu, GEOMETRIES["oblique"])
    files = write_dicom_series(volume, tmp_path, shuffle_names=True)
    scene = slicer.vtkMRMLScene()
    node = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode")
    storage = scene.AddNewNodeByClass("vtkMRMLVolumeArchetypeStorageNode")
    storage.SetFileName(str(files[0]))
    for f in files:
        storage.AddFileName(str(f))
    storage.SetSingleFile(0)
    assert storage.ReadData(node) == 1
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    ijk_to_ras = np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])
    assert np.allclose(ijk_to_ras, volume.ijk_to_ras, atol=1e-6, rtol=0)
    image = node.GetImageData()
    array = vtk_to_numpy(image.GetPointData().GetScalars()).reshape(image.GetDimensions()[::-1])
    assert np.array_equal(np.maximum(array, -1024), _expected(hu))


def test_left_handed_volume_comes_back_with_k_reversed(tmp_path):
    m = GEOMETRIES["axial_ras"].copy()
    m[:3, 2] *= -1  # k runs inferior: a left-handed index frame
    hu = _hu((5, 8, 9))
    write_dicom_series(Volume(hu, m), tmp_path)
    back = load_dicom_series(tmp_path)
    assert np.array_equal(back.array, _expected(hu)[::-1])
    flipped = m.copy()
    flipped[:3, 2] *= -1
    flipped[:3, 3] = m[:3, 3] + (hu.shape[0] - 1) * m[:3, 2]
    assert np.allclose(back.ijk_to_ras, flipped, atol=1e-6)


def test_phantom_series_read_back_by_simpleitk_and_us(tmp_path):
    from LungGradCAMLib import phantom

    volume = phantom.chest_ct(seed=1, shape=(16, 48, 48), spacing_mm=(4.0, 4.0, 5.0)).volume
    files = write_dicom_series(volume, tmp_path, shuffle_names=True)
    ours, theirs = load_dicom_series(tmp_path), _sitk_read(files)
    assert np.allclose(ours.ijk_to_ras, volume.ijk_to_ras, atol=1e-6)
    assert np.allclose(theirs.ijk_to_ras, volume.ijk_to_ras, atol=1e-6)
    assert np.array_equal(ours.array, _expected(volume.array))
    assert np.array_equal(ours.array, np.maximum(theirs.array, -1024))


def test_refuses_what_dicom_cannot_hold(tmp_path):
    shear = GEOMETRIES["axial_ras"].copy()
    shear[0, 2] = 1.0  # k leans along x: sheared
    with pytest.raises(VolumeError, match="not orthogonal"):
        write_dicom_series(Volume(_hu((2, 4, 4)), shear), tmp_path / "shear")
    with pytest.raises(VolumeError, match="int16"):
        write_dicom_series(Volume(np.full((2, 4, 4), 40000.0), GEOMETRIES["axial_ras"]), tmp_path / "range")
    nan = _hu((2, 4, 4))
    nan[0, 0, 0] = np.nan
    with pytest.raises(VolumeError, match="NaN"):
        write_dicom_series(Volume(nan, GEOMETRIES["axial_ras"]), tmp_path / "nan")
    with pytest.raises(VolumeError, match="compression"):
        write_dicom_series(Volume(_hu((2, 4, 4)), GEOMETRIES["axial_ras"]), tmp_path / "c", compression="zip")
    with pytest.raises(VolumeError, match="32x32" if PYDICOM_3 else "needs pydicom 3"):  # openjpeg's resolution levels
        write_dicom_series(Volume(_hu((2, 8, 8)), GEOMETRIES["axial_ras"]), tmp_path / "j", compression="jpeg2000")
    with pytest.raises(VolumeError, match="slope"):
        write_dicom_series(Volume(_hu((2, 4, 4)), GEOMETRIES["axial_ras"]), tmp_path / "s", slope=0.0)
    assert not any(p.is_file() for p in tmp_path.rglob("*"))  # nothing half-written


def test_given_uids_are_used_and_no_temporaries_remain(tmp_path):
    files = write_dicom_series(
        Volume(_hu((3, 4, 4)), GEOMETRIES["axial_ras"]),
        tmp_path,
        study_uid="1.2.3",
        series_uid="1.2.3.4",
        frame_of_reference_uid="1.2.3.5",
    )
    ds = pydicom.dcmread(files[1], stop_before_pixels=True)
    assert (ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID) == ("1.2.3", "1.2.3.4", "1.2.3.5")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(f.name for f in files)


def test_any_orthogonal_geometry_round_trips_through_dicom_and_nrrd(tmp_path_factory):
    """Property: any rotation, axis flip, spacing and origin survives Volume -> DICOM -> Volume ->
    NRRD -> Volume (right-handed index frames; DICOM readers order slices along i x j)."""
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import strategies as st

    from LungGradCAMLib.io.volume_files import read_volume, write_volume

    @hypothesis.settings(max_examples=20, deadline=None)
    @hypothesis.given(
        angles=st.tuples(*[st.floats(-180, 180, allow_nan=False)] * 3),
        flips=st.tuples(*[st.sampled_from([-1.0, 1.0])] * 2),
        spacing=st.tuples(*[st.floats(0.2, 6.0, allow_nan=False)] * 3),
        origin=st.tuples(*[st.floats(-500, 500, allow_nan=False)] * 3),
    )
    def check(angles, flips, spacing, origin):
        rotation = Rotation.from_euler("xyz", angles, degrees=True).as_matrix()
        direction = rotation @ np.diag([flips[0], flips[1], flips[0] * flips[1]])  # det +1
        volume = Volume(_hu((3, 5, 6)), axis_aligned_matrix(spacing, origin, direction))
        folder = tmp_path_factory.mktemp("prop")
        write_dicom_series(volume, folder)
        back = load_dicom_series(folder)
        assert np.allclose(back.ijk_to_ras, volume.ijk_to_ras, atol=1e-6, rtol=0)
        assert np.array_equal(back.array, _expected(volume.array))
        again = read_volume(write_volume(back, folder / "v.nrrd"))
        assert np.allclose(again.ijk_to_ras, volume.ijk_to_ras, atol=1e-6, rtol=0)
        assert np.array_equal(again.array, back.array)

    check()
