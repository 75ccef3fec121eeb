"""Zero-shot CLIP: prompt formatting, template ensembles, the classifier cache and class re-targeting."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from promptbench.errors import PromptbenchError
from promptbench.methods.prompts import TEMPLATE_SETS, resolve_templates, text_classifier
from conftest import build_method


def test_template_sets_have_the_published_sizes():
    assert len(TEMPLATE_SETS["imagenet7"]) == 7 and len(TEMPLATE_SETS["clip80"]) == 80
    assert "itap of a {}." in TEMPLATE_SETS["imagenet7"]


def test_resolve_templates_choices():
    assert resolve_templates("dataset", ["{} texture."]) == ["{} texture."]
    assert resolve_templates("a sketch of a {}.", ["x {}"]) == ["a sketch of a {}."]
    with pytest.raises(PromptbenchError, match="unknown template set"):
        resolve_templates("imagenet8", ["{}"])
    with pytest.raises(PromptbenchError, match="placeholder"):
        resolve_templates(["no placeholder"], ["{}"])


def test_ensemble_is_the_renormalised_mean_of_normalised_template_features(tiny_backbone):
    templates = ["a photo of a {}.", "art of the {}.", "{} texture."]
    classnames = ["golden_retriever", "cat"]
    expected = []
    for name in classnames:
        tokens = tiny_backbone.tokenize([t.format(name.replace("_", " ")) for t in templates])
        features = F.normalize(tiny_backbone.model.encode_text(tokens), dim=-1)
        expected.append(F.normalize(features.mean(0), dim=-1))
    torch.testing.assert_close(text_classifier(tiny_backbone, classnames, templates), torch.stack(expected),
                               rtol=1e-4, atol=1e-5)


def test_zeroshot_logits_and_retargeting(tiny_backbone):
    method = build_method("zeroshot", tiny_backbone, ["dog", "cat"], ["a photo of a {}."])
    features = torch.randn(4, tiny_backbone.embed_dim)
    logits = method(features)
    classifier = text_classifier(tiny_backbone, ["dog", "cat"], ["a photo of a {}."])
    expected = tiny_backbone.logit_scale * F.normalize(features, dim=-1) @ classifier.T
    torch.testing.assert_close(logits, expected)
    method.set_classes(["dog", "cat", "bird"], ["a photo of a {}."])
    assert method(features).shape == (4, 3)


def test_ensemble_option_overrides_dataset_template(tiny_backbone):
    method = build_method("zeroshot", tiny_backbone, ["dog"], ["a photo of a {}."], template_set="imagenet7")
    assert method.templates == list(TEMPLATE_SETS["imagenet7"])
    method.set_classes(["dog", "cat"], ["{} texture."])
    assert method.templates == list(TEMPLATE_SETS["imagenet7"])


def test_unknown_option_is_refused(tiny_backbone):
    with pytest.raises(PromptbenchError, match="does not take option"):
        build_method("zeroshot", tiny_backbone, ["dog"], ["a photo of a {}."], n_ctx=4)
