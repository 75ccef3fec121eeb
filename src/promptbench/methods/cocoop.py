"""CoCoOp (Zhou et al., "Conditional Prompt Learning for Vision-Language Models"): CoOp's context plus a
meta-net that shifts it by a vector computed from each image, so every image gets its own prompts.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from promptbench.backbones import Backbone
from promptbench.errors import PromptbenchError
from promptbench.methods.coop import CoOp


class CoCoOp(CoOp):
    name = "cocoop"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        csc: bool,
        max_prompts_per_pass: int,
        **config: Any,
    ):
        if csc:
            raise PromptbenchError(
                "method 'cocoop' learns one context shared by all classes (the meta-net conditions it per image); "
                "method.csc=true is not available"
            )
        if int(max_prompts_per_pass) < 1:
            raise PromptbenchError(f"method.max_prompts_per_pass must be >= 1, got {max_prompts_per_pass}")
        super().__init__(backbone, classnames, templates, csc=False, **config)
        self.max_prompts_per_pass = int(max_prompts_per_pass)
        image_dim = backbone.embed_dim
        self.meta_net = nn.Sequential(
            nn.Linear(image_dim, image_dim // 16),
            nn.ReLU(inplace=True),
            nn.Linear(image_dim // 16, backbone.ctx_dim),
        )

    def class_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        """Each image's own prompts, for a chunk of images at a time in one text-encoder pass."""
        shift = self.meta_net(image_features)  # [B, ctx_dim], added to every context vector
        contexts = (self.prompt_learner.ctx + shift.unsqueeze(1)).unsqueeze(1)  # [B, 1, M, ctx_dim]
        n_cls = len(self.prompt_learner.classnames)
        images_per_pass = max(1, self.max_prompts_per_pass // n_cls)
        logits = []
        for start in range(0, len(image_features), images_per_pass):
            chunk = slice(start, start + images_per_pass)
            text = nn.functional.normalize(self.prompt_learner.text_features(self.backbone, contexts[chunk]), dim=-1)
            logits.append(torch.einsum("bd,bkd->bk", image_features[chunk], text.to(image_features.dtype)))
        return self.backbone.logit_scale * torch.cat(logits)

    def on_predict_start(self) -> None:
        """The prompts depend on each image: nothing can be encoded ahead of the test batches."""
