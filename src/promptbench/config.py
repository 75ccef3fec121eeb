"""Configs outside run.py: the OmegaConf resolvers conf/ uses, `build` (instantiate with our own errors), and a
method exactly as a run builds it (for the tests, the benchmark harness and notebooks)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from promptbench import paths
from promptbench.errors import PromptbenchError


def coop_epochs(shots: int) -> int:
    """CoOp's schedule by shot count: 1 shot 50 epochs, 2-4 shots 100, 8+ shots 200 (ImageNet: its recipe)."""
    if shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("coop_epochs"):
        OmegaConf.register_new_resolver("coop_epochs", coop_epochs)
    if not OmegaConf.has_resolver(paths.RESOLVER):
        OmegaConf.register_new_resolver(paths.RESOLVER, paths.default_path)


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate`, letting our own user-facing errors through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, PromptbenchError):
            raise error.__cause__ from None
        raise


def compose_config(conf_dir: str | Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The config run.py would compose from `conf_dir` with these overrides (no Hydra job is started)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(Path(conf_dir).resolve()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def method_from_config(cfg: DictConfig, backbone: Any, classnames: Sequence[str], templates: Sequence[str],
                       **options: Any) -> Any:
    """The method of a composed config (with its optim), `options` (Python values) set on top of its yaml."""
    node = OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True) | options)
    optim = build(cfg.optim) if cfg.get("optim") else None
    return build(node, backbone=backbone, classnames=list(classnames), templates=list(templates), optim=optim)
