"""The method/data seam: the import rule, every method built from its config against a fake feature provider,
every method x protocol config instantiated, and the README's "Adding a method" example run end to end."""

from __future__ import annotations

import ast
from pathlib import Path
from typing import Any, Sequence

import pytest
import torch
import torch.nn.functional as F

from conftest import REPO, build_method, composed, find_results, run_py
from promptbench.backbones import load_backbone
from promptbench.contract import DataContract, FeatureProvider, FeatureSet, FeatureViews, Views
from promptbench.errors import PromptbenchError
from promptbench.methods.base import Method
from promptbench.config import build

PACKAGE = REPO / "src" / "promptbench"
METHODS = sorted(p.stem for p in (REPO / "conf" / "method").glob("*.yaml"))
PROTOCOLS = sorted(p.stem for p in (REPO / "conf" / "protocol").glob("*.yaml"))
CLASSES = ["blue", "green", "red"]
TEMPLATES = ["a photo of a {}."]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


@pytest.mark.parametrize("layer,forbidden", [
    ("data", ("promptbench.methods", "promptbench.runner", "promptbench.protocols")),
    ("methods", ("promptbench.data", "promptbench.runner", "promptbench.protocols")),
    ("backbones", ("promptbench.data", "promptbench.methods", "promptbench.runner", "promptbench.protocols")),
])
def test_layers_import_downward_only(layer, forbidden):
    files = sorted((PACKAGE / layer).rglob("*.py"))
    assert files
    offending = {str(path.relative_to(PACKAGE)): sorted(m for m in imported_modules(path) if m.startswith(forbidden))
                 for path in files}
    assert not {path: modules for path, modules in offending.items() if modules}


class FakeProvider:
    """A FeatureProvider of random features that records what the method asked for."""

    def __init__(self, dim: int, per_class: int = 4, label_only: Sequence[int] = ()):
        self.dim, self.per_class, self.label_only, self.asked = dim, per_class, list(label_only), []

    def features(self, split: str) -> FeatureSet:
        self.asked.append(split)
        labelled = [label for label in range(len(CLASSES)) if label not in self.label_only]
        labels = torch.tensor(labelled).repeat_interleave(self.per_class)
        generator = torch.Generator().manual_seed(len(self.asked))
        return FeatureSet(torch.randn(len(labels), self.dim, generator=generator), labels, torch.arange(len(labels)))

    def views(self, split: str, views: Views) -> FeatureViews:
        return FeatureViews.stack([self.features(split) for _ in range(views.n)])

    def images(self, split: str):
        self.asked.append(split)
        labels = torch.arange(len(CLASSES)).repeat_interleave(self.per_class)
        generator = torch.Generator().manual_seed(len(self.asked))
        yield torch.randn(len(labels), 3, 64, 64, generator=generator), labels, torch.arange(len(labels))

    def label_only_classes(self) -> list[int]:
        return list(self.label_only)

    def device(self) -> torch.device:
        return torch.device("cpu")


@pytest.mark.parametrize("name", METHODS)
def test_every_method_builds_from_its_config_and_prepares_on_a_fake_provider(name, tiny_backbone):
    method = build_method(name, tiny_backbone, CLASSES, TEMPLATES)
    contract = method.contract()
    assert isinstance(contract, DataContract)
    assert method.trains == (method.optim is not None), "a method that trains gets the run's optimiser, only then"
    if method.trains and contract.inputs == "features":
        assert contract.train_views is not None
    # SHIP synthesizes features for a class without images: the protocol that gives it one (generalized zero-shot).
    ship = "ship" in composed((f"method={name}",)).method
    provider = FakeProvider(tiny_backbone.embed_dim, label_only=[len(CLASSES) - 1] if ship else [])
    method.prepare(provider)
    assert set(provider.asked) == set(contract.reads), "prepare must read exactly the sets the contract declares"
    inputs = (torch.randn(5, tiny_backbone.embed_dim) if contract.inputs == "features"
              else torch.randn(5, 3, tiny_backbone.image_size, tiny_backbone.image_size))
    if name == "tip_adapter_f":
        method.on_fit_end = lambda: None  # training-free use of its cache is Tip-Adapter's, tested there
    with torch.no_grad():
        assert method.eval()(inputs).shape == (5, len(CLASSES))


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("name", METHODS)
def test_every_method_and_protocol_config_instantiates(name, protocol, tiny_backbone):
    cfg = composed((f"method={name}", f"protocol={protocol}", "backbone=tiny", "logger=none"))
    assert cfg.backbone.name == "tiny" and cfg.method.name == name and cfg.protocol.name == protocol
    built_protocol = build(cfg.protocol)
    assert built_protocol.name == protocol
    optim = build(cfg.optim) if cfg.get("optim") else None
    # CLIP-LoRA puts adapters into the towers it is given: never into the session's shared backbone.
    backbone = load_backbone("tiny", "promptbench-tiny", "random") if name == "clip_lora" else tiny_backbone
    method = build(cfg.method, backbone=backbone, classnames=CLASSES, templates=TEMPLATES, optim=optim)
    assert method.name == name and isinstance(method.contract(), DataContract)
    trainer = build(cfg.trainer, logger=False, enable_progress_bar=False)
    if method.trains and cfg.trainer.max_epochs is None:  # a step budget (CLIP-LoRA)
        assert cfg.trainer.max_steps >= 1 and trainer.max_steps == cfg.trainer.max_steps
    elif method.trains:
        assert cfg.trainer.max_epochs >= 1 and trainer.max_epochs == cfg.trainer.max_epochs


def test_a_trained_method_without_optim_or_with_bad_views_is_refused(tiny_backbone):
    with pytest.raises(PromptbenchError, match="needs an optimiser config"):
        build(composed(("method=coop",)).method, backbone=tiny_backbone, classnames=CLASSES, templates=TEMPLATES)
    with pytest.raises(PromptbenchError, match=r"views.scale must be \[low, high\]"):
        build_method("clip_adapter", tiny_backbone, CLASSES, TEMPLATES, views={"n": 2, "scale": [0.0, 1.0]})
    with pytest.raises(PromptbenchError, match="train_views are cached features"):
        DataContract(inputs="images", train_views=Views(2, (0.5, 1.0)))


# ---- the README's "Adding a method" example: one class, one yaml --------------------------------------
class NearestClassMean(Method):
    """Training-free: logits are cosine similarities to the mean normalised train feature of each class."""

    name = "nearest_class_mean"
    trains = False
    transfers_to_new_classes = False

    def __init__(self, backbone, classnames, templates, *, temperature: float, **config: Any):
        super().__init__(backbone, classnames, templates, **config)
        self.temperature = float(temperature)
        self.register_buffer("means", torch.zeros(len(self.classnames), backbone.embed_dim))

    def contract(self) -> DataContract:
        return DataContract(inputs="features", reads=("train",))

    def prepare(self, provider: FeatureProvider) -> None:
        train = provider.features("train")
        features = F.normalize(train.features, dim=-1)
        for label in range(len(self.classnames)):
            self.means[label] = F.normalize(features[train.labels == label].mean(dim=0), dim=-1)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(features.float(), dim=-1) @ self.means.T / self.temperature


EXAMPLE_YAML = """\
# @package _global_
method:
  _target_: test_contract.NearestClassMean
  name: nearest_class_mean
  temperature: 0.01
"""


def test_adding_a_method_is_one_class_and_one_yaml(toy_root, run_env, tmp_path):
    conf = tmp_path / "conf" / "method"
    conf.mkdir(parents=True)
    (conf / "nearest_class_mean.yaml").write_text(EXAMPLE_YAML)
    run_env["PYTHONPATH"] = str(REPO / "tests")
    result = run_py(["method=nearest_class_mean", f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "backbone=tiny",
                     "dataset=folder", f"dataset.root={toy_root}", "shots=4", "logger=none", "num_workers=0"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [results] = find_results(tmp_path / "outputs")
    assert results["status"] == "completed" and results["method"] == "nearest_class_mean"
    assert results["config"]["method"]["temperature"] == 0.01 and results["metrics"]["test"]["n"] == 18
    assert (Path(results["_dir"]) / "learned.safetensors").is_file()
