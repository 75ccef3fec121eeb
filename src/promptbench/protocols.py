"""Protocols say what a run trains on and what it evaluates on; the runner only follows the Task they build."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from promptbench.data.datasets import Dataset
from promptbench.data.fewshot import sample_fewshot, val_shots
from promptbench.data.items import LabeledSet


@dataclass
class Task:
    source: str
    train: LabeledSet
    val: LabeledSet
    evals: dict[str, LabeledSet]
    extra: dict = field(default_factory=dict)

    def sets(self) -> dict[str, LabeledSet]:
        return {"train": self.train, "val": self.val, **self.evals}


class Protocol:
    name: ClassVar[str]

    def __init__(self, name: str | None = None):
        if name not in (None, self.name):
            raise ValueError(f"protocol name '{name}' does not match {type(self).__name__} ('{self.name}')")

    def build(self, dataset: Dataset, shots: int) -> Task:
        """Called right after the run seed is set, like the reference, so sampling matches it."""
        raise NotImplementedError


class FewShot(Protocol):
    """Train on K shots per class of a dataset (val: min(K, 4) shots), test on its test split."""

    name = "fewshot"

    def build(self, dataset: Dataset, shots: int) -> Task:
        train, val = dataset["train"], dataset["val"]
        return Task(
            source=dataset.display_name,
            train=LabeledSet(sample_fewshot(train.items, shots), train.classnames, train.templates),
            val=LabeledSet(sample_fewshot(val.items, val_shots(shots)), val.classnames, val.templates),
            evals={"test": dataset["test"]},
        )
