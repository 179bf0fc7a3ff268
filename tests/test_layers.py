"""glam3d.models.layers: the CPU inference fast path (oneDNN fused linear + GELU) equals the plain modules."""
import pytest
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


@pytest.mark.parametrize("conv,S", [
    (nn.Conv3d(5, 7, 3, stride=2, padding=1), (5, 6, 7)),
    (nn.Conv3d(3, 4, 2, stride=2), (4, 4, 6)),
    (nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0)), (7, 5)),
])
def test_conv_as_gemm_equals_convolution(conv, S):
    """The im2col GEMM (weight read in place) equals the convolution, channels-last in and out."""
    torch.manual_seed(0)
    x = torch.randn(2, *S, conv.in_channels)
    with torch.inference_mode():
        ref = conv(x.movedim(-1, 1)).movedim(1, -1)
        y = layers.conv_as_gemm(x, conv)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)


def test_gemm_conv_pays_only_for_weight_bound_inference():
    big = nn.Conv3d(64, 128, 3, stride=2, padding=1)        # 221 k weights
    x = torch.randn(1, 4, 4, 4, 64)                          # 8 outputs x 1728 = 13.8 k patch values
    with torch.inference_mode():
        assert layers.gemm_conv_pays(x, big)
        assert not layers.gemm_conv_pays(torch.randn(1, 32, 32, 32, 64), big)  # 4096 outputs: the conv's job
        assert not layers.gemm_conv_pays(x, nn.Conv3d(64, 128, 3, stride=2, padding=1, groups=2))
    assert not layers.gemm_conv_pays(x, big)                 # autograd on: the convolution
