"""LungGradCAM, the 3D Slicer scripted module: the module's description (LungGradCAM), its panel
(LungGradCAMWidget) and its self-test (LungGradCAMTest). The settings and the logic are in
LungGradCAMSlicer/ beside this file (logic.py, and background.py for the background run): Slicer
loads every .py file of this folder as a module of its own, never the files of a sub-folder."""

import os
import sys
import time
from typing import Optional

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

# Slicer puts this folder on the Python path (so LungGradCAMSlicer/ is found). Built and installed,
# LungGradCAMLib/ and Resources/ sit beside this file in Slicer's scripted-modules folder. Used from
# a source checkout (this folder added in Application Settings > Modules) they are one folder up,
# at the repository root.
_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
_ROOT = _MODULE_DIR if os.path.isdir(os.path.join(_MODULE_DIR, "LungGradCAMLib")) else os.path.dirname(_MODULE_DIR)
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

# None of these needs torch, so the panel opens before torch is installed.
from LungGradCAMLib.core.errors import CancelledError, LungGradCAMError  # noqa: E402  (needs the path above)
from LungGradCAMSlicer.logic import LungGradCAMLogic, LungGradCAMParameterNode  # noqa: E402

#: Past this estimated cost (seconds) of the heat map the panel asks before computing it.
ASK_OVER_SECONDS = 60.0


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

    def onReload(self) -> None:
        """Developer mode's Reload: LungGradCAMSlicer's modules as well (Slicer reloads only this
        file), the background run first, then the logic that imports it."""
        import importlib

        from LungGradCAMSlicer import background, logic

        importlib.reload(background)
        importlib.reload(logic)
        ScriptedLoadableModuleWidget.onReload(self)

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
