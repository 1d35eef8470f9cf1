"""AVDataModule: shards → clips → task samples → clip-grouped batches.

A batch holds C clips and every task sample built from them: the media tensors are stacked
once per clip (``frames [C,T·F,3,H,W]``, ``audio [C,S]``) and each text sample points at its clip
through ``clip_index [B]``, so the encoders run once per clip, however many tasks ask about it.
Tokenization happens in the LightningModule, which owns the tokenizer; this module knows
nothing about the model.
"""

from __future__ import annotations

import os
import random
import zlib
from dataclasses import asdict
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from avmt.data.shards import CorruptSampleCounter, ensure_shards, iter_clips, list_shards
from avmt.data.synth import SynthConfig
from avmt.tasks import get_task, list_tasks

SPLITS = ("train", "val", "test")


def default_cache_dir() -> Path:
    """``$AVMT_CACHE`` when set, else the user's cache directory (``$XDG_CACHE_HOME/avmt`` or ``~/.cache/avmt``)."""
    if os.environ.get("AVMT_CACHE"):
        return Path(os.environ["AVMT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "avmt"


class ClipTaskStream(IterableDataset):
    """Iterates clip groups: one decoded clip with the task samples built from it.

    Each item is ``{"key", "frames" [T·F,3,H,W] uint8, "audio" [S] float32, "samples": [dict]}``
    where each sample dict holds ``task``, ``prompt``, ``target`` and ``answer``.

    Args:
        shards: tar files to read.
        task_names: tasks to build for every clip.
        reasoning: targets carry the reasoning sentences (else only the tagged answer).
        seed: base seed; the task rng of a clip depends only on (seed, epoch, clip key).
        shuffle: shuffle shard order and clips (a buffer of ``shuffle_buffer`` clips) per epoch.
        tasks_per_clip: build this many tasks per clip (sampled), or all when ``None``.
        num_clips: clips in the shards, used for ``len``.
    """

    def __init__(
        self,
        shards: list[Path],
        task_names: list[str],
        reasoning: bool,
        seed: int,
        shuffle: bool,
        tasks_per_clip: int | None = None,
        num_clips: int | None = None,
        shuffle_buffer: int = 256,
    ) -> None:
        super().__init__()
        self.shards = [Path(s) for s in shards]
        self.task_names = list(task_names)
        self.tasks = [get_task(name, reasoning=reasoning) for name in self.task_names]
        self.seed = seed
        self.shuffle = shuffle
        self.tasks_per_clip = tasks_per_clip
        self.num_clips = num_clips
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.counter = CorruptSampleCounter()

    def __len__(self) -> int:
        if self.num_clips is None:
            raise TypeError("length unknown: num_clips was not given")
        return self.num_clips

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard order, shuffling and task sampling for ``epoch``."""
        self.epoch = epoch

    def _build(self, clip: dict[str, Any]) -> dict[str, Any]:
        key = clip["key"]
        rng = random.Random(zlib.crc32(f"{self.seed}:{self.epoch}:{key}".encode()))
        tasks = self.tasks
        if self.tasks_per_clip is not None and self.tasks_per_clip < len(tasks):
            tasks = rng.sample(tasks, self.tasks_per_clip)
        samples = []
        for task in tasks:
            built = task.build(clip, rng)
            samples.append({"task": task.name, "prompt": built.prompt, "target": built.target, "answer": built.answer})
        return {"key": key, "frames": clip["frames"], "audio": clip["audio"], "samples": samples}

    def __iter__(self):
        shards = list(self.shards)
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(shards)
        worker = get_worker_info()
        if worker is not None:
            shards = shards[worker.id :: worker.num_workers]
        buffer: list[dict[str, Any]] = []
        for clip in iter_clips(shards, counter=self.counter):
            group = self._build(clip)
            group["corrupt_total"] = self.counter.count
            if not self.shuffle:
                yield group
                continue
            buffer.append(group)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


def collate_clip_groups(groups: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack C clip groups into one batch.

    Returns:
        ``frames [C,T·F,3,H,W]`` uint8, ``audio [C,S]`` float32, ``clip_index [B]`` long, and
        the B-long lists ``task``, ``prompt``, ``target``, ``answer``, ``key``; ``corrupt_total``
        is the number of corrupt samples the reading process has skipped so far.
    """
    batch: dict[str, Any] = {name: [] for name in ("task", "prompt", "target", "answer", "key")}
    clip_index = []
    for index, group in enumerate(groups):
        for sample in group["samples"]:
            for name in ("task", "prompt", "target", "answer"):
                batch[name].append(sample[name])
            batch["key"].append(group["key"])
            clip_index.append(index)
    batch["frames"] = torch.stack([group["frames"] for group in groups])
    batch["audio"] = torch.stack([group["audio"] for group in groups])
    batch["clip_index"] = torch.tensor(clip_index, dtype=torch.long)
    batch["corrupt_total"] = max(group["corrupt_total"] for group in groups)
    return batch


class AVDataModule(L.LightningDataModule):
    """Multi-task audio-visual data from WebDataset shards (AVSynth by default).

    Args:
        root: shard folder with ``train/``, ``val/``, ``test/`` subfolders. ``None`` uses the
            AVSynth cache (``$AVMT_CACHE`` or the user cache dir) and generates it when missing.
        tasks: task names to train and evaluate (see ``python -m avmt plugins``).
        reasoning: answers carry explicit reasoning sentences; ``False`` keeps only the tags.
        clips_per_batch: clips per batch; every task of a clip goes in the same batch.
        tasks_per_clip: sample this many of ``tasks`` per clip (``None`` = all).
        num_workers: DataLoader worker processes.
        seed: data seed (AVSynth generation and task sampling).
        train_clips, val_clips, test_clips: AVSynth clip counts (only when ``root`` is ``None``).
        num_classes, frame_size, noise_level, max_objects: AVSynth generator knobs.
    """

    def __init__(
        self,
        root: str | None = None,
        tasks: list[str] = ["ave", "avvp", "avqa", "action", "emotion", "avcap"],  # noqa: B006
        reasoning: bool = True,
        clips_per_batch: int = 4,
        tasks_per_clip: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        train_clips: int = 2000,
        val_clips: int = 200,
        test_clips: int = 200,
        num_classes: int = 8,
        frame_size: int = 64,
        noise_level: float = 0.05,
        max_objects: int = 3,
    ) -> None:
        super().__init__()
        known = list_tasks()
        unknown = [name for name in tasks if name not in known]
        if unknown:
            raise ValueError(f"data.tasks: unknown task(s) {unknown}; available tasks: {', '.join(known)}")
        if not tasks:
            raise ValueError(f"data.tasks is empty; available tasks: {', '.join(known)}")
        self.root = Path(root).expanduser() if root is not None else None
        self.task_names = list(tasks)
        self.reasoning = reasoning
        self.clips_per_batch = clips_per_batch
        self.tasks_per_clip = tasks_per_clip
        self.num_workers = num_workers
        self.seed = seed
        self.clip_counts = {"train": train_clips, "val": val_clips, "test": test_clips}
        self.synth_config = SynthConfig(
            num_classes=num_classes, frame_size=frame_size, noise_level=noise_level, max_objects=max_objects
        )
        self.shards: dict[str, list[Path]] = {}
        self.counts: dict[str, int | None] = {}
        self.datasets: dict[str, ClipTaskStream] = {}

    def default_root(self) -> Path:
        """Cache folder of the AVSynth data this module's knobs describe."""
        digest = zlib.crc32(repr((self.seed, sorted(self.clip_counts.items()), asdict(self.synth_config))).encode())
        return default_cache_dir() / f"avsynth-v1-{digest:08x}"

    def prepare_data(self) -> None:
        """Generate the AVSynth shards into the cache on first use (``root`` unset)."""
        if self.root is None:
            ensure_shards(self.default_root(), self.clip_counts, self.seed, self.synth_config)

    def setup(self, stage: str | None = None) -> None:
        root = self.root if self.root is not None else self.default_root()
        if self.root is None:  # prepare_data ran on rank 0; on other ranks this only reads the manifest
            ensure_shards(root, self.clip_counts, self.seed, self.synth_config)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split in self.datasets:
                continue
            self.shards[split] = list_shards(root / split)
            self.counts[split] = self.clip_counts[split] if self.root is None else None
            self.datasets[split] = ClipTaskStream(
                self.shards[split],
                self.task_names,
                reasoning=self.reasoning,
                seed=self.seed,
                shuffle=split == "train",
                tasks_per_clip=self.tasks_per_clip if split == "train" else None,
                num_clips=self.counts[split],
            )

    def _loader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        if split == "train" and self.trainer is not None:
            dataset.set_epoch(self.trainer.current_epoch)
        return DataLoader(
            dataset,
            batch_size=self.clips_per_batch,
            collate_fn=collate_clip_groups,
            num_workers=self.num_workers,
            persistent_workers=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("test")
