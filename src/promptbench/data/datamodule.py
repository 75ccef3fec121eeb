"""The LightningDataModule of a run: images or cached frozen features, for every set of the Task."""

from __future__ import annotations

from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from promptbench.backbones import Backbone
from promptbench.data.features import (
    AugmentedViews, FeatureSet, FeatureStore, FeatureViews, SeededViewDataset, extract_features, files_digest, view_seed,
)
from promptbench.data.loading import collate_skipping_bad, image_loader
from promptbench.data.transforms import DEFAULT_CROP_SCALE, test_transform, train_transform
from promptbench.errors import PromptbenchError
from promptbench.methods.base import InputKind
from promptbench.protocols import Task


class ViewPerEpochSampler(Sampler[int]):
    """Indices into V stacked views of N items: epoch e visits every item once, shuffled, in view e mod V.

    Each view holds an independent augmentation of every item, so while e < V this is exactly the
    reference's "new random augmentation every epoch", without running the image tower again.
    Lightning calls `set_epoch` at the start of every training epoch.
    """

    def __init__(self, items: int, views: int, seed: int):
        self.items, self.views, self.seed = items, views, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def view(self) -> int:
        return self.epoch % self.views

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(view_seed(self.seed, self.epoch))
        order = torch.randperm(self.items, generator=generator)
        rank, world = distributed_rank()
        if world > 1:
            # Every rank draws the same permutation and takes its own slice (padded like DistributedSampler).
            order = torch.cat([order, order[: len(self) * world - self.items]])[rank::world]
        return iter((order + self.view() * self.items).tolist())

    def __len__(self) -> int:
        return -(-self.items // distributed_rank()[1])


def distributed_rank() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torch.distributed.

    promptbench's samplers shard themselves, so the trainer runs with use_distributed_sampler=false and
    Lightning never replaces them (its wrapper would hide `set_epoch` from them).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class EpochKeyedSampler(ViewPerEpochSampler):
    """Yields `epoch * items + i`: the epoch travels with each index, so persistent workers (which keep their
    own copy of the dataset) still apply that epoch's augmentation."""

    def __init__(self, items: int, seed: int):
        super().__init__(items, views=1, seed=seed)

    def __iter__(self) -> Iterator[int]:
        return (index + self.epoch * self.items for index in super().__iter__())


class EpochAugmentedImages(torch.utils.data.Dataset):
    """Key `epoch * n + i` is image i under epoch `epoch`'s seeded random augmentation."""

    def __init__(self, items: Sequence, transform: Callable, skip_bad_images: bool, seed: int):
        self.images = SeededViewDataset(items, transform, skip_bad_images, augment_seed=view_seed(seed, 0))
        self.seed = seed

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, key: int):
        epoch, index = divmod(key, len(self.images))
        self.images.augment_seed = view_seed(self.seed, epoch)
        return self.images[index]


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
        train_views: AugmentedViews | None = None,
        train_crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
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
        # For "features" methods that train: the augmented views their train loader cycles through.
        self.train_views = train_views
        self.sets = task.sets()
        size, mean, std = backbone.image_size, backbone.mean, backbone.std
        self.test_transform = test_transform(size, mean, std)
        self.train_transform = train_transform(size, mean, std, scale=tuple(train_crop_scale))

    # ---- features ----------------------------------------------------------------------------------
    def augmentation(self, scale: Sequence[float]) -> Callable:
        """RandomResizedCrop(scale) + flip at the backbone's resolution (Tip-Adapter's cache: scale (0.5, 1))."""
        size, mean, std = self.backbone.image_size, self.backbone.mean, self.backbone.std
        return train_transform(size, mean, std, scale=tuple(scale))

    def feature_set(self, name: str, transform: Callable | None = None, views: int = 1) -> FeatureSet:
        """Frozen features of a set, from the cache when the same inputs were encoded before.

        Without a transform: the deterministic test transform. With an augmenting transform: the raw
        features averaged over `views` cached augmented views.
        """
        if transform is None or transform is self.test_transform:
            if views != 1:
                raise PromptbenchError(f"feature_set('{name}'): views={views} needs an augmenting transform")
            return self._cached_view(name, self.test_transform, view=None)
        return self.feature_views(name, transform, views).mean()

    def feature_views(self, name: str, transform: Callable, views: int) -> FeatureViews:
        """Features of `views` augmented views of a set, each cached on its own (view i is the same in every run
        with this seed, so asking for more views later only extracts the new ones)."""
        if views < 1:
            raise PromptbenchError(f"feature_views('{name}'): views must be >= 1, got {views}")
        return FeatureViews.stack([self._cached_view(name, transform, view) for view in range(views)])

    def _cached_view(self, name: str, transform: Callable, view: int | None) -> FeatureSet:
        if name not in self.sets:
            raise PromptbenchError(f"no set '{name}' in this task (has {sorted(self.sets)})")
        items = self.sets[name].items
        augment_seed = None if view is None else view_seed(self.seed, view)
        key = {
            "backbone": self.backbone.fingerprint,
            "precision": self.precision,
            "transform": repr(transform),
            "view": view,
            "augment_seed": augment_seed,
            "files": files_digest(items),
            "dataset": self.task.source,
            "set": name,
            "count": len(items),
        }
        what = name if view is None else f"{name} view {view}"
        return self.feature_store.get(
            key,
            lambda: extract_features(
                self.backbone, items, transform, device=self.device, precision=self.precision,
                batch_size=self.eval_batch_size, num_workers=self.num_workers, augment_seed=augment_seed,
                skip_bad_images=self.skip_bad_images, description=f"encoding {self.task.source}/{what}",
            ),
        )

    def _feature_loader(self, name: str, shuffle: bool, batch_size: int) -> DataLoader:
        features = self.feature_set(name)
        dataset = TensorDataset(features.features, features.labels, features.index)
        sampler = ViewPerEpochSampler(len(dataset), 1, self.seed) if shuffle else None
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler)

    def _image_train_loader(self) -> DataLoader:
        """Shuffle order and augmentations depend only on (seed, epoch, image), never on earlier epochs, so a
        run resumed from an epoch checkpoint sees exactly the batches an uninterrupted run would."""
        items = self.sets["train"].items
        dataset = EpochAugmentedImages(items, self.train_transform, self.skip_bad_images, self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=EpochKeyedSampler(len(items), self.seed),
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_skipping_bad, pin_memory=torch.cuda.is_available())

    def _augmented_feature_loader(self, views: AugmentedViews) -> DataLoader:
        stacked = self.feature_views("train", self.augmentation(views.scale), views.count)
        items = stacked.features.shape[1]
        dataset = TensorDataset(
            stacked.features.flatten(0, 1), stacked.labels.repeat(views.count), stacked.index.repeat(views.count)
        )
        sampler = ViewPerEpochSampler(items, views.count, self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler)

    # ---- loaders -----------------------------------------------------------------------------------
    def _loader(self, name: str, train: bool) -> DataLoader:
        batch_size = self.batch_size if train else self.eval_batch_size
        if self.input_kind == "features":
            if train and self.train_views is not None:
                return self._augmented_feature_loader(self.train_views)
            return self._feature_loader(name, shuffle=train, batch_size=batch_size)
        if train:
            return self._image_train_loader()
        return image_loader(self.sets[name].items, self.test_transform, batch_size=batch_size,
                            num_workers=self.num_workers, skip_bad_images=self.skip_bad_images)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def eval_dataloader(self, name: str) -> DataLoader:
        return self._loader(name, train=False)

    def state_dict(self) -> dict[str, Any]:
        return {}
