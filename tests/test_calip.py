"""CALIP: the backbone's spatial features, the parameter-free attention against the reference formula, the blend
weights (1, 0, 0) as zero-shot CLIP, and the search of beta2/beta3 on the selection set."""

from __future__ import annotations

import copy
import math
import random

import pytest
import torch
import torch.nn.functional as F

from promptbench.data.datamodule import FewShotDataModule
from promptbench.data.datasets import FolderDataset
from promptbench.data.features import FeatureStore
from promptbench.errors import PromptbenchError
from promptbench.methods.calip import reference_grid, search_betas
from promptbench.methods.prompts import text_classifier
from promptbench.protocols import FewShot
from conftest import build_method, find_results, run_py

CLASSES = ["red", "green", "blue"]
TEMPLATES = ["a photo of a {}."]


@pytest.fixture(scope="module")
def mini_backbone():
    from promptbench.backbones import load_backbone

    return load_backbone("mini", "promptbench-mini", "bundled")


@pytest.fixture(params=["tiny", "mini"])
def backbone(request, tiny_backbone, mini_backbone):
    """A ViT tower (tiny) and a ResNet tower (the bundled mini)."""
    return {"tiny": tiny_backbone, "mini": mini_backbone}[request.param]


def images(count=4, seed=0):
    return torch.randn(count, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# ---- the backbone's spatial features ---------------------------------------------------------------------
@torch.no_grad()
def test_the_global_feature_is_encode_images_output_to_the_bit(backbone):
    batch = images()
    global_features, spatial = backbone.encode_image_spatial(batch)
    assert torch.equal(global_features, backbone.model.encode_image(batch))
    assert spatial.shape[0] == 4 and spatial.shape[-1] == backbone.embed_dim


@torch.no_grad()
def test_resnet_spatial_features_are_the_attention_pool_output_of_every_query(mini_backbone):
    """Multi-head attention written out by hand over the last feature map: each position as a query."""
    visual, batch = mini_backbone.model.visual, images()
    feature_map = visual.layer4(visual.layer3(visual.layer2(visual.layer1(visual.stem(batch)))))
    pool = visual.attnpool
    tokens = feature_map.flatten(2).transpose(1, 2)  # [B, HW, C]
    tokens = torch.cat([tokens.mean(dim=1, keepdim=True), tokens], dim=1) + pool.positional_embedding
    heads, width = pool.num_heads, tokens.shape[-1]

    def split(x):  # [B, T, C] -> [B, heads, T, C / heads]
        return x.view(x.shape[0], x.shape[1], heads, width // heads).transpose(1, 2)

    q, k, v = split(pool.q_proj(tokens)), split(pool.k_proj(tokens)), split(pool.v_proj(tokens))
    weights = (q @ k.transpose(-1, -2) / math.sqrt(width // heads)).softmax(dim=-1)
    attended = pool.c_proj((weights @ v).transpose(1, 2).reshape(tokens.shape))
    global_features, spatial = mini_backbone.encode_image_spatial(batch)
    torch.testing.assert_close(spatial, attended[:, 1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(global_features, attended[:, 0], rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_vit_spatial_features_are_the_projected_patch_tokens(tiny_backbone):
    """open_clip's own token output (after ln_post), projected like the class token."""
    visual, batch = copy.deepcopy(tiny_backbone.model.visual), images()
    visual.output_tokens = True
    pooled, tokens = visual(batch)
    global_features, spatial = tiny_backbone.encode_image_spatial(batch)
    assert torch.equal(global_features, pooled)
    torch.testing.assert_close(spatial, tokens @ visual.proj)
    assert spatial.shape[1] == (64 // 16) ** 2


def test_a_tower_without_class_token_pooling_is_refused(tiny_backbone):
    averaging = copy.deepcopy(tiny_backbone)
    averaging.model.visual.pool_type = "avg"
    with pytest.raises(PromptbenchError, match="spatial image features need .* pooling with 'avg'"):
        averaging.encode_image_spatial(images())


# ---- the method -----------------------------------------------------------------------------------------
def reference_logits(global_features, spatial, text, betas, scale=100.0):
    """ZiyuGuo99/CALIP run_imagenet.py's get_logits and blend, image by image (features normalised beforehand)."""
    out = []
    for image, positions in zip(F.normalize(global_features, dim=-1), F.normalize(spatial, dim=-1)):
        feat_v, feat_t = positions.T, text.T  # [D, L], [D, C]
        weight = feat_v.T @ feat_t * 2
        text_guided = feat_v @ F.softmax(weight, dim=0)  # [D, C]
        aware = F.softmax(weight, dim=1) @ feat_t.T  # [L, D]
        aware = aware.mean(0) + aware.max(0)[0]
        zero_shot = scale * image @ feat_t
        out.append(betas[0] * zero_shot + betas[1] * (scale * image @ text_guided) + betas[2] * (scale * aware @ feat_t))
    return torch.stack(out)


@torch.no_grad()
def test_calip_equals_the_reference_formula(backbone):
    method = build_method("calip", backbone, CLASSES, TEMPLATES, selection="none", beta2=1.3, beta3=0.07)
    batch = images()
    global_features, spatial = backbone.encode_image_spatial(batch)
    expected = reference_logits(global_features, spatial, text_classifier(backbone, CLASSES, TEMPLATES), (1.0, 1.3, 0.07))
    torch.testing.assert_close(method(batch), expected, rtol=1e-5, atol=1e-4)


@torch.no_grad()
def test_blend_weights_1_0_0_give_zero_shot_clip_exactly(backbone):
    batch = images()
    zero_shot = build_method("zeroshot", backbone, CLASSES, TEMPLATES)(backbone.encode_image(batch))
    calip = build_method("calip", backbone, CLASSES, TEMPLATES, selection="none", beta2=0.0, beta3=0.0,
                         logit_scale=None)
    assert torch.equal(calip(batch), zero_shot)
    # the reference's fixed scale 100 only rescales them
    fixed = build_method("calip", backbone, CLASSES, TEMPLATES, selection="none", beta2=0.0, beta3=0.0)
    torch.testing.assert_close(fixed(batch), zero_shot * 100 / backbone.logit_scale)


def test_search_takes_the_references_first_best_pair():
    generator = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 5, (40,), generator=generator)
    components = [torch.randn(40, 5, generator=generator) * scale for scale in (1.0, 3.0, 20.0)]
    beta2_grid, beta3_grid = reference_grid(2.0, 0.001, 12), reference_grid(0.1, 0.001, 12)
    assert beta2_grid[1].item() == pytest.approx(0.001 + (2.0 - 0.001) / 12) and beta2_grid[-1] < 2.0
    best, expected = 0, (0.0, 0.0)
    for beta2 in beta2_grid.tolist():  # the reference's loops: strict improvements only
        for beta3 in beta3_grid.tolist():
            logits = components[0] + beta2 * components[1] + beta3 * components[2]
            correct = int((logits.argmax(-1) == labels).sum())
            if correct > best:
                best, expected = correct, (beta2, beta3)
    beta2, beta3, correct = search_betas(components, labels, 1.0, beta2_grid, beta3_grid)
    assert (beta2, beta3, correct) == (pytest.approx(expected[0]), pytest.approx(expected[1]), best)


def test_betas_are_chosen_on_the_selection_set_and_fixed_without_one(tiny_backbone, toy_root, tmp_path):
    random.seed(1)
    task = FewShot().build(FolderDataset(toy_root), 2)
    method = build_method("calip", tiny_backbone, task.train.classnames, task.train.templates, search_steps=8)
    assert method.contract().inputs == "images" and method.contract().reads == ("selection",)
    task.select_with(method.selection)
    datamodule = FewShotDataModule(task.sets(), task.source, tiny_backbone, method.contract(),
                                   device=torch.device("cpu"), feature_store=FeatureStore(tmp_path), seed=1)
    method.prepare(datamodule.provider)
    notes = method.run_notes()
    assert notes["beta1"] == 1.0 and 0 <= notes["search_top1"] <= 100
    assert any(notes["beta2"] == pytest.approx(value) for value in method.beta2_grid.tolist())
    assert any(notes["beta3"] == pytest.approx(value) for value in method.beta3_grid.tolist())
    fixed = build_method("calip", tiny_backbone, task.train.classnames, task.train.templates, selection="none")
    assert fixed.contract().reads == () and not fixed.selecting
    fixed.prepare(datamodule.provider)  # reads nothing
    assert fixed.run_notes() == {"beta1": 1.0, "beta2": 2.0, "beta3": pytest.approx(0.1)}


def test_an_empty_selection_set_is_refused_with_what_to_do(tiny_backbone):
    method = build_method("calip", tiny_backbone, CLASSES, TEMPLATES)
    empty = type("Provider", (), {"images": staticmethod(lambda split: iter(()))})
    with pytest.raises(PromptbenchError, match="selection=none"):
        method.prepare(empty)


def test_calip_with_zero_attention_weights_reports_zero_shots_numbers(toy_root, run_env, tmp_path):
    common = ["backbone=tiny", "dataset=folder", f"dataset.root={toy_root}", "logger=none", "num_workers=0"]
    assert run_py(["method=zeroshot", *common], run_env).returncode == 0
    result = run_py(["method=calip", "selection=none", "method.beta2=0", "method.beta3=0", "method.logit_scale=null",
                     *common], run_env)
    assert result.returncode == 0, result.stderr[-3000:]
    runs = {r["method"]: r for r in find_results(tmp_path / "outputs")}
    assert runs["calip"]["metrics"] == runs["zeroshot"]["metrics"]
    assert runs["calip"]["shots"] == 0 and runs["calip"]["method_notes"] == {"beta1": 1.0, "beta2": 0.0, "beta3": 0.0}
