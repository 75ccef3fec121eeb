"""Pseudo-labels from zero-shot CLIP for the unsupervised protocol: UPL's top-K most confident images per class.

UPL (Huang et al., "Unsupervised Prompt Learning for Vision-Language Models", 2022; tonyhuang2022/UPL) labels
the train split without reading its labels: zero-shot CLIP with the dataset's hand-crafted prompt predicts
every train image (test transform, `UPLTrainer.zero_shot_analyze`); each image goes to its most probable
class, and per class the K images with the highest softmax probability are kept
(`select_top_k_similarity_per_class`), so a class predicted for fewer than K images keeps fewer. UPL* first
averages the softmax probabilities of several CLIP models (`load_from_exist_file`): `extra_backbones` here.

The zero-shot logits are method=zeroshot's (`ZeroShotCLIP`), so the pseudo-labels are exactly its predictions.
The labeller sees an `UnlabeledSet` (paths, no labels) and never reads a train label.
"""

from __future__ import annotations

import logging
from typing import Any, Mapping, Sequence

import torch

from promptbench.backbones import Backbone, load_backbone
from promptbench.data.features import FrozenFeatures
from promptbench.data.items import Item, LabeledSet, UnlabeledSet, class_counts
from promptbench.errors import PromptbenchError
from promptbench.methods.zeroshot import ZeroShotCLIP
from promptbench.protocols import TrainLabeller

log = logging.getLogger(__name__)
# The feature-cache name of the unlabelled train pool (its features are shared by every run on the dataset).
POOL_SET = "train_pool"
ALL_IMAGES = -1


@torch.no_grad()
def zero_shot_probabilities(backbone: Backbone, classnames: Sequence[str], templates: Sequence[str],
                            template_set: str | Sequence[str], features: torch.Tensor) -> tuple[torch.Tensor, list[str]]:
    """Softmax of method=zeroshot's logits [N, n_cls] for raw image features, and the templates it used."""
    zeroshot = ZeroShotCLIP(backbone, classnames, templates, template_set=template_set)
    logits = zeroshot(features.to(backbone.model.logit_scale.device))
    return logits.float().softmax(dim=-1).cpu(), zeroshot.templates


def top_k_per_class(probabilities: torch.Tensor, per_class: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows kept, in row order, and their pseudo-labels: every row goes to its most probable class, and each
    class keeps its `per_class` rows of highest probability (all of them with -1; ties: the earlier row)."""
    confidence, predicted = probabilities.max(dim=1)
    by_confidence = torch.sort(confidence, descending=True, stable=True).indices
    # grouped by predicted class, most confident first within each class
    order = by_confidence[torch.sort(predicted[by_confidence], stable=True).indices]
    counts = torch.bincount(predicted, minlength=probabilities.shape[1])
    group_start = torch.cumsum(counts, dim=0) - counts
    rank = torch.arange(len(order)) - group_start[predicted[order]]
    kept = order if per_class == ALL_IMAGES else order[rank < per_class]
    rows = torch.sort(kept).values
    return rows, predicted[rows]


class ZeroShotTopK(TrainLabeller):
    """UPL's pseudo-labelling: zero-shot CLIP's `per_class` most confident images per predicted class.

    `template_set`: the zero-shot prompts, as method=zeroshot's option (UPL: `dataset`, the dataset's
    hand-crafted prompt). `extra_backbones`: UPL*'s further CLIP models, `{name, model_name, pretrained}` as in
    conf/backbone/; their softmax probabilities are averaged with the run backbone's.
    """

    def __init__(self, per_class: int, template_set: str | Sequence[str],
                 extra_backbones: Sequence[Mapping[str, Any]] = ()):
        if not isinstance(per_class, int) or isinstance(per_class, bool) or per_class < ALL_IMAGES:
            raise PromptbenchError(f"protocol.labeller.per_class={per_class!r}: expected the images kept per class "
                                   f"(>= 0), or -1 for every image under its predicted class")
        self.per_class = per_class
        self.template_set = template_set if isinstance(template_set, str) else list(template_set)
        self.extra_backbones = [dict(spec) for spec in extra_backbones]

    def backbones(self, backbone: Backbone) -> list[Backbone]:
        extras = []
        for spec in self.extra_backbones:
            try:
                extras.append(load_backbone(**spec))
            except TypeError as error:
                raise PromptbenchError(
                    f"protocol.labeller.extra_backbones: {spec} is not a backbone description ({error}); give "
                    f"{{name: <name>, model_name: <open_clip config>, pretrained: <tag or file>}} as in conf/backbone/"
                ) from None
        return [backbone, *extras]

    def label(self, pool: UnlabeledSet, backbone: Backbone, images: FrozenFeatures) -> tuple[LabeledSet, dict[str, Any]]:
        items = pool.image_items()
        models = self.backbones(backbone)
        read, summed, templates = None, None, []
        for model in models:
            features = images.features(model, POOL_SET, items)
            if read is None:
                read = features.index
            elif not torch.equal(read, features.index):
                raise PromptbenchError(f"pseudo-labels: backbone '{model.name}' could read other train images than "
                                       f"'{backbone.name}' (files changed during the run?); run it again")
            probabilities, templates = zero_shot_probabilities(model, pool.classnames, pool.templates,
                                                               self.template_set, features.features)
            summed = probabilities if summed is None else summed + probabilities
        rows, labels = top_k_per_class(summed / len(models), self.per_class)
        kept = [pool.items[int(read[row])].path for row in rows.tolist()]
        train = LabeledSet([Item(path, label, pool.classnames[label]) for path, label in zip(kept, labels.tolist())],
                           pool.classnames, pool.templates)
        per_class = class_counts(train)
        short = {name: count for name, count in per_class.items() if count < self.per_class}
        log.info("pseudo-labels: %d of %d unlabelled train images (%s per class; %d of %d classes have fewer)",
                 len(train), len(pool), "all" if self.per_class == ALL_IMAGES else self.per_class, len(short),
                 len(per_class))
        return train, {
            "labeller": "zero_shot_top_k",
            "per_class": self.per_class,
            "template_set": self.template_set,
            "templates": templates,
            "backbones": [{"name": model.name, "fingerprint": model.fingerprint} for model in models],
            "pool_images": len(pool),
            "pool_images_read": len(read),
            "images": len(train),
            "images_per_class": per_class,
            "classes_with_fewer": short,
        }
