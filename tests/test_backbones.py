"""Backbone loading: tiny config, local checkpoints in every supported format, fast clear offline failure."""

from __future__ import annotations

import time

import open_clip
import pytest
import torch

from promptbench.backbones import load_backbone
from promptbench.errors import PromptbenchError


def perturbed_state(backbone) -> dict[str, torch.Tensor]:
    """A state dict that differs from the random init, so loading it is observable."""
    generator = torch.Generator().manual_seed(123)
    return {k: v + torch.randn(v.shape, generator=generator) * 0.01 if v.is_floating_point() else v.clone()
            for k, v in backbone.model.state_dict().items()}


def assert_same_weights(model, state):
    loaded = model.state_dict()
    assert set(loaded) == set(state)
    for key, value in state.items():
        assert torch.equal(loaded[key], value.reshape(loaded[key].shape)), key


def test_tiny_backbone_exposes_what_methods_need(tiny_backbone):
    b = tiny_backbone
    assert b.image_size == 64 and b.embed_dim == 64 and b.context_length == 77
    assert 1_000_000 < b.describe()["parameters"] < 10_000_000
    features = b.encode_image(torch.randn(2, 3, 64, 64))
    assert features.shape == (2, 64)


def test_truncated_text_encoder_equals_open_clip(tiny_backbone):
    tokens = tiny_backbone.tokenize(["a photo of a dog.", "x", "a much longer prompt about a small red circle."])
    ours = tiny_backbone.encode_text(tokens)
    reference = tiny_backbone.model.encode_text(tokens)
    torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)


def test_tiny_is_the_same_model_every_time(tiny_backbone):
    again = load_backbone("tiny", "promptbench-tiny", "random")
    assert_same_weights(again.model, tiny_backbone.model.state_dict())


def test_backbone_stays_in_eval_mode(tiny_backbone):
    tiny_backbone.train()
    assert not tiny_backbone.model.training
    assert not any(p.requires_grad for p in tiny_backbone.parameters())


def test_openai_format_state_dict_loads_identical_weights(tiny_backbone, tmp_path):
    state = perturbed_state(tiny_backbone)
    state["logit_scale"] = state["logit_scale"].reshape(())  # OpenAI stores it as a scalar
    path = tmp_path / "openai_format.pt"
    torch.save(state, path)
    loaded = load_backbone("tiny", "promptbench-tiny", str(path))
    assert_same_weights(loaded.model, state)
    assert loaded.fingerprint.startswith("promptbench-tiny|sha256:")


def test_open_clip_checkpoint_with_module_prefix_loads(tiny_backbone, tmp_path):
    state = perturbed_state(tiny_backbone)
    path = tmp_path / "epoch_1.pt"
    torch.save({"epoch": 1, "state_dict": {f"module.{k}": v for k, v in state.items()}}, path)
    assert_same_weights(load_backbone("tiny", "promptbench-tiny", str(path)).model, state)


def test_torchscript_archive_loads_identical_weights(tiny_backbone, tmp_path):
    state = perturbed_state(tiny_backbone)
    model = open_clip.create_model("promptbench-tiny")
    model.load_state_dict(state)
    traced = torch.jit.trace_module(model.eval(), {"encode_image": torch.randn(1, 3, 64, 64)}, check_trace=False)
    path = tmp_path / "tiny_jit.pt"
    traced.save(str(path))
    assert_same_weights(load_backbone("tiny", "promptbench-tiny", str(path)).model, state)


def test_checkpoint_for_another_architecture_is_refused(tmp_path):
    torch.save({"visual.proj": torch.zeros(3)}, tmp_path / "wrong.pt")
    with pytest.raises(PromptbenchError, match="does not match the model architecture"):
        load_backbone("tiny", "promptbench-tiny", str(tmp_path / "wrong.pt"))


def test_offline_failure_is_fast_and_says_how_to_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PromptbenchError) as caught:
        load_backbone("rn50", "RN50-quickgelu", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 20
    message = str(caught.value)
    assert "rn50" in message and "offline" in message and "backbone.pretrained=/path/to/" in message


def test_unreachable_hub_is_detected_without_retries(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://127.0.0.1:9")  # nothing listens there
    start = time.perf_counter()
    with pytest.raises(PromptbenchError, match="cannot be reached"):
        load_backbone("vit_b32", "ViT-B-32-quickgelu", "openai", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 20


def test_unknown_model_and_tag_are_explained():
    with pytest.raises(PromptbenchError, match="no model config 'NoSuchNet'"):
        load_backbone("x", "NoSuchNet", "openai")
    with pytest.raises(PromptbenchError, match="neither an existing file nor a known tag"):
        load_backbone("rn50", "RN50-quickgelu", "no-such-tag")


def test_hub_id_offline_fails_fast_with_the_fix(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(PromptbenchError, match="hf-hub:laion/not-cached.*offline"):
        load_backbone("laion", "ViT-B-32", "hf-hub:laion/not-cached", cache_dir=str(tmp_path))
    assert time.perf_counter() - start < 20
