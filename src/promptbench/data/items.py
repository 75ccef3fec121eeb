"""The unit of data everywhere: an image path with its label and class name."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Item:
    path: str
    label: int
    classname: str


@dataclass
class LabeledSet:
    """A list of items over a class set; `classnames[label]` names each label."""

    items: list[Item]
    classnames: list[str]
    templates: list[str] = field(default_factory=lambda: ["a photo of a {}."])

    def __len__(self) -> int:
        return len(self.items)


def class_counts(labeled: LabeledSet) -> dict[str, int]:
    """Images per class of a set, every class in label order (0 for a class the set has no image of).

    A class name that several labels share (ImageNet's published names have two such pairs) is keyed
    `<name> [label <label>]`, so no count is merged into another.
    """
    per_label = Counter(item.label for item in labeled.items)
    shared = {name for name, uses in Counter(labeled.classnames).items() if uses > 1}
    return {
        (f"{name} [label {label}]" if name in shared else name): per_label[label]
        for label, name in enumerate(labeled.classnames)
    }
