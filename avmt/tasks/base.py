"""The task base class and the helpers every task shares.

A task turns a clip (whose ``scene`` is the AVSynth scene graph, schema version 1) into an
instruction ``prompt`` and an answer ``target``, parses generated text back into a structured
prediction, and scores predictions with a torchmetrics ``MetricCollection``.

Shared here, so no task re-implements them:

- tag parsing (:func:`extract_tag`, :func:`normalize_text`) and the offline tokenizer rule
  (:func:`tokenize`, :func:`text_words`);
- scene-graph reading (interval arithmetic, object lookup, ordering);
- reasoning sentences (:func:`object_sentence`, :func:`span_phrase`, :func:`object_noun`);
- target composition (reasoning sentences + a concluding tagged sentence, or the bare tagged
  answer when ``reasoning=False``), the majority baseline and the vocabulary (``words()``).
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Iterable, Sequence

import torch
from torchmetrics import MetricCollection

from avmt.data.vocab import CLASSES, COLORS, MOODS, MOTIONS, NUMBER_WORDS, POSITIONS, ROWS, SHAPES

__all__ = [
    "Task",
    "LabelTask",
    "TaskSample",
    "TaskParts",
    "PROMPT_PREFIX",
    "extract_tag",
    "normalize_text",
    "tokenize",
    "text_words",
    "template_words",
    "merge_ranges",
    "intersect_ranges",
    "ranges_total",
    "ranges_onset",
    "ranges_to_mask",
    "mask_to_ranges",
    "span_phrase",
    "number_word",
    "object_noun",
    "object_sentence",
    "scene_objects",
    "ordered_objects",
    "sort_objects",
    "av_object",
    "is_visible",
    "is_sounding",
    "has_overlap",
    "unique_class_objects",
    "SHARED_PHRASES",
]

#: Every prompt starts with the two placeholders, each exactly once.
PROMPT_PREFIX = "<video> <audio> "

# --------------------------------------------------------------------------------------------
# Text: tags, normalization, the offline tokenizer rule
# --------------------------------------------------------------------------------------------

_TOKEN_RE = re.compile(r"</?[A-Za-z_]+>|[A-Za-z]+|\d|[^\sA-Za-z\d]")
_SLOT_RE = re.compile(r"\{[^{}]*\}")
_TAG_RES: dict[str, re.Pattern[str]] = {}


def normalize_text(text: str) -> str:
    """Lower-case ``text`` and collapse every run of whitespace to one space (stripped ends)."""
    return " ".join(str(text).split()).lower()


def extract_tag(text: Any, tag: str) -> str | None:
    """Content of the last ``<tag> ... </tag>`` pair in ``text``, normalized; None if absent.

    Tag matching is case-insensitive and tolerates spaces inside the angle brackets
    (``< ANSWER >``). The content is lower-cased with whitespace collapsed. Returns None when
    ``text`` is not a string, when either tag is missing, or when the content is empty.
    Never raises.
    """
    if not isinstance(text, str):
        return None
    pattern = _TAG_RES.get(tag)
    if pattern is None:
        t = re.escape(tag)
        pattern = re.compile(rf"<\s*{t}\s*>(.*?)<\s*/\s*{t}\s*>", re.IGNORECASE | re.DOTALL)
        _TAG_RES[tag] = pattern
    matches = pattern.findall(text)
    if not matches:
        return None
    content = normalize_text(matches[-1])
    return content or None


def tokenize(text: str) -> list[str]:
    """Split ``text`` by the offline tokenizer's rule.

    Whitespace separates tokens; ``<tag>`` / ``</tag>`` are single tokens; every digit and every
    punctuation character is its own token; runs of letters are words.
    """
    return _TOKEN_RE.findall(text)


def text_words(text: str) -> set[str]:
    """The tokens of ``text`` that a vocabulary must list: words and ``<tag>`` tokens."""
    return {t for t in tokenize(text) if t[0].isalpha() or (t[0] == "<" and len(t) > 1)}


def template_words(templates: Iterable[str]) -> set[str]:
    """Words of template strings with their ``{slot}`` fields removed (slots add their own)."""
    out: set[str] = set()
    for template in templates:
        out |= text_words(_SLOT_RE.sub(" ", template))
    return out


# --------------------------------------------------------------------------------------------
# Scene graph: intervals and objects
# --------------------------------------------------------------------------------------------


def merge_ranges(ranges: Iterable[Sequence[int]]) -> list[list[int]]:
    """Sort ``[start, end)`` ranges and merge overlapping or touching ones; empty ones dropped."""
    out: list[list[int]] = []
    for s, e in sorted((int(r[0]), int(r[1])) for r in ranges):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def intersect_ranges(a: Iterable[Sequence[int]], b: Iterable[Sequence[int]]) -> list[list[int]]:
    """Intersection of two sets of ``[start, end)`` ranges, as merged sorted ranges."""
    out = []
    for s1, e1 in merge_ranges(a):
        for s2, e2 in merge_ranges(b):
            s, e = max(s1, s2), min(e1, e2)
            if s < e:
                out.append([s, e])
    return merge_ranges(out)


def ranges_total(ranges: Iterable[Sequence[int]]) -> int:
    """Number of segments covered by the (merged) ranges."""
    return sum(e - s for s, e in merge_ranges(ranges))


def ranges_onset(ranges: Iterable[Sequence[int]]) -> int | None:
    """First covered segment, or None for no ranges."""
    merged = merge_ranges(ranges)
    return merged[0][0] if merged else None


def ranges_to_mask(ranges: Iterable[Sequence[int]], num_segments: int) -> list[bool]:
    """Boolean mask of length ``num_segments``; ranges are clipped to ``[0, num_segments)``."""
    mask = [False] * num_segments
    for s, e in ranges:
        for t in range(max(0, int(s)), min(num_segments, int(e))):
            mask[t] = True
    return mask


def mask_to_ranges(mask: Sequence[bool]) -> list[list[int]]:
    """Contiguous runs of True in ``mask`` as ``[start, end)`` ranges."""
    out: list[list[int]] = []
    start = None
    for t, on in enumerate(list(mask) + [False]):
        if on and start is None:
            start = t
        elif not on and start is not None:
            out.append([start, t])
            start = None
    return out


def scene_objects(scene: dict) -> list[dict]:
    """The scene's objects (list of object dicts, schema v1)."""
    return list(scene.get("objects", []))


def is_visible(obj: dict) -> bool:
    """True if the object is visible in at least one segment."""
    return ranges_total(obj.get("visible", [])) > 0


def is_sounding(obj: dict) -> bool:
    """True if the object sounds in at least one segment."""
    return ranges_total(obj.get("sounding", [])) > 0


def has_overlap(obj: dict) -> bool:
    """True if the object is seen and heard at the same time in at least one segment."""
    return bool(intersect_ranges(obj.get("visible", []), obj.get("sounding", [])))


def _first_onset(obj: dict) -> int:
    onsets = [ranges_onset(obj.get("visible", [])), ranges_onset(obj.get("sounding", []))]
    onsets = [o for o in onsets if o is not None]
    return min(onsets) if onsets else 10**9


def sort_objects(objs: Iterable[dict]) -> list[dict]:
    """Objects sorted by first onset (seen or heard), ties by id, duplicates (same dict) dropped:
    the order reasoning sentences use."""
    unique = list({id(o): o for o in objs}.values())
    return sorted(unique, key=lambda o: (_first_onset(o), int(o.get("id", 0))))


def ordered_objects(scene: dict) -> list[dict]:
    """The scene's objects in reasoning order (see :func:`sort_objects`)."""
    return sort_objects(scene_objects(scene))


def av_object(scene: dict) -> dict:
    """The object of the scene's audio-visual event (``scene["av_event"]["object"]``)."""
    oid = scene["av_event"]["object"]
    for obj in scene_objects(scene):
        if obj.get("id") == oid:
            return obj
    raise ValueError(f"scene {scene.get('clip_id')!r}: av_event.object={oid} is not an object id")


def unique_class_objects(scene: dict) -> list[dict]:
    """Objects whose class occurs once in the scene (so the class name alone refers to them)."""
    counts = Counter(o["class"] for o in scene_objects(scene))
    return [o for o in ordered_objects(scene) if counts[o["class"]] == 1]


# --------------------------------------------------------------------------------------------
# Reasoning sentences
# --------------------------------------------------------------------------------------------

_POSITION_PHRASES = {"left": "on the left", "center": "in the center", "right": "on the right"}

#: Fixed fragments the shared sentence helpers can emit (their words go into every task's words()).
SHARED_PHRASES: tuple[str, ...] = (
    "from second {s} to second {e}",
    ", ",
    " and ",
    "on the left",
    "in the center",
    "on the right",
    "A {noun} is seen and heard {span}.",
    "A {noun} is seen {span} and heard {span}.",
    "A {noun} is heard {span} but not seen.",
    "A {noun} is seen {span} but not heard.",
    "A {noun} is neither seen nor heard.",
    "So the answer is {answer}.",
)


def span_phrase(ranges: Iterable[Sequence[int]]) -> str:
    """``[[2, 7]]`` -> "from second 2 to second 7"; several ranges joined with ", " and " and "."""
    parts = [f"from second {s} to second {e}" for s, e in merge_ranges(ranges)]
    if not parts:
        return ""
    if len(parts) == 1:
        return parts[0]
    return ", ".join(parts[:-1]) + " and " + parts[-1]


def number_word(n: int) -> str:
    """``3`` -> "three" (vocab NUMBER_WORDS); numbers beyond the vocabulary fall back to digits."""
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def object_noun(obj: dict, visual: bool | None = None) -> str:
    """Noun phrase for an object: "red violin on the left" when seen, "violin" when only heard.

    ``visual`` forces (True) or suppresses (False) colour and position; None uses whether the
    object is ever visible.
    """
    if visual is None:
        visual = is_visible(obj)
    if not visual:
        return obj["class"]
    where = _POSITION_PHRASES.get(obj.get("position", ""), "")
    return " ".join(p for p in (obj.get("color", ""), obj["class"], where) if p)


def object_sentence(obj: dict) -> str:
    """One sentence saying when the object is seen and when it is heard.

    Example: "A red violin on the left is seen and heard from second 2 to second 7."
    """
    vis = merge_ranges(obj.get("visible", []))
    snd = merge_ranges(obj.get("sounding", []))
    noun = object_noun(obj, visual=bool(vis))
    if vis and snd:
        if vis == snd:
            return f"A {noun} is seen and heard {span_phrase(vis)}."
        return f"A {noun} is seen {span_phrase(vis)} and heard {span_phrase(snd)}."
    if snd:
        return f"A {noun} is heard {span_phrase(snd)} but not seen."
    if vis:
        return f"A {noun} is seen {span_phrase(vis)} but not heard."
    return f"A {noun} is neither seen nor heard."


# --------------------------------------------------------------------------------------------
# Task base
# --------------------------------------------------------------------------------------------


@dataclass
class TaskSample:
    """One instruction sample built from a clip.

    Attributes:
        prompt: instruction text with the ``<video>`` and ``<audio>`` placeholders (each once).
        target: reasoning sentences + tagged answer (or only the tagged answer).
        answer: JSON-able structured ground truth, what the task's metrics compare against.
        dense: dense targets, name -> tensor (empty for the v1 tasks).
    """

    prompt: str
    target: str
    answer: Any
    dense: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class TaskParts:
    """What a task's ``_compose`` returns; :meth:`Task.build` assembles the sample from it.

    Attributes:
        question: the instruction without the placeholder prefix.
        sentences: reasoning sentences (dropped when ``reasoning=False``).
        conclusion: concluding sentence embedding the tagged answer (used with reasoning).
        bare: the tagged answer alone (the target when ``reasoning=False``).
        answer: structured ground truth.
    """

    question: str
    sentences: list[str]
    conclusion: str
    bare: str
    answer: Any


class Task:
    """Base class of a task: prompt templates, target builder, parser, metric collection.

    Subclasses set ``name``, ``prompts`` (question phrasings, chosen with the rng) and
    ``phrases`` (every other fixed text fragment they can emit, ``{slot}`` fields allowed), and
    implement ``_compose``, ``parse`` and ``metrics``.
    """

    name: ClassVar[str] = ""
    modalities: ClassVar[tuple[str, ...]] = ("video", "audio")
    prompts: ClassVar[tuple[str, ...]] = ()
    phrases: ClassVar[tuple[str, ...]] = ()
    #: Metric keys where lower is better (the majority baseline minimizes them).
    lower_is_better: ClassVar[frozenset[str]] = frozenset({"parse_failure_rate"})
    #: At most this many distinct answers are tried as constants by the default baseline.
    max_baseline_candidates: ClassVar[int] = 64

    def __init__(self, reasoning: bool = True) -> None:
        """Args: reasoning: include the reasoning sentences in targets (False: tagged answer only)."""
        self.reasoning = bool(reasoning)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(reasoning={self.reasoning})"

    # ---- building -------------------------------------------------------------------------

    def build(self, clip: dict, rng: random.Random) -> TaskSample:
        """Build one sample from ``clip`` (uses only ``clip["scene"]``), deterministic given ``rng``.

        Args:
            clip: dict with key "scene" (scene graph, schema v1); "frames" [T*F, 3, H, W] uint8
                and "audio" [S] float32 may be present and are not read by the v1 tasks.
            rng: the random source of every choice (phrasing, question, ...).
        Returns:
            TaskSample(prompt, target, answer, dense={}).
        """
        scene = self._scene(clip)
        parts = self._compose(scene, rng)
        prompt = PROMPT_PREFIX + parts.question
        if self.reasoning:
            target = " ".join([*parts.sentences, parts.conclusion])
        else:
            target = parts.bare
        return TaskSample(prompt=prompt, target=target, answer=parts.answer, dense={})

    def _scene(self, clip: dict) -> dict:
        if not isinstance(clip, dict) or not isinstance(clip.get("scene"), dict):
            raise ValueError(
                f"task {self.name!r}: the clip has no scene graph (clip['scene'] dict is required)"
            )
        scene = clip["scene"]
        if scene.get("version", 1) != 1:
            raise ValueError(
                f"task {self.name!r}: scene graph version {scene.get('version')!r} is not supported "
                "(expected 1)"
            )
        if "objects" not in scene or "av_event" not in scene:
            raise ValueError(
                f"task {self.name!r}: scene {scene.get('clip_id')!r} lacks 'objects' or 'av_event'"
            )
        return scene

    def _compose(self, scene: dict, rng: random.Random) -> TaskParts:
        raise NotImplementedError

    def _question(self, rng: random.Random, **slots: Any) -> str:
        return rng.choice(self.prompts).format(**slots)

    # ---- parsing and scoring ----------------------------------------------------------------

    def parse(self, text: Any) -> Any:
        """Structured prediction read from the tags of generated ``text``; None on failure."""
        raise NotImplementedError

    def metrics(self) -> MetricCollection:
        """A fresh MetricCollection; ``.update(preds: list[pred | None], targets: list[answer])``."""
        raise NotImplementedError

    def _collection(self, metrics: dict) -> MetricCollection:
        # compute_groups=False: torchmetrics would otherwise merge metrics whose states happen to
        # be equal after the first update (e.g. two empty per-type accuracies) and share state.
        return MetricCollection(metrics, compute_groups=False)

    def answer_to_pred(self, answer: Any) -> Any:
        """The prediction that is exactly right for ``answer`` (parse(target) == this)."""
        return answer

    def constant_candidates(self, answers: Sequence[Any]) -> list[Any]:
        """Constant predictions the majority baseline tries: the most frequent distinct answers."""
        counts = Counter(json.dumps(a, sort_keys=True) for a in answers)
        ordered = sorted(counts, key=lambda k: (-counts[k], k))[: self.max_baseline_candidates]
        return [self.answer_to_pred(json.loads(k)) for k in ordered]

    def majority_baseline(self, answers: Sequence[Any]) -> dict[str, float]:
        """Score of the best constant predictor on ``answers``, through the task's own metrics.

        Every candidate constant (``constant_candidates``) is scored with a fresh
        ``metrics()``; each key reports the best candidate for it (max, or min for keys in
        ``lower_is_better``).
        """
        answers = list(answers)
        if not answers:
            raise ValueError(f"task {self.name!r}: majority_baseline needs at least one answer")
        best: dict[str, float] = {}
        for cand in self.constant_candidates(answers):
            collection = self.metrics()
            collection.update([cand] * len(answers), answers)
            for key, value in collection.compute().items():
                v = float(value)
                if key not in best:
                    best[key] = v
                elif key in self.lower_is_better:
                    best[key] = min(best[key], v)
                else:
                    best[key] = max(best[key], v)
        return best

    # ---- vocabulary -------------------------------------------------------------------------

    def slot_values(self) -> Iterable[str]:
        """Every value a ``{slot}`` can take (default: the whole scene vocabulary)."""
        return (*CLASSES, *COLORS, *SHAPES, *POSITIONS, *ROWS, *MOTIONS, *MOODS, *NUMBER_WORDS)

    def words(self) -> set[str]:
        """Every word and ``<tag>`` token the task's prompts and targets can contain.

        Includes the placeholders ``<video>`` / ``<audio>`` and the answer tags; digits and
        punctuation are excluded (the tokenizer has them as single characters).
        """
        out = template_words((PROMPT_PREFIX, *SHARED_PHRASES, *self.prompts, *self.phrases))
        for value in self.slot_values():
            out |= text_words(value)
        return out


class LabelTask(Task):
    """A recognition task answered with one label: ``<answer> {label} </answer>``.

    Subclasses set ``labels`` (the label vocabulary), ``conclusion_template`` (with an
    ``{answer}`` slot for the tagged answer) and implement ``label(scene)`` and
    ``sentences(scene)``. Answer: the label string. Metrics: accuracy, macro-F1, parse failures.
    """

    labels: ClassVar[tuple[str, ...]] = ()
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
            raise ValueError(f"task {self.name!r}: label {label!r} of scene {scene.get('clip_id')!r} "
                             f"is not one of {self.labels}")
        tagged = f"<answer> {label} </answer>"
        return TaskParts(self._question(rng), self.sentences(scene),
                         self.conclusion_template.format(answer=tagged), tagged, label)

    def parse(self, text: Any) -> str | None:
        """The normalized content of the ``<answer>`` tag (e.g. "moving left"), or None."""
        return extract_tag(text, "answer")  # never raises

    def metrics(self) -> MetricCollection:
        """{"accuracy", "macro_f1", "parse_failure_rate"}."""
        from avmt.tasks.metrics import LabelAccuracy, LabelMacroF1, ParseFailureRate

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
