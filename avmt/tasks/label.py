"""Recognition tasks answered with one label: ``<answer> {label} </answer>``."""

from __future__ import annotations

import random
from typing import Any, ClassVar, Sequence

from torchmetrics import MetricCollection

from avmt.data.sample import SampleError
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.metrics import LabelAccuracy, LabelMacroF1, ParseFailureRate
from avmt.tasks.text import extract_tag, template_words, wrap_tag

__all__ = ["LabelTask"]


class LabelTask(Task):
    """A recognition task answered with one label: ``<answer> {label} </answer>``.

    Subclasses set ``labels`` (the label vocabulary), ``conclusion_template`` (with an
    ``{answer}`` slot for the tagged answer) and implement ``label(scene)`` and
    ``sentences(scene)``. Answer: the label string. Metrics: accuracy, macro-F1, parse failures.
    """

    labels: ClassVar[tuple[str, ...]] = ()
    baseline_name = "majority class"
    conclusion_template: ClassVar[str] = "So the answer is {answer}."

    def label(self, scene: dict) -> str:
        """The ground-truth label of the scene."""
        raise NotImplementedError

    def sentences(self, scene: dict) -> list[str]:
        """Reasoning sentences for the scene."""
        raise NotImplementedError

    def _compose(self, scene: dict, rng: random.Random) -> TaskParts:
        label = self.label(scene)
        if label not in self.labels:
            raise SampleError(f"task {self.name!r}: label {label!r} of scene {scene.get('clip_id')!r} "
                              f"is not one of {self.labels}")
        tagged = wrap_tag("answer", label)
        return TaskParts(self._question(rng), self.sentences(scene),
                         self.conclusion_template.format(answer=tagged), tagged, label)

    def parse(self, text: Any) -> str | None:
        """The content of the ``<answer>`` tag as written, whitespace collapsed (e.g. "moving left",
        "Frying_(food)"), or None. Case is kept; the metrics compare labels case-insensitively."""
        return extract_tag(text, "answer", keep_case=True)  # never raises

    def metrics(self) -> MetricCollection:
        """{"accuracy", "macro_f1", "parse_failure_rate"}."""
        return self._collection({
            "accuracy": LabelAccuracy(self.labels),
            "macro_f1": LabelMacroF1(self.labels),
            "parse_failure_rate": ParseFailureRate(),
        })

    def constant_candidates(self, answers: Sequence[Any]) -> list[str]:
        """Every distinct label in ``answers``."""
        return sorted(set(answers))

    def words(self) -> set[str]:
        """Base words plus the conclusion and the ``<answer>`` tags."""
        return super().words() | template_words((self.conclusion_template, "<answer> {a} </answer>"))
