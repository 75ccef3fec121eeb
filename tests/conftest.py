"""Shared fixtures: real PNG datasets written to disk, the tiny backbone, and a `run.py` runner."""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Sequence

import pytest
import torch
from PIL import Image, ImageDraw

REPO = Path(__file__).resolve().parents[1]
# The tests' models are tiny: one thread each avoids OpenMP threads fighting over 2 shared cores.
torch.set_num_threads(1)
COLOURS = {"blue": (30, 60, 220), "green": (30, 190, 40), "red": (220, 30, 30)}


def draw_disc(rgb: tuple[int, int, int], rng: random.Random, size=(48, 40)) -> Image.Image:
    image = Image.new("RGB", size, tuple(rng.randint(0, 255) for _ in range(3)))
    x = rng.randint(0, 18)
    ImageDraw.Draw(image).ellipse([x, 4, x + 26, 30], fill=rgb)
    return image


def write_split_dataset(root: Path, counts=(("train", 8), ("val", 3), ("test", 6))) -> Path:
    """root/{train,val,test}/<colour>/<i>.png: a disc of that colour on a random background."""
    rng = random.Random(0)
    for split, count in counts:
        for name, rgb in COLOURS.items():
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                draw_disc(rgb, rng).save(folder / f"{index}.png")
    return root


@pytest.fixture(scope="session")
def toy_root(tmp_path_factory) -> Path:
    return write_split_dataset(tmp_path_factory.mktemp("toy"))


@pytest.fixture(scope="session")
def tiny_backbone():
    from promptbench.backbones import load_backbone

    return load_backbone("tiny", "promptbench-tiny", "random")


@pytest.fixture()
def run_env(tmp_path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        WANDB_MODE="offline",
        WANDB_SILENT="true",
        PROMPTBENCH_OUTPUT=str(tmp_path / "outputs"),
        PROMPTBENCH_CACHE=str(tmp_path / "cache"),
        PROMPTBENCH_DATA=str(tmp_path / "data"),
        OMP_NUM_THREADS="1",
    )
    return env


def run_py(args: list[str], env: dict[str, str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
        capture_output=True, text=True, timeout=timeout,
    )


def find_results(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) | {"_dir": str(p.parent)} for p in sorted(root.rglob("results.json"))]


@functools.lru_cache(maxsize=None)
def composed(overrides: tuple[str, ...]):
    from promptbench.config import compose_config

    return compose_config(REPO / "conf", overrides)


def build_method(name: str, backbone, classnames, templates, *, overrides: Sequence[str] = (), **options):
    """A method exactly as a run builds it: its conf/method yaml (and optim) with `overrides` (Hydra syntax, e.g.
    "optim.optimizer.lr=0.05") composed, then the method `options` (Python values) set on top."""
    from promptbench.config import method_from_config

    return method_from_config(composed((f"method={name}", *overrides)), backbone, classnames, templates, **options)


def epochs_of(name: str, *overrides: str) -> int | None:
    """The trainer.max_epochs a run of `method=name` gets."""
    return composed((f"method={name}", *overrides)).trainer.max_epochs


def feature_top1(method, test) -> float:
    """Top-1 (percent) of a method that consumes features on a FeatureSet."""
    with torch.no_grad():
        return 100.0 * (method(test.features).argmax(dim=-1) == test.labels).float().mean().item()


def mini_world_fewshot(tmp_path_factory, task: str, shots: int, store):
    """A mini-world task's K-shot split (seed 1) with the bundled mini CLIP: the task, backbone, feature `store`,
    test features and zero-shot top-1, for the learning tests of methods that consume features."""
    from types import SimpleNamespace

    from promptbench.backbones import load_backbone
    from promptbench.data.datamodule import FewShotDataModule
    from promptbench.data.datasets import SyntheticDataset
    from promptbench.protocols import FewShot

    dataset = SyntheticDataset(tmp_path_factory.getbasetemp() / "synthetic", task=task)
    random.seed(1)
    fewshot = FewShot().build(dataset, shots)
    backbone = load_backbone("mini", "promptbench-mini", "bundled")
    zeroshot = build_method("zeroshot", backbone, fewshot.train.classnames, fewshot.train.templates)
    test = FewShotDataModule(fewshot.sets(), fewshot.source, backbone, zeroshot.contract(), device=torch.device("cpu"),
                             feature_store=store, eval_batch_size=16, seed=1).features("test")
    return SimpleNamespace(task=fewshot, backbone=backbone, store=store, test=test,
                           zeroshot=feature_top1(zeroshot, test))
