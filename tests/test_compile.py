"""torch.compile: every glam3d network traces as one graph (training and inference), compiled results equal the
eager ones, `glam3d predict --compile` writes the eager labels, `train.compile` trains through the compiled
network. Graph capture is checked with the `aot_eager` backend (fast); inductor runs once, in the predict test."""
from __future__ import annotations

import math

import nibabel as nib
import numpy as np
import pytest
import torch

import helpers as H
from glam3d.engine.compile import FixedBatch, compile_network
from glam3d.models import build_model

SMALL_3D = dict(num_classes=4, crop_size=(16, 32, 32), embed_dim=12, depths=(2, 1, 1, 1), num_heads=(1, 1, 2, 2),
                window_size=(2, 2, 2, 1), drop_path_rate=0.0)
SMALL_2D = dict(embed_dim=8, depths=[2, 1, 1, 1], num_heads=[1, 2, 2, 4], window_size=4, num_classes=5,
                drop_path_rate=0.0)
NETWORKS = [("glam_nnformer_tiny", SMALL_3D, (2, 1, 16, 32, 32)),
            ("nnformer_tiny", SMALL_3D, (2, 1, 16, 32, 32)),
            ("glam_swin_unet_tiny", SMALL_2D, (2, 3, 64, 64)),
            ("glam_swin_upernet_tiny", {**SMALL_2D, "channels": 16, "aux_channels": 8}, (2, 3, 50, 71))]


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def _grads(model):
    """Gradient per parameter name; zeros where autograd left none (a compiled graph writes zeros there)."""
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in model.named_parameters()}


def _close(a, b, tol=1e-4):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name,kwargs,shape", NETWORKS, ids=[n for n, _, _ in NETWORKS])
def test_network_compiles_as_one_graph(name, kwargs, shape):
    """fullgraph=True fails on any graph break: the shifted-window index and mask builders, the mask caches
    and the fused linears must all trace. Forward, gradients (training) and the no-grad forward (inference,
    where eager takes the cached masks and oneDNN fused linears) equal eager. Stage 1 has a shifted block."""
    torch.manual_seed(0)
    model = build_model(name, **kwargs)
    for mod in model.modules():  # UperNet's heads: dropout 0.1, random in training mode
        if isinstance(mod, torch.nn.Dropout2d):
            mod.p = 0.0
    x = torch.randn(shape)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True, dynamic=False)

    model.train()
    ref = _first(model(x))
    ref.square().mean().backward()
    ref_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    out = _first(compiled(x))
    out.square().mean().backward()
    grads = _grads(model)
    assert _close(out, ref)
    assert sum(g.abs().sum().item() > 0 for g in ref_grads.values()) > 0.5 * len(ref_grads)
    assert all(_close(grads[n], ref_grads[n]) for n in ref_grads)

    model.eval()
    with torch.no_grad():
        ref = _first(model(x))
        ref2 = _first(model(x))  # second call: eager now reads its caches
        out = _first(compiled(x))
    assert torch.equal(ref, ref2) and _close(out, ref)


def test_fixed_batch_pads_and_cuts():
    calls = []

    def net(x):
        calls.append(tuple(x.shape))
        return [x * 2, x[:, :1] + 1]  # deep-supervision style list

    fb = FixedBatch(net, 3)
    x = torch.randn(2, 2, 4, 4)
    out = fb(x)
    assert calls == [(3, 2, 4, 4)] and isinstance(out, list)
    assert torch.equal(out[0], x * 2) and torch.equal(out[1], x[:, :1] + 1)
    assert fb(torch.randn(3, 2, 4, 4))[0].shape[0] == 3
    with pytest.raises(ValueError, match="exceeds the fixed batch size 3"):
        fb(torch.randn(4, 2, 4, 4))
    with pytest.raises(ValueError, match="unknown compile mode"):
        compile_network(torch.nn.Identity(), inference=True, device="cpu", mode="fastest")


def test_cuda_graph_forward_refuses_cpu_tensors():
    """CUDA graphs are GPU only: a CPU input gets a clear error, not a silent eager fallback (the GPU behaviour
    is tests/test_cuda.py's)."""
    from glam3d.engine.cuda_graphs import CudaGraphForward, graphed_network
    net = graphed_network(torch.nn.Conv3d(1, 2, 1), batch_size=2)
    assert isinstance(net.net, CudaGraphForward)
    with torch.inference_mode(), pytest.raises(ValueError, match="CUDA device"):
        net(torch.zeros(1, 1, 4, 4, 4))


def test_tensors_a_capture_reads_are_kept_not_its_intermediates():
    """What a CUDA graph keeps alive (glam3d.engine.cuda_graphs.tensors_read, run here on the CPU): the input,
    the weights and the attention masks the network cached at the warm-up forward — memory a replay reads but
    a cache could free — and none of the forward's intermediates (holding those would keep a capture from reusing
    its own memory)."""
    from glam3d.engine.cuda_graphs import tensors_read
    torch.manual_seed(0)
    model = build_model("glam_nnformer_tiny").eval()
    x = torch.randn(1, 1, 32, 64, 64)
    with torch.inference_mode():
        model(x)  # the warm-up: masks and window indices cached
        out, kept = tensors_read(model, x)
        assert torch.equal(out[0] if isinstance(out, (list, tuple)) else out,
                           _first(model(x)))
    ptrs = {t.data_ptr() for t in kept}
    cached = [v for m in model.modules() for k, v in m.__dict__.get("_mask_cache", {}).items()
              if isinstance(v, torch.Tensor) and k[0] != "bias"]  # the masks (the biases only built them)
    assert cached and all(t.data_ptr() in ptrs for t in cached)
    assert x.data_ptr() in ptrs
    # every weight but the bias tables (read through the cached masks) and the deep-supervision heads (training)
    used = [p for n, p in model.named_parameters()
            if "relative_position_bias_table" not in n and not (n.startswith("heads.") and n[6] != "0")]
    assert len(used) > 100 and all(p.data_ptr() in ptrs for p in used)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    extra = sum(t.numel() * t.element_size() for t in kept) - weights - sum(
        t.numel() * t.element_size() for t in cached)
    assert extra < 4 * x.numel() * x.element_size()  # the input and small index tensors, no activations


def _first(out):
    return out[0] if isinstance(out, (list, tuple)) else out


def test_predict_compile_writes_the_eager_labels(tmp_path, capsys):
    """`glam3d predict --compile` (inductor, frozen weights on CPU; the last window batch padded) segments
    like the eager network; a bad mode is one error line before anything is written."""
    from glam3d.cli import main

    ckpt = H.predict_checkpoint(tmp_path / "model.pt")
    scans = H.write_scans(tmp_path / "in", n=2, shape=(30, 26, 14))
    common = ["predict", "--checkpoint", str(ckpt), "--input", *map(str, scans), "--device", "cpu", "--quiet",
              "--sw-batch-size", "3"]
    assert main(common + ["--output", str(tmp_path / "eager")]) == 0
    assert main(common + ["--output", str(tmp_path / "bad"), "--compile", "fastest"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--compile: unknown mode 'fastest'" in err[0]
    assert not (tmp_path / "bad").exists() or not any((tmp_path / "bad").iterdir())
    assert main(common + ["--output", str(tmp_path / "compiled"), "--compile"]) == 0
    for s in scans:
        name = s.name
        a = np.asarray(nib.load(str(tmp_path / "eager" / name)).dataobj)
        b = np.asarray(nib.load(str(tmp_path / "compiled" / name)).dataobj)
        assert a.shape == b.shape and (a == b).mean() >= 0.999
        assert len(np.unique(a)) > 1  # the seeded network does not predict one class everywhere


def test_train_compile_trains_the_compiled_network(tmp_path, monkeypatch):
    """`train.compile: true` goes through compile_network (static shapes) and the loss is the eager loss.
    The backend is swapped for aot_eager with fullgraph=True here (inductor's training compile takes minutes
    on two cores): a graph break in the training step fails the test."""
    import test_train as TT

    seen = []
    real_compile = torch.compile

    def checked_compile(model, **kw):
        seen.append(kw)
        return real_compile(model, backend="aot_eager", fullgraph=True, dynamic=kw.get("dynamic"))

    data = TT.make_dataset(tmp_path / "data")
    losses = []
    for compiled in (False, True):
        if compiled:
            monkeypatch.setattr(torch, "compile", checked_compile)
        cfg = TT.tiny_config(data, tmp_path / f"run{int(compiled)}",
                             model={"name": "glam_nnformer_tiny", "overrides": {k: v for k, v in SMALL_3D.items()
                                                                                if k != "num_classes"}},
                             data={"roi_size": [16, 32, 32], "batch_size": 1},
                             train={"epochs": 1, "iters_per_epoch": 2, "val_every": 0, "compile": compiled,
                                    "deep_supervision": [0.57, 0.29, 0.14]})
        losses.append(TT._train(cfg)["final_train_loss"])
    assert seen == [{"dynamic": False, "mode": "default"}]
    assert math.isfinite(losses[1]) and abs(losses[1] - losses[0]) <= 1e-4 * abs(losses[0])
