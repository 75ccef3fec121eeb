"""Shared-prefix text encoding (`speed.shared_prefix`) and class-chunked checkpointed encoding (`speed.text_chunk`)
give the full pass's values and gradients, for every text-prompt method; layouts and towers the prefix scheme does
not cover take the full pass.

Exactness is checked in float64 (the schemes only reorder sums: agreement to 1e-10), and in float32 to the 1e-5
relative of the issue for the logits and the prompts' gradients. In float32 CoCoOp's meta-net gradient, a sum
over images and classes with cancellation, moves by up to ~1e-5 relative under any reordering of the same sums
(the full pass run in chunks does as much), so float32 does not test it at 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptbench.backbones import load_backbone
from conftest import build_method

CLASSNAMES = ["red circle", "blue square", "green triangle with dots", "yellow star", "dog"]
TEMPLATES = ["a photo of a {}."]
TEXT_PROMPT_METHODS = ["coop", "cocoop", "kgcoop", "prograd", "ivlp", "maple", "promptsrc"]
FLOAT32_RELATIVE = 1e-5
FLOAT64_RELATIVE = 1e-10


def fresh_backbone():
    # The options change the backbone's behaviour: never the session's shared tiny backbone.
    return load_backbone("tiny", "promptbench-tiny", "random")


@pytest.fixture(scope="module")
def backbone():
    return fresh_backbone()


@pytest.fixture(scope="module")
def backbone64():
    return fresh_backbone().double()


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


def assert_relatively_close(actual: torch.Tensor, expected: torch.Tensor, tolerance: float) -> None:
    scale = expected.abs().max().item()
    assert scale > 0
    assert (actual - expected).abs().max().item() <= tolerance * scale, (actual - expected).abs().max().item() / scale


def built(name, backbone, **options):
    """The method in the backbone's precision, its learned tensors away from their initial values (so that every
    prompt token matters), the same whatever ran before."""
    torch.manual_seed(0)
    method = build_method(name, backbone, CLASSNAMES, TEMPLATES, **options).to(backbone.dtype)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in method.trainable_parameters():
            parameter.add_(torch.randn(parameter.shape, generator=generator).to(parameter.dtype) * 0.3)
    return method


def logits_and_gradients(method, images, labels, **speed):
    method.backbone.accelerate(**speed)
    method.zero_grad(set_to_none=True)
    logits = method(images.to(method.backbone.dtype))
    F.cross_entropy(logits, labels).backward()
    return logits.detach(), {name: p.grad.detach().clone() for name, p in method.named_parameters() if p.requires_grad}


def assert_same_step(method, images, labels, reference_speed, speed, only=None):
    """Equal logits and gradients (of the parameters whose names contain one of `only`, default all)."""
    tolerance = FLOAT64_RELATIVE if method.backbone.dtype == torch.float64 else FLOAT32_RELATIVE
    expected_logits, expected_grads = logits_and_gradients(method, images, labels, **reference_speed)
    logits, grads = logits_and_gradients(method, images, labels, **speed)
    assert_relatively_close(logits, expected_logits, tolerance)
    compared = [name for name in grads if only is None or any(part in name for part in only)]
    assert compared
    for name in compared:
        assert_relatively_close(grads[name], expected_grads[name], tolerance)


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 2, 4])


@pytest.fixture()
def suffix_passes64(backbone64):
    calls = []
    run = backbone64._suffix_tower
    backbone64._suffix_tower = lambda *args: calls.append(args[0].shape[0]) or run(*args)
    yield calls
    backbone64._suffix_tower = run


@pytest.mark.parametrize("name", TEXT_PROMPT_METHODS)
def test_every_text_prompt_method_gets_the_full_pass_values_and_gradients(backbone64, images, suffix_passes64, name):
    method = built(name, backbone64)
    assert_same_step(method, *images, {"shared_prefix": False}, {"shared_prefix": True})
    assert suffix_passes64, "the shared-prefix pass was not taken"


# the prompts' own gradients: the context, the deep text prompts (MaPLe: and their projections to the image tower)
@pytest.mark.parametrize("name, prompts", [("coop", ["ctx"]), ("cocoop", ["ctx"]),
                                           ("maple", ["ctx", "text_prompts", "compound", "proj"])])
def test_float32_shared_prefix_is_exact_to_1e_5_relative(backbone, images, suffix_passes, name, prompts):
    assert_same_step(built(name, backbone), *images, {"shared_prefix": False}, {"shared_prefix": True}, only=prompts)
    assert suffix_passes


def test_fixed_words_after_the_context_join_the_shared_prefix(backbone64, images, suffix_passes64):
    # IVLP's ctx_init "a photo of a" with n_ctx 2: "of a" is fixed and common to every class prompt
    method = built("ivlp", backbone64, text_depth=1)
    assert method.prompt_learner.shared_words == 2
    assert_same_step(method, *images, {"shared_prefix": False}, {"shared_prefix": True})
    assert suffix_passes64


def test_cocoop_runs_one_prefix_per_image(backbone, images, suffix_passes):
    method = built("cocoop", backbone)
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
    method = built("coop", backbone, n_ctx=4, **options)
    assert not method.prompt_learner.shares_prefix(method.prompt_learner.ctx)
    expected = logits_and_gradients(method, *images, shared_prefix=False)
    logits, grads = logits_and_gradients(method, *images, shared_prefix=True)
    assert torch.equal(logits, expected[0]) and all(torch.equal(grads[name], expected[1][name]) for name in grads)
    assert not suffix_passes


def test_a_lora_adapted_text_tower_takes_the_full_pass(images):
    backbone = fresh_backbone().accelerate(shared_prefix=True)
    method = built("coop", backbone, n_ctx=4)
    backbone.add_lora("text", "all", ["q", "v"], rank=2, alpha=1.0, dropout=0.0)
    with torch.no_grad():
        for adapter in backbone.lora_layers():
            adapter.lora_B.normal_(0, 0.5)  # adapters that change the tower
    assert "MultiheadAttention" in backbone.shared_prefix_blocker()
    called = []
    backbone._suffix_tower = lambda *args: called.append(1)
    expected = logits_and_gradients(method, *images, shared_prefix=False)
    logits, grads = logits_and_gradients(method, *images, shared_prefix=True)
    assert torch.equal(logits, expected[0]) and all(torch.equal(grads[name], expected[1][name]) for name in grads)
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


def test_the_sequence_first_block_layout_gives_the_same_features(backbone):
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
            assert_relatively_close(features, expected, FLOAT32_RELATIVE)


@pytest.mark.parametrize("name", ["coop", "cocoop", "maple"])
@pytest.mark.parametrize("shared_prefix", [False, True])
def test_chunked_checkpointed_encoding_gives_the_same_values_and_gradients(backbone64, images, name, shared_prefix):
    method = built(name, backbone64)
    for chunk in (2, 3):
        assert_same_step(method, *images, {"shared_prefix": shared_prefix},
                         {"shared_prefix": shared_prefix, "text_chunk": chunk})


def test_chunks_are_recomputed_in_backward_and_not_under_no_grad(backbone, images, suffix_passes):
    method = built("coop", backbone)
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
    method = built("coop", backbone)
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
