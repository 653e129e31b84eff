"""Projector speed: ours (Fourier slice on finufft / torch) vs scikit-image radon + iradon.

Usage: ``python benchmarks/bench_lowdose.py [--slices 8] [--size 512] [--views 720]``

Same process, same geometry (parallel beam, ``views`` over 180°, ramp FBP), same slices. Prints
slices/s for forward + FBP with each, the ratio (goal ≥ 10× on 2 CPU cores), ours at the NUFFT
tolerance 1e-5 (the default before 2026-12-06) with its speed ratio and difference, the full
``simulate_low_dose`` rate for the parallel and the fan geometry, and, when CUDA is present, the
CUDA rates (goal ≥ 200 slices/s forward + FBP).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from skimage.data import shepp_logan_phantom
from skimage.transform import iradon, radon, resize

from IPv2DenoiseLib.physics.lowdose import simulate_low_dose
from IPv2DenoiseLib.physics.projector import ParallelProjector


def rate(fn, n_slices: int, repeat: int = 1, warm: bool = True) -> float:
    if warm:
        fn()  # warm-up: plans, caches
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return n_slices / best


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--slices", type=int, default=8)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--views", type=int, default=720)
    args = ap.parse_args(argv)
    n, v, k = args.size, args.views, args.slices
    img = resize(shepp_logan_phantom(), (n, n)).astype(np.float32)
    vol = np.stack([img] * k)
    theta = np.arange(v) * 180.0 / v
    print(
        f"{k} slices of {n}², {v} parallel views, torch threads {torch.get_num_threads()}, "
        f"cores {os.cpu_count()}"
    )

    def skimage_run():
        for s in vol:
            # the authors' call (circle=True: the inscribed disc only, the cheaper setting)
            iradon(radon(s, theta=theta), theta=theta, filter_name="ramp")

    sk = rate(skimage_run, k, warm=False)
    print(f"scikit-image radon+iradon : {sk:8.2f} slices/s")
    proj = ParallelProjector(n, v, device="cpu")
    x = torch.from_numpy(vol)
    ours = rate(lambda: proj.fbp(proj.forward(x)), k, repeat=2)
    print(
        f"ours ({proj.backend_name}) fwd+FBP   : {ours:8.2f} slices/s   ratio {ours / sk:5.1f}x (goal >= 10x)"
    )
    # the NUFFT tolerance: the default 1e-4 against 1e-5 (the default before 2026-12-06)
    tight = ParallelProjector(n, v, device="cpu", eps=1e-5)
    ours_tight = rate(lambda: tight.fbp(tight.forward(x)), k, repeat=2)
    sino, sino_tight = proj.forward(x), tight.forward(x)
    image, image_tight = proj.fbp(sino), tight.fbp(sino_tight)
    print(
        f"ours at eps {tight.eps:g} fwd+FBP   : {ours_tight:8.2f} slices/s   default eps {proj.eps:g} is "
        f"{ours / ours_tight:4.2f}x faster; relative difference: sinogram "
        f"{float((sino - sino_tight).norm() / sino_tight.norm()):.1e}, "
        f"FBP {float((image - image_tight).norm() / image_tight.norm()):.1e}"
    )
    hu = vol * 1000 - 1000
    for geometry in ("parallel", "fan"):
        r = rate(
            lambda g=geometry: simulate_low_dose(
                hu, dose=0.02, spacing_mm=0.7, geometry=g, device="cpu", batch=k
            ),
            k,
        )
        print(f"simulate_low_dose {geometry:8s} cpu : {r:8.2f} slices/s   ratio {r / sk:5.1f}x")
    if torch.cuda.is_available():
        kk = 64
        xg = torch.from_numpy(np.stack([img] * kk)).cuda()
        pg = ParallelProjector(n, v, device="cuda")
        g = rate(lambda: pg.fbp(pg.forward(xg)), kk, repeat=3)
        print(f"ours (torch, CUDA {torch.cuda.get_device_name()}) fwd+FBP: {g:8.1f} slices/s (goal >= 200)")
        hug = np.stack([img] * kk) * 1000 - 1000
        for geometry in ("parallel", "fan"):
            r = rate(
                lambda g=geometry: simulate_low_dose(
                    hug, dose=0.02, spacing_mm=0.7, geometry=g, device="cuda", batch=32
                ),
                kk,
            )
            print(f"simulate_low_dose {geometry:8s} cuda: {r:8.1f} slices/s")


if __name__ == "__main__":
    main()
