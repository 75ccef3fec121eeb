"""Frozen image features, extracted once and cached on disk under a key of everything that changes them.

The key covers the backbone (name, weights fingerprint), precision, transform, the augmented view's index
and seed, and the exact file list (paths, labels, sizes, mtimes), so a changed input can never reuse a
stale cache. Augmented views are cached one file per view: a method asking for 20 views reuses the 10
another method already extracted, and a method training on "a new augmentation each epoch" reads view
e mod V at epoch e instead of running the image tower again.

Concurrent jobs asking for the same features take a file lock: one extracts, the others wait and read.
Files are written to a temporary name and renamed, so no reader sees a torn file, and a killed
extraction leaves only a temporary file that no reader ever opens.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from promptbench.backbones import Backbone
from promptbench.contract import FeatureSet
from promptbench.data.items import Item
from promptbench.data.loading import ImageDataset, collate_skipping_bad, image_loader
from promptbench.data.transforms import test_transform
from promptbench.errors import PromptbenchError
from promptbench.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}
FEATURE_SUFFIX = ".safetensors"
# A temporary file older than this cannot belong to a writer that is still alive (save_file writes in one go).
STALE_TEMPORARY_S = 3600


def files_digest(items: Sequence[Item]) -> str:
    digest = hashlib.sha256()
    for item in items:
        try:
            stat = os.stat(item.path)
            signature = f"{stat.st_size}:{stat.st_mtime_ns}"
        except OSError:
            signature = "missing"
        digest.update(f"{item.path}\t{item.label}\t{signature}\n".encode())
    return digest.hexdigest()


def autocast(device: torch.device, precision: str):
    dtype = AUTOCAST_DTYPES.get(str(precision))
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def view_seed(seed: int, view: int) -> int:
    return int(seed) * 1000 + int(view)


class SeededViewDataset(ImageDataset):
    """Item i's random augmentation is drawn from its own seed (view seed, i): a view is the same whatever
    the batch size, the number of loader workers or the order of the items."""

    def __init__(self, items: Sequence[Item], transform: Callable, skip_bad_images: bool, augment_seed: int):
        super().__init__(items, transform, skip_bad_images)
        self.augment_seed = augment_seed

    def item_seed(self, index: int) -> int:
        digest = hashlib.blake2b(f"{self.augment_seed}:{index}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "little")

    def __getitem__(self, index: int):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.item_seed(index))
            return super().__getitem__(index)


def _view_loader(items, transform, *, batch_size, num_workers, skip_bad_images, augment_seed) -> DataLoader:
    if augment_seed is None:
        return image_loader(items, transform, batch_size=batch_size, num_workers=num_workers,
                            skip_bad_images=skip_bad_images)
    return DataLoader(
        SeededViewDataset(items, transform, skip_bad_images, augment_seed),
        batch_size=batch_size, num_workers=num_workers, collate_fn=collate_skipping_bad,
        pin_memory=torch.cuda.is_available(),
    )


@torch.no_grad()
def extract_features(
    backbone: Backbone,
    items: Sequence[Item],
    transform: Callable,
    *,
    device: torch.device,
    precision: str = "32",
    batch_size: int = 128,
    num_workers: int = 0,
    augment_seed: int | None = None,
    skip_bad_images: bool = False,
    description: str = "features",
) -> FeatureSet:
    """Encode every item once. With `augment_seed` the transform's randomness is seeded per item."""
    backbone.to(device)
    loader = _view_loader(items, transform, batch_size=batch_size, num_workers=num_workers,
                          skip_bad_images=skip_bad_images, augment_seed=augment_seed)
    labels = torch.tensor([item.label for item in items], dtype=torch.long)
    features: torch.Tensor | None = None
    seen = torch.zeros(len(items), dtype=torch.bool)
    for batch in tqdm(loader, desc=description, leave=False, dynamic_ncols=True, disable=None):
        if batch is None:
            continue
        images, _, index = batch
        with autocast(device, precision):
            encoded = backbone.encode_image(images.to(device, non_blocking=True)).float().cpu()
        if features is None:
            features = torch.zeros(len(items), encoded.shape[-1])
        features[index] = encoded
        seen[index] = True
    if features is None:
        raise PromptbenchError(f"{description}: none of the {len(items)} images could be read")
    kept = seen.nonzero().squeeze(1)
    return FeatureSet(features[kept], labels[kept], kept)


def cached_features(
    store: "FeatureStore",
    backbone: Backbone,
    items: Sequence[Item],
    transform: Callable,
    *,
    source: str,
    set_name: str,
    device: torch.device,
    precision: str,
    batch_size: int,
    num_workers: int,
    skip_bad_images: bool,
    view: int | None = None,
    augment_seed: int | None = None,
) -> FeatureSet:
    """Features of `items` under `transform` from the store when the same inputs were encoded before, else
    extracted and stored. `view`/`augment_seed`: an augmented view (None: the deterministic test transform)."""
    key = {
        "backbone": backbone.fingerprint,
        "precision": str(precision),
        "transform": repr(transform),
        "view": view,
        "augment_seed": augment_seed,
        "files": files_digest(items),
        "dataset": source,
        "set": set_name,
        "count": len(items),
    }
    what = set_name if view is None else f"{set_name} view {view}"
    return store.get(
        key,
        lambda: extract_features(
            backbone, items, transform, device=device, precision=str(precision), batch_size=batch_size,
            num_workers=num_workers, augment_seed=augment_seed, skip_bad_images=skip_bad_images,
            description=f"encoding {source}/{what}",
        ),
    )


@dataclass
class FrozenFeatures:
    """Test-transform features of any image list and backbone, through the run's feature cache.

    What a protocol's train labeller gets (the unsupervised protocol's pseudo-labelling encodes the whole
    train pool): the run's extraction settings, and a cache shared with every other run, so a sweep
    encodes the pool once per backbone.
    """

    store: "FeatureStore"
    source: str
    device: torch.device
    precision: str = "32"
    batch_size: int = 128
    num_workers: int = 0
    skip_bad_images: bool = False

    def features(self, backbone: Backbone, set_name: str, items: Sequence[Item]) -> FeatureSet:
        transform = test_transform(backbone.image_size, backbone.mean, backbone.std)
        return cached_features(
            self.store, backbone, items, transform, source=self.source, set_name=set_name, device=self.device,
            precision=self.precision, batch_size=self.batch_size, num_workers=self.num_workers,
            skip_bad_images=self.skip_bad_images,
        )


@dataclass
class CacheEntry:
    """One cached FeatureSet on disk, as `promptbench cache ls|rm` sees it."""

    digest: str
    path: Path
    key: dict[str, Any]
    count: int | None
    dim: int | None
    size_bytes: int
    modified: datetime

    def files(self) -> list[Path]:
        return [self.path, self.path.with_suffix(".json"), self.path.with_suffix(".lock")]

    def summary(self) -> str:
        """`dataset/set view` in words: which images, which pass."""
        view = self.key.get("view")
        what = "test transform" if view is None else f"aug view {view} (seed {self.key.get('augment_seed')})"
        return f"{self.key.get('dataset', '?')}/{self.key.get('set', '?')} {what}"


class FeatureStore:
    """Disk cache of FeatureSets keyed by a dict of everything that determines them."""

    def __init__(self, root: str | Path | None, enabled: bool = True):
        self.root = Path(root) if root else None
        self.enabled = enabled and self.root is not None
        self.extractions = 0
        self.hits = 0

    @staticmethod
    def digest(key: dict[str, Any]) -> str:
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:32]

    def path_for(self, key: dict[str, Any]) -> Path:
        assert self.root is not None
        return self.root / f"{self.digest(key)}{FEATURE_SUFFIX}"

    def get(self, key: dict[str, Any], extract: Callable[[], FeatureSet]) -> FeatureSet:
        if not self.enabled:
            self.extractions += 1
            return extract()
        path = self.path_for(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.is_file():
            self.hits += 1
            return self._read(path)
        with FileLock(str(path.with_suffix(".lock"))):
            if path.is_file():
                self.hits += 1
                return self._read(path)
            features = extract()
            self.extractions += 1
            # The sidecar goes first: a features file never exists without its description.
            write_json_atomic(path.with_suffix(".json"), {"key": key, "count": len(features.labels),
                                                          "dim": int(features.features.shape[-1])})
            with atomic_path(path) as tmp:
                save_file(features.tensors(), str(tmp))
            log.debug("cached features of %s/%s -> %s", key.get("dataset"), key.get("set"), path)
        return features

    @staticmethod
    def _read(path: Path) -> FeatureSet:
        tensors = load_file(str(path))
        return FeatureSet(tensors["features"], tensors["labels"], tensors["index"])

    # ---- inspection and pruning (`promptbench cache ls|rm`) -----------------------------------------
    def entries(self) -> list[CacheEntry]:
        if self.root is None or not self.root.is_dir():
            return []
        entries = []
        for path in sorted(self.root.glob(f"*{FEATURE_SUFFIX}")):
            sidecar = path.with_suffix(".json")
            try:
                described = json.loads(sidecar.read_text())
            except (OSError, ValueError):
                described = {}
            stat = path.stat()
            size = stat.st_size + (sidecar.stat().st_size if sidecar.is_file() else 0)
            entries.append(CacheEntry(
                digest=path.name[: -len(FEATURE_SUFFIX)], path=path, key=described.get("key", {}),
                count=described.get("count"), dim=described.get("dim"), size_bytes=size,
                modified=datetime.fromtimestamp(stat.st_mtime),
            ))
        return entries

    def leftovers(self) -> list[Path]:
        """Files of extractions killed while writing (temporary files, sidecars without features, their locks):
        never read, only taking space. Recent ones may belong to a live writer and are left alone."""
        if self.root is None or not self.root.is_dir():
            return []
        cutoff = time.time() - STALE_TEMPORARY_S
        orphans = [p for pattern in ("*.json", "*.lock") for p in self.root.glob(pattern)
                   if not p.with_suffix(FEATURE_SUFFIX).exists()]
        return [p for p in [*self.root.glob(".*.tmp"), *orphans] if p.stat().st_mtime < cutoff]

    @staticmethod
    def remove(entry: CacheEntry) -> None:
        # The features file goes first, so a concurrent reader either finds a whole entry or none.
        for path in entry.files():
            path.unlink(missing_ok=True)
