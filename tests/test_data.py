"""Datasets, image decoding and few-shot sampling."""

from __future__ import annotations

import random
from collections import defaultdict

import pytest
from PIL import Image

from conftest import COLOURS, draw_disc, write_split_dataset
from promptbench.data.datasets import FolderDataset
from promptbench.data.fewshot import sample_fewshot, val_shots
from promptbench.data.images import BadImageError, load_rgb
from promptbench.data.items import Item
from promptbench.errors import PromptbenchError
from promptbench.protocols import FewShot


def test_folder_dataset_reads_split_folders(toy_root):
    dataset = FolderDataset(toy_root)
    assert dataset.classnames == sorted(COLOURS)
    assert [len(dataset[s]) for s in ("train", "val", "test")] == [24, 9, 18]
    for item in dataset["test"].items:
        assert dataset.classnames[item.label] == item.classname
        assert f"/{item.classname}/" in item.path


def test_single_folder_is_split_deterministically(tmp_path):
    rng = random.Random(1)
    for name, rgb in COLOURS.items():
        (tmp_path / name).mkdir()
        for index in range(10):
            draw_disc(rgb, rng).save(tmp_path / name / f"{index}.png")
    first, second = FolderDataset(tmp_path), FolderDataset(tmp_path)
    assert [len(first[s]) for s in ("train", "val", "test")] == [15, 6, 9]
    assert first["train"].items == second["train"].items
    paths = [{i.path for i in first[s].items} for s in ("train", "val", "test")]
    assert not (paths[0] & paths[1] or paths[0] & paths[2] or paths[1] & paths[2])


def test_missing_root_says_how_to_fix(tmp_path):
    with pytest.raises(PromptbenchError, match=r"does not exist\. Set dataset\.root="):
        FolderDataset(tmp_path / "nowhere")


@pytest.mark.parametrize("mode", ["L", "P", "RGBA", "CMYK", "I;16"])
def test_any_image_mode_decodes_to_rgb(tmp_path, mode):
    image = draw_disc((200, 10, 10), random.Random(0))
    converted = image.convert(mode) if mode != "I;16" else image.convert("L").convert("I;16")
    suffix = ".jpg" if mode == "CMYK" else ".png"
    path = tmp_path / f"img{suffix}"
    converted.save(path)
    decoded = load_rgb(str(path))
    assert decoded.mode == "RGB" and decoded.size == image.size


def test_corrupt_and_missing_images_name_the_file(tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not a png")
    with pytest.raises(BadImageError, match="broken.png"):
        load_rgb(str(bad))
    with pytest.raises(BadImageError, match="file not found"):
        load_rgb(str(tmp_path / "absent.png"))


def reference_generate_fewshot(data_source: list[Item], num_shots: int) -> list[Item]:
    """Dassl's DatasetBase.generate_fewshot_dataset (repeat=False), restated independently."""
    tracker = defaultdict(list)
    for item in data_source:
        tracker[item.label].append(item)
    dataset = []
    for label, items in tracker.items():
        if len(items) >= num_shots:
            sampled_items = random.sample(items, num_shots)
        else:
            sampled_items = items
        dataset.extend(sampled_items)
    return dataset


def shuffled_items(n_classes=7, per_class=(3, 9), seed=5) -> list[Item]:
    rng = random.Random(seed)
    items = [Item(f"/d/{c}/{i}.jpg", c, f"class{c}") for c in range(n_classes) for i in range(rng.randint(*per_class))]
    rng.shuffle(items)  # labels appear in a non-sorted order, as in real split files
    return items


@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_fewshot_sampling_matches_the_reference(shots, seed):
    train, val = shuffled_items(seed=seed), shuffled_items(seed=seed + 100)
    random.seed(seed)
    expected_train = reference_generate_fewshot(train, shots)
    expected_val = reference_generate_fewshot(val, min(shots, 4))
    rng = random.Random(seed)
    assert sample_fewshot(train, shots, rng) == expected_train
    assert sample_fewshot(val, val_shots(shots), rng) == expected_val


def test_fewshot_protocol_continues_one_stream_from_the_run_seed(toy_root):
    dataset = FolderDataset(toy_root)
    random.seed(3)
    task = FewShot().build(dataset, 2)
    random.seed(3)
    expected_train = reference_generate_fewshot(dataset["train"].items, 2)
    expected_val = reference_generate_fewshot(dataset["val"].items, 2)
    assert task.train.items == expected_train and task.val.items == expected_val
    assert task.evals["test"].items == dataset["test"].items


def test_all_shots_and_bad_shots():
    items = shuffled_items()
    assert sample_fewshot(items, -1) == items
    with pytest.raises(PromptbenchError, match="shots must be >= 0"):
        sample_fewshot(items, -3)
