"""A quiet console: one progress line per run, a summary per job; `verbose=true` restores the libraries' output.

On a terminal the training progress updates one line in place; in a log (not a terminal) it prints a line
at every 10% of the epochs, and always after the last one. Library warnings that say nothing about the
user's run (they repeat in every job, some once per epoch) are silenced here, and only here.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import time
import warnings
from typing import Any, TextIO

import lightning as L

# Messages that are noise for every promptbench run: (category, regex of the message).
NOISE = (
    # torch.load inside Lightning's checkpoint IO; promptbench's own loads set weights_only.
    (FutureWarning, r".*weights_only.*"),
    (UserWarning, r".*weights_only.*"),
    # promptbench sets the SLURM environment itself (submitit launcher), and knows when srun is not used.
    (UserWarning, r".*srun.*"),
    (UserWarning, r".*litlogger.*"),
    (UserWarning, r".*LitLogger.*"),
    # The frozen CLIP towers stay in eval mode on purpose (Backbone.train never switches them).
    (UserWarning, r"Found \d+ module\(s\) in eval mode at the start of training"),
    # Feature datasets are tensors in memory; loader workers would only add overhead.
    (UserWarning, r".*does not have many workers.*"),
    # Lightning's own use of a deprecated torch pytree API.
    (Warning, r".*treespec.*"),
    # The trainers' log interval against the few batches of a few-shot epoch.
    (UserWarning, r".*log_every_n_steps.*"),
)
# Loggers whose INFO lines ("GPU available: False", "LOCAL_RANK: 0 ...", "`Trainer.fit` stopped") repeat in every job.
CHATTY_LOGGERS = ("lightning.pytorch", "lightning.fabric", "lightning", "pytorch_lightning")


def quiet_libraries(verbose: bool) -> None:
    if verbose:
        return
    # wandb's banner, sync hints and run-history table after every job; its files are still written.
    os.environ.setdefault("WANDB_SILENT", "true")
    for category, message in NOISE:
        warnings.filterwarnings("ignore", message=message, category=category)
    for name in CHATTY_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def trainer_output(verbose: bool) -> dict[str, Any]:
    """Trainer options: Lightning's own progress bar and model summary only when verbose."""
    return {"enable_progress_bar": bool(verbose), "enable_model_summary": bool(verbose)}


def planned_epochs(trainer: L.Trainer) -> int:
    """The epochs a run trains: trainer.max_epochs, or fewer when trainer.max_steps ends it first (a step budget,
    e.g. CLIP-LoRA's, leaves max_epochs at -1); the last of them may be partial. 0 when unknown."""
    bounds = [trainer.max_epochs] if trainer.max_epochs and trainer.max_epochs > 0 else []
    steps = getattr(trainer, "max_steps", -1)
    if steps > 0:
        batches = trainer.num_training_batches
        if math.isfinite(batches) and batches > 0:
            bounds.append(math.ceil(steps * trainer.accumulate_grad_batches / batches))
    return min(bounds, default=0)


class EpochProgress(L.Callback):
    """One progress line per run: `<what>: epoch 7/50  loss 0.412  acc 88.1  12.3 s`."""

    def __init__(self, what: str, stream: TextIO | None = None):
        self.what = what
        self.stream = stream or sys.stdout
        self.interactive = self.stream.isatty()
        self.started = 0.0
        self.printed_epoch = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        epoch, total = trainer.current_epoch + 1, planned_epochs(trainer)
        step = max(-(-total // 10), 1)  # a line per tenth of the epochs, rounded up
        if not self.interactive and epoch % step and epoch != total:
            return
        metrics = trainer.callback_metrics
        parts = [f"{self.what}: epoch {epoch}/{total}"]
        for key, label, scale in (("train/loss", "loss", 1.0), ("train/acc", "acc", 100.0)):
            if key in metrics:
                parts.append(f"{label} {float(metrics[key]) * scale:.3f}" if label == "loss"
                             else f"{label} {float(metrics[key]) * scale:.1f}")
        parts.append(f"{time.perf_counter() - self.started:.1f} s")
        line = "  ".join(parts)
        if self.interactive:
            self.stream.write("\r" + line + ("\n" if epoch == total else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self.printed_epoch = epoch

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run stopped early (time budget, signal) ends its in-place line.
        if self.interactive and self.printed_epoch not in (-1, planned_epochs(trainer)):
            self.stream.write("\n")
            self.stream.flush()
