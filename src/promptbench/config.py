"""OmegaConf resolvers used by conf/: registered once, before Hydra composes."""

from __future__ import annotations

from omegaconf import OmegaConf

from promptbench import paths


def coop_epochs(shots: int, dataset: str) -> int:
    """CoOp's schedule: 1 shot 50 epochs, 2-4 shots 100, 8+ shots 200; ImageNet 50 for every shot count."""
    if dataset == "imagenet" or shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("coop_epochs"):
        OmegaConf.register_new_resolver("coop_epochs", coop_epochs)
    if not OmegaConf.has_resolver(paths.RESOLVER):
        OmegaConf.register_new_resolver(paths.RESOLVER, paths.default_path)
