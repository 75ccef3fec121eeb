"""Zero-shot CLIP: cosine similarity to hand-crafted prompt features (one template or an ensemble)."""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.contract import DataContract
from promptbench.methods.base import Method
from promptbench.methods.prompts import resolve_templates, text_classifier


class ZeroShotCLIP(Method):
    name = "zeroshot"
    trains = False
    uses_train_data = False

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        template_set: str | Sequence[str] | None,
        **config: Any,
    ):
        super().__init__(backbone, classnames, resolve_templates(template_set, templates), **config)
        self.template_set = template_set
        self._classifier: torch.Tensor | None = None

    def contract(self) -> DataContract:
        return DataContract(inputs="features")

    def set_classes(self, classnames: Sequence[str], templates: Sequence[str]) -> None:
        super().set_classes(classnames, resolve_templates(self.template_set, templates))

    def on_classes_changed(self) -> None:
        self._classifier = None

    def classifier(self) -> torch.Tensor:
        """Computed once per class set (batched over classes), not once per test batch."""
        if self._classifier is None:
            self._classifier = text_classifier(self.backbone, self.classnames, self.templates)
        return self._classifier

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        weights = self.classifier().to(features.device)
        return self.backbone.logit_scale * F.normalize(features.float(), dim=-1) @ weights.T
