"""CoOp: logits against a straightforward reference-style implementation, truncation, frozen CLIP, the
training recipe, the NaN guard, class re-targeting, save/load, `promptbench interpret`, and end to end."""

from __future__ import annotations

import math
import re
from pathlib import Path

import lightning as L
import open_clip
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

from conftest import build_method, find_results, run_py
from promptbench import cli
from promptbench.backbones import load_backbone
from promptbench.contract import DataContract, Views
from promptbench.errors import PromptbenchError
from promptbench.methods.optim import warmup_cosine_factor
from promptbench.methods.prompt_learner import token_order

CLASSNAMES = ["golden_retriever", "cat", "sea lion"]
OTHER_CLASSNAMES = ["red panda", "dog", "whale", "fire truck"]
TEMPLATES = ["a photo of a {}."]
PHRASE = "a photo of a"
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


# ---- an independent, reference-style CoOp (full context length, tokenised on every call) -----------------
def reference_text_features(backbone, classnames, ctx, position="end", ctx_init=None):
    """The reference formulation: per-class concatenation, full-length (77-token) pass, EOS feature @ projection."""
    model = backbone.model
    n_cls, n_ctx = len(classnames), ctx.shape[-2]
    names = [name.replace("_", " ") for name in classnames]
    name_lengths = [len(backbone.tokenizer.encode(name)) for name in names]
    prefix_text = ctx_init if ctx_init else " ".join(["X"] * n_ctx)
    tokens = open_clip.tokenize([f"{prefix_text} {name}." for name in names], context_length=backbone.context_length)
    embedding = model.token_embedding(tokens)
    prefix, suffix = embedding[:, :1], embedding[:, 1 + n_ctx :]
    ctx = ctx if ctx.dim() == 3 else ctx.unsqueeze(0).expand(n_cls, -1, -1)
    prompts = []
    for i in range(n_cls):
        name, rest = suffix[i, : name_lengths[i]], suffix[i, name_lengths[i] :]
        if position == "end":
            parts = [prefix[i], ctx[i], suffix[i]]
        elif position == "middle":
            half = n_ctx // 2
            parts = [prefix[i], ctx[i, :half], name, ctx[i, half:], rest]
        else:
            parts = [prefix[i], name, ctx[i], rest]
        prompts.append(torch.cat(parts))
    x = torch.stack(prompts) + model.positional_embedding
    x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
    return x[torch.arange(n_cls), tokens.argmax(dim=-1)] @ model.text_projection


def reference_logits(backbone, images, text_features):
    image = F.normalize(backbone.model.encode_image(images), dim=-1)
    return backbone.model.logit_scale.exp() * image @ F.normalize(text_features, dim=-1).T


# ---- helpers shared with test_cocoop.py ---------------------------------------------------------------
def random_images(count: int, size: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, size, size, generator=torch.Generator().manual_seed(seed))


def trainer(epochs: int = 1, precision="32") -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, precision=precision, logger=False,
                     enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False)


def loader(images, labels, batch_size, shuffle=True) -> DataLoader:
    dataset = TensorDataset(images, labels, torch.arange(len(labels)))
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=torch.Generator().manual_seed(0))


def fit(method, images, labels, epochs=1, precision="32") -> None:
    trainer(epochs, precision).fit(method, loader(images, labels, method.batch_size))


def mean_loss(method, images, labels) -> float:
    with torch.no_grad():
        return F.cross_entropy(method(images).float(), labels).item()


def accuracy(method, images, labels) -> float:
    with torch.no_grad():
        return (method(images).argmax(dim=-1) == labels).float().mean().item()


def backbone_snapshot(backbone) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in backbone.state_dict().items()}


def assert_one_epoch_trains_exactly(method, backbone, expected: set[str] | None = None) -> None:
    """After one epoch on random images every trainable parameter (exactly `expected`, when given) has moved
    and no weight of the frozen backbone has."""
    trainable = {name: p.detach().clone() for name, p in method.named_parameters() if p.requires_grad}
    if expected is not None:
        assert set(trainable) == expected
    before = backbone_snapshot(backbone)
    fit(method, random_images(8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1]), epochs=1)
    for name, parameter in method.named_parameters():
        if name in trainable:
            assert not torch.equal(parameter.detach(), trainable[name]), f"{name} did not train"
    for key, value in backbone.state_dict().items():
        assert torch.equal(value, before[key]), f"backbone weight {key} changed"


def perturb_context(method, seed=1) -> None:
    """Distinct, non-trivial context vectors (per class for csc), so a wrong layout cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        method.prompt_learner.ctx.add_(0.5 * torch.randn(method.prompt_learner.ctx.shape, generator=generator))


# ---- exactness ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("ctx_init", [None, PHRASE])
@pytest.mark.parametrize("position", ["end", "middle", "front"])
@pytest.mark.parametrize("csc", [False, True])
def test_logits_equal_the_reference_formulation(tiny_backbone, csc, position, ctx_init):
    torch.manual_seed(0)
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=5, ctx_init=ctx_init, csc=csc,
                  class_token_position=position).eval()
    expected_shape = (len(CLASSNAMES), 4 if ctx_init else 5, tiny_backbone.ctx_dim)
    assert method.prompt_learner.ctx.shape == (expected_shape if csc else expected_shape[1:])
    perturb_context(method)
    images = random_images(2)
    with torch.no_grad():
        text = reference_text_features(tiny_backbone, CLASSNAMES, method.prompt_learner.ctx, position, ctx_init)
        torch.testing.assert_close(method(images), reference_logits(tiny_backbone, images, text), **TOLERANCE)


def test_ctx_init_starts_from_the_phrase_embeddings(tiny_backbone):
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, ctx_init="a_photo of a")
    tokens = open_clip.tokenize([PHRASE])
    expected = tiny_backbone.model.token_embedding(tokens)[0, 1:5]
    torch.testing.assert_close(method.prompt_learner.ctx.detach(), expected)
    random_init = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=16).prompt_learner.ctx
    assert random_init.shape == (16, tiny_backbone.ctx_dim)
    assert 0.01 < random_init.std().item() < 0.03


def test_truncated_encoder_equals_the_full_77_token_encoder(tiny_backbone):
    tokens = open_clip.tokenize(["a photo of a sea lion.", "x.", "a bright red fire truck on a road."])
    with torch.no_grad():
        torch.testing.assert_close(tiny_backbone.encode_text(tokens), tiny_backbone.model.encode_text(tokens),
                                   **TOLERANCE)
    learner = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=4).prompt_learner
    assert learner.prompts().shape[-2] == int(learner.eos.max()) + 1 < tiny_backbone.context_length


def test_token_order_moves_only_context_and_name():
    assert token_order("end", 4, [2], 9) is None
    assert token_order("middle", 4, [2], 9).tolist() == [[0, 1, 2, 5, 6, 3, 4, 7, 8]]
    assert token_order("front", 3, [1, 2], 8).tolist() == [[0, 4, 1, 2, 3, 5, 6, 7], [0, 4, 5, 1, 2, 3, 6, 7]]


# ---- options ------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"class_token_position": "top"}, "class_token_position='top' is unknown"),
        ({"n_ctx": 0}, "n_ctx >= 1"),
        ({"n_ctx": 80}, "smaller n_ctx"),
        ({"ctx_init": " ".join(["a photo"] * 40)}, "shorter ctx_init"),
        ({"overrides": ["optim.optimizer.lr=0"]}, r"optim.optimizer.lr must be > 0"),
        ({"prompt_depth": 2}, "does not take option"),
    ],
)
def test_bad_options_are_clear_errors(tiny_backbone, options, message):
    with pytest.raises(PromptbenchError, match=message):
        build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, **options)


# ---- class sets ---------------------------------------------------------------------------------------
def test_unified_context_retargets_to_new_class_names(tiny_backbone):
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=4, class_token_position="middle").eval()
    perturb_context(method)
    method.set_classes(OTHER_CLASSNAMES, TEMPLATES)
    images = random_images(3)
    with torch.no_grad():
        text = reference_text_features(tiny_backbone, OTHER_CLASSNAMES, method.prompt_learner.ctx, "middle")
        torch.testing.assert_close(method(images), reference_logits(tiny_backbone, images, text), **TOLERANCE)


def test_class_specific_context_refuses_new_classes(tiny_backbone):
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=4, csc=True)
    assert not method.transfers_to_new_classes
    with pytest.raises(PromptbenchError, match="cannot be evaluated on another class set"):
        method.set_classes(OTHER_CLASSNAMES, TEMPLATES)
    method.set_classes(CLASSNAMES, TEMPLATES)  # the training classes themselves stay fine


# ---- frozen CLIP, recipe, guard -------------------------------------------------------------------------
def test_only_the_context_trains_and_clip_stays_unchanged(tiny_backbone):
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=4, batch_size=4)
    assert [name for name, p in method.named_parameters() if p.requires_grad] == ["prompt_learner.ctx"]
    before, ctx_before = backbone_snapshot(tiny_backbone), method.prompt_learner.ctx.detach().clone()
    fit(method, random_images(6), torch.tensor([0, 1, 2, 0, 1, 2]), epochs=1)
    assert not torch.equal(method.prompt_learner.ctx.detach(), ctx_before)
    for key, value in tiny_backbone.state_dict().items():
        assert torch.equal(value, before[key]), f"backbone weight {key} changed"


def test_schedule_is_constant_warmup_then_per_epoch_cosine():
    factors = [warmup_cosine_factor(epoch, 4, 1, 0.005) for epoch in range(4)]
    assert factors[0] == 0.005 and factors[1] == 1.0
    assert factors[2] == pytest.approx(0.5 * (1 + math.cos(math.pi / 4)))
    assert factors[3] == pytest.approx(0.5 * (1 + math.cos(math.pi * 2 / 4)))
    assert warmup_cosine_factor(0, 4, 0, 0.005) == 1.0


def learning_rates_per_epoch(method, epochs: int = 3) -> tuple[list[float], L.Trainer]:
    """The learning rate at the start of each epoch of a short fit on 4 random images (batch 2), and the trainer."""
    seen = []

    class RecordLr(L.Callback):
        def on_train_epoch_start(self, trainer, module):
            seen.append(trainer.optimizers[0].param_groups[0]["lr"])

    run = trainer(epochs=epochs)
    run.callbacks.append(RecordLr())
    run.fit(method, loader(random_images(4), torch.tensor([0, 1, 2, 0]), batch_size=2))
    return seen, run


# The reference schedule at 3 epochs: the warm-up epoch at 1e-5, then the cosine over 3 steps.
REFERENCE_LRS_3_EPOCHS = [1e-5, 0.002, 0.002 * 0.5 * (1 + math.cos(math.pi / 3))]


def test_lightning_applies_the_schedule_per_epoch(tiny_backbone):
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=2, batch_size=2)
    seen, _ = learning_rates_per_epoch(method)
    assert seen == pytest.approx(REFERENCE_LRS_3_EPOCHS)


def test_non_finite_loss_stops_with_a_clear_error(tiny_backbone):
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=2, batch_size=3)
    with torch.no_grad():
        method.prompt_learner.ctx[0, 0] = float("nan")
    with pytest.raises(PromptbenchError, match=r"non-finite training loss nan at step 0 .*precision=32.*bf16-mixed"):
        fit(method, random_images(3), torch.tensor([0, 1, 2]))


def test_short_training_lowers_the_loss_and_raises_accuracy(tiny_backbone):
    """The learning check: a few epochs of the default recipe (no warm-up) fit a small learnable task.

    The tiny CLIP is random, so the task is one its image features separate (class = image brightness)
    and the check is on the training loss and the training accuracy.
    """
    torch.manual_seed(0)
    labels = torch.arange(12) % 3
    images = 2.0 * (labels.float() - 1).view(-1, 1, 1, 1) + 0.1 * random_images(12, seed=3)
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=4, batch_size=6,
                          overrides=["optim.warmup=0"]).eval()
    before, accuracy_before = mean_loss(method, images, labels), accuracy(method, images, labels)
    fit(method, images, labels, epochs=4)
    after, accuracy_after = mean_loss(method.eval(), images, labels), accuracy(method, images, labels)
    assert after < 0.8 * before, (before, after)
    assert accuracy_after > accuracy_before or accuracy_after == 1.0, (accuracy_before, accuracy_after)


def test_evaluation_encodes_the_prompts_once(tiny_backbone, monkeypatch):
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=4).eval()
    with torch.no_grad():
        expected = method(random_images(6))
    calls = []
    encode = method.prompt_learner.text_features
    monkeypatch.setattr(method.prompt_learner, "text_features", lambda *a, **k: calls.append(1) or encode(*a, **k))
    batches = trainer().predict(method, loader(random_images(6), torch.zeros(6, dtype=torch.long), 2, shuffle=False))
    assert len(calls) == 1 and len(batches) == 3
    torch.testing.assert_close(torch.cat([b["logits"] for b in batches]), expected)


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-true"])
def test_reduced_precisions_train_and_evaluate_on_cpu(precision):
    # A backbone of its own: "16-true" converts the whole model, which must not touch the shared fixture.
    backbone = load_backbone("tiny", "promptbench-tiny", "random")
    method = build_method("coop", backbone, CLASSNAMES, TEMPLATES, n_ctx=2, batch_size=3)
    images, labels = random_images(3), torch.tensor([0, 1, 2])
    run = trainer(precision=precision)
    run.fit(method, loader(images, labels, 3))
    logits = torch.cat([b["logits"] for b in run.predict(method, loader(images, labels, 3, shuffle=False))])
    assert torch.isfinite(logits).all()
    # Mixed precision keeps the learned context in fp32; "16-true" halves everything, like the reference.
    assert method.prompt_learner.ctx.dtype == (torch.float32 if precision == "bf16-mixed" else torch.float16)


# ---- saving, loading, interpreting ----------------------------------------------------------------------
@pytest.mark.parametrize("csc", [False, True])
def test_saved_prompts_reload_to_identical_logits(tiny_backbone, tmp_path, csc):
    method = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=3, csc=csc).eval()
    perturb_context(method)
    method.save_learned(tmp_path / "learned.safetensors")
    fresh = build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=3, csc=csc).eval()
    fresh.load_learned(tmp_path / "learned.safetensors")
    images = random_images(2)
    with torch.no_grad():
        torch.testing.assert_close(fresh(images), method(images), rtol=0, atol=0)
    elsewhere = build_method("coop", tiny_backbone, OTHER_CLASSNAMES, TEMPLATES, n_ctx=3, csc=csc).eval()
    if csc:
        with pytest.raises(PromptbenchError, match="cannot be moved to a new class set"):
            elsewhere.load_learned(tmp_path / "learned.safetensors")
    else:
        elsewhere.load_learned(tmp_path / "learned.safetensors")
        method.set_classes(OTHER_CLASSNAMES, TEMPLATES)
        with torch.no_grad():
            torch.testing.assert_close(elsewhere(images), method(images), rtol=0, atol=0)


def test_loading_with_other_options_is_a_clear_error(tiny_backbone, tmp_path):
    build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=3).save_learned(tmp_path / "learned.safetensors")
    with pytest.raises(PromptbenchError, match=r"prompt_learner.ctx \(3, 64\) vs \(16, 64\)"):
        build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES).load_learned(tmp_path / "learned.safetensors")


@pytest.mark.parametrize("csc", [False, True])
def test_interpret_prints_the_nearest_words_of_each_context_vector(tiny_backbone, tmp_path, capsys, csc):
    # Untrained phrase-initialised context sits exactly on the phrase's token embeddings.
    build_method("coop", tiny_backbone, CLASSNAMES, TEMPLATES, ctx_init=PHRASE, csc=csc).save_learned(tmp_path / "learned.safetensors")
    assert cli.main(["interpret", str(tmp_path / "learned.safetensors"), "--top-k", "3"]) == 0
    rows = capsys.readouterr().out.strip().splitlines()[2:]
    assert len(rows) == (len(CLASSNAMES) if csc else 1) * 4
    cells = [re.findall(r"(\S+) \((\d+\.\d+)\)", row) for row in rows]
    assert all(len(row) == 3 for row in cells)
    assert [row[0][0] for row in cells] == ["a", "photo", "of", "a"] * (len(CLASSNAMES) if csc else 1)
    assert all(float(row[0][1]) == 0 for row in cells)
    if csc:
        assert rows[4].startswith("cat #1")


def test_interpret_without_a_backbone_description_asks_for_one(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({"prompt_learner.ctx": torch.zeros(2, 64)}, str(tmp_path / "bare.safetensors"))
    assert cli.main(["interpret", str(tmp_path / "bare.safetensors")]) == 2
    assert "--backbone-config" in capsys.readouterr().err
    assert cli.main(["interpret", str(tmp_path / "bare.safetensors"), "--backbone-config",
                     str(Path(__file__).parents[1] / "conf" / "backbone" / "tiny.yaml"), "--top-k", "1"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == 2 + 2


# ---- end to end -----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_run_trains_saves_and_reevaluates_the_same(toy_root, run_env, tmp_path):
    base = ["method=coop", "backbone=tiny", "dataset=folder", f"dataset.root={toy_root}", "shots=2", "logger=none",
            "num_workers=0", "method.n_ctx=4"]
    trained = run_py([*base, "trainer.max_epochs=2"], run_env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    [results] = find_results(tmp_path / "outputs")
    learned = Path(results["_dir"]) / "learned.safetensors"
    assert learned.is_file() and learned.with_suffix(".json").is_file()
    assert results["config"]["trainer"]["max_epochs"] == 2 and results["training"]["epochs"] == 2

    reloaded = run_py([*base, "eval_only=true", f"ckpt_path={learned}", "tag=reload"], run_env)
    assert reloaded.returncode == 0, reloaded.stderr[-3000:]
    [again] = [r for r in find_results(tmp_path / "outputs") if "/reload/" in r["_dir"]]
    assert results["metrics"]["test"]["n"] == 18
    assert again["metrics"]["test"] == pytest.approx(results["metrics"]["test"], abs=1e-6)


# ---- cached augmented views (opt-in speed-up) ------------------------------------------------------------
@pytest.mark.parametrize("name", ["coop", "cocoop"])
def test_cached_views_give_the_same_logits_from_features(tiny_backbone, name):
    online = build_method(name, tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=4).eval()
    cached = build_method(name, tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=4, overrides=["method.views.n=3"]).eval()
    cached.load_state_dict(online.state_dict())
    assert online.contract() == DataContract(inputs="images", batch_size=online.batch_size)
    assert cached.contract().inputs == "features" and cached.contract().train_views == Views(3, (0.08, 1.0))
    images = random_images(5)
    with torch.no_grad():
        torch.testing.assert_close(cached(tiny_backbone.encode_image(images)), online(images), rtol=1e-5, atol=1e-5)
    with pytest.raises(PromptbenchError, match="views.n must be >= 0"):
        build_method(name, tiny_backbone, CLASSNAMES, TEMPLATES, n_ctx=4, overrides=["method.views.n=-1"])


def test_cached_views_run_end_to_end_without_the_image_tower_in_training(toy_root, run_env, tmp_path):
    result = run_py(["method=coop", "backbone=tiny", "dataset=folder", f"dataset.root={toy_root}", "shots=2",
                     "logger=none", "num_workers=0", "method.n_ctx=4", "trainer.max_epochs=3", "method.views.n=2"],
                    run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    [results] = find_results(tmp_path / "outputs")
    # two cached train views and the test set: the tower never ran inside the 3 training epochs
    assert results["feature_cache"]["extractions"] == 3 and results["metrics"]["test"]["n"] == 18
