"""Tip-Adapter and Tip-Adapter-F (Zhang et al., ECCV 2022): zero-shot CLIP plus a key-value cache of the train set.

    logits = text_scale * f @ W_text.T + alpha * exp(-beta * (1 - f @ keys.T)) @ values

f: the L2-normalised test-transform image feature; W_text: the hand-crafted prompt classifier; keys: the
L2-normalised train features averaged over 10 augmented views (RandomResizedCrop scale (0.5, 1) + flip);
values: their one-hot labels. The reference scales the text term by a fixed 100, not CLIP's logit_scale.

Tip-Adapter is training-free: alpha and beta are searched over the reference grid on the run's selection
set (selection.py). Tip-Adapter-F makes the keys trainable (the weight of a bias-free linear layer
f -> f @ keys.T), trains them with alpha/beta at their initial values, keeps the epoch that scores best on
the selection set, then searches alpha/beta on it. With `selection=none` neither searches: the last
epoch and the initial alpha/beta are kept. The reference's choices: `selection=full_val` is Tip-Adapter's
alpha/beta search (main.py searches the whole val split); `selection=test_parity` is Tip-Adapter-F's epoch
choice on the test split, with the reference's final max(test at the best epoch, test after the search)
(its main_imagenet.py also searches alpha/beta on test; main.py searches them on the whole val split).
The cache values are the training classes: neither method moves to another class set.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, FeatureProvider, FeatureSet, Views
from promptbench.errors import PromptbenchError
from promptbench.methods.zeroshot import ZeroShotCLIP
from promptbench.selection import SELECTION_SET

# The reference's final search starts at 0.1 for both alpha and beta.
GRID_START = 0.1


def reference_grid(maximum: float, steps: int) -> torch.Tensor:
    """The reference's search values 0.1 + i * (maximum - 0.1) / steps, i < steps (`maximum` itself is excluded)."""
    return GRID_START + torch.arange(steps, dtype=torch.float64) * (maximum - GRID_START) / steps


def tip_logits(features: torch.Tensor, text_weights: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
               alpha: torch.Tensor | float, beta: torch.Tensor | float, text_scale: torch.Tensor | float) -> torch.Tensor:
    """features [N, D] L2-normalised, text_weights [C, D], keys [K, D], values [K, C] one-hot -> logits [N, C]."""
    affinity = features @ keys.T
    return text_scale * features @ text_weights.T + alpha * torch.exp(-beta * (1 - affinity)) @ values


@torch.no_grad()
def search_alpha_beta(text_logits: torch.Tensor, affinity: torch.Tensor, values: torch.Tensor, labels: torch.Tensor,
                      alphas: torch.Tensor, betas: torch.Tensor) -> tuple[float, float, int]:
    """Grid search of (alpha, beta) by top-1 correct count. Ties go to the first pair in (beta, alpha) order,
    as the reference keeps only strict improvements while looping over beta, then alpha."""
    correct = torch.empty(len(betas), len(alphas), dtype=torch.long)
    alphas_ = alphas.to(text_logits)[:, None, None]
    for row, beta in enumerate(betas.tolist()):
        cache_logits = torch.exp(-beta * (1 - affinity)) @ values
        predictions = (text_logits[None] + alphas_ * cache_logits[None]).argmax(dim=-1)
        correct[row] = (predictions == labels[None]).sum(dim=-1).cpu()
    best = int(correct.flatten().argmax())  # argmax returns the first maximum
    row, column = divmod(best, len(alphas))
    return float(alphas[column]), float(betas[row]), int(correct[row, column])


class TipAdapter(ZeroShotCLIP):
    name = "tip_adapter"
    trains = False
    transfers_to_new_classes = False
    uses_train_data = True
    selects = ("alpha", "beta")
    # Tip-Adapter-F trains the keys; Tip-Adapter keeps them as a buffer.
    trainable_keys = False

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        init_alpha: float,
        init_beta: float,
        alpha_max: float,
        beta_max: float,
        alpha_steps: int,
        beta_steps: int,
        text_scale: float | None,
        views: Mapping[str, Any] | Views,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, **config)
        for option, value in (("alpha_max", alpha_max), ("beta_max", beta_max)):
            if float(value) <= GRID_START:
                raise PromptbenchError(f"method.{option} must be > {GRID_START} (the grid starts there), got {value}")
        if int(alpha_steps) < 1 or int(beta_steps) < 1:
            raise PromptbenchError(f"method.alpha_steps and method.beta_steps must be >= 1, got "
                                   f"{alpha_steps} and {beta_steps}")
        if text_scale is not None and not float(text_scale) > 0:
            raise PromptbenchError(f"method.text_scale must be > 0 (or null: the backbone's logit scale), got {text_scale}")
        self.alpha_grid = reference_grid(float(alpha_max), int(alpha_steps))
        self.beta_grid = reference_grid(float(beta_max), int(beta_steps))
        self.text_scale = None if text_scale is None else float(text_scale)
        self.views = Views.from_config(views)
        keys = torch.empty(0, backbone.embed_dim)
        if self.trainable_keys:
            self.cache_keys = nn.Parameter(keys)
        else:
            self.register_buffer("cache_keys", keys)
        self.register_buffer("cache_labels", torch.empty(0, dtype=torch.long))
        # One-hot cache values: derived from the labels, so not saved.
        self.register_buffer("cache_values", torch.empty(0, len(self.classnames)), persistent=False)
        self.register_load_state_dict_post_hook(TipAdapter.refresh_values)
        # Saved with the cache, so an eval-only run with ckpt_path uses the searched values.
        self.register_buffer("alpha", torch.tensor(float(init_alpha)))
        self.register_buffer("beta", torch.tensor(float(init_beta)))
        self.notes: dict[str, Any] = {}

    def contract(self) -> DataContract:
        return DataContract(inputs="features", reads=("train", *self.selection_reads()))

    # ---- the cache ---------------------------------------------------------------------------------
    def build_cache(self, provider: FeatureProvider) -> None:
        """Keys: train features averaged over the augmented views, then L2-normalised; values: one-hot labels."""
        train = provider.views("train", self.views).mean()
        self.set_cache(F.normalize(train.features.float(), dim=-1), train.labels)

    def set_cache(self, keys: torch.Tensor, labels: torch.Tensor) -> None:
        device = self.cache_keys.device
        self.cache_keys.data = keys.to(device)
        self.cache_labels = labels.to(device)
        self.refresh_values()

    def refresh_values(self, *unused: Any) -> None:
        self.cache_values = F.one_hot(self.cache_labels, len(self.classnames)).float()

    def resize_for_loading(self, state: dict[str, torch.Tensor]) -> None:
        # The cache's size is known only once built: take the saved shapes, then load into them.
        if "cache_keys" in state and "cache_labels" in state:
            self.set_cache(torch.empty_like(state["cache_keys"]), torch.zeros_like(state["cache_labels"]))

    # ---- logits ------------------------------------------------------------------------------------
    def scale(self) -> torch.Tensor | float:
        return self.backbone.logit_scale if self.text_scale is None else self.text_scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if self.cache_keys.shape[0] == 0:
            raise PromptbenchError(f"method '{self.name}' has no cache yet: it is built from the train set by "
                                   f"prepare/fit, or loaded with ckpt_path=<learned.safetensors>")
        features = F.normalize(features.float(), dim=-1)
        text_weights = self.classifier().to(features.device)
        # Computed in float32 even when the trainer keeps the module in half precision ("16-true").
        return tip_logits(features, text_weights, self.cache_keys.float(), self.cache_values.float(),
                          self.alpha.float(), self.beta.float(), self.scale())

    @torch.no_grad()
    def top1_correct(self, evaluated: FeatureSet) -> int:
        device = self.cache_keys.device
        predictions = self(evaluated.features.to(device)).argmax(dim=-1)
        return int((predictions == evaluated.labels.to(device)).sum())

    # ---- the search --------------------------------------------------------------------------------
    @torch.no_grad()
    def search_hyperparameters(self, selection: FeatureSet) -> None:
        """Set alpha and beta to the reference grid's best pair on the selection set."""
        device = self.cache_keys.device
        features = F.normalize(selection.features.float().to(device), dim=-1)
        text_logits = self.scale() * features @ self.classifier().to(device).T
        affinity = features @ self.cache_keys.float().T
        alpha, beta, correct = search_alpha_beta(text_logits, affinity, self.cache_values.float(),
                                                 selection.labels.to(device), self.alpha_grid, self.beta_grid)
        self.alpha.fill_(alpha)
        self.beta.fill_(beta)
        self.notes.update(search_top1=100.0 * correct / len(selection.labels))

    def prepare(self, provider: FeatureProvider) -> None:
        self.build_cache(provider)
        if self.selecting:
            self.search_hyperparameters(provider.features(SELECTION_SET))

    def run_notes(self) -> dict[str, Any]:
        return {"alpha": float(self.alpha), "beta": float(self.beta), "cache_size": int(self.cache_keys.shape[0]),
                **self.notes}


class TipAdapterF(TipAdapter):
    name = "tip_adapter_f"
    trains = True
    trainable_keys = True
    selects = ("epoch", "alpha", "beta")

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        batch_size: int,
        train_views: Mapping[str, Any] | Views,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, **config)
        self.batch_size = int(batch_size)
        # The reference trains on the cache's augmentation; by default on the very views of the cache.
        self.train_views = Views.from_config(train_views)
        self.selection_features: FeatureSet | None = None
        self.best: tuple[int, int, torch.Tensor] | None = None  # (correct, epoch, keys)

    def contract(self) -> DataContract:
        return DataContract(inputs="features", batch_size=self.batch_size, train_views=self.train_views,
                            reads=("train", *self.selection_reads()))

    def prepare(self, provider: FeatureProvider) -> None:
        self.build_cache(provider)
        self.selection_features = provider.features(SELECTION_SET) if self.selecting else None
        self.best = None

    def on_train_epoch_end(self) -> None:
        if not self.selecting:
            return
        # alpha and beta still hold their initial values here, as in the reference's per-epoch evaluation.
        correct = self.top1_correct(self.selection_features)
        self.log("select/top1", 100.0 * correct / len(self.selection_features.labels))
        if self.best is None or correct > self.best[0]:
            self.best = (correct, self.current_epoch, self.cache_keys.detach().clone())

    def on_fit_end(self) -> None:
        if not self.selecting:
            return  # the last epoch's keys and the initial alpha/beta
        correct, epoch, keys = self.best
        self.cache_keys.data.copy_(keys)
        initial = (float(self.alpha), float(self.beta))
        self.search_hyperparameters(self.selection_features)
        self.notes.update(best_epoch=epoch, selection_top1=100.0 * correct / len(self.selection_features.labels))
        if self.selection == "test_parity" and self.top1_correct(self.selection_features) < correct:
            # The reference reports max(test accuracy at the best epoch, test accuracy after the search):
            # keep the initial alpha/beta when they score higher on test.
            self.alpha.fill_(initial[0])
            self.beta.fill_(initial[1])
        self.selection_features = None
