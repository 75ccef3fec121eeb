"""A procedural world of shapes for offline CLIP pretraining and few-shot downstream tasks.

`make_pair` / `iter_pairs` stream (image, caption) pretraining pairs; `materialize` writes a downstream
classification task (see `TASKS`) to disk as class folders.
"""

from promptbench.tools.miniworld.captions import caption
from promptbench.tools.miniworld.pairs import PRETRAIN_STYLE_WEIGHTS, iter_pairs, make_pair, sample_pretraining_scene
from promptbench.tools.miniworld.render import (
    COLOURS,
    SHAPES,
    SIZES,
    STYLES,
    TEXTURES,
    Obj,
    Scene,
    position_name,
    render,
    sample_scene,
)
from promptbench.tools.miniworld.tasks import TASKS, TASKS_VERSION, TaskSpec, class_folder, materialize, task_scene

__all__ = [
    "COLOURS",
    "PRETRAIN_STYLE_WEIGHTS",
    "SHAPES",
    "SIZES",
    "STYLES",
    "TASKS",
    "TASKS_VERSION",
    "TEXTURES",
    "Obj",
    "Scene",
    "TaskSpec",
    "caption",
    "class_folder",
    "iter_pairs",
    "make_pair",
    "materialize",
    "position_name",
    "render",
    "sample_pretraining_scene",
    "sample_scene",
    "task_scene",
]
