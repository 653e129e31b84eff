"""The experiment grid: purification strategies × denoising models, plus classical baselines.

Why: the IPv2 paper's claims (IPv2 beats IPv1 in background suppression and lung parenchyma
restoration across models; *Remove Background* and *Add noise* each help; together best) are
checked here on synthetic chest pairs where the noise-free anatomy of the ULDCT is known, so every
output is scored against (a) that truth and (b) the IPv2 refined test label (the paper's
protocol: NDCT in body and background, a weakly denoised ULDCT in the lungs).

Flow: synthetic cases (phantom + breathing misalignment + dose simulation) or a dataset folder →
purified training pairs, built once per strategy and cached → one training run per strategy ×
model × seed (cached weights, so an interrupted run resumes) → denoise the held-out test ULDCTs
→ per-region metrics → JSON, Markdown tables and a figure grid.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback, Steps
from IPv2DenoiseLib.denoiser.infer import Denoiser
from IPv2DenoiseLib.imaging.classical import available_methods, denoise_classical
from IPv2DenoiseLib.imaging.masks import (
    background_mask,
    body_mask,
    lung_mask,
    lung_parenchyma_mask,
    soft_tissue_mask,
)
from IPv2DenoiseLib.imaging.metrics import laa950, nps_2d, psnr, ssim
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu
from IPv2DenoiseLib.io.case_folder import case_folders_in, read_case
from IPv2DenoiseLib.physics.lowdose import simulate_low_dose
from IPv2DenoiseLib.purification.pairs import Strategy, build_pairs, make_weak_denoiser
from IPv2DenoiseLib.synthetic.breathing import breathing_motion
from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom
from IPv2DenoiseLib.training.trainer import BACKGROUND, BODY, LUNGS, CasePairs, TrainConfig, train

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


@dataclass
class Case:
    """One ULDCT/NDCT pair; ``truth`` is the noise-free anatomy of the ULDCT when known."""

    name: str
    uldct: np.ndarray
    ndct: np.ndarray
    truth: np.ndarray | None
    spacing: tuple[float, float, float]


# ----------------------------------------------------------------------------------------- cases


def make_case(name: str, *, seed: int, config: EvalConfig) -> Case:
    """A synthetic misaligned pair: NDCT of the phantom, ULDCT of the same anatomy in another breath hold."""
    phantom = make_chest_phantom(shape=tuple(config.shape), spacing=tuple(config.spacing), seed=seed)
    try:
        moved, _ = breathing_motion(phantom, amplitude_mm=config.motion_mm, seed=seed + 1000)
        anatomy_u = moved.hu
    except ImportError:  # breathing model missing: a rigid 1-slice shift still misaligns the lungs
        anatomy_u = np.roll(phantom.hu, 1, axis=0)
    px = float(config.spacing[0])
    uldct = simulate_low_dose(anatomy_u, dose=config.dose, spacing_mm=px, seed=seed * 2 + 1)
    ndct = simulate_low_dose(phantom.hu, dose=1.0, spacing_mm=px, seed=seed * 2 + 2)
    return Case(
        name,
        uldct.astype(np.float32),
        ndct.astype(np.float32),
        anatomy_u.astype(np.float32),
        tuple(config.spacing),
    )


def _cached_case(path: Path, make) -> Case:
    if path.exists():
        with np.load(path) as z:
            truth = z["truth"] if z["truth"].size else None
            return Case(str(z["name"]), z["uldct"], z["ndct"], truth, tuple(float(v) for v in z["spacing"]))
    case = make()
    tmp = path.with_suffix(".partial.npz")
    np.savez(
        tmp,
        name=case.name,
        uldct=case.uldct,
        ndct=case.ndct,
        truth=case.truth if case.truth is not None else np.zeros(0, np.float32),
        spacing=np.array(case.spacing),
    )
    os.replace(tmp, path)
    return case


def synthetic_cases(
    config: EvalConfig, cache: Path, *, progress: ProgressCallback | None = None
) -> tuple[list[Case], list[Case]]:
    """Training and held-out test cases (different anatomy seeds), cached as ``cache/*.npz``."""
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


def dataset_cases(folder: str | os.PathLike, *, n_test: int = 2) -> tuple[list[Case], list[Case]]:
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

    def load(d: Path) -> Case:
        vols = read_case(d)
        truth = vols["uldct_clean"].array if "uldct_clean" in vols else None
        return Case(d.name, vols["uldct"].array, vols["ndct"].array, truth, tuple(vols["uldct"].spacing))

    return [load(d) for d in train_dirs], [load(d) for d in test_dirs]


# ----------------------------------------------------------------------------------------- pairs


def purified_training_cases(cases: Sequence[Case], strategy: str, config: EvalConfig, cache: Path | None):
    """:class:`~IPv2DenoiseLib.training.trainer.CasePairs` of the training cases for one strategy (cached)."""
    out = []
    for i, case in enumerate(cases):
        path = None if cache is None else cache / f"{strategy.replace('+', '_')}_{case.name}.npz"
        if path is not None and path.exists():
            with np.load(path) as z:
                out.append(CasePairs(case.name, z["train_input"], z["train_label"], z["regions"]))
            continue
        # the training input does not depend on the test label, so skip the weak denoiser here
        name = strategy.replace("ipv2", "rb+an") if strategy == "ipv2" else strategy
        pair = build_pairs(case.uldct, case.ndct, name, dose=config.dose, spacing=case.spacing, seed=7 + i)
        regions = np.full(case.uldct.shape, 255, np.uint8)
        regions[body_mask(case.ndct) | body_mask(case.uldct)] = BODY
        regions[pair.lungs] = LUNGS
        regions[pair.background] = BACKGROUND
        item = CasePairs(case.name, pair.train_input, pair.train_label, regions)
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".partial.npz")
            np.savez(tmp, train_input=item.train_input, train_label=item.train_label, regions=regions)
            os.replace(tmp, path)
        out.append(item)
    return out


def ipv2_test_label(case: Case, config: EvalConfig) -> np.ndarray:
    """The IPv2 refined test label: NDCT in body and background, WD(ULDCT) in the lungs."""
    wd = make_weak_denoiser(
        config.weak_denoiser, spacing=case.spacing, noise_hu=estimate_noise_hu(case.uldct)
    )
    # rb+rn gives the same test label as ipv2 without simulating the (unused) Add-noise input
    return build_pairs(
        case.uldct, case.ndct, "rb+rn", dose=config.dose, spacing=case.spacing, weak_denoiser=wd
    ).test_label


# --------------------------------------------------------------------------------------- metrics


def region_masks(reference: np.ndarray) -> dict[str, np.ndarray]:
    """Background air, lungs, body (not lungs), soft tissue and vessel-free lung parenchyma of a
    noise-free (or low-noise) reference.

    Background is the border-connected air *below −950 HU*: the foam pad under the patient
    (−800…−700 HU) is border-connected too, and the inference's background removal erases it, which
    is not noise.
    """
    body = body_mask(reference)
    lungs = lung_mask(reference) & body
    air = background_mask(reference) & (np.asarray(reference) < -950.0)
    return {
        "background": air,
        "lungs": lungs,
        "body": body & ~lungs,
        "soft_tissue": soft_tissue_mask(reference),
        "whole_body": body,
        "lung_parenchyma": lung_parenchyma_mask(reference, lungs=lungs),
    }


def score(
    output: np.ndarray, reference: np.ndarray, masks: dict[str, np.ndarray], spacing
) -> dict[str, float]:
    """Per-region PSNR, SSIM, noise (SD of output − reference), bias, plus NPS mean frequency and
    the LAA-950 error of ``output`` against ``reference`` (metric definitions: DESIGN.md §6)."""
    diff = output.astype(np.float64) - reference
    m: dict[str, float] = {}
    for region in REGIONS:
        mask = masks[region]
        if mask.sum() < 10:
            for key in ("psnr", "ssim", "noise", "bias"):
                m[f"{region}_{key}"] = math.nan
            continue
        m[f"{region}_psnr"] = psnr(reference, output, mask=mask)
        m[f"{region}_ssim"] = ssim(reference, output, mask=mask)
        m[f"{region}_noise"] = float(diff[mask].std())
        m[f"{region}_bias"] = float(diff[mask].mean())
    soft = masks["soft_tissue"]
    m["soft_tissue_bias"] = float(diff[soft].mean()) if soft.sum() >= 10 else math.nan
    m["psnr"] = psnr(reference, output, mask=masks["whole_body"])
    m["ssim"] = ssim(reference, output, mask=masks["whole_body"])
    roi = max(8, min(32, min(output.shape[-2:]) // 5))
    try:
        m["nps_mean_freq"] = nps_2d(
            diff, pixel_spacing_mm=(spacing[0], spacing[1]), roi_size=roi, mask=masks["whole_body"]
        ).mean_freq
    except UserError:
        m["nps_mean_freq"] = math.nan
    lungs = masks["lungs"]
    m["laa950_error"] = laa950(output, lungs) - laa950(reference, lungs) if lungs.any() else math.nan
    return m


# ------------------------------------------------------------------------------------------ grid


@dataclass
class GridResult:
    """Everything the grid measured."""

    config: dict
    seeds: list[int]
    records: list[dict]  # one per method × seed × test case × reference
    summary: list[dict]  # one per method × reference: metric → (mean, sd) over seeds
    claims: list[dict]
    seconds: float
    figure: str | None = None

    def to_json(self) -> dict:
        return asdict(self)


def _denoise_model(weights: Path, hu: np.ndarray, device: str) -> np.ndarray:
    # raw network output: background suppression must come from training, not from the mask step
    return Denoiser.from_file(weights).denoise_array(hu, remove_background=False, device=device)


def summarize(records: Sequence[dict]) -> list[dict]:
    """Mean over test cases per seed, then mean and SD over seeds, per method and reference."""
    groups: dict[tuple, dict[int, list[dict]]] = {}
    for r in records:
        groups.setdefault((r["method"], r["strategy"], r["model"], r["reference"]), {}).setdefault(
            r["seed"], []
        ).append(r["metrics"])
    out = []
    for (method, strategy, model, reference), by_seed in groups.items():
        keys = list(next(iter(by_seed.values()))[0])
        per_seed = {
            k: [
                float(np.nanmean([c[k] for c in cases]))
                if any(np.isfinite(c[k]) for c in cases)
                else math.nan
                for cases in by_seed.values()
            ]
            for k in keys
        }
        stats = {
            k: (float(np.mean(v)), float(np.std(v, ddof=1)) if len(v) > 1 else 0.0)
            for k, v in per_seed.items()
        }
        out.append(
            {
                "method": method,
                "strategy": strategy,
                "model": model,
                "reference": reference,
                "n_seeds": len(by_seed),
                "metrics": stats,
            }
        )
    return out


def check_claims(summary: Sequence[dict], models: Sequence[str]) -> list[dict]:
    """The paper's claims as comparisons per model (difference of means, and the seed SDs)."""
    table = {(s["strategy"], s["model"], s["reference"]): s["metrics"] for s in summary}
    claims = [
        ("IPv2 suppresses background better than IPv1", "ipv2", "ipv1", "background_noise", "lower"),
        ("IPv2 restores lung parenchyma better than IPv1 (PSNR)", "ipv2", "ipv1", "lungs_psnr", "higher"),
        ("IPv2 restores lung parenchyma better than IPv1 (SSIM)", "ipv2", "ipv1", "lungs_ssim", "higher"),
        (
            "Remove Background alone lowers background noise vs IPv1",
            "rb",
            "ipv1",
            "background_noise",
            "lower",
        ),
        ("Add noise alone improves lung PSNR vs IPv1", "an", "ipv1", "lungs_psnr", "higher"),
        ("IPv2 (both) beats Remove Background alone in lung PSNR", "ipv2", "rb", "lungs_psnr", "higher"),
        ("IPv2 (both) beats Add noise alone in background noise", "ipv2", "an", "background_noise", "lower"),
        ("IPv2 beats naive in body PSNR", "ipv2", "naive", "psnr", "higher"),
    ]
    out = []
    for text, a, b, metric, better in claims:
        for reference in REFERENCES:
            for model in models:
                ma, mb = table.get((a, model, reference)), table.get((b, model, reference))
                if ma is None or mb is None or metric not in ma:
                    continue
                (va, sa), (vb, sb) = ma[metric], mb[metric]
                delta = va - vb
                holds = delta < 0 if better == "lower" else delta > 0
                out.append(
                    {
                        "claim": text,
                        "model": model,
                        "reference": reference,
                        "metric": metric,
                        "a": a,
                        "b": b,
                        "value_a": va,
                        "value_b": vb,
                        "sd_a": sa,
                        "sd_b": sb,
                        "delta": delta,
                        "holds": bool(holds) if np.isfinite(delta) else None,
                        "clear": bool(holds and abs(delta) > sa + sb) if np.isfinite(delta) else None,
                    }
                )
    return out


def run_grid(
    config: EvalConfig,
    out: str | os.PathLike,
    *,
    seeds: Sequence[int] = (0,),
    data: str | os.PathLike | None = None,
    figure_path: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    log=None,
) -> GridResult:
    """Train and evaluate every strategy × model × seed, plus the classical baselines.

    Parameters
    ----------
    config : EvalConfig
        Sizes; see :func:`preset`.
    out : path
        Output folder: ``cases/``, ``pairs/``, ``models/`` caches (a rerun resumes), and
        ``results.json`` / ``results.md``.
    seeds : sequence of int
        Training seeds (network initialisation and patch sampling); the cases and purified pairs
        are the same for every seed, so the spread is that of training.
    data : path, optional
        Dataset folder instead of synthetic cases (see :func:`dataset_cases`).
    figure_path : path, optional
        Where to write the figure grid (default ``out/results_grid.png``).
    progress, cancel
        ``progress(done, total, message)`` over the grid's jobs; cancel token checked between jobs.
    log : callable(str), optional
        Receives one line per finished job.

    Returns
    -------
    GridResult
    """
    began = time.monotonic()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = log or (lambda line: None)
    seeds = [int(s) for s in seeds] or [0]
    for m in config.classical:
        if m not in available_methods():
            raise UserError(f"classical method {m!r} is not available; use {', '.join(available_methods())}")
    for s in config.strategies:
        Strategy.from_name(s)
    steps = Steps(
        2 + len(config.classical) + len(config.strategies) * (1 + len(config.models) * len(seeds)),
        progress,
        cancel,
    )

    def tick(message: str) -> None:
        steps(message)
        say(f"[{time.monotonic() - began:7.1f} s] {message}")

    if data is not None:
        train_cases, test_cases = dataset_cases(data, n_test=config.n_test)
        config = replace(config, spacing=tuple(train_cases[0].spacing))
    else:
        train_cases, test_cases = synthetic_cases(config, out / "cases")
    tick(f"{len(train_cases)} training and {len(test_cases)} test cases ready")

    refs = []
    for case in test_cases:
        masks = region_masks(case.truth if case.truth is not None else case.ndct)
        refs.append({"truth": case.truth, "label": ipv2_test_label(case, config), "masks": masks})
    tick("IPv2 test labels")
    z_show = config.figure_slice if config.figure_slice is not None else test_cases[0].uldct.shape[0] // 2
    z_show = int(np.clip(z_show, 0, test_cases[0].uldct.shape[0] - 1))
    panels: dict[str, np.ndarray] = {
        "ULDCT input": test_cases[0].uldct[z_show],
        "NDCT (misaligned)": test_cases[0].ndct[z_show],
        "IPv2 test label": refs[0]["label"][z_show],
    }
    if test_cases[0].truth is not None:
        panels["truth"] = test_cases[0].truth[z_show]

    records: list[dict] = []

    def record(method: str, strategy: str, model: str, seed: int, outputs: list[np.ndarray]) -> None:
        for case, ref, output in zip(test_cases, refs, outputs):
            for reference in REFERENCES:
                if ref[reference] is None:
                    continue
                metrics = score(output, ref[reference], ref["masks"], case.spacing)
                records.append(
                    {
                        "method": method,
                        "strategy": strategy,
                        "model": model,
                        "seed": seed,
                        "case": case.name,
                        "reference": reference,
                        "metrics": metrics,
                    }
                )

    for seed in seeds:
        record("input", "input", "-", seed, [c.uldct for c in test_cases])
    for name in config.classical:
        outputs = [denoise_classical(c.uldct, name, spacing=c.spacing) for c in test_cases]
        for seed in seeds:
            record(f"classical/{name}", "classical", name, seed, outputs)
        panels[name.upper() if name != "curvature" else "curvature AD"] = outputs[0][z_show]
        tick(f"classical {name}")

    model_panels: dict[tuple[str, str], np.ndarray] = {}
    for strategy in config.strategies:
        pairs = purified_training_cases(train_cases, strategy, config, out / "pairs")
        tick(f"pairs {strategy}")
        for arch, kwargs in config.models.items():
            for seed in seeds:
                folder = out / "models" / strategy.replace("+", "_") / arch / f"seed{seed}"
                weights = folder / "model.safetensors"
                if not weights.exists():
                    tcfg = TrainConfig(
                        cases=[c.name for c in train_cases],
                        out=str(folder),
                        arch=arch,
                        model_kwargs=dict(kwargs),
                        strategy=strategy,
                        dose=config.dose,
                        patch=config.patch,
                        batch=config.batch,
                        iterations=config.iterations,
                        lr=config.lr,
                        val_every=config.iterations,
                        seed=seed,
                        device=config.device,
                        name="model",
                    )
                    train(tcfg, prepared=(pairs, []), cancel=cancel)
                outputs = [_denoise_model(weights, c.uldct, config.device) for c in test_cases]
                record(f"{strategy}/{arch}", strategy, arch, seed, outputs)
                if seed == seeds[0]:
                    model_panels[(strategy, arch)] = outputs[0][z_show]
                tick(f"{strategy} / {arch} / seed {seed}")

    summary = summarize(records)
    claims = check_claims(summary, list(config.models))
    figure = Path(figure_path) if figure_path is not None else out / "results_grid.png"
    grid_figure(
        panels,
        model_panels,
        list(config.strategies),
        list(config.models),
        figure,
        spacing=test_cases[0].spacing,
        title=f"{config.name} grid, test case {test_cases[0].name}, slice {z_show}",
    )
    result = GridResult(
        config=json.loads(json.dumps(asdict(config))),
        seeds=seeds,
        records=records,
        summary=summary,
        claims=claims,
        seconds=round(time.monotonic() - began, 1),
        figure=str(figure),
    )
    write_results(result, out)
    return result


# --------------------------------------------------------------------------------------- outputs


def _fmt(stat: tuple[float, float], n_seeds: int, digits: int) -> str:
    mean, sd = stat
    if not np.isfinite(mean):
        return "–"
    return f"{mean:.{digits}f} ± {sd:.{digits}f}" if n_seeds > 1 else f"{mean:.{digits}f}"


TABLE_COLUMNS = {
    "quality": [
        ("psnr", "PSNR body+lungs", 2),
        ("ssim", "SSIM body+lungs", 3),
        ("lungs_psnr", "PSNR lungs", 2),
        ("lungs_ssim", "SSIM lungs", 3),
        ("body_psnr", "PSNR body", 2),
        ("background_psnr", "PSNR background", 2),
    ],
    "noise": [
        ("background_noise", "noise bg (HU)", 1),
        ("lungs_noise", "noise lungs (HU)", 1),
        ("body_noise", "noise body (HU)", 1),
        ("soft_tissue_bias", "bias soft tissue (HU)", 1),
        ("lungs_bias", "bias lungs (HU)", 1),
        ("nps_mean_freq", "NPS f̄ (1/mm)", 3),
        ("laa950_error", "LAA-950 error (pp)", 2),
    ],
}


def markdown_tables(result: GridResult) -> str:
    """Markdown: per reference, a quality table and a noise/texture table (mean ± SD over seeds)."""
    lines = []
    order = {"input": 0, "classical": 1, **{s: 2 + i for i, s in enumerate(GRID_STRATEGIES)}}
    rows = sorted(result.summary, key=lambda s: (order.get(s["strategy"], 99), s["strategy"], s["model"]))
    ref_text = {
        "truth": "against the noise-free truth (clean anatomy of the ULDCT)",
        "label": "against the IPv2 refined test label (paper protocol: NDCT in body and background, WD(ULDCT) in lungs)",
    }
    for reference in REFERENCES:
        sel = [s for s in rows if s["reference"] == reference]
        if not sel:
            continue
        for kind, columns in TABLE_COLUMNS.items():
            lines.append(f"**{kind.capitalize()} {ref_text[reference]}**\n")
            lines.append("| strategy | model | " + " | ".join(c[1] for c in columns) + " |")
            lines.append("|---|---|" + "---|" * len(columns))
            for s in sel:
                cells = [_fmt(s["metrics"].get(k, (math.nan, 0.0)), s["n_seeds"], d) for k, _, d in columns]
                lines.append(f"| {s['strategy']} | {s['model']} | " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def claims_markdown(result: GridResult) -> str:
    """One row per claim × reference: how many models it holds for, and the deltas."""
    lines = ["| claim | reference | holds for | Δ per model (mean; ± seed SDs) |", "|---|---|---|---|"]
    seen: dict[tuple[str, str], list[dict]] = {}
    for c in result.claims:
        seen.setdefault((c["claim"], c["reference"]), []).append(c)
    for (claim, reference), items in seen.items():
        held = sum(1 for c in items if c["holds"])
        clear = sum(1 for c in items if c["clear"])
        deltas = "; ".join(
            f"{c['model']} {c['delta']:+.2f}"
            + (f" (±{c['sd_a']:.2f}/{c['sd_b']:.2f})" if len(result.seeds) > 1 else "")
            for c in items
        )
        note = f"{held}/{len(items)}" + (f" ({clear} beyond the seed SDs)" if len(result.seeds) > 1 else "")
        lines.append(f"| {claim} | {reference} | {note} | {deltas} |")
    return "\n".join(lines)


def write_results(result: GridResult, out: Path) -> tuple[Path, Path]:
    """``out/results.json`` and ``out/results.md`` (tables + claims)."""
    js = out / "results.json"
    tmp = js.with_suffix(".partial")
    tmp.write_text(json.dumps(result.to_json(), indent=1, allow_nan=True), encoding="utf-8")
    os.replace(tmp, js)
    md = out / "results.md"
    text = (
        f"# Evaluation grid ({result.config['name']}), seeds {result.seeds}, {result.seconds:.0f} s\n\n"
        + markdown_tables(result)
        + "\n**Claims**\n\n"
        + claims_markdown(result)
        + "\n"
    )
    md.write_text(text, encoding="utf-8")
    return js, md


def grid_figure(
    panels: dict[str, np.ndarray],
    model_panels: dict[tuple[str, str], np.ndarray],
    strategies: Sequence[str],
    models: Sequence[str],
    path: str | os.PathLike,
    *,
    spacing=(1.0, 1.0, 1.0),
    title: str = "",
    window: tuple[float, float] = (-1350.0, 150.0),
) -> Path:
    """First row: references and classical outputs; then one row per strategy, one column per model."""
    ncol = max(len(models), len(panels))
    nrow = 1 + len(strategies)
    fig = Figure(figsize=(2.2 * ncol, 2.3 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    aspect = float(spacing[1]) / float(spacing[0])
    lo, hi = window
    for j, (label, img) in enumerate(panels.items()):
        axes[0, j].imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
        axes[0, j].set_title(label, fontsize=8)
    for i, strategy in enumerate(strategies, start=1):
        for j, arch in enumerate(models):
            img = model_panels.get((strategy, arch))
            if img is None:
                continue
            axes[i, j].imshow(img, cmap="gray", vmin=lo, vmax=hi, aspect=aspect)
            axes[i, j].set_title(f"{strategy} / {arch}", fontsize=8)
    fig.suptitle(f"{title} — lung window [{lo:.0f}, {hi:.0f}] HU", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
