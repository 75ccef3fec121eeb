"""The training recipe shared by methods: the reference learning-rate schedule (CoOp, CoCoOp, CLIP-Adapter,
Tip-Adapter-F) and cross-entropy training on cached frozen features (CLIP-Adapter, Tip-Adapter-F).

Their train loader yields cached augmented views of the train set (a different view each epoch, see
`Method.train_views` and data/datamodule.py), so training never runs the image tower. The loss is plain
cross-entropy on `forward(raw features)`; each method's forward does its own normalisation.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch.optim.lr_scheduler import LambdaLR

from promptbench.errors import PromptbenchError


class TrainsOnCachedViews:
    """Mixin for a `Method` with input_kind "features": cross-entropy training on its train loader's features."""

    trains = True

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        features, labels, _ = batch
        loss = F.cross_entropy(self(features), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return loss


def positive(value: float, option: str, method: str) -> float:
    value = float(value)
    if not value > 0:
        raise PromptbenchError(f"method '{method}': {option} must be > 0, got {value}")
    return value


def warmup_cosine_factor(step: int, total: int, warmup: int, warmup_factor: float) -> float:
    """Learning-rate multiplier of the reference schedule (Dassl's constant warm-up around a cosine).

    The first `warmup` steps run at the constant warm-up rate; step t after them runs at cosine step
    t - warmup of a cosine over all `total` steps, as the reference's wrapped scheduler does. With no
    warm-up this is torch's CosineAnnealingLR(T_max=total) (Tip-Adapter-F).
    """
    if step < warmup:
        return warmup_factor
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total) / total))


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0,
                       warmup_factor: float = 1.0) -> LambdaLR:
    """The reference schedule over `total` scheduler steps (epochs for CoOp and CLIP-Adapter, steps for Tip-F)."""
    total = max(int(total), 1)
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, total, warmup, warmup_factor))


def reference_sgd(parameters, lr: float, momentum: float, weight_decay: float, epochs: int, warmup_epochs: int,
                  warmup_lr: float) -> dict[str, Any]:
    """Lightning's optimizer config for the reference recipe of CoOp, CoCoOp and CLIP-Adapter: SGD with the
    warm-up + cosine schedule stepped once per epoch."""
    optimizer = torch.optim.SGD(parameters, lr=lr, momentum=momentum, weight_decay=weight_decay)
    scheduler = cosine_with_warmup(optimizer, total=epochs, warmup=warmup_epochs, warmup_factor=warmup_lr / lr)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
