"""``ipv2-denoise train``: train a denoiser on IPv2 (or naive / IPv1 / ablation) pairs."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import StopRequest, make_progress

NAME = "train"
HELP = "Train a denoiser on purified ULDCT/NDCT pairs (case folders with uldct.nrrd and ndct.nrrd)."


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--data",
        nargs="+",
        default=[],
        help="case folders or dataset folders of cases (required unless --noise scanner gets --anatomy)",
    )
    parser.add_argument(
        "--anatomy",
        nargs="+",
        action="extend",
        default=[],
        metavar="PATH",
        help="--noise scanner: real normal-dose CT as clean anatomy (a DICOM series folder, a volume "
        "file, or a folder of volume files; repeatable). Its own noise stays in the label; only the "
        "extra low-dose noise is inserted (docs/training.md: fine-tune on your own archive)",
    )
    parser.add_argument(
        "--real-share",
        type=float,
        default=0.5,
        help="--noise scanner with --data and --anatomy: share of noisy slabs cut from --anatomy (default 0.5)",
    )
    parser.add_argument(
        "--fine-pixel-share",
        type=float,
        default=0.0,
        help="--noise scanner: share of slabs on pixels 1.4-2.6x finer than their volume's (a small "
        "field of view, as for a neck or a head); widens the card's trained pixel sizes (default 0)",
    )
    parser.add_argument(
        "--image-texture-share",
        type=float,
        default=0.0,
        help="--noise scanner: share of slabs whose noise has random phases (same spectrum and local SD, "
        "no streaks), as iterative reconstructions give (default 0)",
    )
    parser.add_argument(
        "--dose-range",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="--noise scanner: dose fractions the slabs are drawn from, log-uniform (default 0.01 0.04:"
        " 1-4 %% of a normal dose); set your protocol's range when fine-tuning",
    )
    parser.add_argument(
        "--val-anatomy",
        nargs="*",
        default=[],
        type=Path,
        help="held-out real normal-dose CT (as --anatomy) validated each round in both noise textures, "
        "against the scan itself; the card records the starting network's figures too",
    )
    parser.add_argument(
        "--val-slices",
        type=int,
        default=8,
        help="central slices of each validation volume of --noise scanner and --val-anatomy (default 8)",
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="end this leg after so many minutes (validates, checkpoints and exports; needs --schedule "
        "constant: the decay then follows the clock). Resume a campaign with --init on the weights",
    )
    parser.add_argument(
        "--legs",
        type=int,
        default=None,
        help="run a campaign of so many legs back to back in --out, each from the previous leg's weights "
        "(a leg lasts --max-minutes and/or --iterations); running the same command again continues it "
        "after a crash or with a higher --legs (docs/training.md: a campaign in legs)",
    )
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="WEIGHTS",
        help="also validate these weights (e.g. the shipped model) on the same sets before the leg's "
        "first step; the card's validation_baseline and each campaign leg's summary give the difference",
    )
    parser.add_argument(
        "--val", nargs="*", default=[], help="held-out case folders for validation each round"
    )
    parser.add_argument("--out", required=True, help="output folder: weights, model card, curves, checkpoint")
    parser.add_argument("--name", default="model", help="file stem of the exported weights")
    parser.add_argument(
        "--arch",
        default="unet",
        help="unet (default), unet-nm (noise-aware: + a noise level map channel), unet-nmt (+ the map and "
        "the noise texture), redcnn, dncnn, or a preset size: fast (unet-nm, 16 channels, 3 levels), "
        "quality (unet-nm, 32 channels, 3 levels, 467 k parameters; --model-kwargs override it; --init with "
        "fast weights widens them), fast-texture or quality-texture (the same sizes as unet-nmt: the shipped "
        "fast and default models; --init with unet-nm weights adds the texture channel)",
    )
    parser.add_argument(
        "--model-kwargs", default=None, help="JSON constructor keywords, e.g. '{\"base_channels\": 16}'"
    )
    parser.add_argument(
        "--strategy", default="ipv2", help="ipv2 (default), ipv1, naive, or a switch combination"
    )
    parser.add_argument("--dose", type=float, default=0.02, help="dose fraction of the Add-noise simulation")
    parser.add_argument("--weak-denoiser", default=None, help="Remove-noise denoiser for the test labels")
    parser.add_argument(
        "--iterations", type=int, default=2000, help="optimiser steps in all (default: %(default)s)"
    )
    parser.add_argument("--batch", type=int, default=16, help="patches per step (default: %(default)s)")
    parser.add_argument("--patch", type=int, default=64, help="patch side in pixels (default: %(default)s)")
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="peak learning rate of Adam (default: %(default)s)"
    )
    parser.add_argument(
        "--loss",
        choices=["huber", "l1", "l2"],
        default="huber",
        help="huber (default: L1 beyond 10 HU, quadratic below; plain l1 can pin a network at the "
        "identity on IPv1/RB identity pairs), l1 or l2",
    )
    parser.add_argument(
        "--region-shares",
        type=float,
        nargs=3,
        metavar=("LUNGS", "BODY", "BACKGROUND"),
        default=None,
        help="share of patches centred in each region (default 0.45 0.4 0.15)",
    )
    parser.add_argument(
        "--val-every", type=int, default=250, help="validate every N steps (default: %(default)s)"
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="random seed: patches, noise, init (default: %(default)s)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA, MPS, CPU), cuda, mps or cpu")
    parser.add_argument(
        "--init", default=None, help="fine-tune: start from these .safetensors weights (same architecture)"
    )
    parser.add_argument(
        "--noise",
        choices=["pairs", "scanner"],
        default="pairs",
        help="pairs (default): purified ULDCT/NDCT pairs of --strategy; scanner: clean anatomy "
        "(ndct_clean/uldct_clean, else ndct) with fresh scanner-like noise every batch (random dose, "
        "kernel, bowtie, tube-current modulation, slice correlation, body size; docs/training.md)",
    )
    parser.add_argument(
        "--schedule",
        choices=["onecycle", "constant"],
        default="onecycle",
        help="onecycle (default): warm-up + cosine; constant: constant LR, cosine decay over the last "
        "--decay-fraction (shows the curve flatten before the decay)",
    )
    parser.add_argument(
        "--decay-fraction",
        type=float,
        default=0.25,
        help="constant schedule: the last share of the steps, over which the learning rate decays (cosine) (default: %(default)s)",
    )
    parser.add_argument(
        "--resample-gaps",
        action="store_true",
        help="real DICOM series given to --anatomy or --val-anatomy with missing slices or uneven spacing: "
        "interpolate them onto an even grid instead of refusing them (as denoise --resample-gaps)",
    )
    parser.add_argument(
        "--ema",
        type=float,
        default=None,
        metavar="DECAY",
        help="keep an exponential moving average of the weights (decay per step, e.g. 0.999: about the "
        "last 1,000 steps) and validate and export it instead of the last step's weights (default: off)",
    )
    parser.add_argument(
        "--noise-pool", type=int, default=24, help="scanner noise: noisy slabs kept in memory (default 24)"
    )
    parser.add_argument(
        "--noise-refresh",
        type=float,
        default=1.0,
        help="scanner noise: slabs re-simulated per iteration (default 1); a fraction makes one slab "
        "every 1/F iterations (0.25: every fourth), for a CPU leg, where a slab costs 4x a step of the "
        "fast network; give a larger --noise-pool with it",
    )
    parser.add_argument(
        "--data-workers",
        type=int,
        default=0,
        help="scanner noise: processes simulating slabs beside the training step; the pool takes "
        "whatever they made (for a GPU, whose step outruns the simulation; default 0: one slab per "
        "--noise-refresh in the training process)",
    )
    parser.add_argument("--json-progress", action="store_true", help="JSON-lines progress on stdout")


def run(args: argparse.Namespace) -> int:
    # lazy: the CLI imports every command to build --help; torch & co. load on use
    from IPv2DenoiseLib.denoiser.models import resolve_architecture
    from IPv2DenoiseLib.io.case_folder import expand_case_folders
    from IPv2DenoiseLib.training.campaign import run_campaign
    from IPv2DenoiseLib.training.trainer import TrainConfig, train

    kwargs = {}
    if args.model_kwargs:
        try:
            kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise UserError(f"--model-kwargs is not valid JSON: {exc}") from None
    arch, kwargs = resolve_architecture(args.arch, kwargs or None)
    check_arguments(args)
    config = TrainConfig(
        cases=expand_case_folders(args.data) if args.data else [],
        val_cases=expand_case_folders(args.val) if args.val else [],
        out=args.out,
        name=args.name,
        arch=arch,
        strategy=args.strategy,
        dose=args.dose,
        weak_denoiser=args.weak_denoiser,
        iterations=args.iterations,
        batch=args.batch,
        patch=args.patch,
        lr=args.lr,
        loss=args.loss,
        val_every=args.val_every,
        seed=args.seed,
        device=args.device,
        init_weights=args.init,
        noise=args.noise,
        schedule=args.schedule,
        decay_fraction=args.decay_fraction,
        noise_pool=args.noise_pool,
        noise_refresh=args.noise_refresh,
        data_workers=args.data_workers,
        anatomy=[str(p) for p in args.anatomy],
        real_share=args.real_share,
        fine_pixel_share=args.fine_pixel_share,
        image_texture_share=args.image_texture_share,
        dose_range=tuple(args.dose_range) if args.dose_range else None,
        val_anatomy=[str(p) for p in args.val_anatomy],
        val_slices=args.val_slices,
        max_minutes=args.max_minutes,
        ema=args.ema,
        resample_gaps=args.resample_gaps,
    )
    if kwargs:
        config.model_kwargs = kwargs
    if args.region_shares:
        if min(args.region_shares) < 0 or sum(args.region_shares) <= 0:
            raise UserError(
                f"--region-shares must be non-negative with a positive sum, got {args.region_shares}"
            )
        config.region_shares = tuple(args.region_shares)
    notice = lambda line: print(line, file=sys.stderr)  # noqa: E731
    stop = StopRequest()
    with stop_on_signals(stop):
        if args.legs is not None:
            card = run_campaign(
                config,
                args.legs,
                progress_for_leg=lambda leg: make_progress(
                    args.json_progress, desc=f"train leg {leg}/{args.legs}", unit="it"
                ),
                stop=stop,
                baseline=args.baseline,
                notice=notice,
            )
        else:
            card = train(
                config,
                progress=make_progress(args.json_progress, desc="train", unit="it"),
                stop=stop,
                baseline=args.baseline,
                notice=notice,
            )
    if card and stop.requested:
        print(
            f"ipv2-denoise train: stopped by {stop.reason} at iteration {card['iterations']}; "
            "the leg was validated and exported",
            file=sys.stderr,
        )
    if card:
        weights = Path(args.out) / (args.name + ".safetensors")
        if args.json_progress:  # every stdout line a JSON record, the result one of them
            print(json.dumps({"result": str(weights), "validation": card.get("validation", {})}))
        else:
            print(f"weights: {weights}")
            print(json.dumps(card.get("validation", {}), indent=2))
    return 0


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse, in one line and before any work, options no run can use."""
    if args.noise_pool < 1 or args.noise_refresh < 0:
        raise UserError("--noise-pool must be >= 1 and --noise-refresh >= 0")
    if args.baseline is not None and not Path(args.baseline).is_file():
        raise UserError(f"--baseline {args.baseline}: no such weights file")
    if args.data_workers < 0:
        raise UserError(f"--data-workers {args.data_workers}: need 0 or more")
    if not args.data and not (args.noise == "scanner" and args.anatomy):
        raise UserError("give --data (case folders), or --noise scanner with --anatomy (normal-dose CT)")


@contextlib.contextmanager
def stop_on_signals(stop: StopRequest) -> Iterator[None]:
    """``SIGTERM`` or Ctrl-C while a leg trains ends it at its next step and keeps it (validated,
    checkpointed and exported as a finished leg), so a scheduler's stop or the end of a session
    loses nothing. A second signal, or one before the first step (reading data, filling the noise
    pool: nothing learned yet), aborts at once as before; the last checkpoint stays for a resume."""
    if threading.current_thread() is not threading.main_thread():  # signals reach the main thread only
        yield
        return

    def handle(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if stop.requested or not stop.listening:
            raise KeyboardInterrupt
        stop.request(name)
        print(
            f"ipv2-denoise train: {name}: ending the leg at its next step and keeping it "
            "(validation and export take a minute; send it again to abort)",
            file=sys.stderr,
            flush=True,
        )

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
