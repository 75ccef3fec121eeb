"""The one method interface. The runner, metrics, logging and sweeps rely on this contract only.

A method is a LightningModule built from (backbone, class names, templates, its config) and declares:
- `input_kind`: "images" (it needs gradients or randomness through the image tower, e.g. CoOp) or
  "features" (it works on frozen image features, which the runner extracts once and caches);
- `trains`: True -> the runner calls `Trainer.fit`; False -> training-free, the runner calls `prepare`;
- `uses_val`: True if it selects hyper-parameters on the few-shot val split;
- `transfers_to_new_classes`: False if its parameters are tied to the training classes;
- `train_views` (instance attribute, "features" methods that train): train on cached augmented views of the
  train set, a different view each epoch, instead of the test-transform features.
`forward` maps a batch of inputs of that kind to logits over the current class set.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, ClassVar, Literal, Sequence

import lightning as L
import torch
from safetensors.torch import load_file, save_file

from promptbench.backbones import Backbone
from promptbench.data.features import AugmentedViews
from promptbench.errors import PromptbenchError
from promptbench.io import atomic_path, write_json_atomic

InputKind = Literal["images", "features"]
BACKBONE_PREFIX = "backbone."


class Method(L.LightningModule):
    name: ClassVar[str]
    input_kind: ClassVar[InputKind] = "images"
    trains: ClassVar[bool] = True
    uses_val: ClassVar[bool] = False
    transfers_to_new_classes: ClassVar[bool] = True
    # False for methods that never look at the training images (zero-shot): their runs are reported at 0 shots.
    uses_train_data: ClassVar[bool] = True
    train_views: AugmentedViews | None = None

    def __init__(
        self,
        backbone: Backbone,
        classnames: Sequence[str],
        templates: Sequence[str],
        max_epochs: int = 0,
        batch_size: int = 32,
        name: str | None = None,
        **unused: Any,
    ):
        super().__init__()
        if name not in (None, self.name):
            raise PromptbenchError(f"conf: method name '{name}' does not match class {type(self).__name__} ('{self.name}')")
        if unused:
            raise PromptbenchError(
                f"method '{self.name}' does not take option(s) {sorted(unused)}; check conf/method/{self.name}.yaml"
            )
        self.backbone = backbone
        self.classnames = list(classnames)
        self.templates = list(templates)
        self.max_epochs = int(max_epochs)
        self.batch_size = int(batch_size)
        # Checkpoints hold the learned parameters only; the frozen backbone is rebuilt from its config.
        self.strict_loading = False

    # ---- the contract -------------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def prepare(self, datamodule: L.LightningDataModule) -> None:
        """Training-free fitting (e.g. building a cache, searching hyper-parameters on val). Default: none."""

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

    # ---- shared Lightning plumbing ------------------------------------------------------------------
    def predict_step(self, batch: Any, batch_idx: int) -> dict[str, torch.Tensor] | None:
        if batch is None:
            return None
        inputs, labels, index = batch
        return {"logits": self(inputs).float(), "labels": labels, "index": index}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint["state_dict"]
        for key in [k for k in state if k.startswith(BACKBONE_PREFIX)]:
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

    def learned_state(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith(BACKBONE_PREFIX)}

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
        learned_missing = [k for k in missing if not k.startswith(BACKBONE_PREFIX)]
        if learned_missing or unexpected:
            raise PromptbenchError(
                f"{path} does not match method '{self.name}': missing {learned_missing[:5]}, unexpected {unexpected[:5]}"
            )


def read_learned(path: str | Path, option: str = "path") -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The learned tensors and the metadata of a Lightning checkpoint (.ckpt) or a `save_learned` file."""
    path = Path(path)
    if not path.is_file():
        raise PromptbenchError(f"{option}: no such file {path}")
    if path.suffix == ".ckpt":
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        return checkpoint["state_dict"], checkpoint.get("promptbench", {})
    sidecar = path.with_suffix(".json")
    return load_file(str(path)), json.loads(sidecar.read_text()) if sidecar.is_file() else {}
