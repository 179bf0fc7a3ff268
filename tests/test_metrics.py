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
