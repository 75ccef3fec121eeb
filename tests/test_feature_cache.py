"""The feature cache: what its key covers, per-view reuse, determinism of augmented views, concurrency,
killed extractions, and `promptbench cache ls|rm`."""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from promptbench.cli import main as cli_main
from promptbench.data.datamodule import FewShotDataModule, ViewPerEpochSampler
from promptbench.data.datasets import FolderDataset
from promptbench.contract import DataContract, FeatureSet, Views
from promptbench.data.features import FeatureStore
from promptbench.errors import PromptbenchError
from promptbench.protocols import FewShot


def toy_task(root: Path, shots: int = 2):
    return FewShot().build(FolderDataset(root), shots)


def datamodule(task, backbone, store, **options) -> FewShotDataModule:
    return FewShotDataModule(task.sets(), task.source, backbone, DataContract(inputs="features"),
                             device=torch.device("cpu"), feature_store=store,
                             **{"num_workers": 0, "eval_batch_size": 4, **options})


class KeyRecorder(FeatureStore):
    """Records the keys it is asked for and never extracts (answers with a fake set)."""

    def __init__(self):
        super().__init__(None)
        self.keys: list[dict] = []

    def get(self, key, extract):
        self.keys.append(key)
        n = key["count"]
        return FeatureSet(torch.zeros(n, 4), torch.zeros(n, dtype=torch.long), torch.arange(n))


def stand_in_backbone(fingerprint: str = "model|weights-a"):
    return SimpleNamespace(fingerprint=fingerprint, image_size=32, mean=(0.5,) * 3, std=(0.25,) * 3)


def test_every_key_component_changes_the_digest(toy_root, tmp_path):
    task = toy_task(shutil.copytree(toy_root, tmp_path / "toy"))  # a copy: one of its files gets rewritten
    recorder = KeyRecorder()
    base = datamodule(task, stand_in_backbone(), recorder)
    base.features("train")
    base.views("train", Views(2, (0.5, 1.0)))                          # views 0 and 1
    base.views("train", Views(1, (0.08, 1.0)))                         # another transform
    datamodule(task, stand_in_backbone("model|weights-b"), recorder).features("train")
    datamodule(task, stand_in_backbone(), recorder, precision="16-mixed").features("train")
    datamodule(task, stand_in_backbone(), recorder, seed=7).views("train", Views(1, (0.5, 1.0)))
    base.features("val")
    digests = [FeatureStore.digest(key) for key in recorder.keys]
    # Asking for more views of the same transform and seed reuses the first ones: only view 2 is new.
    base.views("train", Views(3, (0.5, 1.0)))
    more_views = [FeatureStore.digest(key) for key in recorder.keys[len(digests):]]
    assert more_views[:2] == digests[1:3] and more_views[2] not in digests
    # Same items, one file rewritten (new size and mtime): the file-list digest must change.
    image = Path(task.train.items[0].path)
    image.write_bytes(image.read_bytes() + b"\0")
    base.features("train")
    digests += [more_views[2], FeatureStore.digest(recorder.keys[-1])]
    assert len(digests) == 10 and len(set(digests)) == 10


def test_the_provider_supplies_only_the_sets_the_contract_reads(toy_root):
    task = toy_task(toy_root)
    module = FewShotDataModule(task.sets(), task.source, stand_in_backbone(), DataContract("features", reads=("train",)),
                               device=torch.device("cpu"), feature_store=KeyRecorder())
    assert len(module.provider.features("train").labels) == len(task.train)
    with pytest.raises(PromptbenchError, match="does not declare"):
        module.provider.features("test")
    with pytest.raises(PromptbenchError, match="does not have"):
        FewShotDataModule(task.sets(), task.source, stand_in_backbone(), DataContract("features", reads=("base",)),
                          device=torch.device("cpu"), feature_store=KeyRecorder())


def test_second_request_reuses_the_cache_and_views_are_deterministic(toy_root, tiny_backbone, tmp_path):
    task = toy_task(toy_root)
    first = datamodule(task, tiny_backbone, FeatureStore(tmp_path))
    views = first.views("train", Views(2, (0.5, 1.0)))
    assert first.feature_store.extractions == 2 and views.features.shape[:2] == (2, len(task.train))
    assert not torch.allclose(views.features[0], views.features[1]), "two augmented views should differ"

    again = datamodule(task, tiny_backbone, FeatureStore(tmp_path))
    mean = again.views("train", Views(2, (0.5, 1.0))).mean()
    assert again.feature_store.extractions == 0 and again.feature_store.hits == 2
    torch.testing.assert_close(mean.features, views.features.mean(dim=0))

    # A view is drawn per item, so neither batch size nor caching changes it.
    uncached = datamodule(task, tiny_backbone, FeatureStore(None), eval_batch_size=5)
    redone = uncached.views("train", Views(2, (0.5, 1.0)))
    torch.testing.assert_close(redone.features, views.features)


def test_view_per_epoch_sampler_walks_the_views():
    sampler = ViewPerEpochSampler(items=5, views=3, seed=1)
    for epoch in range(7):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        view = epoch % 3
        assert sorted(indices) == list(range(view * 5, view * 5 + 5))


def _concurrent_get(root, key, calls_dir, barrier, results):
    def slow_extract():
        (Path(calls_dir) / f"{os.getpid()}").touch()
        time.sleep(0.3)
        return FeatureSet(torch.arange(12.0).view(4, 3), torch.arange(4), torch.arange(4))

    barrier.wait()
    features = FeatureStore(root).get(key, slow_extract)
    results.put(features.features.sum().item())


def test_concurrent_requests_extract_once_and_never_tear(tmp_path):
    context = multiprocessing.get_context("fork")
    calls, workers = tmp_path / "calls", 4
    calls.mkdir()
    barrier, results = context.Barrier(workers), context.Queue()
    key = {"backbone": "x", "set": "train"}
    processes = [context.Process(target=_concurrent_get, args=(tmp_path / "cache", key, calls, barrier, results))
                 for _ in range(workers)]
    for process in processes:
        process.start()
    for process in processes:
        process.join(timeout=60)
    assert all(process.exitcode == 0 for process in processes)
    assert len(list(calls.iterdir())) == 1, "exactly one process may extract"
    assert [results.get(timeout=5) for _ in range(workers)] == [66.0] * workers
    [path] = (tmp_path / "cache").glob("*.safetensors")
    assert load_file(str(path))["features"].shape == (4, 3)
    assert not list((tmp_path / "cache").glob(".*.tmp"))


def _extract_until_killed(root, key, started):
    def hang():
        started.set()
        time.sleep(60)

    FeatureStore(root).get(key, hang)


def test_killed_extraction_leaves_nothing_a_later_run_trusts(tmp_path):
    context = multiprocessing.get_context("fork")
    started, key = context.Event(), {"backbone": "x", "set": "test"}
    process = context.Process(target=_extract_until_killed, args=(tmp_path, key, started))
    process.start()
    assert started.wait(timeout=30)
    os.kill(process.pid, signal.SIGKILL)
    process.join()
    assert not list(tmp_path.glob("*.safetensors"))
    store = FeatureStore(tmp_path)  # the dead process's lock is released: this must not block
    features = store.get(key, lambda: FeatureSet(torch.ones(2, 3), torch.arange(2), torch.arange(2)))
    assert store.extractions == 1 and features.features.shape == (2, 3)


def fill_store(root: Path) -> FeatureStore:
    store = FeatureStore(root)
    for backbone in ("RN50-quickgelu|openai", "promptbench-tiny|random-seed0"):
        for name in ("train", "test"):
            key = {"backbone": backbone, "precision": "32", "dataset": "dtd", "set": name, "view": None}
            store.get(key, lambda: FeatureSet(torch.ones(3, 2), torch.arange(3), torch.arange(3)))
    return store


def test_cache_ls_lists_entries(tmp_path, capsys):
    store = fill_store(tmp_path)
    assert cli_main(["cache", "ls", "--root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "4 entries" in out
    for entry in store.entries():
        assert entry.digest[:12] in out
    assert "dtd/train test transform" in out and "RN50-quickgelu|openai" in out and "3x2" in out


def test_cache_rm_selects_by_backbone_age_and_digest(tmp_path, capsys):
    store = fill_store(tmp_path)
    assert cli_main(["cache", "rm", "--root", str(tmp_path)]) == 2  # nothing selected is an error

    assert cli_main(["cache", "rm", "--root", str(tmp_path), "--backbone", "RN50"]) == 0
    assert {e.key["backbone"] for e in store.entries()} == {"promptbench-tiny|random-seed0"}

    old, recent = store.entries()
    long_ago = time.time() - 10 * 86400
    os.utime(old.path, (long_ago, long_ago))
    assert cli_main(["cache", "rm", "--root", str(tmp_path), "--older-than", "5"]) == 0
    assert [e.digest for e in store.entries()] == [recent.digest]
    assert not old.path.with_suffix(".json").exists()

    assert cli_main(["cache", "rm", "--root", str(tmp_path), "zzzz"]) == 2  # unknown digest
    assert cli_main(["cache", "rm", "--root", str(tmp_path), recent.digest[:8]]) == 0
    assert store.entries() == []

    fill_store(tmp_path)
    stale = [tmp_path / ".abc.safetensors.x.tmp", tmp_path / "abc.json", tmp_path / "abc.lock"]
    live = tmp_path / ".def.safetensors.y.tmp"  # being written right now by another job
    for path in [*stale, live]:
        path.write_bytes(b"partial")
    for path in stale:
        os.utime(path, (long_ago, long_ago))
    assert cli_main(["cache", "rm", "--root", str(tmp_path), "--all"]) == 0
    assert store.entries() == [] and not any(path.exists() for path in stale) and live.exists()
    assert "removed 4 entries" in capsys.readouterr().out


def test_cache_commands_default_to_the_runs_feature_cache(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("PROMPTBENCH_CACHE", raising=False)
    monkeypatch.setenv("PROMPTBENCH_ROOT", str(tmp_path))
    fill_store(tmp_path / ".cache" / "promptbench" / "features")
    assert cli_main(["cache", "ls"]) == 0
    assert f"feature cache {tmp_path}/.cache/promptbench/features: 4 entries" in capsys.readouterr().out
