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

One job per module: :mod:`.config` (sizes and presets), :mod:`.cases` (synthetic or dataset
cases, cached), :mod:`.pairs` (purified training pairs and the IPv2 test label, cached),
:mod:`.scoring` (per-region metrics, summary over seeds, the paper's claims), :mod:`.report`
(results JSON and Markdown), :mod:`.figure` (the figure grid) and :mod:`.run` (the loop).
"""

from IPv2DenoiseLib.training.evaluation.cases import (
    EvaluationCase,
    dataset_cases,
    make_case,
    scan_uldct,
    synthetic_cases,
)
from IPv2DenoiseLib.training.evaluation.config import (
    GRID_STRATEGIES,
    NOISE_CONDITIONS,
    REFERENCES,
    REGIONS,
    SCANNER_PROTOCOL,
    EvalConfig,
    preset,
)
from IPv2DenoiseLib.training.evaluation.figure import grid_figure
from IPv2DenoiseLib.training.evaluation.mismatch import noise_mismatch, noise_profile
from IPv2DenoiseLib.training.evaluation.pairs import ipv2_test_label, purified_training_cases
from IPv2DenoiseLib.training.evaluation.report import (
    TABLE_COLUMNS,
    GridResult,
    claims_markdown,
    markdown_tables,
    mismatch_markdown,
    training_markdown,
    write_results,
)
from IPv2DenoiseLib.training.evaluation.run import run_grid
from IPv2DenoiseLib.training.evaluation.scoring import (
    CANNOT_TELL,
    CLAIMS,
    DOES_NOT_HOLD,
    HOLDS,
    METRIC_REGIONS,
    check_claims,
    overall_verdict,
    score,
    summarize,
    training_check,
    verdict,
)

__all__ = [
    "CANNOT_TELL",
    "CLAIMS",
    "DOES_NOT_HOLD",
    "HOLDS",
    "METRIC_REGIONS",
    "NOISE_CONDITIONS",
    "SCANNER_PROTOCOL",
    "mismatch_markdown",
    "noise_mismatch",
    "noise_profile",
    "overall_verdict",
    "training_check",
    "training_markdown",
    "verdict",
    "GRID_STRATEGIES",
    "REFERENCES",
    "REGIONS",
    "TABLE_COLUMNS",
    "EvaluationCase",
    "EvalConfig",
    "GridResult",
    "check_claims",
    "claims_markdown",
    "dataset_cases",
    "grid_figure",
    "ipv2_test_label",
    "make_case",
    "scan_uldct",
    "markdown_tables",
    "preset",
    "purified_training_cases",
    "run_grid",
    "score",
    "summarize",
    "synthetic_cases",
    "write_results",
]
