"""CLIP-Adapter (Gao et al., IJCV 2024), visual adapter: a residual bottleneck MLP on frozen image features.

    feature = ratio * adapter(f) + (1 - ratio) * f,  adapter = Linear(d, d/r) -> ReLU -> Linear(d/r, d) -> ReLU
    logits  = logit_scale * normalize(feature) @ W_text.T

f is the raw image feature; W_text the hand-crafted prompt classifier. Only the adapter trains, on cached
augmented views of the train set (a different view each epoch). The classifier is text, so the method moves
to new class sets. The reference (gaopengcuhk/CLIP-Adapter, a Dassl trainer run with CoOp's configs) trains
with SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32, 200 epochs, cosine per epoch after one warm-up
epoch at a constant 1e-5, CoOp's augmentation (RandomResizedCrop scale (0.08, 1) + flip), last epoch kept.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from promptbench.backbones import Backbone
from promptbench.data.features import AugmentedViews
from promptbench.errors import PromptbenchError
from promptbench.methods.feature_training import TrainsOnCachedViews, positive, reference_sgd
from promptbench.methods.zeroshot import ZeroShotCLIP


class ResidualAdapter(nn.Module):
    """ratio * MLP(x) + (1 - ratio) * x with a bias-free bottleneck MLP of width dim // reduction."""

    def __init__(self, dim: int, reduction: int = 4, ratio: float = 0.2):
        super().__init__()
        if not 1 <= reduction <= dim:
            raise PromptbenchError(f"clip_adapter: reduction must be in [1, feature dim {dim}], got {reduction}")
        if not 0 <= ratio <= 1:
            raise PromptbenchError(f"clip_adapter: ratio must be in [0, 1], got {ratio}")
        hidden = dim // reduction
        self.ratio = float(ratio)
        self.mlp = nn.Sequential(
            nn.Linear(dim, hidden, bias=False), nn.ReLU(), nn.Linear(hidden, dim, bias=False), nn.ReLU()
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.ratio * self.mlp(features) + (1 - self.ratio) * features


class CLIPAdapter(TrainsOnCachedViews, ZeroShotCLIP):
    name = "clip_adapter"
    uses_train_data = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        template_set: str | Sequence[str] | None = "dataset",
        reduction: int = 4,
        ratio: float = 0.2,
        train_views: int = 10,
        augment_scale: Sequence[float] = (0.08, 1.0),
        lr: float = 2e-3,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        max_epochs: int = 200,
        batch_size: int = 32,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, template_set=template_set, max_epochs=max_epochs,
                         batch_size=batch_size, **config)
        if self.max_epochs < 1:
            raise PromptbenchError(f"method '{self.name}': max_epochs must be >= 1, got {self.max_epochs}")
        self.adapter = ResidualAdapter(backbone.embed_dim, int(reduction), float(ratio))
        self.train_views = AugmentedViews(train_views, tuple(augment_scale))
        self.lr = positive(lr, "lr", self.name)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_lr = positive(warmup_lr, "warmup_lr", self.name)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # The adapter's dtype: float32, or half when the trainer keeps the module in "16-true" precision.
        return super().forward(self.adapter(features.to(self.adapter.mlp[0].weight.dtype)))

    def configure_optimizers(self) -> dict[str, Any]:
        return reference_sgd(self.adapter.parameters(), self.lr, self.momentum, self.weight_decay, self.max_epochs,
                             self.warmup_epochs, self.warmup_lr)
