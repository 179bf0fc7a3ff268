"""NLU (non-local upsampling), 2D and 3D."""
import pytest
import torch

from glam3d.models.nlu import NLU

torch.set_num_threads(1)


@pytest.mark.parametrize("ws,s", [((2, 2), (4, 6)), ((2, 2), (3, 5)), ((2, 2, 2), (2, 4, 4)), ((4, 4, 4), (2, 3, 2))])
def test_shapes(ws, s):
    nlu = NLU(16, 8, 2, ws)
    low = torch.randn(2, 16, *s)
    skip = torch.randn(2, 8, *[2 * v for v in s])
    y = nlu(low, skip)
    assert y.shape == skip.shape
    y.sum().backward()
    assert nlu.kv.weight.grad is not None and nlu.q.weight.grad is not None


def test_window_locality():
    """An output position depends only on the low-res tokens of its window (and on its own skip token)."""
    torch.manual_seed(0)
    nlu = NLU(8, 8, 2, (2, 2))
    low = torch.randn(1, 8, 4, 4, requires_grad=True)
    skip = torch.randn(1, 8, 8, 8, requires_grad=True)
    y = nlu(low, skip)
    y[0, :, 0, 0].sum().backward()  # high-res (0,0) lies in low window (0:2, 0:2)
    g = low.grad[0].abs().sum(0)
    assert (g[:2, :2] > 0).all() and g[2:].sum() == 0 and g[:, 2:].sum() == 0
    gs = skip.grad[0].abs().sum(0)
    assert gs[0, 0] > 0 and gs.sum() == gs[0, 0]  # queries only from its own skip token


def test_batch_isolation():
    nlu = NLU(8, 8, 2, (2, 2, 2)).eval()
    low, skip = torch.randn(2, 8, 2, 2, 2), torch.randn(2, 8, 4, 4, 4)
    y = nlu(low, skip)
    low2 = low.clone()
    low2[0] += 1
    torch.testing.assert_close(nlu(low2, skip)[1], y[1])


@pytest.mark.parametrize("kwargs,arg", [
    (dict(in_dim=8, out_dim=10, num_heads=3, window_size=(2, 2)), "num_heads"),
    (dict(in_dim=8, out_dim=8, num_heads=2, window_size=2), "spatial_dims"),
    (dict(in_dim=8, out_dim=8, num_heads=2, window_size=(2,)), "window_size"),
])
def test_bad_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=arg):
        NLU(**kwargs)


def test_bad_inputs():
    nlu = NLU(8, 4, 2, (2, 2))
    with pytest.raises(ValueError, match="twice"):
        nlu(torch.randn(1, 8, 4, 4), torch.randn(1, 4, 6, 8))
    with pytest.raises(ValueError, match="in_dim"):
        nlu(torch.randn(1, 6, 4, 4), torch.randn(1, 4, 8, 8))
    with pytest.raises(ValueError, match="spatial axes"):
        nlu(torch.randn(1, 8, 4, 4, 4), torch.randn(1, 4, 8, 8, 8))
