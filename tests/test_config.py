"""Every option of every config group composes; unknown options fail with Hydra's list of choices."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from conftest import REPO, build_method, run_py
from promptbench.contract import Views
from promptbench.config import register_resolvers

CONF = REPO / "conf"
GROUPS = ["method", "dataset", "backbone", "trainer", "logger", "protocol", "experiment", "debug", "paths"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF / group).glob("*.yaml"))


register_resolvers()


def compose_with(overrides: list[str]):
    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=overrides)


@pytest.mark.parametrize(
    "group,option", [(group, option) for group in GROUPS for option in options(group)]
)
def test_every_group_option_composes(group: str, option: str):
    cfg = compose_with([f"{group}={option}"])
    assert all(isinstance(OmegaConf.select(cfg, f"{part}.name"), str) for part in ("protocol", "dataset", "backbone", "method")), \
        "the run directory is named by these"
    if group in ("method", "dataset", "backbone", "protocol"):
        node = cfg[group]
        assert "_target_" in node and node.name, f"{group}/{option} lacks _target_ or name"


def test_launcher_options_compose():
    for option in options("hydra/launcher"):
        GlobalHydra.instance().clear()
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=[f"hydra/launcher={option}"], return_hydra_config=True)
        assert cfg.hydra.launcher._target_


def test_every_group_has_options():
    for group in GROUPS:
        assert options(group), f"conf/{group} is empty"


def test_data_root_follows_environment(monkeypatch, tmp_path: Path):
    monkeypatch.setenv("PROMPTBENCH_DATA", str(tmp_path))
    cfg = compose_with(["dataset=folder"])
    assert cfg.dataset.root == f"{tmp_path}/folder"


def test_unknown_option_lists_valid_choices(run_env):
    result = run_py(["method=no_such_method"], run_env)
    assert result.returncode != 0
    assert "Available options" in result.stderr and "zeroshot" in result.stderr


@pytest.mark.parametrize("method", ["coop", "cocoop"])
def test_cached_views_follow_the_runs_train_crop_scale(method, tiny_backbone):
    # Cached views replace the online augmentation, so they must crop like it (a dataset's own scale included).
    cfg = compose_with([f"method={method}", "method.views.n=2", "train_crop_scale=[0.5,1.0]"])
    assert list(cfg.method.views.scale) == [0.5, 1.0]
    assert list(compose_with([f"method={method}", "dataset=synthetic_shades"]).method.views.scale) == [0.5, 1.0]
    built = build_method(method, tiny_backbone, ["a", "b"], ["{}."], overrides=["method.views.n=2",
                                                                                "train_crop_scale=[0.5,1.0]"])
    assert built.contract().train_views == Views(2, (0.5, 1.0))


@pytest.mark.parametrize("path", sorted((CONF / "experiment_method").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_experiment_method_file_names_a_real_pair_and_applies(path: Path):
    # The file is picked by name (`${experiment}_${method}`): a misspelt one would silently never apply.
    pairs = {f"{experiment}_{method}": (experiment, method)
             for experiment in options("experiment") for method in options("method")}
    assert path.stem in pairs, f"{path.name} is not <experiment>_<method> of existing configs"
    experiment, method = pairs[path.stem]
    cfg = compose_with([f"experiment={experiment}", f"method={method}"])

    def leaves(node, prefix=""):
        if not isinstance(node, dict):
            return [(prefix, node)]
        return [leaf for key, value in node.items() for leaf in leaves(value, f"{prefix}.{key}" if prefix else key)]

    settings = leaves({key: value for key, value in OmegaConf.to_container(OmegaConf.load(path)).items()
                       if key != "defaults"})
    for parent in OmegaConf.to_container(OmegaConf.load(path)).get("defaults", []):
        settings += leaves(OmegaConf.to_container(OmegaConf.load(path.with_name(f"{parent}.yaml"))))
    assert settings
    for key, value in settings:
        if isinstance(value, str) and "${" in value:  # an interpolation: its value in the composed run's context
            probe = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False) | {"interpolated_setting": value})
            value = probe.interpolated_setting
        assert OmegaConf.select(cfg, key) == value, f"{path.name}: {key} not applied"
