"""Aggregate many results.json into one table: mean +- std over seeds per (method, dataset, backbone, protocol, shots)."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from promptbench.errors import PromptbenchError
from promptbench.results import RESULTS_FILE

GROUP_KEYS = ("method", "dataset", "backbone", "protocol", "shots", "eval_set")


@dataclass
class Row:
    key: tuple
    values: dict[int, float] = field(default_factory=dict)  # seed -> top1

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def std(self) -> float:
        # Population std over seeds, as CoOp-family tables report it.
        return statistics.pstdev(self.values.values()) if len(self.values) > 1 else 0.0


def load_results(dirs: Sequence[str | Path]) -> list[dict]:
    found = []
    for directory in dirs:
        directory = Path(directory)
        if not directory.exists():
            raise PromptbenchError(f"report: no such directory {directory}")
        found.extend(json.loads(p.read_text()) for p in sorted(directory.rglob(RESULTS_FILE)))
    if not found:
        raise PromptbenchError(f"report: no {RESULTS_FILE} under {', '.join(map(str, dirs))}")
    return found


def aggregate(results: Iterable[dict], metric: str = "top1") -> list[Row]:
    rows: dict[tuple, Row] = {}
    for result in results:
        for eval_set, metrics in result["metrics"].items():
            key = (result["method"], result["dataset"], result["backbone"]["name"], result["protocol"],
                   result["shots"], eval_set)
            rows.setdefault(key, Row(key)).values[result["seed"]] = metrics[metric]
    return [rows[key] for key in sorted(rows, key=lambda k: tuple(str(part) for part in k[:4]) + (k[4], k[5]))]


def expected_seeds(rows: list[Row]) -> set[int]:
    return set().union(*(row.values for row in rows)) if rows else set()


def markdown_table(rows: list[Row], metric: str = "top1") -> str:
    seeds = expected_seeds(rows)
    header = [*GROUP_KEYS, f"{metric} mean", "std", "seeds", "missing seeds"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        missing = sorted(seeds - set(row.values))
        cells = [*map(str, row.key), f"{row.mean:.2f}", f"{row.std:.2f}", str(len(row.values)),
                 ",".join(map(str, missing)) or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
