"""One home for default paths: the configs, the commands outside Hydra and promptbench.paths agree."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra

from conftest import REPO
from promptbench import paths
from promptbench.errors import PromptbenchError

VARIABLES = ("PROMPTBENCH_ROOT", "PROMPTBENCH_OUTPUT", "PROMPTBENCH_CACHE", "PROMPTBENCH_DATA")
NAMES = ("root_dir", "output_root", "cache_dir", "feature_cache_dir", "data_root")


def compose_paths(monkeypatch, environment: dict[str, str], overrides=()):
    for variable in VARIABLES:
        monkeypatch.delenv(variable, raising=False)
    for variable, value in environment.items():
        monkeypatch.setenv(variable, value)
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


# The spelling the configs had before promptbench.paths (oc.env lookups), which run identities were built from.
@pytest.mark.parametrize("environment,expected", [
    ({}, {"root_dir": ".", "output_root": "./outputs", "cache_dir": "./.cache/promptbench",
          "feature_cache_dir": "./.cache/promptbench/features", "data_root": "./data"}),
    ({"PROMPTBENCH_ROOT": "/r"}, {"root_dir": "/r", "output_root": "/r/outputs", "cache_dir": "/r/.cache/promptbench",
                                  "feature_cache_dir": "/r/.cache/promptbench/features", "data_root": "/r/data"}),
    ({"PROMPTBENCH_ROOT": "/r", "PROMPTBENCH_OUTPUT": "/o", "PROMPTBENCH_CACHE": "/c", "PROMPTBENCH_DATA": "/d"},
     {"root_dir": "/r", "output_root": "/o", "cache_dir": "/c", "feature_cache_dir": "/c/features", "data_root": "/d"}),
    ({"PROMPTBENCH_CACHE": "/c", "PROMPTBENCH_DATA": "/d"},
     {"root_dir": ".", "output_root": "./outputs", "cache_dir": "/c", "feature_cache_dir": "/c/features",
      "data_root": "/d"}),
    ({"PROMPTBENCH_ROOT": "", "PROMPTBENCH_OUTPUT": ""},  # set but empty counts as unset
     {"root_dir": ".", "output_root": "./outputs", "cache_dir": "./.cache/promptbench",
      "feature_cache_dir": "./.cache/promptbench/features", "data_root": "./data"}),
])
def test_composed_config_paths_are_the_paths_module(monkeypatch, environment, expected):
    cfg = compose_paths(monkeypatch, environment)
    composed = {name: cfg.paths[name] for name in NAMES}
    assert composed == expected
    assert {name: Path(value) for name, value in composed.items()} == {name: getattr(paths, name)() for name in NAMES}
    assert cfg.data_root == cfg.paths.data_root and cfg.dataset.root == f"{cfg.data_root}/synthetic"


def test_command_line_overrides_win_and_move_what_lies_under_them(monkeypatch):
    cfg = compose_paths(monkeypatch, {"PROMPTBENCH_OUTPUT": "/o"}, ["paths.root_dir=/x"])
    assert (cfg.paths.output_root, cfg.paths.cache_dir, cfg.data_root) == ("/o", "/x/.cache/promptbench", "/x/data")
    cfg = compose_paths(monkeypatch, {"PROMPTBENCH_OUTPUT": "/o", "PROMPTBENCH_CACHE": "/c"},
                        ["paths.output_root=/scratch/out", "paths.cache_dir=/scratch/cache", "data_root=/scratch/data"])
    assert (cfg.paths.output_root, cfg.paths.feature_cache_dir, cfg.data_root, cfg.dataset.root) == (
        "/scratch/out", "/scratch/cache/features", "/scratch/data", "/scratch/data/synthetic")


def test_a_process_that_only_imports_promptbench_resolves_the_configs():
    # A SLURM job unpickles its task and config without running run.py: importing any promptbench module must do.
    code = ("import promptbench.errors; from omegaconf import OmegaConf; "
            "cfg = OmegaConf.create({'data': '${default_path:data_root,/r}', 'epochs': '${coop_epochs:4}'}); "
            "print(cfg.data, cfg.epochs)")
    environment = {name: value for name, value in os.environ.items() if name not in VARIABLES}
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["/r/data", "100"]


def test_an_unknown_path_name_says_which_exist():
    with pytest.raises(PromptbenchError, match="known: .*feature_cache_dir"):
        paths.default_path("feature_cache")
