"""The base of the CoOp benchmark datasets: published split files, split building, few-shot split cache.

A benchmark dataset lives in `data_root/<folder>` (protocol.md section 1). Its split comes from a JSON
split file (`split_zhou_*.json`, paths relative to `image_dir`); when the file is missing it is built the
way the reference builds it and saved, so every later run reads the same split. Datasets without a
published split file (the ImageNet family) save their folder listing in the same format, so big folders
are listed once instead of on every run.

Few-shot splits are cached per (K, seed) as `split_fewshot/shot_{K}-seed_{S}.json` (same format) in the
dataset folder, or in `split_cache_dir` for read-only data. A reference cache `shot_K-seed_S.pkl` found
in the dataset folder is imported (paths rebased, files checked) instead of sampling afresh.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Callable, ClassVar, Iterable, Sequence

from promptbench.data.datasets.base import DATASETS, Dataset
from promptbench.data.datasets.folder import class_folders, list_images, split_per_class
from promptbench.data.fewshot import ALL_SHOTS, sample_fewshot, val_shots
from promptbench.data.items import Item
from promptbench.data.splits import (
    FEWSHOT_SPLITS,
    fewshot_file,
    import_reference_pickle,
    read_split_file,
    write_split_file,
)
from promptbench.errors import PromptbenchError

log = logging.getLogger(__name__)

# The reference's per-class fractions (protocol.md section 1).
TRAIN_VAL_TEST = (0.5, 0.2)
VAL_OF_TRAINVAL = 0.2


class BenchmarkDataset(Dataset):
    # Default folder under data_root; the folder name the reference and its split files assume.
    folder: ClassVar[str]
    # Images folder inside the dataset folder; split-file paths are relative to it ("" = the dataset folder).
    image_subdir: ClassVar[str] = "images"
    # The published split file, or (ImageNet family) the index file we write; None: read the annotations
    # on every run (cheap, e.g. FGVCAircraft's text files).
    split_file: ClassVar[str | None] = None
    # Paths (relative to the dataset folder) needed to build the split when `split_file` is missing.
    split_sources: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def from_data_root(cls, data_root: str | Path, **kwargs) -> "BenchmarkDataset":
        return cls(Path(data_root).expanduser() / cls.folder, **kwargs)

    def __init__(self, root, split_cache_dir: str | Path | None = None, write_splits: bool = True, **kwargs):
        self.split_cache_dir = Path(split_cache_dir).expanduser() if split_cache_dir else None
        # `data check` reads without writing anything into the folder it inspects.
        self.write_splits = bool(write_splits)
        super().__init__(root, **kwargs)

    @property
    def image_dir(self) -> Path:
        return self.root / self.image_subdir if self.image_subdir else self.root

    @property
    def cache_dir(self) -> Path:
        return self.split_cache_dir or self.root

    # ---- the split -------------------------------------------------------------------------------------
    def build_splits(self) -> dict[str, list[Item]]:
        """The reference's rule for this dataset when there is no split file (uses the global `random`)."""
        raise NotImplementedError

    def read_splits(self) -> dict[str, list[Item]]:
        if self.split_file is not None:
            found = self.find_file(self.split_file)
            if found is not None:
                return read_split_file(found, self.image_dir)
        self.require(self.image_subdir, *self.split_sources)
        splits = self.build_splits()
        if self.split_file is not None:
            log.info("dataset '%s': no %s, built it as the reference does", self.display_name, self.split_file)
            self.save_file(self.split_file, lambda path: write_split_file(path, splits, self.image_dir))
        return splits

    def require(self, *relpaths: str) -> None:
        missing = [str(self.root / rel) for rel in relpaths if rel and not (self.root / rel).exists()]
        if missing:
            raise PromptbenchError(
                f"dataset '{self.display_name}': missing {', '.join(missing)}"
                + (f" (and no {self.split_file})" if self.split_file else "")
                + f".{self.how_to_get_text()}"
            )

    def find_file(self, relpath: str) -> Path | None:
        """A generated file in the cache dir, else in the dataset folder (where published files lie)."""
        for folder in dict.fromkeys((self.cache_dir, self.root)):
            if (folder / relpath).is_file():
                return folder / relpath
        return None

    def save_file(self, relpath: str, write: Callable[[Path], None]) -> None:
        if not self.write_splits:
            return
        path = self.cache_dir / relpath
        try:
            write(path)
        except OSError as error:
            log.warning(
                "dataset '%s': cannot write %s (%s); continuing without saving it. Set "
                "dataset.split_cache_dir=<a writable folder> to keep generated splits out of a read-only data folder.",
                self.display_name, path, error.strerror or error,
            )

    # ---- few-shot splits -------------------------------------------------------------------------------
    def draw_fewshot_splits(self, shots: int, seed: int | None) -> tuple[list[Item], list[Item]]:
        if shots == ALL_SHOTS or seed is None:
            return super().draw_fewshot_splits(shots, seed)
        relpath = fewshot_file(shots, seed)
        found = self.find_file(relpath)
        if found is not None:
            splits = read_split_file(found, self.image_dir, FEWSHOT_SPLITS)
            self.check_fewshot_items(splits, found)
            return splits["train"], splits["val"]
        reference_pickle = self.root / fewshot_file(shots, seed, suffix=".pkl")
        if reference_pickle.is_file():
            log.info("dataset '%s': importing the reference's few-shot split %s", self.display_name, reference_pickle)
            splits = import_reference_pickle(reference_pickle, self.image_dir)
            if "val" not in splits:  # the reference's ImageNet pickles hold train only (its val is the test set)
                splits["val"] = sample_fewshot(self["val"].items, val_shots(shots))
            self.check_fewshot_items(splits, reference_pickle)
        else:
            train, val = super().draw_fewshot_splits(shots, seed)
            splits = {"train": train, "val": val}
        self.save_file(relpath, lambda path: write_split_file(path, {s: splits[s] for s in FEWSHOT_SPLITS}, self.image_dir))
        return splits["train"], splits["val"]

    def check_fewshot_items(self, splits: dict[str, list[Item]], source: Path) -> None:
        """A cached split must come from this dataset's split (same paths, labels, class names)."""
        for split in FEWSHOT_SPLITS:
            known = set(self[split].items)
            stale = [item for item in splits[split] if item not in known]
            if stale:
                raise PromptbenchError(
                    f"few-shot split {source}: {len(stale)} '{split}' item(s) are not in the dataset's {split} split, "
                    f"e.g. {stale[0]}. It was made from other data or another split file: delete it to resample."
                )


# ---- the reference's split-building rules, shared by the datasets ----------------------------------------
def split_groups(groups: Iterable[tuple[int, str, list[Path]]], dataset: str) -> dict[str, list[Item]]:
    """Shuffle each (label, classname, paths) group with the global `random` and cut it 50/20/30."""
    splits: dict[str, list[Item]] = {"train": [], "val": [], "test": []}
    for label, classname, paths in groups:
        parts = split_per_class(paths, TRAIN_VAL_TEST, random)
        if not all(parts):
            raise PromptbenchError(
                f"dataset '{dataset}': class '{classname}' has {len(paths)} image(s), too few to split "
                f"50/20/30 into non-empty train/val/test"
            )
        for split, part in zip(("train", "val", "test"), parts):
            splits[split].extend(Item(str(path), label, classname) for path in part)
    return splits


def split_class_folders(image_dir: Path, dataset: str, ignored: Sequence[str] = (),
                        renames: dict[str, str] | None = None) -> dict[str, list[Item]]:
    """Folder-per-class datasets (DTD, Food101, Caltech101, EuroSAT): labels over the sorted folders.

    The reference lists each class folder with an unsorted `os.listdir`, so the split it builds depends on
    the filesystem; we sort the files. The published split files make this moot for the benchmark.
    """
    renames = renames or {}
    categories = [folder.name for folder in class_folders(image_dir) if folder.name not in ignored]
    return split_groups(
        ((label, renames.get(name, name), list_images(image_dir / name)) for label, name in enumerate(categories)),
        dataset,
    )


def split_trainval(trainval: Sequence[Item], p_val: float = VAL_OF_TRAINVAL) -> tuple[list[Item], list[Item]]:
    """The reference's 80/20 split of an official trainval list (Pets, SUN397, UCF101, Cars).

    Classes in order of first appearance; each class's positions are shuffled with the global `random`
    and the first round(20%) go to val; both lists are filled class by class.
    """
    positions: dict[int, list[int]] = {}
    for position, item in enumerate(trainval):
        positions.setdefault(item.label, []).append(position)
    train, val = [], []
    for label, indices in positions.items():
        n_val = round(len(indices) * p_val)
        if n_val == 0:
            raise PromptbenchError(f"class {label} has {len(indices)} trainval image(s): too few to hold out 20% for val")
        random.shuffle(indices)
        val.extend(trainval[i] for i in indices[:n_val])
        train.extend(trainval[i] for i in indices[n_val:])
    return train, val


def read_lines(path: Path) -> list[str]:
    """Non-empty stripped lines of an annotation file."""
    return [line.strip() for line in path.read_text().splitlines() if line.strip()]


def open_dataset(name: str, data_root: str | Path, **kwargs) -> Dataset:
    """A registered dataset by name, in its default place under `data_root` (for protocols' targets)."""
    if name not in DATASETS:
        raise PromptbenchError(f"unknown dataset '{name}'; registered datasets: {sorted(DATASETS)}")
    return DATASETS[name].from_data_root(data_root, **kwargs)
