"""The CUDA paths: the same networks and sliding-window inference on a GPU as on the CPU (fp32 with TF32 off,
then bf16 / fp16 autocast), and a training step under each AMP mode. Skipped where no GPU is present (CI);
run on a lent GPU with ``pytest tests/test_cuda.py``."""
import pytest
import torch

from glam3d.engine.inference import _forward, predict_volume  # _forward: the main output of a model
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
