"""The model-selection policy: what each policy supplies, that it is recorded, and that no test image is read
before evaluation unless selection=test_parity; the linear probe's C search against lpclip's loop in float64."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression

from conftest import REPO, build_method
from promptbench.config import build, compose_config
from promptbench.contract import FeatureSet
from promptbench.data import datamodule as datamodule_module
from promptbench.data.datasets import FolderDataset
from promptbench.data.items import Item, LabeledSet
from promptbench.errors import PromptbenchError
from promptbench.protocols import BaseToNew, FewShot, Task
from promptbench.results import PhaseTimer
from promptbench.runner import build_job, evaluate, fit_or_prepare
from promptbench.selection import DEFAULT_POLICY, POLICIES

CLASSES = ["blue", "green", "red"]


def test_the_default_policy_is_the_one_config_yaml_sets():
    assert compose_config(REPO / "conf").selection == DEFAULT_POLICY == "fewshot_val"


def test_each_policy_supplies_its_images(toy_root):
    dataset = FolderDataset(toy_root)
    task = FewShot().build(dataset, 2)
    chosen, named = {}, {}
    for policy in POLICIES:
        task.select_with(policy)
        chosen[policy], named[policy] = task.selection, task.sets().get("selection")
    assert all(named[policy] is chosen[policy] for policy in POLICIES)
    assert chosen["fewshot_val"] is task.val and len(task.val) == 2 * 3
    assert chosen["none"] is None
    assert chosen["full_val"].items == dataset["val"].items and len(chosen["full_val"]) == 3 * 3
    assert chosen["test_parity"] is task.evals["test"]

    halves = BaseToNew().build(dataset, 2)
    halves.select_with("full_val")
    assert halves.selection.classnames == halves.train.classnames == ["blue", "green"]
    assert {item.label for item in halves.selection.items} == {0, 1}
    halves.select_with("test_parity")
    assert halves.selection is halves.evals["base"], "the test images of the training classes, never the new ones"


def test_full_val_on_a_val_split_that_is_the_test_split_is_refused():
    images = [Item(f"/images/val/{i}.JPEG", i % 2, CLASSES[i % 2]) for i in range(6)]
    test = LabeledSet(images, CLASSES[:2], ["{}"])
    task = Task(source="imagenet", train=LabeledSet(images[:2], CLASSES[:2], ["{}"]), val=test, evals={"test": test},
                full_val=test)
    with pytest.raises(PromptbenchError, match="val split holds its test images .* selection=test_parity"):
        task.select_with("full_val")
    task.select_with("fewshot_val")
    assert task.selection_images_evaluated() == 6


class ImageReads:
    """Every image path the data module hands to a feature extraction or an image loader, cache hits included."""

    def __init__(self, monkeypatch):
        self.paths: list[str] = []
        cached_view = datamodule_module.FewShotDataModule._cached_view
        image_loader = datamodule_module.image_loader

        def recording_cached_view(module, name, transform, view):
            self.paths.extend(item.path for item in module.labeled_set(name).items)
            return cached_view(module, name, transform, view)

        def recording_image_loader(items, *args, **kwargs):
            self.paths.extend(item.path for item in items)
            return image_loader(items, *args, **kwargs)

        monkeypatch.setattr(datamodule_module.FewShotDataModule, "_cached_view", recording_cached_view)
        monkeypatch.setattr(datamodule_module, "image_loader", recording_image_loader)


SELECTING = {"tip_adapter": ["method.views.n=1"], "tip_adapter_f": ["method.views.n=1", "trainer.max_epochs=2"],
             "linear_probe": ["method.search_rounds=1"]}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("method", sorted(SELECTING))
def test_no_test_image_is_read_before_evaluation_unless_test_parity(method, policy, toy_root, tmp_path, monkeypatch):
    cfg = compose_config(REPO / "conf", [
        f"method={method}", f"selection={policy}", "backbone=tiny", "dataset=folder", f"dataset.root={toy_root}",
        "shots=2", "logger=none", "num_workers=0", f"output_dir={tmp_path}",
        f"paths.feature_cache_dir={tmp_path / 'features'}", *SELECTING[method]])
    reads = ImageReads(monkeypatch)
    job = build_job(cfg, tmp_path, build(cfg.backbone), PhaseTimer(), "now")
    fit_or_prepare(job)
    before_evaluation = set(reads.paths)
    evaluate(job.trainer, job.method, job.datamodule, job.task, job.timer)

    test_images = {item.path for item in job.task.evals["test"].items}
    fewshot_val = {item.path for item in job.task.val.items}
    full_val = {item.path for item in job.task.full_val.items}
    assert test_images <= set(reads.paths), "the spy must see evaluation's reads"
    assert {item.path for item in job.task.train.items} <= before_evaluation
    read_test = before_evaluation & test_images
    if policy == "test_parity":
        assert read_test == test_images
    else:
        assert not read_test, f"selection={policy} read {len(read_test)} test image(s) before evaluation"
    read_val = before_evaluation & full_val
    assert read_val == {"fewshot_val": fewshot_val, "full_val": full_val}.get(policy, set())
    assert job.method.selection_record()["policy"] == policy


def test_methods_that_select_nothing_read_no_selection_data(tiny_backbone):
    coop = build_method("coop", tiny_backbone, CLASSES, ["a photo of a {}."], selection="test_parity")
    assert coop.selects == () and "selection" not in coop.contract().reads
    assert "warning" not in coop.selection_record()


# ---- the linear probe against lpclip's own loop -----------------------------------------------------------
def lpclip_search(train, val, grid=(1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6), steps=8):
    """CoOp lpclip/linear_probe.py's search as it is written there, on features stored through `.tolist()`."""
    x_train, y_train = np.array(train.features.tolist()), np.array(train.labels.tolist())
    x_val, y_val = np.array(val.features.tolist()), np.array(val.labels.tolist())

    def fitted(c):
        model = LogisticRegression(solver="lbfgs", max_iter=1000, C=c).fit(x_train, y_train)  # penalty l2
        return model, float((model.predict(x_val) == y_val).sum() / len(y_val))

    accuracies = [fitted(c)[1] for c in grid]
    peak = grid[int(np.argmax(accuracies))]
    c_left, c_right = np.log10(peak * 0.1), np.log10(peak * 10)
    (model_left, acc_left), (model_right, acc_right) = fitted(10 ** c_left), fitted(10 ** c_right)
    for _ in range(steps):
        if acc_left < acc_right:
            c_final, model_final = 10 ** c_right, model_right
            c_left = 0.5 * (c_right + c_left)
        else:
            c_final, model_final = 10 ** c_left, model_left
            c_right = 0.5 * (c_right + c_left)
        (model_left, acc_left), (model_right, acc_right) = fitted(10 ** c_left), fitted(10 ** c_right)
    return c_final, model_final


def noisy_features(generator, per_class, classes=5, dim=32):
    labels = torch.arange(classes).repeat_interleave(per_class)
    centres = torch.randn(classes, dim, generator=generator)
    features = (centres[labels] + 1.5 * torch.randn(len(labels), dim, generator=generator)).float()
    return FeatureSet(features, labels, torch.arange(len(labels)))


def test_linear_probe_chooses_lpclips_c_and_predicts_like_its_float64_classifier(tiny_backbone):
    generator = torch.Generator().manual_seed(4)
    dim = tiny_backbone.embed_dim
    sets = {"train": noisy_features(generator, 8, dim=dim), "selection": noisy_features(generator, 4, dim=dim),
            "test": noisy_features(generator, 40, dim=dim)}
    method = build_method("linear_probe", tiny_backbone, [f"c{i}" for i in range(5)], ["{}"])
    fit, dtypes = method.fit, set()
    method.fit = lambda features, labels, c: dtypes.add(features.dtype) or fit(features, labels, c)
    method.prepare(type("Provider", (), {"features": staticmethod(lambda split: sets[split])}))
    c, reference = lpclip_search(sets["train"], sets["selection"])
    assert float(method.c) == pytest.approx(c, rel=1e-12)
    test = sets["test"]
    expected = reference.predict(np.array(test.features.tolist()))
    assert np.array_equal(method(test.features).argmax(-1).numpy(), expected)
    assert dtypes == {np.dtype("float64")} and method.weight.dtype == torch.float64, "lpclip fits in float64"


def test_linear_probe_without_selection_fits_its_default_c_once(tiny_backbone):
    generator = torch.Generator().manual_seed(5)
    train = noisy_features(generator, 6, classes=3, dim=tiny_backbone.embed_dim)
    read = []
    method = build_method("linear_probe", tiny_backbone, CLASSES, ["{}"], selection="none", default_c=0.5)
    method.prepare(type("Provider", (), {"features": staticmethod(lambda split: read.append(split) or train)}))
    assert read == ["train"] and float(method.c) == 0.5 and method.run_notes() == {"C": 0.5}
