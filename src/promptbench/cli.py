"""`promptbench`: the non-training commands. Training runs go through `python run.py ...` (Hydra)."""

from __future__ import annotations

import argparse
import sys

from promptbench.errors import PromptbenchError


def cmd_report(args: argparse.Namespace) -> None:
    from promptbench.report import aggregate, load_results, markdown_table

    print(markdown_table(aggregate(load_results(args.dirs), args.metric), args.metric))


def cmd_pretrain_mini(args: argparse.Namespace) -> None:
    import json
    import shutil
    from pathlib import Path

    from promptbench.backbones.backbone import BUNDLED_DIR
    from promptbench.pretrain import MINI_MODEL, PretrainConfig, pretrain, write_model_card, zero_shot_accuracies

    config = PretrainConfig(out_dir=args.out, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, workers=args.workers, threads=args.threads, device=args.device)
    weights = pretrain(config)
    accuracies = zero_shot_accuracies(weights, Path(args.out) / "data", device=args.device)
    trained = json.loads((Path(args.out) / "pretrain_config.json").read_text())
    write_model_card(Path(args.out) / "MODEL_CARD.md", trained, accuracies, weights)
    print(json.dumps(accuracies, indent=2))
    if args.install:
        BUNDLED_DIR.mkdir(parents=True, exist_ok=True)
        shutil.copy2(weights, BUNDLED_DIR / f"{MINI_MODEL}.safetensors")
        shutil.copy2(Path(args.out) / "MODEL_CARD.md", BUNDLED_DIR / "MODEL_CARD.md")
        print(f"installed into {BUNDLED_DIR}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="aggregate results.json files into a table (mean +- std over seeds)")
    report.add_argument("dirs", nargs="+", help="directories searched recursively for results.json")
    report.add_argument("--metric", default="top1", help="metric to tabulate (top1, mean_per_class, top5, ece)")
    report.set_defaults(handler=cmd_report)

    pre = commands.add_parser("pretrain-mini", help="pretrain the bundled mini CLIP on the synthetic world")
    pre.add_argument("--out", default="outputs/pretrain-mini", help="run folder (resumes from its checkpoint)")
    pre.add_argument("--steps", type=int, default=2000)
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--batch-size", type=int, default=256)
    pre.add_argument("--lr", type=float, default=5e-4)
    pre.add_argument("--workers", type=int, default=1, help="renderer processes (run at low priority)")
    pre.add_argument("--threads", type=int, default=2, help="torch threads for training")
    pre.add_argument("--device", default="cpu")
    pre.add_argument("--install", action="store_true", help="copy weights and model card into the package")
    pre.set_defaults(handler=cmd_pretrain_mini)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.handler(args)
    except PromptbenchError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
