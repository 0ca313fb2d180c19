"""LungGradCAMLogic (LungGradCAM/LungGradCAM.py) end to end on real MRML from the slicer-core wheel:
the DICOM database listing and loading from a real ctkDICOM.sql, Apply from the parameter node,
progress, Cancel mid-run, out-of-memory recovery, and the output nodes as the panel shows them.

Only what the Slicer application itself provides is a stand-in (qt, slicer.app and the application's
Python layer: see slicer_app_standin.py); MRML, slicer.util and Slicer's logics are real.
"""
from __future__ import annotations

import numpy as np
import pydicom
import pytest
import torch

slicer = pytest.importorskip("slicer", reason="slicer-core is not installed (pip install slicer-core)")
vtk = pytest.importorskip("vtk")

import LungGradCAMLib as lgc  # noqa: E402
from LungGradCAMLib import phantom  # noqa: E402
from LungGradCAMLib.core.errors import CancelledError  # noqa: E402
from LungGradCAMLib.engine.models import load_model  # noqa: E402
from LungGradCAMLib.options import ExplainOptions  # noqa: E402

from slicer_app_standin import slicer_application  # noqa: E402
from helpers import make_ctk_db, make_tiny_model  # noqa: E402

NODULE_RAS = (60.0, 20.0, -150.0)


@pytest.fixture(scope="module")
def chest():
    nodule = phantom.NoduleSpec(center_ras=NODULE_RAS, diameter_mm=20.0, malignant=True)
    return phantom.chest_ct(seed=3, shape=(40, 96, 96), spacing_mm=(3.6, 3.6, 4.5), nodules=[nodule])


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("model"), patch=(16, 16, 16), spacing=(6.0, 6.0, 6.0))


@pytest.fixture(scope="module")
def database(tmp_path_factory, chest):
    """A real Slicer DICOM database folder: the phantom as a CT series and its ctkDICOM.sql."""
    folder = tmp_path_factory.mktemp("SlicerDICOMDatabase")
    phantom.write_dicom_series(chest.volume, folder / "dicom", shuffle_names=True)
    make_ctk_db(folder, folder / "dicom")
    return folder


@pytest.fixture
def app(database):
    """A fresh scene with Slicer's application around it; yields (the module, the scene)."""
    scene = slicer.mrmlScene = slicer.vtkMRMLScene()
    with slicer_application(scene, database / "ctkDICOM.sql"):
        import LungGradCAM

        yield LungGradCAM, scene


def _matrix(node) -> np.ndarray:
    m = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(m)
    return slicer.util.arrayFromVTKMatrix(m)


def _count(scene, cls: str) -> int:
    return scene.GetNumberOfNodesByClass(cls)


def test_lists_and_loads_ct_series_of_the_dicom_database(app, chest, database):
    module, scene = app
    logic = module.LungGradCAMLogic()
    series = logic.listCTSeries()
    expected = lgc.DicomDatabase(database).ct_series()
    assert [s["seriesUID"] for s in series] == [s.series_uid for s in expected]
    header = pydicom.dcmread(next((database / "dicom").iterdir()), stop_before_pixels=True)
    assert series[0]["title"] == (f"{header.PatientName} | {header.SeriesNumber} | {header.SeriesDescription} "
                                  f"({chest.volume.shape[0]} images)")
    node = logic.loadSeries(series[0]["seriesUID"])
    assert node.IsA("vtkMRMLScalarVolumeNode") and node.GetName() == f"{header.SeriesNumber}: {header.SeriesDescription}"
    reference = lgc.load_dicom_series(database / "dicom")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), reference.array)
    np.testing.assert_allclose(_matrix(node), reference.ijk_to_ras, atol=1e-6)
    # with no database open there is nothing to list, and loading says what to do
    slicer.app.dicomDatabase().isOpen = False
    assert logic.listCTSeries() == []
    with pytest.raises(lgc.LungGradCAMError, match="DICOM database is not open"):
        logic.loadSeries(series[0]["seriesUID"])


def test_apply_from_the_parameter_node(app, chest, tiny_model):
    module, scene = app
    logic = module.LungGradCAMLogic()
    ct = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="chest")
    p = logic.getParameterNode()
    assert p.parameterNode.IsA("vtkMRMLScriptedModuleNode") and p.parameterNode.GetAttribute("ModuleName") == "LungGradCAM"
    p.inputVolume, p.model, p.threshold, p.device, p.batchSize, p.targetClass = ct, str(tiny_model), 0.3, "cpu", 16, "nodule"
    options = logic.optionsFromParameterNode(p)
    assert (options.threshold, options.device, options.batch_size, options.target, options.stride) == (
        0.3, "cpu", 16, "nodule", None)
    reports = []
    result = logic.process(p.inputVolume, p.camVolume, p.segmentation, p.table, options=options,
                           progressCallback=lambda *report: reports.append(report))

    # progress: every stage, in order, each started and finished; the heat map batch by batch
    stages = [stage for stage, _, _ in reports]
    order = [s for n, s in enumerate(stages) if n == 0 or s != stages[n - 1]]
    assert order == ["load_model", "lung_mask", "resample", "cam", "resample_back", "segment"]
    cam = [(done, total) for stage, done, total in reports if stage == "cam"]
    assert cam[-1][0] == cam[-1][1] == result.explanation.n_patches
    assert [done for done, _ in cam] == sorted(done for done, _ in cam) and len(cam) > 3
    assert logic.progressText("cam", 3, 9) == "Computing the heat map: 3 of 9 patches"
    assert logic.progressText("lung_mask", 0, 1) == "Finding the lungs..."

    # the heat map: the CT's geometry, the engine's values, a hot colour table, values < 0.1 hidden
    cam_node = result.cam_node
    assert cam_node.IsA("vtkMRMLScalarVolumeNode") and cam_node.GetName() == "chest Grad-CAM"
    np.testing.assert_allclose(_matrix(cam_node), _matrix(ct), atol=1e-9)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(cam_node), result.explanation.cam.array)
    display = cam_node.GetDisplayNode()
    assert display.GetColorNodeID() == "vtkMRMLPETProceduralColorNodePET-Heat"
    assert (display.GetWindowLevelMin(), display.GetWindowLevelMax()) == (0.0, 1.0)
    assert display.GetApplyThreshold() and display.GetLowerThreshold() == pytest.approx(0.1)
    # shown: CT behind, heat map in front at 0.4 in every slice view, volume rendered in 3D
    for n in range(_count(scene, "vtkMRMLSliceCompositeNode")):
        composite = scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode")
        assert (composite.GetBackgroundVolumeID(), composite.GetForegroundVolumeID()) == (ct.GetID(), cam_node.GetID())
        assert composite.GetForegroundOpacity() == pytest.approx(module.CAM_OPACITY)
    rendering = slicer.modules.volumerendering.logic().GetFirstVolumeRenderingDisplayNode(cam_node)
    assert rendering is not None and rendering.GetVisibility()

    # regions: one named segment and one table row each, shown in 2D and 3D
    regions = result.segmentation.regions
    assert regions, "the tiny model's heat map has regions at 0.3"
    segments = result.segmentation_node.GetSegmentation()
    assert [segments.GetNthSegment(n).GetName() for n in range(segments.GetNumberOfSegments())] == [
        f"heat-map region {n + 1}" for n in range(len(regions))]
    assert result.segmentation_node.GetDisplayNode().GetVisibility2D()
    assert result.table_node.GetNumberOfRows() == len(regions)
    assert not np.any((result.segmentation.labelmap.array > 0) & ~result.explanation.lung_mask)  # restricted

    # what the panel says: prediction, outcome, and that this is a research model
    text = logic.resultText(result)
    assert f"{len(regions)} hot region" in text and "Research model:" in text
    assert result.explanation.model["intended_use"] in text
    assert logic.jumpToHottestRegion(result)


def test_console_keywords_and_a_run_without_regions(app, chest, tiny_model):
    """process() from the Python console with keywords; a heat map without a region above the
    threshold is a result ("no region above threshold"), not an error."""
    module, scene = app
    logic = module.LungGradCAMLogic()
    ct = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="chest")
    blind = load_model(tiny_model, device="cpu")  # a head of zeros: no evidence anywhere, a heat map of zeros
    with torch.no_grad():
        blind.module.head[-1].weight.zero_()
    result = logic.process(ct, model=blind, device="cpu", batch_size=16, threshold=0.2, showResult=False)
    assert result.segmentation.regions == [] and not result.explanation.cam.array.any()
    assert result.segmentation_node.GetSegmentation().GetNumberOfSegments() == 0
    assert result.table_node.GetNumberOfRows() == 0
    assert "no region above threshold 0.20" in logic.resultText(result)
    with pytest.raises(lgc.LungGradCAMError, match="either as options"):
        logic.process(ct, options=ExplainOptions(), threshold=0.2)


@pytest.mark.parametrize("stop_at", ["lung_mask", "cam"])
def test_cancel_stops_at_the_next_step_and_makes_no_node(app, chest, tiny_model, stop_at):
    """Cancel pressed while the lungs are segmented stops before the next stage; pressed during
    the heat map, before the next batch. No output node is made either way."""
    module, scene = app
    logic = module.LungGradCAMLogic()
    ct = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="chest")
    before = scene.GetNumberOfNodes()
    cancelled, after_cancel = [], []

    def progress(stage, done, total):
        if cancelled:
            after_cancel.append((stage, done, total))
        elif stage == stop_at and (stage != "cam" or done > 0):
            logic.requestCancel()  # as the Cancel button does, from the events processed during progress
            cancelled.append(stage)

    with pytest.raises(CancelledError):
        logic.process(ct, model=str(tiny_model), device="cpu", batch_size=2, progressCallback=progress)
    # the stage that was running may report its end; nothing after it starts
    assert after_cancel in ([], [(stop_at, 1, 1)]), after_cancel
    assert scene.GetNumberOfNodes() == before


def test_out_of_memory_halves_the_batch_and_finishes(app, chest, tiny_model):
    """Out of memory on a batch of patches: the batch is halved and the run finishes with the
    same heat map as one patch at a time (torch's own OutOfMemoryError, raised by the model)."""
    module, scene = app
    logic = module.LungGradCAMLogic()
    ct = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="chest")
    loaded = load_model(tiny_model, device="cpu")

    def too_big(module_, inputs):
        if inputs[0].shape[0] > 1:
            raise torch.OutOfMemoryError("out of memory (more than one patch per batch)")

    handle = loaded.module.register_forward_pre_hook(too_big)
    try:
        result = logic.process(ct, model=loaded, device="cpu", batch_size=8, showResult=False)
    finally:
        handle.remove()
    one_by_one = logic.process(ct, model=loaded, device="cpu", batch_size=1, showResult=False)
    # halved until each CPU worker (one per torch thread) runs one patch at a time
    assert result.explanation.batch_size_used <= max(1, torch.get_num_threads()) < 8
    np.testing.assert_array_equal(result.explanation.cam.array, one_by_one.explanation.cam.array)
    assert "ran out of memory" not in logic.resultText(result)  # it stayed on its device


@pytest.mark.gpu
def test_gpu_out_of_memory_falls_back_to_the_cpu(app, chest, tiny_model):
    """On a GPU: the model runs out of memory on the GPU at every batch size; the run finishes on
    the CPU, and the panel's text says so."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    module, scene = app
    logic = module.LungGradCAMLogic()
    ct = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="chest")
    loaded = load_model(tiny_model, device="cuda")

    def no_gpu_memory(module_, inputs):
        if inputs[0].is_cuda:
            raise torch.OutOfMemoryError("CUDA out of memory (every batch on the GPU)")

    loaded.module.register_forward_pre_hook(no_gpu_memory)
    with pytest.warns(RuntimeWarning, match="continuing on the CPU"):
        result = logic.process(ct, model=loaded, device="cuda", batch_size=4, showResult=False)
    assert result.explanation.device_used == "cpu"
    assert "ran out of memory: the heat map was finished on the cpu" in logic.resultText(result)


@pytest.mark.gpu
def test_gpu_real_out_of_memory_is_recovered_at_logic_level(app, chest, tiny_model):
    """On a GPU with this process's memory capped: a batch far too big for it is halved until it
    fits, and the heat map equals the CPU's."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    module, scene = app
    logic = module.LungGradCAMLogic()
    big = phantom.chest_ct(seed=3, shape=(120, 256, 256), spacing_mm=(1.4, 1.4, 1.5))
    ct = slicer.util.addVolumeFromArray(big.volume.array, big.volume.ijk_to_ras, name="big")
    wide = make_tiny_model(tiny_model.parent, name="wide", patch=(96, 96, 96), spacing=(1.5, 1.5, 1.5))
    expected = logic.process(ct, model=str(wide), device="cpu", batch_size=2, showResult=False)
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0 * 2 ** 30 / total)
    try:
        result = logic.process(ct, model=str(wide), device="cuda", batch_size=256, showResult=False)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
    assert result.explanation.device_used.startswith("cuda")
    assert result.explanation.batch_size_used < 256
    np.testing.assert_allclose(result.explanation.cam.array, expected.explanation.cam.array, atol=1e-3)


def test_second_opinion_and_explain_selected_region(app, chest, tiny_model, region_model):
    """The panel's region-model path: a second opinion on each hot region in the table, then the
    selected region as an ROI explained by the region model; a new ROI is placed by a click."""
    module, scene = app
    logic = module.LungGradCAMLogic()
    assert logic.regionModels() == ["lidc-malignancy"]  # the bundled region model; default judges scans
    ct = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="chest")
    p = logic.getParameterNode()
    p.inputVolume, p.model, p.threshold, p.device, p.regionModel = ct, str(tiny_model), 0.3, "cpu", str(region_model)
    options = logic.optionsFromParameterNode(p)
    assert options.region_model == str(region_model) and options.roi is None
    result = logic.process(ct, options=options)
    regions = result.segmentation.regions
    assert regions and all(r.second_opinion["model"] == "tiny-region" for r in regions)
    column = result.table_node.GetTable().GetColumnByName("Region model P")
    assert [column.GetValue(n) for n in range(len(regions))] == pytest.approx(
        [r.second_opinion["probability"] for r in regions])

    # "Explain selected region": an ROI around it, explained by the region model (one patch on it)
    p.roi, p.model, p.regionModel = logic.regionToRoi(regions[0]), str(region_model), ""
    options = logic.optionsFromParameterNode(p)
    np.testing.assert_allclose(options.roi[0], regions[0].centroid_ras, atol=1e-6)
    again = logic.process(ct, options=options)
    assert again.explanation.mode == "roi" and again.explanation.n_patches == 1
    assert again.explanation.target_class == "malignant" and again.cam_node is not result.cam_node
    # an ROI run outlines the nodule at the peak of each region; on this coarse phantom (3.6 mm
    # pixels, 4.5 mm slices: far coarser than the outline network's CTs) none is found, and says so
    assert all(r.outline is not None and not r.outline["found"] for r in again.segmentation.regions)
    assert "no nodule outlined at its peak" in logic.resultText(again)

    # a new ROI: the next click places it (place mode on it); placed but not sized, it is one patch
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    logic.startPlacingRoi(roi)
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    assert selection.GetActivePlaceNodeID() == roi.GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsROINode"
    interaction = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    assert interaction.GetCurrentInteractionMode() == interaction.Place and not interaction.GetPlaceModePersistence()
    roi.AddControlPointWorld(vtk.vtkVector3d(*NODULE_RAS))
    p.roi = roi
    assert logic.optionsFromParameterNode(p).roi == (NODULE_RAS, (1.0, 1.0, 1.0))


def test_an_roi_run_outlines_the_nodule_as_a_segment_and_in_the_table(app):
    """The bundled region model on an ROI placed on a 20 mm nodule (a clinical resolution): the
    nodule at its heat map's peak is outlined, a segment of its own beside the heat-map region, its
    measurements in the results table and the panel's text."""
    module, scene = app
    logic = module.LungGradCAMLogic()
    nodule = phantom.NoduleSpec(center_ras=NODULE_RAS, diameter_mm=20.0, malignant=True)
    chest = phantom.chest_ct(seed=3, shape=(64, 192, 192), spacing_mm=(1.8, 1.8, 3.0), nodules=[nodule])
    ct = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="chest")
    result = logic.process(ct, model="lidc-malignancy", roi=(NODULE_RAS, (40.0, 40.0, 40.0)), threshold=0.2,
                           device="cpu")
    outline = result.segmentation.regions[0].outline
    assert outline["found"] and outline["name"] == "nodule outline 1"
    segments = result.segmentation_node.GetSegmentation()
    names = [segments.GetNthSegment(n).GetName() for n in range(segments.GetNumberOfSegments())]
    assert names[0] == "heat-map region 1" and "nodule outline 1" in names
    table = result.table_node.GetTable()
    assert table.GetColumnByName("Outline").GetValue(0) == "nodule outline 1"
    assert table.GetColumnByName("Mean diameter [mm]").GetValue(0) == pytest.approx(outline["mean_diameter_mm"])
    assert table.GetColumnByName("Outline volume [ml]").GetValue(0) == pytest.approx(outline["volume_ml"])
    assert result.table_node.GetColumnUnitLabel("Long axis [mm]") == "mm"
    assert f"heat-map region 1: nodule outline 1: {outline['volume_ml']:.2f} ml" in logic.resultText(result)

