"""VPT-deep on CLIP (Jia et al., "Visual Prompt Tuning"), as the MaPLe repository runs it: learnable prompt
tokens at image layers 0..vision_depth-1 (`PromptedImageTower`), and a frozen hand-crafted text classifier,
"a photo of a {class}." by default, encoded once per class set with the frozen text tower (zero-shot CLIP's
classifier, so new class sets just get their own). Nothing in the text tower is learned.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch

from promptbench.backbones import Backbone
from promptbench.errors import PromptbenchError
from promptbench.methods.prompted_image import PromptedImageTower
from promptbench.methods.zeroshot import ZeroShotCLIP


class VPT(PromptedImageTower, ZeroShotCLIP):
    name = "vpt"
    trains = True
    uses_train_data = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        vision_depth: int,
        vision_n_ctx: int,
        batch_size: int,
        views: Mapping[str, Any] | None,
        **config: Any,
    ):
        self.refuse_cached_views(views)
        if int(vision_depth) < 1 or int(vision_n_ctx) < 1:
            raise PromptbenchError(f"method '{self.name}' learns visual prompts only: vision_depth and vision_n_ctx "
                                   f"must be >= 1, got vision_depth={vision_depth}, vision_n_ctx={vision_n_ctx}")
        backbone.prompted_vision_tower(self.name)  # refuse a CNN tower before building anything
        super().__init__(backbone, classnames, templates, **config)
        self.batch_size = int(batch_size)
        self.fitted_depths: dict[str, dict[str, int]] = {}
        self.prompt_image_tower(int(vision_depth), int(vision_n_ctx))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return super().forward(self.image_features(images))
