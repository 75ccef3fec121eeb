"""What a crash of another tool or a full disk leaves behind: results.json and checkpoints that are not what they
claim. Each is refused or set aside with a message that names the file, never a raw traceback or a wrong number."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from conftest import build_method, find_results, run_py
from promptbench.errors import PromptbenchError
from promptbench.methods.base import read_learned
from promptbench.results import MalformedResults, read_results
from test_coop import CLASSNAMES, TEMPLATES, loader, random_images, trainer

ZEROSHOT = ["method=zeroshot", "backbone=tiny", "dataset=folder", "shots=2", "logger=none", "num_workers=0"]
RUN_DIRS = Path("outputs/default/fewshot/folder/tiny/zeroshot")
PNG = b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR\x00\x00\x00\x08"
COMPLETED = {"status": "completed", "method": "zeroshot", "dataset": "folder", "protocol": "fewshot", "shots": 0,
             "seed": 1, "backbone": {"name": "tiny"}, "metrics": {"test": {"top1": 50.0, "n": 18}}}
MALFORMED = {
    "empty": b"",
    "truncated": json.dumps(COMPLETED).encode()[:40],
    "binary": PNG,
    "a list": b"[1, 2, 3]",
    "no status": b"{}",
    "metrics missing": json.dumps({k: v for k, v in COMPLETED.items() if k != "metrics"}).encode(),
    "backbone a string": json.dumps(COMPLETED | {"backbone": "tiny"}).encode(),
    "metric a string": json.dumps(COMPLETED | {"metrics": {"test": {"top1": "50"}}}).encode(),
    "seed a boolean": json.dumps(COMPLETED | {"seed": True}).encode(),
}


def plant(tmp_path: Path, seed: int, content: bytes) -> Path:
    path = tmp_path / RUN_DIRS / f"shots2_seed{seed}" / "results.json"
    path.parent.mkdir(parents=True)
    path.write_bytes(content)
    return path


def set_aside_copies(path: Path) -> list[Path]:
    return sorted(path.parent.glob("results.json.corrupt-*"))


# ---- results.json ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", MALFORMED)
def test_read_results_refuses_a_malformed_file_by_name(tmp_path, kind):
    path = tmp_path / "results.json"
    path.write_bytes(MALFORMED[kind])
    with pytest.raises(MalformedResults, match=f"^{re.escape(str(path))} is not a usable results file: "):
        read_results(path)


def test_read_results_of_a_record_and_of_no_file(tmp_path):
    assert read_results(tmp_path / "results.json") is None
    (tmp_path / "results.json").write_text(json.dumps(COMPLETED))
    assert read_results(tmp_path / "results.json") == COMPLETED
    (tmp_path / "results.json").write_text(json.dumps({"status": "failed"}))
    assert read_results(tmp_path / "results.json") == {"status": "failed"}


def test_a_rerun_sets_a_truncated_results_json_aside_and_runs(toy_root, run_env, tmp_path):
    path = plant(tmp_path, 1, MALFORMED["truncated"])
    result = run_py([*ZEROSHOT, f"dataset.root={toy_root}", "seed=1"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [aside] = set_aside_copies(path)
    assert aside.read_bytes() == MALFORMED["truncated"], "the damaged file is kept, byte for byte"
    [warning] = [line for line in result.stderr.splitlines() if "warning:" in line]
    assert str(path) in warning and str(aside) in warning and "Traceback" not in result.stderr
    [results] = find_results(tmp_path / "outputs")
    assert results["status"] == "completed" and results["metrics"]["test"]["n"] == 18


def test_a_sweep_sets_malformed_results_aside_and_runs_every_job(toy_root, run_env, tmp_path):
    planted = [plant(tmp_path, 1, MALFORMED["binary"]), plant(tmp_path, 2, MALFORMED["a list"])]
    result = run_py(["-m", *ZEROSHOT, f"dataset.root={toy_root}", "seed=1,2"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    for path in planted:
        [aside] = set_aside_copies(path)
        assert f"{path} is not a usable results file" in result.stderr and str(aside) in result.stderr
    assert [r["status"] for r in find_results(tmp_path / "outputs")] == ["completed", "completed"]


def test_overwrite_replaces_a_malformed_results_json(toy_root, run_env, tmp_path):
    path = plant(tmp_path, 1, MALFORMED["metric a string"])
    result = run_py([*ZEROSHOT, f"dataset.root={toy_root}", "seed=1", "overwrite=true"], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert len(set_aside_copies(path)) == 1
    [results] = find_results(tmp_path / "outputs")
    assert results["status"] == "completed" and isinstance(results["metrics"]["test"]["top1"], float)


def test_a_failure_before_skip_if_done_is_recorded_over_a_malformed_results_json(toy_root, run_env, tmp_path):
    path = plant(tmp_path, 1, MALFORMED["empty"])
    result = run_py([*ZEROSHOT, f"dataset.root={toy_root}", "seed=1", f"backbone.pretrained={tmp_path / 'no.pt'}"],
                    run_env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "neither an existing file" in result.stderr
    [aside] = set_aside_copies(path)
    assert f"{path} is not a usable results file: it is empty" in result.stderr and str(aside) in result.stderr
    [results] = find_results(tmp_path / "outputs")
    assert results["status"] == "failed" and "no.pt" in results["error"]["message"]


# ---- checkpoints -------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lightning_checkpoint(tiny_backbone, tmp_path_factory) -> tuple[Path, torch.Tensor]:
    """A checkpoint as Lightning writes it (optimizer, schedule, loops, callbacks), and the context it holds."""
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=2, batch_size=2)
    run = trainer(epochs=1)
    run.fit(method, loader(random_images(4), torch.tensor([0, 1, 2, 0]), batch_size=2))
    path = tmp_path_factory.mktemp("checkpoint") / "last.ckpt"
    run.save_checkpoint(path)
    return path, method.prompt_learner.ctx.detach().clone()


def test_a_lightning_checkpoint_loads_without_unpickling_code(lightning_checkpoint, tiny_backbone):
    path, ctx = lightning_checkpoint
    fresh = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=2, batch_size=2)
    fresh.load_learned(path)
    torch.testing.assert_close(fresh.prompt_learner.ctx, ctx, rtol=0, atol=0)


class WritesAFile:
    """Unpickling this runs code: it creates a file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return Path.touch, (self.marker,)


def bad_checkpoints(folder: Path, lightning_checkpoint: Path) -> list[Path]:
    learned = folder / "learned.safetensors"
    save_file({"prompt_learner.ctx": torch.zeros(2, 64)}, str(learned))
    checkpoint = lightning_checkpoint.read_bytes()
    files = {"image.ckpt": PNG, "image.pt": PNG, "image.safetensors": PNG, "empty.ckpt": b"",
             "truncated.ckpt": checkpoint[: len(checkpoint) // 2], "truncated.safetensors": learned.read_bytes()[:-10],
             "json.ckpt": b'{"state_dict": {}}'}
    for name, content in files.items():
        (folder / name).write_bytes(content)
    torch.save({"state_dict": {}, "hparams": WritesAFile(folder / "pwned")}, folder / "code.ckpt")
    torch.save({"epoch": 3}, folder / "no_state_dict.ckpt")
    return [folder / name for name in (*files, "code.ckpt", "no_state_dict.ckpt")]


def test_a_file_that_is_no_checkpoint_is_refused_with_the_option_and_the_file(lightning_checkpoint, tmp_path):
    for path in bad_checkpoints(tmp_path, lightning_checkpoint[0]):
        with pytest.raises(PromptbenchError) as refused:
            read_learned(path, option="ckpt_path")
        message = str(refused.value)
        assert message.startswith(f"ckpt_path={path} is not a checkpoint promptbench can read: "), path.name
        assert "Expected a Lightning .ckpt" in message and "learned.safetensors" in message, path.name
        assert "weights_only" not in message, path.name
    assert not (tmp_path / "pwned").exists(), "a checkpoint's pickled code ran"


def test_a_malformed_sidecar_is_refused_by_name(tmp_path):
    learned = tmp_path / "learned.safetensors"
    save_file({"prompt_learner.ctx": torch.zeros(2, 64)}, str(learned))
    learned.with_suffix(".json").write_bytes(b'{"method": "co')
    with pytest.raises(PromptbenchError, match=f"^{re.escape(str(learned.with_suffix('.json')))}, the metadata beside "):
        read_learned(learned, option="ckpt_path")


def test_eval_only_with_an_image_as_checkpoint_is_a_clear_error(toy_root, run_env, tmp_path):
    image = tmp_path / "model.ckpt"
    image.write_bytes(PNG)
    result = run_py(["method=coop", "backbone=tiny", "dataset=folder", f"dataset.root={toy_root}", "shots=2",
                     "logger=none", "num_workers=0", "method.n_ctx=4", "eval_only=true", f"ckpt_path={image}"], run_env)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"error: ckpt_path={image} is not a checkpoint promptbench can read" in result.stderr
    assert "Traceback" not in result.stderr and "weights_only" not in result.stderr
    assert [r["status"] for r in find_results(tmp_path / "outputs")] == ["failed"]
