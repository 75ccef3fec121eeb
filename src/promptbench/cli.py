"""`promptbench`: the non-training commands. Training runs go through `python run.py ...` (Hydra)."""

from __future__ import annotations

import argparse
import sys

from promptbench import paths
from promptbench.errors import PromptbenchError


def cmd_report(args: argparse.Namespace) -> None:
    from promptbench.report import report

    print(report(args.dirs, out_dir=args.out, metric=args.metric, with_ci=args.ci95, compare=args.compare,
                 plots=not args.no_plots, mixed_selection=args.mixed_selection))
    print(f"\nwritten: {args.out or args.dirs[0]}/report.md, report.csv" + ("" if args.no_plots else " and plots"))


def cmd_pretrain_mini(args: argparse.Namespace) -> None:
    import json
    from pathlib import Path

    from promptbench.io import write_json_atomic
    from promptbench.tools.pretrain import (BUNDLED_MODELS, PretrainConfig, card_json, model_card, pretrain,
                                            write_model_card, zero_shot_accuracies)

    out = Path(args.out) if args.out else paths.output_root() / "pretrain-mini"
    config = PretrainConfig(out_dir=str(out), model=args.model, text_tower_from=args.text_tower_from,
                            precision=args.precision, seed=args.seed, steps=args.steps, batch_size=args.batch_size,
                            lr=args.lr, workers=args.workers, threads=args.threads, device=args.device)
    weights = pretrain(config)
    accuracies = zero_shot_accuracies(weights, out / "data", device=args.device, model=args.model)
    trained = json.loads((out / "pretrain_config.json").read_text())
    card, card_md = out / card_json(args.model), out / model_card(args.model)
    write_json_atomic(card, {"pretrain": trained, "zero_shot_top1": accuracies})
    write_model_card(card_md, trained, accuracies, weights)
    backbone = BUNDLED_MODELS[args.model]["backbone"]
    print(json.dumps(accuracies, indent=2))
    print(f"\nwritten: {weights}, {card}, {card_md}\n"
          f"use these weights: python run.py backbone={backbone} backbone.pretrained={weights.resolve()}\n"
          f"to ship them as the bundled {backbone} (maintainers): copy the three files into src/promptbench/assets/; "
          f"tests/test_mini.py then holds the weights to the new card's zero-shot accuracies.")


def cmd_interpret(args: argparse.Namespace) -> None:
    from promptbench.methods.prompt_learner import interpret_learned

    print(interpret_learned(args.path, backbone_config=args.backbone_config, top_k=args.top_k))


# ---- `promptbench cache ls|rm`: inspect and prune the feature cache -----------------------------------
def _feature_store(args: argparse.Namespace):
    from promptbench.data.features import FeatureStore

    return FeatureStore(args.root or paths.feature_cache_dir())


def _human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


def cmd_cache_ls(args: argparse.Namespace) -> None:
    store = _feature_store(args)
    entries = store.entries()
    print(f"feature cache {store.root}: {len(entries)} entries, {_human_size(sum(e.size_bytes for e in entries))}")
    if entries:
        print(f"{'digest':<12} {'modified':<16} {'size':>10} {'n x dim':>12}  {'backbone':<36} {'precision':<10} what")
    for entry in sorted(entries, key=lambda e: e.modified):
        shape = f"{entry.count}x{entry.dim}" if entry.count is not None else "?"
        print(f"{entry.digest[:12]:<12} {entry.modified:%Y-%m-%d %H:%M} {_human_size(entry.size_bytes):>10} {shape:>12}  "
              f"{str(entry.key.get('backbone', '?')):<36} {str(entry.key.get('precision', '?')):<10} {entry.summary()}")
    leftovers = store.leftovers()
    if leftovers:
        print(f"{len(leftovers)} files left by killed extractions (`promptbench cache rm --all` removes them)")


def cmd_cache_rm(args: argparse.Namespace) -> None:
    import time
    from datetime import datetime

    if not (args.all or args.older_than is not None or args.backbone or args.digests):
        raise PromptbenchError("cache rm: say what to remove: --all, --older-than DAYS, --backbone NAME or DIGEST...")
    store = _feature_store(args)
    entries = store.entries()
    if args.digests:
        chosen = []
        for prefix in args.digests:
            matches = [e for e in entries if e.digest.startswith(prefix)]
            if len(matches) != 1:
                found = "no entry" if not matches else f"{len(matches)} entries"
                raise PromptbenchError(f"cache rm: digest '{prefix}' matches {found} in {store.root} (see `promptbench cache ls`)")
            chosen += matches
        entries = chosen
    if args.older_than is not None:
        cutoff = datetime.fromtimestamp(time.time() - args.older_than * 86400)
        entries = [e for e in entries if e.modified < cutoff]
    if args.backbone:
        entries = [e for e in entries if args.backbone in str(e.key.get("backbone", ""))]
    for entry in entries:
        store.remove(entry)
    leftovers = store.leftovers() if args.all else []
    for path in leftovers:
        path.unlink(missing_ok=True)
    print(f"removed {len(entries)} entries ({_human_size(sum(e.size_bytes for e in entries))})"
          + (f" and {len(leftovers)} files left by killed extractions" if leftovers else "") + f" from {store.root}")


def add_cache_parser(commands) -> None:
    cache = commands.add_parser("cache", help="list or prune the frozen-feature cache")
    actions = cache.add_subparsers(dest="cache_command", required=True)
    root_help = f"cache folder (default: a run's paths.feature_cache_dir, here {paths.feature_cache_dir().resolve()})"
    ls = actions.add_parser("ls", help="table of cached feature sets: key summary, size, date")
    ls.add_argument("--root", help=root_help)
    ls.set_defaults(handler=cmd_cache_ls)
    rm = actions.add_parser("rm", help="remove cached feature sets (filters combine: all must match)")
    rm.add_argument("--root", help=root_help)
    rm.add_argument("--all", action="store_true", help="every entry, and temporary files of killed extractions")
    rm.add_argument("--older-than", type=float, metavar="DAYS", help="entries last written more than DAYS ago")
    rm.add_argument("--backbone", metavar="NAME", help="entries whose backbone fingerprint contains NAME")
    rm.add_argument("digests", nargs="*", metavar="DIGEST", help="entries by digest (a unique prefix is enough)")
    rm.set_defaults(handler=cmd_cache_rm)


def cmd_data_check(args: argparse.Namespace) -> None:
    from promptbench.data.datasets.check import check_dataset

    report = check_dataset(args.dataset, args.root)
    print(report.text())
    if report.problems:
        raise PromptbenchError(
            f"dataset '{args.dataset}' at {report.root}: {len(report.problems)} missing or unreadable image(s), listed "
            f"above. Restore them, or run with dataset.skip_bad_images=true to skip unreadable ones."
        )
    print("ok")


def cmd_data_splits(args: argparse.Namespace) -> None:
    import random
    from collections import Counter
    from pathlib import Path

    from promptbench.data.datasets import DATASETS, open_dataset

    if args.dataset not in DATASETS:
        raise PromptbenchError(f"unknown dataset '{args.dataset}'; registered datasets: {sorted(DATASETS)}")
    # Seeded exactly as a run seeds itself before building its data, so this prints the split that run trains on.
    random.seed(args.seed)
    dataset = (DATASETS[args.dataset](Path(args.root)) if args.root
               else open_dataset(args.dataset, paths.data_root()))
    train, val = dataset.fewshot_splits(args.shots, args.seed)
    for split, items in (("train", train), ("val", val)):
        per_class = Counter(item.label for item in items)
        print(f"{split}: {len(items)} images, {len(per_class)} classes, "
              f"{min(per_class.values(), default=0)}-{max(per_class.values(), default=0)} per class")
        if args.list:
            for item in items:
                print(f"  {item.label}\t{item.classname}\t{item.path}")


def add_data_parser(commands) -> None:
    root_help = f"the dataset folder (default: its folder under a run's data_root, here {paths.data_root().resolve()})"
    data = commands.add_parser("data", help="inspect the benchmark datasets on disk")
    actions = data.add_subparsers(dest="data_command", required=True)
    check = actions.add_parser("check", help="check a dataset folder: layout, images per split and class, bad files")
    check.add_argument("dataset", help="registry name, e.g. dtd, imagenet, oxford_pets (see conf/dataset/)")
    check.add_argument("--root", help=root_help)
    check.set_defaults(handler=cmd_data_check)
    splits = actions.add_parser("splits", help="write (or re-use) and print the few-shot split of (K, seed)")
    splits.add_argument("dataset", help="registry name, e.g. dtd, imagenet, synthetic_shapes")
    splits.add_argument("--shots", type=int, required=True)
    splits.add_argument("--seed", type=int, required=True)
    splits.add_argument("--root", help=root_help)
    splits.add_argument("--list", action="store_true", help="print every item (label, class name, path)")
    splits.set_defaults(handler=cmd_data_splits)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="promptbench", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    report = commands.add_parser("report", help="aggregate results.json files into a table (mean +- std over seeds)")
    report.add_argument("dirs", nargs="+", help="directories searched recursively for results.json")
    report.add_argument("--metric", default="top1", help="metric to tabulate (top1, mean_per_class, top5, ece, robust_top1)")
    report.add_argument("--ci95", action="store_true", help="add the 95%% confidence interval over seeds")
    report.add_argument("--compare", metavar="CSV", help="published numbers to compare with (experiments/published.csv)")
    report.add_argument("--out", help="where report.md, report.csv and the plots go (default: the first dir)")
    report.add_argument("--no-plots", action="store_true", help="tables only")
    report.add_argument("--mixed-selection", action="store_true",
                        help="allow rows selected under different policies (selection=...) in one comparison")
    report.set_defaults(handler=cmd_report)

    pre = commands.add_parser("pretrain-mini", help="pretrain the bundled mini CLIP on the synthetic world")
    pre.add_argument("--out", help="run folder, resumed from its checkpoint; weights and model card land in it "
                                   "(default: <paths.output_root>/pretrain-mini)")
    pre.add_argument("--steps", type=int, default=2000, help="the shipped weights: 2000 (about 28 min on 2 CPU cores)")
    pre.add_argument("--model", default="promptbench-mini",
                     choices=["promptbench-mini", "promptbench-mini-vit"],
                     help="the bundled model to train: promptbench-mini (ResNet) or promptbench-mini-vit (ViT)")
    pre.add_argument("--text-tower-from", metavar="WEIGHTS",
                     help="initialise the text tower from these weights and keep it frozen (mini_vit: the bundled mini)")
    pre.add_argument("--precision", choices=["bf16", "fp32"], default="bf16",
                     help="bf16 autocast suits the ResNet; on CPUs without bf16 matmuls a ViT is ~15x faster in fp32")
    pre.add_argument("--seed", type=int, default=0)
    pre.add_argument("--batch-size", type=int, default=256)
    pre.add_argument("--lr", type=float, default=5e-4)
    pre.add_argument("--workers", type=int, default=1, help="renderer processes (run at low priority)")
    pre.add_argument("--threads", type=int, default=2, help="torch threads for training")
    pre.add_argument("--device", default="cpu")
    pre.set_defaults(handler=cmd_pretrain_mini)

    interpret = commands.add_parser("interpret", help="nearest vocabulary words of learned prompt context (CoOp, CoCoOp)")
    interpret.add_argument("path", help="learned.safetensors (with its .json sidecar) or a Lightning .ckpt")
    interpret.add_argument("--backbone-config", help="conf/backbone/<name>.yaml, when the file does not name its backbone")
    interpret.add_argument("--top-k", type=int, default=5, help="words per context vector")
    interpret.set_defaults(handler=cmd_interpret)
    add_cache_parser(commands)
    add_data_parser(commands)
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
