"""CLAP, the class-adaptive linear probe (Silva-Rodríguez et al., "A Closer Look at the Few-Shot Adaptation of
Large Vision-Language Models", CVPR 2024): ZS-LP (methods/zs_linear_probe.py) plus a class-wise penalty that
keeps each class's weights near its zero-shot text embedding.

    loss = CE(logit_scale * normalize(f) @ normalize(W).T, y) + mean_c lambda_c * ||W_c - t_c||^2

on the raw (un-normalised) W and t. lambda_c is computed once, before training, from the zero-shot classifier
on the support set: the softmax probability of the true class, averaged over every cached augmented view of the
train images of class c (jusiro/CLAP trainers/adapters.py `init_lagrangian_multipliers` on the `logits_zs` of
`extract_features`, the 20 augmented passes; `zero_shot_constraint` for the penalty). The official default,
CONSTRAINT=l2, keeps the multipliers fixed. `adaptive: true` is the code's unused "adaptative" variant: after
every epoch (`outer_step`) lambda_c <- max(0, lambda_c + rho_c * h_c) and then rho_c <- h_c, with
h_c = ||W_c - t_c||^2 and rho starting at 0. Everything else (recipe, views, epochs) is ZS-LP's.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, FeatureProvider
from promptbench.errors import PromptbenchError
from promptbench.methods.zs_linear_probe import ZSLinearProbe

# Rows of zero-shot logits computed at once when the multipliers are set (ImageNet: 20 x 16k views x 1000 classes)
LOGIT_CHUNK = 8192


class CLAP(ZSLinearProbe):
    name = "clap"

    def __init__(self, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], *, adaptive: bool,
                 **config: Any):
        super().__init__(backbone, classnames, templates, **config)
        self.adaptive = bool(adaptive)
        classes = len(self.classnames)
        # Saved (and restored on resume), since the adaptive variant changes them during training.
        self.register_buffer("multipliers", torch.full((classes,), float("nan")))
        self.register_buffer("penalty_weights", torch.zeros(classes))

    def contract(self) -> DataContract:
        return dataclasses.replace(super().contract(), reads=("train",))

    @torch.no_grad()
    def zero_shot_true_class_probability(self, features: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Per class, the mean over its samples of the zero-shot softmax probability of that class."""
        # Before training the backbone sits where the features were extracted, the method's own tensors on the CPU.
        device = self.backbone.logit_scale.device
        text = self.text_embeddings.to(device)
        classes = len(self.classnames)
        totals = torch.zeros(classes, dtype=torch.float64, device=device)
        for start in range(0, len(labels), LOGIT_CHUNK):
            chunk = features[start:start + LOGIT_CHUNK].to(device)
            targets = labels[start:start + LOGIT_CHUNK].to(device)
            probabilities = self.cosine_logits(chunk, text).softmax(dim=-1)
            totals.index_add_(0, targets, probabilities.gather(1, targets[:, None]).squeeze(1).double())
        counts = torch.bincount(labels, minlength=classes)
        if (counts == 0).any():
            missing = [self.classnames[c] for c in torch.nonzero(counts == 0).flatten().tolist()]
            raise PromptbenchError(f"method 'clap' sets each class's penalty from its train images, but classes "
                                   f"{missing[:5]} have none (unreadable images left out?)")
        return (totals.cpu() / counts).float().to(self.multipliers.device)

    def prepare(self, provider: FeatureProvider) -> None:
        train = provider.views("train", self.views)  # the views it trains on: read from the feature cache
        features = train.features.flatten(0, 1)
        labels = train.labels.repeat(train.count)
        self.multipliers.copy_(self.zero_shot_true_class_probability(features, labels))
        self.penalty_weights.zero_()

    def penalty(self) -> torch.Tensor:
        distance = (self.weight.float() - self.text_embeddings.float()).pow(2).sum(dim=-1)
        return (self.multipliers.float() * distance).mean()

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable and skipped
            return None
        inputs, labels, _ = batch
        logits = self(inputs).float()
        cross_entropy = F.cross_entropy(logits, labels)
        penalty = self.penalty()
        loss = cross_entropy + penalty
        self.stop_on_non_finite(loss)
        self.log_training(loss, logits, labels, ce_loss=cross_entropy, penalty=penalty)
        return loss

    def on_train_start(self) -> None:
        if torch.isnan(self.multipliers).any():
            raise PromptbenchError("method 'clap' trains only after `prepare` has set its penalty multipliers "
                                   "from the train set")

    @torch.no_grad()
    def outer_step(self) -> None:
        """The reference's augmented-Lagrangian update of the adaptive variant."""
        distance = (self.weight.float() - self.text_embeddings.float()).pow(2).sum(dim=-1)
        self.multipliers.copy_(torch.clamp(self.multipliers + self.penalty_weights * distance, min=0))
        self.penalty_weights.copy_(distance)

    def on_train_epoch_start(self) -> None:
        # The reference updates after each epoch; done before the next one instead, so the epoch checkpoint
        # (written before a module's on_train_epoch_end runs) and a resumed run see the same multipliers. The
        # update after the last epoch changes nothing the trained model uses.
        if self.adaptive and self.current_epoch > 0:
            self.outer_step()
