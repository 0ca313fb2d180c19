"""DICOM Segmentation objects (highdicom) for a :class:`Segmentation` of a CT loaded from DICOM.

The DICOM SEG references the source CT series (same Study, Frame of Reference, per-frame source
image references), so it can be imported into Slicer's DICOM database or a research PACS next to
the CT. Each segment is coded as what it is, a region of a heat map (category "Spatial and
Relational Concept", type "Gradient-weighted class activation" for Grad-CAM and its kin), never as
a finding such as a lesion, and the series says it comes from a research model. A nodule outline
(made at a region's heat-map peak) is coded as what it is, a lesion outline: category SCT 49755003
"Morphologically Abnormal Structure", type SCT 27925004 "Nodule", anatomic region SCT 39607008
"Lung", made automatically by the outline algorithm named in its algorithm identification.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

import numpy as np

from .. import __version__
from ..core.atomic import atomic_path
from ..core.errors import DicomError, InvalidInputError
from ..core.results import Segmentation
from ..core.volume import LPS_TO_RAS, Volume
from .dicom_write import save_dicom_file


def _source_datasets(ct: Volume) -> List["pydicom.Dataset"]:  # noqa: F821
    """The CT's source slices in the volume's k order, checked slice by slice against its geometry."""
    import pydicom

    from .dicom_series import list_dicom_series

    files, uid = ct.meta.get("source_files"), ct.meta.get("series_uid")
    if not files or not uid:
        raise InvalidInputError(
            "a DICOM Segmentation needs a CT loaded from DICOM (its source series); this volume has no DICOM source"
        )
    if ct.meta.get("resampled"):
        raise DicomError(
            f"series {uid} was resampled on loading ({ct.meta['resampled']}); its slices no "
            "longer match the volume, so no DICOM Segmentation can reference them"
        )
    key = ct.meta.get("series_part", uid)
    infos = [s for s in list_dicom_series(files) if s.key == key]  # the files it was loaded from, read again
    if not infos:
        raise DicomError(f"series {uid}: its source files ({ct.meta.get('source')}) no longer hold it")
    datasets = [pydicom.dcmread(str(f)) for f in infos[0].files]
    # each slice's ImagePositionPatient (LPS) must be the volume's voxel (0, 0, k)
    lps_origin = (LPS_TO_RAS @ ct.ijk_to_ras)[:3]
    by_k = {}
    for ds in datasets:
        ipp = np.array(ds.ImagePositionPatient, dtype=float)
        k = float(np.linalg.lstsq(lps_origin[:, 2:3], ipp - lps_origin[:, 3], rcond=None)[0][0])
        by_k[int(round(k))] = ds
    if sorted(by_k) != list(range(ct.shape[0])):
        raise DicomError(
            f"series {uid}: its {len(datasets)} files do not match the volume's {ct.shape[0]} slices "
            "(enhanced multi-frame or deduplicated slices); no DICOM Segmentation written"
        )
    return [by_k[k] for k in range(ct.shape[0])]


def content_description(intended_use: Optional[str]) -> str:
    """The SEG's ContentDescription (LO, at most 64 characters): the intended use, shortened at a
    word boundary with "..." when longer, never cut mid-word."""
    import textwrap

    return textwrap.shorten(intended_use or "Research use only. Not for clinical use.", width=64, placeholder="...")


#: The heat map a segment was cut from, as DICOM codes it (DCM, CID 7180), by CAM method: (code
#: value, meaning). Written out, not taken from pydicom's code dictionary, whose 2.4 (Slicer's)
#: lacks these codes.
_HEAT_MAP_CODES = {
    "gradcam": ("130403", "Gradient-weighted class activation"),
    "scorecam": ("130402", "Class activation"),
    "guided-backprop": ("130404", "Saliency"),
}
#: Series description: DICOM LO, at most 64 characters.
SERIES_DESCRIPTION = "LungGradCAM heat-map regions - research only, not clinical"


def write_dicom_seg(
    segmentation: Segmentation,
    ct: Volume,
    path: Union[str, os.PathLike],
    *,
    method: str = "gradcam",
    intended_use: Optional[str] = None,
) -> Path:
    """Write ``segmentation`` (labels 1..N on ``ct``'s grid) as a binary DICOM SEG at ``path``.

    Segments are labelled by their region names ("heat-map region 1", ...) and coded as regions of
    the ``method``'s heat map, not as lesions; its nodule outlines ("nodule outline 1", ...) follow
    as segments of their own (they overlap the regions), coded as lung nodules found automatically.
    With outlines the SEG covers the slices that hold a segment. The series description says
    research use only and ``intended_use`` (the model card's) goes into the content description
    (DICOM LO: 64 characters, shortened at a word with "..." when longer: :func:`content_description`).

    Raises :class:`InvalidInputError` when there is no region (a SEG needs one segment) or the CT
    did not come from DICOM, :class:`DicomError` when its slices cannot be matched.
    """
    try:
        import highdicom as hd
        from pydicom.sr.codedict import codes
    except ImportError as exc:
        raise InvalidInputError(
            "writing a DICOM SEG needs highdicom, which this installation lacks: pip install highdicom"
        ) from exc

    if not segmentation.regions:
        raise InvalidInputError(
            "no hot region to store: a DICOM Segmentation needs at least one segment "
            "(lower the threshold, or leave out --dicom-seg)"
        )
    if segmentation.labelmap.shape != ct.shape:
        raise InvalidInputError("the segmentation and the CT have different shapes")
    sources = _source_datasets(ct)
    algorithm = hd.AlgorithmIdentificationSequence(
        name="LungGradCAM", version=__version__, family=codes.cid7162.ArtificialIntelligence
    )
    from pydicom.sr.coding import Code

    value, meaning = _HEAT_MAP_CODES.get(method, _HEAT_MAP_CODES["gradcam"])
    heat_map = Code(value, "DCM", meaning)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=region.name[:64],
            segmented_property_category=codes.SCT.SpatialAndRelationalConcept,
            segmented_property_type=heat_map,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
        )
        for i, region in enumerate(segmentation.regions)
    ]
    for n, outline in enumerate(segmentation.outlines, start=len(descriptions) + 1):
        descriptions.append(
            hd.seg.SegmentDescription(
                segment_number=n,
                segment_label=outline.name[:64],
                segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
                segmented_property_type=codes.SCT.Nodule,
                anatomic_regions=[codes.SCT.Lung],
                algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
                algorithm_identification=hd.AlgorithmIdentificationSequence(
                    name=f"LungGradCAM nodule outline ({outline.method})",
                    version=__version__,
                    family=(
                        codes.cid7162.ArtificialIntelligence
                        if outline.method == "network"
                        else codes.cid7162.MorphologicalOperations
                    ),
                    parameters={"seed": "the heat map's peak in a hot region", "model": outline.model or "none"},
                ),
                tracking_id=outline.name[:64],
                tracking_uid=hd.UID(),
            )
        )
    labels = segmentation.labelmap.array
    if segmentation.outlines:  # overlapping segments: one binary channel each, on the slices that hold one
        outlines = segmentation.outline_labels()
        held = np.flatnonzero((labels > 0).any(axis=(1, 2)) | (outlines > 0).any(axis=(1, 2)))
        k0, k1 = int(held[0]), int(held[-1]) + 1
        pixels = np.stack(
            [labels[k0:k1] == r.label for r in segmentation.regions]
            + [outlines[k0:k1] == o.label for o in segmentation.outlines],
            axis=-1,
        )
        sources = sources[k0:k1]
    else:  # labels in the labelmap -> segment numbers 1..N in region order
        lut = np.zeros(int(labels.max()) + 1, dtype=np.uint8)
        for i, region in enumerate(segmentation.regions):
            lut[region.label] = i + 1
        pixels = lut[labels.astype(np.int64)]
    seg = hd.seg.Segmentation(
        source_images=sources,
        pixel_array=pixels,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions,
        series_instance_uid=hd.UID(),
        series_number=9001,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="LungGradCAM",
        manufacturer_model_name="LungGradCAM Grad-CAM",
        software_versions=__version__,
        device_serial_number="0",
        series_description=SERIES_DESCRIPTION,
        content_label="HEATMAP",
        content_description=content_description(intended_use),
    )
    with atomic_path(path) as tmp:
        save_dicom_file(seg, tmp)
    return Path(path)
