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
import math
import os
import random
import warnings
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from avmt.data.features import FeatureReader
from avmt.data.sample import Clip, ClipGroup, SampleError, TaskSample, collate
from avmt.data.shards import (
    CorruptSampleCounter,
    CorruptSampleWarning,
    check_shard_version,
    ensure_shards,
    iter_clips,
    list_shards,
    manifest_segments,
    read_manifest,
    split_clip_count,
    stream_part,
)
from avmt.data.synth import SCHEMA_VERSION, SynthConfig
from avmt.errors import UserError
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
            answering task asks four questions about every clip; each has its own rng stream (the
            first is the stream a single sample uses) and a sample repeating an earlier prompt and
            target of the clip is dropped.
        num_clips: clips in the shards, used for ``len``.
        shuffle_buffer: clips held for shuffling.
        recent_clips: clips remembered as the other clips of multi-clip samples, most recent
            first; each task picks its others from them (``Task.select_others``) and is not built
            for a clip when too few of them fit.
        features: a feature cache reader (``data.features``): every clip read gets its cached
            encoder features attached (:meth:`~avmt.data.features.FeatureReader.attach`; a clip
            missing from the cache is an error naming it and the cache).
        split: the split's name, for messages.
        num_segments: segments every clip must have (the manifest's); ``None``: those of the
            first clip read.

    Readers: the DDP ranks and DataLoader workers share the stream by clip position
    (:func:`~avmt.data.shards.iter_clips`), so every clip goes to exactly one of them, whatever
    the number of shards. A clip whose layout (segment count, frame or audio shape) differs from
    the others would break collation: it is skipped and counted as corrupt (reason ``"other
    layout"``), with a warning naming it. A pass whose share held clips but yielded no clip
    group (every sample corrupt, or no task applies) raises :class:`~avmt.errors.UserError`
    naming the split, the shard folder and the corrupt count.
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
        split: str = "data",
        num_segments: int | None = None,
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
        self.split = split
        self.num_segments = num_segments
        self.epoch = 0
        self.ranks: tuple[int, int] | None = None
        self.counter = CorruptSampleCounter()

    def __len__(self) -> int:
        if self.num_clips is None:
            raise TypeError("length unknown: num_clips was not given")
        return self.num_clips

    def set_epoch(self, epoch: int) -> None:
        """Reseed shard order, shuffling and task sampling for ``epoch``."""
        self.epoch = epoch

    def set_ranks(self, rank: int, world_size: int) -> None:
        """Read the share of DDP rank ``rank`` of ``world_size`` (the trainer's); unset, the rank
        comes from ``RANK``/``WORLD_SIZE`` or ``torch.distributed`` (:func:`~avmt.data.shards.stream_part`)."""
        self.ranks = (int(rank), int(world_size))

    def _part(self) -> tuple[int, int]:
        """``(index, count)`` of this reader (DDP rank x DataLoader worker) among the stream's readers."""
        if self.ranks is None:
            return stream_part(split_by_node=True, split_by_worker=True)
        worker, workers = stream_part(split_by_node=False, split_by_worker=True)
        rank, world_size = self.ranks
        return rank * workers + worker, world_size * workers

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

    def _fits(self, clip: Clip, layout: list) -> bool:
        """Whether ``clip`` has the stream's layout (segment count, frame shape ``[T*F, 3, H, W]``,
        audio shape ``[S]``; ``layout`` holds the first fitting clip's, set on the first call);
        a clip that does not fit is counted as corrupt and warned about, naming it."""
        segments = clip.num_segments
        shapes = (tuple(clip.frames.shape), tuple(clip.audio.shape))
        wanted = self.num_segments if self.num_segments is not None else (layout[0][0] if layout else segments)
        if segments == wanted and (not layout or layout[0] == (segments, shapes)):
            if not layout:
                layout.append((segments, shapes))
            return True
        expected = f"{wanted} segments" + (f", frames {layout[0][1][0]}, audio {layout[0][1][1]}" if layout else "")
        self.counter.add(clip.key, "other layout")
        warnings.warn(
            f"skipping clip {clip.key!r} of the {self.split} split: it has {segments} segments, frames "
            f"{shapes[0]}, audio {shapes[1]}, while the other clips have {expected}",
            CorruptSampleWarning, stacklevel=3,
        )
        return False

    def _check_pass(self, groups: int, read_before: int, corrupt_before: int, part: tuple[int, int]) -> None:
        """Refuse a pass that yielded no clip group while this reader's share held samples (or, for
        reader 0, while the split held none at all): the data is unusable, not merely small."""
        read, corrupt = self.counter.read - read_before, self.counter.count - corrupt_before
        if groups or (read == 0 and corrupt == 0 and part[0] != 0):
            return
        folder = self.shards[0].parent if self.shards else "?"
        raise UserError(
            f"the {self.split} split in '{folder}' gave no usable sample in this pass: {corrupt} sample(s) "
            f"skipped as corrupt of {read} read ({dict(self.counter.reasons)}), tasks {self.task_names}. "
            "Check or regenerate the shards (python -m avmt data synth, or data convert)"
        )

    def __iter__(self) -> Iterator[ClipGroup]:
        shards = list(self.shards)
        rng = random.Random(self.seed * 1_000_003 + self.epoch)
        if self.shuffle:
            rng.shuffle(shards)
        part = self._part()
        read_before, corrupt_before, groups = self.counter.read, self.counter.count, 0
        layout: list = []
        buffer: list[ClipGroup] = []
        recent: deque[Clip] = deque(maxlen=self.recent_clips)
        for clip in iter_clips(shards, counter=self.counter, part=part):
            if not self._fits(clip, layout):
                continue
            if self.features is not None:
                clip = self.features.attach(clip)
            group = self._build(clip, list(recent))
            recent.appendleft(clip)
            if not group.samples:
                continue
            groups += 1
            if not self.shuffle:
                yield group
                continue
            buffer.append(group)
            if len(buffer) >= self.shuffle_buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer
        self._check_pass(groups, read_before, corrupt_before, part)


def reader_batches(num_clips: int, batch_size: int, num_readers: int, first_reader: int = 0, readers: int = 1) -> int:
    """Batches that readers ``first_reader .. first_reader + readers - 1`` of ``num_readers`` make
    from a stream of ``num_clips`` clips shared by position (reader ``i`` gets clips ``i, i +
    num_readers, ...``), each reader batching its own clips by ``batch_size`` (the last batch of
    a reader may be short). E.g. one DDP rank's DataLoader workers."""
    total = 0
    for reader in range(first_reader, first_reader + readers):
        clips = len(range(reader, num_clips, num_readers))
        total += math.ceil(clips / batch_size)
    return total


class BatchedStream(IterableDataset):
    """Batches of a :class:`ClipTaskStream` with a length: lists of ``batch_size`` clip groups,
    made in each DataLoader worker from its own share (as the DataLoader's own batching does),
    and ``len`` = the batches this DDP rank's workers make from the ``num_clips`` clips of the
    split (:func:`reader_batches`), an upper bound that is exact when every clip is usable.

    Args:
        stream: the clip groups.
        batch_size: clip groups per batch.
        num_workers: DataLoader workers reading it (0: the main process).
        rank, world_size: this process's DDP rank and the number of ranks.
    """

    def __init__(self, stream: ClipTaskStream, batch_size: int, num_workers: int, rank: int = 0,
                 world_size: int = 1) -> None:
        super().__init__()
        self.stream = stream
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size

    def __len__(self) -> int:
        if self.stream.num_clips is None:
            raise TypeError(f"length unknown: the {self.stream.split} split's clip count is not in its manifest")
        workers = max(1, self.num_workers)
        return reader_batches(self.stream.num_clips, self.batch_size, self.world_size * workers,
                              self.rank * workers, workers)

    def __iter__(self) -> Iterator[list[ClipGroup]]:
        batch: list[ClipGroup] = []
        for group in self.stream:
            batch.append(group)
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if batch:
            yield batch


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


def _check_count(key: str, value: object, minimum: int, alternative: str = "") -> None:
    """Raise :class:`~avmt.errors.UserError` naming ``key`` unless ``value`` is a whole number >=
    ``minimum`` (or ``None``, when ``alternative`` says what ``None`` means)."""
    if value is None and alternative:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        allowed = f"a whole number >= {minimum}" + (f" {alternative}" if alternative else "")
        raise UserError(f"{key} must be {allowed}, got {value!r}")


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
            raise UserError(f"data.tasks: unknown task(s) {unknown}; available tasks: {', '.join(known)}")
        if not tasks:
            raise UserError(f"data.tasks is empty; available tasks: {', '.join(known)}")
        _check_count("data.tasks_per_clip", tasks_per_clip, 1, "or null (every applicable task)")
        _check_count("data.clips_per_batch", clips_per_batch, 1)
        _check_count("data.eval_clips_per_batch", eval_clips_per_batch, 1, "or null (as in training)")
        _check_count("data.num_workers", num_workers, 0)
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
                raise UserError(f"data.samples_per_clip: unknown task {name!r}; available tasks: {', '.join(known)}")
            _check_count(f"data.samples_per_clip.{name}", count, 1)
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
            raise UserError(f"data.splits: unknown stage split(s) {unknown_splits}; the keys are {', '.join(SPLITS)}")
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
        segments = manifest_segments(root)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split in self.datasets:
                continue
            self.shards[split] = list_shards(root / self.split_folders[split])
            self.counts[split] = (self.clip_counts[split] if self.root is None
                                  else split_clip_count(root, self.split_folders[split]))
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
                split=split,
                num_segments=segments,
            )

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
            raise UserError(
                f"the LLM's tokenizer cannot spell {len(missing)} word(s) of the data in '{self.root}' (e.g. "
                f"{', '.join(repr(w) for w in missing[:5])}): set model.llm.init_args.words_from: ['{self.root}'] "
                f"so the offline vocabulary includes them, or use a pretrained LLM"
            )

    def _loader(self, split: str) -> DataLoader:
        """The DataLoader of ``split``: a clip stream's loader has a length (batches of this rank,
        :class:`BatchedStream`) when the split's clip count is known (manifest or AVSynth cache),
        so Lightning can size the schedule from ``trainer.estimated_stepping_batches``."""
        dataset = self.datasets[split]
        batch_size = self.clips_per_batch if split == "train" else self.eval_clips_per_batch or self.clips_per_batch
        collate_fn = functools.partial(collate, rules=self.collate_rules)
        if not isinstance(dataset, ClipTaskStream):  # requests to predict
            return DataLoader(dataset, batch_size=batch_size, collate_fn=collate_fn, num_workers=self.num_workers)
        if split == "train" and self.trainer is not None:
            dataset.set_epoch(self.trainer.current_epoch)
        rank, world_size = (self.trainer.global_rank, self.trainer.world_size) if self.trainer is not None else (0, 1)
        dataset.set_ranks(rank, world_size)
        batches = BatchedStream(dataset, batch_size, self.num_workers, rank, world_size)
        # batch_size=None: the stream yields whole batches, collate_fn turns each into a Batch
        return DataLoader(batches, batch_size=None, collate_fn=collate_fn, num_workers=self.num_workers,
                          persistent_workers=False)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.datasets else "test")
