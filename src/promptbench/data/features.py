"""Frozen image features, extracted once and cached on disk under a key of everything that changes them.

The key covers the backbone (name, weights fingerprint), precision, transform, number of augmented
views and their seed, and the exact file list (paths, labels, sizes, mtimes), so a changed input can
never reuse a stale cache. Concurrent jobs asking for the same features take a file lock: one extracts,
the others wait and read. Files are written to a temporary name and renamed, so no reader sees a torn file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from promptbench.backbones import Backbone
from promptbench.data.items import Item
from promptbench.data.loading import image_loader
from promptbench.io import atomic_path, write_json_atomic

log = logging.getLogger(__name__)
AUTOCAST_DTYPES = {"16-mixed": torch.float16, "bf16-mixed": torch.bfloat16}


@dataclass
class FeatureSet:
    """Features [N, D] (float32, not normalised) of the items that could be read, with labels and item indices."""

    features: torch.Tensor
    labels: torch.Tensor
    index: torch.Tensor

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"features": self.features, "labels": self.labels, "index": self.index}


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
    views: int = 1,
    seed: int = 0,
    skip_bad_images: bool = False,
    description: str = "features",
) -> FeatureSet:
    """Encode every item `views` times (augmented views differ by seed) and average the raw features."""
    backbone.to(device)
    total: torch.Tensor | None = None
    labels = torch.tensor([item.label for item in items], dtype=torch.long)
    seen = torch.zeros(len(items), dtype=torch.bool)
    for view in range(views):
        generator = torch.Generator().manual_seed(seed * 1000 + view)
        loader = image_loader(
            items, transform, batch_size=batch_size, num_workers=num_workers,
            skip_bad_images=skip_bad_images, generator=generator,
        )
        with torch.random.fork_rng(devices=[]):
            # Augmentations draw from torch's global RNG when there are no workers: make them seeded too.
            torch.manual_seed(seed * 1000 + view)
            label = f"{description} (view {view + 1}/{views})" if views > 1 else description
            for batch in tqdm(loader, desc=label, leave=False, dynamic_ncols=True):
                if batch is None:
                    continue
                images, _, index = batch
                with autocast(device, precision):
                    encoded = backbone.encode_image(images.to(device, non_blocking=True)).float().cpu()
                if total is None:
                    total = torch.zeros(len(items), encoded.shape[-1])
                total[index] += encoded
                seen[index] = True
    if total is None:
        raise RuntimeError(f"{description}: no image could be read")
    kept = seen.nonzero().squeeze(1)
    return FeatureSet(total[kept] / views, labels[kept], kept)


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
        return self.root / f"{self.digest(key)}.safetensors"

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
            write_json_atomic(path.with_suffix(".json"), {"key": key, "count": len(features.labels),
                                                          "dim": int(features.features.shape[-1])})
            with atomic_path(path) as tmp:
                save_file(features.tensors(), str(tmp))
            log.info("cached features of %s/%s -> %s", key.get("dataset"), key.get("set"), path)
        return features

    @staticmethod
    def _read(path: Path) -> FeatureSet:
        tensors = load_file(str(path))
        return FeatureSet(tensors["features"], tensors["labels"], tensors["index"])
