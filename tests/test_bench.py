"""`make bench` in smoke mode: every section runs, writes its files, and compares at equal logits."""

from __future__ import annotations

import json

import pytest

from conftest import REPO
import torch

from promptbench.tools.bench import bench_deep_prompts, main, real_shapes_plan


def test_bench_smoke_writes_tables_at_equal_logits(tmp_path):
    main(["--smoke", "--backbone", "tiny", "--out", str(tmp_path), "--run-py", str(REPO / "run.py")])
    payload = json.loads((tmp_path / "benchmarks_smoke.json").read_text())
    sections = {row["section"] for row in payload["rows"]}
    assert sections == {"coop_step", "cocoop_step", "deep_prompt_step", "extraction", "sweep", "text_flops",
                        "speed_options", "real_shapes", "imagenet_epoch"}
    cached, uncached = [row for row in payload["rows"] if row["section"] == "sweep"]
    assert cached["feature_cache"] and cached["runs"] == uncached["runs"] == 2
    assert cached["image_tower_passes"] == cached["minimum_passes"] < uncached["image_tower_passes"]
    for row in payload["rows"]:
        if "max_logit_diff" in row:
            assert row["max_logit_diff"] < 1e-3, row
    coop = next(row for row in payload["rows"] if row["section"] == "coop_step")
    assert coop["prompt_tokens"] < coop["context_length"]
    assert "SMOKE MODE" in (tmp_path / "benchmarks_smoke.md").read_text()
    flops = next(row for row in payload["rows"] if row["section"] == "text_flops")
    assert flops["gflop_per_step"] > 0 and 0 < flops["fraction_of_matmul_rate"]
    for option in (row for row in payload["rows"] if row["section"] == "speed_options"):
        assert option["max_diff"] < 1e-3, option
    assert {row["text_pass"] for row in payload["rows"] if row["section"] == "text_flops"} == {"full", "shared_prefix"}
    real = [row for row in payload["rows"] if row["section"] == "real_shapes"]
    assert {(row["method"], row["text_pass"]) for row in real} == {
        ("coop", "reference"), ("coop", "full"), ("coop", "shared_prefix"), ("coop", "shared_prefix+chunk2"),
        ("cocoop", "reference"), ("cocoop", "shared_prefix+chunk2"), ("maple", "reference"), ("maple", "shared_prefix")}
    for row in real:
        assert row["step_ms"] > 0 and row["peak_mb"] > 0 and row["speedup"] > 0, row
    coop = {row["text_pass"]: row for row in real if row["method"] == "coop"}
    # the smoke limit of 2 reference prompts: the reference runs 2 of the 4 classes and is scaled
    assert coop["reference"]["reference_measured_on"] == "2 of 4 classes"
    assert coop["shared_prefix"]["text_tokens"].endswith("shared)")
    epochs = [row for row in payload["rows"] if row["section"] == "imagenet_epoch"]
    assert [row["decode"] for row in epochs] == ["cpu_workers (0)", "decode_jpeg on cpu"]
    assert all(0 < row["epoch_s"] and row["coop_50_epochs_h"] < row["coop_200_epochs_h"] for row in epochs)


def test_bench_remeasures_only_the_named_sections(tmp_path):
    main(["--smoke", "--backbone", "tiny", "--out", str(tmp_path), "--sections", "coop_step", "cocoop_step"])
    first = json.loads((tmp_path / "benchmarks_smoke.json").read_text())
    main(["--smoke", "--backbone", "tiny", "--out", str(tmp_path), "--sections", "cocoop_step"])
    second = json.loads((tmp_path / "benchmarks_smoke.json").read_text())
    coop = [row for row in second["rows"] if row["section"] == "coop_step"]
    assert coop == [row for row in first["rows"] if row["section"] == "coop_step"]
    assert set(second["measured"]) == {"coop_step", "cocoop_step"}
    assert second["rows"][0]["section"] == "coop_step"  # sections keep their order


def test_bench_sweep_without_run_py_stops_before_measuring(tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        main(["--smoke", "--backbone", "tiny", "--out", str(tmp_path), "--run-py", str(tmp_path / "run.py")])
    assert stopped.value.code == 2
    assert "--run-py PATH" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_deep_prompt_steps_match_the_per_layer_reference():
    rows = bench_deep_prompts(REPO / "conf", {"tiny": [3]}, torch.device("cpu"), repeats=1)
    assert [(row["method"], row["n_cls"], row["batch"]) for row in rows] == [("maple", 3, 4), ("promptsrc", 3, 4)]
    for row in rows:
        assert row["max_logit_diff"] < 1e-4 and row["loss_diff"] < 1e-4, row
        assert row["promptbench_ms"] > 0 and row["reference_ms"] > 0 and row["speedup"] > 0
        assert {"promptbench_peak_mb", "reference_peak_mb", "depth_text_image"} <= set(row)
        assert row["prompt_tokens"] < row["context_length"] == 77  # the reference runs all 77 tokens


def test_the_gpu_run_covers_every_method_and_class_count_within_memory():
    plan = real_shapes_plan(torch.device("cuda"), smoke=False)
    assert {(method, model, n_cls) for method, model, n_cls, _ in plan} == {
        (method, model, n_cls) for model in ("ViT-B-16-quickgelu", "RN50-quickgelu") for method in ("coop", "cocoop")
        for n_cls in (100, 1000)} | {("maple", "ViT-B-16-quickgelu", n_cls) for n_cls in (100, 1000)}
    for method, _, n_cls, variants in plan:
        assert variants[0] == "reference" and "shared_prefix" in variants and "shared_prefix+chunk" in variants
        assert ("full" in variants) != (method == "cocoop" and n_cls == 1000)  # 32 000 prompts: chunked only
