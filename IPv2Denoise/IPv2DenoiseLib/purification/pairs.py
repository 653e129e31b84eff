"""IPv1 / IPv2 image purification: aligned training pairs and test labels from misaligned ULDCT/NDCT.

The IPv2 table (docs/purification.md), in HU, per axial slice. ``U`` = real ULDCT, ``N`` = real NDCT,
``D`` = dark in U or dark in N (:func:`~IPv2DenoiseLib.imaging.masks.common_dark_mask`), ``B`` = the part of
``D`` connected to the image border (outside air), ``L = D & ~B`` (lungs, airways, enclosed air).

========  =====================  ==============  ==============  ==============
strategy  region                 training input  training label  test label
========  =====================  ==============  ==============  ==============
naive     all                    U               N               N
IPv1      D                      N               N               U
IPv1      body (not D)           U               N               N
IPv2      B (Remove Background)  U               N               N
IPv2      L (Add noise)          Sim(N)          N               WD(U) (Remove noise)
IPv2      body (not D)           U               N               N
IPv1+tb   D                      N               N               U
IPv1+tb   body (not D)           0.9·U + 0.1·N   N               N
sim       all                    Sim(N)          N               N
========  =====================  ==============  ==============  ==============

``IPv1+tb`` is the *texture blend* of the authors' newer IPv1 code (repository HEAD, Dec 2025):
``lq_bar = CM·NDCT + (1−CM)·((1−T)·uLDCT + T·NDCT)`` with ``T = 0.1``, giving the training input
"a bit of gt texture" outside the purified region; any switch may be combined with it
(``texture_blend``). ``sim`` is the *simulation-only* control: the training input is ``Sim(N)``
everywhere (no real ULDCT in training at all), as in denoisers trained on simulated low-dose scans.

Every IPv2 module is a switch of :class:`Strategy`; the switches act on the *purified region*
``P`` (``L`` with *remove_background*, else all of ``D``):

* outside ``P`` (body, and ``B`` with *remove_background*): input U, label N, test label N;
* inside ``P``: input ``Sim(N)`` with *add_noise* else ``N``; label ``N``; test label ``WD(U)`` with
  *remove_noise* else ``U``.

So without *remove_background* the background is purified like the lungs (IPv1 rule, and with
*add_noise* it also gets ``Sim(N)``); without *add_noise* the lungs' input is ``N`` itself (IPv1: the
network sees input == label there and learns the identity).

References
----------
.. [1] G. Gong, M. Yu, arXiv:2602.19314 (2026) (IPv2). .. [2] G. Gong, M. Yu et al., arXiv:2510.07492 (IPv1).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import CancelToken, ProgressCallback, Steps
from IPv2DenoiseLib.imaging.classical import (
    bilateral_filter,
    gaussian_filter_mm,
    median_filter_mm,
    nlm_filter,
)
from IPv2DenoiseLib.imaging.masks import common_dark_mask, split_dark
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu
from IPv2DenoiseLib.physics.lowdose import simulate_low_dose
from IPv2DenoiseLib.purification.weak_denoisers import DEFAULT_WEAK_DENOISER, WEAK_DENOISERS

Simulator = Callable[[np.ndarray, float, int], np.ndarray]
SliceDenoiser = Callable[[np.ndarray], np.ndarray]

_SWITCH_ALIASES = {
    "rb": "remove_background",
    "remove_background": "remove_background",
    "removebackground": "remove_background",
    "an": "add_noise",
    "add_noise": "add_noise",
    "addnoise": "add_noise",
    "rn": "remove_noise",
    "remove_noise": "remove_noise",
    "removenoise": "remove_noise",
}
_SHORT = {"remove_background": "rb", "add_noise": "an", "remove_noise": "rn"}
#: Share ``T`` of the NDCT in the training input outside the purified region for the IPv1 texture
#: blend (``tb``); the authors' code uses 0.1 (its comment lists 0.1-0.4).
DEFAULT_TEXTURE_BLEND = 0.1

#: NLM strength of the weak denoiser, ``h = 0.8·noise_hu`` (milder than the 0.9 of the baseline).
WEAK_NLM_H_FACTOR = 0.8


@dataclass(frozen=True)
class Strategy:
    """Which purification to apply; see the module docstring for the region table.

    Attributes
    ----------
    remove_background : bool
        IPv2 *Remove Background*: the border-connected air ``B`` is taken out of the purified region
        and paired like the body (input U, label N, test label N), so the network learns to
        suppress real background noise.
    add_noise : bool
        IPv2 *Add noise*: the purified region's training input is ``Sim(N)``, a physically simulated
        low-dose scan of the NDCT, instead of ``N`` itself.
    remove_noise : bool
        IPv2 *Remove noise*: the purified region's test label is ``WD(U)``, a weakly denoised ULDCT,
        instead of ``U``.
    purify : bool
        IPv1 purification of the dark region at all. False is the *naive* strategy (U→N everywhere,
        test label N); the three switches need it True.
    texture_blend : float
        ``T`` of the IPv1 texture blend: outside the purified region the training input is
        ``(1−T)·U + T·N`` instead of ``U`` (0 = off; ``tb`` in names = :data:`DEFAULT_TEXTURE_BLEND`).
    sim_only : bool
        Simulation-only control: training input ``Sim(N)`` everywhere, label ``N``, test label ``N``.
        Needs ``purify=False`` semantics, so it combines with no other switch.
    """

    remove_background: bool = False
    add_noise: bool = False
    remove_noise: bool = False
    purify: bool = True
    texture_blend: float = 0.0
    sim_only: bool = False

    def __post_init__(self) -> None:
        if not self.purify and (self.remove_background or self.add_noise or self.remove_noise):
            raise UserError(
                "strategy: the naive strategy (purify=False) cannot be combined with IPv2 switches"
            )
        if not 0.0 <= float(self.texture_blend) < 1.0:
            raise UserError(f"strategy: texture blend T={self.texture_blend}; need 0 <= T < 1")
        if self.texture_blend and not self.purify:
            raise UserError("strategy: the texture blend (tb) needs purification; naive has none")
        switches = self.remove_background or self.add_noise or self.remove_noise or self.texture_blend
        if self.sim_only and (switches or not self.purify):
            raise UserError("strategy: sim (Sim(N) -> N everywhere) cannot be combined with other parts")

    @classmethod
    def from_name(cls, name: str) -> Strategy:
        """Parse ``naive``, ``sim``, ``ipv1``, ``ipv2`` or switches joined by ``+`` or ``,``.

        Switch names: ``remove_background``/``rb``, ``add_noise``/``an``, ``remove_noise``/``rn``,
        ``texture_blend``/``tb`` (``tb`` = T 0.1, ``tb0.3`` = T 0.3); case and ``-``/``_`` do not
        matter. ``ipv1`` may be combined with them (``ipv1+rb`` = ``rb``, ``ipv1+tb`` is the IPv1
        texture blend) and ``ipv2`` is ``rb+an+rn``.
        """
        if not isinstance(name, str) or not name.strip():
            raise UserError(f"strategy: got {name!r}; use naive, ipv1, ipv2 or switches like rb+an")
        text = name.strip().lower().replace("-", "_").replace(" ", "")
        if text == "naive":
            return cls(purify=False)
        if text in ("sim", "sim_only"):
            return cls(sim_only=True)
        switches: dict = dict.fromkeys(_SHORT, False)
        for part in text.replace(",", "+").split("+"):
            if part == "ipv1":
                continue
            if part == "ipv2":
                switches.update(dict.fromkeys(_SHORT, True))
                continue
            if part.startswith(("tb", "texture_blend")):
                blend = part.removeprefix("texture_blend") if part.startswith("texture_") else part[2:]
                try:
                    switches["texture_blend"] = float(blend) if blend else DEFAULT_TEXTURE_BLEND
                except ValueError:
                    raise UserError(f"strategy: texture blend {part!r}: use tb or tb0.2") from None
                continue
            key = _SWITCH_ALIASES.get(part)
            if key is None:
                raise UserError(
                    f"strategy: unknown part {part!r} in {name!r}; use naive, ipv1, ipv2 or "
                    "remove_background (rb), add_noise (an), remove_noise (rn) joined by '+'"
                )
            switches[key] = True
        return cls(**switches)

    @property
    def name(self) -> str:
        """Canonical name: ``naive``, ``sim``, ``ipv1``, ``ipv1+tb``, ``ipv2`` or e.g. ``rb+an``."""
        if self.sim_only:
            return "sim"
        if not self.purify:
            return "naive"
        on = [_SHORT[k] for k in _SHORT if getattr(self, k)]
        base = "ipv1" if not on else "ipv2" if len(on) == 3 else "+".join(on)
        if not self.texture_blend:
            return base
        t = self.texture_blend
        return f"{base}+tb" + ("" if t == DEFAULT_TEXTURE_BLEND else f"{t:g}")

    @staticmethod
    def presets() -> dict[str, Strategy]:
        """Named strategies: naive, ipv1, ipv2 and every single/double switch ablation."""
        names = ["naive", "sim", "ipv1", "ipv1+tb", "rb", "an", "rn", "rb+an", "rb+rn", "an+rn", "ipv2"]
        return {n: Strategy.from_name(n) for n in names}


@dataclass(frozen=True)
class PurifiedPair:
    """Output of :func:`build_pairs`: float32 HU arrays and bool masks, all of the input's shape.

    ``train_input`` → ``train_label`` is the training pair; ``(U, test_label)`` is the test pair.
    ``purified`` is the region the strategy's switches act on (empty for naive).
    """

    train_input: np.ndarray
    train_label: np.ndarray
    test_label: np.ndarray
    dark: np.ndarray
    background: np.ndarray
    lungs: np.ndarray
    purified: np.ndarray
    strategy: Strategy
    noise_hu: float | None = None


# --------------------------------------------------------------------------------------- helpers


def _check_pair(uldct: np.ndarray, ndct: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    u, n = np.asarray(uldct), np.asarray(ndct)
    if u.shape != n.shape:
        raise UserError(f"ULDCT shape {u.shape} and NDCT shape {n.shape} differ; they must be the same")
    if u.ndim not in (2, 3) or u.size == 0:
        raise UserError(f"ULDCT/NDCT: expected [y, x] or [z, y, x] HU arrays, got shape {u.shape}")
    out = []
    for arr, what in ((u, "ULDCT"), (n, "NDCT")):
        if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise UserError(f"{what}: expected real HU values, got dtype {arr.dtype}")
        arr = arr.astype(np.float32, copy=False)
        if not np.isfinite(arr).all():
            raise UserError(f"{what}: contains NaN or infinite values; only finite HU are allowed")
        out.append(arr)
    return out[0], out[1]


def _spacing_xy(spacing: float | Sequence[float] | None) -> tuple[float, float] | None:
    if spacing is None:
        return None
    if np.isscalar(spacing):
        s = float(spacing)  # type: ignore[arg-type]
        values = (s, s)
    else:
        values = tuple(float(v) for v in spacing)[:2]  # type: ignore[union-attr]
    if len(values) != 2 or not all(np.isfinite(v) and v > 0 for v in values):
        raise UserError(f"spacing: got {spacing!r}; need positive mm values (sx, sy[, sz]) or one number")
    return values  # type: ignore[return-value]


def remove_background(hu: np.ndarray, background_mask: np.ndarray, *, air_hu: float = -1000.0) -> np.ndarray:
    """A copy of ``hu`` with the background set to air (used at inference, after the denoiser).

    Parameters
    ----------
    hu : ndarray
        CT in HU; not modified.
    background_mask : ndarray of bool, same shape
        E.g. :func:`~IPv2DenoiseLib.imaging.masks.background_mask` or the ``background`` of a pair.
    air_hu : float
        Value written into the background.

    Returns
    -------
    ndarray of float32
    """
    arr = np.asarray(hu)
    mask = np.asarray(background_mask, dtype=bool)
    if arr.shape != mask.shape:
        raise UserError(f"background mask shape {mask.shape} does not match the CT shape {arr.shape}")
    out = arr.astype(np.float32, copy=True)
    out[mask] = np.float32(air_hu)
    return out


def make_weak_denoiser(
    method: str = DEFAULT_WEAK_DENOISER,
    *,
    spacing: float | Sequence[float] | None = None,
    noise_hu: float | None = None,
    sigma_mm: float = 1.0,
) -> SliceDenoiser:
    """A per-slice weak denoiser ``WD`` for the *Remove noise* test label.

    Parameters
    ----------
    method : {"nlm", "gaussian", "bilateral", "median"}
        * ``nlm`` (default): ``skimage.restoration.denoise_nl_means``, fast mode, patch 5,
          distance 6, ``h = 0.8·noise_hu``. Keeps the texture frequency and edges (on our 2 %-dose
          phantom: lung SD 50→7 HU, edge ratio 1.01, LAA-950 closest to the noiseless value among
          the fast denoisers; ~0.25 s per 512² slice).
        * ``gaussian``: ``sigma_mm`` Gaussian (mm → px with ``spacing``).
        * ``bilateral``: SimpleITK bilateral, domain sigma ``sigma_mm`` mm, range sigma ``2·noise_hu``.
        * ``median``: median over a disk of ``sigma_mm`` radius (at least 3x3).
    spacing : (sx, sy[, sz]) mm or float, optional
        Pixel size; default 1 mm.
    noise_hu : float, optional
        Noise SD of the ULDCT (see :func:`estimate_noise_hu`); needed by ``nlm`` and ``bilateral``.
    """
    sx, sy = _spacing_xy(spacing) or (1.0, 1.0)
    method = str(method).lower()
    if method not in WEAK_DENOISERS:
        raise UserError(f"weak denoiser: got {method!r}; use one of {', '.join(WEAK_DENOISERS)}")
    if method in ("nlm", "bilateral") and (noise_hu is None or not noise_hu > 0):
        raise UserError(f"weak denoiser {method!r} needs a positive noise_hu, got {noise_hu!r}")
    if method == "gaussian":
        return gaussian_filter_mm(sigma_mm, (sx, sy))
    if method == "median":
        return median_filter_mm(sigma_mm, (sx, sy))
    if method == "nlm":
        return nlm_filter(float(noise_hu), h_factor=WEAK_NLM_H_FACTOR)  # type: ignore[arg-type]
    return bilateral_filter(sigma_mm, 2.0 * float(noise_hu), (sx, sy))  # type: ignore[arg-type]


def _default_simulator(spacing_xy: tuple[float, float] | None, progress, cancel) -> Simulator:
    if spacing_xy is None:
        raise UserError("spacing: the dose simulation (add_noise) needs the pixel spacing in mm; got None")

    def simulate(hu: np.ndarray, dose: float, seed: int) -> np.ndarray:
        single = hu.ndim == 3 and hu.shape[0] == 1  # lowdose wants a [y, x] slice, not [1, y, x]
        out = simulate_low_dose(
            hu[0] if single else hu,
            dose=dose,
            spacing_mm=float(spacing_xy[0]),
            seed=seed,
            progress=progress,
            cancel=cancel,
        )
        return np.asarray(out)[None] if single else out

    return simulate


def _simulated(simulate: Simulator, n3: np.ndarray, dose: float, seed: int) -> np.ndarray:
    """``Sim(N)`` of the whole NDCT, checked for shape."""
    sim = np.asarray(simulate(n3.copy(), float(dose), int(seed)), dtype=np.float32)
    if sim.shape != n3.shape:
        raise UserError(f"simulate returned shape {sim.shape}; expected the NDCT's {n3.shape}")
    return sim


def _check_dose(dose: float) -> None:
    """Refuse a dose fraction outside (0, 1]."""
    if not (isinstance(dose, (int, float, np.floating)) and 0.0 < float(dose) <= 1.0):
        raise UserError(f"dose: got {dose!r}; it must be a fraction in (0, 1], e.g. 0.02 for 2 %")


def _common_dark_volume(u3: np.ndarray, n3: np.ndarray, tick: Steps) -> np.ndarray:
    """The common dark mask ``D`` of U and N, slice by slice (Otsu and the flood fill are per slice)."""
    dark = np.empty(u3.shape, dtype=bool)
    for z in range(u3.shape[0]):
        dark[z] = common_dark_mask(u3[z], n3[z])
        tick("masks")
    return dark


def _purified_region(strategy: Strategy, dark: np.ndarray, lungs: np.ndarray) -> np.ndarray:
    """The region ``P`` the switches act on: everything (sim), nothing (naive), ``L`` (rb) or ``D``."""
    if strategy.sim_only:
        return np.ones(dark.shape, dtype=bool)
    if not strategy.purify:
        return np.zeros(dark.shape, dtype=bool)
    return lungs if strategy.remove_background else dark


def _train_input(
    strategy: Strategy,
    u3: np.ndarray,
    n3: np.ndarray,
    purified: np.ndarray,
    simulate: Simulator | None,
    dose: float,
    seed: int,
    tick: Steps,
) -> np.ndarray:
    """Training input: ``Sim(N)`` (sim), else U (or the texture blend) with ``P`` set to ``Sim(N)`` or N."""
    nz = u3.shape[0]
    if strategy.sim_only:
        train_input = _simulated(simulate, n3, dose, seed)  # type: ignore[arg-type]
        tick.done += nz - 1
        tick("simulate")
        return train_input
    train_input = u3.copy()
    if not strategy.purify:
        return train_input
    if strategy.texture_blend:
        t = np.float32(strategy.texture_blend)
        train_input = (np.float32(1.0) - t) * u3 + t * n3
    if strategy.add_noise:
        sim = _simulated(simulate, n3, dose, seed)  # type: ignore[arg-type]
        train_input[purified] = sim[purified]
        tick.done += nz - 1  # the whole volume was simulated in one call
        tick("add noise")
    else:
        train_input[purified] = n3[purified]
    return train_input


def _weak_denoiser_for(
    weak_denoiser: str | SliceDenoiser, u3: np.ndarray, spacing_xy: tuple[float, float] | None
) -> tuple[SliceDenoiser, float | None]:
    """``WD`` from a callable or a name, and the U noise SD a named nlm/bilateral one was tuned to."""
    if callable(weak_denoiser):
        return weak_denoiser, None
    noise_hu = None
    if str(weak_denoiser).lower() in ("nlm", "bilateral"):
        noise_hu = estimate_noise_hu(u3)
    return make_weak_denoiser(str(weak_denoiser), spacing=spacing_xy, noise_hu=noise_hu), noise_hu


def _test_label(
    strategy: Strategy,
    u3: np.ndarray,
    n3: np.ndarray,
    purified: np.ndarray,
    weak_denoiser: str | SliceDenoiser,
    spacing_xy: tuple[float, float] | None,
    tick: Steps,
) -> tuple[np.ndarray, float | None]:
    """Test label: N, with ``P`` set to U, or to ``WD(U)`` slice by slice with *remove_noise*.

    Also returns the noise SD of U the weak denoiser was tuned to (None when none was measured).
    """
    test_label = n3.copy()
    if not strategy.purify or strategy.sim_only:
        return test_label, None
    if not strategy.remove_noise:
        test_label[purified] = u3[purified]
        return test_label, None
    wd, noise_hu = _weak_denoiser_for(weak_denoiser, u3, spacing_xy)
    test_label[purified] = u3[purified]
    for z in range(u3.shape[0]):
        if purified[z].any():
            out = np.asarray(wd(u3[z].copy()), dtype=np.float32)
            if out.shape != u3[z].shape:
                raise UserError(f"weak denoiser returned shape {out.shape}; expected {u3[z].shape}")
            test_label[z][purified[z]] = out[purified[z]]
        tick("remove noise")
    return test_label, noise_hu


# --------------------------------------------------------------------------------------- main entry


def build_pairs(
    uldct: np.ndarray,
    ndct: np.ndarray,
    strategy: Strategy | str,
    *,
    simulate: Simulator | None = None,
    weak_denoiser: str | SliceDenoiser = DEFAULT_WEAK_DENOISER,
    dose: float = 0.02,
    spacing: float | Sequence[float] | None = None,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> PurifiedPair:
    """Build the training pair and test label of one ULDCT/NDCT pair with a purification strategy.

    Parameters
    ----------
    uldct, ndct : ndarray, [z, y, x] or [y, x]
        Real ULDCT ``U`` and NDCT ``N`` of the same patient in HU, same shape (misaligned anatomy is
        expected). Not modified.
    strategy : Strategy or str
        See :class:`Strategy` / :meth:`Strategy.from_name`.
    simulate : callable ``(ndct_hu, dose, seed) -> noisy_hu``, optional
        ``Sim`` for *add_noise*, applied once to the whole NDCT. Default:
        ``IPv2DenoiseLib.physics.lowdose.simulate_low_dose`` (needs ``spacing``).
    weak_denoiser : str or callable ``(slice_hu_2d) -> slice_hu_2d``
        ``WD`` for *remove_noise*, applied per slice that holds purified voxels; a name from
        :data:`WEAK_DENOISERS` (see :func:`make_weak_denoiser`; default ``nlm`` with ``h`` from the
        noise measured in U's soft tissue).
    dose : float
        Dose fraction of the simulated scan, in (0, 1] (0.02 = 2 %).
    spacing : (sx, sy[, sz]) mm or float, optional
        Pixel size, for the simulator and the mm parameters of the weak denoiser (default 1 mm there).
    seed : int
        Seed passed to ``simulate``.
    progress, cancel
        Progress callback ``(done, total, message)`` over slices, and a cancel token checked between
        slices.

    Returns
    -------
    PurifiedPair

    Raises
    ------
    UserError
        Shape mismatch (naming both shapes), non-finite values, dose outside (0, 1], unknown strategy
        or weak denoiser, *add_noise* without a simulator, simulator output of the wrong shape.
    """
    u, n = _check_pair(uldct, ndct)
    _check_dose(dose)
    if isinstance(strategy, str):
        strategy = Strategy.from_name(strategy)
    spacing_xy = _spacing_xy(spacing)
    was_2d = u.ndim == 2
    u3, n3 = (u[None], n[None]) if was_2d else (u, n)
    nz = u3.shape[0]
    stages = 1 + int(strategy.add_noise or strategy.sim_only) + int(strategy.remove_noise)
    tick = Steps(nz * stages, progress, cancel)
    if (strategy.add_noise or strategy.sim_only) and simulate is None:
        # the whole volume is simulated in one call that stands for nz steps: it reports inside them
        simulate = _default_simulator(spacing_xy, tick.within("simulating the dose", units=nz), cancel)

    dark = _common_dark_volume(u3, n3, tick)
    background, lungs = split_dark(dark)
    purified = _purified_region(strategy, dark, lungs)
    train_input = _train_input(strategy, u3, n3, purified, simulate, dose, seed, tick)
    train_label = n3.copy()
    test_label, noise_hu = _test_label(strategy, u3, n3, purified, weak_denoiser, spacing_xy, tick)

    def fix(a: np.ndarray) -> np.ndarray:
        return a[0] if was_2d else a

    return PurifiedPair(
        train_input=fix(train_input),
        train_label=fix(train_label),
        test_label=fix(test_label),
        dark=fix(dark),
        background=fix(background),
        lungs=fix(lungs),
        purified=fix(purified),
        strategy=strategy,
        noise_hu=noise_hu,
    )
