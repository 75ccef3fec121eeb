"""`python run.py ...` end to end on the tiny backbone and PNG files on disk: results, predictions, errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import find_results, run_py
from promptbench.metrics import classification_metrics

BASE = ["backbone=tiny", "dataset=folder", "method=zeroshot", "shots=2", "seed=1", "num_workers=0"]


@pytest.fixture()
def corrupted_root(toy_root, tmp_path) -> Path:
    root = shutil.copytree(toy_root, tmp_path / "corrupt")
    (root / "test" / "red" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\ntruncated")
    return root


def test_zeroshot_writes_consistent_results_and_predictions(toy_root, run_env, tmp_path):
    """Also the tensorboard logger: its event file lands in the run dir next to results.json."""
    result = run_py([*BASE, f"dataset.root={toy_root}", "logger=tensorboard", "save_predictions=true"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [results] = find_results(tmp_path / "outputs")
    run_dir = Path(results["_dir"])
    assert run_dir.parts[-4:] == ("folder", "tiny", "zeroshot", "shots2_seed1")
    assert results["status"] == "completed" and results["method"] == "zeroshot"
    assert results["shots"] == 0, "zero-shot never sees training images: reported at 0 shots"
    assert results["splits"] == {"train": 6, "val": 6, "test": 18}
    assert results["config"]["backbone"]["model_name"] == "promptbench-tiny"
    assert {"torch", "open_clip_torch", "lightning", "python"} <= set(results["versions"])
    assert results["timings_s"]["evaluate/test"] > 0 and results["device"]["type"] == "cpu"

    predictions = torch.load(run_dir / "predictions.pt", weights_only=False)["test"]
    assert len(predictions["paths"]) == 18 and predictions["logits"].shape == (18, 3)
    recomputed = classification_metrics(predictions["logits"], predictions["labels"])
    for key in ("top1", "mean_per_class", "ece"):
        assert results["metrics"]["test"][key] == pytest.approx(recomputed[key])
    labels_from_paths = [predictions["classnames"].index(Path(p).parent.name) for p in predictions["paths"]]
    assert labels_from_paths == predictions["labels"].tolist()
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*")), "no tensorboard event file"
    assert "top1" in result.stdout and "results:" in result.stdout


def test_wandb_logs_an_offline_run_without_an_account(toy_root, run_env, tmp_path):
    run_env.pop("WANDB_API_KEY", None)
    result = run_py([*BASE, f"dataset.root={toy_root}", "logger=wandb"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [results] = find_results(tmp_path / "outputs")
    offline_runs = list(Path(results["_dir"]).glob("wandb/offline-run-*/run-*.wandb"))
    assert offline_runs, "no offline wandb run written"
    record = offline_runs[0].read_bytes()  # protobuf records keep strings verbatim
    for expected in (b"default-fewshot-folder-zeroshot-tiny", b"method:zeroshot", b"seed:1", b"shots:2", b"test/top1"):
        assert expected in record, expected


def test_corrupt_image_fails_with_its_path(corrupted_root, run_env):
    result = run_py([*BASE, f"dataset.root={corrupted_root}", "logger=none", "feature_cache=false"], run_env)
    assert result.returncode == 2
    assert "red/0.png" in result.stderr and "skip_bad_images=true" in result.stderr


def test_skip_bad_images_skips_and_counts(corrupted_root, run_env, tmp_path):
    result = run_py([*BASE, f"dataset.root={corrupted_root}", "logger=csv", "dataset.skip_bad_images=true"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [results] = find_results(tmp_path / "outputs")
    assert "test/skipped_images" in (Path(results["_dir"]) / "csv" / "metrics.csv").read_text()
    assert results["metrics"]["test"]["skipped_images"] == 1 and results["metrics"]["test"]["n"] == 17


def test_missing_dataset_root_is_a_clear_error(run_env, tmp_path):
    result = run_py([*BASE, f"dataset.root={tmp_path / 'absent'}", "logger=none"], run_env)
    assert result.returncode == 2
    assert "does not exist" in result.stderr and "dataset.root=" in result.stderr
    assert "Traceback" not in result.stderr


def test_second_run_reuses_cached_features(toy_root, run_env, tmp_path):
    args = [*BASE, f"dataset.root={toy_root}", "logger=none"]
    assert run_py(args, run_env).returncode == 0
    assert run_py([*args, "tag=again"], run_env).returncode == 0
    by_tag = {Path(r["_dir"]).relative_to(tmp_path / "outputs").parts[0]: r for r in find_results(tmp_path / "outputs")}
    assert by_tag["default"]["feature_cache"] == {"extractions": 1, "hits": 0}
    assert by_tag["again"]["feature_cache"] == {"extractions": 0, "hits": 1}
    assert by_tag["again"]["metrics"]["test"]["top1"] == by_tag["default"]["metrics"]["test"]["top1"]
