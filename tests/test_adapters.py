"""Tip-Adapter, Tip-Adapter-F, CLIP-Adapter and the linear probe on the tiny backbone and small data."""

from __future__ import annotations

import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import build_method, epochs_of, feature_top1, find_results, mini_world_fewshot, run_py
from promptbench.contract import FeatureSet, Views
from promptbench.data.datamodule import FewShotDataModule
from promptbench.data.datasets import FolderDataset
from promptbench.data.features import FeatureStore
from promptbench.errors import PromptbenchError
from promptbench.methods.clip_adapter import ResidualAdapter
from promptbench.methods.linear_probe import search_c
from promptbench.methods.prompts import text_classifier
from promptbench.methods.tip_adapter import reference_grid, search_alpha_beta
from promptbench.protocols import FewShot

CLASSES = ["blue", "green", "red"]
TEMPLATES = ["a photo of a {}."]


class RecordingStore(FeatureStore):
    """A real cache that remembers which sets were read through it."""

    def __init__(self, root):
        super().__init__(root)
        self.sets_seen: list[str] = []

    def get(self, key, extract):
        self.sets_seen.append(key["set"])
        return super().get(key, extract)


@pytest.fixture(scope="module")
def task(toy_root):
    return FewShot().build(FolderDataset(toy_root), 2)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return RecordingStore(tmp_path_factory.mktemp("features"))


def datamodule_for(method, task, backbone, store) -> FewShotDataModule:
    store.sets_seen.clear()
    task.select_with(method.selection)
    return FewShotDataModule(task.sets(), task.source, backbone, method.contract(), device=torch.device("cpu"),
                             feature_store=store, eval_batch_size=16, seed=1)


class LossHistory(L.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def fit(method, datamodule, epochs: int) -> LossHistory:
    """What the runner does for a method that trains: prepare, then fit."""
    history = LossHistory()
    method.prepare(datamodule.provider)
    trainer = L.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[history])
    trainer.fit(method, datamodule=datamodule)
    return history


# ---- Tip-Adapter ----------------------------------------------------------------------------------------
def loop_tip_logits(features, text, keys, labels, alpha, beta, classes, scale=100.0):
    """Tip-Adapter's logits written out one sample, class and cache entry at a time."""
    rows = []
    for f in features.double():
        f = f / f.norm()
        row = []
        for c in range(classes):
            w = text[c].double()
            value = scale * float(f @ w)
            for key, label in zip(keys.double(), labels.tolist()):
                if label == c:
                    value += alpha * math.exp(-beta * (1 - float(f @ key)))
            row.append(value)
        rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


def test_tip_logits_match_a_straightforward_implementation(tiny_backbone):
    method = build_method("tip_adapter", tiny_backbone, CLASSES, TEMPLATES, init_alpha=1.7, init_beta=5.5)
    generator = torch.Generator().manual_seed(0)
    dim = tiny_backbone.embed_dim
    keys = F.normalize(torch.randn(7, dim, generator=generator), dim=-1)
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2])
    method.set_cache(keys, labels)
    features = torch.randn(5, dim, generator=generator) * 3  # not normalised: the method must normalise
    expected = loop_tip_logits(features, method.classifier(), keys, labels, 1.7, 5.5, len(CLASSES))
    torch.testing.assert_close(method(features).double(), expected, rtol=1e-4, atol=1e-3)


def reference_search(text_logits, affinity, values, labels, alphas, betas):
    """The reference's loop: beta outer, alpha inner, strict improvement only."""
    best, chosen = -1.0, None
    for beta in betas.tolist():
        for alpha in alphas.tolist():
            logits = text_logits + alpha * torch.exp(-beta * (1 - affinity)) @ values
            accuracy = float((logits.argmax(-1) == labels).float().mean())
            if accuracy > best:
                best, chosen = accuracy, (alpha, beta)
    return chosen


def test_alpha_beta_search_matches_the_reference_loop():
    generator = torch.Generator().manual_seed(3)
    features = F.normalize(torch.randn(40, 8, generator=generator), dim=-1)
    keys = F.normalize(torch.randn(12, 8, generator=generator), dim=-1)
    values = F.one_hot(torch.arange(12) % 4, 4).float()
    text_logits = 100 * features @ F.normalize(torch.randn(4, 8, generator=generator), dim=-1).T
    labels = torch.randint(0, 4, (40,), generator=generator)
    alphas, betas = reference_grid(6.0, 7), reference_grid(9.0, 11)
    affinity = features @ keys.T
    alpha, beta, correct = search_alpha_beta(text_logits, affinity, values, labels, alphas, betas)
    assert (alpha, beta) == pytest.approx(reference_search(text_logits, affinity, values, labels, alphas, betas))
    chosen = (text_logits + alpha * torch.exp(-beta * (1 - affinity)) @ values).argmax(-1)
    assert correct == int((chosen == labels).sum())


def test_reference_grid():
    grid = reference_grid(7.0, 200)
    assert len(grid) == 200 and grid[0] == pytest.approx(0.1)
    assert grid[1] - grid[0] == pytest.approx(6.9 / 200) and grid[-1] < 7.0


def test_tip_searches_on_val_only_and_saves_its_cache(tiny_backbone, task, store, tmp_path):
    method = build_method("tip_adapter", tiny_backbone, CLASSES, TEMPLATES, alpha_max=4.0, beta_max=6.0,
                          views={"n": 2, "scale": [0.5, 1.0]})
    datamodule = datamodule_for(method, task, tiny_backbone, store)
    method.prepare(datamodule.provider)
    assert set(store.sets_seen) == {"train", "selection"}, "the search reads the selection set only"
    assert datamodule.sets["selection"] is task.val, "selection=fewshot_val selects on the few-shot val split"
    assert method.cache_keys.shape == (len(task.train), tiny_backbone.embed_dim)
    # The chosen pair is the reference search's pick on the val features.
    val = datamodule.features("selection")
    features = F.normalize(val.features, dim=-1)
    expected = reference_search(100 * features @ method.classifier().T, features @ method.cache_keys.T,
                                F.one_hot(method.cache_labels, 3).float(), val.labels,
                                reference_grid(4.0, 20), reference_grid(6.0, 200))
    assert (float(method.alpha), float(method.beta)) == pytest.approx(expected)

    method.save_learned(tmp_path / "tip.safetensors")
    reloaded = build_method("tip_adapter", tiny_backbone, CLASSES, TEMPLATES)
    reloaded.load_learned(tmp_path / "tip.safetensors")
    probe = torch.randn(4, tiny_backbone.embed_dim)
    torch.testing.assert_close(reloaded(probe), method(probe))
    with pytest.raises(PromptbenchError, match="cannot be evaluated on another class set"):
        reloaded.set_classes(["cat", "dog"], TEMPLATES)


def test_tip_without_cache_and_bad_options_are_clear_errors(tiny_backbone):
    with pytest.raises(PromptbenchError, match="no cache yet"):
        build_method("tip_adapter", tiny_backbone, CLASSES, TEMPLATES)(torch.randn(2, tiny_backbone.embed_dim))
    with pytest.raises(PromptbenchError, match="alpha_max must be > 0.1"):
        build_method("tip_adapter", tiny_backbone, CLASSES, TEMPLATES, alpha_max=0.05)
    with pytest.raises(PromptbenchError, match="views.scale"):
        build_method("tip_adapter", tiny_backbone, CLASSES, TEMPLATES, views={"n": 2, "scale": [0.5, 2.0]})


@pytest.mark.parametrize("method", ["tip_adapter", "tip_adapter_f"])
def test_the_published_settings_come_from_the_recipe_of_each_dataset(method, tiny_backbone):
    # gaopengcuhk/Tip-Adapter configs/dtd.yaml and eurosat.yaml: init_alpha, search_scale = [beta_max, alpha_max].
    dtd = build_method(method, tiny_backbone, CLASSES, TEMPLATES, overrides=["dataset=dtd"])
    assert (float(dtd.alpha), float(dtd.beta), float(dtd.alpha_grid[1] - dtd.alpha_grid[0])) == pytest.approx(
        (2.0, 1.0, (13.0 - 0.1) / 20))
    plain = build_method(method, tiny_backbone, CLASSES, TEMPLATES, overrides=["dataset=folder"])
    assert (float(plain.alpha), float(plain.beta_grid[-1])) == pytest.approx((1.0, 0.1 + 199 * 9.9 / 200))
    if method == "tip_adapter_f":
        assert (epochs_of(method, "dataset=eurosat"), epochs_of(method, "dataset=dtd")) == (100, 20)
        assert epochs_of(method, "dataset=eurosat", "trainer.max_epochs=3") == 3


# ---- Tip-Adapter-F ---------------------------------------------------------------------------------------
def test_tip_f_trains_only_the_keys_and_selects_on_val(tiny_backbone, task, store):
    method = build_method("tip_adapter_f", tiny_backbone, CLASSES, TEMPLATES, overrides=["optim.optimizer.lr=0.01"],
                          views={"n": 2, "scale": [0.5, 1.0]}, train_views={"n": 1, "scale": [0.5, 1.0]},
                          beta_max=6.0, beta_steps=20)
    datamodule = datamodule_for(method, task, tiny_backbone, store)
    backbone_before = {k: v.clone() for k, v in method.backbone.state_dict().items()}
    history = fit(method, datamodule, epochs=6)
    assert set(store.sets_seen) == {"train", "selection"}, "the epoch and alpha/beta are chosen on the selection set"
    assert len(history.losses) == 6 and history.losses[-1] < history.losses[0]
    initial_keys = F.normalize(datamodule.views("train", Views(2, (0.5, 1.0))).mean().features, dim=-1)
    assert not torch.allclose(method.cache_keys, initial_keys), "the keys should have been trained"
    trainable = [name for name, p in method.named_parameters() if p.requires_grad]
    assert trainable == ["cache_keys"]
    for name, value in method.backbone.state_dict().items():
        assert torch.equal(value, backbone_before[name]), name
    assert 0 <= method.run_notes()["best_epoch"] < 6
    assert method.selection_record() == {"policy": "fewshot_val", "selects": ["epoch", "alpha", "beta"]}


def test_tip_f_test_parity_selects_on_the_test_split(tiny_backbone, task, store):
    method = build_method("tip_adapter_f", tiny_backbone, CLASSES, TEMPLATES, views={"n": 2, "scale": [0.5, 1.0]},
                          train_views={"n": 2, "scale": [0.5, 1.0]}, selection="test_parity", beta_steps=10)
    datamodule = datamodule_for(method, task, tiny_backbone, store)
    fit(method, datamodule, epochs=2)
    assert datamodule.sets["selection"] is task.evals["test"]
    assert set(store.sets_seen) == {"train", "selection"}
    assert "optimistic" in method.selection_record()["warning"]


def test_tip_f_without_selection_keeps_the_last_epoch_and_the_initial_alpha_beta(tiny_backbone, task, store):
    method = build_method("tip_adapter_f", tiny_backbone, CLASSES, TEMPLATES, views={"n": 2, "scale": [0.5, 1.0]},
                          train_views={"n": 2, "scale": [0.5, 1.0]}, selection="none", init_alpha=1.5, init_beta=2.5,
                          overrides=["optim.optimizer.lr=0.01"])
    datamodule = datamodule_for(method, task, tiny_backbone, store)
    assert "selection" not in method.contract().reads and "selection" not in datamodule.sets
    fit(method, datamodule, epochs=3)
    assert set(store.sets_seen) == {"train"}, "selection=none reads no selection data"
    assert (float(method.alpha), float(method.beta)) == (1.5, 2.5)
    assert "best_epoch" not in method.run_notes()
    assert method.selection_record() == {"policy": "none", "selects": ["epoch", "alpha", "beta"]}


# ---- CLIP-Adapter ----------------------------------------------------------------------------------------
def test_clip_adapter_residual_math(tiny_backbone):
    adapter = ResidualAdapter(8, reduction=4, ratio=0.2)
    down, up = torch.randn(2, 8), torch.randn(8, 2)
    adapter.mlp[0].weight.data, adapter.mlp[2].weight.data = down.clone(), up.clone()
    x = torch.randn(5, 8)
    hidden = torch.clamp(x @ down.T, min=0)
    expected = 0.2 * torch.clamp(hidden @ up.T, min=0) + 0.8 * x
    torch.testing.assert_close(adapter(x), expected)
    assert all(layer.bias is None for layer in (adapter.mlp[0], adapter.mlp[2]))

    method = build_method("clip_adapter", tiny_backbone, CLASSES, TEMPLATES, ratio=0.3, reduction=2)
    features = torch.randn(3, tiny_backbone.embed_dim)
    adapted = method.adapter(features)
    classifier = text_classifier(tiny_backbone, CLASSES, TEMPLATES)
    expected_logits = tiny_backbone.logit_scale * F.normalize(adapted, dim=-1) @ classifier.T
    torch.testing.assert_close(method(features), expected_logits)
    assert method.adapter.mlp[0].out_features == tiny_backbone.embed_dim // 2
    # The classifier is text: new class names just re-encode.
    method.set_classes(["cat", "dog"], TEMPLATES)
    assert method(features).shape == (3, 2)


def test_clip_adapter_trains_only_the_adapter(tiny_backbone, task, store):
    method = build_method("clip_adapter", tiny_backbone, CLASSES, TEMPLATES,
                          overrides=["optim.optimizer.lr=0.05", "optim.warmup=0"], views={"n": 1, "scale": [0.08, 1.0]})
    datamodule = datamodule_for(method, task, tiny_backbone, store)
    before = {k: v.clone() for k, v in method.state_dict().items()}
    history = fit(method, datamodule, epochs=5)
    assert history.losses[-1] < history.losses[0]
    changed = {k for k, v in method.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("adapter.") for k in changed)
    assert set(store.sets_seen) == {"train"}


def test_clip_adapter_options_are_checked(tiny_backbone):
    with pytest.raises(PromptbenchError, match="reduction"):
        build_method("clip_adapter", tiny_backbone, CLASSES, TEMPLATES, reduction=0)
    with pytest.raises(PromptbenchError, match="does not take option"):
        build_method("clip_adapter", tiny_backbone, CLASSES, TEMPLATES, alpha=1.0)


# ---- linear probe ----------------------------------------------------------------------------------------
def test_c_search_converges_to_the_peak():
    calls = []

    def accuracy(c):
        calls.append(c)
        return -abs(math.log10(c) - 2.3)

    best = search_c(accuracy, [1e6, 1e4, 1e2, 1, 1e-2, 1e-4, 1e-6], rounds=8)
    assert abs(math.log10(best) - 2.3) < 0.02
    assert len(calls) == 7 + 2 * 8


def clusters(dim, per_class, generator, classes=3, noise=0.3):
    centres = torch.eye(classes, dim) * 2
    labels = torch.arange(classes).repeat_interleave(per_class)
    features = centres[labels] + noise * torch.randn(len(labels), dim, generator=generator)
    return FeatureSet(features, labels, torch.arange(len(labels)))


@pytest.mark.parametrize("classes", [3, 2])
def test_linear_probe_picks_a_sensible_c_on_separable_features(tiny_backbone, classes):
    generator = torch.Generator().manual_seed(0)
    dim = tiny_backbone.embed_dim
    sets = {name: clusters(dim, n, generator, classes) for name, n in (("train", 5), ("val", 4), ("test", 40))}
    seen = []

    def features(name):
        seen.append(name)
        return sets[name]

    sets["selection"] = sets["val"]
    method = build_method("linear_probe", tiny_backbone, CLASSES[:classes], TEMPLATES, search_rounds=3)
    method.prepare(SimpleNamespace(features=features))
    assert sorted(set(seen)) == ["selection", "train"]
    # Strong regularisation (C=1e-6) flattens the classifier to chance: the search must not pick it.
    assert method.run_notes()["selection_top1"] == 100.0 and float(method.c) >= 1e-2
    test = sets["test"]
    accuracy = (method(test.features).argmax(-1) == test.labels).float().mean()
    assert accuracy > 0.9
    with pytest.raises(PromptbenchError, match="cannot be evaluated on another class set"):
        method.set_classes(["cat", "dog", "cow", "pig"], TEMPLATES)


# ---- end to end ------------------------------------------------------------------------------------------
METHODS = ("tip_adapter", "tip_adapter_f", "clip_adapter", "linear_probe")


def test_every_adapter_runs_end_to_end_and_shares_the_cache(toy_root, run_env, tmp_path):
    result = run_py(["-m", f"method={','.join(METHODS)}", "backbone=tiny", "dataset=folder",
                     f"dataset.root={toy_root}", "shots=2", "logger=none", "num_workers=0", "trainer.max_epochs=2"],
                    run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = {r["method"]: r for r in find_results(tmp_path / "outputs")}
    assert sorted(results) == sorted(METHODS)
    for name, payload in results.items():
        assert payload["status"] == "completed" and payload["metrics"]["test"]["n"] == 18, name
        assert payload["training"] == ({"epochs": 2, "steps": 2} if name in ("tip_adapter_f", "clip_adapter") else None)
    # The sweep runs in this order: Tip-Adapter-F finds every feature it needs in Tip-Adapter's cache.
    assert results["tip_adapter_f"]["feature_cache"]["extractions"] == 0
    assert results["tip_adapter_f"]["selection"] == {"policy": "fewshot_val", "selects": ["epoch", "alpha", "beta"],
                                                     "images": 6, "images_also_evaluated": 0}
    assert results["clip_adapter"]["selection"] == {"policy": "fewshot_val", "selects": []}


def test_test_parity_run_is_marked_in_results(toy_root, run_env, tmp_path):
    result = run_py(["method=tip_adapter_f", "selection=test_parity", "trainer.max_epochs=1", "method.views.n=1",
                     "backbone=tiny", "dataset=folder", f"dataset.root={toy_root}", "shots=2", "logger=none",
                     "num_workers=0"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [payload] = find_results(tmp_path / "outputs")
    record = payload["selection"]
    assert record["policy"] == "test_parity" and "optimistic" in record["warning"]
    assert record["images"] == record["images_also_evaluated"] == payload["metrics"]["test"]["n"]


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f", "clip_adapter", "linear_probe"])
def test_each_method_beats_chance_on_a_small_learnable_task(name, tmp_path_factory):
    """The mini world's texture task with the bundled mini CLIP: 9 classes, 4 shots per class."""
    import random

    from promptbench.backbones import load_backbone
    from promptbench.data.datasets import SyntheticDataset

    dataset = SyntheticDataset(tmp_path_factory.getbasetemp() / "synthetic", task="synth_textures")
    random.seed(1)
    few = FewShot().build(dataset, 4)
    backbone = load_backbone("mini", "promptbench-mini", "bundled")
    method = build_method(name, backbone, few.train.classnames, few.train.templates)
    datamodule = datamodule_for(method, few, backbone, RecordingStore(tmp_path_factory.mktemp("features")))
    if method.trains:
        fit(method, datamodule, epochs=5)
    else:
        method.prepare(datamodule.provider)
    test = datamodule.features("test")
    with torch.no_grad():
        accuracy = (method(test.features).argmax(dim=-1) == test.labels).float().mean().item()
    assert accuracy > 2 / len(few.train.classnames), accuracy


# ---- learning on synth_swatches ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def swatches(tmp_path_factory):
    """synth_swatches at 16 shots (seed 1) with the bundled mini CLIP, its test features and zero-shot accuracy."""
    return mini_world_fewshot(tmp_path_factory, "synth_swatches", 16,
                              RecordingStore(tmp_path_factory.mktemp("swatch_features")))


# Gains over zero-shot (69.6) at 16 shots measured with these very settings for seeds 1, 2, 3: Tip-Adapter
# +14.4/+14.2/+14.6, Tip-Adapter-F +12.2/+13.4/+12.8, CLIP-Adapter +1.6/+3.8/+3.2 (its reference lr 0.002 steps
# 4.6x shorter than on CLIP: the mini CLIP's logit scale is 21.9, not 100; experiments/mini_world_adaptation.md),
# linear probe +24.2/+26.8/+26.4, CoOp on 10 cached views for 50 epochs +14.2/+14.2/+15.2. The margins sit below
# the smallest gain of the three seeds; the test runs seed 1.
SWATCH_MARGIN = {"tip_adapter": 10.0, "tip_adapter_f": 8.0, "clip_adapter": 1.0, "linear_probe": 15.0, "coop": 10.0}
SWATCH_SETTINGS = {"tip_adapter_f": ((), 20), "clip_adapter": ((), 200), "coop": (("method.views.n=10",), 50)}


@pytest.mark.parametrize("name", list(SWATCH_MARGIN))
def test_each_family_beats_zero_shot_on_synth_swatches(name, swatches):
    """The published pattern on the mini world: with 16 shots the cache, the adapter, the probe and the learned
    prompt all beat the hand-crafted prompt (zero-shot)."""
    overrides, epochs = SWATCH_SETTINGS.get(name, ((), None))
    method = build_method(name, swatches.backbone, swatches.task.train.classnames, swatches.task.train.templates,
                          overrides=overrides)
    datamodule = datamodule_for(method, swatches.task, swatches.backbone, swatches.store)
    if method.trains:
        fit(method, datamodule, epochs=epochs)
    else:
        method.prepare(datamodule.provider)
    assert feature_top1(method, swatches.test) >= swatches.zeroshot + SWATCH_MARGIN[name], (name, swatches.zeroshot)
