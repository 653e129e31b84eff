"""Remove Background never changes tissue: real CT (pydicom, pydicom-data) and cropped 2 %-dose phantoms.

"Tissue" is what the input says is not air: voxels above −900 HU on real scans, voxels whose
noise-free value is above −900 HU on the phantom. The figure must be 0 in every case.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from pydicom.data import get_testdata_file
from scipy import ndimage as ndi

from IPv2DenoiseLib.denoiser.infer import AIR_HU, Denoiser
from IPv2DenoiseLib.denoiser.models import UNet
from IPv2DenoiseLib.imaging import masks
from IPv2DenoiseLib.io.volumes import read_volume
from IPv2DenoiseLib.physics.lowdose import simulate_low_dose
from IPv2DenoiseLib.synthetic.phantom import LABELS, make_chest_phantom

SPACING = (1.4, 1.4, 2.5)
LUNG_LABELS = [
    LABELS[k] for k in ("airway", "lung", "lung_vessel", "nodule_solid", "nodule_ggo", "emphysema")
]
#: (y, x) crops of a 256² chest at 1.4 mm: the body and both lungs cut by the image edge.
CROPS = {
    "whole (arms and table at the edge)": np.s_[:, :, :],
    "lungs cut left and right": np.s_[:, 30:230, 75:185],
    "lungs cut at the front": np.s_[:, 85:230, 40:220],
    "one lung in the corner": np.s_[:, 80:160, 70:130],
}


def tiny_denoiser() -> Denoiser:
    torch.manual_seed(0)
    model = UNet(in_slices=3, base_channels=4, levels=2)
    torch.nn.init.normal_(model.head.weight, std=0.05)
    return Denoiser(model)


@pytest.fixture(scope="module")
def chest_2pct():
    """A 2-slice chest with arms and table, noise-free and at 2 % dose (projection-domain noise)."""
    phantom = make_chest_phantom(shape=(2, 256, 256), spacing=SPACING, arms=True, table=True, seed=3)
    noisy = simulate_low_dose(phantom.hu, dose=0.02, spacing_mm=SPACING[0], seed=1, device="cpu")
    return phantom, np.asarray(noisy, dtype=np.float32)


def test_ct_small_lungs_at_the_image_edge_are_never_removed() -> None:
    volume = read_volume(get_testdata_file("CT_small.dcm"))  # a cropped chest: lungs reach the edge
    hu = volume.array
    assert not masks.background_mask(hu, spacing=volume.spacing).any()
    denoiser = tiny_denoiser()
    kept = denoiser.denoise(volume, device="cpu", remove_background=False)
    removed = denoiser.denoise(volume, device="cpu")
    np.testing.assert_array_equal(removed.array, kept.array)  # 0 voxels changed (main: 21 %)
    assert any("field of view is truncated" in w for w in removed.meta["warnings"])
    lungs = masks.lung_mask(hu)
    assert lungs.sum() * volume.voxel_volume_ml > 5.0  # info no longer says "lungs 0.0 mL"


@pytest.mark.parametrize("name", ["693_UNCI.dcm", "693_UNCR.dcm", "explicit_VR-UN.dcm"])
def test_real_ct_from_pydicom_data_tissue_unchanged_outside_air_removed(name) -> None:
    volume = read_volume(get_testdata_file(name))
    hu = volume.array
    weight = masks.background_weight(hu, spacing=volume.spacing)
    tissue = hu > -900.0
    assert int(((weight > 0) & tissue).sum()) == 0
    air = ~tissue
    far = air & (ndi.distance_transform_edt(air[0], sampling=volume.spacing[1::-1]) > 6.0)[None]
    assert (weight[far] == 1).mean() > 0.9  # the removal still does its job


@pytest.mark.parametrize("crop", list(CROPS))
def test_cropped_phantom_tissue_and_lungs_never_change(chest_2pct, crop) -> None:
    phantom, noisy = chest_2pct
    window = CROPS[crop]
    truth, labels = phantom.hu[window], phantom.labels[window]
    hu = np.ascontiguousarray(noisy[window])
    weight = masks.background_weight(hu, spacing=SPACING)
    assert int(((weight > 0) & (truth > -900.0)).sum()) == 0  # main: 15,000-35,000 voxels
    assert not (weight > 0)[np.isin(labels, LUNG_LABELS)].any()  # main: up to 24,000 lung voxels
    air = labels == LABELS["air"]
    far = air & (ndi.distance_transform_edt(air, sampling=(1e6, 1.4, 1.4)) > 6.0)
    if crop != "one lung in the corner":  # that crop holds no outside air
        assert (weight[far] == 1).mean() > 0.85


def test_skin_line_is_blended_not_cut(chest_2pct) -> None:
    phantom, noisy = chest_2pct
    weight = masks.background_weight(noisy, spacing=SPACING)
    ramp = (weight > 0) & (weight < 1)
    assert ramp.sum() > 1000  # a smooth weight over a few mm beside the skin
    body = ndi.binary_dilation(phantom.hu > -900.0, iterations=1)
    near = ndi.binary_dilation(body, iterations=2) & ~body
    assert (weight[near] < 1).all()
    denoiser = tiny_denoiser()
    kept = denoiser.denoise_array(noisy, device="cpu", remove_background=False, spacing=SPACING)
    removed = denoiser.denoise_array(noisy, device="cpu", spacing=SPACING)
    tissue = phantom.hu > -900.0
    np.testing.assert_array_equal(removed[tissue], kept[tissue])
    assert (removed[weight == 1] == AIR_HU).all()


def test_truncation_is_reported_only_when_the_body_touches_the_edge(chest_2pct) -> None:
    phantom, _ = chest_2pct
    cut = phantom.hu[CROPS["lungs cut left and right"]]
    assert masks.truncation_warning(cut, spacing=SPACING).startswith("the field of view is truncated")
    assert masks.truncation_warning(phantom.hu, spacing=SPACING) is not None  # an arm is cut at the edge
    whole = np.pad(phantom.hu, ((0, 0), (8, 8), (8, 8)), constant_values=-1000.0)
    assert masks.truncation_warning(whole, spacing=SPACING) is None
