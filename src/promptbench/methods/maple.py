"""MaPLe (Khattak et al., "MaPLe: Multi-modal Prompt Learning"): IVLP's deep text prompts, with the image
prompts of every layer projected from the text prompts of that layer (text -> vision coupling).

As in the official `MultiModalPromptLearner` (muzairkhattak/multimodal-prompt-learning trainers/maple.py):
image layer 0 gets `proj(ctx)`, one Linear(ctx_dim, vision_width) of the input context; image layer i
(1 <= i < prompt_depth) gets `compound_projections[i-1](text_prompts[i-1])`, where the text prompts are
IVLP's N(0, 0.02) deep text prompts and the projections are separate Linear layers that all start from the
same weights (deep copies of one default-initialised Linear). The image tower has no prompts of its own.
"""

from __future__ import annotations

import copy
from typing import Any, Sequence

import torch
from torch import nn

from promptbench.backbones import Backbone
from promptbench.errors import PromptbenchError
from promptbench.methods.ivlp import IVLP


class MaPLe(IVLP):
    name = "maple"

    def __init__(self, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], *,
                 prompt_depth: int, **config: Any):
        if int(prompt_depth) < 1:
            raise PromptbenchError(f"method '{self.name}': prompt_depth must be >= 1 (1: the input layers only), "
                                   f"got {prompt_depth}")
        backbone.prompted_vision_tower(self.name)
        # The image tower's own prompts are none (vision_depth 0): MaPLe's come from the text prompts.
        super().__init__(backbone, classnames, templates, text_depth=prompt_depth, vision_depth=0, vision_n_ctx=0,
                         **config)
        self.vision_depth = self.fitted_depth("image", int(prompt_depth), backbone.vision_layers)
        if self.vision_depth != self.text_depth:
            raise PromptbenchError(
                f"method '{self.name}' couples the two towers layer by layer, but prompt_depth={prompt_depth} fits "
                f"the {backbone.text_layers} text layers and the {backbone.vision_layers} image layers of backbone "
                f"'{backbone.name}' differently: set method.prompt_depth <= "
                f"{min(backbone.text_layers, backbone.vision_layers)}"
            )
        ctx_dim, width = backbone.ctx_dim, backbone.vision_width
        self.proj = nn.Linear(ctx_dim, width)
        shared_start = nn.Linear(ctx_dim, width)
        self.compound_projections = nn.ModuleList(copy.deepcopy(shared_start) for _ in range(self.text_depth - 1))

    def visual_prompts(self) -> list[torch.Tensor]:
        """Image layer 0: proj(ctx); image layer i >= 1: the i-th projection of text layer i's prompts."""
        deeper = [projection(prompt) for projection, prompt in zip(self.compound_projections, self.text_prompts)]
        return [self.proj(self.prompt_learner.ctx), *deeper]
