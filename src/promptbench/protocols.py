"""Protocols say what a run trains on and what it evaluates on; the runner only follows the Task they build.

- `fewshot`: K shots of a dataset, evaluated on its test split.
- `base2new`: K shots of the base half of the classes; test on the base and the new half, plus their
  harmonic mean (protocol.md section 2).
- `generalized_zero_shot`: base-to-new's halves in one label space: the method is built with every class name,
  trains on K shots of the base half only (the new half is label-only: names, no image), and is tested on all
  test images over all classes, reported as `all`, its `base` and `new` images, and their harmonic mean.
- `cross_dataset`: K shots of a source dataset (ImageNet by default), evaluated on the source and on every
  target dataset, each with its own classes.
- `domain_generalization`: K shots of ImageNet, evaluated on ImageNet and its variants in ImageNet's
  1000-class space (so methods tied to the 1000 classes work), scored over each variant's own classes.
- `unsupervised`: no label of the dataset's train split is read: its images are an unlabelled pool, which a
  `TrainLabeller` (UPL's zero-shot pseudo-labels, pseudo_labels.py) labels once the backbone is built;
  evaluated on the test split.

A protocol builds its Task from the dataset alone. A task whose train set needs the model to be labelled
declares a `labeller`; the runner calls `Task.label_train` with the backbone and the run's feature
extraction (`FrozenFeatures`, through the feature cache) before it builds the data module.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Sequence

import torch

from promptbench.backbones import Backbone
from promptbench.data.datasets import Dataset, ImageNet, ImageNetFamily, imagenet_labels, open_dataset
from promptbench.data.features import FrozenFeatures
from promptbench.data.items import Item, LabeledSet, UnlabeledSet
from promptbench.errors import PromptbenchError
from promptbench.selection import SELECTION_SET, check_policy

# Metrics of which a harmonic mean is meaningful (not ECE, not counts).
ACCURACY_METRICS = ("top1", "mean_per_class", "top5", "robust_top1")
IMAGENET_VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")


class TrainLabeller:
    """Labels a task's unlabelled train pool with the run's model (the unsupervised protocol's pseudo-labels)."""

    def label(self, pool: UnlabeledSet, backbone: Backbone, images: FrozenFeatures) -> tuple[LabeledSet, dict[str, Any]]:
        """The labelled train set made from `pool`, and what results.json records about how (`pseudo_labels`)."""
        raise NotImplementedError


@dataclass
class Task:
    source: str
    # An UnlabeledSet while a `labeller` has yet to label it (`label_train`): its labels cannot be read.
    train: LabeledSet | UnlabeledSet
    val: LabeledSet
    evals: dict[str, LabeledSet]
    # eval set -> the labels (logit columns) it is scored over; absent: all of its classes.
    scored_labels: dict[str, list[int]] = field(default_factory=dict)
    # derived result name -> the two eval sets it is the harmonic mean of (base-to-new's "harmonic_mean").
    harmonic_means: dict[str, tuple[str, str]] = field(default_factory=dict)
    # The dataset's whole val split in the training classes (selection=full_val).
    full_val: LabeledSet | None = None
    # The eval set of the training classes' test images (selection=test_parity): "test", base-to-new's "base".
    train_class_test: str = "test"
    # The images the method may select on under the run's policy (`select_with`); None: no selection data.
    selection: LabeledSet | None = None
    # Why the task has no labelled images to select on (then only selection=none is accepted); None: it has.
    no_selection_data: str | None = None
    # Labels `train` once the backbone is built (`label_train`); None: `train` is labelled already.
    labeller: TrainLabeller | None = None
    # What the labeller did, for results.json (`pseudo_labels`); None until then.
    labelling: dict[str, Any] | None = None
    # derived eval set -> (eval set, labels): that set's images of these classes, still scored over all of its
    # classes (generalized zero-shot's "base" and "new" inside "all": one pass over the test images).
    class_subsets: dict[str, tuple[str, list[int]]] = field(default_factory=dict)
    # Labels of the training class set with a name but no training image (generalized zero-shot's new classes).
    # Methods learn them through `FeatureProvider.label_only_classes()`; the other protocols have none.
    label_only_classes: list[int] = field(default_factory=list)

    def label_train(self, backbone: Backbone, images: FrozenFeatures) -> None:
        """Run the task's labeller on its unlabelled train pool: its labelled set becomes `train`."""
        if self.labeller is None or not isinstance(self.train, UnlabeledSet):
            return
        self.train, self.labelling = self.labeller.label(self.train, backbone, images)

    def splits(self) -> dict[str, LabeledSet]:
        """The dataset's sets the run uses, each once."""
        return {"train": self.train, "val": self.val, **self.evals}

    def sets(self) -> dict[str, LabeledSet]:
        """The splits plus the selection set, another name for one of them or for the full val split."""
        selection = {} if self.selection is None else {SELECTION_SET: self.selection}
        return {**self.splits(), **selection}

    def selection_images_evaluated(self) -> int:
        """How many selection images are also in an eval set (ImageNet's val is its test set)."""
        if self.selection is None:
            return 0
        evaluated = {item.path for eval_set in self.evals.values() for item in eval_set.items}
        return sum(item.path in evaluated for item in self.selection.items)

    def select_with(self, policy: str) -> None:
        """Supply the selection set of a policy (selection.py) under the name SELECTION_SET."""
        policy = check_policy(policy)
        if policy != "none" and self.no_selection_data:
            raise PromptbenchError(f"selection={policy}: {self.no_selection_data}, so there is nothing to select on. "
                                   f"Use selection=none (every method keeps its fixed published defaults)")
        if policy == "none":
            self.selection = None
        elif policy == "fewshot_val":
            self.selection = self.val
        elif policy == "test_parity":
            self.selection = self.eval_images(self.train_class_test)
        else:
            test_paths = {item.path for item in self.eval_images(self.train_class_test).items}
            if self.full_val is None or not self.full_val.items:
                raise PromptbenchError(f"selection=full_val: {self.source} has no val split to select on; use "
                                       f"selection=fewshot_val or selection=none")
            if any(item.path in test_paths for item in self.full_val.items):
                raise PromptbenchError(
                    f"selection=full_val: {self.source}'s val split holds its test images (ImageNet's convention, "
                    f"protocol.md section 1), so selecting on it is selecting on the test set. Use "
                    f"selection=test_parity to reproduce a paper that does so (marked as such), or "
                    f"selection=fewshot_val / selection=none")
            self.selection = self.full_val

    def eval_images(self, name: str) -> LabeledSet:
        """The images of an eval set or of a class subset of one (`class_subsets`)."""
        if name in self.class_subsets:
            source, labels = self.class_subsets[name]
            return only_classes(self.evals[source], labels)
        return self.evals[name]

    def class_subset(self, name: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The rows of a class subset's images among the outputs of its eval set (all of the set's logit columns)."""
        keep = torch.isin(labels.long(), torch.tensor(self.class_subsets[name][1], dtype=torch.long))
        return logits[keep], labels[keep]

    def scored_outputs(self, name: str, logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Restrict an eval set's logits to the classes it is scored over, labels renumbered to match."""
        subset = self.scored_labels.get(name)
        if subset is None:
            return logits, labels
        columns = torch.tensor(subset, dtype=torch.long)
        position = torch.full((logits.shape[1],), -1, dtype=torch.long)
        position[columns] = torch.arange(len(subset))
        return logits[:, columns], position[labels.long()]

    def derived_metrics(self, metrics: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        derived = {}
        for name, (first, second) in self.harmonic_means.items():
            shared = [key for key in ACCURACY_METRICS if key in metrics[first] and key in metrics[second]]
            derived[name] = {key: harmonic_mean(metrics[first][key], metrics[second][key]) for key in shared}
        return derived


def harmonic_mean(a: float, b: float) -> float:
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def only_classes(labeled: LabeledSet, selected: Sequence[int]) -> LabeledSet:
    """The items of the `selected` labels, labels and class names unchanged (one label space for every set)."""
    kept = set(selected)
    return LabeledSet([item for item in labeled.items if item.label in kept], labeled.classnames, labeled.templates)


def class_halves(train: LabeledSet, dataset: Dataset, protocol: str) -> tuple[list[int], list[int]]:
    """The reference's base and new labels: after few-shot sampling, base = the first ceil(n/2) sorted train labels."""
    labels = sorted({item.label for item in train.items})
    half = math.ceil(len(labels) / 2)
    base, new = labels[:half], labels[half:]
    if not new:
        raise PromptbenchError(f"{protocol}: dataset '{dataset.display_name}' has {len(labels)} class(es); need 2+")
    return base, new


def keep_classes(labeled: LabeledSet, selected: Sequence[int]) -> LabeledSet:
    """The items of the `selected` labels, relabelled 0.. in the order of `selected`."""
    relabel = {old: new for new, old in enumerate(selected)}
    items = [Item(item.path, relabel[item.label], item.classname) for item in labeled.items if item.label in relabel]
    return LabeledSet(items, [labeled.classnames[old] for old in selected], labeled.templates)


class Protocol:
    name: ClassVar[str]

    def __init__(self, name: str | None = None, seed: int | None = None):
        if name not in (None, self.name):
            raise ValueError(f"protocol name '{name}' does not match {type(self).__name__} ('{self.name}')")
        # Names the few-shot split cache entry (shot_K-seed_S); None: sample without caching.
        self.seed = seed

    def build(self, dataset: Dataset, shots: int) -> Task:
        """Called right after the run seed is set, like the reference, so sampling matches it."""
        raise NotImplementedError

    def refuse_test_only(self, dataset: Dataset) -> None:
        if dataset.test_only:
            raise PromptbenchError(
                f"dataset '{dataset.display_name}' is test-only: train on another dataset and evaluate on it with "
                f"protocol=cross_dataset 'protocol.targets=[{dataset.name}]' (or protocol=domain_generalization)"
            )

    def fewshot(self, dataset: Dataset, shots: int) -> tuple[LabeledSet, LabeledSet]:
        self.refuse_test_only(dataset)
        train, val = dataset.fewshot_splits(shots, self.seed)
        return (
            LabeledSet(train, dataset["train"].classnames, dataset["train"].templates),
            LabeledSet(val, dataset["val"].classnames, dataset["val"].templates),
        )


class FewShot(Protocol):
    """Train on K shots per class of a dataset (val: min(K, 4) shots), test on its test split."""

    name = "fewshot"

    def build(self, dataset: Dataset, shots: int) -> Task:
        train, val = self.fewshot(dataset, shots)
        return Task(source=dataset.display_name, train=train, val=val, evals={"test": dataset["test"]},
                    full_val=dataset["val"])


class BaseToNew(Protocol):
    """The reference's class halves: after few-shot sampling, base = first ceil(n/2) sorted train labels."""

    name = "base2new"

    def build(self, dataset: Dataset, shots: int) -> Task:
        train, val = self.fewshot(dataset, shots)
        base, new = class_halves(train, dataset, self.name)
        test = dataset["test"]
        return Task(
            source=dataset.display_name,
            train=keep_classes(train, base),
            val=keep_classes(val, base),
            evals={"base": keep_classes(test, base), "new": keep_classes(test, new)},
            harmonic_means={"harmonic_mean": ("base", "new")},
            full_val=keep_classes(dataset["val"], base),
            train_class_test="base",
        )


class GeneralizedZeroShot(Protocol):
    """Base-to-new's halves (the same few-shot draw, the same base and new labels) in one label space.

    The method is built with every class name and trains on the base classes' K shots only: the new classes
    are label-only (`Task.label_only_classes`), no train, val or selection image of theirs reaches it. It is
    tested on every test image over all classes ("all"), reported too for the base and the new classes' images
    ("base", "new": accuracy over all classes, not within their half) and their harmonic mean. Methods tied to
    their training classes work, since the class set never changes.
    """

    name = "generalized_zero_shot"

    def build(self, dataset: Dataset, shots: int) -> Task:
        train, val = self.fewshot(dataset, shots)
        base, new = class_halves(train, dataset, self.name)
        return Task(
            source=dataset.display_name,
            train=only_classes(train, base),
            val=only_classes(val, base),
            evals={"all": dataset["test"]},
            class_subsets={"base": ("all", base), "new": ("all", new)},
            harmonic_means={"harmonic_mean": ("base", "new")},
            full_val=only_classes(dataset["val"], base),
            train_class_test="base",
            label_only_classes=new,
        )


class CrossDataset(Protocol):
    """Train on the run's dataset; evaluate on its test split and on each target's test split (own classes)."""

    name = "cross_dataset"

    def __init__(self, targets: Sequence[str] = (), data_root: str | Path | None = None, **kwargs):
        super().__init__(**kwargs)
        self.targets = list(targets)
        if not self.targets:
            raise PromptbenchError(f"protocol {self.name}: set protocol.targets=[<dataset>, ...]")
        if data_root is None:
            raise PromptbenchError(f"protocol {self.name}: set protocol.data_root (default ${{data_root}})")
        self.data_root = Path(data_root)

    def build(self, dataset: Dataset, shots: int) -> Task:
        # Sample first, so the source's few-shot set is the one the reference draws right after seeding.
        train, val = self.fewshot(dataset, shots)
        evals = {dataset.display_name: dataset["test"]}
        task = Task(source=dataset.display_name, train=train, val=val, evals=evals, full_val=dataset["val"],
                    train_class_test=dataset.display_name)
        for target in self.targets:
            if target in evals:
                raise PromptbenchError(f"protocol {self.name}: target '{target}' is listed twice or is the source")
            self.add_target(task, dataset, open_dataset(target, self.data_root))
        return task

    def add_target(self, task: Task, source: Dataset, target: Dataset) -> None:
        task.evals[target.display_name] = target["test"]


class DomainGeneralization(CrossDataset):
    """ImageNet -> V2/Sketch/A/R, each relabelled into ImageNet's classes via wnids.

    Every eval set then has ImageNet's 1000 class names, so any method can score it (class-specific
    parameters included); ImageNet-A/R are scored over their 200 classes only (`Task.scored_labels`),
    which is the published 200-way protocol: for methods that encode each class name independently the
    numbers equal those of a 200-class evaluation.
    """

    name = "domain_generalization"

    def __init__(self, targets: Sequence[str] = IMAGENET_VARIANTS, **kwargs):
        super().__init__(targets=targets, **kwargs)

    def build(self, dataset: Dataset, shots: int) -> Task:
        if not isinstance(dataset, ImageNet):
            raise PromptbenchError(
                f"protocol {self.name} trains on ImageNet (dataset=imagenet), not on '{dataset.display_name}'"
            )
        return super().build(dataset, shots)

    def add_target(self, task: Task, source: Dataset, target: Dataset) -> None:
        if not isinstance(target, ImageNetFamily):
            raise PromptbenchError(f"protocol {self.name}: target '{target.name}' is not an ImageNet variant")
        to_imagenet = imagenet_labels(target, source)
        classnames = source["test"].classnames
        items = [
            Item(item.path, to_imagenet[item.label], classnames[to_imagenet[item.label]])
            for item in target["test"].items
        ]
        task.evals[target.name] = LabeledSet(items, classnames, source["test"].templates)
        covered = sorted(set(to_imagenet))
        if len(covered) < len(classnames):
            task.scored_labels[target.name] = covered


class Unsupervised(Protocol):
    """No label of the dataset's train split is read: its images are an unlabelled pool that the `labeller`
    labels with the run's model (UPL: zero-shot CLIP's top-K most confident images per class), then any
    method trains on that set as on K shots; evaluated on the test split. There is no labelled val split,
    so nothing can be selected (only selection=none)."""

    name = "unsupervised"

    def __init__(self, labeller: TrainLabeller | None = None, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(labeller, TrainLabeller):
            raise PromptbenchError(f"protocol {self.name}: protocol.labeller must build a train labeller (e.g. "
                                   f"_target_: promptbench.pseudo_labels.ZeroShotTopK), got {labeller!r}")
        self.labeller = labeller

    def build(self, dataset: Dataset, shots: int) -> Task:
        self.refuse_test_only(dataset)
        train, test = dataset["train"], dataset["test"]
        return Task(
            source=dataset.display_name,
            train=UnlabeledSet.withholding_labels(train),
            val=LabeledSet([], train.classnames, train.templates),
            evals={"test": test},
            no_selection_data=(f"protocol {self.name} reads no label of {dataset.display_name}'s train split and has "
                               f"no labelled val split"),
            labeller=self.labeller,
        )
