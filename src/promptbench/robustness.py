"""Adversarial evaluation of any method (`eval.attack=pgd`): PGD on every test image against the method's own logits.

The setup of TeCoA (Mao et al., ICLR 2023, "Understanding Zero-Shot Adversarial Robustness for Large-Scale Models";
cvlab-columbia/ZSRobust4FoundationModel, attacks.py `attack_pgd` and the `validate` of finetuning.py and
visual_prompt.py), defaults and sources in experiments/method_defaults.md:

- the attack perturbs [0, 1] pixels of the test crop (the test transform before its `Normalize`); the attacked
  function normalises inside (`Backbone.normalize`), so the budget is in pixel units and gradients cross the
  normalisation;
- white box: the cross-entropy of the method's logits (over the classes the eval set is scored on) is
  differentiated through everything the method computes, frozen towers and learned parts alike. A method that
  consumes cached features is attacked as what those features are: the image tower, then the method's head;
- L-inf PGD (or L2): a random start drawn in the ball (seeded by the run's seed), then `steps` steps of
  `step_size` along the gradient's sign (L2: the gradient scaled to unit norm), each projected back onto the ball
  and into [0, 1]; the last iterate is the adversarial image, as in the reference (no best-iterate tracking);
- `robust_top1`: with `worst_case` (the default) an image counts as robust only if its clean and its attacked
  versions are both classified correctly (the clean image lies inside the ball too), so robust top-1 never exceeds
  clean top-1; `worst_case: false` is the reference's count, top-1 on the attacked images alone.

A method that is not differentiable cannot be attacked; every promptbench method computes its logits in torch
(the linear probe holds sklearn's fitted coefficients as a float64 linear layer, equal to sklearn's decision
function), so every method can.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from typing import Any, Callable, Mapping

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from promptbench.errors import PromptbenchError

ATTACKS = ("pgd",)
NORMS = ("linf", "l2")
# Budgets are given in 1/255 of the [0, 1] pixel range, the unit of TeCoA's --test_eps and --test_stepsize.
PIXEL_LEVEL = 1 / 255
# The reference's guard against a zero gradient norm in the L2 step.
L2_GRADIENT_FLOOR = 1e-10

Score = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True)
class PGD:
    """Projected gradient descent in pixel space; `epsilon` and `step_size` in pixel units ([0, 1] range)."""

    epsilon: float
    steps: int
    step_size: float
    norm: str
    random_start: bool
    worst_case: bool
    seed: int

    @classmethod
    def from_config(cls, node: Mapping[str, Any] | None, seed: int) -> "PGD | None":
        """The run's attack from its `eval` block (budgets in 1/255), or None when `eval.attack` is null."""
        node = dict(node or {})
        attack = node.get("attack")
        if attack is None:
            return None
        if attack not in ATTACKS:
            raise PromptbenchError(f"eval.attack={attack!r}: expected one of {', '.join(ATTACKS)}, or null (no attack)")
        for key in ("epsilon", "step_size"):
            value = node.get(key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
                raise PromptbenchError(f"eval.{key}={value!r}: expected a number >= 0, in 1/255 of the pixel range "
                                       f"(TeCoA: 1)")
        steps = node.get("steps")
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise PromptbenchError(f"eval.steps={steps!r}: expected an integer >= 0 (TeCoA: 5 at evaluation)")
        if node.get("norm") not in NORMS:
            raise PromptbenchError(f"eval.norm={node.get('norm')!r}: expected one of {', '.join(NORMS)}")
        for key in ("random_start", "worst_case"):
            if not isinstance(node.get(key), bool):
                raise PromptbenchError(f"eval.{key}={node.get(key)!r}: expected true or false")
        return cls(epsilon=float(node["epsilon"]) * PIXEL_LEVEL, steps=steps,
                   step_size=float(node["step_size"]) * PIXEL_LEVEL, norm=node["norm"],
                   random_start=node["random_start"], worst_case=node["worst_case"], seed=int(seed))

    def record(self) -> dict[str, Any]:
        """results.json's `robustness`: the attack as run, budgets in pixel units and in 1/255."""
        return {"attack": "pgd", **asdict(self), "epsilon_255": self.epsilon / PIXEL_LEVEL,
                "step_size_255": self.step_size / PIXEL_LEVEL,
                "space": "[0, 1] pixels of the test crop, normalised inside the attacked function"}

    # ---- the attack -----------------------------------------------------------------------------------
    def start(self, pixels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The first perturbation: drawn in the ball (the reference's), or zero; kept inside [0, 1]."""
        delta = torch.zeros(pixels.shape)
        if self.random_start and self.norm == "linf":
            delta.uniform_(-self.epsilon, self.epsilon, generator=generator)
        elif self.random_start:
            delta.normal_(generator=generator)
            radius = torch.empty(len(delta), 1, 1, 1).uniform_(0, 1, generator=generator)
            delta *= radius / delta.flatten(1).norm(dim=1).view(-1, 1, 1, 1) * self.epsilon
        return self.into_pixel_range(delta.to(pixels), pixels)

    def step(self, delta: torch.Tensor, gradient: torch.Tensor) -> torch.Tensor:
        """One ascent step, projected back onto the ball."""
        if self.norm == "linf":
            return torch.clamp(delta + self.step_size * gradient.sign(), -self.epsilon, self.epsilon)
        norm = gradient.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        moved = delta + self.step_size * gradient / (norm + L2_GRADIENT_FLOOR)
        return moved.flatten(1).renorm(p=2, dim=0, maxnorm=self.epsilon).view_as(delta)

    @staticmethod
    def into_pixel_range(delta: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
        return torch.max(torch.min(delta, 1 - pixels), -pixels)

    def perturb(self, loss: Callable[[torch.Tensor], torch.Tensor], pixels: torch.Tensor,
                generator: torch.Generator) -> torch.Tensor:
        """The adversarial images: the last PGD iterate maximising `loss` (of a batch of pixels) around `pixels`."""
        delta = self.start(pixels, generator)
        for _ in range(self.steps):
            delta.requires_grad_(True)
            (gradient,) = torch.autograd.grad(loss(pixels + delta), delta)
            delta = self.into_pixel_range(self.step(delta.detach(), gradient), pixels)
        return (pixels + delta).detach()


def logits_of_pixels(method: Any) -> Callable[[torch.Tensor], torch.Tensor]:
    """The method's logits as a differentiable function of [0, 1] pixels: normalised, then the method itself (it runs
    the image tower: `inputs="images"`) or the frozen image tower and the method on its features (`"features"`, the
    features its cache would hold)."""
    backbone = method.backbone
    on_images = method.contract().inputs == "images"

    def logits(pixels: torch.Tensor) -> torch.Tensor:
        images = backbone.normalize(pixels)
        return method(images if on_images else backbone.encode_image(images).float()).float()

    return logits


def robust_top1(attack: PGD, method: Any, loader: DataLoader, clean: Mapping[str, torch.Tensor], score: Score, *,
                device: torch.device, forward_context: Callable[[], AbstractContextManager]) -> float:
    """Robust top-1 (percent) of one eval set: every image of `loader` (pixels, labels, item indices) attacked.

    `clean`: the set's clean evaluation (logits, labels, index) for the worst-case count; `score`: restricts logits
    and labels to the classes the set is scored on (the protocol's `scored_outputs`); `forward_context`: the run's
    precision context (Lightning's `precision_plugin.forward_context`).
    """
    clean_logits, clean_labels = score(clean["logits"], clean["labels"])
    clean_correct = dict(zip(clean["index"].tolist(), (clean_logits.argmax(dim=-1) == clean_labels).tolist()))
    logits_of = logits_of_pixels(method)
    generator = torch.Generator().manual_seed(attack.seed)
    method.eval()
    method.on_predict_start()  # what a method prepares once per evaluation (e.g. CoOp's prompt features)
    robust, count = 0, 0
    try:
        for batch in loader:
            if batch is None:  # every image of the batch was unreadable and skipped, as in the clean evaluation
                continue
            pixels, labels, index = batch
            pixels = pixels.to(device)

            def scored(adversarial: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                logits, targets = score(logits_of(adversarial), labels)  # labels stay on the CPU, as in `clean`
                return logits, targets.to(logits.device)

            with torch.enable_grad(), forward_context():
                adversarial = attack.perturb(lambda attacked: F.cross_entropy(*scored(attacked)), pixels, generator)
            with torch.no_grad(), forward_context():
                logits, targets = scored(adversarial)
            correct = (logits.argmax(dim=-1) == targets).cpu()
            if attack.worst_case:
                correct &= torch.tensor([clean_correct[i] for i in index.tolist()], dtype=torch.bool)
            robust += int(correct.sum())
            count += len(correct)
    finally:
        method.on_predict_end()
    if count != len(clean_correct):
        raise PromptbenchError(f"the attacked evaluation read {count} images, the clean one {len(clean_correct)}: the "
                               f"image files changed during the run; rerun it")
    # float32, as torchmetrics' micro accuracy computes top1: equal counts give equal numbers
    return (torch.tensor(robust, dtype=torch.float32) / count).item() * 100
