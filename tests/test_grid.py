"""``python -m avmt grid``: a tiny two-run grid on AVSynth shards, run for real in subprocesses."""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"

# a few steps of the I-LoRA experiment at a smaller scale (as tests/test_cli.py's TINY)
TINY = {
    "trainer.max_epochs": 1,
    "trainer.max_steps": 3,
    "trainer.limit_val_batches": 1,
    "trainer.log_every_n_steps": 1,
    "trainer.enable_progress_bar": False,
    "trainer.enable_model_summary": False,
    "model.max_generation_samples": 2,
    "model.max_new_tokens": 8,
    "data.clips_per_batch": 2,
    "data.tasks": ["ave", "avqa"],
}
LEARNING_RATES = [0.001, 0.002]


def avmt(*args: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "AVMT_CACHE": str(cwd / "cache"), "PYTHONUNBUFFERED": "1"}
    result = subprocess.run([sys.executable, "-m", "avmt", *args], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"avmt {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


def write_grid(path: Path, shards: Path, learning_rates: list) -> Path:
    path.write_text(yaml.safe_dump({
        "base": [str(EXPERIMENTS / "ilora.yaml")],
        "axes": {"model.learning_rate": learning_rates},
        "seeds": [0],
        "overrides": {**TINY, "data.root": str(shards)},
        "commands": ["fit"],
    }))
    return path


@pytest.fixture(scope="module")
def grid(tmp_path_factory) -> dict:
    """One real grid run (2 runs), and what it wrote before any later invocation changes it."""
    work = tmp_path_factory.mktemp("grid")
    shards = work / "shards"
    avmt("data", "synth", "--out", str(shards), "--clips", "4", "--val_clips", "2", "--test_clips", "2", "--seed", "3", cwd=work)
    grid_file = write_grid(work / "lr.yaml", shards, LEARNING_RATES)
    out = work / "out"
    result = avmt("grid", "-c", str(grid_file), "--out", str(out), cwd=work)
    return {"work": work, "shards": shards, "out": out, "file": grid_file, "result": result,
            "summary_csv": (out / "summary.csv").read_text(), "summary_md": (out / "summary.md").read_text()}


def run_names() -> list[str]:
    return [f"learning_rate-{lr}__seed-0" for lr in LEARNING_RATES]


def test_grid_writes_one_run_folder_summary_and_plot(grid):
    out = grid["out"]
    rows = list(csv.DictReader(grid["summary_csv"].splitlines()))
    assert [row["run"] for row in rows] == run_names()
    assert [row["model.learning_rate"] for row in rows] == ["0.001", "0.002"]
    assert all(row["seed"] == "0" and row["status"] == "done" for row in rows)
    for row, name in zip(rows, run_names()):
        final = json.loads((out / name / "fit" / "val_metrics.json").read_text())
        assert set(final) == {"ave", "avqa"}
        for task, entry in final.items():
            for metric, value in entry["scores"].items():
                assert float(row[f"val/{task}/{metric}"]) == pytest.approx(value, abs=1e-4)
            for metric, value in entry["baseline"].items():
                assert float(row[f"val/{task}/{metric} baseline"]) == pytest.approx(value, abs=1e-4)
            for other, baseline in entry.get("extra_baselines", {}).items():  # AVQA's best constant answer
                for metric, value in baseline.items():
                    assert float(row[f"val/{task}/{metric} baseline ({other})"]) == pytest.approx(value, abs=1e-4)
        assert set(final["avqa"]["extra_baselines"]) == {"best constant answer"}
        assert (out / name / "fit" / "checkpoints" / "last.ckpt").is_file()
        assert (out / name / "fit.log").is_file()
    assert "| run | model.learning_rate | seed | status |" in grid["summary_md"]
    plot = out / "plots" / "val_scores.png"
    assert plot.is_file() and plot.read_bytes()[:4] == b"\x89PNG"


def test_each_run_has_hparams_with_varied_values_and_final_metrics(grid):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    for lr, name in zip(LEARNING_RATES, run_names()):
        folder = grid["out"] / name / "hparams"
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
        events.Reload()
        content = events.PluginTagToContent("hparams")
        start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"]).session_start_info
        assert set(start.hparams) == {"model.learning_rate", "seed"}
        assert start.hparams["model.learning_rate"].number_value == pytest.approx(lr)
        assert start.hparams["seed"].number_value == 0
        experiment = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/experiment"]).experiment
        metric_tags = {info.name.tag for info in experiment.metric_infos}
        final = json.loads((grid["out"] / name / "fit" / "val_metrics.json").read_text())
        accuracy = final["avqa"]["scores"]["accuracy"]
        assert {"val/avqa/accuracy", "val/avqa/baseline/accuracy", "val/avqa/baseline/best_constant_answer/accuracy",
                "val/ave/parse_failure_rate"} <= metric_tags
        assert events.Scalars("val/avqa/accuracy")[0].value == pytest.approx(accuracy)


def test_dry_run_and_print_commands_list_the_runs_without_running(grid, tmp_path):
    out = tmp_path / "never"
    dry = avmt("grid", "-c", str(grid["file"]), "--out", str(out), "--dry-run", cwd=grid["work"])
    assert all(name in dry.stdout for name in run_names())
    assert dry.stdout.count(" -m avmt fit -c ") == 2 and "--model.learning_rate=0.002" in dry.stdout
    printed = avmt("grid", "-c", str(grid["file"]), "--out", str(out), "--print-commands", cwd=grid["work"])
    lines = printed.stdout.strip().splitlines()
    assert len(lines) == 2 and all("--seed_everything=0" in line for line in lines)
    assert not out.exists()


def test_grid_file_mistakes_name_the_file_and_key(grid, tmp_path):
    missing = avmt("grid", "-c", str(tmp_path / "absent.yaml"), cwd=tmp_path, check=False)
    assert missing.returncode == 2 and "absent.yaml" in missing.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base": [str(EXPERIMENTS / "ilora.yaml")], "axis": {"model.learning_rate": [1]}}))
    wrong = avmt("grid", "-c", str(bad), cwd=tmp_path, check=False)
    assert wrong.returncode == 2 and "bad.yaml" in wrong.stderr and "axis" in wrong.stderr


def test_resume_skips_finished_runs_and_a_failed_run_does_not_stop_the_grid(grid):
    """Invoked again with a third, invalid value: the two finished runs are skipped (their logs untouched),
    the invalid one fails with its log kept, the summary lists all three and the exit status is 1."""
    out = grid["out"]
    logs = {name: (out / name / "fit.log").stat().st_mtime_ns for name in run_names()}
    grid_file = write_grid(grid["work"] / "lr_bad.yaml", grid["shards"], [*LEARNING_RATES, "not_a_number"])
    result = avmt("grid", "-c", str(grid_file), "--out", str(out), cwd=grid["work"], check=False)
    assert result.returncode == 1, result.stdout + result.stderr
    assert all((out / name / "fit.log").stat().st_mtime_ns == logs[name] for name in run_names())
    assert result.stdout.count("skipped, its results exist") == 2
    bad_log = out / "learning_rate-not_a_number__seed-0" / "fit.log"
    assert bad_log.is_file() and "not_a_number" in bad_log.read_text()
    assert "1 of 3 run(s) failed: learning_rate-not_a_number__seed-0" in result.stderr
    rows = list(csv.DictReader((out / "summary.csv").read_text().splitlines()))
    assert [row["status"].split(" ")[0] for row in rows] == ["skipped", "skipped", "failed"]
    assert rows[0]["val/avqa/accuracy"] != "" and rows[2]["val/avqa/accuracy"] == ""


def test_grid_json_describes_the_grid_and_its_runs(grid):
    """Invoked again (in-process: every run is skipped), the grid rewrites grid.json for its own file."""
    from avmt.grid import main

    main(["-c", str(grid["file"]), "--out", str(grid["out"])])
    description = json.loads((grid["out"] / "grid.json").read_text())
    assert description["name"] == "lr" and description["axes"] == ["model.learning_rate"]
    assert description["commands"] == ["fit"] and description["transfer"] is None
    assert description["runs"] == [{"name": name, "values": {"model.learning_rate": str(lr)}, "seed": "0"}
                                   for lr, name in zip(LEARNING_RATES, run_names())]



def test_results_files_carry_the_bootstrap_std_of_every_score(grid):
    for name in run_names():
        final = json.loads((grid["out"] / name / "fit" / "val_metrics.json").read_text())
        for entry in final.values():
            assert set(entry["bootstrap_std"]) == set(entry["scores"])
            assert all(value >= 0 for value in entry["bootstrap_std"].values())


# task -> (multi-task score, single-task score) the fake runs below report
TRANSFER_SCORES = {"ave": (0.7, 0.5), "avqa": (0.4, 0.45)}


def test_grid_with_a_transfer_section_writes_grid_json_first_and_the_transfer_report_last(tmp_path, monkeypatch,
                                                                                         capsys):
    """The runs are faked (each writes its results file), so no model is trained."""
    import avmt.grid

    grid_file = tmp_path / "transfer.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": [str(EXPERIMENTS / "base.yaml")],
        "axes": {"tasks": {"variants": {"multi": {"overrides": {"data.tasks": list(TRANSFER_SCORES)}},
                                        **{task: {"overrides": {"data.tasks": [task]}} for task in TRANSFER_SCORES}}}},
        "commands": ["test"],
        "main_metrics": {"ave": "segment_accuracy", "avqa": "accuracy"},
        "transfer": {"axis": "tasks", "multi": "multi"},
    }, sort_keys=False))
    out = tmp_path / "out"

    def fake_execute(run, grid, out_dir, env=None):
        assert (out_dir / "grid.json").is_file()
        variant = run.values["tasks"]
        results = {task: {"scores": {grid.main_metrics[task]: multi if variant == "multi" else single},
                          "baseline": {}, "bootstrap_std": {grid.main_metrics[task]: 0.01}}
                   for task, (multi, single) in TRANSFER_SCORES.items() if variant in ("multi", task)}
        path = avmt.grid.results_path(run, "test", out_dir)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(results))
        run.status = "done"

    monkeypatch.setattr(avmt.grid, "execute", fake_execute)
    avmt.grid.main(["-c", str(grid_file), "--out", str(out)])
    description = json.loads((out / "grid.json").read_text())
    assert description["transfer"] == {"axis": "tasks", "multi": "multi"}
    assert [run["values"]["tasks"] for run in description["runs"]] == ["multi", *TRANSFER_SCORES]
    rows = {row["task"]: row for row in csv.DictReader((out / "transfer.csv").read_text().splitlines())}
    assert rows["ave"]["verdict"] == "gain" and rows["avqa"]["verdict"] == "loss"
    assert float(rows["avqa"]["delta"]) == pytest.approx(-0.05)
    assert "| all runs | 2 | 50% (1/2) | 50% (1/2) | 50% (1/2) | +0.0750 |" in capsys.readouterr().out
    assert (out / "transfer.md").is_file() and (out / "plots" / "transfer_deltas.png").is_file()


def test_jobs_share_the_cores_between_concurrent_runs(monkeypatch):
    from avmt.grid import job_environment, parser

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr("os.cpu_count", lambda: 8)
    assert job_environment(1).get("OMP_NUM_THREADS") is None
    assert job_environment(4)["OMP_NUM_THREADS"] == "2" and job_environment(16)["MKL_NUM_THREADS"] == "1"
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert job_environment(4)["OMP_NUM_THREADS"] == "3"  # the user's setting wins
    with pytest.raises(SystemExit):
        parser().parse_args(["-c", "grid.yaml", "--jobs", "0"])


@pytest.mark.parametrize("name", ["adapters", "transfer", "transfer_seeds", "seeds"])
def test_the_shipped_grid_files_load(name):
    """experiments/grids/*.yaml: every axis, variant config and the transfer section resolve."""
    from avmt.grid import load_grid

    path = Path(__file__).resolve().parents[1] / "experiments" / "grids" / f"{name}.yaml"
    grid = load_grid(path)
    assert grid.runs and all(run.name for run in grid.runs)
    if name == "transfer":
        assert len(grid.runs) == 3 * 2 * 5  # adapters x styles x (multi + 4 single-task runs)
        assert grid.transfer == {"axis": "tasks", "multi": "multi"}
    if name == "transfer_seeds":  # the study's multi-task I-LoRA run, made the same way, on two seeds
        study = load_grid(path.with_name("transfer.yaml"))
        multi = next(run for run in study.runs if run.name == "adapter-ilora__style-tags__tasks-multi__seed-0")
        assert [run.seed for run in grid.runs] == [0, 1]
        assert [run.name for run in grid.runs][0] == multi.name
        for run in grid.runs:  # the same configs and flags but the seed
            assert run.configs == multi.configs
            assert run.overrides == [*multi.overrides[:-1], f"--seed_everything={run.seed}"]
        assert (grid.base_configs, grid.fixed, grid.feature_splits) == (
            study.base_configs, study.fixed, study.feature_splits)


def test_a_features_section_encodes_once_and_every_run_reads_the_cache(grid, tmp_path):
    """``features``: one ``data features`` run per seed before the runs (its config: the seed and the fixed
    overrides), every run fits on the cache (the encoders' fingerprint checked at its first batch), and a
    second invocation reuses the complete cache."""
    from avmt.grid import load_grid, nested_config

    spec = yaml.safe_load(grid["file"].read_text())
    spec["features"] = {"splits": ["train", "val"]}
    grid_file = tmp_path / "features.yaml"
    grid_file.write_text(yaml.safe_dump(spec))
    assert load_grid(grid_file).feature_splits == ["train", "val"]
    out = tmp_path / "out"
    dry = avmt("grid", "-c", str(grid_file), "--out", str(out), "--dry-run", cwd=grid["work"])
    assert "data features" in dry.stdout and dry.stdout.count(f"--data.features={out / 'features' / 'seed-0'}") == 2
    first = avmt("grid", "-c", str(grid_file), "--out", str(out), cwd=grid["work"])
    cache = out / "features" / "seed-0"
    assert json.loads((cache / "manifest.json").read_text())["complete"]
    assert yaml.safe_load((out / "features" / "seed-0.yaml").read_text())["seed_everything"] == 0
    assert first.stdout.index("[grid] features seed-0") < first.stdout.index("[grid] run 1/2")
    for name in run_names():
        log = (out / name / "fit.log").read_text()
        assert f"--data.features={cache}" in log.splitlines()[0]
        assert json.loads((out / name / "fit" / "val_metrics.json").read_text())
    for name in run_names():  # rerun both: the cache is reused, not rewritten
        (out / name / "fit" / "val_metrics.json").unlink()
    second = avmt("grid", "-c", str(grid_file), "--out", str(out), cwd=grid["work"])
    assert "features seed-0: complete, reused" in second.stdout
    assert nested_config(["--a.b=1", "--a.c=[1, 2]", "--d=x"]) == {"a": {"b": 1, "c": [1, 2]}, "d": "x"}
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({**spec, "features": {"splits": ["dev"]}}))
    wrong = avmt("grid", "-c", str(bad), cwd=tmp_path, check=False)
    assert wrong.returncode == 2 and "features.splits" in wrong.stderr


def test_a_compare_section_writes_each_variants_scores_and_the_ablation_deltas(tmp_path, monkeypatch):
    """The runs are faked (each writes its results file): two seeds of a full model and of its ablation."""
    import avmt.grid

    grid_file = tmp_path / "seeds.yaml"
    grid_file.write_text(yaml.safe_dump({
        "base": [str(EXPERIMENTS / "base.yaml")],
        "axes": {"seed_model": {"variants": {"full": {"overrides": {"model.learning_rate": 0.001}},
                                             "no_part": {"overrides": {"model.learning_rate": 0.002}}}}},
        "seeds": [0, 1],
        "commands": ["test"],
        "main_metrics": {"ave": "segment_accuracy"},
        "compare": {"axis": "seed_model", "ablations": {"no_part": "full"}},
    }, sort_keys=False))
    scores = {("full", 0): 0.60, ("full", 1): 0.70, ("no_part", 0): 0.40, ("no_part", 1): 0.50}

    def fake_execute(run, grid, out_dir, env=None):
        value = scores[(run.values["seed_model"], run.seed)]
        results = {"ave": {"scores": {"parse_failure_rate": 0.0, "segment_accuracy": value},
                           "baseline": {"segment_accuracy": 0.3}, "bootstrap_std": {"segment_accuracy": 0.03}},
                   "parse_failure_rate_only": {"scores": {"parse_failure_rate": 0.5}}}
        path = avmt.grid.results_path(run, "test", out_dir)
        path.parent.mkdir(parents=True)
        path.write_text(json.dumps(results))
        run.status = "done"

    monkeypatch.setattr(avmt.grid, "execute", fake_execute)
    out = tmp_path / "out"
    avmt.grid.main(["-c", str(grid_file), "--out", str(out)])
    rows = list(csv.DictReader((out / "comparison.csv").read_text().splitlines()))
    by = {(row["table"], row["seed_model"], row["task"]): row for row in rows}
    assert float(by["scores", "full", "ave"]["score"]) == pytest.approx(0.65)  # mean of the two seeds
    assert float(by["scores", "full", "ave"]["baseline"]) == pytest.approx(0.3)
    assert ("scores", "full", "parse_failure_rate_only") not in by  # no main score besides the failure rate
    ablation = by["ablations", "no_part", "ave"]
    assert float(ablation["delta"]) == pytest.approx(-0.20) and ablation["reference"] == "full"
    noise = float(ablation["noise"])  # each mean: sqrt(2 * 0.03²) / 2; the delta: both in quadrature
    assert noise == pytest.approx(math.sqrt(2 * (math.sqrt(2 * 0.03 ** 2) / 2) ** 2))
    markdown = (out / "comparison.md").read_text()
    assert "| no_part | full | all runs | ave | segment_accuracy | 0.6500 | 0.4500 | -0.2000 |" in markdown
    assert markdown.rstrip().endswith("| loss |")
    with pytest.raises(avmt.grid.UserError, match="compare.ablations.*'gone' is not a variant"):
        bad = yaml.safe_load(grid_file.read_text())
        bad["compare"]["ablations"] = {"gone": "full"}
        grid_file.write_text(yaml.safe_dump(bad))
        avmt.grid.load_grid(grid_file)
