"""CoOp (Zhou et al., "Learning to Prompt for Vision-Language Models"): learned prompt context, frozen CLIP.

The training recipe here (SGD, constant warm-up then per-epoch cosine, fp32 loss, the non-finite loss
guard) is shared with CoCoOp, which subclasses this method.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.data.features import AugmentedViews
from promptbench.data.transforms import DEFAULT_CROP_SCALE
from promptbench.errors import PromptbenchError
from promptbench.methods.base import Method
from promptbench.methods.feature_training import reference_sgd
from promptbench.methods.prompt_learner import PromptLearner


class CoOp(Method):
    name = "coop"
    input_kind = "images"
    trains = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        n_ctx: int = 16,
        ctx_init: str | None = None,
        csc: bool = False,
        class_token_position: str = "end",
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        cached_views: int = 0,
        cached_views_scale: Sequence[float] = DEFAULT_CROP_SCALE,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, **config)
        if int(cached_views) < 0:
            raise PromptbenchError(f"method '{self.name}': cached_views must be >= 0, got {cached_views}")
        if cached_views:
            # Opt-in protocol change: epoch e trains on cached augmented view e mod N of every image instead of
            # a fresh augmentation, so the image tower runs N times per image instead of once per step.
            self.input_kind = "features"
            self.train_views = AugmentedViews(int(cached_views), tuple(cached_views_scale))
        if lr <= 0 or warmup_lr < 0 or warmup_epochs < 0:
            raise PromptbenchError(
                f"method '{self.name}': need lr > 0, warmup_lr >= 0 and warmup_epochs >= 0 "
                f"(got lr={lr}, warmup_lr={warmup_lr}, warmup_epochs={warmup_epochs})"
            )
        self.prompt_learner = PromptLearner(backbone, self.classnames, n_ctx, ctx_init, csc, class_token_position)
        # Class-specific context is tied to the training classes; the base class refuses other class sets.
        self.transfers_to_new_classes = not self.prompt_learner.csc
        self.lr = float(lr)
        self.momentum = float(momentum)
        self.weight_decay = float(weight_decay)
        self.warmup_epochs = int(warmup_epochs)
        self.warmup_lr = float(warmup_lr)
        self._evaluation_text_features: torch.Tensor | None = None

    # ---- classification -----------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits of images, or of their frozen raw features when the method trains on cached views."""
        if self.input_kind == "features":
            return self.class_logits(F.normalize(inputs.float(), dim=-1))
        return self.class_logits(self.image_features(inputs))

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised features of the frozen image tower: no graph is kept for it."""
        with torch.no_grad():
            return F.normalize(self.backbone.encode_image(images), dim=-1)

    def text_features(self) -> torch.Tensor:
        """Normalised [n_cls, embed_dim] features of the learned prompts."""
        return F.normalize(self.prompt_learner.text_features(self.backbone), dim=-1)

    def class_logits(self, image_features: torch.Tensor) -> torch.Tensor:
        text = self._evaluation_text_features
        if text is None:
            text = self.text_features()
        return self.backbone.logit_scale * image_features @ text.T.to(image_features.dtype)

    def on_classes_changed(self) -> None:
        self.prompt_learner.set_classes(self.backbone, self.classnames)
        self._evaluation_text_features = None

    def on_predict_start(self) -> None:
        # The prompts do not change during an evaluation: encode them once, not once per test batch.
        with torch.no_grad():
            self._evaluation_text_features = self.text_features()

    def on_predict_end(self) -> None:
        self._evaluation_text_features = None

    # ---- training -----------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable and skipped
            return None
        images, labels, _ = batch
        logits = self(images).float()
        loss = F.cross_entropy(logits, labels)
        self.stop_on_non_finite(loss)
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", accuracy, prog_bar=True, batch_size=len(labels))
        return loss

    def stop_on_non_finite(self, loss: torch.Tensor) -> None:
        """Never train on NaN/inf: stop with what happened and what to try."""
        if torch.isfinite(loss):
            return
        precision = self.trainer.precision if self._trainer is not None else "unknown"
        raise PromptbenchError(
            f"method '{self.name}': non-finite training loss {loss.item()} at step {self.global_step} "
            f"(epoch {self.current_epoch}, precision={precision}); training stopped. Try precision=32 or "
            f"precision=bf16-mixed (the fp16 modes overflow more easily), or a lower learning rate "
            f"(method.lr={self.lr})."
        )

    def configure_optimizers(self) -> dict[str, Any]:
        epochs = self.trainer.max_epochs
        if epochs is None or epochs < 1:
            raise PromptbenchError(f"method '{self.name}' needs a finite number of epochs (max_epochs >= 1), got {epochs}")
        trainable = [parameter for parameter in self.parameters() if parameter.requires_grad]
        return reference_sgd(trainable, self.lr, self.momentum, self.weight_decay, epochs, self.warmup_epochs,
                             self.warmup_lr)
