"""Image datasets for DataLoaders, with opt-in skipping of unreadable files."""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import torch
from torch.utils.data import DataLoader, default_collate

from promptbench.data.images import BadImageError, load_rgb
from promptbench.data.items import Item

log = logging.getLogger(__name__)


class ImageDataset(torch.utils.data.Dataset):
    """Yields (image tensor, label, index); an unreadable image raises, or yields None when skipping."""

    def __init__(self, items: Sequence[Item], transform: Callable, skip_bad_images: bool = False):
        self.items = list(items)
        self.transform = transform
        self.skip_bad_images = skip_bad_images

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        item = self.items[index]
        try:
            image = load_rgb(item.path)
        except BadImageError as error:
            if self.skip_bad_images:
                log.warning("skipped unreadable image %s (%s)", item.path, error.reason)
                return None
            raise
        return self.transform(image), item.label, index


class ImageProblems(torch.utils.data.Dataset):
    """Yields, per item, None if its image decodes, else what is wrong with the file."""

    def __init__(self, items: Sequence[Item]):
        self.items = list(items)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> str | None:
        try:
            load_rgb(self.items[index].path)
        except BadImageError as error:
            return error.reason
        return None


def collate_skipping_bad(batch: list[Any]):
    """Drop skipped (None) samples; a batch with none left becomes None, which every loop skips."""
    kept = [sample for sample in batch if sample is not None]
    return default_collate(kept) if kept else None


def image_loader(
    items: Sequence[Item],
    transform: Callable,
    *,
    batch_size: int,
    num_workers: int,
    skip_bad_images: bool = False,
) -> DataLoader:
    """An in-order loader (evaluation, feature extraction); training loaders add their own epoch-seeded sampler."""
    return DataLoader(
        ImageDataset(items, transform, skip_bad_images),
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=collate_skipping_bad,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
