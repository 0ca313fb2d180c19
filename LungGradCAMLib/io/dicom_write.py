"""Writing a volume as a DICOM CT series (CT Image Storage: int16 with RescaleSlope/Intercept,
oblique geometry, optional lossless compression) that Slicer, SimpleITK, pydicom and
:func:`~LungGradCAMLib.io.dicom.load_dicom_series` read back exactly."""

from __future__ import annotations

import random
from pathlib import Path
from typing import List, Optional

import numpy as np

from ..core.atomic import atomic_path
from ..core.errors import VolumeError
from ..core.volume import AIR_HU, LPS_TO_RAS, Volume
from .dicom_headers import CT_IMAGE_STORAGE, PathLike

#: write_dicom_series' lossless compressions: RLE Lossless, JPEG-LS Lossless, JPEG 2000 Lossless.
_COMPRESSIONS = {
    "rle": "1.2.840.10008.1.2.5",
    "jpeg-ls": "1.2.840.10008.1.2.4.80",
    "jpeg2000": "1.2.840.10008.1.2.4.90",
}


def _pydicom_version() -> str:
    import pydicom

    return pydicom.__version__


#: pydicom 3 or newer (Slicer 5.8 and 5.10 bundle pydicom 2.4.4: no JPEG-LS/JPEG 2000 encoding there).
_PYDICOM_3 = int(_pydicom_version().split(".")[0]) >= 3


def save_dicom_file(ds: "pydicom.Dataset", path: PathLike, enforce_file_format: bool = True) -> None:  # noqa: F821
    """Write ``ds`` as a DICOM file (preamble, file meta; else as it was read) with pydicom 3 or 2
    (Slicer bundles 2.4.4, whose ``save_as`` calls it ``write_like_original=False``)."""
    if _PYDICOM_3:
        ds.save_as(path, enforce_file_format=enforce_file_format)
    else:
        ds.save_as(path, write_like_original=not enforce_file_format)


def _ds_string(value: float) -> str:
    from pydicom.valuerep import format_number_as_ds

    return format_number_as_ds(float(value))


def write_dicom_series(
    volume: Volume,
    folder: PathLike,
    *,
    shuffle_names: bool = False,
    patient_id: str = "LGC-PHANTOM",
    patient_name: str = "LungGradCAM^Phantom",
    study_uid: Optional[str] = None,
    series_uid: Optional[str] = None,
    frame_of_reference_uid: Optional[str] = None,
    series_description: str = "LungGradCAM phantom",
    series_number: int = 1,
    study_description: str = "LungGradCAM",
    slope: float = 1.0,
    intercept: float = AIR_HU,
    pixel_padding_value: Optional[int] = None,
    compression: Optional[str] = None,
) -> List[Path]:
    """Write ``volume`` (array K, J, I in HU; any ijk_to_ras with orthogonal axes) as a CT Image
    Storage series into ``folder``.

    One file per k slice, int16 stored values with RescaleSlope/RescaleIntercept (HU = stored *
    slope + intercept, rounded to the nearest stored value), ImagePositionPatient and
    ImageOrientationPatient from ``ijk_to_ras`` (RAS -> LPS here) including oblique ones,
    PixelSpacing, SliceThickness/SpacingBetweenSlices (k spacing, mm), generated UIDs unless given.
    ``pixel_padding_value`` (a stored value) is written as Pixel Padding Value. ``compression``:
    None (explicit VR little endian), "rle", "jpeg-ls" or "jpeg2000" (all lossless). With
    ``shuffle_names`` file names do not follow slice order. Files are written atomically; the
    returned paths are in k order. Readers order slices along i x j, so a volume whose k axis
    points the other way comes back with k reversed (same voxels in space).
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian, generate_uid

    if compression is not None and compression not in _COMPRESSIONS:
        raise VolumeError(f"compression must be None or one of {', '.join(_COMPRESSIONS)}; got {compression!r}")
    if compression not in (None, "rle") and not _PYDICOM_3:
        raise VolumeError(
            f"{compression} encoding needs pydicom 3 (this is pydicom {_pydicom_version()}, as "
            "Slicer bundles it); write with compression='rle' or None here"
        )
    if not slope or not np.isfinite(slope) or not np.isfinite(intercept):
        raise VolumeError(
            f"RescaleSlope must be finite and non-zero and the intercept finite; got "
            f"slope={slope}, intercept={intercept}"
        )
    lps = LPS_TO_RAS @ volume.ijk_to_ras
    axes = lps[:3, :3]
    spacing = np.linalg.norm(axes, axis=0)
    unit = axes / spacing
    gram = unit.T @ unit
    if np.max(np.abs(gram - np.eye(3))) > 1e-6:
        raise VolumeError(
            "the volume's axes are not orthogonal (sheared ijk_to_ras); DICOM slices can "
            "only express orthogonal axes: resample the volume onto an orthogonal grid first"
        )
    hu = np.asarray(volume.array)
    if hu.dtype.kind == "f" and not np.all(np.isfinite(hu)):
        raise VolumeError("the volume holds NaN or infinite values; replace them before writing DICOM")
    stored = np.rint((hu.astype(np.float64) - intercept) / slope)
    lo, hi = (float(stored.min()), float(stored.max())) if stored.size else (0.0, 0.0)
    if lo < -32768 or hi > 32767:
        raise VolumeError(
            f"HU range {hu.min()}..{hu.max()} does not fit int16 with slope={slope}, "
            f"intercept={intercept}; choose a larger slope or another intercept"
        )
    stored = stored.astype(np.int16)

    study_uid = study_uid or generate_uid()
    series_uid = series_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    iop = [_ds_string(v) for v in np.concatenate([unit[:, 0], unit[:, 1]])]
    n = hu.shape[0]
    names = list(range(n))
    if shuffle_names:
        random.Random(series_uid).shuffle(names)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k in range(n):
        ds = Dataset()
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.ImageType = ["DERIVED", "SECONDARY", "AXIAL"]
        ds.SOPClassUID = CT_IMAGE_STORAGE
        ds.SOPInstanceUID = generate_uid()
        ds.StudyDate = ds.SeriesDate = ds.ContentDate = ""
        ds.StudyTime = ds.SeriesTime = ds.ContentTime = ""
        ds.AccessionNumber = ""
        ds.Modality = "CT"
        ds.Manufacturer = "LungGradCAM"
        ds.ReferringPhysicianName = ""
        ds.StudyDescription = study_description
        ds.SeriesDescription = series_description
        ds.PatientName = patient_name
        ds.PatientID = patient_id
        ds.PatientBirthDate = ""
        ds.PatientSex = ""
        ds.SliceThickness = _ds_string(spacing[2])
        ds.KVP = ""
        ds.SpacingBetweenSlices = _ds_string(spacing[2])
        ds.PatientPosition = "HFS"
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.StudyID = ""
        ds.SeriesNumber = series_number
        ds.AcquisitionNumber = 1
        ds.InstanceNumber = k + 1
        ipp = lps[:3, 3] + k * axes[:, 2]
        ds.ImagePositionPatient = [_ds_string(v) for v in ipp]
        ds.ImageOrientationPatient = iop
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.SliceLocation = _ds_string(float(ipp @ np.cross(unit[:, 0], unit[:, 1])))
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows, ds.Columns = int(hu.shape[1]), int(hu.shape[2])
        # PixelSpacing is (row spacing = along j, column spacing = along i)
        ds.PixelSpacing = [_ds_string(spacing[1]), _ds_string(spacing[0])]
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        if pixel_padding_value is not None:
            ds.add_new(0x00280120, "SS", int(pixel_padding_value))
        ds.WindowCenter, ds.WindowWidth = "-600", "1500"
        ds.RescaleIntercept = _ds_string(intercept)
        ds.RescaleSlope = _ds_string(slope)
        ds.RescaleType = "HU"
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = ds.SOPClassUID
        meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        ds.file_meta = meta
        ds.PixelData = np.ascontiguousarray(stored[k]).astype("<i2").tobytes()
        if compression is not None:
            try:
                ds.compress(_COMPRESSIONS[compression], stored[k])
            except Exception as exc:  # encoder plugins raise assorted types
                raise VolumeError(
                    f"cannot {compression}-compress slices of {hu.shape[1]}x{hu.shape[2]} "
                    f"pixels ({exc}); JPEG 2000 needs at least 32x32, or write uncompressed"
                ) from None
        path = folder / f"IMG{names[k]:05d}.dcm"
        with atomic_path(path) as tmp:
            save_dicom_file(ds, tmp)
        paths.append(path)
    return paths
