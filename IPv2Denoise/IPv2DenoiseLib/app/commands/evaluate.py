"""``ipv2-denoise evaluate``: the strategy × model grid with classical baselines (issue #8)."""

from __future__ import annotations

import argparse
from dataclasses import replace

from IPv2DenoiseLib.app.arguments import add_device_argument
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import TqdmProgress, make_progress

NAME = "evaluate"
HELP = "Train and score naive/sim/IPv1/IPv2/ablations x denoisers plus classical baselines, under matched or mismatched noise."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--out", required=True, help="output folder (caches, results.json, results.md, figure)"
    )
    parser.add_argument(
        "--config",
        default="reduced",
        choices=["reduced", "full"],
        help="reduced: 512² px of 0.7 mm at the true 2 %% dose, two small models, about half an hour "
        "per noise condition on one CPU core; full: the paper models at their sizes, for a GPU",
    )
    parser.add_argument(
        "--noise",
        default="mismatched",
        choices=["matched", "mismatched"],
        help="how the synthetic 'real' ULDCT is made: mismatched (a scanner: other kernel, bowtie, TCM, "
        "slice-correlated noise; default) or matched (the product's own simulator, the control)",
    )
    parser.add_argument(
        "--data", default=None, help="dataset folder of case folders instead of synthetic cases"
    )
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="training seeds (spread = mean ± SD)"
    )
    parser.add_argument(
        "--strategies",
        nargs="+",
        default=None,
        help="subset of naive sim ipv1 ipv1+tb rb an ipv2 (any strategy name)",
    )
    parser.add_argument("--models", nargs="+", default=None, help="subset of redcnn dncnn unet")
    parser.add_argument("--iterations", type=int, default=None, help="override the training iterations")
    parser.add_argument("--figure", default=None, help="figure grid path (default OUT/results_grid.png)")
    add_device_argument(parser)
    parser.add_argument("--json-progress", action="store_true", help="JSON-lines progress on stdout")


def run(args: argparse.Namespace) -> int:
    # lazy: the CLI imports every command to build --help; torch & co. load on use
    from IPv2DenoiseLib.training.evaluation import (
        claims_markdown,
        markdown_tables,
        mismatch_markdown,
        preset,
        run_grid,
        training_markdown,
    )

    config = preset(args.config, noise=args.noise)
    if args.strategies:
        config = replace(config, strategies=tuple(args.strategies))
    if args.models:
        unknown = [m for m in args.models if m not in config.models]
        if unknown:
            raise UserError(f"--models: unknown {', '.join(unknown)}; use {', '.join(config.models)}")
        config = replace(config, models={m: config.models[m] for m in args.models})
    if args.iterations is not None:
        if args.iterations < 40:
            raise UserError(f"--iterations: got {args.iterations}; use at least 40")
        config = replace(config, iterations=args.iterations)
    if args.device:
        config = replace(config, device=args.device)
    progress = make_progress(args.json_progress, desc="evaluate", unit="job")
    # the step log goes above a terminal's bar; plain lines (a pipe) already say each step once
    log = progress.write if isinstance(progress, TqdmProgress) else None
    try:
        result = run_grid(
            config,
            args.out,
            seeds=args.seeds,
            data=args.data,
            figure_path=args.figure,
            progress=progress,
            log=log,
        )
    finally:
        progress.close()
    if not args.json_progress:
        print(mismatch_markdown(result))
        print(markdown_tables(result))
        print(training_markdown(result))
        print(claims_markdown(result))
        print(
            f"\nwrote {args.out}/results.json, {args.out}/results.md and {result.figure} in {result.seconds:.0f} s"
        )
    return 0
