"""MaPLe: logits against the official coupling written out (trainers/maple.py MultiModalPromptLearner.forward
with the official towers), projections that start identical but are separate parameters, gradients that reach
the context, the compound prompts and the projections only, save/reload, and base-to-new transfer."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import build_method, composed, epochs_of
from promptbench.errors import PromptbenchError
from promptbench.tools.reference import reference_image_features, reference_text_features
from test_coop import TEMPLATES, assert_one_epoch_trains_exactly, random_images
from test_ivlp import (
    CLASSNAMES,
    OTHER_CLASSNAMES,
    PHRASE,
    TOLERANCE,
    mini_vit_random,
    official_logits,
    perturb,
    resnet_backbone,
)


def official_maple_logits(method, images, classnames):
    """As MultiModalPromptLearner.forward + CustomCLIP.forward: text gets ctx and the compound prompts, the
    image tower gets proj(ctx) and each compound prompt through its own projection."""
    learner, backbone = method.prompt_learner, method.backbone
    compound_prompts_text = list(method.text_prompts)
    visual_deep_prompts = [layer(compound_prompts_text[index])
                           for index, layer in enumerate(method.compound_projections)]
    shared_ctx = method.proj(learner.ctx)
    text = reference_text_features(backbone, classnames, learner.ctx, compound_prompts_text, PHRASE)
    image = reference_image_features(backbone, images, [shared_ctx, *visual_deep_prompts])
    return official_logits(backbone, image, text)


def backbone_for(name, tiny_backbone):
    return tiny_backbone if name == "tiny" else mini_vit_random()


@pytest.mark.parametrize(("backbone_name", "prompt_depth"), [("tiny", 9), ("tiny", 1), ("mini_vit", 3),
                                                             ("mini_vit", 4)])
def test_logits_equal_the_official_formulation(tiny_backbone, backbone_name, prompt_depth):
    backbone = backbone_for(backbone_name, tiny_backbone)
    torch.manual_seed(0)
    method = build_method("maple", backbone, CLASSNAMES, TEMPLATES, prompt_depth=prompt_depth).eval()
    depth = min(prompt_depth, backbone.text_layers)
    assert (method.text_depth, method.vision_depth) == (depth, depth)
    assert len(method.text_prompts) == len(method.compound_projections) == depth - 1
    assert len(method.vision_prompts) == 0  # the image tower has no prompts of its own
    perturb(method)
    images = random_images(3, size=backbone.image_size)
    with torch.no_grad():
        torch.testing.assert_close(method(images), official_maple_logits(method, images, CLASSNAMES), **TOLERANCE)


def test_projections_start_identical_but_are_separate_parameters():
    backbone = mini_vit_random()
    method = build_method("maple", backbone, CLASSNAMES, TEMPLATES, prompt_depth=4)
    projections = list(method.compound_projections)
    assert len(projections) == 3
    for layer in projections:
        assert (layer.in_features, layer.out_features) == (backbone.ctx_dim, backbone.vision_width)
        assert torch.equal(layer.weight, projections[0].weight) and torch.equal(layer.bias, projections[0].bias)
    storages = {p.data_ptr() for layer in projections for p in layer.parameters()}
    assert len(storages) == 2 * len(projections)  # no shared tensors
    # the input projection is its own default-initialised Linear, not one of the clones
    assert (method.proj.in_features, method.proj.out_features) == (backbone.ctx_dim, backbone.vision_width)
    assert not torch.equal(method.proj.weight, projections[0].weight)
    # the context starts from "a photo"; the compound text prompts are N(0, 0.02)
    compound = torch.cat(list(method.text_prompts))
    assert compound.shape == (3 * 2, backbone.ctx_dim) and 0.01 < compound.std().item() < 0.03


def test_gradients_reach_the_context_compound_prompts_and_projections_only():
    backbone = mini_vit_random()
    method = build_method("maple", backbone, CLASSNAMES, TEMPLATES, prompt_depth=4)
    perturb(method)
    trainable = {name for name, p in method.named_parameters() if p.requires_grad}
    expected = {"prompt_learner.ctx", "proj.weight", "proj.bias"}
    expected |= {f"text_prompts.{i}" for i in range(3)}
    expected |= {f"compound_projections.{i}.{kind}" for i in range(3) for kind in ("weight", "bias")}
    assert trainable == expected
    images, labels = random_images(4, size=backbone.image_size), torch.tensor([0, 1, 2, 0])
    F.cross_entropy(method(images), labels).backward()
    for name, parameter in method.named_parameters():
        if name in expected:
            assert parameter.grad is not None and parameter.grad.abs().sum() > 0, f"no gradient for {name}"
        else:
            assert parameter.grad is None, f"frozen {name} got a gradient"
    # separate parameters: each projection gets its own gradient (from its own layer's prompts)
    grads = [layer.weight.grad for layer in method.compound_projections]
    assert not torch.allclose(grads[0], grads[1]) and not torch.allclose(grads[1], grads[2])


def test_training_moves_the_prompts_and_leaves_clip_unchanged(tiny_backbone):
    method = build_method("maple", tiny_backbone, CLASSNAMES, TEMPLATES)
    assert_one_epoch_trains_exactly(method, tiny_backbone)


def test_save_reload_and_transfer_to_new_classes(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    trained = build_method("maple", tiny_backbone, CLASSNAMES, TEMPLATES).eval()
    perturb(trained)
    trained.save_learned(tmp_path / "learned.safetensors")
    assert set(trained.learned_state()) == {"prompt_learner.ctx", "text_prompts.0", "proj.weight", "proj.bias",
                                            "compound_projections.0.weight", "compound_projections.0.bias"}
    torch.manual_seed(1)
    reloaded = build_method("maple", tiny_backbone, OTHER_CLASSNAMES, TEMPLATES).eval()
    reloaded.load_learned(tmp_path / "learned.safetensors")
    images = random_images(3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), official_maple_logits(trained, images, OTHER_CLASSNAMES),
                                   **TOLERANCE)
        reloaded.set_classes(CLASSNAMES, TEMPLATES)
        torch.testing.assert_close(reloaded(images), trained(images), **TOLERANCE)


def test_defaults_are_the_maple_base_to_new_config(tiny_backbone):
    cfg = composed(("method=maple",))
    assert (cfg.method.n_ctx, cfg.method.ctx_init, cfg.method.ctx_init_learned, cfg.method.prompt_depth) == (
        2, PHRASE, "first_n_ctx", 9)
    assert "text_depth" not in cfg.method and "vision_depth" not in cfg.method and "vision_n_ctx" not in cfg.method
    method = build_method("maple", tiny_backbone, CLASSNAMES, TEMPLATES)
    assert (method.batch_size, method.optim.lr, epochs_of("maple"), method.optim.warmup) == (4, 0.0035, 5, 1)
    assert method.contract().inputs == "images" and method.transfers_to_new_classes
    assert method.run_notes()["prompt_depth_fitted_to_backbone"]["image"] == {"requested": 9, "used": 2}
    # the cross-dataset config, as the yaml comment gives it
    cross = ("optim.optimizer.lr=0.0026", "trainer.max_epochs=2")
    method = build_method("maple", mini_vit_random(), CLASSNAMES, TEMPLATES, overrides=cross, prompt_depth=3)
    assert (method.optim.lr, epochs_of("maple", *cross), method.text_depth) == (0.0026, 2, 3)


def test_refusals(tiny_backbone):
    with pytest.raises(PromptbenchError, match=r"method 'maple' needs a ViT image tower.*ModifiedResNet"):
        build_method("maple", resnet_backbone(), CLASSNAMES, TEMPLATES)
    with pytest.raises(PromptbenchError, match="prompt_depth must be >= 1"):
        build_method("maple", tiny_backbone, CLASSNAMES, TEMPLATES, prompt_depth=0)
    with pytest.raises(PromptbenchError, match="method.views.n must be 0"):
        build_method("maple", tiny_backbone, CLASSNAMES, TEMPLATES, views={"n": 4})
    with pytest.raises(PromptbenchError, match="method.csc=true is not available"):
        build_method("maple", tiny_backbone, CLASSNAMES, TEMPLATES, csc=True)
    uneven = copy.deepcopy(tiny_backbone)
    uneven.model.visual.transformer.resblocks = uneven.model.visual.transformer.resblocks[:1]
    with pytest.raises(PromptbenchError, match=r"couples the two towers.*prompt_depth <= 1"):
        build_method("maple", uneven, CLASSNAMES, TEMPLATES, prompt_depth=2)
