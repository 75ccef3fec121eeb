"""SHIP (synthesized features for label-only classes) on the tiny backbone: the VAE against the official formulas
restated, the synthesized features in the cache and in every training batch, the refusals, and runs of
SHIP + CoOp / Tip-Adapter(-F) under protocol=generalized_zero_shot through run.py."""

from __future__ import annotations

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from conftest import REPO, build_method, composed, find_results, run_py
from promptbench.data.datamodule import FewShotDataModule
from promptbench.data.datasets import FolderDataset
from promptbench.data.features import FeatureStore
from promptbench.errors import PromptbenchError
from promptbench.methods.ship import GENERATOR_PREFIX, NO_IMAGE, PromptVAE, ShipOptions
from promptbench.protocols import FewShot, GeneralizedZeroShot

CLASSES = ["blue", "green", "red"]  # generalized zero-shot: base blue, green; red is label-only
TEMPLATES = ["a photo of a {}."]
SMALL = {"encoder_hidden": 32, "generator_hidden": 48, "epochs": 3}


def ship_options(**changes) -> ShipOptions:
    options = OmegaConf.to_container(composed(("method=ship_coop", "shots=2", "seed=1")).method.ship, resolve=True)
    return ShipOptions.from_config({**options, **changes})


# ---- the generator against the official formulas ----------------------------------------------------------
def official_loss(backbone, vae: PromptVAE, classnames, x, labels, noise):
    """mrflogs/SHIP main_coop_vae.py restated: Encoder, reparameterisation, Generator, PromptLearner(bias, target),
    TextEncoder over the full 77-token prompts (EOS = argmax token), vae_loss."""
    model = backbone.model
    hidden = torch.relu(x @ vae.encoder[0].weight.T + vae.encoder[0].bias)
    mean = hidden @ vae.mean.weight.T + vae.mean.bias
    log_var = hidden @ vae.log_var.weight.T + vae.log_var.bias
    z = torch.exp(0.5 * log_var) * noise + mean
    bias = torch.relu(z @ vae.generator[0].weight.T + vae.generator[0].bias) @ vae.generator[2].weight.T \
        + vae.generator[2].bias
    n_ctx = vae.prompt.ctx.shape[0]
    tokens = backbone.tokenize([" ".join(["X"] * n_ctx) + " " + name + "." for name in classnames])[labels]
    embedding = model.token_embedding(tokens)
    prompts = torch.cat([embedding[:, :1], vae.prompt.ctx[None] + bias[:, None], embedding[:, 1 + n_ctx:]], dim=1)
    out = model.ln_final(model.transformer(prompts + model.positional_embedding, attn_mask=model.attn_mask))
    text = out[torch.arange(len(labels)), tokens.argmax(dim=-1)] @ model.text_projection
    text = text / text.norm(dim=-1, keepdim=True)
    reconstruction = (text - x).pow(2).sum(1).mean()
    kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(dim=1).mean()
    return reconstruction + 1.0 * kl


def test_prompt_vae_equals_the_official_formulas(tiny_backbone):
    torch.manual_seed(0)
    options = ship_options(**SMALL)
    vae = PromptVAE(tiny_backbone, CLASSES, options)
    d, width = tiny_backbone.embed_dim, tiny_backbone.ctx_dim
    assert [tuple(p.shape) for p in vae.encoder.parameters()] == [(32, d), (32,)]
    assert tuple(vae.mean.weight.shape) == tuple(vae.log_var.weight.shape) == (d, 32)  # latent: the feature width
    assert tuple(vae.generator[0].weight.shape) == (48, d) and tuple(vae.generator[2].weight.shape) == (width, 48)
    assert tuple(vae.prompt.ctx.shape) == (4, width)
    assert float(vae.generator[0].weight.detach().std()) == pytest.approx(0.02, rel=0.1) and not vae.mean.bias.any()

    generator = torch.Generator().manual_seed(1)
    x = F.normalize(torch.randn(6, d, generator=generator), dim=-1)
    labels = torch.tensor([0, 1, 1, 0, 2, 2])
    noise = torch.randn(6, d, generator=generator)
    loss, reconstruction, kl = vae.loss(tiny_backbone, x, labels, noise, kl_weight=1.0)
    expected = official_loss(tiny_backbone, vae, CLASSES, x, labels, noise)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert float(loss.detach()) == pytest.approx(float((reconstruction + kl).detach()))
    loss.backward()  # the global prompt, the encoder and the generator all learn; the backbone stays frozen
    assert vae.prompt.ctx.grad.abs().sum() > 0 and vae.encoder[0].weight.grad.abs().sum() > 0
    assert not any(p.requires_grad for p in tiny_backbone.parameters())

    features = vae.synthesize(tiny_backbone, torch.tensor([2, 2, 1]), torch.Generator().manual_seed(5))
    again = vae.synthesize(tiny_backbone, torch.tensor([2, 2, 1]), torch.Generator().manual_seed(5))
    assert features.shape == (3, d) and torch.equal(features, again)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(3))
    assert not torch.allclose(features[0], features[1])  # each draw of z gives another prompt


def test_ship_options_are_checked():
    with pytest.raises(PromptbenchError, match=r"unknown option\(s\) \['epoch'\]"):
        ShipOptions.from_config({**OmegaConf.to_container(composed(("method=ship_coop",)).method.ship, resolve=True),
                                 "epoch": 3})
    with pytest.raises(PromptbenchError, match=r"method.ship.epochs='3' has the wrong type"):
        ship_options(epochs="3")
    with pytest.raises(PromptbenchError, match="method.ship.per_class must be >= 0"):
        ship_options(per_class=-1)


# ---- the plug-in ----------------------------------------------------------------------------------------
@pytest.fixture()
def gzsl(toy_root):
    return GeneralizedZeroShot(seed=1).build(FolderDataset(toy_root), 2)


def datamodule(method, task, backbone, tmp_path) -> FewShotDataModule:
    task.select_with(method.selection)
    return FewShotDataModule(task.sets(), task.source, backbone, method.contract(), device=torch.device("cpu"),
                             feature_store=FeatureStore(tmp_path / "features"), eval_batch_size=16, seed=1,
                             label_only_classes=task.label_only_classes)


def small_ship(name, backbone, **options):
    overrides = ("shots=2", "method.ship.views.n=2", *(f"method.ship.{key}={value}" for key, value in SMALL.items()))
    return build_method(name, backbone, CLASSES, TEMPLATES, overrides=overrides, **options)


def test_tip_adapter_cache_holds_synthesized_keys_of_the_label_only_class(tiny_backbone, gzsl, tmp_path):
    method = small_ship("ship_tip_adapter", tiny_backbone, views={"n": 2, "scale": [0.5, 1.0]})
    assert gzsl.label_only_classes == [2] and {item.label for item in gzsl.train.items} == {0, 1}
    method.prepare(datamodule(method, gzsl, tiny_backbone, tmp_path).provider)
    # 2 shots of each base class, then method.ship.per_class (the run's shots) synthesized keys of "red".
    labels = method.cache_labels.tolist()
    assert sorted(labels[:4]) == [0, 0, 1, 1] and labels[4:] == [2, 2]
    torch.testing.assert_close(method.cache_keys.norm(dim=-1), torch.ones(6))
    assert method.cache_values[:, 2].sum() == 2
    notes = method.run_notes()["ship"]
    assert notes["label_only_classes"] == 1 and notes["generator_epochs"] == 3
    assert notes["generator_loss_last_epoch"] < notes["generator_loss_first_epoch"]
    assert not any(key.startswith(GENERATOR_PREFIX) for key in method.learned_state())


class InputsSeen(L.Callback):
    def __init__(self, method):
        self.batches: list[torch.Tensor] = []
        method.register_forward_hook(lambda module, args, output: self.batches.append(args[0].detach()))


def test_every_training_batch_gets_as_many_synthesized_features(tiny_backbone, gzsl, tmp_path):
    method = small_ship("ship_coop", tiny_backbone, views={"n": 2, "scale": [0.5, 1.0]})
    module = datamodule(method, gzsl, tiny_backbone, tmp_path)
    method.prepare(module.provider)
    seen = InputsSeen(method)
    generator_before = {k: v.clone() for k, v in method.ship_generator.state_dict().items()}
    assert all(id(p) not in {id(q) for q in method.trainable_parameters()} for p in method.ship_generator.parameters())
    trainer = L.Trainer(max_epochs=2, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(method, datamodule=module)
    real = len(gzsl.train)
    assert [len(batch) for batch in seen.batches] == [2 * real, 2 * real]
    synthesized = seen.batches[0][real:]
    torch.testing.assert_close(synthesized.norm(dim=-1), torch.ones(real))  # unit-norm text features
    assert not torch.equal(seen.batches[0][real:], seen.batches[1][real:])  # drawn fresh every step
    assert all(torch.equal(v, method.ship_generator.state_dict()[k]) for k, v in generator_before.items())


def test_a_resumed_run_ends_with_the_uninterrupted_prompts(tiny_backbone, gzsl, tmp_path):
    """The generator is retrained identically in prepare and the synthesized batches are seeded by the step."""
    from promptbench.resume import ResumableTraining

    def run(callbacks, ckpt_path=None):
        method = small_ship("ship_coop", tiny_backbone, views={"n": 2, "scale": [0.5, 1.0]}, batch_size=2)
        module = datamodule(method, gzsl, tiny_backbone, tmp_path)
        method.prepare(module.provider)
        trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, callbacks=callbacks)
        trainer.fit(method, datamodule=module, ckpt_path=ckpt_path)
        return method.prompt_learner.ctx.detach()

    class StopAfterSecondEpoch(L.Callback):
        def on_train_epoch_end(self, trainer, module):
            trainer.should_stop = trainer.current_epoch == 1

    saver = ResumableTraining(tmp_path / "run", {"test": 1})
    interrupted = run([saver, StopAfterSecondEpoch()])
    resumed = run([], ckpt_path=saver.last)
    straight = run([])
    assert not torch.equal(interrupted, straight)
    torch.testing.assert_close(resumed, straight, rtol=0, atol=0)


def test_ship_needs_label_only_classes_and_cached_features(tiny_backbone, toy_root, tmp_path):
    task = FewShot(seed=1).build(FolderDataset(toy_root), 2)
    method = small_ship("ship_coop", tiny_backbone, views={"n": 1, "scale": [0.5, 1.0]})
    with pytest.raises(PromptbenchError, match="no training image, and this run has none: use "
                                               "protocol=generalized_zero_shot"):
        method.prepare(datamodule(method, task, tiny_backbone, tmp_path).provider)
    with pytest.raises(PromptbenchError, match="must train on cached features; set method.views.n=N"):
        small_ship("ship_coop", tiny_backbone, views={"n": 0, "scale": [0.5, 1.0]})


def test_demo_baseline_coop_has_ship_coops_settings():
    """experiment=demo_ship compares SHIP + CoOp with a CoOp that differs in nothing else."""
    def settings(method):
        cfg = composed(("experiment=demo_ship", f"method={method}"))
        method = OmegaConf.to_container(cfg.method, resolve=True)
        options = {k: v for k, v in method.items() if k not in ("_target_", "name", "ship")}
        return options, OmegaConf.to_container(cfg.optim, resolve=True), cfg.trainer.max_epochs

    assert settings("coop") == settings("ship_coop")


# ---- end to end -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_ship_runs_end_to_end_under_generalized_zero_shot(toy_root, run_env, tmp_path):
    for method in ("ship_coop", "ship_tip_adapter_f"):  # one run each: a sweep composes method options for zeroshot
        result = run_py([f"method={method}", "protocol=generalized_zero_shot", "backbone=tiny", "dataset=folder",
                         f"dataset.root={toy_root}", "shots=2", "logger=none", "num_workers=0", "trainer.max_epochs=2",
                         "method.views.n=2", "method.ship.epochs=2", "method.ship.views.n=2",
                         "method.ship.encoder_hidden=32", "method.ship.generator_hidden=32"], run_env)
        assert result.returncode == 0, result.stderr[-3000:]
    results = {r["method"]: r for r in find_results(tmp_path / "outputs")}
    assert sorted(results) == ["ship_coop", "ship_tip_adapter_f"]
    for name, payload in results.items():
        metrics = payload["metrics"]
        assert list(metrics) == ["all", "base", "new", "harmonic_mean"], name
        assert metrics["all"]["n"] == 18 and metrics["base"]["n"] == 12 and metrics["new"]["n"] == 6
        assert payload["splits"] == {"train": 4, "val": 4, "all": 18}  # base images only: 2 shots of 2 classes
        assert payload["data"]["class_counts"]["train"] == {"blue": 2, "green": 2, "red": 0}
        assert payload["method_notes"]["ship"]["label_only_classes"] == 1
        assert payload["training"] == {"epochs": 2, "steps": 2}
    # Tip-Adapter-F's cache: 4 image keys and per_class (= shots) synthesized keys of the label-only class.
    assert results["ship_tip_adapter_f"]["method_notes"]["cache_size"] == 6
    assert "learned.safetensors" in {p.name for p in (tmp_path / "outputs").rglob("*.safetensors")}


@pytest.mark.slow
def test_ship_coop_learns_the_label_only_classes_better_than_coop_on_the_mini_world(run_env, tmp_path):
    # The learning test, experiment=demo_ship as `make demo` runs it (synth_swatches; CoOp with the very same
    # settings). Measured (seeds 1-3): CoOp new 51.6 +- 0.6, H 65.1; SHIP + CoOp new 67.2-67.6, H 74.0-74.4
    # (experiments/beyond_labels.md).
    result = run_py(["-m", "experiment=demo_ship", "method=coop,ship_coop", "seed=1"], run_env, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    metrics = {r["method"]: r["metrics"] for r in find_results(tmp_path / "outputs")}
    top1 = {method: {name: values["top1"] for name, values in sets.items()} for method, sets in metrics.items()}
    assert top1["ship_coop"]["new"] >= top1["coop"]["new"] + 3, top1
    assert top1["ship_coop"]["harmonic_mean"] > top1["coop"]["harmonic_mean"], top1


@pytest.mark.parametrize("base", ["tip_adapter", "tip_adapter_f", "clip_adapter"])
def test_ship_variants_get_their_base_methods_published_settings_on_every_dataset(base):
    """Recipes are looked up by method name: each recipe of the base method needs its ship_ twin, composing to the
    same settings, or SHIP on that dataset would silently run the base method's generic defaults."""
    recipes = REPO / "conf" / "recipe"
    datasets = [path.stem[len(base) + 1:] for path in recipes.glob(f"{base}_*.yaml")
                if not path.stem[len(base) + 1:].startswith("f_")]
    for dataset in datasets:
        assert (recipes / f"ship_{base}_{dataset}.yaml").is_file(), f"conf/recipe/ship_{base}_{dataset}.yaml is missing"
        plain, ship = (composed((f"method={name}", f"dataset={dataset}")) for name in (base, f"ship_{base}"))
        settings = [{key: value for key, value in OmegaConf.to_container(cfg.method).items()
                     if key not in ("_target_", "name", "ship")} for cfg in (plain, ship)]
        assert settings[0] == settings[1], dataset
        assert plain.trainer.max_epochs == ship.trainer.max_epochs and plain.get("optim") == ship.get("optim"), dataset
