"""``scripts/gpu_train_job.py`` (issue #24 item 5), its CPU path with a tiny budget: both tiers train
with the project's trainer, write weights, curves and the job record, and stop by themselves."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.models import build_model
from IPv2DenoiseLib.denoiser.weights import load_model
from IPv2DenoiseLib.io.volumes import write_volume

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "gpu_train_job.py"


def run_job(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, env=env, check=False
    )


def card_start(card_path: Path) -> dict:
    """The held-out real figures of the network a tier started from (its last leg's record)."""
    return json.loads(card_path.read_text())["legs"][-1]["validation_start"]


@pytest.mark.slow
def test_the_gpu_job_packs_a_corpus_trains_both_tiers_and_stops_by_itself(tmp_path) -> None:
    # a real normal-dose volume stand-in (its own noise stays in the label) for the packed corpus
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:96, :96]
    body = ((yy - 48) / 38) ** 2 + ((xx - 48) / 42) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0)[None] + rng.normal(0, 10, (6, 96, 96))
    real = tmp_path / "real.nrrd"
    write_volume(Volume(hu.astype(np.float32), spacing=(0.9, 0.9, 2.0)), real)
    corpus = tmp_path / "corpus.npz"
    held_out = tmp_path / "held_out.nrrd"  # another real scan, for validation only
    write_volume(Volume(hu[::-1].copy().astype(np.float32), spacing=(0.8, 0.8, 2.0)), held_out)
    packed = run_job(
        "--pack-corpus", str(corpus), "--real", str(real), "--val-real", str(held_out), "--tiny",
        "--max-slices", "4",
    )  # fmt: skip
    assert packed.returncode == 0, packed.stderr
    assert json.loads(packed.stdout)["volumes"] == [
        "real/real.nrrd", "real/held_out.nrrd", "phantom_100", "phantom_1000"
    ]  # fmt: skip
    with np.load(corpus) as arrays:  # a long real volume travels as its central slices
        assert sorted(arrays.files) == ["index", "real_0", "real_1"]  # phantoms are made from their seeds
        np.testing.assert_array_equal(
            arrays["real_0"], np.clip(np.rint(hu[1:5]), -1024, 3071).astype(np.int16)
        )
    refused = run_job("--pack-corpus", str(tmp_path / "x.npz"), "--real", str(real), "--max-slices", "2")
    assert refused.returncode == 2 and "--max-slices 2: need at least 3" in refused.stderr
    assert not (tmp_path / "x.npz").exists()

    out = tmp_path / "out"
    job = run_job(
        "--corpus", str(corpus), "--device", "cpu", "--minutes", "0.2", "--tiny", "--every-seconds", "2",
        "--out", str(out), "--work", str(tmp_path / "work"), "--workers", "1",
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    record = json.loads((out / "job.json").read_text())
    assert record["corpus"] == ["real/real.nrrd", "phantom_100"]  # the held-out scan is not trained on
    assert record["validation"] == ["phantom_1000", "real/held_out.nrrd"]
    assert record["phase"] == "done" and record["workers"] == 1  # slabs made in a worker process
    assert 0 < record["data_seconds"] <= record["startup_seconds"] <= record["wall_seconds"]
    for tier, arch in (("fast", "unet-nm"), ("quality", "unet-nm")):
        tier_record = record["tiers"][tier]
        assert tier_record["stopped_by"] == "max_minutes"  # the clock, not an iteration count
        assert tier_record["iterations"] >= 1
        # the pool (3) from the worker, then at least one new slab every 5 batches (max_stale_batches 4)
        assert tier_record["slabs_simulated"] >= 3 + tier_record["iterations"] // 5
        assert tier_record["validation"]["psnr_truth"] > 0
        for texture in ("projection", "image"):  # the held-out real scan, before and after
            assert tier_record["validation"][f"real_{texture}_psnr_label"] > 0
            assert card_start(out / f"{tier}.json")[f"real_{texture}_psnr_label"] > 0
        model, card = load_model(out / f"{tier}.safetensors")
        assert card["architecture"] == arch and model.ARCH == arch
        assert card["data"]["augmentation"]["fine_pixel_share"] == 0.25  # fine-pixel slabs, as leg 5
        assert card["legs"][-1]["stopped_by"] == "max_minutes"
        curves = json.loads((out / "curves.json").read_text())[tier]
        assert curves["iteration"][-1] == tier_record["iterations"]
        assert len(curves["val"]) == len(curves["loss"])
        assert (out / f"{tier}_curves.png").stat().st_size > 1000
    # flat, at most 8 files: what a lent GPU machine sends back; the optimiser state stays in --work
    assert len(list(out.iterdir())) == 8 and all(p.is_file() for p in out.iterdir())
    assert (tmp_path / "work" / "quality" / "checkpoint.pt").is_file()


def test_the_gpu_job_without_a_corpus_says_how_to_make_one(tmp_path) -> None:
    job = run_job("--out", str(tmp_path), "--device", "cpu")
    assert job.returncode == 2
    assert job.stderr.strip() == "error: give --corpus FILE (made by --pack-corpus), or --tiny"
    # a quality tier narrower than the shipped one is refused in one line before any work
    narrow = run_job(
        "--tiny", "--quality-channels", "16", "--out", str(tmp_path / "narrow"), "--device", "cpu"
    )
    assert narrow.returncode == 2 and not (tmp_path / "narrow").exists()
    assert narrow.stderr.strip() == "error: --quality-channels 16: at least the shipped width, 32"


def test_the_fast_presets_are_the_shipped_fast_network_so_the_job_can_fine_tune_it() -> None:
    """The GPU job's fast tier starts from the shipped fast model (``--init``): the fast preset of its
    architecture (``fast-texture`` since 2026-12-06) has its size, and every tensor fits."""
    from IPv2DenoiseLib.denoiser.model_reference import ModelCatalogue
    from IPv2DenoiseLib.denoiser.models import ARCH_PRESETS

    shipped, card = load_model(ModelCatalogue.read().entry("fast").weights)
    arch, kwargs = ARCH_PRESETS["fast-texture"]
    fresh = build_model(arch, **kwargs)
    assert card["architecture"] == arch and shipped.config == fresh.config
    fresh.load_state_dict(shipped.state_dict())  # every tensor fits
    assert ARCH_PRESETS["fast"][1] == kwargs  # the plain preset: the same size without the texture channel


def test_each_tier_of_the_gpu_job_starts_from_the_shipped_model_of_that_tier(tmp_path, monkeypatch) -> None:
    import hashlib
    import importlib.util
    import shutil

    from IPv2DenoiseLib.denoiser.model_reference import ModelCatalogue

    spec = importlib.util.spec_from_file_location("gpu_train_job", SCRIPT)
    job = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, job)  # its dataclasses look their module up
    spec.loader.exec_module(job)
    catalogue = ModelCatalogue.read()
    assert job.shipped_start("fast") == catalogue.entry("fast").weights != catalogue.entry("default").weights
    assert (
        job.shipped_start("quality")
        == catalogue.entry("quality").weights
        == catalogue.entry("default").weights
    )
    # a catalogue without a quality model: the quality tier starts from its default (to be widened)
    fast = catalogue.entry("fast").weights
    shutil.copy(fast, tmp_path / fast.name)
    sha = hashlib.sha256(fast.read_bytes()).hexdigest()
    only_fast = tmp_path / "models.json"
    only_fast.write_text(json.dumps({"default": "f", "models": {"f": {"file": fast.name, "sha256": sha}}}))
    assert job.shipped_start("quality", ModelCatalogue.read(only_fast)) == tmp_path / fast.name


def test_the_gpu_job_runs_without_simpleitk_as_on_the_gpu_machines_pytorch_image(tmp_path) -> None:
    """The lent GPU machine has PyTorch but no SimpleITK (50 MB: too big to carry beside the corpus):
    training, its data and the job import without it; only --pack-corpus reads volumes with it."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import importlib.abc, sys\n"
        "class NoSimpleITK(importlib.abc.MetaPathFinder):\n"
        "    def find_spec(self, name, path, target=None):\n"
        "        if name.split('.')[0] == 'SimpleITK':\n"
        "            raise ImportError('no SimpleITK here')\n"
        "sys.meta_path.insert(0, NoSimpleITK())\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{tmp_path}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    probe = subprocess.run(
        [sys.executable, "-c", "import SimpleITK"], capture_output=True, text=True, env=env, check=False
    )
    assert probe.returncode == 1 and "no SimpleITK here" in probe.stderr  # the blocker works
    job = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--device", "cpu", "--minutes", "0.05", "--tiers", "fast",
         "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
        capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, check=False,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr
    assert json.loads((tmp_path / "out" / "job.json").read_text())["tiers"]["fast"]["iterations"] >= 1


def test_the_gpu_job_trains_the_texture_aware_networks_when_asked(tmp_path) -> None:
    """``--texture``: each tier is the texture-aware preset of its size, sees both noise textures,
    and still starts from the shipped model of its tier (the trainer adds the channel at zero)."""
    import argparse
    import importlib.util

    spec = importlib.util.spec_from_file_location("gpu_train_job_texture", SCRIPT)
    job = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = job  # its dataclasses look their module up
    try:
        spec.loader.exec_module(job)
        args = argparse.Namespace(
            texture=True, tiny=False, fresh=False, work=tmp_path, pool=None, workers=0, device="cpu", seed=0,
            quality_channels=None,
        )  # fmt: skip
        for tier in ("fast", "quality"):
            config = job.tier_config(tier, args, "gpu", has_real=True)
            assert config.arch == "unet-nmt" and config.image_texture_share == job.TEXTURE_IMAGE_SHARE
            assert config.init_weights == str(job.shipped_start(tier))
        # without --texture a tier still fine-tunes its shipped network as it is (both texture-aware
        # since 2026-12-06: a plain preset would refuse the --init); from scratch it is the plain network
        plain = argparse.Namespace(**{**vars(args), "texture": False})
        for tier in ("fast", "quality"):
            config = job.tier_config(tier, plain, "gpu", has_real=True)
            assert config.arch == "unet-nmt" and config.image_texture_share == job.TEXTURE_IMAGE_SHARE
            shipped, _ = load_model(config.init_weights)
            build_model(config.arch, **config.model_kwargs).load_state_dict(shipped.state_dict())
        scratch = job.tier_config(
            "quality", argparse.Namespace(**{**vars(plain), "fresh": True}), "gpu", has_real=True
        )
        assert (
            scratch.arch == "unet-nm" and scratch.image_texture_share == 0.0 and scratch.init_weights is None
        )
        # --quality-channels 48: the quality tier wider, from the shipped weights (the trainer widens
        # them), or from scratch with --fresh; the fast tier keeps its width
        wide = argparse.Namespace(**{**vars(args), "quality_channels": 48})
        config = job.tier_config("quality", wide, "gpu", has_real=True)
        assert config.model_kwargs["base_channels"] == 48 and config.init_weights == str(
            job.shipped_start("quality")
        )
        assert job.tier_config("fast", wide, "gpu", has_real=True).model_kwargs["base_channels"] == 16
        fresh = job.tier_config(
            "quality", argparse.Namespace(**{**vars(wide), "fresh": True}), "gpu", has_real=True
        )
        assert fresh.model_kwargs["base_channels"] == 48 and fresh.init_weights is None
    finally:
        del sys.modules[spec.name]
    run = subprocess.run(
        [sys.executable, str(SCRIPT), "--tiny", "--texture", "--device", "cpu", "--minutes", "0.05",
         "--tiers", "fast", "--out", str(tmp_path / "out"), "--work", str(tmp_path / "work")],
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    record = json.loads((tmp_path / "out" / "job.json").read_text())["tiers"]["fast"]
    assert record["architecture"] == "unet-nmt" and record["iterations"] >= 1
