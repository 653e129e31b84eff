"""IPv2 Denoise: denoise ultra-low-dose lung CT in 3D Slicer (thin glue over IPv2DenoiseLib)."""

import enum
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLTableNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

_MODULE_DIR = os.path.dirname(os.path.abspath(__file__))
if _MODULE_DIR not in sys.path:  # IPv2DenoiseLib lives next to this file
    sys.path.insert(0, _MODULE_DIR)

from IPv2DenoiseLib.app.pipeline import DenoiseOptions  # noqa: E402
from IPv2DenoiseLib.app.slicer_support.dependencies import (  # noqa: E402
    DependencyError,
    ensure_in_slicer,
    missing_requirements,
)
from IPv2DenoiseLib.app.slicer_support.dicom import check_denoised_from, export_dicom, unused_folder  # noqa: E402
from IPv2DenoiseLib.app.slicer_support.job import DenoiseJob  # noqa: E402
from IPv2DenoiseLib.app.slicer_support.roi_metrics import roi_table, table_node_from_metrics  # noqa: E402
from IPv2DenoiseLib.app.slicer_support.scene import add_volume_node, denoise_node, safe_name, volume_from_node  # noqa: E402
from IPv2DenoiseLib.app.slicer_support.views import (  # noqa: E402
    SIDE_BY_SIDE_LAYOUT,
    WINDOW_PRESETS,
    composite_node,
    difference_node,
    set_window_level,
    setup_comparison,
    show_table,
)
from IPv2DenoiseLib.core.errors import UserError  # noqa: E402
from IPv2DenoiseLib.core.progress import Cancelled, time_left  # noqa: E402
from IPv2DenoiseLib.core.resources import resources_dir  # noqa: E402
from IPv2DenoiseLib.core.volume import Volume  # noqa: E402
from IPv2DenoiseLib.denoiser.model_reference import ModelCatalogue  # noqa: E402
from IPv2DenoiseLib.denoiser.strength import DEFAULT_STRENGTH, STRENGTH_RANGE  # noqa: E402

SAMPLE_CATEGORY = "IPv2 Denoise"
#: Application setting (QSettings) holding the PACS node of *Export*: HOST:PORT:AET or a DICOMweb URL.
PACS_SETTING = "IPv2Denoise/PACS"
#: Seconds after Apply during which a second click (of a double-click) does not cancel the run.
DOUBLE_CLICK_S = 1.0


def resourcePath(relative):
    """A file under Resources/ (source checkout: ../Resources; built module: ./Resources)."""
    return str(resources_dir() / relative)


#
# Module
#


class IPv2Denoise(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("IPv2 Denoise")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Filtering.Denoising")]
        self.parent.dependencies = []
        self.parent.contributors = ["IPv2 Denoise contributors"]
        self.parent.helpText = _(
            "Denoises real-world ultra-low-dose (2 % dose) lung CT with a small PyTorch network "
            "(GPU when present, CPU otherwise), optionally removing the background air, and shows "
            "the result side by side with ROI metrics and a derived DICOM export.<br><br>"
            "The networks are trained with the IPv2 image purification strategy: aligned training "
            "pairs are built from misaligned ULDCT/NDCT scans by taking the background from the "
            "normal-dose scan (Remove Background), adding simulated noise to its lungs (Add noise) "
            "and testing against a weakly denoised lung (Remove noise).<br><br>"
            "Reference: Gong &amp; Yu, arXiv 2602.19314. "
            "The module's documentation is docs/slicer-module.md in the extension's source folder."
        )
        self.parent.acknowledgementText = _(
            "Built on 3D Slicer, PyTorch, SimpleITK, scikit-image and pydicom. The IPv2 method is by "
            "Gong and Yu (arXiv 2602.19314); this is an independent implementation. "
            "Not a medical device: for research use only."
        )
        iconPath = resourcePath("Icons/IPv2Denoise.png")
        if os.path.exists(iconPath):
            self.parent.icon = qt.QIcon(iconPath)
        slicer.app.connect("startupCompleted()", registerSampleData)


def registerSampleData():
    """Register the bundled sample ULDCT/NDCT volumes (file URIs + SHA256) in Sample Data."""
    import SampleData  # lazy: a Slicer module, importable once start-up has completed

    folder = resources_dir() / "SampleData"
    sums = folder / "SHA256SUMS"
    if not sums.exists():
        return
    icon = resourcePath("Icons/IPv2Denoise.png")
    for line in sums.read_text().splitlines():
        parts = line.split()
        if len(parts) != 2 or not parts[1].endswith((".nrrd", ".nii.gz", ".nii")):
            continue
        digest, name = parts[0], parts[1].lstrip("*")
        stem = name.split(".")[0]
        thumbnail = folder / f"{stem}.png"  # a lung-window view of the middle slice
        thumbnail = str(thumbnail) if thumbnail.exists() else icon
        SampleData.SampleDataLogic.registerCustomSampleDataSource(
            category=SAMPLE_CATEGORY,
            sampleName=stem,
            thumbnailFileName=thumbnail,
            uris=(folder / name).as_uri(),
            fileNames=name,
            nodeNames=stem,
            checksums=f"SHA256:{digest}",
            loadFileType="VolumeFile",
        )


#
# Parameter node
#


@parameterNodeWrapper
class IPv2DenoiseParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    outputVolume: vtkMRMLScalarVolumeNode
    removeBackground: bool = True
    adapt: bool = False
    bestQuality: bool = False
    refine: bool = False
    strength: float = DEFAULT_STRENGTH
    model: str = ""
    device: str = "auto"
    showDifference: bool = False
    roiNode: vtkMRMLMarkupsROINode
    metricsTable: vtkMRMLTableNode


class State(enum.Enum):
    IDLE = "idle"
    RUNNING = "running"
    CANCEL_REQUESTED = "cancel requested"
    FAILED = "failed"


DEVICES = (("Auto (GPU if available)", "auto"), ("CPU", "cpu"), ("GPU (CUDA)", "cuda"))

#
# Widget
#


class IPv2DenoiseWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None):
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self._job = None
        self._startedAt = 0.0
        self._state = State.IDLE
        self._previousLayout = None
        self._logShown = 0

    def setup(self):
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(resourcePath("UI/IPv2Denoise.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = IPv2DenoiseLogic()

        for name, summary in self.logic.models():
            self.ui.modelComboBox.addItem(name, name)
            self.ui.modelComboBox.setItemData(self.ui.modelComboBox.count - 1, summary, qt.Qt.ToolTipRole)
        for text, value in DEVICES:
            self.ui.deviceComboBox.addItem(text, value)
        self.ui.strengthSliderWidget.minimum, self.ui.strengthSliderWidget.maximum = STRENGTH_RANGE
        self.ui.progressBar.setRange(0, 1000)
        self.ui.progressBar.hide()

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelComboBox.connect("currentIndexChanged(int)", self.onModelChanged)
        self.ui.deviceComboBox.connect("currentIndexChanged(int)", self.onDeviceChanged)
        self.ui.compareButton.connect("clicked(bool)", self.onCompare)
        self.ui.lungPresetButton.connect("clicked(bool)", lambda: self.onPreset("Lung"))
        self.ui.mediastinalPresetButton.connect("clicked(bool)", lambda: self.onPreset("Mediastinal"))
        self.ui.restoreLayoutButton.connect("clicked(bool)", self.onRestoreLayout)
        # both ways: unticking must take the overlay away again
        self.ui.showDifferenceCheckBox.connect("toggled(bool)", lambda on: self.onCompare())
        self.ui.computeMetricsButton.connect("clicked(bool)", self.onComputeMetrics)
        self.ui.exportCsvButton.connect("clicked(bool)", self.onExportCsv)
        self.ui.exportDicomButton.connect("clicked(bool)", self.onExportDicom)
        self.ui.exportFileButton.connect("clicked(bool)", self.onExportFile)
        self.ui.pacsLineEdit.text = str(qt.QSettings().value(PACS_SETTING, "") or "")
        self.ui.sendToPacsCheckBox.checked = False  # sending to the PACS is chosen each session

        self._timer = qt.QTimer()
        self._timer.setInterval(150)
        self._timer.connect("timeout()", self.onPoll)

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.initializeParameterNode()
        self._setState(State.IDLE)

    def cleanup(self):
        self._timer.stop()  # a reload or Slicer's exit: no poll on a torn-down widget
        if self._job is not None:
            self._job.cancel()
            self._job.cleanup()  # the temporary copy of the patient's scan goes too
            self._job = None
        self.removeObservers()

    def enter(self):
        self.initializeParameterNode()

    def exit(self):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)

    def onSceneStartClose(self, caller, event):
        if self._job is not None:  # the next patient: this scan's result must not land in the new scene
            self._timer.stop()
            self._job.cancel()
            self._job.cleanup()
            self._job = None
            self._setState(State.IDLE, _("Cancelled: the scene was closed."))
        elif self._state != State.RUNNING:  # the previous patient's status and log are not the next one's
            self.ui.statusLabel.setText("")
            self.ui.logTextEdit.clear()
            self._setState(State.IDLE)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event):
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self):
        self.setParameterNode(self.logic.getParameterNode())
        p = self._parameterNode
        if not p.inputVolume:  # the first image, not a label map (a subclass the selector hides)
            p.inputVolume = next(
                (
                    node
                    for node in slicer.util.getNodesByClass("vtkMRMLScalarVolumeNode")
                    if not node.IsA("vtkMRMLLabelMapVolumeNode")
                ),
                None,
            )
        self._selectInstalledModel()

    def _selectInstalledModel(self):
        """A scene saved with a model that is no longer installed selects the default, and says so
        (the combo box showed the first model while Apply ran the stale name)."""
        p = self._parameterNode
        if p is None:
            return
        chosen, message = self.logic.installedModel(p.model)
        if chosen is not None and chosen != p.model:
            p.model = chosen
        if message:
            logging.warning("IPv2 Denoise: %s", message)
            self.ui.statusLabel.setText(message)

    def setParameterNode(self, inputParameterNode):
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._updateGui)
            self._updateGui()

    def _updateGui(self, caller=None, event=None):
        p = self._parameterNode
        if p is None:
            return
        if self.ui.modelComboBox.findData(p.model) < 0:  # e.g. a scene saved before an upgrade
            self._selectInstalledModel()
        for combo, value in ((self.ui.modelComboBox, p.model), (self.ui.deviceComboBox, p.device)):
            index = combo.findData(value)
            if index >= 0 and index != combo.currentIndex:
                combo.setCurrentIndex(index)
        index = self.ui.modelComboBox.currentIndex
        self.ui.modelSummaryLabel.text = (
            self.ui.modelComboBox.itemData(index, qt.Qt.ToolTipRole) if index >= 0 else ""
        )
        self._setState(self._state)

    def onModelChanged(self, index):
        if self._parameterNode and index >= 0:
            self._parameterNode.model = self.ui.modelComboBox.itemData(index)

    def onDeviceChanged(self, index):
        if self._parameterNode and index >= 0:
            self._parameterNode.device = self.ui.deviceComboBox.itemData(index)

    # -------------------------------------------------------------- state machine + processing

    def _setState(self, state, message=None):
        self._state = state
        p = self._parameterNode
        button = self.ui.applyButton
        if state == State.RUNNING:
            button.text, button.toolTip, button.enabled = (
                _("Cancel"),
                _("Stop the denoiser (scene is left as it was)"),
                True,
            )
        elif state == State.CANCEL_REQUESTED:
            button.text, button.enabled = _("Cancelling..."), False
        else:
            button.text, button.toolTip = _("Apply"), _("Run the denoiser in a background process")
            button.enabled = bool(p and p.inputVolume and self.ui.modelComboBox.count)
            if p and not self.ui.modelComboBox.count:
                button.toolTip = _("No model in Resources/Models/models.json")
        self.ui.progressBar.setVisible(state in (State.RUNNING, State.CANCEL_REQUESTED))
        busy = state in (State.RUNNING, State.CANCEL_REQUESTED)
        for w in (
            self.ui.inputSelector,
            self.ui.outputSelector,
            self.ui.modelComboBox,
            self.ui.deviceComboBox,
            self.ui.removeBackgroundCheckBox,
            self.ui.adaptCheckBox,
            self.ui.bestQualityCheckBox,
            self.ui.refineCheckBox,
            self.ui.strengthSliderWidget,
        ):
            w.enabled = not busy
        if message is not None:
            color = "#c62828" if state == State.FAILED else "palette(text)"
            self.ui.statusLabel.setText(f"<span style='color:{color}'>{message}</span>")

    def onApplyButton(self):
        if self._state == State.RUNNING:
            if time.monotonic() - self._startedAt < DOUBLE_CLICK_S:  # the second click of a double-click
                return
            self._job.cancel()
            self._setState(State.CANCEL_REQUESTED, _("Cancelling..."))
            return
        p = self._parameterNode
        try:
            self.logic.ensureDependencies()
            self._job = self.logic.process(
                p.inputVolume,
                p.outputVolume,
                model=p.model,
                device=p.device,
                removeBackground=p.removeBackground,
                adapt=p.adapt,
                ensemble=8 if p.bestQuality else 1,
                refine=p.refine,
                strength=p.strength,
                synchronous=False,
            )
        except DependencyError as exc:  # declined, no network, or installed but importable after a restart
            self._setState(State.FAILED, str(exc))
            if exc.restart_required and slicer.util.confirmYesNoDisplay(
                str(exc) + "\n\n" + _("Restart Slicer now?"), windowTitle=_("IPv2 Denoise")
            ):
                slicer.util.restart()
            return
        except Exception as exc:  # bad input: show it, change nothing
            self._setState(State.FAILED, str(exc))
            return
        self.ui.progressBar.value = 0
        self.ui.logTextEdit.clear()
        self._logShown = 0
        self._startedAt = time.monotonic()
        self._setState(State.RUNNING, _("Starting the denoiser..."))
        self._timer.start()

    def onPoll(self):
        job = self._job
        status = job.poll()
        self.ui.progressBar.value = int(1000 * status.fraction)
        if status.device:
            self.ui.deviceLabel.text = _("running on: {device}").format(device=status.device)
        for line in status.log[self._logShown :]:
            self.ui.logTextEdit.appendPlainText(line)
        self._logShown = len(status.log)
        if self._state == State.RUNNING:
            eta = f" — {time_left(status.eta_s)}" if status.eta_s else ""
            self._setState(State.RUNNING, f"{status.message or _('Denoising')}{eta}")
        if not job.done():
            return
        self._timer.stop()
        self._job = None
        try:
            output = job.finish()
        except Cancelled:
            self._setState(State.IDLE, _("Cancelled; the scene was left unchanged."))
            return
        except UserError as exc:
            stderr = job.process.stderr if job.process else ""
            if stderr:
                self.ui.logTextEdit.appendPlainText(stderr)
            self._setState(State.FAILED, str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - never leave the panel stuck on "Cancel"
            logging.exception("IPv2 Denoise: importing the result failed")
            self._setState(State.FAILED, _("Importing the result failed: {error}").format(error=exc))
            return
        if self._parameterNode is not None:
            self._parameterNode.outputVolume = output
        seconds = f" in {status.seconds:.1f} s" if status.seconds else ""
        done = _("Done{seconds}: {name}").format(seconds=seconds, name=output.GetName())
        if status.warnings:  # e.g. a truncated field of view; each is in the log
            done += " — " + _("warning: {text}").format(text=status.warnings[0])
        self._setState(State.IDLE, done)
        self.onCompare()

    # --------------------------------------------------------------------- compare, metrics, export

    def _pair(self):
        p = self._parameterNode
        if not (p.inputVolume and p.outputVolume):
            slicer.util.errorDisplay(_("Run the denoiser first (or pick an output volume)."))
            return None
        try:  # the last output stays selected when another input is picked: never pair two scans
            check_denoised_from(p.outputVolume, p.inputVolume)
        except UserError as exc:
            slicer.util.errorDisplay(str(exc))
            return None
        return p.inputVolume, p.outputVolume

    def onCompare(self):
        pair = self._pair()
        if pair:
            with slicer.util.tryWithErrorDisplay(_("Failed to compare the volumes."), waitCursor=True):
                layout = slicer.app.layoutManager().layout
                if self._previousLayout is None:  # kept before anything changes, even if the rest fails
                    self._previousLayout = layout
                self.logic.showComparison(*pair, showDifference=self._parameterNode.showDifference)

    def onPreset(self, preset):
        pair = self._pair()
        if pair:
            set_window_level(pair, *WINDOW_PRESETS[preset])

    def onRestoreLayout(self):
        if self._previousLayout is not None:
            slicer.app.layoutManager().setLayout(self._previousLayout)
            self._previousLayout = None

    def onComputeMetrics(self):
        pair = self._pair()
        if not pair:
            return
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to compute the ROI table."), waitCursor=True):
            segmentation = self.ui.segmentSelector.currentNode()
            segmentId = self.ui.segmentSelector.currentSegmentID() if segmentation else None
            p.metricsTable = self.logic.computeRoiTable(
                *pair,
                roiNode=p.roiNode,
                segmentationNode=segmentation,
                segmentId=segmentId,
                tableNode=p.metricsTable,
            )
            show_table(p.metricsTable)

    def onExportCsv(self):
        table = self._parameterNode.metricsTable
        if table is None:
            slicer.util.errorDisplay(_("Compute the ROI table first."))
            return
        path = qt.QFileDialog.getSaveFileName(
            None, _("Save ROI table"), "ipv2_roi_metrics.csv", "CSV (*.csv)"
        )
        if path:
            with slicer.util.tryWithErrorDisplay(_("Failed to save the table."), waitCursor=True):
                slicer.util.saveNode(table, path)

    def onExportDicom(self):
        pair = self._pair()
        if not pair:
            return
        folder = qt.QFileDialog.getExistingDirectory(None, _("Folder for the new DICOM series"))
        if not folder:
            return
        outDir = unused_folder(Path(folder) / (safe_name(pair[1].GetName()) + "_dicom"))
        pacs = self.ui.pacsLineEdit.text.strip()
        sendTo = pacs if (pacs and self.ui.sendToPacsCheckBox.checked) else None
        with slicer.util.tryWithErrorDisplay(_("DICOM export failed."), waitCursor=True):
            files = self.logic.exportDicom(
                pair[1], outDir, sourceNode=pair[0], modelName=self._parameterNode.model, sendTo=sendTo
            )
            message = _("Wrote {n} DICOM files to {folder}").format(n=len(files), folder=outDir)
            if sendTo:
                qt.QSettings().setValue(PACS_SETTING, pacs)  # remembered once a send worked
                message += _("; sent to {pacs}").format(pacs=sendTo)
            self.ui.statusLabel.text = message

    def onExportFile(self):
        pair = self._pair()
        if not pair:
            return
        path = qt.QFileDialog.getSaveFileName(
            None,
            _("Save denoised volume"),
            pair[1].GetName() + ".nrrd",
            "NRRD (*.nrrd);;NIfTI (*.nii.gz *.nii)",
        )
        if path:
            with slicer.util.tryWithErrorDisplay(_("Saving failed."), waitCursor=True):
                self.logic.exportVolume(pair[1], path)


#
# Logic
#


class IPv2DenoiseLogic(ScriptedLoadableModuleLogic):
    """Everything the module does, usable from scripts without the GUI."""

    def __init__(self):
        ScriptedLoadableModuleLogic.__init__(self)
        self.lastMetrics = None

    def getParameterNode(self):
        return IPv2DenoiseParameterNode(super().getParameterNode())

    @staticmethod
    def models():
        """[(name, tier and one-line summary)] from Resources/Models/models.json, the default first."""
        try:
            catalogue = ModelCatalogue.read()
        except UserError:
            return []
        return [(name, catalogue.entries[name].description) for name in catalogue.names()]

    @staticmethod
    def installedModel(name):
        """(the catalogue name to select for a kept ``name``, one line when it had to change)."""
        try:
            catalogue = ModelCatalogue.read()
        except UserError:
            return None, None
        return catalogue.installed(name)

    @staticmethod
    def ensureDependencies():
        """Install missing packages with the user's consent (raises DependencyError if declined)."""
        ensure_in_slicer()

    def process(
        self,
        inputVolumeNode,
        outputVolumeNode=None,
        *,
        model,
        device="auto",
        removeBackground=True,
        adapt=False,
        ensemble=1,
        refine=False,
        strength=DEFAULT_STRENGTH,
        synchronous=True,
    ):
        """Denoise ``inputVolumeNode`` in a ``PythonSlicer -m IPv2DenoiseLib denoise`` subprocess.

        Returns the output node (``synchronous=True``) or a started
        :class:`IPv2DenoiseLib.app.slicer_support.job.DenoiseJob` to poll. A new output node named
        "<input> denoised" is created only on success when ``outputVolumeNode`` is None.
        """
        if inputVolumeNode is None:
            raise ValueError("inputVolumeNode: no input volume selected")
        python = shutil.which("PythonSlicer") or sys.executable
        options = DenoiseOptions(
            model=model,
            device=device,
            remove_background=removeBackground,
            adapt=adapt,
            ensemble=ensemble,
            refine=refine,
            strength=strength,
        )
        job = DenoiseJob(inputVolumeNode, outputVolumeNode, options=options, python=python).start()
        if not synchronous:
            return job
        logging.info("IPv2 Denoise: running %s", " ".join(job.process.args))
        return job.wait()

    def showComparison(self, originalNode, denoisedNode, *, preset="Lung", showDifference=False):
        """Side-by-side linked views (returns the previous layout id); optional difference overlay."""
        previous = setup_comparison(originalNode, denoisedNode, preset=preset)
        yellow = composite_node("Yellow")
        if showDifference:
            diff = slicer.mrmlScene.GetFirstNodeByName(denoisedNode.GetName() + " difference")
            diff = difference_node(originalNode, denoisedNode, existing=diff)
            diff.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeFileColdToHotRainbow.txt")
            yellow.SetForegroundVolumeID(diff.GetID())
            yellow.SetForegroundOpacity(0.5)
        else:
            yellow.SetForegroundVolumeID(None)
        return previous

    def computeRoiTable(
        self,
        originalNode,
        denoisedNode,
        *,
        roiNode=None,
        segmentationNode=None,
        segmentId=None,
        tableNode=None,
    ):
        """ROI table node (lung, soft tissue, background air + optional ROI/segment) before vs after."""
        self.lastMetrics = roi_table(
            originalNode,
            denoisedNode,
            roi_node=roiNode,
            segmentation_node=segmentationNode,
            segment_id=segmentId,
        )
        return table_node_from_metrics(
            self.lastMetrics, node=tableNode, name=f"{denoisedNode.GetName()} ROI metrics"
        )

    def exportDicom(
        self,
        denoisedNode,
        outDir,
        *,
        sourceNode=None,
        modelName="",
        sendTo=None,
        callingAet=None,
        importToDatabase=True,
    ):
        """Write a derived DICOM series (in the source's study when it came from DICOM), optionally send it.

        ``sendTo``: ``HOST:PORT:AET`` or a DICOMweb URL (the *PACS* setting). Returns the files.
        """
        files, _ = export_dicom(
            denoisedNode,
            outDir,
            source_node=sourceNode,
            model_name=modelName,
            send_to=sendTo or None,
            calling_aet=callingAet or None,
        )
        if importToDatabase and getattr(slicer, "dicomDatabase", None) is not None:
            from DICOMLib import DICOMUtils  # lazy: the DICOM module exists only in the full application

            DICOMUtils.importDicom(str(outDir))
        return files

    @staticmethod
    def exportVolume(node, path):
        """Save as NRRD / NIfTI / MHA through IPv2DenoiseLib.io.volumes (atomic, geometry unchanged)."""
        # lazy: Slicer loads the module before ensure_in_slicer installs torch/pydicom/scikit-image
        from IPv2DenoiseLib.io.volumes import write_volume

        return write_volume(volume_from_node(node), path)


#
# Test
#


class IPv2DenoiseTest(ScriptedLoadableModuleTest):
    """Full workflow on a small volume with a tiny (untrained) model; seconds on a CPU."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_IPv2Denoise_workflow()

    def test_IPv2Denoise_workflow(self):
        missing = missing_requirements()
        if missing:  # a fresh Slicer: the first Apply installs them (ensure_in_slicer), a test must not
            self.delayDisplay(
                f"Skipped: IPv2 Denoise's Python packages are not installed ({', '.join(missing)})"
            )
            return
        # lazy: Slicer loads the module before ensure_in_slicer installs torch/pydicom/scikit-image
        import torch

        from IPv2DenoiseLib.denoiser.infer import Denoiser
        from IPv2DenoiseLib.denoiser.models import UNet

        self.delayDisplay("Creating a small chest-like volume")
        z, y, x = np.indices((8, 64, 64))
        hu = np.where((y - 32) ** 2 + (x - 32) ** 2 < 26**2, 40.0, -1000.0)
        hu[((y - 32) ** 2 / 14**2 + (x - 20) ** 2 / 7**2) < 1] = -850.0
        hu[((y - 32) ** 2 / 14**2 + (x - 44) ** 2 / 7**2) < 1] = -850.0
        hu = hu + np.random.default_rng(0).normal(0, 80, hu.shape)
        inputNode = add_volume_node(Volume(hu, spacing=(0.7, 0.7, 2.5)), "ULDCT")

        self.delayDisplay("Denoising with a tiny model")
        torch.manual_seed(0)
        tiny = Denoiser(UNet(in_slices=3, base_channels=4))
        outputNode = denoise_node(inputNode, denoise=lambda v: tiny.denoise(v, device="cpu"))
        self.assertEqual(outputNode.GetName(), "ULDCT denoised")
        self.assertEqual(slicer.util.arrayFromVolume(outputNode).shape, hu.shape)

        logic = IPv2DenoiseLogic()
        self.delayDisplay("Side-by-side comparison")
        logic.showComparison(inputNode, outputNode, showDifference=True)
        self.assertEqual(slicer.app.layoutManager().layout, SIDE_BY_SIDE_LAYOUT)

        self.delayDisplay("ROI metrics")
        table = logic.computeRoiTable(inputNode, outputNode)
        self.assertEqual(table.GetTable().GetNumberOfRows(), len(logic.lastMetrics.rows))

        self.delayDisplay("Export")
        with tempfile.TemporaryDirectory() as tmp:
            files = logic.exportDicom(
                outputNode,
                Path(tmp) / "dicom",
                sourceNode=inputNode,
                modelName="tiny",
                importToDatabase=False,
            )
            self.assertEqual(len(files), hu.shape[0])
            logic.exportVolume(outputNode, Path(tmp) / "out.nrrd")
        if logic.models():  # a registered model: the real subprocess path on the CPU
            self.delayDisplay("Subprocess run")
            node = logic.process(inputNode, None, model=logic.models()[0][0], device="cpu")
            self.assertIsNotNone(node.GetImageData())
        self.delayDisplay("Test passed")
