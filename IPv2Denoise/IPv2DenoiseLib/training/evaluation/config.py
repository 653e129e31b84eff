"""Sizes of an evaluation grid and its two presets (``reduced`` for 2 CPU cores, ``full`` for a GPU).

``noise`` selects how the grid's "real" ULDCT is made. ``matched``: by the product's own simulator
(:func:`~IPv2DenoiseLib.physics.lowdose.simulate_low_dose`), the very one Sim(N) in *Add noise*
uses, so Add noise is in-distribution by construction (the control). ``mismatched``: the way a
scanner makes it (:func:`~IPv2DenoiseLib.physics.scanner_noise.scanner_noise` with
:data:`SCANNER_PROTOCOL`: another kernel, a bowtie, tube-current modulation, slice-correlated
noise), while Sim(N) stays the product's simulator.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from IPv2DenoiseLib.core.errors import UserError

#: Strategies of the grid: naive, the simulation-only control, IPv1, the IPv1 texture blend, IPv2
#: and its two single-module ablations (see :class:`~IPv2DenoiseLib.purification.pairs.Strategy`).
GRID_STRATEGIES = ("naive", "sim", "ipv1", "ipv1+tb", "rb", "an", "ipv2")
REGIONS = ("background", "lungs", "body")
#: Scoring references; ``truth`` (the noise-free anatomy of the ULDCT) is the primary one.
REFERENCES = ("truth", "label")
#: How the grid's "real" ULDCT is made.
NOISE_CONDITIONS = ("matched", "mismatched")
#: The scanner of the mismatched condition (the dose is the config's): a smoother kernel than the
#: simulator's ramp, a body bowtie, TCM with α 0.5 and lag-1 slice correlation 0.45.
SCANNER_PROTOCOL = {"kernel": "hann", "bowtie": True, "tcm": 0.5, "z_correlation": 0.45, "geometry": "fan"}


@dataclass
class EvalConfig:
    """Sizes of one evaluation grid (written into the results)."""

    name: str
    #: Case shape (z, y, x) and spacing (sx, sy, sz) mm of the synthetic cases.
    shape: tuple[int, int, int] = (16, 512, 512)
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.25)
    #: Dose fraction of the ULDCT and of the Add-noise simulation.
    dose: float = 0.02
    #: ``matched`` (ULDCT by the product's simulator) or ``mismatched`` (by SCANNER_PROTOCOL).
    noise: str = "mismatched"
    scanner: dict = field(default_factory=lambda: dict(SCANNER_PROTOCOL))
    n_train: int = 4
    n_test: int = 2
    motion_mm: float = 10.0
    strategies: tuple[str, ...] = GRID_STRATEGIES
    models: dict[str, dict] = field(
        default_factory=lambda: {
            "redcnn": {"in_slices": 3, "channels": 96},
            "dncnn": {"in_slices": 3, "depth": 17, "width": 64},
            "unet": {"in_slices": 3, "base_channels": 16, "levels": 3},
        }
    )
    classical: tuple[str, ...] = ("nlm", "tv", "curvature")
    iterations: int = 4000
    batch: int = 16
    patch: int = 64
    lr: float = 1e-3
    #: Training loss (see :data:`~IPv2DenoiseLib.training.trainer.LOSSES`).
    loss: str = "huber"
    weak_denoiser: str = "nlm"
    device: str = "auto"
    #: Index of the slice shown in the figure grid (default: middle).
    figure_slice: int | None = None
    #: Rounds of the training loss per run (for the did-it-train check).
    loss_rounds: int = 5

    def __post_init__(self) -> None:
        if self.noise not in NOISE_CONDITIONS:
            raise UserError(f"noise: got {self.noise!r}; use {' or '.join(NOISE_CONDITIONS)}")


def preset(name: str, *, noise: str = "mismatched") -> EvalConfig:
    """``reduced`` (one CPU core, about half an hour per noise condition) or ``full`` (GPU).

    Both use the study's images: 512² px of 0.7 mm (the whole chest in a 358 mm field of view, so
    the projector sees the whole body and the noise is that of a real 2 % scan, 45-70 HU) and the
    true 2 % dose. ``full`` is the study: 16 slices, 4 training cases, the three paper models at
    their sizes, 4000 iterations of 16 × 64² patches (run it with ``--seeds 0 1 2``). ``reduced``
    keeps the images and trains on patches, so its cost is set by the iterations, not the image
    size: 8 slices, 3 training cases, two small models (DnCNN 6 × 16, U-Net 12 × 2 levels), 600
    iterations of 8 × 40² patches.
    """
    if name == "reduced":
        return EvalConfig(
            name="reduced",
            shape=(8, 512, 512),
            spacing=(0.7, 0.7, 1.25),
            dose=0.02,
            noise=noise,
            n_train=3,
            n_test=2,
            models={
                "dncnn": {"in_slices": 3, "depth": 6, "width": 16},
                "unet": {"in_slices": 3, "base_channels": 12, "levels": 2},
            },
            iterations=600,
            batch=8,
            patch=40,
            lr=2e-3,
        )
    if name == "full":
        return EvalConfig(name="full", noise=noise)
    raise UserError(f"--config: got {name!r}; use reduced or full")
