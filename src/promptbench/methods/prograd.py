"""ProGrad (Zhu et al., "Prompt-aligned Gradient for Prompt Tuning", ICCV 2023): CoOp whose update keeps only
the part of the cross-entropy gradient that does not conflict with the zero-shot prompt's knowledge.

As the reference computes it (BeierZhu/Prompt-align: ProGrad.public/trainers/prograd.py ProGradLoss and
forward_backward; Dassl.ProGrad.pytorch/dassl/engine/trainer.py prograd_backward_and_update):
- the teacher is zero-shot CLIP with the dataset's hand-crafted prompt (its own CUSTOM_TEMPLATES);
- xe = CE(student logits, labels); kl = mean_batch sum_c -softmax(teacher/T)_c * log_softmax(student/T)_c * T^2
  (the cross-entropy form of KL(teacher || student): same gradient, the teacher's entropy is constant);
- per trainable parameter, with g = grad xe and g_kl = grad kl: when g . g_kl < 0 (they conflict) the update
  uses g - lambda * (g . g_kl) / ||g_kl||^2 * g_kl, otherwise g itself; then one optimiser step.
Evaluation is CoOp's, so the learned context transfers to new classes.

Two gradients per step need manual optimisation. Under DDP: the CE gradient comes from one `manual_backward`
(Lightning's backward: loss scaling of 16-mixed, DDP's all-reduce of .grad, the mean over ranks); the KL
gradient comes from `torch.autograd.grad`, which fills no .grad and so does not fire DDP's reducer hooks (a
second backward through one DDP forward would), and is all-reduced (mean over ranks) here by the strategy
before the projection. Both are then gradients of the global batch, as on one device. The projection is linear
in g and invariant to the scale of g_kl, so projecting the still loss-scaled .grad of 16-mixed is exact and
the optimiser step unscales it as usual. The LR schedule (the base's `configure_optimizers`) is stepped here as
Lightning's automatic loop would: per batch for `interval: step`, after the epoch's last batch for `epoch`
(before the epoch-end checkpoint, so a resumed run continues the same schedule).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F

from promptbench.backbones import Backbone
from promptbench.errors import PromptbenchError
from promptbench.methods.coop import CoOp
from promptbench.methods.prompt_learner import PromptLearner

# method.ctx_init: template = the words of the hand-crafted template before its "{}" (the reference's
# CTX_INIT True: CUSTOM_TEMPLATES[dataset].replace(" {}.", "")).
CTX_FROM_TEMPLATE = "template"


def prograd_losses(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor,
                   temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's ProGradLoss: (cross-entropy, T^2-scaled soft cross-entropy to the teacher)."""
    cross_entropy = F.cross_entropy(student, labels)
    teacher_prob = F.softmax(teacher / temperature, dim=-1)
    kl = -(teacher_prob * F.log_softmax(student / temperature, dim=-1)).sum(dim=1).mean() * temperature ** 2
    return cross_entropy, kl


def project_conflicting(ce_grad: torch.Tensor, kl_grad: torch.Tensor, lambda_: float) -> torch.Tensor:
    """g - lambda * (g . g_kl) / ||g_kl||^2 * g_kl where g . g_kl < 0, else g (one parameter's gradients).

    Without a host sync: the coefficient is 0 when they do not conflict (or when g_kl is 0, where the
    reference's normalised dot product is NaN and so not < 0)."""
    g, b = ce_grad.float().flatten(), kl_grad.float().flatten()
    dot = torch.dot(g, b)
    coefficient = lambda_ * dot.clamp(max=0) / torch.dot(b, b).clamp_min(torch.finfo(torch.float32).tiny)
    return (ce_grad.float() - coefficient * kl_grad.float()).to(ce_grad.dtype)


def template_phrase(template: str) -> str:
    """The words of a hand-crafted template before its "{}": "a photo of a {}." -> "a photo of a"."""
    phrase = template.split("{}")[0].strip()
    if not phrase:
        raise PromptbenchError(
            f"method.ctx_init=template: the hand-crafted template '{template}' has no words before its '{{}}' to "
            f"start the context from; set method.ctx_init to a phrase (e.g. 'a photo of a') or null (random)"
        )
    return phrase


class ProGrad(CoOp):
    name = "prograd"

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        *,
        n_ctx: int,
        ctx_init: str | None,
        template_set: str | Sequence[str],
        lambda_: float,
        temperature: float,
        **config: Any,
    ):
        if not float(temperature) > 0:
            raise PromptbenchError(f"method.temperature must be > 0, got {temperature}")
        if float(lambda_) < 0:
            raise PromptbenchError(f"method.lambda_ must be >= 0 (0: plain CoOp), got {lambda_}")
        super().__init__(backbone, classnames, templates, n_ctx=n_ctx, ctx_init=None, **config)
        self.lambda_ = float(lambda_)
        self.temperature = float(temperature)
        self.automatic_optimization = False
        self.keep_hand_crafted_features(template_set)
        if ctx_init:
            phrase = template_phrase(self.hand_crafted_templates()[0]) if ctx_init == CTX_FROM_TEMPLATE else ctx_init
            self._start_context_from(phrase)

    def _start_context_from(self, phrase: str) -> None:
        """The reference's initialisation: the phrase's token embeddings as the last context vectors, zeros
        before them (n_ctx stays; the reference asserts n_ctx >= the phrase's length)."""
        vectors = PromptLearner._phrase_vectors(self.backbone, phrase)
        ctx = self.prompt_learner.ctx
        if len(vectors) > ctx.shape[-2]:
            raise PromptbenchError(f"method.n_ctx={ctx.shape[-2]} is shorter than the {len(vectors)} tokens of the "
                                   f"initial phrase '{phrase}'; use n_ctx >= {len(vectors)}")
        with torch.no_grad():
            ctx.zero_()
            ctx[..., ctx.shape[-2] - len(vectors):, :] = vectors.to(ctx)

    def training_step(self, batch: Any, batch_idx: int) -> None:
        if batch is None:  # every image of the batch was unreadable and skipped
            return None
        inputs, labels, _ = batch
        image_features = self.image_features(inputs)
        logits = self.class_logits(image_features).float()
        with torch.no_grad():
            teacher = self.logits_against(image_features, self.hand_crafted_text).float()
        cross_entropy, kl = prograd_losses(logits, teacher, labels, self.temperature)
        self.stop_on_non_finite(kl)
        self.stop_on_non_finite(cross_entropy)

        optimizer = self.optimizers()
        optimizer.zero_grad()
        parameters = self.trainable_parameters()
        # 16-mixed: the KL gradient of the scaled loss, so it does not underflow (the projection ignores its scale)
        scaler = getattr(self.trainer.precision_plugin, "scaler", None)
        kl_grads = torch.autograd.grad(kl if scaler is None else scaler.scale(kl), parameters, retain_graph=True,
                                       allow_unused=True)
        self.manual_backward(cross_entropy)
        conflicts = []
        for parameter, kl_grad in zip(parameters, kl_grads):
            if parameter.grad is None or kl_grad is None:
                continue
            kl_grad = self.trainer.strategy.reduce(kl_grad, reduce_op="mean")
            conflicts.append((torch.dot(parameter.grad.float().flatten(), kl_grad.float().flatten()) < 0).float())
            parameter.grad = project_conflicting(parameter.grad, kl_grad, self.lambda_)
        optimizer.step()
        terms = {"kl_loss": kl}
        if conflicts:
            terms["conflict"] = torch.stack(conflicts).mean()
        self.log_training(cross_entropy, logits, labels, **terms)
        return None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Step the LR schedule where automatic optimisation would (skipped batches included)."""
        config = self.trainer.lr_scheduler_configs[0]
        if config.interval == "step" or batch_idx + 1 == self.trainer.num_training_batches:
            config.scheduler.step()
