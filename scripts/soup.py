"""Average the weights of networks fine-tuned from one start (a uniform "model soup").

    python scripts/soup.py OUT.safetensors Resources/Models/unet_nm_quality_ipv2.safetensors \
        campaign/unet_nm_quality_ipv2_leg11_texture.safetensors [--name NAME] \
        [--val runs/phantoms/case_004 ... --val-anatomy runs/corpus/heldout_chest_totalsegmentator.nrrd ...]

Legs trained from the same weights stay in one basin of the loss, and the mean of their weights
is often better than each (Wortsman et al. 2022, "Model soups"); it runs at the cost of one
network. Every input must have the first one's architecture and configuration. The first input's
card is the soup's, with ``soup_of`` (each input's file name and sha256) and one more entry in
``legs``: no iterations, the inputs, and as its training data every volume any input's legs
trained on, so that ``train`` still names a held-out volume one of them saw; with ``--val`` /
``--val-anatomy`` that entry and the card hold the soup's validation under the keys a training
leg writes. Choose a soup as a leg is chosen: ``scripts/validate_legs.py`` and
``benchmarks/bench_fine_pixels.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.models import NoiseAwareUNet, TextureAwareUNet
from IPv2DenoiseLib.denoiser.weights import load_model, save_model
from IPv2DenoiseLib.training.scanner_data import load_anatomy_volumes
from IPv2DenoiseLib.training.trainer import (
    anatomy_validation,
    leg_training_volumes,
    scanner_validation,
    validation_record,
)


def soup(
    paths: list[Path],
    out: Path,
    *,
    name: str | None = None,
    val: list[str] = (),
    val_anatomy: list[str] = (),
    val_slices: int = 8,
) -> dict:
    """Write the uniform average of the weights in ``paths`` to ``out``; its card (validated on
    ``val`` phantom cases and ``val_anatomy`` real volumes, as a training leg is)."""
    if len(paths) < 2:
        raise UserError("a soup needs at least two weights files")
    loaded = [load_model(path) for path in paths]
    if any(model.ARCH == TextureAwareUNet.ARCH for model, _ in loaded):
        # a noise-aware ingredient joins texture-aware ones with its texture channel at zero weight
        loaded = [
            (TextureAwareUNet.from_noise_aware(model) if model.ARCH == NoiseAwareUNet.ARCH else model, card)
            for model, card in loaded
        ]
    base, card = loaded[0]
    for path, (model, _) in zip(paths[1:], loaded[1:]):
        if model.ARCH != base.ARCH or model.config != base.config:
            raise UserError(
                f"{path} is {model.ARCH} {model.config}, not {base.ARCH} {base.config} like {paths[0]}"
            )
    states = [model.state_dict() for model, _ in loaded]
    base.load_state_dict(
        {
            key: (sum(state[key].double() for state in states) / len(states)).to(value.dtype)
            for key, value in states[0].items()
        }
    )
    own, scanner = scanner_validation(list(val), slices=val_slices) if val else ([], [])
    held_out = load_anatomy_volumes(list(val_anatomy), option="--val-anatomy") if val_anatomy else []
    real = anatomy_validation(held_out, slices=val_slices) if held_out else {}
    validation = validation_record(
        base, torch.device("cpu"), val_cases=own, scanner_val=scanner, real_val=real
    )
    ingredients = [{"file": path.name, "sha256": c["sha256"]} for path, (_, c) in zip(paths, loaded)]
    trained = sorted(
        set().union(*(leg_training_volumes(leg) for _, c in loaded for leg in c.get("legs") or []))
    )
    legs = list(card.get("legs") or [])
    legs.append(
        {
            "leg": len(legs) + 1,
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "soup_of": ingredients,
            "iterations": [0, 0],
            "wall_seconds": 0.0,
            "data": {"training": trained, "validation_real": [volume.name for volume in held_out]},
            "validation": validation,
        }
    )
    new_card = {
        key: value for key, value in card.items() if key not in ("sha256", "weights", "validation", "history")
    }
    new_card |= {
        "name": name or out.stem,
        "soup_of": ingredients,
        "legs": legs,
        "initialised_from": paths[0].name,
        "validation": validation,
    }
    return save_model(base, out, new_card)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="the soup's .safetensors (its card is written beside it)")
    parser.add_argument("weights", nargs="+", type=Path, help="two or more .safetensors of one architecture")
    parser.add_argument("--name", help="the card's name (default: the output file's stem)")
    parser.add_argument("--val", nargs="*", default=[], help="synthetic validation case folders")
    parser.add_argument("--val-anatomy", nargs="*", default=[], help="held-out real normal-dose volumes")
    parser.add_argument("--val-slices", type=int, default=8, help="central slices per volume (default 8)")
    args = parser.parse_args(argv)
    try:
        if args.out.resolve() in {path.resolve() for path in args.weights}:
            raise UserError(f"{args.out} is one of the inputs")
        card = soup(
            args.weights,
            args.out,
            name=args.name,
            val=args.val,
            val_anatomy=args.val_anatomy,
            val_slices=args.val_slices,
        )
    except UserError as exc:
        print(f"soup: {exc}", file=sys.stderr)
        return 2
    print(f"{args.out}: the mean of {len(args.weights)} networks, sha256 {card['sha256'][:12]}…")
    return 0


if __name__ == "__main__":
    sys.exit(main())
