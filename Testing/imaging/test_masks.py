"""Masks on a synthetic chest with a table, arms, trachea and enclosed gas (Testing/purify_phantom.py)."""

from __future__ import annotations

import numpy as np
import pytest
from purify_phantom import SPACING, chest, misaligned_pair

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.imaging import masks


@pytest.fixture(scope="module")
def pair():
    return misaligned_pair()


def test_dark_mask_covers_air_and_lungs_not_body(pair):
    u, _, cu, _ = pair
    dark = masks.dark_mask(u)
    assert dark.dtype == bool and dark.shape == u.shape
    air = ~(cu.body | cu.table | cu.arms)
    assert dark[air].mean() > 0.99
    assert dark[cu.lungs].mean() > 0.95  # vessels (bright) and the opening at thin lung tips aside
    solid = cu.body & ~cu.lungs & ~cu.trachea & ~cu.bubble
    assert dark[solid].mean() < 0.01
    assert not dark[cu.table].any()


def test_dark_mask_2d_constant_and_input_untouched():
    air = np.full((32, 32), -1000.0, dtype=np.float32)
    tissue = np.full((32, 32), 40.0, dtype=np.float32)
    assert masks.dark_mask(air).all()
    assert not masks.dark_mask(tissue).any()
    rng = np.random.default_rng(0)
    noisy_tissue = (tissue + rng.normal(0, 90, tissue.shape)).astype(np.float32)
    before = noisy_tissue.copy()
    # Otsu alone would split the noise in half; the contrast guard keeps an all-tissue slice bright.
    assert masks.dark_mask(noisy_tissue).mean() < 0.01
    np.testing.assert_array_equal(noisy_tissue, before)


def test_common_dark_mask_is_true_or(pair):
    u, n, _, _ = pair
    du, dn = masks.dark_mask(u), masks.dark_mask(n)
    cm = masks.common_dark_mask(u, n)
    np.testing.assert_array_equal(cm, du | dn)
    # the misalignment band (dark in one scan only) is in, and "dark in both" is not lost
    assert (du & ~dn).any() and (dn & ~du).any()
    assert cm[du & dn].all()
    # what the authors' uint8 addition gives: 254 where both are dark, not 255
    wrapped = du.astype(np.uint8) * np.uint8(255) + dn.astype(np.uint8) * np.uint8(255)
    assert set(np.unique(wrapped[du & dn])) == {254}
    np.testing.assert_array_equal(cm, wrapped > 0)


def test_border_connected_keeps_enclosed_air_out_and_handles_full_width_table(pair):
    u, n, cu, cn = pair
    dark = masks.common_dark_mask(u, n)
    background, lungs = masks.split_dark(dark)
    np.testing.assert_array_equal(background | lungs, dark)
    assert not (background & lungs).any()
    assert not background[cu.bubble | cn.bubble].any()
    assert lungs[cn.bubble].mean() > 0.5
    assert not background[cn.lungs | cu.lungs].any()
    # the air below a full-width table is cut off from the corner but touches the bottom border
    below_table = np.zeros_like(dark)
    below_table[:, 84:, :] = True
    assert background[below_table].all()
    corner_only = np.zeros_like(dark)
    from scipy import ndimage as ndi

    for z in range(dark.shape[0]):
        lab, _ = ndi.label(dark[z])
        corner_only[z] = lab == lab[0, 0]
    assert not corner_only[below_table].any()  # the reference's corner fill would miss it


def test_border_connected_3d_option():
    m = np.zeros((4, 20, 20), dtype=bool)
    m[1:3, 5:10, 5:10] = True  # enclosed in every slice
    m[0:4, 15:20, 0:3] = True  # touches the in-plane border
    m[0, 0:2, 0:2] = True
    out3 = masks.border_connected(m, per_slice=False)
    expected = m.copy()
    expected[1:3, 5:10, 5:10] = False
    np.testing.assert_array_equal(out3, expected)
    np.testing.assert_array_equal(masks.border_connected(m), expected)
    # the first/last slice are not "border": a box touching z = 0 stays out
    m2 = np.zeros((3, 10, 10), dtype=bool)
    m2[0:2, 3:6, 3:6] = True
    assert not masks.border_connected(m2, per_slice=False).any()
    assert not masks.border_connected(m2).any()


def test_body_excludes_table_and_arms(pair):
    _, n, _, cn = pair
    body = masks.body_mask(n)
    assert not (body & cn.table).any()
    assert not (body & cn.arms).any()
    assert (body == cn.body).mean() > 0.995  # lungs filled inside
    with_arms = masks.body_mask(n, include_arms=True)
    assert with_arms[cn.arms].mean() > 0.9 and not (with_arms & cn.table).any()
    assert not masks.body_mask(np.full((3, 16, 16), -1000.0)).any()


def test_background_mask(pair):
    _, n, _, cn = pair
    bg = masks.background_mask(n)
    assert bg[:, 90, :].all() and bg[:, 0, :].all()
    assert not bg[cn.lungs | cn.bubble | cn.trachea].any()
    assert not (bg & (cn.body | cn.table | cn.arms)).any()


@pytest.mark.parametrize("which", [0, 1])
def test_lungs_found_with_plausible_volume_and_trachea_separable(pair, which):
    hu, c = (pair[0], pair[2]) if which == 0 else (pair[1], pair[3])
    lungs = masks.lung_mask(hu)
    true_ml = c.lungs.sum() * np.prod(SPACING) / 1000
    found_ml = lungs.sum() * np.prod(SPACING) / 1000
    assert abs(found_ml - true_ml) / true_ml < 0.05
    assert (lungs & c.lungs).sum() / c.lungs.sum() > 0.98  # vessels filled in
    assert not lungs[c.bubble].any()  # enclosed gut gas dropped
    assert lungs[c.trachea].all()  # connected trachea is part of the air tree by default
    airway = masks.airway_mask(hu, lungs, spacing=SPACING)
    assert airway[c.trachea].mean() > 0.95
    assert not (airway & c.lungs).any()  # apices are small and round too, but off the midline
    separated = masks.lung_mask(hu, separate_trachea=True, spacing=SPACING)
    assert not separated[c.trachea].any()
    assert (separated & c.lungs).sum() == (lungs & c.lungs).sum()


def test_soft_tissue_mask_is_homogeneous(pair):
    u, _, cu, _ = pair
    soft = masks.soft_tissue_mask(u)
    assert soft.sum() > 1000
    assert not (soft & ~cu.body).any()
    assert (soft & cu.lungs).sum() <= 2  # at most the single-pixel lung tips the smoothing erases
    assert abs(float(u[soft].mean()) - 40.0) < 5.0


def test_all_air_and_all_tissue_volumes_do_not_crash():
    air = np.full((2, 24, 24), -1000.0, dtype=np.float32)
    tissue = np.full((2, 24, 24), 40.0, dtype=np.float32)
    assert masks.background_mask(air).all()
    assert not masks.lung_mask(air).any() and not masks.soft_tissue_mask(air).any()
    assert masks.body_mask(tissue).all() and not masks.lung_mask(tissue).any()
    bg, lungs = masks.split_dark(masks.dark_mask(air))
    assert bg.all() and not lungs.any()


def test_bad_inputs_raise_user_error():
    with pytest.raises(UserError, match="shape"):
        masks.dark_mask(np.zeros((2, 2, 2, 2)))
    with pytest.raises(UserError, match="NaN"):
        masks.dark_mask(np.array([[0.0, np.nan]]))
    with pytest.raises(UserError, match=r"\(4, 4\).*\(4, 5\)"):
        masks.common_dark_mask(np.zeros((4, 4)), np.zeros((4, 5)))


def test_masks_2d_slice_matches_volume_slice():
    c = chest(noise_hu=20.0)
    z = 10
    np.testing.assert_array_equal(masks.dark_mask(c.hu[z]), masks.dark_mask(c.hu)[z])
    np.testing.assert_array_equal(masks.background_mask(c.hu[z]), masks.background_mask(c.hu)[z])


def test_lung_parenchyma_excludes_vessels_and_standard_rois() -> None:
    from IPv2DenoiseLib.imaging.masks import lung_parenchyma_mask, standard_rois
    from IPv2DenoiseLib.synthetic.phantom import make_chest_phantom

    ph = make_chest_phantom(shape=(4, 160, 160), spacing=(2.2, 2.2, 2.5), seed=2)
    rois = standard_rois(ph.hu, spacing=ph.spacing)
    paren, lungs = rois["lung"], rois["lungs_whole"]
    assert paren.sum() > 0.5 * lungs.sum() and not (paren & ~lungs).any()
    vessels = ph.mask("lung_vessel") & (ph.hu > -300)
    assert (paren & vessels).sum() < 0.02 * vessels.sum()
    assert ph.hu[paren].std() < 0.6 * ph.hu[lungs].std()  # more homogeneous: vessels no longer dominate
    assert ph.hu[paren].mean() < ph.hu[lungs].mean() - 30
    assert not (rois["background"] & lungs).any() and not (rois["soft_tissue"] & lungs).any()
    np.testing.assert_array_equal(lung_parenchyma_mask(ph.hu[1], lungs=lungs[1]), paren[1])  # 2-D slice
