"""A generic class-per-folder dataset: `root/{train,val,test}/<class>/*` or one `root/<class>/*` folder."""

from __future__ import annotations

import random
from pathlib import Path

from promptbench.data.datasets.base import Dataset
from promptbench.data.items import Item
from promptbench.errors import PromptbenchError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
# Fixed so a single-folder dataset splits the same way for every run seed.
SPLIT_SEED = 0


def list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def class_folders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def split_per_class(paths: list[Path], fractions: tuple[float, float], rng: random.Random) -> tuple[list, list, list]:
    """Shuffle one class and cut it into train/val/test by rounded fractions (the reference's rule)."""
    paths = list(paths)
    rng.shuffle(paths)
    n_train = round(len(paths) * fractions[0])
    n_val = round(len(paths) * fractions[1])
    return paths[:n_train], paths[n_train : n_train + n_val], paths[n_train + n_val :]


class FolderDataset(Dataset):
    name = "folder"
    how_to_get = (
        "Lay out images as <root>/train/<class>/*.jpg, <root>/val/<class>/... (optional), <root>/test/<class>/..., "
        "or as <root>/<class>/*.jpg to have them split 50/20/30 per class."
    )

    def __init__(self, root, *, train_fraction: float = 0.5, val_fraction: float = 0.2, **kwargs):
        self.fractions = (float(train_fraction), float(val_fraction))
        super().__init__(root, **kwargs)

    def read_splits(self) -> dict[str, list[Item]]:
        if (self.root / "train").is_dir():
            return self._read_split_folders()
        return self._split_single_folder()

    def _items(self, paths_by_class: dict[str, list[Path]], classes: list[str]) -> list[Item]:
        label_of = {name: label for label, name in enumerate(classes)}
        return [
            Item(str(path), label_of[name], name.replace("_", " "))
            for name in classes
            for path in paths_by_class.get(name, [])
        ]

    def _read_split_folders(self) -> dict[str, list[Item]]:
        if not (self.root / "test").is_dir():
            raise PromptbenchError(f"dataset '{self.display_name}': {self.root / 'train'} exists but {self.root / 'test'} does not")
        classes = [p.name for p in class_folders(self.root / "train")]
        if not classes:
            raise PromptbenchError(f"dataset '{self.display_name}': no class folders in {self.root / 'train'}")
        listings: dict[str, dict[str, list[Path]]] = {}
        for split in ("train", "val", "test"):
            folder = self.root / split
            if not folder.is_dir():
                continue
            found = {p.name: list_images(p) for p in class_folders(folder)}
            unknown = sorted(set(found) - set(classes))
            if unknown:
                raise PromptbenchError(
                    f"dataset '{self.display_name}': {folder} has class folders missing from train: {unknown[:5]}"
                )
            listings[split] = found
        classes = self._without_empty_classes(classes, list(listings.values()))
        splits = {split: self._items(found, classes) for split, found in listings.items()}
        if "val" not in splits:
            # No val folder: hold out a fixed 20% of each train class, so few-shot val never touches test.
            rng = random.Random(SPLIT_SEED)
            train, val = {}, {}
            for name in classes:
                kept, held, rest = split_per_class(listings["train"][name], (0.8, 0.2), rng)
                train[name], val[name] = kept + rest, held
            splits["train"], splits["val"] = self._items(train, classes), self._items(val, classes)
        return {split: splits[split] for split in ("train", "val", "test")}

    def _without_empty_classes(self, classes: list[str], listings: list[dict[str, list[Path]]]) -> list[str]:
        """A class folder without a single image (in any split) is no class: left out, and said so."""
        empty = [name for name in classes if not any(listing.get(name) for listing in listings)]
        if empty:
            self.note_reading(
                f"dataset '{self.display_name}' under {self.root}: {len(empty)} class folder(s) without images are "
                f"left out: {empty}"
            )
        return [name for name in classes if name not in empty]

    def _split_single_folder(self) -> dict[str, list[Item]]:
        classes = [p.name for p in class_folders(self.root)]
        if not classes:
            raise PromptbenchError(
                f"dataset '{self.display_name}': no class folders in {self.root}.{self.how_to_get_text()}"
            )
        images = {name: list_images(self.root / name) for name in classes}
        classes = self._without_empty_classes(classes, [images])
        rng = random.Random(SPLIT_SEED)
        parts: dict[str, dict[str, list[Path]]] = {"train": {}, "val": {}, "test": {}}
        for name in classes:
            train, val, test = split_per_class(images[name], self.fractions, rng)
            parts["train"][name], parts["val"][name], parts["test"][name] = train, val, test
        return {split: self._items(paths, classes) for split, paths in parts.items()}
