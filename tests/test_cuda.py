"""The CUDA paths: the same networks and sliding-window inference on a GPU as on the CPU (fp32 with TF32 off,
then bf16 / fp16 autocast), and a training step under each AMP mode. Skipped where no GPU is present (CI);
run on a lent GPU with ``pytest tests/test_cuda.py``."""
import pytest
import torch

from glam3d.inference.sliding_window import _forward, predict_volume  # _forward: the main output of a model
from glam3d.models import build_model

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_fp32():
    """TF32 off: fp32 on the GPU must then agree with the CPU to float32 rounding."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("name,shape", [
    ("glam_nnformer_tiny", (2, 1, 32, 64, 64)),
    ("nnformer_tiny", (2, 1, 32, 64, 64)),
    ("glam_swin_unet_tiny", (1, 3, 224, 224)),
])
def test_forward_matches_cpu(name, shape):
    torch.manual_seed(0)
    model = build_model(name).eval()
    x = torch.randn(shape)
    with torch.inference_mode():
        ref = _forward(model, x)
        model.cuda()
        out = _forward(model, x.cuda())
        assert _rel(out.cpu(), ref) < 1e-4
        for dtype in (torch.bfloat16, torch.float16):
            with torch.autocast("cuda", dtype=dtype):
                low = _forward(model, x.cuda())
            assert torch.isfinite(low).all()
            assert _rel(low.cpu(), ref) < 5e-2, dtype


def test_sliding_window_matches_cpu():
    torch.manual_seed(0)
    model = build_model("glam_nnformer_tiny").eval()
    image = torch.randn(1, 48, 96, 80)
    ref = predict_volume(model, image, (32, 64, 64), overlap=0.5, device="cpu")
    model.cuda()
    for stitch in ("cuda", "cpu"):
        out = predict_volume(model, image, (32, 64, 64), overlap=0.5, device="cuda", amp="off",
                             stitch_device=stitch)
        assert out.device.type == stitch and out.shape == ref.shape
        assert (out.cpu() == ref).float().mean().item() > 0.999
    low = predict_volume(model, image, (32, 64, 64), overlap=0.5, device="cuda", amp="bf16")
    assert (low.cpu() == ref).float().mean().item() > 0.9


@pytest.mark.parametrize("amp", [None, torch.bfloat16, torch.float16])
def test_training_steps_reduce_the_loss(amp):
    """A fixed batch, 8 SGD steps (GradScaler for fp16): the loss goes down and stays finite."""
    torch.manual_seed(0)
    model = build_model("glam_nnformer_tiny").cuda().train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2, momentum=0.9)
    scaler = torch.amp.GradScaler("cuda", enabled=amp is torch.float16)
    x = torch.randn(2, 1, 32, 64, 64, device="cuda")
    y = (x[:, 0] > 0.5).long() + (x[:, 0] > 1.5).long()
    losses = []
    for _ in range(8):
        with torch.autocast("cuda", dtype=amp or torch.float32, enabled=amp is not None):
            out = _forward(model, x)
            loss = torch.nn.functional.cross_entropy(out.float(), y)
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------------------------------------------- CUDA graphs
@pytest.mark.parametrize("name", ["glam_nnformer_tiny", "nnformer_tiny", "glam_swin_unet_tiny"])
def test_cuda_graph_replays_equal_eager(name):
    """Each replay computes the current input (not the captured one), equal to the eager forward; a result kept
    across calls is not overwritten by the next replay; bf16 autocast is captured as its own graph."""
    from glam3d.engine.cuda_graphs import CudaGraphForward
    torch.manual_seed(0)
    model = build_model(name).cuda().eval()
    shape = (2, 1, 32, 64, 64) if model.spatial_dims == 3 else (2, 3, 224, 224)
    net = CudaGraphForward(model)
    with torch.inference_mode():
        xs = [torch.randn(shape, device="cuda") for _ in range(3)]
        outs = [_forward(net, x) for x in xs]
        for x, out in zip(xs, outs):
            assert _rel(out, _forward(model, x)) < 1e-5
        assert _rel(outs[0], outs[1]) > 0.1  # different inputs, different outputs (no stale replay)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low, ref = _forward(net, xs[0]), _forward(model, xs[0])
        assert low.dtype == ref.dtype and _rel(low, ref) < 1e-2
    assert len(net._graphs) == 2  # fp32 and bf16
    with pytest.raises(RuntimeError, match="inference"):
        net(xs[0].clone())  # autograd on: refused
    with torch.no_grad():
        kept = net(xs[0])
        kept.add_(0)  # an ordinary tensor under no_grad (not an inference tensor): in-place works


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_cuda_graph_on_a_gpu_that_is_not_the_current_one():
    """torchrun ranks >= 1 and --device cuda:1 run on a GPU that is not the current device: the capture must
    happen there (a capture on the wrong stream records nothing and replays stale outputs)."""
    from glam3d.engine.cuda_graphs import CudaGraphForward
    torch.manual_seed(0)
    assert torch.cuda.current_device() == 0
    model = build_model("nnformer_tiny").to("cuda:1").eval()
    net = CudaGraphForward(model)
    with torch.inference_mode():
        for _ in range(2):
            x = torch.randn(1, 1, 32, 64, 64, device="cuda:1")
            assert _rel(_forward(net, x), _forward(model, x)) < 1e-5


def test_sliding_window_with_cuda_graphs_matches_eager():
    from glam3d.engine.cuda_graphs import graphed_network
    torch.manual_seed(0)
    model = build_model("glam_nnformer_tiny").cuda().eval()
    image = torch.randn(1, 48, 96, 80)  # 2 x 2 x 2 windows at overlap 0.5, batches of 3: the last one is short
    for amp in ("off", "bf16"):
        ref, ref_p = predict_volume(model, image, (32, 64, 64), overlap=0.5, sw_batch_size=3, device="cuda",
                                    amp=amp, return_probs=True)
        out, p = predict_volume(graphed_network(model, 3), image, (32, 64, 64), overlap=0.5, sw_batch_size=3,
                                device="cuda", amp=amp, return_probs=True)
        assert (out == ref).float().mean().item() > 0.999, amp
        assert (p - ref_p).abs().max().item() < (1e-4 if amp == "off" else 2e-2), amp


def test_predict_command_with_cuda_graphs(tmp_path):
    """glam3d predict --cuda-graphs writes the labels of the eager GPU run (a real tiny network, random weights)."""
    import json

    import nibabel as nib
    import numpy as np

    from glam3d.cli import main
    from glam3d.engine.checkpoint import save_checkpoint
    pipeline = pytest.importorskip("preprocessing.pipeline")
    torch.manual_seed(0)
    model = build_model("glam_nnformer_tiny")
    plan = pipeline.make_plan([3.0, 1.5, 1.5], {"scheme": "transunet"},
                              {i: i for i in range(1, model.num_classes)}, crop_to_body=False)
    names = {str(i): f"class{i}" for i in range(model.num_classes)}
    save_checkpoint(tmp_path / "ck.pt", {"model_spec": dict(model.glam3d_spec), "model": model.state_dict(),
                                        "plan": plan, "labels": names,
                                        "config": {"val": {"roi_size": [32, 64, 64], "overlap": 0.5}}})
    rng = np.random.default_rng(0)
    img = rng.integers(-200, 300, (80, 72, 40)).astype(np.int16)
    aff = np.diag([1.5, 1.5, 3.0, 1.0])
    nib.save(nib.Nifti1Image(img, aff), tmp_path / "s.nii.gz")
    got = {}
    for extra in (["--no-cuda-graphs"], []):  # on CUDA graphs are the default
        out = tmp_path / ("eager" if extra else "graphs")
        assert main(["predict", "--checkpoint", str(tmp_path / "ck.pt"), "--input", str(tmp_path / "s.nii.gz"),
                     "--output", str(out), "--device", "cuda", "--amp", "off", "--quiet", *extra]) == 0
        graphs = not extra
        got[graphs] = np.asarray(nib.load(out / "s.nii.gz").dataobj)
        assert json.loads((out / "predictions.json").read_text())["inference"]["cuda_graphs"] is graphs
    assert got[True].shape == img.shape
    assert (got[True] == got[False]).mean() > 0.999
