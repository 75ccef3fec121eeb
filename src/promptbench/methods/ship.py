"""SHIP (Wang et al., "Improving Zero-Shot Generalization for CLIP with Synthesized Prompts", ICCV 2023): synthesized
features for the classes that have a name but no image, so that a few-shot method also learns them.

A VAE whose decoder is CLIP's frozen text encoder, trained on the labelled classes' image features x:

    encoder   x -> Linear(d, h_e) -> ReLU -> (mean, log_var), each Linear(h_e, latent)
    z         mean + exp(log_var / 2) * eps,  eps ~ N(0, I)
    generator z -> Linear(latent, h_g) -> LeakyReLU(slope) -> Linear(h_g, ctx_dim) = bias (slope 0: ReLU)
    prompt    [SOS][p_1 + bias] ... [p_M + bias][class-name tokens][.][EOS]   (p: M learned global vectors)
    x_hat     normalize(text_encoder(prompt))
    loss      sum_d (x_hat - x)^2 + kl_weight * KL(N(mean, exp(log_var)) || N(0, I)), each averaged over the batch

(x L2-normalised; linear layers N(0, 0.02) with zero bias; p N(0, 0.02); one AdamW over encoder, generator and
p.) A feature of a label-only class c is then normalize(text_encoder(prompt(c, generator(z)))) with z ~ N(0, I).

SHIP is a plug-in, not a classifier: `Ship` is a mixin placed before a method that trains (or caches) on frozen
features, and `ship_<method>` is that method with it (`ShipCoOp` = Ship + CoOp, built from conf/method/coop.yaml
plus SHIP's options, conf/ship/default.yaml). The mixin trains the generator in `prepare` on the train set's cached
augmented views, then hands the method
- every training batch with as many synthesized features as real ones (`per_batch` of them per real feature,
  labels uniform over the label-only classes, fresh each step: the reference's loop), and
- in `prepare`, a train set that also holds `per_class` synthesized features of each label-only class (Tip-Adapter
  builds its cache keys from it).
Which classes are label-only is the protocol's fact (protocol=generalized_zero_shot), read from the provider. The
generator is a means, not a result: it is neither saved nor checkpointed (a resumed run retrains it identically,
it is seeded), so learned.safetensors holds the method's own parameters.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, FeatureProvider, FeatureSet, FeatureViews, Views
from promptbench.errors import PromptbenchError
from promptbench.methods.base import Method
from promptbench.methods.clip_adapter import CLIPAdapter
from promptbench.methods.coop import CoOp
from promptbench.methods.prompt_learner import PromptLearner
from promptbench.methods.tip_adapter import TipAdapter, TipAdapterF

log = logging.getLogger(__name__)
GENERATOR_PREFIX = "ship_generator."
# The reference initialises every linear layer (and the global prompt) from N(0, 0.02), biases at 0.
INIT_STD = 0.02
# Synthesized items have no image: their item index says so.
NO_IMAGE = -1


@dataclass(frozen=True)
class ShipOptions:
    """`method.ship` (conf/ship/default.yaml); see there and experiments/method_defaults.md for each value's source."""

    latent_dim: int | None
    encoder_hidden: int
    generator_hidden: int
    negative_slope: float
    n_ctx: int
    kl_weight: float
    lr: float
    weight_decay: float
    epochs: int
    batch_size: int
    views: Views
    per_batch: float
    per_class: int
    seed: int

    @classmethod
    def from_config(cls, options: Mapping[str, Any]) -> "ShipOptions":
        names = {field.name for field in dataclasses.fields(cls)}
        given = dict(options)
        unknown, missing = sorted(set(given) - names), sorted(names - set(given))
        if unknown or missing:
            raise PromptbenchError(f"method.ship: unknown option(s) {unknown}, missing {missing}; the options are in "
                                   f"conf/ship/default.yaml")
        for field in dataclasses.fields(cls):
            value, wanted = given[field.name], field.type
            if wanted == "Views":
                continue
            integer = isinstance(value, int) and not isinstance(value, bool)
            if "int" in wanted:
                fits = integer or (value is None and "None" in wanted)
            else:
                fits = integer or isinstance(value, float)
            if not fits:
                raise PromptbenchError(f"method.ship.{field.name}={value!r} has the wrong type: expected {wanted}")
        parsed = cls(**{**given, "views": Views.from_config(given["views"])})
        parsed.check()
        return parsed

    def check(self) -> None:
        positive = ("encoder_hidden", "generator_hidden", "n_ctx", "epochs", "batch_size", "lr")
        for name in positive:
            if not getattr(self, name) > 0:
                raise PromptbenchError(f"method.ship.{name} must be > 0, got {getattr(self, name)}")
        if self.latent_dim is not None and not self.latent_dim > 0:
            raise PromptbenchError(f"method.ship.latent_dim must be > 0 (or null: the image feature's width), got "
                                   f"{self.latent_dim}")
        for name in ("kl_weight", "weight_decay", "per_batch", "negative_slope"):
            if getattr(self, name) < 0:
                raise PromptbenchError(f"method.ship.{name} must be >= 0, got {getattr(self, name)}")
        if self.per_class < 0:
            raise PromptbenchError(f"method.ship.per_class must be >= 0 (synthesized features per label-only class in "
                                   f"the train set; its default is the run's shots), got {self.per_class}")


def init_linear(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.normal_(module.weight, std=INIT_STD)
        nn.init.zeros_(module.bias)


class PromptVAE(nn.Module):
    """SHIP's generator (module docstring): the encoder, the generator of a prompt bias, and the global prompt with
    the class names' token embeddings. The frozen backbone is passed to each call, never stored."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], options: ShipOptions):
        super().__init__()
        latent = options.latent_dim or backbone.embed_dim
        self.latent_dim = latent
        self.encoder = nn.Sequential(nn.Linear(backbone.embed_dim, options.encoder_hidden), nn.ReLU())
        self.mean = nn.Linear(options.encoder_hidden, latent)
        self.log_var = nn.Linear(options.encoder_hidden, latent)
        self.generator = nn.Sequential(
            nn.Linear(latent, options.generator_hidden), nn.LeakyReLU(options.negative_slope),
            nn.Linear(options.generator_hidden, backbone.ctx_dim),
        )
        self.apply(init_linear)
        # The global prompt: M vectors N(0, 0.02) before the class name (CoOp's random context, unified, at the end).
        self.prompt = PromptLearner(backbone, classnames, options.n_ctx, ctx_init=None, csc=False,
                                    class_token_position="end", ctx_init_learned="all")

    def encode(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(features)
        return self.mean(hidden), self.log_var(hidden)

    def decode(self, backbone: Backbone, z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Normalised text features [B, embed_dim] of the prompts of `labels` shifted by the generator's bias of z."""
        bias = self.generator(z.to(self.mean.weight.dtype))
        ctx = self.prompt.ctx.unsqueeze(0) + bias.unsqueeze(1)  # the same bias on each of the M global vectors
        return F.normalize(self.prompt.class_text_features(backbone, labels, ctx).float(), dim=-1)

    def loss(self, backbone: Backbone, features: torch.Tensor, labels: torch.Tensor, noise: torch.Tensor,
             kl_weight: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(loss, reconstruction, KL) of normalised image features [B, d] with reparameterisation noise [B, latent]."""
        mean, log_var = self.encode(features)
        z = mean + torch.exp(0.5 * log_var) * noise
        reconstruction = (self.decode(backbone, z, labels) - features).pow(2).sum(dim=1).mean()
        kl = -0.5 * (1 + log_var - mean.pow(2) - log_var.exp()).sum(dim=1).mean()
        return reconstruction + kl_weight * kl, reconstruction, kl

    @torch.no_grad()
    def synthesize(self, backbone: Backbone, labels: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Normalised features [B, embed_dim] of classes `labels`, z drawn from the prior N(0, I)."""
        z = torch.randn(len(labels), self.latent_dim, generator=generator).to(labels.device)
        return self.decode(backbone, z, labels)


class SynthesizedTrain:
    """A `FeatureProvider` whose train set also holds synthesized features of the label-only classes (after the real
    ones, item index NO_IMAGE, the same in every augmented view); the other sets as the provider gives them."""

    def __init__(self, provider: FeatureProvider, synthesize: Callable[[], FeatureSet]):
        self._provider = provider
        self._synthesize = synthesize
        self._synthesized: FeatureSet | None = None

    def synthesized(self) -> FeatureSet:
        if self._synthesized is None:  # only when the method reads its train set
            self._synthesized = self._synthesize()
        return self._synthesized

    def features(self, split: str) -> FeatureSet:
        real = self._provider.features(split)
        if split != "train":
            return real
        extra = self.synthesized()
        return FeatureSet(torch.cat([real.features, extra.features.to(real.features.dtype)]),
                          torch.cat([real.labels, extra.labels]), torch.cat([real.index, extra.index]))

    def views(self, split: str, views: Views) -> FeatureViews:
        real = self._provider.views(split, views)
        if split != "train":
            return real
        extra = self.synthesized()
        repeated = extra.features.to(real.features.dtype).expand(real.count, -1, -1)
        return FeatureViews(torch.cat([real.features, repeated], dim=1), torch.cat([real.labels, extra.labels]),
                            torch.cat([real.index, extra.index]))

    def label_only_classes(self) -> list[int]:
        return self._provider.label_only_classes()

    def device(self) -> torch.device:
        return self._provider.device()


class Ship(Method):
    """The SHIP mixin: `class ShipX(Ship, X)` is method X trained on its labelled plus synthesized features."""

    def __init__(self, backbone: Backbone, classnames: Sequence[str], templates: Sequence[str], *,
                 ship: Mapping[str, Any], **config: Any):
        super().__init__(backbone, classnames, templates, **config)
        self.ship_options = ShipOptions.from_config(ship)
        base = super().contract()
        if base.inputs != "features" or (self.trains and base.train_views is None):
            raise PromptbenchError(
                f"method '{self.name}': SHIP adds synthesized features to what the method trains on, so the method "
                f"must train on cached features; set method.views.n=N (N >= 1 cached augmented views) for CoOp"
            )
        # Initialised from the seed alone, not from whatever the global stream holds when the method is built.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.ship_options.seed)
            self.ship_generator = PromptVAE(backbone, self.classnames, self.ship_options)
        self.register_buffer("label_only", torch.empty(0, dtype=torch.long), persistent=False)
        self.ship_notes: dict[str, Any] = {}

    def contract(self) -> DataContract:
        base = super().contract()
        return dataclasses.replace(base, reads=tuple(dict.fromkeys((*base.reads, "train"))))

    # ---- the generator --------------------------------------------------------------------------------
    def is_learned(self, key: str) -> bool:
        return not key.startswith(GENERATOR_PREFIX) and super().is_learned(key)

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        generator = {id(parameter) for parameter in self.ship_generator.parameters()}
        return [parameter for parameter in super().trainable_parameters() if id(parameter) not in generator]

    def generator_device(self) -> torch.device:
        return self.ship_generator.mean.weight.device

    def fit_generator(self, train: FeatureViews) -> None:
        """The VAE on the labelled features: epoch e reads augmented view e mod n, shuffled, in batches."""
        options, vae = self.ship_options, self.ship_generator
        device = self.generator_device()
        draw = torch.Generator().manual_seed(options.seed)
        optimizer = torch.optim.AdamW(vae.parameters(), lr=options.lr, weight_decay=options.weight_decay)
        vae.train()
        vae.requires_grad_(True)
        labels = train.labels.long()
        losses: list[float] = []
        for epoch in range(options.epochs):
            features = F.normalize(train.features[epoch % train.count].float(), dim=-1)
            total, count = 0.0, 0
            for batch in torch.randperm(len(labels), generator=draw).split(options.batch_size):
                noise = torch.randn(len(batch), vae.latent_dim, generator=draw)
                loss, _, _ = vae.loss(self.backbone, features[batch].to(device), labels[batch].to(device),
                                      noise.to(device), options.kl_weight)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total, count = total + float(loss.detach()) * len(batch), count + len(batch)
            losses.append(total / count)
        vae.requires_grad_(False)
        vae.eval()
        self.ship_notes.update(generator_epochs=options.epochs, generator_loss_first_epoch=losses[0],
                               generator_loss_last_epoch=losses[-1])
        log.info("%s: SHIP generator trained for %d epochs on %d labelled features (loss %.4f -> %.4f)", self.name,
                 options.epochs, len(labels), losses[0], losses[-1])

    def synthesize(self, labels: torch.Tensor, draw: torch.Generator) -> torch.Tensor:
        return self.ship_generator.synthesize(self.backbone, labels.to(self.generator_device()), draw)

    def synthesized_train_set(self) -> FeatureSet:
        """`per_class` synthesized features of each label-only class, for the train set the method reads in prepare."""
        labels = self.label_only.repeat_interleave(self.ship_options.per_class).cpu()
        # Its own stream: the cache never depends on whether training drew from the seed before.
        features = self.synthesize(labels, torch.Generator().manual_seed(self.ship_options.seed + 1)).cpu()
        return FeatureSet(features, labels, torch.full_like(labels, NO_IMAGE))

    def prepare(self, provider: FeatureProvider) -> None:
        label_only = provider.label_only_classes()
        if not label_only:
            raise PromptbenchError(
                f"method '{self.name}' synthesizes features for classes that have a name but no training image, and "
                f"this run has none: use protocol=generalized_zero_shot (the method gets every class name and the "
                f"base classes' images), or method={self.name.removeprefix('ship_')} without SHIP"
            )
        # The generator learns through the text tower: on the run's device (the trainer moves the method there later
        # anyway), not on the CPU where the method was built.
        self.to(provider.device())
        self.label_only = torch.tensor(label_only, dtype=torch.long, device=self.generator_device())
        self.fit_generator(provider.views("train", self.ship_options.views))
        self.ship_notes.update(label_only_classes=len(label_only))
        super().prepare(SynthesizedTrain(provider, self.synthesized_train_set))

    # ---- training on labelled + synthesized features --------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:
            return None
        inputs, labels, index = batch
        count = round(self.ship_options.per_batch * len(labels))
        if count:
            # Seeded by the step (and rank): a resumed run draws what an uninterrupted one would.
            draw = torch.Generator().manual_seed(hash((self.ship_options.seed, self.global_step, self.global_rank)))
            picks = torch.randint(len(self.label_only), (count,), generator=draw)
            drawn = self.label_only[picks.to(self.label_only.device)]
            features = self.synthesize(drawn, draw).to(device=inputs.device, dtype=inputs.dtype)
            inputs = torch.cat([inputs, features])
            labels = torch.cat([labels, drawn.to(labels.device)])
            index = torch.cat([index, torch.full((count,), NO_IMAGE, dtype=index.dtype, device=index.device)])
        return super().training_step((inputs, labels, index), batch_idx)

    def run_notes(self) -> dict[str, Any]:
        return {**super().run_notes(), "ship": dict(self.ship_notes)}


class ShipCoOp(Ship, CoOp):
    name = "ship_coop"


class ShipCLIPAdapter(Ship, CLIPAdapter):
    name = "ship_clip_adapter"


class ShipTipAdapter(Ship, TipAdapter):
    name = "ship_tip_adapter"


class ShipTipAdapterF(Ship, TipAdapterF):
    name = "ship_tip_adapter_f"
