"""The ten non-ImageNet datasets of the CoOp few-shot benchmark (protocol.md sections 1 and 4).

Each class states its folder, images folder, split file, class-name rule and hand-crafted template; the
split-building rules they share live in benchmark.py. Class names are kept as the reference writes them
(e.g. "Apply_Eye_Makeup"); prompts replace "_" by " ".
"""

from __future__ import annotations

import json
import posixpath
import re
from pathlib import Path
from typing import ClassVar

from promptbench.data.datasets.benchmark import (
    BenchmarkDataset,
    read_lines,
    split_class_folders,
    split_groups,
    split_trainval,
)
from promptbench.data.items import Item
from promptbench.errors import PromptbenchError

SPLIT_FILES_NOTE = (
    "The split_zhou_*.json files are linked from https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md; "
    "without one the split is built as the reference builds it and saved."
)


def load_mat(path: Path) -> dict:
    from scipy.io import loadmat  # only needed when a split is built from the .mat annotations

    return loadmat(str(path))


class FolderPerClassDataset(BenchmarkDataset):
    """<images folder>/<class>/*: labels over the sorted class folders, split 50/20/30 per class."""

    ignored: ClassVar[tuple[str, ...]] = ()
    renames: ClassVar[dict[str, str]] = {}

    def build_splits(self) -> dict[str, list[Item]]:
        return split_class_folders(self.image_dir, self.display_name, self.ignored, self.renames)


class TrainvalListDataset(BenchmarkDataset):
    """An official trainval/test list; val is the reference's per-class 20% of trainval."""

    def read_list(self, kind: str) -> list[Item]:
        """The items of the official list `kind` ("trainval" or "test")."""
        raise NotImplementedError

    def build_splits(self) -> dict[str, list[Item]]:
        trainval, test = self.read_list("trainval"), self.read_list("test")
        train, val = split_trainval(trainval)
        return {"train": train, "val": val, "test": test}


class DTD(FolderPerClassDataset):
    name = "dtd"
    folder = "dtd"
    split_file = "split_zhou_DescribableTextures.json"
    templates = ("{} texture.",)
    how_to_get = (
        "Download dtd-r1.0.1.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/dtd/ and extract it so that "
        f"<root> = <data_root>/dtd holds images/<class>/*.jpg and split_zhou_DescribableTextures.json. {SPLIT_FILES_NOTE}"
    )


class Food101(FolderPerClassDataset):
    name = "food101"
    folder = "food-101"
    split_file = "split_zhou_Food101.json"
    templates = ("a photo of {}, a type of food.",)
    how_to_get = (
        "Download food-101.tar.gz from https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ and extract it so "
        f"that <root> = <data_root>/food-101 holds images/<class>/*.jpg and split_zhou_Food101.json. {SPLIT_FILES_NOTE}"
    )


class Caltech101(FolderPerClassDataset):
    name = "caltech101"
    folder = "caltech-101"
    image_subdir = "101_ObjectCategories"
    split_file = "split_zhou_Caltech101.json"
    ignored = ("BACKGROUND_Google", "Faces_easy")
    renames = {"airplanes": "airplane", "Faces": "face", "Leopards": "leopard", "Motorbikes": "motorbike"}
    how_to_get = (
        "Download 101_ObjectCategories.tar.gz from https://data.caltech.edu/records/mzrjq-6wc02 and extract it so "
        "that <root> = <data_root>/caltech-101 holds 101_ObjectCategories/<class>/*.jpg and "
        f"split_zhou_Caltech101.json. {SPLIT_FILES_NOTE}"
    )


class EuroSAT(FolderPerClassDataset):
    name = "eurosat"
    folder = "eurosat"
    image_subdir = "2750"
    split_file = "split_zhou_EuroSAT.json"
    templates = ("a centered satellite photo of {}.",)
    renames = {
        "AnnualCrop": "Annual Crop Land",
        "HerbaceousVegetation": "Herbaceous Vegetation Land",
        "Highway": "Highway or Road",
        "Industrial": "Industrial Buildings",
        "Pasture": "Pasture Land",
        "PermanentCrop": "Permanent Crop Land",
        "Residential": "Residential Buildings",
        "SeaLake": "Sea or Lake",
    }
    how_to_get = (
        "Download EuroSAT.zip (RGB) from https://github.com/phelber/EuroSAT and extract it so that "
        f"<root> = <data_root>/eurosat holds 2750/<class>/*.jpg and split_zhou_EuroSAT.json. {SPLIT_FILES_NOTE}"
    )


class OxfordFlowers(BenchmarkDataset):
    name = "oxford_flowers"
    folder = "oxford_flowers"
    image_subdir = "jpg"
    split_file = "split_zhou_OxfordFlowers.json"
    split_sources = ("imagelabels.mat", "cat_to_name.json")
    templates = ("a photo of a {}, a type of flower.",)
    how_to_get = (
        "Download 102flowers.tgz and imagelabels.mat from https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ so that "
        "<root> = <data_root>/oxford_flowers holds jpg/image_00001.jpg ..., imagelabels.mat, cat_to_name.json and "
        f"split_zhou_OxfordFlowers.json. {SPLIT_FILES_NOTE}"
    )

    def build_splits(self) -> dict[str, list[Item]]:
        labels = load_mat(self.root / "imagelabels.mat")["labels"][0]
        names = json.loads((self.root / "cat_to_name.json").read_text())
        # Images are numbered from 1 in label-file order; classes in order of first appearance, as the reference.
        paths: dict[int, list[Path]] = {}
        for index, label in enumerate(labels):
            paths.setdefault(int(label), []).append(self.image_dir / f"image_{index + 1:05d}.jpg")
        return split_groups(((label - 1, names[str(label)], group) for label, group in paths.items()), self.display_name)


class OxfordPets(TrainvalListDataset):
    name = "oxford_pets"
    folder = "oxford_pets"
    split_file = "split_zhou_OxfordPets.json"
    split_sources = ("annotations/trainval.txt", "annotations/test.txt")
    templates = ("a photo of a {}, a type of pet.",)
    how_to_get = (
        "Download images.tar.gz and annotations.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/pets/ and extract "
        "them so that <root> = <data_root>/oxford_pets holds images/*.jpg, annotations/{trainval,test}.txt and "
        f"split_zhou_OxfordPets.json. {SPLIT_FILES_NOTE}"
    )

    def read_list(self, kind: str) -> list[Item]:
        items = []
        for line in read_lines(self.root / "annotations" / f"{kind}.txt"):
            image, label = line.split()[:2]  # "<image> <class id> <species> <breed id>"
            breed = "_".join(image.split("_")[:-1]).lower()  # "Egyptian_Mau_12" -> "egyptian_mau"
            items.append(Item(str(self.image_dir / f"{image}.jpg"), int(label) - 1, breed))
        return items


class StanfordCars(TrainvalListDataset):
    name = "stanford_cars"
    folder = "stanford_cars"
    image_subdir = ""  # split-file paths start with cars_train/ or cars_test/
    split_file = "split_zhou_StanfordCars.json"
    split_sources = ("devkit/cars_train_annos.mat", "devkit/cars_meta.mat", "cars_test_annos_withlabels.mat")
    LISTS: ClassVar[dict[str, tuple[str, str]]] = {
        "trainval": ("devkit/cars_train_annos.mat", "cars_train"),
        "test": ("cars_test_annos_withlabels.mat", "cars_test"),
    }
    how_to_get = (
        "Get Stanford Cars (cars_train, cars_test, devkit, cars_test_annos_withlabels.mat; the original site is down, "
        "use a mirror such as https://www.kaggle.com/datasets/jessicali9530/stanford-cars-dataset) so that "
        "<root> = <data_root>/stanford_cars holds cars_train/*.jpg, cars_test/*.jpg, devkit/, "
        f"cars_test_annos_withlabels.mat and split_zhou_StanfordCars.json. {SPLIT_FILES_NOTE}"
    )

    @staticmethod
    def year_first(classname: str) -> str:
        """"Tesla Model S Sedan 2012" -> "2012 Tesla Model S Sedan"."""
        *words, year = classname.split(" ")
        return " ".join([year, *words])

    def read_list(self, kind: str) -> list[Item]:
        annotations_file, image_folder = self.LISTS[kind]
        annotations = load_mat(self.root / annotations_file)["annotations"][0]
        names = load_mat(self.root / "devkit" / "cars_meta.mat")["class_names"][0]
        items = []
        for annotation in annotations:
            label = int(annotation["class"][0, 0]) - 1
            path = self.root / image_folder / str(annotation["fname"][0])
            items.append(Item(str(path), label, self.year_first(str(names[label][0]))))
        return items


class SUN397(TrainvalListDataset):
    name = "sun397"
    folder = "sun397"
    image_subdir = "SUN397"
    split_file = "split_zhou_SUN397.json"
    split_sources = ("ClassName.txt", "Training_01.txt", "Testing_01.txt")
    LISTS: ClassVar[dict[str, str]] = {"trainval": "Training_01.txt", "test": "Testing_01.txt"}
    how_to_get = (
        "Download SUN397.tar.gz and Partitions.zip from https://vision.princeton.edu/projects/2010/SUN/ so that "
        "<root> = <data_root>/sun397 holds SUN397/a/abbey/*.jpg ..., ClassName.txt, Training_01.txt, Testing_01.txt "
        f"and split_zhou_SUN397.json. {SPLIT_FILES_NOTE}"
    )

    @staticmethod
    def readable(category: str) -> str:
        """"b/bakery/shop" -> "shop bakery": drop the letter folder, qualifiers such as indoor/outdoor first."""
        return " ".join(category.split("/")[1:][::-1])

    def read_list(self, kind: str) -> list[Item]:
        labels = {line[1:]: label for label, line in enumerate(read_lines(self.root / "ClassName.txt"))}
        items = []
        for line in read_lines(self.root / self.LISTS[kind]):
            relpath = line[1:]  # "/a/abbey/sun_x.jpg" -> "a/abbey/sun_x.jpg"
            category = posixpath.dirname(relpath)
            if category not in labels:
                raise PromptbenchError(f"{self.root / self.LISTS[kind]}: class '{category}' is not in ClassName.txt")
            items.append(Item(str(self.image_dir / relpath), labels[category], self.readable(category)))
        return items


class UCF101(TrainvalListDataset):
    name = "ucf101"
    folder = "ucf101"
    image_subdir = "UCF-101-midframes"
    split_file = "split_zhou_UCF101.json"
    split_sources = ("ucfTrainTestlist/classInd.txt", "ucfTrainTestlist/trainlist01.txt", "ucfTrainTestlist/testlist01.txt")
    LISTS: ClassVar[dict[str, str]] = {"trainval": "trainlist01.txt", "test": "testlist01.txt"}
    templates = ("a photo of a person doing {}.",)
    how_to_get = (
        "Download UCF-101-midframes.zip (linked from https://github.com/KaiyangZhou/CoOp/blob/main/DATASETS.md) and "
        "the ucfTrainTestlist from https://www.crcv.ucf.edu/data/UCF101.php so that <root> = <data_root>/ucf101 holds "
        "UCF-101-midframes/<Action_Name>/*.jpg, ucfTrainTestlist/ and split_zhou_UCF101.json. "
        f"{SPLIT_FILES_NOTE}"
    )

    @staticmethod
    def words(action: str) -> str:
        """"ApplyEyeMakeup" -> "Apply_Eye_Makeup" (also the name of its midframes folder)."""
        return "_".join(re.findall("[A-Z][^A-Z]*", action))

    def read_list(self, kind: str) -> list[Item]:
        lists = self.root / "ucfTrainTestlist"
        labels = {action: int(index) - 1 for index, action in (line.split() for line in read_lines(lists / "classInd.txt"))}
        items = []
        for line in read_lines(lists / self.LISTS[kind]):
            action, video = line.split()[0].split("/")  # "ApplyEyeMakeup/v_..._c01.avi [label]"
            name = self.words(action)
            items.append(Item(str(self.image_dir / name / video.replace(".avi", ".jpg")), labels[action], name))
        return items


class FGVCAircraft(BenchmarkDataset):
    name = "fgvc_aircraft"
    folder = "fgvc_aircraft"
    # No split file: the official lists are read on every run (a few thousand lines).
    split_sources = ("variants.txt", "images_variant_train.txt", "images_variant_val.txt", "images_variant_test.txt")
    templates = ("a photo of a {}, a type of aircraft.",)
    how_to_get = (
        "Download fgvc-aircraft-2013b.tar.gz from https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ and move its "
        "data/ folder to <root> = <data_root>/fgvc_aircraft, which then holds images/*.jpg, variants.txt and "
        "images_variant_{train,val,test}.txt."
    )

    def build_splits(self) -> dict[str, list[Item]]:
        labels = {variant: label for label, variant in enumerate(read_lines(self.root / "variants.txt"))}
        splits = {}
        for split in ("train", "val", "test"):
            listing = self.root / f"images_variant_{split}.txt"
            items = []
            for line in read_lines(listing):
                image, variant = line.split(" ", 1)  # "<image id> <variant name with spaces>"
                if variant not in labels:
                    raise PromptbenchError(f"{listing}: variant '{variant}' of image {image} is not in variants.txt")
                items.append(Item(str(self.image_dir / f"{image}.jpg"), labels[variant], variant))
            splits[split] = items
        return splits
