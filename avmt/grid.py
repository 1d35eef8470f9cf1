"""``python -m avmt grid -c experiments/grids/NAME.yaml``: run an ablation grid and summarize it.

A grid file (YAML) names the experiment YAMLs every run starts from (``base``), the varied
``axes`` (a dotted config key with a list of values, passed as ``--key=value``, or named
``variants``, each extra ``-c`` files and/or overrides), the ``seeds``, fixed ``overrides`` and
the ``commands`` (``fit``, then ``validate`` / ``test`` on the fit's ``last.ckpt``). The cross
product of the axes and seeds is run one run after the other, each in its own subprocess
(``python -m avmt fit ...``) and its own folder ``OUT/<run>/`` (TensorBoard logs of each command in
``OUT/<run>/<command>/``, its output in ``OUT/<run>/<command>.log``).

* Resumable: a command whose results file (``val_metrics.json``, ``test_metrics.json``) exists is
  skipped, so invoking the grid again only runs what is missing (or failed).
* A failed run is reported, its log kept, and the grid goes on; the exit status is 1 if any failed.
* ``--jobs N`` runs N runs at a time, each with the CPU cores / N torch threads.
* Each finished run gets TensorBoard HParams data in ``OUT/<run>/hparams/`` (varied values and seed
  as hparams, the final per-task scores and baselines as metrics).
* At the start ``grid.json`` (name, axes, main metrics, transfer section, the runs and their values)
  is written into ``OUT``: what ``python -m avmt report`` reads besides the results files.
* At the end ``summary.csv``, ``summary.md`` and ``plots/<stage>_scores.png`` (per task, main
  score by variant, trivial baseline marked) are written into ``OUT``; with a ``transfer`` section
  also the transfer report (``transfer.md``, ``transfer.csv``, ``plots/transfer_deltas.png``, see
  :mod:`avmt.report`).
* With a ``features`` section the frozen encoders' features are computed once per seed before the
  runs (``python -m avmt data features`` on the base configs and fixed overrides, into
  ``OUT/features/seed-<seed>/``) and every run reads them (``--data.features``) instead of running
  its encoders at every step; for grids whose axes leave the encoders (and their stage 1) alone:
  a run whose encoders differ from the cache's is refused by the cache check, naming what differs.
* With a ``compare`` section, ``comparison.md`` / ``comparison.csv`` (:func:`avmt.report.write_comparison_report`):
  each run's main score per task next to its baseline, and each ablation's deltas against the run it ablates.
* ``--dry-run`` lists the runs and their command lines; ``--print-commands`` prints one shell line
  per run (for a SLURM array); invoking the grid afterwards collects the results without rerunning.
"""

from __future__ import annotations

import argparse
import csv
import itertools
import json
import math
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from avmt.errors import UserError

REPO = Path(__file__).resolve().parents[1]

#: keys of a grid file -> what they mean (anything else is refused)
GRID_KEYS = {
    "base": "experiment YAML(s) every run starts from (-c files, relative to the grid file or the repo)",
    "axes": "varied settings: dotted config key -> list of values, or NAME -> {variants: {VARIANT: spec}}",
    "seeds": "list of seeds (--seed_everything); each combination runs once per seed",
    "overrides": "fixed extra settings of every run: dotted key -> value (or a list of '--key=value')",
    "commands": "commands run in order per run: fit, validate, test (validate/test on the fit's last.ckpt)",
    "main_metrics": "task -> the metric plotted as its main score (default: its first score in the results)",
    "name": "grid name (default: the grid file's stem); the default output is runs/grids/<name>",
    "transfer": "{axis: AXIS, multi: VARIANT}: AXIS holds the task sets, its variant VARIANT is the multi-task "
                "run and every other variant the single-task run of the task it is named after (transfer report)",
    "compare": "{axis: AXIS, ablations: {VARIANT: REFERENCE}}: a comparison report (comparison.md/.csv): every "
               "run's main scores next to their baselines, and per ablation VARIANT of AXIS its main scores minus "
               "those of the REFERENCE variant it ablates",
    "features": "{splits: [train, val]}: compute the frozen encoders' features once per seed (python -m avmt data "
                "features with the base configs and fixed overrides) and give every run --data.features",
}
#: keys of the compare section
COMPARE_KEYS = {"axis": "the axis whose variants are compared",
                "ablations": "ablation variant -> the variant of the same axis it ablates (may be empty)"}
#: keys of the features section
FEATURES_KEYS = {"splits": "the splits to encode (those the commands read: train and val for fit, test for test)"}
#: keys of the transfer section
TRANSFER_KEYS = {"axis": "the axis whose variants are the task sets",
                 "multi": "the variant of that axis that is the multi-task run"}
#: the grid's description for the reports, written at the start of a grid
GRID_JSON = "grid.json"
#: keys of a variant spec
VARIANT_KEYS = {"config": "extra -c file(s)", "overrides": "dotted key -> value"}
#: command -> the results file its MetricsReport writes in its log folder
RESULTS_FILES = {"fit": "val_metrics.json", "validate": "val_metrics.json", "test": "test_metrics.json"}
#: command -> the metric stage of its results file
STAGES = {"fit": "val", "validate": "val", "test": "test"}
SEED_AXIS = "seed"


@dataclass
class Run:
    """One point of the grid: its varied values, its seed and the arguments that make it."""

    name: str
    values: dict[str, Any]  # axis name -> value (variant name for a variants axis)
    seed: Any
    configs: list[str]  # -c files, in order
    overrides: list[str]  # --key=value flags, in order
    status: str = "pending"
    results: dict[str, dict] = field(default_factory=dict)  # stage -> task -> entry


@dataclass
class Grid:
    """A parsed grid file."""

    name: str
    path: Path
    runs: list[Run]
    commands: list[str]
    axis_names: list[str]
    main_metrics: dict[str, str] = field(default_factory=dict)  # task -> plotted metric
    transfer: dict[str, str] | None = None  # {"axis": ..., "multi": ...} of the transfer report
    base_configs: list[str] = field(default_factory=list)  # the base -c files
    fixed: list[str] = field(default_factory=list)  # the fixed --key=value overrides of every run
    feature_splits: list[str] | None = None  # the features section's splits (None: no feature cache)
    compare: dict[str, Any] | None = None  # {"axis": ..., "ablations": {variant: reference}} of the comparison report


def format_value(value: Any) -> str:
    """A YAML value as it goes on the command line (``--key=<this>``)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def override_flags(overrides: Any, where: str) -> list[str]:
    """``{dotted.key: value}`` (or a list of ``--key=value`` strings) as command-line flags."""
    if overrides is None:
        return []
    if isinstance(overrides, dict):
        return [f"--{key}={format_value(value)}" for key, value in overrides.items()]
    if isinstance(overrides, list) and all(isinstance(item, str) for item in overrides):
        return [item if item.startswith("--") else f"--{item}" for item in overrides]
    raise UserError(f"{where}: expected a mapping of dotted keys to values or a list of '--key=value' strings")


def find_config(reference: str, grid_path: Path, where: str) -> str:
    """An experiment YAML named in a grid file, relative to the grid file, the repo or the working folder."""
    for folder in (grid_path.parent, REPO, Path.cwd()):
        candidate = (folder / reference).resolve()
        if candidate.is_file():
            return str(candidate)
    raise FileNotFoundError(f"{grid_path}: {where}: config file not found: {reference}")


def safe_name(text: str) -> str:
    """``text`` as a folder-name component."""
    return re.sub(r"[^A-Za-z0-9._+-]+", "_", text).strip("_") or "_"


def load_grid(path: Path) -> Grid:
    """Parse and check a grid file; every mistake names the file and the key."""
    if not path.is_file():
        raise FileNotFoundError(f"grid file not found: {path}")
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise UserError(f"grid file {path} is not valid YAML: {' '.join(str(error).split())}") from error
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: a grid file is a mapping with keys {', '.join(GRID_KEYS)}")
    unknown = sorted(set(loaded) - set(GRID_KEYS))
    if unknown:
        raise UserError(f"{path}: unknown key(s) {', '.join(unknown)}; a grid file has {', '.join(GRID_KEYS)}")
    if "base" not in loaded:
        raise UserError(f"{path}: key 'base' is missing ({GRID_KEYS['base']})")
    bases = loaded["base"]
    bases = [bases] if isinstance(bases, str) else bases
    if not isinstance(bases, list) or not bases or not all(isinstance(b, str) for b in bases):
        raise UserError(f"{path}: key 'base' must be a YAML path or a non-empty list of them")
    base_configs = [find_config(b, path, "base") for b in bases]

    commands = loaded.get("commands", ["fit"])
    commands = [commands] if isinstance(commands, str) else commands
    if not isinstance(commands, list) or not commands or any(c not in RESULTS_FILES for c in commands):
        raise UserError(f"{path}: key 'commands' must list some of {', '.join(RESULTS_FILES)}, got {commands!r}")

    seeds = loaded.get("seeds")
    if seeds is not None and (not isinstance(seeds, list) or not seeds):
        raise UserError(f"{path}: key 'seeds' must be a non-empty list")
    fixed = override_flags(loaded.get("overrides"), f"{path}: key 'overrides'")

    # each axis: a list of (value shown, extra -c files, extra flags)
    axes = loaded.get("axes") or {}
    if not isinstance(axes, dict):
        raise UserError(f"{path}: key 'axes' must be a mapping")
    axis_points: dict[str, list[tuple[Any, list[str], list[str]]]] = {}
    for axis, spec in axes.items():
        where = f"axes.{axis}"
        if axis == SEED_AXIS:
            raise UserError(f"{path}: {where}: '{SEED_AXIS}' is not an axis, use the 'seeds' key")
        if isinstance(spec, list):
            if not spec:
                raise UserError(f"{path}: {where}: the list of values is empty")
            axis_points[axis] = [(value, [], [f"--{axis}={format_value(value)}"]) for value in spec]
        elif isinstance(spec, dict) and set(spec) == {"variants"} and isinstance(spec["variants"], dict):
            points = []
            for variant, variant_spec in spec["variants"].items():
                variant_where = f"{where}.variants.{variant}"
                if isinstance(variant_spec, (str, list)) and not isinstance(variant_spec, dict):
                    variant_spec = {"config": variant_spec}
                if not isinstance(variant_spec, dict):
                    raise UserError(f"{path}: {variant_where}: expected a YAML path or {{config, overrides}}")
                bad = sorted(set(variant_spec) - set(VARIANT_KEYS))
                if bad:
                    raise UserError(f"{path}: {variant_where}: unknown key(s) {', '.join(bad)}; "
                                     f"a variant has {', '.join(VARIANT_KEYS)}")
                files = variant_spec.get("config") or []
                files = [files] if isinstance(files, str) else files
                configs = [find_config(f, path, variant_where) for f in files]
                points.append((variant, configs, override_flags(variant_spec.get("overrides"), f"{path}: {variant_where}.overrides")))
            if not points:
                raise UserError(f"{path}: {where}.variants is empty")
            axis_points[axis] = points
        else:
            raise UserError(f"{path}: {where}: expected a list of values (dotted config key) "
                             f"or {{variants: {{NAME: config file(s) / {{config, overrides}}}}}}")

    runs: list[Run] = []
    names = list(axis_points)
    for combination in itertools.product(*axis_points.values()):
        for seed in seeds if seeds is not None else [None]:
            values = {axis: point[0] for axis, point in zip(names, combination)}
            parts = [f"{safe_name(axis.split('.')[-1])}-{safe_name(format_value(v))}" for axis, v in values.items()]
            if seed is not None:
                parts.append(f"seed-{safe_name(format_value(seed))}")
            configs = [*base_configs, *(c for point in combination for c in point[1])]
            flags = [*fixed, *(f for point in combination for f in point[2])]
            if seed is not None:
                flags.append(f"--seed_everything={format_value(seed)}")
            runs.append(Run("__".join(parts) or "run", values, seed, configs, flags))
    duplicates = sorted({r.name for r in runs if sum(o.name == r.name for o in runs) > 1})
    if duplicates:
        raise UserError(f"{path}: key 'axes': several runs would share the folder name(s) {', '.join(duplicates)}")
    main_metrics = loaded.get("main_metrics") or {}
    if not isinstance(main_metrics, dict) or not all(isinstance(v, str) for v in main_metrics.values()):
        raise UserError(f"{path}: key 'main_metrics' must map task names to metric names")
    transfer = check_transfer(loaded.get("transfer"), axis_points, path)
    name = str(loaded.get("name") or path.stem)
    feature_splits = check_features(loaded.get("features"), path) if "features" in loaded else None
    compare = check_compare(loaded.get("compare"), axis_points, path)
    return Grid(name, path, runs, commands, names, dict(main_metrics), transfer, base_configs, fixed, feature_splits,
                compare)


def _axis_variants(key: str, axis: Any, axis_points: dict[str, list[tuple]], path: Path) -> list[str]:
    """The variants of ``axis`` as ``format_value`` prints them, for the grid file's section ``key``.

    Raises:
        UserError: ``axis`` is not an axis of the grid.
    """
    if axis not in axis_points:
        raise UserError(f"{path}: key '{key}': axis {axis!r} is not an axis of the grid "
                         f"(axes: {', '.join(axis_points) or 'none'})")
    return [format_value(point[0]) for point in axis_points[axis]]


def check_compare(section: Any, axis_points: dict[str, list[tuple]], path: Path) -> dict[str, Any] | None:
    """The grid file's ``compare`` section, checked against its axes.

    Returns:
        ``{"axis": AXIS, "ablations": {VARIANT: REFERENCE}}`` with the variants as ``format_value``
        prints them, or ``None`` when the key is absent.
    """
    if section is None:
        return None
    if not isinstance(section, dict) or not set(section) <= set(COMPARE_KEYS) or "axis" not in section:
        raise UserError(f"{path}: key 'compare' must be a mapping with the key axis (and optionally ablations): "
                         f"{GRID_KEYS['compare']}")
    axis = section["axis"]
    variants = _axis_variants("compare", axis, axis_points, path)
    ablations = section.get("ablations") or {}
    if not isinstance(ablations, dict):
        raise UserError(f"{path}: key 'compare.ablations' must map ablation variants to the variants they ablate")
    checked = {}
    for variant, reference in ablations.items():
        for name in (variant, reference):
            if format_value(name) not in variants:
                raise UserError(f"{path}: key 'compare.ablations': {name!r} is not a variant of axis {axis!r} "
                                 f"(variants: {', '.join(variants)})")
        checked[format_value(variant)] = format_value(reference)
    return {"axis": str(axis), "ablations": checked}


def check_features(section: Any, path: Path) -> list[str]:
    """The grid file's ``features`` section: the splits to encode (default train and val)."""
    section = {} if section is None else section
    if not isinstance(section, dict) or set(section) - set(FEATURES_KEYS):
        raise UserError(f"{path}: key 'features' must be a mapping with key(s) {', '.join(FEATURES_KEYS)}, got {section!r}")
    splits = section.get("splits", ["train", "val"])
    if not isinstance(splits, list) or not splits or not all(split in ("train", "val", "test") for split in splits):
        raise UserError(f"{path}: key 'features.splits' must list some of train, val, test, got {splits!r}")
    return list(splits)


def feature_dir(seed: Any, out: Path) -> Path:
    """The feature cache of the runs of ``seed`` (``None``: the grid has no seeds)."""
    return out / "features" / ("default" if seed is None else f"seed-{safe_name(format_value(seed))}")


def nested_config(flags: list[str]) -> dict[str, Any]:
    """``--a.b=value`` flags as the nested YAML mapping ``{a: {b: value}}`` (values parsed as YAML)."""
    config: dict[str, Any] = {}
    for flag in flags:
        key, _, value = flag.removeprefix("--").partition("=")
        *parents, leaf = key.split(".")
        node = config
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return config


def features_command(grid: Grid, seed: Any, out: Path) -> list[str]:
    """The ``python -m avmt data features`` line of one seed's cache. The seed and the fixed
    overrides go in ``OUT/features/seed-<seed>.yaml`` (written by :func:`prepare_features`), as the
    command takes config files only."""
    folder = feature_dir(seed, out)
    args = [sys.executable, "-m", "avmt", "data", "features"]
    for config in [*grid.base_configs, str(folder.with_suffix(".yaml"))]:
        args += ["-c", config]
    return [*args, f"--out={folder}", "--splits", *(grid.feature_splits or []), "--progress=false"]


def run_logged(args: list[str], log: Path, env: dict[str, str] | None) -> int:
    """Run ``args`` in a subprocess with its command line, then its output, in ``log``; its exit status."""
    with log.open("w") as handle:
        handle.write(shlex.join(args) + "\n\n")
        handle.flush()
        return subprocess.run(args, stdout=handle, stderr=subprocess.STDOUT, cwd=Path.cwd(), env=env).returncode


def features_settings(grid: Grid, seed: Any) -> dict[str, Any]:
    """The config of one seed's feature cache: the grid's fixed overrides and the seed, nested."""
    return nested_config([*grid.fixed, *([] if seed is None else [f"--seed_everything={format_value(seed)}"])])


def prepare_features(grid: Grid, out: Path, env: dict[str, str] | None = None) -> None:
    """Compute each seed's feature cache that is not complete yet (one after the other).

    Raises:
        SystemExit: a cache could not be written (every run depends on it); names its log.
    """
    for seed in dict.fromkeys(run.seed for run in grid.runs):
        folder = feature_dir(seed, out)
        manifest = folder / "manifest.json"
        if manifest.is_file() and json.loads(manifest.read_text()).get("complete"):
            print(f"[grid] features {folder.name}: complete, reused", flush=True)
            continue
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.with_suffix(".yaml").write_text(yaml.safe_dump(features_settings(grid, seed), sort_keys=False))
        args = features_command(grid, seed, out)
        log = folder.with_suffix(".log")
        print(f"[grid] features {folder.name} (log: {log})", flush=True)
        started = time.perf_counter()
        returncode = run_logged(args, log, env)
        if returncode != 0:
            raise SystemExit(f"[grid] the feature cache {folder} failed (exit status {returncode}); every run reads "
                             f"it, so none was started: see {log}")
        print(f"[grid] features {folder.name} done in {time.perf_counter() - started:.0f} s", flush=True)


def check_transfer(section: Any, axis_points: dict[str, list[tuple]], path: Path) -> dict[str, str] | None:
    """The grid file's ``transfer`` section, checked against its axes.

    Args:
        section: the loaded ``transfer`` value (``None`` when the key is absent).
        axis_points: axis name -> its points ``(value, configs, flags)`` as ``load_grid`` builds them.
        path: the grid file (named in the errors).
    Returns:
        ``{"axis": AXIS, "multi": VARIANT}`` with VARIANT as ``format_value`` prints it, or ``None``.
    """
    if section is None:
        return None
    if not isinstance(section, dict) or set(section) != set(TRANSFER_KEYS):
        raise UserError(f"{path}: key 'transfer' must be a mapping with exactly the keys "
                         f"{', '.join(TRANSFER_KEYS)} ({GRID_KEYS['transfer']})")
    axis, multi = section["axis"], format_value(section["multi"])
    variants = _axis_variants("transfer", axis, axis_points, path)
    if multi not in variants:
        raise UserError(f"{path}: key 'transfer': multi {multi!r} is not a variant of axis {axis!r} "
                         f"(variants: {', '.join(variants)})")
    if len(variants) < 2:
        raise UserError(f"{path}: key 'transfer': axis {axis!r} needs single-task variants besides {multi!r}")
    return {"axis": str(axis), "multi": multi}


def write_grid_json(grid: Grid, out: Path) -> Path:
    """Write ``OUT/grid.json``: what the reports need to read the grid folder without the grid file.

    Args:
        grid: the parsed grid.
        out: the grid folder.
    Returns:
        The path written. Content: ``name``, ``path`` (the grid file), ``axes`` (names), ``commands``,
        ``main_metrics``, ``transfer`` and ``compare`` (or null) and ``runs``: a list of ``{name, values: {axis:
        value as format_value prints it}, seed}`` (seed as printed, or null).
    """
    description = {
        "name": grid.name,
        "path": str(grid.path),
        "axes": grid.axis_names,
        "commands": grid.commands,
        "main_metrics": grid.main_metrics,
        "transfer": grid.transfer,
        "compare": grid.compare,
        "runs": [{"name": run.name, "values": {axis: format_value(value) for axis, value in run.values.items()},
                  "seed": None if run.seed is None else format_value(run.seed)} for run in grid.runs],
    }
    path = out / GRID_JSON
    path.write_text(json.dumps(description, indent=2) + "\n")
    return path


def command_line(run: Run, command: str, out: Path, grid: Grid) -> list[str]:
    """The full ``python -m avmt COMMAND`` line of one command of one run."""
    run_dir = out / run.name
    args = [sys.executable, "-m", "avmt", command]
    for config in run.configs:
        args += ["-c", config]
    args += run.overrides
    args += [
        "--trainer.logger.class_path=lightning.pytorch.loggers.TensorBoardLogger",
        f"--trainer.logger.init_args.save_dir={out}",
        f"--trainer.logger.init_args.name={run.name}",
        f"--trainer.logger.init_args.version={command}",
    ]
    if grid.feature_splits is not None:
        args.append(f"--data.features={feature_dir(run.seed, out)}")
    if command != "fit" and "fit" in grid.commands:
        args.append(f"--ckpt_path={run_dir / 'fit' / 'checkpoints' / 'last.ckpt'}")
    return args


def results_path(run: Run, command: str, out: Path) -> Path:
    """Where the results file of one command of one run lands."""
    return out / run.name / command / RESULTS_FILES[command]


def read_results(run: Run, commands: list[str], out: Path) -> None:
    """Load the run's results files of ``commands`` (stage -> task -> entry) into ``run.results``, the
    last command of a stage winning."""
    for command in commands:
        path = results_path(run, command, out)
        if path.is_file():
            run.results[STAGES[command]] = json.loads(path.read_text())


def execute(run: Run, grid: Grid, out: Path, env: dict[str, str] | None = None) -> None:
    """Run the commands of one run that have no results yet (in environment ``env``, default this
    process's); set ``run.status``."""
    ran = False
    for command in grid.commands:
        if results_path(run, command, out).is_file():
            continue
        run_dir = out / run.name
        run_dir.mkdir(parents=True, exist_ok=True)
        log = run_dir / f"{command}.log"
        args = command_line(run, command, out, grid)
        print(f"[grid] {run.name}: {command} (log: {log})", flush=True)
        started = time.perf_counter()
        returncode = run_logged(args, log, env)
        ran = True
        if returncode != 0 or not results_path(run, command, out).is_file():
            why = f"exit status {returncode}" if returncode != 0 else f"no {RESULTS_FILES[command]} written"
            run.status = f"failed ({command}: {why})"
            print(f"[grid] {run.name}: FAILED {command}, {why}; see {log}", flush=True)
            return
        print(f"[grid] {run.name}: {command} done in {time.perf_counter() - started:.0f} s", flush=True)
    run.status = "done" if ran else "skipped (results exist)"
    if not ran:
        print(f"[grid] {run.name}: skipped, its results exist", flush=True)


def main_score(entry: dict, metric: str | None = None) -> tuple[str, float, float | None] | None:
    """A task's main metric (``metric``, else its first score that is not the parse-failure rate), value and baseline."""
    scores = entry.get("scores", {})
    if metric is not None:
        return (metric, scores[metric], entry.get("baseline", {}).get(metric)) if metric in scores else None
    for key, value in scores.items():
        if key != "parse_failure_rate":
            return key, value, entry.get("baseline", {}).get(key)
    return None


def hparam_value(value: Any) -> Any:
    """An hparam as TensorBoard's HParams plugin takes it (number, string or bool)."""
    return value if isinstance(value, (bool, int, float, str)) else format_value(value)


def baseline_columns(entry: dict, key: str) -> list[tuple[str, float | None]]:
    """A results entry's baselines of metric ``key``: ``(" baseline", value)``, then
    ``(" baseline (NAME)", value)`` per extra baseline (``Task.extra_baselines``); the suffixes
    of the summary's column names."""
    return [(" baseline", entry.get("baseline", {}).get(key)),
            *((f" baseline ({name})", scores.get(key)) for name, scores in entry.get("extra_baselines", {}).items())]


def metric_dict(run: Run) -> dict[str, float]:
    """``stage/task/metric``, ``stage/task/baseline/metric`` and, per extra baseline,
    ``stage/task/baseline/<name with _>/metric`` -> value, for every finite number."""
    metrics = {}
    for stage, tasks in run.results.items():
        for task, entry in tasks.items():
            for key, value in entry.get("scores", {}).items():
                metrics[f"{stage}/{task}/{key}"] = value
            for key, value in entry.get("baseline", {}).items():
                metrics[f"{stage}/{task}/baseline/{key}"] = value
            for name, scores in entry.get("extra_baselines", {}).items():
                for key, value in scores.items():
                    metrics[f"{stage}/{task}/baseline/{name.replace(' ', '_')}/{key}"] = value
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}


def write_hparams(run: Run, out: Path) -> Path:
    """Write the run's HParams plugin data (varied values, seed; final metrics) into ``OUT/<run>/hparams``."""
    from torch.utils.tensorboard import SummaryWriter
    from torch.utils.tensorboard.summary import hparams

    folder = out / run.name / "hparams"
    shutil.rmtree(folder, ignore_errors=True)  # rewritten from the results each time: no duplicate sessions
    hparam_dict = {axis: hparam_value(value) for axis, value in run.values.items()}
    if run.seed is not None:
        hparam_dict[SEED_AXIS] = hparam_value(run.seed)
    metrics = metric_dict(run)
    with SummaryWriter(log_dir=str(folder)) as writer:
        experiment, session_start, session_end = hparams(hparam_dict, metrics)
        for summary in (experiment, session_start, session_end):
            writer.file_writer.add_summary(summary)
        for key, value in metrics.items():
            writer.add_scalar(key, value, 0)
    return folder


def summary_rows(grid: Grid, out: Path) -> tuple[list[str], list[dict[str, Any]]]:
    """Header and rows of the summary: varied values, seed, status, then per task metric its score, its
    trivial baseline and any extra baselines."""
    metric_columns: list[str] = []
    rows = []
    for run in grid.runs:
        row: dict[str, Any] = {"run": run.name, **{a: format_value(v) for a, v in run.values.items()},
                               SEED_AXIS: "" if run.seed is None else format_value(run.seed), "status": run.status}
        for stage, tasks in run.results.items():
            for task, entry in sorted(tasks.items()):
                for key, value in entry.get("scores", {}).items():
                    for column, number in ((f"{stage}/{task}/{key}", value),
                                           *((f"{stage}/{task}/{key}{suffix}", base)
                                             for suffix, base in baseline_columns(entry, key))):
                        if column not in metric_columns:
                            metric_columns.append(column)
                        row[column] = "" if number is None else f"{number:.4f}"
        rows.append(row)
    return ["run", *grid.axis_names, SEED_AXIS, "status", *metric_columns], rows


def write_summary(grid: Grid, out: Path) -> None:
    """``summary.csv`` and ``summary.md`` in the grid folder."""
    header, rows = summary_rows(grid, out)
    with (out / "summary.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=header, restval="")
        writer.writeheader()
        writer.writerows(rows)
    lines = [f"# Grid {grid.name}", "", f"Grid file: `{grid.path}`; commands: {', '.join(grid.commands)}.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(row.get(column, "")) for column in header) + " |" for row in rows]
    (out / "summary.md").write_text("\n".join(lines) + "\n")


def write_plots(grid: Grid, out: Path) -> list[Path]:
    """Per stage, one PNG with a panel per task: main score by variant (mean ± std over seeds), baseline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    stages = sorted({stage for run in grid.runs for stage in run.results})
    for stage in stages:
        tasks = sorted({task for run in grid.runs for task in run.results.get(stage, {})})
        if not tasks:
            continue
        variants = list(dict.fromkeys("\n".join(f"{a.split('.')[-1]}={format_value(v)}" for a, v in run.values.items()) or run.name
                                      for run in grid.runs))
        columns = min(3, len(tasks))
        rows = math.ceil(len(tasks) / columns)
        figure, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.6 * rows), squeeze=False)
        for panel, task in zip(axes.flat, tasks):
            metric_name = None
            means, spreads, baselines = [], [], []
            for variant in variants:
                scores, bases = [], []
                for run in grid.runs:
                    label = "\n".join(f"{a.split('.')[-1]}={format_value(v)}" for a, v in run.values.items()) or run.name
                    main = main_score(run.results.get(stage, {}).get(task, {}), grid.main_metrics.get(task))
                    if label == variant and main is not None:
                        metric_name = metric_name or main[0]
                        scores.append(main[1])
                        if main[2] is not None:
                            bases.append(main[2])
                means.append(sum(scores) / len(scores) if scores else float("nan"))
                spreads.append(_std(scores))
                baselines.append(sum(bases) / len(bases) if bases else float("nan"))
            positions = range(len(variants))
            panel.bar(positions, means, yerr=spreads, color="tab:blue", capsize=3, label="score")
            panel.scatter(positions, baselines, marker="_", s=600, color="black", zorder=3, label="trivial baseline")
            panel.set_xticks(list(positions), variants, fontsize=7)
            panel.set_title(f"{stage}/{task}: {metric_name or '-'}", fontsize=9)
        for panel in list(axes.flat)[len(tasks):]:
            panel.axis("off")
        axes.flat[0].legend(fontsize=7)
        figure.suptitle(f"grid {grid.name}: main score per task ({stage})")
        figure.tight_layout()
        path = out / "plots" / f"{stage}_scores.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=90)
        plt.close(figure)
        written.append(path)
    return written


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def job_environment(jobs: int) -> dict[str, str]:
    """The environment of each run's subprocess when ``jobs`` run at once: this process's, with the
    torch/OpenMP threads set to the CPU cores divided by ``jobs`` (unless ``OMP_NUM_THREADS`` is set),
    so concurrent runs do not oversubscribe the cores."""
    env = dict(os.environ)
    if jobs > 1 and "OMP_NUM_THREADS" not in env:
        threads = str(max(1, (os.cpu_count() or 1) // jobs))
        env.update(OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)
    return env


def _std(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) >= 2 else 0.0


def parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m avmt grid``."""
    arguments = argparse.ArgumentParser(prog="python -m avmt grid", description=__doc__.split("\n\n")[0])
    arguments.add_argument("-c", "--config", required=True, help="grid file (YAML), e.g. experiments/grids/adapters.yaml")
    arguments.add_argument("--out", default=None, help="grid folder (default: runs/grids/<name>)")
    arguments.add_argument("--dry-run", action="store_true", help="list the runs and their command lines, run nothing")
    arguments.add_argument("--jobs", type=_positive, default=1,
                           help="runs at a time on this machine (default 1); each run's torch threads are the CPU "
                                "cores divided by this, unless OMP_NUM_THREADS is set")
    arguments.add_argument("--print-commands", action="store_true",
                           help="print one shell line per run (e.g. for a SLURM array) instead of running")
    return arguments


def main(argv: list[str]) -> None:
    """``python -m avmt grid -c GRID.yaml [--out DIR] [--jobs N] [--dry-run] [--print-commands]``."""
    args = parser().parse_args(argv)
    grid = load_grid(Path(args.config))
    out = Path(args.out if args.out else Path("runs") / "grids" / grid.name).resolve()
    seeds = list(dict.fromkeys(run.seed for run in grid.runs)) if grid.feature_splits is not None else []
    if args.print_commands:
        for seed in seeds:  # first: the feature caches every run reads
            print(f"mkdir -p {shlex.quote(str(feature_dir(seed, out).parent))} && printf %s "
                  f"{shlex.quote(yaml.safe_dump(features_settings(grid, seed), sort_keys=False))} > "
                  f"{shlex.quote(str(feature_dir(seed, out).with_suffix('.yaml')))} && "
                  + shlex.join(features_command(grid, seed, out)))
        for run in grid.runs:
            print(" && ".join(shlex.join(command_line(run, command, out, grid)) for command in grid.commands))
        return
    if args.dry_run:
        print(f"grid {grid.name}: {len(grid.runs)} run(s) into {out}")
        for seed in seeds:
            print(f"\nfeatures {feature_dir(seed, out).name} (before the runs)\n  {shlex.join(features_command(grid, seed, out))}")
        for run in grid.runs:
            done = all(results_path(run, c, out).is_file() for c in grid.commands)
            print(f"\n{run.name}{' (results exist, would be skipped)' if done else ''}")
            for command in grid.commands:
                print(f"  {shlex.join(command_line(run, command, out, grid))}")
        return
    out.mkdir(parents=True, exist_ok=True)
    write_grid_json(grid, out)
    started = time.perf_counter()
    env = job_environment(args.jobs)
    if grid.feature_splits is not None:
        prepare_features(grid, out)  # alone on the machine: all its cores

    def one(index: int, run: Run) -> None:
        print(f"[grid] run {index}/{len(grid.runs)}: {run.name}", flush=True)
        execute(run, grid, out, env)
        read_results(run, grid.commands, out)
        if not run.status.startswith("failed"):
            write_hparams(run, out)

    with ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each run is a subprocess: threads only wait
        for future in [pool.submit(one, index, run) for index, run in enumerate(grid.runs, 1)]:
            future.result()
    print(f"[grid] {len(grid.runs)} run(s) in {time.perf_counter() - started:.0f} s wall time "
          f"({args.jobs} at a time)", flush=True)
    write_summary(grid, out)
    plots = write_plots(grid, out)
    failed = [run.name for run in grid.runs if run.status.startswith("failed")]
    print(f"[grid] summary: {out / 'summary.csv'}, {out / 'summary.md'}; plots: {', '.join(map(str, plots)) or 'none'}")
    if grid.transfer is not None:
        from avmt.report import write_transfer_report

        try:
            print(write_transfer_report(out), flush=True)
        except ValueError as error:  # no finished multi/single pair yet: the grid's other outputs stand
            print(f"[grid] no transfer report: {error}", file=sys.stderr)
    if grid.compare is not None:
        from avmt.report import write_comparison_report

        print(write_comparison_report(out), flush=True)
    if failed:
        print(f"[grid] {len(failed)} of {len(grid.runs)} run(s) failed: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
