"""Typed data: a decoded clip, a task sample, and the collated batch the model consumes.

The flow is one direction::

    Clip ──Task.build──▶ TaskSample ──ClipGroup (one clip, its samples)──collate──▶ Batch

A :class:`Batch` stacks the media of its C clips once (the encoders run once per clip, however
many tasks ask about it) and keeps the B text samples as lists; each sample says, with
:class:`MediaRef` s, which clip (and which segment, for ``<image>``) each placeholder of its
prompt stands for, so a sample can look at one frame or at several clips without any special
case downstream. Dense targets (masks, class maps, ...) travel as :class:`Dense` tables: the
values of the samples that carry the target, with the batch row of each.
"""

from __future__ import annotations

from avmt.errors import UserError
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

__all__ = [
    "PLACEHOLDERS",
    "IGNORE_INDEX",
    "SampleError",
    "segment_frames",
    "Clip",
    "ClipFeatures",
    "MediaRef",
    "DenseSpec",
    "TaskSample",
    "ClipGroup",
    "Dense",
    "TokenizedBatch",
    "Batch",
    "collate",
    "iter_refs",
]

#: The media placeholders a prompt can use: all T frames, all T audio windows, one frame.
PLACEHOLDERS: tuple[str, ...] = ("<video>", "<audio>", "<image>")
#: Label value of the positions that take no loss (prompt and padding).
IGNORE_INDEX = -100


class SampleError(UserError):
    """A task cannot build a sample from a clip whose annotation is wrong or incomplete.

    The data stream skips such a sample, counts it and warns with the message, which names the
    clip and the task; a direct call raises it like any ``ValueError``.
    """


def segment_frames(num_frames: int, num_segments: int) -> list[int]:
    """Index of the frame that represents each segment: the middle frame of its F frames.

    These are the frames the vision encoder sees and the frames per-frame dense targets refer
    to. ``num_frames`` must be a multiple of ``num_segments`` (F frames per segment).
    """
    if num_segments < 1 or num_frames < num_segments or num_frames % num_segments:
        raise UserError(f"{num_frames} frames do not split into {num_segments} segments of equal length")
    per = num_frames // num_segments
    return [t * per + per // 2 for t in range(num_segments)]


@dataclass
class ClipFeatures:
    """Cached outputs of the frozen encoders for one clip (read from a feature cache,
    :mod:`avmt.data.features`), used by the model instead of running the encoders.

    Attributes:
        vision: ``[T, P, D_v]`` vision encoder features of the T segment frames.
        audio: ``[T, Q, D_a]`` audio encoder features of the T windows.
        cache: the cache folder they come from (the module checks its encoder fingerprint).
    """

    vision: Tensor
    audio: Tensor
    cache: str


@dataclass
class Clip:
    """One decoded clip.

    Attributes:
        key: clip id (the WebDataset key).
        frames: ``uint8 [T·F, 3, H, W]`` video frames.
        audio: ``float32 [S]`` mono waveform.
        scene: the annotation: AVSynth's scene graph or a converter's structured annotation.
        masks: ``uint8 [T·F, H, W]`` object-id map (0 background, ``id + 1`` where object ``id``
            is drawn), or ``None`` when the source has no masks.
        features: the clip's cached encoder features (``data.features``), or ``None``.
    """

    key: str
    frames: Tensor
    audio: Tensor
    scene: dict
    masks: Tensor | None = None
    features: ClipFeatures | None = None

    @property
    def num_segments(self) -> int:
        """T, from the annotation."""
        return int(self.scene["num_segments"])

    def segment_masks(self, task: str = "?") -> Tensor:
        """The object-id maps of the segment frames (:func:`segment_frames`), ``uint8 [T, H, W]``.

        Raises:
            SampleError: the clip has no masks, or their size disagrees with the frames.
        """
        if self.masks is None:
            raise SampleError(f"clip {self.key!r}: task {task!r} needs object masks and the clip has none")
        if self.masks.dim() != 3 or tuple(self.masks.shape) != (self.frames.shape[0], *self.frames.shape[2:]):
            raise SampleError(
                f"clip {self.key!r}: masks of shape {tuple(self.masks.shape)} do not match frames "
                f"{tuple(self.frames.shape)} (task {task!r}); expected [N, H, W] = "
                f"[{self.frames.shape[0]}, {self.frames.shape[2]}, {self.frames.shape[3]}]"
            )
        return self.masks[segment_frames(self.masks.shape[0], self.num_segments)]


@dataclass(frozen=True)
class MediaRef:
    """What one placeholder of a prompt stands for.

    Attributes:
        placeholder: ``"<video>"``, ``"<audio>"`` or ``"<image>"``.
        clip: which clip: an index into the sample's clips (0 = the clip it was built from) in a
            :class:`TaskSample`, into the batch's clips in a :class:`Batch`.
        segment: for ``"<image>"``, the segment whose frame (:func:`segment_frames`) is the image.
    """

    placeholder: str
    clip: int = 0
    segment: int | None = None

    def __post_init__(self) -> None:
        if self.placeholder not in PLACEHOLDERS:
            raise ValueError(f"unknown media placeholder {self.placeholder!r}; placeholders: {PLACEHOLDERS}")
        if (self.segment is not None) != (self.placeholder == "<image>"):
            raise ValueError(f"{self.placeholder}: a segment is given for <image> and only for it")


@dataclass(frozen=True)
class DenseSpec:
    """A dense target a task declares.

    Attributes:
        name: key in ``TaskSample.dense`` and ``Batch.dense`` (e.g. ``"mask"``).
        shape: symbolic dimensions, e.g. ``("T", "H", "W")`` (the rank is checked).
        dtype: the tensor dtype (checked).
        collate: ``"stack"`` (all samples of a batch share the shape; stacked to ``[M, *shape]``)
            or ``"pad"`` (zero-padded to the largest size of each dimension, e.g. a variable
            number of boxes).
        doc: what the values mean.
    """

    name: str
    shape: tuple[str, ...]
    dtype: torch.dtype
    collate: str = "stack"
    doc: str = ""

    def __post_init__(self) -> None:
        if self.collate not in ("stack", "pad"):
            raise ValueError(f"dense target {self.name!r}: collate must be 'stack' or 'pad', got {self.collate!r}")

    def check(self, value: Any, where: str) -> None:
        """Raise :class:`SampleError` naming ``where`` when ``value`` is not a tensor of this spec."""
        if not isinstance(value, Tensor):
            raise SampleError(f"{where}: dense target {self.name!r} is {type(value).__name__}, not a tensor")
        if value.dim() != len(self.shape) or value.dtype != self.dtype:
            raise SampleError(
                f"{where}: dense target {self.name!r} is {value.dtype} {tuple(value.shape)}, "
                f"expected {self.dtype} [{', '.join(self.shape)}]"
            )


@dataclass
class TaskSample:
    """One instruction sample built from a clip (and, for some tasks, more clips).

    Attributes:
        task: the task's name.
        prompt: instruction text; its placeholders match ``media`` one to one, in order.
        target: the answer text (reasoning sentences + tagged answer, or the tags only).
        answer: structured ground truth, what the task's metrics compare predictions against.
        media: what each placeholder of the prompt stands for (``clip`` indexes the clips the
            sample was built from: 0 is the anchor clip).
        dense: dense targets by name (tensors of the task's :class:`DenseSpec` s).
    """

    task: str
    prompt: str
    target: str
    answer: Any
    media: tuple[MediaRef, ...] = ()
    dense: dict[str, Tensor] = field(default_factory=dict)


@dataclass
class ClipGroup:
    """What the data stream yields: the samples built from one anchor clip.

    Attributes:
        clips: the anchor clip first, then any other clip a sample refers to.
        samples: the task samples; their ``MediaRef.clip`` index ``clips``.
        corrupt_total: corrupt samples the reading process had skipped when this group was made.
    """

    clips: list[Clip]
    samples: list[TaskSample]
    corrupt_total: int = 0


@dataclass
class Dense:
    """Per-sample tensors of a batch: entry ``i`` (``values[i]``) belongs to batch row ``rows[i]``.

    A row may own several entries (e.g. one mask per ``<seg>`` token it emitted), kept in order.

    Attributes:
        rows: ``long [M]`` batch rows.
        values: ``[M, ...]``.
    """

    rows: Tensor
    values: Tensor

    def for_row(self, row: int) -> Tensor:
        """The entries of batch row ``row``, ``[k, ...]`` (k may be 0)."""
        return self.values[self.rows == int(row)]

    def take(self, rows: Sequence[int]) -> "Dense":
        """The entries of the given batch rows, renumbered ``0..len(rows)-1`` in the given order."""
        new_index = {int(r): i for i, r in enumerate(rows)}
        keep = [i for i, r in enumerate(self.rows.tolist()) if r in new_index]
        keep = sorted(keep, key=lambda i: (new_index[int(self.rows[i])], i))
        index = torch.tensor(keep, dtype=torch.long, device=self.values.device)
        renumbered = torch.tensor([new_index[int(self.rows[i])] for i in keep], dtype=torch.long, device=self.rows.device)
        return Dense(renumbered, self.values.index_select(0, index))

    def to(self, device: torch.device | str) -> "Dense":
        return Dense(self.rows.to(device), self.values.to(device))


@dataclass
class TokenizedBatch:
    """Token ids of a batch; all tensors ``[B, L]``.

    ``labels`` is ``IGNORE_INDEX`` over the prompt and the padding (``None`` for generation).
    """

    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor | None

    def take(self, rows: Sequence[int]) -> "TokenizedBatch":
        index = torch.as_tensor(list(rows), dtype=torch.long, device=self.input_ids.device)
        labels = None if self.labels is None else self.labels[index]
        return TokenizedBatch(self.input_ids[index], self.attention_mask[index], labels)

    def to(self, device: torch.device | str) -> "TokenizedBatch":
        labels = None if self.labels is None else self.labels.to(device)
        return TokenizedBatch(self.input_ids.to(device), self.attention_mask.to(device), labels)


@dataclass
class Batch:
    """C clips and the B task samples built from them.

    Attributes:
        frames: ``uint8 [C, T·F, 3, H, W]``.
        audio: ``float32 [C, S]``.
        clip_keys: ``[C]`` clip ids.
        tasks, prompts, targets, answers: ``[B]`` per-sample lists.
        media: ``[B]`` media references of each sample, ``clip`` indexing the C clips.
        dense: dense targets by name (rows = samples carrying them).
        corrupt_total: corrupt samples skipped so far by the reading process.
        tokens: set by the LightningModule (which owns the tokenizer) before the forward.
        vision_features: ``[C, T, P, D_v]`` cached vision encoder features of the clips, or
            ``None`` (the model then runs the vision encoder on ``frames``).
        audio_features: ``[C, T, Q, D_a]`` cached audio encoder features, or ``None``.
        feature_cache: the folder the cached features come from, or ``None``.
    """

    frames: Tensor
    audio: Tensor
    clip_keys: list[str]
    tasks: list[str]
    prompts: list[str]
    targets: list[str]
    answers: list[Any]
    media: list[tuple[MediaRef, ...]]
    dense: dict[str, Dense] = field(default_factory=dict)
    corrupt_total: int = 0
    tokens: TokenizedBatch | None = None
    vision_features: Tensor | None = None
    audio_features: Tensor | None = None
    feature_cache: str | None = None

    def __len__(self) -> int:
        return len(self.tasks)

    @property
    def anchor_clips(self) -> list[int]:
        """``[B]`` the clip each sample was built from (its first media reference)."""
        return [refs[0].clip if refs else 0 for refs in self.media]

    @property
    def keys(self) -> list[str]:
        """``[B]`` the key of each sample's anchor clip."""
        return [self.clip_keys[c] for c in self.anchor_clips]

    def task_rows(self) -> dict[str, list[int]]:
        """Task name -> its rows, tasks in order of first appearance."""
        out: dict[str, list[int]] = {}
        for row, name in enumerate(self.tasks):
            out.setdefault(name, []).append(row)
        return out

    def take(self, rows: Sequence[int]) -> "Batch":
        """The sub-batch of ``rows`` (in that order), keeping only the clips they use."""
        rows = [int(r) for r in rows]
        used = sorted({ref.clip for r in rows for ref in self.media[r]})
        new_clip = {c: i for i, c in enumerate(used)}
        index = torch.tensor(used, dtype=torch.long, device=self.frames.device)
        return Batch(
            frames=self.frames.index_select(0, index),
            audio=self.audio.index_select(0, index.to(self.audio.device)),
            clip_keys=[self.clip_keys[c] for c in used],
            tasks=[self.tasks[r] for r in rows],
            prompts=[self.prompts[r] for r in rows],
            targets=[self.targets[r] for r in rows],
            answers=[self.answers[r] for r in rows],
            media=[tuple(replace(ref, clip=new_clip[ref.clip]) for ref in self.media[r]) for r in rows],
            dense={name: table.take(rows) for name, table in self.dense.items()},
            corrupt_total=self.corrupt_total,
            tokens=None if self.tokens is None else self.tokens.take(rows),
            vision_features=_take_clips(self.vision_features, index),
            audio_features=_take_clips(self.audio_features, index),
            feature_cache=self.feature_cache,
        )

    def to(self, device: torch.device | str) -> "Batch":
        """The batch with every tensor on ``device`` (Lightning calls this to move batches)."""
        return replace(
            self,
            frames=self.frames.to(device),
            audio=self.audio.to(device),
            dense={name: table.to(device) for name, table in self.dense.items()},
            tokens=None if self.tokens is None else self.tokens.to(device),
            vision_features=None if self.vision_features is None else self.vision_features.to(device),
            audio_features=None if self.audio_features is None else self.audio_features.to(device),
        )


def _take_clips(features: Tensor | None, index: Tensor) -> Tensor | None:
    """Rows ``index`` of per-clip features ``[C, ...]`` (``None`` stays ``None``)."""
    return None if features is None else features.index_select(0, index.to(features.device))


def _collate_features(clips: Sequence[Clip]) -> tuple[Tensor | None, Tensor | None, str | None]:
    """Stack the clips' cached features: ``vision [C, T, P, D_v]``, ``audio [C, T, Q, D_a]`` and
    their cache folder, or ``(None, None, None)`` when no clip has any.

    Raises:
        ValueError: some clips have cached features and others not, or they come from two caches.
    """
    cached = [clip for clip in clips if clip.features is not None]
    if not cached:
        return None, None, None
    if len(cached) != len(clips):
        raw = [clip.key for clip in clips if clip.features is None]
        raise UserError(f"clips {raw[:3]} have no cached features while {cached[0].key!r} has: a batch "
                         "is encoded from cached features or from media, not both")
    caches = sorted({clip.features.cache for clip in cached})
    if len(caches) > 1:
        raise UserError(f"one batch holds cached features of several caches ({caches}); use one data.features")
    return (torch.stack([clip.features.vision for clip in cached]),
            torch.stack([clip.features.audio for clip in cached]), caches[0])


def _collate_values(name: str, rule: str, values: list[Tensor], owners: list[str]) -> Tensor:
    shapes = {tuple(v.shape) for v in values}
    if rule == "stack" or len(shapes) == 1:
        if len(shapes) > 1:
            first = tuple(values[0].shape)
            odd = next(i for i, v in enumerate(values) if tuple(v.shape) != first)
            raise UserError(
                f"dense target {name!r}: {owners[odd]} has shape {tuple(values[odd].shape)} but {owners[0]} "
                f"has {first}; a batch stacks one shape (the clips of a batch must share their frame size)"
            )
        return torch.stack(values)
    size = [max(s[d] for s in shapes) for d in range(values[0].dim())]
    out = values[0].new_zeros((len(values), *size))
    for i, v in enumerate(values):
        out[(i, *[slice(0, n) for n in v.shape])] = v
    return out


def collate(groups: Sequence[ClipGroup], rules: dict[str, str] | None = None) -> Batch:
    """Stack clip groups into one :class:`Batch`.

    Clips are deduplicated by key (a clip that is one group's anchor and another sample's
    candidate is encoded once). Dense targets are collated by name with ``rules[name]``
    (``"stack"`` by default; see :class:`DenseSpec`).

    Raises:
        ValueError: dense targets of one name disagree in shape under ``"stack"`` (names both samples).
    """
    rules = rules or {}
    clip_index: dict[str, int] = {}
    clips: list[Clip] = []
    tasks, prompts, targets, answers, media = [], [], [], [], []
    dense_values: dict[str, list[Tensor]] = {}
    dense_rows: dict[str, list[int]] = {}
    dense_owner: dict[str, list[str]] = {}
    for group in groups:
        local = []
        for clip in group.clips:
            if clip.key not in clip_index:
                clip_index[clip.key] = len(clips)
                clips.append(clip)
            local.append(clip_index[clip.key])
        for sample in group.samples:
            row = len(tasks)
            tasks.append(sample.task)
            prompts.append(sample.prompt)
            targets.append(sample.target)
            answers.append(sample.answer)
            media.append(tuple(replace(ref, clip=local[ref.clip]) for ref in sample.media))
            for name, value in sample.dense.items():
                dense_values.setdefault(name, []).append(value)
                dense_rows.setdefault(name, []).append(row)
                dense_owner.setdefault(name, []).append(f"sample {row} ({sample.task}, clip {group.clips[0].key!r})")
    dense = {
        name: Dense(
            torch.tensor(dense_rows[name], dtype=torch.long),
            _collate_values(name, rules.get(name, "stack"), values, dense_owner[name]),
        )
        for name, values in dense_values.items()
    }
    vision_features, audio_features, feature_cache = _collate_features(clips)
    return Batch(
        frames=torch.stack([clip.frames for clip in clips]),
        audio=torch.stack([clip.audio for clip in clips]),
        clip_keys=[clip.key for clip in clips],
        tasks=tasks,
        prompts=prompts,
        targets=targets,
        answers=answers,
        media=media,
        dense=dense,
        corrupt_total=max((group.corrupt_total for group in groups), default=0),
        vision_features=vision_features,
        audio_features=audio_features,
        feature_cache=feature_cache,
    )


def iter_refs(media: Iterable[tuple[MediaRef, ...]], placeholder: str) -> list[tuple[int, MediaRef]]:
    """``(row, ref)`` of every reference to ``placeholder``, row by row, in prompt order."""
    return [(row, ref) for row, refs in enumerate(media) for ref in refs if ref.placeholder == placeholder]
