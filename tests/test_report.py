"""Bootstrap noise (:mod:`avmt.bootstrap`) and ``python -m avmt report transfer`` on hand-written grid folders."""

from __future__ import annotations

import csv
import json
import math
import random
from pathlib import Path

import pytest
import torch
import yaml

from avmt.bootstrap import bootstrap_std
from avmt.grid import GRID_JSON, load_grid
from avmt.report import (GAIN, LOSS, NO_NOISE, WITHIN_NOISE, delta_noise, verdict, write_transfer_report)
from avmt.tasks import get_task

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"

# adapter -> task -> (multi score, single score); bootstrap std 0.02 for every score, so the noise of a
# delta is sqrt(2)·0.02 = 0.0283 and it is significant beyond 0.0566
SCORES = {
    "lora": {"avqa": (0.60, 0.50), "action": (0.50, 0.52)},  # gain (+0.10), within noise (-0.02)
    "ilora": {"avqa": (0.40, 0.50), "action": (0.55, 0.50)},  # loss (-0.10), within noise (+0.05)
}
BOOTSTRAP_STD = 0.02


def test_bootstrap_std_of_half_right_accuracy_is_the_binomial_standard_error():
    """Accuracy of [1, 1, 0, 0]: a resample's accuracy is Binomial(4, 1/2) / 4, std sqrt(p(1-p)/n) = 0.25."""
    task = get_task("action")
    answers = ["static"] * 4
    predictions = ["static", "static", "pulsing", "pulsing"]
    python_state, torch_state = random.getstate(), torch.get_rng_state()
    stds = bootstrap_std(task, predictions, answers, resamples=1000, seed=0)
    assert random.getstate() == python_state and torch.equal(torch.get_rng_state(), torch_state)
    assert set(stds) == set(task.metrics().keys())
    assert stds["accuracy"] == pytest.approx(math.sqrt(0.5 * 0.5 / 4), abs=0.02)
    assert stds["parse_failure_rate"] == 0.0
    assert bootstrap_std(task, predictions, answers, resamples=20, seed=3) == bootstrap_std(
        task, predictions, answers, resamples=20, seed=3)


def test_bootstrap_std_is_zero_when_every_answer_is_right_and_empty_without_resamples():
    task = get_task("action")
    answers = ["static", "pulsing", "moving up"]
    assert bootstrap_std(task, answers, answers, resamples=50)["accuracy"] == 0.0
    assert bootstrap_std(task, answers, answers, resamples=0) == {}
    with pytest.raises(ValueError, match="2 predictions for 3 answers"):
        bootstrap_std(task, answers[:2], answers, resamples=5)


def test_noise_of_a_delta_with_one_and_several_seeds():
    assert delta_noise([0.1], [0.02**2 + 0.02**2]) == pytest.approx(math.sqrt(0.0008))
    assert delta_noise([0.1], [None]) is None
    # two seeds: (std of the deltas)² / 2 + the mean bootstrap variance of one delta
    assert delta_noise([0.1, 0.2], [0.0008, 0.0008]) == pytest.approx(math.sqrt(0.005 / 2 + 0.0008))
    assert delta_noise([0.1, 0.2], [0.0008, None]) == pytest.approx(math.sqrt(0.005 / 2))
    assert [verdict(0.1, 0.04), verdict(-0.1, 0.04), verdict(0.07, 0.04), verdict(0.1, None)] == [
        GAIN, LOSS, WITHIN_NOISE, NO_NOISE]


def results_entry(score: float, metric: str, bootstrap: bool = True) -> dict:
    """A results-file entry as MetricsReport writes it (parse-failure rate first: the default main metric skips it)."""
    entry = {"scores": {"parse_failure_rate": 0.0, metric: score}, "baseline": {metric: 0.2},
             "baseline_name": "majority", "samples": 100}
    if bootstrap:
        entry["bootstrap_std"] = {"parse_failure_rate": 0.0, metric: BOOTSTRAP_STD}
    return entry


def write_grid_folder(out: Path, bootstrap: bool = True) -> Path:
    """A grid folder of adapter x tasks (multi, avqa, action), one seed, with grid.json and fit + test results."""
    runs = []
    for adapter, tasks in SCORES.items():
        for variant in ("multi", *tasks):
            name = f"adapter-{adapter}__tasks-{variant}__seed-0"
            runs.append({"name": name, "values": {"adapter": adapter, "tasks": variant}, "seed": "0"})
            test_results = {task: results_entry(multi if variant == "multi" else single, "accuracy", bootstrap)
                            for task, (multi, single) in tasks.items() if variant in ("multi", task)}
            # validation results differ: the report must prefer the test results
            val_results = {task: results_entry(0.99, "accuracy", bootstrap) for task in test_results}
            for command, results in (("fit", val_results), ("test", test_results)):
                folder = out / name / command
                folder.mkdir(parents=True)
                (folder / f"{'test' if command == 'test' else 'val'}_metrics.json").write_text(json.dumps(results))
    (out / GRID_JSON).write_text(json.dumps({
        "name": "transfer", "path": "experiments/grids/transfer.yaml", "axes": ["adapter", "tasks"],
        "commands": ["fit", "test"], "main_metrics": {"avqa": "accuracy"},
        "transfer": {"axis": "tasks", "multi": "multi"}, "runs": runs,
    }))
    return out


def test_transfer_report_deltas_verdicts_percentages_and_files(tmp_path):
    out = write_grid_folder(tmp_path / "grid")
    markdown = write_transfer_report(out)
    rows = list(csv.DictReader((out / "transfer.csv").read_text().splitlines()))
    found = {(row["adapter"], row["task"]): row for row in rows}
    assert set(found) == {(a, t) for a in SCORES for t in SCORES[a]}
    expected_verdicts = {("lora", "avqa"): GAIN, ("lora", "action"): WITHIN_NOISE,
                         ("ilora", "avqa"): LOSS, ("ilora", "action"): WITHIN_NOISE}
    for (adapter, task), row in found.items():
        multi, single = SCORES[adapter][task]
        assert row["metric"] == "accuracy" and row["stage"] == "test" and row["seeds"] == "1"
        assert float(row["multi"]) == pytest.approx(multi) and float(row["single"]) == pytest.approx(single)
        assert float(row["delta"]) == pytest.approx(multi - single)
        assert float(row["noise"]) == pytest.approx(math.sqrt(2) * BOOTSTRAP_STD, rel=1e-4)
        assert row["verdict"] == expected_verdicts[adapter, task]
    assert "| adapter=lora | 2 | 50% (1/2) | 50% (1/2) | 0% (0/2) | +0.0400 |" in markdown
    assert "| adapter=ilora | 2 | 50% (1/2) | 0% (0/2) | 50% (1/2) | -0.0250 |" in markdown
    assert "**Positive transfer on 50% (1/2) of the tasks**" in markdown
    assert (out / "transfer.md").read_text() == markdown
    plot = out / "plots" / "transfer_deltas.png"
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"


def test_transfer_report_without_bootstrap_says_the_noise_is_unknown(tmp_path):
    out = write_grid_folder(tmp_path / "grid", bootstrap=False)
    write_transfer_report(out)
    rows = list(csv.DictReader((out / "transfer.csv").read_text().splitlines()))
    assert {row["verdict"] for row in rows} == {NO_NOISE} and {row["noise"] for row in rows} == {""}
    assert "| avqa | accuracy | test | 1 | 0.6000 | 0.5000 | +0.1000 | n/a | n/a |" in (out / "transfer.md").read_text()


def test_report_command_prints_the_table_and_exits_2_without_a_grid_or_a_pair(tmp_path, capsys):
    from avmt.cli import main

    main(["report", "transfer", str(write_grid_folder(tmp_path / "grid"))])
    assert "| adapter=lora | 2 | 50% (1/2) |" in capsys.readouterr().out
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SystemExit) as raised:
        main(["report", "transfer", str(empty)])
    error = capsys.readouterr().err
    assert raised.value.code == 2 and "no grid.json" in error and error.count("\n") == 1
    (empty / GRID_JSON).write_text(json.dumps({"name": "t", "axes": ["tasks"], "commands": ["test"],
                                               "transfer": {"axis": "tasks", "multi": "multi"},
                                               "runs": [{"name": "tasks-multi", "values": {"tasks": "multi"},
                                                         "seed": None}]}))
    with pytest.raises(SystemExit) as raised:
        main(["report", "transfer", str(empty)])
    assert raised.value.code == 2 and "no finished multi-task/single-task pair" in capsys.readouterr().err


def write_grid_file(path: Path, transfer: dict) -> Path:
    path.write_text(yaml.safe_dump({
        "base": [str(EXPERIMENTS / "base.yaml")],
        "axes": {"tasks": {"variants": {"multi": {"overrides": {"data.tasks": ["ave", "avqa"]}},
                                        "ave": {"overrides": {"data.tasks": ["ave"]}},
                                        "avqa": {"overrides": {"data.tasks": ["avqa"]}}}}},
        "transfer": transfer,
    }))
    return path


def test_load_grid_checks_the_transfer_section(tmp_path):
    grid = load_grid(write_grid_file(tmp_path / "good.yaml", {"axis": "tasks", "multi": "multi"}))
    assert grid.transfer == {"axis": "tasks", "multi": "multi"}
    with pytest.raises(ValueError, match=r"bad_axis\.yaml: key 'transfer': axis 'task' is not an axis"):
        load_grid(write_grid_file(tmp_path / "bad_axis.yaml", {"axis": "task", "multi": "multi"}))
    with pytest.raises(ValueError, match=r"key 'transfer': multi 'all' is not a variant of axis 'tasks'"):
        load_grid(write_grid_file(tmp_path / "bad_multi.yaml", {"axis": "tasks", "multi": "all"}))
    with pytest.raises(ValueError, match=r"key 'transfer' must be a mapping with exactly the keys axis, multi"):
        load_grid(write_grid_file(tmp_path / "bad_keys.yaml", {"axis": "tasks"}))


def test_transfer_report_averages_seeds_and_adds_their_spread_to_the_noise(tmp_path):
    out = tmp_path / "grid"
    runs = []
    for seed, (multi, single) in {"0": (0.6, 0.5), "1": (0.7, 0.5)}.items():
        for variant, score in (("multi", multi), ("avqa", single)):
            name = f"tasks-{variant}__seed-{seed}"
            runs.append({"name": name, "values": {"tasks": variant}, "seed": seed})
            (out / name / "test").mkdir(parents=True)
            (out / name / "test" / "test_metrics.json").write_text(json.dumps({"avqa": results_entry(score, "accuracy")}))
    (out / GRID_JSON).write_text(json.dumps({"name": "seeds", "axes": ["tasks"], "commands": ["test"],
                                             "main_metrics": {}, "transfer": {"axis": "tasks", "multi": "multi"},
                                             "runs": runs}))
    write_transfer_report(out)
    (row,) = csv.DictReader((out / "transfer.csv").read_text().splitlines())
    assert row["seeds"] == "2" and float(row["multi"]) == pytest.approx(0.65) and float(row["delta"]) == pytest.approx(0.15)
    assert float(row["noise"]) == pytest.approx(math.sqrt(0.005 / 2 + 2 * BOOTSTRAP_STD**2), rel=1e-4)
    assert row["verdict"] == GAIN
