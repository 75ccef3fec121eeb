"""IVLP (independent vision-language prompting, the baseline of the MaPLe and PromptSRC papers): deep prompts
learned independently in both towers of a frozen CLIP ViT.

Text: CoOp's context at the input (positions after SOS, first tokens of ctx_init) plus fresh context at text
layers 1..text_depth-1. Vision: prompt tokens appended to the patch tokens at the input and replaced at layers
1..vision_depth-1 (`Backbone.encode_image`). The image tower runs with the prompts, so training needs images
(no cached features). MaPLe, VPT and PromptSRC build on this class.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.contract import DataContract
from promptbench.errors import PromptbenchError
from promptbench.methods.coop import CoOp
from promptbench.methods.prompt_learner import deep_prompt_parameters

log = logging.getLogger(__name__)


class IVLP(CoOp):
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
        if views and int(views["n"]):
            raise PromptbenchError(
                f"method '{self.name}' prompts the image tower, so it trains on images, not cached features: "
                f"method.views.n must be 0 (got {views['n']})"
            )
        if int(text_depth) < 1 or int(vision_depth) < 0:
            raise PromptbenchError(f"method '{self.name}': text_depth must be >= 1 (the input context) and "
                                   f"vision_depth >= 0; got text_depth={text_depth}, vision_depth={vision_depth}")
        super().__init__(backbone, classnames, templates, csc=False, class_token_position=class_token_position,
                         views=None, **config)
        self.fitted_depths: dict[str, dict[str, int]] = {}
        if int(vision_depth):
            backbone.prompted_vision_tower(self.name)
        self.text_depth = self.fitted_depth("text", int(text_depth), backbone.text_layers)
        self.vision_depth = self.fitted_depth("image", int(vision_depth), backbone.vision_layers if int(vision_depth) else 0)
        self.text_prompts = deep_prompt_parameters(self.text_depth - 1, self.prompt_learner.n_ctx, backbone.ctx_dim)
        self.vision_prompts = deep_prompt_parameters(self.vision_depth, vision_n_ctx,
                                                     backbone.vision_width if self.vision_depth else 0)

    def fitted_depth(self, tower: str, depth: int, layers: int) -> int:
        """The reference depths count ViT-B's 12 layers; a shallower tower is prompted at every layer instead."""
        if depth <= layers:
            return depth
        log.warning("method '%s': %s prompt depth %d > the %d %s layers of backbone '%s': prompting all %d",
                    self.name, tower, depth, layers, tower, self.backbone.name, layers)
        self.fitted_depths[tower] = {"requested": depth, "used": layers}
        return layers

    def run_notes(self) -> dict[str, Any]:
        return {"prompt_depth_fitted_to_backbone": dict(self.fitted_depths)} if self.fitted_depths else {}

    def contract(self) -> DataContract:
        return DataContract(inputs="images", batch_size=self.batch_size)

    def visual_prompts(self) -> list[torch.Tensor]:
        """The prompt tokens of image layers 0..vision_depth-1."""
        return list(self.vision_prompts)

    def image_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised features of the prompted image tower; gradients flow to the visual prompts."""
        return F.normalize(self.backbone.encode_image(inputs, deep_prompts=self.visual_prompts()), dim=-1)

    def text_features(self) -> torch.Tensor:
        features = self.prompt_learner.text_features(self.backbone, deep_prompts=list(self.text_prompts))
        return F.normalize(features, dim=-1)
