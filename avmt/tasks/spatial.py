"""What the spatial tasks share: per-frame masks of what sounds, the ``<seg>`` answer, mask losses.

A mask task answers with text that ends in ``<seg>``; the model's mask head reads the hidden
state that predicts that token and decodes one mask per segment frame (``mask_logits
[T, H, W]``). The task's dense target is the matching ``mask`` (``bool [T, H, W]``); its losses
are BCE and Dice; its prediction is the sigmoid of the logits of the first ``<seg>`` the model
emitted, and no ``<seg>`` is a failure (scored as the empty mask).
"""

from __future__ import annotations

from typing import Any, ClassVar, Iterable, Sequence

import torch
from torchmetrics import MetricCollection

from avmt.data.sample import Clip, Dense, DenseSpec, MediaRef
from avmt.intervals import ranges_to_mask
from avmt.losses import mask_bce, mask_dice
from avmt.plots import mask_panel
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.metrics import ParseFailureRate
from avmt.tasks.spatial_metrics import MaskF, MaskJ

__all__ = ["SEG", "MASK", "MaskTask", "sounding_mask", "object_mask", "first_per_row", "mask_candidates"]

#: The special token whose hidden state the mask head reads.
SEG = "<seg>"
#: The per-frame binary mask target of the mask tasks.
MASK = DenseSpec("mask", ("T", "H", "W"), torch.bool, doc="per segment frame: the pixels of the target object(s)")


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


def mask_candidates(masks: Sequence[torch.Tensor]) -> list[dict]:
    """Constant mask predictions a trivial baseline tries: empty, full, the per-pixel foreground
    frequency of ``masks`` as a probability map, and that map thresholded at 0.1, 0.25, 0.5.

    Args:
        masks: bool ``[T, H, W]`` target masks of one shape.
    """
    shapes = {tuple(m.shape) for m in masks}
    if len(shapes) != 1:
        return [None]  # no constant fits masks of several sizes: the empty prediction stands in
    frequency = torch.stack([m.float() for m in masks]).mean(0)
    return [{"mask": frequency.new_zeros(frequency.shape)}, {"mask": frequency.new_ones(frequency.shape)},
            {"mask": frequency}, *({"mask": (frequency >= q).float()} for q in (0.1, 0.25, 0.5))]


class MaskTask(Task):
    """Base of the tasks answered with a ``<seg>`` token and a per-frame mask.

    Subclasses implement ``_compose_clip`` returning parts whose ``dense["mask"]`` is the target
    mask and whose ``answer`` holds it under ``"mask"``. Metrics: J (mean IoU over frames), F
    (AVSBench F-measure, β² = 0.3) and the failure rate (no ``<seg>`` emitted).
    """

    outputs: ClassVar[tuple[str, ...]] = ("mask_logits",)
    dense_targets: ClassVar[tuple[DenseSpec, ...]] = (MASK,)
    max_baseline_candidates: ClassVar[int] = 8

    def _mask_sample(self, question: str, sentences: list[str], conclusion: str, mask: torch.Tensor,
                     **answer: Any) -> TaskParts:
        """Parts of a mask sample: the conclusion (and the bare target) end with ``<seg>``."""
        return TaskParts(question, sentences, f"{conclusion} {SEG}", SEG, {"mask": mask, **answer},
                         dense={"mask": mask})

    def dense_losses(self, outputs: dict[str, Dense], targets: dict[str, Dense]) -> dict[str, torch.Tensor]:
        """``{"bce", "dice"}`` of the first ``<seg>`` mask of every sample against its target."""
        if "mask_logits" not in outputs or "mask" not in targets:
            return {}
        logits, target = first_per_row(outputs["mask_logits"], targets["mask"])
        if logits.shape[0] == 0:
            return {}
        return {"bce": mask_bce(logits, target), "dice": mask_dice(logits, target)}

    def parse(self, text: Any) -> str | None:
        """The text itself (the mask comes from the head; the text only carries ``<seg>``)."""
        return text if isinstance(text, str) else None

    def predict(self, text: str, outputs: dict[str, torch.Tensor]) -> dict | None:
        """``{"mask": probabilities [T, H, W]}`` from the first emitted ``<seg>``; None when none was emitted."""
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
        """See :func:`mask_candidates` (the best constant mask)."""
        return mask_candidates([a["mask"] for a in answers])

    def render(self, frames: torch.Tensor, media: Sequence[MediaRef], answer: Any, prediction: Any) -> Any:
        """Frames with the target (green) and predicted (red) masks."""
        predicted = prediction.get("mask") if isinstance(prediction, dict) else None
        return mask_panel(frames, answer["mask"], predicted)
