"""promptbench.tools.world_features: what the bundled mini CLIP's image features follow on a mini-world task."""

from __future__ import annotations

import pytest
import torch

from promptbench.tools import world_features
from promptbench.tools.world_features import FACTORS, explained_variance, measure


def test_explained_variance_is_zero_for_random_groups_and_one_for_the_generating_factor():
    generator = torch.Generator().manual_seed(0)
    groups = [index % 4 for index in range(400)]
    centres = torch.randn(4, 8, generator=generator) * 10
    features = centres[groups] + 0.01 * torch.randn(400, 8, generator=generator)
    assert explained_variance(features, groups) == pytest.approx(1.0, abs=1e-3)
    noise = torch.randn(400, 8, generator=generator)
    assert abs(explained_variance(noise, groups)) < 0.02
    assert explained_variance(noise, [0] * 400) == pytest.approx(0.0, abs=1e-9)


def test_measure_on_synth_swatches_with_the_bundled_mini_clip(capsys):
    row = measure("synth_swatches", "mini", shots=2, seeds=(1,), test_per_class=6, train_pool=10)
    assert set(row.explained) == {"class", *FACTORS}
    # The class of synth_swatches is the object's colour, and every object is a circle.
    assert row.explained["class"] == pytest.approx(row.explained["colour"])
    assert row.explained["shape"] == pytest.approx(0.0, abs=1e-9)
    assert -1.0 <= row.cosine_other_class < row.cosine_same_class <= 1.0
    for accuracy in (row.zero_shot, row.neighbours_of_class, row.one_nn, row.class_mean, row.linear_probe):
        assert 0.0 <= accuracy <= 100.0
    table = world_features.markdown([row], shots=2)
    assert table.splitlines()[2].startswith(f"| synth_swatches | mini | {row.zero_shot:.1f} |")
