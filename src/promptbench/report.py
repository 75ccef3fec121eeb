"""Aggregate many results.json into tables and plots.

Rows are grouped by (method, dataset, backbone, protocol, selection, shots, eval set) and report the mean and the
standard deviation over seeds (population std, as the CoOp-family tables do), optionally a 95%
confidence interval (Student t over seeds), the seed count and the seeds missing from a row compared
with the seeds present in the rows of the same setting (dataset, backbone, protocol): a one-seed sweep
beside a three-seed one in the same report is not short of seeds.

`selection` is the run's model-selection policy (selection.py) for a method that selects something, "-" for
one that selects nothing. Rows compared with each other (same dataset, backbone, protocol, shots and eval
set) must share one policy: a report that would put, say, a test-selected Tip-Adapter-F beside a
few-shot-val one is refused unless asked for (`mixed_selection`).
"""

from __future__ import annotations

import csv
import io
import math
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from promptbench.errors import PromptbenchError
from promptbench.io import atomic_path
from promptbench.results import RESULTS_FILE, MalformedResults, read_results

GROUP_KEYS = ("method", "dataset", "backbone", "protocol", "selection", "shots", "eval_set")
# Published numbers are keyed without the policy (the papers' own).
PUBLISHED_KEYS = tuple(key for key in GROUP_KEYS if key != "selection")
NO_SELECTION = "-"
# Protocols reported as base/new/harmonic-mean bars (one chart each, with its title) rather than accuracy-vs-shots.
BAR_PROTOCOLS = {"base2new": "base-to-new", "generalized_zero_shot": "generalized zero-shot"}


@dataclass
class Row:
    key: tuple
    values: dict[int, float] = field(default_factory=dict)  # seed -> metric
    published: float | None = None

    def __getattr__(self, name: str):
        if name in GROUP_KEYS:
            return self.key[GROUP_KEYS.index(name)]
        raise AttributeError(name)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values.values())

    @property
    def std(self) -> float:
        return statistics.pstdev(self.values.values()) if len(self.values) > 1 else 0.0

    @property
    def ci95(self) -> float | None:
        """Half-width of the 95% confidence interval of the mean over seeds (None for one seed)."""
        n = len(self.values)
        if n < 2:
            return None
        from scipy.stats import t

        return float(t.ppf(0.975, n - 1) * statistics.stdev(self.values.values()) / math.sqrt(n))


@dataclass
class FailedRun:
    directory: Path
    error: str  # the first line of its error message


@dataclass
class FoundResults:
    completed: list[dict]
    failed: list[FailedRun]


def failed_runs_text(failed: list[FailedRun]) -> str:
    return "\n".join([f"Failed runs ({len(failed)}):"] + [f"- {run.directory}: {run.error}" for run in failed])


def first_error_line(failed: dict) -> str:
    error = failed.get("error", {})
    lines = str(error.get("message") or "").strip().splitlines()
    return f"{error.get('type', 'error')}: {lines[0]}" if lines else "no error message recorded"


def find_results(dirs: Sequence[str | Path]) -> FoundResults:
    """Every run record under `dirs`. A malformed file is skipped with a warning that names it; a report
    without a single completed run is an error that says what was found instead."""
    found = FoundResults([], [])
    malformed = 0
    for directory in dirs:
        directory = Path(directory)
        if not directory.exists():
            raise PromptbenchError(f"report: no such directory {directory}")
        for path in sorted(directory.rglob(RESULTS_FILE)):
            try:
                result = read_results(path)
            except MalformedResults as error:
                print(f"warning: skipped {error}", file=sys.stderr)
                malformed += 1
                continue
            if result is None:  # a folder of that name
                continue
            if result["status"] == "completed":
                found.completed.append(result)
            else:
                found.failed.append(FailedRun(path.parent, first_error_line(result)))
    if not found.completed:
        seen = []
        if found.failed:
            seen.append(f"{len(found.failed)} failed run(s)")
        if malformed:
            seen.append(f"{malformed} malformed file(s), skipped above")
        raise PromptbenchError(
            f"report: no completed {RESULTS_FILE} under {', '.join(map(str, dirs))}; found "
            + (" and ".join(seen) if seen else f"no {RESULTS_FILE} at all")
            + (f"\n{failed_runs_text(found.failed)}" if found.failed else ""))
    return found


def load_results(dirs: Sequence[str | Path]) -> list[dict]:
    """The completed runs under `dirs` (see `find_results`)."""
    return find_results(dirs).completed


def _sort_key(key: tuple) -> tuple:
    return tuple(str(part) for part in key[:5]) + (int(key[5]), str(key[6]))


def selection_label(result: dict) -> str:
    """The policy of a run whose method selects something; "-" when it selects nothing."""
    record = result.get("selection")
    if not isinstance(record, dict):
        return "unrecorded"  # written before the policy existed
    return str(record.get("policy")) if record.get("selects") else NO_SELECTION


def aggregate(results: Iterable[dict], metric: str = "top1") -> list[Row]:
    rows: dict[tuple, Row] = {}
    for result in results:
        for eval_set, metrics in result["metrics"].items():
            if metric not in metrics:
                continue
            key = (result["method"], result["dataset"], result["backbone"]["name"], result["protocol"],
                   selection_label(result), int(result["shots"]), eval_set)
            rows.setdefault(key, Row(key)).values[int(result["seed"])] = float(metrics[metric])
    return [rows[key] for key in sorted(rows, key=_sort_key)]


def attach_published(rows: list[Row], published_csv: str | Path) -> None:
    """Fill `Row.published` from a CSV with the GROUP_KEYS columns and a `top1` column."""
    path = Path(published_csv)
    if not path.is_file():
        raise PromptbenchError(f"report --compare: no such file {path}")
    with path.open(newline="") as handle:
        table = {
            tuple(line[k] for k in PUBLISHED_KEYS): float(line["top1"])
            for line in csv.DictReader(handle)
        }
    for row in rows:
        row.published = table.get(tuple(str(getattr(row, key)) for key in PUBLISHED_KEYS))


def setting(row: Row) -> tuple:
    return row.dataset, row.backbone, row.protocol


def refuse_mixed_selection(rows: list[Row]) -> None:
    """Rows compared with each other must have chosen their hyper-parameters on the same kind of data."""
    policies: dict[tuple, dict[str, set[str]]] = {}
    for row in rows:
        if row.selection != NO_SELECTION:
            comparison = (row.dataset, row.backbone, row.protocol, row.shots, row.eval_set)
            policies.setdefault(comparison, {}).setdefault(row.selection, set()).add(row.method)
    for (dataset, backbone, protocol, shots, eval_set), by_policy in sorted(policies.items(), key=str):
        if len(by_policy) > 1:
            found = "; ".join(f"{policy}: {', '.join(sorted(methods))}" for policy, methods in sorted(by_policy.items()))
            raise PromptbenchError(
                f"report: {dataset}/{eval_set} ({backbone}, {protocol}, {shots} shots) has rows whose hyper-parameters "
                f"were selected under different policies ({found}), which is not a fair comparison. Report the runs "
                f"of each policy apart (pass their directories separately), rerun them with one selection=<policy>, "
                f"or pass --mixed-selection to show them side by side (the selection column tells them apart)")


def series(row: Row) -> str:
    """A plot line's name: the method, with its policy when that is not the default one."""
    return row.method if row.selection in (NO_SELECTION, "fewshot_val") else f"{row.method} [{row.selection}]"


def seeds_by_setting(rows: list[Row]) -> dict[tuple, set[int]]:
    seeds: dict[tuple, set[int]] = {}
    for row in rows:
        seeds.setdefault(setting(row), set()).update(row.values)
    return seeds


def table_records(rows: list[Row], metric: str = "top1", with_ci: bool = False) -> list[dict[str, str]]:
    seeds = seeds_by_setting(rows)
    compare = any(row.published is not None for row in rows)
    records = []
    for row in rows:
        record = {key: str(value) for key, value in zip(GROUP_KEYS, row.key)}
        record[f"{metric}_mean"] = f"{row.mean:.2f}"
        # One seed has no spread to report: "-" rather than a std of 0.00 that reads as a measured one.
        record["std"] = f"{row.std:.2f}" if len(row.values) > 1 else "-"
        if with_ci:
            record["ci95"] = "-" if row.ci95 is None else f"{row.ci95:.2f}"
        record["seeds"] = str(len(row.values))
        record["missing_seeds"] = ",".join(map(str, sorted(seeds[setting(row)] - set(row.values)))) or "-"
        if compare:
            record["published"] = "-" if row.published is None else f"{row.published:.2f}"
            record["diff"] = "-" if row.published is None else f"{row.mean - row.published:+.2f}"
        records.append(record)
    return records


def markdown(records: list[dict[str, str]]) -> str:
    header = list(records[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(record[column] for column in header) + " |" for record in records]
    return "\n".join(lines)


def csv_text(records: list[dict[str, str]]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(records[0]))
    writer.writeheader()
    writer.writerows(records)
    return buffer.getvalue()


def write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def shot_curves(rows: list[Row]) -> tuple[dict[str, list[tuple[int, float, float]]], dict[str, float]]:
    """One panel's content: per series, its (shots, mean, std) points in shot order, and the references:
    series reported at 0 shots only (zero-shot), drawn as horizontal lines as in the CoOp paper's curves."""
    lines: dict[str, list[tuple[int, float, float]]] = {}
    references: dict[str, float] = {}
    for method in sorted({series(r) for r in rows}):
        line = sorted((r for r in rows if series(r) == method), key=lambda r: r.shots)
        if [r.shots for r in line] == [0]:
            references[method] = line[0].mean
        else:
            lines[method] = [(r.shots, r.mean, r.std) for r in line]
    return lines, references


def draw_references(axis, references: dict[str, float], lines: dict[str, list[tuple[int, float, float]]]) -> None:
    """Zero-shot rows as dashed horizontal lines; a log2 shots axis labelled with the shots the curves have."""
    for method, mean in references.items():
        axis.axhline(mean, linestyle="--", color="black", linewidth=1.2, label=f"{method} ({mean:.1f})")
    shots = sorted({s for line in lines.values() for s, _, _ in line})
    if len(shots) > 1 and shots[0] > 0:
        axis.set_xscale("log", base=2)
        axis.set_xticks(shots, [str(s) for s in shots])


def plot(rows: list[Row], out_dir: Path, metric: str = "top1") -> list[Path]:
    """Accuracy vs shots per (dataset, backbone) and averaged over datasets; base/new/HM bars for base2new and
    generalized_zero_shot (one bar chart per protocol, `all` too for the latter)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written: list[Path] = []

    def save(figure, stem: str) -> None:
        for suffix in ("png", "svg"):
            path = out_dir / f"{stem}.{suffix}"
            with atomic_path(path) as tmp:
                figure.savefig(tmp, format=suffix, bbox_inches="tight", dpi=120)
            written.append(path)
        plt.close(figure)

    def curve_axes():
        figure, axis = plt.subplots(figsize=(6.5, 4.2))
        # Twenty distinct colours (the default cycle repeats after ten methods): tab20's dark shades, then its light.
        axis.set_prop_cycle(color=[plt.cm.tab20(i) for i in (*range(0, 20, 2), *range(1, 20, 2))])
        return figure, axis

    curves = [r for r in rows if r.protocol not in BAR_PROTOCOLS]
    panels = sorted({(r.dataset, r.backbone, r.protocol, r.eval_set) for r in curves})
    for dataset, backbone, protocol, eval_set in panels:
        figure, axis = curve_axes()
        selected = [r for r in curves if (r.dataset, r.backbone, r.protocol, r.eval_set) == (dataset, backbone, protocol, eval_set)]
        lines, references = shot_curves(selected)
        for method, line in lines.items():
            shots, means, stds = zip(*line)
            axis.plot(shots, means, marker="o", label=method)
            axis.fill_between(shots, [m - s for m, s in zip(means, stds)], [m + s for m, s in zip(means, stds)], alpha=0.2)
        draw_references(axis, references, lines)
        axis.set(xlabel="shots per class", ylabel=f"{metric} (%)", title=f"{dataset} / {eval_set} ({backbone})")
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
        save(figure, f"{metric}_vs_shots_{dataset}_{eval_set}_{backbone}".replace("/", "-"))

    datasets = {r.dataset for r in curves}
    if len(datasets) > 1:
        for backbone in sorted({r.backbone for r in curves}):
            figure, axis = curve_axes()
            lines, references = {}, {}
            for method in sorted({series(r) for r in curves if r.backbone == backbone}):
                by_shots: dict[int, list[float]] = {}
                for r in curves:
                    if series(r) == method and r.backbone == backbone and r.eval_set == "test":
                        by_shots.setdefault(r.shots, []).append(r.mean)
                complete = sorted(s for s, values in by_shots.items() if len(values) == len(datasets))
                if complete == [0]:
                    references[method] = statistics.fmean(by_shots[0])
                elif complete:
                    lines[method] = [(s, statistics.fmean(by_shots[s]), 0.0) for s in complete if s > 0]
            for method, line in lines.items():
                axis.plot([s for s, _, _ in line], [m for _, m, _ in line], marker="o", label=method)
            draw_references(axis, references, lines)
            axis.set(xlabel="shots per class", ylabel=f"mean {metric} over {len(datasets)} datasets (%)",
                     title=f"average ({backbone})")
            axis.grid(alpha=0.3)
            axis.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
            save(figure, f"{metric}_vs_shots_average_{backbone}")

    for protocol, title in BAR_PROTOCOLS.items():
        bars = [r for r in rows if r.protocol == protocol]
        if not bars:
            continue
        figure, axis = plt.subplots(figsize=(6, 3.6))
        groups = sorted({(series(r), r.dataset, r.backbone, r.shots) for r in bars})
        sets = [s for s in ("base", "new", "harmonic_mean", "all") if any(r.eval_set == s for r in bars)]
        width = 0.8 / max(1, len(sets))
        for offset, eval_set in enumerate(sets):
            heights = [next((r.mean for r in bars if (series(r), r.dataset, r.backbone, r.shots) == g and r.eval_set == eval_set), 0.0)
                       for g in groups]
            axis.bar([i + offset * width for i in range(len(groups))], heights, width, label=eval_set)
        axis.set_xticks([i + width * (len(sets) - 1) / 2 for i in range(len(groups))])
        axis.set_xticklabels([f"{m}\n{d}" for m, d, _, _ in groups], fontsize=7)
        axis.set(ylabel=f"{metric} (%)", title=title)
        axis.legend(fontsize=7)
        save(figure, f"{metric}_{protocol}")
    return written


def report(dirs: Sequence[str | Path], out_dir: str | Path | None = None, metric: str = "top1",
           with_ci: bool = False, compare: str | Path | None = None, plots: bool = True,
           mixed_selection: bool = False) -> str:
    found = find_results(dirs)
    rows = aggregate(found.completed, metric)
    if not rows:
        raise PromptbenchError(f"report: no results carry the metric '{metric}'")
    if not mixed_selection:
        refuse_mixed_selection(rows)
    if compare:
        attach_published(rows, compare)
    records = table_records(rows, metric, with_ci)
    text = markdown(records)
    if any(row.selection == "test_parity" for row in rows):
        text += ("\n\nRows with selection test_parity chose their hyper-parameters or epoch on the test split, as "
                 "their paper's code does: optimistic, not clean few-shot numbers.")
    if found.failed:
        text += "\n\n" + failed_runs_text(found.failed)
    out = Path(out_dir or dirs[0])
    write_text(out / "report.md", text + "\n")
    write_text(out / "report.csv", csv_text(records))
    if plots:
        plot(rows, out, metric)
    return text
