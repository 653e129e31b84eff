"""``benchmarks/bench_real_anatomy.py --volume``: the real-anatomy protocol on a dev set of other volumes."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.io.volumes import read_volume, write_volume

REPO = Path(__file__).resolve().parents[2]
#: The shared real corpus (20 abdomen slices, Apache-2.0; ../shared/data/real-ct/README.md): the
#: shared data folder beside the checkout, as CI has it (README, testing).
ABDOMEN = REPO.parent / "shared" / "data" / "real-ct" / "abdomen-series"
sys.path.insert(0, str(REPO / "benchmarks"))
import bench_real_anatomy  # noqa: E402


@pytest.fixture
def abdomen() -> Path:
    """The shared abdomen series; without it the test fails in one line saying where it belongs."""
    if not ABDOMEN.is_dir() or not any(ABDOMEN.iterdir()):
        pytest.fail(
            f"the shared real-CT data is missing: expected the abdomen series in {ABDOMEN} (the shared "
            "data folder ../shared beside the checkout, as CI has it; see README.md, testing)",
            pytrace=False,
        )
    return ABDOMEN


def test_dev_volume_is_scored_against_tuned_classical_oracles_and_keeps_the_test_results(
    abdomen, tmp_path, capsys, monkeypatch
) -> None:
    """Three real abdomen slices (the shared corpus, 512² at 0.98 mm, the outside of the reconstruction
    circle at -2048 HU as LIDC's GE scans write it) run through the benchmark's protocol: both noise
    models, NLM/TV oracles, the fast network's margin; the outside reads as air; without --json and
    --figure it is refused, so the committed results of the test images stay as they are."""
    volume = read_volume(abdomen)
    hu = volume.array[8:11].astype(np.float32)
    yy, xx = np.mgrid[: hu.shape[1], : hu.shape[2]]
    outside = np.hypot(yy - 255.5, xx - 255.5) > 256
    hu[:, outside] = -2048.0
    path = tmp_path / "dev.nrrd"
    write_volume(Volume(hu, volume.spacing), path)

    image = bench_real_anatomy.volume_image(f"{path}:1")
    truth, pixel_mm = bench_real_anatomy.load_image(image)
    assert image.name == "dev@1" and np.all(truth[outside] == -1024.0)
    assert np.array_equal(truth[~outside], hu[2][~outside]) and pixel_mm == pytest.approx(volume.spacing[0])

    committed = REPO / "benchmarks/results/bench_real_anatomy.json"
    before = committed.read_bytes() if committed.exists() else None
    with pytest.raises(SystemExit) as refused:
        bench_real_anatomy.main(["--volume", str(path), "--bm3d", "off", "--model", "fast"])
    assert refused.value.code == 2 and "needs --json and --figure" in capsys.readouterr().err
    with pytest.raises(SystemExit) as missing:
        bench_real_anatomy.main(["--volume", str(tmp_path / "none.nrrd"), "--json", "x", "--figure", "y"])
    assert missing.value.code == 2 and "none.nrrd not found" in capsys.readouterr().err
    with monkeypatch.context() as without_bm3d:  # the [bench] extra not installed: one line, no work
        without_bm3d.setitem(sys.modules, "bm3d", None)
        with pytest.raises(SystemExit) as no_bm3d:
            bench_real_anatomy.main(["--volume", str(path), "--json", "x", "--figure", "y"])
    assert no_bm3d.value.code == 2 and capsys.readouterr().err.strip() == (
        "bench_real_anatomy: BM3D is not installed: pip install -e '.[bench]' (or --bm3d off)"
    )

    out = tmp_path / "dev.json"
    code = bench_real_anatomy.main(
        ["--volume", f"{path}:1", "--bm3d", "off", "--model", "fast", "--threads", "1"]
        + ["--json", str(out), "--figure", str(tmp_path / "dev.png")]
    )
    assert code == 0 and (tmp_path / "dev.png").stat().st_size > 0
    record = json.loads(out.read_text())
    noise = record["images"]["dev@1"]["noise"]
    assert set(noise) == {"projection", "smooth-nps"}
    for result in noise.values():
        rows = result["rows"]
        assert result["best_oracle"] in ("nlm_oracle", "tv_oracle")
        assert rows["input"]["psnr"] < rows[result["best_oracle"]]["psnr"]  # the oracles denoise
        margin = result["margins_db"]["model:fast"]
        assert margin == pytest.approx(rows["model:fast"]["psnr"] - rows[result["best_oracle"]]["psnr"])
        assert rows["model:fast"]["psnr"] > rows["input"]["psnr"] + 3.0  # the network denoises this slice
    assert (committed.read_bytes() if committed.exists() else None) == before
    # --strength: every network row at that denoising strength, named for it, and a different image
    weaker = tmp_path / "dev_weaker.json"
    code = bench_real_anatomy.main(
        ["--volume", f"{path}:1", "--bm3d", "off", "--model", "fast", "--threads", "1", "--strength", "0.7"]
        + ["--json", str(weaker), "--figure", str(tmp_path / "dev_weaker.png")]
    )
    assert code == 0
    for name, result in json.loads(weaker.read_text())["images"]["dev@1"]["noise"].items():
        rows = result["rows"]
        assert (
            "model:fast" not in rows
            and rows["model:fast@0.7"]["psnr"] != noise[name]["rows"]["model:fast"]["psnr"]
        )
        # the same oracles (the same noisy image): only the network rows moved
        assert rows[result["best_oracle"]]["psnr"] == pytest.approx(
            noise[name]["rows"][result["best_oracle"]]["psnr"]
        )
