"""Deep prompts as a Backbone capability: depth 0 is the plain tower, the prompted towers equal a
straightforward per-layer re-implementation of the official scheme, gradients reach the prompts only, and
a convolutional image tower is refused with a clear message."""

from __future__ import annotations

import pytest
import torch

from promptbench.backbones import load_backbone
from promptbench.errors import PromptbenchError

TOLERANCE = dict(rtol=1e-4, atol=1e-5)


def reference_prompted_image(backbone, images, prompts):
    """The official deep scheme written out, in the style of MaPLe's ResidualAttentionBlock (sequence-first)."""
    visual = backbone.model.visual
    x = visual.conv1(images)
    x = x.reshape(x.shape[0], x.shape[1], -1).permute(0, 2, 1)
    cls = visual.class_embedding + torch.zeros(x.shape[0], 1, x.shape[-1])
    x = torch.cat([cls, x], dim=1) + visual.positional_embedding
    x = torch.cat([x, prompts[0].expand(x.shape[0], -1, -1)], dim=1)
    x = visual.ln_pre(x).permute(1, 0, 2)
    n = prompts[0].shape[0]
    for i, block in enumerate(visual.transformer.resblocks):
        if 0 < i < len(prompts):
            x = torch.cat([x[:-n], prompts[i].unsqueeze(1).expand(-1, x.shape[1], -1)], dim=0)
        x = block(x.permute(1, 0, 2)).permute(1, 0, 2)
    x = visual.ln_post(x.permute(1, 0, 2)[:, 0])
    return x @ visual.proj


def reference_prompted_text(backbone, tokens, prompts):
    """Full-length (77-token) pass; the context after SOS replaced at the input of every deeper layer."""
    model = backbone.model
    n = prompts[0].shape[0]
    x = model.token_embedding(tokens)
    x = torch.cat([x[:, :1], prompts[0].expand(len(tokens), -1, -1), x[:, 1 + n:]], dim=1)
    x = x + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if 0 < i < len(prompts):
            x = torch.cat([x[:, :1], prompts[i].expand(len(tokens), -1, -1), x[:, 1 + n:]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)
    return x[torch.arange(len(tokens)), tokens.argmax(-1)] @ model.text_projection


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


def test_no_prompts_is_the_plain_tower(tiny_backbone, images):
    assert torch.equal(tiny_backbone.encode_image(images, deep_prompts=[]), tiny_backbone.model.encode_image(images))
    tokens = tiny_backbone.tokenize(["a photo of a dog.", "a cat."])
    embeddings = tiny_backbone.embed_tokens(tokens)
    plain = tiny_backbone.encode_text_embeddings(embeddings, tiny_backbone.eos_positions(tokens))
    torch.testing.assert_close(plain, tiny_backbone.model.encode_text(tokens), **TOLERANCE)


@pytest.mark.parametrize("depth", [1, 2])
def test_prompted_image_tower_equals_the_per_layer_reference(tiny_backbone, images, depth):
    width = tiny_backbone.vision_width
    prompts = [torch.randn(2, width, generator=torch.Generator().manual_seed(i)) for i in range(depth)]
    ours = tiny_backbone.encode_image(images, deep_prompts=prompts)
    torch.testing.assert_close(ours, reference_prompted_image(tiny_backbone, images, prompts), **TOLERANCE)
    assert not torch.allclose(ours, tiny_backbone.encode_image(images), atol=1e-3)


def test_per_image_vision_prompts_equal_one_image_at_a_time(tiny_backbone, images):
    width = tiny_backbone.vision_width
    per_image = [torch.randn(len(images), 2, width), torch.randn(len(images), 2, width)]
    batched = tiny_backbone.encode_image(images, deep_prompts=per_image)
    for i in range(len(images)):
        single = tiny_backbone.encode_image(images[i : i + 1], deep_prompts=[p[i] for p in per_image])
        torch.testing.assert_close(batched[i : i + 1], single, **TOLERANCE)


@pytest.mark.parametrize("depth", [1, 2])
def test_prompted_text_tower_equals_the_full_length_reference(tiny_backbone, depth):
    n = 3
    tokens = tiny_backbone.tokenize([" ".join(["X"] * n) + f" {name}." for name in ["dog", "sea lion", "fire truck"]])
    prompts = [torch.randn(n, tiny_backbone.ctx_dim, generator=torch.Generator().manual_seed(i)) for i in range(depth)]
    embeddings = tiny_backbone.embed_tokens(tokens)
    embeddings = torch.cat([embeddings[:, :1], prompts[0].expand(3, -1, -1), embeddings[:, 1 + n:]], dim=1)
    ours = tiny_backbone.encode_text_embeddings(embeddings, tiny_backbone.eos_positions(tokens), deep_prompts=prompts)
    torch.testing.assert_close(ours, reference_prompted_text(tiny_backbone, tokens, prompts), **TOLERANCE)


def test_gradients_reach_every_prompt_and_no_frozen_weight(tiny_backbone, images):
    width = tiny_backbone.vision_width
    prompts = [torch.randn(2, width, requires_grad=True) for _ in range(2)]
    tiny_backbone.encode_image(images, deep_prompts=prompts).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in prompts)
    assert all(w.grad is None for w in tiny_backbone.parameters())


def test_too_deep_prompts_are_refused(tiny_backbone, images):
    layers = tiny_backbone.vision_layers
    with pytest.raises(PromptbenchError, match=f"at most {layers}"):
        tiny_backbone.encode_image(images, deep_prompts=[torch.zeros(1, tiny_backbone.vision_width)] * (layers + 1))


def test_a_convolutional_image_tower_is_refused_clearly():
    mini = load_backbone("mini", "promptbench-mini", "bundled")
    with pytest.raises(PromptbenchError, match=r"method 'maple' needs a ViT image tower.*ModifiedResNet.*mini_vit"):
        mini.prompted_vision_tower("maple")
    with pytest.raises(PromptbenchError, match="ViT image tower"):
        mini.encode_image(torch.randn(1, 3, 64, 64), deep_prompts=[torch.zeros(2, 16)])
