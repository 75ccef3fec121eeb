"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models"): learned prompt context, frozen CLIP.

The reference trains on freshly augmented images every step (`views: {n: 0}`); `views: {n: N}` is an
opt-in protocol change that trains on N cached augmented views instead (view e mod N at epoch e), so the
image tower runs N times per image instead of once per step. CoCoOp subclasses this method.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, Views
from promptbench.errors import PromptbenchError
from promptbench.methods.base import Method
from promptbench.methods.prompt_learner import PromptLearner
from promptbench.methods.prompts import resolve_templates, text_classifier


def optional_views(views: Mapping[str, Any] | Views | None) -> Views | None:
    """`views: {n: 0}` (or null) means none: the reference's online augmentation."""
    if views is None or isinstance(views, Views):
        return views
    if int(views["n"]) < 0:
        raise PromptbenchError(f"method.views.n must be >= 0 (0: online augmentation), got {views['n']}")
    return Views.from_config(views) if int(views["n"]) else None


class CoOp(Method):
    name = "coop"
    trains = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        n_ctx: int,
        ctx_init: str | None,
        ctx_init_learned: str,
        csc: bool,
        class_token_position: str,
        batch_size: int,
        views: Mapping[str, Any] | Views | None,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, **config)
        self.views = optional_views(views)
        self.batch_size = int(batch_size)
        self.prompt_learner = PromptLearner(backbone, self.classnames, n_ctx, ctx_init, csc, class_token_position,
                                            ctx_init_learned)
        # Class-specific context is tied to the training classes; the base class refuses other class sets.
        self.transfers_to_new_classes = not self.prompt_learner.csc
        self._evaluation_text_features: torch.Tensor | None = None

    def contract(self) -> DataContract:
        if self.views is None:
            return DataContract(inputs="images", batch_size=self.batch_size)
        return DataContract(inputs="features", batch_size=self.batch_size, train_views=self.views)

    # ---- classification -----------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return self.class_logits(self.image_features(inputs))

    def image_features(self, inputs: torch.Tensor) -> torch.Tensor:
        """Normalised frozen image features of a batch of the contract's inputs: images go through the image
        tower here (frozen: it keeps a graph only for inputs that ask for gradients, an adversarial evaluation's);
        cached features are only normalised."""
        if self.views is not None:
            return F.normalize(inputs.float(), dim=-1)
        return F.normalize(self.backbone.encode_image(inputs), dim=-1)

    def text_features(self) -> torch.Tensor:
        """Normalised [n_cls, embed_dim] features of the learned prompts."""
        return F.normalize(self.prompt_learner.text_features(self.backbone), dim=-1)

    def class_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        text = self._evaluation_text_features
        if text is None:
            text = self.text_features()
        return self.logits_against(image_features, text)

    def logits_against(self, image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
        """CLIP's logits of normalised image features against normalised [n_cls, dim] text features."""
        return self.backbone.logit_scale * image_features @ text_features.T.to(image_features.dtype)

    def on_classes_changed(self) -> None:
        self.prompt_learner.set_classes(self.backbone, self.classnames)
        self._evaluation_text_features = None
        if self.hand_crafted_template_set is not None:
            self._encode_hand_crafted()

    # ---- hand-crafted text features, for the methods that keep the prompts close to them (KgCoOp, ProGrad) --
    hand_crafted_template_set: str | Sequence[str] | None = None

    def keep_hand_crafted_features(self, template_set: str | Sequence[str]) -> None:
        """Encode the hand-crafted prompts of the class set (zero-shot CLIP's classifier: `template_set` as in
        method=zeroshot, `dataset` = the dataset's templates) once, without grad, as the buffer
        `hand_crafted_text` [n_cls, dim], and again whenever the class set changes."""
        self.hand_crafted_template_set = template_set
        self._encode_hand_crafted()

    def hand_crafted_templates(self) -> list[str]:
        return resolve_templates(self.hand_crafted_template_set, self.templates)

    def _encode_hand_crafted(self) -> None:
        features = text_classifier(self.backbone, self.classnames, self.hand_crafted_templates())
        self.register_buffer("hand_crafted_text", features, persistent=False)

    def on_predict_start(self) -> None:
        # The prompts do not change during an evaluation: encode them once, not once per test batch.
        with torch.no_grad():
            self._evaluation_text_features = self.text_features()

    def on_predict_end(self) -> None:
        self._evaluation_text_features = None
