"""The seam between methods and data: what a method consumes, and the object that supplies it.

A method declares a `DataContract`; the data module (data/datamodule.py) reads only that contract and
supplies exactly what it names. Both sides import this module and never each other.

- `inputs`: what every loader yields to the method's `forward`: "images" (transformed images; the method
  runs the image tower itself, e.g. CoOp with online augmentation) or "features" (frozen raw image features
  of the test transform, extracted once and cached).
- `train_views`: for a "features" method that trains, the augmented views of the train set it trains on
  (`Views`, below): epoch e reads view e mod n, so training never runs the image tower.
- `reads`: the sets the method reads itself through the `FeatureProvider` in `prepare` (e.g. "train" for
  a cache, "val" for a hyper-parameter search): their features, augmented views, or test-transform images for a
  method that runs the towers itself (CALIP's spatial features); the provider refuses any other set.
- `batch_size`: the training batch size of the method's recipe.
- `view_sampling`: how a training epoch reads the `train_views`: "view_per_epoch" (every item once, shuffled,
  in view e mod n) or "pool" (CLAP's cached-feature loop: max(1, N // batch_size) batches from a fresh
  shuffle of all n * N views, so an epoch is as long as one pass over the N images would be).

An adversarial evaluation (robustness.py, `eval.attack`) is the one reader of eval sets outside the contract: it
reads every eval set as [0, 1] pixels, whatever `inputs` says, and attacks the method through the frozen image tower
(a "features" method) or through the method itself (an "images" method).

`Views` is the one option for augmented views in every method config: `views: {n: N, scale: [low, high]}`,
N views of RandomResizedCrop(scale) + horizontal flip at the backbone's resolution, each encoded once and
cached (view i is the same in every run with the same seed, so asking for more views later only encodes
the new ones).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator, Literal, Mapping, Protocol, Sequence

import torch

from promptbench.errors import PromptbenchError

InputKind = Literal["images", "features"]
INPUT_KINDS = ("images", "features")
ViewSampling = Literal["view_per_epoch", "pool"]
VIEW_SAMPLINGS = ("view_per_epoch", "pool")


@dataclass(frozen=True)
class Views:
    """`n` augmented views of a set: RandomResizedCrop(scale) + horizontal flip, each cached on its own."""

    n: int
    scale: tuple[float, float]

    def __post_init__(self):
        try:
            count = int(self.n)
            low, high = (float(x) for x in self.scale)
        except (TypeError, ValueError):
            raise PromptbenchError(f"views: need {{n: <int>, scale: [low, high]}}, got n={self.n!r}, "
                                   f"scale={self.scale!r}") from None
        if count < 1:
            raise PromptbenchError(f"views.n must be >= 1, got {self.n}")
        if not 0 < low <= high <= 1:
            raise PromptbenchError(f"views.scale must be [low, high] with 0 < low <= high <= 1, got {list(self.scale)}")
        object.__setattr__(self, "n", count)
        object.__setattr__(self, "scale", (low, high))

    @classmethod
    def from_config(cls, views: "Mapping[str, Any] | Views") -> "Views":
        """A method option `views: {n: N, scale: [low, high]}` (or a Views already)."""
        if isinstance(views, Views):
            return views
        try:
            return cls(views["n"], tuple(views["scale"]))
        except (KeyError, TypeError):
            raise PromptbenchError(f"views: need {{n: <int>, scale: [low, high]}}, got {views!r}") from None


@dataclass(frozen=True)
class DataContract:
    """What a method consumes; see the module docstring."""

    inputs: InputKind
    batch_size: int = 32
    train_views: Views | None = None
    reads: tuple[str, ...] = ()
    view_sampling: ViewSampling = "view_per_epoch"

    def __post_init__(self):
        if self.inputs not in INPUT_KINDS:
            raise PromptbenchError(f"data contract: inputs must be one of {INPUT_KINDS}, got {self.inputs!r}")
        if self.view_sampling not in VIEW_SAMPLINGS:
            raise PromptbenchError(f"data contract: view_sampling must be one of {VIEW_SAMPLINGS}, "
                                   f"got {self.view_sampling!r}")
        if self.train_views is not None and self.inputs != "features":
            raise PromptbenchError("data contract: train_views are cached features; they need inputs='features'")
        if int(self.batch_size) < 1:
            raise PromptbenchError(f"batch_size must be >= 1, got {self.batch_size}")
        object.__setattr__(self, "batch_size", int(self.batch_size))
        object.__setattr__(self, "reads", tuple(self.reads))


@dataclass
class FeatureSet:
    """Features [N, D] (float32, not normalised) of the items that could be read, with labels and item indices."""

    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"features": self.features, "labels": self.labels, "index": self.index}


@dataclass
class FeatureViews:
    """Features [V, N, D] of V augmented views of the same items (same labels and indices in every view)."""

    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    @classmethod
    def stack(cls, views: Sequence[FeatureSet]) -> "FeatureViews":
        first = views[0]
        if any(not torch.equal(view.index, first.index) for view in views[1:]):
            raise PromptbenchError("augmented views of one set disagree on which images could be read (images changed "
                                   "between extractions?); remove them with `promptbench cache rm --all` and rerun")
        return cls(torch.stack([view.features for view in views]), first.labels, first.index)

    @property
    def count(self) -> int:
        return self.features.shape[0]

    def mean(self) -> FeatureSet:
        """Raw features averaged over the views (Tip-Adapter's cache averages before normalising)."""
        return FeatureSet(self.features.mean(dim=0), self.labels, self.index)


class FeatureProvider(Protocol):
    """What `Method.prepare` receives: frozen features of the sets its contract `reads`, which of its classes
    have no training image, and the run's device; nothing else."""

    def features(self, split: str) -> FeatureSet:
        """Test-transform features of a set."""

    def views(self, split: str, views: Views) -> FeatureViews:
        """Features of `views.n` augmented views of a set."""

    def images(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Batches (images, labels, item indices) of a set's test-transform images on the run's device, with the
        backbone moved there, for a method that encodes them itself; unreadable images skipped as in evaluation."""

    def label_only_classes(self) -> list[int]:
        """Labels of the method's classes that have a name but no training image (protocol
        generalized_zero_shot's new classes; empty elsewhere): what a method that synthesizes data for them
        (SHIP) needs to know."""

    def device(self) -> torch.device:
        """The device the run computes on (the trainer's), for a method that trains something in `prepare`."""
