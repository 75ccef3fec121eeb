"""Interrupted training resumes where it stopped and ends with the result an uninterrupted run gives.

After every completed training epoch the full training state is saved atomically to
`<run dir>/checkpoints/last.ckpt`. SIGTERM, SIGUSR1 (SLURM's warning before the time limit; submitit's
own handler, when present, still runs and re-queues the job) or the run's time budget stop training
after the current batch, without saving the incomplete epoch. Re-running the same configuration
continues from the last complete epoch; since shuffling and augmentation depend only on (seed, epoch,
image), the continued run sees exactly the batches the uninterrupted run would have seen.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import lightning as L

from promptbench.errors import PromptbenchError
from promptbench.io import write_json_atomic

CHECKPOINT_DIR = "checkpoints"
LAST_CHECKPOINT = "last.ckpt"
CONFIG_FILE = "config.json"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class RunInterrupted(PromptbenchError):
    """Training stopped early on purpose; the last complete epoch is checkpointed."""


class ResumableTraining(L.Callback):
    def __init__(self, run_dir: str | Path, config: dict[str, Any], time_budget_min: float | None = None):
        self.folder = Path(run_dir) / CHECKPOINT_DIR
        self.config = config
        self.time_budget_s = None if time_budget_min is None else float(time_budget_min) * 60
        self.stop_reason: str | None = None
        self._previous_handlers: dict[int, Any] = {}

    @property
    def last(self) -> Path:
        return self.folder / LAST_CHECKPOINT

    def resume_path(self) -> Path | None:
        """The checkpoint to continue from, after checking it belongs to this very configuration."""
        if not self.last.is_file():
            return None
        saved = json.loads((self.folder / CONFIG_FILE).read_text()) if (self.folder / CONFIG_FILE).is_file() else None
        if saved != self.config:
            raise PromptbenchError(
                f"{self.last} was written by a run with another configuration; delete {self.folder} "
                f"(or re-run with overwrite=true) to start afresh"
            )
        return self.last

    def discard(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    # ---- stopping -----------------------------------------------------------------------------------
    def _request_stop(self, signum: int, frame: Any) -> None:
        self.stop_reason = signal.Signals(signum).name
        previous = self._previous_handlers.get(signum)
        if callable(previous):  # e.g. submitit's re-queueing handler
            previous(signum, frame)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._hide_step_bound_while_resuming(trainer)
        self._started = time.monotonic()
        for signum in STOP_SIGNALS:
            try:
                self._previous_handlers[signum] = signal.signal(signum, self._request_stop)
            except ValueError:  # not the main thread: leave signals to whoever owns them
                break

    # ---- resuming a run bounded by trainer.max_steps --------------------------------------------------
    # Lightning restores a step-bounded run ("iteration-based") as if its checkpoint had been taken mid-epoch: from an
    # epoch's end it replays one batch of the next epoch as part of the finished one and renumbers the epochs after it.
    # Every checkpoint here is taken at an epoch's end, so the step bound is hidden while the loops restore (after the
    # optimisers are configured, on_fit_start) and given back before the first batch (on_train_start).
    _hidden_max_steps: int | None = None

    def _hide_step_bound_while_resuming(self, trainer: L.Trainer) -> None:
        if trainer.ckpt_path is not None and trainer.max_steps != -1:
            self._hidden_max_steps = trainer.fit_loop.epoch_loop.max_steps
            trainer.fit_loop.epoch_loop.max_steps = -1

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._hidden_max_steps is not None:
            trainer.fit_loop.epoch_loop.max_steps, self._hidden_max_steps = self._hidden_max_steps, None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        if self.stop_reason is None and self.time_budget_s is not None:
            if time.monotonic() - self._started > self.time_budget_s:
                self.stop_reason = f"time budget of {self.time_budget_s / 60:g} min"
        if self.stop_reason is not None:
            trainer.should_stop = True

    # ---- saving -------------------------------------------------------------------------------------
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.stop_reason is not None:
            return  # an incomplete epoch is never saved: resuming from it could not be exact
        tmp = self.folder / f".{LAST_CHECKPOINT}.tmp"
        if trainer.is_global_zero:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_json_atomic(self.folder / CONFIG_FILE, self.config)
        trainer.save_checkpoint(tmp)
        if trainer.is_global_zero:
            os.replace(tmp, self.last)

    def raise_if_interrupted(self, trainer: L.Trainer) -> None:
        """Never evaluate a model whose training was cut short; Lightning itself returns normally from `fit`
        after its own SIGTERM handling or a Ctrl-C."""
        reason = self.stop_reason
        if reason is None and trainer.received_sigterm:
            reason = "SIGTERM"
        if reason is None and trainer.interrupted:
            reason = "an interruption (e.g. Ctrl-C)"
        if reason is None:
            return
        if not self.last.is_file():
            raise RunInterrupted(f"training stopped by {reason} during epoch {trainer.current_epoch + 1}, before any "
                                 f"epoch was complete: nothing is saved. Run the same command again to start afresh.")
        raise RunInterrupted(
            f"training stopped by {reason} during epoch {trainer.current_epoch + 1}; the last complete epoch is "
            f"saved in {self.last}. Run the same command again to resume from it."
        )
