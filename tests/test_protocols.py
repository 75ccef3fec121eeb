"""Protocols: base-to-new halves, cross-dataset and domain-generalization tasks, and methods that cannot
transfer to new classes."""

from __future__ import annotations

import math
import random

import pytest
import torch

from conftest import find_results, run_py
from promptbench.data.datasets import DTD, ImageNet, ImageNetA
from promptbench.data.items import Item
from promptbench.errors import PromptbenchError
from promptbench.methods.base import Method
from promptbench.protocols import BaseToNew, CrossDataset, DomainGeneralization, FewShot, GeneralizedZeroShot, Task
from promptbench.runner import refuse_untransferable
from test_datasets import make_benchmark


def reference_subsample_classes(*datasets: list[Item], subsample: str) -> list[list[Item]]:
    """The reference's OxfordPets.subsample_classes, restated."""
    labels = sorted({item.label for item in datasets[0]})
    m = math.ceil(len(labels) / 2)
    selected = labels[:m] if subsample == "base" else labels[m:]
    relabeler = {y: y_new for y_new, y in enumerate(selected)}
    return [[Item(i.path, relabeler[i.label], i.classname) for i in data if i.label in selected] for data in datasets]


@pytest.fixture()
def dtd(tmp_path) -> DTD:
    random.seed(1)
    return DTD(make_benchmark("dtd", tmp_path / "data"))  # 5 classes


def test_base2new_halves_and_relabels_like_the_reference(dtd):
    random.seed(1)
    task = BaseToNew(seed=1).build(dtd, 2)
    train, val = dtd.fewshot_splits(2, 1)  # the cached split the protocol drew
    base_train, base_val, base_test = reference_subsample_classes(train, val, dtd["test"].items, subsample="base")
    [new_test] = reference_subsample_classes(train, dtd["test"].items, subsample="new")[1:]
    assert task.train.items == base_train and task.val.items == base_val
    assert task.evals["base"].items == base_test and task.evals["new"].items == new_test
    assert task.train.classnames == ["banded", "dotted", "striped"] == task.evals["base"].classnames
    assert task.evals["new"].classnames == ["woven", "zigzagged"]
    assert sorted({i.label for i in task.evals["new"].items}) == [0, 1]
    assert task.harmonic_means == {"harmonic_mean": ("base", "new")}


def test_harmonic_mean_is_derived_from_accuracies_only():
    task = Task("x", None, None, {}, harmonic_means={"harmonic_mean": ("base", "new")})
    derived = task.derived_metrics({"base": {"top1": 80.0, "ece": 3.0, "n": 5}, "new": {"top1": 60.0, "ece": 9.0, "n": 4}})
    assert derived == {"harmonic_mean": {"top1": pytest.approx(2 * 80 * 60 / 140)}}


def test_fewshot_protocol_refuses_test_only_datasets(tmp_path):
    variant = ImageNetA(make_benchmark("imagenet_a", tmp_path / "data"))
    with pytest.raises(PromptbenchError, match="test-only.*protocol=cross_dataset"):
        FewShot(seed=1).build(variant, 1)


def test_cross_dataset_evaluates_every_target_with_its_own_classes(dtd, tmp_path):
    make_benchmark("eurosat", tmp_path / "data")
    make_benchmark("food101", tmp_path / "data")
    task = CrossDataset(targets=["eurosat", "food101"], data_root=tmp_path / "data", seed=1).build(dtd, 1)
    assert list(task.evals) == ["dtd", "eurosat", "food101"]
    assert task.evals["eurosat"].classnames == ["Annual Crop Land", "Forest", "Sea or Lake"]
    assert task.evals["food101"].templates == ["a photo of {}, a type of food."]
    assert len(task.train) == 5 and task.train.classnames == dtd.classnames
    with pytest.raises(PromptbenchError, match=r"unknown dataset 'nope'; registered datasets: \["):
        CrossDataset(targets=["nope"], data_root=tmp_path / "data").build(dtd, 1)


def test_domain_generalization_maps_variants_to_imagenet_classes(tmp_path):
    data_root = tmp_path / "data"
    for name in ("imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"):
        make_benchmark(name, data_root)
    random.seed(1)
    imagenet = ImageNet(data_root / "imagenet")
    task = DomainGeneralization(data_root=data_root, seed=1).build(imagenet, 2)
    assert list(task.evals) == ["imagenet", "imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert all(s.classnames == imagenet.classnames for s in task.evals.values())
    by_wnid = {item.path.split("/")[-2]: item.label for item in task.evals["imagenet_a"].items}
    assert by_wnid == {"n01440764": 0, "n01484850": 2}  # ImageNet labels, not the variant's 0..1
    assert task.scored_labels == {"imagenet_a": [0, 2], "imagenet_r": [1]}  # V2 and Sketch cover every class

    logits = torch.tensor([[5.0, 1.0, 0.0], [9.0, 0.0, 2.0]])  # the 2nd image's best class (0) is not in ImageNet-R
    scored, labels = task.scored_outputs("imagenet_a", logits, torch.tensor([2, 2]))
    assert scored.tolist() == [[5.0, 0.0], [9.0, 2.0]] and labels.tolist() == [1, 1]
    with pytest.raises(PromptbenchError, match="trains on ImageNet"):
        DomainGeneralization(data_root=data_root).build(DTD(make_benchmark("dtd", data_root)), 1)


class ClassSpecificStub(Method):
    """Parameters tied to the training classes, like CoOp's class-specific context."""

    name = "class_specific_stub"
    trains = False
    transfers_to_new_classes = False


def test_class_specific_method_refuses_new_classes(dtd):
    task = BaseToNew(seed=1).build(dtd, 1)
    method = ClassSpecificStub(None, task.train.classnames, task.train.templates)
    with pytest.raises(PromptbenchError, match=r"tied to its 3 training classes.*base2new.*\['new'\]"):
        refuse_untransferable(method, task, "base2new")
    method.set_classes(task.evals["base"].classnames, task.evals["base"].templates)  # same classes: fine
    with pytest.raises(PromptbenchError, match="cannot be evaluated on another class set"):
        method.set_classes(task.evals["new"].classnames, task.evals["new"].templates)


@pytest.mark.slow
def test_base2new_run_reports_base_new_and_harmonic_mean(tmp_path, run_env):
    root = make_benchmark("dtd", tmp_path / "data")
    result = run_py(["backbone=tiny", "method=zeroshot", "protocol=base2new", "dataset=dtd", f"dataset.root={root}",
                     "shots=1", "seed=1", "num_workers=0", "logger=none", "feature_cache=false"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [results] = find_results(tmp_path / "outputs")
    metrics = results["metrics"]
    assert set(metrics) == {"base", "new", "harmonic_mean"} and results["splits"]["train"] == 3
    base, new = metrics["base"]["top1"], metrics["new"]["top1"]
    expected = 2 * base * new / (base + new) if base + new else 0.0
    assert metrics["harmonic_mean"]["top1"] == pytest.approx(expected)
    assert (root / "split_fewshot" / "shot_1-seed_1.json").is_file()


def test_generalized_zero_shot_trains_on_base_images_in_the_joint_label_space(dtd):
    random.seed(1)
    task = GeneralizedZeroShot(seed=1).build(dtd, 2)
    random.seed(1)
    halves = BaseToNew(seed=1).build(dtd, 2)  # the same draw: the same base images
    base, new = [0, 1, 2], [3, 4]
    assert task.label_only_classes == new
    for labeled in (task.train, task.val, task.full_val):
        assert labeled.classnames == dtd.classnames  # every class name, base and new
    assert [(i.path, i.label) for i in task.train.items] == [(i.path, i.label) for i in halves.train.items]
    assert task.evals["all"].items == dtd["test"].items and task.evals["all"].classnames == dtd.classnames
    assert task.class_subsets == {"base": ("all", base), "new": ("all", new)}
    assert task.harmonic_means == {"harmonic_mean": ("base", "new")}
    assert {i.label for i in task.eval_images("new").items} == set(new)

    new_paths = {item.path for item in dtd["train"].items + dtd["val"].items + dtd["test"].items if item.label in new}
    for policy in ("fewshot_val", "full_val", "test_parity"):
        task.select_with(policy)
        seen = task.train.items + task.val.items + task.selection.items
        assert seen and not any(item.label in new or item.path in new_paths for item in seen), policy

    # "base" and "new" are rows of the "all" predictions, still scored over all five classes.
    logits = torch.eye(5)[[0, 3, 4, 1]]
    labels = torch.tensor([0, 4, 4, 2])
    rows, kept = task.class_subset("new", logits, labels)
    assert rows.shape == (2, 5) and kept.tolist() == [4, 4]
