"""``python -m avmt report REPORT RUN_DIR``: reports computed from a grid folder (``runs/grids/NAME``).

A report reads the grid folder's ``grid.json`` (written by ``python -m avmt grid`` at its start) and the
runs' results files (``test_metrics.json`` / ``val_metrics.json``); it never reruns anything. The
reports are the entries of :data:`REPORTS`:

* ``transfer``: does training the tasks together help each task? For a grid with a ``transfer``
  section (an axis whose variants are the multi-task run and one single-task run per task), per
  combination of the other axes ("cell") and per task: multi-task score, single-task score, their
  difference, its noise and a verdict; per cell the share of tasks with positive transfer. Written
  as ``transfer.md``, ``transfer.csv`` and ``plots/transfer_deltas.png`` into the grid folder.
* ``comparison``: for a grid with a ``compare`` section (e.g. ``experiments/grids/seeds.yaml``), each
  variant's main score per task next to its trivial baseline and each ablation's deltas against the
  variant it ablates: ``comparison.md`` and ``comparison.csv``.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from avmt.errors import UserError
from avmt.grid import GRID_JSON, STAGES, Run, format_value, main_score, read_results

#: results stages in order of preference (test results, else validation results)
STAGE_PREFERENCE = ("test", "val")
#: the delta must exceed this many noise levels to be a significant gain or loss
SIGNIFICANCE = 2.0
GAIN, LOSS, WITHIN_NOISE, NO_NOISE, NO_SINGLE = "gain", "loss", "within noise", "n/a", "no single-task run"


@dataclass
class TransferRow:
    """One task of one cell of the transfer report.

    Attributes:
        cell: other axis -> value (as ``format_value`` prints it) shared by the compared runs.
        task: the task; its single-task run is the transfer axis variant of the same name.
        metric: the task's main metric (``None`` when the multi-task run has no score for the task).
        lower_is_better: whether the metric is one of the task's lower-is-better metrics.
        stages: the results stages compared (``"test"``, ``"val"``; several when seeds differ).
        seeds: number of seeds with both a multi-task and a single-task score.
        multi, single: mean main score over those seeds (``single`` is ``None`` without a single-task score).
        delta: multi − single (single − multi for a lower-is-better metric: positive = the multi-task run is better).
        noise: standard error of ``delta`` (see :func:`delta_noise`), ``None`` when unknown.
        verdict: ``gain`` / ``loss`` (beyond 2 noise levels), ``within noise``, ``n/a`` (no noise
            estimate) or ``no single-task run``.
    """

    cell: dict[str, str]
    task: str
    metric: str | None
    lower_is_better: bool
    stages: list[str]
    seeds: int
    multi: float | None
    single: float | None
    delta: float | None
    noise: float | None
    verdict: str


@dataclass
class CellSummary:
    """The headline numbers of one cell: counts over its tasks with a multi/single pair.

    Attributes:
        cell: other axis -> value.
        compared: tasks with both scores; the percentages are of this number.
        positive: tasks with delta > 0; gains / losses: significant ones (beyond 2 noise levels).
        mean_delta: mean delta over the compared tasks.
    """

    cell: dict[str, str]
    compared: int
    positive: int
    gains: int
    losses: int
    mean_delta: float


def cell_label(cell: dict[str, str]) -> str:
    """``{"adapter": "ilora", "style": "tags"}`` -> ``"adapter=ilora, style=tags"`` (``"all runs"`` if empty)."""
    return ", ".join(f"{axis}={value}" for axis, value in cell.items()) or "all runs"


def load_grid_description(run_dir: Path) -> dict[str, Any]:
    """The grid folder's ``grid.json`` (see :func:`avmt.grid.write_grid_json`).

    Raises:
        FileNotFoundError: ``run_dir`` has no ``grid.json`` (not a grid folder, or the grid never started).
    """
    path = run_dir / GRID_JSON
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir}: no {GRID_JSON} (not a grid folder, or its grid has not started: "
                                "python -m avmt grid -c GRID.yaml writes it)")
    return json.loads(path.read_text())


def run_results(run_dir: Path, run: dict[str, Any], commands: list[str]) -> dict[str, dict[str, dict]]:
    """A run's results by stage: ``{"test" | "val": {task: entry}}``, read as the grid reads them
    (:func:`avmt.grid.read_results`).

    Args:
        run_dir: the grid folder.
        run: one run of ``grid.json`` (``name``, ``values``, ``seed``).
        commands: the grid's commands (the last command of a stage wins, as in the grid summary).
    """
    handle = Run(run["name"], run["values"], run["seed"], [], [])
    read_results(handle, commands, run_dir)
    return handle.results


def delta_noise(deltas: list[float], bootstrap_variances: list[float | None]) -> float | None:
    """The noise level (standard error) of the mean of per-seed deltas.

    With one seed it is the bootstrap alone: ``sqrt(std_multi² + std_single²)`` from the
    ``bootstrap_std`` of both results files (multi and single are scored on the same samples, so
    ignoring their correlation makes it conservative). With several seeds it combines, in quadrature,
    the seed-to-seed spread ``std(deltas) / sqrt(n)`` (sample std) and the mean bootstrap variance
    of one seed's delta, which is not divided by ``n``: every seed is scored on the same evaluation
    samples, so their sampling error does not average out over seeds. Without bootstrap values the
    seed term alone is used.

    Args:
        deltas: one delta per seed that has both scores.
        bootstrap_variances: per seed, ``std_multi² + std_single²`` (``None`` where a results file has none).
    Returns:
        The noise level, or ``None`` for one seed without bootstrap values.
    """
    known = [v for v in bootstrap_variances if v is not None]
    bootstrap = sum(known) / len(known) if known and len(known) == len(bootstrap_variances) else None
    count = len(deltas)
    if count < 2:
        return math.sqrt(bootstrap) if bootstrap is not None else None
    return math.sqrt(statistics.variance(deltas) / count + (bootstrap or 0.0))


def verdict(delta: float, noise: float | None) -> str:
    """``gain`` if ``delta`` > 2·noise, ``loss`` if ``delta`` < −2·noise, else ``within noise``; ``n/a`` without noise."""
    if noise is None:
        return NO_NOISE
    if delta > SIGNIFICANCE * noise:
        return GAIN
    if delta < -SIGNIFICANCE * noise:
        return LOSS
    return WITHIN_NOISE


def _lower_is_better(task: str, metric: str) -> bool:
    from avmt.tasks import TASKS

    task_class = TASKS.get(task)
    return task_class is not None and metric in task_class.lower_is_better


def _scored(entry: dict | None, metric: str | None) -> tuple[float, float | None] | None:
    """``(score, bootstrap std or None)`` of ``metric`` in a results entry, ``None`` when absent."""
    if entry is None or metric is None or metric not in entry.get("scores", {}):
        return None
    return float(entry["scores"][metric]), entry.get("bootstrap_std", {}).get(metric)


def transfer_rows(run_dir: Path, description: dict[str, Any], axis: str, multi: str) -> list[TransferRow]:
    """Compare, per cell and per task of the multi-task run, the multi-task and the single-task scores.

    Args:
        run_dir: the grid folder.
        description: its ``grid.json``.
        axis: the axis holding the task sets; multi: its multi-task variant (every other variant is
            the single-task run of the task it is named after).
    Returns:
        One row per cell (in run order) and task of the multi-task run (sorted), with or without a
        single-task score.
    """
    commands = description.get("commands") or list(STAGES)
    main_metrics = description.get("main_metrics") or {}
    other_axes = [name for name in description["axes"] if name != axis]
    # cell key -> variant of the transfer axis -> seed -> results by stage
    cells: dict[tuple[str, ...], dict[str, dict[Any, dict]]] = {}
    for run in description["runs"]:
        key = tuple(run["values"][name] for name in other_axes)
        results = run_results(run_dir, run, commands)
        if results:
            cells.setdefault(key, {}).setdefault(run["values"][axis], {})[run["seed"]] = results
    rows = []
    for key, variants in cells.items():
        cell = dict(zip(other_axes, key))
        multi_runs = variants.get(multi, {})
        tasks = sorted({task for results in multi_runs.values() for stage in results.values() for task in stage})
        for task in tasks:
            rows.append(_compare(cell, task, multi_runs, variants.get(task, {}), main_metrics.get(task)))
    return rows


def _compare(cell: dict[str, str], task: str, multi_runs: dict[Any, dict], single_runs: dict[Any, dict],
             metric: str | None) -> TransferRow:
    """One task's row: pair the seeds, pick a stage both runs have, average, and judge the delta."""
    multi_scores, single_scores, variances, stages = [], [], [], []
    for seed, multi_results in multi_runs.items():
        common = [stage for stage in STAGE_PREFERENCE
                  if task in multi_results.get(stage, {}) and task in single_runs.get(seed, {}).get(stage, {})]
        stage = common[0] if common else next((s for s in STAGE_PREFERENCE if task in multi_results.get(s, {})), None)
        if stage is None:
            continue
        multi_entry = multi_results[stage][task]
        if metric is None:
            found = main_score(multi_entry)
            metric = found[0] if found is not None else None
        scored_multi = _scored(multi_entry, metric)
        scored_single = _scored(single_runs.get(seed, {}).get(stage, {}).get(task), metric) if common else None
        if scored_multi is None or scored_single is None:
            continue
        multi_scores.append(scored_multi[0])
        single_scores.append(scored_single[0])
        stds = (scored_multi[1], scored_single[1])
        variances.append(None if None in stds else stds[0] ** 2 + stds[1] ** 2)
        stages.append(stage)
    lower = metric is not None and _lower_is_better(task, metric)
    if not multi_scores:
        return TransferRow(cell, task, metric, lower, [], 0, None, None, None, None, NO_SINGLE)
    sign = -1.0 if lower else 1.0
    deltas = [sign * (m - s) for m, s in zip(multi_scores, single_scores)]
    noise = delta_noise(deltas, variances)
    delta = sum(deltas) / len(deltas)
    return TransferRow(cell, task, metric, lower, sorted(set(stages), key=STAGE_PREFERENCE.index), len(deltas),
                       sum(multi_scores) / len(multi_scores), sum(single_scores) / len(single_scores), delta,
                       noise, verdict(delta, noise))


def summarize(rows: list[TransferRow]) -> list[CellSummary]:
    """Per cell (in row order): tasks compared, with positive transfer, significant gains and losses, mean delta."""
    summaries: dict[str, CellSummary] = {}
    for row in rows:
        summary = summaries.setdefault(cell_label(row.cell), CellSummary(row.cell, 0, 0, 0, 0, 0.0))
        if row.delta is None:
            continue
        summary.compared += 1
        summary.positive += row.delta > 0
        summary.gains += row.verdict == GAIN
        summary.losses += row.verdict == LOSS
        summary.mean_delta += row.delta
    for summary in summaries.values():
        summary.mean_delta = summary.mean_delta / summary.compared if summary.compared else float("nan")
    return list(summaries.values())


def _percent(count: int, total: int) -> str:
    return f"{100 * count / total:.0f}% ({count}/{total})" if total else "-"


def _number(value: float | None, signed: bool = False) -> str:
    if value is None or math.isnan(value):
        return "-" if value is None or not signed else "n/a"
    return f"{value:+.4f}" if signed else f"{value:.4f}"


def transfer_markdown(name: str, axis: str, multi: str, rows: list[TransferRow], summaries: list[CellSummary]) -> str:
    """The transfer report as markdown: the method, one summary table, then one section per cell.

    Args:
        name: the grid's name; axis, multi: the transfer axis and its multi-task variant.
        rows: :func:`transfer_rows`; summaries: :func:`summarize` of them.
    """
    lines = [
        f"# Transfer report: grid {name}", "",
        f"Multi-task run: `{axis}={multi}`; single-task runs: the other variants of `{axis}`, each named after "
        "its task. Per task its main metric, test results where both runs have them (else validation); "
        "delta = multi − single (reversed for a lower-is-better metric, so positive means the multi-task run "
        f"is better); noise: standard error of delta (bootstrap over the evaluation samples, and the seed-to-seed "
        f"spread with several seeds); verdict: gain if delta > {SIGNIFICANCE:g}·noise, loss if delta < "
        f"−{SIGNIFICANCE:g}·noise, else within noise (n/a: no noise estimate).", "",
        "| cell | tasks compared | positive transfer | significant gains | significant losses | mean delta |",
        "|---|---|---|---|---|---|",
    ]
    for summary in summaries:
        lines.append(f"| {cell_label(summary.cell)} | {summary.compared} | "
                     f"{_percent(summary.positive, summary.compared)} | {_percent(summary.gains, summary.compared)} | "
                     f"{_percent(summary.losses, summary.compared)} | {_number(summary.mean_delta, signed=True)} |")
    for summary in summaries:
        label = cell_label(summary.cell)
        lines += ["", f"## {label}", "",
                  f"**Positive transfer on {_percent(summary.positive, summary.compared)} of the tasks**; "
                  f"significant gains {_percent(summary.gains, summary.compared)}, significant losses "
                  f"{_percent(summary.losses, summary.compared)}; mean delta {_number(summary.mean_delta, signed=True)}.",
                  "", "| task | metric | stage | seeds | multi | single | delta | noise | verdict |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for row in rows:
            if cell_label(row.cell) != label:
                continue
            metric = f"{row.metric or '-'}{' (lower is better)' if row.lower_is_better else ''}"
            noise = "n/a" if row.noise is None and row.delta is not None else _number(row.noise)
            lines.append(f"| {row.task} | {metric} | {'/'.join(row.stages) or '-'} | {row.seeds} | "
                         f"{_number(row.multi)} | {_number(row.single)} | {_number(row.delta, signed=True)} | "
                         f"{noise} | {row.verdict} |")
    return "\n".join(lines) + "\n"


def write_transfer_csv(rows: list[TransferRow], path: Path) -> None:
    """One CSV line per row: the cell's axes, then task, metric, stage, seeds, scores, delta, noise, verdict."""
    axes = list(dict.fromkeys(axis for row in rows for axis in row.cell))
    header = [*axes, "task", "metric", "lower_is_better", "stage", "seeds", "multi", "single", "delta", "noise",
              "verdict"]
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            numbers = ["" if value is None else f"{value:.6g}" for value in (row.multi, row.single, row.delta, row.noise)]
            writer.writerow([*(row.cell.get(axis, "") for axis in axes), row.task, row.metric or "",
                             format_value(row.lower_is_better), "/".join(row.stages), row.seeds, *numbers,
                             row.verdict])


def write_transfer_plot(name: str, rows: list[TransferRow], summaries: list[CellSummary], path: Path) -> Path:
    """One panel per cell: per task the delta as a bar (colored by verdict), ±2·noise error bars, a zero line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Patch

    colors = {GAIN: "tab:green", LOSS: "tab:red", WITHIN_NOISE: "tab:gray", NO_NOISE: "lightgray"}
    columns = min(3, len(summaries))
    panel_rows = math.ceil(len(summaries) / columns)
    figure, axes = plt.subplots(panel_rows, columns, figsize=(4.5 * columns, 3.6 * panel_rows), squeeze=False)
    for panel, summary in zip(axes.flat, summaries):
        label = cell_label(summary.cell)
        compared = [row for row in rows if cell_label(row.cell) == label and row.delta is not None]
        positions = range(len(compared))
        errors = [SIGNIFICANCE * row.noise if row.noise is not None else 0.0 for row in compared]
        panel.bar(positions, [row.delta for row in compared], yerr=errors, capsize=3,
                  color=[colors[row.verdict] for row in compared])
        panel.axhline(0.0, color="black", linewidth=0.8)
        panel.set_xticks(list(positions), [row.task for row in compared], fontsize=8)
        panel.set_ylabel("delta (multi − single)", fontsize=8)
        panel.set_title(f"{label}\npositive transfer {_percent(summary.positive, summary.compared)}", fontsize=9)
    for panel in list(axes.flat)[len(summaries):]:
        panel.axis("off")
    handles = [Patch(color=color, label=text) for text, color in colors.items()]
    axes.flat[0].legend(handles=handles, fontsize=7)
    figure.suptitle(f"grid {name}: multi-task minus single-task main score (error bars ±{SIGNIFICANCE:g}·noise)")
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path


def write_transfer_report(run_dir: Path, axis: str | None = None, multi: str | None = None) -> str:
    """Compute the transfer report of a grid folder and write ``transfer.md``, ``transfer.csv`` and
    ``plots/transfer_deltas.png`` into it.

    Args:
        run_dir: the grid folder (with ``grid.json``).
        axis, multi: the transfer axis and its multi-task variant; ``None`` = the grid's ``transfer`` section.
    Returns:
        The report as markdown (the content of ``transfer.md``).
    Raises:
        FileNotFoundError: no ``grid.json``.
        ValueError: no transfer axis, an axis or variant the grid lacks, or no cell with a finished
            multi-task run and single-task run of one of its tasks.
    """
    run_dir = Path(run_dir)
    description = load_grid_description(run_dir)
    section = description.get("transfer") or {}
    axis = axis if axis is not None else section.get("axis")
    multi = multi if multi is not None else section.get("multi")
    if axis is None or multi is None:
        raise UserError(f"{run_dir}: the grid has no 'transfer' section; pass --axis and --multi")
    if axis not in description["axes"]:
        raise UserError(f"{run_dir}: {axis!r} is not an axis of the grid (axes: {', '.join(description['axes'])})")
    rows = transfer_rows(run_dir, description, axis, multi)
    if not any(row.delta is not None for row in rows):
        raise UserError(f"{run_dir}: no finished multi-task/single-task pair ({axis}={multi} and a single-task "
                         f"variant of {axis} with results); run or finish the grid first")
    summaries = summarize(rows)
    markdown = transfer_markdown(description.get("name", run_dir.name), axis, multi, rows, summaries)
    (run_dir / "transfer.md").write_text(markdown)
    write_transfer_csv(rows, run_dir / "transfer.csv")
    write_transfer_plot(description.get("name", run_dir.name), rows, summaries, run_dir / "plots" / "transfer_deltas.png")
    return markdown


def transfer_arguments(arguments: argparse.ArgumentParser) -> None:
    """Add the arguments of ``python -m avmt report transfer`` to ``arguments``."""
    arguments.add_argument("run_dir", help="grid folder (runs/grids/NAME) with grid.json")
    arguments.add_argument("--axis", default=None, help="transfer axis (default: the grid's transfer.axis)")
    arguments.add_argument("--multi", default=None, help="its multi-task variant (default: the grid's transfer.multi)")


def transfer_main(args: argparse.Namespace) -> None:
    """Run ``python -m avmt report transfer`` with its parsed arguments: print the markdown report."""
    markdown = write_transfer_report(Path(args.run_dir), args.axis, args.multi)
    print(markdown, end="")
    print(f"written: {Path(args.run_dir) / 'transfer.md'}, {Path(args.run_dir) / 'transfer.csv'}, "
          f"{Path(args.run_dir) / 'plots' / 'transfer_deltas.png'}")


@dataclass
class ComparedScore:
    """A variant's main score on one task (mean over its seeds), for the comparison report.

    Attributes:
        cell: the other axes' values shared by the compared runs; variant: the compared axis' value.
        task, metric: the task and its main metric; stage: the results stage (``"test"``, else ``"val"``).
        score, baseline: mean over seeds (baseline ``None`` when the results have none).
        noise: standard error of ``score`` from the seeds' bootstrap std (``None`` without it).
        seeds: number of seeds averaged.
    """

    cell: dict[str, str]
    variant: str
    task: str
    metric: str
    stage: str
    score: float
    baseline: float | None
    noise: float | None
    seeds: int


def compared_scores(run_dir: Path, description: dict[str, Any], axis: str) -> list[ComparedScore]:
    """Every variant's main score per task, in run order (tasks sorted), averaged over seeds.

    Args:
        run_dir: the grid folder; description: its ``grid.json``; axis: the compared axis.
    """
    commands = description.get("commands") or list(STAGES)
    main_metrics = description.get("main_metrics") or {}
    other_axes = [name for name in description["axes"] if name != axis]
    groups: dict[tuple, list[dict]] = {}
    for run in description["runs"]:
        results = run_results(run_dir, run, commands)
        stage = next((s for s in STAGE_PREFERENCE if s in results), None)
        if stage is None:
            continue
        key = (tuple(run["values"][name] for name in other_axes), run["values"][axis], stage)
        groups.setdefault(key, []).append(results[stage])
    out = []
    for (cell_key, variant, stage), seed_results in groups.items():
        for task in sorted({task for results in seed_results for task in results}):
            scored = [main_score(results[task], main_metrics.get(task)) for results in seed_results if task in results]
            scored = [entry for entry in scored if entry is not None]
            if not scored:
                continue
            metric = scored[0][0]
            stds = [results[task].get("bootstrap_std", {}).get(metric) for results in seed_results if task in results]
            baselines = [b for _, _, b in scored if b is not None]
            noise = (math.sqrt(sum(std ** 2 for std in stds)) / len(stds)
                     if stds and all(std is not None for std in stds) else None)
            out.append(ComparedScore(dict(zip(other_axes, cell_key)), variant, task, metric, stage,
                                     statistics.fmean(value for _, value, _ in scored),
                                     statistics.fmean(baselines) if baselines else None, noise, len(scored)))
    return out


def write_comparison_report(run_dir: Path, axis: str | None = None, ablations: dict[str, str] | None = None) -> str:
    """``comparison.md`` and ``comparison.csv`` in the grid folder: each variant's main score per task next
    to its trivial baseline, and per ablation (variant -> the variant it ablates) the delta of every task
    they share, ``ablated − reference`` with its noise and a verdict (``gain`` / ``loss`` for the ablated
    run beyond 2 noise levels, the sign flipped for lower-is-better metrics).

    Args:
        run_dir: the grid folder; axis, ablations: default to the grid's ``compare`` section.
    Returns:
        The markdown written.
    """
    description = load_grid_description(run_dir)
    section = description.get("compare") or {}
    axis = axis or section.get("axis")
    ablations = section.get("ablations", {}) if ablations is None else ablations
    if axis is None:
        raise UserError(f"{run_dir}: the grid has no compare section; name the compared axis (--axis)")
    if axis not in description["axes"]:
        raise UserError(f"{run_dir}: {axis!r} is not an axis of the grid (axes: {', '.join(description['axes'])})")
    scores = compared_scores(run_dir, description, axis)
    lines = [f"# Comparison: {description.get('name', run_dir.name)}", "",
             f"Main score per task of each `{axis}` variant (mean over seeds; `test` results, else `val`), "
             "next to its trivial baseline.", "",
             f"| {axis} | cell | task | metric | stage | score | baseline | score − baseline | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    rows = []
    for entry in scores:
        margin = None if entry.baseline is None else entry.score - entry.baseline
        lines.append(f"| {entry.variant} | {cell_label(entry.cell)} | {entry.task} | {entry.metric} | {entry.stage} | "
                     f"{_number(entry.score)} | {_number(entry.baseline)} | {_number(margin, signed=True)} | "
                     f"{entry.seeds} |")
        rows.append({"table": "scores", axis: entry.variant, "cell": cell_label(entry.cell), "task": entry.task,
                     "metric": entry.metric, "stage": entry.stage, "score": entry.score, "baseline": entry.baseline,
                     "noise": entry.noise})
    if ablations:
        lines += ["", f"## Ablations: ablated − reference (`{axis}` variants; verdict for the ablated run beyond "
                  f"{SIGNIFICANCE:g} noise levels, noise from the bootstrap std)", "",
                  "| ablation | reference | cell | task | metric | reference score | ablated score | delta | noise | verdict |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        by_key = {(cell_label(e.cell), e.variant, e.task): e for e in scores}
        for ablation, reference in ablations.items():
            for entry in scores:
                if entry.variant != ablation:
                    continue
                base = by_key.get((cell_label(entry.cell), reference, entry.task))
                if base is None or base.metric != entry.metric:
                    continue
                delta = entry.score - base.score
                noise = (math.sqrt(entry.noise ** 2 + base.noise ** 2)
                         if entry.noise is not None and base.noise is not None else None)
                sign = -1.0 if _lower_is_better(entry.task, entry.metric) else 1.0
                lines.append(f"| {ablation} | {reference} | {cell_label(entry.cell)} | {entry.task} | {entry.metric} | "
                             f"{_number(base.score)} | {_number(entry.score)} | {_number(delta, signed=True)} | "
                             f"{_number(noise)} | {verdict(sign * delta, noise)} |")
                rows.append({"table": "ablations", axis: ablation, "reference": reference,
                             "cell": cell_label(entry.cell), "task": entry.task, "metric": entry.metric,
                             "stage": entry.stage, "score": entry.score, "reference_score": base.score,
                             "delta": delta, "noise": noise})
    markdown = "\n".join(lines) + "\n"
    (run_dir / "comparison.md").write_text(markdown)
    fields = ["table", axis, "reference", "cell", "task", "metric", "stage", "score", "baseline", "reference_score",
              "delta", "noise"]
    with (run_dir / "comparison.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return markdown


def comparison_arguments(arguments: argparse.ArgumentParser) -> None:
    """Add the arguments of ``python -m avmt report comparison`` to ``arguments``."""
    arguments.add_argument("run_dir", help="grid folder (runs/grids/NAME) with grid.json")
    arguments.add_argument("--axis", default=None, help="compared axis (default: the grid's compare.axis)")


def comparison_main(args: argparse.Namespace) -> None:
    """Run ``python -m avmt report comparison``: print the markdown report."""
    print(write_comparison_report(Path(args.run_dir), args.axis), end="")
    print(f"written: {Path(args.run_dir) / 'comparison.md'}, {Path(args.run_dir) / 'comparison.csv'}")


#: ``python -m avmt report NAME``: NAME -> (function adding its arguments, function running it, help).
REPORTS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], None], str]] = {
    "transfer": (transfer_arguments, transfer_main,
                 "multi-task vs single-task score per task and cell of a grid with a transfer section"),
    "comparison": (comparison_arguments, comparison_main,
                   "each variant's main scores next to their baselines, and each ablation's deltas"),
}


def parser() -> argparse.ArgumentParser:
    """Arguments of ``python -m avmt report``: one subcommand per entry of :data:`REPORTS`."""
    arguments = argparse.ArgumentParser(prog="python -m avmt report", description=__doc__.split("\n\n")[0])
    reports = arguments.add_subparsers(dest="report", required=True, metavar="REPORT",
                                       help=", ".join(REPORTS))
    for name, (add_arguments, _, help_text) in REPORTS.items():
        add_arguments(reports.add_parser(name, help=help_text, description=help_text))
    return arguments


def main(argv: list[str]) -> None:
    """``python -m avmt report REPORT ...``: parse and run one report of :data:`REPORTS`."""
    args = parser().parse_args(argv)
    REPORTS[args.report][1](args)
