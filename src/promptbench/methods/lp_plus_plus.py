"""LP++ (Huang, Shakeri, Dolz, Boudiaf, Bahig, Ben Ayed, CVPR 2024): a linear probe blended with the text classifier.

    logits = f @ W.T + b + alpha * (f @ T.T)          (alpha [K]: one blending weight per class, broadcast over rows)

f: the L2-normalised image feature; T [K, d]: the hand-crafted prompt classifier (ZeroShotCLIP's `classifier()`);
no logit scale on either term. As the official code (FereshteShakeri/FewShot-CLIP-Strong-Baseline,
methods/linear_probe_p2.py, class LinearProbe_P2), on the N support features F of one augmented view of the train set:

- W0[k] = the SUM of the class-k features; b0 = nn.Linear's default init (here under torch.manual_seed(init_seed));
- alpha0 = alpha_init_scale (250) * mean over classes of the class mean of f_i . t_{y_i}, the same in every class;
- full batch, mean cross-entropy; (W, b): SGD with momentum 0.9 at lr_W = 4N / lambda_max(F.T F), one step per epoch;
- alpha: a plain step alpha -= lr_alpha * alpha.grad every `alpha_every` (10) epochs, lr_alpha =
  N / (4 max_k sum_i (f_i . t_k)^2), after that epoch's (W, b) step. The reference never zeroes alpha.grad, so each
  alpha step uses the sum of every alpha gradient since epoch 0; `zero_alpha_grad: true` is the deliberate deviation
  that steps on the epoch's own gradient only.

The epoch is chosen as the reference does, on the run's selection set (selection.py): after each epoch's updates,
the last epoch whose top-1 is >= the best so far; with `selection=none` the last epoch. Everything is fitted in
`prepare` in float32 (the reference trains in fp16). The weights are tied to the training classes.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, FeatureProvider, Views
from promptbench.errors import PromptbenchError
from promptbench.methods.zeroshot import ZeroShotCLIP
from promptbench.selection import SELECTION_SET

log = logging.getLogger(__name__)


def lp_plus_plus_logits(features: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, alpha: torch.Tensor,
                        text_weights: torch.Tensor) -> torch.Tensor:
    """features [N, d] L2-normalised, weight [K, d], bias [K], alpha [K], text_weights [K, d] -> logits [N, K]."""
    return F.linear(features, weight, bias) + alpha * (features @ text_weights.T)


def step_size_w(features: torch.Tensor) -> float:
    """4N / lambda_max(F.T F), the largest eigenvalue in float64 (the reference: scipy's eigh)."""
    gram = features.double().T @ features.double()
    return 4 * features.shape[0] / float(torch.linalg.eigvalsh(gram)[-1])


def step_size_alpha(features: torch.Tensor, text_weights: torch.Tensor) -> float:
    """N / (4 max_k sum_i (f_i . t_k)^2)."""
    similarity = features @ text_weights.T
    return features.shape[0] / (4 * float(similarity.pow(2).sum(dim=0).max()))


def initial_alpha(features: torch.Tensor, labels: torch.Tensor, text_weights: torch.Tensor, scale: float) -> float:
    """scale * the mean over the present classes of each class's mean own-class text similarity."""
    own = (features * text_weights[labels]).sum(dim=-1).double()
    classes = labels.unique()
    return scale * float(torch.stack([own[labels == k].mean() for k in classes]).mean())


@torch.no_grad()
def top1_correct(evaluated: tuple[torch.Tensor, torch.Tensor], linear: nn.Linear, alpha: torch.Tensor,
                 text_weights: torch.Tensor) -> int:
    """Correct top-1 predictions on (L2-normalised features, labels) with the current (W, b, alpha)."""
    features, labels = evaluated
    predictions = lp_plus_plus_logits(features, linear.weight, linear.bias, alpha, text_weights).argmax(dim=-1)
    return int((predictions == labels).sum())


class LPPlusPlus(ZeroShotCLIP):
    name = "lp_plus_plus"
    trains = False
    transfers_to_new_classes = False
    uses_train_data = True
    selects = ("epoch",)

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        epochs: int,
        momentum: float,
        alpha_every: int,
        alpha_init_scale: float,
        zero_alpha_grad: bool,
        init_seed: int,
        views: Mapping[str, Any] | Views,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, **config)
        if int(epochs) < 1 or int(alpha_every) < 1:
            raise PromptbenchError(f"method '{self.name}': epochs and alpha_every must be >= 1, got {epochs} and "
                                   f"{alpha_every}")
        if not 0 <= float(momentum) < 1:
            raise PromptbenchError(f"method '{self.name}': momentum must be in [0, 1), got {momentum}")
        self.epochs = int(epochs)
        self.momentum = float(momentum)
        self.alpha_every = int(alpha_every)
        self.alpha_init_scale = float(alpha_init_scale)
        self.zero_alpha_grad = bool(zero_alpha_grad)
        self.init_seed = int(init_seed)
        self.views = Views.from_config(views)
        dim, classes = backbone.embed_dim, len(self.classnames)
        self.register_buffer("weight", torch.zeros(classes, dim))
        self.register_buffer("bias", torch.zeros(classes))
        self.register_buffer("alpha", torch.zeros(classes))
        # The kept epoch (0-based, the reference's best_epoch); -1 until fitted or loaded.
        self.register_buffer("kept_epoch", torch.tensor(-1))
        self.notes: dict[str, Any] = {}

    def contract(self) -> DataContract:
        return DataContract(inputs="features", reads=("train", *self.selection_reads()))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if int(self.kept_epoch) < 0:
            raise PromptbenchError(f"method '{self.name}' is not fitted: run it on a train set or pass ckpt_path")
        features = F.normalize(features.float(), dim=-1)
        # float32 even when the trainer keeps the module in half precision ("16-true").
        return lp_plus_plus_logits(features, self.weight.float(), self.bias.float(), self.alpha.float(),
                                   self.classifier().to(features.device))

    def support_set(self, provider: FeatureProvider) -> tuple[torch.Tensor, torch.Tensor]:
        """The L2-normalised features of the augmented train views, every view a support sample, with labels."""
        views = provider.views("train", self.views)
        features = views.features.reshape(-1, views.features.shape[-1])
        return F.normalize(features.float(), dim=-1), views.labels.repeat(views.count)

    def initial_linear(self, features: torch.Tensor, labels: torch.Tensor) -> nn.Linear:
        """nn.Linear(d, K) with its default init under the run's seed, the weight replaced by the class sums."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)
            linear = nn.Linear(features.shape[1], len(self.classnames), bias=True)
        linear = linear.to(features.device)
        with torch.no_grad():
            linear.weight.copy_(F.one_hot(labels, len(self.classnames)).float().T @ features)
        return linear

    def prepare(self, provider: FeatureProvider) -> None:
        features, labels = self.support_set(provider)
        if len(labels.unique()) < 2:
            raise PromptbenchError(f"method '{self.name}' needs train images of at least two classes")
        # Fitted where the text tower is (the accelerator once features were extracted there).
        text_weights = self.classifier()
        device = text_weights.device
        features, labels = features.to(device), labels.to(device)
        selection = None
        if self.selecting:
            selected = provider.features(SELECTION_SET)
            selection = (F.normalize(selected.features.float().to(device), dim=-1), selected.labels.to(device))

        linear = self.initial_linear(features, labels)
        lr_w, lr_alpha = step_size_w(features), step_size_alpha(features, text_weights)
        alpha_init = initial_alpha(features, labels, text_weights, self.alpha_init_scale)
        alpha = torch.full((len(self.classnames),), alpha_init, device=device, requires_grad=True)
        optimizer = torch.optim.SGD(linear.parameters(), lr=lr_w, momentum=self.momentum)
        best: tuple[int, int, list[torch.Tensor]] | None = None  # (correct, epoch, [weight, bias, alpha])
        with torch.enable_grad():
            for epoch in range(self.epochs):
                logits = lp_plus_plus_logits(features, linear.weight, linear.bias, alpha, text_weights)
                loss = F.cross_entropy(logits, labels)
                optimizer.zero_grad()
                if self.zero_alpha_grad:
                    alpha.grad = None
                loss.backward()
                optimizer.step()
                if (epoch + 1) % self.alpha_every == 0:
                    with torch.no_grad():
                        alpha -= lr_alpha * alpha.grad
                if selection is not None:
                    correct = top1_correct(selection, linear, alpha, text_weights)
                    # The reference's rule: the last epoch that ties the best so far wins.
                    if best is None or correct >= best[0]:
                        best = (correct, epoch, [linear.weight.detach().clone(), linear.bias.detach().clone(),
                                                 alpha.detach().clone()])
        if not torch.isfinite(loss):
            raise PromptbenchError(f"method '{self.name}': non-finite training loss {loss.item()} (lr_W={lr_w:.4g}, "
                                   f"lr_alpha={lr_alpha:.4g}); check the train features for NaN/inf")
        if best is None:
            kept, tensors = self.epochs - 1, [linear.weight.detach(), linear.bias.detach(), alpha.detach()]
        else:
            _, kept, tensors = best
        for buffer, value in zip((self.weight, self.bias, self.alpha), tensors):
            buffer.copy_(value)
        self.kept_epoch.fill_(kept)
        self.notes = {"epoch": kept, "epochs": self.epochs, "alpha_init": alpha_init, "lr_w": lr_w,
                      "lr_alpha": lr_alpha, "support_size": len(labels), "final_train_loss": float(loss.detach()),
                      "alpha_mean": float(self.alpha.mean()), "zero_alpha_grad": self.zero_alpha_grad}
        if best is not None:
            self.notes["selection_top1"] = 100.0 * best[0] / len(selection[1])
        log.debug("lp++: epoch %d of %d kept, alpha0 %.4g, lr_W %.4g, lr_alpha %.4g", kept, self.epochs,
                  alpha_init, lr_w, lr_alpha)

    def run_notes(self) -> dict[str, Any]:
        return dict(self.notes)
