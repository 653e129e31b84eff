"""Make the bundled sample case in Resources/SampleData (run once; the result is committed).

    python scripts/make_sample_data.py [--seed 2026] [--slices 24]

One synthetic case at real size (512 x 512 at 0.7 mm, 1.25 mm slices) from
``IPv2DenoiseLib.synthetic.dataset.make_case``, cropped in-plane to the body with a margin of outside air
(so Remove Background still has air connected to the border), written as gzip NRRD int16 HU with
thumbnails, SHA256SUMS and a README.
"""

from __future__ import annotations

import argparse
import hashlib
import tempfile
from pathlib import Path

import numpy as np

from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.volumes import read_volume, write_volume
from IPv2DenoiseLib.synthetic.dataset import CaseSpec, make_case
from IPv2DenoiseLib.synthetic.phantom import LABELS

OUT = Path(__file__).resolve().parents[1] / "Resources" / "SampleData"
MARGIN_PX = 16


def thumbnail(hu: np.ndarray, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1.28, 1.28), dpi=100)
    ax = fig.add_axes((0, 0, 1, 1))
    ax.imshow(hu[hu.shape[0] // 2], cmap="gray", vmin=-1350, vmax=150, aspect="equal")
    ax.axis("off")
    fig.savefig(path)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--slices", type=int, default=24)
    args = parser.parse_args()
    spec = CaseSpec.draw(args.seed, slices=args.slices, z_center_mm=-60.0)
    with tempfile.TemporaryDirectory() as tmp:
        record = make_case(spec, Path(tmp) / "case", device="cpu")
        case = Path(tmp) / "case"
        labels = np.maximum(
            read_volume(case / "labels_ndct.nrrd", force=True).array,
            read_volume(case / "labels_uldct.nrrd", force=True).array,
        )
        body = ~np.isin(labels, [LABELS["air"], LABELS["table"], LABELS["pad"]])
        ys, xs = np.nonzero(body.any(axis=0))
        y0, y1 = max(0, ys.min() - MARGIN_PX), min(body.shape[1], ys.max() + 1 + MARGIN_PX)
        x0, x1 = max(0, xs.min() - MARGIN_PX), min(body.shape[2], xs.max() + 1 + MARGIN_PX)
        OUT.mkdir(parents=True, exist_ok=True)
        sums = []
        for name in ("uldct", "ndct"):
            volume = read_volume(case / f"{name}.nrrd")
            sx, sy, _ = volume.spacing
            origin = (volume.origin[0] + x0 * sx, volume.origin[1] + y0 * sy, volume.origin[2])
            cropped = Volume(
                np.ascontiguousarray(volume.array[:, y0:y1, x0:x1]),
                volume.spacing,
                origin,
                volume.direction,
                {},
            )
            path = write_volume(cropped, OUT / f"sample_{name}.nrrd", dtype=np.int16)
            thumbnail(cropped.array, OUT / f"sample_{name}.png")
            sums.append(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}")
            print(f"{path.name}: {cropped.shape} {path.stat().st_size / 1e6:.2f} MB")
    (OUT / "SHA256SUMS").write_text("\n".join(sums) + "\n")
    print(f"motion: {record['motion_mm']}, crop y {y0}:{y1} x {x0}:{x1}")


if __name__ == "__main__":
    main()
