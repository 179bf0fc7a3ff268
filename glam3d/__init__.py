"""glam3d: GLAM (GLobal Attention Multi-resolution transformers) for 3D medical and 2D natural image segmentation.

``import glam3d`` imports no torch. The Python entry point for inference is :class:`glam3d.Predictor`
(:mod:`glam3d.inference.predictor`, imported when first asked for)::

    from glam3d import Predictor
    labels = Predictor.from_checkpoint("best.pt", device="cuda").predict("scan.nii.gz")
"""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["Predictor", "__version__"]


def __getattr__(name: str):
    if name == "Predictor":
        from .inference.predictor import Predictor
        return Predictor
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
