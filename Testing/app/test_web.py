"""``ipv2-denoise web`` tested the way a person uses it: a real server process, Debian's Chromium
driven by playwright (no browser download), Slicer's views rendered offscreen through Mesa EGL.

What the page shows is asserted: the denoised view's pixels differ from the original's, the
metrics table holds ``demo``'s numbers, Cancel stops the job and writes nothing, the export is a
series ``dciodvfy`` accepts (and lands on a real Orthanc PACS), a path outside the data root is
refused on the page. Screenshots go to ``docs/figures/web_*.png`` with ``IPV2_DENOISE_SCREENSHOTS=1``. Plain-Python parts (the data
root, the job runner) are tested first, without a browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import aiohttp
import msgpack
import numpy as np
import psutil
import pydicom
import pytest
from conftest import chest_like_volume, require_dciodvfy, write_ct_series
from orthanc_server import free_port
from web_driver import (
    JOB_S,
    WebServer,
    choose_and_open,
    denoise_and_wait,
    graininess,
    lit,
    open_page,
    server_busy,
    shows_scan,
    view_pixels,
    wait_until,
)
from wslink.chunking import UnChunker, generate_chunks

from IPv2DenoiseLib.app.cli import main as cli_main
from IPv2DenoiseLib.app.commands.web import configure_rendering
from IPv2DenoiseLib.app.pipeline import DenoiseOptions, DenoiseOutcome, DenoisePipeline
from IPv2DenoiseLib.app.web.data_root import DataRoot
from IPv2DenoiseLib.app.web.jobs import (
    CANCELLED,
    DONE,
    FAILED,
    DenoiseResult,
    JobRunner,
    LoadedModel,
    denoise_work,
    export_work,
    table_cells,
)
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import Cancelled
from IPv2DenoiseLib.core.resources import resources_dir
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.model_reference import ModelReference
from IPv2DenoiseLib.imaging.metrics_table import MetricsTable
from IPv2DenoiseLib.io.volumes import read_volume, write_volume

REPO = Path(__file__).resolve().parents[2]
#: Where the screenshots go: docs/figures when IPV2_DENOISE_SCREENSHOTS=1 (to refresh the docs),
#: else a temporary folder, so running the suite never changes the checkout.
FIGURES = (
    REPO / "docs" / "figures"
    if os.environ.get("IPV2_DENOISE_SCREENSHOTS") == "1"
    else Path(tempfile.mkdtemp(prefix="ipv2-web-screenshots-"))
)
SAMPLE = resources_dir() / "SampleData" / "sample_uldct.nrrd"


# ------------------------------------------------------------------ plain parts (no browser)


def test_data_root_refuses_every_way_out(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "scans").mkdir(parents=True)
    shutil.copy(SAMPLE, root / "scans" / "a.nrrd")
    (root / "escape").symlink_to(tmp_path)
    (tmp_path / "secret.nrrd").write_bytes(b"x")
    data = DataRoot(root)
    assert data.input("scans/a.nrrd") == (root / "scans" / "a.nrrd").resolve()
    for outside in ("../secret.nrrd", str(tmp_path / "secret.nrrd"), "escape/secret.nrrd", "/etc/passwd"):
        with pytest.raises(UserError, match="outside the data root"):
            data.input(outside)
    with pytest.raises(UserError, match="outside the data root"):
        data.export_folder("../out")
    with pytest.raises(UserError, match="not the root"):
        data.export_folder(".")
    with pytest.raises(UserError, match="is the input or lies inside it"):
        data.export_folder("scans/derived", source=root / "scans")  # a DICOM folder's export
    write_ct_series(root / "dicom" / "chest", 2)
    assert data.inputs() == ["dicom/chest", "scans/a.nrrd"]  # the link out of the root is not listed
    # a loop of links and a name too long: one line each, never a traceback in the server
    (root / "scans" / "loop.nrrd").symlink_to("loop.nrrd")
    assert data.inputs() == ["dicom/chest", "scans/a.nrrd"]
    for name in ("scans/loop.nrrd", "x" * 300):
        for check in (data.input, data.export_folder):
            with pytest.raises(UserError, match="cannot follow it"):
                check(name)
    assert DataRoot(root).inputs() == data.inputs()  # ``web`` lists them as it starts


def test_the_data_root_never_opens_a_fifo_and_stops_listing_at_its_cap(tmp_path: Path) -> None:
    """A named pipe (FIFO) among a DICOM folder's first files blocked the listing for good (at the
    server's start and after every job); one named like a volume was listed and, opened, hung a
    job that Cancel cannot stop. Now neither is opened nor listed, and opening one is refused."""
    root = tmp_path / "root"
    series = root / "dicom" / "chest"
    write_ct_series(series, 2)
    pipes = [series / "000-pipe", root / "scans" / "pipe.nrrd"]  # read first; listed as a volume
    pipes[1].parent.mkdir()
    for pipe in pipes:
        os.mkfifo(pipe)
    data = DataRoot(root)
    listing: list[list[str]] = []
    lister = threading.Thread(target=lambda: listing.append(data.inputs()), daemon=True)
    lister.start()
    lister.join(30)
    try:
        assert listing == [["dicom/chest"]], "the listing blocked on a FIFO" if not listing else listing
    finally:  # a reader stuck on a FIFO (the old code) goes on once a writer opens it
        for pipe in pipes:
            with contextlib.suppress(OSError):
                os.close(os.open(pipe, os.O_WRONLY | os.O_NONBLOCK))
        lister.join(10)
    with pytest.raises(UserError, match=r"^input scans/pipe.nrrd is not a file or folder \(a pipe"):
        data.input("scans/pipe.nrrd")
    assert data.input("dicom/chest") == series.resolve()

    for i in range(6):  # more folders than the cap: the list says it stops, instead of walking on
        write_ct_series(root / "many" / f"s{i}", 2)
    capped = data.list_inputs(max_folders=5)
    # root, dicom, dicom/chest, many, many/s0
    assert capped.paths == ["dicom/chest", "many/s0"] and "stops after 5 folders" in capped.note, capped
    whole = data.list_inputs()
    assert whole.paths == ["dicom/chest", *(f"many/s{i}" for i in range(6))] and not whole.note


def test_denoise_jobs_keep_the_model_loaded() -> None:
    """Each Denoise of the page loaded the model anew (weights read, sha256 verified: 0.5-2 s); now
    it stays loaded while the choice stays the same."""
    volume = Volume(chest_like_volume(5, (4, 64, 64)), spacing=(0.7, 0.7, 1.25))
    kept = LoadedModel()
    runner = JobRunner()

    def denoise(**options) -> tuple[np.ndarray, list[str]]:
        messages: list[str] = []
        work = denoise_work(volume, DenoiseOptions(device="cpu", **options), model=kept)

        def watched(progress, warn, cancel):
            def report(done: int, total: int, message: str = "") -> None:
                messages.append(message)
                progress(done, total, message)

            return work(report, warn, cancel)

        runner.start("denoise", watched)
        snap = runner.wait(300)
        assert snap.state == DONE, snap.error
        return runner.result(snap.serial).outcome.denoised.array, messages

    first, messages = denoise()
    assert "loading the model" in messages and kept.loads == 1
    again, messages = denoise()
    assert "loading the model" not in messages and kept.loads == 1
    np.testing.assert_array_equal(again, first)
    denoise(
        ensemble=2
    )  # another choice replaces it (--adapt fine-tunes a copy: Testing/training/test_adapt.py)
    assert kept.loads == 2


def test_a_denoise_job_runs_the_kept_network_at_the_strength_chosen() -> None:
    """The page's strength reaches the network through the job, and choosing another keeps the
    loaded network (the strength scales its input map, not its weights)."""
    volume = Volume(chest_like_volume(6, (4, 64, 64)), spacing=(0.7, 0.7, 1.25))
    kept = LoadedModel()
    runner = JobRunner()
    denoised = {}
    for strength in (1.0, 0.7):
        runner.start(
            "denoise", denoise_work(volume, DenoiseOptions(device="cpu", strength=strength), model=kept)
        )
        snap = runner.wait(300)
        assert snap.state == DONE, snap.error
        outcome = runner.result(snap.serial).outcome
        assert outcome.provenance.strength == strength and outcome.denoised.meta["strength"] == strength
        denoised[strength] = outcome.denoised.array
    assert kept.loads == 1
    default = ModelReference.resolve().load()
    np.testing.assert_array_equal(denoised[0.7], default.denoise(volume, device="cpu", strength=0.7).array)
    assert np.abs(denoised[0.7] - denoised[1.0]).max() > 5.0


def test_job_runner_one_job_at_a_time_cancel_and_failure() -> None:
    runner = JobRunner()
    started, release = threading.Event(), threading.Event()

    def slow(progress, warn, cancel):
        warn("a warning")
        for step in range(1000):
            progress(step, 1000, "working")
            started.set()
            if release.wait(0.01):
                return "finished"
        return "finished"

    serial = runner.start("denoise", slow)
    assert started.wait(10)
    with pytest.raises(UserError, match="busy: a denoise job is running"):
        runner.start("export", slow)
    assert runner.snapshot().busy and runner.snapshot().warnings == ("a warning",)
    assert runner.cancel()
    snap = runner.wait(10)
    assert snap.state == CANCELLED and runner.result(serial) is None

    release.set()
    serial = runner.start("denoise", slow)
    assert runner.wait(10).state == DONE and runner.result(serial) == "finished"

    def broken(progress, warn, cancel):
        raise UserError("input: not a CT")

    runner.start("read", broken)
    snap = runner.wait(10)
    assert snap.state == FAILED and snap.error == "input: not a CT"
    assert not runner.cancel()  # nothing runs
    with pytest.raises(Cancelled):
        raise Cancelled("x")


def test_table_cells_are_demo_markdown_cells() -> None:
    table = MetricsTable()
    table.add_row("lung std", 94.444, 29.577, -64.867, "HU")
    table.add_row("noise reduction", None, None, 68.68, "%")
    header, rows = table_cells(table)
    assert header == ["metric", "before", "after", "change", "unit"]
    assert rows == [["lung std", "94.44", "29.58", "-64.87", "HU"], ["noise reduction", "", "", "68.68", "%"]]


def test_export_cancelled_midway_leaves_nothing(tmp_path: Path) -> None:
    """Cancel while the derived series is being written: no folder, no staging left behind."""
    volume = Volume(chest_like_volume(3, (6, 48, 48)), spacing=(0.7, 0.7, 1.25))
    reference = ModelReference.resolve()
    outcome = DenoiseOutcome(
        volume, volume.with_array(volume.array * 0.5), reference.name, reference.provenance()
    )
    result = DenoiseResult(outcome, MetricsTable())
    runner = JobRunner()
    written: list[str] = []
    export = export_work(result, tmp_path / "root" / "series", options=DenoiseOptions(device="cpu"))

    def export_and_click_cancel(progress, warn, cancel):
        def watched(done: int, total: int, message: str = "") -> None:
            progress(done, total, message)  # the runner's own hook (where a cancel takes effect)
            if message == "writing DICOM":
                written.append(message)
                if len(written) == 3:
                    runner.cancel()  # the user clicks Cancel after three slices

        return export(watched, warn, cancel)

    (tmp_path / "root").mkdir()
    runner.start("export", export_and_click_cancel)
    assert runner.wait(60).state == CANCELLED
    assert len(written) == 3
    assert list((tmp_path / "root").iterdir()) == []  # neither the series nor a staging folder


def test_an_export_whose_send_fails_keeps_the_series_and_says_so(tmp_path: Path) -> None:
    """ "Also send to the PACS" with the PACS down: the job fails with the send's one line, and a
    warning says the series written before the send stays in the data root (the page shows it)."""
    from IPv2DenoiseLib.app.web.jobs import PacsPeer
    from IPv2DenoiseLib.io.dicom_net import parse_destination

    volume = Volume(chest_like_volume(3, (4, 48, 48)), spacing=(0.7, 0.7, 1.25))
    reference = ModelReference.resolve()
    outcome = DenoiseOutcome(
        volume, volume.with_array(volume.array * 0.5), reference.name, reference.provenance()
    )
    down = PacsPeer(parse_destination(f"127.0.0.1:{free_port()}:PACS", None), timeout=2.0, retries=0)
    runner = JobRunner()
    (tmp_path / "root").mkdir()
    folder = tmp_path / "root" / "series"
    runner.start(
        "export",
        export_work(
            DenoiseResult(outcome, MetricsTable()), folder, options=DenoiseOptions(device="cpu"), pacs=down
        ),
    )
    snap = runner.wait(60)
    assert snap.state == FAILED and "PACS@127.0.0.1" in snap.error, snap
    assert len(list(folder.glob("*.dcm"))) == 4  # written before the send, and kept
    (warning,) = [w for w in snap.warnings if "stays there" in w]
    assert "series/ (4 files)" in warning and "ipv2-denoise send" in warning


def test_a_cached_pacs_copy_of_another_series_is_fetched_again(orthanc, tmp_path: Path) -> None:
    """``PACS/<SeriesInstanceUID>/`` holds a series with as many files as the chosen one, but not it
    (another program wrote there): the page opens the chosen series, fetched again from the real
    Orthanc, never the stranger that happens to have the same number of files."""
    from pydicom.uid import generate_uid

    from IPv2DenoiseLib.app.web.jobs import PacsPeer, retrieve_work
    from IPv2DenoiseLib.io.dicom_net import parse_node, send
    from IPv2DenoiseLib.io.dicom_query import find_series

    source = write_ct_series(tmp_path / "on-pacs", 3, slice_spacing=2.0)
    patient, study = f"CACHE{time.monotonic_ns() % 10**8}", generate_uid()
    for path in source:
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName, ds.StudyInstanceUID = patient, "CACHE^TEST", study
        ds.save_as(path)
    send(source, parse_node(orthanc.node)).raise_for_failures()
    peer = PacsPeer(parse_node(orthanc.node), timeout=30.0)
    (match,) = find_series(peer.destination, patient=patient, calling_aet=peer.aet)
    assert match.instances == 3
    folder = tmp_path / "root" / "PACS" / match.series_uid
    write_ct_series(folder, 3, slice_spacing=5.0)  # a stranger, same count
    runner = JobRunner()
    runner.start("retrieve", retrieve_work(peer, match, folder))
    snap = runner.wait(120)
    assert snap.state == DONE, snap.error
    volume = runner.result(snap.serial)
    assert volume.spacing[2] == pytest.approx(2.0)  # the chosen series' slices, not the stranger's
    assert {str(pydicom.dcmread(f).SeriesInstanceUID) for f in folder.glob("*.dcm")} == {match.series_uid}


@contextlib.contextmanager
def trickling_dicomweb() -> Iterator[str]:
    """A DICOMweb server on loopback (a real HTTP server, threads in this process) that answers any
    GET with DICOM JSON one byte every 0.2 s for 30 s: each read gets something within any network
    timeout, and the answer does not end in time; yields its base URL."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "application/dicom+json")
            self.end_headers()
            try:
                self.wfile.write(b"[")
                for _ in range(150):
                    time.sleep(0.2)
                    self.wfile.write(b" ")
            except (BrokenPipeError, ConnectionResetError):  # the client hung up
                pass

        def log_message(self, *args) -> None:
            """Quiet: the test reports its assertions, not the server's access log."""

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    finally:
        server.shutdown()
        server.server_close()


def test_the_retrieve_time_limit_option_bounds_the_pages_retrieval(tmp_path: Path) -> None:
    """``web --retrieve-max-minutes 0.05`` reaches the page's retrieve job: a real DICOMweb server on
    loopback trickles its list of the series' images, and the job fails at 3 s, in one line naming
    the limit and the option; nothing is kept. (Until 2026-12-07 the page had no such option: every
    retrieval had 30 minutes, too few for a large series over a slow link.)"""
    from pydicom.uid import generate_uid

    from IPv2DenoiseLib.app.cli import build_parser
    from IPv2DenoiseLib.app.commands.web import pacs_peer
    from IPv2DenoiseLib.app.web.jobs import retrieve_work
    from IPv2DenoiseLib.io.dicom_query import SeriesMatch

    (tmp_path / "root").mkdir()
    match = SeriesMatch(study_uid=generate_uid(), series_uid=generate_uid())
    with trickling_dicomweb() as url:
        peer = pacs_peer(build_parser().parse_args(["web", "--pacs", url, "--retrieve-max-minutes", "0.05"]))
        assert peer is not None and peer.retrieve_max_seconds == pytest.approx(3.0)
        runner = JobRunner()
        started = time.monotonic()
        runner.start("retrieve", retrieve_work(peer, match, tmp_path / "root" / "PACS" / match.series_uid))
        snap = runner.wait(60)
        took = time.monotonic() - started
    assert snap.state == FAILED, snap
    assert "stopped after 3 s, the time limit of one retrieval" in snap.error, snap.error
    assert "raise the limit with ipv2-denoise web --retrieve-max-minutes M" in snap.error
    assert 3 <= took < 3 + 3  # at the limit, not at the 30 s network timeout
    assert list((tmp_path / "root" / "PACS").iterdir()) == []  # neither the series nor its staging
    default = pacs_peer(build_parser().parse_args(["web", "--pacs", url]))
    assert default is not None and default.retrieve_max_seconds is None  # io.dicom_query's 30 min


def test_web_command_refuses_before_serving(tmp_path: Path, capsys) -> None:
    """Errors a user can make on the command line: one line, exit 2, no server started."""
    (tmp_path / "root").mkdir()
    (tmp_path / "outside.nrrd").write_bytes(b"x")
    cases = [
        (["--data-root", str(tmp_path / "missing")], "is not an existing folder"),
        (["../outside.nrrd", "--data-root", str(tmp_path / "root")], "outside the data root; refused"),
        ([str(tmp_path / "outside.nrrd"), "--data-root", str(tmp_path / "root")], "outside the data root"),
        (["--data-root", str(tmp_path / "root"), "--port", "70000"], "--port 70000: expected 0..65535"),
        (
            ["--data-root", str(tmp_path / "root"), "--weights", str(tmp_path / "no.safetensors")],
            "does not exist",
        ),
        (["--data-root", str(tmp_path / "root"), "--pacs", "nohost"], "--pacs: destination 'nohost'"),
        *(
            (
                [
                    "--data-root",
                    str(tmp_path / "root"),
                    "--pacs",
                    "127.0.0.1:104:PACS",
                    "--retrieve-max-minutes",
                    bad,
                ],
                f"argument --retrieve-max-minutes: expected a positive number, got {shown}",
            )
            for bad, shown in (("0", "0.0"), ("-5", "-5.0"), ("nan", "nan"), ("soon", "'soon'"))
        ),
        (
            ["--data-root", str(tmp_path / "root"), "--retrieve-max-minutes", "60"],
            "--retrieve-max-minutes: there is no --pacs to retrieve from",
        ),
        # an absolute INPUT that is a loop of links (a RuntimeError traceback before)
        ([str(tmp_path / "root" / "loop.nrrd"), "--data-root", str(tmp_path / "root")], "cannot follow it"),
    ]
    (tmp_path / "root" / "loop.nrrd").symlink_to("loop.nrrd")
    with (
        socket.socket() as taken
    ):  # a port in use, an address that is not this machine's: before, a traceback
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cases += [
            (
                ["--data-root", str(tmp_path / "root"), "--port", str(port)],
                f"--port {port} is in use (another ipv2-denoise web?); choose another port or --port 0",
            ),
            (
                ["--data-root", str(tmp_path / "root"), "--host", "192.0.2.1"],
                "--host 192.0.2.1 is not an address",
            ),
        ]
        for args, expected in cases:
            try:
                code = cli_main(["web", *args])
            except SystemExit as exc:  # argparse refused an option's value
                code = exc.code
            assert code == 2, args
            lines = capsys.readouterr().err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("ipv2-denoise web: error: "), lines
            assert expected.lower() in lines[0].lower(), lines[0]


def test_web_on_a_port_taken_while_it_starts_says_so(tmp_path: Path) -> None:
    """The port is taken after the early check (another server started meanwhile): the bind of the
    real server fails, and the user reads one line, exit 2, not aiohttp's traceback."""
    (tmp_path / "root").mkdir()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        script = (
            "import sys; import IPv2DenoiseLib.app.commands.web as web; "
            "web.check_listen = lambda host, port: None; "  # as if the port were free at the check
            "from IPv2DenoiseLib.app.cli import main; "
            f"sys.exit(main(['web', '--data-root', {str(tmp_path / 'root')!r}, '--port', '{port}']))"
        )
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        env.pop("DISPLAY", None)
        done = subprocess.run(
            [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600
        )
    errors = [line for line in done.stderr.splitlines() if line.startswith("ipv2-denoise web")]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert errors == [
        f"ipv2-denoise web: error: --port {port} is in use (another ipv2-denoise web?); choose another port or --port 0"
    ]


@pytest.mark.parametrize(
    ("display", "preset", "expected"),
    [
        (None, None, "vtkEGLRenderWindow"),  # headless: VTK would try X first
        (None, "", "vtkEGLRenderWindow"),  # set but empty crashes VTK
        (None, "vtkOSOpenGLRenderWindow", "vtkOSOpenGLRenderWindow"),  # the user's choice is kept
        (":0", None, None),  # a display: VTK's own default
    ],
)
def test_offscreen_rendering_is_chosen_without_a_display(monkeypatch, display, preset, expected) -> None:
    for name, value in (("DISPLAY", display), ("VTK_DEFAULT_OPENGL_WINDOW", preset)):
        if value is None:
            monkeypatch.delenv(name, raising=False)
        else:
            monkeypatch.setenv(name, value)
    configure_rendering()
    assert os.environ.get("VTK_DEFAULT_OPENGL_WINDOW") == expected


# ------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def web_case(tmp_path_factory) -> Path:
    """A data root holding the bundled sample; a file beside it that the page must never open."""
    base = tmp_path_factory.mktemp("web")
    root = base / "root"
    (root / "scans").mkdir(parents=True)
    shutil.copy(SAMPLE, root / "scans" / "sample_uldct.nrrd")
    sample = read_volume(SAMPLE)  # 8 of its slices with 1.2 mm pixels: outside the training range
    # 1.5 mm pixels: outside every shipped model's trained pixel sizes (at most 1.30 mm)
    coarse = Volume(sample.array[8:16].copy(), spacing=(1.5, 1.5, 1.25), origin=sample.origin)
    write_volume(coarse, root / "scans" / "coarse.nrrd")
    write_ct_series(root / "dicom" / "chest", 4)  # a real DICOM series (pydicom's GE chest slice)
    (root / "scans" / "broken.nrrd").write_bytes(SAMPLE.read_bytes()[:4000])  # a cut-off file
    (base / "private.nrrd").write_bytes(SAMPLE.read_bytes()[:1000])
    return base


def dciodvfy_errors(path: Path) -> list[str]:
    """dciodvfy's Error lines on ``path``; fails (never skips) without dciodvfy: setup.sh --test installs it."""
    result = subprocess.run([require_dciodvfy(), str(path)], capture_output=True, text=True, timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.fixture(scope="module")
def chromium():
    """Debian's Chromium through playwright; fails (never skips) without them: setup.sh --test installs both."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("playwright is not installed: run scripts/setup.sh --test (the [test] extra)")
    executable = shutil.which("chromium")
    if executable is None:
        pytest.fail("chromium is not installed: run scripts/setup.sh --test (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def server(web_case: Path, orthanc) -> Iterator[WebServer]:
    web = WebServer(
        web_case / "root",
        [
            "scans/sample_uldct.nrrd",
            "--device",
            "cpu",
            "--pacs",
            orthanc.node,
        ],
        web_case / "server.log",
    )
    yield web
    web.stop()


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "IPv2DenoiseLib", *args], capture_output=True, text=True, env=env, timeout=600
    )


def markdown_cells(path: Path) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a metrics.md table, split like the page's."""
    lines = [
        line for line in path.read_text().splitlines() if line.startswith("|") and not line.startswith("|---")
    ]
    header, *rows = [[c.strip() for c in line.strip().strip("|").split(" | ")] for line in lines]
    return header, rows


# -------------------------------------------------------------------------- browser tests


@pytest.mark.slow
def test_denoise_in_the_browser_shows_demo_numbers(server, chromium, web_case, tmp_path) -> None:
    """Open (the INPUT argument), click Denoise: the denoised view differs, the table is demo's."""
    rss_alone = server.rss_mb()
    listening = {
        c.laddr.ip for c in psutil.Process(server.process.pid).net_connections("inet") if c.status == "LISTEN"
    }
    assert listening == {"127.0.0.1"}, listening  # loopback only unless told otherwise
    page = open_page(chromium, server)
    wait_until(lambda: shows_scan(page), what="the first frame of the original view")
    first_frame_s = time.monotonic() - server.began
    rss_browser = server.rss_mb()
    assert "sample_uldct.nrrd" in page.inner_text("#loaded-name")
    assert lit(view_pixels(page, "denoised")) < 0.05  # nothing there yet

    seconds = denoise_and_wait(page)
    original, denoised = view_pixels(page, "original"), view_pixels(page, "denoised")
    scan = original.max(axis=2) > 30
    changed = (np.abs(denoised - original).max(axis=2) > 8)[scan].mean()
    assert changed > 0.3, f"only {changed:.1%} of the scan differs in the denoised view"
    # where it should: the grain is gone (pixel-to-pixel jumps inside the scan) while the original
    # view keeps it, and the anatomy stays
    assert graininess(denoised) < 0.6 * graininess(original)
    assert abs(lit(denoised) - lit(original)) < 0.05
    assert float(view_pixels(page, "difference").std()) > 5  # the difference view shows the noise removed

    demo = run_cli(
        "demo",
        "--input",
        str(web_case / "root" / "scans" / "sample_uldct.nrrd"),
        "--device",
        "cpu",
        "--out",
        str(tmp_path / "demo"),
    )
    assert demo.returncode == 0, demo.stderr
    header = [c.strip() for c in page.locator("#metrics thead th").all_inner_texts()]
    rows = [
        [c.strip() for c in row.locator("td").all_inner_texts()]
        for row in page.locator("#metrics tbody tr").all()
    ]
    assert (header, rows) == markdown_cells(tmp_path / "demo" / "metrics.md")
    page.screenshot(path=str(FIGURES / "web_denoised.png"))
    print(
        f"\nweb: server start to first frame {first_frame_s:.1f} s (server ready {server.ready_s:.1f} s), "
        f"click to denoised view {seconds:.1f} s; server RSS {rss_alone:.0f} MB before a browser attached, "
        f"{rss_browser:.0f} MB with one, {server.rss_mb():.0f} MB after denoising"
    )
    page.close()


@pytest.mark.slow
def test_linked_slices_presets_and_a_second_browser(server, chromium) -> None:
    """Moving one slider moves all three views; the presets change the grey levels; two browsers
    watch one job, the second sees it busy and cannot start another."""
    first, second = open_page(chromium, server), open_page(chromium, server)
    for page in (first, second):
        wait_until(lambda page=page: shows_scan(page), what="the original view")
    first.click("#denoise-btn")
    wait_until(lambda: "busy: denoise" in second.inner_text("#busy-chip"), what="busy in the second browser")
    assert second.locator("#denoise-btn").is_disabled()
    wait_until(
        lambda: "denoise: done" in second.inner_text("#job-message"), what="the job seen by the second"
    )
    wait_until(lambda: "ready" in first.inner_text("#busy-chip"), what="ready again")
    second.wait_for_selector("#metrics")

    sliders = first.locator(".slice-slider [role=slider]")
    values = lambda page: page.locator(".slice-slider [role=slider]").evaluate_all(  # noqa: E731
        "els => els.map(e => e.getAttribute('aria-valuenow'))"
    )
    start = values(first)
    assert len(set(start)) == 1
    denoised_before = view_pixels(first, "denoised")
    sliders.nth(0).focus()
    for _ in range(5):
        first.keyboard.press("ArrowRight")
    moved = wait_until(
        lambda: (v := values(first)) != start and len(set(v)) == 1 and v, what="linked sliders"
    )
    assert float(moved[0]) > float(start[0])
    wait_until(lambda: values(second) == moved, what="the second browser's sliders")
    wait_until(
        lambda: np.abs(view_pixels(first, "denoised") - denoised_before).mean() > 1,
        what="the denoised view to follow the original's slider",
    )

    lung = view_pixels(first, "original")
    first.click("#preset-mediastinal")
    wait_until(
        lambda: np.abs(view_pixels(first, "original") - lung).mean() > 5, what="the mediastinal window"
    )
    first.screenshot(path=str(FIGURES / "web_mediastinal.png"))
    first.click("#preset-lung")

    first.close()
    second.close()


@pytest.mark.slow
def test_cancel_stops_and_writes_nothing(server, chromium) -> None:
    """Adapt (drawing noise, then 50 steps: several seconds) then Cancel: the job stops, the data root
    is unchanged."""
    before = sorted(p.relative_to(server.root) for p in server.root.rglob("*"))
    page = open_page(chromium, server)
    wait_until(lambda: shows_scan(page), what="the original view")
    page.check("#adapt")
    page.click("#denoise-btn")
    wait_until(lambda: "adapt" in page.inner_text("#job-message"), what="the adaptation to start")
    assert page.locator("#cancel-btn").is_enabled()
    page.screenshot(path=str(FIGURES / "web_progress.png"))
    page.click("#cancel-btn")
    wait_until(lambda: "denoise: cancelled" in page.inner_text("#job-message"), what="the cancelled job")
    assert "ready" in page.inner_text("#busy-chip")
    assert sorted(p.relative_to(server.root) for p in server.root.rglob("*")) == before
    page.uncheck("#adapt")
    page.close()


@pytest.mark.slow
def test_export_is_valid_dicom_in_the_data_root_and_on_the_pacs(server, chromium, orthanc) -> None:
    page = open_page(chromium, server)
    wait_until(lambda: shows_scan(page), what="the original view")
    if not page.locator("#metrics").count():
        denoise_and_wait(page)
    page.fill("#export-folder", "exports/web-series")
    page.check("#send-to-pacs")
    page.click("#export-btn")
    text = wait_until(
        lambda: (t := page.inner_text("#export-message")) and "wrote" in t and t, what="the export"
    )
    files = sorted((server.root / "exports" / "web-series").iterdir())
    assert f"wrote {len(files)} DICOM files into exports/web-series" in text
    assert "stored" in text and orthanc.aet in text
    assert not (errors := dciodvfy_errors(files[0])), errors
    uid = pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID
    assert len(orthanc.series_instances(uid)) == len(files)
    page.close()


@pytest.mark.slow
def test_a_dicom_series_is_exported_into_its_own_study(server, chromium) -> None:
    page = open_page(chromium, server)
    choose_and_open(page, "dicom/chest")
    wait_until(lambda: "dicom/chest" in page.inner_text("#loaded-name"), what="the DICOM series")
    page.check("#refine")  # denoise --refine: the derived series must say so
    denoise_and_wait(page)
    page.uncheck("#refine")
    page.fill("#export-folder", "exports/chest-derived")
    page.click("#export-btn")
    wait_until(lambda: "wrote" in page.inner_text("#export-message"), what="the export")
    source = pydicom.dcmread(next((server.root / "dicom" / "chest").iterdir()), stop_before_pixels=True)
    files = sorted((server.root / "exports" / "chest-derived").iterdir())
    derived = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    assert len(derived) == 4
    assert {d.StudyInstanceUID for d in derived} == {source.StudyInstanceUID}
    assert {d.SeriesInstanceUID for d in derived} != {source.SeriesInstanceUID}
    assert "DERIVED" in derived[0].ImageType
    assert "refined by collaborative Wiener filtering" in derived[0].DerivationDescription
    assert not (errors := dciodvfy_errors(files[0])), errors
    page.close()


def strength_slider(page):
    """The thumb of the page's strength slider (a keyboard moves it one step per arrow key)."""
    return page.locator("div.v-slider", has=page.locator("input#strength")).get_by_role("slider")


@pytest.mark.slow
def test_the_strength_slider_reaches_the_network_and_the_exported_series(server, chromium) -> None:
    """Strength 0.7 set on the slider with the keyboard, then Denoise: the series exported holds the
    network's output at 0.7 (as the pipeline computes it here) and says so."""
    page = open_page(chromium, server)
    choose_and_open(page, "dicom/chest")
    wait_until(lambda: "dicom/chest" in page.inner_text("#loaded-name"), what="the DICOM series")
    thumb = strength_slider(page)
    thumb.focus()
    for _ in range(6):  # 1 - 6 x 0.05
        page.keyboard.press("ArrowLeft")
    wait_until(lambda: thumb.get_attribute("aria-valuenow") == "0.7", timeout=30, what="the slider at 0.7")
    assert "Strength 0.70" in page.inner_text("label#strength")
    denoise_and_wait(page)
    page.fill("#export-folder", "exports/chest-strength")
    page.click("#export-btn")
    wait_until(lambda: "wrote" in page.inner_text("#export-message"), what="the export")
    files = sorted((server.root / "exports" / "chest-strength").iterdir())
    derived = [pydicom.dcmread(f) for f in files]
    assert "denoising strength 0.7 (the noise level map scaled by it" in derived[0].DerivationDescription
    assert derived[0].SeriesDescription.endswith("strength 0.7)")
    written = read_volume(server.root / "exports" / "chest-strength").array
    source = server.root / "dicom" / "chest"
    at = {
        s: DenoisePipeline(DenoiseOptions(device="cpu", strength=s)).run(source).denoised.array
        for s in (0.7, 1.0)
    }
    assert np.abs(written - at[0.7]).max() <= 1.0  # stored as whole HU
    assert np.abs(written - at[1.0]).max() > 5.0
    thumb.focus()
    for _ in range(6):  # back to 1 for the tests after this one
        page.keyboard.press("ArrowRight")
    wait_until(lambda: thumb.get_attribute("aria-valuenow") == "1", timeout=30, what="the slider at 1")
    page.close()


@pytest.mark.slow
def test_a_path_outside_the_data_root_is_refused_on_the_page(server, chromium, web_case) -> None:
    page = open_page(chromium, server)
    wait_until(lambda: shows_scan(page), what="the original view")
    loaded = page.inner_text("#loaded-name")
    for outside in ("../private.nrrd", str(web_case / "private.nrrd")):
        choose_and_open(page, outside)
        message = wait_until(
            lambda: page.locator("#error-message").count() and page.inner_text("#error-message"),
            what="the refusal",
        )
        assert "outside the data root; refused" in message
    page.screenshot(path=str(FIGURES / "web_refused.png"))
    assert page.inner_text("#loaded-name") == loaded  # what was open stays open
    choose_and_open(page, "scans/broken.nrrd")  # inside the root, but not a readable volume
    message = wait_until(
        lambda: "broken.nrrd" in (m := page.inner_text("#error-message")) and "outside" not in m and m,
        what="the reader's refusal",
    )
    assert len(message.strip().splitlines()) == 1, message
    assert page.inner_text("#loaded-name") == loaded
    if not page.is_enabled("#export-btn"):  # run alone: nothing denoised yet, so nothing to export
        denoise_and_wait(page)
    page.fill("#export-folder", "../outside-export")
    page.click("#export-btn")
    wait_until(
        lambda: "outside the data root" in page.inner_text("#error-message"), what="the export refusal"
    )
    assert not (server.root.parent / "outside-export").exists()
    page.fill("#export-folder", "PACS/1.2.3")  # where fetched copies lie: an export there would pass for one
    page.click("#export-btn")
    wait_until(
        lambda: "holds the copies fetched from the PACS" in page.inner_text("#error-message"),
        what="the refusal of an export into PACS/",
    )
    assert not (server.root / "PACS" / "1.2.3").exists()
    page.close()


@pytest.mark.slow
def test_warnings_are_shown_above_the_views(server, chromium) -> None:
    """A scan outside the model's training range: the page says so where the user looks."""
    page = open_page(chromium, server)
    choose_and_open(page, "scans/coarse.nrrd")
    wait_until(lambda: "scans/coarse.nrrd" in page.inner_text("#loaded-name"), what="the coarse scan")
    denoise_and_wait(page)
    warning = wait_until(
        lambda: page.locator("#warnings").count() and page.inner_text("#warnings"), what="a warning"
    )
    assert "outside the model's training range" in warning and "1.50 mm" in warning
    box, views = page.locator("#warnings").bounding_box(), page.locator("#views").bounding_box()
    assert box["y"] + box["height"] <= views["y"] + 1  # right above the images
    page.screenshot(path=str(FIGURES / "web_warning.png"))
    page.close()


def wslink_hello(http_url: str, secret: str) -> dict:
    """Send the websocket hello a trame page sends (wslink's chunked msgpack), with ``secret``; its answer."""

    async def hello() -> dict:
        request = {
            "wslink": "1.0",
            "id": "system:c0:0",
            "method": "wslink.hello",
            "args": [{"secret": secret}],
        }
        async with aiohttp.ClientSession() as session:
            async with session.ws_connect(http_url.replace("http://", "ws://", 1).rstrip("/") + "/ws") as ws:
                for chunk in generate_chunks(msgpack.packb(request), 65536):
                    await ws.send_bytes(chunk)
                unchunker = UnChunker()
                while True:
                    frame = await ws.receive(timeout=JOB_S)
                    assert frame.type == aiohttp.WSMsgType.BINARY, frame
                    message = unchunker.process_chunk(frame.data)  # unpacked once whole
                    if message is not None:
                        return message

    with ThreadPoolExecutor(1) as thread:  # playwright's sync API holds this thread's event loop
        return thread.submit(asyncio.run, hello()).result()


@pytest.mark.slow
def test_the_access_token_is_required(web_case, chromium) -> None:
    web = WebServer(web_case / "root", ["--token=-s3cret", "--device", "cpu"], web_case / "token.log")
    try:
        assert web.url.endswith("?secret=-s3cret")  # a token may start with "-" (1 in 64 random ones do)
        base = web.url.split("?", 1)[0]
        # the guard: the websocket answers a wrong secret with an authentication error, nothing else
        refused = wslink_hello(base, "wrong")
        assert refused["error"]["message"] == "Authentication failed" and "result" not in refused, refused
        assert "clientID" in wslink_hello(base, "-s3cret")["result"]
        # what a person sees: a wrong, missing or stale link gets one sentence, never a page stuck loading
        page = chromium.new_page()
        for url in (base + "?secret=wrong", base, base + "index.html?secret=-s3cre"):
            response = page.goto(url)
            assert response.status == 403, url
            assert "needs its access token" in page.inner_text("body"), url
            assert page.locator("#denoise-btn").count() == 0
        page.goto(web.url)
        page.wait_for_selector("#denoise-btn", timeout=JOB_S * 1000)
        assert web.process.poll() is None
        page.close()
    finally:
        web.stop()


@pytest.mark.slow
def test_without_a_token_the_server_makes_one(server, chromium) -> None:
    """Started without --token: a random token, printed with the address. Without it, wslink would
    accept its built-in secret "wslink-secret", and any web site the user visits could open a
    websocket to the loopback port (browsers allow that across sites) and drive the panel."""
    base, _, query = server.url.partition("?secret=")
    assert len(query) >= 20, server.url  # a random token, not a word
    for guess in ("wslink-secret", ""):  # wslink's default, and none
        refused = wslink_hello(base, guess)
        assert refused["error"]["message"] == "Authentication failed" and "result" not in refused, refused
    assert "clientID" in wslink_hello(base, query)["result"]
    page = chromium.new_page()
    assert page.goto(base).status == 403  # the page without the token: one sentence
    page.close()


@pytest.mark.slow
def test_a_series_is_searched_and_opened_from_the_pacs(server, chromium, orthanc, tmp_path) -> None:
    """Search the PACS for a patient, open one of their CT series (C-FIND + C-GET from the real
    Orthanc), denoise it, and send the derived series back into the same study."""
    from pydicom.uid import generate_uid

    from IPv2DenoiseLib.io.dicom_net import parse_node, send

    source = write_ct_series(tmp_path / "on-pacs", 5)
    other = write_ct_series(tmp_path / "mr", 2, modality="MR", series_number=2)
    patient_id, study_uid = f"WEB{time.monotonic_ns() % 10**8}", generate_uid()
    for path in [*source, *other]:  # a patient and study no other test stores: a CT and an MR series
        ds = pydicom.dcmread(path)
        ds.PatientID, ds.PatientName, ds.StudyInstanceUID = patient_id, "WEBTEST^PACS", study_uid
        ds.save_as(path)
    send([*source, *other], parse_node(orthanc.node)).raise_for_failures()
    series_uid = str(pydicom.dcmread(source[0]).SeriesInstanceUID)

    page = open_page(chromium, server)
    page.fill("#pacs-patient", "webtest")  # part of the name, any case
    clicked = time.monotonic()
    page.click("#pacs-search-btn")
    message = wait_until(lambda: page.inner_text("#pacs-message"), what="the search")
    search_s = time.monotonic() - clicked
    assert message == "1 CT series found"  # the MR series is not offered
    assert patient_id in page.inner_text("#pacs-panel")
    clicked = time.monotonic()
    page.click("#pacs-open-btn")
    wait_until(lambda: f"PACS/{series_uid}" in page.inner_text("#loaded-name"), what="the retrieved series")
    print(
        f"\nweb: PACS search {search_s:.1f} s; open from PACS (C-GET of 5 images, read) {time.monotonic() - clicked:.1f} s"
    )
    assert "128x128x5 voxels" in page.inner_text("#loaded-name")
    retrieved = sorted((server.root / "PACS" / series_uid).iterdir())
    assert [p.name for p in retrieved] == [f"{i:05d}.dcm" for i in range(1, 6)]
    sent = {str(pydicom.dcmread(p).SOPInstanceUID): pydicom.dcmread(p).pixel_array for p in source}
    for path in retrieved:  # the instances themselves, pixel for pixel
        ds = pydicom.dcmread(path)
        assert np.array_equal(ds.pixel_array, sent[str(ds.SOPInstanceUID)])

    denoise_and_wait(page)
    page.fill("#export-folder", "exports/from-pacs")
    page.check("#send-to-pacs")
    page.click("#export-btn")
    wait_until(lambda: "stored" in page.inner_text("#export-message"), what="the export to the PACS")
    page.locator("#input-path").scroll_into_view_if_needed()  # the search fields in sight
    page.screenshot(path=str(FIGURES / "web_pacs.png"))
    series = {s["MainDicomTags"]["SeriesInstanceUID"] for s in orthanc.study_series(study_uid)}
    assert len(series) == 3 and series_uid in series  # CT, MR and the derived series, in one study

    page.fill("#pacs-patient", "nobody-has-this-name")
    page.click("#pacs-search-btn")
    wait_until(lambda: page.inner_text("#pacs-message") == "no CT series found", what="the empty search")
    page.close()


def write_patients(root: Path) -> None:
    """Two DICOM series whose paths differ by their last character, written while the server runs."""
    for name, slices in (("patient1", 3), ("patient12", 5)):
        if not (root / "dicom" / name).exists():
            write_ct_series(root / "dicom" / name, slices)


@pytest.mark.slow
def test_open_reads_the_path_typed_just_before_the_click(server, chromium) -> None:
    """The last character typed, then Open at once, while the server is busy: the scan typed is
    opened. Before, trame's client sent the click ahead of the held-back text, and the server
    opened what the field had held: dicom/patient1 for dicom/patient12, another patient."""
    write_patients(server.root)
    page = open_page(chromium, server)
    page.locator("#input-path").fill("dicom/patient1")
    page.keyboard.press("Escape")
    with server_busy(server, page):
        page.locator("#input-path").press_sequentially("2")
        page.keyboard.press("Escape")
        page.click("#open-btn")
    loaded = wait_until(
        lambda: "dicom/patient1" in (t := page.inner_text("#loaded-name")) and t, what="a patient's series"
    )
    assert loaded.startswith("dicom/patient12: 128x128x5 voxels"), loaded
    # the list of inputs, made in a worker thread after each job, has the folders written since the start
    listed = wait_until(
        lambda: (
            "dicom/patient12" in (found := page.evaluate("() => window.trame.state.get('inputs')")) and found
        ),
        what="the new folders in the list",
    )
    assert "dicom/patient1" in listed
    page.close()


@pytest.mark.slow
def test_denoise_and_export_use_the_choices_made_just_before_the_click(server, chromium, orthanc) -> None:
    """Options ticked, an export folder typed and "send" ticked, each followed at once by the click,
    while the server is busy: the server acts on them. Before, it denoised with the options as they
    were and wrote the series into the previous folder, unsent."""
    write_patients(server.root)
    page = open_page(chromium, server)
    choose_and_open(page, "dicom/patient12")
    wait_until(lambda: "read: done" in page.inner_text("#job-message"), what="the small series")
    page.check("#remove-background")
    page.uncheck("#refine")
    page.uncheck("#adapt")
    page.uncheck("#send-to-pacs")
    page.fill("#export-folder", "exports/previous")
    with server_busy(server, page):
        page.uncheck("#remove-background")
        page.check("#refine")
        page.click("#denoise-btn")
    wait_until(lambda: "denoise: done" in page.inner_text("#job-message"), what="the denoise job")
    with server_busy(server, page):
        page.fill("#export-folder", "exports/just-typed")
        page.check("#send-to-pacs")
        page.click("#export-btn")
    text = wait_until(
        lambda: (
            "wrote" in (t := page.inner_text("#export-message"))
            and t
            or (page.locator("#error-message").count() and page.inner_text("#error-message"))
        ),
        what="the export",
    )
    assert "into exports/just-typed" in text and "stored" in text, text
    assert not (server.root / "exports" / "previous").exists()
    files = sorted((server.root / "exports" / "just-typed").iterdir())
    derived = pydicom.dcmread(files[0], stop_before_pixels=True)
    assert "refined by collaborative Wiener filtering" in derived.DerivationDescription
    assert len(orthanc.series_instances(derived.SeriesInstanceUID)) == len(files) == 5
    page.check("#remove-background")  # the defaults again, for the tests after this one
    page.uncheck("#refine")
    page.uncheck("#send-to-pacs")
    page.close()


@pytest.mark.slow
def test_open_from_pacs_fetches_the_series_chosen_just_before_the_click(
    server, chromium, orthanc, tmp_path
) -> None:
    """The second series of a search chosen, then Open from PACS at once, while the server is busy:
    that series is fetched, and the page names its patient. Before, the click carried nothing, the
    server took the list position it had (the first series, which may be another patient's)."""
    from pydicom.uid import generate_uid

    from IPv2DenoiseLib.io.dicom_net import parse_node, send

    patient_id, study_uid = f"RACE{time.monotonic_ns() % 10**8}", generate_uid()
    uids, files = {}, []
    for number, slices in ((1, 3), (2, 4)):
        series = write_ct_series(tmp_path / f"series{number}", slices, series_number=number)
        for path in series:
            ds = pydicom.dcmread(path)
            ds.PatientID, ds.PatientName, ds.StudyInstanceUID = patient_id, "RACE^CHOICE", study_uid
            ds.save_as(path)
        uids[f"{slices} images"] = str(ds.SeriesInstanceUID)
        files += series
    send(files, parse_node(orthanc.node)).raise_for_failures()

    page = open_page(chromium, server)
    page.fill("#pacs-patient", patient_id)
    page.click("#pacs-search-btn")
    wait_until(lambda: page.inner_text("#pacs-message") == "2 CT series found", what="the search")
    with server_busy(server, page):
        page.click("#pacs-series", force=True)  # on the text of the chosen series, which lies over it
        option = page.get_by_role("option").nth(1)
        chosen = option.inner_text()
        option.click()
        page.click("#pacs-open-btn")
    (expected,) = [uid for images, uid in uids.items() if images in chosen]
    loaded = wait_until(
        lambda: any(f"PACS/{uid}" in (t := page.inner_text("#loaded-name")) for uid in uids.values()) and t,
        what="a series from the PACS",
    )
    assert f"PACS/{expected}" in loaded, (chosen, loaded)
    assert f"{patient_id} RACE^CHOICE" in loaded  # whose scan it is, not only a UID
    page.close()


def test_cancel_stops_a_pacs_search_in_the_page_job(tmp_path) -> None:
    """Cancel on a running PACS search: the job ends cancelled before the next study's query (the
    search ran to the end, finished "done" and showed its results)."""
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind

    from IPv2DenoiseLib.app.web.jobs import PacsPeer, search_work
    from IPv2DenoiseLib.io.dicom_net import DicomNode

    studies = [generate_uid() for _ in range(20)]
    asked: list[str] = []

    def on_find(event):  # 20 studies; each series query takes 0.2 s, as a busy PACS
        if event.identifier.QueryRetrieveLevel == "STUDY":
            for uid in studies:
                row = Dataset()
                row.QueryRetrieveLevel, row.StudyInstanceUID, row.StudyDate = "STUDY", uid, "20240101"
                row.PatientID, row.PatientName = "P1", "SEARCH^CANCEL"
                yield 0xFF00, row
        else:
            asked.append(str(event.identifier.StudyInstanceUID))
            time.sleep(0.2)
            row = Dataset()
            row.QueryRetrieveLevel, row.StudyInstanceUID = "SERIES", event.identifier.StudyInstanceUID
            row.SeriesInstanceUID, row.Modality, row.SeriesNumber = generate_uid(), "CT", 1
            yield 0xFF00, row

    ae = AE(ae_title="FINDER")
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    port = free_port()
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        runner = JobRunner()
        runner.start("search", search_work(PacsPeer(DicomNode("127.0.0.1", port, "FINDER")), "", ""))
        deadline = time.monotonic() + 30
        while len(asked) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert runner.cancel()
        snapshot = runner.wait(timeout=30)
    finally:
        server.shutdown()
    assert snapshot.state == CANCELLED
    assert 2 <= len(asked) < 6  # stopped at the next study, not after all 20
