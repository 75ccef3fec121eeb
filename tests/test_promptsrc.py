"""PromptSRC: the loss against a by-hand version of the official formula, the frozen teachers, Gaussian Prompt
Aggregation (weights, aggregation over a short fit, early stop, resume mid-training), save/reload and new classes."""

from __future__ import annotations

import math

import lightning as L
import open_clip
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from conftest import build_method
from promptbench.errors import PromptbenchError
from promptbench.methods.prompts import TEMPLATE_SETS
from promptbench.methods.promptsrc import GPA_CHECKPOINT_KEY, gpa_weights
from promptbench.resume import ResumableTraining

CLASSNAMES = ["golden_retriever", "cat", "sea lion"]
OTHER_CLASSNAMES = ["red panda", "dog", "whale", "fire truck"]
TEMPLATES = ["a photo of a {}."]
TOLERANCE = dict(rtol=1e-5, atol=1e-6)
# muzairkhattak/PromptSRC trainers/imagenet_templates.py IMAGENET_TEMPLATES, copied verbatim.
OFFICIAL_TEMPLATES = [
    "a photo of a {}.", "a bad photo of a {}.", "a photo of many {}.", "a sculpture of a {}.",
    "a photo of the hard to see {}.", "a low resolution photo of the {}.", "a rendering of a {}.", "graffiti of a {}.",
    "a bad photo of the {}.", "a cropped photo of the {}.", "a tattoo of a {}.", "the embroidered {}.",
    "a photo of a hard to see {}.", "a bright photo of a {}.", "a photo of a clean {}.", "a photo of a dirty {}.",
    "a dark photo of the {}.", "a drawing of a {}.", "a photo of my {}.", "the plastic {}.", "a photo of the cool {}.",
    "a close-up photo of a {}.", "a black and white photo of the {}.", "a painting of the {}.", "a painting of a {}.",
    "a pixelated photo of the {}.", "a sculpture of the {}.", "a bright photo of the {}.", "a cropped photo of a {}.",
    "a plastic {}.", "a photo of the dirty {}.", "a jpeg corrupted photo of a {}.", "a blurry photo of the {}.",
    "a photo of the {}.", "a good photo of the {}.", "a rendering of the {}.", "a {} in a video game.",
    "a photo of one {}.", "a doodle of a {}.", "a close-up photo of the {}.", "the origami {}.",
    "the {} in a video game.", "a sketch of a {}.", "a doodle of the {}.", "a origami {}.",
    "a low resolution photo of a {}.", "the toy {}.", "a rendition of the {}.", "a photo of the clean {}.",
    "a photo of a large {}.", "a rendition of a {}.", "a photo of a nice {}.", "a photo of a weird {}.",
    "a blurry photo of a {}.", "a cartoon {}.", "art of a {}.", "a sketch of the {}.", "a embroidered {}.",
    "a pixelated photo of a {}.", "itap of the {}.",
]
# A short fit: 3 epochs whose GPA weights N(e; 2, 1) are all sizeable (.274, .452, .274).
GPA_SHORT = ("method.gpa_mean=2", "method.gpa_std=1")


def random_images(count: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def make(backbone, classnames=CLASSNAMES, overrides=(), seed=0, **options):
    torch.manual_seed(seed)  # the deep prompts start random
    return build_method("promptsrc", backbone, classnames, TEMPLATES, overrides=overrides, **options)


def perturb(method, seed=1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in method.gpa_parameters().values():
            parameter.add_(0.3 * torch.randn(parameter.shape, generator=generator))


def learned(method) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in method.gpa_parameters().items()}


def loader(count=6, batch_size=4) -> DataLoader:
    labels = torch.arange(count) % len(CLASSNAMES)
    return DataLoader(TensorDataset(random_images(count), labels, torch.arange(count)), batch_size=batch_size,
                      shuffle=False)


def trainer(epochs: int, callbacks=()) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_epochs=epochs, logger=False, enable_checkpointing=False,
                     enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))


class RecordEpochPrompts(L.Callback):
    """The learned tensors after the last optimiser step of every epoch (callbacks run before the module's hook)."""

    def __init__(self):
        self.epochs: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.epochs[trainer.current_epoch + 1] = learned(module)


class StopAfterFirstEpoch(L.Callback):
    def on_train_epoch_end(self, trainer, module):
        trainer.should_stop = True


# ---- independent teachers: the plain open_clip model ------------------------------------------------------
def reference_teacher_text(backbone, classnames) -> torch.Tensor:
    model, per_template = backbone.model, []
    with torch.no_grad():
        for template in OFFICIAL_TEMPLATES:
            tokens = open_clip.tokenize([template.replace("{}", c.replace("_", " ")) for c in classnames],
                                        context_length=backbone.context_length)
            per_template.append(model.encode_text(tokens).unsqueeze(1))
    mean = torch.cat(per_template, dim=1).mean(dim=1)  # unnormalised features averaged, as the official code
    return mean / mean.norm(dim=-1, keepdim=True)


def reference_teacher_image(backbone, images) -> torch.Tensor:
    with torch.no_grad():
        features = backbone.model.encode_image(images)
    return features / features.norm(dim=-1, keepdim=True)


# ---- the loss ---------------------------------------------------------------------------------------------
def test_teacher_templates_are_the_official_60():
    assert list(TEMPLATE_SETS["promptsrc60"]) == OFFICIAL_TEMPLATES


def test_loss_equals_the_official_formula_by_hand(tiny_backbone):
    method = make(tiny_backbone)
    perturb(method)
    images, labels = random_images(4, seed=3), torch.tensor([0, 1, 2, 1])
    terms = method.loss_terms(images, labels)
    text, image = terms["text"].detach(), terms["image"].detach()
    scale = tiny_backbone.model.logit_scale.exp()
    logits = scale * image @ text.T
    torch.testing.assert_close(terms["logits"].detach(), logits, **TOLERANCE)
    teacher_text = reference_teacher_text(tiny_backbone, CLASSNAMES)
    teacher_image = reference_teacher_image(tiny_backbone, images)
    zero_shot = scale * teacher_image @ teacher_text.T
    ce = -logits.log_softmax(dim=1)[torch.arange(4), labels].mean()
    p_zero_shot = zero_shot.softmax(dim=1)
    kl = (p_zero_shot * (p_zero_shot.log() - logits.log_softmax(dim=1))).sum() / logits.numel()
    text_l1 = (text - teacher_text).abs().mean()
    image_l1 = (image - teacher_image).abs().mean()
    expected = {"loss_ce": ce, "loss_kl": kl, "loss_text": 25 * text_l1, "loss_image": 10 * image_l1}
    for key, value in expected.items():
        torch.testing.assert_close(terms[key].detach(), value, rtol=1e-4, atol=1e-6, msg=key)
        assert value > 1e-4, f"{key} should be non-zero for perturbed prompts"
    torch.testing.assert_close(terms["loss"].detach(), ce + kl + 25 * text_l1 + 10 * image_l1, rtol=1e-4, atol=1e-6)


def test_zero_weights_leave_only_cross_entropy_and_gradients_reach_only_prompts(tiny_backbone):
    images, labels = random_images(4, seed=3), torch.tensor([0, 1, 2, 1])
    plain = make(tiny_backbone, text_loss_weight=0, image_loss_weight=0, kl_weight=0)
    perturb(plain)
    terms = plain.loss_terms(images, labels)
    assert torch.equal(terms["loss"], terms["loss_ce"])
    full = make(tiny_backbone)
    perturb(full)
    full_terms = full.loss_terms(images, labels)
    torch.testing.assert_close(full_terms["loss_ce"], terms["loss_ce"], rtol=0, atol=0)  # same prompts, same CE
    assert full_terms["loss"] > full_terms["loss_ce"] + 1e-3
    full_terms["loss"].backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in full.gpa_parameters().values())
    assert all(p.grad is None for p in tiny_backbone.parameters())


def test_teachers_are_the_frozen_model_without_prompts(tiny_backbone):
    method = make(tiny_backbone)
    perturb(method)
    images = random_images(4, seed=5)
    terms = method.loss_terms(images, torch.tensor([0, 1, 2, 0]))
    torch.testing.assert_close(terms["teacher_text"], reference_teacher_text(tiny_backbone, CLASSNAMES), **TOLERANCE)
    torch.testing.assert_close(terms["teacher_image"], reference_teacher_image(tiny_backbone, images), **TOLERANCE)
    assert not terms["teacher_text"].requires_grad and not terms["teacher_image"].requires_grad
    assert (terms["image"] - terms["teacher_image"]).abs().max() > 1e-3  # the prompts do change the image features
    assert "teacher_text" not in method.state_dict()


def test_unknown_teacher_templates_and_bad_gpa_are_clear_errors(tiny_backbone):
    with pytest.raises(PromptbenchError, match="unknown template set"):
        make(tiny_backbone, teacher_templates="nonsense")
    with pytest.raises(PromptbenchError, match="gpa_std must be > 0"):
        make(tiny_backbone, gpa_std=0)


# ---- Gaussian Prompt Aggregation --------------------------------------------------------------------------
def test_gpa_weights_match_the_reference_report():
    weights = gpa_weights(15, 1, 20)
    assert math.isclose(sum(weights), 1.0)
    assert weights[14] == pytest.approx(0.399, abs=5e-4)
    assert weights[13] == pytest.approx(0.242, abs=5e-4) and weights[15] == pytest.approx(0.242, abs=5e-4)
    assert weights[12] == pytest.approx(0.054, abs=5e-4) and weights[11] == pytest.approx(0.0044, abs=5e-5)
    assert max(weights[:11] + weights[18:]) < 1.4e-4
    flat = gpa_weights(6, 10, 20)
    assert min(flat) == pytest.approx(0.024, abs=5e-4) and max(flat) == pytest.approx(0.063, abs=5e-4)


def test_gpa_loads_the_weighted_sum_of_the_per_epoch_prompts(tiny_backbone):
    method = make(tiny_backbone, overrides=GPA_SHORT)
    recorder = RecordEpochPrompts()
    run = trainer(3, [recorder])  # the yaml says 20 epochs: the weights follow trainer.max_epochs
    run.fit(method, loader())
    assert sorted(recorder.epochs) == [1, 2, 3]
    weights = [math.exp(-0.5 * (e - 2) ** 2) for e in (1, 2, 3)]
    weights = [w / sum(weights) for w in weights]
    final = learned(method)
    for name, value in final.items():
        expected = sum(w * recorder.epochs[e][name] for w, e in zip(weights, (1, 2, 3)))
        torch.testing.assert_close(value, expected, **TOLERANCE)
        assert (value - recorder.epochs[3][name]).abs().max() > 1e-6, "the prompts moved between epochs"
    assert method.run_notes()["gaussian_prompt_aggregation"]["epochs_aggregated"] == 3
    assert {"train/loss", "train/loss_ce", "train/loss_kl", "train/loss_text", "train/loss_image"} <= set(
        run.callback_metrics)


def test_without_gpa_the_last_epoch_prompts_stay(tiny_backbone):
    method = make(tiny_backbone, gpa_mean=None)
    recorder = RecordEpochPrompts()
    trainer(2, [recorder]).fit(method, loader())
    for name, value in learned(method).items():
        assert torch.equal(value, recorder.epochs[2][name])


def test_resume_mid_training_gives_the_uninterrupted_prompts(tiny_backbone, tmp_path):
    uninterrupted = make(tiny_backbone, overrides=GPA_SHORT)
    trainer(3).fit(uninterrupted, loader())

    # Stopped after epoch 1 of 3: the checkpoint of epoch 1 holds the running sum; the stopped run itself
    # ends with its one epoch, weight renormalised.
    stopped = make(tiny_backbone, overrides=GPA_SHORT)
    recorder = RecordEpochPrompts()
    resumable = ResumableTraining(tmp_path, config={})
    trainer(3, [resumable, StopAfterFirstEpoch(), recorder]).fit(stopped, loader())
    for name, value in learned(stopped).items():
        torch.testing.assert_close(value, recorder.epochs[1][name], **TOLERANCE)
    assert stopped.run_notes()["gaussian_prompt_aggregation"]["epochs_aggregated"] == 1
    checkpoint = torch.load(resumable.last, map_location="cpu", weights_only=True)
    assert checkpoint[GPA_CHECKPOINT_KEY]["epochs"] == [1]
    assert not any("gpa" in key or "teacher" in key for key in checkpoint["state_dict"])

    resumed = make(tiny_backbone, overrides=GPA_SHORT, seed=7)  # other initial prompts: all comes from the file
    trainer(3).fit(resumed, loader(), ckpt_path=resumable.last)
    for name, value in learned(resumed).items():
        torch.testing.assert_close(value, learned(uninterrupted)[name], rtol=1e-6, atol=1e-7)


# ---- saving and new classes -------------------------------------------------------------------------------
def test_saved_prompts_reload_to_identical_logits(tiny_backbone, tmp_path):
    method = make(tiny_backbone, overrides=GPA_SHORT)
    trainer(2, [ResumableTraining(tmp_path / "run", config={})]).fit(method, loader())
    method.eval().save_learned(tmp_path / "learned.safetensors")
    assert set(load_file(str(tmp_path / "learned.safetensors"))) == set(method.gpa_parameters())
    images = random_images(3, seed=9)
    for path in (tmp_path / "learned.safetensors", tmp_path / "run" / "checkpoints" / "last.ckpt"):
        fresh = make(tiny_backbone, seed=11).eval()
        fresh.load_learned(path)
        with torch.no_grad():
            torch.testing.assert_close(fresh(images), method(images), rtol=0, atol=0)


def test_new_classes_recompute_the_text_teacher(tiny_backbone):
    method = make(tiny_backbone)
    perturb(method)
    images, labels = random_images(4, seed=2), torch.tensor([0, 1, 2, 3])
    method.teacher_text_features()
    method.set_classes(OTHER_CLASSNAMES, TEMPLATES)
    terms = method.loss_terms(images, labels)
    assert terms["logits"].shape == (4, len(OTHER_CLASSNAMES))
    torch.testing.assert_close(terms["teacher_text"], reference_teacher_text(tiny_backbone, OTHER_CLASSNAMES),
                               **TOLERANCE)
    with torch.no_grad():
        assert method.eval()(images).shape == (4, len(OTHER_CLASSNAMES))
