"""Network families; importing this package registers them in :mod:`glam3d.models.registry`.

| family          | sizes          | notes                                                        |
|-----------------|----------------|--------------------------------------------------------------|
| nnformer        | synapse, tiny  | official nnFormer Synapse architecture                       |
| glam_nnformer   | synapse, tiny  | + GLAM in every window stage, NLU decoder (twin: nnformer)   |
| swin_unetr      | synapse, tiny  | MONAI SwinUNETR baseline (feature_size 48 / 12)              |
"""
from ..registry import register_family
from . import baselines, nnformer

register_family("nnformer", nnformer.build_nnformer, nnformer.NNFORMER_SIZES, default_size="synapse",
                description="nnFormer (Zhou et al. 2021), official Synapse architecture")
register_family("glam_nnformer", nnformer.build_glam_nnformer, nnformer.NNFORMER_SIZES, default_size="synapse",
                twin="nnformer", description="GLAM-nnFormer (Themyr et al. 2023): global tokens + G-MSA, NLU decoder")
register_family("swin_unetr", baselines.build_swin_unetr, baselines.SWIN_UNETR_SIZES, default_size="synapse",
                description="MONAI SwinUNETR baseline")
from . import swin_unet, upernet  # noqa: E402,F401  2D: swin_unet, glam_swin_unet, swin_upernet, glam_swin_upernet
