"""CALIP (Guo et al., AAAI 2023, "Zero-Shot Enhancement of CLIP with Parameter-free Attention"): training-free.

The spatial image features S [L, D] (one per position of the last feature map, `Backbone.encode_image_spatial`) and
the class text features T [C, D] attend to each other without any parameter:

    A = attention_scale * S @ T.T                   [L, C]   (both sides L2-normalised; the reference's scale 2)
    T_a = softmax_L(A).T @ S                        [C, D]   text features guided by the image
    S_a = softmax_C(A) @ T                          [L, D]   spatial features aware of the text
    s_a = mean_L(S_a) + max_L(S_a)                  [D]
    logits = beta1 * scale g @ T.T + beta2 * scale g @ T_a.T + beta3 * scale s_a @ T.T

g: the L2-normalised global image feature; scale: the reference's fixed 100 (`logit_scale: null`: the backbone's
logit scale, so that betas (1, 0, 0) give zero-shot CLIP's logits exactly). T_a and s_a are not renormalised, as in
the reference (ZiyuGuo99/CALIP run_imagenet.py `get_logits`, which loops over images; this is the same formula
batched, with g @ T_a.T computed as (S @ g) weighted by softmax_L(A), which is equal up to float rounding).

beta1 stays at 1; beta2 and beta3 are chosen on the run's selection set (selection.py), over the reference's grid
(200 values from 0.001 up to, excluding, `beta2_max` / `beta3_max`; ties to the first pair in (beta2, beta3) order).
The reference searches them on the test images (ImageNet's val = test): `selection=test_parity` reproduces that and
is marked. With `selection=none` the fixed `beta2`/`beta3` hold. The inputs are images: the spatial maps are not
cached (49 x 1024 floats per RN50 image), the method runs the image tower itself.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, FeatureProvider
from promptbench.errors import PromptbenchError
from promptbench.methods.zeroshot import ZeroShotCLIP
from promptbench.selection import SELECTION_SET

log = logging.getLogger(__name__)
# Pairs of the beta grid scored at once: [pairs, N, C] logits stay below this many elements.
SEARCH_ELEMENTS = 1 << 25


def calip_components(global_features: torch.Tensor, spatial_features: torch.Tensor, text: torch.Tensor,
                     attention_scale: float, scale: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """The three logits [B, C] of CALIP's blend: zero-shot, global vs image-guided text, text-aware spatial vs text.

    global_features [B, D], spatial_features [B, L, D] (raw), text [C, D] L2-normalised.
    """
    image = F.normalize(global_features.float(), dim=-1)
    spatial = F.normalize(spatial_features.float(), dim=-1)
    text = text.to(image)
    attention = attention_scale * spatial @ text.T  # [B, L, C]
    over_positions, over_classes = attention.softmax(dim=1), attention.softmax(dim=2)
    zero_shot = scale * image @ text.T
    # g . (sum_l a_lc s_l) = sum_l a_lc (g . s_l): no [B, C, D] tensor of guided text features.
    text_guided = scale * torch.einsum("bl,blc->bc", (spatial @ image.unsqueeze(-1)).squeeze(-1), over_positions)
    aware = over_classes @ text  # [B, L, D]
    visual_guided = scale * (aware.mean(dim=1) + aware.amax(dim=1)) @ text.T
    return zero_shot, text_guided, visual_guided


def reference_grid(maximum: float, start: float, steps: int) -> torch.Tensor:
    """The reference's search values start + i * (maximum - start) / steps, i < steps."""
    return start + torch.arange(steps, dtype=torch.float64) * (maximum - start) / steps


@torch.no_grad()
def search_betas(components: Sequence[torch.Tensor], labels: torch.Tensor, beta1: float, beta2_grid: torch.Tensor,
                 beta3_grid: torch.Tensor) -> tuple[float, float, int]:
    """The (beta2, beta3) of the grids with the most correct top-1 predictions; ties go to the first pair in
    (beta2, beta3) order, as the reference keeps only strict improvements looping over beta2, then beta3."""
    zero_shot, text_guided, visual_guided = (component.float() for component in components)
    base = beta1 * zero_shot
    chunk = max(1, SEARCH_ELEMENTS // max(1, zero_shot.numel()))
    correct = torch.empty(len(beta2_grid), len(beta3_grid), dtype=torch.long)
    betas3 = beta3_grid.to(zero_shot)
    for row, beta2 in enumerate(beta2_grid.tolist()):
        partial = base + beta2 * text_guided
        for start in range(0, len(betas3), chunk):
            weights = betas3[start : start + chunk, None, None]
            predictions = (partial[None] + weights * visual_guided[None]).argmax(dim=-1)
            correct[row, start : start + chunk] = (predictions == labels[None]).sum(dim=-1).cpu()
    best = int(correct.flatten().argmax())
    row, column = divmod(best, len(beta3_grid))
    return float(beta2_grid[row]), float(beta3_grid[column]), int(correct[row, column])


class CALIP(ZeroShotCLIP):
    """Zero-shot CLIP (its template set and class text features) plus the two attention-guided logits."""

    name = "calip"
    selects = ("beta2", "beta3")

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        template_set: str | Sequence[str] | None,
        beta1: float,
        beta2: float,
        beta3: float,
        beta2_max: float,
        beta3_max: float,
        search_start: float,
        search_steps: int,
        attention_scale: float,
        logit_scale: float | None,
        **config: Any,
    ):
        super().__init__(backbone, classnames, templates, template_set, **config)
        for option, value in (("beta2_max", beta2_max), ("beta3_max", beta3_max)):
            if not float(value) > float(search_start):
                raise PromptbenchError(f"method.{option} must be > method.search_start ({search_start}): the grid runs "
                                       f"from search_start up to it; got {value}")
        if int(search_steps) < 1:
            raise PromptbenchError(f"method.search_steps must be >= 1, got {search_steps}")
        if logit_scale is not None and not float(logit_scale) > 0:
            raise PromptbenchError(f"method.logit_scale must be > 0 (or null: the backbone's), got {logit_scale}")
        self.beta2_grid = reference_grid(float(beta2_max), float(search_start), int(search_steps))
        self.beta3_grid = reference_grid(float(beta3_max), float(search_start), int(search_steps))
        self.attention_scale = float(attention_scale)
        self.logit_scale = None if logit_scale is None else float(logit_scale)
        # Saved (learned.safetensors), so an eval-only run with ckpt_path uses the selected weights.
        self.register_buffer("betas", torch.tensor([float(beta1), float(beta2), float(beta3)], dtype=torch.float64))
        self.notes: dict[str, Any] = {}

    def contract(self) -> DataContract:
        return DataContract(inputs="images", reads=self.selection_reads())

    def scale(self) -> torch.Tensor | float:
        return self.backbone.logit_scale if self.logit_scale is None else self.logit_scale

    def components(self, images: torch.Tensor) -> tuple[torch.Tensor, ...]:
        global_features, spatial_features = self.backbone.encode_image_spatial(images)
        return calip_components(global_features, spatial_features, self.classifier(), self.attention_scale,
                                self.scale())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        zero_shot, text_guided, visual_guided = self.components(images)
        beta1, beta2, beta3 = self.betas.float()
        return beta1 * zero_shot + beta2 * text_guided + beta3 * visual_guided

    def prepare(self, provider: FeatureProvider) -> None:
        if not self.selecting:
            return
        parts, labels = [], []
        with torch.no_grad():
            for images, batch_labels, _ in provider.images(SELECTION_SET):
                parts.append(self.components(images))
                labels.append(batch_labels)
        if not labels:
            raise PromptbenchError(
                f"method '{self.name}' chooses beta2/beta3 on the selection set, but selection={self.selection} has no "
                f"image here (selection=fewshot_val draws min(shots, 4) val images per class: shots=0 gives none). Use "
                f"selection=none for the fixed published betas, or shots >= 1")
        components = [torch.cat(column) for column in zip(*parts)]
        beta2, beta3, correct = search_betas(components, torch.cat(labels), float(self.betas[0]), self.beta2_grid,
                                             self.beta3_grid)
        self.betas[1], self.betas[2] = beta2, beta3
        total = sum(len(batch) for batch in labels)
        self.notes = {"search_top1": 100.0 * correct / total}
        log.debug("calip: beta2=%.4f beta3=%.4f (selection top-1 %.2f)", beta2, beta3, self.notes["search_top1"])

    def run_notes(self) -> dict[str, Any]:
        beta1, beta2, beta3 = self.betas.tolist()
        return {"beta1": beta1, "beta2": beta2, "beta3": beta3, **self.notes}
