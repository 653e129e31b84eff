"""Inference benchmark: the default denoiser against classical baselines on held-out 2 % cases.

One command, one run::

    OMP_NUM_THREADS=2 python benchmarks/bench_infer.py [--weights FILE | --model default] [--data DIR] [--ensemble 8] [--refine] [--also-weights FILE ...]

Without ``--data`` it makes ``--cases`` held-out synthetic cases (default 2 of 512×512×16 at
0.7 mm, 2 % dose, anatomy seeds never used for training) with the project's own
``IPv2DenoiseLib.synthetic.dataset.make_dataset``. Every method runs in a fresh process (multiprocessing
``spawn``) limited to ``--threads`` threads, so its peak RSS (``resource.getrusage``
``ru_maxrss``) is its own; the table reports that peak and "RSS Δ", the peak minus the process's
resident memory just before denoising (after imports, loading the volumes and one warm-up call
on three slices). Speed counts only the denoising calls after the warm-up.

Quality is measured against the noise-free truth (the clean anatomy of the ULDCT acquisition,
``uldct_clean``): PSNR/SSIM in the lung window inside the body, noise = SD of (output − truth) in
homogeneous ROIs — vessel-free lung parenchyma, soft tissue, background air — plus the SD of the
error over the whole lungs (noise and vessel blur together) and the mean soft-tissue bias. Prints one Markdown
table, the model's speed ratio to each baseline and PASS/FAIL per goal (``--ensemble N`` adds the
model with an N-pass test-time flip ensemble, ``denoise --ensemble N``, and its gain and cost over
one pass; ``--refine`` adds the model with ``denoise --refine``, at that ensemble size); writes
``benchmarks/results/bench_infer.md`` and ``.json``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

GOALS = {
    "cpu_mvox_s": 1.0,  # the fast (default) tier on 2 idle CPU cores (issue #24)
    "psnr_margin_db": 2.0,  # over the best classical method
    "lung_noise_hu": 30.0,
    "background_noise_hu": 5.0,
    "soft_tissue_bias_hu": 5.0,
    "cuda_mvox_s": 100.0,
}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _worker(
    method: str, paths: list[str], out_dir: str, threads: int, model_spec: dict, device: str, queue
) -> None:
    """Runs in a fresh spawned process: load, denoise each case, report time and RSS."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    if method.endswith("_f32"):  # the float32 baseline of a model that runs in bf16 here
        os.environ["IPV2_DENOISE_FLOAT32"] = "1"  # denoiser.infer.FLOAT32_ENV (torch is not loaded yet)
    import torch

    torch.set_num_threads(threads)
    from IPv2DenoiseLib.io.volumes import read_volume

    vols = [read_volume(p) for p in paths]
    result = {"method": method, "seconds": 0.0, "voxels": 0, "outputs": []}
    denoise = None
    if method.startswith("model"):
        from IPv2DenoiseLib.denoiser.infer import autocast_dtype
        from IPv2DenoiseLib.denoiser.model_reference import ModelReference

        reference = ModelReference.resolve(model_spec.get("model", "default"), model_spec.get("weights"))
        ensemble = int(method.split("_ens")[1].split("_")[0]) if "_ens" in method else 1
        den = reference.load(ensemble=ensemble, refine=method.endswith("_refine"))
        result["model_name"] = den.name
        precision = autocast_dtype(torch.device(device), den.model)
        result["precision"] = str(precision).replace("torch.", "") if precision is not None else "float32"
        result["model_card"] = {
            k: den.card.get(k)
            for k in ("architecture", "kwargs", "parameters", "flops_per_voxel", "strategy", "iterations")
        }

        def denoise(hu):
            # the cases' own spacing: the refinement measures the noise's local SD over 10 mm
            return den.denoise_array(hu, remove_background=True, device=device, spacing=vols[0].spacing)
    elif method != "input":
        from IPv2DenoiseLib.imaging.classical import denoise_classical

        def denoise(hu):
            return denoise_classical(hu, method)

    if denoise is not None:  # warm-up outside the timed region: lazy imports, first-call set-up
        denoise(vols[0].array[:3])
    import psutil

    rss_before = psutil.Process().memory_info().rss / 2**20
    for i, vol in enumerate(vols):
        t = time.perf_counter()
        out = vol.array.copy() if denoise is None else denoise(vol.array)
        if device == "cuda":
            torch.cuda.synchronize()
        result["seconds"] += time.perf_counter() - t
        result["voxels"] += int(vol.array.size)
        path = Path(out_dir) / f"{method}_{device}_{i}.npy"
        np.save(path, np.asarray(out, np.float32))
        result["outputs"].append(str(path))
    result["rss_peak_mb"] = _rss_mb()
    result["rss_delta_mb"] = result["rss_peak_mb"] - rss_before
    queue.put(result)


def run_isolated(method: str, paths, out_dir, threads, model_spec, device) -> dict:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(
        target=_worker,
        args=(method, [str(p) for p in paths], str(out_dir), threads, model_spec, device, queue),
    )
    proc.start()
    try:
        result = queue.get(timeout=3600)
    finally:
        proc.join()
    if proc.exitcode != 0:
        raise SystemExit(f"{method} failed in its subprocess (exit {proc.exitcode})")
    return result


def add_held_out_case_arguments(parser: argparse.ArgumentParser) -> None:
    """The options :func:`held_out_cases` reads (shared with ``bench_fine_pixels.py``)."""
    parser.add_argument(
        "--data", default=None, help="dataset folder of held-out cases (with uldct_clean.nrrd)"
    )
    parser.add_argument("--cases", type=int, default=2)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--slices", type=int, default=16)
    parser.add_argument("--spacing", type=float, default=0.7)
    parser.add_argument(
        "--seed", type=int, default=9000, help="dataset seed (held out: training uses small seeds)"
    )
    parser.add_argument("--cache", default=os.path.join(tempfile.gettempdir(), "ipv2_bench_infer_cases"))


def held_out_cases(args) -> list[Path]:
    """Case folders: ``--data`` or freshly made synthetic ones (cached in ``--cache``)."""
    if args.data:
        root = Path(args.data)
        cases = sorted(
            c for c in root.iterdir() if (c / "uldct.nrrd").exists() and (c / "uldct_clean.nrrd").exists()
        )
        if (root / "test").is_dir():
            cases = sorted(c for c in (root / "test").iterdir() if (c / "uldct_clean.nrrd").exists())
        if not cases:
            raise SystemExit(f"--data {root}: no case folders with uldct.nrrd and uldct_clean.nrrd")
        return cases[-args.cases :]
    from IPv2DenoiseLib.synthetic.dataset import make_dataset

    cache = Path(args.cache)
    print(
        f"making {args.cases} held-out cases ({args.slices}x{args.size}x{args.size}, {args.spacing} mm) in {cache} ...",
        flush=True,
    )
    make_dataset(
        cache,
        cases=args.cases,
        seed=args.seed,
        size=args.size,
        slices=args.slices,
        spacing_mm=args.spacing,
        dose=0.02,
    )
    return sorted(c for c in cache.iterdir() if (c / "case.json").exists())[: args.cases]


def score(outputs: list[np.ndarray], truths: list[np.ndarray]) -> dict[str, float]:
    from IPv2DenoiseLib.imaging.masks import evaluation_rois
    from IPv2DenoiseLib.imaging.metrics import psnr, ssim

    acc: dict[str, list[float]] = {}
    for out, truth in zip(outputs, truths):
        masks = evaluation_rois(truth)
        diff = out.astype(np.float64) - truth
        values = {
            "psnr": psnr(truth, out, mask=masks["whole_body"]),
            "ssim": ssim(truth, out, mask=masks["whole_body"]),
            # noise in a homogeneous ROI (docs/results.md, metrics): the vessel-free parenchyma
            "lung_noise": float(diff[masks["lung_parenchyma"]].std()),
            # SD of the error over the whole lungs: residual noise plus vessel blur
            "lung_error": float(diff[masks["lungs"]].std()),
            "soft_tissue_noise": float(diff[masks["soft_tissue"]].std()),
            "background_noise": float(diff[masks["background"]].std()),
            "soft_tissue_bias": float(diff[masks["soft_tissue"]].mean()),
        }
        for k, v in values.items():
            acc.setdefault(k, []).append(v)
    return {k: float(np.mean(v)) for k, v in acc.items()}


def cpu_runs_bf16(model_spec: dict) -> bool:
    """Whether the product runs this model in bf16 on this CPU (then a float32 baseline row is added)."""
    import torch

    from IPv2DenoiseLib.denoiser.infer import autocast_dtype
    from IPv2DenoiseLib.denoiser.model_reference import ModelReference

    model = ModelReference.resolve(model_spec.get("model", "default"), model_spec.get("weights")).load().model
    return autocast_dtype(torch.device("cpu"), model) is not None


def planned_runs(
    args: argparse.Namespace, extra_models: list[str], *, cuda: bool, cpu_bf16: bool = False
) -> list[tuple[str, str]]:
    """(method, device) in the order they run: the input, the model and its variants, the extra
    models (each followed by its float32 baseline when ``cpu_bf16``: this CPU runs the networks in
    bf16), the classical methods, then the model (and its refinement) on the GPU when there is one."""
    runs = [("input", "cpu"), ("model", "cpu")] + [(m, "cpu") for m in args.methods]
    if args.ensemble > 1:
        runs.insert(2, (f"model_ens{args.ensemble}", "cpu"))
    if args.refine:
        runs.insert(2, (f"model_ens{args.ensemble}_refine" if args.ensemble > 1 else "model_refine", "cpu"))
    runs[2:2] = [(m, "cpu") for method in extra_models for m in (method, f"{method}_f32")[: 1 + cpu_bf16]]
    if cpu_bf16:
        runs.insert(2, ("model_f32", "cpu"))
    if cuda:
        runs += [("model", "cuda")] + ([("model_refine", "cuda")] if args.refine else [])
    return runs


def main(argv=None) -> int:
    from IPv2DenoiseLib.denoiser.ensemble import ENSEMBLE_SIZES

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--weights", default=None, help="safetensors weights (default: the registry's model)")
    parser.add_argument("--model", default="default", help="registry name when --weights is not given")
    parser.add_argument(
        "--also-weights",
        nargs="+",
        default=[],
        metavar="FILE",
        help="more models to time and score in the same run (e.g. each tier's weights)",
    )
    add_held_out_case_arguments(parser)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--methods", nargs="+", default=["nlm", "tv", "curvature"])
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    parser.add_argument(
        "--ensemble",
        type=int,
        default=1,
        choices=ENSEMBLE_SIZES,
        help="also run the model with this flip ensemble",
    )
    parser.add_argument(
        "--refine",
        action="store_true",
        help="also run the model (at --ensemble N when given) with the collaborative Wiener refinement",
    )
    args = parser.parse_args(argv)

    import torch

    from IPv2DenoiseLib.io.volumes import read_volume

    cases = held_out_cases(args)
    paths = [c / "uldct.nrrd" for c in cases]
    truths = [read_volume(c / "uldct_clean.nrrd").array for c in cases]
    model_spec = {"weights": args.weights, "model": args.model}
    extra_specs = {f"model_also{i}": {"weights": w} for i, w in enumerate(args.also_weights)}
    runs = planned_runs(
        args, list(extra_specs), cuda=torch.cuda.is_available(), cpu_bf16=cpu_runs_bf16(model_spec)
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method, device in runs:
            print(f"running {method} on {device} ...", flush=True)
            spec = extra_specs.get(method.removesuffix("_f32"), model_spec)
            r = run_isolated(method, paths, tmp, args.threads, spec, device)
            outputs = [np.load(p) for p in r.pop("outputs")]
            r.update(score(outputs, truths))
            r["device"] = device
            r["mvox_s"] = r["voxels"] / r["seconds"] / 1e6 if r["seconds"] > 0 else float("nan")
            rows.append(r)

    model = next(r for r in rows if r["method"] == "model" and r["device"] == "cpu")
    classical = [r for r in rows if r["method"] != "input" and not r["method"].startswith("model")]
    best = max(classical, key=lambda r: r["psnr"]) if classical else None
    header = (
        "| method | device | Mvoxel/s | s | peak RSS (MB) | RSS Δ (MB) | PSNR (dB) | SSIM | noise lung parenchyma (HU) "
        "| error whole lungs (HU) | noise soft tissue (HU) | noise background (HU) | bias soft tissue (HU) |"
    )
    lines = [header, "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        name = r["method"]
        if r["method"].startswith("model"):
            passes = (
                f", {r['method'].split('_ens')[1].split('_')[0]}-pass ensemble"
                if "_ens" in r["method"]
                else ""
            )
            passes += ", refined" if r["method"].endswith("_refine") else ""
            passes += f", {r.get('precision', 'float32')}"
            name = f"model ({r.get('model_name', '')}{passes})"
        speed = "–" if r["method"] == "input" else f"{r['mvox_s']:.3f}"
        lines.append(
            f"| {name} | {r['device']} | {speed} | {r['seconds']:.2f} | {r['rss_peak_mb']:.0f} | "
            f"{r['rss_delta_mb']:.0f} | {r['psnr']:.2f} | {r['ssim']:.3f} | {r['lung_noise']:.1f} | {r['lung_error']:.1f} | "
            f"{r['soft_tissue_noise']:.1f} | {r['background_noise']:.1f} | {r['soft_tissue_bias']:+.1f} |"
        )
    ratios = [f"model / {r['method']}: {model['mvox_s'] / r['mvox_s']:.2f}x" for r in classical]
    for r in rows:
        if r["method"].startswith("model_also") and not r["method"].endswith("_f32"):
            card = r.get("model_card") or {}
            ratios.append(
                f"{r.get('model_name')} ({card.get('architecture')}, {card.get('parameters')} parameters, "
                f"{card.get('flops_per_voxel')} FLOP/voxel): {r['mvox_s']:.3f} Mvoxel/s, "
                f"{r['mvox_s'] / model['mvox_s']:.2f}x the model's speed"
            )
        if r["method"].endswith("_f32"):
            fast = next(x for x in rows if x["method"] == r["method"].removesuffix("_f32"))
            ratios.append(
                f"{fast.get('model_name')} in {fast.get('precision')} against float32 (IPV2_DENOISE_FLOAT32=1): "
                f"{fast['mvox_s'] / r['mvox_s']:.2f}x the speed, {fast['psnr'] - r['psnr']:+.3f} dB PSNR, "
                f"soft-tissue bias {fast['soft_tissue_bias']:+.1f} against {r['soft_tissue_bias']:+.1f} HU"
            )
        if r["method"].startswith(("model_ens", "model_refine")) and r["device"] == "cpu":
            ratios.append(
                f"{r['method']}: {r['psnr'] - model['psnr']:+.2f} dB PSNR over one pass, "
                f"at {r['mvox_s'] / model['mvox_s']:.2f}x its speed"
            )
    goals = [
        (
            f"CPU speed >= {GOALS['cpu_mvox_s']:g} Mvoxel/s",
            model["mvox_s"] >= GOALS["cpu_mvox_s"],
            f"{model['mvox_s']:.3f}",
        )
    ]
    if best is not None:
        goals.append(
            (
                f"PSNR >= best classical ({best['method']} {best['psnr']:.2f}) + 2 dB",
                model["psnr"] >= best["psnr"] + GOALS["psnr_margin_db"],
                f"{model['psnr']:.2f}",
            )
        )
    goals += [
        (
            "lung (parenchyma) noise <= 30 HU",
            model["lung_noise"] <= GOALS["lung_noise_hu"],
            f"{model['lung_noise']:.1f}",
        ),
        (
            "background noise <= 5 HU",
            model["background_noise"] <= GOALS["background_noise_hu"],
            f"{model['background_noise']:.1f}",
        ),
        (
            "|soft-tissue bias| <= 5 HU",
            abs(model["soft_tissue_bias"]) <= GOALS["soft_tissue_bias_hu"],
            f"{model['soft_tissue_bias']:+.1f}",
        ),
    ]
    cuda = [r for r in rows if r["method"] == "model" and r["device"] == "cuda"]
    if cuda:
        goals.append(
            (
                "CUDA speed >= 100 Mvoxel/s",
                cuda[0]["mvox_s"] >= GOALS["cuda_mvox_s"],
                f"{cuda[0]['mvox_s']:.1f}",
            )
        )
    shape = read_volume(paths[0]).shape
    meta = (
        f"{len(cases)} held-out cases of {shape[0]}x{shape[1]}x{shape[2]} voxels, {args.threads} threads per method, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"model card: {json.dumps(model.get('model_card'))}"
    )
    text = "\n".join(
        [
            f"# bench_infer\n\n{meta}\n",
            *lines,
            "",
            "Speed ratios: " + ", ".join(ratios),
            "",
            *[f"- {'PASS' if ok else 'FAIL'}: {name} (measured {value})" for name, ok, value in goals],
        ]
    )
    print(text)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench_infer.md").write_text(text + "\n", encoding="utf-8")
    (out / "bench_infer.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "rows": rows,
                "goals": [{"goal": n, "pass": bool(ok), "measured": v} for n, ok, v in goals],
            },
            indent=1,
        ),
        encoding="utf-8",
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
