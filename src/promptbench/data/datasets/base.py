"""Dataset base class: one subclass per dataset reads its on-disk layout into train/val/test item lists.

Subclasses set `name` (this registers them) and `templates`, and implement `read_splits`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import ClassVar, Sequence

from promptbench.data.fewshot import ALL_SHOTS, sample_fewshot, val_shots
from promptbench.data.items import Item, LabeledSet, class_counts
from promptbench.errors import PromptbenchError

log = logging.getLogger(__name__)

DATASETS: dict[str, type["Dataset"]] = {}
SPLITS = ("train", "val", "test")


def prompt_key(classname: str) -> str:
    """A class name as CLIP reads it in a prompt: methods write "_" as a space, and its tokenizer lower-cases
    and collapses whitespace. Names with one key get one text classifier."""
    return " ".join(classname.replace("_", " ").split()).lower()


class Dataset:
    name: ClassVar[str]
    templates: ClassVar[tuple[str, ...]] = ("a photo of a {}.",)
    # Shown when the folder is missing: where to get the data and how to lay it out.
    how_to_get: ClassVar[str] = ""
    # Evaluation-only datasets (the ImageNet variants) have an empty train split.
    test_only: ClassVar[bool] = False
    # Prompt keys that the published class names themselves share (ImageNet's): noted instead of refused,
    # so results stay comparable with published numbers.
    published_shared_prompts: ClassVar[frozenset[str]] = frozenset()

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
        self.reading_notes: list[str] = []
        self.fewshot_notes: list[str] = []
        if self.root.exists() and not self.root.is_dir():
            raise PromptbenchError(
                f"dataset '{self.display_name}': {self.root} is a file, not a folder. Set dataset.root=<the dataset "
                f"folder> (or data_root=<dir> / the PROMPTBENCH_DATA environment variable).{self.how_to_get_text()}"
            )
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

    @property
    def data_notes(self) -> list[str]:
        """What reading the dataset and its last few-shot draw left out or could not fill, one sentence each and
        also logged: class folders without images, classes with fewer images than the shots, class names that
        share one prompt as published. For results.json."""
        return [*self.reading_notes, *self.fewshot_notes]

    def note_reading(self, note: str, level: int = logging.WARNING) -> None:
        log.log(level, note)
        self.reading_notes.append(note)

    def prepare_root(self) -> None:
        """Hook: create the data on first use (generated datasets). Real datasets leave it alone."""

    def read_splits(self) -> dict[str, list[Item]]:
        raise NotImplementedError

    def fewshot_splits(self, shots: int, seed: int | None) -> tuple[list[Item], list[Item]]:
        """K shots per class of train and min(K, 4) of val (`draw_fewshot_splits`). A class with fewer images
        keeps all of them, as in the reference; which classes that hits is logged and kept in `data_notes`."""
        train, val = self.draw_fewshot_splits(shots, seed)
        self.fewshot_notes = [
            note for note in (self.short_classes_note("train", train, shots),
                              self.short_classes_note("val", val, val_shots(shots))) if note
        ]
        for note in self.fewshot_notes:
            log.warning(note)
        return train, val

    def draw_fewshot_splits(self, shots: int, seed: int | None) -> tuple[list[Item], list[Item]]:
        """The few-shot train and val items, drawn from the global `random` stream (which the runner seeded).
        Datasets with a split cache override this to reuse the split of (K, seed)."""
        return sample_fewshot(self["train"].items, shots), sample_fewshot(self["val"].items, val_shots(shots))

    def short_classes_note(self, split: str, items: list[Item], shots: int) -> str | None:
        if shots == ALL_SHOTS:
            return None
        counts = class_counts(LabeledSet(items, self.classnames))
        short = {name: count for name, count in counts.items() if count < shots}
        if not short:
            return None
        listed = ", ".join(f"'{name}': {count}" for name, count in short.items())
        return (f"dataset '{self.display_name}': {len(short)} of {len(counts)} classes have fewer than {shots} {split} "
                f"images and keep all they have (the reference's rule): {listed}")

    def read_classnames(self, splits: dict[str, list[Item]]) -> list[str]:
        names: dict[int, str] = {}
        for items in splits.values():
            for item in items:
                names.setdefault(item.label, item.classname)
        if sorted(names) != list(range(len(names))):
            raise PromptbenchError(f"dataset '{self.display_name}': labels are not 0..n-1 ({sorted(names)[:10]} ...)")
        classnames = [names[label] for label in range(len(names))]
        self.check_distinct_prompts(classnames, splits)
        return classnames

    def check_distinct_prompts(self, classnames: list[str], splits: dict[str, list[Item]]) -> None:
        """Refuse class names that give one prompt: identical text classifiers would bias accuracy silently."""
        labels_by_key: dict[str, list[int]] = {}
        for label, name in enumerate(classnames):
            labels_by_key.setdefault(prompt_key(name), []).append(label)
        shared = {key: labels for key, labels in labels_by_key.items() if len(labels) > 1}
        if not shared:
            return
        example_of: dict[int, str] = {}
        for items in splits.values():
            for item in items:
                example_of.setdefault(item.label, item.path)

        def describe(groups: dict[str, list[int]]) -> str:
            return "; ".join(
                " and ".join(f"'{classnames[label]}' (label {label}, e.g. {example_of[label]})" for label in labels)
                + f" all read '{key}'"
                for key, labels in groups.items()
            )

        unpublished = {key: labels for key, labels in shared.items() if key not in self.published_shared_prompts}
        if unpublished:
            raise PromptbenchError(
                f"dataset '{self.display_name}' under {self.root}: class names {describe(unpublished)} once "
                f"lower-cased, with '_' read as a space and whitespace collapsed, as the prompts are built: their text "
                f"classifiers would be identical and the accuracy silently biased. Rename the class folders (or the "
                f"class names in the split or class-name file) so that no two read alike."
            )
        self.note_reading(
            f"dataset '{self.display_name}': class names {describe(shared)}, as in the published class names (kept "
            f"for comparability with published numbers)",
            level=logging.INFO,
        )

    def __getitem__(self, split: str) -> LabeledSet:
        if split not in self.splits:
            raise PromptbenchError(f"dataset '{self.display_name}' has no split '{split}' (has {list(self.splits)})")
        return self.splits[split]
