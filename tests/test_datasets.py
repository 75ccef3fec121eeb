"""The CoOp benchmark datasets on tiny fake layouts: class-name rules, split files and their building,
the few-shot split cache, reference-pickle import, and `promptbench data check`."""

from __future__ import annotations

import json
import logging
import os
import pickle
import random
import re
import sys
import types
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy.io import savemat

from promptbench.cli import main as cli_main
from promptbench.data.datasets import (
    DATASETS,
    DTD,
    FGVCAircraft,
    Caltech101,
    EuroSAT,
    Food101,
    ImageNet,
    ImageNetA,
    ImageNetR,
    ImageNetSketch,
    ImageNetV2,
    OxfordFlowers,
    OxfordPets,
    StanfordCars,
    SUN397,
    UCF101,
    imagenet_labels,
)
from promptbench.data.fewshot import val_shots
from promptbench.data.items import Item
from promptbench.errors import PromptbenchError
from test_data import reference_generate_fewshot

BENCHMARK = ["imagenet", "caltech101", "oxford_pets", "stanford_cars", "oxford_flowers", "food101", "fgvc_aircraft",
             "sun397", "dtd", "eurosat", "ucf101", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]


# ---- fake layouts ----------------------------------------------------------------------------------------
def image(path: Path, shade: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (6, 5), (shade % 256, 40, 90)).save(path)
    return path


def folder_per_class(root: Path, image_subdir: str, counts: dict[str, int]) -> Path:
    for index, (name, count) in enumerate(counts.items()):
        for i in range(count):
            image(root / image_subdir / name / f"{name}_{i:03d}.jpg", index * 30 + i)
    return root


def write_lines(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def make_pets(root: Path) -> Path:
    breeds = {"Abyssinian": 1, "american_bulldog": 2, "Egyptian_Mau": 3}
    for kind, count in (("trainval", 6), ("test", 2)):
        lines = []
        for breed, label in breeds.items():
            for i in range(count):
                name = f"{breed}_{i + (100 if kind == 'test' else 1)}"
                image(root / "images" / f"{name}.jpg", label)
                lines.append(f"{name} {label} 1 {label}")
        write_lines(root / "annotations" / f"{kind}.txt", lines)
    return root


def make_sun397(root: Path) -> Path:
    classes = ["/a/abbey", "/b/bakery/shop", "/c/church/indoor"]
    write_lines(root / "ClassName.txt", classes)
    for kind, count in (("Training_01.txt", 5), ("Testing_01.txt", 2)):
        lines = []
        for category in classes:
            for i in range(count):
                relpath = f"{category}/sun_{kind[:4]}_{i}.jpg"
                image(root / "SUN397" / relpath.lstrip("/"))
                lines.append(relpath)
        write_lines(root / kind, lines)
    return root


def make_ucf101(root: Path) -> Path:
    actions = ["ApplyEyeMakeup", "YoYo", "PlayingDaf"]
    lists = root / "ucfTrainTestlist"
    write_lines(lists / "classInd.txt", [f"{i + 1} {action}" for i, action in enumerate(actions)])
    for kind, count in (("trainlist01.txt", 5), ("testlist01.txt", 2)):
        lines = []
        for label, action in enumerate(actions):
            folder = "_".join(re.findall("[A-Z][^A-Z]*", action))
            for i in range(count):
                video = f"v_{action}_g{kind[:4]}_c{i:02d}"
                image(root / "UCF-101-midframes" / folder / f"{video}.jpg")
                lines.append(f"{action}/{video}.avi" + (f" {label + 1}" if kind.startswith("train") else ""))
        write_lines(lists / kind, lines)
    return root


def make_cars(root: Path) -> Path:
    names = ["AM General Hummer SUV 2000", "Tesla Model S Sedan 2012", "smart fortwo Convertible 2012"]
    meta = np.empty((1, len(names)), dtype=object)
    meta[0, :] = names
    (root / "devkit").mkdir(parents=True)
    savemat(root / "devkit" / "cars_meta.mat", {"class_names": meta})
    for annotations_file, folder, count in (("devkit/cars_train_annos.mat", "cars_train", 5),
                                            ("cars_test_annos_withlabels.mat", "cars_test", 2)):
        entries = [(f"{label}{i:04d}.jpg", label + 1) for label in range(len(names)) for i in range(count)]
        annotations = np.zeros((1, len(entries)), dtype=[("fname", "O"), ("class", "O")])
        for index, (fname, label) in enumerate(entries):
            annotations[0, index] = (fname, np.array([[label]], dtype=np.uint8))
            image(root / folder / fname, label)
        savemat(root / annotations_file, {"annotations": annotations})
    return root


def make_flowers(root: Path) -> Path:
    labels = [2, 1, 3, 1, 2, 3] * 4  # classes appear in the order 2, 1, 3
    root.mkdir(parents=True)
    savemat(root / "imagelabels.mat", {"labels": np.array([labels])})
    (root / "cat_to_name.json").write_text(json.dumps({"1": "pink primrose", "2": "globe thistle", "3": "sunflower"}))
    for index, label in enumerate(labels):
        image(root / "jpg" / f"image_{index + 1:05d}.jpg", label)
    return root


def make_aircraft(root: Path) -> Path:
    variants = ["707-320", "A300B4", "F/A-18"]
    write_lines(root / "variants.txt", variants)
    for split, count in (("train", 3), ("val", 2), ("test", 2)):
        lines = []
        for label, variant in enumerate(variants):
            for i in range(count):
                image_id = f"{label}{split[:2]}{i}"
                image(root / "images" / f"{image_id}.jpg")
                lines.append(f"{image_id} {variant}")
        write_lines(root / f"images_variant_{split}.txt", lines)
    return root


WNIDS = {"n01440764": "tench", "n01443537": "goldfish", "n01484850": "great white shark"}


def write_classnames(root: Path) -> None:
    write_lines(root / "classnames.txt", [f"{wnid} {name}" for wnid, name in WNIDS.items()])


def make_imagenet(root: Path) -> Path:
    write_classnames(root)
    for split, count in (("train", 6), ("val", 2)):
        for index, wnid in enumerate(WNIDS):
            for i in range(count):
                image(root / "images" / split / wnid / f"{wnid}_{i}.JPEG", index)
    return root


def make_wnid_variant(root: Path, image_subdir: str, wnids: list[str]) -> Path:
    write_classnames(root)
    for wnid in wnids:
        for i in range(2):
            image(root / image_subdir / wnid / f"{i}.jpg")
    (root / image_subdir / "README.txt").write_text("not a class")
    return root


def make_v2(root: Path) -> Path:
    write_classnames(root)
    for label in range(len(WNIDS)):
        for i in range(2):
            image(root / "imagenetv2-matched-frequency-format-val" / str(label) / f"{i}.jpeg")
    return root


def make_benchmark(name: str, data_root: Path) -> Path:
    """The fake layout of dataset `name` in its default folder under `data_root`."""
    root = data_root / DATASETS[name].folder
    makers = {
        "imagenet": make_imagenet,
        "caltech101": lambda r: folder_per_class(r, "101_ObjectCategories", {
            "BACKGROUND_Google": 5, "Faces": 5, "Faces_easy": 5, "Leopards": 5, "airplanes": 5, "accordion": 5}),
        "oxford_pets": make_pets,
        "stanford_cars": make_cars,
        "oxford_flowers": make_flowers,
        "food101": lambda r: folder_per_class(r, "images", {"apple_pie": 5, "ramen": 6, "sushi": 4}),
        "fgvc_aircraft": make_aircraft,
        "sun397": make_sun397,
        "dtd": lambda r: folder_per_class(r, "images", {"banded": 8, "dotted": 7, "striped": 9, "woven": 6, "zigzagged": 5}),
        "eurosat": lambda r: folder_per_class(r, "2750", {"AnnualCrop": 5, "Forest": 5, "SeaLake": 6}),
        "ucf101": make_ucf101,
        "imagenet_v2": make_v2,
        "imagenet_sketch": lambda r: make_wnid_variant(r, "images", list(WNIDS)),
        "imagenet_a": lambda r: make_wnid_variant(r, "imagenet-a", ["n01484850", "n01440764"]),
        "imagenet_r": lambda r: make_wnid_variant(r, "imagenet-r", ["n01443537"]),
    }
    return makers[name](root)


@pytest.fixture()
def data_root(tmp_path) -> Path:
    return tmp_path / "data"


def open_seeded(cls, root: Path, seed: int = 1, **kwargs):
    random.seed(seed)  # the runner seeds the global stream right before building the dataset
    return cls(root, **kwargs)


# ---- every dataset ---------------------------------------------------------------------------------------
def test_every_benchmark_dataset_is_registered_with_a_config():
    conf = Path(__file__).resolve().parents[1] / "conf" / "dataset"
    for name in BENCHMARK:
        assert name in DATASETS
        text = (conf / f"{name}.yaml").read_text()
        assert f"name: {name}\n" in text and f"root: ${{data_root}}/{DATASETS[name].folder}\n" in text


@pytest.mark.parametrize("name", BENCHMARK)
def test_each_dataset_reads_its_fake_layout(name, data_root):
    root = make_benchmark(name, data_root)
    dataset = open_seeded(DATASETS[name], root)
    assert dataset["test"].items
    assert dataset.test_only == (name in ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"))
    for split in ("train", "val", "test"):
        for item in dataset[split].items:
            assert Path(item.path).is_file() and dataset.classnames[item.label] == item.classname
    if dataset.split_file:  # built, saved, and read back identically
        again = DATASETS[name](root)
        assert (root / dataset.split_file).is_file()
        assert all(again[s].items == dataset[s].items for s in ("train", "val", "test"))


def test_templates_follow_the_protocol():
    expected = {
        "oxford_pets": "a photo of a {}, a type of pet.", "oxford_flowers": "a photo of a {}, a type of flower.",
        "fgvc_aircraft": "a photo of a {}, a type of aircraft.", "dtd": "{} texture.",
        "eurosat": "a centered satellite photo of {}.", "food101": "a photo of {}, a type of food.",
        "ucf101": "a photo of a person doing {}.",
    }
    for name in BENCHMARK:
        assert DATASETS[name].templates == (expected.get(name, "a photo of a {}."),), name


# ---- class-name rules ------------------------------------------------------------------------------------
def test_caltech_ignores_and_renames_classes(data_root):
    dataset = open_seeded(Caltech101, make_benchmark("caltech101", data_root))
    assert dataset.classnames == ["face", "leopard", "accordion", "airplane"]  # sorted folders: upper case first


def test_eurosat_renames(data_root):
    dataset = open_seeded(EuroSAT, make_benchmark("eurosat", data_root))
    assert dataset.classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]


def test_pets_breed_from_file_name(data_root):
    dataset = open_seeded(OxfordPets, make_benchmark("oxford_pets", data_root))
    assert dataset.classnames == ["abyssinian", "american_bulldog", "egyptian_mau"]
    assert [len(dataset[s]) for s in ("train", "val", "test")] == [15, 3, 6]  # round(20% of 6) = 1 per class to val


def test_sun397_names(data_root):
    dataset = open_seeded(SUN397, make_benchmark("sun397", data_root))
    assert dataset.classnames == ["abbey", "shop bakery", "indoor church"]
    assert dataset["test"].items[0].path.endswith("SUN397/a/abbey/sun_Test_0.jpg")


def test_ucf101_camel_case(data_root):
    dataset = open_seeded(UCF101, make_benchmark("ucf101", data_root))
    assert dataset.classnames == ["Apply_Eye_Makeup", "Yo_Yo", "Playing_Daf"]


def test_cars_year_to_front_and_paths_relative_to_dataset_folder(data_root):
    root = make_benchmark("stanford_cars", data_root)
    dataset = open_seeded(StanfordCars, root)
    assert dataset.classnames == ["2000 AM General Hummer SUV", "2012 Tesla Model S Sedan", "2012 smart fortwo Convertible"]
    saved = json.loads((root / "split_zhou_StanfordCars.json").read_text())
    assert saved["test"][0][0].startswith("cars_test/")


def test_flowers_names_and_labels_from_annotations(data_root):
    dataset = open_seeded(OxfordFlowers, make_benchmark("oxford_flowers", data_root))
    assert dataset.classnames == ["pink primrose", "globe thistle", "sunflower"]
    assert [len(dataset[s]) for s in ("train", "val", "test")] == [12, 6, 6]


def test_aircraft_variants_label_by_line(data_root):
    dataset = open_seeded(FGVCAircraft, make_benchmark("fgvc_aircraft", data_root))
    assert dataset.classnames == ["707-320", "A300B4", "F/A-18"]
    assert [len(dataset[s]) for s in ("train", "val", "test")] == [9, 6, 6]


def test_imagenet_family_wnids_and_mapping(data_root):
    imagenet = open_seeded(ImageNet, make_benchmark("imagenet", data_root))
    assert imagenet.wnids == sorted(WNIDS) and imagenet.classnames == ["tench", "goldfish", "great white shark"]
    assert imagenet["val"].items == imagenet["test"].items and len(imagenet["train"]) == 18
    variant_a = ImageNetA(make_benchmark("imagenet_a", data_root))  # README.txt is skipped
    assert variant_a.wnids == ["n01440764", "n01484850"] and variant_a.classnames == ["tench", "great white shark"]
    assert imagenet_labels(variant_a, imagenet) == [0, 2]
    assert imagenet_labels(ImageNetR(make_benchmark("imagenet_r", data_root)), imagenet) == [1]
    v2 = ImageNetV2(make_benchmark("imagenet_v2", data_root))
    assert v2.wnids == list(WNIDS) and imagenet_labels(v2, imagenet) == [0, 1, 2]
    assert ImageNetSketch(make_benchmark("imagenet_sketch", data_root)).wnids == sorted(WNIDS)



def test_imagenet_without_classnames_file_takes_clip_names_in_sorted_wnid_order(data_root, caplog):
    root = data_root / "imagenet"
    wnids = [f"n{index:08d}" for index in range(1000)]
    for split in ("train", "val"):
        for wnid in random.Random(0).sample(wnids, len(wnids)):
            (root / "images" / split / wnid).mkdir(parents=True)
            (root / "images" / split / wnid / "0.JPEG").touch()  # building the split lists files, never opens them
    with caplog.at_level(logging.INFO):
        imagenet = ImageNet(root)
    assert "no " + str(root / "classnames.txt") + "; using open_clip's CLIP ImageNet class names" in caplog.text
    assert imagenet.wnids == wnids and len(imagenet.classnames) == 1000
    # CLIP's names, in the order of its Prompt_Engineering_for_ImageNet notebook
    assert imagenet.classnames[:3] + imagenet.classnames[7:8] + imagenet.classnames[-1:] == [
        "tench", "goldfish", "great white shark", "rooster", "toilet paper"]
    assert [item.classname for item in imagenet["test"].items] == imagenet.classnames
    # CLIP's names give two pairs of classes one name each: the published protocol, kept and noted, not refused.
    [shared] = imagenet.data_notes
    assert "'missile' (label 657" in shared and "'sunglasses' (label 837" in shared and shared in caplog.messages

    write_lines(root / "classnames.txt", [f"{wnid} class {index}" for index, wnid in enumerate(wnids)])
    (root / "split_promptbench_index.json").unlink()
    assert ImageNet(root).classnames[7] == "class 7"


def test_imagenet_without_classnames_file_needs_the_1000_classes(data_root):
    root = make_benchmark("imagenet", data_root)
    (root / "classnames.txt").unlink()
    with pytest.raises(PromptbenchError, match=r"no .*classnames.txt, and the 3 class folders in .*train are not the 1000"):
        ImageNet(root)

# ---- split building equals the reference's algorithm --------------------------------------------------------
def reference_read_and_split_data(image_dir: Path, ignored=(), new_cnames=None, p_trn=0.5, p_val=0.2):
    """The reference's DTD.read_and_split_data, restated (with a sorted file listing, as documented)."""
    categories = sorted(c for c in os.listdir(image_dir) if c not in ignored)
    train, val, test = [], [], []
    for label, category in enumerate(categories):
        images = [str(image_dir / category / name) for name in sorted(os.listdir(image_dir / category))]
        random.shuffle(images)
        n_train, n_val = round(len(images) * p_trn), round(len(images) * p_val)
        classname = (new_cnames or {}).get(category, category)
        train += [Item(p, label, classname) for p in images[:n_train]]
        val += [Item(p, label, classname) for p in images[n_train:n_train + n_val]]
        test += [Item(p, label, classname) for p in images[n_train + n_val:]]
    return {"train": train, "val": val, "test": test}


def reference_split_trainval(trainval: list[Item], p_val=0.2):
    """The reference's OxfordPets.split_trainval, restated."""
    tracker = defaultdict(list)
    for idx, item in enumerate(trainval):
        tracker[item.label].append(idx)
    train, val = [], []
    for label, idxs in tracker.items():
        n_val = round(len(idxs) * p_val)
        random.shuffle(idxs)
        for n, idx in enumerate(idxs):
            (val if n < n_val else train).append(trainval[idx])
    return train, val


@pytest.mark.parametrize("seed", [1, 2, 3])
@pytest.mark.parametrize("name,cls,kwargs", [
    ("dtd", DTD, {}),
    ("food101", Food101, {}),
    ("eurosat", EuroSAT, {"new_cnames": EuroSAT.renames}),
    ("caltech101", Caltech101, {"ignored": Caltech101.ignored, "new_cnames": Caltech101.renames}),
])
def test_folder_split_equals_reference(name, cls, kwargs, seed, data_root):
    root = make_benchmark(name, data_root)
    dataset = open_seeded(cls, root, seed)
    random.seed(seed)
    expected = reference_read_and_split_data(root / cls.image_subdir, **kwargs)
    assert {s: dataset[s].items for s in expected} == expected


@pytest.mark.parametrize("seed", [1, 2])
def test_trainval_split_equals_reference(seed, data_root):
    root = make_benchmark("oxford_pets", data_root)
    dataset = open_seeded(OxfordPets, root, seed)
    trainval = OxfordPets.read_list(dataset, "trainval")
    random.seed(seed)
    train, val = reference_split_trainval(trainval)
    assert dataset["train"].items == train and dataset["val"].items == val
    assert dataset["test"].items == OxfordPets.read_list(dataset, "test")


def test_published_split_file_is_read_as_is(data_root):
    root = make_benchmark("dtd", data_root)
    relpaths = sorted(p.relative_to(root / "images").as_posix() for p in (root / "images").rglob("*.jpg"))
    published = {"train": [[relpaths[0], 0, "banded"]], "val": [[relpaths[1], 0, "banded"]],
                 "test": [[relpaths[2], 0, "banded"]]}
    (root / DTD.split_file).write_text(json.dumps(published))
    dataset = DTD(root)
    assert dataset["train"].items == [Item(str(root / "images" / relpaths[0]), 0, "banded")]
    del published["val"]
    (root / DTD.split_file).write_text(json.dumps(published))
    with pytest.raises(PromptbenchError, match=r"has no \['val'\] entry"):
        DTD(root)


def test_missing_folder_and_annotations_say_how_to_get_them(data_root):
    with pytest.raises(PromptbenchError, match="(?s)does not exist.*robots.ox.ac.uk/~vgg/data/pets"):
        OxfordPets(data_root / "oxford_pets")
    root = make_benchmark("oxford_pets", data_root)
    (root / "annotations" / "test.txt").unlink()
    with pytest.raises(PromptbenchError, match=r"missing .*annotations/test.txt \(and no split_zhou_OxfordPets.json\)"):
        OxfordPets(root)


# ---- few-shot split cache ------------------------------------------------------------------------------------
@pytest.mark.parametrize("shots,seed", [(1, 1), (2, 2), (4, 3)])
def test_fewshot_sampling_equals_reference_and_is_cached(shots, seed, data_root):
    root = make_benchmark("dtd", data_root)
    dataset = open_seeded(DTD, root, seed)
    state = random.getstate()
    train, val = dataset.fewshot_splits(shots, seed)
    random.setstate(state)
    assert train == reference_generate_fewshot(dataset["train"].items, shots)
    assert val == reference_generate_fewshot(dataset["val"].items, val_shots(shots))
    cache = root / "split_fewshot" / f"shot_{shots}-seed_{seed}.json"
    assert json.loads(cache.read_text())["train"][0][0] == Path(train[0].path).relative_to(root / "images").as_posix()
    random.seed(999)  # another stream: the cached split must come back unchanged
    assert DTD(root).fewshot_splits(shots, seed) == (train, val)


def test_fewshot_cache_dir_for_read_only_data(data_root, tmp_path):
    root = make_benchmark("dtd", data_root)
    DTD(root)  # writes the split file while the folder is writable
    cache_dir = tmp_path / "cache"
    dataset = DTD(root, split_cache_dir=cache_dir)
    train, val = dataset.fewshot_splits(2, 1)
    assert (cache_dir / "split_fewshot" / "shot_2-seed_1.json").is_file()
    assert not (root / "split_fewshot").exists()
    assert DTD(root, split_cache_dir=cache_dir).fewshot_splits(2, 1) == (train, val)


def test_read_only_data_folder_warns_and_continues(data_root, caplog, monkeypatch):
    root = make_benchmark("dtd", data_root)
    DTD(root)

    def read_only(path, *args):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("promptbench.data.datasets.benchmark.write_split_file", read_only)
    train, _ = DTD(root).fewshot_splits(2, 1)
    assert len(train) == 10 and "dataset.split_cache_dir" in caplog.text and "Permission denied" in caplog.text


def test_fewshot_cache_write_is_atomic(data_root, monkeypatch):
    root = make_benchmark("dtd", data_root)
    dataset = DTD(root)

    def crash(*args, **kwargs):
        raise RuntimeError("killed while writing")

    monkeypatch.setattr("promptbench.io.json.dumps", crash)
    with pytest.raises(RuntimeError):
        dataset.fewshot_splits(2, 1)
    assert list((root / "split_fewshot").iterdir()) == []  # neither a partial file nor a temporary one


def test_stale_fewshot_cache_is_refused(data_root):
    root = make_benchmark("dtd", data_root)
    DTD(root).fewshot_splits(1, 1)
    cache = root / "split_fewshot" / "shot_1-seed_1.json"
    payload = json.loads(cache.read_text())
    payload["train"][0][1] = 4  # a label that does not match the dataset
    cache.write_text(json.dumps(payload))
    with pytest.raises(PromptbenchError, match="delete it to resample"):
        DTD(root).fewshot_splits(1, 1)


# ---- reference pickles ---------------------------------------------------------------------------------------
DASSL_MODULES = ("dassl", "dassl.data", "dassl.data.datasets", "dassl.data.datasets.base_dataset")


def pickle_like_the_reference(path: Path, payload: dict[str, list[Item]], old_image_dir: str) -> None:
    """Pickle Dassl `Datum` objects with absolute paths, using a stand-in dassl module that is then removed."""
    modules = {name: types.ModuleType(name) for name in DASSL_MODULES}

    class Datum:
        def __init__(self, impath, label, classname, domain=0):
            self._impath, self._label, self._domain, self._classname = impath, label, domain, classname

    Datum.__module__, Datum.__qualname__ = DASSL_MODULES[-1], "Datum"
    modules[DASSL_MODULES[-1]].Datum = Datum
    sys.modules.update(modules)
    try:
        data = {split: [Datum(f"{old_image_dir}/{rel}", label, name) for rel, label, name in items]
                for split, items in payload.items()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(pickle.dumps(data, protocol=pickle.HIGHEST_PROTOCOL))
    finally:
        for name in DASSL_MODULES:
            sys.modules.pop(name)


def as_triples(items: list[Item], image_dir: Path) -> list[tuple]:
    return [(Path(i.path).relative_to(image_dir).as_posix(), i.label, i.classname) for i in items]


def test_reference_pickle_is_imported_with_rebased_paths(data_root):
    root = make_benchmark("dtd", data_root)
    dataset = open_seeded(DTD, root)
    chosen_train, chosen_val = dataset["train"].items[::3], dataset["val"].items[:2]
    pickle_like_the_reference(
        root / "split_fewshot" / "shot_2-seed_1.pkl",
        {"train": as_triples(chosen_train, root / "images"), "val": as_triples(chosen_val, root / "images")},
        "/home/someone/DATA/dtd/images",
    )
    assert "dassl" not in sys.modules
    assert dataset.fewshot_splits(2, 1) == (chosen_train, chosen_val)
    assert (root / "split_fewshot" / "shot_2-seed_1.json").is_file()  # imported once, then read as JSON
    assert DTD(root).fewshot_splits(2, 1) == (chosen_train, chosen_val)


def test_reference_pickle_with_missing_files_lists_them(data_root):
    root = make_benchmark("dtd", data_root)
    dataset = open_seeded(DTD, root)
    chosen = dataset["train"].items[:3]
    pickle_like_the_reference(root / "split_fewshot" / "shot_1-seed_5.pkl",
                              {"train": as_triples(chosen, root / "images"), "val": []}, "/old/dtd/images")
    Path(chosen[2].path).unlink()
    with pytest.raises(PromptbenchError, match=rf"(?s)1 image\(s\) do not exist.*{re.escape(chosen[2].path)}"):
        dataset.fewshot_splits(1, 5)


def test_reference_pickle_with_other_classes_is_refused(data_root):
    root = make_benchmark("dtd", data_root)
    path = root / "split_fewshot" / "shot_1-seed_1.pkl"
    path.parent.mkdir(parents=True)
    path.write_bytes(pickle.dumps({"train": [Path("/x")]}))
    with pytest.raises(PromptbenchError, match="only dassl.data.datasets.base_dataset.Datum"):
        open_seeded(DTD, root).fewshot_splits(1, 1)


# ---- promptbench data check ----------------------------------------------------------------------------------
def test_data_check_on_a_good_folder(data_root, capsys):
    root = make_benchmark("eurosat", data_root)
    assert cli_main(["data", "check", "eurosat", "--root", str(root)]) == 0
    out = capsys.readouterr().out
    assert re.search(r"Sea or Lake\s+3\s+1\s+2", out) and "split_zhou_EuroSAT.json" in out and out.strip().endswith("ok")
    assert not (root / "split_zhou_EuroSAT.json").exists()  # checking writes nothing


def test_data_check_reports_missing_and_unreadable_files(data_root, capsys):
    root = make_benchmark("eurosat", data_root)
    dataset = open_seeded(EuroSAT, root)  # saves the split file the check then follows
    missing, corrupt = dataset["test"].items[0].path, dataset["train"].items[0].path
    Path(missing).unlink()
    Path(corrupt).write_bytes(b"\xff\xd8\xff truncated")
    assert cli_main(["data", "check", "eurosat", "--root", str(root)]) == 2
    captured = capsys.readouterr()
    assert f"missing: {missing}" in captured.out and f"unreadable (" in captured.out and corrupt in captured.out
    assert "2 missing or unreadable image(s)" in captured.err


def test_data_check_on_a_missing_dataset_says_how_to_get_it(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PROMPTBENCH_DATA", str(tmp_path))
    assert cli_main(["data", "check", "ucf101"]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "ucf101") in err and "UCF-101-midframes" in err and "crcv.ucf.edu" in err


# ---- promptbench data splits ---------------------------------------------------------------------------------
def test_data_splits_writes_the_split_a_run_trains_on(data_root, tmp_path, capsys):
    root = make_benchmark("eurosat", data_root)
    assert cli_main(["data", "splits", "eurosat", "--root", str(root), "--shots", "1", "--seed", "2", "--list"]) == 0
    printed = capsys.readouterr().out
    assert (root / "split_fewshot" / "shot_1-seed_2.json").is_file() and printed.startswith("train: ")
    listed = [Path(line.split("\t")[2]).relative_to(root) for line in printed.splitlines() if line.startswith("  ")]

    fresh = make_benchmark("eurosat", tmp_path / "fresh")  # same files, no split file or cache yet
    train, val = open_seeded(EuroSAT, fresh, seed=2).fewshot_splits(1, 2)
    assert listed == [Path(item.path).relative_to(fresh) for item in [*train, *val]]


def test_data_splits_reads_the_folder_a_run_reads_under_promptbench_root(tmp_path, capsys, monkeypatch):
    # A run's data_root is $PROMPTBENCH_DATA, else $PROMPTBENCH_ROOT/data: the command must look there too.
    root = make_benchmark("eurosat", tmp_path / "data")
    monkeypatch.delenv("PROMPTBENCH_DATA", raising=False)
    monkeypatch.setenv("PROMPTBENCH_ROOT", str(tmp_path))
    monkeypatch.chdir(tmp_path.parent)
    assert cli_main(["data", "splits", "eurosat", "--shots", "1", "--seed", "2"]) == 0, capsys.readouterr().err
    assert (root / "split_fewshot" / "shot_1-seed_2.json").is_file() and capsys.readouterr().out.startswith("train: ")
