import importlib.metadata
import importlib.util
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Annotated, List, Optional

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import (
    Choice,
    WithinRange,
    parameterNodeWrapper,
)
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Built and installed, LungGradCAMLib/ and Resources/ sit beside this file in Slicer's
# scripted-modules folder. Used from a source checkout (this folder added in Application
# Settings > Modules) they are one folder up, at the repository root.
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
_ROOT = _MODULE_DIR if os.path.isdir(os.path.join(_MODULE_DIR, "LungGradCAMLib")) else os.path.dirname(_MODULE_DIR)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Neither needs torch, so the panel opens before torch is installed.
from LungGradCAMLib.core.errors import CancelledError, LungGradCAMError  # noqa: E402  (needs the path above)
from LungGradCAMLib.options import DEFAULTS, METHODS, MODES, SCALES, ExplainOptions  # noqa: E402  # noqa: E402

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
#: Past this estimated cost (seconds) of the heat map the panel asks before computing it.
ASK_OVER_SECONDS = 60.0

#: Opacity of the heat map over the CT in the slice views.
CAM_OPACITY = 0.4


def documentationUrl() -> str:
    """The module's documentation: the README installed beside it (or of the source checkout), as a
    file URL; the extension has no public web page yet."""
    from pathlib import Path

    return Path(_ROOT, "README.md").as_uri()


def resourcePath(relativePath: str) -> str:
    """Path of a file under Resources/ (e.g. "UI/LungGradCAM.ui"), built or in a source checkout."""
    return os.path.join(_ROOT, "Resources", relativePath)


#
# LungGradCAM
#


class LungGradCAM(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Lung Grad-CAM")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Quantification")]
        self.parent.dependencies = []
        self.parent.contributors = ["LungGradCAM developers (LungGradCAM project)"]
        self.parent.helpText = _("""
Explains a 3D CNN's decision on a chest CT with Grad-CAM: the model's prediction, a heat map
shown over the CT and in 3D, a segmentation of the hot regions inside the lungs and a table of
their measurements (volume, heat, HU, position). Choose a CT (or load one from the DICOM
database), a model and a method, and press Apply.
Research use only: not for clinical use.
""") + _('See the <a href="{url}">documentation</a> (the extension\'s README).').format(url=documentationUrl())
        self.parent.acknowledgementText = _("""
Grad-CAM: Selvaraju et al., "Grad-CAM: Visual Explanations from Deep Networks via Gradient-based
Localization", ICCV 2017. Module layout after Slicer's scripted-module template.
""")
        # Slicer finds Resources/Icons/LungGradCAM.png beside an installed module by itself; a
        # source checkout keeps Resources/ one folder up, so point at it explicitly.
        self.parent.icon = qt.QIcon(resourcePath("Icons/LungGradCAM.png"))


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
# LungGradCAMWidget
#


class LungGradCAMWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._running = False
        self._result = None
        self._job = None  # the BackgroundRun of Apply, while it runs
        self._jobTimer = None
        self._jobStarted = 0.0
        self._jobRetry = None  # how to start the run again without the cost limit
        self._pointObservation = None  # (point list, observer tag) while a click places an ROI
        self._dicomRefreshPending = False

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        # Load widget from .ui file (created by Qt Designer).
        uiWidget = slicer.util.loadUI(resourcePath("UI/LungGradCAM.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)

        # Set scene in MRML widgets. The .ui connects the top-level qMRMLWidget's
        # "mrmlSceneChanged(vtkMRMLScene*)" signal to each MRML widget's "setMRMLScene(vtkMRMLScene*)" slot.
        uiWidget.setMRMLScene(slicer.mrmlScene)

        # Logic implements all computations; it is usable without the GUI (Python console).
        self.logic = LungGradCAMLogic()

        # These connections ensure that we update parameter node when scene is closed
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        # Model and target class lists depend on the installed models, so they are not bound
        # through SlicerParameterName but kept in the parameter node here.
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.targetClassComboBox.connect("currentIndexChanged(int)", self.onTargetClassChanged)
        self.ui.regionModelComboBox.connect("currentIndexChanged(int)", self.onRegionModelChanged)
        self.ui.roiSelector.connect("nodeAddedByUser(vtkMRMLNode*)", self.onRoiAdded)

        # Buttons
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelBrowseButton.connect("clicked(bool)", self.onModelBrowse)
        self.ui.dicomRefreshButton.connect("clicked(bool)", self.onDicomRefresh)
        self.ui.dicomLoadButton.connect("clicked(bool)", self.onDicomLoad)
        self.ui.jumpToHottestButton.connect("clicked(bool)", self.onJumpToHottest)
        self.ui.explainRegionButton.connect("clicked(bool)", self.onExplainRegion)
        self.ui.progressBar.visible = False

        # The DICOM series list follows Slicer's database: imports, removals, another database.
        database = slicer.app.dicomDatabase()
        if database is not None:
            for signalName in (
                "databaseChanged()",
                "opened()",
                "closed()",
                "seriesAdded(QString)",
                "seriesRemoved(QString)",
            ):
                database.connect(signalName, self._scheduleDicomRefresh)

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()
        self.onDicomRefresh()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        if self._job is not None:
            self._job.cancel()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        # Make sure parameter node exists and observed
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        # Do not react to parameter node changes (GUI will be updated when the user enters into the module)
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        # Parameter node will be reset, do not use it anymore
        self.setParameterNode(None)
        self._result = None

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        # If this module is shown while the scene is closed then recreate a new parameter node immediately
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        # Parameter node stores all user choices in parameter values, node selections, etc.
        # so that when the scene is saved and reloaded, these settings are restored.
        self.setParameterNode(self.logic.getParameterNode())

        # Select default input nodes if nothing is selected yet to save a few clicks for the user
        if not self._parameterNode.inputVolume:
            firstVolumeNode = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolumeNode:
                self._parameterNode.inputVolume = firstVolumeNode

    def setParameterNode(self, inputParameterNode: Optional[LungGradCAMParameterNode]) -> None:
        """
        Set and observe parameter node.
        Observation is needed because when the parameter node is changed then the GUI must be updated immediately.
        """
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Note: in the .ui file, a Qt property on widgets called "SlicerParameterName" is set;
            # ui element that needs connection.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
            self._updateModelList()
            self._checkCanApply()

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._running:
            return  # the button is Cancel while running
        if self._parameterNode and self._parameterNode.inputVolume:
            self.ui.applyButton.toolTip = self.logic.applyDescription(self._parameterNode)
            self.ui.applyButton.enabled = True
        else:
            self.ui.applyButton.toolTip = _("Select an input CT volume")
            self.ui.applyButton.enabled = False

    # --- model and target class -----------------------------------------------------------------
    def _updateModelList(self) -> None:
        """Bundled models, plus the current choice when it is a file chosen with Browse."""
        current = self._parameterNode.model
        combo = self.ui.modelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        for name in self.logic.bundledModels():
            combo.addItem(name, name)
        if combo.findData(current) < 0:
            combo.addItem(os.path.basename(current), current)
        combo.setCurrentIndex(combo.findData(current))
        combo.blockSignals(wasBlocked)
        combo = self.ui.regionModelComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        combo.addItem(_("(none)"), "")
        for name in self.logic.regionModels():
            combo.addItem(name, name)
        combo.setCurrentIndex(max(combo.findData(self._parameterNode.regionModel), 0))
        combo.blockSignals(wasBlocked)
        self._updateModelInfo()

    def onModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)
            self._parameterNode.targetClass = ""
            self._updateModelInfo()

    def onModelBrowse(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            self.parent,
            _("Choose a LungGradCAM model"),
            "",
            _("Model weights (*.safetensors *.pt *.pth);;Model card (*.json)"),
        )
        if path:
            self._parameterNode.model = path
            self._parameterNode.targetClass = ""
            self._updateModelList()

    def _updateModelInfo(self) -> None:
        """Show the model card's summary and its clinical-use statement; list its classes."""
        model = self._parameterNode.model
        combo = self.ui.targetClassComboBox
        wasBlocked = combo.blockSignals(True)
        combo.clear()
        self.ui.clinicalUseLabel.visible = False
        if not self.logic.dependenciesInstalled():
            combo.addItem(_("(model default)"), "")
            self.ui.modelInfoLabel.text = _(
                "PyTorch and the Python packages LungGradCAM needs are installed "
                "when you press Apply (after you confirm)."
            )
        else:
            try:
                card = self.logic.modelCard(model)
            except LungGradCAMError as error:
                combo.addItem(_("(model default)"), "")
                self.ui.modelInfoLabel.text = str(error)
            else:
                combo.addItem(_("(model default: {name})").format(name=card.cam_class), "")
                for name in card.class_names:
                    combo.addItem(name, name)
                self.ui.modelInfoLabel.text = self._modelCardText(card)
                if "not for clinical use" in card.intended_use.lower():
                    self.ui.clinicalUseLabel.text = card.intended_use
                    self.ui.clinicalUseLabel.visible = True
        index = combo.findData(self._parameterNode.targetClass)
        combo.setCurrentIndex(max(index, 0))
        combo.blockSignals(wasBlocked)

    def onTargetClassChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.targetClass = self.ui.targetClassComboBox.itemData(index)

    def onRegionModelChanged(self, index: int) -> None:
        if self._parameterNode and index >= 0:
            self._parameterNode.regionModel = self.ui.regionModelComboBox.itemData(index)

    # --- region (markups ROI) -------------------------------------------------------------------
    def onRoiAdded(self, node) -> None:
        """A new ROI from the selector: one click on the nodule in a slice view places a point, and
        the ROI becomes the region model's patch centred there (see LungGradCAMLogic.roiFromPoint)."""
        self._stopObservingPoint()
        points = self.logic.startPlacingPoint()
        tag = points.AddObserver(
            points.PointPositionDefinedEvent, lambda caller, event, roi=node: self._onPointPlaced(caller, roi)
        )
        self._pointObservation = (points, tag)
        self.ui.statusLabel.text = _("Click on the nodule in a slice view.")

    def _onPointPlaced(self, points, roiNode) -> None:
        self._pointObservation = None
        p = self._parameterNode
        size = self.logic.regionSizeMm(p.model, p.regionModel)
        with slicer.util.tryWithErrorDisplay(_("Failed to place the region.")):
            p.roi = self.logic.roiFromPoint(points, roiNode, size)
            self.ui.statusLabel.text = _("Region of {size} mm placed: {next}").format(
                size=" x ".join(f"{s:.0f}" for s in size), next=self.logic.applyDescription(p)
            )

    def _stopObservingPoint(self) -> None:
        if self._pointObservation is not None:
            points, tag = self._pointObservation
            points.RemoveObserver(tag)
            self._pointObservation = None

    def onExplainRegion(self) -> None:
        """ "Explain this region": the hot region selected in the table (else the hottest) becomes
        an ROI, and the region model (the second-opinion one, else the model) explains it into new
        output nodes, so the whole-scan result stays in the scene."""
        if self._result is None or not self._result.segmentation.regions:
            return
        row = self.ui.regionsTableView.currentIndex().row()
        regions = self._result.segmentation.regions
        region = regions[row] if 0 <= row < len(regions) else regions[0]
        with slicer.util.tryWithErrorDisplay(_("Failed to explain the region.")):
            options, roiNode = self.logic.regionRunOptions(self._parameterNode, region)
            # new output nodes; the panel's settings stay, so the next Apply is what it said before
            self._start(self._parameterNode.inputVolume, None, None, None, options, storeOutputs=False)
            self.ui.statusLabel.text = _("Explaining {region} ({roi}) with '{model}'...").format(
                region=region.name, roi=roiNode.GetName(), model=os.path.basename(str(options.model))
            )

    # --- DICOM database -----------------------------------------------------------------------
    def _scheduleDicomRefresh(self, *args) -> None:
        """Slicer's DICOM database changed: list it again once, a moment after a burst of changes
        (an import adds many series)."""
        if not self._dicomRefreshPending:
            self._dicomRefreshPending = True
            qt.QTimer.singleShot(500, self.onDicomRefresh)

    def onDicomRefresh(self) -> None:
        """List the CT series of Slicer's DICOM database. A database that cannot be read is said in
        the list and the status line; the panel stays usable (volumes already in the scene)."""
        self._dicomRefreshPending = False
        combo = self.ui.dicomSeriesComboBox
        combo.clear()
        try:
            series = self.logic.listCTSeries()
        except LungGradCAMError as error:
            series = []
            combo.addItem(_("(Slicer's DICOM database cannot be read)"), "")
            self.ui.statusLabel.text = _("Slicer's DICOM database cannot be read: {error}").format(error=error)
        for item in series:
            combo.addItem(item["title"], item["seriesUID"])
        self.ui.dicomLoadButton.enabled = bool(series)
        if combo.count == 0:
            combo.addItem(_("(no CT series in the DICOM database)"), "")

    def onDicomLoad(self) -> None:
        seriesUID = self.ui.dicomSeriesComboBox.currentData
        if not seriesUID:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to load the DICOM series."), waitCursor=True):
            self._parameterNode.inputVolume = self.logic.loadSeries(seriesUID)

    # --- run ------------------------------------------------------------------------------------
    def _setRunning(self, running: bool) -> None:
        """Apply turns into Cancel while running; the settings are locked meanwhile."""
        self._running = running
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.applyButton.enabled = True
        self.ui.progressBar.visible = running
        self.ui.progressBar.setRange(0, 0)  # busy until the engine reports its first batch
        for section in (
            self.ui.inputsCollapsibleButton,
            self.ui.modelCollapsibleButton,
            self.ui.advancedCollapsibleButton,
            self.ui.outputsCollapsibleButton,
        ):
            section.enabled = not running
        if not running:
            self._checkCanApply()

    def _onProgress(self, stage: str, done: int, total: int) -> None:
        """Engine progress: each stage as it starts and ends, the heat map once per batch (patches).
        Shown in the panel and the status bar."""
        text = self.logic.progressText(stage, done, total)
        self.ui.progressBar.setRange(0, max(total, 1))
        self.ui.progressBar.value = done
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text)

    def onApplyButton(self) -> None:
        """Run processing when user clicks "Apply"; cancel it when the same button says "Cancel"."""
        if self._running:
            self.ui.statusLabel.text = _("Cancelling...")
            if self._job is not None:
                self._job.cancel()  # the child process ends; _pollJob reports it
            return
        # no busy cursor here: the installation asks first (setupPythonRequirements shows one while installing)
        with slicer.util.tryWithErrorDisplay(_("Failed to install what LungGradCAM needs.")):
            if not self.logic.setupPythonRequirements():
                self.ui.statusLabel.text = _("LungGradCAM needs PyTorch and a few Python packages to run.")
                return
        self._updateModelList()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("LungGradCAM failed.")):
            self._start(p.inputVolume, p.camVolume, p.segmentation, p.table, self.logic.optionsFromParameterNode(p))

    def _start(
        self,
        inputVolume,
        camVolume,
        segmentation,
        table,
        options,
        storeOutputs: bool = True,
        maxEstimateSeconds: Optional[float] = ASK_OVER_SECONDS,
    ) -> None:
        """Start the explanation in a background process (LungGradCAMLogic.startProcess) and poll
        it from a timer: Slicer stays responsive, Apply reads Cancel."""
        self._job = self.logic.startProcess(
            inputVolume, camVolume, segmentation, table, options=options, maxEstimateSeconds=maxEstimateSeconds
        )
        self._jobRetry = lambda: self._start(inputVolume, camVolume, segmentation, table, options, storeOutputs, None)
        self._jobStoreOutputs = storeOutputs
        self._jobStarted = time.time()
        self._setRunning(True)
        self.ui.statusLabel.text = _("Starting...")
        if self._jobTimer is None:
            self._jobTimer = qt.QTimer()
            self._jobTimer.setInterval(200)
            self._jobTimer.connect("timeout()", self._pollJob)
        self._jobTimer.start()

    def _pollJob(self) -> None:
        job = self._job
        for event in job.poll():
            if event["event"] == "progress":
                self._onProgress(event["stage"], event["done"], event["total"])
            elif event["event"] == "estimate":
                self.ui.statusLabel.text = _("Estimated cost: {estimate}").format(estimate=event["text"])
        if job.running:
            return
        self._jobTimer.stop()
        self._job = None
        self._setRunning(False)
        try:
            result = job.result()
        except CancelledError:
            estimate = job.estimate
            if (
                estimate
                and estimate.get("stopped")
                and not job.cancelled
                and slicer.util.confirmOkCancelDisplay(
                    _(
                        "Computing this heat map will take {minutes:.0f} minute(s) or so:\n\n{estimate}\n\nContinue?"
                    ).format(minutes=estimate["seconds"] / 60, estimate=estimate["text"]),
                    _("LungGradCAM"),
                )
            ):
                self._jobRetry()
            else:
                self.ui.statusLabel.text = _("Cancelled.")
            return
        except Exception as error:  # the child's own message (LungGradCAMError), or reading its outputs failed
            self.ui.statusLabel.text = _("Failed.")
            slicer.util.errorDisplay(_("LungGradCAM failed.") + "\n\n" + str(error))
            return
        if self._jobStoreOutputs:
            p = self._parameterNode
            p.camVolume, p.segmentation, p.table = result.cam_node, result.segmentation_node, result.table_node
        self.logic.showResult(self._parameterNode.inputVolume, result)
        self._showResult(result, time.time() - self._jobStarted)

    def _showResult(self, result, seconds: float) -> None:
        self._result = result
        self.ui.predictionLabel.text = self.logic.resultText(result)
        self.ui.regionsTableView.setMRMLTableNode(result.table_node)
        self.ui.jumpToHottestButton.enabled = bool(result.segmentation.regions)
        self.ui.explainRegionButton.enabled = bool(result.segmentation.regions)
        self.ui.resultsCollapsibleButton.collapsed = False
        self.ui.statusLabel.text = _("Done in {seconds:.1f} s. Next: {next}").format(
            seconds=seconds, next=self.logic.applyDescription(self._parameterNode)
        )

    def onJumpToHottest(self) -> None:
        if self._result is not None:
            self.logic.jumpToHottestRegion(self._result)

    @staticmethod
    def _modelCardText(card) -> str:
        """Rich-text summary of a model card for the panel."""
        patch = "x".join(str(n) for n in card.patch_size) + " voxels" if card.patch_size else "whole volume"
        spacing = " x ".join(f"{s:g}" for s in card.spacing_mm)
        low, high = card.hu_window
        lines = [
            f"<b>{card.name or 'model'}</b> {card.version}" + (f": {card.description}" if card.description else ""),
            f"{card.architecture}; input {patch} at {spacing} mm; HU window {low:g} to {high:g}",
            "Classes: " + ", ".join(card.class_names),
        ]
        for key, label in (("roc_auc", "AUC"), ("accuracy", "Accuracy")):
            metric = card.metrics.get(key)
            if isinstance(metric, dict) and "value" in metric:
                ci = metric.get("ci95")
                lines.append(f"{label} {metric['value']:.3f}" + (f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else ""))
        return "<br>".join(lines)


#
# BackgroundRun
#


class BackgroundRun:
    """``lunggradcam run`` on a CT of the scene in a child process, as SlicerTotalSegmentator runs
    its engine: Slicer stays responsive, and a crash or an out-of-memory of torch ends the child,
    not Slicer. The child reports progress as JSON lines (``--progress json``); :meth:`poll` reads
    them without waiting, :meth:`cancel` stops the child (SIGTERM: it removes its temporaries),
    :meth:`result` loads its outputs into nodes when it has ended. Everything it writes is in a
    temporary folder of its own, removed at the end."""

    def __init__(self, command: List[str], folder: str, inputVolume, outputNodes: tuple) -> None:
        self.command, self.folder, self.inputVolume, self.outputNodes = command, folder, inputVolume, outputNodes
        self.out = os.path.join(folder, "result")
        self.estimate: Optional[dict] = None  # the heat map's estimated cost, when the child reported it
        self._events: "queue.Queue[dict]" = queue.Queue()
        self._log: List[str] = []  # the child's other output lines: its error message, a traceback
        self._cancelled = False
        pythonPath = os.pathsep.join(p for p in (_ROOT, os.environ.get("PYTHONPATH", "")) if p)
        self.process = slicer.util.launchConsoleProcess(command, updateEnvironment={"PYTHONPATH": pythonPath})
        self._reader = threading.Thread(target=self._read, name="LungGradCAM-output", daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:  # stdout and stderr together (launchConsoleProcess)
            try:
                event = json.loads(line)
            except ValueError:
                event = None
            if isinstance(event, dict) and "event" in event:
                self._events.put(event)
            elif line.strip():
                self._log.append(line.rstrip())
        self.process.stdout.close()

    def poll(self) -> List[dict]:
        """The child's events since the last call (``progress``, ``estimate``, ``done``), without waiting."""
        events = []
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return events
            if event["event"] == "estimate":
                self.estimate = event
            events.append(event)

    @property
    def cancelled(self) -> bool:
        """Whether :meth:`cancel` stopped it."""
        return self._cancelled

    @property
    def running(self) -> bool:
        return self.process.poll() is None or self._reader.is_alive()

    def cancel(self) -> None:
        """Stop the child: SIGTERM (it removes its temporaries), then SIGKILL after 10 s."""
        self._cancelled = True
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._reader.join(5)
        self._cleanup()

    def wait(self, onEvent=None, timeout: Optional[float] = None) -> None:
        """Wait for the child to end (the Python console's way), calling ``onEvent(event)`` per event."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running:
            for event in self.poll():
                if onEvent is not None:
                    onEvent(event)
            if deadline is not None and time.monotonic() > deadline:
                self.cancel()
                raise LungGradCAMError(f"the explanation did not end within {timeout:.0f} s and was stopped")
            time.sleep(0.05)
        for event in self.poll():
            if onEvent is not None:
                onEvent(event)

    def result(self):
        """The outputs of a child that has ended, as nodes (LungGradCAMLib.mrml.NodeResult). Raises
        CancelledError after :meth:`cancel` or when the child stopped before a costly heat map
        (``--max-estimate``), LungGradCAMError with the child's own message when it failed."""
        from LungGradCAMLib import mrml
        from LungGradCAMLib.pipeline.outputs import read_run

        if self.running:
            raise LungGradCAMError("the explanation is still running")
        try:
            code = self.process.returncode
            if self._cancelled:
                raise CancelledError("cancelled")
            if self.estimate is not None and self.estimate.get("stopped"):
                raise CancelledError(f"not started: {self.estimate['text']}")
            if code != 0:
                raise LungGradCAMError(self.failure(code))
            explanation, segmentation = read_run(self.out)
            return mrml.result_to_nodes(self.inputVolume, explanation, segmentation, *self.outputNodes)
        finally:
            self._cleanup()

    def failure(self, code: int) -> str:
        """What went wrong, from the child's exit status and its last words."""
        prefix = "lunggradcam run: error: "
        start = next((n for n in range(len(self._log) - 1, -1, -1) if self._log[n].startswith(prefix)), None)
        if start is not None:  # the message and its further lines (e.g. the series to choose from)
            return "\n".join([self._log[start][len(prefix) :]] + self._log[start + 1 :])
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return (
                f"the explanation process ended unexpectedly ({name}{', most likely out of memory' if -code == 9 else ''}); "
                "Slicer is not affected. Try a smaller batch size or the CPU."
            )
        return f"the explanation process failed (exit status {code}): " + " | ".join(self._log[-3:])

    def _cleanup(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)


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


#
# LungGradCAMTest
#


class LungGradCAMTest(ScriptedLoadableModuleTest):
    """
    This is the test case for your scripted module.
    Uses ScriptedLoadableModuleTest base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_LungGradCAM_phantom()

    def test_LungGradCAM_phantom(self):
        """A chest CT phantom with one nodule, made in the scene, explained on the CPU: the heat map
        has the CT's geometry, peaks in the nodule, and a segment overlaps the nodule."""
        import numpy as np

        self.delayDisplay("Installing what LungGradCAM needs (if missing)")
        logic = LungGradCAMLogic()
        self.assertTrue(logic.setupPythonRequirements(askConfirmation=False))

        self.delayDisplay("Making a chest CT phantom with a nodule")
        from LungGradCAMLib import phantom
        from LungGradCAMLib.evaluation import metrics

        nodule = phantom.NoduleSpec(center_ras=(60.0, 20.0, -150.0), diameter_mm=20.0, malignant=True)
        # a clinical resolution, inside what the bundled model was trained on (1.6-2 mm in-plane, 2-3 mm slices)
        chest = phantom.chest_ct(seed=3, shape=(64, 192, 192), spacing_mm=(1.8, 1.8, 3.0), nodules=[nodule])
        ctNode = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="LungGradCAM phantom")

        self.delayDisplay("Explaining it on the CPU")
        result = logic.process(ctNode, device="cpu")

        ctMatrix, camMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        ctNode.GetIJKToRASMatrix(ctMatrix)
        result.cam_node.GetIJKToRASMatrix(camMatrix)
        np.testing.assert_allclose(
            slicer.util.arrayFromVTKMatrix(camMatrix), slicer.util.arrayFromVTKMatrix(ctMatrix), atol=1e-6
        )
        cam = slicer.util.arrayFromVolume(result.cam_node)
        self.assertEqual(cam.shape, chest.volume.array.shape)
        self.assertTrue(
            metrics.pointing_game(cam, chest.nodule_labelmap > 0), "the heat map does not peak in the nodule"
        )

        segments = result.segmentation_node.GetSegmentation()
        self.assertGreater(segments.GetNumberOfSegments(), 0)
        labelmap = result.segmentation.labelmap.array
        self.assertTrue(np.any((labelmap > 0) & (chest.nodule_labelmap > 0)), "no segment overlaps the nodule")
        self.assertEqual(result.table_node.GetNumberOfRows(), segments.GetNumberOfSegments())
        self.assertTrue(logic.jumpToHottestRegion(result))
        self.delayDisplay("Test passed")
