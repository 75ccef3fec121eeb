"""Where promptbench reads and writes unless told otherwise: the one home of every default path.

conf/paths/default.yaml takes its values from here (`${default_path:NAME,PARENT}`), and so do the commands
that run outside Hydra (`promptbench cache`, `promptbench data`), so a command looks where a run looks.

| path | set by | else |
|---|---|---|
| root_dir | PROMPTBENCH_ROOT | `.` (the current directory) |
| output_root | PROMPTBENCH_OUTPUT | <root_dir>/outputs |
| cache_dir | PROMPTBENCH_CACHE | <root_dir>/.cache/promptbench |
| feature_cache_dir | | <cache_dir>/features |
| data_root | PROMPTBENCH_DATA | <root_dir>/data |

A variable set to the empty string counts as unset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from promptbench.errors import PromptbenchError

RESOLVER = "default_path"


@dataclass(frozen=True)
class DefaultPath:
    variable: str | None  # the environment variable that sets the path
    parent: str | None  # the path it lies under when the variable is unset
    folder: str


DEFAULTS = {
    "root_dir": DefaultPath("PROMPTBENCH_ROOT", None, "."),
    "output_root": DefaultPath("PROMPTBENCH_OUTPUT", "root_dir", "outputs"),
    "cache_dir": DefaultPath("PROMPTBENCH_CACHE", "root_dir", ".cache/promptbench"),
    "feature_cache_dir": DefaultPath(None, "cache_dir", "features"),
    "data_root": DefaultPath("PROMPTBENCH_DATA", "root_dir", "data"),
}


def default_path(name: str, parent: str | None = None) -> str:
    """Path `name` as the configs spell it: its environment variable, else <parent>/<folder>.

    `parent` is the value of the path it lies under (the config passes `paths.root_dir` or `paths.cache_dir`,
    so overriding those on the command line moves what lies under them); by default, that path's own default.
    The result stays a plain string joined with "/": resolved configs, and so run identities, keep their spelling.
    """
    spec = DEFAULTS.get(name)
    if spec is None:
        raise PromptbenchError(f"unknown default path '{name}' in ${{{RESOLVER}:...}}; known: {sorted(DEFAULTS)}")
    if spec.variable and os.environ.get(spec.variable):
        return os.environ[spec.variable]
    if spec.parent is None:
        return spec.folder
    return f"{default_path(spec.parent) if parent is None else parent}/{spec.folder}"


def root_dir() -> Path:
    return Path(default_path("root_dir"))


def output_root() -> Path:
    return Path(default_path("output_root"))


def cache_dir() -> Path:
    return Path(default_path("cache_dir"))


def feature_cache_dir() -> Path:
    return Path(default_path("feature_cache_dir"))


def data_root() -> Path:
    return Path(default_path("data_root"))
