"""CoCoOp: batched conditional prompts equal the per-image loop of the reference, frozen CLIP, save/load."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from conftest import build_method, epochs_of
from promptbench.errors import PromptbenchError
from test_coop import (
    CLASSNAMES,
    OTHER_CLASSNAMES,
    TEMPLATES,
    TOLERANCE,
    backbone_snapshot,
    fit,
    random_images,
    reference_text_features,
)


def per_image_reference_logits(method, images):
    """The reference's loop: for each image, its shifted context, a full 77-token pass, its logits."""
    backbone, learner = method.backbone, method.prompt_learner
    image_features = F.normalize(backbone.model.encode_image(images), dim=-1)
    rows = []
    for feature in image_features:
        ctx = learner.ctx + method.meta_net(feature)
        text = reference_text_features(backbone, learner.classnames, ctx, learner.class_token_position)
        rows.append(backbone.model.logit_scale.exp() * feature @ F.normalize(text, dim=-1).T)
    return torch.stack(rows)


@pytest.mark.parametrize("max_prompts_per_pass", [2048, 2 * len(CLASSNAMES), 1])
def test_batched_logits_equal_the_per_image_loop(tiny_backbone, max_prompts_per_pass):
    torch.manual_seed(0)
    method = build_method("cocoop", tiny_backbone, CLASSNAMES, TEMPLATES, max_prompts_per_pass=max_prompts_per_pass).eval()
    with torch.no_grad():
        method.meta_net[-1].weight.mul_(20)  # a clearly image-dependent shift, so a mix-up of images shows
        images = random_images(5)
        torch.testing.assert_close(method(images), per_image_reference_logits(method, images), **TOLERANCE)


def test_defaults_follow_the_reference(tiny_backbone):
    method = build_method("cocoop", tiny_backbone, CLASSNAMES, TEMPLATES)
    assert (method.batch_size, epochs_of("cocoop"), method.optim.lr, method.optim.warmup) == (1, 10, 0.002, 1)
    assert method.prompt_learner.n_ctx == 4 and method.transfers_to_new_classes
    embedding_dim = tiny_backbone.embed_dim
    assert [tuple(layer.weight.shape) for layer in (method.meta_net[0], method.meta_net[2])] == [
        (embedding_dim // 16, embedding_dim), (tiny_backbone.ctx_dim, embedding_dim // 16)]


def test_csc_and_bad_chunking_are_refused(tiny_backbone):
    with pytest.raises(PromptbenchError, match="method.csc=true is not available"):
        build_method("cocoop", tiny_backbone, CLASSNAMES, TEMPLATES, csc=True)
    with pytest.raises(PromptbenchError, match="max_prompts_per_pass must be >= 1, got 0"):
        build_method("cocoop", tiny_backbone, CLASSNAMES, TEMPLATES, max_prompts_per_pass=0)


def test_only_context_and_meta_net_train_and_clip_stays_unchanged(tiny_backbone):
    method = build_method("cocoop", tiny_backbone, CLASSNAMES, TEMPLATES)
    trainable = {name for name, p in method.named_parameters() if p.requires_grad}
    assert trainable == {"prompt_learner.ctx", "meta_net.0.weight", "meta_net.0.bias", "meta_net.2.weight",
                         "meta_net.2.bias"}
    before = backbone_snapshot(tiny_backbone)
    meta_before = method.meta_net[0].weight.detach().clone()
    fit(method, random_images(3), torch.tensor([0, 1, 2]), epochs=1)
    assert not torch.equal(method.meta_net[0].weight.detach(), meta_before)
    for key, value in tiny_backbone.state_dict().items():
        assert torch.equal(value, before[key]), f"backbone weight {key} changed"


def test_saved_prompts_and_meta_net_reload_and_transfer(tiny_backbone, tmp_path):
    method = build_method("cocoop", tiny_backbone, CLASSNAMES, TEMPLATES).eval()
    with torch.no_grad():
        method.meta_net[-1].bias.add_(0.3)
    method.save_learned(tmp_path / "learned.safetensors")
    elsewhere = build_method("cocoop", tiny_backbone, OTHER_CLASSNAMES, TEMPLATES).eval()
    elsewhere.load_learned(tmp_path / "learned.safetensors")
    method.set_classes(OTHER_CLASSNAMES, TEMPLATES)
    images = random_images(2)
    with torch.no_grad():
        torch.testing.assert_close(elsewhere(images), method(images), rtol=0, atol=0)
        assert elsewhere(images).shape == (2, len(OTHER_CLASSNAMES))
