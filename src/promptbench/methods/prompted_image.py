"""The image side of the deep-prompt methods (IVLP, MaPLe, VPT): a ViT image tower run with learnable prompt
tokens (`Backbone.encode_image(..., deep_prompts=...)`), prompt depths fitted to the backbone, and images, never
cached features, as the training inputs. A mixin: it holds no state, the method class sets the attributes.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from promptbench.contract import DataContract
from promptbench.errors import PromptbenchError
from promptbench.methods.prompt_learner import deep_prompt_parameters

log = logging.getLogger(__name__)


class PromptedImageTower:
    """Put before the Method base in the class list (`class IVLP(PromptedImageTower, CoOp)`).

    The method sets `fitted_depths = {}` and `batch_size` in its `__init__` and calls `prompt_image_tower`.
    """

    name: str
    batch_size: int
    fitted_depths: dict[str, dict[str, int]]

    @classmethod
    def refuse_cached_views(cls, views: Mapping[str, Any] | None) -> None:
        if views and int(views["n"]):
            raise PromptbenchError(
                f"method '{cls.name}' prompts the image tower, so it trains on images, not cached features: "
                f"method.views.n must be 0 (got {views['n']})"
            )

    def fitted_depth(self, tower: str, depth: int, layers: int) -> int:
        """The reference depths count ViT-B's 12 layers; a shallower tower is prompted at every layer instead,
        with a warning, and `run_notes` (results.json) records it."""
        if depth <= layers:
            return depth
        log.warning("method '%s': %s prompt depth %d > the %d %s layers of backbone '%s': prompting all %d",
                    self.name, tower, depth, layers, tower, self.backbone.name, layers)
        self.fitted_depths[tower] = {"requested": depth, "used": layers}
        return layers

    def prompt_image_tower(self, depth: int, n_ctx: int) -> None:
        """`vision_prompts`: `n_ctx` N(0, 0.02) tokens for each image layer 0..depth-1 (depth fitted to the tower;
        0: the plain tower). A convolutional tower is refused with a clear message."""
        if depth:
            self.backbone.prompted_vision_tower(self.name)
        self.vision_depth = self.fitted_depth("image", depth, self.backbone.vision_layers if depth else 0)
        width = self.backbone.vision_width if self.vision_depth else 0
        self.vision_prompts = deep_prompt_parameters(self.vision_depth, n_ctx, width)

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
