"""glam3d: GLAM (GLobal Attention Multi-resolution transformers) for 3D medical and 2D natural image segmentation."""
__version__ = "0.1.0"
