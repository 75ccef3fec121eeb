"""TaskRes (Yu et al., "Task Residual for Tuning Vision-Language Models", CVPR 2023), TaskRes-Text: a learned
residual added to the frozen zero-shot text classifier.

    logits = logit_scale * normalize(f) @ normalize(t + alpha * x).T,   x <- 0 at the start

t is the un-normalised mean text embedding of each class's prompts, normalised only after the residual is added;
logit_scale is the backbone's, fixed (100 for CLIP) (geekyutao/TaskRes trainers/taskres.py: TaskResLearner,
`_get_base_text_features`, CustomCLIP.forward). Only x trains, with cross-entropy. The reference's settings
(scripts/taskres/main.sh, train_regular.sh, configs/trainers/TaskRes/adam_lr2e-3_B256_ep{100,200}.yaml, Dassl
defaults): alpha 0.5 (OxfordFlowers 1.0), Adam lr 2e-3 (ImageNet 2e-4), weight decay 5e-4, batch 256, 100 epochs
for 1-4 shots and 200 for 8-16, one warm-up epoch at 1e-5 then cosine per epoch, the last epoch kept. The
reference augments online (a fresh RandomResizedCrop + flip of every image each epoch); here it trains on cached
augmented views, view e mod n at epoch e (`method.views.n=<max_epochs>` is one fresh view per epoch). The
residual is tied to the training classes. The enhanced base (a separately fine-tuned text projection) is not
implemented.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from promptbench.backbones import Backbone
from promptbench.errors import PromptbenchError
from promptbench.methods.zs_linear_probe import TextAnchoredProbe


class TaskRes(TextAnchoredProbe):
    name = "taskres"

    def __init__(self, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], *, alpha: float,
                 **config: Any):
        super().__init__(backbone, classnames, templates, **config)
        if not float(alpha) > 0:
            raise PromptbenchError(f"method.alpha (the residual's scale) must be > 0, got {alpha}")
        self.alpha = float(alpha)
        self.residual = nn.Parameter(torch.zeros_like(self.text_embeddings))

    def class_weights(self) -> torch.Tensor:
        return self.text_embeddings.float() + self.alpha * self.residual.float()
