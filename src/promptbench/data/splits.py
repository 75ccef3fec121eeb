"""Split files, the few-shot split cache, and import of the reference implementation's pickled caches.

One on-disk format for every split we read or write (protocol.md section 1): JSON
`{"train": [[relpath, label, classname], ...], "val": [...], "test": [...]}` with paths relative to the
dataset's images folder, so a data folder can be moved or mounted elsewhere. Few-shot caches use the
same format (with "train" and "val" only) under `split_fewshot/shot_{K}-seed_{S}.json`.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path
from typing import Iterable, Sequence

from promptbench.data.items import Item
from promptbench.errors import PromptbenchError
from promptbench.io import write_json_atomic

FEWSHOT_DIR = "split_fewshot"
FEWSHOT_SPLITS = ("train", "val")
# The reference pickles objects of this class; we unpickle them into `ReferenceDatum` without dassl.
REFERENCE_DATUM = ("dassl.data.datasets.base_dataset", "Datum")


def relative_to(path: str, image_dir: Path) -> str:
    try:
        return Path(path).relative_to(image_dir).as_posix()
    except ValueError:
        raise PromptbenchError(f"image {path} is not inside the images folder {image_dir}") from None


def items_to_triples(items: Iterable[Item], image_dir: Path) -> list[list]:
    return [[relative_to(item.path, image_dir), item.label, item.classname] for item in items]


def triples_to_items(triples: Sequence, image_dir: Path, source: Path, split: str) -> list[Item]:
    items = []
    for index, entry in enumerate(triples):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 3):
            raise PromptbenchError(
                f"{source}: entry {index} of '{split}' is {entry!r}, expected [relative path, label, class name]. "
                f"Delete the file to have it rebuilt, or restore the original."
            )
        relpath, label, classname = entry
        items.append(Item(str(image_dir / relpath), int(label), str(classname)))
    return items


def read_split_file(path: Path, image_dir: Path, splits: Sequence[str] = ("train", "val", "test")) -> dict[str, list[Item]]:
    try:
        payload = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise PromptbenchError(f"cannot read split file {path}: {error}. Delete it to have it rebuilt.") from None
    missing = [split for split in splits if split not in payload]
    if missing:
        raise PromptbenchError(
            f"split file {path} has no {missing} entry (has {sorted(payload)}). Delete it to have it rebuilt, "
            f"or restore the published file."
        )
    return {split: triples_to_items(payload[split], image_dir, path, split) for split in splits}


def write_split_file(path: Path, splits: dict[str, list[Item]], image_dir: Path) -> None:
    write_json_atomic(path, {split: items_to_triples(items, image_dir) for split, items in splits.items()})


def fewshot_file(shots: int, seed: int, suffix: str = ".json") -> str:
    return f"{FEWSHOT_DIR}/shot_{shots}-seed_{seed}{suffix}"


# ---- reference pickles ---------------------------------------------------------------------------------
class ReferenceDatum:
    """Stand-in for Dassl's `Datum`: unpickling only restores its attribute dict (_impath, _label, ...)."""

    def as_item(self) -> Item:
        state = self.__dict__
        return Item(str(state["_impath"]), int(state["_label"]), str(state["_classname"]))


class ReferenceUnpickler(pickle.Unpickler):
    """Loads the reference's few-shot pickles without dassl, and refuses any other class (pickles run code)."""

    SAFE_BUILTINS = {("builtins", "list"), ("builtins", "dict"), ("collections", "OrderedDict")}

    def find_class(self, module: str, name: str):
        if (module, name) == REFERENCE_DATUM:
            return ReferenceDatum
        if (module, name) in self.SAFE_BUILTINS:
            return super().find_class(module, name)
        raise PromptbenchError(
            f"reference pickle refers to {module}.{name}; only {'.'.join(REFERENCE_DATUM)} objects are imported"
        )


def existing_prefix(path: str, image_dir: Path) -> Path | None:
    parts = Path(path).parts
    for start in range(1, len(parts)):
        if image_dir.joinpath(*parts[start:]).is_file():
            return Path(*parts[:start])
    return None


def rebase(paths: list[str], image_dir: Path, source: Path) -> list[str]:
    """Map absolute paths from another machine onto `image_dir`.

    The old images folder is unknown: the longest tail of a path that exists under `image_dir` reveals it
    (the prefix before that tail), and every path must share it.
    """
    old_prefix = next((prefix for prefix in (existing_prefix(path, image_dir) for path in paths) if prefix), None)
    if old_prefix is None:
        raise PromptbenchError(
            f"{source}: none of its paths (e.g. {paths[0]}) exists under {image_dir}; is dataset.root the folder "
            f"the pickle was made for?"
        )
    rebased, foreign = [], []
    for path in paths:
        try:
            rebased.append(str(image_dir / Path(path).relative_to(old_prefix)))
        except ValueError:
            foreign.append(path)
    if foreign:
        raise PromptbenchError(f"{source}: {len(foreign)} paths are not under {old_prefix}, e.g. {foreign[:3]}")
    return rebased


def import_reference_pickle(path: Path, image_dir: Path) -> dict[str, list[Item]]:
    """Read the reference's `shot_K-seed_S.pkl` ({"train": [Datum], "val": [Datum]}; ImageNet: train only)."""
    try:
        with open(path, "rb") as file:
            payload = ReferenceUnpickler(file).load()
    except (OSError, pickle.UnpicklingError, EOFError, AttributeError) as error:
        raise PromptbenchError(f"cannot read reference pickle {path}: {error}") from None
    if not isinstance(payload, dict) or "train" not in payload:
        raise PromptbenchError(f"reference pickle {path} is not a {{'train': [...], 'val': [...]}} dict")
    splits = {}
    for split, data in payload.items():
        items = [datum.as_item() for datum in data]
        if not items:
            splits[split] = []
            continue
        paths = rebase([item.path for item in items], image_dir, path)
        splits[split] = [Item(new, item.label, item.classname) for new, item in zip(paths, items)]
    missing = [item.path for items in splits.values() for item in items if not Path(item.path).is_file()]
    if missing:
        listed = "\n  ".join(missing[:20])
        raise PromptbenchError(
            f"reference pickle {path}: {len(missing)} image(s) do not exist under {image_dir}:\n  {listed}"
            + ("\n  ..." if len(missing) > 20 else "")
            + "\nRestore them, or delete the pickle to sample the split afresh."
        )
    return splits
