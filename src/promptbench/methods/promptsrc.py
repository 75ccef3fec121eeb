"""PromptSRC (Khattak et al., "Self-regulating Prompts: Foundational Model Adaptation without Forgetting"):
IVLP's deep prompts in both towers, trained with self-regulating constraints towards the frozen CLIP, and
Gaussian Prompt Aggregation (GPA) over the epochs.

Loss of one batch, as muzairkhattak/PromptSRC trainers/promptsrc.py computes it (all features L2-normalised,
s = the frozen CLIP's logit scale):
    logits    = s * image_prompted @ text_prompted.T
    zs_logits = s * image_frozen @ text_teacher.T                 (no gradient)
    loss = CE(logits, y)
         + kl_weight * KL(softmax(zs_logits) || softmax(logits))  (sum over the batch / logits.numel(), T = 1)
         + text_loss_weight * L1_mean(text_prompted, text_teacher)
         + image_loss_weight * L1_mean(image_prompted, image_frozen)
`text_teacher` is, per class, the mean of the frozen CLIP's *unnormalised* features of the 60 teacher
templates, then normalised; `image_frozen` is the plain (unprompted) image tower on the same augmented image.

GPA: epoch e (1-based) gets weight N(e; gpa_mean, gpa_std) / sum_{a=1..max_epochs} N(a; gpa_mean, gpa_std);
after the last batch of every epoch w_e * (learned tensors) is added to a running sum, and after the last
batch of the last epoch the sum replaces the learned tensors, so evaluation, `save_learned` and the final
checkpoint hold the aggregated prompts. Differences to the official code (see also the yaml):
- only the learned prompt tensors are aggregated; the official sums the whole state dict in fp16, frozen CLIP
  included, which only perturbs the frozen weights by fp16 rounding (weights sum to 1);
- the running sum is float64 and travels in the Lightning checkpoint (key `promptsrc_gpa`, never in the
  learned file), so a resumed run ends with the prompts of an uninterrupted one;
- if training ends before trainer.max_epochs (stopped early), the epochs aggregated so far are used with
  their weights renormalised to sum 1 (the official never stops early); results.json notes it.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.errors import PromptbenchError
from promptbench.methods.ivlp import IVLP
from promptbench.methods.prompts import encode_texts, fill, resolve_templates

GPA_CHECKPOINT_KEY = "promptsrc_gpa"


def gpa_weights(mean: float, std: float, epochs: int) -> list[float]:
    """Normalised Gaussian weights of epochs 1..epochs (PromptSRC `get_gauss`, then divided by their sum)."""
    if not float(std) > 0:
        raise PromptbenchError(f"method 'promptsrc': gpa_std must be > 0, got {std}")
    if int(epochs) < 1:
        raise PromptbenchError(f"method 'promptsrc': GPA needs trainer.max_epochs >= 1, got {epochs}")
    densities = [math.exp(-0.5 * ((epoch - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
                 for epoch in range(1, int(epochs) + 1)]
    total = sum(densities)
    if total == 0:
        raise PromptbenchError(f"method 'promptsrc': N({mean}, {std}) gives every one of epochs 1..{epochs} weight 0; "
                               f"choose gpa_mean within or near the training epochs")
    return [density / total for density in densities]


class PromptSRC(IVLP):
    name = "promptsrc"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        text_loss_weight: float,
        image_loss_weight: float,
        kl_weight: float,
        teacher_templates: str | Sequence[str],
        gpa_mean: float | None,
        gpa_std: float,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, **config)
        self.text_loss_weight = float(text_loss_weight)
        self.image_loss_weight = float(image_loss_weight)
        self.kl_weight = float(kl_weight)
        self.teacher_templates_choice = teacher_templates
        self.gpa_mean = None if gpa_mean is None else float(gpa_mean)
        self.gpa_std = float(gpa_std)
        if self.gpa_mean is not None:
            gpa_weights(self.gpa_mean, self.gpa_std, 1)  # checks std
        self.teacher_templates()  # an unknown set fails at build time, not at the first step
        # The frozen text teacher of the current class set: computed when training first needs it, never saved.
        self.register_buffer("teacher_text", None, persistent=False)
        self._gpa: dict[str, Any] | None = None
        self._gpa_note: dict[str, Any] | None = None

    # ---- the frozen teachers ------------------------------------------------------------------------
    def teacher_templates(self) -> list[str]:
        return resolve_templates(self.teacher_templates_choice, self.templates)

    def teacher_text_features(self) -> torch.Tensor:
        """[n_cls, dim]: per class the mean of the frozen unnormalised template features, normalised."""
        if self.teacher_text is None:
            templates = self.teacher_templates()
            prompts = [fill(template, name) for name in self.classnames for template in templates]
            device = self.backbone.model.token_embedding.weight.device
            with torch.no_grad(), torch.autocast(device.type, enabled=False):
                features = encode_texts(self.backbone, prompts).view(len(self.classnames), len(templates), -1)
            self.teacher_text = F.normalize(features.mean(dim=1), dim=-1)
        return self.teacher_text

    def on_classes_changed(self) -> None:
        super().on_classes_changed()
        self.teacher_text = None

    # ---- the loss -----------------------------------------------------------------------------------
    def loss_terms(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The weighted loss terms, their sum `loss`, and the logits and features they come from."""
        text = self.text_features().float()
        image = self.image_features(inputs).float()
        scale = self.backbone.logit_scale.float()
        logits = scale * image @ text.T
        teacher_text = self.teacher_text_features().float()
        with torch.no_grad():
            teacher_image = F.normalize(self.backbone.encode_image(inputs).float(), dim=-1)
            zero_shot_logits = scale * teacher_image @ teacher_text.T
        kl = F.kl_div(F.log_softmax(logits, dim=1), F.log_softmax(zero_shot_logits, dim=1), reduction="sum",
                      log_target=True) / logits.numel()
        terms = {
            "loss_ce": F.cross_entropy(logits, labels),
            "loss_kl": self.kl_weight * kl,
            "loss_text": self.text_loss_weight * F.l1_loss(text, teacher_text, reduction="mean"),
            "loss_image": self.image_loss_weight * F.l1_loss(image, teacher_image, reduction="mean"),
        }
        return {
            **terms,
            "loss": terms["loss_ce"] + terms["loss_kl"] + terms["loss_text"] + terms["loss_image"],
            "logits": logits, "zero_shot_logits": zero_shot_logits, "text": text, "image": image,
            "teacher_text": teacher_text, "teacher_image": teacher_image,
        }

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable and skipped
            return None
        inputs, labels, _ = batch
        terms = self.loss_terms(inputs, labels)
        loss = terms["loss"]
        self.stop_on_non_finite(loss)
        self.log_training(loss, terms["logits"], labels,
                          **{key: terms[key] for key in ("loss_ce", "loss_kl", "loss_text", "loss_image")})
        return loss

    def on_train_start(self) -> None:
        super().on_train_start()
        self.teacher_text_features()  # outside the precision plugin's autocast

    # ---- Gaussian Prompt Aggregation ----------------------------------------------------------------
    def gpa_parameters(self) -> dict[str, torch.nn.Parameter]:
        return {name: parameter for name, parameter in self.named_parameters() if parameter.requires_grad}

    def setup(self, stage: str) -> None:
        # Runs before Lightning restores a checkpoint (which then brings back the running sum).
        super().setup(stage)
        if stage == "fit" and self.gpa_mean is not None:
            self._gpa = {"sum": {}, "epochs": [], "applied": False}
            self._gpa_note = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_end(outputs, batch, batch_idx)
        trainer = self.trainer
        if self._gpa is None or batch_idx + 1 != trainer.num_training_batches:
            return  # not the end of a complete epoch (an interrupted epoch is never aggregated)
        epochs = trainer.max_epochs
        if epochs is None or epochs < 1:
            raise PromptbenchError(f"method '{self.name}': Gaussian Prompt Aggregation weighs the epochs of "
                                   f"trainer.max_epochs, which must be >= 1 (got {epochs})")
        epoch = self.current_epoch + 1
        weight = gpa_weights(self.gpa_mean, self.gpa_std, epochs)[epoch - 1]
        running = self._gpa["sum"]
        with torch.no_grad():
            for name, parameter in self.gpa_parameters().items():
                term = parameter.detach().double() * weight
                running[name] = term if name not in running else running[name].to(term.device) + term
        self._gpa["epochs"].append(epoch)
        if epoch == epochs:
            self._apply_gpa(self._aggregated_weight())

    def on_train_end(self) -> None:
        # Training ended before trainer.max_epochs: aggregate the epochs it completed.
        super().on_train_end()
        if self._gpa is None or self._gpa["applied"] or not self._gpa["epochs"]:
            return
        covered = self._aggregated_weight()
        if covered > 0:
            self._apply_gpa(covered)

    def _aggregated_weight(self) -> float:
        """The summed GPA weights of the epochs in the running sum (1 once every epoch of the run is in)."""
        weights = gpa_weights(self.gpa_mean, self.gpa_std, self.trainer.max_epochs)
        return sum(weights[epoch - 1] for epoch in self._gpa["epochs"])

    def _apply_gpa(self, covered: float) -> None:
        with torch.no_grad():
            for name, parameter in self.gpa_parameters().items():
                aggregated = self._gpa["sum"][name].to(parameter.device) / covered
                parameter.copy_(aggregated.to(parameter.dtype))
        self._gpa["applied"] = True
        epochs = self.trainer.max_epochs
        self._gpa_note = {"epochs_aggregated": len(self._gpa["epochs"]), "max_epochs": epochs,
                          "gpa_mean": self.gpa_mean, "gpa_std": self.gpa_std}
        if len(self._gpa["epochs"]) < epochs:
            self._gpa_note["stopped_early_weights_renormalised_from"] = covered

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self._gpa is not None:
            checkpoint[GPA_CHECKPOINT_KEY] = {
                "sum": {name: tensor.detach().cpu().clone() for name, tensor in self._gpa["sum"].items()},
                "epochs": list(self._gpa["epochs"]),
                "applied": bool(self._gpa["applied"]),
            }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        saved = checkpoint.get(GPA_CHECKPOINT_KEY)
        if saved is not None and self.gpa_mean is not None:
            self._gpa = {"sum": dict(saved["sum"]), "epochs": list(saved["epochs"]), "applied": bool(saved["applied"])}

    def run_notes(self) -> dict[str, Any]:
        notes = super().run_notes()
        if self._gpa_note is not None:
            notes["gaussian_prompt_aggregation"] = dict(self._gpa_note)
        return notes
