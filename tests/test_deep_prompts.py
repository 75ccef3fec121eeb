"""Deep prompts as a Backbone capability: depth 0 is the plain tower, the prompted towers equal a
straightforward per-layer re-implementation of the official scheme (promptbench.tools.reference), gradients reach the prompts only, and
a convolutional image tower is refused with a clear message."""

from __future__ import annotations

import pytest
import torch

from promptbench.backbones import load_backbone
from promptbench.errors import PromptbenchError
from promptbench.tools.reference import reference_image_features, reference_text_features

TOLERANCE = dict(rtol=1e-4, atol=1e-5)


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
    torch.testing.assert_close(ours, reference_image_features(tiny_backbone, images, prompts), **TOLERANCE)
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
    n, names = 3, ["dog", "sea lion", "fire truck"]
    tokens = tiny_backbone.tokenize([" ".join(["X"] * n) + f" {name}." for name in names])
    prompts = [torch.randn(n, tiny_backbone.ctx_dim, generator=torch.Generator().manual_seed(i)) for i in range(depth)]
    embeddings = tiny_backbone.embed_tokens(tokens)
    embeddings = torch.cat([embeddings[:, :1], prompts[0].expand(3, -1, -1), embeddings[:, 1 + n:]], dim=1)
    ours = tiny_backbone.encode_text_embeddings(embeddings, tiny_backbone.eos_positions(tokens), deep_prompts=prompts)
    torch.testing.assert_close(ours, reference_text_features(tiny_backbone, names, prompts[0], prompts[1:]), **TOLERANCE)


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
