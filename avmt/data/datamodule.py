"""AVDataModule: shards → clips → task samples → clip-grouped batches.

A :class:`~avmt.data.sample.Batch` holds C clips and every task sample built from them: the
media tensors are stacked once per clip (``frames [C,T·F,3,H,W]``, ``audio [C,S]``) and each
sample points at its clips through its media references, so the encoders run once per clip,
however many tasks ask about it. Which tasks exist, what they need and how their dense targets
collate is read from the task declarations; tokenization happens in the LightningModule, which
owns the tokenizer. This module knows nothing about the model, nor about any particular task.
"""

from __future__ import annotations

import functools
import os
import random
import warnings
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from avmt.data.features import FeatureReader
from avmt.data.sample import Clip, ClipGroup, SampleError, TaskSample, collate
from avmt.data.shards import (
    CorruptSampleCounter,
    CorruptSampleWarning,
    check_shard_version,
    ensure_shards,
    iter_clips,
    list_shards,
    read_manifest,
)
from avmt.data.synth import SCHEMA_VERSION, SynthConfig
from avmt.tasks import Task, get_task, list_tasks

SPLITS = ("train", "val", "test")


def default_cache_dir() -> Path:
    """``$AVMT_CACHE`` when set, else the user's cache directory (``$XDG_CACHE_HOME/avmt`` or ``~/.cache/avmt``)."""
    if os.environ.get("AVMT_CACHE"):
        return Path(os.environ["AVMT_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "avmt"


class ClipTaskStream(IterableDataset):
    """Iterates clip groups: one decoded clip with the task samples built from it.

    Each item is a :class:`~avmt.data.sample.ClipGroup`: the anchor clip (and the other clips
    its multi-clip samples look at) and one :class:`~avmt.data.sample.TaskSample` per task that
    applies to the clip (``Task.applies``). A sample whose annotation is wrong (the task raises
    :class:`~avmt.data.sample.SampleError`) is skipped, counted in ``counter`` and reported with
    a :class:`~avmt.data.shards.CorruptSampleWarning` naming the clip and the task.

    Args:
        shards: tar files to read.
        task_names: tasks to build for every clip.
        reasoning: targets carry the reasoning sentences (else only the tagged answer).
        seed: base seed; the task rng of a clip depends only on (seed, epoch, clip key).
        shuffle: shuffle shard order and clips (a buffer of ``shuffle_buffer`` clips) per epoch.
        tasks_per_clip: build this many of the applicable tasks per clip (sampled), or all when ``None``.
        samples_per_clip: task name -> samples built per clip (default 1), e.g. 4 for a question
            answering task asks four questions about every clip; each has its own rng stream (the first is the stream a
            single sample uses) and a sample repeating an earlier prompt and target of the clip is dropped.
        num_clips: clips in the shards, used for ``len``.
        shuffle_buffer: clips held for shuffling.
        recent_clips: clips remembered as the other clips of multi-clip samples, most recent
            first; each task picks its others from them (``Task.select_others``) and is not built
            for a clip when too few of them fit.
        features: a feature cache reader (``data.features``): every clip read gets its cached
            encoder features attached (:meth:`~avmt.data.features.FeatureReader.attach`; a clip
            missing from the cache is an error naming it and the cache).
    """

    def __init__(
        self,
        shards: list[Path],
        task_names: list[str],
        reasoning: bool,
        seed: int,
        shuffle: bool,
        tasks_per_clip: int | None = None,
        samples_per_clip: dict[str, int] | None = None,
        num_clips: int | None = None,
        shuffle_buffer: int = 256,
        recent_clips: int = 16,
        features: FeatureReader | None = None,
    ) -> None:
        super().__init__()
        self.shards = [Path(s) for s in shards]
        self.task_names = list(task_names)
        self.tasks = [get_task(name, reasoning=reasoning) for name in self.task_names]
        self.seed = seed
        self.shuffle = shuffle
        self.tasks_per_clip = tasks_per_clip
        self.samples_per_clip = dict(samples_per_clip or {})
        self.num_clips = num_clips
        self.shuffle_buffer = shuffle_buffer
        self.recent_clips = recent_clips
        self.features = features
        self.epoch = 0
        self.counter = CorruptSampleCounter()

    def __len__(self) -> int:
        if self.num_clips is None:
            raise TypeError("length unknown: num_clips was not given")
        return self.num_clips

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard order, shuffling and task sampling for ``epoch``."""
        self.epoch = epoch

    def _build_sample(
        self, task: Task, clip: Clip, recent: Sequence[Clip], index: int
    ) -> tuple[TaskSample, list[Clip]] | None:
        """The ``index``-th sample of ``task`` for ``clip`` and the other clips it looks at; None
        when too few fitting clips were seen yet, or when the annotation is wrong (counted)."""
        # each task draws from its own stream: its sample of a clip (prompt, question, others) is
        # the same whichever other tasks are trained with it (a single-task run sees the same data)
        stream = f"{self.seed}:{self.epoch}:{clip.key}:{task.name}" + (f":{index}" if index else "")
        rng = random.Random(zlib.crc32(stream.encode()))
        try:
            others = task.select_others(clip, recent, rng)
            if others is None:  # too few fitting clips seen yet: no sample, not a corrupt one
                return None
            return task.build(clip, rng, others), list(others)
        except SampleError as error:
            self.counter.add(clip.key, f"bad {task.name} sample")
            warnings.warn(f"skipping the {task.name} sample of clip {clip.key!r}: {error}",
                          CorruptSampleWarning, stacklevel=3)
            return None

    def _build(self, clip: Clip, recent: Sequence[Clip]) -> ClipGroup:
        rng = random.Random(zlib.crc32(f"{self.seed}:{self.epoch}:{clip.key}".encode()))
        tasks = [task for task in self.tasks if task.applies(clip)]
        if self.tasks_per_clip is not None and self.tasks_per_clip < len(tasks):
            tasks = rng.sample(tasks, self.tasks_per_clip)
        clips = [clip]
        samples = []
        for task in tasks:
            seen: set[tuple[str, str]] = set()
            for index in range(self.samples_per_clip.get(task.name, 1)):
                built = self._build_sample(task, clip, recent, index)
                if built is None or (built[0].prompt, built[0].target) in seen:
                    continue
                sample, others = built
                seen.add((sample.prompt, sample.target))
                local = [0]
                for other in others:
                    keys = [c.key for c in clips]
                    if other.key not in keys:
                        clips.append(other)
                        keys.append(other.key)
                    local.append(keys.index(other.key))
                sample.media = tuple(replace(ref, clip=local[ref.clip]) for ref in sample.media)
                samples.append(sample)
        return ClipGroup(clips, samples, self.counter.count)

    def __iter__(self) -> Iterator[ClipGroup]:
        shards = list(self.shards)
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(shards)
        worker = get_worker_info()
        if worker is not None:
            shards = shards[worker.id :: worker.num_workers]
        buffer: list[ClipGroup] = []
        recent: deque[Clip] = deque(maxlen=self.recent_clips)
        for clip in iter_clips(shards, counter=self.counter):
            if self.features is not None:
                clip = self.features.attach(clip)
            group = self._build(clip, list(recent))
            recent.appendleft(clip)
            if not group.samples:
                continue
            if not self.shuffle:
                yield group
                continue
            buffer.append(group)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer


def collate_rules(tasks: Sequence[Task]) -> dict[str, str]:
    """Dense target name -> its collate rule, from the tasks' declarations.

    Raises:
        ValueError: two tasks declare one target name with different rules.
    """
    rules: dict[str, tuple[str, str]] = {}
    for task in tasks:
        for spec in task.dense_targets:
            known = rules.setdefault(spec.name, (spec.collate, task.name))
            if known[0] != spec.collate:
                raise ValueError(
                    f"dense target {spec.name!r} is collated by {known[0]!r} in task {known[1]!r} "
                    f"but by {spec.collate!r} in task {task.name!r}"
                )
    return {name: rule for name, (rule, _) in rules.items()}


class AVDataModule(L.LightningDataModule):
    """Multi-task audio-visual data from WebDataset shards (AVSynth by default).

    Args:
        root: shard folder with ``train/``, ``val/``, ``test/`` subfolders. ``None`` uses the
            AVSynth cache (``$AVMT_CACHE`` or the user cache dir) and generates it when missing.
        tasks: task names to train and evaluate (see ``python -m avmt plugins``); ``None`` = every
            registered task.
        reasoning: answers carry explicit reasoning sentences; ``False`` keeps only the tags.
        clips_per_batch: clips per training batch; every task of a clip goes in the same batch.
        eval_clips_per_batch: clips per validation / test / predict batch (``None`` = as in
            training); larger batches make generation, which is batched per task, cheaper.
        tasks_per_clip: sample this many of the applicable tasks per clip (``None`` = all).
        samples_per_clip: task name -> samples built per clip in every split (default 1), e.g.
            4 for question answering: four questions about each clip (repeats dropped; a task not in ``tasks``
            is ignored, so a shared base can set it for single-task runs too), so a task whose
            samples are cheap next to the clip's media gets more of them per decoded clip, and its
            evaluation more samples per clip (raise ``model.max_generation_samples`` to score them).
        num_workers: DataLoader worker processes.
        seed: data seed (AVSynth generation and task sampling).
        train_clips, val_clips, test_clips: AVSynth clip counts (only when ``root`` is ``None``).
        num_classes, frame_size, noise_level, max_objects, multi_source: AVSynth generator knobs
            (``multi_source``: fraction of scenes with several simultaneous sound sources).
        requests: a request file (JSON list or JSONL, :mod:`avmt.data.requests`): ``predict``
            answers its requests about media files (decoded to this module's segments, frame size
            and sample rate) instead of the test split.
        features: a feature cache folder written by ``python -m avmt data features``: the clips
            carry their cached encoder features and the model skips its (frozen) encoders; the
            module refuses a cache made by other encoders. ``None`` encodes the media.
        splits: the folder under ``root`` each stage reads: ``{"train": ..., "val": ..., "test": ...}``
            (defaults: the same names); e.g. ``{"test": "test_u"}`` tests on Ref-AVS's unseen split.
    """

    def __init__(
        self,
        root: str | None = None,
        tasks: list[str] | None = None,
        reasoning: bool = True,
        clips_per_batch: int = 4,
        eval_clips_per_batch: int | None = None,
        tasks_per_clip: int | None = None,
        samples_per_clip: dict[str, int] | None = None,
        num_workers: int = 0,
        seed: int = 0,
        train_clips: int = 2000,
        val_clips: int = 200,
        test_clips: int = 200,
        num_classes: int = 8,
        frame_size: int = 64,
        noise_level: float = 0.05,
        max_objects: int = 3,
        multi_source: float = 0.0,
        requests: str | None = None,
        features: str | None = None,
        splits: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        known = list_tasks()
        tasks = known if tasks is None else list(tasks)
        unknown = [name for name in tasks if name not in known]
        if unknown:
            raise ValueError(f"data.tasks: unknown task(s) {unknown}; available tasks: {', '.join(known)}")
        if not tasks:
            raise ValueError(f"data.tasks is empty; available tasks: {', '.join(known)}")
        self.root = Path(root).expanduser() if root is not None else None
        self.task_names = list(tasks)
        self.collate_rules = collate_rules([get_task(name) for name in self.task_names])
        self.reasoning = reasoning
        self.clips_per_batch = clips_per_batch
        self.eval_clips_per_batch = eval_clips_per_batch
        self.tasks_per_clip = tasks_per_clip
        self.samples_per_clip = dict(samples_per_clip or {})
        for name, count in self.samples_per_clip.items():
            if name not in known:  # a known task outside data.tasks is allowed: a shared base sets it for all runs
                raise ValueError(f"data.samples_per_clip: unknown task {name!r}; available tasks: {', '.join(known)}")
            if not isinstance(count, int) or isinstance(count, bool) or count < 1:
                raise ValueError(f"data.samples_per_clip.{name} must be a whole number >= 1, got {count!r}")
        self.num_workers = num_workers
        self.seed = seed
        self.clip_counts = {"train": train_clips, "val": val_clips, "test": test_clips}
        self.synth_config = SynthConfig(
            num_classes=num_classes,
            frame_size=frame_size,
            noise_level=noise_level,
            max_objects=max_objects,
            multi_source=multi_source,
        )
        self.requests = requests
        self.features = Path(features).expanduser() if features is not None else None
        unknown_splits = sorted(set(splits or {}) - set(SPLITS))
        if unknown_splits:
            raise ValueError(f"data.splits: unknown stage split(s) {unknown_splits}; the keys are {', '.join(SPLITS)}")
        self.split_folders = {**{split: split for split in SPLITS}, **(splits or {})}
        self.shards: dict[str, list[Path]] = {}
        self.counts: dict[str, int | None] = {}
        self.datasets: dict[str, ClipTaskStream] = {}

    def default_root(self) -> Path:
        """Cache folder of the AVSynth data this module's knobs describe."""
        digest = zlib.crc32(repr((self.seed, sorted(self.clip_counts.items()), asdict(self.synth_config))).encode())
        return default_cache_dir() / f"avsynth-v{SCHEMA_VERSION}-{digest:08x}"

    def prepare_data(self) -> None:
        """Generate the AVSynth shards into the cache on first use (``root`` unset)."""
        if self.root is None and self.requests is None:
            ensure_shards(self.default_root(), self.clip_counts, self.seed, self.synth_config)

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict" and self.requests is not None:
            from avmt.data.media import MediaConfig
            from avmt.data.requests import RequestDataset, load_requests

            cfg = self.synth_config
            media = MediaConfig(num_segments=cfg.num_segments, segment_seconds=cfg.segment_seconds,
                                frames_per_segment=cfg.frames_per_segment, image_size=cfg.frame_size,
                                sample_rate=cfg.sample_rate, missing_audio="silence")
            self.datasets["predict"] = RequestDataset(load_requests(self.requests), media)
            return
        root = self.root if self.root is not None else self.default_root()
        if self.root is None:  # prepare_data ran on rank 0; on other ranks this only reads the manifest
            ensure_shards(root, self.clip_counts, self.seed, self.synth_config)
        else:
            check_shard_version(root)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split in self.datasets:
                continue
            self.shards[split] = list_shards(root / self.split_folders[split])
            self.counts[split] = self.clip_counts[split] if self.root is None else self._manifest_count(root, split)
            self.datasets[split] = ClipTaskStream(
                self.shards[split],
                self.task_names,
                reasoning=self.reasoning,
                seed=self.seed,
                shuffle=split == "train",
                tasks_per_clip=self.tasks_per_clip if split == "train" else None,
                samples_per_clip=self.samples_per_clip,
                num_clips=self.counts[split],
                features=FeatureReader(self.features, split) if self.features is not None else None,
            )

    def _manifest_count(self, root: Path, split: str) -> int | None:
        """Clips of a converted split, from its manifest (``None``: unknown)."""
        manifest = read_manifest(root) or {}
        info = manifest.get("splits", {}).get(self.split_folders[split]) if isinstance(manifest.get("splits"), dict) else None
        return int(info["clips"]) if isinstance(info, dict) and isinstance(info.get("clips"), int) else None

    def data_words(self) -> list[str]:
        """The words of a converted dataset's text (its manifest's ``words``); ``[]`` for AVSynth."""
        if self.root is None:
            return []
        words = (read_manifest(self.root) or {}).get("words")
        return [str(w) for w in words] if isinstance(words, list) else []

    def check_vocabulary(self, tokenizer) -> None:
        """Refuse a tokenizer that cannot spell the data's words (the tiny LLM's offline tokenizer
        without the dataset's words would turn them into ``<unk>`` and learn nothing from them).

        Raises:
            ValueError: names a few missing words and the config key that adds them.
        """
        unk = getattr(tokenizer, "unk_token_id", None)
        if unk is None:
            return
        missing = [w for w in self.data_words() if unk in tokenizer(w, add_special_tokens=False)["input_ids"]]
        if missing:
            raise ValueError(
                f"the LLM's tokenizer cannot spell {len(missing)} word(s) of the data in '{self.root}' (e.g. "
                f"{', '.join(repr(w) for w in missing[:5])}): set model.llm.init_args.words_from: ['{self.root}'] "
                f"so the offline vocabulary includes them, or use a pretrained LLM"
            )

    def _loader(self, split: str) -> DataLoader:
        dataset = self.datasets[split]
        if split == "train" and self.trainer is not None:
            dataset.set_epoch(self.trainer.current_epoch)
        return DataLoader(
            dataset,
            batch_size=self.clips_per_batch if split == "train" else self.eval_clips_per_batch or self.clips_per_batch,
            collate_fn=functools.partial(collate, rules=self.collate_rules),
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
        return self._loader("predict" if "predict" in self.datasets else "test")
