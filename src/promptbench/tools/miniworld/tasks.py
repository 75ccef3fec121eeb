"""Downstream few-shot classification tasks over the synthetic world, written to disk as class folders.

Layout: `<root>/<task>/{train,val,test}/<class_folder>/<index>.png` plus `<root>/<task>/meta.json`.
Class folders are class names with spaces replaced by "_", and classnames are kept in sorted order, so a
reader that sorts folder names assigns the same labels as `TaskSpec.classnames`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from promptbench.tools.miniworld.captions import COARSE_COLOUR, SHAPE_NOUNS
from promptbench.tools.miniworld.render import SHAPES, TEXTURES, Scene, render, sample_scene

# Bump whenever rendering, sampling or a task definition changes: materialised tasks are then rebuilt.
TASKS_VERSION = 1
SPLITS = ("train", "val", "test")
META_FILE = "meta.json"

# The styles pretraining sees often; tasks draw from these unless their point is a style shift.
COMMON_STYLE_WEIGHTS = {"shaded": 1.0, "flat": 1.0, "outline": 1.0}
DISTRACTOR_PROBABILITY = 0.3


def class_folder(classname: str) -> str:
    return classname.replace(" ", "_")


@dataclass(frozen=True)
class TaskSpec:
    """A classification task. `templates[0]` is the hand-crafted zero-shot prompt; the rest can be ensembled.

    `scene_for_class(label, rng)` samples one scene of class `label`; `images_per_class` maps split -> count.
    """

    name: str
    classnames: tuple[str, ...]
    templates: tuple[str, ...]
    scene_for_class: Callable[[int, np.random.Generator], Scene]
    images_per_class: Mapping[str, int]

    def __post_init__(self) -> None:
        folders = [class_folder(name) for name in self.classnames]
        if list(self.classnames) != sorted(self.classnames) or folders != sorted(folders):
            raise ValueError(f"task {self.name}: classnames and their folder names must be in sorted order")
        if set(self.images_per_class) != set(SPLITS):
            raise ValueError(f"task {self.name}: images_per_class needs exactly the splits {SPLITS}")


def _canonical_noun(shape: str) -> str:
    return SHAPE_NOUNS[shape][0][0]


SHAPE_CLASSES = tuple(sorted(SHAPES, key=_canonical_noun))
SHAPE_COLOUR_SHAPES = ("circle", "cross", "diamond", "ellipse", "hexagon", "pentagon", "square", "star")
SHAPE_COLOUR_COLOURS = ("blue", "maroon", "navy", "pink", "purple", "red")  # red/maroon/pink, blue/navy/purple
SHAPE_COLOUR_CLASSES = tuple(
    sorted((colour, shape) for colour in SHAPE_COLOUR_COLOURS for shape in SHAPE_COLOUR_SHAPES)
)


# Shades that captions usually call by their coarse colour, with those coarse colours.
SHADE_CLASSES = tuple(sorted({*COARSE_COLOUR, *COARSE_COLOUR.values()}))
SWATCH_SHAPE = "circle"


def _single_object_scene(rng: np.random.Generator, **fixed) -> Scene:
    """One object, sometimes small, on a random texture; with a distractor, the object is the large one."""
    has_distractor = bool(rng.random() < DISTRACTOR_PROBABILITY)
    return sample_scene(
        rng,
        count=1,
        size="large" if has_distractor else None,
        distractors=int(has_distractor),
        style_weights=COMMON_STYLE_WEIGHTS,
        **fixed,
    )


def _shape_scene(label: int, rng: np.random.Generator) -> Scene:
    return _single_object_scene(rng, shape=SHAPE_CLASSES[label])


def _sketch_scene(label: int, rng: np.random.Generator) -> Scene:
    # Same draws as synth_shapes, so image i of a split is the sketch of synth_shapes' image i.
    return dataclasses.replace(_shape_scene(label, rng), style="sketch")


def _shape_colour_scene(label: int, rng: np.random.Generator) -> Scene:
    colour, shape = SHAPE_COLOUR_CLASSES[label]
    return _single_object_scene(rng, shape=shape, colour=colour)


def _shade_scene(label: int, rng: np.random.Generator) -> Scene:
    # One large filled object: the class is a colour the text side knows only coarsely, not the layout.
    return sample_scene(rng, colour=SHADE_CLASSES[label], count=1, size="large",
                        style_weights={"shaded": 1.0, "flat": 1.0})


def _swatch_scene(label: int, rng: np.random.Generator) -> Scene:
    # synth_shades without its nuisances: one large circle on a plain background, so the shade is what varies
    # most between images (on synth_shades the object's shape dominates the mini CLIP's image features).
    return sample_scene(rng, shape=SWATCH_SHAPE, colour=SHADE_CLASSES[label], count=1, size="large",
                        texture="plain", style_weights={"shaded": 1.0, "flat": 1.0})


def _swatch_sketch_scene(label: int, rng: np.random.Generator) -> Scene:
    # Same draws as synth_swatches, so image i of a split is the sketch of synth_swatches' image i.
    return dataclasses.replace(_swatch_scene(label, rng), style="sketch")


def _texture_scene(label: int, rng: np.random.Generator) -> Scene:
    return sample_scene(rng, texture=TEXTURES[label], style_weights=COMMON_STYLE_WEIGHTS)


DEFAULT_IMAGES_PER_CLASS = {"train": 100, "val": 20, "test": 50}
SHAPE_TEMPLATES = ("a picture of a {}.", "an image of a {}.", "a drawing of a {}.", "a {}.")
SWATCH_TEMPLATES = ("a {} circle.", "a picture of a {} circle.", "a {} shape.")

TASKS: dict[str, TaskSpec] = {
    task.name: task
    for task in (
        TaskSpec(
            name="synth_shapes",
            classnames=tuple(_canonical_noun(shape) for shape in SHAPE_CLASSES),
            templates=SHAPE_TEMPLATES,
            scene_for_class=_shape_scene,
            images_per_class=DEFAULT_IMAGES_PER_CLASS,
        ),
        TaskSpec(
            name="synth_textures",
            classnames=TEXTURES,
            templates=("a {} background.", "a picture with a {} background.", "shapes on a {} background."),
            scene_for_class=_texture_scene,
            images_per_class=DEFAULT_IMAGES_PER_CLASS,
        ),
        TaskSpec(
            name="synth_shape_colour",
            classnames=tuple(f"{colour} {_canonical_noun(shape)}" for colour, shape in SHAPE_COLOUR_CLASSES),
            templates=("a picture of a {}.", "an image of a {}.", "a {}."),
            scene_for_class=_shape_colour_scene,
            images_per_class={"train": 40, "val": 10, "test": 25},
        ),
        TaskSpec(
            name="synth_shades",
            classnames=SHADE_CLASSES,
            templates=("a {} shape.", "a picture of a {} shape.", "a {} object."),
            scene_for_class=_shade_scene,
            images_per_class=DEFAULT_IMAGES_PER_CLASS,
        ),
        TaskSpec(
            name="synth_swatches",
            classnames=SHADE_CLASSES,
            templates=SWATCH_TEMPLATES,
            scene_for_class=_swatch_scene,
            images_per_class=DEFAULT_IMAGES_PER_CLASS,
        ),
        TaskSpec(
            name="synth_swatches_sketch",
            classnames=SHADE_CLASSES,
            templates=("a sketch of a {} circle.", *SWATCH_TEMPLATES),
            scene_for_class=_swatch_sketch_scene,
            images_per_class=DEFAULT_IMAGES_PER_CLASS,
        ),
        TaskSpec(
            name="synth_sketch",
            classnames=tuple(_canonical_noun(shape) for shape in SHAPE_CLASSES),
            templates=("a sketch of a {}.", *SHAPE_TEMPLATES),
            scene_for_class=_sketch_scene,
            images_per_class=DEFAULT_IMAGES_PER_CLASS,
        ),
    )
}


def _meta(spec: TaskSpec, seed: int, image_size: int, images_per_class: Mapping[str, int]) -> dict:
    return {
        "name": spec.name,
        "classnames": list(spec.classnames),
        "templates": list(spec.templates),
        "seed": seed,
        "image_size": image_size,
        "counts": {split: images_per_class[split] for split in SPLITS},  # images per class
        "version": TASKS_VERSION,
    }


def _read_meta(task_dir: Path) -> dict | None:
    try:
        return json.loads((task_dir / META_FILE).read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json_atomically(path: Path, payload: dict) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(payload, indent=2))
    os.replace(partial, path)


def _sibling(path: Path, tag: str) -> Path:
    """A unique hidden name next to `path` (hidden so class-folder readers never pick it up)."""
    return path.with_name(f".{path.name}.{tag}-{uuid.uuid4().hex}")


def _move_into_place(staging: Path, destination: Path) -> None:
    if destination.exists():
        # A directory can only be renamed onto an empty one: move the old task aside first.
        retired = _sibling(destination, "old")
        os.replace(destination, retired)
        os.replace(staging, destination)
        shutil.rmtree(retired)
    else:
        os.replace(staging, destination)


def task_scene(spec: TaskSpec, split: str, label: int, index: int, seed: int = 0) -> Scene:
    """The scene of image `index` of class `label` in `split` (file `<index>.png` of the task rendered with
    `seed`): seeded by position, not by a running stream, so any image can be regenerated on its own."""
    return spec.scene_for_class(label, np.random.default_rng([seed, SPLITS.index(split), label, index]))


def _render_split(spec: TaskSpec, folder: Path, split: str, count: int, seed: int, image_size: int) -> None:
    for label, classname in enumerate(spec.classnames):
        class_dir = folder / split / class_folder(classname)
        class_dir.mkdir(parents=True)
        for index in range(count):
            scene = task_scene(spec, split, label, index, seed)
            render(scene, image_size).save(class_dir / f"{index:04d}.png", compress_level=1)


def materialize(
    task_name: str,
    root: str | os.PathLike,
    seed: int = 0,
    image_size: int = 64,
    force: bool = False,
    images_per_class: Mapping[str, int] | None = None,
) -> Path:
    """Write a task under `root/<task_name>` and return that folder.

    A task already there with the same settings (meta.json matches) is returned untouched unless `force`.
    The task is rendered into a hidden temporary folder next to its destination, meta.json last, and then
    renamed into place, so a crash never leaves a half-written task where readers look.
    """
    if task_name not in TASKS:
        raise KeyError(f"unknown synthetic task {task_name!r}; known: {sorted(TASKS)}")
    spec = TASKS[task_name]
    images_per_class = dict(spec.images_per_class if images_per_class is None else images_per_class)
    root = Path(root)
    destination = root / task_name
    meta = _meta(spec, seed, image_size, images_per_class)
    if not force and _read_meta(destination) == meta:
        return destination

    root.mkdir(parents=True, exist_ok=True)
    staging = _sibling(destination, "tmp")
    staging.mkdir()
    try:
        for split in SPLITS:
            _render_split(spec, staging, split, images_per_class[split], seed, image_size)
        _write_json_atomically(staging / META_FILE, meta)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    try:
        _move_into_place(staging, destination)
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if _read_meta(destination) != meta:
            raise
        # Another process (e.g. a second rank) installed the same task first: use theirs.
    return destination
