"""Preprocessing and restoring a scan in slabs: the same numbers as the whole-volume computation, without its
whole-volume temporaries (``glam3d predict`` on a long CT)."""
from __future__ import annotations

import gzip
import math
import tracemalloc

import nibabel as nib
import numpy as np
import pytest
from monai.transforms.utils import generate_spatial_bounding_box

from glam3d.errors import UserError
from preprocessing import pipeline as pl

ULP = 2.0 ** -23


@pytest.fixture
def small_slabs(monkeypatch):
    monkeypatch.setattr(pl, "SLAB_BYTES", 2048)   # many slabs even on small arrays


def _whole(arr, out_shape, mode):
    """The whole-volume resampling (one SimpleITK call, the computation before slabs)."""
    cast = np.float32 if mode != "nearest" else (np.uint16 if arr.max() > 255 else np.uint8)
    return pl._resample(np.ascontiguousarray(arr, dtype=cast), arr.shape, tuple(out_shape), mode)


@pytest.mark.parametrize("out_shape", [(23, 9, 14), (7, 17, 10), (40, 5, 6)])
def test_resize_slabs_equal_whole_volume(small_slabs, out_shape):
    rng = np.random.default_rng(0)
    x = rng.random((15, 12, 11), dtype=np.float32) * 4 - 1
    got = pl.resize(x, out_shape, "linear")
    ref = _whole(x, out_shape, "linear")
    assert len(pl._slabs(out_shape, in_shape=x.shape)) > 3
    assert got.dtype == np.float32 and got.shape == out_shape
    # slabs shift the output origin: the same interpolation up to the rounding of a double (<= 1 ulp in float32)
    np.testing.assert_allclose(got, ref, rtol=2 * ULP, atol=2 * ULP * np.abs(x).max())
    lab = rng.integers(0, 300, (15, 12, 11)).astype(np.int16)
    near = pl.resize(lab, out_shape, "nearest")
    assert near.dtype == np.int16
    np.testing.assert_array_equal(near, _whole(lab, out_shape, "nearest").astype(np.int16))


def test_resize_out_and_transform(small_slabs):
    rng = np.random.default_rng(1)
    hu = rng.integers(-1000, 1000, (12, 10, 9)).astype(np.int16)
    f = pl.intensity_transforms({"scheme": "transunet", "window": [-125.0, 275.0]}, 1)[0]
    # fused: normalise each input slab, then resample == normalise the volume, then resample
    fused = pl.resize(hu, (20, 6, 7), "linear", transform=f)
    ref = _whole(pl.normalise(hu[None], {"scheme": "transunet"})[0], (20, 6, 7), "linear")
    np.testing.assert_allclose(fused, ref, rtol=0, atol=2 * ULP)
    # same shape: the transform alone, written into a caller's view; the input is not modified
    before = hu.copy()
    buf = np.zeros((2, 12, 10, 9), np.float32)
    pl.resize(hu, hu.shape, "linear", out=buf[1], transform=f)
    np.testing.assert_array_equal(buf[1], pl.normalise(hu[None], {"scheme": "transunet"})[0])
    assert not buf[0].any()
    np.testing.assert_array_equal(hu, before)
    with pytest.raises(ValueError):
        pl.resize(hu, (5, 5, 5), "linear", out=np.empty((5, 5, 4), np.float32))


def test_resize_labels_slabs_equal_whole_volume(small_slabs):
    rng = np.random.default_rng(2)
    lab = np.zeros((14, 16, 12), np.uint8)
    for v in (1, 2, 5, 9):
        c = rng.integers(2, 12, 3)
        lab[c[0] - 2:c[0] + 3, c[1] - 3:c[1] + 2, c[2] - 2:c[2] + 2] = v
    for out_shape in [(31, 21, 25), (9, 11, 7)]:
        got = pl.resize_labels(lab, out_shape, "linear")
        values = np.unique(lab)                        # the per-label linear + argmax rule, whole volume
        ref = np.full(out_shape, values[0], np.uint8)
        best = _whole((lab == values[0]).astype(np.float32), out_shape, "linear")
        for v in values[1:]:
            p = _whole((lab == v).astype(np.float32), out_shape, "linear")
            ref[p > best] = v
            np.maximum(best, p, out=best)
        assert got.dtype == np.uint8
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("thr", [-500.0, None])
def test_body_bbox_equals_monai(small_slabs, thr):
    rng = np.random.default_rng(3)
    arr = np.full((2, 30, 25, 20), -1000.0 if thr is not None else 0.0, np.float32)
    arr[0, 6:19, 4:9, 11:17] = 40.0
    arr[1, 25:27, 20:22, 1:2] = 3.0          # a second channel: only counted without a threshold
    arr += rng.random(arr.shape, dtype=np.float32) * (0 if thr is None else 10)
    plan = {"crop_to_body": True, "body_threshold": thr, "crop_margin_mm": 5.0}
    spacing = [2.5, 1.0, 1.5]
    got = pl.body_bbox(arr[:, ::-1], spacing, plan)       # a view with negative strides, as after reorienting
    margin = [int(np.ceil(5.0 / s)) for s in spacing]
    src = arr[:, ::-1] if thr is None else arr[:1, ::-1]
    sel = (lambda x: x != 0) if thr is None else (lambda x: x > thr)
    start, end = generate_spatial_bounding_box(np.ascontiguousarray(src), select_fn=sel, margin=margin,
                                               allow_smaller=True)
    assert got == [[int(s), int(e)] for s, e in zip(start, end)]
    empty = np.full((1, 8, 8, 8), -1000.0, np.float32)
    assert pl.body_bbox(empty, [1, 1, 1], {"body_threshold": -500.0}) == [[0, 8]] * 3


def _nifti(path, data, affine=None, dtype=None):
    img = nib.Nifti1Image(data, np.eye(4) if affine is None else affine)
    if dtype is not None:
        img.set_data_dtype(dtype)
    nib.save(img, str(path))
    return nib.load(str(path))


@pytest.mark.parametrize("suffix", [".nii.gz", ".nii"])
def test_read_stored_equals_nibabel(small_slabs, tmp_path, suffix):
    rng = np.random.default_rng(4)
    data = rng.integers(-1024, 3000, (13, 11, 7)).astype(np.int16)
    img = _nifti(tmp_path / f"a{suffix}", data)
    got = pl.read_voxels(img, keep_integers=True)
    assert got.dtype == np.int16 and got.shape == (13, 11, 7, 1)
    np.testing.assert_array_equal(got[..., 0], data)
    np.testing.assert_array_equal(pl.read_voxels(img), np.asarray(img.dataobj, dtype=np.float32)[..., None])
    # big-endian storage and a 4D file read the same numbers
    be = nib.Nifti1Image(data.astype(">i2"), np.eye(4))
    nib.save(be, str(tmp_path / f"be{suffix}"))
    np.testing.assert_array_equal(pl.read_voxels(nib.load(str(tmp_path / f"be{suffix}")), keep_integers=True)[..., 0],
                                  data)
    four = _nifti(tmp_path / f"c{suffix}", np.stack([data, data + 1], -1))
    np.testing.assert_array_equal(pl.read_voxels(four, keep_integers=True)[..., 1], data + 1)


def test_read_voxels_scaled_and_truncated(tmp_path):
    data = np.arange(5 * 4 * 3, dtype=np.int16).reshape(5, 4, 3)
    img = nib.Nifti1Image(data, np.eye(4))
    img.header.set_slope_inter(0.5, -1024)
    nib.save(img, str(tmp_path / "s.nii.gz"))
    got = pl.read_voxels(nib.load(str(tmp_path / "s.nii.gz")), keep_integers=True)   # scaled: float32
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got[..., 0], data * np.float32(0.5) - 1024)
    path = tmp_path / "u.nii.gz"                      # a readable header over truncated voxel bytes
    _nifti(path, data)
    path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-50]))
    with pytest.raises(UserError, match="cannot read the voxel data"):
        pl.read_voxels(nib.load(str(path)), keep_integers=True)


def test_preprocess_and_restore_hold_no_extra_volumes(tmp_path, monkeypatch):
    """Traced numpy memory: preprocessing holds the scan as read + its output (+ slabs); restoring holds the
    label volume (+ slabs). Before slabs: float32 read, contiguous copy, normalised copy, resampled copy, stacked
    copy; restoring: per-label float32 volumes, an int32 lookup result, contiguous copies."""
    rng = np.random.default_rng(5)
    shape = (192, 160, 96)                                   # int16: 5.9 MB; float32 11.8 MB
    hu = np.full(shape, -1000, np.int16)
    hu[20:170, 30:140, 5:90] = rng.integers(-100, 300, (150, 110, 85)).astype(np.int16)
    img = _nifti(tmp_path / "ct.nii.gz", hu, np.diag([-0.8, 0.8, 2.5, 1.0]), np.int16)
    plan = pl.make_plan([2.5, 1.0, 1.0], {"scheme": "transunet"}, {"1": 1, "2": 7})
    raw = hu.nbytes
    monkeypatch.setattr(pl, "SLAB_BYTES", 1 << 20)
    arr, meta = pl.preprocess_scan(img, plan)                # untraced first run: lazy imports (MONAI, SimpleITK)
    pl.restore_labels((arr[0] > 0.5).astype(np.uint8), meta, plan)
    tracemalloc.start()
    try:
        arr, meta = pl.preprocess_scan(img, plan)
        _, peak = tracemalloc.get_traced_memory()
        out = arr.nbytes
        assert peak < raw + out + 4 * pl.SLAB_BYTES, (peak, raw, out)
        lab = (arr[0] > 0.5).astype(np.uint8) + (arr[0] > 0.8)
        tracemalloc.reset_peak()
        base, _ = tracemalloc.get_traced_memory()
        seg = pl.restore_labels(lab, meta, plan)
        _, peak = tracemalloc.get_traced_memory()
        full = np.asanyarray(seg.dataobj).nbytes                 # uint8, the scan's shape
        assert peak - base < full + 6 * pl.SLAB_BYTES, (peak - base, full)
    finally:
        tracemalloc.stop()
    assert seg.shape == shape and set(np.unique(np.asanyarray(seg.dataobj)).tolist()) <= {0, 1, 7}


def test_labels_read_and_mapped_in_slabs(tmp_path, monkeypatch):
    """Label maps keep their stored integer dtype (float-stored whole numbers become int16), are checked slab by
    slab, and map to training indices slab by slab: the same indices as the whole-volume lookup."""
    from pathlib import Path

    from preprocessing import datasets as D

    monkeypatch.setattr(pl, "SLAB_BYTES", 1 << 12)
    rng = np.random.default_rng(6)
    values = np.array([0, 1, 2, 6, 11], np.uint8)
    lab = values[rng.integers(0, len(values), (24, 20, 17))]
    aff = np.diag([0.9, 0.9, 2.0, 1.0])
    img = _nifti(tmp_path / "ct.nii.gz", np.zeros(lab.shape, np.int16), aff, np.int16)
    _nifti(tmp_path / "u8.nii.gz", lab, aff, np.uint8)
    _nifti(tmp_path / "f32.nii.gz", lab.astype(np.float32), aff, np.float32)
    got = D.read_label(Path(tmp_path / "u8.nii.gz"), img, Path(tmp_path / "ct.nii.gz"), range(256))
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, lab)
    got = D.read_label(Path(tmp_path / "f32.nii.gz"), img, Path(tmp_path / "ct.nii.gz"), range(256))
    assert got.dtype == np.int16
    np.testing.assert_array_equal(got, lab)
    bad = lab.astype(np.float32)
    bad[3, 4, 16] = 2.5                                        # in the last Z slab
    _nifti(tmp_path / "bad.nii.gz", bad, aff, np.float32)
    with pytest.raises(UserError, match="non-integer"):
        D.read_label(Path(tmp_path / "bad.nii.gz"), img, Path(tmp_path / "ct.nii.gz"), range(256))
    with pytest.raises(UserError, match="11"):
        D.read_label(Path(tmp_path / "u8.nii.gz"), img, Path(tmp_path / "ct.nii.gz"), range(10))
    plan = pl.make_plan([2.0, 1.3, 1.1], {"scheme": "transunet"}, {"1": 6, "2": 11, "3": 1})
    meta = {"bbox": [[0, 17], [2, 20], [1, 24]], "resampled_shape": [17, 18, 23]}   # crop only: no resampling
    got = pl.preprocess_label(lab, aff, meta, plan)
    ref = pl._forward_lut(plan, 11)[lab.astype(np.int64)].transpose(2, 1, 0)[0:17, 2:20, 1:24]
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("shapes", [((100, 6, 5), (150, 9, 7)), ((2, 3, 8), (197, 5, 36)), ((60, 4, 4), (90, 6, 6))])
def test_nearest_exact_at_halfway_rows(small_slabs, shapes):
    """Upsampling 2:3 puts output rows exactly halfway between two input rows; a slab's own output origin would
    round them the other way. Nearest neighbour goes through per-axis index maps of the whole grid instead."""
    n_in, n_out = shapes
    lab = (np.arange(math.prod(n_in)) % 7).astype(np.uint8).reshape(n_in)
    np.testing.assert_array_equal(pl.resize(lab, n_out, "nearest"), _whole(lab, n_out, "nearest"))
    np.testing.assert_array_equal(pl.resize_labels(lab, n_out, "nearest"), _whole(lab, n_out, "nearest"))
    wide = lab.astype(np.int16) * 1000 - 3000                 # int16 values, negative and > 255
    got = pl.resize(wide, n_out, "nearest")
    assert got.dtype == np.int16
    np.testing.assert_array_equal((got + 3000) // 1000, _whole(lab, n_out, "nearest"))


@pytest.mark.parametrize("values,dtype", [({"1": 7, "2": 300}, np.int16), ({"1": -5, "2": 9}, np.int16),
                                          ({"1": 40000, "2": 2}, np.int32), ({"1": 255, "2": 3}, np.uint8)])
def test_restore_labels_value_range(tmp_path, values, dtype):
    """Label values keep their numbers in the written map: uint8, int16 or int32 as the plan's values need."""
    lab = np.zeros((4, 5, 6), np.uint8)
    lab[1:3, 1:4, 2:5] = 1
    lab[3, 0, 0] = 2
    meta = {"resampled_shape": [4, 5, 6], "cropped_shape": [4, 5, 6], "oriented_shape": [4, 5, 6],
            "bbox": [[0, 4], [0, 5], [0, 6]], "original_affine": np.eye(4).tolist(), "original_shape": [6, 5, 4]}
    plan = {"orientation": "RAS", "label_values": values, "interpolation": {"label": "nearest"}}
    seg = np.asanyarray(pl.restore_labels(lab, meta, plan).dataobj)
    assert seg.dtype == dtype
    want = np.zeros(lab.shape, np.int64)
    for k, v in values.items():
        want[lab == int(k)] = v
    np.testing.assert_array_equal(seg, want.transpose(2, 1, 0))


@pytest.mark.parametrize("mode", ["linear", "nearest"])
def test_resize_rows_equal_whole_result(small_slabs, mode):
    """``resize(rows=(o0, o1))`` computes those rows only: the whole result's rows (linear up to the rounding of
    a slab origin, nearest exact), any range, into ``out`` of the range's shape."""
    rng = np.random.default_rng(3)
    x = (rng.random((15, 12, 11), dtype=np.float32) * 4 - 1) if mode == "linear" else \
        rng.integers(0, 300, (15, 12, 11)).astype(np.int16)
    whole = pl.resize(x, (23, 9, 14), mode)
    for o0, o1 in [(0, 23), (0, 1), (5, 17), (22, 23), (9, 9)]:
        part = pl.resize(x, (23, 9, 14), mode, rows=(o0, o1))
        assert part.shape == (o1 - o0, 9, 14) and part.dtype == whole.dtype
        np.testing.assert_allclose(part, whole[o0:o1], rtol=2 * ULP, atol=2 * ULP * 2 if mode == "linear" else 0)
    with pytest.raises(ValueError, match="expected"):
        pl.resize(x, (23, 9, 14), mode, rows=(2, 5), out=np.empty((4, 9, 14), whole.dtype))
    with pytest.raises(ValueError, match="outside"):
        pl.resize(x, (23, 9, 14), mode, rows=(20, 24))
    with pytest.raises(ValueError, match="bspline"):
        pl.resize(x.astype(np.float32), (23, 9, 14), "bspline", rows=(0, 5))


@pytest.mark.parametrize("intensity, spacing", [
    ({"scheme": "transunet"}, [3.0, 0.8, 0.8]),          # Synapse-like fine plan: z down, in-plane as stored
    ({"scheme": "transunet"}, [2.0, 1.3, 0.6]),          # every axis resampled, some up, some down
    ({"scheme": "nnunet", "channels": [{"lower": -200.0, "upper": 300.0, "mean": 60.0, "std": 90.0}]},
     [2.5, 0.8, 0.8]),                                   # the scan's own spacing: normalised, not resampled
    ({"scheme": "zscore"}, [3.0, 1.6, 1.6]),            # per-scan statistics (the normalised crop is made first)
])
def test_lazy_scan_equals_preprocessed_array(tmp_path, monkeypatch, intensity, spacing):
    """``preprocess_scan(lazy=True)``: the same meta, and rows read on demand equal the array's — whole
    (``np.asarray``) bit for bit, in arbitrary D-ranges up to the rounding of a slab origin."""
    monkeypatch.setattr(pl, "SLAB_BYTES", 1 << 14)
    rng = np.random.default_rng(11)
    hu = np.full((64, 48, 40), -1000, np.int16)
    hu[6:58, 4:44, 3:37] = rng.integers(-300, 600, (52, 40, 34)).astype(np.int16)
    img = _nifti(tmp_path / "ct.nii.gz", hu, np.diag([-0.8, 0.8, 2.5, 1.0]), np.int16)
    plan = pl.make_plan(spacing, intensity, {"1": 1})
    arr, meta = pl.preprocess_scan(img, plan)
    lazy, meta_l = pl.preprocess_scan(img, plan, lazy=True)
    assert isinstance(lazy, pl.LazyScan) and meta_l == meta
    assert lazy.shape == arr.shape and lazy.dtype == np.float32 and len(lazy) == 1
    np.testing.assert_array_equal(np.asarray(lazy), arr)
    d = arr.shape[1]
    for d0, d1 in [(0, 5), (3, 17), (d - 4, d), (0, d)]:
        np.testing.assert_allclose(lazy[:, d0:d1], arr[:, d0:d1], rtol=0, atol=2 * ULP * np.abs(arr).max())
    np.testing.assert_array_equal(lazy[0, 2], arr[0, 2])    # any other index: through the whole array
    bs = pl.make_plan(spacing, intensity, {"1": 1}, image_interpolation="bspline")
    assert isinstance(pl.preprocess_scan(img, bs, lazy=True)[0], np.ndarray)   # B-spline needs the whole volume


def test_lazy_scan_sliding_window_holds_one_span(tmp_path, monkeypatch):
    """The sliding window over a :class:`LazyScan` reads one D-span of window rows at a time (never the whole
    float32 input), and its labels equal those from the preprocessed array."""
    import torch

    from glam3d.inference.sliding_window import predict_volume
    monkeypatch.setattr(pl, "SLAB_BYTES", 1 << 14)
    rng = np.random.default_rng(12)
    hu = rng.integers(-200, 400, (40, 36, 60)).astype(np.int16)   # stored (x, y, z): D = 60 * 2.5 / 2 = 75
    img = _nifti(tmp_path / "ct.nii.gz", hu, np.diag([1.0, 1.0, 2.5, 1.0]), np.int16)
    plan = pl.make_plan([2.0, 1.0, 1.0], {"scheme": "transunet"}, {"1": 1}, crop_to_body=False)
    arr, _ = pl.preprocess_scan(img, plan)
    lazy, _ = pl.preprocess_scan(img, plan, lazy=True)
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(1, 8, 3, padding=1), torch.nn.GELU(),
                              torch.nn.Conv3d(8, 3, 3, padding=1)).eval()
    roi = (16, 24, 24)
    ref = predict_volume(net, torch.from_numpy(arr), roi, overlap=0.5, sw_batch_size=2)
    stats: dict = {}
    got = predict_volume(net, lazy, roi, overlap=0.5, sw_batch_size=2, stats=stats)
    assert torch.equal(got, ref)
    span = 4 * math.prod(arr.shape[2:]) * roi[0]
    assert 0 < stats["input_block_bytes"] <= span < arr.nbytes / 3, (stats, arr.nbytes)


def _rss_file_kb() -> int:
    """Resident pages of file mappings (``RssFile``; ``RssShmem`` where the folder is a tmpfs), in kB."""
    with open("/proc/self/status") as f:
        return sum(int(line.split()[1]) for line in f if line.startswith(("RssFile:", "RssShmem:")))


@pytest.mark.parametrize("suffix, dtype, endian", [(".nii.gz", np.int16, "<"), (".nii", np.int16, ">"),
                                                   (".nii.gz", np.uint8, "<")])
def test_spill_stored_maps_the_stored_voxels(tmp_path, suffix, dtype, endian):
    """A scan decoded into an unlinked file and mapped: the same voxels as reading it into memory, nothing left in
    the folder (at any time); images without a plain file behind them are not spilled."""
    rng = np.random.default_rng(4)
    data = rng.integers(-1000, 2000, (37, 21, 19)) if np.dtype(dtype).kind == "i" else \
        rng.integers(0, 255, (37, 21, 19))
    hdr = nib.Nifti1Header(endianness=endian)
    hdr.set_data_dtype(dtype)
    nib.save(nib.Nifti1Image(data.astype(dtype), np.eye(4), hdr), str(tmp_path / f"ct{suffix}"))
    img = nib.load(str(tmp_path / f"ct{suffix}"))
    assert (img.dataobj.dtype.byteorder == ">") == (endian == ">")   # big-endian stored where asked
    spill = tmp_path / "spill"
    spill.mkdir()
    m = pl.spill_stored(img, spill)
    assert isinstance(m, np.memmap) and m.dtype == img.dataobj.dtype and m.shape == img.shape
    np.testing.assert_array_equal(m, pl._read_stored(img))
    assert list(spill.iterdir()) == []                      # unlinked at once
    assert pl.spill_stored(nib.Nifti1Image(data.astype(np.int16), np.eye(4)), spill) is None
    assert pl.spill_stored(img, tmp_path / "no_such_folder") is None   # cannot write there: read into memory
    v = pl.read_voxels(img, keep_integers=True, spill_dir=spill)
    assert isinstance(v, np.memmap) and v.shape == img.shape + (1,)
    path = tmp_path / f"short{suffix}"
    path.write_bytes((gzip.compress if suffix == ".nii.gz" else bytes)(
        (gzip.decompress if suffix == ".nii.gz" else bytes)((tmp_path / f"ct{suffix}").read_bytes())[:-50]))
    with pytest.raises(UserError, match="cannot read the voxel data"):
        pl.read_voxels(nib.load(str(path)), keep_integers=True, spill_dir=spill)
    assert list(spill.iterdir()) == []


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc needed")
def test_release_pages_drops_the_mapping_from_resident_memory(tmp_path):
    """The point of spilling: pages read from the mapped scan stop counting in the process's resident memory once
    released (they stay in the page cache)."""
    vol = np.zeros((256, 256, 400), np.int16)                   # 50 MB stored
    img = _nifti(tmp_path / "big.nii", vol, np.eye(4), np.int16)
    m = pl.spill_stored(img, tmp_path)
    before = _rss_file_kb()
    assert int(m.reshape(-1, order="A")[::2048].sum(dtype=np.int64)) == 0   # one voxel of every 4 KiB page
    touched = _rss_file_kb()
    assert touched - before > 40_000, (before, touched)
    pl.release_pages(m[:, :, 3:9])                              # a view of it releases the whole mapping
    assert touched - _rss_file_kb() > 40_000
    pl.release_pages(np.zeros(3))                               # an in-memory array: nothing to do


def test_lazy_scan_from_a_spilled_scan(tmp_path, monkeypatch):
    """``preprocess_scan(lazy=True, spill_dir=...)``: the scan is mapped from a decoded file and released after
    every read; the rows are the in-memory ones."""
    monkeypatch.setattr(pl, "SLAB_BYTES", 1 << 14)
    rng = np.random.default_rng(13)
    hu = np.full((64, 48, 40), -1000, np.int16)
    hu[6:58, 4:44, 3:37] = rng.integers(-300, 600, (52, 40, 34)).astype(np.int16)
    img = _nifti(tmp_path / "ct.nii.gz", hu, np.diag([-0.8, 0.8, 2.5, 1.0]), np.int16)
    plan = pl.make_plan([3.0, 0.9, 0.7], {"scheme": "transunet"}, {"1": 1})
    released = []
    real = pl.release_pages
    monkeypatch.setattr(pl, "release_pages", lambda a: (released.append(type(a).__name__), real(a)))
    ref, meta = pl.preprocess_scan(img, plan, lazy=True)
    assert ref.release is None and not released
    lazy, meta_s = pl.preprocess_scan(img, plan, lazy=True, spill_dir=tmp_path)
    base = lazy.crop
    while base is not None and not isinstance(base, np.memmap):
        base = base.base
    assert meta_s == meta and base is not None and lazy.release is not None  # a view of the mapped scan
    assert released                                                          # the body box released its slabs
    n = len(released)
    np.testing.assert_array_equal(lazy[:, 5:20], ref[:, 5:20])
    assert len(released) == n + 1 and set(released) == {"memmap"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


def test_lazy_scan_read_holds_its_rows_and_slabs_only(tmp_path, monkeypatch):
    """Traced numpy memory of reading a span of a LazyScan: the span + a few slabs — not the scan's float32 copy
    nor the resampled volume (which ``preprocess_scan`` without ``lazy`` makes)."""
    rng = np.random.default_rng(6)
    hu = rng.integers(-200, 400, (160, 128, 96)).astype(np.int16)       # 3.9 MB; float32 output ≈ 9 MB
    img = _nifti(tmp_path / "ct.nii.gz", hu, np.diag([1.0, 1.0, 2.5, 1.0]), np.int16)
    plan = pl.make_plan([2.0, 0.9, 0.9], {"scheme": "transunet"}, {"1": 1}, crop_to_body=False)
    monkeypatch.setattr(pl, "SLAB_BYTES", 1 << 18)
    lazy, _ = pl.preprocess_scan(img, plan, lazy=True)
    lazy[:, 0:2]                                                         # untraced: lazy imports
    whole = 4 * math.prod(lazy.shape)
    tracemalloc.start()
    try:
        span = lazy[:, 40:56]
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert span.nbytes < whole / 6
    assert peak < span.nbytes + 6 * pl.SLAB_BYTES < whole / 2, (peak, span.nbytes, whole)


def test_spill_falls_back_without_room(tmp_path, monkeypatch):
    """A scratch folder with less than twice the scan's size free: the scan is read into memory (and the labels
    kept in memory by ``glam3d predict``) instead of filling the disk mid-run."""
    import shutil
    from collections import namedtuple

    from glam3d.inference.predictor import _label_writer
    img = _nifti(tmp_path / "ct.nii.gz", np.zeros((40, 30, 20), np.int16), np.eye(4), np.int16)
    assert pl.spill_stored(img, tmp_path) is not None
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 10 ** 9 - 40 * 30 * 20, 40 * 30 * 20))
    assert pl.spill_stored(img, tmp_path) is None
    assert isinstance(pl.read_voxels(img, keep_integers=True, spill_dir=tmp_path), np.ndarray)
    assert _label_writer(tmp_path, "ct", (20, 30, 40)) is None
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10 ** 9, 0, 10 ** 9))
    w = _label_writer(tmp_path, "ct", (20, 30, 40))
    assert w is not None
    w.abort()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]


@pytest.mark.parametrize("affine, spacing", [
    (np.diag([-0.8, 0.8, 2.5, 1.0]), [3.0, 1.3, 0.6]),                      # LAS, every axis resampled
    (np.diag([0.8, 0.8, -2.5, 1.0]), [2.5, 0.8, 0.8]),                      # slices stored inferior-up: flipped
    (np.array([[0, 0, 2.5, 0], [0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1.0]]), [2.0, 1.0, 1.0]),  # permuted
])
def test_restored_probabilities_in_slabs_equal_the_whole_maps(tmp_path, monkeypatch, affine, spacing):
    """restored_probabilities gives each class map as Z-slabs (never whole where the stored slice axis is the
    plan's), equal to the whole-volume restoring (``_to_original``) up to a float32 rounding, in the scan's
    shape (the background 1 and the other classes 0 outside the body box, as there)."""
    monkeypatch.setattr(pl, "SLAB_BYTES", 1 << 13)
    rng = np.random.default_rng(4)
    hu = np.full((40, 36, 30), -1000, np.int16)
    hu[5:33, 4:30, 3:27] = rng.integers(-300, 600, (28, 26, 24)).astype(np.int16)
    img = _nifti(tmp_path / "ct.nii.gz", hu, affine, np.int16)
    plan = pl.make_plan(spacing, {"scheme": "transunet"}, {"1": 1, "2": 2})
    arr, meta = pl.preprocess_scan(img, plan)
    probs = rng.random((3,) + arr.shape[1:], dtype=np.float32)
    seen = []
    real = pl._to_original
    monkeypatch.setattr(pl, "_to_original", lambda *a, **k: (seen.append(1), real(*a, **k))[1])
    slabbed = [list(slabs) for slabs in pl.restored_probabilities(probs, meta, plan)]
    whole_used = len(seen) > 0
    assert whole_used == (affine[2, 2] == 0)  # only the permuted scan needs the whole map
    for k, slabs in enumerate(slabbed):
        assert len(slabs) > 1 and all(s.shape[:2] == hu.shape[:2] for s in slabs)
        got = np.concatenate(slabs, axis=2)
        want = real(probs[k], meta, plan, "linear", fill=1.0 if k == 0 else 0.0)
        assert got.shape == hu.shape and got.dtype == np.float32
        np.testing.assert_array_equal(got, want)  # bit for bit
    np.testing.assert_array_equal(pl.restore_probabilities(probs, meta, plan),
                                  np.stack([np.concatenate(s, axis=2) for s in slabbed]))
    with pytest.raises(UserError, match="must be"):
        pl.restored_probabilities(probs[0], meta, plan)  # at the call, before anything is written



@pytest.mark.parametrize("affine, spacing, interp, values", [
    (np.diag([-0.8, 0.8, 2.5, 1.0]), [3.0, 1.3, 0.6], "linear", {"1": 1, "2": 7}),
    (np.diag([0.8, 0.8, -2.5, 1.0]), [2.0, 0.7, 0.9], "nearest", {"1": 1, "2": 7}),
    (np.diag([0.8, -0.8, 2.5, 1.0]), [2.5, 0.8, 0.8], "linear", {"1": -5, "2": 300}),       # int16 values
    (np.array([[0, 0, 2.5, 0], [0.8, 0, 0, 0], [0, 0.8, 0, 0], [0, 0, 0, 1.0]]), [2.0, 1.0, 1.0], "linear",
     {"1": 1, "2": 7}),                                                                   # permuted: whole
])
def test_restored_label_slabs_equal_restore_labels(tmp_path, monkeypatch, affine, spacing, interp, values):
    """glam3d predict's label map, Z-slab by Z-slab: restore_labels' voxels bit for bit (the linear one-hot
    resampling in the whole map's own row ranges), in its dtype, never whole unless the plan moves the stored
    slice axis; a label outside the plan's indices is refused at the call."""
    monkeypatch.setattr(pl, "SLAB_BYTES", 1 << 12)
    rng = np.random.default_rng(6)
    hu = np.full((40, 36, 30), -1000, np.int16)
    hu[5:33, 4:30, 3:27] = rng.integers(-300, 600, (28, 26, 24)).astype(np.int16)
    img = _nifti(tmp_path / "ct.nii.gz", hu, affine, np.int16)
    plan = pl.make_plan(spacing, {"scheme": "transunet"}, values, label_interpolation=interp)
    arr, meta = pl.preprocess_scan(img, plan)
    lab = np.zeros(arr.shape[1:], np.uint8)  # organs: blocks of 1 and 2 in the body
    D, H, W = lab.shape
    lab[D // 4:D // 2, H // 4:3 * H // 4, W // 3:2 * W // 3] = 1
    lab[D // 2:3 * D // 4, H // 3:H // 2, W // 4:W // 2] = 2
    want = pl.restore_labels(lab, meta, plan)
    seen = []
    real = pl._to_original
    monkeypatch.setattr(pl, "_to_original", lambda *a, **k: (seen.append(1), real(*a, **k))[1])
    dtype, slabs = pl.restored_label_slabs(lab, meta, plan)
    slabs = list(slabs)
    assert (len(seen) > 0) == (affine[2, 2] == 0)
    assert dtype == want.get_data_dtype() and all(s.dtype == dtype for s in slabs) and len(slabs) > 1
    got = np.concatenate(slabs, axis=2)
    np.testing.assert_array_equal(got, np.asanyarray(want.dataobj))
    assert set(np.unique(got).tolist()) == {0, *(int(v) for v in values.values())}
    with pytest.raises(UserError, match="outside 0..2"):
        pl.restored_label_slabs(lab + 2, meta, plan)


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/status"), reason="Linux /proc needed")
def test_restored_probabilities_release_a_mapped_source(tmp_path, monkeypatch):
    """Restoring from probabilities on disk (a memmap, as glam3d predict's scratch file) keeps about a slab of the
    mapping resident, not a class map (16 MB here) nor all of them."""
    monkeypatch.setattr(pl, "SLAB_BYTES", 1 << 20)
    hu = np.full((256, 256, 64), 50, np.int16)
    img = _nifti(tmp_path / "ct.nii.gz", hu, np.diag([0.8, 0.8, 2.5, 1.0]), np.int16)
    plan = pl.make_plan([2.5, 0.8, 0.8], {"scheme": "transunet"}, {"1": 1, "2": 2})
    arr, meta = pl.preprocess_scan(img, plan)
    probs = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=(3,) + arr.shape[1:])
    probs[:] = 0.25
    probs.flush()
    pl.release_pages(probs)
    base, most = _rss_file_kb(), 0
    for slabs in pl.restored_probabilities(probs, meta, plan):
        for _slab in slabs:
            most = max(most, _rss_file_kb() - base)
    assert arr.shape[1:] == (64, 256, 256)
    assert most * 1024 < 8 << 20, most  # (a class map: 16 MB; the three: 48 MB)
