"""Cell-streaming sliding-window inference: equals MONAI's full-volume aggregation, memory bounded in D;
input and output may stay on disk (.npy slab reader / writer)."""
import numpy as np
import pytest
import torch
from monai.inferers import sliding_window_inference

from glam3d.inference.precision import cpu_bf16_native, resolve_amp
from glam3d.inference.sliding_window import predict_volume, window_grid
from glam3d.utils.ooc import NpySlabReader, NpySlabWriter


class TinyNet(torch.nn.Module):
    """Deterministic, position-sensitive (padding) little conv net: K classes."""

    def __init__(self, cin=1, k=4, nd=3, seed=0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        conv = torch.nn.Conv3d if nd == 3 else torch.nn.Conv2d
        self.a = conv(cin, 6, 3, padding=1)
        self.b = conv(6, k, 3, padding=1)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.7)

    def forward(self, x):
        return self.b(torch.tanh(self.a(x)))


def _monai_labels(model, image, roi, overlap, sw, mode="gaussian"):
    with torch.no_grad():
        out = sliding_window_inference(image[None], roi, sw, lambda x: torch.softmax(model(x), 1),
                                       overlap=overlap, mode=mode)
    return out[0].argmax(0).to(torch.uint8), out[0]


@pytest.mark.parametrize("shape,roi,overlap,sw,mode", [
    ((1, 37, 20, 18), (8, 12, 10), 0.5, 2, "gaussian"),
    ((2, 50, 16, 16), (16, 16, 16), 0.5, 3, "gaussian"),
    ((1, 29, 14, 15), (10, 8, 8), 0.25, 1, "constant"),
    ((1, 23, 9, 11), (7, 5, 6), 0.7, 4, "gaussian"),
    ((1, 6, 10, 9), (8, 12, 10), 0.5, 2, "gaussian"),   # smaller than the window: padded
    ((1, 5, 7, 6), (8, 12, 10), 0.0, 1, "gaussian"),    # smaller than the window on every axis
    ((1, 30, 24, 24), (8, 8, 8), 0.0, 2, "gaussian"),   # overlap 0, D not a multiple: last row shifted
    ((1, 30, 20, 24), (8, 8, 8), 0.0, 3, "gaussian"),   # ... and H not a multiple either
    ((1, 33, 21, 17), (8, 8, 8), 0.25, 2, "gaussian"),
    ((1, 33, 21, 17), (8, 8, 8), 0.75, 5, "gaussian"),
    ((1, 40, 16, 16), (6, 16, 16), 0.5, 2, "gaussian"),  # anisotropic roi, one window across H, W
    ((1, 26, 30, 12), (10, 6, 12), 0.5, 2, "constant"),  # anisotropic roi
    ((1, 27, 19, 21), (9, 7, 5), 0.6, 4, "gaussian"),
    ((1, 6, 40, 33), (8, 12, 10), 0.5, 2, "gaussian"),  # smaller than the window along D only
])
def test_equals_monai_full_volume(shape, roi, overlap, sw, mode):
    torch.manual_seed(1)
    model = TinyNet(cin=shape[0]).eval()
    image = torch.randn(shape)
    ref_labels, ref_probs = _monai_labels(model, image, roi, overlap, sw, mode)
    labels, probs = predict_volume(model, image, roi, overlap=overlap, sw_batch_size=sw, mode=mode,
                                   return_probs=True)
    assert labels.dtype == torch.uint8 and labels.shape == shape[1:]
    assert torch.equal(labels, ref_labels)
    assert torch.equal(probs, ref_probs)  # bit for bit: same window order, same per-voxel summation order
    assert torch.equal(predict_volume(model, image, roi, overlap=overlap, sw_batch_size=sw, mode=mode), labels)


@pytest.mark.parametrize("overlap", [0.0, 0.25, 0.5, 0.75])
def test_2d(overlap):
    model = TinyNet(nd=2).eval()
    image = torch.randn(1, 40, 33)
    ref, ref_probs = _monai_labels(model, image, (16, 12), overlap, 2)
    labels, probs = predict_volume(model, image, (16, 12), overlap=overlap, return_probs=True)
    assert torch.equal(labels, ref) and torch.equal(probs, ref_probs)
    small = torch.randn(1, 9, 5)  # smaller than the window: padded
    ref, _ = _monai_labels(model, small, (16, 12), overlap, 2)
    assert torch.equal(predict_volume(model, small, (16, 12), overlap=overlap), ref)


def _window_bytes(k, roi):
    return k * int(np.prod(roi)) * 4  # K accumulator channels, float32 (a cell's count map: only at finalising)


@pytest.mark.parametrize("depth", [64, 70])  # a multiple of the window, and not (the last row is shifted back)
def test_overlap0_holds_one_window_whatever_the_length(depth):
    model = TinyNet(k=5).eval()
    roi = (8, 12, 12)
    peaks = []
    for d in (depth, 2 * depth):
        stats = {}
        image = torch.randn(1, d, 24, 36)
        labels = predict_volume(model, image, roi, overlap=0, stats=stats)
        assert torch.equal(labels, _monai_labels(model, image, roi, 0.0, 2)[0])
        peaks.append(stats["peak_accumulator_bytes"])
        assert stats["slab_bytes"] == 6 * 8 * 24 * 36 * 4  # what a roi_d-deep full-width slab would be
    assert peaks[0] == peaks[1] == _window_bytes(5, roi)


def test_overlap_half_holds_at_most_half_a_slab():
    model = TinyNet(k=5).eval()
    roi = (8, 8, 8)
    peaks = []
    for d in (48, 96):
        stats = {}
        predict_volume(model, torch.randn(1, d, 64, 64), roi, overlap=0.5, stats=stats)
        slab = (5 + 1) * roi[0] * 64 * 64 * 4  # the old slab: K x roi_d x H x W floats + its count map
        assert stats["slab_bytes"] == slab
        # the sums of one (roi_d / 2)-deep full-width layer of cells (5/12 of the slab) and the edges of the next
        assert stats["peak_accumulator_bytes"] <= 0.5 * slab, stats["peak_accumulator_bytes"] / slab
        peaks.append(stats["peak_accumulator_bytes"])
    assert peaks[0] == peaks[1]


def test_slab_memory_does_not_grow_with_length():
    model = TinyNet(k=5).eval()
    sizes = {}
    for d in (16, 64, 160):
        stats = {}
        predict_volume(model, torch.randn(1, d, 12, 12), (8, 12, 12), stats=stats)
        sizes[d] = stats
    assert sizes[16]["slab_bytes"] == sizes[64]["slab_bytes"] == sizes[160]["slab_bytes"]
    assert sizes[160]["slab_shape"] == (5, 8, 12, 12)
    assert sizes[160]["probs_bytes"] == 0
    # full-volume aggregation would hold (K+1) float planes per slice: 20x the slab here
    assert sizes[160]["full_volume_bytes"] == 20 * sizes[160]["slab_bytes"]
    assert sizes[160]["labels_bytes"] == 160 * 12 * 12


def test_windows_sorted_along_d():
    w = window_grid((50, 20, 20), (16, 8, 8), 0.5)
    starts = [s[0].start for s in w]
    assert starts == sorted(starts) and w[-1][0].stop == 50


def test_mirror_symmetric_model_and_invariance():
    # a model that is equivariant to flips gives the same labels with and without mirroring
    class Pointwise(torch.nn.Module):
        def forward(self, x):
            return torch.cat([x, -x, 0.3 * x ** 2], 1)

    image = torch.randn(1, 20, 10, 10)
    a = predict_volume(Pointwise(), image, (8, 8, 8))
    b, pb = predict_volume(Pointwise(), image, (8, 8, 8), mirror=True, return_probs=True)
    assert torch.equal(a, b)
    assert torch.allclose(pb.sum(0), torch.ones(20, 10, 10), atol=1e-5)
    # a non-equivariant model: mirroring averages 8 passes and changes the result a little
    model = TinyNet().eval()
    _, p1 = predict_volume(model, image, (8, 8, 8), return_probs=True)
    _, p8 = predict_volume(model, image, (8, 8, 8), mirror=True, return_probs=True)
    assert not torch.allclose(p1, p8)
    _, p2 = predict_volume(model, image, (8, 8, 8), mirror=(0,), return_probs=True)
    assert not torch.allclose(p1, p2) and not torch.allclose(p2, p8)


def test_deep_supervision_list_and_stitch_cpu_and_progress():
    class DS(TinyNet):
        def forward(self, x):
            y = super().forward(x)
            return [y, y[:, :, ::2, ::2, ::2]]

    image = torch.randn(1, 20, 10, 10)
    seen = []
    a = predict_volume(DS(), image, (8, 8, 8), stitch_device="cpu", progress=lambda d, t: seen.append((d, t)))
    b = predict_volume(TinyNet(), image, (8, 8, 8))
    assert torch.equal(a, b) and seen[-1][0] == seen[-1][1]


def test_bad_arguments():
    m = TinyNet()
    with pytest.raises(ValueError, match="overlap"):
        predict_volume(m, torch.randn(1, 8, 8, 8), (4, 4, 4), overlap=1.0)
    with pytest.raises(ValueError, match="roi_size"):
        predict_volume(m, torch.randn(1, 8, 8, 8), (4, 4))
    with pytest.raises(ValueError, match="image"):
        predict_volume(m, torch.randn(8, 8, 8, 8, 8), (4, 4, 4))
    with pytest.raises(ValueError, match="amp"):
        resolve_amp("fp8", torch.device("cpu"))
    assert resolve_amp(None, torch.device("cpu")) is None
    assert resolve_amp("bf16", torch.device("cpu")) is torch.bfloat16
    assert resolve_amp(torch.bfloat16, "cpu") is torch.bfloat16 and resolve_amp("off", "cuda") is None
    assert resolve_amp("fp16", "cuda") is torch.float16 and resolve_amp(torch.float16, "cuda") is torch.float16
    with pytest.raises(ValueError, match="fp16 autocast is a GPU path"):
        resolve_amp("fp16", torch.device("cpu"))
    assert isinstance(cpu_bf16_native(), bool)


def test_amp_bf16_on_cpu_runs():
    image = torch.randn(1, 12, 8, 8)
    lab = predict_volume(TinyNet(), image, (8, 8, 8), amp="bf16")
    assert lab.shape == (12, 8, 8)


@pytest.mark.parametrize("spec,shape", [("glam_nnformer_tiny", (1, 1, 32, 64, 64)),
                                        ("nnformer_tiny", (1, 1, 32, 64, 64)),
                                        ("glam_swin_unet_tiny", (1, 3, 64, 64))])
def test_inference_weights_equal_autocast_bit_for_bit(spec, shape):
    """Weights cast once (inference_weights) give the very outputs of autocast casting them at every call — same
    rounding, 3D convolution weights in the channels-last layout oneDNN copies them to — and only the linear and
    convolution layers' weights and biases change dtype (norms, bias tables, global tokens stay float32)."""
    import copy

    from glam3d.inference.precision import inference_weights
    from glam3d.models.registry import build_model
    torch.manual_seed(0)
    model = build_model(spec).eval()
    x = torch.randn(shape)

    def run(m):
        with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(x)
        return y[0] if isinstance(y, (list, tuple)) else y

    ref = run(model)
    cast = inference_weights(copy.deepcopy(model), torch.bfloat16)
    assert torch.equal(run(cast), ref)
    layer_types = (torch.nn.Linear, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.ConvTranspose2d,
                   torch.nn.ConvTranspose3d)
    n_cast = 0
    for (name, mod), orig in zip(cast.named_modules(), model.modules()):
        own = dict(mod.named_parameters(recurse=False))
        for pname, p in own.items():
            if isinstance(mod, layer_types):
                assert p.dtype == torch.bfloat16, f"{name}.{pname}"
                assert torch.equal(p, getattr(orig, pname).to(torch.bfloat16))
                if p.ndim == 5:
                    assert p.is_contiguous(memory_format=torch.channels_last_3d)
                n_cast += 1
            else:
                assert p.dtype == torch.float32, f"{name}.{pname}"
    assert n_cast > 10
    with pytest.raises(RuntimeError):  # the model is for autocast inference now: float32 inputs alone do not mix
        with torch.inference_mode():
            cast(x)
    same = inference_weights(model, None)  # no autocast dtype: nothing changes
    assert same is model and all(p.dtype == torch.float32 for p in model.parameters())


def test_inference_weights_sliding_window_labels_equal():
    """predict_volume with bf16 autocast: the same labels and probabilities from weights cast once as from
    autocast's casts (what glam3d predict and glam3d bench run on a CPU)."""
    import copy

    from glam3d.inference.precision import inference_weights
    from glam3d.models.registry import build_model
    torch.manual_seed(0)
    model = build_model("glam_nnformer_tiny").eval()
    image = torch.randn(1, 40, 72, 64)
    ref = predict_volume(model, image, (32, 64, 64), overlap=0.5, amp="bf16", return_probs=True)
    got = predict_volume(inference_weights(copy.deepcopy(model), torch.bfloat16), image, (32, 64, 64), overlap=0.5,
                         amp="bf16", return_probs=True)
    assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])


# --- input in any dtype, lazy sources, labels out slab by slab -------------------------------------------------
def _ct_normalize(x):
    return x.clamp_(-125, 275).add_(125).div_(400)


def test_int16_input_with_normalize_equals_prenormalised_float():
    model = TinyNet(k=4).eval()
    hu = torch.randint(-1000, 1500, (1, 21, 18, 14), dtype=torch.int16)
    ref = predict_volume(model, _ct_normalize(hu.float()), (8, 8, 8), overlap=0.5)
    got = predict_volume(model, hu, (8, 8, 8), overlap=0.5, normalize=_ct_normalize)
    assert hu.dtype == torch.int16 and torch.equal(got, ref)
    assert torch.equal(predict_volume(model, hu.numpy(), (8, 8, 8), overlap=0.5, normalize=_ct_normalize), ref)
    half = _ct_normalize(hu.float()).half()
    assert torch.equal(predict_volume(model, half, (8, 8, 8), overlap=0.5),
                       predict_volume(model, half.float(), (8, 8, 8), overlap=0.5))
    # padding is zeros of the *normalised* image (MONAI pads the preprocessed volume), not normalize(0)
    small = hu[:, :5, :6, :7]
    ref = predict_volume(model, _ct_normalize(small.float()), (8, 8, 8))
    assert torch.equal(predict_volume(model, small, (8, 8, 8), normalize=_ct_normalize), ref)
    with pytest.raises(ValueError, match="elementwise"):
        predict_volume(model, hu, (8, 8, 8), normalize=lambda x: x.mean())


@pytest.mark.parametrize("shape", [(13, 5, 6), (2, 13, 5, 6)])
@pytest.mark.parametrize("dtype", [np.int16, np.float32, ">f4", np.uint8])
def test_npy_reader_writer_round_trip(tmp_path, shape, dtype):
    rng = np.random.default_rng(0)
    a = (rng.normal(size=shape) * 100).astype(dtype)
    np.save(tmp_path / "a.npy", a)
    r = NpySlabReader(tmp_path / "a.npy")
    a4 = a if a.ndim == 4 else a[None]
    assert r.shape == a4.shape and r.dtype == np.dtype(dtype).newbyteorder("=")
    for d0, d1 in [(0, 13), (0, 1), (12, 13), (4, 9), (13, 13)]:
        got = r[:, d0:d1]
        assert got.shape == (a4.shape[0], d1 - d0) + a4.shape[2:]
        assert np.array_equal(got, a4[:, d0:d1])
    with pytest.raises(IndexError):
        r[3]
    with pytest.raises(IndexError):
        r.read(5, 14)
    # writer: planes in any order, read back by numpy
    with NpySlabWriter(tmp_path / "b.npy", a.shape, dtype=a.dtype) as w:
        for d0, d1 in [(12, 13), (0, 5), (5, 12)]:
            w[d0:d1] = a[d0:d1]
        assert not (tmp_path / "b.npy").exists()  # only renamed into place at close
    b = np.load(tmp_path / "b.npy")
    assert b.dtype == a.dtype and np.array_equal(b, a)
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_npy_writer_refuses_missing_planes_and_discards_on_error(tmp_path):
    w = NpySlabWriter(tmp_path / "x.npy", (4, 3, 3))
    w[0:2] = np.ones((2, 3, 3), np.uint8)
    with pytest.raises(ValueError, match="never written"):
        w.close()
    with pytest.raises(ValueError, match="shape"):
        NpySlabWriter(tmp_path / "y.npy", (4, 3, 3)).__setitem__(slice(0, 2), np.ones((2, 3, 4)))
    with pytest.raises(RuntimeError):
        with NpySlabWriter(tmp_path / "z.npy", (2, 3, 3)) as w:
            w[0:2] = np.zeros((2, 3, 3))
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_npy_reader_bad_files(tmp_path):
    bad = tmp_path / "bad.npy"
    bad.write_bytes(b"not an npy file at all")
    with pytest.raises(ValueError, match="bad.npy") as e:
        NpySlabReader(bad)
    assert "\n" not in str(e.value)
    np.save(tmp_path / "t.npy", np.zeros((4, 5, 6), np.int16))
    raw = (tmp_path / "t.npy").read_bytes()
    (tmp_path / "t.npy").write_bytes(raw[:-10])
    with pytest.raises(ValueError, match="t.npy.*truncated"):
        NpySlabReader(tmp_path / "t.npy")
    np.save(tmp_path / "f.npy", np.asfortranarray(np.zeros((4, 5, 6), np.int16)))
    with pytest.raises(ValueError, match="f.npy.*Fortran"):
        NpySlabReader(tmp_path / "f.npy")
    np.save(tmp_path / "two.npy", np.zeros((4, 5), np.int16))
    with pytest.raises(ValueError, match="two.npy"):
        NpySlabReader(tmp_path / "two.npy")


@pytest.mark.parametrize("shape,roi,overlap", [
    ((1, 37, 20, 18), (8, 12, 10), 0.5),
    ((2, 30, 24, 24), (8, 8, 8), 0.0),
    ((1, 6, 10, 9), (8, 12, 10), 0.5),   # smaller than the window: the window batch is padded, not the volume
    ((1, 25, 17, 19), (8, 8, 8), 0.75),
])
def test_reader_writer_equal_in_memory(tmp_path, shape, roi, overlap):
    model = TinyNet(cin=shape[0], k=4).eval()
    hu = np.random.default_rng(1).integers(-1000, 1500, shape).astype(np.int16)
    np.save(tmp_path / "ct.npy", hu if shape[0] > 1 else hu[0])
    ref, ref_probs = predict_volume(model, torch.from_numpy(hu), roi, overlap=overlap, normalize=_ct_normalize,
                                    return_probs=True, sw_batch_size=3)
    stats = {}
    with NpySlabWriter(tmp_path / "lab.npy", shape[1:]) as w:
        got, probs = predict_volume(model, NpySlabReader(tmp_path / "ct.npy"), roi, overlap=overlap,
                                    normalize=_ct_normalize, out=w, return_probs=True, stats=stats, sw_batch_size=3)
        assert got is w
    assert np.array_equal(np.load(tmp_path / "lab.npy"), ref.numpy())
    assert torch.equal(probs, ref_probs)
    assert stats["labels_bytes"] == 0 and 0 < stats["labels_buffer_bytes"] <= ref.numel()
    if shape[1] > 2 * roi[0]:
        assert stats["labels_buffer_bytes"] <= 2 * roi[0] * shape[2] * shape[3] < ref.numel()
    assert 0 < stats["input_block_bytes"] <= shape[0] * 2 * 2 * roi[0] * shape[2] * shape[3]
    # out= may also be a numpy array or a tensor
    arr = np.zeros(shape[1:], np.uint8)
    predict_volume(model, torch.from_numpy(hu), roi, overlap=overlap, normalize=_ct_normalize, out=arr)
    assert np.array_equal(arr, ref.numpy())
    ten = torch.zeros(shape[1:], dtype=torch.uint8)
    predict_volume(model, torch.from_numpy(hu), roi, overlap=overlap, normalize=_ct_normalize, out=ten)
    assert torch.equal(ten, ref)
    with pytest.raises(ValueError, match="out has shape"):
        predict_volume(model, torch.from_numpy(hu), roi, out=np.zeros((3, 3, 3), np.uint8))


def test_out_receives_d_ranges_in_order():
    class Recorder:
        def __init__(self, shape):
            self.shape = shape
            self.calls = []
            self.data = np.zeros(shape, np.uint8)

        def __setitem__(self, key, value):
            self.calls.append((key.start, key.stop))
            self.data[key] = value

    model = TinyNet(k=3).eval()
    image = torch.randn(1, 70, 12, 12)
    rec = Recorder((70, 12, 12))
    predict_volume(model, image, (8, 12, 12), overlap=0.5, out=rec)
    assert np.array_equal(rec.data, predict_volume(model, image, (8, 12, 12), overlap=0.5).numpy())
    starts = [a for a, _ in rec.calls]
    assert starts == sorted(starts) and rec.calls[0][0] == 0 and rec.calls[-1][1] == 70
    assert all(b - a <= 8 for a, b in rec.calls)  # written as soon as finished, never the whole volume


def test_one_argmax_per_cell_and_the_chunked_argmax_equal(monkeypatch):
    """A finished cell becomes labels in one argmax (+ cast + copy: on a GPU each is a kernel launch the host
    pays for) unless its int64 temporary would pass ``_ARGMAX_ELEMENTS``; chunked by planes the
    labels are the same."""
    import math

    from torch.utils._python_dispatch import TorchDispatchMode

    import glam3d.inference.sliding_window as inf

    class CountArgmax(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten.argmax.default:
                CountArgmax.n += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(1)
    model = TinyNet().eval()
    image = torch.randn(1, 37, 20, 18)  # larger than the window on every axis: every cell holds voxels
    stats = {}
    for overlap in (0.0, 0.5):  # cells 8 planes deep (one window, the last row shifted), then 4
        CountArgmax.n = 0
        with CountArgmax():
            labels = predict_volume(model, image, (8, 12, 10), overlap=overlap, sw_batch_size=2, stats=stats)
        assert CountArgmax.n == math.prod(stats["cells"])
        with monkeypatch.context() as m:
            m.setattr(inf, "_ARGMAX_ELEMENTS", 1)  # one plane per argmax
            assert torch.equal(predict_volume(model, image, (8, 12, 10), overlap=overlap, sw_batch_size=2), labels)


@pytest.mark.parametrize("shape,roi,overlap,sw", [
    ((1, 48, 64, 64), (8, 8, 8), 0.5, 2),
    ((1, 45, 30, 27), (8, 8, 8), 0.5, 1),   # sizes off the window grid (last rows and columns shifted back)
    ((2, 40, 24, 24), (8, 12, 12), 0.25, 3),
    ((1, 50, 20, 20), (8, 8, 8), 0.75, 2),
    ((1, 37, 16, 16), (8, 8, 8), 0.0, 2),   # overlap 0: the last two rows interleave, nothing waits
    ((1, 40, 36), (8, 8), 0.5, 2),          # 2D
])
def test_spill_parks_shared_rows_and_keeps_labels_bit_for_bit(tmp_path, shape, roi, overlap, sw):
    model = TinyNet(cin=shape[0], k=5, nd=len(roi)).eval()
    x = torch.randn(shape)
    mem, disk = {}, {}
    l0, p0 = predict_volume(model, x, roi, overlap=overlap, sw_batch_size=sw, stats=mem, return_probs=True)
    l1, p1 = predict_volume(model, x, roi, overlap=overlap, sw_batch_size=sw, stats=disk, return_probs=True,
                            spill=tmp_path)
    assert torch.equal(l0, l1) and torch.equal(p0, p1)
    ml, mp = _monai_labels(model, x, roi, overlap, sw)
    assert torch.equal(l1, ml) and torch.equal(p1, mp)
    assert list(tmp_path.iterdir()) == []  # the spill file was never linked into the folder
    if overlap == 0:
        assert disk["spill"] == "unused" and disk["spilled_cells"] == 0
        assert disk["peak_accumulator_bytes"] == mem["peak_accumulator_bytes"]
    else:
        assert disk["spill"] == "on" and disk["spilled_cells"] > 0
        # what waits for the next row left memory; the file holds about that layer, its slots reused
        assert disk["peak_accumulator_bytes"] < 0.65 * mem["peak_accumulator_bytes"]
        assert disk["peak_spilled_bytes"] <= disk["spill_file_bytes"] <= 1.5 * disk["peak_spilled_bytes"]


def test_spill_memory_stays_a_row_whatever_the_length(tmp_path):
    model = TinyNet(k=5).eval()
    roi = (8, 8, 8)
    peaks, files = [], []
    for d in (48, 96, 160):
        stats = {}
        predict_volume(model, torch.randn(1, d, 64, 64), roi, overlap=0.5, stats=stats, spill=tmp_path)
        slab = stats["slab_bytes"]
        # the cells of one row of windows that no other row adds to, not the (roi_d / 2)-deep layer
        assert stats["peak_accumulator_bytes"] <= slab / 6, stats["peak_accumulator_bytes"] / slab
        peaks.append(stats["peak_accumulator_bytes"])
        files.append(stats["spill_file_bytes"])
    assert len(set(peaks)) == 1 and len(set(files)) == 1


def test_spill_without_room_or_on_a_failed_write_keeps_cells_in_memory(tmp_path, monkeypatch):
    import os

    import glam3d.utils.io as io
    model = TinyNet(k=4).eval()
    x = torch.randn(1, 40, 32, 32)
    roi = (8, 8, 8)
    ref = predict_volume(model, x, roi, overlap=0.5)
    with monkeypatch.context() as m:
        m.setattr(io, "has_room", lambda folder, nbytes: False)
        stats = {}
        assert torch.equal(predict_volume(model, x, roi, overlap=0.5, stats=stats, spill=tmp_path), ref)
        assert stats["spill"] == "off: no room" and stats["spilled_cells"] == 0
    real, calls = os.pwrite, []

    def pwrite(fd, data, off):  # the disk fills up after 5 cells: those stay parked, the rest stays in memory
        calls.append(off)
        if len(calls) > 5:
            raise OSError(28, "No space left on device")
        return real(fd, data, off)
    monkeypatch.setattr(os, "pwrite", pwrite)
    stats = {}
    assert torch.equal(predict_volume(model, x, roi, overlap=0.5, stats=stats, spill=tmp_path), ref)
    assert stats["spill"] == "stopped: No space left on device" and stats["spilled_cells"] == 5
    assert list(tmp_path.iterdir()) == []
