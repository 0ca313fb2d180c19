"""The boundary between Slicer's MRML nodes and the engine's types.

This is the only library module that imports ``slicer``. It needs only MRML and ``slicer.util``
(no Qt, no application), so it runs both inside 3D Slicer and against the ``slicer-core`` wheel
(set ``slicer.mrmlScene = slicer.vtkMRMLScene()`` first there).

Conventions are Slicer's own: arrays are (K, J, I) exactly as ``slicer.util.arrayFromVolume``
returns them, matrices are ``GetIJKToRASMatrix`` (RAS, mm), so no axis or LPS/RAS conversion
happens here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np
import slicer
import vtk

from .core.errors import InvalidInputError, VolumeError
from .core.results import Explanation, Region, Segmentation
from .core.volume import Volume
from .options import ExplainOptions, options_from

__all__ = [
    "CAM_COLOR_NODE_IDS",
    "NodeResult",
    "cam_to_node",
    "cam_volume_rendering",
    "dicom_series_to_node",
    "explain_volume_node",
    "region_to_roi_node",
    "regions_to_table",
    "result_to_nodes",
    "roi_at_point",
    "roi_from_node",
    "segmentation_to_node",
    "volume_from_node",
]

#: Colour tables for the heat map, first one present in the scene wins: Slicer's ColdToHotRainbow
#: and Inferno (loaded from files by the application), then PET-Heat (built in, so also present
#: with slicer-core once a vtkSlicerColorLogic has been given the scene). High CAM = hot colours.
CAM_COLOR_NODE_IDS = (
    "vtkMRMLColorTableNodeFileColdToHotRainbow.txt",
    "vtkMRMLColorTableNodeFileInferno.txt",
    "vtkMRMLPETProceduralColorNodePET-Heat",
)

#: CAM values below this are transparent in slice views and in 3D (the CAM is in [0, 1]).
DEFAULT_HIDE_BELOW = 0.1


def _vtk_matrix(array: np.ndarray) -> vtk.vtkMatrix4x4:
    matrix = vtk.vtkMatrix4x4()
    slicer.util.updateVTKMatrixFromArray(matrix, np.asarray(array, dtype=np.float64))
    return matrix


def _ijk_to_ras(node: Any) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)


def _scene(node: Any) -> Any:
    """The scene ``node`` belongs to, else ``slicer.mrmlScene``."""
    scene = node.GetScene() if node is not None else None
    return scene if scene is not None else slicer.mrmlScene


def _check_not_transformed(node: Any) -> None:
    """Refuse a node whose parent transform moves it: its voxels would not be where the matrix says."""
    transform = node.GetParentTransformNode()
    if transform is None:
        return
    name = node.GetName()
    if not transform.IsTransformToWorldLinear():
        raise VolumeError(
            f"volume {name!r} is under the non-linear transform {transform.GetName()!r}. Harden the "
            "transform first (Data module: right-click the volume > Harden transform), which resamples "
            "the volume, then run LungGradCAM on the hardened volume."
        )
    to_world = vtk.vtkMatrix4x4()
    transform.GetMatrixTransformToWorld(to_world)
    if not np.allclose(slicer.util.arrayFromVTKMatrix(to_world), np.eye(4), atol=1e-9):
        raise VolumeError(
            f"volume {name!r} is under the transform {transform.GetName()!r}, so its voxels are not where "
            "its own geometry says. Harden the transform first (Data module: right-click the volume > "
            "Harden transform), or remove it, then run LungGradCAM again."
        )


def volume_from_node(node: Any) -> Volume:
    """A :class:`Volume` copied from a scalar volume node.

    ``array`` is (K, J, I) with the node's voxel type (HU for CT), ``ijk_to_ras`` is the node's
    ``GetIJKToRASMatrix`` (RAS, mm). ``meta`` holds the node ID and name (never logged).

    Raises :class:`InvalidInputError` when ``node`` is not a volume node, :class:`VolumeError` when
    it has no voxels, more than one component per voxel, or sits under a parent transform that
    moves it (harden the transform first).
    """
    if node is None or not node.IsA("vtkMRMLScalarVolumeNode"):
        kind = "nothing" if node is None else f"a {node.GetClassName()}"
        raise InvalidInputError(
            f"the input must be a scalar volume node (a CT); got {kind}. Select a CT volume as the input."
        )
    image = node.GetImageData()
    name = node.GetName()
    if image is None or min(image.GetDimensions()) < 1 or image.GetPointData().GetScalars() is None:
        raise VolumeError(f"volume {name!r} holds no voxels; load the CT again or pick another volume")
    if image.GetNumberOfScalarComponents() != 1:
        raise VolumeError(
            f"volume {name!r} has {image.GetNumberOfScalarComponents()} components per "
            "voxel (colour or vector image); LungGradCAM needs a scalar CT in HU"
        )
    _check_not_transformed(node)
    array = np.array(slicer.util.arrayFromVolume(node), copy=True)
    return Volume(array, _ijk_to_ras(node), {"mrml_node_id": node.GetID(), "description": name})


def _cam_color_node_id(scene: Any) -> Optional[str]:
    return next((node_id for node_id in CAM_COLOR_NODE_IDS if scene.GetNodeByID(node_id) is not None), None)


def cam_to_node(
    volume: Volume, node: Any = None, name: str = "LungGradCAM heat map", hide_below: float = DEFAULT_HIDE_BELOW
) -> Any:
    """Put a CAM :class:`Volume` (float, in [0, 1], K, J, I) into a scalar volume node.

    ``node`` is filled (its voxels, geometry and display replaced) or, when None, created in
    ``slicer.mrmlScene`` with ``name``. The node gets exactly ``volume.ijk_to_ras`` and a display
    node with a hot colour table (:data:`CAM_COLOR_NODE_IDS`), window 0..1 and a threshold that
    makes values below ``hide_below`` transparent in slice views. Returns the node.
    """
    array = np.asarray(volume.array, dtype=np.float32)
    if not np.all(np.isfinite(array)):
        raise VolumeError("the CAM holds NaN or infinite values; it cannot be shown")
    if node is None:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", name)
    elif not node.IsA("vtkMRMLScalarVolumeNode") or node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InvalidInputError(f"the CAM output must be a scalar volume node; got a {node.GetClassName()}")
    node.SetIJKToRASMatrix(_vtk_matrix(volume.ijk_to_ras))
    slicer.util.updateVolumeFromArray(node, array)
    node.CreateDefaultDisplayNodes()
    display = node.GetDisplayNode()
    color_id = _cam_color_node_id(_scene(node))
    if color_id is not None:
        display.SetAndObserveColorNodeID(color_id)
    display.AutoWindowLevelOff()
    display.SetWindowLevelMinMax(0.0, 1.0)
    display.AutoThresholdOff()
    display.SetThreshold(float(hide_below), float(array.max(initial=1.0)))  # upper: keep every hot voxel
    display.ApplyThresholdOn()
    return node


def cam_volume_rendering(
    cam_node: Any, volume_rendering_logic: Any, hide_below: float = DEFAULT_HIDE_BELOW, max_opacity: float = 0.6
) -> Any:
    """Show ``cam_node`` as a volume rendering: transparent below ``hide_below``, opacity rising
    linearly to ``max_opacity`` at CAM 1, coloured with the CAM's colour table.

    ``volume_rendering_logic`` is ``slicer.modules.volumerendering.logic()`` in Slicer (or a
    ``vtkSlicerVolumeRenderingLogic`` given the scene). Returns the volume rendering display node.
    """
    display = volume_rendering_logic.GetFirstVolumeRenderingDisplayNode(cam_node)
    if display is None:
        display = volume_rendering_logic.CreateDefaultVolumeRenderingNodes(cam_node)
    prop = display.GetVolumePropertyNode().GetVolumeProperty()
    opacity = prop.GetScalarOpacity()
    opacity.RemoveAllPoints()
    opacity.AddPoint(0.0, 0.0)
    opacity.AddPoint(float(hide_below), 0.0)
    opacity.AddPoint(1.0, float(max_opacity))
    color_node = cam_node.GetDisplayNode().GetColorNode() if cam_node.GetDisplayNode() else None
    if color_node is not None:
        colors = prop.GetRGBTransferFunction()
        colors.RemoveAllPoints()
        n = color_node.GetNumberOfColors()
        rgba = [0.0, 0.0, 0.0, 0.0]
        for t in np.linspace(0.0, 1.0, 17):
            color_node.GetColor(int(round(t * (n - 1))), rgba)
            colors.AddRGBPoint(float(t), *rgba[:3])
    display.SetVisibility(True)
    return display


def _label_array(labelmap: Volume) -> np.ndarray:
    """The labelmap in a voxel type VTK renders (no 64-bit ints), refusing negative labels."""
    array = np.asarray(labelmap.array)
    if array.dtype.kind not in "biu":
        raise VolumeError(f"a labelmap must hold integer labels; got {array.dtype}")
    if array.size and int(array.min()) < 0:
        raise VolumeError("a labelmap must not hold negative labels")
    top = int(array.max(initial=0))
    return array.astype(np.uint16 if top < 2**16 else np.int32, copy=False)


def segmentation_to_node(
    segmentation: Segmentation,
    reference_node: Any,
    node: Any = None,
    name: str = "LungGradCAM regions",
    closed_surface: bool = True,
) -> Any:
    """Put a :class:`Segmentation` into a segmentation node, one segment per region and one per
    nodule outline (``Segmentation.outlines``; they overlap the regions).

    The labelmap (K, J, I, with its own ``ijk_to_ras``) is imported through a temporary labelmap
    node with ``vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode``; the reference
    geometry (the grid segments are edited on) is ``reference_node``'s, the CT's. Segments are
    named and coloured from the regions (matched by label). ``node`` is emptied and refilled, or
    created with ``name`` when None. With ``closed_surface`` a 3D surface is made for the 3D views
    where Slicer's converter rules are registered (always in Slicer). Returns the node.
    """
    if reference_node is None or not reference_node.IsA("vtkMRMLVolumeNode"):
        raise InvalidInputError("segmentation_to_node needs the CT volume node as reference_node")
    scene = _scene(reference_node)
    if node is None:
        node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", name)
    elif not node.IsA("vtkMRMLSegmentationNode"):
        raise InvalidInputError(f"the segmentation output must be a segmentation node; got a {node.GetClassName()}")
    node.CreateDefaultDisplayNodes()
    node.GetSegmentation().RemoveAllSegments()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)

    # the regions, then the nodule outlines (which overlap them: Slicer keeps them in a layer of their own)
    layers = [(segmentation.labelmap, segmentation.regions)]
    if segmentation.outlines:
        layers.append((segmentation.labelmap.with_array(segmentation.outline_labels()), segmentation.outlines))
    segments = node.GetSegmentation()
    for labelmap, named in layers:
        first = segments.GetNumberOfSegments()
        temporary = scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode", "LungGradCAM temporary labelmap")
        try:
            temporary.SetIJKToRASMatrix(_vtk_matrix(labelmap.ijk_to_ras))
            slicer.util.updateVolumeFromArray(temporary, _label_array(labelmap))
            if not slicer.vtkSlicerSegmentationsModuleLogic.ImportLabelmapToSegmentationNode(temporary, node, ""):
                raise VolumeError("Slicer could not import the region labelmap into the segmentation node")
        finally:
            scene.RemoveNode(temporary)
        by_label = {int(item.label): item for item in named}
        for index in range(first, segments.GetNumberOfSegments()):
            segment = segments.GetNthSegment(index)
            item = by_label.get(int(segment.GetLabelValue()))
            if item is not None:
                segment.SetName(item.name)
                segment.SetColor(*[float(c) for c in item.color])
    if closed_surface:
        node.CreateClosedSurfaceRepresentation()
    return node


#: (column name, type, unit label, description, value of a Region). Units are in the names too,
#: as Slicer's own measurement tables do, so they show in the table view's header.
_REGION_COLUMNS = (
    ("Segment", str, "", "region name (the segment's name)", lambda r: r.name),
    ("Label", int, "", "label value in the region labelmap", lambda r: r.label),
    ("Volume [ml]", float, "ml", "region volume", lambda r: r.volume_ml),
    ("Volume [mm3]", float, "mm3", "region volume", lambda r: r.volume_mm3),
    ("Voxels", int, "", "number of voxels", lambda r: r.voxels),
    ("Peak CAM", float, "", "highest heat-map value in the region (0..1)", lambda r: r.peak_cam),
    ("Mean CAM", float, "", "mean heat-map value in the region (0..1)", lambda r: r.mean_cam),
    ("Mean HU", float, "HU", "mean CT value in the region", lambda r: r.mean_hu),
    ("Max HU", float, "HU", "highest CT value in the region", lambda r: r.max_hu),
    ("Centroid R [mm]", float, "mm", "centroid, right (RAS)", lambda r: r.centroid_ras[0]),
    ("Centroid A [mm]", float, "mm", "centroid, anterior (RAS)", lambda r: r.centroid_ras[1]),
    ("Centroid S [mm]", float, "mm", "centroid, superior (RAS)", lambda r: r.centroid_ras[2]),
    ("Peak R [mm]", float, "mm", "hottest voxel, right (RAS)", lambda r: r.peak_ras[0]),
    ("Peak A [mm]", float, "mm", "hottest voxel, anterior (RAS)", lambda r: r.peak_ras[1]),
    ("Peak S [mm]", float, "mm", "hottest voxel, superior (RAS)", lambda r: r.peak_ras[2]),
    ("Score", float, "", "the model's probability for the region, when known", lambda r: r.score),
)
#: Columns added when a region model was asked about the regions (``ExplainOptions.region_model``).
_SECOND_OPINION_COLUMNS = tuple(
    (name, kind, "", description, lambda r, key=key: (r.second_opinion or {}).get(key))
    for name, kind, description, key in (
        ("Region model", str, "the region model asked about the region (its second opinion)", "model"),
        ("Region model class", str, "the class the region model explains", "target_class"),
        ("Region model P", float, "the region model's probability of that class", "probability"),
    )
)
#: Columns added when regions have a nodule outline (an ROI run, or a second opinion): the
#: outline's segment and what a radiologist measures on it.
_OUTLINE_COLUMNS = tuple(
    (name, kind, unit, description, lambda r, key=key: (r.outline or {}).get(key))
    for name, kind, unit, description, key in (
        ("Outline", str, "", "the nodule outline at the region's peak (its segment; empty: no nodule found)", "name"),
        ("Outline volume [ml]", float, "ml", "the outlined nodule's volume", "volume_ml"),
        ("Long axis [mm]", float, "mm", "the nodule's longest diameter in a slice of the CT", "long_axis_mm"),
        (
            "Short axis [mm]",
            float,
            "mm",
            "its widest extent perpendicular to the long axis, same slice",
            "short_axis_mm",
        ),
        ("Mean diameter [mm]", float, "mm", "mean of the long and short axis (Lung-RADS' size)", "mean_diameter_mm"),
    )
)
_VTK_ARRAYS = {str: vtk.vtkStringArray, int: vtk.vtkIntArray, float: vtk.vtkDoubleArray}


def _column(name: str, kind: type, values: Sequence[Any]) -> vtk.vtkAbstractArray:
    column = _VTK_ARRAYS[kind]()
    column.SetName(name)
    for value in values:
        # unknown numbers (None, e.g. no HU without a CT) become NaN so the column stays numeric
        if value is None:
            value = {float: math.nan, str: ""}.get(kind, value)
        column.InsertNextValue(kind(value))
    return column


def regions_to_table(regions: Sequence[Region], node: Any = None, name: str = "LungGradCAM regions table") -> Any:
    """Fill a table node with one row per region: name, label, volume (ml, mm³), voxel count,
    peak/mean CAM, mean/max HU, centroid and hottest point (RAS mm) and score, with unit labels
    and descriptions on the columns; when a region model was asked about them, its name, class and
    probability too; when regions have a nodule outline, its segment, volume (ml) and long, short
    and mean diameter (mm). ``node`` is cleared and refilled, or created when None."""
    if node is None:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLTableNode", name)
    elif not node.IsA("vtkMRMLTableNode"):
        raise InvalidInputError(f"the results table output must be a table node; got a {node.GetClassName()}")
    was_modifying = node.StartModify()
    node.RemoveAllColumns()
    columns = (
        _REGION_COLUMNS
        + (_SECOND_OPINION_COLUMNS if any(r.second_opinion for r in regions) else ())
        + (_OUTLINE_COLUMNS if any(r.outline for r in regions) else ())
    )
    for column_name, kind, unit, description, value in columns:
        node.AddColumn(_column(column_name, kind, [value(r) for r in regions]))
        node.SetColumnUnitLabel(column_name, unit)
        node.SetColumnDescription(column_name, description)
    node.EndModify(was_modifying)
    return node


def roi_from_node(roi_node: Any, default_size_mm: Optional[float] = None) -> tuple:
    """``(centre_ras_mm, size_mm)`` of a placed markups ROI node in world RAS: the ``roi`` that
    :func:`~LungGradCAMLib.pipeline.explain` takes (a region model looks at one patch centred on it).
    An ROI placed by a click but not sized gets ``default_size_mm`` when given (explain covers at
    least one patch anyway), else it is refused."""
    if roi_node is None or not roi_node.IsA("vtkMRMLMarkupsROINode"):
        raise InvalidInputError("the region must be a markups ROI node (Markups: ROI); place one on the nodule")
    if roi_node.GetNumberOfControlPoints() == 0:
        raise InvalidInputError(f"ROI {roi_node.GetName()!r} is not placed yet: click on the nodule to place it")
    centre, size = [0.0] * 3, [0.0] * 3
    roi_node.GetCenterWorld(centre)
    roi_node.GetSizeWorld(size)
    if default_size_mm is not None and max(size) <= 0:
        size = [float(default_size_mm)] * 3
    if not all(math.isfinite(v) for v in centre + size) or min(size) <= 0:
        raise InvalidInputError(
            f"ROI {roi_node.GetName()!r} has no size (size {size} mm): drag its handles to cover the nodule"
        )
    return tuple(centre), tuple(size)


def roi_at_point(
    centre_ras: Sequence[float], size_mm: Sequence[float], node: Any = None, name: str = "LungGradCAM region"
) -> Any:
    """A markups ROI node of ``size_mm`` (R, A, S extents) centred on ``centre_ras`` (RAS mm): one
    click on a nodule gives the region a region model looks at. ``node`` is moved and resized, or
    a new one is made."""
    if node is None:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name)
    node.SetCenterWorld(*[float(c) for c in centre_ras])
    node.SetSizeWorld(*[float(s) for s in size_mm])
    return node


#: Subject hierarchy attributes of a series item and the DICOM keywords they come from, as Slicer's
#: DICOM plugins set them (DICOMLib.DICOMPlugin.addSeriesInSubjectHierarchy, Slicer 5.8.1).
_SERIES_ATTRIBUTES = (
    ("SeriesModality", "Modality"),
    ("SeriesNumber", "SeriesNumber"),
    ("FrameOfReferenceUID", "FrameOfReferenceUID"),
    ("SeriesDescription", "SeriesDescription"),
    ("SeriesDate", "SeriesDate"),
    ("SeriesTime", "SeriesTime"),
    ("ContentDate", "ContentDate"),
    ("ContentTime", "ContentTime"),
    ("Manufacturer", "Manufacturer"),
    ("Model", "ManufacturerModelName"),
)


def dicom_series_to_node(volume: Volume, files: Sequence[Any], name: str) -> Any:
    """A scalar volume node holding a CT read from DICOM ``files`` (by
    :func:`~LungGradCAMLib.io.dicom.load_dicom_series`), set up as Slicer's DICOM module sets up the
    series it loads: the ``DICOM.instanceUIDs`` attribute (SOPInstanceUIDs in slice order), and a
    subject hierarchy item with the series' UID and DICOM attributes under its study and patient
    items (made when missing, found by StudyInstanceUID and PatientID as Slicer does, with their
    attributes and names), so that DICOM export, segment references and the Data module treat it
    as Slicer's own. Returns the node."""
    import pydicom

    headers = [pydicom.dcmread(str(f), stop_before_pixels=True) for f in files]
    normal = volume.ijk_to_ras[:3, 2]
    ras = [
        np.array([-float(v) for v in h.ImagePositionPatient[:2]] + [float(h.ImagePositionPatient[2])])
        if "ImagePositionPatient" in h
        else np.zeros(3)
        for h in headers
    ]
    headers = [h for _, h in sorted(zip([float(p @ normal) for p in ras], headers), key=lambda t: t[0])]
    first = headers[0]

    def text(keyword: str) -> str:
        value = first.get(keyword)
        return "" if value is None else str(value)

    node = slicer.util.addVolumeFromArray(volume.array, volume.ijk_to_ras, name=name)
    uids = " ".join(str(h.get("SOPInstanceUID", "")) or "Unknown" for h in headers)
    node.SetAttribute("DICOM.instanceUIDs", uids)

    constants = slicer.vtkMRMLSubjectHierarchyConstants
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(_scene(node))
    series_item = shn.GetItemByDataNode(node)
    if not series_item:
        series_item = shn.CreateItem(shn.GetSceneItemID(), node)
    shn.SetItemUID(series_item, constants.GetDICOMUIDName(), text("SeriesInstanceUID"))
    for attribute, keyword in _SERIES_ATTRIBUTES:
        shn.SetItemAttribute(series_item, constants.GetDICOMAttributePrefix() + attribute, text(keyword))
    shn.SetItemUID(series_item, constants.GetDICOMInstanceUIDName(), uids)
    study_uid = text("StudyInstanceUID")
    patient_id = text("PatientID") or f"Patient-{study_uid}"  # Slicer's rule for a missing PatientID
    patient_name = text("PatientName") or "No name"
    description = text("StudyDescription") or "No study description"
    # (UID, the item's name, its attributes): set only on items this call makes, as Slicer does
    items = [
        (
            patient_id,
            patient_name,
            (
                (constants.GetDICOMPatientNameAttributeName(), patient_name),
                (constants.GetDICOMPatientIDAttributeName(), patient_id),
                (constants.GetDICOMPatientSexAttributeName(), text("PatientSex")),
                (constants.GetDICOMPatientBirthDateAttributeName(), text("PatientBirthDate")),
                (constants.GetDICOMPatientCommentsAttributeName(), text("PatientComments")),
            ),
        ),
        (
            study_uid,
            description + (f" ({text('StudyDate')})" if text("StudyDate") else ""),
            (
                (constants.GetDICOMStudyDescriptionAttributeName(), description),
                (constants.GetDICOMStudyInstanceUIDAttributeName(), study_uid),
                (constants.GetDICOMStudyIDAttributeName(), text("StudyID")),
                (constants.GetDICOMStudyDateAttributeName(), text("StudyDate")),
                (constants.GetDICOMStudyTimeAttributeName(), text("StudyTime")),
            ),
        ),
    ]
    new = [entry for entry in items if not shn.GetItemByUID(constants.GetDICOMUIDName(), entry[0])]
    slicer.vtkSlicerSubjectHierarchyModuleLogic.InsertDicomSeriesInHierarchy(
        shn, patient_id, study_uid, text("SeriesInstanceUID")
    )
    for uid, item_name, attributes in new:
        item = shn.GetItemByUID(constants.GetDICOMUIDName(), uid)
        for attribute, value in attributes:
            shn.SetItemAttribute(item, attribute, value)
        shn.SetItemName(item, item_name)
    return node


def region_to_roi_node(region: Region, node: Any = None, margin_mm: float = 5.0, name: Optional[str] = None) -> Any:
    """A markups ROI node around a hot region (its RAS bounding box plus ``margin_mm`` on each
    side, centred on its centroid): the region a region model (e.g. malignancy) is asked about."""
    lo, hi = (np.asarray(v, dtype=float) for v in region.bbox_ras)
    size = np.abs(hi - lo) + 2 * margin_mm
    if node is None:
        node = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsROINode", name or f"{region.name} ROI")
    node.SetCenterWorld(*[float(c) for c in region.centroid_ras])
    node.SetSizeWorld(*[float(s) for s in size])
    return node


@dataclass
class NodeResult:
    """What :func:`explain_volume_node` made: the engine's results and the nodes showing them."""

    explanation: Explanation
    segmentation: Segmentation
    cam_node: Any
    segmentation_node: Any
    table_node: Any


def explain_volume_node(
    input_node: Any,
    cam_node: Any = None,
    segmentation_node: Any = None,
    table_node: Any = None,
    options: Optional[ExplainOptions] = None,
    *,
    progress: Optional[Callable[[str, int, int], None]] = None,
    cancel: Optional[Callable[[], bool]] = None,
    on_estimate: Optional[Callable[[Any], Optional[bool]]] = None,
    **option_keywords: Any,
) -> NodeResult:
    """Explain the CT of ``input_node`` and put the results into nodes (each created when None).

    The settings are one :class:`~LungGradCAMLib.options.ExplainOptions` (``options``), or its
    fields as keywords (``model``, ``method``, ``target``, ``threshold``, ``restrict_to_lungs``,
    ``device``, ``batch_size``, ``stride``, ``amp``...). The heat map's regions at the threshold
    become segments and table rows; with ``restrict_to_lungs`` only regions inside the lungs count.
    ``progress(stage, done, total)`` and ``cancel()`` are those of
    :func:`~LungGradCAMLib.pipeline.explain`; a cancelled run creates no node. ``on_estimate`` gets the
    heat map's estimated cost before it is computed (see ``explain``). Output nodes are named after
    the input node.
    """
    from .pipeline import explain_and_segment

    options = options_from(options, option_keywords)
    if cam_node is not None and cam_node is input_node:
        raise InvalidInputError(
            "the heat map output is the input CT itself; choose another volume or none "
            "(a new one is created) so the CT is not overwritten"
        )
    explanation, segmentation = explain_and_segment(
        volume_from_node(input_node), options, progress=progress, cancel=cancel, on_estimate=on_estimate
    )
    return result_to_nodes(input_node, explanation, segmentation, cam_node, segmentation_node, table_node)


def result_to_nodes(
    input_node: Any,
    explanation: Explanation,
    segmentation: Segmentation,
    cam_node: Any = None,
    segmentation_node: Any = None,
    table_node: Any = None,
) -> NodeResult:
    """Put an explanation of ``input_node``'s CT and its hot regions into nodes (each created when
    None, named after the input node): the heat map volume, the regions' segmentation and table.
    Used for a run in this process (:func:`explain_volume_node`) and for one read back from a
    ``lunggradcam run`` folder (:func:`~LungGradCAMLib.pipeline.outputs.read_run`)."""
    if cam_node is not None and cam_node is input_node:
        raise InvalidInputError(
            "the heat map output is the input CT itself; choose another volume or none "
            "(a new one is created) so the CT is not overwritten"
        )
    name = input_node.GetName()
    return NodeResult(
        explanation=explanation,
        segmentation=segmentation,
        cam_node=cam_to_node(explanation.cam, cam_node, name=f"{name} Grad-CAM"),
        segmentation_node=segmentation_to_node(
            segmentation, input_node, segmentation_node, name=f"{name} Grad-CAM regions"
        ),
        table_node=regions_to_table(segmentation.regions, table_node, name=f"{name} Grad-CAM regions table"),
    )
