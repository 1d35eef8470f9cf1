"""AVModule: the LightningModule — steps, per-task losses and metrics, optimizer, checkpoints."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from avmt.adapters import Adapter
from avmt.connectors import Connector
from avmt.encoders import AudioEncoder, VisionEncoder
from avmt.llm import CausalLM
from avmt.model import AVModel, TokenizedBatch
from avmt.tasks import get_task, list_tasks

CHECKPOINT_FORMAT = 1


class AVModule(L.LightningModule):
    """Multi-task audio-visual instruction tuning of an LLM with an adapter.

    Args:
        llm: causal LM plugin (tiny config by default, a hub id/path when named).
        vision_encoder, audio_encoder: encoder plugins.
        vision_connector, audio_connector: connector plugins (one per modality, as in Crab).
        adapter: adapter plugin (LoRA, MoE-LoRA, I-LoRA) or ``None``.
        num_segments: T, segments per clip (must match the data).
        segment_embedding: add a learned segment-index (time) embedding to every media token.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the training steps with linear warm-up (cosine decay after).
        aux_loss_weight: multiplier of the adapter's auxiliary (router balance) losses.
        generation_tasks: tasks evaluated by generating answers and parsing them.
        generation_every_n_epochs: run generation metrics every N validation epochs (and on the last).
        max_generation_samples: at most this many samples per task are generated per evaluation.
        max_new_tokens: generation length limit.
    """

    def __init__(
        self,
        llm: CausalLM,
        vision_encoder: VisionEncoder,
        audio_encoder: AudioEncoder,
        vision_connector: Connector,
        audio_connector: Connector,
        adapter: Adapter | None = None,
        num_segments: int = 10,
        segment_embedding: bool = True,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        aux_loss_weight: float = 1.0,
        generation_tasks: list[str] = ["ave", "avqa"],  # noqa: B006
        generation_every_n_epochs: int = 1,
        max_generation_samples: int = 200,
        max_new_tokens: int = 64,
    ) -> None:
        super().__init__()
        self.model = AVModel(
            llm, vision_encoder, audio_encoder, vision_connector, audio_connector, adapter,
            num_segments=num_segments, segment_embedding=segment_embedding,
        )
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.aux_loss_weight = aux_loss_weight
        self.generation_tasks = list(generation_tasks)
        self.generation_every_n_epochs = generation_every_n_epochs
        self.max_generation_samples = max_generation_samples
        self.max_new_tokens = max_new_tokens
        self.tasks = {name: get_task(name) for name in self.generation_tasks}
        self.task_ids = {name: index for index, name in enumerate(list_tasks())}
        self.task_metrics = nn.ModuleDict({name: task.metrics() for name, task in self.tasks.items()})
        self._answers: dict[str, list[Any]] = defaultdict(list)
        self._generated: dict[str, int] = defaultdict(int)
        self._examples: dict[str, list[tuple[str, str, str]]] = defaultdict(list)  # prompt, target, answer
        self._router_sums: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self._router_batches: dict[str, int] = defaultdict(int)
        self.final_metrics: dict[str, dict[str, float]] = {}

    # ------------------------------------------------------------ batches
    def on_before_batch_transfer(self, batch: dict[str, Any], dataloader_idx: int) -> dict[str, Any]:
        """Tokenize on the host before the batch moves to the device."""
        batch["tokens"] = self.model.tokenize(batch["prompt"], batch["target"])
        return batch

    def _set_task_ids(self, task_names: list[str], device: torch.device) -> None:
        """Tell a task-conditioned adapter (MoE-LoRA ``gate: task``) the task of each sample (registry order)."""
        adapter = self.model.adapter
        if adapter is not None and getattr(adapter, "num_tasks", None):
            ids = [self.task_ids[name] for name in task_names]
            adapter.set_task_ids(torch.tensor(ids, dtype=torch.long, device=device))

    def _routed(self) -> bool:
        adapter = self.model.adapter
        return adapter is not None and hasattr(adapter, "router_stats") and getattr(adapter, "track_router_stats", False)

    def _forward_by_task(self, batch: dict[str, Any], per_task: dict[str, list[int]]) -> torch.Tensor:
        """Per-sample losses computed one task at a time, recording each task's router statistics.

        Returns:
            ``[B, 2]`` summed losses and token counts, as :meth:`AVModel.forward`.
        """
        adapter = self.model.adapter
        tokens = batch["tokens"]
        out = torch.zeros(len(batch["task"]), 2, device=batch["frames"].device)
        for name, indices in per_task.items():
            rows = torch.tensor(indices, device=batch["frames"].device)
            clips, clip_index = torch.unique(batch["clip_index"][rows], return_inverse=True)
            subset = TokenizedBatch(tokens.input_ids[rows], tokens.attention_mask[rows], tokens.labels[rows])
            adapter.reset_router_stats()
            self._set_task_ids([name] * len(indices), out.device)
            out[rows] = self.model(subset, batch["frames"][clips], batch["audio"][clips], clip_index)
            for layer, weights in adapter.router_stats().items():
                self._router_sums[name][layer] = self._router_sums[name].get(layer, 0) + weights.detach().float().cpu()
            for layer, entropy in adapter.router_entropy().items():
                key = f"{layer}/entropy"
                self._router_sums[name][key] = self._router_sums[name].get(key, 0) + entropy.detach().float().cpu()
            self._router_batches[name] += 1
        adapter.reset_router_stats()
        return out

    def _losses(self, batch: dict[str, Any], stage: str) -> torch.Tensor:
        per_task: dict[str, list[int]] = defaultdict(list)
        for index, name in enumerate(batch["task"]):
            per_task[name].append(index)
        if stage == "val" and self._routed():
            sums_counts = self._forward_by_task(batch, per_task)
        else:
            self._set_task_ids(batch["task"], batch["frames"].device)
            sums_counts = self.model(batch["tokens"], batch["frames"], batch["audio"], batch["clip_index"])
        total = sums_counts[:, 0].sum() / sums_counts[:, 1].sum().clamp(min=1)
        for name, indices in per_task.items():
            rows = sums_counts[indices].detach()
            tokens = float(rows[:, 1].sum())
            self.log(
                f"{stage}/loss/{name}",
                rows[:, 0].sum() / max(tokens, 1.0),
                batch_size=max(int(tokens), 1),
                on_step=stage == "train",
                on_epoch=stage != "train",
            )
        self.log(f"{stage}/corrupt_samples", float(batch["corrupt_total"]), reduce_fx="max", batch_size=1)
        return total

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._losses(batch, "train")
        adapter = self.model.adapter
        aux = adapter.aux_loss() if adapter is not None else None
        if aux is not None:
            self.log("train/aux_loss", aux, batch_size=len(batch["task"]))
            loss = loss + self.aux_loss_weight * aux
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch["task"]))
        return loss

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        loss = self._losses(batch, "val")
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch["task"]))
        if self._generation_epoch():
            self._generate_and_score(batch)

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._losses(batch, "test")
        self._generate_and_score(batch)

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> list[dict[str, Any]]:
        self._set_task_ids(batch["task"], batch["frames"].device)
        answers = self.model.generate(
            batch["prompt"], batch["frames"], batch["audio"], batch["clip_index"], self.max_new_tokens
        )
        return [
            {"key": key, "task": task, "prompt": prompt, "answer": answer}
            for key, task, prompt, answer in zip(batch["key"], batch["task"], batch["prompt"], answers, strict=True)
        ]

    # --------------------------------------------------------- generation
    def _generation_epoch(self) -> bool:
        if self.trainer.sanity_checking:
            return False
        if self.trainer.state.fn != "fit":
            return True  # `validate` / `test`: always score
        epoch = self.current_epoch + 1
        last_epoch = self.trainer.max_epochs is not None and epoch >= self.trainer.max_epochs
        last_step = 0 < self.trainer.max_steps <= self.global_step
        return epoch % self.generation_every_n_epochs == 0 or last_epoch or last_step

    def _generate_and_score(self, batch: dict[str, Any]) -> None:
        chosen = [
            i
            for i, name in enumerate(batch["task"])
            if name in self.tasks and self._generated[name] < self.max_generation_samples
        ]
        if not chosen:
            return
        for i in chosen:
            self._generated[batch["task"][i]] += 1
        self._set_task_ids([batch["task"][i] for i in chosen], batch["frames"].device)
        texts = self.model.generate(
            [batch["prompt"][i] for i in chosen],
            batch["frames"],
            batch["audio"],
            batch["clip_index"][chosen],
            self.max_new_tokens,
        )
        by_task: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        for i, text in zip(chosen, texts, strict=True):
            name = batch["task"][i]
            by_task[name][0].append(self.tasks[name].parse(text))
            by_task[name][1].append(batch["answer"][i])
            self._answers[name].append(batch["answer"][i])
            if len(self._examples[name]) < 3:
                self._examples[name].append((batch["prompt"][i], batch["target"][i], text))
        for name, (predictions, answers) in by_task.items():
            self.task_metrics[name].update(predictions, answers)

    def _log_generation_metrics(self, stage: str) -> None:
        for name, collection in self.task_metrics.items():
            if not self._answers[name]:
                continue
            scores = {key: float(value) for key, value in collection.compute().items()}
            baseline = self.tasks[name].majority_baseline(self._answers[name])
            for key, value in scores.items():
                self.log(f"{stage}/{name}/{key}", value, sync_dist=True)
            self.final_metrics[name] = {
                **scores,
                **{f"majority_baseline/{key}": float(value) for key, value in baseline.items()},
                "samples": len(self._answers[name]),
            }
            logger = self.logger
            if logger is not None and hasattr(logger.experiment, "add_text"):
                text = "\n\n".join(
                    f"**prompt** {p}\n\n**target** {t}\n\n**answer** {a}" for p, t, a in self._examples[name]
                )
                logger.experiment.add_text(f"{stage}/{name}/examples", text, self.global_step)
            collection.reset()
        self._answers.clear()
        self._generated.clear()
        self._examples.clear()

    def on_validation_epoch_end(self) -> None:
        self._log_generation_metrics("val")
        self._log_router_telemetry()

    def _log_router_telemetry(self) -> None:
        """Per task: mean routing weight of every head per adapted layer, router entropy, and a task × head heatmap."""
        sums, batches = self._router_sums, self._router_batches
        self._router_sums, self._router_batches = defaultdict(dict), defaultdict(int)
        logger = self.logger
        if not sums or logger is None or not hasattr(logger.experiment, "add_scalar") or self.trainer.sanity_checking:
            return
        if not self.trainer.is_global_zero:
            return
        tasks = sorted(sums)
        means = {task: {key: value / batches[task] for key, value in sums[task].items()} for task in tasks}
        writer, step = logger.experiment, self.global_step
        for task in tasks:
            for key, value in means[task].items():
                if key.endswith("/entropy"):
                    writer.add_scalar(f"router/{task}/{key}", float(value), step)
                else:
                    for head, weight in enumerate(value.tolist()):
                        writer.add_scalar(f"router/{task}/{key}/head{head}", weight, step)
        layers = sorted(key for key in means[tasks[0]] if not key.endswith("/entropy"))
        if not layers:
            return
        heatmap = torch.stack([torch.stack([means[t][layer] for layer in layers]).mean(0) for t in tasks])  # [tasks, K]
        entropies = [
            float(torch.stack([means[t][f"{layer}/entropy"] for layer in layers if f"{layer}/entropy" in means[t]]).mean())
            if any(f"{layer}/entropy" in means[t] for layer in layers)
            else float("nan")
            for t in tasks
        ]
        for task, entropy in zip(tasks, entropies):
            writer.add_scalar(f"router/{task}/entropy", entropy, step)
        writer.add_figure("router/heatmap", router_heatmap(heatmap, tasks), step)


    def on_test_epoch_end(self) -> None:
        self._log_generation_metrics("test")

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and "train" in getattr(datamodule, "datasets", {}):
            datamodule.datasets["train"].set_epoch(self.current_epoch)

    def parameter_report(self) -> dict[str, int]:
        """Trainable parameters per part: the adapter per scope, connectors, encoders, new token rows."""
        from avmt.adapters import count_parameters

        model = self.model
        report: dict[str, int] = {}
        adapter_ids: set[int] = set()
        if model.adapter is not None:
            family = type(model.adapter).__name__
            for scope, count in count_parameters(model.adapter).items():
                report[f"adapter {family} [{scope}]"] = count
            adapter_ids = {id(p) for p in model.adapter.trainable_parameters()}

        def trainable(module: nn.Module) -> int:
            return sum(p.numel() for p in module.parameters() if p.requires_grad and id(p) not in adapter_ids)

        report["vision connector"] = trainable(model.vision_connector)
        report["audio connector"] = trainable(model.audio_connector)
        report["vision encoder"] = trainable(model.vision_encoder)
        report["audio encoder"] = trainable(model.audio_encoder)
        report["llm (new token rows and other non-adapter weights)"] = trainable(model.llm)
        if model.segment_embedding is not None:
            report["segment time codes"] = trainable(model.segment_embedding)
        report["total trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return report

    def on_fit_start(self) -> None:
        lines = ["trainable parameters:"] + [f"  {name:52s} {count:>12,d}" for name, count in self.parameter_report().items()]
        rank_zero_info("\n".join(lines))

    def on_fit_end(self) -> None:
        self.report_final_metrics()

    def on_validation_end(self) -> None:
        if self.trainer.state.fn == "validate":
            self.report_final_metrics()

    def report_final_metrics(self) -> None:
        """Print each generation metric next to its majority-class baseline and save them as JSON."""
        if not self.final_metrics or not self.trainer.is_global_zero:
            return
        lines = ["", "generation metrics (last evaluation) vs. majority-class baseline on the same split:"]
        for name, scores in self.final_metrics.items():
            for key, value in scores.items():
                if key.startswith("majority_baseline/") or key == "samples":
                    continue
                baseline = scores.get(f"majority_baseline/{key}")
                extra = f"   majority baseline {baseline:.3f}" if baseline is not None else ""
                lines.append(f"  {name:8s} {key:32s} {value:.3f}{extra}")
        rank_zero_info("\n".join(lines))
        log_dir = self.trainer.log_dir
        if log_dir is not None:
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            (Path(log_dir) / "final_metrics.json").write_text(json.dumps(self.final_metrics, indent=2))

    # ---------------------------------------------------------- optimizer
    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if not math.isfinite(total):
            return optimizer
        scheduler = get_cosine_schedule_with_warmup(optimizer, int(self.warmup_ratio * total), int(total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    # ---------------------------------------------------------- checkpoints
    def _pretrained_prefixes(self) -> list[str]:
        parts = {
            "model.llm.": self.model.llm,
            "model.vision_encoder.": self.model.vision_encoder,
            "model.audio_encoder.": self.model.audio_encoder,
        }
        return [prefix for prefix, part in parts.items() if getattr(part, "pretrained", False)]

    def _saved_keys(self) -> set[str]:
        """State-dict keys a checkpoint stores: everything except frozen weights loaded from a pretrained checkpoint."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        prefixes = self._pretrained_prefixes()
        return {
            key
            for key in self.state_dict()
            if key in trainable or not any(key.startswith(prefix) for prefix in prefixes)
        }

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._saved_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["avmt"] = {
            "format": CHECKPOINT_FORMAT,
            "tokenizer": self.model.llm.tokenizer_state(),
            "saved_keys": sorted(keep),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("avmt")
        if meta is None or meta.get("format") != CHECKPOINT_FORMAT:
            raise ValueError("not an avmt checkpoint (no 'avmt' metadata of a known format)")
        if meta["tokenizer"] != self.model.llm.tokenizer_state():
            raise ValueError(
                "the checkpoint was trained with a different tokenizer than this config's model.llm; "
                "use the config.yaml saved next to the checkpoint"
            )
        expected = self._saved_keys()
        found = set(checkpoint["state_dict"])
        missing, unexpected = sorted(expected - found), sorted(found - expected)
        if missing or unexpected:
            raise KeyError(
                "checkpoint does not match the model: "
                f"missing {len(missing)} key(s) {missing[:8]}, unexpected {len(unexpected)} key(s) {unexpected[:8]}"
            )
        current = self.state_dict()
        mismatched = [
            f"{key}: checkpoint {tuple(checkpoint['state_dict'][key].shape)}, model {tuple(current[key].shape)}"
            for key in sorted(expected)
            if tuple(checkpoint["state_dict"][key].shape) != tuple(current[key].shape)
        ]
        if mismatched:
            raise ValueError(f"checkpoint shapes do not match the model: {'; '.join(mismatched[:8])}")
        for key in set(current) - expected:  # frozen pretrained weights: already loaded from their checkpoint
            checkpoint["state_dict"][key] = current[key]


def router_heatmap(weights: torch.Tensor, tasks: list[str]):
    """A task × head heatmap of mean routing weights.

    Args:
        weights: ``[num_tasks, K]`` mean routing weight of each head (averaged over adapted layers).
        tasks: row labels.

    Returns:
        A matplotlib Figure (rendered off-screen).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * weights.shape[1], 0.8 + 0.45 * len(tasks)))
    image = axis.imshow(weights.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
    axis.set_xticks(range(weights.shape[1]), [f"head {k}" for k in range(weights.shape[1])])
    axis.set_yticks(range(len(tasks)), tasks)
    for (row, col), value in zip(torch.cartesian_prod(torch.arange(len(tasks)), torch.arange(weights.shape[1])).tolist(),
                                 weights.flatten().tolist()):
        axis.text(col, row, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
    axis.set_title("mean routing weight per task")
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure
