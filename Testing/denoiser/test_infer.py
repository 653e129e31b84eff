"""Inference: slab stitching, 2.5D margins, progress/cancel, OOM fallback, Remove Background, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from IPv2DenoiseLib.app.cli import main as cli_main
from IPv2DenoiseLib.core.device import describe_device, resolve_device
from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.core.progress import Cancelled, CancelToken
from IPv2DenoiseLib.core.volume import Volume
from IPv2DenoiseLib.denoiser.ensemble import dihedral, undo_dihedral
from IPv2DenoiseLib.denoiser.infer import AIR_HU, Denoiser
from IPv2DenoiseLib.denoiser.models import UNet
from IPv2DenoiseLib.denoiser.models.base import Denoiser2p5D
from IPv2DenoiseLib.denoiser.weights import save_model
from IPv2DenoiseLib.io.volumes import read_volume, write_volume


class AddOneWithNeighbours(Denoiser2p5D):
    """Exact test predictor: centre + 1 + (above − below) / 4, in network units."""

    ARCH = "test"

    def __init__(self, in_slices: int = 3) -> None:
        super().__init__(in_slices)

    def activation_floats_per_pixel(self) -> int:
        return 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.centre(x) + 1.0 + (x[:, :1] - x[:, -1:]) / 4.0


def _expected(hu: np.ndarray, in_slices: int = 3) -> np.ndarray:
    """What :class:`AddOneWithNeighbours` gives, computed directly with edge-replicated slices."""
    m = in_slices // 2
    x = (np.clip(hu.astype(np.float64), -1024, 3071) + 1000) / 1000
    padded = np.concatenate([x[:1]] * m + [x] + [x[-1:]] * m)
    above, below = padded[: len(x)], padded[2 * m :]
    return (x + 1 + (above - below) / 4) * 1000 - 1000


def _arange_volume(shape=(7, 33, 35)) -> np.ndarray:
    return (np.arange(np.prod(shape), dtype=np.float32).reshape(shape) % 3001) - 1000


def _chest(shape=(5, 48, 56), seed=0) -> np.ndarray:
    """Air around an elliptic 40 HU body holding two −850 HU lungs, plus 20 HU noise."""
    z, h, w = shape
    yy, xx = np.mgrid[:h, :w]
    body = ((yy - h / 2) / (0.4 * h)) ** 2 + ((xx - w / 2) / (0.42 * w)) ** 2 < 1
    lungs = np.zeros_like(body)
    for cx in (0.33 * w, 0.67 * w):
        lungs |= ((yy - h / 2) / (0.25 * h)) ** 2 + ((xx - cx) / (0.12 * w)) ** 2 < 1
    img = np.where(body, 40.0, -1000.0)
    img[lungs] = -850.0
    noise = np.random.default_rng(seed).normal(0, 20, shape)
    return (img[None] + noise).astype(np.float32)


class RecordingRunner:
    """Slab runner that computes on the CPU, records (slab size, device), raises OOM on demand."""

    def __init__(self, oom_when=lambda n, device, call: False) -> None:
        self.calls: list[tuple[int, str]] = []
        self.oom_when = oom_when

    def __call__(self, model, batch, device):
        self.calls.append((batch.shape[0], device.type))
        if self.oom_when(batch.shape[0], device, len(self.calls)):
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        with torch.inference_mode():
            return model(batch.contiguous()).float()


# ------------------------------------------------------------------------------------ stitching


@pytest.mark.parametrize("in_slices", [1, 3, 5])
def test_no_slab_seams_for_any_slab_size(in_slices):
    hu = _arange_volume()
    denoiser = Denoiser(AddOneWithNeighbours(in_slices))
    results = [
        denoiser.denoise_array(hu, remove_background=False, device="cpu", slab_slices=s)
        for s in (1, 3, 7, None)
    ]
    np.testing.assert_allclose(results[0], _expected(hu, in_slices), atol=2e-3)
    for other in results[1:]:
        np.testing.assert_array_equal(other, results[0])


def test_single_slice_volume_works_with_a_2p5d_model():
    hu = _arange_volume((1, 33, 35))
    out = Denoiser(AddOneWithNeighbours(5)).denoise_array(hu, remove_background=False, device="cpu")
    assert out.shape == hu.shape and out.dtype == np.float32
    np.testing.assert_allclose(out, hu + 1000, atol=2e-3)


def test_real_unet_is_deterministic_and_slab_independent():
    torch.manual_seed(0)
    model = UNet(in_slices=3, base_channels=4)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    denoiser = Denoiser(model)
    hu = _chest((6, 33, 35))
    a = denoiser.denoise_array(hu, device="cpu", slab_slices=4)
    b = denoiser.denoise_array(hu, device="cpu", slab_slices=4)
    c = denoiser.denoise_array(hu, device="cpu", slab_slices=1)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a, c, atol=1e-2)
    assert np.abs(a - hu).max() > 1.0  # the network did something


def test_denoise_keeps_geometry_and_leaves_the_input_untouched():
    hu = _chest()
    volume = Volume(
        hu,
        spacing=(0.7, 0.7, 2.5),
        origin=(-170, -160, 30),
        direction=(1, 0, 0, 0, -1, 0, 0, 0, 1),
        meta={"PatientID": "P1"},
    )
    before = volume.array.copy()
    out = Denoiser(AddOneWithNeighbours(), name="test-model").denoise(
        volume, device="cpu", remove_background=False
    )
    assert out.same_geometry(volume) and out.array is not volume.array
    np.testing.assert_array_equal(volume.array, before)
    assert out.meta["PatientID"] == "P1" and out.meta["denoiser"] == "test-model"
    np.testing.assert_allclose(out.array, _expected(hu), atol=2e-3)


def test_remove_background_sets_outside_air_to_minus_1000_only():
    hu = _chest()
    identity = Denoiser(UNet(in_slices=3, base_channels=4))  # zero head: output = input
    kept = identity.denoise_array(hu, device="cpu", remove_background=False)
    np.testing.assert_allclose(kept, np.clip(hu, -1024, 3071), atol=1e-3)  # normalisation clips
    removed = identity.denoise_array(hu, device="cpu")
    _, h, w = hu.shape
    assert np.all(removed[:, :3, :3] == AIR_HU) and np.all(removed[:, -3:, -3:] == AIR_HU)  # far air
    tissue = hu > -900.0
    np.testing.assert_array_equal(removed[tissue], kept[tissue])  # blended off tissue, never on it
    lung = (slice(None), h // 2, int(0.33 * w))
    np.testing.assert_array_equal(removed[lung], kept[lung])  # enclosed air is not background
    assert np.std(removed[lung]) > 5
    centre = (slice(None), h // 2, w // 2)
    np.testing.assert_array_equal(removed[centre], kept[centre])


# -------------------------------------------------------------------------- progress and cancel


def test_progress_is_monotone_and_reaches_the_total():
    calls = []
    Denoiser(AddOneWithNeighbours()).denoise_array(
        _arange_volume(), device="cpu", slab_slices=3, progress=lambda d, t, m: calls.append((d, t, m))
    )
    done = [d for d, _, _ in calls]
    assert done == sorted(done) and done[0] == 0 and done[-1] == 7
    assert {t for _, t, _ in calls} == {7}
    assert all(isinstance(m, str) and m for _, _, m in calls)


def test_cancel_between_slabs_raises_cancelled_and_stops_work():
    token = CancelToken()
    runner = RecordingRunner()

    def progress(done, total, message):
        if done >= 2:
            token.cancel()

    with pytest.raises(Cancelled):
        Denoiser(AddOneWithNeighbours(), runner=runner).denoise_array(
            _arange_volume(), device="cpu", slab_slices=2, progress=progress, cancel=token
        )
    assert len(runner.calls) == 1


# ------------------------------------------------------------------------------ out of memory


def test_oom_halves_the_slab_and_retries():
    hu = _arange_volume()
    runner = RecordingRunner(oom_when=lambda n, device, call: call == 1)
    messages = []
    out = Denoiser(AddOneWithNeighbours(), runner=runner).denoise_array(
        hu, device="cpu", slab_slices=7, remove_background=False, progress=lambda d, t, m: messages.append(m)
    )
    assert [n for n, _ in runner.calls] == [7, 3, 3, 1]
    assert any("retrying with 3-slice slabs" in m for m in messages)
    np.testing.assert_allclose(out, _expected(hu), atol=2e-3)


def test_oom_on_the_gpu_at_one_slice_falls_back_to_the_cpu():
    hu = _arange_volume()
    runner = RecordingRunner(oom_when=lambda n, device, call: device.type == "cuda")
    messages = []
    # a torch.device is used as given, so the CUDA path runs here without a GPU (the runner fakes it)
    out = Denoiser(AddOneWithNeighbours(), runner=runner).denoise_array(
        hu,
        device=torch.device("cuda"),
        slab_slices=4,
        remove_background=False,
        progress=lambda d, t, m: messages.append(m),
    )
    assert runner.calls[:3] == [(4, "cuda"), (2, "cuda"), (1, "cuda")]
    assert {dev for _, dev in runner.calls[3:]} == {"cpu"} and sum(n for n, _ in runner.calls[3:]) == 7
    assert any("continuing on the CPU" in m for m in messages)
    np.testing.assert_allclose(out, _expected(hu), atol=2e-3)


def test_oom_on_the_cpu_at_one_slice_is_a_user_error():
    runner = RecordingRunner(oom_when=lambda n, device, call: True)
    with pytest.raises(UserError, match="out of memory"):
        Denoiser(AddOneWithNeighbours(), runner=runner).denoise_array(_arange_volume(), device="cpu")


def test_slab_size_follows_the_memory_budget():
    denoiser = Denoiser(UNet())
    cpu = torch.device("cpu")
    small = denoiser.slab_size((512, 512), cpu, memory_budget_mb=100)
    large = denoiser.slab_size((512, 512), cpu, memory_budget_mb=1000)
    assert 1 <= small < large
    assert denoiser.slab_size((512, 512), cpu, memory_budget_mb=1) == 1


def test_bad_inputs_are_user_errors():
    d = Denoiser(AddOneWithNeighbours())
    with pytest.raises(UserError, match=r"3-D \[z, y, x\].*\(4, 5\)"):
        d.denoise_array(np.zeros((4, 5)))
    with pytest.raises(UserError, match="slab_slices"):
        d.denoise_array(np.zeros((2, 4, 5)), slab_slices=0)


# ------------------------------------------------------------------------ registry and device


def test_from_registry_loads_by_name_and_checks_sha256(tmp_path):
    torch.manual_seed(3)
    model = UNet(in_slices=3, base_channels=4)
    card = save_model(model, tmp_path / "tiny.safetensors", {"strategy": "ipv2"})
    registry = {
        "default": "tiny",
        "models": {"tiny": {"file": "tiny.safetensors", "sha256": card["sha256"], "summary": "test"}},
    }
    path = tmp_path / "models.json"
    path.write_text(json.dumps(registry))
    d = Denoiser.from_registry(models_json=path)
    assert d.name == "tiny" and d.card["strategy"] == "ipv2"
    with pytest.raises(UserError, match="unknown model 'big'.*known models: tiny"):
        Denoiser.from_registry("big", models_json=path)
    registry["models"]["tiny"]["sha256"] = "f" * 64
    path.write_text(json.dumps(registry))
    with pytest.raises(UserError, match="checksum mismatch"):
        Denoiser.from_registry("tiny", models_json=path)


def test_shipped_registry_parses():
    from IPv2DenoiseLib.core.resources import models_dir

    registry = json.loads((models_dir() / "models.json").read_text())
    assert "default" in registry and isinstance(registry["models"], dict)
    for name, entry in registry["models"].items():
        assert (models_dir() / entry["file"]).is_file(), name
        assert len(entry["sha256"]) == 64


def test_device_resolution_and_description():
    assert resolve_device("cpu") == torch.device("cpu")
    assert describe_device("cpu") == f"CPU ({torch.get_num_threads()} threads)"
    with pytest.raises(UserError, match="--device 'tpu' is not one of auto, cpu, cuda, mps"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(
            UserError, match="^CUDA requested but no CUDA GPU is available; use --device auto or cpu$"
        ):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_autocast_matches_cpu():
    torch.manual_seed(0)
    model = UNet(in_slices=3, base_channels=8)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    hu = _chest((4, 64, 64))
    cpu = Denoiser(model).denoise_array(hu, device="cpu")
    gpu = Denoiser(model).denoise_array(hu, device="cuda")
    assert np.abs(cpu - gpu).max() < 20.0  # bf16/fp16 autocast, HU


# ------------------------------------------------------------------------------------------ CLI


@pytest.fixture
def cli_case(tmp_path):
    volume = Volume(_chest((4, 40, 44)), spacing=(0.8, 0.8, 2.0), origin=(1.0, 2.0, 3.0))
    write_volume(volume, tmp_path / "in.nrrd")
    torch.manual_seed(4)
    model = UNet(in_slices=3, base_channels=4)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    save_model(model, tmp_path / "w.safetensors", {"strategy": "ipv2"})
    return tmp_path, volume


def test_cli_json_progress_protocol(cli_case, capsys):
    tmp, volume = cli_case
    rc = cli_main(
        [
            "denoise",
            str(tmp / "in.nrrd"),
            str(tmp / "out.nrrd"),
            "--weights",
            str(tmp / "w.safetensors"),
            "--device",
            "cpu",
            "--slab",
            "1",
            "--json-progress",
        ]
    )
    assert rc == 0
    records = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert records[0]["device"].startswith("CPU (")
    assert {"model": "w.safetensors"} in records  # announced once loaded, inside the progress
    provenance = [r["provenance"] for r in records if "provenance" in r]  # the weights that ran
    assert (
        len(provenance) == 1
        and provenance[0]["name"] == "w.safetensors"
        and len(provenance[0]["sha256"]) == 64
    )
    progress = [r for r in records[1:-1] if not {"model", "warning", "provenance"} & set(r)]
    assert all(set(r) == {"progress", "eta_s", "message"} for r in progress)
    fractions = [r["progress"] for r in progress]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and len(fractions) >= 5
    assert records[-1]["result"] == str(tmp / "out.nrrd") and records[-1]["seconds"] >= 0
    out = read_volume(tmp / "out.nrrd")
    assert out.same_geometry(volume)
    direct = Denoiser.from_file(tmp / "w.safetensors").denoise(volume, device="cpu")
    np.testing.assert_allclose(out.array, direct.array, atol=1e-3)


def test_cli_cuda_without_gpu_is_a_one_line_error(cli_case, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA GPU")
    tmp, _ = cli_case
    rc = cli_main(
        [
            "denoise",
            str(tmp / "in.nrrd"),
            str(tmp / "out.nrrd"),
            "--weights",
            str(tmp / "w.safetensors"),
            "--device",
            "cuda",
        ]
    )
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.endswith("CUDA requested but no CUDA GPU is available; use --device auto or cpu")
    assert "\n" not in err and not (tmp / "out.nrrd").exists()


def test_cli_unknown_model_lists_known_names(cli_case, capsys):
    tmp, _ = cli_case
    rc = cli_main(["denoise", str(tmp / "in.nrrd"), str(tmp / "out.nrrd"), "--model", "no-such-model"])
    assert rc == 2 and "unknown model 'no-such-model'" in capsys.readouterr().err
    assert not (tmp / "out.nrrd").exists()


def test_ensemble_is_the_mean_of_the_flipped_and_transposed_passes():
    torch.manual_seed(0)
    model = UNet(in_slices=3, base_channels=4, levels=2)
    with torch.no_grad():  # a non-symmetric network, so every transform gives another output
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    hu = np.random.default_rng(1).normal(0.0, 60.0, (3, 24, 32)).astype(np.float32)
    one = Denoiser(model)
    kwargs = {"device": "cpu", "remove_background": False}
    for n in (2, 4, 8):
        manual = []
        for index in range(n):
            t = dihedral(torch.from_numpy(hu), index).contiguous().numpy()
            manual.append(undo_dihedral(torch.from_numpy(one.denoise_array(t, **kwargs)), index).numpy())
        np.testing.assert_allclose(
            Denoiser(model, ensemble=n).denoise_array(hu, **kwargs), np.mean(manual, 0), atol=1e-3
        )
    assert not np.allclose(manual[0], manual[5], atol=1e-2)
    assert one.denoise_array(hu, ensemble=8, **kwargs) == pytest.approx(
        Denoiser(model, ensemble=8).denoise_array(hu, **kwargs), abs=1e-5
    )
    for bad in (0, 3, 16, True):
        with pytest.raises(UserError, match="ensemble must be one of 1, 2, 4, 8"):
            Denoiser(model, ensemble=bad)


def test_ensemble_of_the_shipped_model_is_closer_to_the_truth():
    from IPv2DenoiseLib.physics.lowdose import simulate_low_dose
    from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom

    truth = make_chest_phantom(shape=(3, 160, 160), spacing=(2.0, 2.0, 1.25), seed=21).hu
    noisy = simulate_low_dose(truth, dose=0.02, spacing_mm=2.0, seed=5, device="cpu")
    shipped = Denoiser.from_registry("default")
    body = truth > -900

    def rmse(ensemble: int) -> float:
        out = shipped.denoise_array(noisy, device="cpu", remove_background=False, ensemble=ensemble)
        return float(np.sqrt(np.mean((out - truth)[1][body[1]] ** 2)))

    assert rmse(8) < 0.98 * rmse(1)
