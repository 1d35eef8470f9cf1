"""What the spatial tasks share: per-frame masks of what sounds, the ``<seg>`` answer, mask losses.

A mask task answers with text that ends in ``<seg>``; the model's mask head reads the hidden
state that predicts that token and decodes one mask per segment frame (``mask_logits
[T, H, W]``). The task's dense target is the matching ``mask`` (``bool [T, H, W]``); its losses
are BCE and Dice; its prediction is the sigmoid of the logits of the first ``<seg>`` the model
emitted, and no ``<seg>`` is a failure (scored as the empty mask). With an answer format that
writes masks as text (:class:`~avmt.tasks.formats.DiscreteTokens`: a cell code instead of
``<seg>``) the task reads no head output and adds no dense loss: the LM loss trains the code, and
the prediction is the code decoded back to a mask, scored by the same metrics.

Not every frame of a real dataset has a mask (AVSBench S4 annotates only the first frame of a
training clip): the dense target ``annotated_frames`` (``bool [T]``, also in the answer) says
which segment frames do. Frames that are not annotated take no loss and no score; their target
pixels are 0 and mean "unknown", not background. AVSynth clips are annotated on every frame.
"""

from __future__ import annotations

import random
from typing import Any, ClassVar, Iterable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import MetricCollection

from avmt.data.annotation import is_annotation
from avmt.data.sample import Clip, Dense, DenseSpec, MediaRef, SampleError, TaskSample, segment_frames
from avmt.intervals import ranges_to_mask
from avmt.losses import mask_bce, mask_dice
from avmt.plots import mask_panel
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.formats import SEG
from avmt.tasks.metrics import ParseFailureRate
from avmt.tasks.spatial_metrics import MaskF, MaskJ

__all__ = [
    "SEG",
    "MASK",
    "ANNOTATED",
    "MaskTask",
    "sounding_mask",
    "object_mask",
    "objects_mask",
    "annotated_segments",
    "first_per_row",
    "mask_candidates",
    "annotated_mask_losses",
]

#: The per-frame binary mask target of the mask tasks.
MASK = DenseSpec("mask", ("T", "H", "W"), torch.bool, doc="per segment frame: the pixels of the target object(s)")
#: Which segment frames have an annotated mask (the others take no loss and no score).
ANNOTATED = DenseSpec("annotated_frames", ("T",), torch.bool,
                      doc="per segment frame: whether its target is annotated (False: ignored by losses and metrics)")


def annotated_segments(clip: Clip) -> torch.Tensor:
    """``bool [T]``: which segment frames (:func:`~avmt.data.sample.segment_frames`) of ``clip``
    have an annotated mask: those in a converted clip's ``mask_frames``; every one of an AVSynth clip."""
    num_segments = clip.num_segments
    if not is_annotation(clip.scene):
        return torch.ones(num_segments, dtype=torch.bool)
    annotated = {int(i) for i in clip.scene.get("mask_frames", [])}
    frames = segment_frames(int(clip.frames.shape[0]), num_segments)
    return torch.tensor([frame in annotated for frame in frames], dtype=torch.bool)


def objects_mask(clip: Clip, task: str, object_ids: Iterable[int]) -> torch.Tensor:
    """``bool [T, H, W]``: the pixels of any of the mask objects ``object_ids`` on every segment frame
    (a converted clip's object ids: ``masks`` value ``id + 1``).

    Raises:
        SampleError: the clip has no masks, they do not fit its frames, or an id is not one of its objects.
    """
    ids = clip.segment_masks(task)
    known = len(clip.scene.get("objects", [])) if isinstance(clip.scene, dict) else 0
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for object_id in object_ids:
        if not isinstance(object_id, int) or isinstance(object_id, bool) or not 0 <= object_id < known:
            raise SampleError(f"clip {clip.key!r}: task {task!r}: mask object {object_id!r} is not one of the "
                              f"clip's {known} objects")
        out |= ids == object_id + 1
    return out


def sounding_mask(clip: Clip, task: str, objects: Iterable[dict]) -> torch.Tensor:
    """``bool [T, H, W]``: on segment frame t, the pixels of the ``objects`` that sound in segment t.

    Raises:
        SampleError: the clip has no masks or they do not fit its frames.
    """
    ids = clip.segment_masks(task)
    out = torch.zeros(ids.shape, dtype=torch.bool)
    for obj in objects:
        sounding = torch.from_numpy(ranges_to_mask(obj.get("sounding", []), clip.num_segments))
        out |= (ids == int(obj["id"]) + 1) & sounding[:, None, None]
    return out


def object_mask(clip: Clip, task: str, obj: dict | None) -> torch.Tensor:
    """``bool [T, H, W]``: the pixels of ``obj`` on every segment frame (all empty for None)."""
    ids = clip.segment_masks(task)
    if obj is None:
        return torch.zeros(ids.shape, dtype=torch.bool)
    return ids == int(obj["id"]) + 1


def first_per_row(outputs: Dense, targets: Dense) -> tuple[torch.Tensor, torch.Tensor]:
    """Pair every target row with the first output entry of the same row.

    Returns:
        ``(outputs [n, ...], targets [n, ...])`` for the n target rows that have an output.
    """
    first: dict[int, int] = {}
    for index, row in enumerate(outputs.rows.tolist()):
        first.setdefault(row, index)
    pairs = [(first[row], index) for index, row in enumerate(targets.rows.tolist()) if row in first]
    out_index = torch.tensor([p for p, _ in pairs], dtype=torch.long, device=outputs.values.device)
    target_index = torch.tensor([t for _, t in pairs], dtype=torch.long, device=targets.values.device)
    return outputs.values.index_select(0, out_index), targets.values.index_select(0, target_index)


def mask_candidates(masks: Sequence[torch.Tensor],
                    annotated: Sequence[torch.Tensor | None] | None = None) -> list[dict]:
    """Constant mask predictions a trivial baseline tries: empty, full, the per-pixel foreground
    frequency of ``masks`` as a probability map, and that map thresholded at 0.1, 0.25, 0.5.

    Args:
        masks: bool ``[T, H, W]`` target masks of one shape.
        annotated: per mask, ``bool [T]`` its annotated frames (None: all); the frequency of a frame
            counts only the masks that annotate it.
    """
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) != 1:
        return [None]  # no constant fits masks of several sizes: the empty prediction stands in
    stacked = torch.stack([m.float() for m in masks])  # [N, T, H, W]
    if annotated is None or all(a is None for a in annotated):
        frequency = stacked.mean(0)
    else:
        weights = torch.stack([torch.ones(stacked.shape[1]) if a is None else torch.as_tensor(a).float().cpu()
                               for a in annotated])[:, :, None, None]  # [N, T, 1, 1]
        frequency = (stacked * weights).sum(0) / weights.sum(0).clamp(min=1)
    return [{"mask": frequency.new_zeros(frequency.shape)}, {"mask": frequency.new_ones(frequency.shape)},
            {"mask": frequency}, *({"mask": (frequency >= q).float()} for q in (0.1, 0.25, 0.5))]


def annotated_mask_losses(logits: torch.Tensor, target: torch.Tensor,
                          annotated: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """``{"bce", "dice"}`` of mask logits over the annotated frames only.

    Args:
        logits: ``[n, T, H, W]`` mask logits; target: ``bool [n, T, H, W]``.
        annotated: ``bool [n, T]`` the annotated frames (None: all).
    Returns:
        BCE: mean over the pixels of annotated frames; Dice: per sample over its annotated frames,
        mean over the samples with one. The same numbers as :func:`~avmt.losses.mask_bce` /
        :func:`~avmt.losses.mask_dice` when every frame is annotated; ``{}`` when none is.
    """
    if annotated is None or bool(annotated.all()):
        return {"bce": mask_bce(logits, target), "dice": mask_dice(logits, target)}
    annotated = annotated.to(device=logits.device, dtype=torch.bool)
    keep = annotated.any(1)
    if not bool(keep.any()):
        return {}
    logits, target, annotated = logits[keep].float(), target[keep].float(), annotated[keep]
    weight = annotated[:, :, None, None].expand_as(logits).float()  # [n, T, H, W]
    pixel_bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    bce = (pixel_bce * weight).sum() / weight.sum()
    prob, truth = (torch.sigmoid(logits) * weight).flatten(1), (target * weight).flatten(1)
    dice = (2 * (prob * truth).sum(1) + 1.0) / (prob.sum(1) + truth.sum(1) + 1.0)  # smooth 1, as mask_dice
    return {"bce": bce, "dice": (1 - dice).mean()}


class MaskTask(Task):
    """Base of the tasks answered with a ``<seg>`` token and a per-frame mask.

    Subclasses implement ``_compose_clip`` (and ``compose_annotated`` for converted datasets)
    returning parts built by :meth:`_mask_sample`: ``dense["mask"]`` is the target mask and
    ``answer`` holds it under ``"mask"``; ``annotated_frames`` (dense target and answer key) is
    set from the clip's annotated frames by :meth:`build`, so a subclass need not pass it.
    Metrics: J (mean IoU over the annotated frames), F (AVSBench F-measure, β² = 0.3) and the
    failure rate (no ``<seg>`` emitted).
    """

    dense_targets: ClassVar[tuple[DenseSpec, ...]] = (MASK, ANNOTATED)
    max_baseline_candidates: ClassVar[int] = 8

    @property
    def outputs(self) -> tuple[str, ...]:  # type: ignore[override]
        """``("mask_logits",)``; none with a format whose masks are text (no ``dense_masks``)."""
        return ("mask_logits",) if self.format.dense_masks else ()

    def _mask_sample(self, question: str, sentences: list[str], conclusion: str, mask: torch.Tensor,
                     annotated: torch.Tensor | None = None, **answer: Any) -> TaskParts:
        """Parts of a mask sample: the conclusion (and the bare target) end with the format's mask
        answer (``<seg>``, or the mask's code).

        Args:
            mask: ``bool [T, H, W]`` the target.
            annotated: ``bool [T]`` its annotated frames (None: every frame; :meth:`build` then
                keeps only the clip's annotated ones).
            answer: further answer fields (e.g. ``null``, ``expression``).
        """
        if annotated is None:
            annotated = torch.ones(mask.shape[0], dtype=torch.bool)
        code = self.format.mask(mask, annotated)
        return TaskParts(question, sentences, f"{conclusion} {code}", code,
                         {"mask": mask, "annotated_frames": annotated, **answer},
                         dense={"mask": mask, "annotated_frames": annotated})

    def build(self, clip: Clip, rng: random.Random, others: Sequence[Clip] = ()) -> TaskSample:
        """:meth:`Task.build`, with ``annotated_frames`` limited to the clip's annotated frames
        (:func:`annotated_segments`; all of them for AVSynth clips)."""
        sample = super().build(clip, rng, others)
        annotated = sample.dense["annotated_frames"] & annotated_segments(clip)
        sample.dense["annotated_frames"] = annotated
        if isinstance(sample.answer, dict):
            sample.answer["annotated_frames"] = annotated
        return sample

    def dense_losses(self, outputs: dict[str, Dense], targets: dict[str, Dense]) -> dict[str, torch.Tensor]:
        """``{"bce", "dice"}`` of the first ``<seg>`` mask of every sample against its target, over
        its annotated frames (:func:`annotated_mask_losses`)."""
        if "mask_logits" not in outputs or "mask" not in targets:
            return {}
        logits, target = first_per_row(outputs["mask_logits"], targets["mask"])
        if logits.shape[0] == 0:
            return {}
        annotated = None
        if "annotated_frames" in targets:
            annotated = first_per_row(outputs["mask_logits"], targets["annotated_frames"])[1]
        return annotated_mask_losses(logits, target, annotated)

    def parse(self, text: Any) -> Any:
        """The text itself (the mask comes from the head; the text only carries ``<seg>``); with a
        format that writes masks as text, ``{"mask": float [T, H, W]}`` decoded from it (None if the
        code is missing or malformed)."""
        if not self.format.dense_masks:
            mask = self.format.parse_mask(text)
            return None if mask is None else {"mask": mask}
        return text if isinstance(text, str) else None

    def predict(self, text: str, outputs: dict[str, torch.Tensor]) -> dict | None:
        """``{"mask": probabilities [T, H, W]}`` from the first emitted ``<seg>``; None when none was
        emitted. A format that writes masks as text: the decoded code (:meth:`parse`)."""
        if not self.format.dense_masks:
            return self.parse(text)
        logits = outputs.get("mask_logits")
        if logits is None or logits.shape[0] == 0:
            return None
        return {"mask": torch.sigmoid(logits[0].float())}

    def metrics(self) -> MetricCollection:
        """{"j", "f", "parse_failure_rate"}."""
        return self._collection({"j": MaskJ(), "f": MaskF(), "parse_failure_rate": ParseFailureRate()})

    def answer_to_pred(self, answer: dict) -> dict:
        """The exact prediction: the target mask as a 0/1 probability map."""
        return {"mask": answer["mask"].float()}

    def constant_candidates(self, answers: Sequence[dict]) -> list[dict]:
        """See :func:`mask_candidates` (the best constant mask, from the annotated frames)."""
        return mask_candidates([a["mask"] for a in answers], [a.get("annotated_frames") for a in answers])

    def render(self, frames: torch.Tensor, media: Sequence[MediaRef], answer: Any, prediction: Any) -> Any:
        """Frames with the target (green) and predicted (red) masks."""
        predicted = prediction.get("mask") if isinstance(prediction, dict) else None
        return mask_panel(frames, answer["mask"], predicted)
