"""Remove Background must never change tissue: count the tissue voxels it changes, ours vs the baseline.

One command::

    OMP_NUM_THREADS=2 python benchmarks/bench_background.py

The baseline is the removal of main at e139d9c, measured in the same run: every voxel below
−500 HU connected to the image border (per slice) set to −1000 HU. Ours is
``IPv2DenoiseLib.imaging.masks.background_weight`` (a voxel changes where the weight is > 0).
"Tissue" comes from the input: voxels above −900 HU on the real scans, voxels whose noise-free
value is above −900 HU on the phantom (its 2 %-dose scan is what the masks see). Also printed:
the share of outside air farther than 6 mm from tissue that ours sets fully to air (the removal
still does its job), and the time of both rules. Cases: pydicom's CT_small.dcm (a cropped chest, lungs at the edge), the CT
slices of the ``pydicom-data`` package, and a 256² chest phantom at 1.4 mm with arms and table,
whole and cropped so that body and lungs touch the image edge. Writes
``benchmarks/results/bench_background.md``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "IPv2Denoise"))

from pydicom.data import get_testdata_file  # noqa: E402

from IPv2DenoiseLib.imaging.masks import background_weight, border_connected  # noqa: E402
from IPv2DenoiseLib.io.volumes import read_volume  # noqa: E402
from IPv2DenoiseLib.physics.lowdose import simulate_low_dose  # noqa: E402
from IPv2DenoiseLib.synthetic.phantom import LABELS, make_chest_phantom  # noqa: E402

LUNG = [LABELS[k] for k in ("airway", "lung", "lung_vessel", "nodule_solid", "nodule_ggo", "emphysema")]
CROPS = {
    "phantom 2 %, whole (arms, table at the edge)": np.s_[:, :, :],
    "phantom 2 %, lungs cut left and right": np.s_[:, 30:230, 75:185],
    "phantom 2 %, lungs cut at the front": np.s_[:, 85:230, 40:220],
    "phantom 2 %, one lung in the corner": np.s_[:, 80:160, 70:130],
}


def baseline_changed(hu: np.ndarray) -> np.ndarray:
    """main e139d9c: background_mask = border_connected(hu < -500), set to -1000."""
    return border_connected(hu < -500.0)


def row(name, hu, tissue, spacing, lungs=None, air=None) -> dict:
    start = time.perf_counter()
    ours = background_weight(hu, spacing=spacing)
    seconds = time.perf_counter() - start
    start = time.perf_counter()
    base = baseline_changed(hu)
    base_seconds = time.perf_counter() - start
    air = ~tissue if air is None else air
    far = air & (ndi.distance_transform_edt(air, sampling=(1e6, spacing[1], spacing[0])) > 6.0)
    return {
        "case": name,
        "tissue voxels": int(tissue.sum()),
        "baseline: tissue changed": int((base & tissue).sum()),
        "ours: tissue changed": int(((ours > 0) & tissue).sum()),
        "baseline: lung changed": "" if lungs is None else int((base & lungs).sum()),
        "ours: lung changed": "" if lungs is None else int(((ours > 0) & lungs).sum()),
        "ours: far air removed": f"{(ours[far] == 1).mean():.1%}" if far.any() else "no outside air",
        "ours: s": round(seconds, 3),
        "baseline: s": round(base_seconds, 3),
    }


def main() -> int:
    rows = []
    for name in ("CT_small.dcm", "693_UNCI.dcm", "693_UNCR.dcm", "explicit_VR-UN.dcm", "bad_sequence.dcm"):
        volume = read_volume(get_testdata_file(name))
        rows.append(row(f"real CT {name}", volume.array, volume.array > -900.0, volume.spacing))
    spacing = (1.4, 1.4, 2.5)
    phantom = make_chest_phantom(shape=(4, 256, 256), spacing=spacing, arms=True, table=True, seed=3)
    noisy = simulate_low_dose(phantom.hu, dose=0.02, spacing_mm=spacing[0], seed=1)
    for name, window in CROPS.items():
        hu = np.ascontiguousarray(noisy[window], dtype=np.float32)
        labels = phantom.labels[window]
        rows.append(
            row(
                name,
                hu,
                phantom.hu[window] > -900.0,
                spacing,
                lungs=np.isin(labels, LUNG),
                air=labels == LABELS["air"],
            )
        )
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(r[h]) for h in header) + " |" for r in rows]
    total_base = sum(r["baseline: tissue changed"] for r in rows)
    total_ours = sum(r["ours: tissue changed"] for r in rows)
    summary = (
        f"tissue voxels changed by Remove Background: ours {total_ours}, baseline (main e139d9c) "
        f"{total_base}; ratio {total_ours / max(total_base, 1):.4f} (goal: 0)"
    )
    ours_s = sum(r["ours: s"] for r in rows)
    base_s = sum(r["baseline: s"] for r in rows)
    summary += f"\ntime: ours {ours_s:.2f} s, baseline {base_s:.2f} s; ratio {ours_s / max(base_s, 1e-9):.1f}"
    text = "\n".join(lines) + "\n\n" + summary + "\n"
    print(text)
    out = Path(__file__).resolve().parent / "results" / "bench_background.md"
    out.write_text("# bench_background\n\n`python benchmarks/bench_background.py`\n\n" + text)
    return 0 if total_ours == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
