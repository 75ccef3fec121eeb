"""Entry point: `python run.py method=coop dataset=dtd backbone=rn50 shots=16 -m seed=1,2,3`."""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from promptbench.errors import PromptbenchError

failed_jobs: list[str] = []
# The payloads of this process's jobs: a local sweep ends with one table of them.
finished_jobs: list[dict] = []


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    # Imported here, not at the top, so that `--help` and `--cfg` answer at once instead of loading torch.
    from promptbench.runner import record_failure, run

    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    try:
        finished_jobs.append(run(cfg, run_dir))
    except Exception as error:
        record_failure(cfg, run_dir, error)
        if hydra_cfg.mode != RunMode.MULTIRUN:
            if isinstance(error, PromptbenchError):
                print(f"\nerror: {error}", file=sys.stderr)
                sys.exit(2)
            raise
        # In a sweep one failing job must not take the others down: record it, carry on, fail at the end.
        print(f"\nerror in job {run_dir}: {type(error).__name__}: {error}", file=sys.stderr)
        failed_jobs.append(run_dir)


if __name__ == "__main__":
    main()
    if len(finished_jobs) + len(failed_jobs) > 1:
        from promptbench.runner import sweep_table

        print("\n" + sweep_table(finished_jobs))
    if failed_jobs:
        print(f"\n{len(failed_jobs)} job(s) failed; see results.json in:\n  " + "\n  ".join(failed_jobs), file=sys.stderr)
        sys.exit(1)
