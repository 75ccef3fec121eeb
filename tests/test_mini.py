"""The bundled mini CLIP: loads offline, matches its model card, and its pretraining code runs and resumes."""

from __future__ import annotations

import hashlib
import json

import hydra
import open_clip
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from safetensors.torch import load_file

from promptbench.backbones import load_backbone
from promptbench.backbones.backbone import BUNDLED_DIR
from promptbench.backbones.weights import EMBEDDING_IDS_KEY, EMBEDDING_ROWS_KEY
from conftest import REPO, find_results, run_py
from promptbench.cli import main as cli_main
from promptbench.tools.pretrain import (BUNDLED_MODELS, MINI_MODEL, MINI_VIT_MODEL, PretrainConfig, card_json, model_card,
                                        pretrain, zero_shot_accuracies)

CARDS = {model: json.loads((BUNDLED_DIR / card_json(model)).read_text()) for model in BUNDLED_MODELS}
# Same code, weights and rendered images: only floating-point summation order may differ between machines.
CARD_TOLERANCE = 1.0


@pytest.mark.parametrize("model", list(BUNDLED_MODELS))
def test_bundled_weights_are_small_and_load_offline(monkeypatch, caplog, model):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = BUNDLED_DIR / f"{model}.safetensors"
    assert path.stat().st_size < 8 * 2**20
    backbone = load_backbone(BUNDLED_MODELS[model]["backbone"], model, "bundled")
    # open_clip's "initialized randomly" would be false here: the bundled weights are loaded.
    assert not [record for record in caplog.records if "random" in record.getMessage().lower()]
    stored = load_file(str(path))
    ids = stored[EMBEDDING_IDS_KEY]
    table = backbone.model.token_embedding.weight
    torch.testing.assert_close(table[ids], stored[EMBEDDING_ROWS_KEY].float())
    unused = torch.ones(len(table), dtype=torch.bool)
    unused[ids] = False
    assert table[unused].abs().sum() == 0
    assert backbone.fingerprint.startswith(f"{model}|sha256:")


@pytest.mark.parametrize("model", list(BUNDLED_MODELS))
def test_bundled_model_reaches_its_model_card_zero_shot_accuracy(tmp_path, model):
    measured = zero_shot_accuracies(BUNDLED_DIR / f"{model}.safetensors", tmp_path, model=model)
    card = CARDS[model]
    assert set(measured) == set(card["zero_shot_top1"])
    for task, accuracy in card["zero_shot_top1"].items():
        assert measured[task] == pytest.approx(accuracy, abs=CARD_TOLERANCE), task
    assert measured["synth_shapes"] >= 2 * 100 / 13, "zero-shot shape accuracy must be at least twice chance"
    assert measured["synth_textures"] >= 4 * 100 / 9


def test_the_two_bundled_models_share_one_frozen_text_tower():
    # mini_vit was pretrained with mini's text tower frozen: the same prompts give the same text features.
    mini, mini_vit = (load_backbone(BUNDLED_MODELS[m]["backbone"], m, "bundled") for m in (MINI_MODEL, MINI_VIT_MODEL))
    tokens = mini.tokenize(["a photo of a maroon circle.", "a small teal star on stripes."])
    torch.testing.assert_close(mini.encode_text(tokens), mini_vit.encode_text(tokens))
    assert mini_vit.vision_layers == 4 and mini_vit.image_size == mini.image_size


def test_pretraining_runs_exports_compactly_and_resumes(tmp_path):
    config = PretrainConfig(out_dir=str(tmp_path), steps=2, batch_size=8, workers=0, threads=1, warmup_steps=1,
                            checkpoint_every=1)
    weights = pretrain(config)
    stored = load_file(str(weights))
    assert stored[EMBEDDING_ROWS_KEY].dtype == torch.float16
    assert 10 < len(stored[EMBEDDING_IDS_KEY]) < 1000, "only the tokens the captions used are exported"
    log_lines = (tmp_path / "log.csv").read_text().strip().splitlines()
    assert len(log_lines) == 1 + 2 and all("nan" not in line for line in log_lines)

    resumed = PretrainConfig(**{**config.__dict__, "steps": 3})
    pretrain(resumed)
    steps = [line.split(",")[0] for line in (tmp_path / "log.csv").read_text().strip().splitlines()[1:]]
    assert steps == ["1", "2", "3"], "a resumed run continues from its checkpoint"
    loaded = load_backbone("mini", MINI_MODEL, str(weights))
    assert loaded.encode_text(loaded.tokenize(["a red star"])).isfinite().all()


def test_pretraining_from_a_frozen_text_tower_trains_only_the_image_tower(tmp_path):
    source = BUNDLED_DIR / f"{MINI_MODEL}.safetensors"
    config = PretrainConfig(out_dir=str(tmp_path), model=MINI_VIT_MODEL, text_tower_from=str(source), steps=2,
                            batch_size=8, workers=0, threads=1, warmup_steps=1, precision="fp32")
    weights = pretrain(config)
    trained = load_backbone("mini_vit", MINI_VIT_MODEL, str(weights))
    mini = load_backbone("mini", MINI_MODEL, "bundled")
    tokens = mini.tokenize(["a navy heart on dots."])
    # The export is fp16 like the source, so the frozen text tower comes back bit for bit.
    torch.testing.assert_close(trained.encode_text(tokens), mini.encode_text(tokens), rtol=0, atol=0)
    # Every token row of the source is kept, though two steps see only a few captions.
    assert torch.equal(load_file(str(weights))[EMBEDDING_IDS_KEY], load_file(str(source))[EMBEDDING_IDS_KEY])
    torch.manual_seed(config.seed)  # pretrain() initialises the model from its seed
    initial = open_clip.create_model(MINI_VIT_MODEL).visual.proj.detach().half().float()
    assert (trained.model.visual.proj - initial).abs().max() > 1e-4, "the image tower trained"


@pytest.mark.slow
def test_pretrain_mini_writes_only_into_out_and_its_weights_load_as_backbone_mini(tmp_path, capsys):
    shipped = {path.name: path.stat().st_mtime_ns for path in BUNDLED_DIR.iterdir()}
    out = tmp_path / "run"
    assert cli_main(["pretrain-mini", "--out", str(out), "--steps", "1", "--batch-size", "8", "--workers", "0",
                     "--threads", "1"]) == 0
    assert {path.name: path.stat().st_mtime_ns for path in BUNDLED_DIR.iterdir()} == shipped
    weights = out / f"{MINI_MODEL}.safetensors"
    assert weights.is_file() and (out / card_json(MINI_MODEL)).is_file() and (out / model_card(MINI_MODEL)).is_file()
    override = f"backbone.pretrained={weights.resolve()}"
    printed = capsys.readouterr().out
    assert f"backbone=mini {override}" in printed and "src/promptbench/assets/" in printed

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["backbone=mini", override])
    backbone = hydra.utils.instantiate(cfg.backbone)
    assert backbone.fingerprint == f"{MINI_MODEL}|sha256:{hashlib.sha256(weights.read_bytes()).hexdigest()}"


def test_coop_on_the_mini_world_improves_over_zero_shot(run_env, tmp_path):
    # The project's learning test: on synth_shades (shades the captions rarely name) a short CoOp run with 16
    # shots must beat the hand-crafted prompt clearly; the full 200-epoch demo run gains about 10 points.
    common = ["backbone=mini", "dataset=synthetic_shades", "shots=16", "seed=1", "logger=none", "num_workers=0"]
    for method in (["method=zeroshot"], ["method=coop", "trainer.max_epochs=20"]):
        result = run_py([*common, *method], run_env, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
    accuracy = {r["method"]: r["metrics"]["test"]["top1"] for r in find_results(tmp_path / "outputs")}
    assert accuracy["zeroshot"] > 3 * 100 / 10, accuracy
    assert accuracy["coop"] >= accuracy["zeroshot"] + 5, accuracy


def test_deep_prompt_methods_on_mini_vit_improve_over_zero_shot(run_env, tmp_path):
    # The deep-prompt methods' learning test, one sweep process: on synth_shades with 16 shots, three epochs (of
    # the references' 5-20; the first is the warm-up at lr 1e-5) must beat the bundled ViT CLIP's hand-crafted
    # prompt by 3 points (measured: zero-shot 82.2, VPT 87.6, IVLP 89.4, MaPLe 89.4, PromptSRC 86.6; their full
    # schedules reach 89-90).
    result = run_py(["-m", "backbone=mini_vit", "dataset=synthetic_shades", "shots=16", "seed=1", "logger=none",
                     "num_workers=0", "method=zeroshot,vpt,ivlp,maple,promptsrc", "trainer.max_epochs=3"],
                    run_env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    accuracy = {r["method"]: r["metrics"]["test"]["top1"] for r in find_results(tmp_path / "outputs")}
    assert accuracy["zeroshot"] > 5 * 100 / 10, accuracy
    for method in ("vpt", "ivlp", "maple", "promptsrc"):
        assert accuracy[method] >= accuracy["zeroshot"] + 3, (method, accuracy)
