"""Linear-probe CLIP: L2-regularised multinomial logistic regression on frozen test-transform image features.

As CoOp's lpclip/linear_probe.py: sklearn LogisticRegression (L-BFGS, 1000 iterations) on CPU, in float64
as the reference (its feat_extractor.py stores features through `.tolist()`: in float32 L-BFGS stops at other
iterations and the bisection of C moves); the inverse regularisation C is searched on the selection set
(selection.py; the reference's is the few-shot val split), first over {1e6, 1e4, ..., 1e-6}, then by 8
rounds of bisection in log10 space around the best; the classifier of the last round is kept. With
`selection=none` C is `default_c`. The reference feeds raw (not normalised) features;
`normalize_features: true` is an option. Training-free from Lightning's point of view (fitted in
`prepare`); its weights are tied to the training classes.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Any, Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, FeatureProvider
from promptbench.errors import PromptbenchError
from promptbench.methods.base import Method
from promptbench.selection import SELECTION_SET

log = logging.getLogger(__name__)


def search_c(accuracy: Callable[[float], float], grid: Sequence[float], rounds: int) -> float:
    """The reference's search: the grid's best C (first on ties), then `rounds` of bisection between
    C/10 and C*10 in log10 space, moving towards the better end (the lower end on ties). Returns the C
    of the last round's better end."""
    scores = [accuracy(c) for c in grid]
    best = grid[int(np.argmax(scores))]
    low, high = math.log10(best) - 1, math.log10(best) + 1
    for _ in range(rounds):
        middle = (low + high) / 2
        if accuracy(10**low) < accuracy(10**high):
            best, low = 10**high, middle
        else:
            best, high = 10**low, middle
    return best


class LinearProbe(Method):
    name = "linear_probe"
    trains = False
    transfers_to_new_classes = False
    selects = ("C",)

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        c_grid: Sequence[float],
        search_rounds: int,
        default_c: float,
        max_iter: int,
        normalize_features: bool,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, **config)
        self.c_grid = [float(c) for c in c_grid]
        if not self.c_grid or min(self.c_grid) <= 0:
            raise PromptbenchError(f"method '{self.name}': c_grid must be a non-empty list of positive values, got {c_grid}")
        if int(search_rounds) < 0 or int(max_iter) < 1:
            raise PromptbenchError(f"method '{self.name}': search_rounds must be >= 0 and max_iter >= 1")
        if not float(default_c) > 0:
            raise PromptbenchError(f"method '{self.name}': default_c must be > 0, got {default_c}")
        self.search_rounds = int(search_rounds)
        self.default_c = float(default_c)
        self.max_iter = int(max_iter)
        self.normalize_features = bool(normalize_features)
        dim, classes = backbone.embed_dim, len(self.classnames)
        self.register_buffer("weight", torch.zeros(classes, dim, dtype=torch.float64))
        self.register_buffer("bias", torch.zeros(classes, dtype=torch.float64))
        self.register_buffer("c", torch.tensor(float("nan")))
        self.notes: dict[str, Any] = {}

    def contract(self) -> DataContract:
        return DataContract(inputs="features", reads=("train", *self.selection_reads()))

    def inputs(self, features: torch.Tensor) -> torch.Tensor:
        features = features.double()
        return F.normalize(features, dim=-1) if self.normalize_features else features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if torch.isnan(self.c):
            raise PromptbenchError(f"method '{self.name}' is not fitted: run it on a train set or pass ckpt_path")
        return self.inputs(features) @ self.weight.double().T + self.bias.double()

    def fit(self, features: np.ndarray, labels: np.ndarray, c: float) -> LogisticRegression:
        with warnings.catch_warnings():
            # The extreme ends of the C grid often stop at max_iter; the reference accepts that too.
            warnings.simplefilter("ignore", ConvergenceWarning)
            return LogisticRegression(solver="lbfgs", max_iter=self.max_iter, C=c).fit(features, labels)

    def set_classifier(self, classifier: LogisticRegression) -> None:
        """Copy sklearn's decision function into logits over all classes (classes absent from train: -inf)."""
        weight = torch.zeros_like(self.weight)
        bias = torch.full_like(self.bias, float("-inf"))
        coef = torch.as_tensor(classifier.coef_, dtype=torch.float64)
        intercept = torch.as_tensor(classifier.intercept_, dtype=torch.float64)
        present = torch.as_tensor(classifier.classes_, dtype=torch.long)
        if len(present) == 2:
            # Binary sklearn models hold one row, the logit of classes_[1] against classes_[0].
            coef = torch.cat([torch.zeros_like(coef), coef])
            intercept = torch.cat([torch.zeros_like(intercept), intercept])
        weight[present], bias[present] = coef, intercept
        self.weight.copy_(weight)
        self.bias.copy_(bias)

    def prepare(self, provider: FeatureProvider) -> None:
        train = provider.features("train")
        x_train, y_train = self.inputs(train.features).numpy(), train.labels.numpy()
        if len(np.unique(y_train)) < 2:
            raise PromptbenchError(f"method '{self.name}' needs train images of at least two classes")
        if not self.selecting:
            self.set_classifier(self.fit(x_train, y_train, self.default_c))
            self.c.fill_(self.default_c)
            self.notes = {"C": self.default_c}
            return
        selection = provider.features(SELECTION_SET)
        x_selection, y_selection = self.inputs(selection.features).numpy(), selection.labels.numpy()
        # The bisection revisits values: fit each C once.
        fitted: dict[float, LogisticRegression] = {}

        def selection_accuracy(c: float) -> float:
            if c not in fitted:
                fitted[c] = self.fit(x_train, y_train, c)
            return float((fitted[c].predict(x_selection) == y_selection).mean())

        best = search_c(selection_accuracy, self.c_grid, self.search_rounds)
        self.set_classifier(fitted[best])
        self.c.fill_(best)
        self.notes = {"C": best, "selection_top1": 100.0 * selection_accuracy(best), "fits": len(fitted)}
        log.debug("linear probe: C=%.4g (selection top-1 %.2f, %d fits)", best, self.notes["selection_top1"],
                  len(fitted))

    def run_notes(self) -> dict[str, Any]:
        return dict(self.notes)
