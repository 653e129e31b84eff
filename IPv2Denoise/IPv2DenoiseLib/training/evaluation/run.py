"""The grid's loop: cases → references → classical baselines → per strategy: pairs, then one
training run per model × seed (cached weights: an interrupted run resumes) → scores → results."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from IPv2DenoiseLib.core.atomic import atomic_path, make_output_folder
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback, Steps
from IPv2DenoiseLib.denoiser.infer import Denoiser
from IPv2DenoiseLib.denoiser.weights import card_path
from IPv2DenoiseLib.imaging.classical import available_methods, denoise_classical
from IPv2DenoiseLib.imaging.masks import evaluation_rois
from IPv2DenoiseLib.purification.pairs import Strategy
from IPv2DenoiseLib.training.evaluation.cases import EvaluationCase, dataset_cases, synthetic_cases
from IPv2DenoiseLib.training.evaluation.config import REFERENCES, EvalConfig
from IPv2DenoiseLib.training.evaluation.figure import grid_figure
from IPv2DenoiseLib.training.evaluation.mismatch import noise_mismatch
from IPv2DenoiseLib.training.evaluation.pairs import ipv2_test_label, purified_training_cases
from IPv2DenoiseLib.training.evaluation.report import GridResult, write_results
from IPv2DenoiseLib.training.evaluation.scoring import check_claims, score, summarize, training_check
from IPv2DenoiseLib.training.trainer import CasePairs, TrainConfig, train


def _check(config: EvalConfig) -> None:
    """Fail before any work on an unavailable classical method or an unknown strategy."""
    for m in config.classical:
        if m not in available_methods():
            raise UserError(f"classical method {m!r} is not available; use {', '.join(available_methods())}")
    for s in config.strategies:
        Strategy.from_name(s)


#: Config fields that decide the cached cases and pairs under OUT.
_CASE_FIELDS = ("shape", "spacing", "dose", "noise", "scanner", "n_train", "n_test", "motion_mm")


def _claim_output_folder(out: Path, config: EvalConfig, data) -> None:
    """Stamp OUT with what its caches were made from; refuse an OUT made from something else."""
    stamp = {k: getattr(config, k) for k in _CASE_FIELDS} | {"data": str(data) if data else None}
    stamp = json.loads(json.dumps(stamp))
    path = out / "grid_cases.json"
    if path.exists():
        saved = json.loads(path.read_text(encoding="utf-8"))
        if saved != stamp:
            changed = ", ".join(k for k in stamp if saved.get(k) != stamp[k])
            raise UserError(
                f"--out {out}: its cached cases were made with another {changed}; use another --out"
            )
        return
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(stamp, indent=1), encoding="utf-8")


def _denoise_model(weights: Path, hu: np.ndarray, device: str) -> np.ndarray:
    # raw network output: background suppression must come from training, not from the mask step
    return Denoiser.from_file(weights).denoise_array(hu, remove_background=False, device=device)


def _train_model(
    folder: Path,
    train_cases: Sequence[EvaluationCase],
    pairs: Sequence[CasePairs],
    *,
    arch: str,
    kwargs: dict,
    strategy: str,
    seed: int,
    config: EvalConfig,
    cancel: CancelToken | None,
    progress: ProgressCallback | None = None,
) -> Path:
    """The weights of one strategy × model × seed, trained unless they exist already (their model
    card, written after the weights, says so: weights without it are a run killed while exporting)."""
    weights = folder / "model.safetensors"
    if not card_path(weights).is_file():
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
            loss=config.loss,
            val_every=max(1, config.iterations // max(1, config.loss_rounds)),
            seed=seed,
            device=config.device,
            name="model",
        )
        train(tcfg, prepared=(pairs, []), cancel=cancel, progress=progress)
    return weights


def _round_losses(weights: Path) -> list[float]:
    """The mean training loss per round, from the model card next to ``weights``."""
    card = json.loads(card_path(weights).read_text(encoding="utf-8"))
    return [float(v) for v in card.get("history", {}).get("loss", [])]


@dataclass
class _Scoreboard:
    """Scores every method's outputs on the test cases against each available reference."""

    test_cases: Sequence[EvaluationCase]
    refs: list[dict]
    records: list[dict] = field(default_factory=list)

    def record(self, method: str, strategy: str, model: str, seed: int, outputs: list[np.ndarray]) -> None:
        for case, ref, output in zip(self.test_cases, self.refs, outputs):
            for reference in REFERENCES:
                if ref[reference] is None:
                    continue
                self.records.append(
                    {
                        "method": method,
                        "strategy": strategy,
                        "model": model,
                        "seed": seed,
                        "case": case.name,
                        "reference": reference,
                        "metrics": score(output, ref[reference], ref["masks"], case.spacing),
                    }
                )


def _references(test_cases: Sequence[EvaluationCase], config: EvalConfig) -> list[dict]:
    """Per test case: the truth (when known), the IPv2 test label and the evaluation ROIs."""
    refs = []
    for case in test_cases:
        masks = evaluation_rois(case.truth if case.truth is not None else case.ndct)
        refs.append({"truth": case.truth, "label": ipv2_test_label(case, config), "masks": masks})
    return refs


def _figure_slice(config: EvalConfig, case: EvaluationCase) -> int:
    depth = case.uldct.shape[0]
    z = config.figure_slice if config.figure_slice is not None else depth // 2
    return int(np.clip(z, 0, depth - 1))


def _reference_panels(case: EvaluationCase, label: np.ndarray, z: int) -> dict[str, np.ndarray]:
    panels = {"ULDCT input": case.uldct[z], "NDCT (misaligned)": case.ndct[z], "IPv2 test label": label[z]}
    if case.truth is not None:
        panels["truth"] = case.truth[z]
    return panels


def run_grid(
    config: EvalConfig,
    out: str | os.PathLike,
    *,
    seeds: Sequence[int] = (0,),
    data: str | os.PathLike | None = None,
    figure_path: str | os.PathLike | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    log: Callable[[str], None] | None = None,
) -> GridResult:
    """Train and evaluate every strategy × model × seed, plus the classical baselines.

    Parameters
    ----------
    config : EvalConfig
        Sizes; see :func:`~IPv2DenoiseLib.training.evaluation.config.preset`.
    out : path
        Output folder: ``cases/``, ``pairs/``, ``models/`` caches (a rerun resumes), and
        ``results.json`` / ``results.md``.
    seeds : sequence of int
        Training seeds (network initialisation and patch sampling); the cases and purified pairs
        are the same for every seed, so the spread is that of training.
    data : path, optional
        Dataset folder instead of synthetic cases (see
        :func:`~IPv2DenoiseLib.training.evaluation.cases.dataset_cases`).
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
    out = make_output_folder(out, what="--out")  # a file there is refused in one line
    say = log or (lambda line: None)
    seeds = [int(s) for s in seeds] or [0]
    _check(config)
    _claim_output_folder(out, config, data)
    steps = Steps(
        3 + len(config.classical) + len(config.strategies) * (1 + len(config.models) * len(seeds)),
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

    board = _Scoreboard(test_cases, _references(test_cases, config))
    tick("IPv2 test labels")
    z_show = _figure_slice(config, test_cases[0])
    panels = _reference_panels(test_cases[0], board.refs[0]["label"], z_show)

    for seed in seeds:
        board.record("input", "input", "-", seed, [c.uldct for c in test_cases])
    for name in config.classical:
        outputs = [denoise_classical(c.uldct, name, spacing=c.spacing) for c in test_cases]
        for seed in seeds:
            board.record(f"classical/{name}", "classical", name, seed, outputs)
        panels[name.upper() if name != "curvature" else "curvature AD"] = outputs[0][z_show]
        tick(f"classical {name}")

    mismatch = noise_mismatch(test_cases, config)
    tick(f"noise of the {config.noise} ULDCT vs Sim(N)")
    model_panels: dict[tuple[str, str], np.ndarray] = {}
    checks: list[dict] = []
    for strategy in config.strategies:
        pairs = purified_training_cases(train_cases, strategy, config, out / "pairs")
        tick(f"pairs {strategy}")
        for arch, kwargs in config.models.items():
            for seed in seeds:
                folder = out / "models" / strategy.replace("+", "_") / arch / f"seed{seed}"
                weights = _train_model(
                    folder,
                    train_cases,
                    pairs,
                    arch=arch,
                    kwargs=kwargs,
                    strategy=strategy,
                    seed=seed,
                    config=config,
                    cancel=cancel,
                    progress=steps.within(f"training {strategy} / {arch} / seed {seed}"),
                )
                outputs = [_denoise_model(weights, c.uldct, config.device) for c in test_cases]
                board.record(f"{strategy}/{arch}", strategy, arch, seed, outputs)
                check = training_check(
                    _round_losses(weights), outputs[0], test_cases[0].uldct, board.refs[0]["masks"]["body"]
                )
                checks.append({"strategy": strategy, "model": arch, "seed": seed, **check})
                if seed == seeds[0]:
                    model_panels[(strategy, arch)] = outputs[0][z_show]
                flag = "" if check["trained"] else " (DID NOT TRAIN)"
                tick(f"{strategy} / {arch} / seed {seed}{flag}")

    summary = summarize(board.records)
    untrained = [(c["strategy"], c["model"], c["seed"]) for c in checks if not c["trained"]]
    for row in summary:
        row["untrained_seeds"] = [sd for st, m, sd in untrained if (st, m) == (row["strategy"], row["model"])]
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
        records=board.records,
        summary=summary,
        claims=check_claims(summary, list(config.models), untrained=untrained),
        seconds=round(time.monotonic() - began, 1),
        figure=str(figure),
        training=checks,
        mismatch=mismatch,
    )
    write_results(result, out)
    return result
