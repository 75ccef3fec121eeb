"""CLIP-Adapter (Gao et al., IJCV 2024), visual adapter: a residual bottleneck MLP on frozen image features.

    feature = ratio * adapter(f) + (1 - ratio) * f,  adapter = Linear(d, d/r) -> ReLU -> Linear(d/r, d) -> ReLU
    logits  = logit_scale * normalize(feature) @ W_text.T

f is the raw image feature; W_text the hand-crafted prompt classifier. Only the adapter trains, on cached
augmented views of the train set (a different view each epoch). The classifier is text, so the method moves
to new class sets. The reference (gaopengcuhk/CLIP-Adapter, a Dassl trainer run with CoOp's configs) trains
with SGD lr 0.002, momentum 0.9, weight decay 5e-4, batch 32, 200 epochs, cosine per epoch after one warm-up
epoch at a constant 1e-5, CoOp's augmentation (RandomResizedCrop scale (0.08, 1) + flip), last epoch kept
(conf/method/clip_adapter.yaml, conf/optim/sgd_warmup_cosine.yaml).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
from torch import nn

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, Views
from promptbench.errors import PromptbenchError
from promptbench.methods.zeroshot import ZeroShotCLIP


class ResidualAdapter(nn.Module):
    """ratio * MLP(x) + (1 - ratio) * x with a bias-free bottleneck MLP of width dim // reduction."""

    def __init__(self, dim: int, reduction: int, ratio: float):
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


class CLIPAdapter(ZeroShotCLIP):
    name = "clip_adapter"
    trains = True
    uses_train_data = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        reduction: int,
        ratio: float,
        views: Mapping[str, Any] | Views,
        batch_size: int,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, **config)
        self.adapter = ResidualAdapter(backbone.embed_dim, int(reduction), float(ratio))
        self.views = Views.from_config(views)
        self.batch_size = int(batch_size)

    def contract(self) -> DataContract:
        return DataContract(inputs="features", batch_size=self.batch_size, train_views=self.views)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        # The adapter's dtype: float32, or half when the trainer keeps the module in "16-true" precision.
        return super().forward(self.adapter(features.to(self.adapter.mlp[0].weight.dtype)))
