"""Backbones: any open_clip CLIP (built-in, hub, local file) plus promptbench's registered tiny and mini configs."""

from promptbench.backbones.backbone import Backbone, load_backbone, register_model_configs

__all__ = ["Backbone", "load_backbone", "register_model_configs"]
