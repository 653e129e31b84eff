"""Real-world-like ULDCT/NDCT pairs: synthetic chest, breathing misalignment, physical 2 % dose.

No real paired scans can be shipped, so we make our own the way the Patient-uLDCT pairs arise: the
normal-dose scan (NDCT) images the reference anatomy at full dose; the ultra-low-dose scan (ULDCT)
images the *same patient in another breath hold* (the anatomy moved by :func:`breathing_motion`) at
a true 2 % of the photons. Both go through the same physical projector (:mod:`lowdose`), so the
noise has the streaks and texture of a real reconstruction. The noise-free anatomies are kept as
ground truth for the evaluation.

Case folder layout (:mod:`IPv2DenoiseLib.io.case_folder`; ``DIR/case_000/``): ``ndct.nrrd``, ``uldct.nrrd``, ``ndct_clean.nrrd``,
``uldct_clean.nrrd`` (int16 HU), ``labels_ndct.nrrd``, ``labels_uldct.nrrd`` (uint8, ids in
:data:`IPv2DenoiseLib.synthetic.phantom.LABELS`) and ``case.json``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from IPv2DenoiseLib.core.atomic import atomic_dir, make_output_folder
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback, Stages
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.case_folder import CASE_FILES
from IPv2DenoiseLib.io.image_headers import MEMORY_LIMIT_ENV, memory_budget_bytes
from IPv2DenoiseLib.io.volumes import write_volume
from IPv2DenoiseLib.physics.lowdose import I0_FULL_DOSE, simulate_low_dose
from IPv2DenoiseLib.synthetic.breathing import breathing_motion, motion_stats
from IPv2DenoiseLib.synthetic.phantom import LABELS, make_chest_phantom

#: In-plane matrix sizes (pixels per side) a synthetic case may have.
SIZE_RANGE = (32, 2048)
#: The working memory of making one case, in float32 volumes of its size (phantom and its labels,
#: the moved copy, the displacement field, both scans, their copies while written).
CASE_WORKING_VOLUMES = 16


@dataclass(frozen=True)
class CaseSpec:
    """How one synthetic case is made (written into its ``case.json``)."""

    seed: int
    size: int = 512
    slices: int = 32
    spacing_mm: float = 0.7
    slice_thickness_mm: float = 1.25
    dose: float = 0.02
    amplitude_mm: float = 12.0
    geometry: str = "fan"
    emphysema: bool = False
    z_center_mm: float = -30.0

    @classmethod
    def draw(cls, seed: int, **overrides) -> CaseSpec:
        """A spec whose anatomy position, motion amplitude and emphysema vary with ``seed``."""
        rng = np.random.default_rng(seed)
        varied = {
            "z_center_mm": float(rng.uniform(-110.0, 10.0)),
            "amplitude_mm": float(rng.uniform(8.0, 20.0)),
            "emphysema": bool(rng.random() < 0.3),
        }
        varied.update(overrides)
        return cls(seed=seed, **varied)

    def check(self) -> None:
        """Refuse, in one line and before any work, a case that cannot be made or would not fit
        in memory (:func:`~IPv2DenoiseLib.io.image_headers.memory_budget_bytes`).

        Raises
        ------
        UserError
            A size, slice count, spacing, dose or amplitude out of range, or too large a case.
        """
        low, high = SIZE_RANGE
        if not low <= self.size <= high:
            raise UserError(f"--size {self.size}: need {low} to {high} pixels per side")
        if self.slices < 1:
            raise UserError(f"--slices {self.slices}: need 1 or more")
        for option, value in (("--spacing", self.spacing_mm), ("--slice-thickness", self.slice_thickness_mm)):
            if not (math.isfinite(value) and value > 0):
                raise UserError(f"{option} {value}: need a positive number of mm")
        if not 0.0 < self.dose <= 1.0:
            raise UserError(f"--dose {self.dose}: need a dose fraction in (0, 1]")
        if not (math.isfinite(self.amplitude_mm) and self.amplitude_mm >= 0):
            raise UserError(f"--amplitude {self.amplitude_mm}: need 0 or more mm")
        needed, budget = CASE_WORKING_VOLUMES * 4 * self.size**2 * self.slices, memory_budget_bytes()
        if needed > budget:
            raise UserError(
                f"--size {self.size} --slices {self.slices}: one case needs about {needed / 1e9:.1f} GB "
                f"of memory and {budget / 1e9:.1f} GB is available (set {MEMORY_LIMIT_ENV} to change the "
                "limit); make smaller cases"
            )


def make_case(
    spec: CaseSpec,
    out_dir: str | os.PathLike,
    *,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict:
    """Make one case folder; returns its ``case.json`` content.

    The folder is built under a temporary name and renamed when complete, so an interrupted run
    never leaves a half case under the final name.
    """
    spec.check()
    out = Path(out_dir)
    if out.exists():
        raise UserError(f"{out} already exists; remove it or choose another folder")
    steps, began, timings = 4, time.monotonic(), {}

    def step(done: int, message: str) -> None:
        if cancel is not None:
            cancel.check()
        if progress is not None:
            progress(done, steps, message)

    with atomic_dir(out) as tmp:
        t = time.monotonic()
        shape = (spec.slices, spec.size, spec.size)
        spacing = (spec.spacing_mm, spec.spacing_mm, spec.slice_thickness_mm)
        reference = make_chest_phantom(
            shape=shape,
            spacing=spacing,
            seed=spec.seed,
            z_center_mm=spec.z_center_mm,
            emphysema=spec.emphysema,
        )
        timings["phantom_s"] = time.monotonic() - t
        step(1, "breathing motion")
        t = time.monotonic()
        moved, displacement = breathing_motion(reference, amplitude_mm=spec.amplitude_mm, seed=spec.seed + 1)
        motion = motion_stats(displacement, reference.labels)
        del displacement
        timings["motion_s"] = time.monotonic() - t
        step(2, "NDCT scan (full dose)")
        t = time.monotonic()
        sim = {"spacing_mm": spec.spacing_mm, "geometry": spec.geometry, "device": device}
        ndct = simulate_low_dose(reference.hu, dose=1.0, seed=spec.seed * 2 + 101, **sim)
        step(3, f"ULDCT scan ({spec.dose:.0%} dose)")
        uldct = simulate_low_dose(moved.hu, dose=spec.dose, seed=spec.seed * 2 + 102, **sim)
        timings["scans_s"] = time.monotonic() - t

        def save(name: str, array: np.ndarray, dtype) -> None:
            volume = Volume(array, spacing, reference.origin, meta={})
            write_volume(volume, tmp / f"{name}.nrrd", dtype=dtype)

        save("ndct", ndct, np.int16)
        save("uldct", uldct, np.int16)
        save("ndct_clean", reference.hu, np.int16)
        save("uldct_clean", moved.hu, np.int16)
        save("labels_ndct", reference.labels, np.uint8)
        save("labels_uldct", moved.labels, np.uint8)
        timings["total_s"] = time.monotonic() - began
        record = {
            **asdict(spec),
            "i0_full_dose": I0_FULL_DOSE[spec.geometry],
            "incident_photons_per_ray": I0_FULL_DOSE[spec.geometry] * spec.dose,
            "shape_zyx": list(shape),
            "spacing_xyz_mm": list(spacing),
            "origin_xyz_mm": list(reference.origin),
            "motion_mm": {k: round(float(v), 3) for k, v in motion.items()},
            "labels": dict(LABELS),
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "files": {name: f"{name}.nrrd" for name in CASE_FILES},
        }
        (tmp / "case.json").write_text(json.dumps(record, indent=2))
    step(4, "done")
    return record


def make_dataset(
    out_dir: str | os.PathLike,
    *,
    cases: int,
    seed: int = 0,
    device: str = "auto",
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    **spec_overrides,
) -> list[dict]:
    """Make ``cases`` case folders ``case_000 ...`` under ``out_dir``; complete ones are kept (resume)."""
    if cases < 1:
        raise UserError(f"--cases must be at least 1, got {cases}")
    CaseSpec.draw(seed * 1000, **spec_overrides).check()  # before any folder is made
    out = make_output_folder(out_dir, what="--out")
    names = [f"case_{i:03d}" for i in range(cases)]
    stages = Stages(progress, **dict.fromkeys(names, 1))  # each case's own steps, not one line a case
    records = []
    for i, name in enumerate(names):
        folder = out / name
        if (folder / "case.json").exists():
            records.append(json.loads((folder / "case.json").read_text()))
        else:
            spec = CaseSpec.draw(seed * 1000 + i, **spec_overrides)
            records.append(make_case(spec, folder, device=device, progress=stages.stage(name), cancel=cancel))
        stages.stage(name)(1, 1, name)
    return records
