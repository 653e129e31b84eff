"""Sizes of an evaluation grid and its two presets (``reduced`` for 2 CPU cores, ``full`` for a GPU)."""

from __future__ import annotations

from dataclasses import dataclass, field

from IPv2DenoiseLib.core.errors import UserError

#: Strategies of the grid: naive, IPv1, IPv2 and the two single-module ablations.
GRID_STRATEGIES = ("naive", "ipv1", "rb", "an", "ipv2")
REGIONS = ("background", "lungs", "body")
REFERENCES = ("truth", "label")


@dataclass
class EvalConfig:
    """Sizes of one evaluation grid (written into the results)."""

    name: str
    #: Case shape (z, y, x) and spacing (sx, sy, sz) mm of the synthetic cases.
    shape: tuple[int, int, int] = (16, 512, 512)
    spacing: tuple[float, float, float] = (0.7, 0.7, 1.25)
    #: Dose fraction of the ULDCT and of the Add-noise simulation.
    dose: float = 0.02
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
    weak_denoiser: str = "nlm"
    device: str = "auto"
    #: Index of the slice shown in the figure grid (default: middle).
    figure_slice: int | None = None


def preset(name: str) -> EvalConfig:
    """``reduced`` (2 CPU cores, < 1 h) or ``full`` (GPU, the real model sizes).

    The reduced grid uses 160² px slices of 2.5 mm pixels (the whole chest in a 400 mm field of
    view) and 0.3 % dose: with 3.6× larger pixels than a clinical 0.7 mm the FBP noise per pixel
    at a given dose is much lower, and 0.3 % gives about the 60–90 HU a real 2 % scan has at 0.7 mm.
    """
    if name == "reduced":
        return EvalConfig(
            name="reduced",
            shape=(10, 160, 160),
            spacing=(2.5, 2.5, 2.5),
            dose=0.003,
            n_train=3,
            n_test=2,
            models={
                "redcnn": {"in_slices": 3, "channels": 16, "kernel_size": 3},
                "dncnn": {"in_slices": 3, "depth": 8, "width": 16},
                "unet": {"in_slices": 3, "base_channels": 12, "levels": 3},
            },
            iterations=300,
            batch=8,
            patch=48,
            lr=2e-3,
        )
    if name == "full":
        return EvalConfig(name="full")
    raise UserError(f"--config: got {name!r}; use reduced or full")
