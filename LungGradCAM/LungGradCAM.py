import importlib.util
import logging
import os
import sys
import time
from typing import Annotated, List, Optional

import qt
import vtk

import slicer
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin
from slicer.parameterNodeWrapper import (
    parameterNodeWrapper,
    Choice,
    WithinRange,
)

from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, vtkMRMLTableNode

# Built and installed, LungGradCAMLib/ and Resources/ sit beside this file in Slicer's
# scripted-modules folder. Used from a source checkout (this folder added in Application
# Settings > Modules) they are one folder up, at the repository root.
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
_ROOT = _MODULE_DIR if os.path.isdir(os.path.join(_MODULE_DIR, "LungGradCAMLib")) else os.path.dirname(_MODULE_DIR)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# Neither needs torch, so the panel opens before torch is installed.
from LungGradCAMLib.core.errors import CancelledError, LungGradCAMError  # noqa: E402  (needs the path above)
from LungGradCAMLib.options import METHODS, ExplainOptions  # noqa: E402

DEVICES = ("auto", "cuda", "cpu") + (("mps",) if sys.platform == "darwin" else ())

#: Import name -> pip requirement of what LungGradCAMLib needs beyond Slicer's own Python.
#: numpy, SimpleITK, pydicom and VTK come with Slicer and are never reinstalled; torch comes
#: through the PyTorch extension (PyTorchUtils).
PIP_REQUIREMENTS = {"skimage": "scikit-image>=0.19", "scipy": "scipy>=1.9", "safetensors": "safetensors>=0.4"}

#: Opacity of the heat map over the CT in the slice views.
CAM_OPACITY = 0.4


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
        self.parent.contributors = ["LungGradCAM developers"]
        self.parent.helpText = _("""
Explains a 3D CNN's decision on a chest CT with Grad-CAM: the model's prediction, a heat map
shown over the CT and in 3D, a segmentation of the hot regions inside the lungs and a table of
their measurements (volume, heat, HU, position). Choose a CT (or load one from the DICOM
database), a model and a method, and press Apply.
Research use only: not for clinical use.
""")
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
    threshold - heat-map level (0..1) above which voxels are segmented.
    restrictToLungs - keep only regions inside the lungs.
    device - auto, cuda, cpu (or mps on macOS).
    stride - sliding-window step in model voxels; 0 = half a patch.
    batchSize - patches per model call; 0 = automatic.
    amp - 16-bit mixed precision on CUDA.
    roi - a markups ROI: explain only this region (a region model, e.g. lidc-malignancy, needs one).
    regionModel - a region model asked about each hot region (its second opinion); empty = none.
    camVolume, segmentation, table - the outputs (created when empty).
    """

    inputVolume: vtkMRMLScalarVolumeNode
    model: str = "default"
    method: Annotated[str, Choice(("auto",) + METHODS)] = "auto"
    targetClass: str = ""
    threshold: Annotated[float, WithinRange(0.0, 1.0)] = 0.5
    restrictToLungs: bool = True
    device: Annotated[str, Choice(DEVICES)] = "auto"
    stride: Annotated[int, WithinRange(0, 512)] = 0
    batchSize: Annotated[int, WithinRange(0, 1024)] = 0
    amp: bool = False
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

        # Make sure parameter node is initialized (needed for module reload)
        self.initializeParameterNode()
        self.onDicomRefresh()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
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
            self.ui.applyButton.toolTip = _("Explain the model's decision on the input CT")
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
            self.parent, _("Choose a LungGradCAM model"), "",
            _("Model weights (*.safetensors *.pt *.pth);;Model card (*.json)"))
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
            self.ui.modelInfoLabel.text = _("PyTorch and the Python packages LungGradCAM needs are installed "
                                            "when you press Apply (after you confirm).")
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
        """A new ROI from the selector: the next click in a slice view places it (its centre; an ROI
        left without size is explained as the one patch centred there)."""
        self.logic.startPlacingRoi(node)

    def onExplainRegion(self) -> None:
        """"Explain this region": the hot region selected in the table (else the hottest) becomes
        an ROI, and the region model (the second-opinion one, else the model) explains it into new
        output nodes, so the whole-scan result stays in the scene."""
        if self._result is None or not self._result.segmentation.regions:
            return
        p = self._parameterNode
        row = self.ui.regionsTableView.currentIndex().row()
        regions = self._result.segmentation.regions
        region = regions[row] if 0 <= row < len(regions) else regions[0]
        p.roi = self.logic.regionToRoi(region)
        if p.regionModel:
            p.model, p.regionModel, p.targetClass, p.method = p.regionModel, "", "", "auto"
        p.camVolume, p.segmentation, p.table = None, None, None
        self._updateModelList()
        self.onApplyButton()

    # --- DICOM database -----------------------------------------------------------------------
    def onDicomRefresh(self) -> None:
        combo = self.ui.dicomSeriesComboBox
        combo.clear()
        with slicer.util.tryWithErrorDisplay(_("Failed to read Slicer's DICOM database.")):
            for series in self.logic.listCTSeries():
                combo.addItem(series["title"], series["seriesUID"])
        self.ui.dicomLoadButton.enabled = combo.count > 0
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
        for section in (self.ui.inputsCollapsibleButton, self.ui.modelCollapsibleButton,
                        self.ui.advancedCollapsibleButton, self.ui.outputsCollapsibleButton):
            section.enabled = not running
        if not running:
            self._checkCanApply()

    def _onProgress(self, stage: str, done: int, total: int) -> None:
        """Engine progress: each stage as it starts and ends, the heat map once per batch (patches).
        Shown in the panel and the status bar; lets Qt handle events (Cancel) in between."""
        text = self.logic.progressText(stage, done, total)
        self.ui.progressBar.setRange(0, max(total, 1))
        self.ui.progressBar.value = done
        self.ui.statusLabel.text = text
        slicer.util.showStatusMessage(text)
        slicer.app.processEvents()

    def _onEstimate(self, estimate) -> bool:
        """The heat map's cost, before it is computed (LungGradCAMLib.pipeline.CostEstimate): shown
        in the status line; past a minute (Score-CAM on a whole scan) the user confirms first."""
        self.ui.statusLabel.text = _("Estimated cost: {estimate}").format(estimate=estimate)
        slicer.app.processEvents()
        if estimate.seconds < 60 or slicer.app.testingEnabled():
            return True
        return slicer.util.confirmOkCancelDisplay(
            _("Computing this heat map will take {minutes:.0f} minute(s) or so:\n\n{estimate}\n\nContinue?")
            .format(minutes=estimate.seconds / 60, estimate=estimate), _("LungGradCAM"))

    def onApplyButton(self) -> None:
        """Run processing when user clicks "Apply"; cancel it when the same button says "Cancel"."""
        if self._running:
            self.logic.requestCancel()
            self.ui.statusLabel.text = _("Cancelling...")
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to install what LungGradCAM needs."), waitCursor=True):
            if not self.logic.setupPythonRequirements():
                self.ui.statusLabel.text = _("LungGradCAM needs PyTorch and a few Python packages to run.")
                return
        self._updateModelList()

        p = self._parameterNode
        startTime = time.time()
        self._setRunning(True)
        slicer.app.processEvents()
        try:
            with slicer.util.tryWithErrorDisplay(_("LungGradCAM failed."), waitCursor=False):
                try:
                    result = self.logic.process(p.inputVolume, p.camVolume, p.segmentation, p.table,
                                                options=self.logic.optionsFromParameterNode(p),
                                                progressCallback=self._onProgress, estimateCallback=self._onEstimate)
                except CancelledError:
                    self.ui.statusLabel.text = _("Cancelled.")
                    return
        finally:
            self._setRunning(False)
        p.camVolume = result.cam_node
        p.segmentation = result.segmentation_node
        p.table = result.table_node
        self._showResult(result, time.time() - startTime)

    def _showResult(self, result, seconds: float) -> None:
        self._result = result
        self.ui.predictionLabel.text = self.logic.resultText(result)
        self.ui.regionsTableView.setMRMLTableNode(result.table_node)
        self.ui.jumpToHottestButton.enabled = bool(result.segmentation.regions)
        self.ui.explainRegionButton.enabled = bool(result.segmentation.regions)
        self.ui.resultsCollapsibleButton.collapsed = False
        self.ui.statusLabel.text = _("Done in {seconds:.1f} s.").format(seconds=seconds)

    def onJumpToHottest(self) -> None:
        if self._result is not None:
            self.logic.jumpToHottestRegion(self._result)

    @staticmethod
    def _modelCardText(card) -> str:
        """Rich-text summary of a model card for the panel."""
        patch = "x".join(str(n) for n in card.patch_size) + " voxels" if card.patch_size else "whole volume"
        spacing = " x ".join(f"{s:g}" for s in card.spacing_mm)
        low, high = card.hu_window
        lines = [f"<b>{card.name or 'model'}</b> {card.version}" + (f": {card.description}" if card.description else ""),
                 f"{card.architecture}; input {patch} at {spacing} mm; HU window {low:g} to {high:g}",
                 "Classes: " + ", ".join(card.class_names)]
        for key, label in (("roc_auc", "AUC"), ("accuracy", "Accuracy")):
            metric = card.metrics.get(key)
            if isinstance(metric, dict) and "value" in metric:
                ci = metric.get("ci95")
                lines.append(f"{label} {metric['value']:.3f}" + (f" (95% CI {ci[0]:.3f} to {ci[1]:.3f})" if ci else ""))
        return "<br>".join(lines)


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
        return ExplainOptions(model=p.model, method=method, target=p.targetClass or None, threshold=p.threshold,
                              restrict_to_lungs=p.restrictToLungs, device=p.device, stride=p.stride or None,
                              batch_size=p.batchSize or None, amp=p.amp, roi=roi, region_model=p.regionModel or None)

    # --- dependencies ---------------------------------------------------------------------------
    @staticmethod
    def dependenciesInstalled() -> bool:
        """True when torch and the packages of PIP_REQUIREMENTS can be imported."""
        return all(importlib.util.find_spec(name) is not None for name in ("torch", *PIP_REQUIREMENTS))

    def setupPythonRequirements(self, askConfirmation: bool = True) -> bool:
        """Install what is missing: torch through the PyTorch extension's PyTorchUtils (which picks
        the build for this computer's GPU), the packages of PIP_REQUIREMENTS with pip. Each asks
        the user first (unless ``askConfirmation`` is False or Slicer runs in testing mode).
        Returns False when the user declined."""
        if importlib.util.find_spec("torch") is None:
            try:
                import PyTorchUtils
            except ModuleNotFoundError:
                raise LungGradCAMError(
                    "LungGradCAM needs PyTorch, which comes through the 'PyTorch' extension. Install it from "
                    "the Extensions Manager, restart Slicer, and press Apply again.") from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(askConfirmation, torchVersionRequirement=">=2.1")
            if torch is None:
                return False
        missing = [requirement for name, requirement in PIP_REQUIREMENTS.items() if importlib.util.find_spec(name) is None]
        if missing:
            if askConfirmation and not slicer.util.confirmOkCancelDisplay(
                    _("LungGradCAM needs these Python packages, which are not installed yet:\n\n{packages}\n\n"
                      "Install them now? This downloads them from the Python Package Index and takes a minute.")
                    .format(packages="\n".join(missing)),
                    _("Install Python packages")):
                return False
            slicer.util.pip_install(" ".join(missing))
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
                    parts = [patient.name, study.date, "" if series.number is None else str(series.number),
                             series.description]
                    title = " | ".join(part.strip() for part in parts if part and part.strip())
                    found.append({"seriesUID": series.series_uid, "title": f"{title} ({series.n_images} images)",
                                  "files": series.n_images})
        return found

    @staticmethod
    def loadSeries(seriesUID: str, databasePath: Optional[str] = None):
        """Load a CT series of Slicer's DICOM database (or of ``databasePath``) into a new scalar
        volume node named as Slicer's DICOM module names it ("<number>: <description>"), with the
        reader of the command line (slices ordered by position, rescale and padding applied,
        geometry checked), so the panel and ``lunggradcam run`` see the same CT. Returns the node."""
        from LungGradCAMLib.io.ctkdb import DicomDatabase

        path = databasePath or LungGradCAMLogic.dicomDatabasePath()
        if not path:
            raise LungGradCAMError("Slicer's DICOM database is not open: open the DICOM module and import the CT first")
        database = DicomDatabase(path)
        volume = database.load(seriesUID)
        series = next((s for s in database.series() if s.series_uid == seriesUID), None)
        number = "" if series is None or series.number is None else f"{series.number}: "
        name = (number + (series.description if series else "")).strip(": ") or "CT"
        return slicer.util.addVolumeFromArray(volume.array, volume.ijk_to_ras, name=name)

    # --- processing -----------------------------------------------------------------------------
    def requestCancel(self) -> None:
        """Stop a running :meth:`process` before its next stage or batch (it raises CancelledError)."""
        self._cancelRequested = True

    def process(self, inputVolume, camVolume=None, segmentation=None, table=None, options: Optional[ExplainOptions] = None,
                progressCallback=None, showResult: bool = True, estimateCallback=None, **optionKeywords):
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
        result = mrml.explain_volume_node(inputVolume, camVolume, segmentation, table, options,
                                          progress=progressCallback, cancel=lambda: self._cancelRequested,
                                          on_estimate=estimateCallback, **optionKeywords)
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
        "no region above threshold"), each explained region's nodule outline (volume, diameters),
        a note when the GPU ran out of memory, and the model's intended use (research, not clinical)."""
        from LungGradCAMLib.pipeline import intended_use, outcome
        from LungGradCAMLib.pipeline.outlines import outline_text

        explanation = result.explanation
        rows = "".join(
            f"<tr><td>{name}</td><td align='right'>{100 * probability:.1f} %</td></tr>"
            for name, probability in sorted(explanation.probabilities.items(), key=lambda item: -item[1]))
        text = (_("Predicted: <b>{name}</b>").format(name=explanation.predicted_class) + f"<table>{rows}</table>"
                + _("Heat map for class {name} ({method}): {outcome}.").format(
                    name=explanation.target_class, method=explanation.method, outcome=outcome(result.segmentation)))
        for region in result.segmentation.regions:
            if region.outline:
                text += "<br>" + f"{region.name}: {outline_text(region.outline)}"
        asked, used = explanation.device, explanation.device_used
        if used and used.split(":")[0] != asked.split(":")[0]:
            text += "<br>" + _("The {asked} ran out of memory: the heat map was finished on the {used}.").format(
                asked=asked, used=used)
        return text + "<br><i>" + _("Research model: {use}").format(use=intended_use(explanation)) + "</i>"

    @staticmethod
    def showResult(inputVolume, result) -> None:
        """CT in the background, heat map over it (opacity CAM_OPACITY), segments in 2D and 3D,
        heat map volume-rendered in 3D."""
        from LungGradCAMLib import mrml

        slicer.util.setSliceViewerLayers(background=inputVolume, foreground=result.cam_node,
                                         foregroundOpacity=CAM_OPACITY)
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
    def startPlacingRoi(roiNode) -> None:
        """Make ``roiNode`` the active markups node and start place mode: the next click in a view
        places it."""
        slicer.modules.markups.logic().SetActiveList(roiNode)  # the place node: this ROI, of its class
        interactionNode = slicer.mrmlScene.GetNodeByID("vtkMRMLInteractionNodeSingleton")
        interactionNode.SetPlaceModePersistence(0)  # markups logic's StartPlaceMode would switch to points
        interactionNode.SetCurrentInteractionMode(interactionNode.Place)

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
        from LungGradCAMLib.evaluation import metrics
        from LungGradCAMLib import phantom

        nodule = phantom.NoduleSpec(center_ras=(60.0, 20.0, -150.0), diameter_mm=20.0, malignant=True)
        # a clinical resolution, inside what the bundled model was trained on (1.6-2 mm in-plane, 2-3 mm slices)
        chest = phantom.chest_ct(seed=3, shape=(64, 192, 192), spacing_mm=(1.8, 1.8, 3.0), nodules=[nodule])
        ctNode = slicer.util.addVolumeFromArray(chest.volume.array, chest.volume.ijk_to_ras, name="LungGradCAM phantom")

        self.delayDisplay("Explaining it on the CPU")
        result = logic.process(ctNode, device="cpu")

        ctMatrix, camMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        ctNode.GetIJKToRASMatrix(ctMatrix)
        result.cam_node.GetIJKToRASMatrix(camMatrix)
        np.testing.assert_allclose(slicer.util.arrayFromVTKMatrix(camMatrix), slicer.util.arrayFromVTKMatrix(ctMatrix),
                                   atol=1e-6)
        cam = slicer.util.arrayFromVolume(result.cam_node)
        self.assertEqual(cam.shape, chest.volume.array.shape)
        self.assertTrue(metrics.pointing_game(cam, chest.nodule_labelmap > 0), "the heat map does not peak in the nodule")

        segments = result.segmentation_node.GetSegmentation()
        self.assertGreater(segments.GetNumberOfSegments(), 0)
        labelmap = result.segmentation.labelmap.array
        self.assertTrue(np.any((labelmap > 0) & (chest.nodule_labelmap > 0)), "no segment overlaps the nodule")
        self.assertEqual(result.table_node.GetNumberOfRows(), segments.GetNumberOfSegments())
        self.assertTrue(logic.jumpToHottestRegion(result))
        self.delayDisplay("Test passed")
