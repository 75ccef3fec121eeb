"""The mini world's downstream tasks: rendered to disk on first use, then read like any folder dataset.

Every task is also registered under its own name (`synthetic_shapes`, ...), so protocols can open it
as a target by name, e.g. the sketch domain-shift set after training on shapes.
"""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

from promptbench.data.datasets.folder import FolderDataset
from promptbench.tools.miniworld import TASKS, materialize
from promptbench.errors import PromptbenchError

SYNTHETIC_FOLDER = "synthetic"


class SyntheticDataset(FolderDataset):
    name = "synthetic"
    task: ClassVar[str | None] = None

    def __init__(self, root, task: str | None = None, world_seed: int = 0, image_size: int = 64, templates=None,
                 **kwargs):
        task = task or self.task
        if task not in TASKS:
            raise PromptbenchError(f"unknown synthetic task '{task}'; known tasks: {sorted(TASKS)}")
        self.task, self.world_seed, self.image_size = task, int(world_seed), int(image_size)
        super().__init__(Path(root).expanduser() / task, templates=templates or list(TASKS[task].templates), **kwargs)

    @classmethod
    def from_data_root(cls, data_root, **kwargs) -> "SyntheticDataset":
        return cls(Path(data_root).expanduser() / SYNTHETIC_FOLDER, **kwargs)

    def prepare_root(self) -> None:
        try:
            materialize(self.task, self.root.parent, seed=self.world_seed, image_size=self.image_size)
        except OSError as error:
            raise PromptbenchError(
                f"dataset '{self.display_name}': the synthetic task {self.task} is not rendered in {self.root.parent} "
                f"yet (or was rendered with other settings), and rendering it there failed: "
                f"{error.strerror or error} ({error.filename or self.root.parent}). Set data_root=<a writable folder> "
                f"(the task renders into <data_root>/{SYNTHETIC_FOLDER} on first use) or dataset.root=<a writable "
                f"folder>, or render it once where {self.root.parent} is writable: python -c \"from "
                f"promptbench.tools.miniworld import materialize; materialize('{self.task}', '{self.root.parent}', "
                f"seed={self.world_seed}, image_size={self.image_size})\""
            ) from None


def registered_name(task: str) -> str:
    return "synthetic_" + task.removeprefix("synth_")


for _task in TASKS:
    type(f"Synthetic_{_task}", (SyntheticDataset,), {"name": registered_name(_task), "task": _task,
                                                      "__module__": __name__})
