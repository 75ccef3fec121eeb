"""The mini world's downstream tasks: rendered to disk on first use, then read like any folder dataset."""

from __future__ import annotations

from pathlib import Path

from promptbench.data.datasets.folder import FolderDataset
from promptbench.errors import PromptbenchError


class SyntheticDataset(FolderDataset):
    name = "synthetic"

    def __init__(self, root, task: str, world_seed: int = 0, image_size: int = 64, templates=None, **kwargs):
        from promptbench.data.synthetic import TASKS

        if task not in TASKS:
            raise PromptbenchError(f"unknown synthetic task '{task}'; known tasks: {sorted(TASKS)}")
        self.task, self.world_seed, self.image_size = task, int(world_seed), int(image_size)
        super().__init__(Path(root).expanduser() / task, templates=templates or list(TASKS[task].templates), **kwargs)

    def prepare_root(self) -> None:
        from promptbench.data.synthetic import materialize

        materialize(self.task, self.root.parent, seed=self.world_seed, image_size=self.image_size)
