"""`promptbench report` on hand-made results.json files: statistics, missing seeds, comparison, plots."""

from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import pytest

from promptbench.cli import main
from promptbench.report import aggregate, load_results, shot_curves


def write_result(root: Path, method: str, shots: int, seed: int, top1: float, dataset="dtd", protocol="fewshot",
                 evals: dict | None = None, selection: dict | None = None) -> None:
    run_dir = root / protocol / dataset / method / f"shots{shots}_seed{seed}"
    run_dir.mkdir(parents=True)
    metrics = evals or {"test": {"top1": top1, "mean_per_class": top1 - 1, "n": 100}}
    payload = {"status": "completed", "method": method, "dataset": dataset, "backbone": {"name": "rn50"},
               "protocol": protocol, "shots": shots, "seed": seed, "metrics": metrics,
               "selection": selection or {"policy": "fewshot_val", "selects": []}}
    (run_dir / "results.json").write_text(json.dumps(payload))


@pytest.fixture()
def results_dir(tmp_path) -> Path:
    root = tmp_path / "runs"
    for seed, value in ((1, 60.0), (2, 62.0), (3, 67.0)):
        write_result(root, "coop", 16, seed, value)
    for seed, value in ((1, 50.0), (3, 54.0)):  # seed 2 missing
        write_result(root, "coop", 1, seed, value)
    write_result(root, "zeroshot", 0, 1, 42.0)
    for seed in (1, 2):
        write_result(root, "coop", 16, seed, 0, dataset="dtd", protocol="base2new",
                     evals={"base": {"top1": 80.0 + seed}, "new": {"top1": 60.0 + seed}, "harmonic_mean": {"top1": 70.0}})
    write_result(root, "ship_coop", 16, 1, 0, dataset="dtd", protocol="generalized_zero_shot",
                 evals={"all": {"top1": 70.0}, "base": {"top1": 75.0}, "new": {"top1": 65.0},
                        "harmonic_mean": {"top1": 69.6}})
    (root / "broken").mkdir()
    (root / "broken" / "results.json").write_text(json.dumps({"status": "failed"}))
    return root


def test_mean_std_ci_and_missing_seeds(results_dir):
    rows = {(r.method, r.protocol, r.shots, r.eval_set): r for r in aggregate(load_results([results_dir]))}
    full = rows[("coop", "fewshot", 16, "test")]
    assert full.mean == pytest.approx(63.0)
    assert full.std == pytest.approx(statistics.pstdev([60, 62, 67]))
    assert full.ci95 == pytest.approx(4.303 * statistics.stdev([60, 62, 67]) / math.sqrt(3), rel=1e-3)
    partial = rows[("coop", "fewshot", 1, "test")]
    assert sorted(partial.values) == [1, 3]
    assert partial.ci95 == pytest.approx(12.706 * statistics.stdev([50, 54]) / math.sqrt(2), rel=1e-3)
    assert rows[("zeroshot", "fewshot", 0, "test")].ci95 is None
    assert rows[("coop", "base2new", 16, "base")].mean == pytest.approx(81.5)


def test_cli_writes_markdown_csv_and_plots(results_dir, tmp_path, capsys):
    published = tmp_path / "published.csv"
    published.write_text("method,dataset,backbone,protocol,shots,eval_set,top1\ncoop,dtd,rn50,fewshot,16,test,63.58\n")
    out = tmp_path / "report"
    assert main(["report", str(results_dir), "--ci95", "--compare", str(published), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| coop | dtd | rn50 | fewshot | - | 16 | test | 63.00 |" in printed
    records = list(csv.DictReader((out / "report.csv").open()))
    one_shot = next(r for r in records if r["shots"] == "1")
    assert one_shot["missing_seeds"] == "2" and one_shot["seeds"] == "2"
    # The base2new sweep ran seeds 1-2 only: it lacks no seed, though the few-shot rows have a seed 3.
    assert {r["missing_seeds"] for r in records if r["protocol"] == "base2new"} == {"-"}
    sixteen = next(r for r in records if r["shots"] == "16" and r["protocol"] == "fewshot")
    assert sixteen["published"] == "63.58" and sixteen["diff"] == "-0.58"
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert "top1_vs_shots_dtd_test_rn50.png" in pngs and "top1_base2new.png" in pngs
    # Generalized zero-shot gets its own base/new/HM/all bars, not accuracy-vs-shots curves.
    assert "top1_generalized_zero_shot.png" in pngs and not any("_all_" in name or "_new_" in name for name in pngs)
    assert all((out / name).stat().st_size > 1000 for name in pngs)
    assert (out / "report.md").read_text().startswith("| method |")


def test_zero_shot_is_a_reference_line_beside_the_shot_curves(results_dir):
    # As in the CoOp paper's curves: zero-shot (reported at 0 shots) is a horizontal line, not a point at 0 shots.
    test_rows = [r for r in aggregate(load_results([results_dir])) if r.protocol == "fewshot"]
    lines, references = shot_curves(test_rows)
    assert references == {"zeroshot": pytest.approx(42.0)}
    assert list(lines) == ["coop"]
    assert [(shots, mean) for shots, mean, _ in lines["coop"]] == [(1, pytest.approx(52.0)), (16, pytest.approx(63.0))]


TIP = {"policy": "fewshot_val", "selects": ["alpha", "beta"]}
TIP_F_ON_TEST = {"policy": "test_parity", "selects": ["epoch", "alpha", "beta"], "warning": "optimistic"}


def test_rows_selected_under_different_policies_are_not_compared_unless_asked(results_dir, tmp_path, capsys):
    write_result(results_dir, "tip_adapter", 16, 1, 61.0, selection=TIP)
    write_result(results_dir, "tip_adapter_f", 16, 1, 66.0, selection=TIP_F_ON_TEST)
    assert main(["report", str(results_dir), "--no-plots", "--out", str(tmp_path / "refused")]) == 2
    error = capsys.readouterr().err
    assert "dtd/test (rn50, fewshot, 16 shots)" in error and "fewshot_val: tip_adapter; test_parity: tip_adapter_f" in error
    assert "--mixed-selection" in error and not (tmp_path / "refused" / "report.md").exists()

    assert main(["report", str(results_dir), "--no-plots", "--mixed-selection", "--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    assert "| tip_adapter | dtd | rn50 | fewshot | fewshot_val | 16 | test | 61.00 |" in printed
    assert "| tip_adapter_f | dtd | rn50 | fewshot | test_parity | 16 | test | 66.00 |" in printed
    assert "test_parity chose their hyper-parameters or epoch on the test split" in printed


def test_a_test_parity_sweep_alone_is_reported_and_marked(tmp_path, capsys):
    root = tmp_path / "runs"
    write_result(root, "tip_adapter_f", 16, 1, 66.0, selection=TIP_F_ON_TEST)
    write_result(root, "coop", 16, 1, 60.0)  # selects nothing: comparable with any policy
    assert main(["report", str(root), "--no-plots"]) == 0
    printed = capsys.readouterr().out
    assert "| tip_adapter_f | dtd | rn50 | fewshot | test_parity | 16 | test | 66.00 |" in printed
    assert "optimistic, not clean few-shot numbers" in printed


def test_report_on_nothing_is_a_clear_error(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    assert "no completed results.json" in capsys.readouterr().err


def test_single_seed_rows_show_no_spread(results_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["report", str(results_dir), "--ci95", "--no-plots", "--out", str(out)]) == 0
    header = ("| method | dataset | backbone | protocol | selection | shots | eval_set | top1_mean | std | ci95 | seeds "
              "| missing_seeds |")
    printed = capsys.readouterr().out
    assert header in printed
    assert "| zeroshot | dtd | rn50 | fewshot | - | 0 | test | 42.00 | - | - | 1 | 2,3 |" in printed
    assert "| coop | dtd | rn50 | fewshot | - | 1 | test | 52.00 | 2.00 | " in printed
    assert printed.split("\n\nwritten:")[0] == (out / "report.md").read_text().rstrip("\n")
    zeroshot = next(r for r in csv.DictReader((out / "report.csv").open()) if r["method"] == "zeroshot")
    assert (zeroshot["std"], zeroshot["ci95"], zeroshot["seeds"]) == ("-", "-", "1")


MALFORMED = {"binary": b"\x89PNG\r\n\x1a\n\x00\x00", "empty": b"", "truncated": b'{"status": "completed", "met',
             "a list": b"[]", "no metrics": json.dumps({"status": "completed", "method": "coop"}).encode(),
             "backbone a string": json.dumps({"status": "completed", "method": "coop", "dataset": "dtd", "backbone": "rn50",
                                              "protocol": "fewshot", "shots": 1, "seed": 9, "metrics": {}}).encode(),
             "metric a string": json.dumps({"status": "completed", "method": "coop", "dataset": "dtd",
                                            "backbone": {"name": "rn50"}, "protocol": "fewshot", "shots": 1, "seed": 9,
                                            "metrics": {"test": {"top1": "99"}}}).encode()}


def write_failed(root: Path, name: str, message: str) -> Path:
    (root / name).mkdir(parents=True)
    error = {"type": "RuntimeError", "message": message, "traceback": "Traceback (most recent call last): ..."}
    (root / name / "results.json").write_text(json.dumps({"status": "failed", "error": error}))
    return root / name


def write_malformed(root: Path) -> list[Path]:
    paths = []
    for name, content in MALFORMED.items():
        (root / "bad" / name).mkdir(parents=True)
        paths.append(root / "bad" / name / "results.json")
        paths[-1].write_bytes(content)
    return paths


def test_malformed_files_are_skipped_by_name_and_failed_runs_listed(results_dir, tmp_path, capsys):
    malformed = write_malformed(results_dir)
    crashed = write_failed(results_dir, "crashed", "CUDA out of memory.\nTried to allocate 2.00 GiB")
    out = tmp_path / "report"
    assert main(["report", str(results_dir), "--no-plots", "--out", str(out)]) == 0
    captured = capsys.readouterr()
    for path in malformed:
        assert f"warning: skipped {path} is not a usable results file: " in captured.err
    assert "| coop | dtd | rn50 | fewshot | - | 16 | test | 63.00 |" in captured.out and "99.00" not in captured.out
    written = (out / "report.md").read_text()
    for text in (captured.out, written):
        assert "Failed runs (2):" in text and f"- {crashed}: RuntimeError: CUDA out of memory." in text
        assert f"- {results_dir / 'broken'}: no error message recorded" in text and "Tried to allocate" not in text


def test_a_report_without_usable_results_says_what_it_found(tmp_path, capsys):
    malformed = write_malformed(tmp_path)
    failed = write_failed(tmp_path, "failed", "boom")
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert (f"error: report: no completed results.json under {tmp_path}; found 1 failed run(s) and {len(malformed)} "
            f"malformed file(s), skipped above") in err
    assert f"- {failed}: RuntimeError: boom" in err and all(str(path) in err for path in malformed)
    assert not (tmp_path / "report.md").exists()
