"""Dice/HD95 on masks with known answers; the three conventions; MONAI agreement."""
import math

import numpy as np
import pytest

from glam3d.metrics.segmentation import (case_metrics, dice, hd95_directed_max, hd95_medpy, hd95_monai,
                                         nan_mean_std, organ_metrics, scan_diagonal)


def cube(shape=(20, 20, 20), lo=(5, 5, 5), size=(8, 8, 8)):
    m = np.zeros(shape, bool)
    m[tuple(slice(l, l + s) for l, s in zip(lo, size))] = True
    return m


def brute(pred, gt, spacing):
    """Reference surface distances by brute force over voxel pairs."""
    from scipy import ndimage
    st = ndimage.generate_binary_structure(3, 1)

    def surf(m):
        return np.argwhere(m ^ ndimage.binary_erosion(m, st)) * np.asarray(spacing, float)

    sp, sg = surf(np.pad(pred, 1)), surf(np.pad(gt, 1))
    d = np.sqrt(((sp[:, None, :] - sg[None, :, :]) ** 2).sum(-1))
    return d.min(1), d.min(0)


def test_dice_exact():
    a = cube()
    b = cube(lo=(7, 5, 5))  # shifted 2 voxels along axis 0: overlap 6*8*8
    assert dice(a, b) == pytest.approx(2 * 6 * 64 / (2 * 512), abs=0)
    assert dice(a, a) == 1.0
    assert math.isnan(dice(np.zeros((3, 3)), np.zeros((3, 3))))


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (3.0, 0.8, 0.8), (0.5, 2.0, 1.0)])
def test_hd95_shifted_cube_mm_vs_voxels(spacing):
    a = cube()
    b = cube(lo=(8, 4, 5), size=(6, 9, 8))
    d_pg, d_gp = brute(a, b, spacing)
    assert hd95_monai(a, b, spacing) == pytest.approx(max(np.percentile(d_pg, 95), np.percentile(d_gp, 95)),
                                                       rel=1e-6)
    assert hd95_medpy(a, b, spacing) == pytest.approx(np.percentile(np.hstack([d_pg, d_gp]), 95), rel=1e-9)
    v_pg, v_gp = brute(a, b, (1, 1, 1))
    assert hd95_medpy(a, b) == pytest.approx(np.percentile(np.hstack([v_pg, v_gp]), 95), rel=1e-9)


def test_hd95_pure_shift_anisotropic():
    # shift by 3 voxels along D with 2.5 mm slices: every top/bottom face voxel is 7.5 mm from its twin
    a = cube(size=(8, 8, 8))
    b = cube(lo=(8, 5, 5), size=(8, 8, 8))
    mm = hd95_monai(a, b, (2.5, 1.0, 1.0))
    vox = hd95_monai(a, b)
    assert vox == pytest.approx(3.0)
    assert mm == pytest.approx(7.5)
    # isotropic 1 mm: mm and voxels coincide
    assert hd95_monai(a, b, (1, 1, 1)) == pytest.approx(vox)


def test_conventions_edge_cases():
    e = np.zeros((10, 10, 10), bool)
    m = cube((10, 10, 10), (2, 2, 2), (4, 4, 4))
    sp = (2.0, 1.0, 1.0)
    # absent from both
    g = organ_metrics(e, e, sp, "glam3d")
    assert math.isnan(g["dice"]) and math.isnan(g["hd95"]) and g["status"] == "absent"
    assert organ_metrics(e, e, sp, "nnformer") == {"dice": 1.0, "hd95": 0.0, "status": "absent"}
    assert organ_metrics(e, e, sp, "transunet") == {"dice": 0.0, "hd95": 0.0, "status": "absent"}
    # predicted but absent from truth
    g = organ_metrics(m, e, sp, "glam3d")
    assert g["dice"] == 0.0 and math.isnan(g["hd95"]) and g["status"] == "false_positive"
    assert organ_metrics(m, e, sp, "nnformer") == {"dice": 0.0, "hd95": 0.0, "status": "false_positive"}
    assert organ_metrics(m, e, sp, "transunet") == {"dice": 1.0, "hd95": 0.0, "status": "false_positive"}
    # missed
    g = organ_metrics(e, m, sp, "glam3d")
    assert g["dice"] == 0.0 and g["hd95"] == pytest.approx(scan_diagonal((10, 10, 10), sp))
    assert organ_metrics(e, m, sp, "nnformer") == {"dice": 0.0, "hd95": 0.0, "status": "missed"}
    assert organ_metrics(e, m, sp, "transunet") == {"dice": 0.0, "hd95": 0.0, "status": "missed"}
    # both present: glam3d in mm, peers in voxels
    m2 = np.roll(m, 1, axis=0)
    assert organ_metrics(m2, m, sp, "glam3d")["hd95"] == pytest.approx(2.0)
    assert organ_metrics(m2, m, sp, "nnformer")["hd95"] == pytest.approx(1.0)
    assert organ_metrics(m2, m, sp, "transunet")["dice"] == pytest.approx(0.75)
    with pytest.raises(ValueError, match="convention"):
        organ_metrics(m, m, sp, "medpy")


def test_case_metrics_label_values():
    gt = np.zeros((8, 8, 8), np.uint8)
    gt[1:4, 1:4, 1:4] = 8
    gt[5:7, 5:7, 5:7] = 1
    pred = gt.copy()
    pred[5:7, 5:7, 5:7] = 0
    out = case_metrics(pred, gt, [("aorta", 8), ("spleen", 1), ("liver", 6)])
    assert list(out) == ["aorta", "spleen", "liver"]
    assert out["aorta"]["dice"] == 1.0 and out["aorta"]["hd95"] == 0.0
    assert out["spleen"]["status"] == "missed" and out["liver"]["status"] == "absent"


def test_nan_mean_counts():
    assert nan_mean_std([]) [2] == 0
    m, s, n = nan_mean_std([1.0, float("nan"), 3.0])
    assert (m, n) == (2.0, 2) and s == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("spacing", [None, (2.5, 0.8, 0.8)])
def test_hd95_without_quantile_limit_equals_monai(monkeypatch, spacing):
    """MONAI's torch.quantile takes at most 2**24 values, which the surfaces of a noisy prediction on a long scan
    exceed: hd95_monai then computes the same definition with numpy (hd95_directed_max) instead of failing."""
    rng = np.random.default_rng(0)
    a = rng.random((24, 30, 28)) > 0.6                  # noisy masks: many surface voxels
    b = cube((24, 30, 28), (3, 4, 5), (15, 20, 18)) | (rng.random((24, 30, 28)) > 0.9)
    ref = hd95_monai(a, b, spacing)
    assert hd95_directed_max(a, b, spacing) == pytest.approx(ref, rel=1e-6)
    import monai.metrics

    def too_large(*args, **kwargs):
        raise RuntimeError("quantile() input tensor is too large")
    monkeypatch.setattr(monai.metrics, "compute_hausdorff_distance", too_large)
    assert hd95_monai(a, b, spacing) == pytest.approx(ref, rel=1e-6)

    def other(*args, **kwargs):
        raise RuntimeError("something else")
    monkeypatch.setattr(monai.metrics, "compute_hausdorff_distance", other)
    with pytest.raises(RuntimeError, match="something else"):
        hd95_monai(a, b, spacing)


# ------------------------------------------------------------------------------------------------ medpy reference
def _blobs(rng, shape, p=0.55, sigma=1.5):
    """A random mask of a few blobs: smoothed noise, thresholded (non-empty)."""
    from scipy import ndimage
    m = ndimage.gaussian_filter(rng.random(shape), sigma) > np.quantile(ndimage.gaussian_filter(rng.random(shape),
                                                                                                 sigma), p)
    m[tuple(s // 2 for s in shape)] = True
    return m


@pytest.mark.parametrize("seed", range(6))
def test_hd95_and_dice_match_medpy(seed):
    """medpy.metric.binary.hd95 / dc, called directly, on random shapes (2D and 3D), with and without spacing."""
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(seed)
    ndim = 3 if seed % 3 else 2
    shape = tuple(int(s) for s in rng.integers(9, 26, ndim))
    a, b = _blobs(rng, shape), _blobs(rng, shape, p=0.6)
    spacing = tuple(float(s) for s in rng.uniform(0.4, 3.0, ndim))
    assert hd95_medpy(a, b) == pytest.approx(binary.hd95(a, b), rel=1e-9, abs=1e-12)
    assert hd95_medpy(a, b, spacing) == pytest.approx(binary.hd95(a, b, voxelspacing=spacing), rel=1e-9, abs=1e-12)
    assert dice(a, b) == pytest.approx(binary.dc(a, b), rel=1e-12)
    # the nnFormer / TransUNet conventions use medpy's HD95 in voxels, whatever spacing is given
    if ndim == 3:
        assert organ_metrics(a, b, spacing, "nnformer")["hd95"] == pytest.approx(binary.hd95(a, b), rel=1e-9)
        assert organ_metrics(a, b, spacing, "transunet")["dice"] == pytest.approx(binary.dc(a, b), rel=1e-12)


# ------------------------------------------------------------------------------------------------ NSD
def _nsd_brute(pred, gt, spacing, tol):
    """NSD from its definition: surface voxels (mask XOR its 6-connected erosion, outside the array = background)
    within ``tol`` mm of the other surface, over all surface voxels; distances by brute force."""
    from scipy import ndimage
    st = ndimage.generate_binary_structure(pred.ndim, 1)

    def surf(m):
        m = np.pad(m, 1)
        return np.argwhere(m ^ ndimage.binary_erosion(m, st)) * np.asarray(spacing, float)

    sp, sg = surf(pred), surf(gt)
    d = np.sqrt(((sp[:, None, :] - sg[None, :, :]) ** 2).sum(-1))
    return ((d.min(1) <= tol).sum() + (d.min(0) <= tol).sum()) / (len(sp) + len(sg))


def test_nsd_hand_built_square():
    """A 4×4 square and the same square one row lower, rows 2.5 mm apart, columns 1 mm. Each ring has 12 surface
    pixels; from either ring to the other: 6 at 0 mm (the shared sides), 2 at 1 mm (the inner pixels of the
    shared row, one column from the sides' ends), 4 at 2.5 mm (the far row). NSD = (6 + …)·2 / 24."""
    from glam3d.metrics.segmentation import nsd_monai
    a = np.zeros((8, 6), bool)
    a[1:5, 1:5] = True
    b = np.roll(a, 1, axis=0)
    sp = (2.5, 1.0)
    assert nsd_monai(a, b, 0.0, sp) == pytest.approx(12 / 24)
    assert nsd_monai(a, b, 0.99, sp) == pytest.approx(12 / 24)
    assert nsd_monai(a, b, 1.0, sp) == pytest.approx(16 / 24)
    assert nsd_monai(a, b, 2.49, sp) == pytest.approx(16 / 24)
    assert nsd_monai(a, b, 2.5, sp) == pytest.approx(1.0)
    # rows 0.5 mm apart: every distance is 0 or 0.5 mm
    assert nsd_monai(a, b, 0.4, (0.5, 1.0)) == pytest.approx(12 / 24)
    assert nsd_monai(a, b, 0.5, (0.5, 1.0)) == pytest.approx(1.0)
    assert nsd_monai(a, a, 0.0, sp) == 1.0


@pytest.mark.parametrize("seed", range(4))
def test_nsd_matches_definition_and_monai(seed):
    """Random 3D masks, anisotropic spacing: nsd_monai (cropped) against the brute-force definition and against
    MONAI's compute_surface_dice called directly on the whole arrays."""
    import torch
    from monai.metrics import compute_surface_dice

    from glam3d.metrics.segmentation import nsd_monai
    rng = np.random.default_rng(100 + seed)
    shape = tuple(int(s) for s in rng.integers(10, 18, 3))
    a, b = _blobs(rng, shape, p=0.7), _blobs(rng, shape, p=0.75)
    a[:, :, 0] |= seed == 0  # a mask touching the array border: its border voxels are surface too
    spacing = tuple(float(s) for s in rng.uniform(0.5, 3.0, 3))
    for tol in (0.0, 1.0, 2.0, 4.5):
        got = nsd_monai(a, b, tol, spacing)
        assert got == pytest.approx(_nsd_brute(a, b, spacing, tol), abs=1e-6)
        direct = compute_surface_dice(torch.from_numpy(a)[None, None], torch.from_numpy(b)[None, None], [tol],
                                      include_background=True, spacing=list(spacing))
        assert got == pytest.approx(float(direct.reshape(-1)[0]), abs=1e-6)


def test_nsd_edge_cases_and_case_metrics():
    e = np.zeros((10, 10, 10), bool)
    m = cube((10, 10, 10), (2, 2, 2), (4, 4, 4))
    sp = (2.0, 1.0, 1.0)
    assert math.isnan(organ_metrics(e, e, sp, "glam3d", 2.0)["nsd"])
    assert organ_metrics(m, e, sp, "glam3d", 2.0)["nsd"] == 0.0      # false positive
    assert organ_metrics(e, m, sp, "nnformer", 2.0)["nsd"] == 0.0    # missed, whatever the convention
    assert organ_metrics(m, m, sp, "transunet", 0.0)["nsd"] == 1.0
    assert "nsd" not in organ_metrics(m, m, sp)                       # only when a tolerance is given
    gt = np.zeros((12, 12, 12), np.uint8)
    gt[2:8, 2:8, 2:8] = 6
    pred = np.roll(gt, 2, axis=0)  # 2 voxels of 2 mm along axis 0: 4 mm
    out = case_metrics(pred, gt, [("liver", 6)], sp, nsd_tolerance={"liver": 4.0})
    assert out["liver"]["nsd"] == pytest.approx(_nsd_brute(pred == 6, gt == 6, sp, 4.0))
    assert case_metrics(pred, gt, [("liver", 6)], sp, nsd_tolerance=1.0)["liver"]["nsd"] < out["liver"]["nsd"]
    with pytest.raises(ValueError, match="tolerance"):
        from glam3d.metrics.segmentation import nsd_monai
        nsd_monai(m, m, float("nan"), sp)


def test_nsd_tolerances():
    from glam3d.errors import UserError
    from glam3d.metrics.tolerance import DEFAULT_TOLERANCE_MM, resolve_tolerances
    names = ["liver", "Left Kidney", "kidney_right", "Inferior Vena Cava", "duodenum", "tumour"]
    t = resolve_tolerances(names)
    assert t == {"liver": 5.0, "Left Kidney": 3.0, "kidney_right": 3.0, "Inferior Vena Cava": 2.0, "duodenum": 7.0,
                 "tumour": DEFAULT_TOLERANCE_MM}
    assert set(resolve_tolerances(names, ["1.5"]).values()) == {1.5}
    t = resolve_tolerances(names, ["liver=3", "left_kidney=1"])
    assert t["liver"] == 3.0 and t["Left Kidney"] == 1.0 and t["duodenum"] == 7.0
    t = resolve_tolerances(names, ["liver=4", "1"])  # organ=mm wins over the bare number wherever it stands
    assert t["liver"] == 4.0 and t["tumour"] == 1.0
    for bad, msg in ((["spleen=2"], "not one of the scored organs"), (["-1"], ">= 0"), (["x"], "not a number"),
                     (["1", "2"], "one tolerance"), (["liver=inf"], "finite")):
        with pytest.raises(UserError, match=msg):
            resolve_tolerances(names, bad)


def test_overlap_counts():
    from glam3d.metrics.evaluation import organ_counts, value_counts
    from glam3d.metrics.segmentation import overlap_counts
    rng = np.random.default_rng(0)
    p = rng.integers(0, 5, (20, 16, 40)).astype(np.uint8)
    g = rng.integers(0, 7, (20, 16, 40)).astype(np.uint8)
    ref = {v: (int((p == v).sum()), int((g == v).sum()), int(((p == v) & (g == v)).sum())) for v in (1, 3, 6, 9)}
    assert overlap_counts(p, g, [1, 3, 6, 9]) == ref
    import glam3d.metrics.evaluation as E
    old = E._SLAB_VOXELS
    try:
        E._SLAB_VOXELS = 700  # many slabs: the sums must not depend on the cut
        assert organ_counts(p, g, [1, 3, 6, 9]) == ref
        assert value_counts(g).tolist() == np.bincount(g.ravel()).tolist()
    finally:
        E._SLAB_VOXELS = old
