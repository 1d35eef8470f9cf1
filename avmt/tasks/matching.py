"""Cross-modal matching: ``a2v`` (which video shows what is heard) and ``v2a`` (which audio
belongs to what is seen), the first tasks whose samples look at several clips.

A sample shows the query (the anchor clip's audio, or its video) and K = ``num_clips``
candidates: the other modality of the anchor clip and of K - 1 other clips, in a random order,
each placeholder inline after its label::

    <audio> Which video shows what is heard? Video 1: <video> Video 2: <video> Video 3: <video>
    Video 4: <video>

Target: ``<answer> i </answer>``, the 1-based position of the anchor's candidate. The other clips
(:meth:`MatchingTask.select_others`) share no object class, seen or heard, with the anchor scene,
so exactly one candidate fits. Answer ``{"index": i, "num_candidates": K}``; metrics accuracy and
parse failures; the trivial baseline is chance (1/K).
"""

from __future__ import annotations

import random
import re
from typing import Any, ClassVar, Sequence

import torch
from torchmetrics import Metric, MetricCollection

from avmt.data.sample import Clip, MediaRef, SampleError
from avmt.data.vocab import NUMBER_WORDS
from avmt.errors import UserError
from avmt.tasks import register_task
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.metrics import ParseFailureRate, _check_lengths, _ratio
from avmt.tasks.scene import is_sounding, is_visible, ordered_objects, scene_objects
from avmt.tasks.text import extract_tag

__all__ = ["MatchingTask", "A2VTask", "V2ATask", "CandidateAccuracy", "scene_classes", "av_classes",
           "matching_phrases"]

_INDEX_RE = re.compile(r"^(?:(?:video|audio|candidate|number|option)\s*)?(\d+|[a-z]+)\s*[.!]?$")
_WORD_INDEX = {word: i for i, word in enumerate(NUMBER_WORDS[1:10], start=1)}


def scene_classes(scene: dict) -> set[str]:
    """Classes of the scene's objects that are seen or heard at some time."""
    return {o.get("class") for o in scene_objects(scene) if is_visible(o) or is_sounding(o)} - {None}


def av_classes(scene: dict) -> list[str]:
    """Distinct classes of the objects that are both seen and heard (not necessarily at the same
    time), in reasoning order: what ties the scene's audio to its video."""
    out: list[str] = []
    for obj in ordered_objects(scene):
        if is_visible(obj) and is_sounding(obj) and obj["class"] not in out:
            out.append(obj["class"])
    return out


def matching_phrases(label: str, candidate: str, query_sentences: Sequence[str],
                     match_sentence: str) -> tuple[str, ...]:
    """The fixed fragments a matching task emits besides its prompts: the candidate labels, the
    reasoning templates, the noun list and the conclusion with the answer tags."""
    return (f"{label} {{i}}: {candidate}", *query_sentences, match_sentence, "A {noun}", "a {noun}", ", ",
            " and ", MatchingTask.conclusion_template, "<answer> {a} </answer>")


def _nouns(classes: Sequence[str]) -> str:
    """``["violin"]`` -> "a violin"; ``["violin", "flute", "dog"]`` -> "a violin, a flute and a dog"."""
    parts = [f"a {c}" for c in classes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


class CandidateAccuracy(Metric):
    """Fraction of samples whose chosen candidate is the right one (float64 scalar in [0, 1]).

    Predictions: 1-based candidate indices (int), or None (a parse failure: wrong); any other
    index is simply wrong. Targets: ``{"index": i, "num_candidates": K}``. States are integer
    sums (``dist_reduce_fx="sum"``), so the result is exact under DDP; 0 with no samples.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[int | None], targets: Sequence[dict]) -> None:
        """Count right choices over N (prediction, answer) pairs."""
        _check_lengths(preds, targets)
        self.correct += sum(isinstance(p, int) and not isinstance(p, bool) and p == int(t["index"])
                            for p, t in zip(preds, targets))
        self.total += len(targets)

    def compute(self) -> torch.Tensor:
        """Right choices / samples."""
        return _ratio(self.correct, self.total)


class MatchingTask(Task):
    """Pick, among K candidates of one modality, the one that belongs to the query of the other.

    Subclasses set ``query`` / ``candidate`` (placeholders), ``label`` (the candidates' name in
    the prompt, "Video" / "Audio"), ``prompts`` (with a ``{candidates}`` slot), the two
    reasoning templates (``query_sentences``: what the query holds, one class / several;
    ``match_sentence``: what the right candidate holds) and ``phrases`` (:func:`matching_phrases`).
    """

    num_clips = 4
    needs_av_event = False
    baseline_name = "chance"
    query: ClassVar[str] = ""
    candidate: ClassVar[str] = ""
    label: ClassVar[str] = ""
    query_sentences: ClassVar[tuple[str, str]] = ("", "")
    match_sentence: ClassVar[str] = ""
    conclusion_template: ClassVar[str] = "So the answer is {answer}."

    # ---- which clips -----------------------------------------------------------------------

    def applies(self, clip: Clip) -> bool:
        """The anchor scene has an object that is both seen and heard."""
        scene = clip.scene if isinstance(clip.scene, dict) else {}
        try:
            return bool(av_classes(scene))
        except (KeyError, TypeError, AttributeError):
            return False

    def _fits(self, anchor: set[str], other: Clip) -> bool:
        if not isinstance(other.scene, dict):
            return False
        try:
            return not scene_classes(other.scene) & anchor
        except (KeyError, TypeError, AttributeError):
            return False

    def select_others(self, clip: Clip, recent: Sequence[Clip], rng: random.Random) -> list[Clip] | None:
        """K - 1 distinct clips of ``recent`` (not the anchor) that share no object class, seen or
        heard, with the anchor scene, chosen with ``rng``; None when fewer than K - 1 fit."""
        anchor = scene_classes(self._scene(clip))
        pool: list[Clip] = []
        seen = {clip.key}
        for other in recent:
            if other.key in seen:
                continue
            seen.add(other.key)
            if self._fits(anchor, other):
                pool.append(other)
        need = self.num_clips - 1
        if len(pool) < need:
            return None
        return rng.sample(pool, need)

    # ---- building --------------------------------------------------------------------------

    def _compose_clips(self, clip: Clip, others: list[Clip], rng: random.Random) -> TaskParts:
        k = self.num_clips
        if len(others) != k - 1:
            raise ValueError(f"task {self.name!r}: a sample needs {k - 1} other clips "
                             f"(select_others), got {len(others)}")
        keys = [clip.key, *(o.key for o in others)]
        if len(set(keys)) != k:
            raise ValueError(f"task {self.name!r}: the anchor and the other clips must be {k} distinct "
                             f"clips, got keys {keys}")
        anchor_classes = scene_classes(clip.scene)
        shared = [o.key for o in others if not self._fits(anchor_classes, o)]
        if shared:
            raise ValueError(f"task {self.name!r}: clips {shared} share an object class with clip "
                             f"{clip.key!r} (the answer would be ambiguous); choose them with select_others")
        classes = av_classes(clip.scene)
        if not classes:
            raise SampleError(f"clip {clip.key!r}: task {self.name!r} needs an object that is both seen and "
                              "heard, and the scene has none")
        order = list(range(k))  # position p shows the candidate of clip order[p] (0 = the anchor)
        rng.shuffle(order)
        index = order.index(0) + 1
        candidates = " ".join(f"{self.label} {p + 1}: {self.candidate}" for p in range(k))
        question = self._question(rng, candidates=candidates)
        media = (MediaRef(self.query, 0), *(MediaRef(self.candidate, j) for j in order))
        nouns = _nouns(classes)
        sentences = [self.query_sentences[len(classes) > 1].format(nouns=nouns[0].upper() + nouns[1:]),
                     self.match_sentence.format(i=index, nouns=nouns)]
        tagged = f"<answer> {index} </answer>"
        return TaskParts(question, sentences, self.conclusion_template.format(answer=tagged), tagged,
                         {"index": index, "num_candidates": k}, media=media, inline_media=True)

    # ---- parsing and scoring ---------------------------------------------------------------

    def parse(self, text: Any) -> int | None:
        """The 1-based candidate index in the ``<answer>`` tag: digits, or a number word one..nine
        (an optional "video"/"audio" before it is tolerated); None otherwise. Never raises."""
        content = extract_tag(text, "answer")
        if content is None:
            return None
        match = _INDEX_RE.match(content)
        if match is None:
            return None
        token = match.group(1)
        value = int(token) if token.isdigit() else _WORD_INDEX.get(token)
        return value if value is not None and value >= 1 else None

    def answer_to_pred(self, answer: Any) -> int:
        """The right index, ``answer["index"]``."""
        return int(answer["index"])

    def metrics(self) -> MetricCollection:
        """{"accuracy", "parse_failure_rate"}."""
        return self._collection({
            "accuracy": CandidateAccuracy(),
            "parse_failure_rate": ParseFailureRate(),
        })

    def trivial_baseline(
        self, answers: Sequence[Any], train_answers: Sequence[Any] | None = None
    ) -> dict[str, float]:
        """Chance: the mean, over the K constant predictions 1..K, of each one's scores through
        :meth:`metrics` (exactly 1/K accuracy, 0 parse failures).

        Every constant scores the same N answers and both metrics are ratios of sums over samples,
        so the mean of the K scores is the score of the K constants' counts pooled in one
        collection, which is what is computed (one exact division, no float averaging error).
        """
        answers = list(answers)
        if not answers:
            raise UserError(f"task {self.name!r}: trivial_baseline needs at least one answer")
        collection = self.metrics()
        for constant in range(1, self.num_clips + 1):
            collection.update([constant] * len(answers), answers)
        return {key: float(value) for key, value in collection.compute().items()}


@register_task
class A2VTask(MatchingTask):
    """Audio to video: which of K silent videos shows what the anchor clip's audio holds.

    Prompt: ``<audio> ... Video 1: <video> ... Video 4: <video>``; target ``<answer> i </answer>``.
    """

    name = "a2v"
    task_id = 13
    inputs = ("<audio>", "<video>")
    query, candidate, label = "<audio>", "<video>", "Video"
    prompts = (
        "<audio> Which video shows what is heard? {candidates}",
        "<audio> Listen to the sound. Which of the videos shows where it comes from? {candidates}",
        "<audio> {candidates} Which of these videos matches the sound?",
        "<audio> Find the video that belongs to this sound. {candidates} Answer with the number of the "
        "video.",
    )
    query_sentences = ("{nouns} is heard.", "{nouns} are heard.")
    match_sentence = "Video {i} shows {nouns}."
    phrases = matching_phrases(label, candidate, query_sentences, match_sentence)


@register_task
class V2ATask(MatchingTask):
    """Video to audio: which of K audio tracks belongs to what the anchor clip's silent video shows.

    Prompt: ``<video> ... Audio 1: <audio> ... Audio 4: <audio>``; target ``<answer> i </answer>``.
    """

    name = "v2a"
    task_id = 14
    inputs = ("<video>", "<audio>")
    query, candidate, label = "<video>", "<audio>", "Audio"
    prompts = (
        "<video> Which audio matches what is seen? {candidates}",
        "<video> Watch the video. Which of the sounds belongs to it? {candidates}",
        "<video> {candidates} Which of these audio tracks is the sound of the video?",
        "<video> Find the audio that belongs to this video. {candidates} Answer with the number of the "
        "audio.",
    )
    query_sentences = ("{nouns} is seen.", "{nouns} are seen.")
    match_sentence = "Audio {i} sounds like {nouns}."
    phrases = matching_phrases(label, candidate, query_sentences, match_sentence)
