"""Write the legacy-checkpoint fixtures with glam3d *before* model spec version 2 (commit 567c7dd).

Run from the repository root with the old code first on the path (see tests/data/README.md)::

    git worktree add /tmp/glam3d-567c7dd 567c7dd
    PYTHONPATH=/tmp/glam3d-567c7dd .venv/bin/python tests/data/legacy/make_legacy_fixtures.py tests/data/legacy

Each fixture is a checkpoint written by that code's ``save_checkpoint`` (its ``model_spec`` records only the
overrides given to ``build_model``) of a small network whose weights are perturbed away from their
initialisation (so that every weight moves the output), plus ``reference``: a seeded input and the old network's
output on it in eval mode, both float32.
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path

import torch

#: (file stem, variant, overrides, input shape without batch)
_SWIN = dict(num_classes=3, embed_dim=2, depths=[2, 1, 1, 1], num_heads=[1, 1, 2, 2], window_size=2,
             default_crop=[32, 32], mlp_ratio=2.0)
_NNFORMER = dict(num_classes=3, crop_size=(8, 16, 16), embed_dim=4, depths=(2, 2, 2), num_heads=(1, 1, 2),
                 window_size=(2, 2, 1), deep_supervision=False, mlp_ratio=2.0)
FIXTURES = [
    # stage maps 4^3 (8 windows: G-MSA), 2^3 and 1^3 (one window: no global tokens in the old code)
    ("glam_nnformer_tiny", "glam_nnformer_tiny", dict(_NNFORMER, num_global_tokens=2), (1, 8, 16, 16)),
    ("nnformer_tiny", "nnformer_tiny", dict(_NNFORMER), (1, 8, 16, 16)),
    # stage maps 8^2, 4^2, 2^2, 1^2 (16, 4, 1, 1 windows); a G-MSA after every block, the last one's output unread
    # (the only one of a depth-1 level)
    ("glam_swin_unet_tiny", "glam_swin_unet_tiny", dict(_SWIN, num_global_tokens=2), (3, 32, 32)),
    ("glam_swin_upernet_tiny", "glam_swin_upernet_tiny",
     dict(_SWIN, num_global_tokens=2, channels=8, aux_channels=8), (3, 32, 32)),
    # the vanilla family with NLU given as an override (paper table 4's "NLU only" row)
    ("swin_unet_tiny_nlu", "swin_unet_tiny", dict(_SWIN, nlu=True), (3, 32, 32)),
]


def perturb(model: torch.nn.Module, seed: int) -> None:
    """Move every floating-point weight and buffer away from its initialisation (BatchNorm variances stay > 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=g)
            if name.endswith("running_var"):
                t.mul_(torch.exp(0.1 * noise))
            else:
                t.add_(0.1 * noise)


def main(out_dir: str) -> None:
    from glam3d.engine.checkpoint import save_checkpoint
    from glam3d.models import build_model
    from glam3d.models.networks.nnformer import NnFormer

    if "glam_variant" in inspect.signature(NnFormer.__init__).parameters:
        sys.exit("this is glam3d with model spec version 2 or later: put the old code first on PYTHONPATH")
    torch.set_num_threads(1)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for i, (stem, variant, overrides, shape) in enumerate(FIXTURES):
        torch.manual_seed(i)
        model = build_model(variant, **overrides)
        perturb(model, 1000 + i)
        model.eval()
        x = torch.randn((1,) + tuple(shape), generator=torch.Generator().manual_seed(2000 + i))
        with torch.no_grad():
            y = model(x)
        state = {"model_spec": model.glam3d_spec, "model": model.state_dict(),
                 "reference": {"input": x, "output": y.contiguous()}}
        save_checkpoint(out / f"{stem}.pt", state)
        print(f"{stem}: {sum(p.numel() for p in model.parameters())} parameters, output {tuple(y.shape)}, "
              f"spec {model.glam3d_spec}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else str(Path(__file__).parent))
