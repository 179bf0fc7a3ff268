"""Slab-streaming sliding-window inference: equals MONAI's full-volume aggregation, memory bounded in D."""
import pytest
import torch
from monai.inferers import sliding_window_inference

from glam3d.engine.inference import predict_volume, resolve_amp, window_grid


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


def test_2d():
    model = TinyNet(nd=2).eval()
    image = torch.randn(1, 40, 33)
    ref, _ = _monai_labels(model, image, (16, 12), 0.5, 2)
    assert torch.equal(predict_volume(model, image, (16, 12)), ref)


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


def test_amp_bf16_on_cpu_runs():
    image = torch.randn(1, 12, 8, 8)
    lab = predict_volume(TinyNet(), image, (8, 8, 8), amp="bf16")
    assert lab.shape == (12, 8, 8)
