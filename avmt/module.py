"""AVModule: the LightningModule — steps, per-task losses and metrics, optimizer, checkpoints."""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from transformers import LogitsProcessorList, get_cosine_schedule_with_warmup

from avmt.adapters import Adapter
from avmt.bootstrap import bootstrap_std
from avmt.connectors import Connector
from avmt.data.sample import IGNORE_INDEX, Batch, MediaRef, segment_frames
from avmt.encoders import AudioEncoder, VisionEncoder
from avmt.errors import UserError
from avmt.generation import AnswerShapes, sentence_end_ids
from avmt.heads import Head
from avmt.llm import CausalLM, tokenizer_difference
from avmt.model import AVModel
from avmt.outputs import ModelOutput
from avmt.pretrain import MediaPretraining
from avmt.tasks import TASKS, Task, get_task, task_ids
from avmt.tasks.formats import AnswerFormat, TaggedText

CHECKPOINT_FORMAT = 1

#: What ``AVModule(nonfinite=...)`` does at a non-finite loss or gradient.
NONFINITE_POLICIES = ("raise", "skip")


class TrainingDiverged(RuntimeError):
    """Training produced a non-finite loss or gradient (or skipped too many such steps).

    Not a user mistake the CLI can name a key for (a learning rate too high, an unstable
    precision): it keeps its traceback and ends the run with a non-zero status, before a checkpoint
    of the broken weights is written as if the run had succeeded.
    """


def _to_cpu(value: Any) -> Any:
    """``value`` with every tensor inside (dicts and lists too) moved to the CPU."""
    if isinstance(value, torch.Tensor):
        return value.detach().cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_to_cpu(item) for item in value)
    return value


def gather_objects(values: list[Any]) -> list[Any]:
    """``values`` of every rank concatenated in rank order (``torch.distributed.all_gather_object``);
    ``values`` itself in a single process. Every rank must call it, in the same order."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return values
    gathered: list[list[Any] | None] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, list(values))
    return [value for part in gathered for value in (part or [])]


def sharding_units(llm: nn.Module) -> list[nn.Module]:
    """The LLM's blocks, each one FSDP2 unit: the modules whose class a transformers model declares
    in ``_no_split_modules`` (e.g. ``LlamaDecoderLayer``; once sharded, FSDP2's subclass of it),
    outermost first, none inside another."""
    names = {name for module in llm.modules() for name in (getattr(module, "_no_split_modules", None) or ())}
    units: list[nn.Module] = []
    inside: set[int] = set()  # modules of the units found so far (modules() visits a unit before its children)
    for module in llm.modules():
        if id(module) not in inside and any(cls.__name__ in names for cls in type(module).__mro__):
            units.append(module)
            inside.update(id(child) for child in module.modules())
    return units


def data_num_segments(datamodule: Any) -> tuple[int, str] | None:
    """The segments per clip of a data module's clips, and where that number comes from.

    Read from the generator settings of AVSynth generated into the cache (``root`` unset), or from
    the ``manifest.json`` of ``root`` (:func:`avmt.data.shards.manifest_segments`). ``None`` when
    neither says.
    """
    if datamodule is None:
        return None
    root = getattr(datamodule, "root", None)
    synth = getattr(datamodule, "synth_config", None)
    if root is None:
        count = getattr(synth, "num_segments", None)
        return (int(count), "AVSynth generated with data.root: null") if isinstance(count, int) else None
    from avmt.data.shards import MANIFEST, manifest_segments

    count = manifest_segments(root)
    return None if count is None else (count, f"num_segments in {Path(root) / MANIFEST}, the manifest of data.root")


@dataclass
class GeneratedExample:
    """One generated answer kept for TensorBoard (see :class:`avmt.callbacks.GenerationExamples`).

    Attributes:
        task, prompt, target, text: the task, its prompt and target, the generated answer.
        answer: the structured ground truth; prediction: what ``Task.predict`` made of the outputs.
        frames: ``uint8 [T, 3, H, W]`` the segment frames of the sample's clip (CPU).
        media: the sample's media references (``<image>`` names its segment).
    """

    task: str
    prompt: str
    target: str
    text: str
    answer: Any
    prediction: Any
    frames: torch.Tensor
    media: tuple[MediaRef, ...]


class AVModule(L.LightningModule):
    """Multi-task audio-visual instruction tuning of an LLM with an adapter.

    The module loops over what the tasks and heads declare and never names a task: every task's
    LM loss, the dense losses it adds (``Task.dense_losses``) and, when it is scored by
    generation, its prediction from the generated text and head outputs (``Task.predict``).

    Args:
        llm: causal LM plugin (tiny config by default, a hub id/path when named).
        vision_encoder, audio_encoder: encoder plugins.
        vision_connector, audio_connector: connector plugins (one per modality, as in Crab).
        adapter: adapter plugin (LoRA, MoE-LoRA, I-LoRA) or ``None``.
        image_connector: connector of ``<image>`` (one frame); ``None`` = the vision connector.
        heads: head plugins (e.g. the mask decoder read at ``<seg>``).
        num_segments: T, segments per clip (must match the data).
        segment_embedding: add a learned segment-index (time) embedding to every media token.
        media_token_rms: rescale every connector token to this root mean square before the LLM reads
            it (``None``: as the connector gives it); see :class:`~avmt.model.AVModel`.
        time_word_rms: add the LLM's embedding of each segment's time word (as the answer format
            writes it), rescaled to this root mean square, to that segment's media tokens
            (``None``: off); see :class:`~avmt.model.AVModel`.
        learning_rate: peak AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_ratio: fraction of the training steps with linear warm-up (cosine decay after).
        aux_loss_weight: multiplier of the adapter's auxiliary (router balance) losses.
        dense_loss_weights: multiplier of each dense loss the tasks add, by loss name (e.g.
            ``bce``, ``dice``, ``ce``); a task loss without a weight here is a configuration error.
        generation_tasks: tasks evaluated by generating answers (``None`` = every task of the data).
        generation_every_n_epochs: run generation metrics every N validation epochs (and on the last).
        max_generation_samples: at most this many samples per task are generated per evaluation.
        max_new_tokens: generation length limit (the cap; with ``answer_budget`` each task stops at
            its longest training target plus a margin).
        answer_budget: shape generation by what the training targets look like
            (:mod:`avmt.generation`): per-task length budgets, and reasoning answers forced to
            conclude once they have used as many sentences as the targets have, or repeat one.
        num_examples: generated examples per task kept for TensorBoard at each evaluation.
        media_pretraining: stage 1 (:class:`~avmt.pretrain.MediaPretraining`): before ``fit``, the
            encoders and connectors are pretrained on the training clips' AVSynth scene graphs (or
            loaded from its cache) and the encoders frozen; ``None`` skips it.
        bootstrap_resamples: each scored task's ``final_metrics`` entry gets ``bootstrap_std``, the
            standard deviation of every metric over this many resamples (with replacement) of the
            scored samples (:func:`avmt.bootstrap.bootstrap_std`, fixed seed); ``0`` disables it.
            Under DDP each rank resamples only the samples it scored.
        nonfinite: what a non-finite (NaN/inf) training loss or gradient does. ``raise`` stops the
            run with :class:`TrainingDiverged` naming the global step and the batch's tasks whose
            loss is non-finite; ``skip`` drops that optimizer step (no parameter changes), counts it
            (logged as ``train/nonfinite_skipped``) and still fails the run when more than
            ``max_nonfinite_fraction`` of the optimizer steps so far were skipped, or all of them.
        max_nonfinite_fraction: with ``nonfinite: skip``, the largest fraction of optimizer steps
            that may be skipped (checked after every validation, every training epoch and at the
            end of training, before a checkpoint is written).
    """

    def __init__(
        self,
        llm: CausalLM,
        vision_encoder: VisionEncoder,
        audio_encoder: AudioEncoder,
        vision_connector: Connector,
        audio_connector: Connector,
        adapter: Adapter | None = None,
        image_connector: Connector | None = None,
        heads: list[Head] = [],  # noqa: B006
        num_segments: int = 10,
        segment_embedding: bool = True,
        learning_rate: float = 1e-3,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.03,
        aux_loss_weight: float = 1.0,
        dense_loss_weights: dict[str, float] = {"bce": 1.0, "dice": 1.0, "ce": 1.0},  # noqa: B006
        generation_tasks: list[str] | None = None,
        generation_every_n_epochs: int = 1,
        max_generation_samples: int = 200,
        max_new_tokens: int = 64,
        answer_budget: bool = True,
        num_examples: int = 3,
        media_pretraining: MediaPretraining | None = None,
        bootstrap_resamples: int = 100,
        nonfinite: str = "raise",
        max_nonfinite_fraction: float = 0.1,
        media_token_rms: float | None = None,
        time_word_rms: float | None = None,
    ) -> None:
        super().__init__()
        if nonfinite not in NONFINITE_POLICIES:
            raise UserError(f"model.nonfinite must be one of {list(NONFINITE_POLICIES)}, got {nonfinite!r}")
        if not 0.0 <= max_nonfinite_fraction <= 1.0:
            raise UserError(f"model.max_nonfinite_fraction must be within [0, 1], got {max_nonfinite_fraction!r}")
        if not learning_rate > 0:
            raise UserError(f"model.learning_rate must be > 0, got {learning_rate!r}")
        if not 0.0 <= warmup_ratio < 1.0:
            raise UserError(f"model.warmup_ratio must be within [0, 1), got {warmup_ratio!r}")
        if num_segments < 1:
            raise UserError(f"model.num_segments must be >= 1, got {num_segments!r}")
        self.model = AVModel(
            llm, vision_encoder, audio_encoder, vision_connector, audio_connector, adapter,
            num_segments=num_segments, segment_embedding=segment_embedding,
            image_connector=image_connector, heads=heads, media_token_rms=media_token_rms,
            time_word_rms=time_word_rms,
        )
        self.learning_rate = learning_rate
        self.weight_decay = weight_decay
        self.warmup_ratio = warmup_ratio
        self.aux_loss_weight = aux_loss_weight
        self.dense_loss_weights = dict(dense_loss_weights)
        self.generation_every_n_epochs = generation_every_n_epochs
        self.max_generation_samples = max_generation_samples
        self.max_new_tokens = max_new_tokens
        self.answer_budget = bool(answer_budget)
        self.answer_shapes: AnswerShapes | None = None
        self._generation_seconds: dict[str, float] = defaultdict(float)
        self._forced_rows: dict[str, int] = defaultdict(int)
        self.num_examples = num_examples
        self.media_pretraining = media_pretraining
        self._pretraining_curve: list[dict[str, float]] = []
        self.task_ids = task_ids()
        # the data module's answer format, taken in setup (tasks built before it use the default)
        self.answer_format: AnswerFormat = TaggedText()
        self._set_time_words()
        self._saved_answer_format: dict[str, Any] | None = None  # a loaded checkpoint's, checked in setup
        self.tasks: dict[str, Task] = {}
        self.task_metrics = nn.ModuleDict()
        self._score_data_tasks = generation_tasks is None  # resolved in setup, from the data module
        if generation_tasks is not None:
            self._score_tasks(generation_tasks)
        self._answers: dict[str, list[Any]] = defaultdict(list)
        # task -> JSON answer -> count, over training, for the baselines fitted on training answers
        self._train_answers: dict[str, Counter[str]] = defaultdict(Counter)
        self._generated: dict[str, int] = defaultdict(int)
        self.examples: dict[str, list[GeneratedExample]] = defaultdict(list)
        self._router_sums: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
        self._router_batches: dict[str, int] = defaultdict(int)
        self._stage_batches: dict[str, int] = defaultdict(int)  # batches seen per stage (see _require_data)
        self._loss_tasks: dict[str, Task] = {}
        self.final_metrics: dict[str, dict[str, float]] = {}
        self._checked_feature_caches: set[str] = set()
        self.bootstrap_resamples = bootstrap_resamples
        # task -> the predictions scored this evaluation, beside _answers, for bootstrap_std (CPU)
        self._predictions: dict[str, list[Any]] = defaultdict(list)
        self.nonfinite = nonfinite
        self.max_nonfinite_fraction = float(max_nonfinite_fraction)
        self._generation_task_names = None if generation_tasks is None else list(generation_tasks)
        # training health, read by avmt.callbacks.TrainingOutcome (kept in checkpoints for a resume)
        self.optimizer_steps = 0  # optimizer steps attempted (skipped ones included)
        self.nonfinite_skipped = 0  # optimizer steps skipped for a non-finite loss or gradient
        self.validations_completed = 0  # validation epochs run during fit (sanity checks excluded)
        self._nonfinite_loss_tasks: list[str] = []  # tasks whose loss was non-finite since the last step
        self._train_losses: list[tuple[str, torch.Tensor]] = []  # (task, its loss) of the current training batch
        self._step_tasks: list[str] = []  # the tasks of the batches since the last optimizer step

    def _score_tasks(self, names: list[str]) -> None:
        """Tasks scored by generation, each with its metric collection."""
        self.tasks = {name: get_task(name, answer_format=self.answer_format) for name in names}
        self.task_metrics = nn.ModuleDict({name: task.metrics() for name, task in self.tasks.items()})

    def setup(self, stage: str) -> None:
        """Check that the model produces every output the data's tasks read; resolve ``generation_tasks``."""
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        names = list(getattr(datamodule, "task_names", []) or [])
        check_vocabulary = getattr(datamodule, "check_vocabulary", None)
        if check_vocabulary is not None:
            check_vocabulary(self.model.tokenizer)
        self._take_answer_format(getattr(datamodule, "answer_format", None) or TaggedText())
        if self._score_data_tasks and names:
            self._score_tasks(names)
        if names and self._generation_task_names is not None:
            outside = [name for name in self._generation_task_names if name not in names]
            if outside:
                raise UserError(
                    f"model.generation_tasks {self._generation_task_names} includes {outside}, which data.tasks "
                    f"{names} does not hold: such a task is never scored; add it to data.tasks or remove it from "
                    "model.generation_tasks"
                )
        self._check_num_segments(datamodule)
        if stage == "fit" and self.media_pretraining is not None:
            self.pretrain_media(datamodule, self.trainer.strategy.root_device)
        elif self.media_pretraining is not None:
            self.media_pretraining.freeze(self.model)  # the checkpoint's encoders, frozen as in its fit
        produced = {head.output for head in self.model.heads}
        for name in dict.fromkeys([*names, *self.tasks]):
            task = self._task(name)
            missing = [output for output in task.outputs if output not in produced]
            if missing:
                raise UserError(
                    f"data.tasks includes {name!r}, which reads the model output(s) {missing}; model.heads "
                    f"produces {sorted(produced) or 'nothing'}: add a head that produces them "
                    f"(python -m avmt plugins lists the heads)"
                )
            unknown = [p for p in task.inputs if p not in self.model.placeholder_ids]
            if unknown:
                raise UserError(f"task {name!r} needs the placeholder(s) {unknown}, which the LLM's tokenizer "
                                 "lacks: add them to model.llm.init_args.special_tokens")

    def _take_answer_format(self, answer_format: AnswerFormat) -> None:
        """Score and take losses with the data module's answer format (its targets are written in it).

        Raises:
            UserError: a format token is not one token of the LLM's tokenizer (names the key that
                adds them), or a loaded checkpoint was trained with another format.
        """
        if self._saved_answer_format is not None and self._saved_answer_format != answer_format.config():
            raise UserError(
                f"the checkpoint was trained with the answer format {self._saved_answer_format}, but data.answer_format "
                f"is {answer_format.config()}: set data.answer_format to the checkpoint's (its config.yaml has it)")
        tokenizer = self.model.tokenizer
        unk = getattr(tokenizer, "unk_token_id", None)
        split = [token for token in answer_format.tokens()
                 if len(ids := tokenizer(token, add_special_tokens=False)["input_ids"]) != 1 or ids[0] == unk]
        if split:
            raise UserError(
                f"data.answer_format {type(answer_format).__name__} writes {len(split)} token(s) that are not single "
                f"tokens of the LLM (e.g. {', '.join(split[:5])}): add all of {type(answer_format).__name__}.tokens() "
                "to model.llm.init_args.special_tokens")
        if answer_format != self.answer_format:
            self.answer_format = answer_format
            self._set_time_words()
            self._loss_tasks = {}
            if self.tasks:
                self._score_tasks(list(self.tasks))

    def _set_time_words(self) -> None:
        """Give the model the answer format's word for each time ``0..T-1`` (its time codes, when
        ``time_word_rms`` is set)."""
        if self.model.time_word_rms is not None:
            self.model.set_time_words([self.answer_format.time(s) for s in range(self.model.num_segments)])

    def _check_num_segments(self, datamodule: Any) -> None:
        """Refuse a model whose ``num_segments`` differs from the segments per clip of the data."""
        found = data_num_segments(datamodule)
        if found is None:
            return
        count, source = found
        if count != self.model.num_segments:
            raise UserError(
                f"model.num_segments is {self.model.num_segments} but the data has {count} segments per clip "
                f"({source}): set model.num_segments: {count}"
            )

    def pretrain_media(self, datamodule: Any, device: torch.device | str = "cpu") -> None:
        """Stage 1 (``media_pretraining``) on the data module's train and val shards, once; nothing
        when it is ``None``. ``fit`` runs it in ``setup``; ``data features`` before encoding, so that a
        feature cache holds the pretrained encoders' features."""
        if self.media_pretraining is None or self._pretraining_curve:
            return
        shards = getattr(datamodule, "shards", {})
        if not shards.get("train") or not shards.get("val"):
            raise UserError("model.media_pretraining needs a data module with train and val shards (AVSynth)")
        self._pretraining_curve = self.media_pretraining.apply(self.model, shards["train"], shards["val"], device=device)

    def _task(self, name: str) -> Task:
        """The task object used for losses and predictions (one per name)."""
        if name not in self._loss_tasks:
            self._loss_tasks[name] = self.tasks.get(name) or get_task(name, answer_format=self.answer_format)
        return self._loss_tasks[name]

    # ------------------------------------------------------------ batches
    def on_before_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        """Tokenize on the host before the batch moves to the device; at the first batch of a
        feature cache, check that its encoders are this model's."""
        if batch.feature_cache is not None and batch.feature_cache not in self._checked_feature_caches:
            from avmt.data.features import check_cache_matches

            check_cache_matches(batch.feature_cache, self.model)  # ValueError naming every differing field
            self._checked_feature_caches.add(batch.feature_cache)
        batch.tokens = self.model.tokenize(batch.prompts, batch.targets)
        return batch

    def _set_task_ids(self, task_names: list[str], device: torch.device) -> None:
        """Tell a task-conditioned adapter (MoE-LoRA ``gate: task``) the stable id of each sample's task."""
        adapter = self.model.adapter
        if adapter is not None and getattr(adapter, "num_tasks", None):
            unknown = sorted({name for name in task_names if name not in self.task_ids})
            if unknown:
                raise UserError(f"the adapter routes by task and {unknown} is not a registered task; "
                                 "ask a task (e.g. a request's 'task') rather than a free instruction")
            ids = [self.task_ids[name] for name in task_names]
            adapter.set_task_ids(torch.tensor(ids, dtype=torch.long, device=device))

    def _routed(self) -> bool:
        adapter = self.model.adapter
        return adapter is not None and hasattr(adapter, "router_stats") and getattr(adapter, "track_router_stats", False)

    def _forward_task(self, batch: Batch, name: str, rows: list[int]) -> ModelOutput:
        """The forward of one task's samples, recording that task's router statistics."""
        adapter = self.model.adapter
        adapter.reset_router_stats()
        self._set_task_ids([name] * len(rows), batch.frames.device)
        out = self.model(batch.take(rows))
        for layer, weights in adapter.router_stats().items():
            self._router_sums[name][layer] = self._router_sums[name].get(layer, 0) + weights.detach().float().cpu()
        for layer, entropy in adapter.router_entropy().items():
            key = f"{layer}/entropy"
            self._router_sums[name][key] = self._router_sums[name].get(key, 0) + entropy.detach().float().cpu()
        self._router_batches[name] += 1
        adapter.reset_router_stats()
        return out

    def _dense_losses(self, name: str, out: ModelOutput, out_rows: list[int], batch: Batch,
                      rows: list[int]) -> dict[str, torch.Tensor]:
        """Task ``name``'s weighted dense losses; ``out_rows`` / ``rows`` are its rows in ``out`` / ``batch``."""
        task = self._task(name)
        if not task.outputs and not task.dense_targets:
            return {}
        outputs = {output: out.dense[output].take(out_rows) for output in task.outputs if output in out.dense}
        targets = {spec.name: batch.dense[spec.name].take(rows) for spec in task.dense_targets if spec.name in batch.dense}
        weighted = {}
        for loss_name, value in task.dense_losses(outputs, targets).items():
            if loss_name not in self.dense_loss_weights:
                raise UserError(
                    f"task {name!r} adds a {loss_name!r} loss and model.dense_loss_weights has no weight for it "
                    f"(it has {sorted(self.dense_loss_weights)})"
                )
            weighted[loss_name] = self.dense_loss_weights[loss_name] * value
        return weighted

    def _losses(self, batch: Batch, stage: str) -> torch.Tensor:
        """LM loss (token mean over the batch) plus every task's weighted dense losses; logs them per task."""
        by_task = batch.task_rows()
        if stage == "val" and self._routed():
            parts = [(name, rows, self._forward_task(batch, name, rows), list(range(len(rows))))
                     for name, rows in by_task.items()]
        else:
            self._set_task_ids(batch.tasks, batch.frames.device)
            out = self.model(batch)
            parts = [(name, rows, out, rows) for name, rows in by_task.items()]
        lm_sum = lm_count = dense_total = 0.0
        for name, rows, out, out_rows in parts:
            index = torch.tensor(out_rows, device=out.loss_sum.device)
            task_sum, task_count = out.loss_sum[index].sum(), out.token_count[index].sum()
            lm_sum, lm_count = lm_sum + task_sum, lm_count + task_count
            tokens = float(task_count.detach())
            if stage == "train":
                self._train_losses.append((name, task_sum.detach()))
            self.log(f"{stage}/loss/{name}", task_sum.detach() / max(tokens, 1.0), batch_size=max(int(tokens), 1),
                     on_step=stage == "train", on_epoch=stage != "train")
            for loss_name, value in self._dense_losses(name, out, out_rows, batch, rows).items():
                dense_total = dense_total + value
                if stage == "train":
                    self._train_losses.append((f"{name} ({loss_name})", value.detach()))
                self.log(f"{stage}/loss/{name}/{loss_name}", value.detach(), batch_size=len(rows),
                         on_step=stage == "train", on_epoch=stage != "train")
        self.log(f"{stage}/corrupt_samples", float(batch.corrupt_total), reduce_fx="max", batch_size=1)
        return lm_sum / lm_count.clamp(min=1) + dense_total

    def _require_data(self, stage: str, split: str) -> None:
        """Fail a stage that got no batch at all (every sample corrupt, an empty or wrong shard
        folder): such a run must not end as a success. The message says what the reader skipped."""
        if self._stage_batches[stage]:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        dataset = getattr(datamodule, "datasets", {}).get(split) if datamodule is not None else None
        counter = getattr(dataset, "counter", None)
        skipped = f"{counter.count} sample(s) were skipped as corrupt ({counter.reasons})" if counter else "nothing was read"
        shards = getattr(datamodule, "shards", {}).get(split, [])
        where = f" in {[str(p) for p in shards[:3]]}" if shards else ""
        raise UserError(
            f"the {stage} stage got no data{where}: {skipped}. Shards must hold avmt samples (AVSynth, or a "
            f"dataset converted with: python -m avmt data convert FORMAT --src DIR --out DIR)"
        )

    def on_train_epoch_end(self) -> None:
        self._require_data("train", "train")
        self._stage_batches["train"] = 0
        self._merge_answer_shapes()  # before ModelCheckpoint writes this epoch's checkpoint

    def on_predict_epoch_end(self) -> None:
        self._require_data("predict", "predict")

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        self._stage_batches["train"] += 1
        if self.answer_budget:
            self._record_answer_shapes(batch)
        self._record_train_answers(batch)
        loss = self._losses(batch, "train")
        adapter = self.model.adapter
        aux = adapter.aux_loss() if adapter is not None else None
        if aux is not None:
            self.log("train/aux_loss", aux, batch_size=len(batch))
            loss = loss + self.aux_loss_weight * aux
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self._step_tasks.extend(name for name in dict.fromkeys(batch.tasks) if name not in self._step_tasks)
        task_losses, self._train_losses = self._train_losses, []
        if not torch.isfinite(loss.detach()):  # the one check per step; the tasks are named only then
            self._nonfinite_loss_tasks += [name for name, value in task_losses if not torch.isfinite(value).all()]
            tasks = list(dict.fromkeys(self._nonfinite_loss_tasks)) or ["none on its own (their sum overflows)"]
            if self.nonfinite == "raise":
                raise TrainingDiverged(
                    f"the training loss is {float(loss.detach())} at global step {self.global_step} (batch "
                    f"{batch_idx}); tasks whose loss is non-finite: {', '.join(tasks)}; tasks of the batch: "
                    f"{', '.join(dict.fromkeys(batch.tasks))}. Lower model.learning_rate, check the data of these "
                    "tasks, or set model.nonfinite: skip to skip such steps"
                )
            self._nonfinite_loss_tasks = tasks  # the optimizer step skips (on_before_optimizer_step)
        return loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        """Stop at (``nonfinite: raise``) or skip (``nonfinite: skip``) a step whose gradients or
        loss are non-finite; skipping drops every gradient, so the optimizer changes no parameter.

        Runs before gradient clipping, so the gradients are the raw ones. Under DDP the gradients
        are already reduced, so every rank takes the same decision.
        """
        self.optimizer_steps += 1
        loss_tasks, step_tasks = self._nonfinite_loss_tasks, self._step_tasks
        self._nonfinite_loss_tasks, self._step_tasks = [], []
        grads = [(name, p.grad) for name, p in self.named_parameters() if p.grad is not None]
        finite = not grads or bool(torch.stack([torch.isfinite(g).all() for _, g in grads]).all())  # one sync
        bad = [] if finite else [name for name, g in grads if not torch.isfinite(g).all()]
        if not bad and not loss_tasks:
            self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), reduce_fx="max", batch_size=1)
            return
        where = (f"non-finite gradients in {len(bad)} parameter(s) (e.g. {', '.join(bad[:3])})" if bad
                 else "a non-finite loss")
        if loss_tasks:
            where += f"; tasks whose loss is non-finite: {', '.join(loss_tasks)}"
        if self.nonfinite == "raise":
            raise TrainingDiverged(
                f"{where} at global step {self.global_step}; tasks of the step's batch(es): "
                f"{', '.join(step_tasks) or 'unknown'}. Lower model.learning_rate, check the data of these tasks, "
                "or set model.nonfinite: skip to skip such steps"
            )
        optimizer.zero_grad(set_to_none=True)
        self.nonfinite_skipped += 1
        self.log("train/nonfinite_skipped", float(self.nonfinite_skipped), reduce_fx="max", batch_size=1)
        warnings.warn(f"skipped the optimizer step at global step {self.global_step}: {where} "
                      f"({self.nonfinite_skipped} step(s) skipped so far)", stacklevel=2)

    def check_training_health(self, when: str) -> None:
        """Fail a fit whose optimizer steps were skipped for non-finite values too often.

        Raises:
            TrainingDiverged: more than ``max_nonfinite_fraction`` of the optimizer steps so far
                were skipped (``nonfinite: skip``), or every one of them.
        """
        steps, skipped = self.optimizer_steps, self.nonfinite_skipped
        if not skipped:
            return
        if skipped >= steps or skipped > self.max_nonfinite_fraction * steps:
            raise TrainingDiverged(
                f"{skipped} of {steps} optimizer step(s) were skipped for a non-finite loss or gradient by {when} "
                f"(model.max_nonfinite_fraction is {self.max_nonfinite_fraction}): the training diverged; lower "
                "model.learning_rate or check the data"
            )

    def check_training_outcome(self) -> None:
        """Fail, at the end of training and before the last checkpoint is written, a fit that did
        not train: one that made no optimizer update at all (every batch skipped or no batch). A fit
        whose validation never ran (no final metrics) gets a warning naming the keys that decide it.

        Raises:
            TrainingDiverged: non-finite steps skipped too often (:meth:`check_training_health`).
            UserError: zero optimizer updates (names the counts and the keys to check).
        """
        self.check_training_health("the end of training")
        updates = self.optimizer_steps - self.nonfinite_skipped
        if updates <= 0:
            datamodule = getattr(self.trainer, "datamodule", None)
            dataset = getattr(datamodule, "datasets", {}).get("train") if datamodule is not None else None
            counter = getattr(dataset, "counter", None)
            corrupt = f"; {counter.count} sample(s) were skipped as corrupt ({counter.reasons})" if counter else ""
            raise UserError(
                f"the fit ran {updates} optimizer step(s) ({self.optimizer_steps} attempted, "
                f"{self.nonfinite_skipped} skipped as non-finite){corrupt}: nothing was trained. Check data.root "
                "and trainer.max_steps / trainer.limit_train_batches"
            )
        if self.validations_completed == 0:
            rank_zero_warn(
                f"the fit ended after {self.trainer.global_step} step(s) without running validation, so it has no "
                f"final metrics (trainer.limit_val_batches is {self.trainer.limit_val_batches}, "
                f"trainer.check_val_every_n_epoch is {self.trainer.check_val_every_n_epoch}, trainer.max_steps is "
                f"{self.trainer.max_steps}): to score it, let a validation run (e.g. set max_steps to a whole number "
                "of epochs) or run `python -m avmt validate` on its checkpoint"
            )

    def configure_callbacks(self) -> list[L.Callback]:
        """:class:`avmt.callbacks.TrainingOutcome`: fails a diverged or untrained fit before
        Lightning writes its checkpoint (and warns about an unevaluated one)."""
        from avmt.callbacks import TrainingOutcome

        return [TrainingOutcome()]

    def validation_step(self, batch: Batch, batch_idx: int) -> None:
        loss = self._losses(batch, "val")
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch))
        if not self.trainer.sanity_checking:
            self._generate_and_score(batch, score=self._generation_epoch())

    def test_step(self, batch: Batch, batch_idx: int) -> None:
        self._stage_batches["test"] += 1
        self._losses(batch, "test")
        self._generate_and_score(batch)

    def predict_step(self, batch: Batch, batch_idx: int) -> list[dict[str, Any]]:
        """Every sample's answer: key, task, prompt, generated text, parsed prediction and (when
        the data has it) the ground truth; tensors inside stay tensors (on the CPU) for the writer."""
        self._stage_batches["predict"] += 1
        out = []
        for i, text, prediction in self._generate(batch, list(range(len(batch)))):
            out.append({"key": batch.keys[i], "task": batch.tasks[i], "prompt": batch.prompts[i], "text": text,
                        "prediction": _to_cpu(prediction), "answer": _to_cpu(batch.answers[i])})
        return out

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

    def _answer_budget(self) -> AnswerShapes:
        """The per-task answer shapes (built on first use: they need the tokenizer)."""
        if self.answer_shapes is None:
            self.answer_shapes = AnswerShapes(sentence_end_ids(self.model.tokenizer))
        return self.answer_shapes

    def _record_train_answers(self, batch: Batch) -> None:
        """Count the training answers of the tasks whose trivial baseline is fitted on them
        (``Task.baseline_fits_training``; their answers are JSON values)."""
        for name, answer in zip(batch.tasks, batch.answers, strict=True):
            if name in TASKS and self._task(name).baseline_fits_training:
                self._train_answers[name][json.dumps(answer, sort_keys=True)] += 1

    def _baseline(self, task: Task, answers: list[Any]) -> tuple[dict[str, float], str]:
        """The trivial baseline's scores on ``answers`` and its name; a baseline meant to be fitted
        on training answers falls back, with a warning, to the evaluated answers when none were
        recorded (an evaluation without fit of a checkpoint that holds none) and says so."""
        if not task.baseline_fits_training:
            return task.trivial_baseline(answers), task.baseline_name
        counts: Counter[str] = Counter()
        for rank_counts in gather_objects([dict(self._train_answers.get(task.name, {}))]):  # every rank's
            counts.update(rank_counts)
        if counts:
            train = [json.loads(key) for key, n in counts.items() for _ in range(n)]
            return task.trivial_baseline(answers, train), task.baseline_name
        name = f"{task.baseline_name} (fitted on the evaluated answers)"
        warnings.warn(f"{task.name}: no training answers recorded, so its {task.baseline_name} is fitted on the "
                      "evaluated answers themselves, an optimistic baseline", stacklevel=2)
        return task.trivial_baseline(answers), name

    def _record_answer_shapes(self, batch: Batch) -> None:
        """Record the training targets' shapes (lengths, sentences, lead token) per task."""
        if batch.tokens is None or batch.tokens.labels is None:
            return
        shapes = self._answer_budget()
        labels = batch.tokens.labels
        for row, (name, target) in enumerate(zip(batch.tasks, batch.targets, strict=True)):
            ids = labels[row][labels[row] != IGNORE_INDEX].tolist()
            shapes.update(name, target, ids)

    def _generate(self, batch: Batch, rows: list[int]) -> list[tuple[int, str, Any]]:
        """Generate answers for ``rows`` of ``batch``, one ``generate`` call per task (each with its
        own length budget and, when ``answer_budget``, its :class:`~avmt.generation.ReasoningBudget`).

        Returns:
            ``(row, text, prediction)`` per row, in the order of ``rows``; the prediction is
            ``Task.predict(text, outputs)`` with the head outputs of that row.
        """
        by_task: dict[str, list[int]] = defaultdict(list)
        for row in rows:
            by_task[batch.tasks[row]].append(row)
        results: dict[int, tuple[str, Any]] = {}
        shapes = self._answer_budget()
        for name, task_rows in by_task.items():
            started = time.perf_counter()
            task = self._task(name) if name in TASKS else None  # None: a free instruction (predict on files)
            sub = batch.take(task_rows)
            self._set_task_ids(sub.tasks, sub.frames.device)
            kwargs: dict[str, Any] = {}
            budget = shapes.processor(sub.tasks) if self.answer_budget else None
            if budget is not None:
                kwargs["logits_processor"] = LogitsProcessorList([budget])
            with self._unsharded_root():
                generated = self.model.generate(
                    sub, shapes.max_new_tokens(name, self.max_new_tokens) if self.answer_budget else self.max_new_tokens,
                    return_dense=task is not None and bool(task.outputs), **kwargs,
                )
            for i, (row, text) in enumerate(zip(task_rows, generated.texts, strict=True)):
                if task is None:
                    results[row] = (text, None)
                    continue
                outputs = {output: generated.dense[output].for_row(i) for output in task.outputs
                           if output in generated.dense}
                results[row] = (text, task.predict(text, outputs))
            self._generation_seconds[name] += time.perf_counter() - started
            self._forced_rows[name] += len(budget.forced_rows) if budget is not None else 0
        return [(row, *results[row]) for row in rows]

    def _generate_and_score(self, batch: Batch, score: bool = True) -> None:
        """Generate answers, predict, and update the metrics (``score``) or only collect examples.

        Scoring takes up to ``max_generation_samples`` samples per task; without scoring (the
        validations between generation epochs) only the ``num_examples`` examples are generated.
        Scored predictions are kept on the CPU beside their answers for the bootstrap when
        ``bootstrap_resamples`` > 0.
        """
        wanted = {name: (self.max_generation_samples - self._generated[name]) if score
                  else (self.num_examples - len(self.examples[name])) for name in self.tasks}
        chosen = []
        for i, name in enumerate(batch.tasks):
            if name in wanted and wanted[name] > 0:
                wanted[name] -= 1
                chosen.append(i)
        if not chosen:
            return
        for i in chosen:
            self._generated[batch.tasks[i]] += int(score)
        by_task: dict[str, tuple[list, list]] = defaultdict(lambda: ([], []))
        anchors = batch.anchor_clips
        for i, text, prediction in self._generate(batch, chosen):
            name = batch.tasks[i]
            if score:
                by_task[name][0].append(prediction)
                by_task[name][1].append(batch.answers[i])
                self._answers[name].append(batch.answers[i])
                if self.bootstrap_resamples > 0:
                    self._predictions[name].append(_to_cpu(prediction))
            if len(self.examples[name]) < self.num_examples:
                frames = batch.frames[anchors[i], segment_frames(batch.frames.shape[1], self.model.num_segments)]
                self.examples[name].append(GeneratedExample(
                    name, batch.prompts[i], batch.targets[i], text, batch.answers[i], _to_cpu(prediction),
                    frames.cpu(), batch.media[i],
                ))
        for name, (predictions, answers) in by_task.items():
            self.task_metrics[name].update(predictions, answers)

    def _log_generation_metrics(self, stage: str) -> None:
        """Log every scored task's metrics and keep them, with its trivial baseline, in ``final_metrics``.

        A task with baselines beside its trivial one (``Task.extra_baselines``) gets them as
        ``extra_baselines`` (name -> metric -> score). With ``bootstrap_resamples`` each entry also
        gets ``bootstrap_std`` (metric -> standard deviation over resamples of the scored
        samples). Under DDP every rank takes part for every task that any rank scored (the metric
        states are synced by ``compute``), and the baselines, the sample count and the bootstrap
        use the answers and predictions of all ranks.
        """
        total_seconds = 0.0
        for name, collection in self.task_metrics.items():  # the same order on every rank
            seconds = self._generation_seconds.get(name, 0.0)
            total_seconds += seconds
            answers = gather_objects(self._answers[name])
            if not answers:  # no rank scored this task
                continue
            task = self.tasks[name]
            scores = {key: float(value) for key, value in collection.compute().items()}  # synced across ranks
            baseline, baseline_name = self._baseline(task, answers)
            for key, value in scores.items():
                self.log(f"{stage}/{name}/{key}", value, sync_dist=True)
            samples = len(answers)
            interventions = self._forced_rows.get(name, 0) / samples
            self.log(f"{stage}/{name}/generation_seconds", seconds, reduce_fx="max")
            self.log(f"{stage}/{name}/budget_interventions", interventions, reduce_fx="max")
            self.final_metrics[name] = {
                "scores": scores,
                "baseline": {key: float(value) for key, value in baseline.items()},
                "baseline_name": baseline_name,
                "samples": samples,
                "generation_seconds": round(seconds, 3),
                "budget_interventions": interventions,
            }
            extra = task.extra_baselines(answers)
            if extra:
                self.final_metrics[name]["extra_baselines"] = extra
            if self.bootstrap_resamples > 0:
                pairs = sorted(zip(gather_objects(self._predictions[name]), answers, strict=True),
                               key=lambda pair: json.dumps(pair, sort_keys=True, default=repr))  # any rank layout
                self.final_metrics[name]["bootstrap_std"] = bootstrap_std(
                    task, [p for p, _ in pairs], [a for _, a in pairs], self.bootstrap_resamples, seed=0)
            collection.reset()
        if total_seconds:
            self.log(f"{stage}/generation_seconds", total_seconds, reduce_fx="max")
        self._answers.clear()
        self._predictions.clear()
        self._generated.clear()
        self._generation_seconds.clear()
        self._forced_rows.clear()

    def on_validation_epoch_start(self) -> None:
        self.examples.clear()
        if self.trainer.state.fn == "fit":
            self._merge_answer_shapes()

    def _merge_answer_shapes(self) -> None:
        """Give every rank the answer shapes of all ranks' training targets (each rank records only its
        own batches'), so that every rank generates with the same budgets and any rank's checkpoint
        holds them all. A collective: every rank calls it at the same points (each validation and each
        training epoch's end during fit)."""
        shapes = self._answer_budget()
        shapes.merge(gather_objects([shapes.rank_state()]))

    def on_test_epoch_start(self) -> None:
        self.examples.clear()

    def on_validation_epoch_end(self) -> None:
        if self.trainer.state.fn == "fit" and not self.trainer.sanity_checking:
            self.validations_completed += 1
        self._log_generation_metrics("val")
        self._log_router_telemetry()

    def _log_router_telemetry(self) -> None:
        """Router telemetry a person can read. Per task: the mean routing weight of each head over
        all adapted layers (``router/{task}/head{k}``) and the mean router entropy
        (``router/{task}/entropy``); one task × head heatmap (``router/heatmap``); the per-layer
        detail as one layer × head image per task (``router/{task}/layers``), not as scalars."""
        own_sums, own_batches = self._router_sums, self._router_batches
        self._router_sums, self._router_batches = defaultdict(dict), defaultdict(int)
        if self.trainer.sanity_checking or not self._routed():  # the same on every rank
            return
        sums: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)  # every rank's batches (a collective)
        batches: dict[str, int] = defaultdict(int)
        for rank_sums, rank_batches in gather_objects([(dict(own_sums), dict(own_batches))]):
            for task, values in rank_sums.items():
                for key, value in values.items():
                    sums[task][key] = sums[task].get(key, 0) + value
            for task, count in rank_batches.items():
                batches[task] += count
        logger = self.logger
        if not sums or logger is None or not hasattr(logger.experiment, "add_scalar"):
            return
        if not self.trainer.is_global_zero:
            return
        tasks = sorted(sums)
        means = {task: {key: value / batches[task] for key, value in sums[task].items()} for task in tasks}
        layers = sorted(key for key in means[tasks[0]] if not key.endswith("/entropy"))
        if not layers:
            return
        writer, step = logger.experiment, self.global_step
        per_layer = {task: torch.stack([means[task][layer] for layer in layers]) for task in tasks}  # [layers, K]
        heatmap = torch.stack([per_layer[task].mean(0) for task in tasks])  # [tasks, K]
        for task, weights in zip(tasks, heatmap):
            for head, weight in enumerate(weights.tolist()):
                writer.add_scalar(f"router/{task}/head{head}", weight, step)
            entropies = [means[task][f"{layer}/entropy"] for layer in layers if f"{layer}/entropy" in means[task]]
            entropy = float(torch.stack(entropies).mean()) if entropies else float("nan")
            writer.add_scalar(f"router/{task}/entropy", entropy, step)
            writer.add_figure(f"router/{task}/layers",
                              router_heatmap(per_layer[task], layers, f"{task}: mean routing weight per layer"), step)
        writer.add_figure("router/heatmap", router_heatmap(heatmap, tasks), step)


    def on_test_epoch_end(self) -> None:
        self._require_data("test", "test")
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
        if model.image_connector is not None:
            report["image connector"] = trainable(model.image_connector)
        for head in model.heads:
            report[f"head {type(head).__name__} [{head.output}]"] = trainable(head)
        report["vision encoder"] = trainable(model.vision_encoder)
        report["audio encoder"] = trainable(model.audio_encoder)
        report["llm (new token rows and other non-adapter weights)"] = trainable(model.llm)
        if model.segment_embedding is not None:
            report["segment time codes"] = trainable(model.segment_embedding)
        report["total trainable"] = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return report

    def on_fit_start(self) -> None:
        if self.logger is not None:
            for point in self._pretraining_curve:
                values = {f"pretrain/{key}": value for key, value in point.items() if key != "step"}
                self.logger.log_metrics(values, step=int(point["step"]))
        lines = ["trainable parameters:"] + [f"  {name:52s} {count:>12,d}" for name, count in self.parameter_report().items()]
        rank_zero_info("\n".join(lines))

    # ---------------------------------------------------------- sharding
    def configure_model(self) -> None:
        """FSDP2 under Lightning's ``ModelParallelStrategy`` (``experiments/scale/fsdp2.yaml``): every
        LLM block (:func:`sharding_units`) is its own ``fully_shard`` unit and the rest of the model
        (encoders, connectors, heads, embeddings, output head) is the root unit ``self.model``.

        Runs only when the strategy gave the module a device mesh (``self.device_mesh``); DDP and one
        process leave the model alone. Sharding is per parameter (DTensor ``Shard(0)`` over the
        ``data_parallel`` mesh dimension), so frozen base weights and trainable adapter weights of one
        layer share a unit and keep their ``requires_grad``; the optimizer, built afterwards, sees the
        trainable shards only. Called again (``validate`` after ``fit``) it does nothing.

        Raises:
            UserError: a mesh with a tensor-parallel dimension larger than 1 (avmt has no
                tensor-parallel plan), naming the strategy key; an LLM with ``base_dtype`` set.
        """
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import FSDPModule, fully_shard

        if isinstance(self.model, FSDPModule):
            return
        if "tensor_parallel" in (mesh.mesh_dim_names or ()) and mesh["tensor_parallel"].size() > 1:
            raise UserError(
                f"trainer.strategy.init_args.tensor_parallel_size is {mesh['tensor_parallel'].size()}, but avmt "
                "shards with FSDP2 only and has no tensor-parallel plan: set tensor_parallel_size: 1 and "
                "data_parallel_size to trainer.devices x trainer.num_nodes"
            )
        if getattr(self.model.llm, "base_dtype", None) is not None:
            raise UserError(
                f"model.llm.init_args.base_dtype is {self.model.llm.base_dtype}, which FSDP2 cannot shard: it keeps a "
                "reduced-precision frozen base and float32 trained weights in one layer and casts them during the "
                "forward, while FSDP2 owns every weight's storage; set base_dtype: null under ModelParallelStrategy"
            )
        data_parallel = mesh["data_parallel"] if "data_parallel" in (mesh.mesh_dim_names or ()) else mesh
        # a checkpoint of a run without a mesh leaves out the frozen pretrained weights; on_load_checkpoint
        # checks the keys instead of the strategy's loader
        self.strict_loading = False
        for unit in sharding_units(self.model.llm):
            fully_shard(unit, mesh=data_parallel)
        fully_shard(self.model, mesh=data_parallel)

    @contextlib.contextmanager
    def _unsharded_root(self) -> Iterator[None]:
        """Generation calls the model's methods, not its ``forward``, so FSDP2's hooks never gather the
        root unit's weights (embeddings, connectors, encoders, heads): gather them for the duration.
        The LLM blocks are called as modules and gather themselves. A no-op without FSDP2."""
        from torch.distributed.fsdp import FSDPModule

        root = self.model
        if not isinstance(root, FSDPModule):
            yield
            return
        root.unshard()
        try:
            yield
        finally:
            root.reshard()

    # ---------------------------------------------------------- optimizer
    def configure_optimizers(self):
        parameters = [p for p in self.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(parameters, lr=self.learning_rate, weight_decay=self.weight_decay)
        total = self.trainer.estimated_stepping_batches
        if self.trainer.max_steps == 0:
            raise UserError("trainer.max_steps is 0: set it to at least 1 (or -1 to train for trainer.max_epochs)")
        if not math.isfinite(total) or total <= 0:
            raise UserError(
                f"the learning-rate schedule needs the number of training steps, and Lightning estimates {total}: "
                "the training stream has no known length (no clip count in the data's manifest, and for a URL "
                "data.root no data.num_clips.train) and trainer.max_steps is not set; set trainer.max_steps "
                "or data.num_clips"
            )
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

    def _frozen_pretrained_keys(self) -> set[str]:
        """State-dict keys of the frozen weights loaded from a pretrained checkpoint (they need not be saved)."""
        trainable = {name for name, p in self.named_parameters() if p.requires_grad}
        prefixes = self._pretrained_prefixes()
        return {key for key in self.state_dict()
                if key not in trainable and any(key.startswith(prefix) for prefix in prefixes)}

    def _saved_keys(self) -> set[str]:
        """State-dict keys a checkpoint stores: everything except frozen weights loaded from a pretrained
        checkpoint; under FSDP2 (a device mesh) everything, since a sharded checkpoint is read back into
        the whole sharded model by ``torch.distributed.checkpoint``, which needs every key."""
        keys = set(self.state_dict())
        return keys if self.device_mesh is not None else keys - self._frozen_pretrained_keys()

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        keep = self._saved_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["avmt"] = {
            "format": CHECKPOINT_FORMAT,
            "tokenizer": self.model.llm.tokenizer_state(),
            "saved_keys": sorted(keep),
            "task_ids": dict(self.task_ids),
            "answer_shapes": self._answer_budget().state_dict(),
            "train_answers": self._all_train_answers(),
            "training_health": {"optimizer_steps": self.optimizer_steps, "nonfinite_skipped": self.nonfinite_skipped},
            "answer_format": self.answer_format.config(),
        }

    def _all_train_answers(self) -> dict[str, dict[str, int]]:
        """Every rank's training-answer counts summed (task -> JSON answer -> count); a collective,
        called on every rank by ``on_save_checkpoint`` (Lightning dumps a checkpoint on every rank)."""
        total: dict[str, Counter[str]] = defaultdict(Counter)
        for rank_counts in gather_objects([{name: dict(counts) for name, counts in self._train_answers.items()}]):
            for name, counts in rank_counts.items():
                total[name].update(counts)
        return {name: dict(counts) for name, counts in sorted(total.items())}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        meta = checkpoint.get("avmt")
        if meta is None or meta.get("format") != CHECKPOINT_FORMAT:
            raise UserError("not an avmt checkpoint (no 'avmt' metadata of a known format)")
        current_tokenizer = self.model.llm.tokenizer_state()
        if meta["tokenizer"] != current_tokenizer:
            raise UserError(
                "the checkpoint was trained with a different tokenizer than this config's model.llm "
                f"({tokenizer_difference(meta['tokenizer'], current_tokenizer)}); use the config.yaml saved next "
                "to the checkpoint, with the avmt version that wrote it"
            )
        self._answer_budget().load_state_dict(meta.get("answer_shapes", {}))
        # checkpoints from before answer formats were all TaggedText
        self._saved_answer_format = meta.get("answer_format", TaggedText().config())
        if self._trainer is not None and self._saved_answer_format != self.answer_format.config():
            raise UserError(
                f"the checkpoint was trained with the answer format {self._saved_answer_format}, but data.answer_format "
                f"is {self.answer_format.config()}: set data.answer_format to the checkpoint's (its config.yaml has it)")
        # the saved counts are every rank's (_all_train_answers); _baseline sums the ranks' counts, so
        # only rank 0 takes them back
        saved_answers = meta.get("train_answers", {}) if self.global_rank == 0 else {}
        self._train_answers = defaultdict(Counter, {name: Counter(counts) for name, counts in saved_answers.items()})
        health = meta.get("training_health", {})
        self.optimizer_steps = int(health.get("optimizer_steps", 0))
        self.nonfinite_skipped = int(health.get("nonfinite_skipped", 0))
        saved_ids = meta.get("task_ids", {})
        moved = {name: (tid, self.task_ids[name]) for name, tid in saved_ids.items()
                 if name in self.task_ids and self.task_ids[name] != tid}
        if moved:
            raise UserError(
                "task ids changed since the checkpoint was written (name: checkpoint id -> current id): "
                + ", ".join(f"{name}: {a} -> {b}" for name, (a, b) in sorted(moved.items()))
                + "; task-gated adapters and router telemetry index by these ids, so a task must keep its task_id"
            )
        optional = self._frozen_pretrained_keys()
        required = set(self.state_dict()) - optional
        if "state_dict" not in checkpoint:
            # ModelParallelStrategy (FSDP2) loaded the weights into the sharded model itself, before this
            # hook and not strictly (configure_model), so the keys are checked against what the checkpoint lists
            self._check_checkpoint_keys(required, optional, set(meta.get("saved_keys", [])))
            return
        found = set(checkpoint["state_dict"])
        self._check_checkpoint_keys(required, optional, found)
        current = self.state_dict()
        mismatched = [
            f"{key}: checkpoint {tuple(checkpoint['state_dict'][key].shape)}, model {tuple(current[key].shape)}"
            for key in sorted(found)
            if tuple(checkpoint["state_dict"][key].shape) != tuple(current[key].shape)
        ]
        if mismatched:
            raise UserError(f"checkpoint shapes do not match the model: {'; '.join(mismatched[:8])}")
        for key in set(current) - found:  # frozen pretrained weights: already loaded from their checkpoint
            checkpoint["state_dict"][key] = current[key]

    @staticmethod
    def _check_checkpoint_keys(required: set[str], optional: set[str], found: set[str]) -> None:
        """Raise :class:`UserError` unless ``found`` holds every ``required`` key and nothing beyond
        ``required | optional`` (optional: frozen pretrained weights, which FSDP2 checkpoints also hold)."""
        missing, unexpected = sorted(required - found), sorted(found - required - optional)
        if missing or unexpected:
            raise UserError(
                "checkpoint does not match the model: "
                f"missing {len(missing)} key(s) {missing[:8]}, unexpected {len(unexpected)} key(s) {unexpected[:8]}"
            )


def router_heatmap(weights: torch.Tensor, rows: list[str], title: str = "mean routing weight per task"):
    """A row × head heatmap of mean routing weights (rows: tasks, or one task's adapted layers).

    Args:
        weights: ``[num_rows, K]`` mean routing weight of each head.
        rows: row labels.
        title: the figure's title.

    Returns:
        A matplotlib Figure (rendered off-screen).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(1.2 + 0.9 * weights.shape[1] + 0.06 * max(len(r) for r in rows),
                                         0.8 + 0.3 * len(rows)))
    image = axis.imshow(weights.numpy(), cmap="viridis", vmin=0.0, aspect="auto")
    axis.set_xticks(range(weights.shape[1]), [f"head {k}" for k in range(weights.shape[1])])
    axis.set_yticks(range(len(rows)), rows)
    for (row, col), value in zip(torch.cartesian_prod(torch.arange(len(rows)), torch.arange(weights.shape[1])).tolist(),
                                 weights.flatten().tolist()):
        axis.text(col, row, f"{value:.2f}", ha="center", va="center", color="white", fontsize=8)
    axis.set_title(title)
    figure.colorbar(image, ax=axis)
    figure.tight_layout()
    return figure
