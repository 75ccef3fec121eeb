"""Metrics on hand-made logits; the feature cache's key, reuse and atomicity."""

from __future__ import annotations

import os
import time

import pytest
import torch

from promptbench.data.features import FeatureSet, FeatureStore, files_digest
from promptbench.data.items import Item
from promptbench.metrics import classification_metrics


def test_metrics_by_hand():
    labels = torch.tensor([0, 0, 0, 1, 2, 2])
    predicted = torch.tensor([0, 0, 1, 1, 0, 2])
    logits = torch.nn.functional.one_hot(predicted, 6).float() * 5
    metrics = classification_metrics(logits, labels)
    assert metrics["top1"] == pytest.approx(100 * 4 / 6)
    # per class: 2/3, 1/1, 1/2 over the three classes present
    assert metrics["mean_per_class"] == pytest.approx(100 * (2 / 3 + 1 + 0.5) / 3)
    assert metrics["top5"] == pytest.approx(100.0)
    # every confidence is e^5 / (e^5 + 5): one bin, whose accuracy is 4/6
    assert metrics["n"] == 6 and metrics["ece"] == pytest.approx(100 * (torch.softmax(logits[0], 0).max().item() - 4 / 6))


def test_no_top5_below_five_classes():
    metrics = classification_metrics(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]))
    assert "top5" not in metrics


def fake_features(n=4, dim=3, value=1.0) -> FeatureSet:
    return FeatureSet(torch.full((n, dim), value), torch.arange(n), torch.arange(n))


def test_cache_reuses_and_separates_keys(tmp_path):
    store = FeatureStore(tmp_path)
    calls = []

    def extract(value):
        calls.append(value)
        return fake_features(value=value)

    first = store.get({"backbone": "a", "files": "x"}, lambda: extract(1.0))
    again = store.get({"backbone": "a", "files": "x"}, lambda: extract(2.0))
    other = store.get({"backbone": "b", "files": "x"}, lambda: extract(3.0))
    assert calls == [1.0, 3.0]
    assert torch.equal(first.features, again.features) and other.features[0, 0] == 3.0
    assert store.extractions == 2 and store.hits == 1
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]
    assert leftovers == []


def test_crash_during_extraction_leaves_no_cache_file(tmp_path):
    store = FeatureStore(tmp_path)

    def crash():
        raise RuntimeError("killed")

    with pytest.raises(RuntimeError):
        store.get({"k": 1}, crash)
    assert not list(tmp_path.glob("*.safetensors"))
    assert store.get({"k": 1}, fake_features).features.shape == (4, 3)


def test_file_digest_changes_when_an_image_changes(tmp_path):
    path = tmp_path / "a.png"
    path.write_bytes(b"one")
    items = [Item(str(path), 0, "a")]
    before = files_digest(items)
    time.sleep(0.01)
    path.write_bytes(b"two!")
    os.utime(path, None)
    assert files_digest(items) != before
    assert files_digest([Item(str(path), 1, "a")]) != files_digest(items)
