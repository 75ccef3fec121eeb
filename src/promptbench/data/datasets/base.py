"""Dataset base class: one subclass per dataset reads its on-disk layout into train/val/test item lists.

Subclasses set `name` (this registers them) and `templates`, and implement `read_splits`.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar, Sequence

from promptbench.data.fewshot import sample_fewshot, val_shots
from promptbench.data.items import Item, LabeledSet
from promptbench.errors import PromptbenchError

DATASETS: dict[str, type["Dataset"]] = {}
SPLITS = ("train", "val", "test")


class Dataset:
    name: ClassVar[str]
    templates: ClassVar[tuple[str, ...]] = ("a photo of a {}.",)
    # Shown when the folder is missing: where to get the data and how to lay it out.
    how_to_get: ClassVar[str] = ""
    # Evaluation-only datasets (the ImageNet variants) have an empty train split.
    test_only: ClassVar[bool] = False

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if "name" in cls.__dict__:
            DATASETS[cls.name] = cls

    def __init__(
        self,
        root: str | Path,
        name: str | None = None,
        templates: Sequence[str] | None = None,
        skip_bad_images: bool = False,
    ):
        self.root = Path(root).expanduser()
        self.display_name = name or self.name
        self.skip_bad_images = bool(skip_bad_images)
        self.templates = list(templates) if templates else list(type(self).templates)
        self.prepare_root()
        if not self.root.is_dir():
            raise PromptbenchError(
                f"dataset '{self.display_name}': folder {self.root} does not exist. Set dataset.root=<folder> "
                f"(or data_root=<dir> / the PROMPTBENCH_DATA environment variable).{self.how_to_get_text()}"
            )
        splits = self.read_splits()
        self.classnames = self.read_classnames(splits)
        self.splits = {split: LabeledSet(items, self.classnames, self.templates) for split, items in splits.items()}
        if not self.splits["test"].items or (not self.test_only and not self.splits["train"].items):
            raise PromptbenchError(
                f"dataset '{self.display_name}' under {self.root}: found {len(self.splits['train'])} train and "
                f"{len(self.splits['test'])} test images; both must be non-empty.{self.how_to_get_text()}"
            )

    @classmethod
    def from_data_root(cls, data_root: str | Path, **kwargs) -> "Dataset":
        """The dataset in its default place under `data_root`, for protocols that open datasets by name."""
        raise PromptbenchError(
            f"dataset '{cls.name}' has no default folder under data_root; it cannot be a protocol target by name"
        )

    def how_to_get_text(self) -> str:
        return f"\n  {self.how_to_get}" if self.how_to_get else ""

    def prepare_root(self) -> None:
        """Hook: create the data on first use (generated datasets). Real datasets leave it alone."""

    def read_splits(self) -> dict[str, list[Item]]:
        raise NotImplementedError

    def fewshot_splits(self, shots: int, seed: int | None) -> tuple[list[Item], list[Item]]:
        """K shots per class of train and min(K, 4) of val, drawn from the global `random` stream (which the
        runner seeded). Datasets with a split cache override this to reuse the split of (K, seed)."""
        return sample_fewshot(self["train"].items, shots), sample_fewshot(self["val"].items, val_shots(shots))

    def read_classnames(self, splits: dict[str, list[Item]]) -> list[str]:
        names: dict[int, str] = {}
        for items in splits.values():
            for item in items:
                names.setdefault(item.label, item.classname)
        if sorted(names) != list(range(len(names))):
            raise PromptbenchError(f"dataset '{self.display_name}': labels are not 0..n-1 ({sorted(names)[:10]} ...)")
        return [names[label] for label in range(len(names))]

    def __getitem__(self, split: str) -> LabeledSet:
        if split not in self.splits:
            raise PromptbenchError(f"dataset '{self.display_name}' has no split '{split}' (has {list(self.splits)})")
        return self.splits[split]
