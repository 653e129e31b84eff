"""The trame app of ``ipv2-denoise web``: Slicer's MRML scene and slice views (trame-slicer), the panel.

Three linked axial views (original, denoised, difference) render offscreen (Mesa EGL without a
display) and stream to every browser attached; the controls beside them mirror the Slicer panel.
All work goes through :class:`~IPv2DenoiseLib.app.web.jobs.JobRunner` (one job per server); the
MRML nodes come from :mod:`IPv2DenoiseLib.app.slicer_support`, the same code the Slicer module uses.
The server's state is shared by every browser, so a second browser sees the running job, its
progress and result, and cannot start another.

A button sends the fields it acts on with its click (``click=(method, "[field, ...]")``): trame's
client holds back state updates while it waits for an answer from the server, but sends a click at
once, so a click could otherwise overtake the value typed just before it.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slicer import vtkMRMLScalarVolumeNode
from trame.app import TrameApp
from trame.widgets import html
from trame_server import Server
from trame_slicer.app.logic import connect_slice_view_slider_to_state
from trame_slicer.app.ui import Slider
from trame_slicer.core import LayoutManager, SlicerApp
from trame_slicer.rca_view import register_rca_factories
from trame_slicer.views import Layout, LayoutDirection, ViewLayoutDefinition
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout
from trame_vuetify.widgets import vuetify3 as v3

from IPv2DenoiseLib.app.pipeline import DenoiseOptions
from IPv2DenoiseLib.app.slicer_support.scene import add_volume_node, update_node_from_volume
from IPv2DenoiseLib.app.slicer_support.views import (
    WINDOW_PRESETS,
    composite_node,
    difference_node,
    set_window_level,
)
from IPv2DenoiseLib.app.web.data_root import DataRoot, InputListing
from IPv2DenoiseLib.app.web.jobs import (
    DONE,
    DenoiseResult,
    ExportResult,
    JobRunner,
    JobSnapshot,
    LoadedModel,
    PacsPeer,
    Work,
    denoise_work,
    export_work,
    read_work,
    retrieve_work,
    search_work,
    table_cells,
)
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import time_left
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.ensemble import ENSEMBLE_SIZES
from IPv2DenoiseLib.denoiser.model_reference import ModelCatalogue
from IPv2DenoiseLib.denoiser.strength import DEFAULT_STRENGTH, STRENGTH_RANGE
from IPv2DenoiseLib.io.dicom_query import SeriesMatch

log = logging.getLogger(__name__)

#: (view name in the MRML scene, title shown on it, colour of its bar).
VIEWS = (
    ("Red", "Original", "#F34A33"),
    ("Yellow", "Denoised", "#EFD64D"),
    ("Green", "Difference", "#6DAD4A"),
)
#: Seconds between two looks at the running job.
POLL_S = 0.2
#: Folder in the data root that series retrieved from the PACS go into, one folder per series UID.
PACS_FOLDER = "PACS"
LAYOUT_ID = "IPv2 comparison"
#: The page's strength slider moves in steps of this (the command line takes any value in the range).
STRENGTH_STEP = 0.05


@dataclass
class WebConfig:
    """What ``ipv2-denoise web`` was started with."""

    data_root: Path
    input: str | None = None
    device: str = "auto"
    #: A weights file offered besides the shipped models (``--weights``).
    weights: str | None = None
    #: ``--pacs`` (with ``--calling-aet``, ``--timeout``, ``--retries``), or None.
    pacs: PacsPeer | None = None
    pacs_text: str = ""
    models: list[str] = field(default_factory=list)


class DenoiseWebApp(TrameApp):
    """The page and its server-side logic; one instance per server process."""

    def __init__(self, config: WebConfig, server: Server | None = None) -> None:
        super().__init__(server=server, client_type="vue3")
        self.config = config
        self.data_root = DataRoot(config.data_root)
        self.runner = JobRunner()
        #: The network of the last denoise, kept for the next (one at a time).
        self.model = LoadedModel()
        #: The listing of the data root running in a worker thread, and whether to list again after it.
        self._listing: asyncio.Task | None = None
        self._list_again = False
        self.handled_serial = 0
        self.fitted_sizes: dict[str, tuple[int, int]] = {}
        self.source_path: Path | None = None
        #: What the running read or denoise job works on (shown when it is done).
        self.reading: Path | None = None
        #: The PACS series the running retrieval fetches (its patient is shown with the scan), else None.
        self.reading_match: SeriesMatch | None = None
        #: The series the last PACS search found (the page lists their labels).
        self.pacs_matches: list[SeriesMatch] = []
        self.denoising: DenoiseOptions | None = None
        self.source: Volume | None = None
        self.result: DenoiseResult | None = None
        self.options: DenoiseOptions | None = None
        self.nodes: dict[str, vtkMRMLScalarVolumeNode | None] = {"Red": None, "Yellow": None, "Green": None}

        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server, slice_view_ui_f=self._slice_view_ui)
        self.layout_manager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        self.layout_manager.register_layout(
            LAYOUT_ID,
            Layout(
                LayoutDirection.Horizontal,
                [
                    ViewLayoutDefinition.slice_view("Axial", label=name, color=color)
                    for name, _, color in VIEWS
                ],
            ),
        )
        self.layout_manager.set_layout(LAYOUT_ID)
        for name, _, _ in VIEWS:  # linked: slice, pan and zoom follow in all three views
            composite = composite_node(name, scene=self.slicer.scene)
            composite.SetLinkedControl(True)
            composite.SetHotLinkedControl(True)

        self._init_state()
        self._build_ui()
        self.ctrl.on_server_ready.add(self._on_server_ready)
        if config.input:
            self.state.input_path = config.input
            self.open_input(config.input)

    # ------------------------------------------------------------------------------ state, UI

    def _init_state(self) -> None:
        s = self.state
        s.inputs = []  # listed in a worker thread once the server runs (_refresh_inputs)
        s.inputs_note = ""
        s.input_path = ""
        s.loaded_name = ""
        s.models = self.config.models
        s.model_summaries = model_summaries(self.config.models, self.config.weights)
        s.model = self.config.models[0] if self.config.models else ""
        s.remove_background = True
        s.ensembles = list(ENSEMBLE_SIZES)
        s.ensemble = 1
        s.refine = False
        s.strength = DEFAULT_STRENGTH
        s.adapt = False
        s.preset = "Lung"
        s.presets = list(WINDOW_PRESETS)
        s.job_busy = False
        s.job_kind = ""
        s.job_state = "idle"
        s.job_percent = 0
        s.job_message = ""
        s.job_eta = ""
        s.error = ""
        s.warnings = []
        s.has_result = False
        s.metrics_header = []
        s.metrics_rows = []
        s.export_folder = "ipv2-denoised"
        s.export_message = ""
        s.pacs = self.config.pacs_text
        s.send_to_pacs = False
        s.pacs_patient = ""
        s.pacs_date = ""
        s.pacs_matches = []
        s.pacs_choice = None
        s.pacs_message = ""

    def _slice_view_ui(self, server: Server, view_id: str, view) -> None:
        """A slice view's overlay: its title (Original / Denoised / Difference) and its slice slider."""
        title = {name: title for name, title, _ in VIEWS}.get(view.get_singleton_tag(), view_id)
        html.Div(
            title,
            classes="view-title text-white text-subtitle-2 px-2",
            style="position:absolute;top:4px;right:8px;background:rgba(0,0,0,.55);pointer-events:none;",
            id=f"title-{title.lower()}",
        )
        with html.Div(
            style="position:absolute;bottom:0;left:0;width:100%;background-color:transparent;",
            id=f"slider-{title.lower()}",
        ):
            slider_state = connect_slice_view_slider_to_state(server, view)
            slider_state.bind_changes({slider_state.name.value: lambda value: self._link_slices(view, value)})
            Slider(typed_state=slider_state, classes="slice-slider", theme="dark", dense=True)

    def _link_slices(self, moved, offset: float) -> None:
        """A slider moved: the other linked views go to the same slice.

        Slicer's slice link logic follows mouse interaction in the views; a slider sets the offset
        without the interaction flags it listens to, so the slider's moves are passed on here.
        """
        scene = self.slicer.scene
        if not composite_node(moved.get_singleton_tag(), scene=scene).GetLinkedControl():
            return
        for view in self.slicer.view_manager.get_slice_views():
            if view is not moved and composite_node(view.get_singleton_tag(), scene=scene).GetLinkedControl():
                view.set_slice_value(offset)

    def _build_ui(self) -> None:
        with SinglePageWithDrawerLayout(self.server, full_height=True) as layout:
            layout.title.set_text("IPv2 Denoise")
            layout.icon.hide()
            with layout.toolbar:
                v3.VSpacer()
                v3.VChip(
                    "{{ job_busy ? 'busy: ' + job_kind : 'ready' }}",
                    id="busy-chip",
                    color=("job_busy ? 'orange' : 'green'",),
                    classes="mr-4",
                )
            with layout.drawer as drawer:
                drawer.width = 380
                self._controls()
            with layout.content:
                with html.Div(classes="d-flex flex-column", style="height: calc(100vh - 64px);"):
                    # the views keep their size whatever appears above or below them (a fitted
                    # slice stays fitted)
                    with html.Div(
                        v_if="warnings.length",
                        classes="pa-1",
                        id="warnings",
                        style="flex: 0 0 auto; max-height: 12vh; overflow: auto;",
                    ):
                        v3.VAlert(
                            "{{ w }}",
                            v_for="(w, i) in warnings",
                            key="i",
                            type="warning",
                            density="compact",
                            classes="mb-1 warning-line",
                        )
                    with html.Div(style="flex: 0 0 58vh; position: relative;", id="views"):
                        self.layout_manager.initialize_layout_grid(layout)
                    with html.Div(style="flex: 1 1 0; overflow: auto;", classes="pa-2"):
                        self._metrics_table()

    def _controls(self) -> None:
        with html.Div(classes="pa-3 d-flex flex-column ga-2"):
            v3.VCombobox(
                v_model=("input_path",),
                items=("inputs",),
                label="CT volume or DICOM folder (inside the data root)",
                id="input-path",
                density="compact",
                hide_details=True,
            )
            html.Div("{{ inputs_note }}", v_if="inputs_note", id="inputs-note", classes="text-caption")
            v3.VBtn(
                "Open",
                id="open-btn",
                click=(self.open_input, "[input_path]"),  # the path as typed (module docstring)
                disabled=("job_busy",),
                block=True,
            )
            self._pacs_controls()
            html.Div("{{ loaded_name }}", id="loaded-name", classes="text-caption")
            v3.VAlert("{{ error }}", v_if="error", type="error", density="compact", id="error-message")
            v3.VDivider()
            v3.VSelect(
                v_model=("model",),
                items=("models",),
                label="Model",
                id="model",
                density="compact",
                hint=("model_summaries[model] || ''",),
                persistent_hint=True,
            )
            option_checkbox("remove_background", "Remove background (air outside the body)")
            v3.VSelect(
                v_model=("ensemble",),
                items=("ensembles",),
                label="Ensemble (flipped passes averaged: quality for time)",
                density="compact",
                id="ensemble",
            )
            option_checkbox(
                "refine", "Refine (collaborative Wiener filtering; about 2 s per slice on a CPU core)"
            )
            v3.VSlider(
                v_model=("strength",),
                min=STRENGTH_RANGE[0],
                max=STRENGTH_RANGE[1],
                step=STRENGTH_STEP,
                label=("'Strength ' + Number(strength).toFixed(2)",),
                hint="below 1 keeps more of the scan's grain, above 1 smooths more; 1 as validated",
                persistent_hint=True,
                density="compact",
                id="strength",
            )
            option_checkbox("adapt", "Adapt the model to this scan first (about 15-30 s more on a CPU)")
            with html.Div(classes="d-flex ga-2"):
                v3.VBtn(
                    "Denoise",
                    id="denoise-btn",
                    color="primary",
                    click=(self.denoise, "[model, remove_background, ensemble, refine, adapt, strength]"),
                    disabled=("job_busy || !loaded_name",),
                    classes="flex-grow-1",
                )
                v3.VBtn("Cancel", id="cancel-btn", click=self.cancel, disabled=("!job_busy",), color="error")
            v3.VProgressLinear(
                model_value=("job_percent",),
                height=18,
                color=("job_state === 'failed' ? 'error' : 'primary'",),
                id="progress",
                children=["{{ job_percent }} %"],
            )
            html.Div("{{ job_message }} {{ job_eta }}", id="job-message", classes="text-caption")
            v3.VDivider()
            with v3.VBtnToggle(
                v_model=("preset",), mandatory=True, density="compact", divided=True, id="presets"
            ):
                for name in WINDOW_PRESETS:
                    v3.VBtn(name, value=name, id=f"preset-{name.lower()}")
            v3.VDivider()
            v3.VTextField(
                v_model=("export_folder",),
                label="Export folder for the derived DICOM series (inside the data root)",
                density="compact",
                id="export-folder",
                hide_details=True,
            )
            v3.VCheckbox(
                v_model=("send_to_pacs",),
                label=("'Also send to the PACS ' + pacs",),
                v_if="pacs",
                density="compact",
                hide_details=True,
                id="send-to-pacs",
            )
            v3.VBtn(
                "Export DICOM",
                id="export-btn",
                click=(self.export, "[export_folder, send_to_pacs]"),
                disabled=("job_busy || !has_result",),
                block=True,
            )
            html.Div("{{ export_message }}", id="export-message", classes="text-caption")

    def _pacs_controls(self) -> None:
        """With ``--pacs``: search the PACS for a patient's CT series and open one."""
        with html.Div(v_if="pacs", classes="d-flex flex-column ga-2", id="pacs-panel"):
            html.Div("{{ 'or from the PACS ' + pacs }}", classes="text-caption")
            with html.Div(classes="d-flex ga-2"):
                v3.VTextField(
                    v_model=("pacs_patient",),
                    label="Patient ID or name",
                    density="compact",
                    hide_details=True,
                    id="pacs-patient",
                )
                v3.VTextField(
                    v_model=("pacs_date",),
                    label="Study date",
                    placeholder="YYYYMMDD[-YYYYMMDD]",
                    density="compact",
                    hide_details=True,
                    id="pacs-date",
                    style="max-width: 9rem;",
                )
            v3.VBtn(
                "Search PACS",
                id="pacs-search-btn",
                # the fields' values travel with the click: a state update still in flight
                # from typing would otherwise leave the search without its filter
                click=(self.search_pacs, "[pacs_patient, pacs_date]"),
                disabled=("job_busy",),
                block=True,
            )
            html.Div("{{ pacs_message }}", id="pacs-message", classes="text-caption")
            v3.VSelect(
                v_model=("pacs_choice",),
                items=("pacs_matches",),
                label="CT series on the PACS",
                v_if="pacs_matches.length",
                density="compact",
                hide_details=True,
                id="pacs-series",
            )
            v3.VBtn(
                "Open from PACS",
                id="pacs-open-btn",
                click=(self.open_from_pacs, "[pacs_choice]"),  # the chosen series' UID
                disabled=("job_busy || pacs_choice === null",),
                v_if="pacs_matches.length",
                block=True,
            )

    def _metrics_table(self) -> None:
        with v3.VTable(density="compact", id="metrics", v_if="metrics_rows.length"):
            with html.Thead(), html.Tr():
                html.Th("{{ h }}", v_for="(h, i) in metrics_header", key="i")
            with html.Tbody():
                with html.Tr(v_for="(row, r) in metrics_rows", key="r"):
                    html.Td("{{ cell }}", v_for="(cell, c) in row", key="c")

    # ----------------------------------------------------------------------------- actions

    def _refuse(self, exc: UserError) -> None:
        with self.state:
            self.state.error = str(exc)

    def _start(self, kind: str, work: Work) -> bool:
        """Start a job, or show in one line why not (busy); a job that ended since the last look
        is shown first, so its result is never skipped."""
        self._show(self.runner.snapshot())
        try:
            self.runner.start(kind, work)
        except UserError as exc:
            self._refuse(exc)
            return False
        with self.state:
            self.state.error = ""
        return True

    def open_input(self, input_path: str | None = None) -> None:
        """Read the chosen volume or DICOM series (inside the data root) in the background.

        ``input_path`` is the field as the browser had it at the click; the state's copy is the
        fallback for a call without it.
        """
        text = self.state.input_path if input_path is None else input_path
        try:
            path = self.data_root.input(str(text or ""))
        except UserError as exc:
            self._refuse(exc)
            return
        if self._start("read", read_work(path)):
            self.reading, self.reading_match = path, None

    def search_pacs(self, patient: str | None = None, date: str | None = None) -> None:
        """Ask the PACS for the CT series of the patients matching the page's search (a background job).

        ``patient`` and ``date`` are the fields as the browser had them at the click; the state's
        copies are the fallback for a call without them.
        """
        if self.config.pacs is None:
            self._refuse(UserError("no PACS configured: start the server with --pacs"))
            return
        patient = self.state.pacs_patient if patient is None else patient
        date = self.state.pacs_date if date is None else date
        if self._start("search", search_work(self.config.pacs, patient or "", date or "")):
            with self.state:
                self.state.pacs_message = ""

    def open_from_pacs(self, series_uid: str | None = None) -> None:
        """Retrieve the chosen series into ``PACS/<SeriesInstanceUID>`` in the data root, then read it.

        ``series_uid`` is the choice as the browser had it at the click (a UID, never a position in
        a list that a new search may have replaced); the state's copy is the fallback.
        """
        try:
            if self.config.pacs is None:
                raise UserError("no PACS configured: start the server with --pacs")
            choice = self.state.pacs_choice if series_uid is None else series_uid
            match = next((m for m in self.pacs_matches if choice and m.series_uid == choice), None)
            if match is None:
                raise UserError(
                    "choose a series from the PACS search first (search again if the list changed)"
                )
            # the UID was checked to be digits and dots; the data root checks the path once more
            folder = self.data_root.resolve(f"{PACS_FOLDER}/{match.series_uid}", what="PACS series folder")
        except UserError as exc:
            self._refuse(exc)
            return
        if self._start("retrieve", retrieve_work(self.config.pacs, match, folder)):
            self.reading, self.reading_match = folder, match
            with self.state:
                self.state.input_path = self.data_root.relative(folder)  # where the copy lies

    def denoise(
        self,
        model: Any = None,
        remove_background: Any = None,
        ensemble: Any = None,
        refine: Any = None,
        adapt: Any = None,
        strength: Any = None,
    ) -> None:
        """Denoise the open scan with the page's options in the background.

        The options come as the browser had them at the click; the state's copies are the
        fallback for a call without them.
        """
        try:
            if self.source is None:
                raise UserError("open a CT volume or DICOM series first")
            options = self._options(model, remove_background, ensemble, refine, adapt, strength)
        except UserError as exc:
            self._refuse(exc)
            return
        if self._start("denoise", denoise_work(self.source, options, model=self.model)):
            self.denoising = options

    def _options(
        self,
        model: Any = None,
        remove_background: Any = None,
        ensemble: Any = None,
        refine: Any = None,
        adapt: Any = None,
        strength: Any = None,
    ) -> DenoiseOptions:
        """The page's choices as :class:`DenoiseOptions` (the state's where one is None); a value a
        browser made up is refused."""
        s = self.state
        model = str((s.model if model is None else model) or "")
        ensemble = s.ensemble if ensemble is None else ensemble
        strength = s.strength if strength is None else strength
        if model not in self.config.models:
            raise UserError(f"model: {model!r} is not one of {', '.join(self.config.models)}")
        try:
            ensemble = int(ensemble)
        except (TypeError, ValueError):
            raise UserError(f"ensemble: {ensemble!r} is not a number") from None
        weights = (
            self.config.weights if self.config.weights and model == Path(self.config.weights).name else None
        )
        return DenoiseOptions(
            model=model if not weights else "default",
            weights=weights,
            device=self.config.device,
            remove_background=bool(s.remove_background if remove_background is None else remove_background),
            ensemble=ensemble,  # checked against ENSEMBLE_SIZES by DenoiseOptions
            refine=bool(s.refine if refine is None else refine),
            strength=strength,  # checked against STRENGTH_RANGE by DenoiseOptions
            adapt=bool(s.adapt if adapt is None else adapt),
        )

    def cancel(self) -> None:
        self.runner.cancel()

    def export(self, export_folder: str | None = None, send_to_pacs: Any = None) -> None:
        """Write the derived DICOM series into a new folder inside the data root (and send it).

        ``export_folder`` and ``send_to_pacs`` are the fields as the browser had them at the click;
        the state's copies are the fallback for a call without them.
        """
        text = self.state.export_folder if export_folder is None else export_folder
        send = self.state.send_to_pacs if send_to_pacs is None else send_to_pacs
        try:
            if self.result is None or self.options is None:
                raise UserError("denoise a scan first")
            folder = self.data_root.export_folder(str(text or ""), source=self.source_path)
            if folder.is_relative_to(self.data_root.root / PACS_FOLDER):
                raise UserError(
                    f"export folder: {PACS_FOLDER}/ holds the copies fetched from the PACS; choose another folder"
                )
        except UserError as exc:
            self._refuse(exc)
            return
        work = export_work(
            self.result,
            folder,
            options=self.options,
            pacs=self.config.pacs if send is True else None,  # a box is true or false, nothing else
        )
        if self._start("export", work):
            with self.state:
                self.state.export_message = ""

    # ------------------------------------------------------------------------- job → page

    def _on_server_ready(self, **_: Any) -> None:
        self.state.change("preset")(self._apply_preset)
        asyncio.get_event_loop().create_task(self._poll())
        self._refresh_inputs()

    def _refresh_inputs(self) -> None:
        """List the data root again, in a worker thread: the event loop that streams the views and
        answers every browser never waits for the disk. One listing at a time; a request while one
        runs lists once more after it."""
        if self._listing is not None and not self._listing.done():
            self._list_again = True
            return
        self._listing = asyncio.get_event_loop().create_task(self._list_inputs())

    async def _list_inputs(self) -> None:
        while True:
            self._list_again = False
            try:
                listing: InputListing = await asyncio.to_thread(self.data_root.list_inputs)
            except Exception:  # the page works without the list (a path can be typed)
                log.exception("web: listing the data root failed")
                return
            with self.state:
                self.state.inputs = listing.paths
                self.state.inputs_note = listing.note
            if not self._list_again:
                return

    async def _poll(self) -> None:
        while True:
            try:
                self._show(self.runner.snapshot())
                self._fit_resized_views()
            except Exception:  # the page must keep updating whatever one look raised
                log.exception("web: updating the page failed")
            await asyncio.sleep(POLL_S)

    def _show(self, snap: JobSnapshot) -> None:
        with self.state:
            s = self.state
            s.job_busy = snap.busy
            s.job_kind = snap.kind
            s.job_state = snap.state
            s.job_percent = int(round(100 * snap.fraction))
            s.job_message = snap.message
            s.job_eta = time_left(snap.eta_s)
            if snap.serial and snap.serial != self.handled_serial and not snap.busy:
                self.handled_serial = snap.serial
                self._finished(snap)
            shown = s.warnings if isinstance(s.warnings, list) else []  # state a browser may have set
            for w in snap.warnings:
                if w not in shown:
                    shown = s.warnings = [*shown, w]

    def _finished(self, snap: JobSnapshot) -> None:
        s = self.state
        self._refresh_inputs()  # an export (or another program) may have added some
        if snap.error:
            s.error = snap.error
        if snap.state != DONE:
            return
        result = self.runner.result(snap.serial)
        if snap.kind in ("read", "retrieve"):
            self._show_source(result, list(snap.warnings))
        elif snap.kind == "search":
            self._show_matches(result)
        elif snap.kind == "denoise":
            self._show_result(result)
        elif snap.kind == "export":
            self._show_export(result)

    def _show_source(self, volume: Volume, warnings: list[str]) -> None:
        scene = self.slicer.scene
        for name, node in self.nodes.items():
            if node is not None:
                scene.RemoveNode(node)
            self.nodes[name] = None
        self.source, self.result, self.options = volume, None, None
        self.source_path = self.reading
        match = self.reading_match
        name = self.source_path.name if self.source_path else "input"
        self.nodes["Red"] = add_volume_node(volume, name, scene=scene)
        for view, _, _ in VIEWS:
            composite = composite_node(view, scene=scene)
            composite.SetBackgroundVolumeID(self.nodes["Red"].GetID() if view == "Red" else None)
        self._apply_preset(self.state.preset)
        s = self.state
        where = self.data_root.relative(self.source_path)
        if match is not None:  # a UID names the folder: say whose scan it is
            where = f"{match.label()} ({where})"
        s.loaded_name = f"{where}: {'x'.join(map(str, volume.shape[::-1]))} voxels"
        s.warnings = list(warnings)
        s.has_result = False
        s.metrics_header, s.metrics_rows = [], []
        s.export_message = ""
        self._fit_views()

    def _show_result(self, result: DenoiseResult) -> None:
        scene = self.slicer.scene
        self.result, self.options = result, self.denoising
        original = self.nodes["Red"]
        denoised = self.nodes["Yellow"]
        if denoised is None:
            denoised = add_volume_node(result.outcome.denoised, f"{original.GetName()} denoised", scene=scene)
            self.nodes["Yellow"] = denoised
        else:
            update_node_from_volume(denoised, result.outcome.denoised)
        self.nodes["Green"] = difference_node(original, denoised, existing=self.nodes["Green"])
        for view, _, _ in VIEWS:
            composite_node(view, scene=scene).SetBackgroundVolumeID(self.nodes[view].GetID())
        self._apply_preset(self.state.preset)
        s = self.state
        s.has_result = True
        s.metrics_header, s.metrics_rows = table_cells(result.table)
        s.export_message = ""
        self._fit_views()

    def _show_matches(self, matches: list[SeriesMatch]) -> None:
        self.pacs_matches = list(matches)
        s = self.state
        # the value is the series' UID: a click names the series itself, not its place in a list
        s.pacs_matches = [{"title": m.label(), "value": m.series_uid} for m in self.pacs_matches]
        s.pacs_choice = self.pacs_matches[0].series_uid if self.pacs_matches else None
        s.pacs_message = (
            f"{len(self.pacs_matches)} CT series found" if self.pacs_matches else "no CT series found"
        )

    def _show_export(self, result: ExportResult) -> None:
        where = self.data_root.relative(result.folder)
        text = f"wrote {len(result.files)} DICOM files into {where}"
        self.state.export_message = f"{text}; {result.sent}" if result.sent else text

    def _apply_preset(self, preset: str = "Lung", **_: Any) -> None:
        window, level = WINDOW_PRESETS.get(preset, WINDOW_PRESETS["Lung"])
        set_window_level([self.nodes["Red"], self.nodes["Yellow"]], window, level)

    def _fit_views(self) -> None:
        for view in self.slicer.view_manager.get_slice_views():
            view.fit_view_to_content()
            self.fitted_sizes[view.get_singleton_tag()] = tuple(view.render_window().GetSize())

    def _fit_resized_views(self) -> None:
        """Fit the scan again when a browser resized the views (first connection, window resize)."""
        if self.source is None:
            return
        views = self.slicer.view_manager.get_slice_views()
        if any(
            self.fitted_sizes.get(v.get_singleton_tag()) != tuple(v.render_window().GetSize()) for v in views
        ):
            self._fit_views()


def option_checkbox(name: str, label: str) -> v3.VCheckbox:
    """A compact checkbox bound to the state variable ``name`` (a denoising option); its element id is
    ``name`` with dashes (the browser tests find it there)."""
    return v3.VCheckbox(
        v_model=(name,), label=label, density="compact", hide_details=True, id=name.replace("_", "-")
    )


def available_models(weights: str | None) -> list[str]:
    """The shipped model names (default first), plus the file name of ``--weights``."""
    names = ModelCatalogue.read().names()
    return [Path(weights).name, *names] if weights else names


def model_summaries(names: list[str], weights: str | None) -> dict[str, str]:
    """One line per model for the page (the catalogue's summary and tier, as the Slicer panel's tooltip)."""
    entries = ModelCatalogue.read().entries
    summaries = {}
    for name in names:
        entry = entries.get(name)
        if entry is not None:
            summaries[name] = entry.description
        elif weights and name == Path(weights).name:
            summaries[name] = "the model given with --weights"
    return summaries


__all__ = [
    "PACS_FOLDER",
    "VIEWS",
    "DenoiseWebApp",
    "WebConfig",
    "available_models",
    "option_checkbox",
    "model_summaries",
]
