"""Configs outside run.py: the OmegaConf resolvers conf/ uses, `build` (instantiate with our own errors), and a
method exactly as a run builds it (for the tests, the benchmark harness and notebooks)."""

from __future__ import annotations

import collections.abc
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from promptbench import paths
from promptbench.errors import PromptbenchError
from promptbench.selection import check_policy


def coop_epochs(shots: int) -> int:
    """CoOp's schedule by shot count: 1 shot 50 epochs, 2-4 shots 100, 8+ shots 200 (ImageNet: its recipe)."""
    if shots <= 1:
        return 50
    return 100 if shots <= 4 else 200


def if_shots_at_least(shots: int, threshold: int, then: Any, otherwise: Any) -> Any:
    """`then` from `threshold` shots on (-1, all images, counts as many), else `otherwise` (e.g. ProGrad's lambda)."""
    return then if shots < 0 or shots >= threshold else otherwise


def iterations_per_shot(per_shot: int, shots: int) -> int:
    """A step budget that grows with the shot count (CLIP-LoRA: 500 x shots optimiser steps, whatever the number of
    classes); -1 (no step limit, so trainer.max_epochs must be set) when there is no shot count (shots -1: all)."""
    return per_shot * shots if shots >= 1 else -1


def register_resolvers() -> None:
    if not OmegaConf.has_resolver("coop_epochs"):
        OmegaConf.register_new_resolver("coop_epochs", coop_epochs)
    if not OmegaConf.has_resolver("if_shots_at_least"):
        OmegaConf.register_new_resolver("if_shots_at_least", if_shots_at_least)
    if not OmegaConf.has_resolver("iterations_per_shot"):
        OmegaConf.register_new_resolver("iterations_per_shot", iterations_per_shot)
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
    """The method of a composed config (with its optim and the run's selection policy), `options` (Python values)
    set on top of its yaml."""
    node = OmegaConf.create(OmegaConf.to_container(cfg.method, resolve=True) | {"selection": cfg.selection} | options)
    check_option_types(node, "method")
    optim = build(cfg.optim) if cfg.get("optim") else None
    return build(node, backbone=backbone, classnames=list(classnames), templates=list(templates), optim=optim)


# ---- option checks, before anything is built ----------------------------------------------------------
PRECISIONS = ("32", "32-true", "16-mixed", "bf16-mixed", "16-true", "fp16-pure")


def _matches(value: Any, hint: Any) -> bool:
    """Whether a resolved config value fits a type hint of a constructor (the hints promptbench uses)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if hint is type(None) or hint is None:
        return value is None
    if origin in (typing.Union, types.UnionType):
        return any(_matches(value, arm) for arm in args)
    if origin is typing.Literal:
        return value in args
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    container = origin or hint
    if container in (collections.abc.Sequence, list, tuple):
        return isinstance(value, (list, tuple)) and all(_matches(item, args[0]) for item in value) if args else \
            isinstance(value, (list, tuple))
    if container in (collections.abc.Mapping, dict):
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    return str(hint).replace("typing.", "").replace("collections.abc.", "").replace("<class '", "").replace("'>", "")


def check_option_types(node: DictConfig, prefix: str) -> None:
    """Refuse a config option of the wrong type (e.g. method.n_ctx=abc) with its name, value and the accepted
    type, before the class is built, instead of a traceback from deep inside it."""
    options = OmegaConf.to_container(node, resolve=True)
    cls = get_class(options.pop("_target_"))
    hints: dict[str, Any] = {}
    for klass in reversed(cls.__mro__):
        init = klass.__dict__.get("__init__")
        if init is not None:
            try:
                hints.update({k: v for k, v in typing.get_type_hints(init).items() if k != "return"})
            except (NameError, TypeError):
                continue
    for name, value in options.items():
        if name in hints and not _matches(value, hints[name]):
            raise PromptbenchError(f"{prefix}.{name}={value!r} has the wrong type: expected {_describe(hints[name])}")


def _integer(cfg: DictConfig, key: str, minimum: int, meaning: str) -> None:
    value = cfg.get(key)
    if not _matches(value, int) or value < minimum:
        raise PromptbenchError(f"{key}={value!r}: expected an integer >= {minimum} ({meaning})")


def check_run_config(cfg: DictConfig) -> None:
    """The top-level options of a run, checked before anything is built: name, bad value, accepted values."""
    _integer(cfg, "shots", -1, "labelled images per class; -1: all of them, 0: none, for zero-shot")
    _integer(cfg, "seed", 0, "the seed of few-shot sampling and training")
    _integer(cfg, "eval_batch_size", 1, "images per evaluation batch")
    _integer(cfg, "num_workers", 0, "image-loading worker processes; 0: load in the main process")
    check_policy(cfg.get("selection"))
    from promptbench.robustness import PGD  # here, not at the top: `run.py --help` must not import torch

    PGD.from_config(cfg.get("eval"), cfg.seed)
    if str(cfg.precision) not in PRECISIONS:
        raise PromptbenchError(f"precision={cfg.precision!r}: expected one of {', '.join(PRECISIONS)}")
    for key in ("eval_only", "overwrite", "save_predictions", "feature_cache", "verbose"):
        if not isinstance(cfg.get(key, False), bool):
            raise PromptbenchError(f"{key}={cfg.get(key)!r}: expected true or false")
    budget = cfg.get("time_budget_min")
    if budget is not None and (not _matches(budget, float) or budget <= 0):
        raise PromptbenchError(f"time_budget_min={budget!r}: expected minutes > 0, or null for no budget")
    scale = cfg.get("train_crop_scale")
    if not (OmegaConf.is_list(scale) and len(scale) == 2 and all(_matches(x, float) for x in scale)
            and 0 < scale[0] <= scale[1] <= 1):
        raise PromptbenchError(f"train_crop_scale={scale}: expected [low, high] with 0 < low <= high <= 1")
    epochs = cfg.trainer.get("max_epochs")
    if epochs is not None and (not _matches(epochs, int) or epochs < 1):
        raise PromptbenchError(f"trainer.max_epochs={epochs!r}: expected an integer >= 1")
    steps = cfg.trainer.get("max_steps")
    if steps is not None and (not _matches(steps, int) or (steps < 1 and steps != -1)):
        raise PromptbenchError(f"trainer.max_steps={steps!r}: expected an integer >= 1, or -1 for no step limit")
    accelerator = str(cfg.trainer.get("accelerator", "cpu"))
    if accelerator in ("gpu", "cuda"):
        import torch

        if not torch.cuda.is_available():
            raise PromptbenchError(f"trainer.accelerator={accelerator} (trainer=gpu/ddp), but torch sees no CUDA GPU "
                                   f"here: use trainer=cpu, or check the GPU driver and CUDA_VISIBLE_DEVICES")
    check_option_types(cfg.method, "method")
    check_method_needs(cfg)


def check_method_needs(cfg: DictConfig) -> None:
    """Refuse the combinations that would write results of an untrained model."""
    method = get_class(cfg.method._target_)
    name = cfg.method.get("name", method.__name__)
    if method.uses_train_data and not cfg.eval_only and cfg.shots == 0:
        raise PromptbenchError(f"method '{name}' learns from the training images: shots=0 gives it none. Use "
                               f"shots >= 1 (or -1: all), or method=zeroshot for a run without training data.")
    if cfg.eval_only and method.uses_train_data and not cfg.ckpt_path:
        raise PromptbenchError(f"eval_only=true evaluates learned parameters, but ckpt_path is not set: pass "
                               f"ckpt_path=<run dir>/learned.safetensors of a finished '{name}' run")
    steps = cfg.trainer.get("max_steps")
    if method.trains and not cfg.eval_only and cfg.trainer.get("max_epochs") is None and steps in (None, -1):
        raise PromptbenchError(f"method '{name}' trains: set trainer.max_epochs=<N> or trainer.max_steps=<N> (its "
                               f"config gives no bound{' at shots=-1' if cfg.shots == -1 else ''})")
