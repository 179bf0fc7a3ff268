"""Models: N-D window attention, GLAM layers, NLU, eq. 7 attention maps, networks and their registry.

``build_model(name, **overrides)`` builds a registered variant (see :mod:`glam3d.models.registry`);
``glam3d.models.complexity.model_table()`` lists them with parameters and MACs; ``load_pretrained(model, path)``
loads an ImageNet Swin checkpoint (official or timm layout) into a 2D network's backbone.
"""
from .attention_map import global_attention_map, map_from_recorded, recording, upsample_map
from .glam import GLAM_VARIANTS, GLAMLayer, GlobalAttention, GlobalBlock, WindowBlock
from .nlu import NLU
from .pretrained import load_pretrained
from .registry import (build_model, build_model_spec, check_model_spec, families, list_models, model_config,
                       parse_model_spec)
from .window import WindowAttention, window_partition, window_reverse

__all__ = ["GLAMLayer", "GLAM_VARIANTS", "GlobalBlock", "GlobalAttention", "WindowBlock", "WindowAttention",
           "window_partition", "window_reverse", "NLU",
           "global_attention_map", "map_from_recorded", "recording", "upsample_map",
           "build_model", "build_model_spec", "check_model_spec", "parse_model_spec", "list_models", "families",
           "model_config", "load_pretrained"]
