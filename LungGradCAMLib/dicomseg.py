"""DICOM Segmentation objects (highdicom) for a :class:`Segmentation` of a CT loaded from DICOM.

The DICOM SEG references the source CT series (same Study, Frame of Reference, per-frame source
image references), so it can be imported into Slicer's DICOM database or a PACS next to the CT.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Union

import numpy as np

from . import __version__
from .atomic import atomic_path
from .errors import DicomError, InvalidInputError
from .results import Segmentation
from .volume import LPS_TO_RAS, Volume


def _source_datasets(ct: Volume) -> List["pydicom.Dataset"]:  # noqa: F821
    """The CT's source slices in the volume's k order, checked slice by slice against its geometry."""
    import pydicom

    from .dicom import list_dicom_series

    source, uid = ct.meta.get("source"), ct.meta.get("series_uid")
    if not source or not uid:
        raise InvalidInputError("a DICOM Segmentation needs a CT loaded from DICOM (its source series); "
                                "this volume has no DICOM source")
    if ct.meta.get("resampled"):
        raise DicomError(f"series {uid} was resampled on loading ({ct.meta['resampled']}); its slices no "
                         "longer match the volume, so no DICOM Segmentation can reference them")
    key = ct.meta.get("series_part", uid)
    infos = [s for s in list_dicom_series(source) if s.key == key]
    if not infos:
        raise DicomError(f"series {uid}: its source files are no longer in {source}")
    datasets = [pydicom.dcmread(str(f)) for f in infos[0].files]
    # each slice's ImagePositionPatient (LPS) must be the volume's voxel (0, 0, k)
    lps_origin = (LPS_TO_RAS @ ct.ijk_to_ras)[:3]
    by_k = {}
    for ds in datasets:
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        k = float(np.linalg.lstsq(lps_origin[:, 2:3], ipp - lps_origin[:, 3], rcond=None)[0][0])
        by_k[int(round(k))] = ds
    if sorted(by_k) != list(range(ct.shape[0])):
        raise DicomError(f"series {uid}: its {len(datasets)} files do not match the volume's {ct.shape[0]} slices "
                         "(enhanced multi-frame or deduplicated slices); no DICOM Segmentation written")
    return [by_k[k] for k in range(ct.shape[0])]


def write_dicom_seg(segmentation: Segmentation, ct: Volume, path: Union[str, os.PathLike]) -> Path:
    """Write ``segmentation`` (labels 1..N on ``ct``'s grid) as a binary DICOM SEG at ``path``.

    Raises :class:`InvalidInputError` when there is no region (a SEG needs one segment) or the CT
    did not come from DICOM, :class:`DicomError` when its slices cannot be matched.
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as exc:
        raise InvalidInputError("writing DICOM SEG needs highdicom: pip install 'LungGradCAMLib[dicomseg]'") from exc

    if not segmentation.regions:
        raise InvalidInputError("no hot region to store: a DICOM Segmentation needs at least one segment "
                                "(lower the threshold, or leave out --dicom-seg)")
    if segmentation.labelmap.shape != ct.shape:
        raise InvalidInputError("the segmentation and the CT have different shapes")
    sources = _source_datasets(ct)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="LungGradCAM", version=__version__, family=codes.cid7162.ArtificialIntelligence)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1, segment_label=region.name[:64],
            segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
            segmented_property_type=codes.SCT.Lesion,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm)
        for i, region in enumerate(segmentation.regions)]
    # labels in the labelmap -> segment numbers 1..N in region order
    lut = np.zeros(int(segmentation.labelmap.array.max()) + 1, dtype=np.uint8)
    for i, region in enumerate(segmentation.regions):
        lut[region.label] = i + 1
    pixels = lut[segmentation.labelmap.array.astype(np.int64)]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY, segment_descriptions=descriptions,
        series_instance_uid=hd.UID(), series_number=9001, sop_instance_uid=hd.UID(), instance_number=1,
        manufacturer="LungGradCAM", manufacturer_model_name="LungGradCAM Grad-CAM",
        software_versions=__version__, device_serial_number="0",
        series_description="LungGradCAM hot regions")
    with atomic_path(path) as tmp:
        seg.save_as(str(tmp))
    return Path(path)
