"""The Slicer module's denoising job: the ``ipv2-denoise denoise`` pipeline in a background process.

torch never loads into the Slicer process: the job writes the input node to a temporary NRRD,
runs the command line's own pipeline (:mod:`IPv2DenoiseLib.app.pipeline`) in a child speaking JSON
lines (:mod:`~IPv2DenoiseLib.app.slicer_support.process`), and imports the result with a record of
how it was made (model, fine-tuning on the scan, warnings) for the DICOM export.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path

from IPv2DenoiseLib.app.pipeline import DenoiseOptions
from IPv2DenoiseLib.app.slicer_support.dicom import made_from_another_input, store_provenance
from IPv2DenoiseLib.app.slicer_support.process import BackgroundProcess, JobStatus, denoise_command
from IPv2DenoiseLib.app.slicer_support.scene import import_result, volume_from_node
from IPv2DenoiseLib.core.errors import ExitCode, UserError
from IPv2DenoiseLib.core.progress import Cancelled


class DenoiseJob:
    """One non-blocking denoising run of a volume node through the ``ipv2-denoise`` subprocess.

    ``start()`` writes the input to a temp NRRD and launches the child; the caller polls
    :meth:`poll` (a QTimer in the widget) or calls :meth:`wait`; :meth:`finish` imports the
    result into the output node (created only now when None, so a failed or cancelled run
    leaves the scene as it was) and removes the temp folder.

    Parameters
    ----------
    options : DenoiseOptions
        Model, device, background removal, ensemble, refinement, strength, adaptation: as
        ``ipv2-denoise denoise``.
    command : list of str, optional
        Replace the command line (tests); ``{input}`` and ``{output}`` are substituted.
    """

    def __init__(
        self,
        input_node,
        output_node=None,
        *,
        options: DenoiseOptions,
        python: str | None = None,
        command: Sequence[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.input_node = input_node
        self.output_node = output_node
        self.options = options
        self.python, self.command, self.env = python, command, env
        self.workdir: Path | None = None
        self.process: BackgroundProcess | None = None

    def start(self) -> DenoiseJob:
        # lazy: needs pydicom (see dicom_source_files)
        from IPv2DenoiseLib.io.volumes import validate_ct, write_volume

        if self.output_node is not None and self.output_node is self.input_node:
            raise UserError(
                f"the output volume is the input {self.input_node.GetName()!r}: denoising would replace the "
                "original scan; choose another output volume or leave it empty (a new one is made)"
            )
        if self.output_node is not None and made_from_another_input(self.output_node, self.input_node):
            self.output_node = None  # the last run's output of another scan stays; a new node is made
        volume = volume_from_node(self.input_node)
        # checked here, under the node's name, not in the child under its temporary file's
        validate_ct(
            volume,
            where=f"input volume {self.input_node.GetName()!r}",
            force=False,
            force_hint="the module denoises CT in Hounsfield units only",
        )
        self.workdir = Path(tempfile.mkdtemp(prefix="IPv2Denoise-"))
        in_path, out_path = self.workdir / "input.nrrd", self.workdir / "output.nrrd"
        try:  # a full disk or a child that cannot start must not leave the patient's scan in /tmp
            write_volume(volume, in_path)
            if self.command is not None:
                args = [
                    str(a).replace("{input}", str(in_path)).replace("{output}", str(out_path))
                    for a in self.command
                ]
            else:
                args = denoise_command(in_path, out_path, self.options, python=self.python)
            env = dict(self.env or {})
            lib_parent = str(Path(__file__).resolve().parents[3])  # holds IPv2DenoiseLib: ``-m`` resolves
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (lib_parent, os.environ.get("PYTHONPATH", "")) if p
            )
            self.output_path = out_path
            self.process = BackgroundProcess(args, env=env).start()
        except BaseException:
            self.cleanup()
            raise
        return self

    @property
    def status(self) -> JobStatus:
        return self.process.status if self.process else JobStatus()

    def poll(self) -> JobStatus:
        self.process.poll()
        return self.process.status

    def done(self) -> bool:
        return self.process is not None and self.process.finished()

    def cancel(self) -> None:
        if self.process is not None:
            self.process.cancel()

    def wait(self, timeout: float | None = None):
        """Block until the child ends, then :meth:`finish` (the output node).

        A wait that ends otherwise (``timeout`` passed: :class:`subprocess.TimeoutExpired`; Ctrl-C
        in Slicer's Python console) stops the child and removes its copy of the scan before the
        exception goes on: the child would otherwise run on unseen, and the copy stay in /tmp.
        """
        try:
            self.process.wait(timeout=timeout)
        except BaseException:
            self.cancel()
            self.cleanup()
            raise
        return self.finish()

    def finish(self):
        """Import the result (returns the output node), or raise; always cleans up.

        Raises
        ------
        UserError
            The child failed (its last stderr line) or was cancelled (``Cancelled``).
        """
        from IPv2DenoiseLib.io.volumes import read_volume  # lazy: needs pydicom

        try:
            self.process.poll()  # fold the last records (result, warning) into the status
            code = self.process.returncode
            if code == ExitCode.CANCELLED or self.process.cancel_requested:
                raise Cancelled("denoising cancelled; the scene was left unchanged")
            if code != ExitCode.OK or not self.output_path.exists():
                raise UserError(f"denoising failed: {self.process.error_message()}")
            result = read_volume(self.output_path, force=True)
            self.output_node = import_result(self.input_node, self.output_node, result)
            status = self.process.status
            store_provenance(
                self.output_node,
                self.options,
                adapted=status.adapted,
                warnings=status.warnings,
                provenance=status.provenance,
                input_node=self.input_node,
            )
            for message in self.process.status.warnings:
                logging.warning("IPv2 Denoise: %s", message)
            return self.output_node
        finally:
            self.cleanup()

    def cleanup(self) -> None:
        if self.workdir is not None:
            shutil.rmtree(self.workdir, ignore_errors=True)
            self.workdir = None


__all__ = ["DenoiseJob"]
