"""IVLP: logits against a straightforward re-implementation of the official formulation (both towers), the
fixed words of ctx_init, depth fitting, frozen CLIP, save/reload, base-to-new transfer, and refusals.

The towers of the official formulation are promptbench.tools.reference (also `make bench`'s baseline): written
from the official code (muzairkhattak/multimodal-prompt-learning clip/model.py, trainers/independentVL.py), not
from promptbench's implementation: a full context-length text pass tokenised per call, per-layer replacement.
"""

from __future__ import annotations

import functools
import logging

import open_clip
import pytest
import torch
import torch.nn.functional as F

from conftest import build_method, composed, epochs_of
from promptbench.backbones import load_backbone
from promptbench.errors import PromptbenchError
from promptbench.tools.reference import reference_image_features, reference_text_features
from test_coop import TEMPLATES, assert_one_epoch_trains_exactly, random_images

CLASSNAMES = ["golden_retriever", "cat", "sea lion"]
OTHER_CLASSNAMES = ["red panda", "dog", "whale", "fire truck"]
PHRASE = "a photo of a"
TOLERANCE = dict(rtol=1e-4, atol=1e-4)


@functools.lru_cache(maxsize=None)
def mini_vit_random():
    """A random ViT with 4 layers in each tower: deep enough to prompt some layers and not others."""
    return load_backbone("mini_vit", "promptbench-mini-vit", "random")


@functools.lru_cache(maxsize=None)
def resnet_backbone():
    return load_backbone("mini", "promptbench-mini", "bundled")


# ---- the official formulation, written out -----------------------------------------------------------
def official_logits(backbone, image_features, text_features):
    image, text = F.normalize(image_features, dim=-1), F.normalize(text_features, dim=-1)
    return backbone.model.logit_scale.exp() * image @ text.T


def official_ivlp_logits(method, images, classnames, prompt_prefix):
    backbone = method.backbone
    text = reference_text_features(backbone, classnames, method.prompt_learner.ctx, list(method.text_prompts),
                                   prompt_prefix)
    image = reference_image_features(backbone, images, list(method.vision_prompts))
    return official_logits(backbone, image, text)


def perturb(method, seed=1) -> None:
    """Large, distinct values for every learned tensor, so a wrong layout or a skipped layer cannot hide."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(0.5 * torch.randn(parameter.shape, generator=generator))


# ---- exactness -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("backbone_name", "n_ctx", "ctx_init", "text_depth", "vision_depth"),
    [
        ("tiny", 2, PHRASE, 12, 12),  # the defaults: "[c1][c2] of a {class}.", depth fitted to 2 layers
        ("tiny", 4, PHRASE, 12, 12),  # the PromptSRC-paper setting: the whole phrase is learned
        ("tiny", 3, None, 1, 1),      # random context "X X X", input layers only
        ("tiny", 2, PHRASE, 2, 0),    # deep language prompting only, the plain image tower
        ("mini_vit", 2, PHRASE, 3, 2),  # layers beyond the depth pass the prompt tokens through
    ],
)
def test_logits_equal_the_official_formulation(tiny_backbone, backbone_name, n_ctx, ctx_init, text_depth,
                                               vision_depth):
    backbone = tiny_backbone if backbone_name == "tiny" else mini_vit_random()
    torch.manual_seed(0)
    method = build_method("ivlp", backbone, CLASSNAMES, TEMPLATES, n_ctx=n_ctx, ctx_init=ctx_init,
                          text_depth=text_depth, vision_depth=vision_depth).eval()
    assert method.prompt_learner.ctx.shape == (n_ctx, backbone.ctx_dim)
    assert len(method.text_prompts) == min(text_depth, backbone.text_layers) - 1
    assert len(method.vision_prompts) == min(vision_depth, backbone.vision_layers)
    perturb(method)
    images = random_images(3, size=backbone.image_size)
    prefix = ctx_init or " ".join(["X"] * n_ctx)
    with torch.no_grad():
        expected = official_ivlp_logits(method, images, CLASSNAMES, prefix)
        torch.testing.assert_close(method(images), expected, **TOLERANCE)
        method.on_predict_start()  # the cached evaluation text features give the same logits
        torch.testing.assert_close(method(images), expected, **TOLERANCE)
        method.on_predict_end()


def test_the_context_starts_from_the_first_words_and_the_rest_stay_fixed(tiny_backbone):
    method = build_method("ivlp", tiny_backbone, CLASSNAMES, TEMPLATES)
    phrase = tiny_backbone.model.token_embedding(open_clip.tokenize([PHRASE]))[0]
    torch.testing.assert_close(method.prompt_learner.ctx.detach(), phrase[1:3])  # "a photo"
    torch.testing.assert_close(method.prompt_learner.token_suffix[:, :2], phrase[3:5].expand(3, -1, -1))  # "of a"
    deep = torch.cat(list(method.text_prompts) + list(method.vision_prompts))
    assert 0.01 < deep.std().item() < 0.03 and abs(deep.mean().item()) < 0.01  # N(0, 0.02), not word-initialised


def test_defaults_are_the_maple_repository_config(tiny_backbone):
    cfg = composed(("method=ivlp",))
    assert (cfg.method.n_ctx, cfg.method.vision_n_ctx, cfg.method.text_depth, cfg.method.vision_depth) == (2, 2, 12, 12)
    assert (cfg.method.ctx_init, cfg.method.ctx_init_learned) == (PHRASE, "first_n_ctx")
    method = build_method("ivlp", tiny_backbone, CLASSNAMES, TEMPLATES)
    assert (method.batch_size, method.optim.lr, epochs_of("ivlp"), method.optim.warmup) == (4, 0.0035, 5, 1)
    assert method.contract().inputs == "images" and method.contract().batch_size == 4
    assert method.transfers_to_new_classes


def test_depth_is_fitted_to_a_shallower_tower_with_a_warning_and_a_note(tiny_backbone, caplog):
    with caplog.at_level(logging.WARNING):
        method = build_method("ivlp", tiny_backbone, CLASSNAMES, TEMPLATES)
    assert (method.text_depth, method.vision_depth) == (2, 2)
    assert method.run_notes() == {"prompt_depth_fitted_to_backbone": {"text": {"requested": 12, "used": 2},
                                                                      "image": {"requested": 12, "used": 2}}}
    assert "text prompt depth 12 > the 2 text layers" in caplog.text and "image prompt depth 12" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        fitting = build_method("ivlp", tiny_backbone, CLASSNAMES, TEMPLATES, text_depth=2, vision_depth=1)
    assert fitting.run_notes() == {} and "prompt depth" not in caplog.text


# ---- training --------------------------------------------------------------------------------------------
def test_only_the_prompts_train_and_clip_stays_unchanged(tiny_backbone):
    method = build_method("ivlp", tiny_backbone, CLASSNAMES, TEMPLATES)
    assert_one_epoch_trains_exactly(method, tiny_backbone,
                                    {"prompt_learner.ctx", "text_prompts.0", "vision_prompts.0", "vision_prompts.1"})


# ---- saving and class sets ---------------------------------------------------------------------------------
def test_save_reload_and_transfer_to_new_classes(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    trained = build_method("ivlp", tiny_backbone, CLASSNAMES, TEMPLATES).eval()
    perturb(trained)
    trained.save_learned(tmp_path / "learned.safetensors")
    assert set(trained.learned_state()) == {"prompt_learner.ctx", "text_prompts.0", "vision_prompts.0",
                                            "vision_prompts.1"}
    torch.manual_seed(1)
    reloaded = build_method("ivlp", tiny_backbone, OTHER_CLASSNAMES, TEMPLATES).eval()
    reloaded.load_learned(tmp_path / "learned.safetensors")
    images = random_images(3)
    with torch.no_grad():
        # base-to-new: the learned prompts on classes never trained on, as the official load_model does
        torch.testing.assert_close(reloaded(images), official_ivlp_logits(trained, images, OTHER_CLASSNAMES, PHRASE),
                                   **TOLERANCE)
        reloaded.set_classes(CLASSNAMES, TEMPLATES)
        torch.testing.assert_close(reloaded(images), trained(images), **TOLERANCE)
        trained.set_classes(OTHER_CLASSNAMES, TEMPLATES)
        torch.testing.assert_close(trained(images), official_ivlp_logits(trained, images, OTHER_CLASSNAMES, PHRASE),
                                   **TOLERANCE)


def test_a_file_of_other_depths_is_refused(tiny_backbone, tmp_path):
    build_method("ivlp", tiny_backbone, CLASSNAMES, TEMPLATES).save_learned(tmp_path / "learned.safetensors")
    shallow = build_method("ivlp", tiny_backbone, CLASSNAMES, TEMPLATES, text_depth=1, vision_depth=1)
    with pytest.raises(PromptbenchError, match="does not match method 'ivlp'"):
        shallow.load_learned(tmp_path / "learned.safetensors")


# ---- refusals ------------------------------------------------------------------------------------------------
def test_a_resnet_image_tower_is_refused_clearly():
    with pytest.raises(PromptbenchError, match=r"method 'ivlp' needs a ViT image tower.*ModifiedResNet.*mini_vit"):
        build_method("ivlp", resnet_backbone(), CLASSNAMES, TEMPLATES)
    # deep language prompting alone (vision_depth 0) leaves the image tower as it is, so any tower works
    language_only = build_method("ivlp", resnet_backbone(), CLASSNAMES, TEMPLATES, vision_depth=0)
    with torch.no_grad():
        assert language_only.eval()(random_images(2)).shape == (2, 3)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"views": {"n": 2}}, r"trains on images, not cached features: method.views.n must be 0"),
        ({"csc": True}, "method.csc=true is not available"),
        ({"class_token_position": "middle"}, "class_token_position=end"),
        ({"text_depth": 0}, "text_depth must be >= 1"),
        ({"n_ctx": 5}, "1 <= n_ctx <= 4"),
    ],
)
def test_bad_options_are_refused(tiny_backbone, options, message):
    with pytest.raises(PromptbenchError, match=message):
        build_method("ivlp", tiny_backbone, CLASSNAMES, TEMPLATES, **options)


@pytest.mark.parametrize("name", ["ivlp", "maple", "vpt"])
def test_the_default_run_config_passes_the_option_checks(name):
    from promptbench.config import check_run_config

    check_run_config(composed((f"method={name}", "backbone=tiny")))
