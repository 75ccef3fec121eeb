"""VPT: logits against the official formulation written out (deep visual prompts, the fixed "a photo of a
{class}." text of trainers/vpt.py FixedEmbeddings), only the visual prompts train, new class sets."""

from __future__ import annotations

import open_clip
import pytest
import torch

from conftest import build_method, composed, epochs_of
from promptbench.errors import PromptbenchError
from promptbench.tools.reference import reference_image_features
from test_coop import assert_one_epoch_trains_exactly, random_images
from test_ivlp import (
    CLASSNAMES,
    OTHER_CLASSNAMES,
    TOLERANCE,
    mini_vit_random,
    official_logits,
    perturb,
    resnet_backbone,
)

DATASET_TEMPLATES = ["a photo of a {}, a type of pet."]  # VPT ignores the dataset's template by default


def official_vpt_logits(method, images, classnames):
    backbone = method.backbone
    prompts = [backbone.model.encode_text(open_clip.tokenize(["a photo of a " + name.replace("_", " ") + "."],
                                                             context_length=backbone.context_length))
               for name in classnames]
    image = reference_image_features(backbone, images, list(method.vision_prompts))
    return official_logits(backbone, image, torch.cat(prompts))


@pytest.mark.parametrize(("backbone_name", "vision_depth"), [("tiny", 12), ("tiny", 1), ("mini_vit", 3)])
def test_logits_equal_the_official_formulation(tiny_backbone, backbone_name, vision_depth):
    backbone = tiny_backbone if backbone_name == "tiny" else mini_vit_random()
    torch.manual_seed(0)
    method = build_method("vpt", backbone, CLASSNAMES, DATASET_TEMPLATES, vision_depth=vision_depth).eval()
    assert [tuple(p.shape) for p in method.vision_prompts] == [(8, backbone.vision_width)] * min(
        vision_depth, backbone.vision_layers)
    perturb(method)
    images = random_images(3, size=backbone.image_size)
    with torch.no_grad():
        torch.testing.assert_close(method(images), official_vpt_logits(method, images, CLASSNAMES), **TOLERANCE)


def test_only_the_visual_prompts_train_and_the_text_stays_fixed(tiny_backbone):
    method = build_method("vpt", tiny_backbone, CLASSNAMES, DATASET_TEMPLATES)
    text_before = method.classifier().clone()
    assert_one_epoch_trains_exactly(method, tiny_backbone, {"vision_prompts.0", "vision_prompts.1"})
    assert torch.equal(method.classifier(), text_before)


def test_new_classes_and_save_reload(tiny_backbone, tmp_path):
    torch.manual_seed(0)
    trained = build_method("vpt", tiny_backbone, CLASSNAMES, DATASET_TEMPLATES).eval()
    perturb(trained)
    trained.save_learned(tmp_path / "learned.safetensors")
    assert set(trained.learned_state()) == {"vision_prompts.0", "vision_prompts.1"}  # no text is saved
    torch.manual_seed(1)
    reloaded = build_method("vpt", tiny_backbone, CLASSNAMES, DATASET_TEMPLATES).eval()
    reloaded.load_learned(tmp_path / "learned.safetensors")
    images = random_images(3)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(images), trained(images), **TOLERANCE)
        assert trained.classifier().shape[0] == len(CLASSNAMES)
        trained.set_classes(OTHER_CLASSNAMES, DATASET_TEMPLATES)  # the fixed text is encoded for the new set
        torch.testing.assert_close(trained(images), official_vpt_logits(trained, images, OTHER_CLASSNAMES),
                                   **TOLERANCE)


def test_defaults_are_the_maple_repository_vpt_config(tiny_backbone):
    cfg = composed(("method=vpt",))
    assert (cfg.method.vision_n_ctx, cfg.method.vision_depth, cfg.method.template_set) == (8, 12, "a photo of a {}.")
    method = build_method("vpt", tiny_backbone, CLASSNAMES, DATASET_TEMPLATES)
    assert (method.batch_size, method.optim.lr, epochs_of("vpt"), method.optim.warmup) == (4, 0.0025, 5, 1)
    assert method.contract().inputs == "images" and method.contract().batch_size == 4
    assert method.templates == ["a photo of a {}."] and method.trains and method.transfers_to_new_classes
    assert method.run_notes() == {"prompt_depth_fitted_to_backbone": {"image": {"requested": 12, "used": 2}}}


def test_refusals(tiny_backbone):
    with pytest.raises(PromptbenchError, match=r"method 'vpt' needs a ViT image tower.*ModifiedResNet"):
        build_method("vpt", resnet_backbone(), CLASSNAMES, DATASET_TEMPLATES)
    with pytest.raises(PromptbenchError, match="vision_depth and vision_n_ctx must be >= 1"):
        build_method("vpt", tiny_backbone, CLASSNAMES, DATASET_TEMPLATES, vision_depth=0)
    with pytest.raises(PromptbenchError, match="method.views.n must be 0"):
        build_method("vpt", tiny_backbone, CLASSNAMES, DATASET_TEMPLATES, views={"n": 4})
