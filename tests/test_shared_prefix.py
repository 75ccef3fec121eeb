"""Shared-prefix text encoding (`speed.shared_prefix`) and class-chunked checkpointed encoding (`speed.text_chunk`)
give the full pass's values and gradients, for every text-prompt method; layouts and towers the prefix scheme does
not cover take the full pass."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptbench.backbones import load_backbone
from conftest import build_method

CLASSNAMES = ["red circle", "blue square", "green triangle with dots", "yellow star", "dog"]
TEMPLATES = ["a photo of a {}."]
TEXT_PROMPT_METHODS = ["coop", "cocoop", "kgcoop", "prograd", "ivlp", "maple", "promptsrc"]
# fp32: the prefix scheme reorders the attention sums, nothing else
RELATIVE = 1e-5


def fresh_backbone():
    # The options change the backbone's behaviour: never the session's shared tiny backbone.
    return load_backbone("tiny", "promptbench-tiny", "random")


@pytest.fixture(scope="module")
def backbone():
    return fresh_backbone()


@pytest.fixture()
def suffix_passes(backbone):
    """Counts the calls of the backbone's suffix pass (one per chunk, again per chunk when recomputed)."""
    calls = []
    run = backbone._suffix_tower

    def counting(*args):
        calls.append(args[0].shape[0])
        return run(*args)

    backbone._suffix_tower = counting
    yield calls
    backbone._suffix_tower = run


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float = RELATIVE) -> None:
    scale = expected.abs().max().item()
    assert scale > 0
    assert (actual - expected).abs().max().item() <= tolerance * scale, (actual - expected).abs().max().item() / scale


def randomised(method):
    """Learned tensors away from their initial values, so that every prompt token matters."""
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)
    return method


def logits_and_gradients(method, images, labels, **speed):
    method.backbone.accelerate(**speed)
    method.zero_grad(set_to_none=True)
    logits = method(images)
    F.cross_entropy(logits.float(), labels).backward()
    return logits.detach(), [p.grad.detach().clone() for p in method.trainable_parameters()]


def assert_same_step(method, images, labels, reference_speed, speed):
    expected_logits, expected_grads = logits_and_gradients(method, images, labels, **reference_speed)
    logits, grads = logits_and_gradients(method, images, labels, **speed)
    assert_relatively_close(logits, expected_logits)
    assert len(grads) == len(expected_grads) > 0
    for grad, expected in zip(grads, expected_grads):
        assert_relatively_close(grad, expected)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2, 4])


@pytest.mark.parametrize("name", TEXT_PROMPT_METHODS)
def test_every_text_prompt_method_gets_the_full_pass_values_and_gradients(backbone, images, suffix_passes, name):
    method = randomised(build_method(name, backbone, CLASSNAMES, TEMPLATES))
    assert_same_step(method, *images, {"shared_prefix": False}, {"shared_prefix": True})
    assert suffix_passes, "the shared-prefix pass was not taken"


def test_fixed_words_after_the_context_join_the_shared_prefix(backbone, images, suffix_passes):
    # IVLP's ctx_init "a photo of a" with n_ctx 2: "of a" is fixed and common to every class prompt
    method = randomised(build_method("ivlp", backbone, CLASSNAMES, TEMPLATES, text_depth=1))
    assert method.prompt_learner.shared_words == 2
    assert_same_step(method, *images, {"shared_prefix": False}, {"shared_prefix": True})
    assert suffix_passes


def test_cocoop_runs_one_prefix_per_image(backbone, images, suffix_passes):
    method = randomised(build_method("cocoop", backbone, CLASSNAMES, TEMPLATES))
    backbone.accelerate(shared_prefix=True)
    prefixes = []
    run = backbone._prefix_tower
    backbone._prefix_tower = lambda prefix, deep: prefixes.append(len(prefix)) or run(prefix, deep)
    try:
        with torch.no_grad():
            method(images[0])
    finally:
        backbone._prefix_tower = run
    assert prefixes == [len(images[0])] and suffix_passes == [len(CLASSNAMES)]


@pytest.mark.parametrize("options", [{"class_token_position": "middle"}, {"class_token_position": "front"},
                                     {"csc": True}])
def test_prompts_without_a_shared_prefix_take_the_full_pass(backbone, images, suffix_passes, options):
    method = randomised(build_method("coop", backbone, CLASSNAMES, TEMPLATES, n_ctx=4, **options))
    assert not method.prompt_learner.shares_prefix(method.prompt_learner.ctx)
    expected = logits_and_gradients(method, *images, shared_prefix=False)
    logits, grads = logits_and_gradients(method, *images, shared_prefix=True)
    assert torch.equal(logits, expected[0]) and all(map(torch.equal, grads, expected[1]))
    assert not suffix_passes


def test_a_lora_adapted_text_tower_takes_the_full_pass(images):
    backbone = fresh_backbone().accelerate(shared_prefix=True)
    method = randomised(build_method("coop", backbone, CLASSNAMES, TEMPLATES, n_ctx=4))
    backbone.add_lora("text", "all", ["q", "v"], rank=2, alpha=1.0, dropout=0.0)
    with torch.no_grad():
        for adapter in backbone.lora_layers():
            adapter.lora_B.normal_(0, 0.5)  # adapters that change the tower
    assert "MultiheadAttention" in backbone.shared_prefix_blocker()
    called = []
    backbone._suffix_tower = lambda *args: called.append(1)
    expected = logits_and_gradients(method, *images, shared_prefix=False)
    logits, grads = logits_and_gradients(method, *images, shared_prefix=True)
    assert torch.equal(logits, expected[0]) and all(map(torch.equal, grads, expected[1]))
    assert not called


def test_a_tower_without_a_causal_mask_takes_the_full_pass():
    backbone = fresh_backbone()
    backbone.model.attn_mask = torch.zeros_like(backbone.model.attn_mask)  # every token sees every other one
    assert "causal" in backbone.shared_prefix_blocker()
    prefixes, suffixes = torch.randn(2, 3, backbone.ctx_dim), torch.randn(4, 2, backbone.ctx_dim)
    eos = torch.tensor([1, 1, 0, 1])
    full = torch.cat([prefixes.unsqueeze(1).expand(-1, 4, -1, -1), suffixes.expand(2, -1, -1, -1)], dim=2)
    with torch.no_grad():
        features = backbone.accelerate(shared_prefix=True).encode_shared_prefix(prefixes, suffixes, eos)
        expected = backbone.encode_text_embeddings(full.flatten(0, 1), (eos + 3).repeat(2))
    assert torch.equal(features.flatten(0, 1), expected)


def test_the_sequence_first_block_layout_gives_the_same_features(backbone, images):
    sequence_first = fresh_backbone()
    sequence_first.model.transformer.batch_first = False
    for block in sequence_first.model.transformer.resblocks:
        block.attn.batch_first = False
    prefixes, suffixes = torch.randn(2, 3, backbone.ctx_dim), torch.randn(4, 2, backbone.ctx_dim)
    eos = torch.tensor([1, 1, 0, 1])
    with torch.no_grad():
        expected = backbone.accelerate(shared_prefix=False).encode_shared_prefix(prefixes, suffixes, eos)
        for shared_prefix in (False, True):
            features = sequence_first.accelerate(shared_prefix=shared_prefix).encode_shared_prefix(prefixes, suffixes, eos)
            assert_relatively_close(features, expected)


@pytest.mark.parametrize("name", ["coop", "cocoop", "maple"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_chunked_checkpointed_encoding_gives_the_same_values_and_gradients(backbone, images, name, shared_prefix):
    method = randomised(build_method(name, backbone, CLASSNAMES, TEMPLATES))
    for chunk in (2, 3):
        assert_same_step(method, *images, {"shared_prefix": shared_prefix},
                         {"shared_prefix": shared_prefix, "text_chunk": chunk})


def test_chunks_are_recomputed_in_backward_and_not_under_no_grad(backbone, images, suffix_passes):
    method = randomised(build_method("coop", backbone, CLASSNAMES, TEMPLATES))
    backbone.accelerate(shared_prefix=True, text_chunk=2)
    logits = method(images[0])
    assert suffix_passes == [2, 2, 1]  # 5 classes, 2 at a time
    F.cross_entropy(logits, images[1]).backward()
    assert sorted(suffix_passes) == [1, 1, 2, 2, 2, 2]  # each chunk once more, to recompute its activations
    suffix_passes.clear()
    with torch.no_grad():
        method(images[0])
    assert suffix_passes == [2, 2, 1]


def test_bf16_autocast_shared_prefix_stays_close_to_fp32(backbone, images):
    method = randomised(build_method("coop", backbone, CLASSNAMES, TEMPLATES))
    with torch.no_grad():
        backbone.accelerate(shared_prefix=False)
        expected = method(images[0]).float()
        backbone.accelerate(shared_prefix=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = method(images[0]).float()
    # bf16 keeps 8 mantissa bits: logits (scale up to 100) agree to a few tenths
    torch.testing.assert_close(bf16, expected, rtol=0.02, atol=0.5)


def test_text_chunk_must_be_positive(backbone):
    from promptbench.errors import PromptbenchError

    with pytest.raises(PromptbenchError, match="speed.text_chunk"):
        backbone.accelerate(text_chunk=0)
