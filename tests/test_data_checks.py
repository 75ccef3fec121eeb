"""Data problems that would otherwise give silently wrong numbers or raw tracebacks: class names that collide
in the prompt, empty and short classes, skipped unreadable images, dataset roots that cannot be used."""

from __future__ import annotations

import errno
import logging
import os
import random
import shutil
import stat
from pathlib import Path

import pytest
import torch

from conftest import COLOURS, draw_disc
from promptbench.contract import DataContract
from promptbench.data.datamodule import FewShotDataModule
from promptbench.data.datasets import FolderDataset, SyntheticDataset
from promptbench.data.features import FeatureStore
from promptbench.data.items import Item, LabeledSet, class_counts
from promptbench.data.loading import image_loader
from promptbench.errors import PromptbenchError
from promptbench.protocols import FewShot
from test_feature_cache import KeyRecorder, stand_in_backbone


def write_classes(root: Path, images_per_split: dict[str, dict[str, int]]) -> Path:
    """root/<split>/<class>/<i>.png with the given number of images (0: an empty class folder)."""
    rng = random.Random(0)
    for split, classes in images_per_split.items():
        for name, count in classes.items():
            folder = root / split / name
            folder.mkdir(parents=True)
            for index in range(count):
                draw_disc((200, 40, 40), rng).save(folder / f"{index}.png")
    return root


@pytest.mark.parametrize("names", [("Cat", "cat"), ("sea_lion", "sea lion"), ("sea lion", " sea  lion ")])
def test_class_names_that_give_one_prompt_are_refused(tmp_path, names):
    root = write_classes(tmp_path / "pets", {split: {name: 2 for name in names} for split in ("train", "test")})
    with pytest.raises(PromptbenchError) as refused:
        FolderDataset(root)
    message = str(refused.value)
    assert f"dataset 'folder' under {root}" in message and "Rename the class folders" in message
    for name in names:
        assert f"{root}/train/{name}/" in message, "each colliding class is shown with a file of its folder"


def test_empty_class_folders_are_left_out_and_said_so(tmp_path, caplog):
    counts = {"blue": 5, "cyan": 0, "green": 5, "red": 5}  # an empty class between two others
    root = write_classes(tmp_path / "colours", {"train": counts, "val": counts, "test": counts})
    with caplog.at_level(logging.WARNING):
        dataset = FolderDataset(root)
    assert dataset.classnames == ["blue", "green", "red"]
    [note] = dataset.data_notes
    assert "class folder(s) without images are left out: ['cyan']" in note and str(root) in note
    assert note in caplog.messages


def test_single_folder_layout_leaves_out_empty_class_folders(tmp_path):
    for name, count in (("blue", 10), ("cyan", 0), ("red", 10)):
        (tmp_path / name).mkdir()
        for index in range(count):
            draw_disc(COLOURS.get(name, (0, 200, 200)), random.Random(index)).save(tmp_path / name / f"{index}.png")
    dataset = FolderDataset(tmp_path)
    assert dataset.classnames == ["blue", "red"] and "['cyan']" in dataset.data_notes[0]


def test_classes_short_of_the_shots_are_named_and_counted(tmp_path, caplog):
    root = write_classes(tmp_path / "colours", {"train": {"blue": 6, "green": 2, "red": 6},
                                                "val": {"blue": 4, "green": 4, "red": 1},
                                                "test": {"blue": 2, "green": 2, "red": 2}})
    dataset = FolderDataset(root)
    random.seed(1)
    with caplog.at_level(logging.WARNING):
        task = FewShot().build(dataset, 4)
    assert class_counts(task.train) == {"blue": 4, "green": 2, "red": 4}
    assert class_counts(task.val) == {"blue": 4, "green": 4, "red": 1}
    train_note, val_note = dataset.data_notes
    assert "1 of 3 classes have fewer than 4 train images and keep all they have" in train_note
    assert "1 of 3 classes have fewer than 4 val images and keep all they have" in val_note
    assert train_note.endswith("'green': 2") and val_note.endswith("'red': 1")
    assert [train_note, val_note] == [m for m in caplog.messages if "keep all they have" in m]
    dataset.fewshot_splits(1, None)
    assert dataset.data_notes == [], "the notes describe the last draw, not every draw so far"


def test_class_counts_cover_every_class_and_keep_shared_names_apart():
    items = [Item("a.png", 0, "missile"), Item("b.png", 2, "missile"), Item("c.png", 2, "missile")]
    assert class_counts(LabeledSet(items, ["missile", "cat", "missile"])) == {
        "missile [label 0]": 1, "cat": 0, "missile [label 2]": 2,
    }


@pytest.fixture()
def corrupt_train_root(toy_root, tmp_path) -> Path:
    root = shutil.copytree(toy_root, tmp_path / "corrupt")
    (root / "train" / "red" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return root


def fewshot_datamodule(task, contract: DataContract, store: FeatureStore, **options) -> FewShotDataModule:
    return FewShotDataModule(task.sets(), task.source, stand_in_backbone(), contract, device=torch.device("cpu"),
                             feature_store=store, num_workers=0, eval_batch_size=4, **options)


def test_unreadable_train_images_are_left_out_named_and_listed(corrupt_train_root, caplog):
    corrupt = str(corrupt_train_root / "train" / "red" / "0.png")
    task = FewShot().build(FolderDataset(corrupt_train_root), -1)  # every train image, the corrupt one too
    recorder = KeyRecorder()
    module = fewshot_datamodule(task, DataContract("images", batch_size=5), recorder, skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        batches = list(module.train_dataloader())
        features = module.features("train")
    [named] = [m for m in caplog.messages if corrupt in m]  # once, though the loader and the features read the set
    assert named.startswith(f"folder/train: skipped unreadable image {corrupt} (") and "Error" in named
    assert module.skipped_images() == {"train": [corrupt]}, "val has not been read yet"
    module.labeled_set("val")
    assert module.skipped_images() == {"train": [corrupt], "val": []}
    assert class_counts(module.labeled_set("train")) == {"blue": 8, "green": 8, "red": 7}
    assert sum(len(labels) for _, labels, _ in batches) == 23, "training never meets the unreadable image"
    assert all(batch is not None for batch in batches) and len(features.labels) == 23
    assert recorder.keys[-1]["count"] == 23


def test_without_skipping_an_unreadable_train_image_stops_the_run(corrupt_train_root):
    task = FewShot().build(FolderDataset(corrupt_train_root), -1)
    module = fewshot_datamodule(task, DataContract("images", batch_size=5), KeyRecorder())
    assert module.labeled_set("train") is task.train and module.skipped_images() == {}
    with pytest.raises(PromptbenchError, match=r"red/0\.png.*skip_bad_images=true"):
        list(module.train_dataloader())


def test_a_train_set_without_a_readable_image_is_refused(tmp_path):
    root = write_classes(tmp_path / "bad", {"train": {"blue": 2}, "test": {"blue": 2}})
    for path in (root / "train" / "blue").iterdir():
        path.write_bytes(b"not an image")
    task = FewShot().build(FolderDataset(root), -1)
    module = fewshot_datamodule(task, DataContract("images", batch_size=5), KeyRecorder(), skip_bad_images=True)
    with pytest.raises(PromptbenchError, match=r"folder/train: none of its \d images can be read"):
        module.labeled_set("train")


def test_skipped_eval_images_are_named_in_the_log(toy_root, tmp_path, caplog):
    root = shutil.copytree(toy_root, tmp_path / "corrupt_test")
    corrupt = root / "test" / "green" / "1.png"
    corrupt.write_bytes(b"garbage")
    loader = image_loader(FolderDataset(root)["test"].items, lambda image: torch.zeros(1), batch_size=4,
                          num_workers=0, skip_bad_images=True)
    with caplog.at_level(logging.WARNING):
        assert sum(len(labels) for _, labels, _ in filter(None, loader)) == 17
    assert any(f"skipped unreadable image {corrupt}" in message for message in caplog.messages)


def test_a_dataset_root_that_is_a_file_says_so(tmp_path):
    not_a_folder = tmp_path / "pets.zip"
    not_a_folder.write_bytes(b"PK")
    with pytest.raises(PromptbenchError, match=rf"{not_a_folder} is a file, not a folder\. Set dataset\.root="):
        FolderDataset(not_a_folder)


def refuse_writes_without_permission(monkeypatch) -> None:
    """Root ignores permission bits, and the tests run as root: make mkdir honour them as the kernel does for
    everyone else, so a folder without write permission behaves as read-only."""
    real_mkdir = os.mkdir

    def mkdir(path, mode=0o777, *, dir_fd=None):
        parent = Path(path).parent
        if parent.is_dir() and not stat.S_IMODE(parent.stat().st_mode) & stat.S_IWUSR and not Path(path).exists():
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
        return real_mkdir(path, mode, dir_fd=dir_fd)

    monkeypatch.setattr(os, "mkdir", mkdir)


def test_an_unrendered_synthetic_task_in_a_read_only_folder_says_how_to_render_it(tmp_path, monkeypatch):
    read_only = tmp_path / "synthetic"
    read_only.mkdir()
    read_only.chmod(0o555)
    refuse_writes_without_permission(monkeypatch)
    with pytest.raises(PromptbenchError) as refused:
        SyntheticDataset(read_only, task="synth_shapes")
    message = str(refused.value)
    assert f"the synthetic task synth_shapes is not rendered in {read_only}" in message
    assert "Permission denied" in message and "Set data_root=<a writable folder>" in message
    assert f"materialize('synth_shapes', '{read_only}', seed=0, image_size=64)" in message


def test_results_json_records_the_data_the_run_really_used(tmp_path, run_env):
    from conftest import find_results, run_py

    root = write_classes(tmp_path / "data", {"train": {"blue": 6, "green": 2, "grey": 0, "red": 6},
                                             "test": {"blue": 2, "green": 2, "grey": 2, "red": 2}})
    (root / "train" / "red" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    result = run_py(["method=linear_probe", "backbone=tiny", "dataset=folder", f"dataset.root={root}", "shots=4",
                     "dataset.skip_bad_images=true", "logger=none", "num_workers=0"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [payload] = find_results(tmp_path / "outputs")
    data = payload["data"]
    # grey's train folder is empty but its test images keep it a class; green has 2 train images for 4 shots.
    assert data["class_counts"]["train"]["green"] == 2 and data["class_counts"]["train"]["blue"] == 4
    assert data["skipped_images"]["train"] + data["class_counts"]["train"]["red"] == 4
    assert data["skipped_images"]["train"] == 1 and data["skipped_files"]["train"][0].endswith("red/0.png")
    assert any("green" in note for note in data["notes"])
    assert "red/0.png" in result.stdout + result.stderr
