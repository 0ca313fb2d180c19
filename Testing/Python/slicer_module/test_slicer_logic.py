"""LungGradCAMLogic (LungGradCAM/LungGradCAMSlicer/logic.py) end to end on real MRML from the slicer-core wheel:
the DICOM database listing and loading from a real ctkDICOM.sql, Apply from the parameter node,
progress, Cancel mid-run, out-of-memory recovery, and the output nodes as the panel shows them.

Only what the Slicer application itself provides is a stand-in (qt, slicer.app and the application's
Python layer: see slicer_app_standin.py); MRML, slicer.util and Slicer's logics are real.
"""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

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

from helpers import NODULE_RAS, chest_with_nodule, make_ctk_db, make_tiny_model  # noqa: E402
from slicer_app_standin import slicer_application  # noqa: E402


@pytest.fixture(scope="module")
def chest():
    return chest_with_nodule(20.0, shape=(40, 96, 96), spacing_mm=(3.6, 3.6, 4.5))


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
    assert series[0]["title"] == (
        f"{header.PatientName} | {header.SeriesNumber} | {header.SeriesDescription} ({chest.volume.shape[0]} images)"
    )
    node = logic.loadSeries(series[0]["seriesUID"])
    assert (
        node.IsA("vtkMRMLScalarVolumeNode") and node.GetName() == f"{header.SeriesNumber}: {header.SeriesDescription}"
    )
    reference = lgc.load_dicom_series(database / "dicom")
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(node), reference.array)
    np.testing.assert_allclose(_matrix(node), reference.ijk_to_ras, atol=1e-6)
    # as Slicer's DICOM module loads a series: its instance UIDs in slice order (inferior to superior
    # here), under its study and patient in the subject hierarchy, shown in the slice views at once
    headers = sorted(
        (pydicom.dcmread(f, stop_before_pixels=True) for f in (database / "dicom").iterdir()),
        key=lambda h: float(h.ImagePositionPatient[2]),
    )
    assert node.GetAttribute("DICOM.instanceUIDs") == " ".join(h.SOPInstanceUID for h in headers)
    constants = slicer.vtkMRMLSubjectHierarchyConstants
    shn = slicer.vtkMRMLSubjectHierarchyNode.GetSubjectHierarchyNode(scene)
    item = shn.GetItemByDataNode(node)
    assert shn.GetItemUID(item, constants.GetDICOMUIDName()) == header.SeriesInstanceUID
    assert shn.GetItemAttribute(item, constants.GetDICOMAttributePrefix() + "SeriesModality") == "CT"
    study = shn.GetItemParent(item)
    patient = shn.GetItemParent(study)
    assert shn.GetItemUID(study, constants.GetDICOMUIDName()) == header.StudyInstanceUID
    assert shn.GetItemLevel(study) == constants.GetDICOMLevelStudy()
    assert shn.GetItemUID(patient, constants.GetDICOMUIDName()) == header.PatientID
    assert shn.GetItemLevel(patient) == constants.GetDICOMLevelPatient()
    assert shn.GetItemName(patient) == str(header.PatientName)
    assert shn.GetItemAttribute(patient, constants.GetDICOMPatientIDAttributeName()) == header.PatientID
    for n in range(_count(scene, "vtkMRMLSliceCompositeNode")):
        assert scene.GetNthNodeByClass(n, "vtkMRMLSliceCompositeNode").GetBackgroundVolumeID() == node.GetID()
    again = logic.loadSeries(series[0]["seriesUID"])  # a second load: the same patient and study items
    assert shn.GetItemParent(shn.GetItemByDataNode(again)) == study
    # with no database open there is nothing to list, and loading says what to do
    slicer.app.dicomDatabase().isOpen = False
    assert logic.listCTSeries() == []
    with pytest.raises(lgc.LungGradCAMError, match="DICOM database is not open"):
        logic.loadSeries(series[0]["seriesUID"])


def test_apply_from_the_parameter_node(app, chest, tiny_model):
    from LungGradCAMSlicer.logic import CAM_OPACITY

    module, scene = app
    logic = module.LungGradCAMLogic()
    ct = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="chest")
    p = logic.getParameterNode()
    assert (
        p.parameterNode.IsA("vtkMRMLScriptedModuleNode") and p.parameterNode.GetAttribute("ModuleName") == "LungGradCAM"
    )
    p.inputVolume, p.model, p.threshold, p.device, p.batchSize, p.targetClass = (
        ct,
        str(tiny_model),
        0.3,
        "cpu",
        16,
        "nodule",
    )
    options = logic.optionsFromParameterNode(p)
    assert (options.threshold, options.device, options.batch_size, options.target, options.stride) == (
        0.3,
        "cpu",
        16,
        "nodule",
        None,
    )
    reports = []
    result = logic.process(
        p.inputVolume,
        p.camVolume,
        p.segmentation,
        p.table,
        options=options,
        progressCallback=lambda *report: reports.append(report),
    )

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
        assert composite.GetForegroundOpacity() == pytest.approx(CAM_OPACITY)
    rendering = slicer.modules.volumerendering.logic().GetFirstVolumeRenderingDisplayNode(cam_node)
    assert rendering is not None and rendering.GetVisibility()

    # regions: one named segment and one table row each, shown in 2D and 3D
    regions = result.segmentation.regions
    assert regions, "the tiny model's heat map has regions at 0.3"
    segments = result.segmentation_node.GetSegmentation()
    assert [segments.GetNthSegment(n).GetName() for n in range(segments.GetNumberOfSegments())] == [
        f"heat-map region {n + 1}" for n in range(len(regions))
    ]
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
    torch.cuda.set_per_process_memory_fraction(1.0 * 2**30 / total)
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
        [r.second_opinion["probability"] for r in regions]
    )

    # "Explain selected region": an ROI around it, explained by the region model (one patch on it),
    # into new nodes; the panel's settings stay, so the next Apply is the whole-scan run it says
    before = (p.model, p.regionModel, p.roi, p.targetClass, p.method)
    described = logic.applyDescription(p)
    assert described == (
        f"Apply explains the whole scan of 'chest' with model '{tiny_model.name}', asking "
        f"'{region_model}' about each hot region."
    )
    options, roi_node = logic.regionRunOptions(p, regions[0])
    assert (p.model, p.regionModel, p.roi, p.targetClass, p.method) == before and logic.applyDescription(p) == described
    assert options.model == str(region_model) and options.region_model is None and options.mode == "roi"
    np.testing.assert_allclose(options.roi[0], regions[0].centroid_ras, atol=1e-6)
    center = [0.0] * 3
    roi_node.GetCenterWorld(center)
    np.testing.assert_allclose(center, regions[0].centroid_ras, atol=1e-6)
    again = logic.process(ct, options=options)
    assert again.explanation.mode == "roi" and again.explanation.n_patches == 1
    assert again.explanation.target_class == "malignant" and again.cam_node is not result.cam_node
    assert logic.optionsFromParameterNode(p).roi is None  # the next Apply: the whole scan again


def test_one_click_on_the_nodule_places_the_region_models_roi(app):
    """A new ROI: place mode for one point, and the clicked point becomes an ROI of the region
    model's patch (lidc-malignancy: 32 voxels of 1.25 mm, 40 mm) centred there; the point goes."""
    from LungGradCAMSlicer.logic import DEFAULT_ROI_MM

    module, scene = app
    logic = module.LungGradCAMLogic()
    roi = scene.AddNewNodeByClass("vtkMRMLMarkupsROINode")
    points = logic.startPlacingPoint()
    selection = scene.GetNodeByID("vtkMRMLSelectionNodeSingleton")
    assert selection.GetActivePlaceNodeID() == points.GetID()
    assert selection.GetActivePlaceNodeClassName() == "vtkMRMLMarkupsFiducialNode"
    interaction = scene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
    assert interaction.GetCurrentInteractionMode() == interaction.Place and not interaction.GetPlaceModePersistence()
    with pytest.raises(lgc.LungGradCAMError, match="no point was placed"):
        logic.roiFromPoint(points, roi)
    points.AddControlPointWorld(vtk.vtkVector3d(*NODULE_RAS))  # the click
    size = logic.regionSizeMm("default", "lidc-malignancy")
    assert size == [48.0, 48.0, 48.0] and logic.regionSizeMm("lidc-malignancy") == size
    assert logic.regionSizeMm("default") == [DEFAULT_ROI_MM] * 3  # no region model chosen
    assert logic.roiFromPoint(points, roi, size) is roi and scene.GetNodeByID(points.GetID()) is None
    p = logic.getParameterNode()
    p.roi, p.model = roi, "lidc-malignancy"
    centre, extent = logic.optionsFromParameterNode(p).roi
    np.testing.assert_allclose(centre, NODULE_RAS, atol=1e-9)
    np.testing.assert_allclose(extent, size, atol=1e-9)


def test_torch_older_than_supported_is_refused_with_what_to_do(app):
    module, _ = app
    logic = module.LungGradCAMLogic()
    assert logic.torchVersionProblem() is None  # the installed one
    assert logic.torchVersionProblem("2.1.0+cu121") is None and logic.torchVersionProblem("2.13.0") is None
    problem = logic.torchVersionProblem("2.0.1+cpu")
    assert "PyTorch 2.0.1+cpu is installed" in problem and "'>=2.1'" in problem and "PyTorch Util" in problem
    assert logic.torchVersionProblem("1.13.1") and logic.torchVersionProblem("2.0")


def test_apply_runs_lunggradcam_in_a_background_process(app, chest, tiny_model):
    """Apply's path: `lunggradcam run --progress json` in a real child process; its progress lines
    arrive while it runs, its outputs become the same nodes as the console's synchronous process(),
    and its temporary folder is gone afterwards."""
    module, scene = app
    logic = module.LungGradCAMLogic()
    ct = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="chest")
    options = ExplainOptions(model=str(tiny_model), device="cpu", batch_size=4, threshold=0.3)
    job = logic.startProcess(ct, options=options)
    assert job.command[:4] == [sys.executable, "-m", "LungGradCAMLib.cli", "run"] and "--progress" in job.command
    events = []
    job.wait(onEvent=events.append, timeout=300)
    stages = [e["stage"] for e in events if e["event"] == "progress"]
    order = [s for n, s in enumerate(stages) if n == 0 or s != stages[n - 1]]
    assert order == ["load", "load_model", "lung_mask", "resample", "cam", "resample_back", "segment", "write"]
    assert [e["event"] for e in events].count("estimate") == 1 and events[-1]["event"] == "done"
    report = json.loads((Path(job.out) / "report.json").read_text())
    assert report["files"] == ["cam.nrrd", "segmentation.seg.nrrd", "report.json"]  # what the scene needs
    timings = report["timings_s"]  # the command's wall time: its imports (startup) are in the total
    assert timings["startup"] > 0 and sum(v for k, v in timings.items() if k != "total") <= timings["total"]
    result = job.result()
    assert not Path(job.folder).exists()

    here = logic.process(ct, options=options, showResult=False)
    np.testing.assert_array_equal(
        slicer.util.arrayFromVolume(result.cam_node), slicer.util.arrayFromVolume(here.cam_node)
    )
    np.testing.assert_allclose(_matrix(result.cam_node), _matrix(ct), atol=1e-9)
    np.testing.assert_array_equal(result.segmentation.labelmap.array, here.segmentation.labelmap.array)

    def plain(regions):  # as JSON holds them (tuples as lists, numpy numbers as floats)
        return json.loads(json.dumps([r.to_dict() for r in regions], default=float))

    assert plain(result.segmentation.regions) == plain(here.segmentation.regions)
    segments = result.segmentation_node.GetSegmentation()
    assert segments.GetNumberOfSegments() == len(here.segmentation.regions) > 0
    assert result.table_node.GetNumberOfRows() == here.table_node.GetNumberOfRows()
    assert logic.resultText(result) == logic.resultText(here)


@pytest.mark.slow
def test_background_process_cancel_failure_and_a_costly_heat_map(app, chest, tiny_model, tmp_path):
    """Cancel ends the child (SIGTERM: it removes its temporaries) and makes no node; a failing
    child's own message is the error; a heat map over the cost limit stops before it is computed."""
    module, scene = app
    logic = module.LungGradCAMLogic()
    ct = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="chest")
    options = ExplainOptions(model=str(tiny_model), device="cpu", batch_size=1)
    nodes = scene.GetNumberOfNodes()
    job = logic.startProcess(ct, options=options)

    def cancel_at_the_lungs(event):
        if event["event"] == "progress" and event["stage"] == "lung_mask" and not job.cancelled:
            job.cancel()

    job.wait(onEvent=cancel_at_the_lungs, timeout=300)
    assert job.cancelled and job.process.returncode == 128 + signal.SIGTERM  # the CLI's own SIGTERM exit
    with pytest.raises(CancelledError):
        job.result()
    assert scene.GetNumberOfNodes() == nodes and not Path(job.folder).exists()

    job = logic.startProcess(ct, model=str(tmp_path / "missing.safetensors"), device="cpu")
    job.wait(timeout=300)
    with pytest.raises(lgc.LungGradCAMError, match="missing.safetensors") as error:
        job.result()
    assert "Traceback" not in str(error.value) and scene.GetNumberOfNodes() == nodes

    job = logic.startProcess(ct, options=options, maxEstimateSeconds=0.0)
    job.wait(timeout=300)
    assert job.estimate["stopped"] and job.estimate["patches"] > 0
    with pytest.raises(CancelledError, match="not started: gradcam: "):
        job.result()
    assert scene.GetNumberOfNodes() == nodes and not Path(job.folder).exists()
    with pytest.raises(lgc.LungGradCAMError, match="a loaded model cannot be passed"):
        logic.startProcess(ct, model=load_model(tiny_model, device="cpu"))


def test_an_roi_run_outlines_the_nodule_as_a_segment_and_in_the_table(app, nodule_chest):
    """The bundled region model on an ROI placed on a 20 mm nodule (a clinical resolution): the
    nodule at its heat map's peak is outlined, a segment of its own beside the heat-map region, its
    measurements in the results table and the panel's text."""
    module, scene = app
    logic = module.LungGradCAMLogic()
    ct = slicer.util.addVolumeFromArray(nodule_chest.volume.array, nodule_chest.volume.ijk_to_ras, name="chest")
    result = logic.process(
        ct, model="lidc-malignancy", roi=(NODULE_RAS, (40.0, 40.0, 40.0)), threshold=0.2, device="cpu"
    )
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


def test_the_panel_chooses_every_setting_of_the_command_line(app):
    """Threshold rules (level, otsu, a percentile), layer, mode, scale and the chest-CT check from the
    parameter node, defaulted as ExplainOptions is, reach the command the panel runs unchanged."""
    from LungGradCAMLib.cli import build_parser
    from LungGradCAMLib.cli.common import args_from_options, options_from_args
    from LungGradCAMLib.options import DEFAULTS
    from LungGradCAMSlicer.logic import THRESHOLD_RULES

    module, scene = app
    logic = module.LungGradCAMLogic()
    p = logic.getParameterNode()
    defaults = logic.optionsFromParameterNode(p)
    assert (
        defaults.threshold,
        defaults.mode,
        defaults.scale,
        defaults.layer,
        defaults.chest_check,
        defaults.restrict_to_lungs,
    ) == (
        DEFAULTS["threshold"],
        DEFAULTS["mode"],
        DEFAULTS["scale"],
        DEFAULTS["layer"],
        DEFAULTS["chest_check"],
        DEFAULTS["restrict_to_lungs"],
    )
    assert [logic.optionsFromParameterNode(p).threshold for p.thresholdRule in THRESHOLD_RULES] == [
        DEFAULTS["threshold"],
        "otsu",
        "p99",
    ]
    p.thresholdPercentile, p.layer, p.mode, p.chestCheck = 99.5, "features.act4+features.act6", "sliding", False
    p.scale = "relative"
    options = logic.optionsFromParameterNode(p)
    assert (options.threshold, options.layer, options.mode, options.chest_check, options.scale) == (
        "p99.5",
        "features.act4+features.act6",
        "sliding",
        False,
        "relative",
    )
    args = build_parser().parse_args(["run", "ct.nrrd", "--out", "o", *args_from_options(options)])
    assert options_from_args(args) == options
    p.thresholdPercentile = 101.0
    with pytest.raises(lgc.LungGradCAMError, match="percentile"):
        logic.optionsFromParameterNode(p)


def test_reload_in_developer_mode_reloads_the_settings_and_logic_too(app):
    """Slicer's Reload re-reads only LungGradCAM.py; the widget reloads LungGradCAMSlicer/ first, so
    an edit of the logic takes effect without restarting Slicer."""
    module, _ = app
    import LungGradCAMSlicer.background
    import LungGradCAMSlicer.logic

    before = LungGradCAMSlicer.logic.LungGradCAMLogic, LungGradCAMSlicer.background.BackgroundRun
    widget = module.LungGradCAMWidget.__new__(module.LungGradCAMWidget)
    widget.onReload()
    assert widget.reloaded
    after = LungGradCAMSlicer.logic.LungGradCAMLogic, LungGradCAMSlicer.background.BackgroundRun
    assert after[0] is not before[0] and after[1] is not before[1]
    assert LungGradCAMSlicer.logic.BackgroundRun is after[1]  # the logic runs the reloaded background run
