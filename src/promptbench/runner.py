"""One job in named stages: build -> skip-if-done -> fit or prepare -> evaluate -> write (results.json).

The runner knows nothing about any particular method, dataset or protocol: it relies on the `Method`
contract (methods/base.py) and the `Task` a protocol builds.
"""

from __future__ import annotations

import logging
import sys
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.plugins.environments import SLURMEnvironment
from lightning.pytorch.utilities.exceptions import SIGTERMException
import torch
from omegaconf import DictConfig, OmegaConf

from promptbench.config import build, check_run_config, method_from_config
from promptbench.console import EpochProgress, quiet_libraries, trainer_output
from promptbench.data.datamodule import FEWSHOT_SETS, FewShotDataModule
from promptbench.data.features import FeatureStore, FrozenFeatures
from promptbench.data.items import class_counts
from promptbench.errors import PromptbenchError
from promptbench.io import atomic_path
from promptbench.methods.base import Method
from promptbench.metrics import classification_metrics
from promptbench.protocols import Task
from promptbench.resume import ResumableTraining
from promptbench.robustness import PGD, robust_top1
from promptbench.selection import CLEAN_POLICIES
from promptbench.results import (
    RESULTS_FILE,
    MalformedResults,
    PhaseTimer,
    command_line,
    device_info,
    git_commit,
    package_versions,
    read_results,
    set_aside,
    write_results,
)

log = logging.getLogger(__name__)
LEARNED_FILE = "learned.safetensors"
# The reference CoOp runs the whole CLIP in half precision; Lightning calls that "16-true".
PRECISION_ALIASES = {"fp16-pure": "16-true"}
PREDICTIONS_FILE = "predictions.pt"


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
    attacked = any("robust_top1" in values for values in metrics.values())
    columns = ("top1", *(("robust_top1",) if attacked else ()), "mean_per_class", "top5", "ece", "n")
    lines = [f"{'eval set':<20}" + "".join(f"{c:>16}" for c in columns)]
    for name, values in metrics.items():
        cells = []
        for column in columns:
            value = values.get(column)
            cells.append(f"{'-':>16}" if value is None else f"{value:>16.2f}" if column != "n" else f"{value:>16d}")
        lines.append(f"{name:<20}" + "".join(cells))
    return "\n".join(lines)


def sweep_table(payloads: list[dict[str, Any]]) -> str:
    """One line per job and eval set of a sweep: what ran and its top-1."""
    lines = [f"{'method':<16}{'dataset':<20}{'backbone':<10}{'shots':>6}{'seed':>6}  {'eval set':<20}{'top1':>8}"]
    for payload in payloads:
        for name, values in payload.get("metrics", {}).items():
            if "top1" in values:
                lines.append(f"{payload['method']:<16}{payload['dataset']:<20}{payload['backbone']['name']:<10}"
                             f"{payload['shots']:>6}{payload['seed']:>6}  {name:<20}{values['top1']:>8.2f}"
                             + ("  (skipped: done before)" if payload.get("skipped") else ""))
    return "\n".join(lines)


def evaluate(trainer: L.Trainer, method: Method, datamodule: FewShotDataModule, task: Task, timer: PhaseTimer,
             attack: PGD | None = None) -> tuple[dict[str, dict[str, float]], dict[str, dict[str, Any]]]:
    """Every eval set: clean predictions and metrics; with an `attack`, also its robust top-1 (robustness.py)."""
    metrics: dict[str, dict[str, float]] = {}
    predictions: dict[str, dict[str, Any]] = {}
    for name, eval_set in task.evals.items():
        method.set_classes(eval_set.classnames, eval_set.templates)
        with timer(f"evaluate/{name}"):
            outputs = predict(trainer, method, datamodule.eval_dataloader(name))
        # A protocol may score a set over part of its classes (ImageNet-A/R inside ImageNet's 1000).
        metrics[name] = classification_metrics(*task.scored_outputs(name, outputs["logits"], outputs["labels"]))
        metrics[name]["skipped_images"] = len(eval_set) - len(outputs["index"])
        if attack is not None:
            with timer(f"attack/{name}"):
                metrics[name]["robust_top1"] = robust_top1(
                    attack, method, datamodule.pixel_dataloader(name), outputs,
                    lambda logits, labels, name=name: task.scored_outputs(name, logits, labels),
                    device=trainer.strategy.root_device, forward_context=trainer.precision_plugin.forward_context)
        predictions[name] = {
            "logits": outputs["logits"],
            "labels": outputs["labels"],
            "paths": [eval_set.items[i].path for i in outputs["index"].tolist()],
            "classnames": eval_set.classnames,
        }
    for name, (source, _) in task.class_subsets.items():  # e.g. generalized zero-shot's base and new classes
        logits, labels = task.class_subset(name, predictions[source]["logits"], predictions[source]["labels"])
        metrics[name] = classification_metrics(logits, labels)
        metrics[name]["skipped_images"] = len(task.eval_images(name)) - len(labels)
    metrics.update(task.derived_metrics(metrics))  # e.g. base-to-new's harmonic mean
    return metrics, predictions


def selection_record(method: Method, task: Task) -> dict[str, Any]:
    """The policy, what the method chose on it, and how many of its images are also evaluated on."""
    record = method.selection_record()
    if method.selecting:
        record["images"] = len(task.selection)
        record["images_also_evaluated"] = task.selection_images_evaluated()
    return record


def warn_if_selection_overlaps(method: Method, task: Task) -> None:
    """A clean policy whose images are test images (ImageNet's val is its test set) is said once, not hidden."""
    if not method.selecting or method.selection not in CLEAN_POLICIES:
        return
    shared = task.selection_images_evaluated()
    if shared:
        log.warning("selection=%s: %d of its %d images are also evaluated on (%s's val split is its test split, as "
                    "in the reference); results.json records it under selection.images_also_evaluated",
                    method.selection, shared, len(task.selection), task.source)


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
NON_RESULT_KEYS = ("logger", "output_dir", "paths", "num_workers", "overwrite", "time_budget_min", "speed", "verbose")


def result_relevant(config: dict[str, Any]) -> dict[str, Any]:
    relevant = {key: value for key, value in config.items() if key not in NON_RESULT_KEYS}
    # The attack options change nothing while no attack runs (and runs from before they existed have none).
    if not (relevant.get("eval") or {}).get("attack"):
        relevant.pop("eval", None)
    return relevant


def completed_run(cfg: DictConfig, run_dir: Path, backbone_fingerprint: str) -> dict[str, Any] | None:
    """The results of an identical, completed run in `run_dir`, or None if it must run.

    A completed run with a different configuration in the same directory is refused (unless
    overwrite=true): two configurations must never share one results.json. Other backbone weights under
    the same config (e.g. `pretrained: bundled` after an update, a checkpoint file rewritten in place)
    count as a different configuration. A malformed results.json (a crashed writer, a full disk) counts as
    no run: it is moved aside, neither trusted nor fatal.
    """
    path = run_dir / RESULTS_FILE
    try:
        previous = read_results(path)
    except MalformedResults as malformed:
        print(f"warning: {malformed}; moved it to {set_aside(path)} and running this job again", file=sys.stderr)
        return None
    if previous is None or previous["status"] != "completed":
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
        f"'tag=lr${{optim.optimizer.lr}}'), or replace it with overwrite=true."
    )


def record_failure(cfg: DictConfig, run_dir: str | Path, error: BaseException) -> Path | None:
    """A failed job leaves a results.json that says so, with the error, instead of nothing.

    A completed run's results are never replaced by the failure of a later, different job.
    """
    path = Path(run_dir) / RESULTS_FILE
    try:
        previous = read_results(path)
    except MalformedResults as malformed:
        print(f"warning: {malformed}; moved it to {set_aside(path)} and recording this job's failure in {path}",
              file=sys.stderr)
        previous = None
    if previous is not None and previous["status"] == "completed":
        return None
    return write_results(run_dir, {
        "status": "failed",
        "error": {"type": type(error).__name__, "message": str(error),
                  "traceback": "".join(traceback.format_exception(error))},
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "config": OmegaConf.to_container(cfg, resolve=False),
    })


@dataclass
class Job:
    """Everything one run builds; the stages below read and fill it."""

    cfg: DictConfig
    run_dir: Path
    timer: PhaseTimer
    started_at: str
    backbone: Any
    dataset: Any = None
    task: Task | None = None
    method: Method | None = None
    trainer: L.Trainer | None = None
    datamodule: FewShotDataModule | None = None
    resumable: ResumableTraining | None = None
    loggers: list[Any] = field(default_factory=list)
    attack: PGD | None = None
    resumed: bool = False
    epochs_run: int | None = None

    def title(self) -> str:
        """`coop on dtd (rn50, 16 shots, seed 1)`: the progress line's and the summary's name of the job."""
        return (f"{self.method.name} on {self.task.source} ({self.backbone.name}, {self.cfg.shots} shots, "
                f"seed {self.cfg.seed})")


def build_job(cfg: DictConfig, run_dir: Path, backbone: Any, timer: PhaseTimer, started_at: str) -> Job:
    """Stage 1 (after the backbone): task, method, trainer, data module, loggers."""
    job = Job(cfg, run_dir, timer, started_at, backbone, attack=PGD.from_config(cfg.get("eval"), cfg.seed))
    with timer("build/data"):
        # Seeded right before the data is built, as the reference does, so few-shot sets match its sets.
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        job.dataset = build(cfg.dataset)
        job.task = build(cfg.protocol).build(job.dataset, cfg.shots)
        job.task.select_with(cfg.selection)
    with timer("build/method"):
        job.method = method_from_config(cfg, backbone, job.task.train.classnames, job.task.train.templates)
    refuse_untransferable(job.method, job.task, cfg.protocol.name)
    warn_if_selection_overlaps(job.method, job.task)
    job.loggers = build_loggers(cfg)
    job.resumable = ResumableTraining(run_dir, result_relevant(OmegaConf.to_container(cfg, resolve=True)),
                                      cfg.get("time_budget_min"))
    if cfg.get("overwrite"):
        job.resumable.discard()
    precision = PRECISION_ALIASES.get(str(cfg.precision), str(cfg.precision))
    verbose = bool(cfg.get("verbose"))
    callbacks = [job.resumable] + ([] if verbose else [EpochProgress(job.title())]) if job.method.trains else []
    job.trainer = build(
        cfg.trainer,
        default_root_dir=str(run_dir),
        precision=precision,
        logger=job.loggers or False,
        callbacks=callbacks,
        # Under SLURM the launcher (submitit) re-queues preempted jobs; Lightning must not re-queue them too.
        plugins=[SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else [],
        # An attack differentiates through what the clean evaluation cached (e.g. a classifier): no inference tensors.
        inference_mode=job.attack is None,
        **trainer_output(verbose),
    )
    device, skip_bad_images = job.trainer.strategy.root_device, cfg.dataset.get("skip_bad_images", False)
    feature_store = FeatureStore(cfg.paths.feature_cache_dir, enabled=cfg.feature_cache)
    if job.task.labeller is not None:
        # A protocol that labels its train set with the model (unsupervised: pseudo-labels) does it here.
        with timer("build/train_labels"):
            job.task.label_train(backbone, FrozenFeatures(
                feature_store, job.task.source, device, precision=precision, batch_size=cfg.eval_batch_size,
                num_workers=cfg.num_workers, skip_bad_images=skip_bad_images))
    job.datamodule = FewShotDataModule(
        job.task.sets(), job.task.source, backbone, job.method.contract(), device=device,
        feature_store=feature_store, precision=precision, eval_batch_size=cfg.eval_batch_size,
        num_workers=cfg.num_workers, skip_bad_images=skip_bad_images, seed=cfg.seed,
        train_crop_scale=cfg.train_crop_scale, label_only_classes=job.task.label_only_classes,
    )
    return job


def fit_or_prepare(job: Job) -> None:
    """Stage 3: load a checkpoint if given; unless eval_only, `prepare` the method and train it if it trains."""
    cfg, method, trainer = job.cfg, job.method, job.trainer
    if cfg.ckpt_path:
        method.load_learned(cfg.ckpt_path)
    if cfg.eval_only:
        return
    with job.timer("fit"):
        method.prepare(job.datamodule.provider)
        if method.trains:
            resume_from = job.resumable.resume_path()
            job.resumed = resume_from is not None
            try:
                trainer.fit(method, datamodule=job.datamodule, ckpt_path=resume_from)
            except SIGTERMException:
                pass  # Lightning stops on SIGTERM by exiting with status 0: report it as an interruption
            job.resumable.raise_if_interrupted(trainer)
            job.epochs_run = trainer.current_epoch
    if method.learned_state() and trainer.is_global_zero:
        method.save_learned(job.run_dir / LEARNED_FILE)


def data_record(job: Job) -> dict[str, Any]:
    """What the run's data really was: images per class of the few-shot sets as used (after any unreadable
    image was left out), the files skipped per set, and what reading the dataset left out or could not fill."""
    datamodule = job.datamodule
    fewshot = [name for name in FEWSHOT_SETS if name in datamodule.sets]
    skipped = datamodule.skipped_images()
    return {
        "class_counts": {name: class_counts(datamodule.labeled_set(name)) for name in fewshot},
        "skipped_images": {name: len(skipped.get(name, [])) for name in fewshot},
        "skipped_files": {name: paths for name, paths in skipped.items() if paths},
        "notes": list(job.dataset.data_notes),
    }


def write(job: Job, metrics: dict[str, dict[str, float]], predictions: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Stage 5: predictions (if asked), results.json, the job's summary."""
    cfg, method, task, backbone, trainer = job.cfg, job.method, job.task, job.backbone, job.trainer
    if cfg.save_predictions:
        with atomic_path(job.run_dir / PREDICTIONS_FILE) as tmp:
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
        "resumed_from_checkpoint": job.resumed,
        "training": {"epochs": job.epochs_run, "steps": trainer.global_step} if job.epochs_run is not None else None,
        "metrics": metrics,
        "method_notes": method.run_notes(),
        "selection": selection_record(method, task),
        "robustness": job.attack.record() if job.attack is not None else None,
        **({"pseudo_labels": task.labelling} if task.labelling is not None else {}),
        "splits": {name: len(labeled) for name, labeled in task.splits().items()},
        "data": data_record(job),
        "feature_cache": {"extractions": job.datamodule.feature_store.extractions,
                          "hits": job.datamodule.feature_store.hits},
        "timings_s": job.timer.seconds,
        "started_at": job.started_at,
        "finished_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": command_line(),
        "git_commit": git_commit(),
        "versions": package_versions(),
        "device": device_info(trainer.strategy.root_device),
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    path = write_results(job.run_dir, payload)
    job.resumable.discard()  # the run is complete: its results, not its checkpoints, are what a re-run reuses
    print(f"\n{job.title()}:")
    print(summary_table(metrics))
    print(f"results: {path}")
    return payload


def run(cfg: DictConfig, run_dir: str | Path) -> dict[str, Any]:
    """Run one job: build -> skip-if-done -> fit or prepare -> evaluate -> write. Returns the results payload.

    An identical completed run in the same directory is not repeated: its results are returned.
    """
    check_run_config(cfg)
    quiet_libraries(bool(cfg.get("verbose")))
    run_dir = Path(run_dir)
    timer = PhaseTimer()
    started_at = datetime.now(timezone.utc).isoformat(timespec="seconds")
    with timer("build/backbone"):
        backbone = build(cfg.backbone).accelerate(**cfg.get("speed", {}))
    # Skip-if-done compares the backbone's weights too, so it comes right after the backbone is built.
    previous = completed_run(cfg, run_dir, backbone.fingerprint)
    if previous is not None:
        print(f"skipped: {run_dir / RESULTS_FILE} already holds this configuration's results")
        return previous | {"skipped": True}
    job = build_job(cfg, run_dir, backbone, timer, started_at)
    status = "failed"
    try:
        fit_or_prepare(job)
        metrics, predictions = evaluate(job.trainer, job.method, job.datamodule, job.task, timer, job.attack)
        for logger in job.loggers:
            logger.log_metrics({f"{name}/{key}": value for name, values in metrics.items() for key, value in values.items()})
        status = "success"
    finally:
        close_loggers(job.loggers, status)
    if not job.trainer.is_global_zero:
        return {"status": "completed", "rank": job.trainer.global_rank}  # rank 0 writes the run's files
    return write(job, metrics, predictions)
