"""Batch benchmark: cases per hour of ``ipv2-denoise batch`` (local and Ray engines) against a loop of
``ipv2-denoise denoise`` calls, measured in one run on one archive.

One command::

    python benchmarks/bench_batch.py [--cases 10] [--slices 16] [--size 256] [--device cpu]

It makes an archive of ``--cases`` studies (half DICOM series, half NIfTI; one seeded synthetic
chest of ``slices x size x size`` with a fresh noise realisation per case) and runs, each as its
own command line:

- ``loop``: ``ipv2-denoise denoise IN OUT.nrrd`` once per case (what a shell script does today);
- ``batch --prefetch 0``: the model loaded once, read, denoise and write one after the other;
- ``batch`` (prefetch 2): the same with a reader and a writer thread overlapping I/O and compute;
- ``batch --engine ray``: a local Ray cluster started by the command, ``--cpus-per-worker`` CPUs
  per actor (default: all cores in one actor);
- ``batch`` again on the finished output: every case verified and skipped (the cost of a rerun).

Per-case overhead is (wall time - network time) / cases, where the network time is measured in
this process on the same volumes (``Denoiser.denoise`` after a warm-up). Start-up is the time until
the command reported its model (or its Ray workers) ready. Prints a Markdown table and the ratios,
writes ``benchmarks/results/bench_batch.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def make_archive(root: Path, *, cases: int, slices: int, size: int, seed: int) -> list[Path]:
    """``cases`` studies under ``root``: even ones as DICOM series, odd ones as NIfTI files."""
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.io.dicom_export import export_derived_series
    from IPv2DenoiseLib.io.volumes import write_volume
    from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom

    spacing = (360.0 / size, 360.0 / size, 2.5)
    phantom = make_chest_phantom(shape=(slices, size, size), spacing=spacing, seed=seed)
    rng = np.random.default_rng(seed)
    inputs = []
    for k in range(cases):
        noisy = phantom.hu + rng.normal(0.0, 90.0, phantom.hu.shape).astype(np.float32)
        volume = Volume(noisy, spacing, (-180.0, -180.0, 2.5 * slices * k))
        if k % 2 == 0:
            folder = root / f"site{k % 3}" / f"patient{k:03d}" / "ct"
            export_derived_series(volume, folder)
            inputs.append(folder)
        else:
            path = root / f"site{k % 3}" / f"patient{k:03d}.nii.gz"
            path.parent.mkdir(parents=True, exist_ok=True)
            write_volume(volume, path)
            inputs.append(path)
    return inputs


def network_seconds(inputs: list[Path], device: str) -> float:
    """Time the network alone on every case (volumes already in memory, after a warm-up)."""
    from IPv2DenoiseLib.denoiser.model_reference import ModelReference
    from IPv2DenoiseLib.io.volumes import read_volume

    denoiser = ModelReference.resolve("default").load()
    volumes = [read_volume(p) for p in inputs]
    denoiser.denoise(volumes[0], device=device)
    start = time.perf_counter()
    for volume in volumes:
        denoiser.denoise(volume, device=device)
    return time.perf_counter() - start


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "IPv2DenoiseLib", *args]


def run_batch(args: list[str]) -> dict:
    """Run one ``batch --json-progress`` command; wall time, start-up time (model/workers ready), totals."""
    start = time.perf_counter()
    proc = subprocess.Popen(
        cli(*args, "--json-progress"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    ready, totals = None, None
    for line in proc.stdout:
        event = json.loads(line)
        if ready is None and ("device" in event or "worker_index" in event):
            ready = time.perf_counter() - start
        if "totals" in event:
            totals = event["totals"]
    proc.wait()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"batch {' '.join(args)} failed ({proc.returncode}): {proc.stderr.read()[-2000:]}")
    return {"wall_s": wall, "startup_s": ready, "totals": totals}


def run_loop(inputs: list[Path], out: Path, device: str) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for k, path in enumerate(inputs):
        result = subprocess.run(
            cli("denoise", str(path), str(out / f"case{k:03d}.nrrd"), "--device", device),
            capture_output=True,
            text=True,
        )
        if result.returncode != 0:
            raise SystemExit(f"denoise {path} failed: {result.stderr[-2000:]}")
    return {"wall_s": time.perf_counter() - start, "startup_s": None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--seed", type=int, default=9100)
    parser.add_argument("--device", default="cpu", help="device for every engine (default: %(default)s)")
    parser.add_argument(
        "--cpus-per-worker", type=float, default=float(os.cpu_count() or 1), help="Ray: CPUs per actor"
    )
    parser.add_argument("--no-ray", action="store_true", help="skip the Ray engine (Ray not installed)")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of each variant, alternating; the fastest counts"
    )
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = parser.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="ipv2_bench_batch_") as tmp:
        tmp = Path(tmp)
        print(f"making {args.cases} cases of {args.slices}x{args.size}x{args.size} ...", flush=True)
        inputs = make_archive(
            tmp / "archive", cases=args.cases, slices=args.slices, size=args.size, seed=args.seed
        )
        print("timing the network alone ...", flush=True)
        network = network_seconds(inputs, args.device)
        archive, common = str(tmp / "archive"), ["--device", args.device]
        variants = {
            "loop of `denoise` calls": lambda out: run_loop(inputs, out, args.device),
            "batch --prefetch 0": lambda out: run_batch(
                ["batch", archive, str(out), "--prefetch", "0", *common]
            ),
            "batch (local, prefetch 2)": lambda out: run_batch(["batch", archive, str(out), *common]),
        }
        if not args.no_ray:
            ray_args = ["--engine", "ray", "--cpus-per-worker", str(args.cpus_per_worker)]
            variants["batch --engine ray"] = lambda out: run_batch(
                ["batch", archive, str(out), *ray_args, *common]
            )
        runs: dict[str, dict] = {}
        for rep in range(args.repeat):  # alternate the variants; keep each one's fastest run
            for index, (name, variant) in enumerate(variants.items()):
                print(f"[{rep + 1}/{args.repeat}] {name} ...", flush=True)
                result = variant(tmp / f"out{rep}_{index}")
                if name not in runs or result["wall_s"] < runs[name]["wall_s"]:
                    runs[name] = result
        print("rerun on finished output ...", flush=True)
        runs["rerun (all verified, skipped)"] = run_batch(["batch", archive, str(tmp / "out0_2"), *common])
        load = os.getloadavg()[0]

    n = args.cases
    loop_wall = runs["loop of `denoise` calls"]["wall_s"]
    for name, r in runs.items():
        r["cases_per_hour"] = n / r["wall_s"] * 3600
        r["overhead_per_case_s"] = (r["wall_s"] - (0 if name.startswith("rerun") else network)) / n
        r["speedup_vs_loop"] = loop_wall / r["wall_s"]
        if r.get("startup_s") is not None and not name.startswith("rerun"):
            r["steady_cases_per_hour"] = n / (r["wall_s"] - r["startup_s"]) * 3600
    lines = [
        "| run | wall (s) | start-up (s) | cases/hour | steady cases/hour | overhead per case (s) | speed-up vs loop |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, r in runs.items():
        startup = f"{r['startup_s']:.1f}" if r.get("startup_s") is not None else "–"
        steady = f"{r['steady_cases_per_hour']:.0f}" if "steady_cases_per_hour" in r else "–"
        lines.append(
            f"| {name} | {r['wall_s']:.1f} | {startup} | {r['cases_per_hour']:.0f} | {steady} | "
            f"{r['overhead_per_case_s']:.2f} | {r['speedup_vs_loop']:.2f}x |"
        )
    plain, local = runs["batch --prefetch 0"], runs["batch (local, prefetch 2)"]
    ratios = [
        f"batch (local) / loop of denoise calls: {local['speedup_vs_loop']:.2f}x cases/hour",
        f"overlapped I/O (prefetch 2) / no overlap (prefetch 0): {plain['wall_s'] / local['wall_s']:.2f}x",
    ]
    if "batch --engine ray" in runs:
        ray_run = runs["batch --engine ray"]
        ratios.append(
            f"batch --engine ray / loop of denoise calls: {ray_run['speedup_vs_loop']:.2f}x cases/hour"
        )
        ratios.append(
            f"Ray / local, after start-up: {ray_run['steady_cases_per_hour'] / local['steady_cases_per_hour']:.2f}x"
        )
    import torch

    header = (
        f"{n} cases of {args.slices}x{args.size}x{args.size} (half DICOM series, half NIfTI), device {args.device}, "
        f"{os.cpu_count()} CPU cores, {platform.machine()}, torch {torch.__version__}; network alone "
        f"{network:.1f} s ({network / n:.2f} s per case); best of {args.repeat} alternating runs; load average "
        f"{load:.1f} at the end (other jobs shared the machine)"
    )
    text = "\n".join(["# bench_batch", "", header, "", *lines, "", *[f"- {r}" for r in ratios], ""])
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_batch.md").write_text(text, encoding="utf-8")
    document = {"setup": header, "network_s": network, "cases": n, "runs": runs, "ratios": ratios}
    (out / "bench_batch.json").write_text(json.dumps(document, indent=1), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
