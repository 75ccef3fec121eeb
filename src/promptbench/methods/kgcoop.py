"""KgCoOp (Yao et al., "Visual-Language Prompt Tuning with Knowledge-guided Context Optimization", CVPR 2023):
CoOp plus a term that keeps the learned prompts' text features close to the hand-crafted prompts' ones.

As the reference computes it (htyao89/KgCoOp trainers/kgcoop.py, CustomCLIP.forward and forward_backward):
    loss = CE(logits, labels) + w * (1 - mean_c cos(t_c, t̂_c))
with t_c the normalised text feature of class c's learned prompt and t̂_c that of its hand-crafted prompt
(CUSTOM_TEMPLATES[dataset], encoded once by the frozen CLIP, no grad). The code's term is 1 - cosine, not the
paper's squared L2 distance ||t_c - t̂_c||^2 (= 2 - 2 cos for unit vectors: twice the code's term).
Evaluation is CoOp's (the term only shapes training), so the learned context transfers to new classes.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.methods.coop import CoOp

# torch.nn.CosineSimilarity(dim=1, eps=1e-07), as the reference builds it
COSINE_EPS = 1e-7


def knowledge_guided_loss(learned: torch.Tensor, hand_crafted: torch.Tensor) -> torch.Tensor:
    """The reference's `score`: 1 - the mean over classes of cos(learned_c, hand_crafted_c)."""
    cosine = F.cosine_similarity(learned.float(), hand_crafted.float(), dim=1, eps=COSINE_EPS)
    return 1.0 - cosine.mean()


class KgCoOp(CoOp):
    name = "kgcoop"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        w: float,
        template_set: str | Sequence[str],
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, **config)
        self.w = float(w)
        self.keep_hand_crafted_features(template_set)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable and skipped
            return None
        inputs, labels, _ = batch
        text = self.text_features()  # one text-encoder pass serves the logits and the knowledge term
        logits = self.logits_against(self.image_features(inputs), text).float()
        cross_entropy = F.cross_entropy(logits, labels)
        kg_loss = knowledge_guided_loss(text, self.hand_crafted_text)
        loss = cross_entropy + self.w * kg_loss
        self.stop_on_non_finite(loss)
        self.log_training(loss, logits, labels, ce_loss=cross_entropy, kg_loss=kg_loss)
        return loss
