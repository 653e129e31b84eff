"""Training speed of a scanner-noise leg: iterations per second at one new noisy slab per step
(the baseline, ``--noise-refresh 1``) against one every 1/F steps, measured in the same run.

On a CPU a slab (3 slices through the projector, noise and back) costs several steps of the
``fast`` network, so a leg's pace is set by how often it makes one (docs/training.md, "What
varies"). This times the trainer's own step (``Trainer.step`` on ``sampler.batch``) after the pool
is built, on the shared real abdomen series when it is beside the checkout (512² slices, as the
legs train on), else on the bundled sample NDCT.

    python benchmarks/bench_train_step.py --arch fast-texture --refresh 0.25 --iterations 24 --threads 1
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "IPv2Denoise"))

#: The real normal-dose corpus beside the checkout (../shared/data/real-ct/README.md).
ABDOMEN = ROOT.parent / "shared" / "data" / "real-ct" / "abdomen-series"
SAMPLE = ROOT / "Resources" / "SampleData" / "sample_ndct.nrrd"


def time_refresh(volumes, *, arch: str, refresh: float, pool: int, iterations: int, batch: int) -> dict:
    """Seconds per iteration (slab making included, pool building not) of one trainer setting."""
    import torch

    from IPv2DenoiseLib.denoiser.models import resolve_architecture
    from IPv2DenoiseLib.training.trainer import TrainConfig, Trainer

    name, kwargs = resolve_architecture(arch, None)
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            cases=[],
            out=out,
            arch=name,
            noise="scanner",
            schedule="constant",
            batch=batch,
            patch=64,
            iterations=iterations,
            device="cpu",
            noise_pool=pool,
            noise_refresh=refresh,
            seed=1,
        )
        config.model_kwargs = kwargs
        torch.manual_seed(1)
        trainer = Trainer(config, volumes, [], device=torch.device("cpu"))
        made = trainer.sampler.slabs_made
        began = time.perf_counter()
        for it in range(iterations):
            trainer.step(*trainer.sampler.batch(batch), it=it)
        seconds = time.perf_counter() - began
    return {
        "refresh": refresh,
        "iterations": iterations,
        "seconds": round(seconds, 2),
        "iterations_per_s": round(iterations / seconds, 3),
        "slabs_made": trainer.sampler.slabs_made - made,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="fast-texture", help="the network (a preset of train --arch)")
    parser.add_argument("--refresh", type=float, default=0.25, help="the fraction against 1 (default 0.25)")
    parser.add_argument("--iterations", type=int, default=24, help="timed steps per setting (default 24)")
    parser.add_argument("--pool", type=int, default=8, help="slabs in the pool (default 8)")
    parser.add_argument("--batch", type=int, default=32, help="patches of 64² per step (default 32)")
    parser.add_argument("--threads", type=int, default=1, help="CPU threads (default 1: a leg's)")
    parser.add_argument("--json", type=Path, default=None, help="write the figures here too")
    args = parser.parse_args(argv)
    if args.iterations < 4 or not 0 < args.refresh <= 1 or args.pool < 1:
        parser.error("need --iterations >= 4, 0 < --refresh <= 1 and --pool >= 1")
    import torch

    from IPv2DenoiseLib.training.scanner_data import load_anatomy_volumes

    source = ABDOMEN if ABDOMEN.is_dir() else SAMPLE
    volumes = load_anatomy_volumes([source])
    threads, omp = torch.get_num_threads(), os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = str(args.threads)  # a leg's threads; restored for a caller (tests)
    torch.set_num_threads(args.threads)
    try:
        runs = [
            time_refresh(
                volumes,
                arch=args.arch,
                refresh=r,
                pool=args.pool,
                iterations=args.iterations,
                batch=args.batch,
            )
            for r in (1.0, args.refresh)
        ]
    finally:
        torch.set_num_threads(threads)
        if omp is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = omp
    base, cheap = runs
    ratio = cheap["iterations_per_s"] / base["iterations_per_s"]
    print(f"volume: {source.name} ({volumes[0].hu.shape[-1]}² slices); {args.arch}; {args.threads} thread(s)")
    for run in runs:
        print(
            f"--noise-refresh {run['refresh']:g}: {run['iterations_per_s']:.3f} it/s "
            f"({run['iterations']} steps in {run['seconds']} s, {run['slabs_made']} slabs made)"
        )
    print(f"ratio: {ratio:.2f}x the baseline's iterations per second (--noise-refresh 1, same run)")
    if args.json:
        args.json.write_text(
            json.dumps({"source": source.name, "arch": args.arch, "runs": runs, "ratio": ratio})
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
