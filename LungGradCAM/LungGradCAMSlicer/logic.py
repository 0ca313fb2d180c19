"""The Slicer module's settings (LungGradCAMParameterNode, saved with the scene) and its logic
(LungGradCAMLogic): everything the panel does, usable from Slicer's Python console without it."""

import importlib.metadata
import importlib.util
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from typing import Annotated, List, Optional

import qt
import slicer
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

# Neither needs torch, so the panel opens before torch is installed.
from LungGradCAMLib.core.errors import LungGradCAMError
from LungGradCAMLib.options import DEFAULTS, METHODS, MODES, SCALES, ExplainOptions

from .background import BackgroundRun

#: Where the heat map is computed (the command line's --device).
DEVICES = ("auto", "cuda", "cpu") + (("mps",) if sys.platform == "darwin" else ())
#: How the panel thresholds the heat map: at a level, by Otsu's method, or at a percentile.
THRESHOLD_RULES = ("level", "otsu", "percentile")

#: Import name -> pip requirement of what LungGradCAMLib needs beyond Slicer's own Python.
#: numpy, SimpleITK, pydicom, scipy (Slicer 5.8.1 bundles 1.13.1) and VTK come with Slicer and are
#: never reinstalled or upgraded; torch comes through the PyTorch extension (PyTorchUtils).
PIP_REQUIREMENTS = {
    "skimage": "scikit-image>=0.19",
    "scipy": "scipy>=1.9",
    "safetensors": "safetensors>=0.4",
    "tqdm": "tqdm>=4.60",
    "slicerio": "slicerio>=0.1.8",
}
#: The PyTorch versions the engine supports (pyproject.toml's torch>=2.1).
TORCH_REQUIREMENT = ">=2.1"
#: Region size (mm) an ROI placed by one click gets when no region model is chosen.
DEFAULT_ROI_MM = 40.0

#: Opacity of the heat map over the CT in the slice views.
CAM_OPACITY = 0.4


#
# LungGradCAMParameterNode
#


@parameterNodeWrapper
class LungGradCAMParameterNode:
    """
    The panel's settings, saved with the scene.

    inputVolume - the CT (HU) to explain.
    model - a bundled model name or the path of a model file.
    method - the CAM method; auto = the model card's (the one its heat maps scored best with).
    targetClass - the class to explain; empty = the model card's default.
    thresholdRule - how the heat map is thresholded: at a level (threshold), by Otsu's method, or at a
        percentile (thresholdPercentile) of the heat inside the lungs (the command line's --threshold
        0.5 / otsu / p99).
    threshold - heat-map level (0..1) above which voxels are segmented (thresholdRule "level"); the
        scale is absolute (the explained class's patch probability x the patch's map, never rescaled
        per scan).
    thresholdPercentile - the percentile (0..100) of thresholdRule "percentile".
    restrictToLungs - keep only regions inside the lungs.
    chestCheck - refuse a CT that holds no lungs before computing.
    layer - the CAM layer, a dotted module name (several joined by +); empty = the model card's.
    mode - how the scan is covered: auto, sliding, whole or roi.
    scale - the heat map's scale: absolute (the same on every CT) or relative (maximum 1 on each CT).
    device - auto, cuda, cpu (or mps on macOS).
    stride - sliding-window step in model voxels; 0 = half a patch.
    batchSize - patches per model call; 0 = automatic.
    amp - 16-bit mixed precision on CUDA.
    roi - a markups ROI: explain only this region (a region model, e.g. lidc-malignancy, needs one).
    regionModel - a region model asked about each hot region (its second opinion); empty = none.
    camVolume, segmentation, table - the outputs (created when empty).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = DEFAULTS["model"]
    method: Annotated[str, Choice(("auto",) + METHODS)] = "auto"
    targetClass: str = ""
    thresholdRule: Annotated[str, Choice(THRESHOLD_RULES)] = "level"
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = DEFAULTS["threshold"]
    thresholdPercentile: Annotated[float, WithinRange(0.0, 100.0)] = 99.0
    restrictToLungs: bool = DEFAULTS["restrict_to_lungs"]
    chestCheck: bool = DEFAULTS["chest_check"]
    layer: str = ""
    mode: Annotated[str, Choice(MODES)] = DEFAULTS["mode"]
    scale: Annotated[str, Choice(SCALES)] = DEFAULTS["scale"]
    device: Annotated[str, Choice(DEVICES)] = "auto"
    stride: Annotated[int, WithinRange(0, 512)] = 0
    batchSize: Annotated[int, WithinRange(0, 1024)] = 0
    amp: bool = DEFAULTS["amp"]
    roi: vtkMRMLMarkupsROINode
    regionModel: str = ""
    camVolume: vtkMRMLScalarVolumeNode
    segmentation: vtkMRMLSegmentationNode
    table: vtkMRMLTableNode


#
# LungGradCAMLogic
#


class LungGradCAMLogic(ScriptedLoadableModuleLogic):
    """This class should implement all the actual
    computation done by your module.  The interface
    should be such that other python code can import
    this class and make use of the functionality without
    requiring an instance of the Widget.
    Uses ScriptedLoadableModuleLogic base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py

    From the Python console::

        logic = slicer.util.getModuleLogic("LungGradCAM")
        result = logic.process(slicer.util.getNode("CT"), device="cpu")
        result.explanation.probabilities, [r.volume_ml for r in result.segmentation.regions]
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated. Can be used for initializing member variables."""
        ScriptedLoadableModuleLogic.__init__(self)
        self._cancelRequested = False

    def getParameterNode(self):
        return LungGradCAMParameterNode(super().getParameterNode())

    @staticmethod
    def optionsFromParameterNode(parameterNode) -> ExplainOptions:
        """The panel's settings as the engine's ExplainOptions (checked: a wrong value raises)."""
        p = parameterNode
        method = None if p.method == "auto" else p.method  # auto: the model card's own method
        roi = None
        if p.roi is not None:
            from LungGradCAMLib.mrml import roi_from_node

            roi = roi_from_node(p.roi, default_size_mm=1.0)  # placed by a click: the one patch centred there
        threshold = {"level": p.threshold, "otsu": "otsu", "percentile": f"p{p.thresholdPercentile:g}"}[p.thresholdRule]
        return ExplainOptions(
            model=p.model,
            method=method,
            target=p.targetClass or None,
            layer=p.layer or None,
            mode=p.mode,
            scale=p.scale,
            threshold=threshold,
            restrict_to_lungs=p.restrictToLungs,
            chest_check=p.chestCheck,
            device=p.device,
            stride=p.stride or None,
            batch_size=p.batchSize or None,
            amp=p.amp,
            roi=roi,
            region_model=p.regionModel or None,
        )

    # --- dependencies ---------------------------------------------------------------------------
    @staticmethod
    def dependenciesInstalled() -> bool:
        """True when torch and the packages of PIP_REQUIREMENTS can be imported."""
        return all(importlib.util.find_spec(name) is not None for name in ("torch", *PIP_REQUIREMENTS))

    @staticmethod
    def torchVersionProblem(version: Optional[str] = None) -> Optional[str]:
        """Why the installed PyTorch (or ``version``) will not do, or None when it does (or is not
        installed yet): older than TORCH_REQUIREMENT. Compared as numbers, as TotalSegmentator does."""
        if version is None:
            try:
                version = importlib.metadata.version("torch")
            except importlib.metadata.PackageNotFoundError:
                return None

        def numbers(text: str) -> tuple:
            return tuple(int(n) for n in re.findall(r"\d+", text.split("+")[0])[:3])

        needed = TORCH_REQUIREMENT.lstrip(">=")
        if numbers(version) >= numbers(needed):
            return None
        return (
            f"PyTorch {version} is installed, but LungGradCAM needs PyTorch {needed} or newer. Open the "
            f"'PyTorch Util' module, set the version requirement to '{TORCH_REQUIREMENT}', reinstall PyTorch, "
            "restart Slicer and press Apply again."
        )

    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Install what is missing: torch through the PyTorch extension's PyTorchUtils (which picks
        the build for this computer's GPU), the packages of PIP_REQUIREMENTS with pip. Each asks
        the user first (unless ``askConfirmation`` is False or Slicer runs in testing mode).
        Returns False when the user declined."""
        problem = self.torchVersionProblem()
        if problem:
            raise LungGradCAMError(problem)
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise LungGradCAMError(
                    "LungGradCAM needs PyTorch, which comes through the 'PyTorch' extension. Install it from "
                    "the Extensions Manager, restart Slicer, and press Apply again."
                ) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation, torchVersionRequirement=TORCH_REQUIREMENT
            )
            if torch is None:
                return False
        missing = [
            requirement for name, requirement in PIP_REQUIREMENTS.items() if importlib.util.find_spec(name) is None
        ]
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                _(
                    "LungGradCAM needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
                    "Install them now? This downloads them from the Python Package Index and takes a minute."
                ).format(packages="\n".join(missing)),
                _("Install Python packages"),
            ):
                return False
            # the busy cursor only while installing, never under the question
            slicer.app.setOverrideCursor(qt.Qt.WaitCursor)
            try:
                slicer.util.pip_install(" ".join(missing))
            finally:
                slicer.app.restoreOverrideCursor()
            importlib.invalidate_caches()
        return True

    # --- models ---------------------------------------------------------------------------------
    @staticmethod
    def bundledModels() -> List[str]:
        """Names of the models in Resources/Models whose decision is explained (classifiers: not the
        nodule outline network, which outlines the explained regions by itself; ["default"] until
        torch is installed)."""
        if not LungGradCAMLogic.dependenciesInstalled():
            return ["default"]
        from LungGradCAMLib.engine.models import available_models

        return [name for name in available_models() if LungGradCAMLogic.modelCard(name).output == "classes"]

    @staticmethod
    def regionModels() -> List[str]:
        """Bundled models that judge one region (card ``input: roi``, e.g. lidc-malignancy)."""
        if not LungGradCAMLogic.dependenciesInstalled():
            return []
        return [name for name in LungGradCAMLogic.bundledModels() if LungGradCAMLogic.modelCard(name).input == "roi"]

    @staticmethod
    def modelCard(model: str = "default"):
        """The ModelCard of a bundled model name or a model file (read without loading weights)."""
        from LungGradCAMLib.engine.models import ModelCard, resolve_model_path

        return ModelCard.load(resolve_model_path(model).with_suffix(".json"))

    # --- DICOM database -------------------------------------------------------------------------
    @staticmethod
    def dicomDatabasePath() -> Optional[str]:
        """The ctkDICOM.sql file of Slicer's DICOM database, or None when no database is open."""
        database = slicer.app.dicomDatabase()
        return database.databaseFilename if database is not None and database.isOpen else None

    @staticmethod
    def listCTSeries(databasePath: Optional[str] = None) -> List[dict]:
        """The CT series of Slicer's DICOM database (or of the ctkDICOM.sql at ``databasePath``):
        dicts with seriesUID, title (for display: patient, study date, series number and
        description, image count) and files. Read read-only with LungGradCAMLib.DicomDatabase."""
        from LungGradCAMLib.io.ctkdb import DicomDatabase

        path = databasePath or LungGradCAMLogic.dicomDatabasePath()
        if not path:
            return []
        database = DicomDatabase(path)
        found = []
        for patient in database.patients():
            for study in database.studies(patient):
                for series in database.series(study):
                    if series.modality.upper() != "CT" or not series.n_images:
                        continue
                    parts = [
                        patient.name,
                        study.date,
                        "" if series.number is None else str(series.number),
                        series.description,
                    ]
                    title = " | ".join(part.strip() for part in parts if part and part.strip())
                    found.append(
                        {
                            "seriesUID": series.series_uid,
                            "title": f"{title} ({series.n_images} images)",
                            "files": series.n_images,
                        }
                    )
        return found

    @staticmethod
    def loadSeries(seriesUID: str, databasePath: Optional[str] = None, show: bool = True):
        """Load a CT series of Slicer's DICOM database (or of ``databasePath``) into a new scalar
        volume node named as Slicer's DICOM module names it ("<number>: <description>"), placed
        under its patient and study in the subject hierarchy with the DICOM attributes Slicer's
        DICOM plugins set (``DICOM.instanceUIDs`` and the series, study and patient items), and,
        with ``show``, shown in the slice views at once. Returns the node.

        The series is read with the reader of the command line, not DICOMUtils.loadSeriesByUID
        (Slicer's scalar volume plugin), so that the panel and ``lunggradcam run`` explain the same
        voxels: it orders slices by position, maps Pixel Padding Value and values below -1024 HU
        to air, and resamples gantry tilt and irregular spacing onto a regular grid, where Slicer's
        plugin keeps the padding (-2048/-3024 HU) and, by default, irregular geometry."""
        from LungGradCAMLib import mrml
        from LungGradCAMLib.io.ctkdb import DicomDatabase

        path = databasePath or LungGradCAMLogic.dicomDatabasePath()
        if not path:
            raise LungGradCAMError("Slicer's DICOM database is not open: open the DICOM module and import the CT first")
        database = DicomDatabase(path)
        volume = database.load(seriesUID)
        series = next((s for s in database.series() if s.series_uid == seriesUID), None)
        number = "" if series is None or series.number is None else f"{series.number}: "
        name = (number + (series.description if series else "")).strip(": ") or "CT"
        node = mrml.dicom_series_to_node(volume, database.files(seriesUID), name)
        if show:
            slicer.util.setSliceViewerLayers(background=node, fit=True)
        return node

    # --- region (ROI) ---------------------------------------------------------------------------
    @staticmethod
    def regionSizeMm(model: str = "", regionModel: str = "") -> List[float]:
        """The (R, A, S) size in mm of the one patch a region model looks at: the model's when it
        is a region model, else the second-opinion model's, else DEFAULT_ROI_MM."""
        for name in (model, regionModel):
            if not name or not LungGradCAMLogic.dependenciesInstalled():
                continue
            try:
                card = LungGradCAMLogic.modelCard(name)
            except LungGradCAMError:
                continue
            if card.input == "roi" and card.patch_size:
                # patch_size is (K, J, I) voxels, spacing_mm (i, j, k): the patch's extent along i, j, k
                return [float(n * s) for n, s in zip(card.patch_size[::-1], card.spacing_mm)]
        return [DEFAULT_ROI_MM] * 3

    @staticmethod
    def startPlacingPoint(name: str = "LungGradCAM nodule"):
        """One click for a region: a new point list is made the place node and place mode starts,
        so the next click in a view puts one point; :meth:`roiFromPoint` turns it into the ROI.
        Returns the point list node."""
        points = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLMarkupsFiducialNode", name)
        points.SetMaximumNumberOfControlPoints(1)
        slicer.modules.markups.logic().SetActiveList(points)
        interactionNode = slicer.mrmlScene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        interactionNode.SetPlaceModePersistence(0)
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)
        return points

    @staticmethod
    def roiFromPoint(points, roiNode=None, sizeMm: Optional[List[float]] = None):
        """The ROI centred on the clicked point of ``points`` (a point list with one point), of
        ``sizeMm`` (R, A, S; default: DEFAULT_ROI_MM): ``roiNode`` moved there, or a new one. The
        point list is removed. Returns the ROI node."""
        from LungGradCAMLib.mrml import roi_at_point

        if points.GetNumberOfControlPoints() == 0:
            raise LungGradCAMError("no point was placed: click on the nodule in a slice view")
        centre = [0.0, 0.0, 0.0]
        points.GetNthControlPointPositionWorld(0, centre)
        slicer.mrmlScene.RemoveNode(points)
        return roi_at_point(centre, sizeMm or [DEFAULT_ROI_MM] * 3, roiNode)

    def regionRunOptions(self, parameterNode, region):
        """The settings of "Explain selected region": the panel's, with the region (an ROI node
        made around it, returned too) and the second-opinion model as the model when one is
        chosen. The parameter node is left as it is, so the next Apply runs as before."""
        p = parameterNode
        roiNode = self.regionToRoi(region)
        options = self.optionsFromParameterNode(p)
        from LungGradCAMLib.mrml import roi_from_node

        changes = {"roi": roi_from_node(roiNode), "mode": "roi", "region_model": None}
        if p.regionModel:
            changes.update(model=p.regionModel, method=None, target=None, layer=None)
        from dataclasses import replace

        return replace(options, **changes), roiNode

    @staticmethod
    def applyDescription(parameterNode) -> str:
        """What the next Apply will do, in words (shown beside the button)."""
        p = parameterNode
        if not p.inputVolume:
            return _("Select a CT volume.")
        model = os.path.basename(p.model) if p.model else DEFAULTS["model"]
        where = _("the region '{roi}'").format(roi=p.roi.GetName()) if p.roi is not None else _("the whole scan")
        text = _("Apply explains {where} of '{ct}' with model '{model}'").format(
            where=where, ct=p.inputVolume.GetName(), model=model
        )
        if p.regionModel:
            text += _(", asking '{regionModel}' about each hot region").format(regionModel=p.regionModel)
        return text + "."

    # --- processing -----------------------------------------------------------------------------
    @staticmethod
    def pythonExecutable() -> str:
        """The Python that runs the engine's command line: Slicer's PythonSlicer (on the PATH
        inside Slicer), else this interpreter."""
        return shutil.which("PythonSlicer") or sys.executable

    def startProcess(
        self,
        inputVolume,
        camVolume=None,
        segmentation=None,
        table=None,
        options: Optional[ExplainOptions] = None,
        maxEstimateSeconds: Optional[float] = None,
        **optionKeywords,
    ) -> BackgroundRun:
        """Start explaining ``inputVolume`` in a background process (``lunggradcam run``, see
        BackgroundRun): the CT is written to a temporary NRRD file, the options become the
        command's arguments. With ``maxEstimateSeconds`` the child stops before a heat map
        estimated to take longer (the panel then asks and starts again without the limit). Poll
        the returned run, then call its ``result()`` for the output nodes. The Python console's
        :meth:`process` stays synchronous, in this process."""
        from LungGradCAMLib import mrml
        from LungGradCAMLib.cli.common import args_from_options
        from LungGradCAMLib.io.volume_files import write_volume
        from LungGradCAMLib.options import options_from

        options = options_from(options, optionKeywords)
        if camVolume is not None and camVolume is inputVolume:
            raise LungGradCAMError("the heat map output is the input CT itself; choose another volume or none")
        arguments = args_from_options(options)  # before any file is written: a loaded model is refused here
        volume = mrml.volume_from_node(inputVolume)
        folder = tempfile.mkdtemp(prefix="LungGradCAM-")
        try:
            ct = write_volume(volume, os.path.join(folder, "ct.nrrd"))
        except Exception:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        command = [
            self.pythonExecutable(),
            "-m",
            "LungGradCAMLib.cli",
            "run",
            str(ct),
            "--out",
            os.path.join(folder, "result"),
            "--progress",
            "json",
            "--no-overlay",
            "--no-lungs",
            *arguments,
        ]
        if maxEstimateSeconds is not None:
            command += ["--max-estimate", str(maxEstimateSeconds)]
        logging.info("LungGradCAM: background run started")
        return BackgroundRun(command, folder, inputVolume, (camVolume, segmentation, table))

    def requestCancel(self) -> None:
        """Stop a running :meth:`process` before its next stage or batch (it raises CancelledError)."""
        self._cancelRequested = True

    def process(
        self,
        inputVolume,
        camVolume=None,
        segmentation=None,
        table=None,
        options: Optional[ExplainOptions] = None,
        progressCallback=None,
        showResult: bool = True,
        estimateCallback=None,
        **optionKeywords,
    ):
        """
        Explain the model's decision on a CT and put the results into nodes.
        Can be used without GUI widget.
        :param inputVolume: the CT (scalar volume node, HU); not under a non-identity transform
        :param camVolume, segmentation, table: output nodes, created when None
        :param options: LungGradCAMLib.options.ExplainOptions (model, method, target, layer, threshold,
            restrict_to_lungs, device, batch_size, stride, amp, ...), or its fields as keywords,
            e.g. ``process(node, model="default", threshold=0.5, device="cpu")``
        :param progressCallback: called as progressCallback(stage, done, total) as each stage starts and
            ends, and after each batch of the heat map (patches); progressText() words it
        :param showResult: show the heat map, segmentation and 3D rendering in the views
        :param estimateCallback: called as estimateCallback(estimate) with the heat map's estimated cost
            (LungGradCAMLib.pipeline.CostEstimate: patches, forward passes, seconds) before it is computed;
            returning False stops there (CancelledError)
        :return: LungGradCAMLib.mrml.NodeResult (explanation, segmentation, cam_node, segmentation_node, table_node)
        """
        from LungGradCAMLib import mrml

        startTime = time.time()
        logging.info("LungGradCAM: processing started")
        self._cancelRequested = False
        result = mrml.explain_volume_node(
            inputVolume,
            camVolume,
            segmentation,
            table,
            options,
            progress=progressCallback,
            cancel=lambda: self._cancelRequested,
            on_estimate=estimateCallback,
            **optionKeywords,
        )
        if showResult:
            self.showResult(inputVolume, result)
        logging.info(f"LungGradCAM: processing completed in {time.time() - startTime:.2f} seconds")
        return result

    @staticmethod
    def progressText(stage: str, done: int, total: int) -> str:
        """What the panel and the status bar say about a progress report of process()."""
        from LungGradCAMLib.pipeline import STAGES

        text = STAGES.get(stage, stage)
        return text[:1].upper() + text[1:] + (f": {done} of {total} patches" if stage == "cam" else "...")

    @staticmethod
    def resultText(result) -> str:
        """Rich text of a result for the panel: prediction, probabilities, the outcome (regions or
        "no region above threshold"), the heat map's scale, each explained region's nodule outline
        (volume, diameters), a note when the GPU ran out of memory, and the model's intended use
        (research, not clinical)."""
        from LungGradCAMLib.pipeline import intended_use, outcome, scale_text
        from LungGradCAMLib.pipeline.outlines import outline_text

        explanation = result.explanation
        rows = "".join(
            f"<tr><td>{name}</td><td align='right'>{100 * probability:.1f} %</td></tr>"
            for name, probability in sorted(explanation.probabilities.items(), key=lambda item: -item[1])
        )
        text = (
            _("Predicted: <b>{name}</b>").format(name=explanation.predicted_class)
            + f"<table>{rows}</table>"
            + _("Heat map for class {name} ({method}): {outcome}.").format(
                name=explanation.target_class, method=explanation.method, outcome=outcome(result.segmentation)
            )
            + "<br>"
            + _("Heat-map scale: {scale}.").format(scale=scale_text(explanation))
        )
        for region in result.segmentation.regions:
            if region.outline:
                text += "<br>" + f"{region.name}: {outline_text(region.outline)}"
        asked, used = explanation.device, explanation.device_used
        if used and used.split(":")[0] != asked.split(":")[0]:
            text += "<br>" + _("The {asked} ran out of memory: the heat map was finished on the {used}.").format(
                asked=asked, used=used
            )
        return text + "<br><i>" + _("Research model: {use}").format(use=intended_use(explanation)) + "</i>"

    @staticmethod
    def showResult(inputVolume, result) -> None:
        """CT in the background, heat map over it (opacity CAM_OPACITY), segments in 2D and 3D,
        heat map volume-rendered in 3D."""
        from LungGradCAMLib import mrml

        slicer.util.setSliceViewerLayers(
            background=inputVolume, foreground=result.cam_node, foregroundOpacity=CAM_OPACITY
        )
        mrml.cam_volume_rendering(result.cam_node, slicer.modules.volumerendering.logic())
        segmentationDisplay = result.segmentation_node.GetDisplayNode()
        segmentationDisplay.SetVisibility2D(True)
        segmentationDisplay.SetVisibility3D(True)

    @staticmethod
    def regionToRoi(region, roiNode=None):
        """A markups ROI node around a hot region (LungGradCAMLib.core.results.Region): the region a
        region model is asked about. ``roiNode`` is moved there, or a new one is made."""
        from LungGradCAMLib.mrml import region_to_roi_node

        return region_to_roi_node(region, roiNode)

    @staticmethod
    def jumpToHottestRegion(result) -> bool:
        """Centre the slice views on the hottest point of the hottest region (RAS); False when none."""
        if not result.segmentation.regions:
            return False
        r, a, s = result.segmentation.regions[0].peak_ras
        slicer.modules.markups.logic().JumpSlicesToLocation(r, a, s, True)
        return True
