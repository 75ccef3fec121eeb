"""Data problems that would otherwise give silently wrong numbers or raw tracebacks: class names that collide
in the prompt, empty and short classes, dataset roots that cannot be used."""

from __future__ import annotations

import errno
import logging
import os
import random
import stat
from pathlib import Path

import pytest

from conftest import COLOURS, draw_disc
from promptbench.data.datasets import FolderDataset, SyntheticDataset
from promptbench.data.items import Item, LabeledSet, class_counts
from promptbench.errors import PromptbenchError
from promptbench.protocols import FewShot


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
