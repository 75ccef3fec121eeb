"""Compose -> seed -> build backbone, task, method -> fit or prepare -> evaluate -> results.json.

The runner knows nothing about any particular method, dataset or protocol: it relies on the `Method`
contract (methods/base.py) and the `Task` a protocol builds.
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from promptbench.data.datamodule import FewShotDataModule
from promptbench.data.features import FeatureStore
from promptbench.errors import PromptbenchError
from promptbench.io import atomic_path
from promptbench.methods.base import Method
from promptbench.metrics import classification_metrics
from promptbench.protocols import Task
from promptbench.results import PhaseTimer, command_line, device_info, git_commit, package_versions, write_results

log = logging.getLogger(__name__)
LEARNED_FILE = "learned.safetensors"
PREDICTIONS_FILE = "predictions.pt"


def build(node: DictConfig, **kwargs: Any) -> Any:
    """`instantiate`, letting our own user-facing errors through unwrapped."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        if isinstance(error.__cause__, PromptbenchError):
            raise error.__cause__ from None
        raise


def build_loggers(cfg: DictConfig) -> list[Any]:
    if not cfg.get("logger") or "_target_" not in cfg.logger:
        return []
    return [build(cfg.logger)]


def close_loggers(loggers: list[Any], status: str) -> None:
    for logger in loggers:
        logger.finalize(status)
        experiment = getattr(logger, "_experiment", None)
        if experiment is not None and hasattr(experiment, "finish"):
            experiment.finish()


def predict(trainer: L.Trainer, method: Method, loader) -> dict[str, torch.Tensor]:
    outputs = [batch for batch in trainer.predict(method, dataloaders=loader) if batch is not None]
    if not outputs:
        raise PromptbenchError("evaluation produced no predictions: every image of the set was unreadable")
    return {key: torch.cat([batch[key].cpu() for batch in outputs]) for key in outputs[0]}


def summary_table(metrics: dict[str, dict[str, float]]) -> str:
    columns = ("top1", "mean_per_class", "top5", "ece", "n")
    lines = [f"{'eval set':<20}" + "".join(f"{c:>16}" for c in columns)]
    for name, values in metrics.items():
        cells = []
        for column in columns:
            value = values.get(column)
            cells.append(f"{'-':>16}" if value is None else f"{value:>16.2f}" if column != "n" else f"{value:>16d}")
        lines.append(f"{name:<20}" + "".join(cells))
    return "\n".join(lines)


def evaluate(trainer: L.Trainer, method: Method, datamodule: FewShotDataModule, task: Task,
             timer: PhaseTimer) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, dict[str, Any]] = {}
    for name, eval_set in task.evals.items():
        method.set_classes(eval_set.classnames, eval_set.templates)
        with timer(f"evaluate/{name}"):
            outputs = predict(trainer, method, datamodule.eval_dataloader(name))
        metrics[name] = classification_metrics(outputs["logits"], outputs["labels"])
        metrics[name]["skipped_images"] = len(eval_set) - len(outputs["index"])
        predictions[name] = {
            "logits": outputs["logits"],
            "labels": outputs["labels"],
            "paths": [eval_set.items[i].path for i in outputs["index"].tolist()],
            "classnames": eval_set.classnames,
        }
    return metrics, predictions


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one job described by a composed config; returns (and writes) the results payload."""
    run_dir = Path(run_dir)
    timer = PhaseTimer()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")

    with timer("build/backbone"):
        backbone = build(cfg.backbone)
    with timer("build/data"):
        # Seeded right before the data is built, as the reference does, so few-shot sets match its sets.
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dataset = build(cfg.dataset)
        task: Task = build(cfg.protocol).build(dataset, cfg.shots)
    with timer("build/method"):
        method: Method = build(
            cfg.method, backbone=backbone, classnames=task.train.classnames, templates=task.train.templates
        )
    loggers = build_loggers(cfg)
    trainer: L.Trainer = build(
        cfg.trainer,
        default_root_dir=str(run_dir),
        precision=cfg.precision,
        logger=loggers or False,
        max_epochs=max(method.max_epochs, 1),
    )
    feature_store = FeatureStore(cfg.paths.feature_cache_dir, enabled=cfg.feature_cache)
    datamodule = FewShotDataModule(
        task, backbone, method.input_kind,
        device=trainer.strategy.root_device, feature_store=feature_store, precision=str(cfg.precision),
        batch_size=method.batch_size, eval_batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
        skip_bad_images=cfg.dataset.get("skip_bad_images", False), seed=cfg.seed, train_views=method.train_views,
    )

    status = "failed"
    try:
        if cfg.ckpt_path:
            method.load_learned(cfg.ckpt_path)
        if not cfg.eval_only:
            with timer("fit"):
                if method.trains:
                    trainer.fit(method, datamodule=datamodule)
                else:
                    method.prepare(datamodule)
            if method.learned_state():
                method.save_learned(run_dir / LEARNED_FILE)
        metrics, predictions = evaluate(trainer, method, datamodule, task, timer)
        for logger in loggers:
            logger.log_metrics({f"{name}/{key}": value for name, values in metrics.items() for key, value in values.items()})
        status = "success"
    finally:
        close_loggers(loggers, status)

    if cfg.save_predictions:
        with atomic_path(run_dir / PREDICTIONS_FILE) as tmp:
            torch.save(predictions, tmp)

    payload = {
        "status": "completed",
        "method": method.name,
        "dataset": task.source,
        "backbone": backbone.describe(),
        "protocol": cfg.protocol.name,
        "shots": cfg.shots if method.uses_train_data else 0,
        "seed": cfg.seed,
        "eval_only": bool(cfg.eval_only),
        "metrics": metrics,
        "method_notes": method.run_notes(),
        "splits": {name: len(labeled) for name, labeled in task.sets().items()},
        "feature_cache": {"extractions": feature_store.extractions, "hits": feature_store.hits},
        "timings_s": timer.seconds,
        "started_at": started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "device": device_info(trainer.strategy.root_device),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = write_results(run_dir, payload)
    print(f"\n{method.name} on {task.source} ({backbone.name}, {cfg.shots} shots, seed {cfg.seed}):")
    print(summary_table(metrics))
    print(f"results: {path}")
    return payload
