"""The self-describing results.json of a run: config, metrics, sizes, versions, timings; written atomically."""

from __future__ import annotations

import json
import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch

from promptbench.errors import PromptbenchError
from promptbench.io import write_json_atomic

RESULTS_FILE = "results.json"
STATUSES = ("completed", "failed")
# What skip-if-done and the report read from a completed record (the runner's `write` stage writes all of them).
COMPLETED_FIELDS = {"method": str, "dataset": str, "protocol": str, "shots": int, "seed": int, "backbone": dict,
                    "metrics": dict}
TRACKED_PACKAGES = ("promptbench", "torch", "torchvision", "open_clip_torch", "lightning", "torchmetrics",
                    "hydra-core", "omegaconf", "wandb", "numpy", "pillow", "scikit-learn")
REPO_ROOT = Path(__file__).resolve().parents[2]


class PhaseTimer:
    """Wall-clock seconds per named phase."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, phase: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[phase] = round(self.seconds.get(phase, 0.0) + time.perf_counter() - start, 4)


def package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for name in TRACKED_PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return versions


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO_ROOT), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        dirty = subprocess.run(["git", "-C", str(REPO_ROOT), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")


def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"type": device.type, "host": platform.node(), "platform": platform.platform(),
                            "torch_threads": torch.get_num_threads()}
    if device.type == "cuda":
        info["name"] = torch.cuda.get_device_name(device)
        info["count"] = torch.cuda.device_count()
    else:
        info["name"] = platform.processor() or platform.machine()
    return info


def write_results(run_dir: str | Path, payload: dict[str, Any]) -> Path:
    path = Path(run_dir) / RESULTS_FILE
    write_json_atomic(path, payload)
    return path


def command_line() -> str:
    return " ".join(sys.argv)


class MalformedResults(PromptbenchError):
    """A results file that is no run record: empty, truncated, binary, not a JSON object, or with wrong fields."""


KIND_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
              bool: "a boolean", type(None): "null"}


def _kind(value: Any) -> str:
    return KIND_NAMES.get(type(value), type(value).__name__)


def _has_type(value: Any, kind: type | tuple[type, ...]) -> bool:
    # JSON's true/false load as bool, a subclass of int: never a count, a seed or a metric.
    return isinstance(value, kind) and not isinstance(value, bool)


def _record_problem(record: Any) -> str | None:
    if not isinstance(record, dict):
        return f"it holds {_kind(record)}, not a JSON object"
    if "status" not in record:
        return "'status' is missing"
    if record["status"] not in STATUSES:
        return f"its status is {record['status']!r}, not one of {', '.join(STATUSES)}"
    if record["status"] == "failed":
        return None if _has_type(record.get("error", {}), dict) else "its 'error' is not an object"
    for key, kind in COMPLETED_FIELDS.items():
        if key not in record:
            return f"'{key}' is missing"
        if not _has_type(record[key], kind):
            return f"'{key}' is {_kind(record[key])}, not {KIND_NAMES[kind]}"
    if not _has_type(record["backbone"].get("name"), str):
        return "'backbone' has no 'name' string"
    if not _has_type(record.get("config", {}), dict):
        return "'config' is not an object"
    for eval_set, values in record["metrics"].items():
        if not _has_type(values, dict):
            return f"metrics['{eval_set}'] is {_kind(values)}, not an object"
        for name, value in values.items():
            if not _has_type(value, (int, float)):
                return f"metrics['{eval_set}']['{name}'] is {_kind(value)}, not a number"
    return None


def read_results(path: str | Path) -> dict[str, Any] | None:
    """The run record in `path`, None when there is no such file; MalformedResults when the file is no record."""
    path = Path(path)
    if not path.is_file():
        return None
    data = path.read_bytes()
    if not data.strip():
        raise MalformedResults(f"{path} is not a usable results file: it is empty")
    try:
        record = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise MalformedResults(f"{path} is not a usable results file: it is binary, not JSON text") from None
    except json.JSONDecodeError as error:
        raise MalformedResults(f"{path} is not a usable results file: invalid or truncated JSON ({error})") from None
    problem = _record_problem(record)
    if problem:
        raise MalformedResults(f"{path} is not a usable results file: {problem}")
    return record


def set_aside(path: Path) -> Path:
    """Rename a malformed results file out of the way, keeping its bytes for whoever wants to see what happened."""
    aside = path.with_name(f"{path.name}.corrupt-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}")
    try:
        path.rename(aside)
    except FileNotFoundError:
        pass  # the other ranks of a multi-process job read the same file: one of them moved it first
    return aside
