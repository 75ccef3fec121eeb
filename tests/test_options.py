"""Bad options stop a run before anything is built: exit 2, a message naming the option and the accepted values,
and no completed results.json (a failed job records itself as failed)."""

from __future__ import annotations

import json

import pytest

from conftest import composed, find_results, run_py
from promptbench.config import check_run_config
from promptbench.errors import PromptbenchError

CASES = [
    (["shots=abc"], r"shots='abc': expected an integer >= -1"),
    (["shots=2.5"], r"shots=2.5: expected an integer"),
    (["seed=-1"], r"seed=-1: expected an integer >= 0"),
    (["precision=8"], r"precision=8: expected one of 32, .*bf16-mixed"),
    (["eval_batch_size=0"], r"eval_batch_size=0: expected an integer >= 1"),
    (["num_workers=-2"], r"num_workers=-2: expected an integer >= 0"),
    (["time_budget_min=0"], r"time_budget_min=0: expected minutes > 0"),
    (["train_crop_scale=[0.5,2]"], r"train_crop_scale=\[0.5, 2\]: expected \[low, high\]"),
    (["eval_only=maybe"], r"eval_only='maybe': expected true or false"),
    (["method=coop", "trainer.max_epochs=0"], r"trainer.max_epochs=0: expected an integer >= 1"),
    (["method=coop", "method.n_ctx=abc"], r"method.n_ctx='abc' has the wrong type: expected int"),
    (["method=linear_probe", "method.normalize_features=sometimes"],
     r"method.normalize_features='sometimes' has the wrong type: expected bool"),
    (["selection=best"], r"selection='best': expected one of fewshot_val, none, full_val, test_parity"),
    (["method=linear_probe", "method.c_grid=[1,x]"], r"method.c_grid=\[1, 'x'\] has the wrong type"),
    (["method=coop", "shots=0"], r"method 'coop' learns from the training images: shots=0"),
    (["method=tip_adapter_f", "eval_only=true"], r"eval_only=true .* ckpt_path is not set"),
]


@pytest.mark.parametrize("overrides,message", CASES, ids=[" ".join(case[0]) for case in CASES])
def test_a_bad_option_is_named_with_what_is_accepted(overrides, message):
    with pytest.raises(PromptbenchError, match=message):
        check_run_config(composed(("backbone=tiny", *overrides)))


def test_the_default_options_of_every_method_pass():
    for method in ("zeroshot", "coop", "cocoop", "kgcoop", "prograd", "clip_adapter", "tip_adapter", "tip_adapter_f", "linear_probe"):
        check_run_config(composed((f"method={method}", "backbone=tiny")))


def test_gpu_trainer_without_a_gpu_says_what_to_do(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(PromptbenchError, match="no CUDA GPU here: use trainer=cpu"):
        check_run_config(composed(("trainer=gpu",)))


@pytest.mark.parametrize("overrides", [["method=coop", "shots=0"], ["method=coop", "eval_only=true"],
                                       ["shots=abc"]], ids=["untrained", "no checkpoint", "not a number"])
def test_a_refused_run_exits_2_and_writes_no_completed_result(overrides, toy_root, run_env, tmp_path):
    result = run_py(["backbone=tiny", "dataset=folder", f"dataset.root={toy_root}", "logger=none", *overrides], run_env)
    assert result.returncode == 2 and result.stderr.strip().splitlines()[-1].startswith("error: ")
    assert "Traceback" not in result.stderr
    assert not [r for r in find_results(tmp_path / "outputs") if r["status"] == "completed"]
    written = sorted((tmp_path / "outputs").rglob("results.json"))
    assert all(json.loads(path.read_text())["status"] == "failed" for path in written)
