"""LungGradCAMLib.mrml against real MRML nodes from the slicer-core wheel (no Slicer application)."""

from __future__ import annotations

import numpy as np
import pytest

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

from LungGradCAMLib import mrml  # noqa: E402  (needs slicer)
from LungGradCAMLib.core.errors import InvalidInputError, VolumeError  # noqa: E402
from LungGradCAMLib.core.results import Region, Segmentation  # noqa: E402
from LungGradCAMLib.core.volume import Volume  # noqa: E402

from helpers import NODULE_RAS  # noqa: E402

SHAPE = (6, 9, 11)  # K, J, I: all different so an axis mix-up cannot pass

# Column c of the 3x3 part is the RAS step of index axis i, j, k (mm).
OBLIQUE = np.array(
    [
        [0.70 * 0.8, -0.71 * 0.9, 0.05 * 2.5, -120.25],
        [0.71 * 0.8, 0.70 * 0.9, -0.10 * 2.5, 33.5],
        [0.00, 0.10 * 0.9, 0.99 * 2.5, -412.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
FLIPPED = np.array(
    [  # LPS-like storage (i -> left, j -> posterior) and k running inferior
        [-0.7, 0.0, 0.0, 150.0],
        [0.0, -0.7, 0.0, 170.0],
        [0.0, 0.0, -1.25, -20.0],
        [0.0, 0.0, 0.0, 1.0],
    ]
)
MATRICES = {"oblique": OBLIQUE, "flipped": FLIPPED, "axis_aligned": np.diag([0.6, 0.6, 2.0, 1.0])}


@pytest.fixture(autouse=True)
def scene():
    """A fresh scene, with the colour logic's built-in colour tables as in Slicer."""
    slicer.mrmlScene = slicer.vtkMRMLScene()
    colors = slicer.vtkSlicerColorLogic()
    colors.SetMRMLScene(slicer.mrmlScene)
    yield slicer.mrmlScene
    colors.SetMRMLScene(None)


def _ct_node(matrix: np.ndarray, dtype=np.int16):
    rng = np.random.default_rng(0)
    array = rng.integers(-1024, 1500, size=SHAPE).astype(dtype)
    return slicer.util.addVolumeFromArray(array, matrix, name="CT"), array


def _node_matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


# --- volume_from_node -------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", sorted(MATRICES))
def test_volume_from_node_keeps_voxels_and_geometry(kind):
    node, array = _ct_node(MATRICES[kind])
    volume = mrml.volume_from_node(node)
    assert volume.shape == SHAPE
    assert volume.array.dtype == np.int16
    np.testing.assert_array_equal(volume.array, array)
    np.testing.assert_allclose(volume.ijk_to_ras, MATRICES[kind], atol=1e-9, rtol=0)
    # a copy: editing the node afterwards does not change the Volume
    slicer.util.arrayFromVolume(node)[:] = 0
    np.testing.assert_array_equal(volume.array, array)
    # a voxel's RAS position agrees with Slicer's own mapping
    ijk = np.array([3.0, 7.0, 2.0])
    ras = [0.0, 0.0, 0.0, 1.0]
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    m.MultiplyPoint([*ijk, 1.0], ras)
    np.testing.assert_allclose(volume.ijk_to_ras_points(ijk)[0], ras[:3], atol=1e-9)


def test_volume_from_node_identity_transform_is_accepted(scene):
    node, array = _ct_node(OBLIQUE)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "identity")
    node.SetAndObserveTransformNodeID(transform.GetID())
    np.testing.assert_array_equal(mrml.volume_from_node(node).array, array)


def test_volume_from_node_refuses_a_moving_linear_transform(scene):
    node, _ = _ct_node(OBLIQUE)
    transform = scene.AddNewNodeByClass("vtkMRMLLinearTransformNode", "shift")
    shift = np.eye(4)
    shift[0, 3] = 5.0
    transform.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(shift))
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(VolumeError, match="Harden transform") as info:
        mrml.volume_from_node(node)
    assert "'CT'" in str(info.value) and "'shift'" in str(info.value)


def test_volume_from_node_refuses_a_nonlinear_transform(scene):
    node, _ = _ct_node(OBLIQUE)
    grid = vtk.vtkImageData()
    grid.SetDimensions(3, 3, 3)
    grid.SetSpacing(100, 100, 100)
    grid.SetOrigin(-100, -100, -500)
    grid.AllocateScalars(vtk.VTK_DOUBLE, 3)
    from vtk.util.numpy_support import vtk_to_numpy

    displacement = vtk_to_numpy(grid.GetPointData().GetScalars())
    displacement[:] = np.random.default_rng(1).normal(0, 3, displacement.shape)
    grid_transform = slicer.vtkOrientedGridTransform()
    grid_transform.SetDisplacementGridData(grid)
    transform = scene.AddNewNodeByClass("vtkMRMLGridTransformNode", "warp")
    transform.SetAndObserveTransformToParent(grid_transform)
    node.SetAndObserveTransformNodeID(transform.GetID())
    with pytest.raises(VolumeError, match="non-linear transform 'warp'"):
        mrml.volume_from_node(node)


def test_volume_from_node_refuses_what_is_not_a_scalar_volume(scene):
    with pytest.raises(InvalidInputError, match="scalar volume node"):
        mrml.volume_from_node(None)
    with pytest.raises(InvalidInputError, match="vtkMRMLTableNode"):
        mrml.volume_from_node(scene.AddNewNodeByClass("vtkMRMLTableNode"))
    rgb = slicer.util.addVolumeFromArray(
        np.zeros((*SHAPE, 3), np.uint8), nodeClassName="vtkMRMLVectorVolumeNode", name="photo"
    )
    with pytest.raises(VolumeError, match="'photo' has 3 components"):
        mrml.volume_from_node(rgb)
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(VolumeError, match="'empty' holds no voxels"):
        mrml.volume_from_node(empty)


# --- cam_to_node --------------------------------------------------------------------------------------
def _cam(matrix: np.ndarray) -> Volume:
    k, j, i = np.meshgrid(*[np.linspace(-1, 1, n) for n in SHAPE], indexing="ij")
    return Volume(np.exp(-4 * (k**2 + (j - 0.3) ** 2 + i**2)).astype(np.float32), matrix)


@pytest.mark.parametrize("kind", sorted(MATRICES))
def test_cam_to_node_round_trips_values_and_geometry(kind):
    cam = _cam(MATRICES[kind])
    node = mrml.cam_to_node(cam, name="heat")
    assert node.GetName() == "heat" and node.GetClassName() == "vtkMRMLScalarVolumeNode"
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), cam.array)
    np.testing.assert_allclose(_node_matrix(node), MATRICES[kind], atol=1e-9, rtol=0)
    back = mrml.volume_from_node(node)
    np.testing.assert_array_equal(back.array, cam.array)
    np.testing.assert_allclose(back.ijk_to_ras, cam.ijk_to_ras, atol=1e-9, rtol=0)


def test_cam_to_node_display_is_a_hot_overlay_hiding_near_zero(scene):
    node = mrml.cam_to_node(_cam(OBLIQUE), hide_below=0.2)
    display = node.GetDisplayNode()
    # slicer-core has no file colour tables: the built-in fallback is used
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert not display.GetAutoWindowLevel()
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == pytest.approx((0.0, 1.0))
    assert display.GetApplyThreshold() and not display.GetAutoThreshold()
    assert display.GetLowerThreshold() == pytest.approx(0.2)
    assert display.GetUpperThreshold() >= 1.0


def test_cam_to_node_prefers_slicers_cold_to_hot_rainbow(scene):
    table = slicer.vtkMRMLColorTableNode()
    table.SetTypeToUser()
    table.SetNumberOfColors(2)
    table.SetName("ColdToHotRainbow")
    # Slicer's colour logic adds its file tables as singletons: the ID is class name + tag
    table.SetSingletonTag("FileColdToHotRainbow.txt")
    scene.AddNode(table)
    assert scene.GetNodeByID("vtkMRMLColorTableNodeFileColdToHotRainbow.txt") is not None
    node = mrml.cam_to_node(_cam(FLIPPED))
    assert node.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeFileColdToHotRainbow.txt"


def test_cam_to_node_refills_an_existing_node(scene):
    node = mrml.cam_to_node(_cam(OBLIQUE))
    smaller = Volume(np.full((2, 3, 4), 0.5, np.float32), FLIPPED)
    same = mrml.cam_to_node(smaller, node=node)
    assert same is node
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), smaller.array)
    np.testing.assert_allclose(_node_matrix(node), FLIPPED, atol=1e-9, rtol=0)


def test_cam_to_node_refuses_bad_input(scene):
    with pytest.raises(VolumeError, match="NaN"):
        mrml.cam_to_node(Volume(np.full(SHAPE, np.nan, np.float32), OBLIQUE))
    with pytest.raises(InvalidInputError, match="vtkMRMLLabelMapVolumeNode"):
        mrml.cam_to_node(_cam(OBLIQUE), node=scene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode"))


def test_cam_volume_rendering_hides_low_values(scene):
    node = mrml.cam_to_node(_cam(OBLIQUE))
    logic = slicer.vtkSlicerVolumeRenderingLogic()
    logic.SetMRMLScene(scene)
    display = mrml.cam_volume_rendering(node, logic, hide_below=0.25, max_opacity=0.5)
    assert display.GetVisibility()
    assert display.GetVolumeNode() is node
    prop = display.GetVolumePropertyNode().GetVolumeProperty()
    opacity = prop.GetScalarOpacity()
    assert opacity.GetValue(0.1) == pytest.approx(0.0)
    assert opacity.GetValue(0.25) == pytest.approx(0.0)
    assert opacity.GetValue(1.0) == pytest.approx(0.5)
    # the top of the colour transfer function is the colour table's hottest entry
    color_node = node.GetDisplayNode().GetColorNode()
    top = [0.0] * 4
    color_node.GetColor(color_node.GetNumberOfColors() - 1, top)
    np.testing.assert_allclose(prop.GetRGBTransferFunction().GetColor(1.0), top[:3], atol=1e-6)
    # calling again reuses the display node
    assert mrml.cam_volume_rendering(node, logic) is display


# --- segmentation_to_node ----------------------------------------------------------------------------
def _region(label: int, name: str, color, mask: np.ndarray, volume: Volume, score=None) -> Region:
    voxels = int(mask.sum())
    voxel_mm3 = float(abs(np.linalg.det(volume.ijk_to_ras[:3, :3])))
    kji = np.argwhere(mask)
    centroid = volume.ijk_to_ras_points(kji.mean(axis=0)[::-1])[0]
    return Region(
        label=label,
        name=name,
        voxels=voxels,
        volume_mm3=voxels * voxel_mm3,
        volume_ml=voxels * voxel_mm3 / 1000,
        peak_cam=0.9,
        mean_cam=0.6,
        mean_hu=None if score else -20.5,
        max_hu=35.0,
        centroid_ras=tuple(centroid),
        peak_ras=tuple(centroid),
        bbox_ijk=tuple((int(kji[:, a].min()), int(kji[:, a].max()) + 1) for a in range(3)),
        bbox_ras=(tuple(centroid), tuple(centroid)),
        color=color,
        score=score,
    )


def _segmentation(matrix: np.ndarray) -> Segmentation:
    labels = np.zeros(SHAPE, np.uint8)
    labels[1:3, 2:5, 1:4] = 1
    labels[3:6, 5:9, 6:11] = 2
    labels[0, 0, 10] = 5  # a one-voxel region at a corner, with a gap in the label values
    reference = Volume(labels, matrix)
    regions = [
        _region(2, "region 1 (hottest)", (1.0, 0.2, 0.1), labels == 2, reference, score=0.93),
        _region(1, "region 2", (0.1, 0.8, 0.3), labels == 1, reference),
        _region(5, "region 3", (0.2, 0.3, 1.0), labels == 5, reference),
    ]
    return Segmentation(reference, regions, threshold=0.5)


def _segment_mask(seg_node, segment_id: str, reference_node) -> np.ndarray:
    out = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLLabelMapVolumeNode")
    ids = vtk.vtkStringArray()
    ids.InsertNextValue(segment_id)
    assert slicer.vtkSlicerSegmentationsModuleLogic.ExportSegmentsToLabelmapNode(
        seg_node, ids, out, reference_node, slicer.vtkSegmentation.EXTENT_REFERENCE_GEOMETRY
    )
    np.testing.assert_allclose(_node_matrix(out), _node_matrix(reference_node), atol=1e-9)
    mask = slicer.util.arrayFromVolume(out) > 0
    slicer.mrmlScene.RemoveNode(out)
    return mask


def _by_name(node) -> dict:
    """Segment name -> segment ID of a segmentation node."""
    segments = node.GetSegmentation()
    return {
        segments.GetNthSegment(n).GetName(): segments.GetNthSegmentID(n) for n in range(segments.GetNumberOfSegments())
    }


@pytest.mark.parametrize("kind", sorted(MATRICES))
def test_segmentation_to_node_segments_equal_the_labelmap(kind, scene):
    ct, _ = _ct_node(MATRICES[kind])
    seg = _segmentation(MATRICES[kind])
    node = mrml.segmentation_to_node(seg, ct, closed_surface=False)
    segments = node.GetSegmentation()
    assert segments.GetNumberOfSegments() == 3
    # the temporary labelmap is gone
    assert scene.GetNumberOfNodesByClass("vtkMRMLLabelMapVolumeNode") == 0
    by_name = _by_name(node)
    assert set(by_name) == {r.name for r in seg.regions}
    for region in seg.regions:
        segment = segments.GetSegment(by_name[region.name])
        assert segment.GetColor() == pytest.approx(region.color)
        mask = _segment_mask(node, by_name[region.name], ct)
        assert int(mask.sum()) == region.voxels
        np.testing.assert_array_equal(mask, seg.labelmap.array == region.label)
    # the reference (editing) geometry is the CT's
    assert node.GetNodeReference(node.GetReferenceImageGeometryReferenceRole()) is ct


def test_segmentation_to_node_refills_an_existing_node_and_makes_3d_surfaces(scene):
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    # Slicer's Segmentations module registers this rule at start-up; slicer-core does not.
    factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
    ct, _ = _ct_node(OBLIQUE)
    seg = _segmentation(OBLIQUE)
    node = mrml.segmentation_to_node(seg, ct)
    assert node.GetSegmentation().ContainsRepresentation("Closed surface")
    only_one = Segmentation(
        seg.labelmap.with_array((seg.labelmap.array == 2).astype(np.uint8)),
        [Region(**{**seg.regions[0].to_dict(), "label": 1})],
    )
    assert mrml.segmentation_to_node(only_one, ct, node=node) is node
    assert node.GetSegmentation().GetNumberOfSegments() == 1
    assert node.GetSegmentation().GetNthSegment(0).GetName() == "region 1 (hottest)"
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1


def test_segmentation_to_node_refuses_bad_input(scene):
    ct, _ = _ct_node(OBLIQUE)
    seg = _segmentation(OBLIQUE)
    with pytest.raises(InvalidInputError, match="reference_node"):
        mrml.segmentation_to_node(seg, None)
    with pytest.raises(InvalidInputError, match="vtkMRMLTableNode"):
        mrml.segmentation_to_node(seg, ct, node=scene.AddNewNodeByClass("vtkMRMLTableNode"))
    negative = Segmentation(Volume(np.full(SHAPE, -1, np.int16), OBLIQUE), [])
    with pytest.raises(VolumeError, match="negative"):
        mrml.segmentation_to_node(negative, ct)


def _with_outline(matrix: np.ndarray) -> Segmentation:
    """The regions of :func:`_segmentation` and a nodule outline overlapping the hottest region (a
    box of the grid: the outline's own small volume), as the pipeline makes them."""
    from LungGradCAMLib.core.results import Outline
    from LungGradCAMLib.core.volume import LabelMap, crop
    from LungGradCAMLib.engine.outline import measure_outline

    seg = _segmentation(matrix)
    box = ((2, 6), (4, 9), (5, 11))
    mask = crop(LabelMap(np.zeros(SHAPE, np.uint8), matrix), box)
    mask.array[1:3, 1:4, 1:5] = 1  # voxels (3-4, 5-7, 6-9): partly inside region label 2
    outline = Outline(
        mask=mask,
        seed_ras=tuple(mask.ijk_to_ras_points([[2, 2, 1]])[0]),
        method="network",
        model="nodule-outline 1.0.0",
        name="nodule outline 1",
        label=1,
        **measure_outline(mask),
    )
    seg.outlines.append(outline)
    seg.regions[0].outline = outline.to_dict()
    return seg


@pytest.mark.parametrize("kind", sorted(MATRICES))
def test_segmentation_to_node_adds_the_nodule_outline_as_its_own_segment(kind, scene):
    """The outline overlaps a heat-map region: both are whole segments of the node."""
    ct, _ = _ct_node(MATRICES[kind])
    seg = _with_outline(MATRICES[kind])
    node = mrml.segmentation_to_node(seg, ct, closed_surface=False)
    segments = node.GetSegmentation()
    by_name = _by_name(node)
    assert len(by_name) == 4
    outline = _segment_mask(node, by_name["nodule outline 1"], ct)
    np.testing.assert_array_equal(outline, seg.outline_labels() == 1)
    assert outline.sum() == seg.outlines[0].voxels == 24
    hottest = _segment_mask(node, by_name[seg.regions[0].name], ct)
    np.testing.assert_array_equal(hottest, seg.labelmap.array == seg.regions[0].label)
    assert (hottest & outline).any()  # they overlap, and neither lost a voxel
    assert segments.GetSegment(by_name["nodule outline 1"]).GetColor() == pytest.approx(seg.outlines[0].color)


def test_regions_to_table_shows_the_outline_measurements(scene):
    seg = _with_outline(OBLIQUE)
    table = mrml.regions_to_table(seg.regions)
    assert table.GetNumberOfColumns() == 16 + 5
    column = table.GetTable().GetColumnByName
    outline = seg.outlines[0]
    assert column("Outline").GetValue(0) == "nodule outline 1" and column("Outline").GetValue(1) == ""
    assert column("Outline volume [ml]").GetValue(0) == pytest.approx(outline.volume_ml)
    assert column("Long axis [mm]").GetValue(0) == pytest.approx(outline.long_axis_mm)
    assert column("Short axis [mm]").GetValue(0) == pytest.approx(outline.short_axis_mm)
    assert column("Mean diameter [mm]").GetValue(0) == pytest.approx(outline.mean_diameter_mm)
    assert np.isnan(column("Mean diameter [mm]").GetValue(1))
    assert table.GetColumnUnitLabel("Mean diameter [mm]") == "mm"


# --- regions_to_table --------------------------------------------------------------------------------
def test_regions_to_table_contents_and_units(scene):
    seg = _segmentation(OBLIQUE)
    table = mrml.regions_to_table(seg.regions)
    assert table.GetNumberOfRows() == 3
    assert table.GetNumberOfColumns() == 16

    def cell(name: str, row: int):
        return table.GetTable().GetColumnByName(name).GetValue(row)

    for row, region in enumerate(seg.regions):
        assert cell("Segment", row) == region.name
        assert cell("Label", row) == region.label
        assert cell("Voxels", row) == region.voxels
        assert cell("Volume [ml]", row) == pytest.approx(region.volume_ml, rel=1e-12)
        assert cell("Volume [mm3]", row) == pytest.approx(region.volume_mm3, rel=1e-12)
        for axis, letter in enumerate("RAS"):
            assert cell(f"Centroid {letter} [mm]", row) == pytest.approx(region.centroid_ras[axis], abs=1e-9)
            assert cell(f"Peak {letter} [mm]", row) == pytest.approx(region.peak_ras[axis], abs=1e-9)
        assert cell("Peak CAM", row) == pytest.approx(region.peak_cam)
        assert cell("Mean CAM", row) == pytest.approx(region.mean_cam)
        assert cell("Max HU", row) == pytest.approx(region.max_hu)
    # unknown values stay numeric (NaN), known ones are kept
    assert np.isnan(cell("Score", 1)) and cell("Score", 0) == pytest.approx(0.93)
    assert np.isnan(cell("Mean HU", 0)) and cell("Mean HU", 1) == pytest.approx(-20.5)
    assert table.GetCellText(0, 0) == seg.regions[0].name
    assert table.GetColumnUnitLabel("Volume [ml]") == "ml"
    assert table.GetColumnUnitLabel("Volume [mm3]") == "mm3"
    assert table.GetColumnUnitLabel("Mean HU") == "HU"
    assert table.GetColumnUnitLabel("Peak R [mm]") == "mm"
    assert table.GetColumnDescription("Peak CAM")


def test_regions_to_table_refills_and_handles_no_regions(scene):
    table = mrml.regions_to_table(_segmentation(FLIPPED).regions, name="results")
    assert mrml.regions_to_table([], node=table) is table
    assert table.GetNumberOfRows() == 0
    assert table.GetNumberOfColumns() == 16
    assert table.GetTable().GetColumnByName("Segment").IsA("vtkStringArray")
    with pytest.raises(InvalidInputError, match="table node"):
        mrml.regions_to_table([], node=scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode"))


# --- files written by the library, read by Slicer's own reader ---------------------------------------
def test_seg_nrrd_from_write_segmentation_loads_in_slicer(tmp_path, scene):
    from LungGradCAMLib.io.segnrrd import write_segmentation

    seg = _segmentation(OBLIQUE)
    path = write_segmentation(seg, tmp_path / "regions.seg.nrrd")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer's segmentation reader could not read {path}"
    ct, _ = _ct_node(OBLIQUE)
    segments = node.GetSegmentation()
    assert segments.GetNumberOfSegments() == len(seg.regions)
    names = {segments.GetNthSegment(n).GetName(): segments.GetNthSegmentID(n) for n in range(len(seg.regions))}
    for region in seg.regions:
        assert region.name in names
        mask = _segment_mask(node, names[region.name], ct)
        np.testing.assert_array_equal(mask, seg.labelmap.array == region.label)


def test_seg_nrrd_with_a_nodule_outline_loads_in_slicer(tmp_path, scene):
    """The outline overlaps a region: the file has two layers, and Slicer's reader gives every
    segment its voxels."""
    from LungGradCAMLib.io.segnrrd import write_segmentation

    seg = _with_outline(OBLIQUE)
    path = write_segmentation(seg, tmp_path / "regions.seg.nrrd")
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode")
    storage = scene.AddNewNodeByClass("vtkMRMLSegmentationStorageNode")
    storage.SetFileName(str(path))
    assert storage.ReadData(node), f"Slicer's segmentation reader could not read {path}"
    ct, _ = _ct_node(OBLIQUE)
    names = _by_name(node)
    assert len(names) == 4
    np.testing.assert_array_equal(_segment_mask(node, names["nodule outline 1"], ct), seg.outline_labels() == 1)
    for region in seg.regions:
        np.testing.assert_array_equal(_segment_mask(node, names[region.name], ct), seg.labelmap.array == region.label)


# --- the whole run on nodes ----------------------------------------------------------------------------
#: Big batches: fewer model calls on the CPU.
FAST = {"batch_size": 16}


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    """A small untrained (seeded) 3D CNN saved as a model file: exercises the plumbing, not accuracy."""
    import torch

    from LungGradCAMLib.engine.models import ModelCard, build_model, save_model

    torch.manual_seed(0)
    kwargs = {"channels": [4, 8, 8], "hidden": [8, 8]}
    card = ModelCard(
        architecture="small3d_cnn",
        kwargs=kwargs,
        class_names=["benign", "malignant"],
        cam_class="malignant",
        target_layer="features.act3",
        patch_size=[32, 32, 32],
        spacing_mm=[3.0, 3.0, 3.0],
        name="tiny",
    )
    return save_model(build_model("small3d_cnn", **kwargs), card, tmp_path_factory.mktemp("model") / "tiny.safetensors")


def test_explain_volume_node_fills_the_output_nodes(scene, nodule_chest, tiny_model):
    ct = slicer.util.addVolumeFromArray(nodule_chest.volume.array, nodule_chest.volume.ijk_to_ras, name="chest")
    calls = []
    result = mrml.explain_volume_node(
        ct,
        model=str(tiny_model),
        device="cpu",
        threshold=0.3,
        restrict_to_lungs=False,
        **FAST,
        progress=lambda stage, done, total: calls.append((stage, done, total)),
    )
    assert calls[-1] == ("segment", 1, 1)  # every stage reported, the last one too
    cam = [(done, total) for stage, done, total in calls if stage == "cam"]
    assert cam[-1] == (result.explanation.n_patches,) * 2
    # heat map: the CT's geometry, the engine's values
    assert result.cam_node.GetName() == "chest Grad-CAM"
    np.testing.assert_allclose(_node_matrix(result.cam_node), _node_matrix(ct), atol=1e-9, rtol=0)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(result.cam_node), result.explanation.cam.array)
    # segmentation: one segment per region, each equal to its label
    _check_segments_and_table(result, ct)
    assert result.segmentation.regions, "the seeded model gives hot regions at 0.3"

    # a second run into the same nodes reuses them; restricted to the lungs, all regions lie inside them
    again = mrml.explain_volume_node(
        ct,
        result.cam_node,
        result.segmentation_node,
        result.table_node,
        model=str(tiny_model),
        device="cpu",
        threshold=0.3,
        **FAST,
    )
    assert (again.cam_node, again.segmentation_node, again.table_node) == (
        result.cam_node,
        result.segmentation_node,
        result.table_node,
    )
    assert not np.any((again.segmentation.labelmap.array > 0) & ~again.explanation.lung_mask)
    _check_segments_and_table(again, ct)
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 2  # the CT and the heat map
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 1


def _check_segments_and_table(result, ct) -> None:
    labels = result.segmentation.labelmap.array
    regions = result.segmentation.regions
    segments = result.segmentation_node.GetSegmentation()
    assert segments.GetNumberOfSegments() == len(regions)
    for n, region in enumerate(regions):
        assert segments.GetNthSegment(n).GetName() == region.name
        mask = _segment_mask(result.segmentation_node, segments.GetNthSegmentID(n), ct)
        np.testing.assert_array_equal(mask, labels == region.label)
    assert result.table_node.GetNumberOfRows() == len(regions)
    voxels = result.table_node.GetTable().GetColumnByName("Voxels")
    assert [voxels.GetValue(n) for n in range(len(regions))] == [r.voxels for r in regions]


def test_explain_volume_node_never_overwrites_the_ct(scene, nodule_chest):
    ct = slicer.util.addVolumeFromArray(nodule_chest.volume.array, nodule_chest.volume.ijk_to_ras, name="chest")
    with pytest.raises(InvalidInputError, match="input CT itself"):
        mrml.explain_volume_node(ct, ct)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(ct), nodule_chest.volume.array)


def test_explain_volume_node_cancelled_makes_no_nodes(scene, nodule_chest, tiny_model):
    from LungGradCAMLib.core.errors import CancelledError

    ct = slicer.util.addVolumeFromArray(nodule_chest.volume.array, nodule_chest.volume.ijk_to_ras, name="chest")
    with pytest.raises(CancelledError):
        mrml.explain_volume_node(ct, model=str(tiny_model), device="cpu", cancel=lambda: True, **FAST)
    # the Slicer panel's way: the user declines once the cost estimate is shown (Score-CAM)
    estimates = []

    def decline(estimate) -> bool:
        estimates.append(estimate)
        return False

    with pytest.raises(CancelledError, match="not started: scorecam"):
        mrml.explain_volume_node(
            ct, model=str(tiny_model), device="cpu", method="scorecam", **FAST, on_estimate=decline
        )
    assert estimates[0].method == "scorecam" and estimates[0].passes > estimates[0].patches
    assert scene.GetNumberOfNodesByClass("vtkMRMLScalarVolumeNode") == 1
    assert scene.GetNumberOfNodesByClass("vtkMRMLSegmentationNode") == 0
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0


@pytest.mark.slow
def test_explain_volume_node_with_the_bundled_model_finds_the_nodule(scene, nodule_chest):
    """What the Slicer self-test checks, here in CI: the heat map peaks in the nodule and a segment overlaps it."""
    from LungGradCAMLib.engine.models import available_models
    from LungGradCAMLib.evaluation import metrics

    assert "default" in available_models()  # part of the package
    ct = slicer.util.addVolumeFromArray(nodule_chest.volume.array, nodule_chest.volume.ijk_to_ras, name="chest")
    result = mrml.explain_volume_node(ct, device="cpu")
    nodule = nodule_chest.nodule_labelmap > 0
    assert metrics.pointing_game(slicer.util.arrayFromVolume(result.cam_node), nodule)
    assert np.any((result.segmentation.labelmap.array > 0) & nodule)


# --- region models (card input "roi", e.g. lidc-malignancy) --------------------------------------------
def test_a_region_model_explains_a_markups_roi(scene, nodule_chest, region_model):
    """An ROI node placed on the nodule is the region a region model judges: one patch centred on it."""
    ct = slicer.util.addVolumeFromArray(nodule_chest.volume.array, nodule_chest.volume.ijk_to_ras, name="chest")
    roi_node = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    with pytest.raises(InvalidInputError, match="not placed yet"):
        mrml.roi_from_node(roi_node)
    with pytest.raises(InvalidInputError, match="markups ROI node"):
        mrml.roi_from_node(ct)
    roi_node.SetCenterWorld(*NODULE_RAS)
    roi_node.SetSizeWorld(30.0, 30.0, 30.0)
    centre, size = mrml.roi_from_node(roi_node)
    np.testing.assert_allclose(centre, NODULE_RAS)
    np.testing.assert_allclose(size, 30.0)
    with pytest.raises(InvalidInputError, match="judges a region"):  # no roi: refused, no node made
        mrml.explain_volume_node(ct, model=str(region_model), device="cpu")
    assert scene.GetNumberOfNodesByClass("vtkMRMLTableNode") == 0
    result = mrml.explain_volume_node(
        ct, model=str(region_model), device="cpu", roi=(centre, size), restrict_to_lungs=False, threshold=0.1
    )
    assert result.explanation.mode == "roi" and result.explanation.n_patches == 1
    assert set(result.explanation.probabilities) == {"benign", "malignant"}
    hot = np.argwhere(slicer.util.arrayFromVolume(result.cam_node) > 0)
    middle = result.explanation.cam.ijk_to_ras_points((hot.min(axis=0) + hot.max(axis=0))[::-1] / 2)[0]
    assert np.all(np.abs(middle - NODULE_RAS) <= 4.0)  # the patch is centred on the ROI


def test_a_hot_region_becomes_an_roi_and_the_table_carries_the_region_models_answer(scene, nodule_chest, region_model):
    """The whole-scan model's regions, each with the region model's second opinion in the table; a
    region turned into an ROI node gives back its centre for the region model."""
    ct = slicer.util.addVolumeFromArray(nodule_chest.volume.array, nodule_chest.volume.ijk_to_ras, name="chest")
    result = mrml.explain_volume_node(ct, model="default", device="cpu", threshold=0.3, region_model=str(region_model))
    regions = result.segmentation.regions
    assert regions, "the default model finds the phantom's nodule at 0.3"
    table = result.table_node.GetTable()
    assert result.table_node.GetNumberOfColumns() == 16 + 3 + 5  # regions, second opinion, nodule outline
    for row, region in enumerate(regions):
        assert table.GetColumnByName("Outline").GetValue(row) == (region.outline["name"] or "")
        assert table.GetColumnByName("Region model").GetValue(row) == "tiny-region"
        assert table.GetColumnByName("Region model class").GetValue(row) == "malignant"
        assert table.GetColumnByName("Region model P").GetValue(row) == pytest.approx(
            region.second_opinion["probability"]
        )
    roi_node = mrml.region_to_roi_node(regions[0], margin_mm=5.0)
    centre, size = mrml.roi_from_node(roi_node)
    np.testing.assert_allclose(centre, regions[0].centroid_ras, atol=1e-6)
    lo, hi = (np.asarray(v) for v in regions[0].bbox_ras)
    np.testing.assert_allclose(size, np.abs(hi - lo) + 10.0, atol=1e-6)
