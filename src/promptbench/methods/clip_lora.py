"""CLIP-LoRA (Zanella & Ben Ayed, "Low-Rank Few-Shot Adaptation of Vision-Language Models", CVPRW 2024; the official
code is MaxZanella/CLIP-LoRA): low-rank adapters (backbones/lora.py) on the q, k and v projections of every
attention block of both CLIP towers, trained with cross-entropy on logit_scale * cos(image, text) against the
prompts "a photo of a {class}.", one template for every dataset.

Every training step encodes freshly augmented images through the adapted image tower and, when the text tower is
adapted, every class prompt through it too, with gradient (lora.py run_lora). A frozen text tower's class features
are encoded once per class set. The budget is a number of optimiser steps, 500 x shots whatever the number of classes
(trainer.max_steps); the cosine learning-rate schedule spans exactly those steps. The last iterate is evaluated: the
method selects nothing. Only the adapters are learned, saved and checkpointed; a checkpoint also keeps torch's random
state, which the adapters' dropout draws from, so a resumed run ends like an uninterrupted one.

logit_scale is the backbone's exp(logit_scale): the reference's fixed 100 is that value for OpenAI's CLIP weights.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.backbones.lora import LORA_TENSORS
from promptbench.contract import DataContract
from promptbench.errors import PromptbenchError
from promptbench.methods.base import Method, read_learned
from promptbench.methods.prompts import fill, resolve_templates


RNG_CHECKPOINT_KEY = "clip_lora_rng"


class CLIPLoRA(Method):
    name = "clip_lora"
    trains = True

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        encoders: str,
        position: str,
        projections: Sequence[str],
        rank: int,
        alpha: float,
        dropout: float,
        template_set: str | Sequence[str] | None,
        batch_size: int,
        **config: Any,
    ):
        # The adapters go into a copy: the caller's backbone (a notebook's, a test session's) stays the frozen model.
        backbone = copy.deepcopy(backbone)
        super().__init__(backbone, classnames, resolve_templates(template_set, templates), **config)
        self.template_set = template_set
        self.batch_size = int(batch_size)
        self.lora_options = {"encoders": encoders, "position": position, "projections": list(projections),
                             "rank": int(rank), "alpha": float(alpha), "dropout": float(dropout)}
        self.adapted_blocks = backbone.add_lora(**self.lora_options, method=self.name)
        self._class_features: torch.Tensor | None = None
        self.on_classes_changed()

    def contract(self) -> DataContract:
        return DataContract(inputs="images", batch_size=self.batch_size)

    @property
    def adapts_text(self) -> bool:
        return "text" in self.adapted_blocks

    @property
    def adapts_image(self) -> bool:
        return "vision" in self.adapted_blocks

    # ---- classification -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        image = self.image_features(images)
        return self.backbone.logit_scale * image @ self.class_features().T.to(image)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised image features; a frozen image tower keeps a graph only for inputs that ask for gradients (an
        adversarial evaluation's)."""
        return F.normalize(self.backbone.encode_image(images), dim=-1)

    def text_features(self) -> torch.Tensor:
        """Normalised [n_cls, dim] features of the class prompts: per class the mean of its normalised template
        features, renormalised (one template: its feature); with gradient through the text adapters."""
        features = F.normalize(self.backbone.encode_text(self.prompt_tokens).float(), dim=-1)
        return F.normalize(features.view(len(self.classnames), len(self.templates), -1).mean(dim=1), dim=-1)

    def class_features(self) -> torch.Tensor:
        """The text features to classify with: recomputed at every call while the text adapters train, otherwise
        encoded once (a frozen text tower; or an evaluation, during which nothing changes)."""
        if self._class_features is not None:
            return self._class_features
        if self.adapts_text:
            return self.text_features()
        with torch.no_grad():
            self._class_features = self.text_features()
        return self._class_features

    def set_classes(self, classnames: Sequence[str], templates: Sequence[str]) -> None:
        super().set_classes(classnames, resolve_templates(self.template_set, templates))

    def on_classes_changed(self) -> None:
        prompts = [fill(template, name) for name in self.classnames for template in self.templates]
        device = self.backbone.model.token_embedding.weight.device
        self.register_buffer("prompt_tokens", self.backbone.tokenize(prompts).to(device), persistent=False)
        self._class_features = None

    def on_predict_start(self) -> None:
        with torch.no_grad():
            self._class_features = self.text_features()

    def on_predict_end(self) -> None:
        if self.adapts_text:
            self._class_features = None

    # ---- resuming: the dropout's random stream ------------------------------------------------------------
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # The adapters' dropout draws from torch's global generators, which Lightning's checkpoints do not hold: with
        # their state a resumed run draws the masks the uninterrupted run would have drawn.
        super().on_save_checkpoint(checkpoint)
        checkpoint[RNG_CHECKPOINT_KEY] = {
            "cpu": torch.get_rng_state(),
            # the current device's (each process of a DDP run trains on one)
            "cuda": torch.cuda.get_rng_state() if torch.cuda.is_initialized() else None,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get(RNG_CHECKPOINT_KEY)
        if state is None:
            return
        torch.set_rng_state(state["cpu"])
        if state["cuda"] is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state(state["cuda"])

    # ---- what is learned: the adapters inside the backbone ----------------------------------------------
    def is_learned(self, key: str) -> bool:
        return super().is_learned(key) or key.rsplit(".", 1)[-1] in LORA_TENSORS

    def learned_metadata(self) -> dict[str, Any]:
        return super().learned_metadata() | {"lora": self.lora_options}

    def load_learned(self, path: str | Path) -> None:
        """Refuse adapters trained with other LoRA options (a different alpha or dropout would load silently)."""
        _, saved = read_learned(path, option="ckpt_path")
        trained_with = saved.get("lora", self.lora_options)
        differing = {key: value for key, value in trained_with.items() if self.lora_options.get(key) != value}
        if differing:
            overrides = " ".join(f"method.{key}=" + (f"[{','.join(value)}]" if isinstance(value, list) else f"{value}")
                                 for key, value in differing.items())
            ours = {key: self.lora_options.get(key) for key in differing}
            raise PromptbenchError(f"{path} holds LoRA adapters trained with {differing}, not {ours}: load them into "
                                   f"a method built with {overrides}")
        super().load_learned(path)

    def run_notes(self) -> dict[str, Any]:
        parameters = sum(parameter.numel() for parameter in self.trainable_parameters())
        return {"lora": {"adapted_blocks": self.adapted_blocks, "parameters": parameters}}
