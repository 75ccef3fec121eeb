"""The LightningDataModule of a run: it supplies what the method's `DataContract` names, nothing else.

Loaders yield transformed images or cached frozen features (`contract.inputs`); a "features" method that
trains gets its cached augmented `train_views`; `provider` hands `Method.prepare` the features of the
sets the contract `reads`.
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Iterator, Sequence

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, FeatureSet, FeatureViews, Views
from promptbench.data.features import FeatureStore, SeededViewDataset, cached_features, view_seed
from promptbench.data.loading import ImageProblems, collate_skipping_bad, image_loader
from promptbench.data.transforms import DEFAULT_CROP_SCALE, pixel_transform, test_transform, train_transform
from promptbench.errors import PromptbenchError
from promptbench.data.items import LabeledSet
from promptbench.selection import SELECTION_SET

log = logging.getLogger(__name__)
# The sets a method trains and prepares on. With skip_bad_images their images are checked once before first
# use (they are small, K shots per class, unless a policy selects on a whole split); the eval sets' skipped
# images show in their predictions instead.
FEWSHOT_SETS = ("train", "val", SELECTION_SET)


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

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """The epoch's indices into the stacked views, before sharding."""
        return torch.randperm(self.items, generator=generator) + self.view() * self.items

    def __iter__(self) -> Iterator[int]:
        order = self.epoch_order(torch.Generator().manual_seed(view_seed(self.seed, self.epoch)))
        rank, world = distributed_rank()
        if world > 1:
            # Every rank draws the same permutation and takes its own slice (padded like DistributedSampler).
            order = torch.cat([order, order[: len(self) * world - len(order)]])[rank::world]
        return iter(order.tolist())

    def __len__(self) -> int:
        return -(-self.items // distributed_rank()[1])


class ViewPoolSampler(ViewPerEpochSampler):
    """Indices into V stacked views of N items: epoch e takes max(1, N // batch_size) batches (all V * N indices
    when fewer) from a fresh shuffle of the whole pool of V * N views.

    This is CLAP's loop over its cached features (jusiro/CLAP trainers/adapters.py TrainerXCostume.run_epoch:
    len(train_loader_x) consecutive slices of a permutation of the 20 N features), so an epoch is as long as the
    image loader's epoch over the N images (Dassl drops the last partial batch when N >= batch_size).
    """

    def __init__(self, items: int, views: int, seed: int, batch_size: int):
        super().__init__(items, views, seed)
        self.drawn = min(items * views, max(1, items // batch_size) * batch_size)

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        return torch.randperm(self.items * self.views, generator=generator)[: self.drawn]

    def __len__(self) -> int:
        return -(-self.drawn // distributed_rank()[1])


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
        sets: dict[str, LabeledSet],
        source: str,
        backbone: Backbone,
        contract: DataContract,
        *,
        device: torch.device,
        feature_store: FeatureStore,
        precision: str = "32",
        eval_batch_size: int = 128,
        num_workers: int = 0,
        skip_bad_images: bool = False,
        seed: int = 0,
        train_crop_scale: Sequence[float] = DEFAULT_CROP_SCALE,
        label_only_classes: Sequence[int] = (),
    ):
        super().__init__()
        self.sets = dict(sets)
        self.source = source
        self.backbone = backbone
        self.contract = contract
        self.device = device
        self.feature_store = feature_store
        self.precision = str(precision)
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.skip_bad_images = skip_bad_images
        self.seed = seed
        # Classes of the train set's class names that have no training image (the protocol says which).
        self.label_only_classes = [int(label) for label in label_only_classes]
        self._readable_sets: dict[str, LabeledSet] = {}
        self._skipped_images: dict[str, list[str]] = {}
        unknown = [name for name in contract.reads if name not in self.sets]
        if unknown:
            raise PromptbenchError(f"the method reads set(s) {unknown}, which this protocol does not have "
                                   f"(sets: {sorted(self.sets)})")
        size, mean, std = backbone.image_size, backbone.mean, backbone.std
        self.test_transform = test_transform(size, mean, std)
        self.train_transform = train_transform(size, mean, std, scale=tuple(train_crop_scale))

    # ---- the sets as the run reads them ------------------------------------------------------------
    def labeled_set(self, name: str) -> LabeledSet:
        """A set as this run reads it. With skip_bad_images a few-shot set (train, val) leaves out its unreadable
        images, found by decoding each once before the set's first use: training never meets one, and each is
        named in the log and listed by `skipped_images`."""
        if name not in self.sets:
            raise PromptbenchError(f"no set '{name}' in this task (has {sorted(self.sets)})")
        if not self.skip_bad_images or name not in FEWSHOT_SETS:
            return self.sets[name]
        if name not in self._readable_sets:
            self._leave_out_unreadable(name)
        return self._readable_sets[name]

    def skipped_images(self) -> dict[str, list[str]]:
        """For each few-shot set read so far, the paths of the unreadable images left out of it (with
        skip_bad_images; {} without). An eval set's skipped images are the ones its predictions lack."""
        return {name: list(paths) for name, paths in self._skipped_images.items()}

    def _leave_out_unreadable(self, name: str) -> None:
        labeled = self.sets[name]
        problems = list(DataLoader(ImageProblems(labeled.items), batch_size=None, num_workers=self.num_workers))
        readable = [item for item, problem in zip(labeled.items, problems) if problem is None]
        unreadable = [(item.path, problem) for item, problem in zip(labeled.items, problems) if problem is not None]
        for path, problem in unreadable:
            log.warning("%s/%s: skipped unreadable image %s (%s)", self.source, name, path, problem)
        if labeled.items and not readable:
            path, problem = unreadable[0]
            raise PromptbenchError(f"{self.source}/{name}: none of its {len(labeled)} images can be read, e.g. {path} "
                                   f"({problem}). Fix the files or the dataset.root.")
        self._readable_sets[name] = LabeledSet(readable, labeled.classnames, labeled.templates)
        self._skipped_images[name] = [path for path, _ in unreadable]

    @property
    def provider(self) -> "ContractFeatures":
        """Features of the sets the contract reads, for `Method.prepare`."""
        return ContractFeatures(self, self.contract.reads)

    # ---- features ----------------------------------------------------------------------------------
    def features(self, name: str) -> FeatureSet:
        """Test-transform features of a set, from the cache when the same inputs were encoded before."""
        return self._cached_view(name, self.test_transform, view=None)

    def views(self, name: str, views: Views) -> FeatureViews:
        """Features of `views.n` augmented views of a set, each cached on its own (view i is the same in every
        run with this seed, so asking for more views later only extracts the new ones)."""
        augmentation = train_transform(self.backbone.image_size, self.backbone.mean, self.backbone.std,
                                       scale=views.scale)
        return FeatureViews.stack([self._cached_view(name, augmentation, view) for view in range(views.n)])

    def _cached_view(self, name: str, transform: Callable, view: int | None) -> FeatureSet:
        return cached_features(
            self.feature_store, self.backbone, self.labeled_set(name).items, transform, source=self.source,
            set_name=name, device=self.device, precision=self.precision, batch_size=self.eval_batch_size,
            num_workers=self.num_workers, skip_bad_images=self.skip_bad_images, view=view,
            augment_seed=None if view is None else view_seed(self.seed, view),
        )

    def images(self, name: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Test-transform image batches of a set on the run's device (the backbone moved there, as for extraction)."""
        self.backbone.to(self.device)
        loader = image_loader(self.labeled_set(name).items, self.test_transform, batch_size=self.eval_batch_size,
                              num_workers=self.num_workers, skip_bad_images=self.skip_bad_images)
        for batch in loader:
            if batch is not None:
                yield tuple(tensor.to(self.device, non_blocking=True) for tensor in batch)

    # ---- loaders -----------------------------------------------------------------------------------
    def _starting_epoch(self) -> int:
        """The epoch the fit loop runs first: after a resume, the one after the checkpoint. Loader workers take
        their first indices from the sampler when the loader starts, which on a resume is before Lightning's
        own `set_epoch`: the sampler must start at the right epoch by itself."""
        return self.trainer.fit_loop.epoch_progress.current.processed if self.trainer is not None else 0

    def _image_train_loader(self) -> DataLoader:
        """Shuffle order and augmentations depend only on (seed, epoch, image), never on earlier epochs, so a
        run resumed from an epoch checkpoint sees exactly the batches an uninterrupted run would."""
        items = self.labeled_set("train").items
        dataset = EpochAugmentedImages(items, self.train_transform, self.skip_bad_images, self.seed)
        sampler = EpochKeyedSampler(len(items), self.seed)
        sampler.set_epoch(self._starting_epoch())
        return DataLoader(dataset, batch_size=self.contract.batch_size, sampler=sampler,
                          num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                          collate_fn=collate_skipping_bad, pin_memory=torch.cuda.is_available())

    def _view_train_loader(self, views: Views) -> DataLoader:
        stacked = self.views("train", views)
        items = stacked.features.shape[1]
        dataset = TensorDataset(
            stacked.features.flatten(0, 1), stacked.labels.repeat(views.n), stacked.index.repeat(views.n)
        )
        if self.contract.view_sampling == "pool":
            sampler = ViewPoolSampler(items, views.n, self.seed, self.contract.batch_size)
        else:
            sampler = ViewPerEpochSampler(items, views.n, self.seed)
        sampler.set_epoch(self._starting_epoch())
        return DataLoader(dataset, batch_size=self.contract.batch_size, sampler=sampler)

    def train_dataloader(self) -> DataLoader:
        if self.contract.inputs == "images":
            return self._image_train_loader()
        if self.contract.train_views is None:
            raise PromptbenchError("a 'features' method that trains must declare the train_views it trains on")
        return self._view_train_loader(self.contract.train_views)

    def eval_dataloader(self, name: str) -> DataLoader:
        if self.contract.inputs == "features":
            features = self.features(name)
            dataset = TensorDataset(features.features, features.labels, features.index)
            return DataLoader(dataset, batch_size=self.eval_batch_size)
        return image_loader(self.sets[name].items, self.test_transform, batch_size=self.eval_batch_size,
                            num_workers=self.num_workers, skip_bad_images=self.skip_bad_images)

    def pixel_dataloader(self, name: str) -> DataLoader:
        """An eval set as [0, 1] pixels (the test transform before its normalisation), for any method: what an
        adversarial evaluation perturbs (robustness.py). Same order, batches and skipped images as `eval_dataloader`."""
        return image_loader(self.sets[name].items, pixel_transform(self.backbone.image_size),
                            batch_size=self.eval_batch_size, num_workers=self.num_workers,
                            skip_bad_images=self.skip_bad_images)

    def state_dict(self) -> dict[str, Any]:
        return {}


class ContractFeatures:
    """The `FeatureProvider` a method's `prepare` gets: features of the sets it declared, and only those."""

    def __init__(self, datamodule: FewShotDataModule, reads: Sequence[str]):
        self._datamodule = datamodule
        self._reads = tuple(reads)

    def _check(self, split: str) -> None:
        if split not in self._reads:
            raise PromptbenchError(f"the method read set '{split}', which its data contract does not declare "
                                   f"(reads={list(self._reads)}); add it to the contract's reads")

    def features(self, split: str) -> FeatureSet:
        self._check(split)
        return self._datamodule.features(split)

    def views(self, split: str, views: Views) -> FeatureViews:
        self._check(split)
        return self._datamodule.views(split, views)

    def images(self, split: str) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        self._check(split)
        return self._datamodule.images(split)

    def label_only_classes(self) -> list[int]:
        return list(self._datamodule.label_only_classes)

    def device(self) -> torch.device:
        return self._datamodule.device
