"""The self-describing results.json of a run: config, metrics, sizes, versions, timings; written atomically."""

from __future__ import annotations

import platform
import subprocess
import sys
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import torch

from promptbench.io import write_json_atomic

RESULTS_FILE = "results.json"
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
