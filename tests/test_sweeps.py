"""Sweeps: Hydra multirun locally and on a real single-node SLURM cluster through submitit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch

from conftest import REPO, find_results, run_py
from slurm_cluster import SlurmCluster

SWEEP = ["backbone=tiny", "dataset=folder", "method=zeroshot", "shots=2", "logger=none", "num_workers=0"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm")).start()
    yield cluster
    cluster.stop()


def test_local_multirun_runs_one_job_per_seed(toy_root, run_env, tmp_path):
    result = run_py(["-m", *SWEEP, f"dataset.root={toy_root}", "seed=1,2"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    results = find_results(tmp_path / "outputs")
    assert sorted(r["seed"] for r in results) == [1, 2]
    assert all(r["_dir"].endswith(f"shots2_seed{r['seed']}") for r in results)
    # The sweep ends with one table: a row per job and eval set, with the job's top-1.
    table = result.stdout[result.stdout.rindex("method  "):].splitlines()
    assert [row.split()[4] for row in table[1:]] == ["1", "2"]
    assert [float(row.split()[-1]) for row in table[1:]] == [round(r["metrics"]["test"]["top1"], 2) for r in
                                                              sorted(results, key=lambda r: r["seed"])]


@pytest.mark.slurm
def test_slurm_sweep_runs_every_job(slurm, toy_root, run_env, tmp_path):
    run_env.update(slurm.env)
    result = run_py(
        ["-m", "hydra/launcher=slurm", *SWEEP, f"dataset.root={toy_root}", "seed=1,2,3",
         "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"],
        run_env, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    results = find_results(tmp_path / "outputs")
    assert sorted(r["seed"] for r in results) == [1, 2, 3]
    assert all(r["status"] == "completed" for r in results)
    assert any((tmp_path / "outputs").rglob(".submitit/*/*_log.out")), "no submitit job logs: not run by SLURM?"


def test_identical_rerun_is_skipped_and_a_different_config_is_refused(toy_root, run_env, tmp_path):
    args = [*SWEEP, f"dataset.root={toy_root}", "seed=1"]
    assert run_py(args, run_env).returncode == 0
    [first] = find_results(tmp_path / "outputs")
    again = run_py(args, run_env)
    assert again.returncode == 0 and "skipped:" in again.stdout
    [second] = find_results(tmp_path / "outputs")
    assert second["finished_at"] == first["finished_at"]

    variant = run_py([*args, "method.template_set=imagenet7"], run_env)
    assert variant.returncode == 2 and "method" in variant.stderr and "tag=<name>" in variant.stderr
    [kept] = find_results(tmp_path / "outputs")
    assert kept["status"] == "completed" and kept["config"]["method"]["template_set"] == "dataset"

    replaced = run_py([*args, "method.template_set=imagenet7", "overwrite=true"], run_env)
    assert replaced.returncode == 0, replaced.stderr[-2000:]
    [latest] = find_results(tmp_path / "outputs")
    assert latest["config"]["method"]["template_set"] == "imagenet7"


def test_an_option_sweep_gets_one_directory_per_value_through_the_tag(toy_root, run_env, tmp_path):
    result = run_py(["-m", *SWEEP, f"dataset.root={toy_root}", "seed=1", "method.template_set=dataset,imagenet7",
                     "tag=templates_${method.template_set}"], run_env)
    assert result.returncode == 0, result.stderr[-2000:]
    results = find_results(tmp_path / "outputs")
    assert sorted(r["config"]["tag"] for r in results) == ["templates_dataset", "templates_imagenet7"]
    assert sorted(r["config"]["method"]["template_set"] for r in results) == ["dataset", "imagenet7"]


def test_results_from_other_backbone_weights_are_not_reused(toy_root, run_env, tmp_path, tiny_backbone):
    # Same config, new bytes behind it (bundled weights after an update, a checkpoint rewritten in place).
    weights = tmp_path / "tiny.safetensors"
    state = {k: v.clone().contiguous() for k, v in tiny_backbone.model.state_dict().items()}
    safetensors.torch.save_file(state, weights)
    args = [*SWEEP, f"dataset.root={toy_root}", "seed=1", f"backbone.pretrained={weights}"]
    assert run_py(args, run_env).returncode == 0
    assert "skipped:" in run_py(args, run_env).stdout

    state["logit_scale"] = state["logit_scale"] + 1.0
    safetensors.torch.save_file(state, weights)
    refused = run_py(args, run_env)
    assert refused.returncode == 2 and "backbone weights" in refused.stderr, refused.stderr[-2000:]
    [kept] = find_results(tmp_path / "outputs")
    assert run_py([*args, "overwrite=true"], run_env).returncode == 0
    [replaced] = find_results(tmp_path / "outputs")
    assert replaced["backbone"]["fingerprint"] != kept["backbone"]["fingerprint"]


def test_a_failing_job_does_not_take_the_sweep_down(toy_root, run_env, tmp_path):
    sweep = [arg for arg in SWEEP if not arg.startswith("shots=")]
    result = run_py(["-m", *sweep, "seed=1", f"dataset.root={toy_root}", "shots=-5,2"], run_env)
    assert result.returncode == 1 and "job(s) failed" in result.stderr
    results = {Path(r["_dir"]).name: r for r in find_results(tmp_path / "outputs")}
    assert results["shots2_seed1"]["status"] == "completed"
    failed = results["shots-5_seed1"]
    assert failed["status"] == "failed" and "shots" in failed["error"]["message"]
    assert "Traceback" in failed["error"]["traceback"]


COOP = ["method=coop", "backbone=tiny", "dataset=folder", "shots=4", "seed=3", "logger=none", "num_workers=0",
        "method.n_ctx=4", "method.batch_size=4", "trainer.max_epochs=60"]


def test_interrupted_training_resumes_to_the_uninterrupted_result(toy_root, run_env, tmp_path):
    args = [*COOP, f"dataset.root={toy_root}"]
    uninterrupted = run_py([*args, "tag=whole"], run_env)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]

    stopped = run_py([*args, "tag=split", "time_budget_min=0.01"], run_env)
    assert stopped.returncode == 2 and "time budget" in stopped.stderr and "resume" in stopped.stderr
    run_dir = tmp_path / "outputs" / "split" / "fewshot" / "folder" / "tiny" / "coop" / "shots4_seed3"
    checkpoint = run_dir / "checkpoints" / "last.ckpt"
    assert checkpoint.is_file()
    epochs_done = torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"]
    assert epochs_done < 59, "the time budget did not interrupt training"

    resumed = run_py([*args, "tag=split"], run_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    results = {Path(r["_dir"]).relative_to(tmp_path / "outputs").parts[0]: r for r in find_results(tmp_path / "outputs")}
    assert results["split"]["resumed_from_checkpoint"] and not results["whole"]["resumed_from_checkpoint"]
    assert results["split"]["metrics"]["test"] == results["whole"]["metrics"]["test"]
    learned = [safetensors.torch.load_file(tmp_path / "outputs" / tag / "fewshot/folder/tiny/coop/shots4_seed3/learned.safetensors")
               for tag in ("whole", "split")]
    for key in learned[0]:
        torch.testing.assert_close(learned[0][key], learned[1][key], rtol=0, atol=1e-6)
    assert not checkpoint.exists(), "a completed run keeps no checkpoints"


@pytest.mark.slurm
def test_slurm_job_killed_mid_run_resumes_when_the_sweep_is_resubmitted(slurm, toy_root, run_env, tmp_path):
    run_env.update(slurm.env)
    coop = [arg for arg in COOP if not arg.startswith(("seed=", "trainer.max_epochs="))]
    sweep = ["-m", "hydra/launcher=slurm", *coop, "trainer.max_epochs=150", f"dataset.root={toy_root}", "seed=1,2",
             "hydra.launcher.partition=debug", "hydra.launcher.gpus_per_node=0", "hydra.launcher.cpus_per_task=1",
             "hydra.launcher.mem_gb=1", "hydra.launcher.timeout_min=10"]
    first = subprocess.Popen([sys.executable, str(REPO / "run.py"), *sweep], cwd=REPO, env=run_env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    outputs = tmp_path / "outputs"
    deadline = time.time() + 240
    while not list(outputs.rglob("checkpoints/last.ckpt")) and time.time() < deadline and first.poll() is None:
        time.sleep(0.5)
    interrupted = {path.parents[1] for path in outputs.rglob("checkpoints/last.ckpt")}
    assert interrupted, "no job reached an epoch checkpoint before finishing or timing out"
    slurm.run("scancel", "--full", "-u", "root")
    # Without accounting, submitit cannot tell a cancelled job from a pending one: stop waiting for it, as a
    # user would with Ctrl-C, then re-submit.
    first.terminate()
    first.wait(timeout=60)

    second = run_py(sweep, run_env, timeout=600)
    assert second.returncode == 0, second.stderr[-3000:]
    results = {Path(r["_dir"]): r for r in find_results(outputs)}
    assert len(results) == 2 and all(r["status"] == "completed" for r in results.values())
    assert any(results[run_dir]["resumed_from_checkpoint"] for run_dir in interrupted)


def test_epoch_samplers_shard_by_rank_under_ddp(monkeypatch):
    from promptbench.data import datamodule

    shards = []
    for rank in range(3):
        monkeypatch.setattr(datamodule, "distributed_rank", lambda rank=rank: (rank, 3))
        sampler = datamodule.EpochKeyedSampler(10, seed=4)
        sampler.set_epoch(2)
        shards.append(list(sampler))
        assert len(sampler) == len(shards[-1]) == 4
    together = [index for shard in shards for index in shard]
    assert sorted(set(together)) == list(range(20, 30)), "every item of epoch 2, each with the epoch in its key"
    assert len(together) - len(set(together)) == 2, "padding repeats as few items as DistributedSampler does"


# prograd all-reduces its second gradient itself; promptsrc aggregates its prompts over epochs on every rank;
# clip_lora trains adapters inside the backbone, for a step budget
DDP_OPTIONS = {"clip_lora": ["method.batch_size=4", "trainer.max_steps=4"]}


@pytest.mark.parametrize("method", ["coop", "prograd", "promptsrc", "clip_lora"])
def test_ddp_on_cpu_processes_trains_and_writes_results_once(method, toy_root, run_env, tmp_path):
    options = DDP_OPTIONS.get(method, [*COOP[7:], "trainer.max_epochs=2"])
    args = [f"method={method}", *COOP[1:7], *options, f"dataset.root={toy_root}", "trainer=ddp",
            "trainer.accelerator=cpu", "trainer.devices=2"]
    result = run_py(args, run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [results] = find_results(tmp_path / "outputs")
    assert results["metrics"]["test"]["n"] == 18 and results["config"]["trainer"]["strategy"] == "ddp"
    assert (Path(results["_dir"]) / "learned.safetensors").is_file()


@pytest.mark.parametrize("stop_signal", [signal.SIGUSR1, signal.SIGTERM], ids=["SIGUSR1", "SIGTERM"])
def test_a_signal_stops_training_at_a_clean_epoch_and_the_rerun_resumes(stop_signal, toy_root, run_env, tmp_path):
    args = [*(arg for arg in COOP if not arg.startswith("trainer.max_epochs=")), f"dataset.root={toy_root}",
            "trainer.max_epochs=400"]
    process = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=run_env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    checkpoint = tmp_path / "outputs/default/fewshot/folder/tiny/coop/shots4_seed3/checkpoints/last.ckpt"
    deadline = time.time() + 120
    while not checkpoint.exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    process.send_signal(stop_signal)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2 and f"stopped by {stop_signal.name}" in stderr, stderr[-2000:]
    stopped_at = torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"]
    assert stopped_at < 399

    resumed = run_py(args, run_env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    [results] = find_results(tmp_path / "outputs")
    assert results["resumed_from_checkpoint"] and results["status"] == "completed"


KILLED = [arg for arg in COOP if not arg.startswith(("trainer.max_epochs=", "num_workers="))] + ["trainer.max_epochs=12"]


def run_dir_of(outputs: Path, tag: str) -> Path:
    return outputs / tag / "fewshot" / "folder" / "tiny" / "coop" / "shots4_seed3"


def kill_mid_training(args: list[str], env: dict[str, str], checkpoint: Path, after_epoch: int) -> None:
    """Start a run and SIGKILL its whole process group (loader workers too) once `after_epoch` is checkpointed."""
    process = subprocess.Popen([sys.executable, str(REPO / "run.py"), *args], cwd=REPO, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + 240
    try:
        while time.monotonic() < deadline and process.poll() is None:
            if checkpoint.is_file() and torch.load(checkpoint, map_location="cpu", weights_only=False)["epoch"] >= after_epoch:
                time.sleep(0.1)  # into the next epoch: kill -9 leaves its batches half done
                break
            time.sleep(0.05)
    finally:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="module")
def uninterrupted_killed_recipe(toy_root, tmp_path_factory):
    """The reference result: the same run, never interrupted, without loader workers."""
    outputs = tmp_path_factory.mktemp("whole")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PROMPTBENCH_OUTPUT": str(outputs),
           "PROMPTBENCH_CACHE": str(outputs / "cache"), "OMP_NUM_THREADS": "1"}
    result = run_py([*KILLED, f"dataset.root={toy_root}", "num_workers=0", "tag=whole"], env)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir_of(outputs, "whole")


@pytest.mark.parametrize("workers", [0, 2])
def test_a_run_killed_mid_epoch_resumes_to_the_uninterrupted_result(workers, toy_root, run_env, tmp_path,
                                                                    uninterrupted_killed_recipe):
    args = [*KILLED, f"dataset.root={toy_root}", f"num_workers={workers}", "tag=killed"]
    run_dir = run_dir_of(tmp_path / "outputs", "killed")
    kill_mid_training(args, run_env, run_dir / "checkpoints" / "last.ckpt", after_epoch=3)
    assert not (run_dir / "results.json").exists(), "the run finished before it could be killed"
    resumed = run_py(args, run_env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = json.loads((uninterrupted_killed_recipe / "results.json").read_text())
    again = json.loads((run_dir / "results.json").read_text())
    assert again["resumed_from_checkpoint"] and again["training"]["epochs"] == 12
    assert again["metrics"]["test"] == whole["metrics"]["test"]
    expected = safetensors.torch.load_file(uninterrupted_killed_recipe / "learned.safetensors")
    for key, value in safetensors.torch.load_file(run_dir / "learned.safetensors").items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)


def test_a_stop_before_the_first_complete_epoch_says_nothing_was_saved(toy_root, run_env, tmp_path):
    stopped = run_py([*COOP, f"dataset.root={toy_root}", "time_budget_min=0.000001"], run_env)
    assert stopped.returncode == 2 and "before any epoch was complete: nothing is saved" in stopped.stderr
    assert not list((tmp_path / "outputs").rglob("last.ckpt"))
    [failed] = find_results(tmp_path / "outputs")
    assert failed["status"] == "failed"
