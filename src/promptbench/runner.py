"""Compose -> seed -> build backbone, task, method -> fit or prepare -> evaluate -> results.json.

The runner knows nothing about any particular method, dataset or protocol: it relies on the `Method`
contract (methods/base.py) and the `Task` a protocol builds.
"""

from __future__ import annotations

import json
import logging
import traceback
import warnings
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
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
from promptbench.resume import ResumableTraining
from promptbench.results import (
    RESULTS_FILE,
    PhaseTimer,
    command_line,
    device_info,
    git_commit,
    package_versions,
    write_results,
)

log = logging.getLogger(__name__)
# The frozen CLIP towers stay in eval mode on purpose (Backbone.train never switches them): not worth a warning.
warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode at the start of training")
LEARNED_FILE = "learned.safetensors"
# The reference CoOp runs the whole CLIP in half precision; Lightning calls that "16-true".
PRECISION_ALIASES = {"fp16-pure": "16-true"}
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
        # A protocol may score a set over part of its classes (ImageNet-A/R inside ImageNet's 1000).
        metrics[name] = classification_metrics(*task.scored_outputs(name, outputs["logits"], outputs["labels"]))
        metrics[name]["skipped_images"] = len(eval_set) - len(outputs["index"])
        predictions[name] = {
            "logits": outputs["logits"],
            "labels": outputs["labels"],
            "paths": [eval_set.items[i].path for i in outputs["index"].tolist()],
            "classnames": eval_set.classnames,
        }
    metrics.update(task.derived_metrics(metrics))  # e.g. base-to-new's harmonic mean
    return metrics, predictions


def refuse_untransferable(method: Method, task: Task, protocol: str) -> None:
    """Fail before training, not after it, when the protocol evaluates classes the method cannot handle."""
    if method.transfers_to_new_classes:
        return
    foreign = [name for name, eval_set in task.evals.items() if eval_set.classnames != task.train.classnames]
    if foreign:
        raise PromptbenchError(
            f"method '{method.name}' learns parameters tied to its {len(task.train.classnames)} training classes, but "
            f"protocol '{protocol}' evaluates other classes in {foreign}. Use a method or option that transfers "
            f"(e.g. unified context instead of class-specific context), or protocol=fewshot."
        )


# Options that change where, how fast or how a run is logged, never its numbers: ignored when deciding "already done".
NON_RESULT_KEYS = ("logger", "output_dir", "paths", "num_workers", "overwrite", "time_budget_min", "speed")


def result_relevant(config: dict[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in config.items() if key not in NON_RESULT_KEYS}


def completed_run(cfg: DictConfig, run_dir: Path, backbone_fingerprint: str) -> dict[str, Any] | None:
    """The results of an identical, completed run in `run_dir`, or None if it must run.

    A completed run with a different configuration in the same directory is refused (unless
    overwrite=true): two configurations must never share one results.json. Other backbone weights under
    the same config (e.g. `pretrained: bundled` after an update, a checkpoint file rewritten in place)
    count as a different configuration.
    """
    path = run_dir / RESULTS_FILE
    if not path.is_file():
        return None
    previous = json.loads(path.read_text())
    if previous.get("status") != "completed":
        return None
    wanted = result_relevant(OmegaConf.to_container(cfg, resolve=True)) | {"backbone weights": backbone_fingerprint}
    existing = result_relevant(previous.get("config", {})) | {
        "backbone weights": previous.get("backbone", {}).get("fingerprint")}
    if wanted == existing:
        return previous
    if cfg.get("overwrite"):
        return None
    differing = sorted(key for key in set(wanted) | set(existing) if wanted.get(key) != existing.get(key))
    raise PromptbenchError(
        f"{path} holds a completed run with another configuration (differs in: {', '.join(differing)}). "
        f"Give this variant its own directory with tag=<name> (in a sweep over options, interpolate them: "
        f"'tag=lr${{method.lr}}'), or replace it with overwrite=true."
    )


def record_failure(cfg: DictConfig, run_dir: str | Path, error: BaseException) -> Path | None:
    """A failed job leaves a results.json that says so, with the error, instead of nothing.

    A completed run's results are never replaced by the failure of a later, different job.
    """
    path = Path(run_dir) / RESULTS_FILE
    if path.is_file() and json.loads(path.read_text()).get("status") == "completed":
        return None
    return write_results(run_dir, {
        "status": "failed",
        "error": {"type": type(error).__name__, "message": str(error),
                  "traceback": "".join(traceback.format_exception(error))},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "config": OmegaConf.to_container(cfg, resolve=False),
    })


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one job described by a composed config; returns (and writes) the results payload.

    An identical completed run in the same directory is not repeated: its results are returned.
    """
    run_dir = Path(run_dir)
    timer = PhaseTimer()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with timer("build/backbone"):
        backbone = build(cfg.backbone).accelerate(**cfg.get("speed", {}))
    previous = completed_run(cfg, run_dir, backbone.fingerprint)
    if previous is not None:
        print(f"skipped: {run_dir / RESULTS_FILE} already holds this configuration's results")
        return previous | {"skipped": True}
    with timer("build/data"):
        # Seeded right before the data is built, as the reference does, so few-shot sets match its sets.
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        dataset = build(cfg.dataset)
        task: Task = build(cfg.protocol).build(dataset, cfg.shots)
    with timer("build/method"):
        method: Method = build(
            cfg.method, backbone=backbone, classnames=task.train.classnames, templates=task.train.templates
        )
    refuse_untransferable(method, task, cfg.protocol.name)
    loggers = build_loggers(cfg)
    resumable = ResumableTraining(run_dir, result_relevant(OmegaConf.to_container(cfg, resolve=True)),
                                  cfg.get("time_budget_min"))
    if cfg.get("overwrite"):
        resumable.discard()
    precision = PRECISION_ALIASES.get(str(cfg.precision), str(cfg.precision))
    trainer: L.Trainer = build(
        cfg.trainer,
        default_root_dir=str(run_dir),
        precision=precision,
        logger=loggers or False,
        max_epochs=max(method.max_epochs, 1),
        callbacks=[resumable] if method.trains else [],
        # Under SLURM the launcher (submitit) re-queues preempted jobs; Lightning must not re-queue them too.
        plugins=[SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [],
    )
    feature_store = FeatureStore(cfg.paths.feature_cache_dir, enabled=cfg.feature_cache)
    datamodule = FewShotDataModule(
        task, backbone, method.input_kind,
        device=trainer.strategy.root_device, feature_store=feature_store, precision=precision,
        batch_size=method.batch_size, eval_batch_size=cfg.eval_batch_size, num_workers=cfg.num_workers,
        skip_bad_images=cfg.dataset.get("skip_bad_images", False), seed=cfg.seed, train_views=method.train_views,
        train_crop_scale=cfg.train_crop_scale,
    )

    status = "failed"
    resume_from = None
    try:
        if cfg.ckpt_path:
            method.load_learned(cfg.ckpt_path)
        if not cfg.eval_only:
            with timer("fit"):
                if method.trains:
                    resume_from = resumable.resume_path()
                    try:
                        trainer.fit(method, datamodule=datamodule, ckpt_path=resume_from)
                    except SIGTERMException:
                        pass  # Lightning stops on SIGTERM by exiting with status 0: report it as an interruption
                    resumable.raise_if_interrupted(trainer)
                else:
                    method.prepare(datamodule)
            if method.learned_state() and trainer.is_global_zero:
                method.save_learned(run_dir / LEARNED_FILE)
        metrics, predictions = evaluate(trainer, method, datamodule, task, timer)
        for logger in loggers:
            logger.log_metrics({f"{name}/{key}": value for name, values in metrics.items() for key, value in values.items()})
        status = "success"
    finally:
        close_loggers(loggers, status)

    if not trainer.is_global_zero:
        return {"status": "completed", "rank": trainer.global_rank}  # rank 0 writes the run's files

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
        "resumed_from_checkpoint": bool(method.trains and not cfg.eval_only and resume_from is not None),
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
    resumable.discard()  # the run is complete: its results, not its checkpoints, are what a re-run reuses
    print(f"\n{method.name} on {task.source} ({backbone.name}, {cfg.shots} shots, seed {cfg.seed}):")
    print(summary_table(metrics))
    print(f"results: {path}")
    return payload
