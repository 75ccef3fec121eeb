"""The LightningDataModule of a run: images or cached frozen features, for every set of the Task."""

from __future__ import annotations

from typing import Any, Callable

import lightning as L
import torch
from torch.utils.data import DataLoader, TensorDataset

from promptbench.backbones import Backbone
from promptbench.data.features import FeatureSet, FeatureStore, extract_features, files_digest
from promptbench.data.loading import image_loader
from promptbench.data.transforms import test_transform, train_transform
from promptbench.methods.base import InputKind
from promptbench.protocols import Task


class FewShotDataModule(L.LightningDataModule):
    def __init__(
        self,
        task: Task,
        backbone: Backbone,
        input_kind: InputKind,
        *,
        device: torch.device,
        feature_store: FeatureStore,
        precision: str = "32",
        batch_size: int = 32,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        skip_bad_images: bool = False,
        seed: int = 0,
    ):
        super().__init__()
        self.task = task
        self.backbone = backbone
        self.input_kind = input_kind
        self.device = device
        self.feature_store = feature_store
        self.precision = str(precision)
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.skip_bad_images = skip_bad_images
        self.seed = seed
        self.sets = task.sets()
        size, mean, std = backbone.image_size, backbone.mean, backbone.std
        self.test_transform = test_transform(size, mean, std)
        self.train_transform = train_transform(size, mean, std)

    # ---- features ----------------------------------------------------------------------------------
    def feature_set(self, name: str, transform: Callable | None = None, views: int = 1) -> FeatureSet:
        """Frozen features of a set, from the cache when the same inputs were encoded before."""
        items = self.sets[name].items
        transform = transform or self.test_transform
        augmented = views > 1 or transform is not self.test_transform
        key = {
            "backbone": self.backbone.fingerprint,
            "precision": self.precision,
            "transform": repr(transform),
            "views": views,
            "augment_seed": self.seed if augmented else None,
            "files": files_digest(items),
            "dataset": self.task.source,
            "set": name,
            "count": len(items),
        }
        return self.feature_store.get(
            key,
            lambda: extract_features(
                self.backbone, items, transform, device=self.device, precision=self.precision,
                batch_size=self.eval_batch_size, num_workers=self.num_workers, views=views, seed=self.seed,
                skip_bad_images=self.skip_bad_images, description=f"encoding {self.task.source}/{name}",
            ),
        )

    def _feature_loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        features = self.feature_set(name)
        dataset = TensorDataset(features.features, features.labels, features.index)
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=generator)

    # ---- loaders -----------------------------------------------------------------------------------
    def _loader(self, name: str, train: bool) -> DataLoader:
        batch_size = self.batch_size if train else self.eval_batch_size
        if self.input_kind == "features":
            return self._feature_loader(name, shuffle=train, batch_size=batch_size)
        return image_loader(
            self.sets[name].items,
            self.train_transform if train else self.test_transform,
            batch_size=batch_size,
            num_workers=self.num_workers,
            shuffle=train,
            skip_bad_images=self.skip_bad_images,
            generator=torch.Generator().manual_seed(self.seed),
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def eval_dataloader(self, name: str) -> DataLoader:
        return self._loader(name, train=False)

    def state_dict(self) -> dict[str, Any]:
        return {}
