"""Synthetic chest phantom and breathing motion: determinism, HU per tissue, vessel trees, motion."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from IPv2DenoiseLib.core.errors import UserError
from IPv2DenoiseLib.synthetic.breathing import breathing_motion, motion_stats
from IPv2DenoiseLib.synthetic.phantom import HU_RANGES, LABELS, make_chest_phantom

SMALL = dict(shape=(16, 96, 96), spacing=(3.5, 3.5, 3.5))


@pytest.fixture(scope="module")
def small():
    return make_chest_phantom(**SMALL, seed=0)


@pytest.fixture(scope="module")
def tall():
    """The whole lung height at 3.5 mm, so vessel trees are not cut by the slab."""
    return make_chest_phantom(shape=(80, 96, 96), spacing=(3.5, 3.5, 3.5), z_center_mm=-35.0, seed=0)


def test_same_seed_identical_other_seed_differs(small):
    again = make_chest_phantom(**SMALL, seed=0)
    assert np.array_equal(small.hu, again.hu)
    assert np.array_equal(small.labels, again.labels)
    other = make_chest_phantom(**SMALL, seed=1)
    lung = small.labels == LABELS["lung"]
    assert np.abs(other.hu - small.hu)[lung].mean() > 5.0


def test_anatomy_does_not_depend_on_resolution(small):
    coarse = make_chest_phantom(shape=(8, 48, 48), spacing=(7.0, 7.0, 7.0), seed=0)
    for name in ("lung", "heart", "fat", "muscle"):
        v_small = (small.labels == LABELS[name]).sum() * 3.5**3
        v_coarse = (coarse.labels == LABELS[name]).sum() * 7.0**3
        assert v_coarse == pytest.approx(v_small, rel=0.15), name
    assert coarse.vessels.p0.shape == small.vessels.p0.shape
    assert np.array_equal(coarse.vessels.p0, small.vessels.p0)


def test_geometry_and_dtypes(small):
    assert small.hu.dtype == np.float32 and small.hu.shape == (16, 96, 96)
    assert small.labels.dtype == np.uint8
    vol = small.to_volume()
    assert vol.spacing == (3.5, 3.5, 3.5)
    # the field of view is centred in x and y
    assert vol.origin[0] == pytest.approx(-(96 - 1) / 2 * 3.5)
    for name in (
        "air",
        "table",
        "pad",
        "fat",
        "muscle",
        "bone_cortical",
        "heart",
        "lung",
        "lung_vessel",
        "airway",
        "great_vessels",
        "mediastinum",
    ):
        assert (small.labels == LABELS[name]).any(), name


@pytest.mark.parametrize(
    "kwargs,names",
    [
        (
            SMALL,
            ("air", "pad", "fat", "muscle", "heart", "great_vessels", "mediastinum", "lung", "spinal_canal"),
        ),
        (
            dict(shape=(8, 128, 128), spacing=(1.0, 1.0, 2.0), emphysema=True),
            (
                "muscle",
                "bone_cortical",
                "bone_cancellous",
                "heart",
                "great_vessels",
                "mediastinum",
                "airway",
                "lung",
                "emphysema",
            ),
        ),
    ],
)
def test_median_hu_of_each_tissue_in_range(kwargs, names):
    ph = make_chest_phantom(**kwargs, seed=3)
    for name in names:
        m = ph.labels == LABELS[name]
        assert m.sum() >= 20, name
        lo, hi = HU_RANGES[name]
        assert lo <= float(np.median(ph.hu[m])) <= hi, name


def test_lung_texture_and_air():
    ph = make_chest_phantom(shape=(4, 160, 160), spacing=(1.0, 1.0, 2.0), seed=2)
    lung = ph.hu[ph.labels == LABELS["lung"]]
    q25, q75 = np.percentile(lung, [25, 75])
    assert 8.0 < (q75 - q25) / 1.35 < 60.0  # textured, not flat
    assert ph.hu.min() >= -1000.5 and ph.hu.max() <= 1300.0


def test_nodules_lie_in_the_lungs_with_their_hu(small):
    assert len(small.nodules) == 3
    for nod in small.nodules:
        c = np.asarray(nod["centre_mm"])
        idx = np.round((c - np.asarray(small.origin)) / np.asarray(small.spacing)).astype(int)[::-1]
        assert small.labels[tuple(idx)] == LABELS[nod["kind"]]
        lo, hi = HU_RANGES[nod["kind"]]
        assert lo - 100 <= small.hu[tuple(idx)] <= hi + 100  # partial volume at 3.5 mm
    assert make_chest_phantom(**SMALL, seed=0, nodules=False).nodules == ()


def test_vessel_tree_of_each_lung_is_connected(tall):
    x = tall.origin[0] + np.arange(tall.shape[2]) * tall.spacing[0]
    for sign in (1, -1):
        v = (tall.labels == LABELS["lung_vessel"]) & (sign * x > 0)[None, None, :]
        assert v.sum() > 200
        comp, n = ndimage.label(v, structure=np.ones((3, 3, 3)))
        sizes = np.bincount(comp.ravel())[1:]
        assert sizes.max() / sizes.sum() > 0.85


def test_vessel_radii_shrink_per_generation(small):
    t = small.vessels
    child = t.parent >= 0
    assert np.all(t.radius[child] < t.radius[t.parent[child]])
    gens, counts = np.unique(t.generation, return_counts=True)
    means = [t.radius[t.generation == g].mean() for g in gens[counts >= 100]]
    assert len(means) >= 8 and np.all(np.diff(means) < 0)
    assert t.radius.max() > 5.0 and t.radius.min() < 0.6  # from the hilum to sub-millimetre
    assert set(np.unique(t.side)) == {-1, 1}


def test_breathing_motion_range_and_rigid_spine():
    ph = make_chest_phantom(shape=(16, 64, 64), spacing=(5.0, 5.0, 5.0), z_center_mm=-90.0, seed=0)
    moved, disp = breathing_motion(ph, amplitude_mm=12.0, seed=1)
    assert disp.shape == (3,) + ph.shape and disp.dtype == np.float32
    st = motion_stats(disp, ph.labels)
    assert 4.0 < st["max_si_mm"] <= 12.0
    assert st["max_ap_mm"] < st["max_si_mm"]
    assert st["lung_mean_mm"] > 1.5
    mag = np.sqrt((disp**2).sum(0))
    x = ph.origin[0] + np.arange(64) * 5.0
    spine = (
        np.isin(ph.labels, [LABELS["bone_cortical"], LABELS["bone_cancellous"]])
        & (np.abs(x) < 20)[None, None, :]
    )
    assert spine.any() and mag[spine].max() < 0.5
    # motion is smooth: neighbouring voxels differ by far less than the amplitude
    assert np.abs(np.diff(disp[0], axis=0)).max() < 3.0
    # the moved anatomy differs in the lungs, not at the spine
    lung = ph.labels == LABELS["lung"]
    assert (moved.labels != ph.labels)[lung].mean() > 0.005
    assert np.abs(moved.hu - ph.hu)[spine].max() < 50.0
    assert moved.params["motion"]["max_si_mm"] == pytest.approx(st["max_si_mm"])


def test_motion_depends_on_seed_and_amplitude():
    ph = make_chest_phantom(shape=(8, 48, 48), spacing=(7.0, 7.0, 7.0), z_center_mm=-90.0, seed=0)
    _, d1 = breathing_motion(ph, amplitude_mm=10.0, seed=1)
    _, d2 = breathing_motion(ph, amplitude_mm=10.0, seed=2)
    _, d3 = breathing_motion(ph, amplitude_mm=5.0, seed=1)
    assert not np.allclose(d1, d2)
    assert np.allclose(d3, 0.5 * d1, atol=1e-3)


def test_bad_arguments_raise_user_error():
    with pytest.raises(UserError, match="shape"):
        make_chest_phantom(shape=(0, 10, 10))
    with pytest.raises(UserError, match="spacing"):
        make_chest_phantom(shape=(4, 10, 10), spacing=(1.0, -1.0, 1.0))
    ph = make_chest_phantom(shape=(4, 32, 32), spacing=(10.0, 10.0, 10.0))
    with pytest.raises(UserError, match="amplitude_mm"):
        breathing_motion(ph, amplitude_mm=100.0)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.logical_and(a, b).sum() / max(1, a.sum() + b.sum())


def test_masks_find_the_phantom_lungs_and_background():
    from IPv2DenoiseLib.imaging.masks import background_mask, lung_mask

    ph = make_chest_phantom(shape=(16, 128, 128), spacing=(2.8, 2.8, 3.5), seed=4)
    lungs = ph.mask("lung", "lung_vessel", "nodule_solid", "nodule_ggo", "emphysema")
    assert _dice(lung_mask(ph.hu), lungs) > 0.9
    background = background_mask(ph.hu, spacing=ph.spacing)
    assert _dice(background, ph.mask("air")) > 0.9
    support = ph.mask("pad", "table") & (ph.hu > -900.0)  # the table's hollow core is air-like
    assert not background[support].any()  # the foam pad and the table are kept, not made air (#13)


def test_no_motion_gives_the_same_anatomy_nodules_included(small):
    """A zero-amplitude breath hold rebuilds a taller slab; nodules must not move with it."""
    moved, disp = breathing_motion(small, amplitude_mm=0.0, seed=3)
    assert float(np.abs(disp).max()) == 0.0
    for name in ("nodule_solid", "nodule_ggo"):
        np.testing.assert_array_equal(moved.mask(name), small.mask(name))
    np.testing.assert_array_equal(moved.labels, small.labels)
