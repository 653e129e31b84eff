"""Purify a dataset in the IPv1/IPv2 authors' PNG layout: ``ROOT/{train,val,test}/{lq,gt}/*.png``.

``lq`` holds the ULDCT slices, ``gt`` the NDCT slices with the same file names (8-bit, possibly
3-channel grey). Grey levels are mapped to HU through a window (level ``L``, width ``W``: grey 0 ↔
``L - W/2``, 255 ↔ ``L + W/2``), :func:`~IPv2DenoiseLib.purification.pairs.build_pairs` runs on each slice pair,
and the results go back through the same window to ``OUT/{split}/lq_bar/*.png`` (training input) and
``OUT/{split}/gt_bar/*.png`` (test label), single-channel uint8, rounded and clipped. The training
label is the untouched ``gt`` slice, so it is not written again.

The authors' PNG window is unknown (docs/purification.md); pick the one the PNGs were made
with. Grey levels saturated by that window (e.g. air below ``L - W/2``) are clipped HU, so Otsu and
the dose simulation see clipped values — a limit of working from PNGs rather than DICOM.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from skimage import io as skimage_io
from skimage.color import rgb2gray

from IPv2DenoiseLib.core.atomic import atomic_path
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback
from IPv2DenoiseLib.purification.pairs import Strategy, build_pairs
from IPv2DenoiseLib.purification.weak_denoisers import DEFAULT_WEAK_DENOISER

SPLITS = ("train", "val", "test")


def grey_to_hu(grey: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """uint8 grey 0..255 → HU for window ``(level, width)``."""
    level, width = window
    return (level - width / 2.0 + np.asarray(grey, dtype=np.float32) * (width / 255.0)).astype(np.float32)


def hu_to_grey(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    """HU → uint8 grey through window ``(level, width)``, rounded and clipped."""
    level, width = window
    grey = (np.asarray(hu, dtype=np.float64) - (level - width / 2.0)) * (255.0 / width)
    return np.clip(np.rint(grey), 0, 255).astype(np.uint8)


def read_grey_png(path: Path) -> np.ndarray:
    """An 8-bit PNG as a 2-D uint8 grey image (RGB/RGBA → grey; identical channels taken as is)."""
    try:
        img = np.asarray(skimage_io.imread(path))
    except Exception as exc:  # imageio raises several types for corrupt files
        raise UserError(f"{path}: cannot read PNG ({exc.__class__.__name__}: {exc})") from exc
    if img.ndim == 3 and img.shape[-1] in (3, 4):
        rgb = img[..., :3]
        if np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2]):
            img = rgb[..., 0]
        else:
            img = np.rint(rgb2gray(rgb) * (255.0 if rgb.dtype == np.uint8 else 1.0))
    elif img.ndim == 3 and img.shape[-1] == 2:  # grey + alpha
        img = img[..., 0]
    if img.ndim != 2:
        raise UserError(f"{path}: expected a 2-D grey or RGB PNG, got array shape {img.shape}")
    if img.dtype != np.uint8:
        if img.dtype == np.uint16 or img.max() > 255:
            raise UserError(f"{path}: expected an 8-bit PNG, got {img.dtype} with maximum {img.max()}")
        img = img.astype(np.uint8)
    return img


def _write_png(path: Path, grey: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        skimage_io.imsave(tmp, grey, check_contrast=False)


def matched_pairs(root: Path, split: str) -> list[str]:
    """Sorted file names present in both ``lq`` and ``gt`` of ``split``; UserError on any mismatch."""
    lq = {p.name for p in (root / split / "lq").glob("*.png")}
    gt = {p.name for p in (root / split / "gt").glob("*.png")}
    if lq != gt:
        only_lq, only_gt = sorted(lq - gt), sorted(gt - lq)
        first = (
            f"{split}/lq/{only_lq[0]} has no {split}/gt/ partner"
            if only_lq
            else (f"{split}/gt/{only_gt[0]} has no {split}/lq/ partner")
        )
        raise UserError(
            f"PNG dataset {root}: file names of lq and gt differ ({len(only_lq)} only in lq, "
            f"{len(only_gt)} only in gt); first: {first}"
        )
    return sorted(lq)


def purify_png_dataset(
    root: str | Path,
    out: str | Path,
    *,
    window: tuple[float, float],
    strategy: Strategy | str = "ipv2",
    simulate: Callable[[np.ndarray, float, int], np.ndarray] | None = None,
    weak_denoiser: str | Callable[[np.ndarray], np.ndarray] = DEFAULT_WEAK_DENOISER,
    dose: float = 0.02,
    pixel_spacing_mm: float = 0.7,
    seed: int = 0,
    splits: Sequence[str] = SPLITS,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> dict[str, int]:
    """Build ``lq_bar``/``gt_bar`` for every slice pair of the authors' PNG dataset.

    Parameters
    ----------
    root : path
        Folder holding ``{train,val,test}/{lq,gt}/*.png`` (splits that are absent are skipped; at
        least one must be there).
    out : path
        Output folder; ``{split}/lq_bar`` and ``{split}/gt_bar`` are created in it.
    window : (level, width)
        HU window of the PNGs.
    pixel_spacing_mm : float
        Pixel size assumed for the dose simulation and the weak denoiser (PNGs carry no geometry;
        0.7 mm is a 512² slice of a 360 mm field of view).
    seed : int
        Slice ``i`` (in sorted order over the splits) is simulated with seed ``seed + i``.
    Other parameters as in :func:`~IPv2DenoiseLib.purification.pairs.build_pairs`.

    Returns
    -------
    dict
        Number of slice pairs written per split.

    Raises
    ------
    UserError
        Missing root or splits, lq/gt names that differ (the first mismatch is named), unreadable or
        non-8-bit PNGs, slices of different size, bad window.
    """
    root, out = Path(root), Path(out)
    level, width = (float(v) for v in window)
    if not np.isfinite(level) or not (np.isfinite(width) and width > 0):
        raise UserError(
            f"window: got level {level}, width {width}; the width must be a positive number of HU"
        )
    if not root.is_dir():
        raise UserError(f"PNG dataset not found: {root}")
    if isinstance(strategy, str):
        strategy = Strategy.from_name(strategy)
    present = [s for s in splits if (root / s / "lq").is_dir() or (root / s / "gt").is_dir()]
    if not present:
        raise UserError(f"PNG dataset {root}: no {'/'.join(splits)} folder with lq/ and gt/ inside")
    names = {s: matched_pairs(root, s) for s in present}
    total = sum(len(v) for v in names.values())
    counts: dict[str, int] = {}
    index = 0
    for split in present:
        (out / split / "lq_bar").mkdir(parents=True, exist_ok=True)
        (out / split / "gt_bar").mkdir(parents=True, exist_ok=True)
        for name in names[split]:
            if cancel is not None:
                cancel.check()
            lq = read_grey_png(root / split / "lq" / name)
            gt = read_grey_png(root / split / "gt" / name)
            if lq.shape != gt.shape:
                raise UserError(f"{split}/{name}: lq size {lq.shape} and gt size {gt.shape} differ")
            pair = build_pairs(
                grey_to_hu(lq, (level, width)),
                grey_to_hu(gt, (level, width)),
                strategy,
                simulate=simulate,
                weak_denoiser=weak_denoiser,
                dose=dose,
                spacing=(pixel_spacing_mm, pixel_spacing_mm),
                seed=seed + index,
            )
            _write_png(out / split / "lq_bar" / name, hu_to_grey(pair.train_input, (level, width)))
            _write_png(out / split / "gt_bar" / name, hu_to_grey(pair.test_label, (level, width)))
            index += 1
            if progress is not None:
                progress(index, total, f"{split}/{name}")
        counts[split] = len(names[split])
    return counts
