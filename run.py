"""Entry point: `python run.py method=coop dataset=dtd backbone=rn50 shots=16 -m seed=1,2,3`."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from promptbench.config import register_resolvers
from promptbench.errors import PromptbenchError
from promptbench.runner import run

register_resolvers()


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except PromptbenchError as error:
        print(f"\nerror: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
