"""`promptbench data check`: compare a dataset folder with its expected layout and scan every image once.

Runs never stat every file (ImageNet has 1.28 M); this command is the place for the full scan.
"""

from __future__ import annotations

import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from promptbench.data.datasets.base import DATASETS, SPLITS, Dataset
from promptbench.data.datasets.benchmark import BenchmarkDataset
from promptbench.errors import PromptbenchError
from promptbench.paths import data_root

SCAN_THREADS = 8  # file checks wait on the disk, not the CPU


def image_problem(path: str) -> str | None:
    """None if the file exists and its header decodes, else what is wrong."""
    if not os.path.isfile(path):
        return "missing"
    try:
        with Image.open(path) as image:
            image.verify()
    except Exception as error:  # Pillow raises many types for a damaged file; all mean "unreadable"
        return f"unreadable ({type(error).__name__}: {error})"
    return None


@dataclass
class CheckReport:
    dataset: str
    root: Path
    counts: dict[str, Counter] = field(default_factory=dict)  # split -> label -> images
    classnames: list[str] = field(default_factory=list)
    problems: dict[str, str] = field(default_factory=dict)  # path -> what is wrong
    notes: list[str] = field(default_factory=list)

    def text(self) -> str:
        splits = [split for split in SPLITS if split in self.counts]
        lines = [f"dataset '{self.dataset}' at {self.root}", *self.notes]
        lines.append(f"{'label':>6}  {'class':<40}" + "".join(f"{split:>8}" for split in splits))
        for label, classname in enumerate(self.classnames):
            lines.append(f"{label:>6}  {classname[:40]:<40}" + "".join(f"{self.counts[s][label]:>8}" for s in splits))
        lines.append(f"{'':>6}  {'total':<40}" + "".join(f"{sum(self.counts[s].values()):>8}" for s in splits))
        for path, problem in sorted(self.problems.items()):
            lines.append(f"{problem}: {path}")
        return "\n".join(lines)


def check_dataset(name: str, root: str | Path | None = None) -> CheckReport:
    """Read the dataset as a run would (without writing into its folder) and check every listed image.

    Raises PromptbenchError, with where to get the data and how to lay it out, if it cannot be read.
    """
    cls = DATASETS.get(name)
    if cls is None:
        raise PromptbenchError(f"unknown dataset '{name}'; known: {sorted(DATASETS)}")
    if root is None:
        if not issubclass(cls, BenchmarkDataset):
            raise PromptbenchError(f"dataset '{name}' has no default folder: pass --root DIR")
        root = data_root() / cls.folder
    root = Path(root).expanduser()
    options = {"write_splits": False} if issubclass(cls, BenchmarkDataset) else {}
    dataset: Dataset = cls(root, **options)
    report = CheckReport(name, root, classnames=list(dataset.classnames))
    if isinstance(dataset, BenchmarkDataset) and dataset.split_file and dataset.find_file(dataset.split_file) is None:
        report.notes.append(f"no {dataset.split_file}: a run builds it as the reference does and saves it")
    paths = set()
    for split in SPLITS:
        items = dataset[split].items
        report.counts[split] = Counter(item.label for item in items)
        paths.update(item.path for item in items)
    ordered = sorted(paths)
    with ThreadPoolExecutor(SCAN_THREADS) as pool:
        report.problems = {path: problem for path, problem in zip(ordered, pool.map(image_problem, ordered)) if problem}
    return report
