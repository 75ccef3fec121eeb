"""The one method interface. The runner, metrics, logging and sweeps rely on this contract only.

A method is a LightningModule built from (backbone, class names, templates, its config, and for methods
that train the run's `Optimization` from conf/optim/) and declares:
- `contract()`: the `DataContract` (contract.py) of what it consumes: images or frozen features, the
  cached augmented views it trains on, the sets it reads in `prepare`, its training batch size;
- `trains`: True -> the runner calls `Trainer.fit`; False -> training-free;
- `transfers_to_new_classes`: False if its parameters are tied to the training classes;
- `uses_train_data`: False for methods that never look at the training images (reported at 0 shots);
- `selects`: what it chooses on selection data (hyper-parameters, an epoch); the run's `selection` policy
  (selection.py) says which images those are, or that there are none and the fixed defaults hold.
`prepare(provider)` runs before training for every method (build a cache, search hyper-parameters, fit a
probe); `forward` maps a batch of the contract's inputs to logits over the current class set. A method
never touches the data module, the trainer's data module or the runner: the provider is all it gets.
"""

from __future__ import annotations

import json
import pickle
import re
from pathlib import Path
from typing import Any, ClassVar, Sequence

import lightning as L
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from promptbench.backbones import Backbone
from promptbench.contract import DataContract, FeatureProvider
from promptbench.errors import PromptbenchError
from promptbench.io import atomic_path, write_json_atomic
from promptbench.methods.optim import Optimization
from promptbench.selection import DEFAULT_POLICY, SELECTION_SET, TEST_PARITY_WARNING, check_policy

BACKBONE_PREFIX = "backbone."


class Method(L.LightningModule):
    name: ClassVar[str]
    trains: ClassVar[bool] = True
    transfers_to_new_classes: ClassVar[bool] = True
    uses_train_data: ClassVar[bool] = True
    selects: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        name: str | None = None,
        optim: Optimization | None = None,
        selection: str = DEFAULT_POLICY,
        **unused: Any,
    ):
        super().__init__()
        if name not in (None, self.name):
            raise PromptbenchError(f"conf: method name '{name}' does not match class {type(self).__name__} ('{self.name}')")
        if unused:
            raise PromptbenchError(
                f"method '{self.name}' does not take option(s) {sorted(unused)}; check conf/method/{self.name}.yaml"
            )
        if self.trains and optim is None:
            raise PromptbenchError(f"method '{self.name}' trains: it needs an optimiser config (optim=<name>, "
                                   f"see conf/optim/)")
        self.backbone = backbone
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.optim = optim if self.trains else None
        self.selection = check_policy(selection)
        # Checkpoints hold the learned parameters only; the frozen backbone is rebuilt from its config.
        self.strict_loading = False

    # ---- the contract -------------------------------------------------------------------------------
    def contract(self) -> DataContract:
        raise NotImplementedError

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def selecting(self) -> bool:
        """Whether this run chooses anything on selection data (a method that selects, a policy that has data)."""
        return bool(self.selects) and self.selection != "none"

    def selection_reads(self) -> tuple[str, ...]:
        """The contract's `reads` for selection: the policy's set when the method selects on it, else nothing."""
        return (SELECTION_SET,) if self.selecting else ()

    def selection_record(self) -> dict[str, Any]:
        """results.json's `selection`: the policy, what the method selects (with policy none: the defaults it kept
        instead), and the loud mark of a test-set selection."""
        record: dict[str, Any] = {"policy": self.selection, "selects": list(self.selects)}
        if self.selecting and self.selection == "test_parity":
            record["warning"] = TEST_PARITY_WARNING.format(what=", ".join(self.selects))
        return record

    def prepare(self, provider: FeatureProvider) -> None:
        """Runs before training, for every method: build a cache, search hyper-parameters on val, fit a
        probe, from the features of the sets the contract reads. Default: nothing."""

    def set_classes(self, classnames: Sequence[str], templates: Sequence[str]) -> None:
        """Re-target the method to another class set (cross-dataset, base-to-new, variants)."""
        classnames, templates = list(classnames), list(templates)
        if classnames == self.classnames and templates == self.templates:
            return
        if not self.transfers_to_new_classes and classnames != self.classnames:
            raise PromptbenchError(
                f"method '{self.name}' learns parameters tied to its {len(self.classnames)} training classes and "
                f"cannot be evaluated on another class set ({len(classnames)} classes). Use a method or option "
                f"that transfers (e.g. unified context instead of class-specific context)."
            )
        self.classnames, self.templates = classnames, templates
        self.on_classes_changed()

    def on_classes_changed(self) -> None:
        """Hook: recompute anything derived from the class names."""

    def run_notes(self) -> dict[str, Any]:
        """Facts about this run that a reader of results.json must see (chosen hyper-parameters, and above all
        any selection that looked at the test split). The runner writes them as `method_notes`."""
        return {}

    # ---- training: cross-entropy on the contract's train batches, the run's optimiser -----------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor | None:
        if batch is None:  # every image of the batch was unreadable and skipped
            return None
        inputs, labels, _ = batch
        logits = self(inputs).float()
        loss = F.cross_entropy(logits, labels)
        self.stop_on_non_finite(loss)
        self.log_training(loss, logits, labels)
        return loss

    def log_training(self, loss: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor,
                     **terms: torch.Tensor) -> None:
        """The training loss and accuracy of a batch (the console shows them), plus a method's own loss terms
        (`train/<name>`)."""
        accuracy = (logits.argmax(dim=-1) == labels).float().mean()
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        self.log("train/acc", accuracy, prog_bar=True, batch_size=len(labels))
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=len(labels))

    def stop_on_non_finite(self, loss: torch.Tensor) -> None:
        """Never train on NaN/inf: stop with what happened and what to try."""
        if torch.isfinite(loss):
            return
        precision = self.trainer.precision if self._trainer is not None else "unknown"
        raise PromptbenchError(
            f"method '{self.name}': non-finite training loss {loss.item()} at step {self.global_step} "
            f"(epoch {self.current_epoch}, precision={precision}); training stopped. Try precision=32 or "
            f"precision=bf16-mixed (the fp16 modes overflow more easily), or a lower learning rate "
            f"(optim.optimizer.lr={self.optim.lr if self.optim else None})."
        )

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [parameter for parameter in self.parameters() if parameter.requires_grad]

    def configure_optimizers(self) -> dict[str, Any]:
        trainer = self.trainer
        return self.optim.configure(self.trainable_parameters(), trainer.max_epochs,
                                    lambda: trainer.estimated_stepping_batches)

    # ---- shared Lightning plumbing ------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor] | None:
        if batch is None:
            return None
        inputs, labels, index = batch
        return {"logits": self(inputs).float(), "labels": labels, "index": index}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if not self.is_learned(k)]:
            del state[key]
        checkpoint["promptbench"] = self.learned_metadata()

    def learned_metadata(self) -> dict[str, Any]:
        """What a saved file needs besides its tensors: the method, the backbone to rebuild, the class set."""
        return {
            "method": self.name,
            "backbone": self.backbone.describe(),
            "classnames": self.classnames,
            "templates": self.templates,
        }

    def resize_for_loading(self, state: dict[str, torch.Tensor]) -> None:
        """Hook: give learned tensors whose size comes from the training data (e.g. a cache of train features)
        the saved shapes before `load_learned` checks them. Default: every learned tensor has a fixed size."""

    def is_learned(self, key: str) -> bool:
        """Whether the state_dict entry `key` is learned: saved, checkpointed and loaded. Default: everything outside
        the frozen backbone; a method that learns tensors inside the backbone (CLIP-LoRA's adapters) adds them."""
        return not key.startswith(BACKBONE_PREFIX)

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if self.is_learned(k)}

    def save_learned(self, path: str | Path) -> None:
        """A small portable file with the learned tensors (safetensors) and a JSON sidecar of metadata."""
        path = Path(path)
        with atomic_path(path) as tmp:
            save_file(self.learned_state(), str(tmp))
        write_json_atomic(path.with_suffix(".json"), self.learned_metadata())

    def load_learned(self, path: str | Path) -> None:
        """Load a Lightning checkpoint (.ckpt) or a portable file written by `save_learned`."""
        state, saved = read_learned(path, option="ckpt_path")
        if saved.get("method", self.name) != self.name:
            raise PromptbenchError(f"{path} was saved by method '{saved['method']}', not '{self.name}'")
        if "classnames" in saved and not self.transfers_to_new_classes and saved["classnames"] != self.classnames:
            raise PromptbenchError(
                f"{path} holds parameters for {len(saved['classnames'])} other classes; method '{self.name}' "
                f"cannot be moved to a new class set."
            )
        self.resize_for_loading(state)
        own = self.state_dict()
        mismatched = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
                      if k in own and v.shape != own[k].shape]
        if mismatched:
            raise PromptbenchError(
                f"{path} does not fit method '{self.name}' as configured (saved vs expected shape: "
                f"{mismatched[:3]}); use the method options and backbone it was trained with"
            )
        missing, unexpected = self.load_state_dict(state, strict=False)
        learned_missing = [k for k in missing if self.is_learned(k)]
        if learned_missing or unexpected:
            raise PromptbenchError(
                f"{path} does not match method '{self.name}': missing {learned_missing[:5]}, unexpected {unexpected[:5]}"
            )


def read_learned(path: str | Path, option: str = "path") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The learned tensors and the metadata of a Lightning checkpoint (.ckpt) or a `save_learned` file.

    The format is told by the content, not the name; a file in neither format is refused with a message that
    names `option`, the file and what it should be.
    """
    path = Path(path)
    if not path.is_file():
        raise PromptbenchError(f"{option}: no such file {path}")

    def unreadable(reason: str) -> PromptbenchError:
        return PromptbenchError(
            f"{option}={path} is not a checkpoint promptbench can read: {reason}. Expected a Lightning .ckpt written by "
            f"a promptbench training run (checkpoints/last.ckpt), or the learned.safetensors (with its learned.json) of "
            f"a finished run"
        )

    with path.open("rb") as handle:
        magic = handle.read(4)
    if not magic:
        raise unreadable("the file is empty")
    if magic == b"PK\x03\x04":  # torch.save writes a zip archive, so Lightning checkpoints start like this
        try:
            # Tensors and plain containers are all promptbench's checkpoints hold: never run a file's pickled code.
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as error:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            raise unreadable(f"it holds pickled Python objects{f' ({found[1]})' if found else ''}, which promptbench "
                             f"does not load") from None
        except (RuntimeError, OSError, EOFError, KeyError, ValueError) as error:  # torch's ways to say "damaged"
            detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
            raise unreadable(f"a truncated or damaged torch archive ({detail})") from error
        checkpoint = checkpoint if isinstance(checkpoint, dict) else {}
        state, metadata = checkpoint.get("state_dict"), checkpoint.get("promptbench", {})
        if not (isinstance(state, dict) and all(isinstance(v, torch.Tensor) for v in state.values())
                and isinstance(metadata, dict)):
            raise unreadable("a torch archive without a Lightning checkpoint's 'state_dict' of tensors")
        return state, metadata
    try:
        state = load_file(str(path))
    except SafetensorError as error:
        raise unreadable(f"neither a torch zip archive nor a safetensors file ({error})") from None
    sidecar = path.with_suffix(".json")
    try:
        metadata = json.loads(sidecar.read_text()) if sidecar.is_file() else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        metadata = None
    if not isinstance(metadata, dict):
        raise PromptbenchError(f"{sidecar}, the metadata beside {option}={path}, is not a JSON object: restore the file "
                               f"save_learned wrote, or remove it to load the tensors without their metadata")
    return state, metadata
