"""The optimiser and learning-rate schedule of a trained method, built from the `optim` config group.

conf/optim/<name>.yaml gives the optimiser as a partial (`_partial_: true`, lightning-hydra-template style)
and the schedule's shape; `Optimization.configure` turns them into Lightning's optimiser config. Methods
never see a learning rate: they only say which parameters train.

The one schedule is the reference's (Dassl's constant warm-up around a cosine): the first `warmup` steps
run at the constant `warmup_lr`, step t after them at cosine step t - warmup of a cosine over all the
run's steps. `interval: epoch` steps it once per epoch (CoOp, CoCoOp, CLIP-Adapter: total = max_epochs),
`interval: step` once per batch (Tip-Adapter-F: total = all training batches; with no warm-up this is
torch's CosineAnnealingLR(T_max=total)). `min_lr` is the cosine's floor (CosineAnnealingLR's eta_min): 0 but for
CLIP-LoRA's 1e-6.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Literal

import torch
from torch.optim.lr_scheduler import LambdaLR

from promptbench.errors import PromptbenchError

INTERVALS = ("epoch", "step")


def warmup_cosine_factor(step: int, total: int, warmup: int, warmup_factor: float, min_factor: float = 0.0) -> float:
    """Learning-rate multiplier of the reference schedule at scheduler step `step` of `total`; the cosine decays
    from 1 to `min_factor`."""
    if step < warmup:
        return warmup_factor
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total) / total))
    return min_factor + (1.0 - min_factor) * cosine


def cosine_with_warmup(optimizer: torch.optim.Optimizer, total: int, warmup: int = 0,
                       warmup_factor: float = 1.0, min_factor: float = 0.0) -> LambdaLR:
    total = max(int(total), 1)
    return LambdaLR(optimizer, lambda step: warmup_cosine_factor(step, total, warmup, warmup_factor, min_factor))


class Optimization:
    """An optimiser partial plus the reference schedule; `configure` is what `configure_optimizers` returns."""

    def __init__(self, optimizer: Callable[..., torch.optim.Optimizer], *, interval: Literal["epoch", "step"],
                 warmup: int, warmup_lr: float | None, min_lr: float, name: str | None = None):
        if interval not in INTERVALS:
            raise PromptbenchError(f"optim.interval must be one of {INTERVALS}, got {interval!r}")
        if int(warmup) < 0:
            raise PromptbenchError(f"optim.warmup must be >= 0, got {warmup}")
        lr = getattr(optimizer, "keywords", {}).get("lr")
        if lr is None or not float(lr) > 0:
            raise PromptbenchError(f"optim.optimizer.lr must be > 0, got {lr}")
        if int(warmup) > 0 and (warmup_lr is None or float(warmup_lr) < 0):
            raise PromptbenchError(f"optim.warmup_lr must be >= 0 when optim.warmup > 0, got {warmup_lr}")
        self.optimizer = optimizer
        self.interval = interval
        self.warmup = int(warmup)
        self.lr = float(lr)
        self.warmup_factor = float(warmup_lr) / self.lr if self.warmup else 1.0
        if not 0 <= float(min_lr) <= self.lr:
            raise PromptbenchError(f"optim.min_lr must be in [0, optim.optimizer.lr={self.lr}], got {min_lr}")
        self.min_factor = float(min_lr) / self.lr
        self.name = name

    def configure(self, parameters: Iterable[torch.nn.Parameter], epochs: int | None,
                  total_steps: Callable[[], int | float]) -> dict[str, Any]:
        """`total_steps` is called only for a per-step schedule (it sets up the train loader to count batches)."""
        if self.interval == "epoch":
            if epochs is None or epochs < 1:
                raise PromptbenchError(f"optim: a per-epoch schedule needs trainer.max_epochs >= 1, got {epochs}")
            total = epochs
        else:
            total = int(total_steps())
        optimizer = self.optimizer(list(parameters))
        scheduler = cosine_with_warmup(optimizer, total=total, warmup=self.warmup, warmup_factor=self.warmup_factor,
                                       min_factor=self.min_factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": self.interval}}
