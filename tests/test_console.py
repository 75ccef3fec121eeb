"""The quiet console: a short CoOp run prints a handful of lines and none of the libraries' repeated warnings;
`verbose=true` brings Lightning's output back; the progress line's cadence in a log."""

from __future__ import annotations

import io
from types import SimpleNamespace

from conftest import run_py
from promptbench.console import EpochProgress

NOISE = ("weights_only", "srun", "litlogger", "LitLogger", "val_dataloader", "validation_step", "pytree", "treespec",
         "eval mode", "GPU available", "LOCAL_RANK", "wandb sync", "Run history")


def coop_run(toy_root, *extra: str) -> list[str]:
    return ["method=coop", "backbone=tiny", "dataset=folder", f"dataset.root={toy_root}", "shots=2",
            "method.n_ctx=4", "trainer.max_epochs=3", *extra]


def test_a_short_coop_run_prints_few_lines_and_no_library_noise(toy_root, run_env):
    result = run_py(coop_run(toy_root), run_env)  # the default logger (wandb, offline) and loader workers
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    lines = output.splitlines()
    assert len(lines) < 40, output
    assert not [word for word in NOISE if word in output], output
    progress = [line for line in lines if ": epoch " in line]
    assert [line.split(": epoch ")[1].split()[0] for line in progress] == ["1/3", "2/3", "3/3"]
    assert "results:" in output and "top1" in output


def test_verbose_restores_lightnings_progress_bar(toy_root, run_env):
    result = run_py(coop_run(toy_root, "verbose=true", "logger=none", "tag=verbose"), run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    output = result.stdout + result.stderr
    assert "Epoch 2" in output and ": epoch " not in output


def test_progress_in_a_log_prints_every_tenth_of_the_epochs():
    stream = io.StringIO()
    progress = EpochProgress("coop on dtd", stream=stream)
    trainer = SimpleNamespace(is_global_zero=True, max_epochs=25, callback_metrics={}, current_epoch=0)
    for epoch in range(25):
        trainer.current_epoch = epoch
        progress.on_train_epoch_end(trainer, None)
    printed = [line.split("epoch ")[1].split("/")[0] for line in stream.getvalue().splitlines()]
    assert printed == ["3", "6", "9", "12", "15", "18", "21", "24", "25"]
