"""The unit of data everywhere: an image path with its label and class name; and images without labels."""

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


# The label column of an image whose label is not known (the image pipeline carries one for every image). No
# class has it, so any use as a target fails: cross-entropy refuses it, and no class name belongs to it.
NO_LABEL = -1


@dataclass(frozen=True)
class UnlabeledItem:
    """An image whose label is withheld: there is no label to read, not even by mistake."""

    path: str


@dataclass
class UnlabeledSet:
    """Images of a known class set whose labels are withheld (the unsupervised protocol's train pool).

    Built from a labelled split by keeping the paths only, so whatever uses the set cannot read a label.
    """

    items: list[UnlabeledItem]
    classnames: list[str]
    templates: list[str]

    @classmethod
    def withholding_labels(cls, labeled: LabeledSet) -> "UnlabeledSet":
        return cls([UnlabeledItem(item.path) for item in labeled.items], list(labeled.classnames),
                   list(labeled.templates))

    def __len__(self) -> int:
        return len(self.items)

    def image_items(self) -> list[Item]:
        """The images as items of the image pipeline (feature extraction), each labelled NO_LABEL."""
        return [Item(item.path, NO_LABEL, "") for item in self.items]


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
