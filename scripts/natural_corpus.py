"""scikit-image's shipped photographs as CT-like volumes, for ``train --anatomy`` (texture probe).

Issue #24 asked whether natural-image texture helps the denoisers. This writes two volumes of
20 slices of 384² each at 0.7 × 0.7 × 3 mm: ``natural_textures.nrrd`` (brick, grass, gravel, the
moon, the Hubble deep field) and ``natural_scenes.nrrd`` (astronaut, camera man, coffee, cat,
rocket). Each photograph becomes four neighbouring slices (the picture moved by one pixel per
slice, so the 2.5D networks see continuity along z), its grey levels stretched between its 1st and
99th percentile to −700 … +400 HU (lung-like dark to bone-like bright). The photographs ship inside
scikit-image (nothing is downloaded). Measured: docs/training.md, "Natural-image texture".

Usage::

    python scripts/natural_corpus.py runs/natural
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from skimage import color, data, transform

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.volumes import write_volume

#: Volume name → the scikit-image photographs (``skimage.data`` functions) it holds.
SETS = {
    "natural_textures": ("brick", "grass", "gravel", "moon", "hubble_deep_field"),
    "natural_scenes": ("astronaut", "camera", "coffee", "chelsea", "rocket"),
}
SIDE = 384
SLICES_PER_IMAGE = 4
SPACING_MM = (0.7, 0.7, 3.0)
HU_RANGE = (-700.0, 400.0)


def photograph_slices(name: str) -> np.ndarray:
    """``SLICES_PER_IMAGE`` neighbouring slices ``[k, SIDE, SIDE]`` in HU from one photograph."""
    image = getattr(data, name)()
    grey = color.rgb2gray(image) if image.ndim == 3 else image / float(np.iinfo(image.dtype).max)
    short = min(grey.shape[:2])
    grey = transform.resize(grey[:short, :short], (SIDE + SLICES_PER_IMAGE,) * 2, anti_aliasing=True)
    lo, hi = np.percentile(grey, [1, 99])
    unit = np.clip((grey - lo) / max(hi - lo, 1e-6), 0.0, 1.0)
    hu = HU_RANGE[0] + (HU_RANGE[1] - HU_RANGE[0]) * unit
    return np.stack([hu[s : s + SIDE, s : s + SIDE] for s in range(SLICES_PER_IMAGE)]).astype(np.float32)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", help="folder for the two volumes; they must not exist yet")
    args = parser.parse_args(argv)
    out = Path(args.out)
    try:
        if out.exists() and not out.is_dir():
            raise UserError(f"{out} is not a folder")
        targets = {name: out / f"{name}.nrrd" for name in SETS}
        for path in targets.values():
            if path.exists():
                raise UserError(f"{path} exists; choose another folder")
        out.mkdir(parents=True, exist_ok=True)
        for name, images in SETS.items():
            volume = Volume(np.concatenate([photograph_slices(i) for i in images]), SPACING_MM)
            write_volume(volume, targets[name])
            print(f"{targets[name]}: {volume.shape} voxels at {volume.spacing} mm")
    except UserError as exc:
        print(f"natural_corpus: error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
