"""IVLP (independent vision-language prompting, the baseline of the MaPLe and PromptSRC papers): deep prompts
learned independently in both towers of a frozen CLIP ViT.

Text: CoOp's context at the input (positions after SOS, first tokens of ctx_init) plus fresh context at text
layers 1..text_depth-1. Vision: prompt tokens appended to the patch tokens at the input and replaced at layers
1..vision_depth-1 (`Backbone.encode_image`). The image tower runs with the prompts, so training needs images
(no cached features). MaPLe builds on this class; VPT shares its image side (`PromptedImageTower`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.errors import PromptbenchError
from promptbench.methods.coop import CoOp
from promptbench.methods.prompt_learner import deep_prompt_parameters
from promptbench.methods.prompted_image import PromptedImageTower


class IVLP(PromptedImageTower, CoOp):
    name = "ivlp"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        text_depth: int,
        vision_depth: int,
        vision_n_ctx: int,
        csc: bool,
        class_token_position: str,
        views: Any,
        **config: Any,
    ):
        if csc:
            raise PromptbenchError(f"method '{self.name}' learns one context shared by all classes; method.csc=true "
                                   f"is not available")
        if int(text_depth) > 1 and class_token_position != "end":
            raise PromptbenchError(
                f"method '{self.name}': deep text prompts replace the context right after SOS at every layer, so the "
                f"class name must come after it: class_token_position=end (got '{class_token_position}')"
            )
        self.refuse_cached_views(views)
        if int(text_depth) < 1 or int(vision_depth) < 0:
            raise PromptbenchError(f"method '{self.name}': text_depth must be >= 1 (the input context) and "
                                   f"vision_depth >= 0; got text_depth={text_depth}, vision_depth={vision_depth}")
        if int(vision_depth):
            backbone.prompted_vision_tower(self.name)  # refuse a CNN tower before building anything
        super().__init__(backbone, classnames, templates, csc=False, class_token_position=class_token_position,
                         views=None, **config)
        self.fitted_depths: dict[str, dict[str, int]] = {}
        self.text_depth = self.fitted_depth("text", int(text_depth), backbone.text_layers)
        self.text_prompts = deep_prompt_parameters(self.text_depth - 1, self.prompt_learner.n_ctx, backbone.ctx_dim)
        self.prompt_image_tower(int(vision_depth), int(vision_n_ctx))

    def text_features(self) -> torch.Tensor:
        features = self.prompt_learner.text_features(self.backbone, deep_prompts=list(self.text_prompts))
        return F.normalize(features, dim=-1)
