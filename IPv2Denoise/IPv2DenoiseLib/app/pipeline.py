"""One denoising pipeline for every front end: read → check → (adapt) → denoise → warn → write or export.

``denoise``, ``batch``, ``serve``, the Slicer module (through its background ``denoise`` process)
and the web app all run a scan through :class:`DenoisePipeline`, configured per call by one
:class:`DenoiseOptions` (model, device, background removal, ensemble, refinement, strength, adaptation). So
every front end warns alike (training range, truncated field of view, reorientation), records the same
provenance in what it writes (the model, its checksum, a fine-tuning on the scan, the refinement, a strength
other than 1, a test-time ensemble) and loads the model through the one
:class:`~IPv2DenoiseLib.denoiser.model_reference.ModelReference`.

The pipeline holds the loaded network, so a long-running front end (``batch``, ``serve``, the
web server) loads it once and denoises many scans.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

from IPv2DenoiseLib.core.device import check_device_name
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback, Stages
from IPv2DenoiseLib.core.provenance import ModelProvenance
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.ensemble import check_ensemble
from IPv2DenoiseLib.denoiser.model_reference import DEFAULT_MODEL, ModelReference
from IPv2DenoiseLib.denoiser.strength import DEFAULT_STRENGTH, check_strength

if TYPE_CHECKING:
    from IPv2DenoiseLib.denoiser.infer import Denoiser
    from IPv2DenoiseLib.training.adapt import AdaptConfig

#: Wall-clock cap of ``--adapt`` (s) unless the caller gives one; its step count (``AdaptConfig``) ends it first.
ADAPT_SECONDS = 60.0
#: With ``--adapt-steps`` and no ``--adapt-seconds``: the clock only stops a runaway, the steps end it.
ADAPT_STEPS_SECONDS_CAP = 3600.0
#: The progress bar's time model (:meth:`DenoiseOptions.stage_weights`): one pass of the fast network
#: over a 300-slice chest on two CPU cores (s), its FLOPs per voxel, and ``--refine`` in such passes.
FAST_PASS_SECONDS = 30.0
FAST_FLOPS_PER_VOXEL = 49_600  # the fast tier's card (unet-nmt since 2026-12-06)
REFINE_PASSES = 11.0

WarningSink = Callable[[str], None]


@dataclass(frozen=True)
class DenoiseOptions:
    """How to denoise, passed per call: which model, where, and with which extras.

    ``weights`` (a file) takes precedence over ``model`` (a catalogue name). With ``adapt``, the
    fine-tuning runs ``adapt_steps`` optimiser steps (None: the default of ``AdaptConfig``), so that
    the same scan gives the same output on a busy or an idle machine; ``adapt_seconds`` caps it.
    ``strength`` applies to the final pass only: a fine-tuning measures and trains at 1.
    Checked on creation (one line each).
    """

    model: str = DEFAULT_MODEL
    weights: str | None = None
    device: str = "auto"
    remove_background: bool = True
    ensemble: int = 1
    #: Collaborative Wiener refinement of the network's output (``denoiser.refine``).
    refine: bool = False
    #: Denoising strength: the factor on a noise-aware network's noise level map (``denoiser.strength``).
    strength: float = DEFAULT_STRENGTH
    adapt: bool = False
    adapt_seconds: float = ADAPT_SECONDS
    adapt_steps: int | None = None
    #: Slices per slab (None: from free memory).
    slab: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "device", check_device_name(self.device))
        object.__setattr__(self, "ensemble", check_ensemble(int(self.ensemble)))
        object.__setattr__(self, "strength", check_strength(self.strength))
        if not self.adapt_seconds > 0:
            raise UserError(f"adapt seconds: expected > 0, got {self.adapt_seconds}")
        if self.adapt_steps is not None and int(self.adapt_steps) < 1:
            raise UserError(f"adapt steps: expected a positive number of steps, got {self.adapt_steps}")
        if self.slab is not None and int(self.slab) < 1:
            raise UserError(f"slab: expected a positive number of slices, got {self.slab}")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> DenoiseOptions:
        """From the options of :func:`~IPv2DenoiseLib.app.arguments.add_model_arguments` (and
        ``--adapt``/``--adapt-seconds``/``--adapt-steps``/``--slab`` where a command has them)."""
        seconds = getattr(args, "adapt_seconds", None)
        steps = getattr(args, "adapt_steps", None)
        return cls(
            model=getattr(args, "model", None) or DEFAULT_MODEL,
            weights=getattr(args, "weights", None),
            device=getattr(args, "device", "auto"),
            remove_background=getattr(args, "remove_background", True),
            ensemble=getattr(args, "ensemble", 1),
            refine=bool(getattr(args, "refine", False)),
            strength=getattr(args, "strength", DEFAULT_STRENGTH),
            adapt=bool(getattr(args, "adapt", False)),
            adapt_seconds=seconds or (ADAPT_STEPS_SECONDS_CAP if steps else ADAPT_SECONDS),
            adapt_steps=steps,
            slab=getattr(args, "slab", None),
        )

    def command_line(self) -> list[str]:
        """These options as ``ipv2-denoise denoise`` arguments (the Slicer module's background job)."""
        args = ["--weights", str(self.weights)] if self.weights else ["--model", self.model]
        args += ["--device", self.device]
        if not self.remove_background:
            args.append("--no-remove-background")
        if self.ensemble > 1:
            args += ["--ensemble", str(self.ensemble)]
        if self.refine:
            args.append("--refine")
        if self.strength != DEFAULT_STRENGTH:
            args += ["--strength", repr(self.strength)]  # the shortest text that reads back as the same float
        if self.adapt:
            args += ["--adapt", "--adapt-seconds", f"{self.adapt_seconds:g}"]
            if self.adapt_steps:
                args += ["--adapt-steps", str(int(self.adapt_steps))]
        if self.slab:
            args += ["--slab", str(int(self.slab))]
        return args

    def adapt_config(self) -> AdaptConfig:
        """The fine-tuning's budget: the steps (given or the default) and the seconds' cap."""
        # lazy: training code loads only when the user asks for --adapt
        from IPv2DenoiseLib.training.adapt import AdaptConfig

        steps = int(self.adapt_steps) if self.adapt_steps else AdaptConfig.max_iterations
        return AdaptConfig(seconds=self.adapt_seconds, max_iterations=steps)

    def reference(self) -> ModelReference:
        """The model these options name (torch-free)."""
        return ModelReference.resolve(self.model, self.weights)

    def stage_weights(self) -> dict[str, float]:
        """Shares of the progress bar by expected time, in seconds for a 300-slice chest on two CPU
        cores: the network's passes scale with its FLOPs per voxel (its card) and ``ensemble``;
        ``refine`` adds about 11 fast-network passes (1.1 s against 0.1 s per 512² slice,
        ``bench_infer.py --refine``); a fine-tuning step takes 0.1-0.3 s (docs/training.md)."""
        adapt = min(self.adapt_seconds, 0.2 * self.adapt_config().max_iterations) if self.adapt else 0.0
        flops = float(self.reference().card().get("flops_per_voxel") or FAST_FLOPS_PER_VOXEL)
        network = FAST_PASS_SECONDS * flops / FAST_FLOPS_PER_VOXEL * self.ensemble
        denoise = network + (REFINE_PASSES * FAST_PASS_SECONDS if self.refine else 0.0)
        return {"read": 4, "model": 1, "adapt": adapt, "denoise": denoise, "write": 5}


@dataclass
class DenoiseOutcome:
    """One denoised scan with everything a front end shows or writes about it."""

    source: Volume
    denoised: Volume
    model_name: str
    provenance: ModelProvenance
    #: One line each: training range, truncated field of view, reorientation, the reader's.
    warnings: list[str] = field(default_factory=list)
    #: The record of ``--adapt`` (iterations, seconds, ...), else None.
    adapted: dict[str, Any] | None = None
    #: Noise SD (HU) of the input (``imaging.noise_estimate.volume_noise_hu``), measured once for the
    #: training-range check.
    noise_before_hu: float = float("nan")

    @cached_property
    def noise_after_hu(self) -> float:
        """Noise SD (HU) of the denoised volume on the input's region; measured only when a front end
        records it (``batch``, ``serve``), not on every ``denoise``."""
        from IPv2DenoiseLib.imaging.noise_estimate import volume_noise_hu  # lazy: SciPy

        return volume_noise_hu(self.denoised.array, reference=self.source.array)

    def source_dicom_files(self) -> list[str] | None:
        """The source's DICOM files in slice order (a derived series references them), else None."""
        meta = self.source.meta
        return (
            list(meta["dicom_files"]) if meta.get("source") == "dicom" and meta.get("dicom_files") else None
        )


class DenoisePipeline:
    """Read, check, (adapt,) denoise, warn, write or export one scan at a time; see the module docstring.

    Parameters
    ----------
    options : DenoiseOptions
        Model, device, background removal, ensemble, refinement, strength, adaptation.
    progress : ProgressCallback, optional
        One 0..1000 scale over the stages (read, model, adapt, denoise, write).
    warn : callable(str), optional
        Called once per warning line as soon as it is known (a log, a terminal, a browser).
    cancel : CancelToken, optional
        Checked between slabs and adaptation steps.
    """

    def __init__(
        self,
        options: DenoiseOptions | None = None,
        *,
        progress: ProgressCallback | None = None,
        warn: WarningSink | None = None,
        cancel: CancelToken | None = None,
    ) -> None:
        self.options = options or DenoiseOptions()
        self.reference = self.options.reference()  # an unknown model fails before any reading
        self.stages = Stages(progress, **self.options.stage_weights())
        self.warn = warn or (lambda message: None)
        self.cancel = cancel
        self._denoiser: Denoiser | None = None
        self._device = None

    # ------------------------------------------------------------------------------------ steps

    @property
    def device(self):
        """The resolved torch device (``--device cuda`` without a GPU fails here, before work)."""
        if self._device is None:
            from IPv2DenoiseLib.core.device import resolve_device  # lazy: torch

            self._device = resolve_device(self.options.device)
        return self._device

    def denoiser(self) -> Denoiser:
        """The network, loaded once per pipeline; a strength other than 1 on a network without a noise
        map is refused here, before any scan (``serve`` and each ``batch`` worker load it first; the
        ``batch`` command asks the model card before it touches OUT)."""
        if self._denoiser is None:
            self.stages.start("model", "loading the model")
            denoiser = self.reference.load(ensemble=self.options.ensemble, refine=self.options.refine)
            denoiser.check_strength(self.options.strength)
            self._denoiser = denoiser
        return self._denoiser

    def read(
        self,
        source: str | os.PathLike,
        *,
        series_uid: str | None = None,
        force: bool = False,
        resample_gaps: bool = False,
    ) -> Volume:
        """Read a CT volume or DICOM series with every input check (``io.volumes.read_volume``)."""
        from IPv2DenoiseLib.io.volumes import read_volume  # lazy: SimpleITK, pydicom

        self.stages.start("read", f"reading {source}")
        return read_volume(
            source,
            series_uid=series_uid,
            force=force,
            resample_gaps=resample_gaps,
            progress=self.stages.stage("read"),
        )

    def denoise(self, volume: Volume) -> DenoiseOutcome:
        """Check the scan against the model's training range, adapt if asked, denoise; warn as we go."""
        # lazy: SciPy
        from IPv2DenoiseLib.denoiser.applicability import applicability_warning
        from IPv2DenoiseLib.imaging.noise_estimate import volume_noise_hu

        denoiser = self.denoiser()
        warnings: list[str] = []

        def note(message: str | None) -> None:
            if message and message not in warnings:
                warnings.append(message)
                self.warn(message)

        noise_before = volume_noise_hu(volume.array)  # measured once: the warning and the records
        note(applicability_warning(volume, denoiser.card, noise_hu=noise_before))
        adapted = None
        if self.options.adapt:
            # lazy: training code loads only when the user asks for --adapt
            from IPv2DenoiseLib.training.adapt import adapt_denoiser

            self.stages.start("adapt", "adapting the model to this scan")
            denoiser, report = adapt_denoiser(
                denoiser,
                volume,
                self.options.adapt_config(),
                device=self.device,
                progress=self.stages.stage("adapt"),
                cancel=self.cancel,
            )
            adapted = report.as_dict()
        result = denoiser.denoise(
            volume,
            remove_background=self.options.remove_background,
            device=self.device,
            slab_slices=self.options.slab,
            progress=self.stages.stage("denoise"),
            cancel=self.cancel,
            strength=self.options.strength,
        )
        for message in result.meta.get("warnings", []):
            note(message)
        provenance = self.reference.provenance(
            denoiser.card,
            adapted=adapted,
            refined=self.options.refine,
            strength=self.options.strength,
            ensemble=self.options.ensemble,
        )
        return DenoiseOutcome(
            volume, result, self.reference.name, provenance, warnings, adapted, noise_before
        )

    def write_volume(self, outcome: DenoiseOutcome, path: str | os.PathLike) -> Path:
        """Write the denoised volume (NRRD, NIfTI, MHA), atomically."""
        from IPv2DenoiseLib.io.volumes import write_volume  # lazy: SimpleITK

        self.stages.start("write", f"writing {path}")
        written = write_volume(outcome.denoised, path)
        self.stages.finish(f"wrote {path}")
        return written

    def export_dicom(
        self,
        outcome: DenoiseOutcome,
        out_dir: str | os.PathLike,
        *,
        series_options=None,
        source_files: Sequence[str | os.PathLike] | None = None,
        replace_existing: bool = False,
    ) -> list[Path]:
        """Write the derived DICOM series (in the source's study when it is DICOM) with the model's
        provenance and the warnings in DerivationDescription.

        ``series_options`` (:class:`~IPv2DenoiseLib.io.dicom_export.DerivedSeriesOptions`) sets the
        series number, description and the patient/study of a new series; its ``model`` and
        ``warnings`` are always this outcome's. ``source_files`` overrides the source's own list
        (the Slicer module takes them from its DICOM database).
        """
        # lazy: pydicom
        from IPv2DenoiseLib.io.dicom_export import DerivedSeriesOptions, export_derived_series

        options = replace(
            series_options or DerivedSeriesOptions(),
            model=outcome.provenance,
            warnings=tuple(outcome.warnings),
        )
        sources = list(source_files) if source_files is not None else outcome.source_dicom_files()
        meta = outcome.source.meta
        series = meta.get("dicom_series_files") if sources is None and meta.get("source") == "dicom" else None
        self.stages.start("write", f"writing {out_dir}")
        files = export_derived_series(
            outcome.denoised,
            out_dir,
            source_files=sources,
            series_files=series,
            options=options,
            progress=self.stages.stage("write"),
            replace=replace_existing,
        )
        self.stages.finish(f"wrote {out_dir}")
        return files

    def run(self, source: str | os.PathLike, **read_options: Any) -> DenoiseOutcome:
        """:meth:`read` then :meth:`denoise`."""
        return self.denoise(self.read(source, **read_options))


__all__ = ["ADAPT_SECONDS", "DenoiseOptions", "DenoiseOutcome", "DenoisePipeline"]
