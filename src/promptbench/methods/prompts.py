"""Hand-crafted prompts: template sets, class-name formatting, and the text classifier they make.

Shared by every method that encodes text (zero-shot, the adapters' classifiers, CoOp, CoCoOp), so all
of them tokenize and encode the same way.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

from promptbench.backbones import Backbone
from promptbench.errors import PromptbenchError

_CLIP80 = tuple(template("{}") for template in OPENAI_IMAGENET_TEMPLATES)
# Named ensembles: the 7 templates of Tip-Adapter / CoOp's ZeroshotCLIP2, the CLIP paper's 80, and PromptSRC's
# text teacher (trainers/imagenet_templates.py IMAGENET_TEMPLATES: the first 60 of the 80, with "a photo of
# a {}." (position 40) moved to the front).
TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "imagenet7": tuple(template("{}") for template in SIMPLE_IMAGENET_TEMPLATES),
    "clip80": _CLIP80,
    "promptsrc60": (_CLIP80[39], *_CLIP80[:39], *_CLIP80[40:60]),
}
DATASET_TEMPLATES = "dataset"
TEXT_BATCH = 1024


def resolve_templates(choice: str | Sequence[str] | None, dataset_templates: Sequence[str]) -> list[str]:
    """`dataset` (or None): the dataset's own template(s); a set name; or an explicit list of templates."""
    if choice is None or choice == DATASET_TEMPLATES:
        templates = list(dataset_templates)
    elif isinstance(choice, str):
        if choice in TEMPLATE_SETS:
            templates = list(TEMPLATE_SETS[choice])
        elif "{}" in choice:
            templates = [choice]
        else:
            raise PromptbenchError(
                f"unknown template set '{choice}': use 'dataset', one of {sorted(TEMPLATE_SETS)}, "
                f"a template containing '{{}}', or a list of templates"
            )
    else:
        templates = list(choice)
    bad = [t for t in templates if "{}" not in t]
    if not templates or bad:
        raise PromptbenchError(f"every template needs a '{{}}' placeholder for the class name; got {bad or templates}")
    return templates


def readable_classname(classname: str) -> str:
    return classname.replace("_", " ")


def fill(template: str, classname: str) -> str:
    return template.format(readable_classname(classname))


@torch.no_grad()
def encode_texts(backbone: Backbone, texts: Sequence[str], batch_size: int = TEXT_BATCH) -> torch.Tensor:
    device = backbone.model.token_embedding.weight.device
    chunks = []
    for start in range(0, len(texts), batch_size):
        tokens = backbone.tokenize(texts[start : start + batch_size]).to(device)
        chunks.append(backbone.encode_text(tokens).float())
    return torch.cat(chunks)


@torch.no_grad()
def text_classifier(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[n_classes, dim] unit vectors: per class, the mean of its normalised template features, renormalised."""
    features = F.normalize(prompt_features(backbone, classnames, templates), dim=-1).mean(dim=1)
    return F.normalize(features, dim=-1)


@torch.no_grad()
def prompt_features(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[n_classes, n_templates, dim]: the raw (not normalised) text feature of every class's every prompt."""
    prompts = [fill(template, name) for name in classnames for template in templates]
    return encode_texts(backbone, prompts).view(len(classnames), len(templates), -1)


@torch.no_grad()
def mean_text_embeddings(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """[n_classes, dim]: per class, the mean of its prompts' raw text features, never normalised (the base
    of TaskRes and CLAP: `_get_base_text_features` in geekyutao/TaskRes and jusiro/CLAP)."""
    return prompt_features(backbone, classnames, templates).mean(dim=1)
