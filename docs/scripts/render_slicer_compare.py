"""Render docs/figures/slicer_compare.png: a mock of the IPv2 Denoise panel + the side-by-side views.

Offscreen (matplotlib, no Slicer). Left view: a 256x256 slice of the project's chest phantom with
2 %-dose-like noise (white noise of 90 HU, lightly correlated); right view: what the module shows
after denoising. Until trained weights ship in Resources/Models, the right view uses scikit-image's
non-local means as a stand-in, and the figure says so. Run: ``python docs/scripts/render_slicer_compare.py``.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import FancyBboxPatch  # noqa: E402
from scipy.ndimage import gaussian_filter  # noqa: E402
from skimage.restoration import denoise_nl_means  # noqa: E402

from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "figures" / "slicer_compare.png"


def main() -> None:
    ph = make_chest_phantom(shape=(1, 256, 256), spacing=(1.4, 1.4, 1.25), seed=3)
    clean = ph.hu[0]
    rng = np.random.default_rng(0)
    noise = gaussian_filter(rng.normal(0, 1, clean.shape), 0.7)
    noisy = clean + 90.0 * noise / noise.std()
    scaled = (np.clip(noisy, -1350, 150) + 1350) / 1500
    denoised = denoise_nl_means(scaled, h=0.05, patch_size=5, patch_distance=6, fast_mode=True) * 1500 - 1350
    body = clean > -500
    denoised[~body & (noisy < -500)] = -1000.0  # Remove Background

    fig = plt.figure(figsize=(12, 5.2), dpi=110, facecolor="#2b2b2b")
    panel = fig.add_axes([0.005, 0.01, 0.245, 0.98])
    panel.set_xlim(0, 1), panel.set_ylim(0, 1), panel.axis("off")
    panel.add_patch(
        FancyBboxPatch((0.01, 0.01), 0.98, 0.98, boxstyle="round,pad=0.0", fc="#f3f3f3", ec="#999")
    )
    rows = [
        ("▼ Denoise", True),
        ("Input CT volume:  ULDCT_chest", False),
        ("Output volume:  ULDCT_chest denoised", False),
        ("Model:  unet-ipv2", False),
        ("  U-Net, 2.5D, trained with IPv2 purification", False),
        ("☑ Remove background", False),
        ("[ Apply ]", False),
        ("████████████░░░░  72 %  ~4 s left", False),
        ("running on: CUDA NVIDIA H100, 79 GiB", False),
        ("▼ Compare", True),
        ("[ Side by side ]  [ Restore layout ]", False),
        ("[ Lung -600/1500 ]  [ Mediastinal 40/400 ]", False),
        ("☐ Show difference", False),
        ("▼ ROI metrics", True),
        ("Extra ROI:  (none)   [ Compute ]  [ CSV ]", False),
        ("▶ Export   ▶ Advanced", True),
    ]
    for i, (text, header) in enumerate(rows):
        panel.text(
            0.05,
            0.95 - i * 0.058,
            text,
            fontsize=8.2,
            family="DejaVu Sans",
            weight="bold" if header else "normal",
            color="#1a237e" if header else "#222",
            va="top",
        )
    for k, (img, title) in enumerate(
        (
            (noisy, "Red: ULDCT (2 %-dose-like noise)"),
            (denoised, "Yellow: denoised (stand-in filter, see caption)"),
        )
    ):
        ax = fig.add_axes([0.255 + k * 0.372, 0.04, 0.368, 0.88])
        ax.imshow(img, cmap="gray", vmin=-600 - 750, vmax=-600 + 750, interpolation="nearest")
        ax.set_xticks([]), ax.set_yticks([])
        for s in ax.spines.values():
            s.set_color("#c62828" if k == 0 else "#f9a825"), s.set_linewidth(3)
        ax.set_title(title, color="white", fontsize=9)
        (
            ax.axhline(128, color="#ffeb3b", lw=0.4, alpha=0.6),
            ax.axvline(128, color="#ffeb3b", lw=0.4, alpha=0.6),
        )
        ax.text(4, 250, "W 1500 / L -600   linked + hot-linked", color="#ffeb3b", fontsize=7)
    fig.text(
        0.255,
        0.965,
        "IPv2 Denoise in 3D Slicer — layout 29 (side by side), same window/level, linked views",
        color="white",
        fontsize=10,
    )
    OUT.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(OUT, facecolor=fig.get_facecolor())
    print(OUT)


if __name__ == "__main__":
    main()
