"""``arig``: audio-referred image grounding: the box of the sounding object in one frame."""

from __future__ import annotations

import random
from typing import Any, Sequence

import torch
from torchmetrics import MetricCollection

from avmt.data.sample import Clip, MediaRef, SampleError
from avmt.plots import box_panel
from avmt.tasks import register_task
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.formats import AnswerFormat, TaggedText
from avmt.tasks.metrics import ParseFailureRate
from avmt.tasks.reasoning import object_noun
from avmt.tasks.scene import av_object
from avmt.tasks.spatial_metrics import BoxAUC, BoxCIoU
from avmt.tasks.text import extract_tag

def parse_box(text: str | None, answer_format: AnswerFormat | None = None) -> list[int] | None:
    """``"310,520,590,880"`` -> ``[310, 520, 590, 880]`` (or the ``answer_format``'s box); None unless
    4 integers in 0..1000."""
    return (answer_format or TaggedText()).parse_box(text)


def check_box(box: Any, where: str) -> list[int]:
    """``box`` as 4 ints ``x1 < x2, y1 < y2`` inside the frame (0..1000); SampleError naming ``where`` otherwise."""
    if not (isinstance(box, (list, tuple)) and len(box) == 4 and all(isinstance(v, int) for v in box)):
        raise SampleError(f"{where}: box {box!r} is not 4 integers")
    x1, y1, x2, y2 = box
    if not (0 <= x1 < x2 <= 1000 and 0 <= y1 < y2 <= 1000):
        raise SampleError(f"{where}: box {box!r} is outside the frame or empty (coordinates are 0..1000, x1<x2, y1<y2)")
    return list(box)


@register_task
class ARIGTask(Task):
    """Give the box of the object that makes the sound, in one frame (the image) and the clip's audio.

    The image is the frame of a segment inside the audio-visual event (chosen with the rng), so
    exactly one object is seen and heard there. Target: ``<box> x1,y1,x2,y2 </box>`` (integers
    normalized to 0..1000). Answer: ``{"box": [x1, y1, x2, y2], "segment": t}``. Metrics: cIoU
    (fraction with IoU >= 0.5), the AUC of the success rate over IoU thresholds 0..1, the parse
    failure rate; the trivial baseline is the centre box (and the mean box).
    """

    name = "arig"
    task_id = 6
    inputs = ("<image>", "<audio>")
    prompts = (
        "Where is the object that makes the sound in this frame? Give its box.",
        "Locate the sounding object in the image with a bounding box.",
        "Which region of the frame does the sound come from? Answer with a box.",
        "Draw a box around the object that is heard in this frame.",
    )
    phrases = ("The sounding object is a {noun}.", "So its box is {box}.", "<box> {x1},{y1},{x2},{y2} </box>")

    def _compose_clip(self, clip: Clip, rng: random.Random) -> TaskParts:
        scene = clip.scene
        source = av_object(scene)
        start, end = scene["av_event"]["range"]
        boxes = source.get("boxes") or []
        segments = [t for t in range(start, end) if t < len(boxes) and boxes[t] is not None]
        if not segments:
            raise SampleError(f"clip {clip.key!r}: task {self.name!r}: the sounding object has no box in its event")
        segment = rng.choice(segments)
        box = check_box(boxes[segment], f"clip {clip.key!r}, task {self.name!r}, object {source['id']}, segment {segment}")
        tagged = f"<box> {self.format.box(box)} </box>"
        return TaskParts(
            question=self._question(rng),
            sentences=[f"The sounding object is a {object_noun(source)}."],
            conclusion=f"So its box is {tagged}.",
            bare=tagged,
            answer={"box": box, "segment": segment},
            media=(MediaRef("<image>", 0, segment=segment), MediaRef("<audio>")),
        )

    def parse(self, text: Any) -> dict | None:
        """``{"box": [x1, y1, x2, y2]}`` from the ``<box>`` tag; None if missing or malformed."""
        box = self.format.parse_box(extract_tag(text, "box"))
        return None if box is None else {"box": box}

    def metrics(self) -> MetricCollection:
        """{"ciou", "auc", "parse_failure_rate"}."""
        return self._collection({"ciou": BoxCIoU(), "auc": BoxAUC(), "parse_failure_rate": ParseFailureRate()})

    def answer_to_pred(self, answer: dict) -> dict:
        """The target box."""
        return {"box": list(answer["box"])}

    def constant_candidates(self, answers: Sequence[dict]) -> list[dict]:
        """The centre box of the mean target size, the mean box and the whole frame."""
        boxes = torch.tensor([a["box"] for a in answers], dtype=torch.float64)
        width, height = float((boxes[:, 2] - boxes[:, 0]).mean()), float((boxes[:, 3] - boxes[:, 1]).mean())
        centre = [round(500 - width / 2), round(500 - height / 2), round(500 + width / 2), round(500 + height / 2)]
        mean = [round(float(v)) for v in boxes.mean(0)]
        return [{"box": centre}, {"box": mean}, {"box": [0, 0, 1000, 1000]}]

    def render(self, frames: torch.Tensor, media: Sequence[MediaRef], answer: Any, prediction: Any) -> Any:
        """The image frame with the target (green) and predicted (red) boxes."""
        predicted = prediction.get("box") if isinstance(prediction, dict) else None
        return box_panel(frames[answer["segment"]], answer["box"], predicted)
