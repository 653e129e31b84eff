"""The grid's ULDCT/NDCT cases: synthetic misaligned pairs (cached as ``.npz``) or a dataset folder."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from IPv2DenoiseLib.core.atomic import atomic_path
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import ProgressCallback
from IPv2DenoiseLib.io.case_folder import case_folders_in, read_case
from IPv2DenoiseLib.physics.lowdose import simulate_low_dose
from IPv2DenoiseLib.physics.scanner_noise import ScannerProtocol, scanner_noise
from IPv2DenoiseLib.synthetic.breathing import breathing_motion
from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom
from IPv2DenoiseLib.training.evaluation.config import EvalConfig


@dataclass
class EvaluationCase:
    """One ULDCT/NDCT pair; ``truth`` is the noise-free anatomy of the ULDCT when known."""

    name: str
    uldct: np.ndarray
    ndct: np.ndarray
    truth: np.ndarray | None
    spacing: tuple[float, float, float]


def scan_uldct(anatomy: np.ndarray, *, seed: int, config: EvalConfig) -> np.ndarray:
    """The grid's "real" ULDCT of ``anatomy``: the product's simulator (``matched``) or the
    scanner of ``config.scanner`` at the same dose (``mismatched``)."""
    px = float(config.spacing[0])
    if config.noise == "matched":
        return simulate_low_dose(anatomy, dose=config.dose, spacing_mm=px, seed=seed)
    protocol = ScannerProtocol(dose=config.dose, **config.scanner)
    return scanner_noise(anatomy, protocol, spacing_mm=px, seed=seed)


def make_case(name: str, *, seed: int, config: EvalConfig) -> EvaluationCase:
    """A synthetic misaligned pair: NDCT of the phantom, ULDCT of the same anatomy in another breath hold."""
    phantom = make_chest_phantom(shape=tuple(config.shape), spacing=tuple(config.spacing), seed=seed)
    try:
        moved, _ = breathing_motion(phantom, amplitude_mm=config.motion_mm, seed=seed + 1000)
        anatomy_u = moved.hu
    except ImportError:  # breathing model missing: a rigid 1-slice shift still misaligns the lungs
        anatomy_u = np.roll(phantom.hu, 1, axis=0)
    px = float(config.spacing[0])
    uldct = scan_uldct(anatomy_u, seed=seed * 2 + 1, config=config)
    ndct = simulate_low_dose(phantom.hu, dose=1.0, spacing_mm=px, seed=seed * 2 + 2)
    return EvaluationCase(
        name,
        uldct.astype(np.float32),
        ndct.astype(np.float32),
        anatomy_u.astype(np.float32),
        tuple(config.spacing),
    )


def _cached_case(path: Path, make) -> EvaluationCase:
    if path.exists():
        with np.load(path) as z:
            truth = z["truth"] if z["truth"].size else None
            return EvaluationCase(
                str(z["name"]), z["uldct"], z["ndct"], truth, tuple(float(v) for v in z["spacing"])
            )
    case = make()
    with atomic_path(path) as tmp:
        np.savez(
            tmp,
            name=case.name,
            uldct=case.uldct,
            ndct=case.ndct,
            truth=case.truth if case.truth is not None else np.zeros(0, np.float32),
            spacing=np.array(case.spacing),
        )
    return case


def synthetic_cases(
    config: EvalConfig, cache: Path, *, progress: ProgressCallback | None = None
) -> tuple[list[EvaluationCase], list[EvaluationCase]]:
    """Training and held-out test cases (different anatomy seeds), cached as ``cache/*.npz``.

    Use one cache folder per noise condition: the cached ULDCT is made by ``config.noise``.
    """
    cache.mkdir(parents=True, exist_ok=True)
    specs = [(f"train{i}", 100 + i) for i in range(config.n_train)] + [
        (f"test{i}", 500 + i) for i in range(config.n_test)
    ]
    cases = []
    for k, (name, seed) in enumerate(specs):
        cases.append(
            _cached_case(cache / f"{name}.npz", lambda n=name, s=seed: make_case(n, seed=s, config=config))
        )
        if progress is not None:
            progress(k + 1, len(specs), f"case {name}")
    return cases[: config.n_train], cases[config.n_train :]


def dataset_cases(
    folder: str | os.PathLike, *, n_test: int = 2
) -> tuple[list[EvaluationCase], list[EvaluationCase]]:
    """Cases from a dataset folder of case folders (``uldct.*``, ``ndct.*``, optional ``uldct_clean.*``).

    ``train/`` and ``test/`` subfolders are used when present; otherwise the last ``n_test`` case
    folders (sorted by name) are held out.
    """
    root = Path(folder)
    if not root.is_dir():
        raise UserError(f"--data: folder not found: {root}")
    if (root / "train").is_dir() and (root / "test").is_dir():
        train_dirs, test_dirs = case_folders_in(root / "train"), case_folders_in(root / "test")
    else:
        found = case_folders_in(root)
        if len(found) < 2:
            raise UserError(f"--data: {root} holds {len(found)} case folders with uldct.*; need at least 2")
        n_test = min(max(1, n_test), len(found) - 1)
        train_dirs, test_dirs = found[:-n_test], found[-n_test:]
    if not train_dirs or not test_dirs:
        raise UserError(f"--data: {root} needs training and test case folders")

    def load(d: Path) -> EvaluationCase:
        vols = read_case(d)
        truth = vols["uldct_clean"].array if "uldct_clean" in vols else None
        return EvaluationCase(
            d.name, vols["uldct"].array, vols["ndct"].array, truth, tuple(vols["uldct"].spacing)
        )

    return [load(d) for d in train_dirs], [load(d) for d in test_dirs]
