"""glam3d.models.layers: the CPU inference fast path (oneDNN fused linear + GELU) equals the plain modules."""
import torch
import torch.nn as nn

from glam3d.models import layers
from glam3d.models.layers import Mlp, linear

torch.set_num_threads(1)


def test_fused_linear_and_mlp_equal_plain():
    torch.manual_seed(0)
    lin = nn.Linear(12, 20).eval()
    mlp = Mlp(12, 48).eval()
    x = torch.randn(3, 7, 12)
    with torch.inference_mode():
        assert layers._fused_ok(x, lin)
        torch.testing.assert_close(linear(x, lin, "gelu"), torch.nn.functional.gelu(lin(x)), atol=1e-5, rtol=1e-5)
        fast = mlp(x)
    assert not layers._fused_ok(x.requires_grad_(), lin)  # autograd keeps the plain path
    torch.testing.assert_close(fast, mlp(x), atol=1e-5, rtol=1e-5)
