"""The unsupervised protocol (UPL): the train labels are never read (poisoned split files change nothing, reading
one fails), the pseudo-labels are zero-shot CLIP's top-K per class as the reference selects them, selection is
refused, UPL's prompt ensemble, and CoOp/UPL end to end through run.py."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from conftest import build_method, composed, find_results, run_py, write_split_dataset
from promptbench import cli
from promptbench.backbones import load_backbone
from promptbench.config import build
from promptbench.data import transforms
from promptbench.data.datasets import DTD, FolderDataset, ImageNetA
from promptbench.data.features import FeatureStore, FrozenFeatures
from promptbench.data.images import load_rgb
from promptbench.data.items import LabeledSet, UnlabeledSet
from promptbench.errors import PromptbenchError
from promptbench.methods.prompts import fill
from promptbench.protocols import Task, Unsupervised
from promptbench.pseudo_labels import POOL_SET, ZeroShotTopK, top_k_per_class, zero_shot_probabilities
from test_coop import TEMPLATES, random_images
from test_datasets import make_benchmark

CLASSNAMES = ["golden_retriever", "cat", "sea lion"]
DTD_SPLIT = "split_zhou_DescribableTextures.json"


def unsupervised(per_class: int = 2, template_set="dataset", extra_backbones=()) -> Unsupervised:
    return Unsupervised(labeller=ZeroShotTopK(per_class, template_set, extra_backbones), seed=1)


def uncached_features() -> FrozenFeatures:
    return FrozenFeatures(FeatureStore(None), "test", torch.device("cpu"))


def labelled_task(dataset, backbone, **options) -> Task:
    task = unsupervised(**options).build(dataset, 0)
    task.label_train(backbone, uncached_features())
    return task


def pseudo_labels(task: Task, root: Path) -> list[tuple[str, int]]:
    return [(str(Path(item.path).relative_to(root)), item.label) for item in task.train.items]


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> FolderDataset:
    root = write_split_dataset(tmp_path_factory.mktemp("unsupervised"), (("train", 10), ("val", 2), ("test", 3)))
    return FolderDataset(root)


# ---- the reference's selection, restated -------------------------------------------------------------------
def reference_select_top_k_per_class(probabilities: np.ndarray, k: int) -> dict[int, int]:
    """tonyhuang2022/UPL trainers/utils.py select_top_k_similarity_per_class (is_softmax=False): rows sorted by
    their highest probability, grouped by the class of it, the first K of each class (all of them for K < 0)."""
    best = probabilities.max(axis=1)
    order = np.argsort(-best, kind="stable")
    predicted = probabilities[order].argmax(axis=1)
    chosen = {}
    for label in sorted(set(predicted.tolist())):
        rows = order[predicted == label]
        for row in (rows if k < 0 else rows[:k]):
            chosen[int(row)] = label
    return chosen


def reference_probabilities(backbone, classnames, templates, images: torch.Tensor) -> torch.Tensor:
    """Zero-shot CLIP written out: each prompt encoded, normalised, averaged per class and renormalised; the
    softmax of logit_scale x cosine."""
    model = backbone.model
    with torch.no_grad():
        prompts = [fill(template, name) for name in classnames for template in templates]
        text = F.normalize(model.encode_text(backbone.tokenize(prompts)), dim=-1).view(len(classnames), len(templates), -1)
        classifier = F.normalize(text.mean(dim=1), dim=-1)
        image = F.normalize(model.encode_image(images), dim=-1)
        return (model.logit_scale.exp() * image @ classifier.T).softmax(dim=-1)


@pytest.mark.parametrize("k", [0, 1, 3, -1])
def test_top_k_per_class_is_the_references_selection(k):
    generator = torch.Generator().manual_seed(k + 2)
    logits = torch.randn(40, 5, generator=generator)
    logits[:, 4] -= 10  # a class no image is predicted as
    probabilities = logits.softmax(dim=-1)
    rows, labels = top_k_per_class(probabilities, k)
    expected = reference_select_top_k_per_class(probabilities.numpy(), k)
    assert dict(zip(rows.tolist(), labels.tolist())) == expected and rows.tolist() == sorted(expected)
    assert 4 not in labels.tolist()


@pytest.mark.parametrize("template_set", ["dataset", ["a {}.", "a photo of the {}.", "{} in a picture."]])
@pytest.mark.parametrize("k", [2, -1])
def test_pseudo_labels_are_zero_shot_clips_top_k_per_class(toy, tiny_backbone, template_set, k):
    task = labelled_task(toy, tiny_backbone, per_class=k, template_set=template_set)
    pool = toy["train"].items
    transform = transforms.test_transform(tiny_backbone.image_size, tiny_backbone.mean, tiny_backbone.std)
    images = torch.stack([transform(load_rgb(item.path)) for item in pool])
    templates = toy.templates if template_set == "dataset" else template_set
    probabilities = reference_probabilities(tiny_backbone, toy.classnames, templates, images)
    expected = reference_select_top_k_per_class(probabilities.numpy(), k)
    assert [(item.path, item.label) for item in task.train.items] == [(pool[row].path, label)
                                                                      for row, label in sorted(expected.items())]
    assert all(item.classname == toy.classnames[item.label] for item in task.train.items)
    record = task.labelling
    assert record["per_class"] == k and record["templates"] == templates and record["pool_images"] == len(pool)
    assert record["images"] == len(task.train) and sum(record["images_per_class"].values()) == len(task.train)
    assert record["classes_with_fewer"] == {name: count for name, count in record["images_per_class"].items()
                                            if count < k}


def test_extra_backbones_average_the_softmax_probabilities(toy, tiny_backbone):
    """UPL*: the pseudo-labels come from the mean of every backbone's zero-shot probabilities."""
    mini = load_backbone("mini", "promptbench-mini", "bundled")
    spec = {"name": "mini", "model_name": "promptbench-mini", "pretrained": "bundled"}
    features = uncached_features()
    pool = UnlabeledSet.withholding_labels(toy["train"])
    probabilities = [zero_shot_probabilities(b, toy.classnames, toy.templates, "dataset",
                                             features.features(b, POOL_SET, pool.image_items()).features)[0]
                     for b in (tiny_backbone, mini)]
    expected = reference_select_top_k_per_class(((probabilities[0] + probabilities[1]) / 2).numpy(), 3)
    task = labelled_task(toy, tiny_backbone, per_class=3, extra_backbones=[spec])
    assert [(item.path, item.label) for item in task.train.items] == [(pool.items[row].path, label)
                                                                      for row, label in sorted(expected.items())]
    assert [b["name"] for b in task.labelling["backbones"]] == ["tiny", "mini"]
    with pytest.raises(PromptbenchError, match="extra_backbones.*not a backbone description"):
        labelled_task(toy, tiny_backbone, extra_backbones=[{"model": "RN50"}])


# ---- the train labels are never read ----------------------------------------------------------------------
class LabelTrap:
    """A train item whose label (and class name) raise when read."""

    def __init__(self, path: str):
        self.path = path

    @property
    def label(self):
        raise AssertionError(f"the label of train image {self.path} was read")

    classname = label


def test_the_train_pool_has_no_labels_and_the_protocol_never_reads_one(toy, tiny_backbone):
    clean = labelled_task(toy, tiny_backbone)
    trapped = FolderDataset(toy.root)
    trapped.splits["train"] = LabeledSet([LabelTrap(item.path) for item in toy["train"].items], toy.classnames,
                                         toy.templates)
    task = unsupervised().build(trapped, 0)
    assert isinstance(task.train, UnlabeledSet) and len(task.train) == len(toy["train"])
    with pytest.raises(AttributeError):
        task.train.items[0].label  # noqa: B018 (the read must fail)
    task.label_train(tiny_backbone, uncached_features())
    assert [(i.path, i.label) for i in task.train.items] == [(i.path, i.label) for i in clean.train.items]
    assert len(task.val) == 0 and task.full_val is None and list(task.evals) == ["test"]


@pytest.mark.parametrize("policy", ["fewshot_val", "full_val", "test_parity"])
def test_only_selection_none_is_accepted(toy, policy):
    task = unsupervised().build(toy, 0)
    with pytest.raises(PromptbenchError, match=rf"selection={policy}: protocol unsupervised reads no label .* "
                                               rf"Use selection=none"):
        task.select_with(policy)
    task.select_with("none")
    assert task.selection is None
    assert composed(("protocol=unsupervised",)).selection == "none"


def test_test_only_datasets_are_refused(tmp_path):
    with pytest.raises(PromptbenchError, match="test-only"):
        unsupervised().build(ImageNetA(make_benchmark("imagenet_a", tmp_path / "data")), 0)


def poison_train_labels(dtd_root: Path) -> None:
    """Every train entry of the split file gets the label (and class name) of the next class: all wrong."""
    split_path = dtd_root / DTD_SPLIT
    split = json.loads(split_path.read_text())
    names = {label: name for _, label, name in split["val"]}
    split["train"] = [[path, (label + 1) % len(names), names[(label + 1) % len(names)]]
                      for path, label, _ in split["train"]]
    split_path.write_text(json.dumps(split))


def test_poisoned_train_labels_change_nothing_end_to_end(tmp_path, run_env, tiny_backbone):
    """The same dataset with every train label wrong in its split file: identical pseudo-labels, identical CoOp
    training and results through run.py (so nothing on the way read a train label)."""
    clean_root, poisoned_root = tmp_path / "clean", tmp_path / "poisoned"
    make_benchmark("dtd", clean_root)
    random.seed(1)
    clean = DTD(clean_root / "dtd")  # writes the split file
    shutil.copytree(clean_root, poisoned_root)
    poison_train_labels(poisoned_root / "dtd")
    poisoned = DTD(poisoned_root / "dtd")
    assert all(a.label != b.label for a, b in zip(clean["train"].items, poisoned["train"].items))
    assert pseudo_labels(labelled_task(clean, tiny_backbone), clean_root) == \
        pseudo_labels(labelled_task(poisoned, tiny_backbone), poisoned_root)

    records = []
    for root in (clean_root, poisoned_root):
        env = run_env | {"PROMPTBENCH_OUTPUT": str(root / "outputs")}
        result = run_py(["method=coop", "protocol=unsupervised", "dataset=dtd", f"data_root={root}", "backbone=tiny",
                         "logger=none", "shots=2", "trainer.max_epochs=2", "num_workers=0", "method.n_ctx=2"], env)
        assert result.returncode == 0, result.stderr[-3000:]
        [record] = find_results(root / "outputs")
        records.append(record | {"learned": load_file(Path(record["_dir"]) / "learned.safetensors")})
    clean_run, poisoned_run = records
    assert clean_run["protocol"] == "unsupervised" and clean_run["selection"]["policy"] == "none"
    labelling = clean_run["pseudo_labels"]
    assert labelling["per_class"] == 2 and labelling["templates"] == ["{} texture."]
    assert labelling["pool_images"] == len(clean["train"]) and clean_run["splits"]["train"] == labelling["images"]
    assert clean_run["data"]["class_counts"]["train"] == labelling["images_per_class"]
    assert clean_run["splits"]["val"] == 0 and clean_run["training"]["epochs"] == 2
    for key in ("pseudo_labels", "metrics", "splits", "data"):
        assert clean_run[key] == poisoned_run[key], key
    assert clean_run["learned"].keys() == poisoned_run["learned"].keys()
    for name, tensor in clean_run["learned"].items():
        assert torch.equal(tensor, poisoned_run["learned"][name]), name


# ---- UPL's prompt representation ensemble --------------------------------------------------------------------
def test_upl_with_one_prompt_is_coop(tiny_backbone):
    torch.manual_seed(0)
    upl = build_method("upl", tiny_backbone, CLASSNAMES, TEMPLATES, prompts=1, n_ctx=4)
    torch.manual_seed(0)
    coop = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=4)
    assert torch.equal(upl.prompt_learner.ctx[0, 0], coop.prompt_learner.ctx)
    for method in (upl, coop):
        method.log = lambda *args, **kwargs: None
    batch = (random_images(4), torch.tensor([0, 1, 2, 1]), torch.arange(4))
    torch.testing.assert_close(upl.training_step(batch, 0), coop.training_step(batch, 0))
    with torch.no_grad():
        torch.testing.assert_close(upl(batch[0]), coop(batch[0]))


def test_upl_logits_are_the_mean_of_its_contexts_and_each_context_trains_alone(tiny_backbone):
    torch.manual_seed(0)
    upl = build_method("upl", tiny_backbone, CLASSNAMES, TEMPLATES, prompts=3, n_ctx=4)
    contexts = upl.prompt_learner.ctx
    assert contexts.shape == (3, 1, 4, tiny_backbone.ctx_dim)
    assert not torch.equal(contexts[0], contexts[1])  # independent random starts
    upl.log = lambda *args, **kwargs: None
    images, labels = random_images(4), torch.tensor([0, 1, 2, 1])
    scale = tiny_backbone.logit_scale
    image = F.normalize(tiny_backbone.encode_image(images), dim=-1).detach()

    def coop_logits(context: torch.Tensor) -> torch.Tensor:
        text = F.normalize(upl.prompt_learner.text_features(tiny_backbone, context), dim=-1)
        return scale * image @ text.T

    with torch.no_grad():
        expected = torch.stack([coop_logits(contexts[p, 0]) for p in range(3)]).mean(dim=0)
        torch.testing.assert_close(upl(images), expected)
    upl.training_step((images, labels, torch.arange(4)), 0).backward()
    for p in range(3):
        alone = contexts[p, 0].detach().clone().requires_grad_(True)
        F.cross_entropy(coop_logits(alone), labels).backward()
        torch.testing.assert_close(contexts.grad[p, 0], alone.grad)


def test_upl_options_are_checked(tiny_backbone):
    with pytest.raises(PromptbenchError, match="prompts=0"):
        build_method("upl", tiny_backbone, CLASSNAMES, TEMPLATES, prompts=0)
    with pytest.raises(PromptbenchError, match="stay identical.*ctx_init=null"):
        build_method("upl", tiny_backbone, CLASSNAMES, TEMPLATES, ctx_init="a photo of a")
    assert build(composed(("protocol=unsupervised", "shots=4")).protocol).labeller.per_class == 4


@pytest.mark.parametrize("csc", [False, True])
def test_interpret_names_each_prompt_of_the_ensemble(tiny_backbone, tmp_path, capsys, csc):
    upl = build_method("upl", tiny_backbone, CLASSNAMES, TEMPLATES, prompts=2, n_ctx=3, csc=csc)
    upl.save_learned(tmp_path / "learned.safetensors")
    assert cli.main(["interpret", str(tmp_path / "learned.safetensors"), "--top-k", "2"]) == 0
    rows = [row.split()[:3 + csc] for row in capsys.readouterr().out.strip().splitlines()[2:]]
    per_prompt = (len(CLASSNAMES) if csc else 1) * 3
    assert len(rows) == 2 * per_prompt
    assert rows[0][:3] == ["prompt", "1", "golden_retriever" if csc else "#1"]
    assert rows[per_prompt + (3 if csc else 2)][:4 if csc else 3] == (["prompt", "2", "cat", "#1"] if csc
                                                                       else ["prompt", "2", "#3"])


def test_upl_runs_end_to_end_and_saves_its_contexts(toy, tmp_path, run_env):
    result = run_py(["method=upl", "protocol=unsupervised", "dataset=folder", f"dataset.root={toy.root}",
                     "backbone=tiny", "logger=none", "shots=3", "trainer.max_epochs=1", "method.prompts=2",
                     "method.n_ctx=2", "num_workers=0"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [record] = find_results(tmp_path / "outputs")
    assert record["method"] == "upl" and record["pseudo_labels"]["images"] == record["splits"]["train"] <= 9
    learned = load_file(Path(record["_dir"]) / "learned.safetensors")
    assert learned["prompt_learner.ctx"].shape[:3] == (2, 1, 2)


@pytest.mark.slow
def test_upl_beats_the_zero_shot_clip_that_labelled_its_data_on_the_mini_world(run_env, tmp_path):
    # experiment=demo_upl as `make demo` runs it: synth_swatches, the bundled mini CLIP, no train label read.
    # Measured (seeds 1-3): zero-shot 69.6, UPL 80.6 / 80.2 / 79.6 (experiments/beyond_labels.md).
    result = run_py(["-m", "experiment=demo_upl", "seed=1"], run_env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    top1 = {r["method"]: r["metrics"]["test"]["top1"] for r in find_results(tmp_path / "outputs")}
    assert top1["upl"] >= top1["zeroshot"] + 5, top1
