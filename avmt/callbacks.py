"""Lightning callbacks: cross-cutting reports that read what the module collected.

- ``GenerationExamples`` writes, at the end of every validation / test epoch, the generated
  examples the module kept (``AVModule.examples``) to TensorBoard: each example's prompt, target
  and answer as text, and, for tasks that can draw their predictions (``Task.render``), one image
  per example (frames with the target and the prediction overlaid, boxes drawn).
- ``MetricsReport`` prints the scores of the last evaluation as one table (task, metric, value,
  trivial baseline, parse-failure rate, samples) and writes them as ``val_metrics.json``
  (``fit``, ``validate``) or ``test_metrics.json`` (``test``) in the run's log folder.
- ``TrainingOutcome`` (added by ``AVModule.configure_callbacks``, so every fit has it) fails a
  fit that diverged or trained nothing (and warns about one never validated), at the end of
  training and before ``ModelCheckpoint`` (which Lightning runs last) writes the checkpoint of such a run.
- ``PredictionWriter`` writes what ``predict`` generated as ``predictions.jsonl`` (one line per
  sample) and every mask in it as a PNG named by the sample's key.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info

__all__ = ["GenerationExamples", "MetricsReport", "PredictionWriter", "TrainingOutcome", "metrics_table"]


class GenerationExamples(L.Callback):
    """Log the module's generated examples (text, and images where the task draws them) to TensorBoard.

    Tags: ``{stage}/{task}/examples`` (text) and ``{stage}/{task}/examples/{i}`` (images, HWC).
    Needs a logger with ``add_text`` / ``add_image`` (TensorBoard); does nothing otherwise.
    """

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._log(trainer, pl_module, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._log(trainer, pl_module, "test")

    def _log(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        logger = trainer.logger
        writer = getattr(logger, "experiment", None) if logger is not None else None
        if writer is None or not hasattr(writer, "add_text") or not trainer.is_global_zero:
            return
        step = pl_module.global_step
        for name, examples in getattr(pl_module, "examples", {}).items():
            if not examples:
                continue
            text = "\n\n".join(
                f"**prompt** {e.prompt}\n\n**target** {e.target}\n\n**answer** {e.text}" for e in examples
            )
            writer.add_text(f"{stage}/{name}/examples", text, step)
            task = pl_module._task(name)
            for index, example in enumerate(examples):
                image = task.render(example.frames, example.media, example.answer, example.prediction)
                if image is not None:
                    writer.add_image(f"{stage}/{name}/examples/{index}", np.asarray(image), step, dataformats="HWC")


def metrics_table(metrics: dict[str, dict[str, Any]]) -> str:
    """The module's ``final_metrics`` as a text table.

    Args:
        metrics: task -> ``{"scores", "baseline", "baseline_name", "samples", ...}`` (and
            ``"extra_baselines"``: name -> scores, shown after the trivial baseline).
    Returns:
        One row per task and metric (the parse-failure rate is a column, not a row).
    """
    header = ("task", "metric", "value", "trivial baseline", "failure rate", "samples")
    rows = []
    for task, entry in sorted(metrics.items()):
        scores, baseline = entry["scores"], entry["baseline"]
        failure = scores.get("parse_failure_rate", float("nan"))
        for key, value in scores.items():
            if key == "parse_failure_rate":
                continue
            named = [(entry["baseline_name"], baseline.get(key)),
                     *((other, scores_.get(key)) for other, scores_ in entry.get("extra_baselines", {}).items())]
            bases = "; ".join(f"{base:.3f} ({base_name})" for base_name, base in named if base is not None)
            rows.append((task, key, f"{value:.3f}", bases or "-",
                         f"{failure:.3f}" if not math.isnan(failure) else "-", str(entry["samples"])))
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *(line(r) for r in rows)])


class MetricsReport(L.Callback):
    """Print the last evaluation's scores as one table and save them as JSON in the log folder.

    ``fit`` and ``validate`` write ``val_metrics.json``, ``test`` writes ``test_metrics.json``
    (task -> scores, trivial baseline and its name, samples, generation seconds).
    """

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "val")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "validate":
            self._report(trainer, pl_module, "val")

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._report(trainer, pl_module, "test")

    def _report(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        log_dir = trainer.log_dir  # under DDP a broadcast from rank 0: every rank must ask
        metrics = getattr(pl_module, "final_metrics", None)
        if not metrics or not trainer.is_global_zero:
            return
        path = Path(log_dir or ".") / f"{stage}_metrics.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(metrics, indent=2))
        rank_zero_info(f"\n{stage} scores (generated answers) next to the trivial baseline on the same samples:\n"
                       f"{metrics_table(metrics)}\nsaved to {path}")


class TrainingOutcome(L.Callback):
    """Never let a bad fit end as a success: ask the module to check its training health after
    every validation and every training epoch (non-finite steps skipped too often), and its outcome
    at the end of training (diverged or zero optimizer updates; no validation, hence no final
    metrics, only warns).

    Lightning runs checkpoint callbacks after all others, so these checks raise before
    ``ModelCheckpoint`` writes ``last.ckpt``; a failed run keeps only the checkpoints written while
    it was still healthy. The module must have ``check_training_health(when)`` and
    ``check_training_outcome()`` (:class:`avmt.module.AVModule`); another module is not checked.
    """

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking and hasattr(pl_module, "check_training_health"):
            pl_module.check_training_health(f"the validation at global step {trainer.global_step}")

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(pl_module, "check_training_health"):
            pl_module.check_training_health(f"the end of epoch {trainer.current_epoch}")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if hasattr(pl_module, "check_training_outcome"):
            pl_module.check_training_outcome()


def _mask_png(mask: torch.Tensor, path: Path) -> None:
    """Write a ``[..., H, W]`` mask (bool, probabilities in [0, 1], or small integer ids) as one
    8-bit grayscale PNG with the leading frames tiled left to right."""
    from PIL import Image

    array = mask.detach().cpu()
    if array.dtype == torch.bool:
        array = array.to(torch.uint8) * 255
    elif array.is_floating_point():
        array = (array.clamp(0, 1) * 255).round().to(torch.uint8)
    else:
        array = array.clamp(0, 255).to(torch.uint8)
    array = array.reshape(-1, *array.shape[-2:])  # [N, H, W]
    n, h, w = array.shape
    Image.fromarray(array.permute(1, 0, 2).reshape(h, n * w).numpy(), mode="L").save(path)


class PredictionWriter(BasePredictionWriter):
    """``predict`` output: ``predictions.jsonl`` and one PNG per mask, in the run's log folder.

    Each line: ``key``, ``task``, ``prompt``, ``text`` (generated), ``prediction`` (the task's
    parsed prediction), ``answer`` (the ground truth, when the data has it). A tensor of two or
    more dimensions inside a prediction or answer (a mask) is written as
    ``masks/{key}.{task}.{prediction|answer}.{field}.png`` (frames tiled left to right) and the line holds
    that path, relative to the jsonl file; smaller tensors become lists.

    Args:
        output_dir: where to write; ``None`` = the trainer's log folder.
    """

    def __init__(self, output_dir: str | None = None) -> None:
        super().__init__(write_interval="batch")
        self.output_dir = output_dir
        self.path: Path | None = None
        self.count = 0

    def _folder(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or trainer.log_dir or ".")

    def on_predict_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        folder = self._folder(trainer)
        folder.mkdir(parents=True, exist_ok=True)
        self.path = folder / "predictions.jsonl"
        if trainer.is_global_zero:  # every rank appends its own lines; one empties the file, before any writes
            self.path.write_text("")
        trainer.strategy.barrier("PredictionWriter.on_predict_start")
        self.count = 0

    def _jsonable(self, value: Any, stem: str, folder: Path) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() >= 2:
                relative = Path("masks") / f"{stem}.png"
                (folder / relative).parent.mkdir(parents=True, exist_ok=True)
                _mask_png(value, folder / relative)
                return str(relative)
            return value.tolist()
        if isinstance(value, dict):
            return {str(k): self._jsonable(v, f"{stem}.{k}", folder) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [self._jsonable(v, f"{stem}.{i}", folder) for i, v in enumerate(value)]
        if isinstance(value, (np.generic,)):
            return value.item()
        return value

    def write_on_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, prediction: Any,
                           batch_indices: Any, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        assert self.path is not None
        folder = self.path.parent
        with self.path.open("a") as out:
            for row in prediction:
                stem = f"{row['key']}.{row['task']}".replace("/", "_")
                line = {
                    **{k: row[k] for k in ("key", "task", "prompt", "text")},
                    "prediction": self._jsonable(row["prediction"], f"{stem}.prediction", folder),
                    "answer": self._jsonable(row.get("answer"), f"{stem}.answer", folder),
                }
                out.write(json.dumps(line) + "\n")
                self.count += 1

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        total = int(trainer.strategy.reduce(torch.tensor(float(self.count)), reduce_op="sum"))  # every rank's lines
        if trainer.is_global_zero and self.path is not None:
            rank_zero_info(f"predict: wrote {total} predictions to {self.path}"
                           + (f" (masks in {self.path.parent / 'masks'})" if (self.path.parent / "masks").exists() else ""))
