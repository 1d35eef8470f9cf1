"""``ave``: audio-visual event localization (class of the event seen and heard, and its range)."""

from __future__ import annotations

import random
from typing import Any, Sequence

from torchmetrics import MetricCollection

from avmt.data.sample import Clip, SampleError
from avmt.intervals import merge_ranges
from avmt.tasks import register_task
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.formats import AnswerFormat, TaggedText
from avmt.tasks.metrics import BACKGROUND, EventClassAccuracy, ParseFailureRate, RangeIoU, SegmentAccuracy
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import av_object, ordered_objects
from avmt.tasks.text import extract_tag, wrap_tag

def parse_range(text: str | None, answer_format: AnswerFormat | None = None) -> list[int] | None:
    """"2,7" / "2 , 7" / "2 7" -> [2, 7] (or the ``answer_format``'s range); None if malformed or end < start."""
    return (answer_format or TaggedText()).parse_range(text)


def event_tags(cls: str, rng: Sequence[int], answer_format: AnswerFormat | None = None) -> str:
    """``("Church bell", [2, 7])`` -> "<event> Church bell </event> <range> 2,7 </range>" (the target
    format; the range as ``answer_format`` writes it)."""
    return f"{wrap_tag('event', cls)} {wrap_tag('range', (answer_format or TaggedText()).range(rng[0], rng[1]))}"


@register_task
class AVETask(Task):
    """Name the event that is both audible and visible and give its ``[start, end)`` range.

    Target: ``<event> {class} </event> <range> s,e </range>``. Answer:
    ``{"class": str, "range": [s, e], "num_segments": T}``. Metric: AVE segment accuracy; the
    event class accuracy and the range IoU say which half of it (what or when) is wrong.
    """

    name = "ave"
    task_id = 2
    baseline_name = "best constant range"
    prompts = (
        "Which event is both audible and visible in this clip, and when does it happen?",
        "Find the audio-visual event: name the object that is seen and heard at the same time and give "
        "its time range.",
        "What is seen and heard at the same time in this clip, and from which second to which second?",
        "Localize the event that can be both seen and heard. Answer with its class and its time range.",
    )
    phrases = (
        "So the audible and visible event is {event}, and the time range is {range}.",
        "<event> {c} </event> <range> {s},{e} </range>",
        BACKGROUND,
    )

    def _compose(self, scene: dict, rng: random.Random) -> TaskParts:
        ev = scene["av_event"]
        cls, (s, e) = ev["class"], ev["range"]
        event, rng_text = wrap_tag("event", cls), wrap_tag("range", self.format.range(s, e))  # bare == event_tags
        sentences = [object_sentence(o) for o in ordered_objects(scene)]
        av_object(scene)  # validates the reference
        return TaskParts(
            question=self._question(rng),
            sentences=sentences,
            conclusion=f"So the audible and visible event is {event}, and the time range is {rng_text}.",
            bare=f"{event} {rng_text}",
            answer={"class": cls, "range": [int(s), int(e)], "num_segments": int(scene["num_segments"])},
        )

    def compose_annotated(self, clip: Clip, answer: Any, rng: random.Random) -> TaskParts:
        """AVE's own annotation: ``{"class": str, "range": [s, e]}`` in segments (``ave`` converter)."""
        try:
            cls, (s, e) = str(answer["class"]), (int(v) for v in answer["range"])
        except (KeyError, TypeError, ValueError):
            raise SampleError(f"clip {clip.key!r}: ave answer {answer!r} is not {{'class': str, 'range': [s, e]}}") from None
        if not 0 <= s < e <= clip.num_segments:
            raise SampleError(f"clip {clip.key!r}: ave range [{s}, {e}] is not within the {clip.num_segments} segments")
        event, rng_text = wrap_tag("event", cls), wrap_tag("range", self.format.range(s, e))
        return TaskParts(
            question=self._question(rng),
            sentences=[],
            conclusion=f"So the audible and visible event is {event}, and the time range is {rng_text}.",
            bare=f"{event} {rng_text}",
            answer={"class": cls, "range": [s, e], "num_segments": clip.num_segments},
        )

    def parse(self, text: Any) -> dict | None:
        """``{"class": str, "range": [s, e]}`` from the ``<event>`` and ``<range>`` tags; None if
        either is missing or the range is malformed. The class is everything inside the last
        ``<event>`` pair as written (case and punctuation kept, whitespace collapsed), so real
        names such as "Male speech, man speaking" or "Frying (food)" come back whole."""
        try:
            cls = extract_tag(text, "event", keep_case=True)
            rng = self.format.parse_range(extract_tag(text, "range"))
            if cls is None or rng is None:
                return None
            return {"class": cls, "range": rng}
        except Exception:  # never raises
            return None

    def metrics(self) -> MetricCollection:
        """{"segment_accuracy", "class_accuracy", "range_iou", "parse_failure_rate"}."""
        return self._collection(
            {
                "segment_accuracy": SegmentAccuracy(),
                "class_accuracy": EventClassAccuracy(),
                "range_iou": RangeIoU(),
                "parse_failure_rate": ParseFailureRate(),
            }
        )

    def answer_to_pred(self, answer: dict) -> dict:
        """Drop ``num_segments``: the exact prediction for ``answer``."""
        return {"class": answer["class"], "range": list(answer["range"])}

    def constant_candidates(self, answers: Sequence[dict]) -> list[dict]:
        """Exhaustive: every class seen in ``answers`` x every range on the grid, plus background."""
        num_segments = max(int(a["num_segments"]) for a in answers)
        classes = sorted({a["class"] for a in answers if a.get("class") and merge_ranges([a["range"]])})
        cands: list[dict] = [{"class": BACKGROUND, "range": [0, 0]}]
        for cls in classes:
            for s in range(num_segments):
                for e in range(s + 1, num_segments + 1):
                    cands.append({"class": cls, "range": [s, e]})
        return cands
