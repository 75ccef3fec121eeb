"""The unit of data everywhere: an image path with its label and class name."""

from __future__ import annotations

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
