"""Scanner-like noise: bowtie, tube-current modulation, kernels and slice correlation (issue #14)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging.noise_estimate import noise_streakiness
from IPv2DenoiseLib.physics.scanner_noise import (
    MAX_Z_CORRELATION,
    ProtocolRanges,
    ScannerProtocol,
    bowtie_transmission,
    correlate_slices,
    draw_protocol,
    image_domain_texture,
    mixing_weight,
    noise_power_spectrum,
    scanner_noise,
    tcm_factor,
)
from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom


@pytest.mark.parametrize("rho", [0.0, 0.2, 0.45, 0.7])
def test_slice_mixing_reaches_the_asked_correlation_and_keeps_variance(rho) -> None:
    noise = np.random.default_rng(0).standard_normal((40, 64, 64)).astype(np.float32)
    mixed = correlate_slices(noise, rho)
    a, b = mixed[1:-2].ravel(), mixed[2:-1].ravel()
    assert np.corrcoef(a, b)[0, 1] == pytest.approx(rho, abs=0.02)
    assert mixed[1:-1].std() == pytest.approx(1.0, abs=0.02)


def test_mixing_weight_bounds() -> None:
    assert mixing_weight(0.0) == 0.0
    assert mixing_weight(MAX_Z_CORRELATION) == pytest.approx(1 / np.sqrt(2), abs=1e-6)
    with pytest.raises(UserError):
        mixing_weight(0.9)


def test_bowtie_and_tcm_shapes() -> None:
    t = bowtie_transmission(torch.linspace(-250, 250, 101))
    assert t[50] == pytest.approx(1.0) and t.min() >= 0.079 and (t[50:].diff() <= 1e-7).all()
    p = torch.zeros(2, 8, 30)
    p[:, ::2, 10:20] = 4.0  # every other view crosses more tissue
    m = tcm_factor(p, alpha=0.5)
    assert m.shape == (2, 8, 1) and m.mean(dim=1).allclose(torch.ones(2, 1))
    assert (m[:, ::2] > m[:, 1::2]).all()


def test_scanner_noise_texture_and_periphery() -> None:
    ph = make_chest_phantom(shape=(3, 128, 128), spacing=(2.8, 2.8, 2.5), seed=2).hu
    kw = {"spacing_mm": 2.8, "seed": 3}
    ramp = (
        scanner_noise(ph, ScannerProtocol(dose=0.002, bowtie=False, tcm=0.0, geometry="parallel"), **kw) - ph
    )
    hann = (
        scanner_noise(
            ph, ScannerProtocol(dose=0.002, kernel="hann", bowtie=False, tcm=0.0, geometry="parallel"), **kw
        )
        - ph
    )
    bowtie = (
        scanner_noise(ph, ScannerProtocol(dose=0.002, bowtie=True, tcm=0.0, geometry="parallel"), **kw) - ph
    )
    body = (slice(None), slice(54, 74), slice(54, 74))
    air = (slice(None), slice(2, 12), slice(2, 12))
    assert hann[body].std() < 0.8 * ramp[body].std()
    assert bowtie[air].std() > 1.3 * ramp[air].std()  # peripheral rays get fewer photons
    corr = scanner_noise(ph, ScannerProtocol(dose=0.002, z_correlation=0.6, geometry="parallel"), **kw) - ph
    assert np.corrcoef(corr[0][body[1:]].ravel(), corr[1][body[1:]].ravel())[0, 1] > 0.3


def test_draw_protocol_covers_the_ranges() -> None:
    rng = np.random.default_rng(0)
    protocols = [draw_protocol(rng) for _ in range(200)]
    assert {p.kernel for p in protocols} == {"ramp", "shepp-logan", "cosine", "hann"}
    assert {p.geometry for p in protocols} == {"fan", "parallel"}
    doses = [p.dose for p in protocols]
    assert 0.01 <= min(doses) < 0.013 and 0.03 < max(doses) <= 0.04
    assert any(p.z_correlation == 0 for p in protocols) and max(p.z_correlation for p in protocols) > 0.5


def test_pixels_finer_than_the_detector_get_a_detectors_noise_grain() -> None:
    """A 0.3 mm reconstruction's noise is a 0.6 mm detector's, interpolated (as in the benchmark's
    projection noise), not 0.3 mm grain: neighbouring pixels' noise is correlated (0.66; simulated
    on the 0.3 mm grid itself it was white, -0.07)."""
    coarse = make_chest_phantom(shape=(3, 160, 160), spacing=(1.2, 1.2, 2.5), seed=4).hu
    fine = np.stack([np.kron(s, np.ones((4, 4), np.float32)) for s in coarse])  # same body, 0.3 mm
    protocol = ScannerProtocol(dose=0.02, kernel="shepp-logan", bowtie=False, tcm=0.0, geometry="parallel")
    noise = (scanner_noise(fine, protocol, spacing_mm=0.3, seed=1) - fine)[:, 200:440, 200:440]
    assert np.corrcoef(noise[..., 1:].ravel(), noise[..., :-1].ravel())[0, 1] > 0.5


def test_draw_protocol_gives_the_image_texture_its_share_only_when_asked() -> None:
    assert {draw_protocol(np.random.default_rng(0)).texture for _ in range(50)} == {"projection"}
    rng = np.random.default_rng(1)
    textures = [draw_protocol(rng, ProtocolRanges(image_texture_share=0.35)).texture for _ in range(400)]
    assert textures.count("image") / len(textures) == pytest.approx(0.35, abs=0.07)
    # the draws of a range without it are those of before (the texture is drawn last, if at all)
    before = [draw_protocol(np.random.default_rng(5)) for _ in range(3)]
    after = [
        draw_protocol(np.random.default_rng(5), ProtocolRanges(image_texture_share=0.0)) for _ in range(3)
    ]
    assert before == after
    with pytest.raises(UserError):
        ScannerProtocol(texture="iterative")


def test_image_texture_keeps_the_level_spectrum_and_local_sd_but_loses_the_streaks() -> None:
    """The random-phase twin of FBP noise: what an iterative reconstruction's noise looks like."""
    ph = make_chest_phantom(shape=(3, 192, 192), spacing=(1.6, 1.6, 2.5), seed=4).hu
    kw = {"spacing_mm": 1.6, "seed": 7}
    protocol = ScannerProtocol(dose=0.005, kernel="shepp-logan", bowtie=True, tcm=0.5, geometry="parallel")
    fbp = scanner_noise(ph, protocol, **kw) - ph
    image = scanner_noise(ph, ScannerProtocol(**{**protocol.as_dict(), "texture": "image"}), **kw) - ph
    soft = (ph > -200) & (ph < 200)
    soft[:, :40] = soft[:, -40:] = False  # inside the body, away from its edge
    assert image[soft].std() == pytest.approx(fbp[soft].std(), rel=0.1)
    # the same 2D spectrum: radial profiles agree within 25 % where the power is
    f = np.fft.fftfreq(192)
    radius = np.hypot(*np.meshgrid(f, f, indexing="ij"))
    bins = np.digitize(radius, np.linspace(0.02, 0.5, 13))
    own, twin = noise_power_spectrum(fbp), noise_power_spectrum(image)
    for b in range(1, 13):
        ring = bins == b
        if own[ring].mean() > 0.05 * own.max():
            assert twin[ring].mean() == pytest.approx(own[ring].mean(), rel=0.25), b
    # the local SD follows the FBP noise (noisier behind the dense, lateral tissue) ...
    left, centre = (slice(None), slice(80, 112), slice(45, 75)), (slice(None), slice(80, 112), slice(80, 112))
    assert image[left].std() / image[centre].std() == pytest.approx(
        fbp[left].std() / fbp[centre].std(), rel=0.2
    )
    # ... but the streaks of starved rays are gone
    assert noise_streakiness(image, region=soft, pixel_mm=1.6) < 0.8 * noise_streakiness(
        fbp, region=soft, pixel_mm=1.6
    )
    # reproducible from the seed, and independent of the detector counts drawn from it
    again = scanner_noise(ph, ScannerProtocol(**{**protocol.as_dict(), "texture": "image"}), **kw) - ph
    assert np.array_equal(image, again)
    assert abs(np.corrcoef(image[soft], fbp[soft])[0, 1]) < 0.1
    direct = image_domain_texture(fbp, pixel_mm=1.6, rng=np.random.default_rng(0))
    assert direct.shape == fbp.shape and direct.dtype == np.float32
