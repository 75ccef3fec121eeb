"""Speed options leave the numbers unchanged: compiled text tower, channels-last images, SDPA, bf16 autocast."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptbench.backbones import load_backbone
from promptbench.methods.coop import CoOp
from conftest import build_method

CLASSNAMES = ["red circle", "blue square", "green triangle", "yellow star"]
OTHER_CLASSNAMES = ["a much longer class name with many words", "dog"]
TEMPLATES = ["a photo of a {}."]
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def fresh_backbone(name: str = "tiny"):
    # Speed options change the backbone in place: never on the shared session fixture.
    model_name, pretrained = {"tiny": ("promptbench-tiny", "random"), "mini": ("promptbench-mini", "bundled")}[name]
    return load_backbone(name, model_name, pretrained)


def logits_and_context_grad(method: CoOp, images: torch.Tensor, labels: torch.Tensor):
    method.prompt_learner.ctx.grad = None
    logits = method(images)
    F.cross_entropy(logits.float(), labels).backward()
    return logits.detach(), method.prompt_learner.ctx.grad.detach().clone()


# coop: the compiled full pass; maple: the compiled shared-prefix passes, with deep text prompts, against the eager
# full pass
@pytest.mark.parametrize("name, shared_prefix", [("coop", False), ("maple", True)])
def test_compiled_text_tower_gives_the_eager_logits_and_gradients_across_class_sets(name, shared_prefix):
    torch.manual_seed(0)
    images, labels = torch.randn(3, 3, 64, 64), torch.tensor([0, 1, 3])
    eager = build_method(name, fresh_backbone(), CLASSNAMES, TEMPLATES, n_ctx=4)
    compiled = build_method(name, fresh_backbone().accelerate(compile_text=True, shared_prefix=shared_prefix),
                            CLASSNAMES, TEMPLATES, n_ctx=4)
    compiled.load_state_dict(eager.state_dict())
    assert compiled.backbone.describe()["speed"] == {"compile_text": True, "channels_last": False,
                                                     "shared_prefix": shared_prefix, "text_chunk": None}
    for method in (eager, compiled):
        with torch.no_grad():
            method.prompt_learner.ctx.normal_(0, 0.3, generator=torch.Generator().manual_seed(1))
    expected_logits, expected_grad = logits_and_context_grad(eager, images, labels)
    logits, grad = logits_and_context_grad(compiled, images, labels)
    torch.testing.assert_close(logits, expected_logits, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-3, atol=1e-5)
    # Another class set means another prompt length: the compiled tower must follow, not reuse a stale shape.
    for method in (eager, compiled):
        method.set_classes(OTHER_CLASSNAMES, TEMPLATES)
    with torch.no_grad():
        torch.testing.assert_close(compiled(images), eager(images), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["tiny", "mini"])
def test_channels_last_image_tower_gives_the_same_features(name):
    default, channels_last = fresh_backbone(name), fresh_backbone(name).accelerate(channels_last=True)
    images = torch.randn(4, 3, default.image_size, default.image_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = default.encode_image(images)
        features = channels_last.encode_image(images)
    torch.testing.assert_close(features, expected, rtol=1e-4, atol=1e-5)
    if name == "mini":  # a convolutional tower: its weights really moved to NHWC
        conv = channels_last.model.visual.conv1.weight
        assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()


def test_text_tower_attention_runs_through_sdpa_in_training(monkeypatch):
    # open_clip's attention (need_weights=False) dispatches to F.scaled_dot_product_attention, which picks the
    # flash / memory-efficient kernels on GPU; a change of open_clip that loses that path must show up here.
    calls = []
    sdpa = F.scaled_dot_product_attention

    def counting_sdpa(*args, **kwargs):
        calls.append(args[0].shape)
        return sdpa(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", counting_sdpa)
    backbone = fresh_backbone()
    method = build_method("coop", backbone, CLASSNAMES, TEMPLATES, n_ctx=4)
    method.text_features().sum().backward()
    assert len(calls) == len(backbone.model.transformer.resblocks)
    assert calls[0][0] == len(CLASSNAMES)  # [batch, heads, tokens, head_dim]: one pass over every class prompt


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_autocast_stays_close_to_fp32(device):
    torch.manual_seed(0)
    method = build_method("coop", fresh_backbone("mini"), CLASSNAMES, TEMPLATES, n_ctx=4).to(device)
    images = torch.randn(8, 3, 64, 64, device=device)
    with torch.no_grad():
        fp32 = method(images).float()
        with torch.autocast(device, dtype=torch.bfloat16):
            bf16 = method(images).float()
    # bf16 keeps 8 mantissa bits: logits (scale up to 100) agree to a few tenths and rank classes alike.
    torch.testing.assert_close(bf16, fp32, rtol=0.02, atol=0.5)
    assert (bf16.argmax(-1) == fp32.argmax(-1)).float().mean() >= 0.75
