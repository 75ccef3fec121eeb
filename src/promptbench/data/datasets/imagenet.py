"""ImageNet and its four test-only variants (V2, Sketch, A, R), all labelled by WordNet ids (wnids).

Every dataset of the family exposes `wnids[label]`. ImageNet-A and -R cover 200 of the 1000 classes with
labels 0..199 over their sorted wnids (as the reference); `imagenet_labels(variant, imagenet)` maps each
variant label to its ImageNet label, which the domain-generalization protocol uses to evaluate in
ImageNet's 1000-class space (so methods tied to the 1000 classes work) while scoring over the variant's
own classes only.

The folder listings are saved once per dataset in `split_promptbench_index.json` (the split-file format),
so a run does not list 1.28 M files; delete the file after changing the folder. Files inside a class
folder are sorted; the reference lists them with an unsorted `os.listdir`, so its ImageNet few-shot sets
depend on the filesystem (import its `split_fewshot/*.pkl` to reuse them exactly).
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path

from promptbench.data.datasets.benchmark import BenchmarkDataset, read_lines
from promptbench.data.datasets.folder import class_folders, list_images
from promptbench.data.items import Item
from promptbench.errors import PromptbenchError

log = logging.getLogger(__name__)

CLASSNAMES_FILE = "classnames.txt"
INDEX_FILE = "split_promptbench_index.json"
CLASSNAMES_NOTE = (
    "classnames.txt (lines '<wnid> <class name>') is linked from "
    "https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md"
)


def read_wnid_classnames(path: Path) -> dict[str, str]:
    """classnames.txt: `<wnid> <name with spaces>` per line, in ImageNet label order."""
    names = {}
    for line in read_lines(path):
        wnid, _, classname = line.partition(" ")
        names[wnid] = classname
    return names


class ImageNetFamily(BenchmarkDataset):
    split_file = INDEX_FILE
    split_sources = (CLASSNAMES_FILE,)
    # CLIP's ImageNet names, which CoOp's classnames.txt copies, give two pairs of classes one name each.
    published_shared_prompts = frozenset({"missile", "sunglasses"})

    def wnid_of(self, item: Item) -> str:
        """Class folders are named by wnid (ImageNetV2 overrides: its folders are numbered)."""
        return Path(item.path).parent.name

    def read_classnames(self, splits: dict[str, list[Item]]) -> list[str]:
        classnames = super().read_classnames(splits)
        wnid_of_label: dict[int, str] = {}
        for items in splits.values():
            for item in items:
                if item.label not in wnid_of_label:
                    wnid_of_label[item.label] = self.wnid_of(item)
        self.wnids = [wnid_of_label[label] for label in range(len(classnames))]
        return classnames

    def classnames_by_wnid(self) -> dict[str, str]:
        return read_wnid_classnames(self.root / CLASSNAMES_FILE)

    def list_wnid_folders(self, folder: Path, wnids: list[str], names: dict[str, str]) -> list[Item]:
        """Items of `folder/<wnid>/*` labelled by the position of their wnid in `wnids`."""
        label_of = {wnid: label for label, wnid in enumerate(wnids)}
        items = []
        for class_folder in class_folders(folder):
            wnid = class_folder.name
            if wnid not in label_of or wnid not in names:
                raise PromptbenchError(
                    f"dataset '{self.display_name}': folder {class_folder} is not a known wnid (not in "
                    f"{self.root / CLASSNAMES_FILE} or not a training class)"
                )
            items.extend(Item(str(path), label_of[wnid], names[wnid]) for path in list_images(class_folder))
        return items


class ImageNet(ImageNetFamily):
    name = "imagenet"
    folder = "imagenet"
    how_to_get = (
        "Download ILSVRC2012 from https://image-net.org so that <root> = <data_root>/imagenet holds "
        "images/train/<wnid>/*.JPEG and images/val/<wnid>/*.JPEG (val sorted into wnid folders). An optional "
        "classnames.txt sets the class names; without it they are CLIP's, which CoOp's file copies. "
        + CLASSNAMES_NOTE
    )
    # classnames.txt is optional here (see clip_classnames).
    split_sources = ()

    def build_splits(self) -> dict[str, list[Item]]:
        wnids = [folder.name for folder in class_folders(self.image_dir / "train")]
        names = self.classnames_by_wnid() if (self.root / CLASSNAMES_FILE).is_file() else self.clip_classnames(wnids)
        self.require("images/val")
        train = self.list_wnid_folders(self.image_dir / "train", wnids, names)
        # The standard practice the reference follows: the val images are the test set, and also the val set.
        test = self.list_wnid_folders(self.image_dir / "val", wnids, names)
        return {"train": train, "val": test, "test": test}

    def clip_classnames(self, wnids: list[str]) -> dict[str, str]:
        """CLIP's ImageNet class names, which CoOp's classnames.txt copies, matched to the sorted wnid folders.

        open_clip ships the names without wnids, in ImageNet's label order: the sorted order of the 1000 wnids.
        """
        # Imported here: open_clip loads torch, which listing a dataset otherwise never needs.
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        if len(wnids) != len(IMAGENET_CLASSNAMES):
            raise PromptbenchError(
                f"dataset '{self.display_name}': no {self.root / CLASSNAMES_FILE}, and the {len(wnids)} class folders "
                f"in {self.image_dir / 'train'} are not the {len(IMAGENET_CLASSNAMES)} ILSVRC2012 classes CLIP's "
                f"ImageNet names are for. Add classnames.txt (lines '<wnid> <class name>', one per class folder) to "
                f"name another set of classes. " + CLASSNAMES_NOTE
            )
        log.info(
            "dataset '%s': no %s; using open_clip's CLIP ImageNet class names (the ones CoOp's classnames.txt "
            "copies), matched to the %d sorted wnid folders", self.display_name, self.root / CLASSNAMES_FILE, len(wnids),
        )
        return dict(zip(wnids, IMAGENET_CLASSNAMES))


class ImageNetVariant(ImageNetFamily):
    """A test-only variant laid out as `<images folder>/<wnid>/*`, labels over its sorted wnids."""

    test_only = True

    def build_splits(self) -> dict[str, list[Item]]:
        wnids = [folder.name for folder in class_folders(self.image_dir)]
        return {"train": [], "val": [], "test": self.list_wnid_folders(self.image_dir, wnids, self.classnames_by_wnid())}


class ImageNetSketch(ImageNetVariant):
    name = "imagenet_sketch"
    folder = "imagenet-sketch"
    how_to_get = (
        "Download ImageNet-Sketch from https://github.com/HaohanWang/ImageNet-Sketch so that "
        "<root> = <data_root>/imagenet-sketch holds images/<wnid>/*.JPEG and a copy of ImageNet's classnames.txt. "
        + CLASSNAMES_NOTE
    )


class ImageNetA(ImageNetVariant):
    name = "imagenet_a"
    folder = "imagenet-adversarial"
    image_subdir = "imagenet-a"
    how_to_get = (
        "Download imagenet-a.tar from https://github.com/hendrycks/natural-adv-examples so that "
        "<root> = <data_root>/imagenet-adversarial holds imagenet-a/<wnid>/*.jpg (200 wnids) and a copy of "
        "ImageNet's classnames.txt. " + CLASSNAMES_NOTE
    )


class ImageNetR(ImageNetVariant):
    name = "imagenet_r"
    folder = "imagenet-rendition"
    image_subdir = "imagenet-r"
    how_to_get = (
        "Download imagenet-r.tar from https://github.com/hendrycks/imagenet-r so that "
        "<root> = <data_root>/imagenet-rendition holds imagenet-r/<wnid>/*.jpg (200 wnids) and a copy of "
        "ImageNet's classnames.txt. " + CLASSNAMES_NOTE
    )


class ImageNetV2(ImageNetFamily):
    name = "imagenet_v2"
    folder = "imagenetv2"
    image_subdir = "imagenetv2-matched-frequency-format-val"
    test_only = True
    how_to_get = (
        "Download imagenetv2-matched-frequency.tar.gz from https://github.com/modestyachts/ImageNetV2 so that "
        "<root> = <data_root>/imagenetv2 holds imagenetv2-matched-frequency-format-val/<0..999>/*.jpeg and a copy of "
        "ImageNet's classnames.txt. " + CLASSNAMES_NOTE
    )

    def build_splits(self) -> dict[str, list[Item]]:
        names = self.classnames_by_wnid()
        # Folder <i> holds ImageNet class i, the i-th line of classnames.txt.
        items = []
        for label, wnid in enumerate(self.wnids_in_file_order):
            class_folder = self.image_dir / str(label)
            if not class_folder.is_dir():
                raise PromptbenchError(f"dataset '{self.display_name}': missing class folder {class_folder}")
            items.extend(Item(str(path), label, names[wnid]) for path in list_images(class_folder))
        return {"train": [], "val": [], "test": items}

    @cached_property
    def wnids_in_file_order(self) -> list[str]:
        return list(self.classnames_by_wnid())

    def wnid_of(self, item: Item) -> str:
        return self.wnids_in_file_order[int(Path(item.path).parent.name)]


def imagenet_labels(variant: ImageNetFamily, imagenet: ImageNet) -> list[int]:
    """For each label of `variant`, the ImageNet label of the same wnid."""
    label_of = {wnid: label for label, wnid in enumerate(imagenet.wnids)}
    unknown = [wnid for wnid in variant.wnids if wnid not in label_of]
    if unknown:
        raise PromptbenchError(
            f"dataset '{variant.display_name}': wnids {unknown[:5]} are not ImageNet classes under {imagenet.root}"
        )
    return [label_of[wnid] for wnid in variant.wnids]
