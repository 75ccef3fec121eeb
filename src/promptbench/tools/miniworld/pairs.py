"""An endless, resumable stream of (image, caption) pairs for pretraining a small CLIP offline.

Pair `index` depends only on `(seed, index)`, so a run resumes at any index and DataLoader workers shard
the stream by index (worker w of n takes `iter_pairs(seed, start_index=w, stride=n)`).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from itertools import count
from types import MappingProxyType

import numpy as np
from PIL import Image

from promptbench.tools.miniworld.captions import caption
from promptbench.tools.miniworld.render import Scene, render, sample_scene

# "sketch" is held out and "pixelated"/"noisy" are rare, leaving room for domain-shift tasks downstream.
PRETRAIN_STYLE_WEIGHTS: Mapping[str, float] = MappingProxyType(
    {"shaded": 0.3, "flat": 0.3, "outline": 0.3, "pixelated": 0.05, "noisy": 0.05, "sketch": 0.0}
)
OBJECT_COUNT_PROBABILITIES = {1: 0.6, 2: 0.25, 3: 0.15}
DISTRACTOR_PROBABILITY = 0.25


def sample_pretraining_scene(rng: np.random.Generator, style_weights: Mapping[str, float] | None = None) -> Scene:
    counts = list(OBJECT_COUNT_PROBABILITIES)
    object_count = counts[rng.choice(len(counts), p=list(OBJECT_COUNT_PROBABILITIES.values()))]
    return sample_scene(
        rng,
        count=object_count,
        distractors=int(rng.random() < DISTRACTOR_PROBABILITY),
        style_weights=PRETRAIN_STYLE_WEIGHTS if style_weights is None else style_weights,
    )


def make_pair(
    seed: int, index: int, style_weights: Mapping[str, float] | None = None, image_size: int = 64
) -> tuple[Image.Image, str]:
    """Pair number `index` of the stream `seed`; `style_weights` defaults to `PRETRAIN_STYLE_WEIGHTS`."""
    rng = np.random.default_rng([seed, index])
    scene = sample_pretraining_scene(rng, style_weights)
    return render(scene, image_size), caption(scene, rng)


def iter_pairs(
    seed: int,
    start_index: int = 0,
    stride: int = 1,
    style_weights: Mapping[str, float] | None = None,
    image_size: int = 64,
) -> Iterator[tuple[Image.Image, str]]:
    """Pairs `start_index`, `start_index + stride`, ... of the stream `seed`, forever."""
    for index in count(start_index, stride):
        yield make_pair(seed, index, style_weights, image_size)
