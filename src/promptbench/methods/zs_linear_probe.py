"""ZS-LP, the zero-shot-initialised linear probe of CLAP (Silva-Rodríguez et al., "A Closer Look at the Few-Shot
Adaptation of Large Vision-Language Models", CVPR 2024): a bias-free cosine classifier on frozen image features
whose class weights start at the text embeddings of the zero-shot classifier.

    logits = logit_scale * normalize(f) @ normalize(W).T,   W <- t at the start

t_c is class c's text embedding: the mean of its prompts' raw text features, never normalised (jusiro/CLAP
trainers/adapters.py `_get_base_text_features`; `AdapterMethod.__init__` clones it into the trained prototypes);
f is the raw image feature; logit_scale is the backbone's, fixed (100 for CLIP). Only W trains, with cross-entropy,
on 20 cached augmented views of the train set (RandomResizedCrop scale (0.08, 1) + flip); each epoch draws
max(1, N // 256) batches of 256 from the shuffled pool of all views, as the reference's `run_epoch`. The
reference's recipe, shared by every dataset and shot count (configs/trainers/SGD_lr1e-1_B256_ep300.yaml): SGD lr
0.1, momentum 0.9, no weight decay, 300 epochs, one warm-up epoch at 1e-5 then cosine per epoch, the last epoch
kept, no validation data. W is tied to the training classes.

`TextAnchoredProbe` is what ZS-LP, CLAP (methods/clap.py) and TaskRes (methods/taskres.py) share: the cosine
classifier over cached train views whose rows derive from t, kept as the buffer `text_embeddings`.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, Views, ViewSampling
from promptbench.methods.prompts import mean_text_embeddings
from promptbench.methods.zeroshot import ZeroShotCLIP


class TextAnchoredProbe(ZeroShotCLIP):
    """A cosine classifier (the backbone's fixed logit scale) trained on cached augmented train views, whose rows
    `class_weights()` derive from the un-normalised mean text embeddings t (`text_embeddings`, saved with the
    learned tensors as the references save theirs). The rows stay with the training classes, and an evaluation
    with other templates keeps them: they were trained from these."""

    trains = True
    uses_train_data = True
    transfers_to_new_classes = False

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        views: Mapping[str, Any] | Views,
        sampling: ViewSampling,
        batch_size: int,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, **config)
        self.views = Views.from_config(views)
        self.sampling = sampling
        self.batch_size = int(batch_size)
        self.register_buffer("text_embeddings", mean_text_embeddings(backbone, self.classnames, self.templates))

    def contract(self) -> DataContract:
        return DataContract(inputs="features", batch_size=self.batch_size, train_views=self.views,
                            view_sampling=self.sampling)

    def class_weights(self) -> torch.Tensor:
        """[n_classes, dim] raw classifier rows (normalised in `cosine_logits`)."""
        raise NotImplementedError

    def cosine_logits(self, features: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # float32 even when the trainer keeps the module in half precision ("16-true")
        rows = F.normalize(weights.float(), dim=-1)
        return self.backbone.logit_scale * F.normalize(features.float(), dim=-1) @ rows.T

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.cosine_logits(features, self.class_weights())


class ZSLinearProbe(TextAnchoredProbe):
    name = "zs_linear_probe"

    def __init__(self, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], **config: Any):
        super().__init__(backbone, classnames, templates, **config)
        self.weight = nn.Parameter(self.text_embeddings.clone())

    def class_weights(self) -> torch.Tensor:
        return self.weight
