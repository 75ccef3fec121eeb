"""UPL's prompt learner (Huang et al., "Unsupervised Prompt Learning for Vision-Language Models", 2022):
CoOp trained on pseudo-labelled images (protocol=unsupervised), evaluated as a prompt representation ensemble.

The reference (tonyhuang2022/UPL) trains CoOp's prompt learner with plain cross-entropy (`UPLTrainer.
forward_backward`; its class-weighted loss is commented out) once per seed 1..16 (`scripts/upl_train.sh`) and
averages the 16 runs' test logits (`upl_test.py`). Here one run holds the `prompts` contexts side by side and
trains them at once: the loss is the sum of each context's own cross-entropy, so every context gets exactly
the gradient it would get alone (SGD, momentum and weight decay act element-wise), from its own random start
but on the same batches (the reference's runs also differ in data order and augmentation). The logits are
the mean of the contexts' CLIP logits. With `prompts: 1` this is CoOp.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptbench.backbones import Backbone
from promptbench.errors import PromptbenchError
from promptbench.methods.coop import CoOp
from promptbench.methods.prompt_learner import CONTEXT_INIT_STD


class UPL(CoOp):
    name = "upl"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        prompts: int,
        ctx_init: str | None,
        **config: Any,
    ):
        if int(prompts) < 1:
            raise PromptbenchError(f"method.prompts={prompts}: the ensemble needs at least one prompt context")
        if int(prompts) > 1 and ctx_init:
            raise PromptbenchError(
                f"method.prompts={prompts} with ctx_init='{ctx_init}': contexts that start from the same phrase and "
                f"train on the same batches stay identical, so the ensemble would be one prompt. Use ctx_init=null "
                f"(random starts, the reference's) or method.prompts=1"
            )
        super().__init__(backbone, classnames, templates, ctx_init=ctx_init, **config)
        self.prompts = int(prompts)
        # The first context is CoOp's own start (same random draw), the others are further N(0, 0.02) draws.
        first = self.prompt_learner.ctx.detach()
        others = torch.empty(self.prompts - 1, *first.shape)
        nn.init.normal_(others, std=CONTEXT_INIT_STD)
        contexts = torch.cat([first.unsqueeze(0), others])
        # [prompts, n_cls or 1, n_ctx, dim]: a batch of contexts, each shared by all classes unless csc
        self.prompt_learner.ctx = nn.Parameter(contexts if first.dim() == 3 else contexts.unsqueeze(1))

    def context_logits(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """[prompts, batch, n_cls]: each context's CLIP logits, from normalised [prompts, n_cls, dim] text features."""
        text = text_features.to(image_features.dtype)
        return self.backbone.logit_scale * torch.einsum("bd,pcd->pbc", image_features, text)

    def logits_against(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """The prompt representation ensemble: the mean of the contexts' logits (upl_test.py's mean of test logits)."""
        return self.context_logits(image_features, text_features).mean(dim=0)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable and skipped
            return None
        inputs, labels, _ = batch
        logits = self.context_logits(self.image_features(inputs), self.text_features()).float()
        per_context = F.cross_entropy(logits.flatten(0, 1), labels.repeat(self.prompts), reduction="none")
        per_context = per_context.view(self.prompts, -1).mean(dim=1)
        loss = per_context.sum()
        self.stop_on_non_finite(loss)
        self.log_training(per_context.mean(), logits.mean(dim=0), labels)
        return loss
