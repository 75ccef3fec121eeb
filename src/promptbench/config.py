"""OmegaConf resolvers used by conf/: registered once, before Hydra composes."""

from __future__ import annotations

from omegaconf import OmegaConf


def coop_epochs(shots: int) -> int:
    """CoOp's schedule by shot count: 1 shot 50 epochs, 2-4 shots 100, 8+ shots 200 (ImageNet: its recipe)."""
    if shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("coop_epochs"):
        OmegaConf.register_new_resolver("coop_epochs", coop_epochs)
