"""What a mini-world task's frozen image features follow: the class, or the scene's other factors.

A key-value cache (Tip-Adapter) and a class-mean classifier decide by the cosine similarity of image features,
so they see the class only where images of one class are more alike than images of different classes; a linear
probe (and CLIP-Adapter, CoOp) can instead weight the few feature directions that carry the class. For each task
and bundled backbone this measures, on the task's test split rendered in memory (the very images `materialize`
writes, each with its scene):

- zero-shot top-1 with the task's first (hand-crafted) template;
- the mean cosine similarity of same-class and of different-class test pairs, and the share of each image's
  16 nearest test neighbours that are of its class;
- the share of the features' variance explained by each scene factor (the group means of the factor),
  adjusted for its number of groups (a random grouping into G groups of N images explains (G-1)/(N-1));
- over few-shot draws of K train images per class (clean test-transform features, one draw per seed): the
  accuracy of the 1-nearest-neighbour cache, of the nearest class mean, and of a logistic regression.

    python -m promptbench.tools.world_features --backbone mini --tasks synth_shades synth_swatches
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone, load_backbone
from promptbench.data.transforms import test_transform
from promptbench.methods.prompts import text_classifier
from promptbench.tools.miniworld import TASKS, Scene, TaskSpec, position_name, render, task_scene

BUNDLED = {"mini": "promptbench-mini", "mini_vit": "promptbench-mini-vit"}
NEIGHBOURS = 16
BACKGROUND_BIN = 64  # background colours grouped into 4 x 4 x 4 RGB cells


def _task_object(scene: Scene):
    # sample_scene lists the task's own objects first, distractors after them.
    return scene.objects[0]


# Scene factors whose share of the feature variance is measured; "class" is added from the labels.
FACTORS: dict[str, Callable[[Scene], object]] = {
    "shape": lambda scene: _task_object(scene).shape,
    "colour": lambda scene: _task_object(scene).colour,
    "texture": lambda scene: scene.texture,
    "background colour": lambda scene: tuple(channel // BACKGROUND_BIN for channel in scene.background),
    "style": lambda scene: scene.style,
    "size": lambda scene: _task_object(scene).size,
    "objects": lambda scene: len(scene.objects),
    "position": lambda scene: position_name(_task_object(scene)),
}


@dataclass
class TaskFeatures:
    task: str
    backbone: str
    zero_shot: float
    cosine_same_class: float
    cosine_other_class: float
    neighbours_of_class: float
    explained: dict[str, float]
    one_nn: float
    class_mean: float
    linear_probe: float


@torch.no_grad()
def encode(backbone: Backbone, scenes: Sequence[Scene], image_size: int, batch: int = 256) -> torch.Tensor:
    """L2-normalised image features of the scenes, rendered at `image_size` and passed through the test transform."""
    transform = test_transform(backbone.image_size, backbone.mean, backbone.std)
    features = []
    for start in range(0, len(scenes), batch):
        images = torch.stack([transform(render(scene, image_size)) for scene in scenes[start : start + batch]])
        features.append(backbone.encode_image(images).float())
    return F.normalize(torch.cat(features), dim=-1)


def explained_variance(features: torch.Tensor, groups: Sequence[object]) -> float:
    """Share of the features' total variance held by the group means, minus what G random groups would hold."""
    centred = features - features.mean(dim=0)
    total = float((centred**2).sum())
    keys = sorted(set(groups), key=str)
    held = 0.0
    for key in keys:
        members = torch.tensor([group == key for group in groups])
        held += float(members.sum()) * float((centred[members].mean(dim=0) ** 2).sum())
    chance = (len(keys) - 1) / (len(groups) - 1)
    return (held / total - chance) / (1.0 - chance)


def few_shot_accuracies(spec: TaskSpec, train: torch.Tensor, labels: torch.Tensor, test: torch.Tensor,
                        test_labels: torch.Tensor, probe_c: float) -> tuple[float, float, float]:
    """1-NN cache, nearest class mean and logistic regression, trained on `train`, scored on `test` (%)."""
    from sklearn.linear_model import LogisticRegression

    classes = len(spec.classnames)
    one_nn = labels[(test @ train.T).argmax(dim=1)]
    means = F.normalize(torch.stack([train[labels == label].mean(dim=0) for label in range(classes)]), dim=-1)
    class_mean = (test @ means.T).argmax(dim=1)
    probe = LogisticRegression(C=probe_c, max_iter=5000).fit(train.double().numpy(), labels.numpy())
    linear = torch.from_numpy(probe.predict(test.double().numpy()))
    return tuple(100.0 * float((predicted == test_labels).float().mean()) for predicted in (one_nn, class_mean, linear))


def measure(task: str, backbone_name: str, shots: int = 16, seeds: Sequence[int] = (1, 2, 3),
            test_per_class: int = 50, train_pool: int = 100, probe_c: float = 10.0, world_seed: int = 0,
            image_size: int = 64, backbone: Backbone | None = None) -> TaskFeatures:
    spec = TASKS[task]
    backbone = backbone or load_backbone(backbone_name, BUNDLED[backbone_name], "bundled")
    classes = range(len(spec.classnames))
    test_scenes = [task_scene(spec, "test", label, index, world_seed) for label in classes for index in range(test_per_class)]
    test_labels = torch.tensor([label for label in classes for _ in range(test_per_class)])
    test = encode(backbone, test_scenes, image_size)

    text = text_classifier(backbone, spec.classnames, spec.templates[:1])
    zero_shot = 100.0 * float(((test @ text.T).argmax(dim=1) == test_labels).float().mean())
    similarity = test @ test.T
    same = test_labels[:, None] == test_labels[None, :]
    itself = torch.eye(len(test_labels), dtype=torch.bool)
    neighbours = similarity.masked_fill(itself, -2.0).topk(NEIGHBOURS, dim=1).indices
    explained = {"class": explained_variance(test, test_labels.tolist())}
    explained |= {name: explained_variance(test, [factor(scene) for scene in test_scenes])
                  for name, factor in FACTORS.items()}

    scores = []
    for seed in seeds:
        draw = np.random.default_rng(seed)
        picked = [(label, int(index)) for label in classes for index in draw.choice(train_pool, shots, replace=False)]
        train = encode(backbone, [task_scene(spec, "train", label, index, world_seed) for label, index in picked],
                       image_size)
        labels = torch.tensor([label for label, _ in picked])
        scores.append(few_shot_accuracies(spec, train, labels, test, test_labels, probe_c))
    one_nn, class_mean, linear_probe = (statistics.fmean(column) for column in zip(*scores))
    return TaskFeatures(
        task=task, backbone=backbone_name, zero_shot=zero_shot,
        cosine_same_class=float(similarity[same & ~itself].mean()), cosine_other_class=float(similarity[~same].mean()),
        neighbours_of_class=100.0 * float((test_labels[neighbours] == test_labels[:, None]).float().mean()),
        explained=explained, one_nn=one_nn, class_mean=class_mean, linear_probe=linear_probe,
    )


def markdown(rows: Sequence[TaskFeatures], shots: int) -> str:
    factors = ["class", *FACTORS]
    header = ["task", "backbone", "zero-shot", "cos same class", "cos other class", f"{NEIGHBOURS}-NN of class %",
              f"1-NN {shots}-shot", f"class mean {shots}-shot", f"LP {shots}-shot",
              *[f"var. {name}" for name in factors]]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row.task, row.backbone, f"{row.zero_shot:.1f}", f"{row.cosine_same_class:.2f}",
                 f"{row.cosine_other_class:.2f}", f"{row.neighbours_of_class:.1f}", f"{row.one_nn:.1f}",
                 f"{row.class_mean:.1f}", f"{row.linear_probe:.1f}",
                 *[f"{max(row.explained[name], 0.0):.2f}" for name in factors]]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backbone", nargs="+", default=["mini"], choices=sorted(BUNDLED))
    parser.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    parser.add_argument("--shots", type=int, default=16)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--probe-c", type=float, default=10.0, help="inverse L2 strength of the logistic regression")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for name in args.backbone:
        backbone = load_backbone(name, BUNDLED[name], "bundled")
        for task in args.tasks:
            rows.append(measure(task, name, args.shots, args.seeds, probe_c=args.probe_c, backbone=backbone))
            print(f"measured {task} on {name}", flush=True)
    print(markdown(rows, args.shots))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
