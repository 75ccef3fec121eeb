"""Sweeps: Hydra multirun locally and on a real single-node SLURM cluster through submitit."""

from __future__ import annotations

import pytest

from conftest import find_results, run_py
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
