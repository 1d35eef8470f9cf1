"""AVDataModule: shards → clips → task samples → clip-grouped batches.

A :class:`~avmt.data.sample.Batch` holds C clips and every task sample built from them: the
media tensors are stacked once per clip (``frames [C,T·F,3,H,W]``, ``audio [C,S]``) and each
sample points at its clips through its media references, so the encoders run once per clip,
however many tasks ask about it. Which tasks exist, what they need and how their dense targets
collate is read from the task declarations; tokenization happens in the LightningModule, which
owns the tokenizer. This module knows nothing about the model, nor about any particular task.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import os
import random
import re
import warnings
import zlib
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import asdict, replace
from pathlib import Path

import lightning as L
from torch.utils.data import DataLoader, IterableDataset

from avmt.data.features import FeatureReader
from avmt.data.resume import TURN, ResumableLoader, batch_sizes, collate_turns, rank_quotas, worker_positions
from avmt.data.sample import Clip, ClipGroup, SampleError, TaskSample, collate
from avmt.data.shards import (
    CorruptSampleCounter,
    CorruptSampleWarning,
    SplitSource,
    check_shard_version,
    ensure_shards,
    is_url_pattern,
    iter_clips,
    manifest_segments,
    read_manifest,
    reader_clip_count,
    shard_order,
    split_source,
    stream_part,
)
from avmt.data.synth import SCHEMA_VERSION, SynthConfig
from avmt.errors import UserError
from avmt.tasks import Task, get_task, list_tasks
from avmt.tasks.formats import AnswerFormat, TaggedText

SPLITS = ("train", "val", "test")
log = logging.getLogger(__name__)
# a scheme such as ``pipe:`` or ``s3://`` (two letters at least, so a Windows drive is not one)
_URL_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


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
        shards: the split's shards: a :class:`~avmt.data.shards.SplitSource` (local files or URLs,
            :func:`~avmt.data.shards.split_source`), or a list of tar files.
        task_names: tasks to build for every clip.
        reasoning: targets carry the reasoning sentences (else only the tagged answer).
        seed: base seed; the task rng of a clip depends only on (seed, epoch, clip key), the shard
            order only on (seed, epoch) (the same on every rank and worker), the buffer's draws on
            (seed, epoch, reader).
        shuffle: shuffle this split at all (the training split): the shard order when
            ``shuffle_shards`` and the clips through a buffer of ``shuffle_buffer`` clips, per epoch.
        tasks_per_clip: build this many of the applicable tasks per clip (sampled), or all when ``None``.
        samples_per_clip: task name -> samples built per clip (default 1), e.g. 4 for a question
            answering task asks four questions about every clip; each has its own rng stream (the
            first is the stream a single sample uses) and a sample repeating an earlier prompt and
            target of the clip is dropped.
        num_clips: clips in the shards, used for ``len`` (a list of tar files only; a
            :class:`~avmt.data.shards.SplitSource` carries its own).
        shuffle_buffer: clip groups held for shuffling; 0 yields them in the order read.
        shuffle_shards: with ``shuffle``, read the shards in a new order every epoch
            (:func:`~avmt.data.shards.shard_order`); else in file order.
        recent_clips: clips remembered as the other clips of multi-clip samples, most recent
            first; each task picks its others from them (``Task.select_others``) and is not built
            for a clip when too few of them fit.
        features: a feature cache reader (``data.features``): every clip read gets its cached
            encoder features attached (:meth:`~avmt.data.features.FeatureReader.attach`; a clip
            missing from the cache is an error naming it and the cache).
        split: the split's name, for messages.
        num_segments: segments every clip must have (the manifest's); ``None``: those of the
            first clip read.
        answer_format: how the tasks write and read ranges, boxes and masks (``None``: TaggedText).

    Readers: the DDP ranks and DataLoader workers share the stream by shard when there are at
    least as many shards as readers, else by clip position (:func:`~avmt.data.shards.iter_clips`),
    so every clip goes to exactly one of them, whatever the number of shards;
    :meth:`reader_clips` says how many each gets. A clip whose layout (segment count, frame or audio shape) differs from
    the others would break collation: it is skipped and counted as corrupt (reason ``"other
    layout"``), with a warning naming it. A pass whose share held clips but yielded no clip
    group (every sample corrupt, or no task applies) raises :class:`~avmt.errors.UserError`
    naming the split, the shard folder and the corrupt count.
    """

    def __init__(
        self,
        shards: SplitSource | Sequence[str | Path],
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
        shuffle_shards: bool = True,
        answer_format: AnswerFormat | None = None,
    ) -> None:
        super().__init__()
        self.source = shards if isinstance(shards, SplitSource) else SplitSource.from_paths(shards, num_clips)
        self.shards = list(self.source.urls)
        self.task_names = list(task_names)
        self.tasks = [get_task(name, reasoning=reasoning, answer_format=answer_format) for name in self.task_names]
        self.seed = seed
        self.shuffle = shuffle
        self.tasks_per_clip = tasks_per_clip
        self.samples_per_clip = dict(samples_per_clip or {})
        self.num_clips = self.source.num_clips
        _check_count("data.shuffle_buffer", shuffle_buffer, 0)
        self.shuffle_buffer = shuffle_buffer
        self.shuffle_shards = shuffle_shards
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

    def reader_clips(self, part: tuple[int, int]) -> int | None:
        """Clips reader ``part = (index, count)`` (DDP rank x worker, as :meth:`_part` numbers them)
        reads in an epoch when every clip is usable (:func:`~avmt.data.shards.reader_clip_count`);
        ``None`` when unknown."""
        return reader_clip_count(self.source, self.split, part)

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
        folder = self.source.where
        raise UserError(
            f"the {self.split} split in '{folder}' gave no usable sample in this pass: {corrupt} sample(s) "
            f"skipped as corrupt of {read} read ({dict(self.counter.reasons)}), tasks {self.task_names}. "
            "Check or regenerate the shards (python -m avmt data synth, or data convert)"
        )

    def __iter__(self) -> Iterator[ClipGroup]:
        part = self._part()
        order = shard_order(len(self.source.urls), self.seed, self.epoch, self.shuffle and self.shuffle_shards)
        rng = random.Random(zlib.crc32(f"buffer:{self.seed}:{self.epoch}:{part[0]}".encode()))
        buffered = self.shuffle_buffer if self.shuffle else 0
        read_before, corrupt_before, groups = self.counter.read, self.counter.count, 0
        layout: list = []
        buffer: list[ClipGroup] = []
        recent: deque[Clip] = deque(maxlen=self.recent_clips)
        clips = iter_clips(self.source, counter=self.counter, part=part, order=order) if self.source.urls else iter(())
        for clip in clips:
            if not self._fits(clip, layout):
                continue
            if self.features is not None:
                clip = self.features.attach(clip)
            group = self._build(clip, list(recent))
            recent.appendleft(clip)
            if not group.samples:
                continue
            groups += 1
            if not buffered:
                yield group
                continue
            buffer.append(group)
            if len(buffer) >= buffered:
                yield buffer.pop(rng.randrange(len(buffer)))
        rng.shuffle(buffer)
        yield from buffer
        self._check_pass(groups, read_before, corrupt_before, part)


class BatchedStream(IterableDataset):
    """Batches of a :class:`ClipTaskStream` with a length: lists of ``batch_size`` clip groups,
    made in each DataLoader worker from its own share (as the DataLoader's own batching does),
    and ``len`` = the batches this DDP rank's workers make from their shares of the split
    (:meth:`reader_clips`), an upper bound that is exact when every clip is usable.

    Args:
        stream: the clip groups.
        batch_size: clip groups per batch.
        num_workers: DataLoader workers reading it (0: the main process).
        rank, world_size: this process's DDP rank and the number of ranks.
        equal_steps: every rank makes the same number of batches (training under DDP, where a rank
            with one batch more would wait forever in the gradient all-reduce): each worker makes
            its quota (:func:`~avmt.data.resume.rank_quotas`; a rank with fewer clips splits some
            of its batches, :func:`~avmt.data.resume.batch_sizes`, so every clip is still taken
            once), and a worker that runs short (corrupt clips skipped, clips no task applies to)
            repeats its last batch up to it, with a warning: under DDP a short rank would hang, and
            with one process Lightning skips the end-of-epoch validation of an epoch shorter than
            its announced length. Evaluation keeps every clip once (``False``).

    ``resume_batches``: batches of this rank that the next pass leaves out, as the first of the
    epoch's (a resumed run's, set by :class:`~avmt.data.resume.ResumableLoader`); each worker
    leaves out its own share of them (:func:`~avmt.data.resume.worker_positions`), reading but not
    collating them. Every pass hands its last batch over only after the stream is read to its end,
    so the stream's end-of-pass checks run although Lightning stops asking after ``len`` batches.
    """

    def __init__(self, stream: ClipTaskStream, batch_size: int, num_workers: int, rank: int = 0,
                 world_size: int = 1, equal_steps: bool = False) -> None:
        super().__init__()
        self.stream = stream
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.rank = rank
        self.world_size = world_size
        self.equal_steps = equal_steps
        self.resume_batches = 0

    def reader_clips(self) -> list[int]:
        """Clips of every reader (DDP rank x worker, rank-major) in an epoch when all are usable."""
        readers = self.world_size * max(1, self.num_workers)
        counts = [self.stream.reader_clips((reader, readers)) for reader in range(readers)]
        if any(count is None for count in counts):
            raise TypeError(f"length unknown: the {self.stream.split} split's clip count is not in its manifest")
        return counts

    def worker_batches(self, clips: Sequence[int] | None = None) -> list[int]:
        """``[max(1, num_workers)]`` batches each DataLoader worker of this rank makes in an epoch
        from its clips (``ceil(clips / batch_size)``; with ``equal_steps``, its quota).
        ``clips``: :meth:`reader_clips`, when the caller has it already."""
        clips, workers = clips if clips is not None else self.reader_clips(), max(1, self.num_workers)
        if self.equal_steps:
            return rank_quotas(clips, self.batch_size, self.world_size)[self.rank]
        return [math.ceil(count / self.batch_size) for count in clips[self.rank * workers:(self.rank + 1) * workers]]

    def __len__(self) -> int:
        return sum(self.worker_batches())

    def _chunks(self, sizes: Sequence[int] | None = None) -> Iterator[list[ClipGroup]]:
        """The stream in batches (of ``sizes`` in turn when given, then of ``batch_size``), each
        handed over once the next is made (or the stream has ended)."""
        pending: list[ClipGroup] | None = None
        batch: list[ClipGroup] = []
        planned = iter(sizes or ())
        size = next(planned, self.batch_size)
        for group in self.stream:
            batch.append(group)
            if len(batch) == size:
                if pending is not None:
                    yield pending
                pending, batch = batch, []
                size = next(planned, self.batch_size)
        if pending is not None:
            yield pending
        if batch:
            yield batch

    def __iter__(self) -> Iterator[list[ClipGroup]]:
        worker, _ = stream_part(split_by_node=False, split_by_worker=True)
        try:
            clips: list[int] | None = self.reader_clips()
        except TypeError:  # no clip count: no quota, and nothing to resume from
            clips = None
        per_worker = self.worker_batches(clips) if clips is not None else None
        quota = per_worker[worker] if self.equal_steps and per_worker is not None else None
        sizes = None
        if quota is not None:
            sizes = batch_sizes(clips[self.rank * max(1, self.num_workers) + worker], quota, self.batch_size)
        skip = 0
        if self.resume_batches and per_worker:
            taken, next_worker = worker_positions(self.resume_batches, per_worker)
            skip = taken[worker]
            if next_worker is not None and worker < next_worker:
                yield TURN
        made, last = 0, None
        for batch in self._chunks(sizes):
            made += 1
            last = batch
            if made > skip:
                yield batch
        if quota is not None and made < quota:
            # Lightning validates at an epoch's end only after the announced number of batches: a
            # short epoch would end without validation (and under DDP the short rank would hang)
            reader = f"DDP rank {self.rank}, worker {worker}" if self.world_size > 1 else f"worker {worker}"
            if last is None:  # nothing usable in this reader's share: no batch to repeat
                raise UserError(
                    f"{reader}: its share of the {self.stream.split} split gave no usable clip (of "
                    f"{self.stream.counter.read} read), while the loader announced {len(self)} steps; check the "
                    "shards or use fewer devices / data.num_workers")
            warnings.warn(
                f"{reader}: {quota - made} {self.stream.split} batch(es) short (clips "
                f"skipped: {dict(self.stream.counter.reasons)}, clips none of data.tasks applies to, or fewer clips "
                "in its shards than another rank has batches); repeating its last batch so that the epoch has the "
                "steps the loader announced (every rank the same, and Lightning's end-of-epoch validation runs)",
                CorruptSampleWarning, stacklevel=2)
            for index in range(made, quota):
                if index >= skip:
                    yield last


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
        root: shard folder with ``train/``, ``val/``, ``test/`` subfolders, or a shard URL pattern
            holding ``{split}`` (the split's folder name), expanded and opened as webdataset does
            (:func:`~avmt.data.shards.split_source`), e.g.
            ``"pipe:aws s3 cp s3://bucket/avsynth/{split}/{000000..000099}.tar -"``. ``None`` uses the
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
        num_clips: clips of each stage split of a URL pattern ``root`` (no manifest there), e.g.
            ``{"train": 25600, "val": 512}``: gives the loaders a length (the learning-rate schedule
            needs the training split's, or ``trainer.max_steps``). A folder's manifest says it.
        shuffle_shards: read the training shards in a new order every epoch (drawn from ``seed``
            and the epoch, the same on every rank and worker); ``False``: file order.
        shuffle_buffer: training clips held in the shuffle buffer (0: the order read).
        answer_format: how answers write ranges, boxes and masks (:mod:`avmt.tasks.formats`);
            ``None`` = :class:`~avmt.tasks.formats.TaggedText`. The module scores with the same
            format (it takes this one in ``setup``).
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
        num_clips: dict[str, int] | None = None,
        shuffle_shards: bool = True,
        shuffle_buffer: int = 256,
        answer_format: AnswerFormat | None = None,
    ) -> None:
        super().__init__()
        if answer_format is not None and not isinstance(answer_format, AnswerFormat):
            raise UserError(f"data.answer_format must be an avmt.tasks.formats.AnswerFormat, got {answer_format!r}")
        self.answer_format: AnswerFormat = TaggedText() if answer_format is None else answer_format
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
        _check_count("data.shuffle_buffer", shuffle_buffer, 0)
        if not isinstance(shuffle_shards, bool):
            raise UserError(f"data.shuffle_shards must be true or false, got {shuffle_shards!r}")
        if root is not None and not is_url_pattern(root) and _URL_SCHEME.match(str(root)):
            raise UserError(
                f"data.root {root!r} looks like a URL but has no {{split}}: a URL root is a pattern of the "
                "shards of every split, e.g. 'pipe:aws s3 cp s3://bucket/avsynth/{split}/{000000..000099}.tar -'"
            )
        self.root: Path | str | None = (root if is_url_pattern(root) else Path(root).expanduser()
                                        if root is not None else None)
        unknown_counts = sorted(set(num_clips or {}) - set(SPLITS))
        if unknown_counts:
            raise UserError(f"data.num_clips: unknown stage split(s) {unknown_counts}; the keys are {', '.join(SPLITS)}")
        for split, count in (num_clips or {}).items():
            _check_count(f"data.num_clips.{split}", count, 0)
        if num_clips and not is_url_pattern(root):
            raise UserError("data.num_clips is for a URL pattern data.root (no manifest); a shard folder's "
                            "manifest gives its clip counts: remove data.num_clips")
        self.num_clips = dict(num_clips or {})
        self.shuffle_shards = shuffle_shards
        self.shuffle_buffer = shuffle_buffer
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
        self.shards: dict[str, list[Path] | list[str]] = {}
        self.sources: dict[str, SplitSource] = {}
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
        url = is_url_pattern(root)
        if self.root is None:  # prepare_data ran on rank 0; on other ranks this only reads the manifest
            ensure_shards(root, self.clip_counts, self.seed, self.synth_config)
        elif not url:
            check_shard_version(root)
        segments = None if url else manifest_segments(root)
        self.answer_format.check_data(segments, self.synth_config.frame_size if self.root is None else None)
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, SPLITS) if stage else SPLITS:
            if split in self.datasets:
                continue
            source = split_source(root, self.split_folders[split], self.num_clips.get(split) if url else None)
            if self.root is None:
                source = dataclasses.replace(source, num_clips=self.clip_counts[split])
            max_steps = getattr(self.trainer, "max_steps", None) if self.trainer is not None else None
            if url and split == "train" and stage == "fit" and source.num_clips is None and max_steps is not None \
                    and max_steps <= 0:  # the learning-rate schedule would have no length to be sized from
                raise UserError(
                    f"data.root {self.root!r} is a URL pattern (no manifest), so the training split's size is unknown "
                    "and the learning-rate schedule cannot be sized: give data.num_clips.train, or set trainer.max_steps"
                )
            self.sources[split] = source
            self.shards[split] = list(source.urls) if url else [Path(u) for u in source.urls]
            self.counts[split] = source.num_clips
            self.datasets[split] = ClipTaskStream(
                source,
                self.task_names,
                reasoning=self.reasoning,
                seed=self.seed,
                shuffle=split == "train",
                shuffle_buffer=self.shuffle_buffer,
                shuffle_shards=self.shuffle_shards,
                tasks_per_clip=self.tasks_per_clip if split == "train" else None,
                samples_per_clip=self.samples_per_clip,
                features=FeatureReader(self.features, split) if self.features is not None else None,
                split=split,
                num_segments=segments,
                answer_format=self.answer_format,
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
        # training: every rank the same number of steps (else DDP hangs in the all-reduce), and a
        # place in the epoch that checkpoints keep; evaluation: every clip exactly once
        train = split == "train"
        batches = BatchedStream(dataset, batch_size, self.num_workers, rank, world_size, equal_steps=train)
        # batch_size=None: the stream yields whole batches, collate_fn turns each into a Batch
        loader = dict(batch_size=None, collate_fn=collate_fn, num_workers=self.num_workers, persistent_workers=False)
        if not train:
            return DataLoader(batches, **loader)
        loader["collate_fn"] = functools.partial(collate_turns, collate_fn=collate_fn)
        trainer = self.trainer
        if trainer is not None:
            loader["epoch"] = lambda: trainer.current_epoch
        resumable = ResumableLoader(batches, **loader)
        self._train_loader = resumable  # its place in the epoch goes into checkpoints (state_dict)
        pending, self._train_state = getattr(self, "_train_state", None), None
        if pending is not None:  # a checkpoint restored before the loader was made
            resumable.load_state_dict(pending)
        try:
            clips = batches.reader_clips()
        except TypeError:  # no clip count (no manifest): Lightning runs the stream to its end
            return resumable
        readers = max(1, self.num_workers)
        if min(sum(clips[r * readers:(r + 1) * readers]) for r in range(world_size)) == 0 and dataset.num_clips:
            raise UserError(
                f"the train split's {dataset.num_clips} clip(s) leave DDP rank(s) without a batch: they are shared by "
                f"{world_size} rank(s) x {max(1, self.num_workers)} reader(s) each (trainer.devices, data.num_workers); "
                "use fewer devices or workers, or more clips")
        return resumable

    def state_dict(self) -> dict:
        """The training loader's place in its epoch (:class:`~avmt.data.resume.ResumableLoader`).

        Lightning also keeps it with its fit loop, but gives it back only when the training loader
        is made after the checkpoint is restored; the learning-rate schedule asks for the step
        count (``trainer.estimated_stepping_batches``) and so makes it before, and that state is
        lost (Lightning issue #20550). A data module's state is restored before either.
        """
        loader = getattr(self, "_train_loader", None)
        return {"train_loader": loader.state_dict()} if loader is not None else {}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`: the training loader made next (or already made) resumes there."""
        if "train_loader" not in state:
            return
        loader = getattr(self, "_train_loader", None)
        if loader is not None:
            loader.load_state_dict(state["train_loader"])
        else:
            self._train_state = state["train_loader"]

    def train_dataloader(self) -> DataLoader:
        return self._loader("train")

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict" if "predict" in self.datasets else "test")
