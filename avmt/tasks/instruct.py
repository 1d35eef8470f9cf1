"""``instruct``: follow a free-form instruction and answer with explicit reasoning (Crab's AV-UIE).

Real data: a clip converted by ``python -m avmt data convert avuie`` carries ``answers["instruct"]
= {"instruction", "answer", "task"}``; the sample's prompt is the instruction with its media
placeholders where the instruction puts them, and its target is the answer **as it is** (the
dataset's explicit reasoning included, with or without ``reasoning``: the reasoning is part of
the answer text and cannot be told apart from it in general).

AVSynth: the task is a mixture of the single-clip text tasks, as AV-UIE is a mixture of its
source datasets: each sample is a sample of one of :data:`SYNTHETIC_TASKS` (chosen with the rng
among those that apply to the clip), its question as the instruction and its target (with or
without reasoning) as the answer. So the task trains, and is scored, without a converted
dataset too.

Metrics score the **final answer**: the tagged spans of the text (``<answer> saxophone
</answer>``, ``<event> ... </event> <range> 0,8 </range>``: every ``<tag> ... </tag>`` pair, in
order, tag names and contents case- and whitespace-normalized), or, when the reference answer has
no tags (a caption), the whole normalized text:

* ``exact_match``: the final answers are equal;
* ``token_f1``: SQuAD-style token F1 between the final answers (tag names count as tokens, words
  and punctuation are split by :func:`avmt.tasks.text.tokenize`);
* ``parse_failure_rate``: no text, or a reference with tags and a generation without any (scored
  as the empty answer: 0 on both).

The trivial baseline is the most frequent final answer, scored through the same metrics.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from typing import Any, ClassVar, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from avmt.data.annotation import is_annotation
from avmt.data.sample import Clip, MediaRef, SampleError
from avmt.tasks import register_task
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.text import normalize_text, tokenize

__all__ = ["InstructTask", "final_answer", "final_tokens", "token_f1", "SYNTHETIC_TASKS"]

#: The tasks whose AVSynth samples the instruct task presents as instructions: single clip,
#: ``<video> <audio>`` inputs, no dense targets, a tagged answer after the reasoning.
SYNTHETIC_TASKS: tuple[str, ...] = ("action", "ave", "avqa", "avvp", "emotion")
_TAGGED_RE = re.compile(r"<\s*([A-Za-z_][A-Za-z0-9_-]*)\s*>(.*?)<\s*/\s*\1\s*>", re.IGNORECASE | re.DOTALL)
_PLACEHOLDER_RE = re.compile(r"<(?:video|audio|image)>")


def final_answer(text: Any) -> dict | None:
    """The final answer of a text: ``{"tags": [[tag, content], ...]}`` (every ``<tag> ... </tag>``
    pair in order, both lower-cased, whitespace collapsed) when it has tags, else ``{"text":
    normalized text}``; None for a non-string or blank text. Never raises."""
    if not isinstance(text, str) or not text.strip():
        return None
    try:
        spans = [[tag.lower(), normalize_text(content)] for tag, content in _TAGGED_RE.findall(text)]
    except Exception:  # never raises
        return None
    return {"tags": spans} if spans else {"text": normalize_text(text)}


def final_tokens(answer: dict | None) -> list[str]:
    """The tokens of a final answer (``<tag>`` names count as tokens); [] for None."""
    if not answer:
        return []
    if "tags" in answer:
        return [token for tag, content in answer["tags"] for token in (f"<{tag}>", *tokenize(content))]
    return tokenize(answer.get("text", ""))


def token_f1(prediction: Sequence[str], reference: Sequence[str]) -> float:
    """SQuAD token F1 of two token lists: 2PR / (P + R) over their common tokens (multiset);
    1 when both are empty, 0 when one is."""
    if not prediction or not reference:
        return float(not prediction and not reference)
    common = sum((Counter(prediction) & Counter(reference)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(prediction), common / len(reference)
    return 2 * precision * recall / (precision + recall)


def _scored(pred: dict | None, target: dict) -> tuple[dict | None, dict | None]:
    """(prediction, reference) final answers as scored: a tagged reference takes a prediction's
    tags only (a prediction without tags is the empty answer)."""
    reference = final_answer(target.get("answer") if isinstance(target, dict) else None)
    if pred is not None and reference is not None and "tags" in reference and "tags" not in pred:
        pred = None
    return pred, reference


class _InstructMetric(Metric):
    """Sum of a per-sample score over the samples; ``compute()`` = the mean (0 with no samples)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _score(self, pred: dict | None, reference: dict | None) -> float:
        raise NotImplementedError

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:
        """Score N (prediction, answer) pairs: predictions from :func:`final_answer` (None: no
        text), answers ``{"answer": str, ...}``."""
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets; they must pair up")
        for pred, target in zip(preds, targets):
            self.score += self._score(*_scored(pred, target))
            self.total += 1

    def compute(self) -> Tensor:
        """Mean score, float64 scalar."""
        if self.total == 0:
            return torch.zeros((), dtype=torch.float64, device=self.device)
        return self.score / self.total


class FinalAnswerExactMatch(_InstructMetric):
    """Fraction of samples whose final answer equals the reference's."""

    def _score(self, pred: dict | None, reference: dict | None) -> float:
        return float(pred is not None and pred == reference)


class FinalAnswerTokenF1(_InstructMetric):
    """Mean SQuAD token F1 between the final answers (:func:`token_f1`)."""

    def _score(self, pred: dict | None, reference: dict | None) -> float:
        return token_f1(final_tokens(pred), final_tokens(reference))


class FinalAnswerFailureRate(_InstructMetric):
    """Fraction of samples without a usable final answer: no text, or no tags where the reference
    has them. Lower is better."""

    higher_is_better = False

    def _score(self, pred: dict | None, reference: dict | None) -> float:
        return float(pred is None)


@register_task
class InstructTask(Task):
    """Answer a free-form instruction; the target is the answer as the dataset writes it.

    Answer: ``{"instruction": str (with its placeholders), "answer": str, "task": the source task}``
    (AV-UIE: Crab's task name; AVSynth: the avmt task the sample was made by). Prediction:
    :func:`final_answer` of the generated text. Metrics: ``exact_match`` and ``token_f1`` of the
    final answer, ``parse_failure_rate`` (see the module docstring); baseline: the most frequent
    final answer.
    """

    name = "instruct"
    task_id = 16
    needs_av_event = False  # applies() asks the tasks it draws from (AVSynth) or the annotation
    baseline_name = "most frequent answer"
    lower_is_better = frozenset({"parse_failure_rate"})
    max_baseline_candidates: ClassVar[int] = 1

    def __init__(self, reasoning: bool = True) -> None:
        super().__init__(reasoning=reasoning)
        from avmt.tasks import get_task  # the registry is complete once a task is instantiated

        self._synthetic = [get_task(name, reasoning=reasoning) for name in SYNTHETIC_TASKS]

    def applies(self, clip: Clip) -> bool:
        """A converted clip with an ``instruct`` answer, or an AVSynth clip one of
        :data:`SYNTHETIC_TASKS` applies to."""
        scene = clip.scene if isinstance(clip.scene, dict) else {}
        if is_annotation(scene):
            return super().applies(clip)
        return any(task.applies(clip) for task in self._synthetic)

    def _compose_clips(self, clip: Clip, others: list[Clip], rng: random.Random) -> TaskParts:
        """An AVSynth sample: one of the applicable :data:`SYNTHETIC_TASKS`' parts, as an instruction."""
        tasks = [task for task in self._synthetic if task.applies(clip)]
        if not tasks:
            raise SampleError(f"clip {clip.key!r}: task {self.name!r}: none of {SYNTHETIC_TASKS} applies to "
                              "the clip")
        task = rng.choice(tasks)
        task._scene(clip)
        parts = task._compose_clips(clip, [], rng)
        placeholders = " ".join(task.inputs)
        answer = " ".join([*parts.sentences, parts.conclusion])
        structured = {"instruction": f"{placeholders} {parts.question}", "answer": answer, "task": task.name}
        return TaskParts(parts.question, parts.sentences, parts.conclusion, parts.bare, structured)

    def compose_annotated(self, clip: Clip, answer: Any, rng: random.Random) -> TaskParts:
        """AV-UIE's sample (``avuie`` converter): the instruction with its placeholders in place
        (``<image>`` is the clip's first segment frame: an image sample shows its image on every
        frame), the answer as the target; an instruction without placeholders gets
        ``<video> <audio>`` in front."""
        fields = answer if isinstance(answer, dict) else {}
        instruction, text = fields.get("instruction"), fields.get("answer")
        if not all(isinstance(value, str) and value.strip() for value in (instruction, text)):
            raise SampleError(f"clip {clip.key!r}: instruct answer {answer!r} is not "
                              "{'instruction': str, 'answer': str, 'task': str} with non-empty texts")
        placeholders = _PLACEHOLDER_RE.findall(instruction)
        media = tuple(MediaRef(p, segment=0 if p == "<image>" else None) for p in placeholders) or None
        target = text.strip()
        return TaskParts(" ".join(instruction.split()), [], target, target, dict(answer), media=media,
                         inline_media=media is not None)

    def parse(self, text: Any) -> dict | None:
        """:func:`final_answer` of the text (its tags, or its normalized text); None when blank."""
        return final_answer(text)

    def answer_to_pred(self, answer: dict) -> dict | None:
        """The final answer of the reference text."""
        return final_answer(answer.get("answer"))

    def metrics(self) -> MetricCollection:
        """{"exact_match", "token_f1", "parse_failure_rate"}."""
        return self._collection({"exact_match": FinalAnswerExactMatch(), "token_f1": FinalAnswerTokenF1(),
                                 "parse_failure_rate": FinalAnswerFailureRate()})

    def constant_candidates(self, answers: Sequence[dict]) -> list[dict | None]:
        """The most frequent final answer (ties: the first in sorted JSON order)."""
        counts = Counter(json.dumps(self.answer_to_pred(a), sort_keys=True) for a in answers)
        return [json.loads(min(counts, key=lambda k: (-counts[k], k)))]

    def words(self) -> set[str]:
        """The words of the tasks the AVSynth samples come from (a converted dataset's words come
        from its manifest)."""
        out = super().words()
        for task in self._synthetic:
            out |= task.words()
        return out
