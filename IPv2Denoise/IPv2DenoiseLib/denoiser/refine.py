"""Collaborative Wiener refinement of a network's output (``--refine``): the network as the pilot.

BM3D's second stage (Dabov et al., IEEE TIP 2007) filters groups of similar patches of the *noisy*
image with an empirical Wiener filter whose signal power comes from a *pilot* estimate. Given a
better pilot than BM3D's own first stage, it gives a better image than the pilot itself: it puts back
detail the network smoothed away wherever the noisy image shows it above its noise, and removes
noise the network left, patch group by patch group. Here the pilot is the network's output and the
noise model is measured from the residual ``noisy − network`` of the same slice, as ``--adapt``
measures it: its 2D spectrum, whitened by its local SD (so streaks and kernel texture are kept and
bowtie / tube-current patterns are not averaged into it), and that local SD per patch group. So the
filter knows coloured, non-stationary CT noise, which BM3D's own code (one stationary spectrum)
does not.

Written by hand: the ``bm3d`` package is free for non-commercial use only (the benchmarks use it as
an oracle), and neither scikit-image nor SciPy has block matching. Torch, so it runs where the
network runs (CPU or GPU). On training-corpus slices with 80 HU of scanner noise it adds 0.3-1.4 dB
to the fast model's output; on the mean of the benchmark's real slices 0.1-0.5 dB, the head and neck
most, nothing on its chest (docs/results.md §4).

Three additions to the paper's filter, all for CT noise: each group's coefficient variances come from
the noise's covariance between its patches (:func:`coefficient_covariances`; nearby patches share
correlated noise, and the paper's independent patches lost 1.4 dB at 0.29 mm pixels), and the
network's coarse scales are kept (``RefineSettings.pilot_below_px``), which the filter cannot clean,
and the gain takes the noise as twice the residual's (``RefineSettings.noise_scale``).

Per slice: block matching on the pilot (8×8 patches, every 3rd pixel as a reference, the 16 most
similar within ±10 px, from running sums of each offset's squared difference), the 2D DCT of every
patch of the slice at once (a group gathers rows of it) then a 1D DCT along the group, the Wiener
gain ``P² / (P² + 2σ²)`` from the pilot's coefficients ``P`` and each coefficient's noise variance
``σ²`` (``RefineSettings.noise_scale``: the residual reads the noise low), and Kaiser-windowed
aggregation weighted by the inverse of the filtered noise variance, as in the paper (summed per
patch position in the DCT domain, then inverted and overlap-added once).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from scipy import fft as sfft
from scipy import ndimage as ndi

from IPv2DenoiseLib.core.progress import CancelToken
from IPv2DenoiseLib.imaging.masks import background_weight
from IPv2DenoiseLib.physics.scanner_noise import LOCAL_SD_SIGMA_MM, local_noise_sd

__all__ = [
    "RefineSettings",
    "coefficient_covariances",
    "collaborative_wiener",
    "refine_slices",
    "residual_noise_model",
]


@dataclass(frozen=True)
class RefineSettings:
    """The block matching and grouping of :func:`collaborative_wiener` (BM3D's Wiener-stage patch and
    step, with a smaller search window and group for the CPU: 11 px patches, 32-patch groups and a
    ±12 px search moved corpus slices by under 0.1 dB, at up to three times the time).

    Parameters
    ----------
    block : int
        Patch side (px).
    group : int
        Patches per group, the reference included.
    radius : int
        Search radius around each reference (px).
    step : int
        Distance between reference patches (px).
    chunk : int
        Reference patches filtered at once (memory: about 120 MB for a 512² slice's coefficient maps
        plus about 60 MB per 1024 references; 4096 took more of both memory and time).
    pilot_below_px : float
        The scale (Gaussian SD, px) below whose frequencies the pilot is kept as it is: the filter
        cannot remove noise coarser than its patches and search window (it survives the group's
        average), which the network does; 0 keeps nothing of the pilot. 2 px: on training-corpus
        slices at half their pixel size (0.29-0.48 mm) it turned a 0.4-0.5 dB loss into a tie and
        added 0.3 dB on a head, at a 0.1-0.3 dB cost at 0.57-0.86 mm.
    noise_scale : float
        The Wiener gain is ``P² / (P² + noise_scale · σ²)``. Above 1 because the residual misses the
        noise the network left in its output (σ² is read low) and ``P²`` holds the network's own
        error: on ten training-corpus slice × noise cases, 2 gave +0.37 dB over the quality model
        with ``--ensemble 8`` (1: +0.31; 3: +0.35) and +0.72 over the fast model (1: +0.62; 3: +0.73),
        and no case below the network (1: down to −0.24 dB at 0.285 mm).
    """

    block: int = 8
    group: int = 16
    radius: int = 10
    step: int = 3
    chunk: int = 1024
    pilot_below_px: float = 2.0
    noise_scale: float = 2.0


def _dct_matrix(n: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The orthonormal DCT-II matrix (rows are the basis vectors)."""
    return torch.from_numpy(sfft.dct(np.eye(n), norm="ortho", axis=0)).to(dtype)


def coefficient_covariances(autocovariance: np.ndarray, block: int, reach: int) -> np.ndarray:
    """Covariance of each 2D DCT coefficient of a ``block``² patch with the same coefficient of the
    patch ``d`` pixels away, for stationary noise and every ``|d| ≤ reach`` on both axes.

    At ``d = 0`` it is the coefficient's variance. Between nearby patches it is not zero (they
    overlap, and CT noise is correlated over several pixels at fine pixel sizes), so a group of
    patches found close together averages less noise away than independent ones would: the filter
    uses these covariances for each group's own coefficient variances.

    Parameters
    ----------
    autocovariance : np.ndarray
        The noise's autocovariance at lags ``−(reach+block−1)..reach+block−1`` on both axes, lag 0 in
        the centre (side ``2·(reach+block−1)+1``).
    block : int
        Patch side.
    reach : int
        Largest offset between two patches, per axis.

    Returns
    -------
    np.ndarray
        ``[block², 2·reach+1, 2·reach+1]`` float32, row-major over the (vertical, horizontal) DCT
        frequencies, offset 0 in the centre.
    """
    basis = _dct_matrix(block, torch.float64)
    patches = torch.einsum("ki,lj->klij", basis, basis).reshape(block * block, 1, block, block)
    # A_k(Δ) = Σ_u h_k(u + Δ) h_k(u) (torch's conv2d correlates); cov_k(d) = Σ_Δ R(d + Δ) · A_k(Δ)
    own = F.conv2d(patches.transpose(0, 1), patches, padding=block - 1, groups=block * block)
    lagged = torch.from_numpy(np.ascontiguousarray(autocovariance))[None, None]
    covariance = F.conv2d(lagged, own.transpose(0, 1))[0]  # [b², 2·reach+1, 2·reach+1]
    return covariance.float().numpy()


def residual_noise_model(
    residual: np.ndarray, body: np.ndarray, *, pixel_mm: float, block: int = 8, reach: int = 20
) -> tuple[np.ndarray, np.ndarray]:
    """The noise model of one slice, measured on its residual ``noisy − pilot``.

    The residual is whitened by its local SD (RMS over a 10 mm Gaussian, as ``--adapt``) inside the
    body (air outside carries little CT noise after reconstruction's clipping); its autocovariance
    then gives the covariances of the filter's coefficients (:func:`coefficient_covariances`).

    Parameters
    ----------
    residual : np.ndarray
        ``[H, W]`` HU: the noisy slice minus the pilot.
    body : np.ndarray
        ``[H, W]`` bool: where to measure (the whole slice when it holds fewer than ``block²`` pixels).
    pixel_mm : float
        In-plane pixel size, for the 10 mm local SD.
    block : int
        Patch side of the filter.
    reach : int
        Largest offset between two patches of a group (twice the search radius).

    Returns
    -------
    tuple of np.ndarray
        ``[block², 2·reach+1, 2·reach+1]`` float32 coefficient covariances for unit local SD, and the
        ``[H, W]`` float32 local SD (HU).
    """
    sigma_px = LOCAL_SD_SIGMA_MM / max(pixel_mm, 1e-3)
    sd = local_noise_sd(residual[None].astype(np.float32), sigma_px)[0].astype(np.float32)
    if body.sum() < block * block:  # no body to measure on: the whole slice
        body = np.ones_like(body, dtype=bool)
    white = np.where(body, residual / np.maximum(sd, 1e-3), 0.0)
    white = np.where(body, white - white[body].mean(), 0.0)
    power = np.abs(np.fft.fft2(white)) ** 2 / float(body.sum())
    autocovariance = np.fft.fftshift(np.real(np.fft.ifft2(power)))
    cy, cx = (n // 2 for n in autocovariance.shape)
    half = reach + block - 1
    lags = np.zeros((2 * half + 1, 2 * half + 1))
    ry = min(half, cy, autocovariance.shape[0] - cy - 1)
    rx = min(half, cx, autocovariance.shape[1] - cx - 1)
    lags[half - ry : half + ry + 1, half - rx : half + rx + 1] = autocovariance[
        cy - ry : cy + ry + 1, cx - rx : cx + rx + 1
    ]
    return coefficient_covariances(lags, block, reach), sd


def collaborative_wiener(
    noisy: torch.Tensor,
    pilot: torch.Tensor,
    covariance: torch.Tensor,
    local_sd: torch.Tensor,
    settings: RefineSettings | None = None,
) -> torch.Tensor:
    """One slice's collaborative Wiener estimate (see the module docstring).

    Parameters
    ----------
    noisy, pilot, local_sd : torch.Tensor
        ``[H, W]`` float32 on one device: the noisy slice and the pilot (HU), the noise's local SD (HU).
    covariance : torch.Tensor
        ``[block², 2·reach+1, 2·reach+1]`` with ``reach ≥ 2·radius``: each 2D DCT coefficient's noise
        covariance between patches at each offset, for unit local SD (:func:`residual_noise_model`).
    settings : RefineSettings, optional
        Patch, group and search sizes (default :class:`RefineSettings`).

    Returns
    -------
    torch.Tensor
        ``[H, W]`` float32, the refined slice.
    """
    s = settings or RefineSettings()
    b, k, radius = s.block, s.group, s.radius
    reach = (covariance.shape[-1] - 1) // 2
    if reach < 2 * radius:
        raise ValueError(f"covariances reach {reach} px; the search needs {2 * radius}")
    height, width = noisy.shape
    corners_y, corners_x = height - b + 1, width - b + 1  # patch corners: the coefficient maps' size
    device = noisy.device
    ry = torch.unique(torch.cat([torch.arange(0, corners_y, s.step), torch.tensor([corners_y - 1])]))
    rx = torch.unique(torch.cat([torch.arange(0, corners_x, s.step), torch.tensor([corners_x - 1])]))
    ref_y, ref_x = (g.reshape(-1).to(device) for g in torch.meshgrid(ry, rx, indexing="ij"))
    offsets = torch.tensor(
        [(dy, dx) for dy in range(-radius, radius + 1) for dx in range(-radius, radius + 1)], device=device
    )
    best = _match_blocks(pilot, ref_y, ref_x, offsets, block=b, group=k, radius=radius)  # [R, k]

    dct_b = _dct_matrix(b).to(device)
    dct_k = _dct_matrix(k).to(device)
    # every patch's 2D DCT at once: rows of [corners, b²], coefficient (u, v) row-major like the
    # covariance table, so a group is a gather of whole rows
    basis = torch.einsum("ui,vj->uvij", dct_b, dct_b).reshape(b * b, b * b)  # [(u, v), (i, j)]

    def coefficient_rows(image: torch.Tensor) -> torch.Tensor:
        return F.unfold(image[None, None], b)[0].T @ basis.T  # [corners, b²]

    rows_noisy, rows_pilot = coefficient_rows(noisy), coefficient_rows(pilot)
    # the group transform's variance of 3D coefficient (l, c): Σ_ij D_li D_lj cov_c(p_i − p_j)
    # (D_li² sums to 1, so the diagonal gives each patch's own variance; the other pairs come twice)
    first, second = torch.triu_indices(k, k, offset=1, device=device)
    group_weights = 2.0 * dct_k[:, first] * dct_k[:, second]  # [k, pairs]
    side = 2 * reach + 1  # the covariance table's side
    pair_table = covariance.to(device).reshape(b * b, side * side).T  # [offsets, b²]
    own_var = pair_table[reach * side + reach]  # [b²]: offset 0
    sd_box = F.avg_pool2d(local_sd[None, None], b, stride=1)[0, 0]  # mean SD over each patch
    # aggregation in the coefficient domain: each patch's weighted, filtered coefficients are summed
    # at its corner, then inverted once per corner with the Kaiser window and overlap-added (fold):
    # the same sums as adding each windowed patch into the image
    weighted_sums = torch.zeros(corners_y * corners_x, b * b, device=device)
    weight_sums = torch.zeros(corners_y * corners_x, device=device)

    for start in range(0, ref_y.numel(), s.chunk):
        chosen = best[start : start + s.chunk]  # [R, k] offset indices
        oy, ox = offsets[chosen, 0], offsets[chosen, 1]
        corner = (
            (ref_y[start : start + s.chunk, None] + oy) * corners_x
            + ref_x[start : start + s.chunk, None]
            + ox
        )
        coef_noisy = torch.einsum("lk,rkc->rlc", dct_k, rows_noisy[corner])  # [R, k, b²]
        coef_pilot = torch.einsum("lk,rkc->rlc", dct_k, rows_pilot[corner])
        pairs = (oy[:, first] - oy[:, second] + reach) * side + (ox[:, first] - ox[:, second] + reach)
        group_var = own_var + group_weights @ pair_table[pairs]  # [R, k, b²]
        sd_ref = sd_box[ref_y[start : start + s.chunk], ref_x[start : start + s.chunk]]
        noise_var = (group_var * (sd_ref**2)[:, None, None]).clamp(min=1e-6)
        gain = coef_pilot**2 / (coef_pilot**2 + s.noise_scale * noise_var)
        filtered = torch.einsum("lk,rlc->rkc", dct_k, gain * coef_noisy)  # each patch's 2D coefficients
        weight = 1.0 / (gain**2 * noise_var).sum(dim=(1, 2)).clamp(min=1e-8)  # [R]: BM3D's
        flat = corner.reshape(-1)
        weighted_sums.index_add_(0, flat, (filtered * weight[:, None, None]).reshape(-1, b * b))
        weight_sums.index_add_(0, flat, weight[:, None].expand(-1, k).reshape(-1))
    kaiser = torch.from_numpy(np.outer(np.kaiser(b, 2.0), np.kaiser(b, 2.0)).astype(np.float32)).to(device)
    windowed = (weighted_sums @ (basis * kaiser.reshape(1, -1))).T  # [(i, j), corners]: windowed patches
    numerator = F.fold(windowed[None], (height, width), b)[0, 0]
    denominator = F.fold((weight_sums[None] * kaiser.reshape(-1, 1))[None], (height, width), b)[0, 0]
    # every pixel lies in its own reference's patch, so every denominator is positive
    return numerator / denominator


def _match_blocks(
    pilot: torch.Tensor,
    ref_y: torch.Tensor,
    ref_x: torch.Tensor,
    offsets: torch.Tensor,
    *,
    block: int,
    group: int,
    radius: int,
) -> torch.Tensor:
    """Block matching on the pilot: the indices into ``offsets`` of each reference corner's ``group``
    most similar patches (smallest sum of squared differences), the reference itself first."""
    height, width = pilot.shape
    b, side = block, 2 * radius + 1
    # each offset's patch SSD at every corner, from 1D running sums along rows then columns (float64,
    # in HU/1000: no cancellation). The SSD of the patches at r and r − d is the one of r − d and
    # (r − d) + d: one map serves d and −d (read at r and at r − d; a corner outside is masked below).
    scaled = pilot.double() / 1000.0
    padded = F.pad(scaled[None, None], (radius, radius + b, radius, radius + b))[0, 0]
    distance = torch.zeros(len(offsets), ref_y.numel(), device=pilot.device)
    corners_x = width - b + 1
    # buffers reused for every offset (allocation was a third of the time)
    buffer = {"device": pilot.device, "dtype": torch.float64}
    squared = torch.empty(height, width, **buffer)
    along_rows = torch.zeros(height, width + 1, **buffer)
    row_sums = torch.empty(height, corners_x, **buffer)
    down_columns = torch.zeros(height + 1, corners_x, **buffer)
    ssd = torch.empty(height - b + 1, corners_x, **buffer)
    at_reference = ref_y * corners_x + ref_x
    for dy in range(0, radius + 1):
        for dx in range(-radius if dy else 1, radius + 1):
            shifted = padded[radius + dy : radius + dy + height, radius + dx : radius + dx + width]
            torch.sub(scaled, shifted, out=squared).square_()
            torch.cumsum(squared, 1, out=along_rows[:, 1:])
            torch.sub(along_rows[:, b:], along_rows[:, :-b], out=row_sums)  # sums over b columns
            torch.cumsum(row_sums, 0, out=down_columns[1:])
            torch.sub(down_columns[b:], down_columns[:-b], out=ssd)  # and over b rows
            flat = ssd.view(-1)
            partner = (ref_y - dy).clamp(0, height - b) * corners_x + (ref_x - dx).clamp(0, width - b)
            distance[(dy + radius) * side + dx + radius] = flat[at_reference]
            distance[(radius - dy) * side + radius - dx] = flat[partner]
    match_y = ref_y[None] + offsets[:, :1]
    match_x = ref_x[None] + offsets[:, 1:]
    outside = (match_y < 0) | (match_y > height - b) | (match_x < 0) | (match_x > width - b)
    distance[outside] = math.inf
    distance[radius * side + radius] = -1.0  # the reference itself, first, whatever ties a flat pilot makes
    return distance.topk(group, dim=0, largest=False).indices.T


def refine_slices(
    noisy: np.ndarray,
    denoised: np.ndarray,
    *,
    pixel_mm: float,
    device: torch.device | str = "cpu",
    settings: RefineSettings | None = None,
    cancel: CancelToken | None = None,
) -> np.ndarray:
    """Refine each axial slice of a network's output by :func:`collaborative_wiener`, its noise model
    measured on that slice's residual (:func:`residual_noise_model`).

    Parameters
    ----------
    noisy : np.ndarray
        ``[z, y, x]`` HU, the network's input; not modified.
    denoised : np.ndarray
        ``[z, y, x]`` HU, the network's output (the pilot); not modified.
    pixel_mm : float
        In-plane pixel size (the local noise SD is measured over 10 mm; the body mask).
    device : torch.device or str
        Where the filtering runs.
    settings : RefineSettings, optional
        Patch, group and search sizes.
    cancel : CancelToken, optional
        Checked before each slice (a slice takes seconds on a CPU).

    Returns
    -------
    np.ndarray
        ``[z, y, x]`` float32 HU, the refined slices.
    """
    s = settings or RefineSettings()
    device = torch.device(device)
    sigma = (0.0, s.pilot_below_px, s.pilot_below_px)
    body = background_weight(noisy, spacing=(pixel_mm, pixel_mm, 1.0)) < 0.5
    out = np.empty(denoised.shape, dtype=np.float32)
    for z in range(noisy.shape[0]):
        if cancel is not None:
            cancel.check()
        covariance, sd = residual_noise_model(
            noisy[z] - denoised[z], body[z], pixel_mm=pixel_mm, block=s.block, reach=2 * s.radius
        )
        with torch.no_grad():
            out[z] = (
                collaborative_wiener(
                    torch.from_numpy(np.ascontiguousarray(noisy[z], dtype=np.float32)).to(device),
                    torch.from_numpy(np.ascontiguousarray(denoised[z], dtype=np.float32)).to(device),
                    torch.from_numpy(covariance),
                    torch.from_numpy(sd).to(device),
                    s,
                )
                .cpu()
                .numpy()
            )
    if s.pilot_below_px > 0:  # the pilot's coarse scales, the filter's fine ones
        out += ndi.gaussian_filter(denoised.astype(np.float32), sigma) - ndi.gaussian_filter(out, sigma)
    return out
