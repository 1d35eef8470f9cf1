"""``avqa``: audio-visual question answering (MUSIC-AVQA style question types).

Question types are ``{modality}_{kind}`` with modality in audio / visual / audio_visual and kind
in counting / location / existential / temporal / comparative (no audio_location: the audio is
mono). Each type has one or more templates; a template looks at the scene graph, picks its
subjects with the rng and returns the question, the one-word answer and the objects the
reasoning should describe, or None when the scene cannot support it (e.g. "which is louder"
with one sounding object). ``build`` picks a type uniformly among the types the scene supports,
then a template of that type; yes/no templates aim for yes or no with probability 1/2 each.

Real data: MUSIC-AVQA clips (converter ``music-avqa``) carry their questions under
``answers["avqa"]`` (:meth:`AVQATask.compose_annotated`); their nine question types are the
same ``{modality}_{kind}`` types (:data:`MUSIC_AVQA_GROUPS`), so one set of metric keys serves both:
overall, per question type and per modality (on MUSIC-AVQA exactly the paper's groups).
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from torchmetrics import MetricCollection

from avmt.data.labels import MUSIC_AVQA_ANSWERS
from avmt.data.sample import Clip, SampleError
from avmt.data.vocab import CLASSES, NUMBER_WORDS, POSITIONS
from avmt.errors import UserError
from avmt.intervals import intersect_ranges, merge_ranges, ranges_onset, ranges_total
from avmt.tasks import register_task
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.metrics import LabelAccuracy, ParseFailureRate
from avmt.tasks.reasoning import number_word, object_sentence
from avmt.tasks.scene import (
    av_object,
    has_overlap,
    is_sounding,
    is_visible,
    ordered_objects,
    scene_objects,
    sort_objects,
    unique_class_objects,
)
from avmt.tasks.text import extract_tag, label_key, wrap_tag

#: Two sounds count as "louder" / "quieter" only if their loudness differs by at least this.
LOUDNESS_MARGIN = 0.1

MODALITIES = ("audio", "visual", "audio_visual")
KINDS = ("counting", "location", "existential", "temporal", "comparative")

#: Every answer word a template can produce.
ANSWERS: tuple[str, ...] = ("yes", "no", *POSITIONS, *NUMBER_WORDS, *CLASSES)
#: The label vocabulary of the accuracy metrics: the AVSynth answers, then MUSIC-AVQA's 42 answers
#: (``avmt.data.labels``) not already among them (labels compare by :func:`label_key`).
METRIC_LABELS: tuple[str, ...] = (
    *ANSWERS, *(a for a in MUSIC_AVQA_ANSWERS if label_key(a) not in {label_key(b) for b in ANSWERS})
)

#: MUSIC-AVQA's nine question types as the paper groups them, by modality (its "Audio",
#: "Visual" and "Audio-Visual" columns); each is one of this task's question types.
MUSIC_AVQA_GROUPS: dict[str, tuple[str, ...]] = {
    "audio": ("audio_counting", "audio_comparative"),
    "visual": ("visual_counting", "visual_location"),
    "audio_visual": ("audio_visual_existential", "audio_visual_counting", "audio_visual_location",
                     "audio_visual_comparative", "audio_visual_temporal"),
}
_METRIC_KEYS = frozenset(label_key(a) for a in METRIC_LABELS)
#: A real dataset's modality name (lower-cased) -> this task's.
_REAL_MODALITIES = {"audio": "audio", "visual": "visual", "audio-visual": "audio_visual",
                    "audio_visual": "audio_visual"}

_POSITION_ORDER = {p: i for i, p in enumerate(POSITIONS)}  # left < center < right


@dataclass
class QA:
    """A generated question: its text, one-word answer, the objects the reasoning describes and
    an optional extra evidence sentence."""

    question: str
    answer: str
    objects: list[dict]
    evidence: str | None = None


Template = Callable[[dict, random.Random, int], "QA | None"]


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------


def _vis(o: dict) -> list[list[int]]:
    return merge_ranges(o.get("visible", []))


def _snd(o: dict) -> list[list[int]]:
    return merge_ranges(o.get("sounding", []))


def _class_pool(scene: dict, num_classes: int) -> list[str]:
    pool = set(CLASSES[:num_classes]) | {o["class"] for o in scene_objects(scene)}
    return sorted(pool)


def _yes_no_class(
    scene: dict, rng: random.Random, num_classes: int, pred: Callable[[dict], bool]
) -> tuple[str, bool]:
    """Pick a class for a yes/no question about ``pred``; aims at yes / no with p = 1/2.

    "yes" classes have an object satisfying ``pred`` (and no object of the class failing it);
    "no" classes have none: a distractor of the scene (hard negative) half of the time when one
    exists, else a class absent from the scene.
    """
    objs = scene_objects(scene)
    by_class: dict[str, list[dict]] = {}
    for o in objs:
        by_class.setdefault(o["class"], []).append(o)
    yes = sorted(c for c, os in by_class.items() if all(pred(o) for o in os))
    hard_no = sorted(c for c, os in by_class.items() if not any(pred(o) for o in os))
    easy_no = [c for c in _class_pool(scene, num_classes) if c not in by_class]
    want_yes = rng.random() < 0.5
    if want_yes and yes:
        return rng.choice(yes), True
    if hard_no and (not easy_no or rng.random() < 0.5):
        return rng.choice(hard_no), False
    if easy_no:
        return rng.choice(easy_no), False
    return rng.choice(yes), True


def _extreme(objs: list[dict], key: Callable[[dict], int], largest: bool) -> dict | None:
    """The single object with the smallest (or largest) key; None if tied or fewer than two."""
    if len(objs) < 2:
        return None
    values = sorted((key(o) for o in objs), reverse=largest)
    if values[0] == values[1]:
        return None
    return next(o for o in objs if key(o) == values[0])


def _pair(
    objs: list[dict], rng: random.Random, differ: Callable[[dict, dict], bool]
) -> tuple[dict, dict] | None:
    """A random ordered pair (a, b) of ``objs`` with ``differ(a, b)``; None if there is none."""
    pairs = [(a, b) for a in objs for b in objs if a is not b and differ(a, b)]
    return rng.choice(pairs) if pairs else None


def _phrase(rng: random.Random, phrasings: tuple[str, ...], **slots: str) -> str:
    return rng.choice(phrasings).format(**slots)


# --------------------------------------------------------------------------------------------
# templates, by question type
# --------------------------------------------------------------------------------------------

Q_AUDIO_COUNT = ("How many objects are heard in the clip?", "How many objects make a sound?",
                 "How many sounding objects are there in the clip?")
Q_AUDIO_TIMES = ("How many times does the {c} start sounding?", "How many separate times is the {c} heard?")
Q_VISUAL_COUNT = ("How many objects are visible in the video?", "How many objects can be seen?",
                  "How many objects appear in the video?")
Q_VISUAL_TIMES = ("How many times does the {c} appear?", "How many separate times is the {c} seen?")
Q_AV_SECONDS = ("For how many seconds is the {c} both seen and heard?",
                "How many seconds does the {c} sound while it is visible?")
Q_AV_UNSEEN = ("How many objects are heard but never seen?",
               "How many sounds come from an object that is not visible?")
Q_AV_SILENT = ("How many visible objects make no sound?", "How many objects are seen but never heard?")
Q_VISUAL_WHERE = ("Where is the {c}?", "On which side of the frame is the {c}?",
                  "Is the {c} on the left, in the center or on the right?")
Q_AV_WHERE = ("Where is the object that is both seen and heard?",
              "Where is the sounding object that is also visible?",
              "On which side is the object that can be seen and heard at the same time?")
Q_AUDIO_EXISTS = ("Is a {c} heard in the clip?", "Can you hear a {c}?",
                  "Does a {c} make a sound in this clip?")
Q_VISUAL_EXISTS = ("Is a {c} visible in the video?", "Can you see a {c}?", "Does a {c} appear in the video?")
Q_AV_EXISTS = ("Is the {c} both seen and heard at the same time?",
               "Is the {c} visible while it makes a sound?",
               "Can the {c} be seen and heard at the same time?")
Q_AUDIO_FIRST = ("Which object is heard first?", "Which sound starts first?")
Q_AUDIO_LAST = ("Which object starts sounding last?", "Which sound starts last?")
Q_AUDIO_BEFORE = ("Is the {a} heard before the {b}?", "Does the {a} start sounding before the {b}?")
Q_VISUAL_FIRST = ("Which object appears first?", "Which object is seen first?")
Q_VISUAL_LAST = ("Which object appears last?", "Which object is seen last?")
Q_VISUAL_BEFORE = ("Does the {a} appear before the {b}?", "Is the {a} seen before the {b}?")
Q_AV_START = ("At which second does the {c} start to be both seen and heard?",
              "In which second does the {c} become both visible and audible?")
Q_AV_END = ("At which second does the {c} stop being both seen and heard?",
            "In which second does the audio-visual event of the {c} end?")
Q_LOUDER = ("Which is louder, the {a} or the {b}?", "Which sounds louder, the {a} or the {b}?")
Q_IS_LOUDER = ("Is the {a} louder than the {b}?", "Does the {a} sound louder than the {b}?")
Q_HEARD_LONGER = ("Which is heard for longer, the {a} or the {b}?",
                  "Which sounds for longer, the {a} or the {b}?")
Q_SEEN_LONGER = ("Which is visible for longer, the {a} or the {b}?",
                 "Which is seen for longer, the {a} or the {b}?")
Q_LEFTMOST = ("Which is further to the left, the {a} or the {b}?",
              "Which is closer to the left side, the {a} or the {b}?")
Q_IS_LEFT_OF = ("Is the {a} to the left of the {b}?", "Is the {a} further left than the {b}?")
Q_WHICH_AV = ("Which is both seen and heard, the {a} or the {b}?",
              "Which one can be seen and heard at the same time, the {a} or the {b}?")
Q_AV_LOUDER = ("Is the object that is both seen and heard louder than the {b}?",
               "Does the object that is seen and heard sound louder than the {b}?")

EVIDENCE = ("The {a} is louder than the {b}.",)


def audio_count(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """How many objects sound (number word)."""
    n = sum(is_sounding(o) for o in scene_objects(scene))
    return QA(_phrase(rng, Q_AUDIO_COUNT), number_word(n), ordered_objects(scene))


def audio_times(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """How many sounding intervals an object has (number word)."""
    objs = [o for o in unique_class_objects(scene) if is_sounding(o)]
    if not objs:
        return None
    o = rng.choice(objs)
    return QA(_phrase(rng, Q_AUDIO_TIMES, c=o["class"]), number_word(len(_snd(o))), [o])


def visual_count(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """How many objects are visible (number word)."""
    n = sum(is_visible(o) for o in scene_objects(scene))
    return QA(_phrase(rng, Q_VISUAL_COUNT), number_word(n), ordered_objects(scene))


def visual_times(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """How many visible intervals an object has (number word)."""
    objs = [o for o in unique_class_objects(scene) if is_visible(o)]
    if not objs:
        return None
    o = rng.choice(objs)
    return QA(_phrase(rng, Q_VISUAL_TIMES, c=o["class"]), number_word(len(_vis(o))), [o])


def av_seconds(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """For how many segments an object is seen and heard at once (number word)."""
    objs = [o for o in unique_class_objects(scene) if is_visible(o) and is_sounding(o)]
    if not objs:
        return None
    o = rng.choice(objs)
    n = ranges_total(intersect_ranges(_vis(o), _snd(o)))
    return QA(_phrase(rng, Q_AV_SECONDS, c=o["class"]), number_word(n), [o])


def av_unseen(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """How many objects are heard but never seen (number word)."""
    n = sum(is_sounding(o) and not is_visible(o) for o in scene_objects(scene))
    return QA(_phrase(rng, Q_AV_UNSEEN), number_word(n), ordered_objects(scene))


def av_silent(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """How many visible objects never sound (number word)."""
    n = sum(is_visible(o) and not is_sounding(o) for o in scene_objects(scene))
    return QA(_phrase(rng, Q_AV_SILENT), number_word(n), ordered_objects(scene))


def visual_where(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Horizontal position of a visible object (left / center / right)."""
    objs = [o for o in unique_class_objects(scene) if is_visible(o) and o.get("position") in POSITIONS]
    if not objs:
        return None
    o = rng.choice(objs)
    return QA(_phrase(rng, Q_VISUAL_WHERE, c=o["class"]), o["position"], [o])


def av_where(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Horizontal position of the audio-visual event object."""
    o = av_object(scene)
    if o.get("position") not in POSITIONS:
        return None
    return QA(_phrase(rng, Q_AV_WHERE), o["position"], [o])


def _exists(
    scene: dict, rng: random.Random, nc: int, phrasings: tuple[str, ...], pred: Callable[[dict], bool]
) -> QA:
    cls, yes = _yes_no_class(scene, rng, nc, pred)
    return QA(_phrase(rng, phrasings, c=cls), "yes" if yes else "no", ordered_objects(scene))


def audio_exists(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Is a class heard (yes / no, balanced)."""
    return _exists(scene, rng, nc, Q_AUDIO_EXISTS, is_sounding)


def visual_exists(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Is a class visible (yes / no, balanced)."""
    return _exists(scene, rng, nc, Q_VISUAL_EXISTS, is_visible)


def av_exists(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Is a class seen and heard at the same time (yes / no, balanced)."""
    return _exists(scene, rng, nc, Q_AV_EXISTS, has_overlap)


def _order(
    scene: dict, rng: random.Random, phrasings: tuple[str, ...], ranges: Callable[[dict], list], last: bool
) -> QA | None:
    objs = [o for o in unique_class_objects(scene) if ranges(o)]
    o = _extreme(objs, lambda x: ranges_onset(ranges(x)), largest=last)
    if o is None:
        return None
    return QA(_phrase(rng, phrasings), o["class"], objs)


def _before(
    scene: dict, rng: random.Random, phrasings: tuple[str, ...], ranges: Callable[[dict], list]
) -> QA | None:
    objs = [o for o in unique_class_objects(scene) if ranges(o)]
    pair = _pair(objs, rng, lambda a, b: ranges_onset(ranges(a)) < ranges_onset(ranges(b)))
    if pair is None:
        return None
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    yes = ranges_onset(ranges(a)) < ranges_onset(ranges(b))
    return QA(_phrase(rng, phrasings, a=a["class"], b=b["class"]), "yes" if yes else "no", [a, b])


def audio_first(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Which object starts sounding first (class)."""
    return _order(scene, rng, Q_AUDIO_FIRST, _snd, last=False)


def audio_last(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Which object starts sounding last (class)."""
    return _order(scene, rng, Q_AUDIO_LAST, _snd, last=True)


def audio_before(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Does one object start sounding before another (yes / no, balanced)."""
    return _before(scene, rng, Q_AUDIO_BEFORE, _snd)


def visual_first(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Which object appears first (class)."""
    return _order(scene, rng, Q_VISUAL_FIRST, _vis, last=False)


def visual_last(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Which object appears last (class)."""
    return _order(scene, rng, Q_VISUAL_LAST, _vis, last=True)


def visual_before(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Does one object appear before another (yes / no, balanced)."""
    return _before(scene, rng, Q_VISUAL_BEFORE, _vis)


def _av_event_bound(scene: dict, rng: random.Random, phrasings: tuple[str, ...], index: int) -> QA | None:
    o = av_object(scene)
    if o not in unique_class_objects(scene):
        return None
    s, e = scene["av_event"]["range"]
    return QA(_phrase(rng, phrasings, c=o["class"]), number_word(int((s, e)[index])), [o])


def av_start(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Second at which the audio-visual event starts (number word)."""
    return _av_event_bound(scene, rng, Q_AV_START, 0)


def av_end(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Second at which the audio-visual event ends (exclusive; number word)."""
    return _av_event_bound(scene, rng, Q_AV_END, 1)


def _loudness(o: dict) -> float:
    return float(o.get("loudness", 0.0))


def _louder(a: dict, b: dict) -> bool:
    return _loudness(a) - _loudness(b) >= LOUDNESS_MARGIN


def _louder_evidence(a: dict, b: dict) -> str:
    hi, lo = (a, b) if _loudness(a) > _loudness(b) else (b, a)
    return EVIDENCE[0].format(a=hi["class"], b=lo["class"])


def audio_louder(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Which of two sounding objects is louder (class)."""
    objs = [o for o in unique_class_objects(scene) if is_sounding(o)]
    pair = _pair(objs, rng, _louder)  # (louder, quieter)
    if pair is None:
        return None
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    question = _phrase(rng, Q_LOUDER, a=a["class"], b=b["class"])
    return QA(question, pair[0]["class"], [a, b], _louder_evidence(a, b))


def audio_is_louder(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Is one sounding object louder than another (yes / no, balanced)."""
    objs = [o for o in unique_class_objects(scene) if is_sounding(o)]
    pair = _pair(objs, rng, _louder)
    if pair is None:
        return None
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    yes = _louder(a, b)
    return QA(_phrase(rng, Q_IS_LOUDER, a=a["class"], b=b["class"]), "yes" if yes else "no", [a, b],
              _louder_evidence(a, b))


def _longer(
    scene: dict, rng: random.Random, phrasings: tuple[str, ...], ranges: Callable[[dict], list]
) -> QA | None:
    objs = [o for o in unique_class_objects(scene) if ranges(o)]
    pair = _pair(objs, rng, lambda a, b: ranges_total(ranges(a)) > ranges_total(ranges(b)))
    if pair is None:
        return None
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    return QA(_phrase(rng, phrasings, a=a["class"], b=b["class"]), pair[0]["class"], [a, b])


def audio_longer(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Which of two objects sounds for longer (class)."""
    return _longer(scene, rng, Q_HEARD_LONGER, _snd)


def visual_longer(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Which of two objects is visible for longer (class)."""
    return _longer(scene, rng, Q_SEEN_LONGER, _vis)


def _left_of(a: dict, b: dict) -> bool:
    return _POSITION_ORDER.get(a.get("position"), -1) < _POSITION_ORDER.get(b.get("position"), -1)


def _visible_placed(scene: dict) -> list[dict]:
    return [o for o in unique_class_objects(scene) if is_visible(o) and o.get("position") in POSITIONS]


def visual_leftmost(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Which of two visible objects is further left (class)."""
    pair = _pair(_visible_placed(scene), rng, _left_of)  # (left one, right one)
    if pair is None:
        return None
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    return QA(_phrase(rng, Q_LEFTMOST, a=a["class"], b=b["class"]), pair[0]["class"], [a, b])


def visual_is_left_of(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Is one visible object left of another (yes / no, balanced)."""
    pair = _pair(_visible_placed(scene), rng, _left_of)
    if pair is None:
        return None
    a, b = pair if rng.random() < 0.5 else pair[::-1]
    question = _phrase(rng, Q_IS_LEFT_OF, a=a["class"], b=b["class"])
    return QA(question, "yes" if _left_of(a, b) else "no", [a, b])


def av_which(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Which of two objects is seen and heard at the same time (class)."""
    objs = unique_class_objects(scene)
    av = [o for o in objs if has_overlap(o)]
    others = [o for o in objs if not has_overlap(o)]
    if not av or not others:
        return None
    x, y = rng.choice(av), rng.choice(others)
    a, b = (x, y) if rng.random() < 0.5 else (y, x)
    return QA(_phrase(rng, Q_WHICH_AV, a=a["class"], b=b["class"]), x["class"], [a, b])


def av_louder(scene: dict, rng: random.Random, nc: int) -> QA | None:
    """Is the audio-visual event object louder than another sound (yes / no)."""
    av = av_object(scene)
    others = [o for o in unique_class_objects(scene) if o is not av and is_sounding(o)
              and abs(_loudness(av) - _loudness(o)) >= LOUDNESS_MARGIN]
    if not others:
        return None
    b = rng.choice(others)
    yes = _louder(av, b)
    question = _phrase(rng, Q_AV_LOUDER, b=b["class"])
    return QA(question, "yes" if yes else "no", [av, b], _louder_evidence(av, b))


#: question type -> its templates
TEMPLATES: dict[str, tuple[Template, ...]] = {
    "audio_counting": (audio_count, audio_times),
    "visual_counting": (visual_count, visual_times),
    "audio_visual_counting": (av_seconds, av_unseen, av_silent),
    "visual_location": (visual_where,),
    "audio_visual_location": (av_where,),
    "audio_existential": (audio_exists,),
    "visual_existential": (visual_exists,),
    "audio_visual_existential": (av_exists,),
    "audio_temporal": (audio_first, audio_last, audio_before),
    "visual_temporal": (visual_first, visual_last, visual_before),
    "audio_visual_temporal": (av_start, av_end),
    "audio_comparative": (audio_louder, audio_is_louder, audio_longer),
    "visual_comparative": (visual_longer, visual_leftmost, visual_is_left_of),
    "audio_visual_comparative": (av_which, av_louder),
}
QUESTION_TYPES: tuple[str, ...] = tuple(TEMPLATES)

_ALL_QUESTIONS: tuple[str, ...] = tuple(
    q
    for group in (
        Q_AUDIO_COUNT, Q_AUDIO_TIMES, Q_VISUAL_COUNT, Q_VISUAL_TIMES, Q_AV_SECONDS, Q_AV_UNSEEN, Q_AV_SILENT,
        Q_VISUAL_WHERE, Q_AV_WHERE, Q_AUDIO_EXISTS, Q_VISUAL_EXISTS, Q_AV_EXISTS, Q_AUDIO_FIRST, Q_AUDIO_LAST,
        Q_AUDIO_BEFORE, Q_VISUAL_FIRST, Q_VISUAL_LAST, Q_VISUAL_BEFORE, Q_AV_START, Q_AV_END, Q_LOUDER,
        Q_IS_LOUDER, Q_HEARD_LONGER, Q_SEEN_LONGER, Q_LEFTMOST, Q_IS_LEFT_OF, Q_WHICH_AV, Q_AV_LOUDER,
    )
    for q in group
)




def question_modality(qtype: str) -> str:
    """The modality of a question type: ``"audio_visual_counting"`` -> ``"audio_visual"``."""
    for modality in sorted(MODALITIES, key=len, reverse=True):
        if qtype.startswith(modality + "_"):
            return modality
    raise UserError(f"question type {qtype!r} starts with none of the modalities {MODALITIES}")


def real_question_type(value: Any) -> str:
    """A converted question's type -> this task's question type.

    Accepts MUSIC-AVQA's ``"Audio-Visual/Location"`` (what the ``music-avqa`` converter writes), the
    pair ``["Audio-Visual", "Location"]`` and the type itself (``"audio_visual_location"``).

    Raises:
        ValueError: not one of :data:`QUESTION_TYPES` once mapped.
    """
    if isinstance(value, str) and value in QUESTION_TYPES:
        return value
    parts = value.split("/") if isinstance(value, str) else value
    if isinstance(parts, (list, tuple)) and len(parts) == 2 and all(isinstance(p, str) for p in parts):
        modality = _REAL_MODALITIES.get(parts[0].strip().lower())
        qtype = f"{modality}_{parts[1].strip().lower()}"
        if modality is not None and qtype in QUESTION_TYPES:
            return qtype
    raise UserError(f"question type {value!r} is none of {', '.join(QUESTION_TYPES)} "
                     f"(nor 'Modality/Kind' naming one of them)")


class QuestionGroupAccuracy(LabelAccuracy):
    """Accuracy over the questions whose ``type`` is one of ``qtypes`` (micro: every question
    counts once), e.g. the per-modality accuracy MUSIC-AVQA reports. 0 with no such question.

    Args:
        labels: the label vocabulary (targets must be in it); qtypes: the question types scored.
    """

    def __init__(self, labels: Sequence[str], qtypes: Sequence[str], **kwargs: Any) -> None:
        super().__init__(labels, target_key="answer", **kwargs)
        self.qtypes = frozenset(qtypes)

    def update(self, preds: Sequence[str | None], targets: Sequence[dict]) -> None:  # type: ignore[override]
        """Score the (prediction, target) pairs whose target type is in ``qtypes``."""
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets; they must pair up")
        kept = [(p, t) for p, t in zip(preds, targets) if t.get("type") in self.qtypes]
        if kept:
            super().update([p for p, _ in kept], [t for _, t in kept])


@register_task
class AVQATask(Task):
    """Audio-visual question answering with one-word answers.

    Target: ``<answer> {word} </answer>``. Answer: ``{"answer": word, "type": question_type}``
    (converted clips add ``"question_id"``). Metrics: accuracy overall, per question type and per
    modality, parse-failure rate; the labels are the AVSynth answers and MUSIC-AVQA's 42
    (:data:`METRIC_LABELS`). Trivial baseline: the question-type prior (:meth:`trivial_baseline`);
    the best constant answer is reported beside it (:meth:`extra_baselines`).
    Real data: :meth:`compose_annotated` (MUSIC-AVQA through the ``music-avqa`` converter).

    Args:
        reasoning: include reasoning sentences.
        num_classes: classes ``CLASSES[:num_classes]`` (the generator's default is 8) are the pool
            of absent classes that "no" existential questions ask about.
    """

    name = "avqa"
    task_id = 3
    prompts = _ALL_QUESTIONS
    baseline_name = "question-type prior"
    baseline_fits_training = True
    phrases = (*EVIDENCE, "<answer> {a} </answer>", "yes", "no")

    def __init__(self, reasoning: bool = True, num_classes: int = 8) -> None:
        super().__init__(reasoning=reasoning)
        if not 1 <= num_classes <= len(CLASSES):
            raise UserError(f"num_classes must be in 1..{len(CLASSES)}, got {num_classes}")
        self.num_classes = int(num_classes)

    def _compose(self, scene: dict, rng: random.Random) -> TaskParts:
        types = list(QUESTION_TYPES)
        rng.shuffle(types)
        for qtype in types:
            templates = list(TEMPLATES[qtype])
            rng.shuffle(templates)
            for template in templates:
                qa = template(scene, rng, self.num_classes)
                if qa is not None:
                    return self._parts(qa, qtype)
        raise UserError(f"scene {scene.get('clip_id')!r} supports no avqa question (it has no objects?)")

    def _parts(self, qa: QA, qtype: str) -> TaskParts:
        sentences = [object_sentence(o) for o in sort_objects(qa.objects)]
        if qa.evidence:
            sentences.append(qa.evidence)
        tagged = wrap_tag("answer", qa.answer)
        return TaskParts(qa.question, sentences, f"So the answer is {tagged}.", tagged,
                         {"answer": qa.answer, "type": qtype})

    def compose_annotated(self, clip: Clip, answer: Any, rng: random.Random) -> TaskParts:
        """A converted clip's question: ``answer`` is ``{"questions": [{"question_id", "question",
        "answer", "type"}, ...]}`` (``music-avqa`` converter; a single question object is read
        too). A clip holding several questions (a MUSIC-AVQA train video) gives one, chosen with
        the rng; val / test clips hold one each, so every question is scored once.

        The prompt is the dataset's question; the target is ``<answer> {answer} </answer>`` as for
        AVSynth (no reasoning sentences); ``type`` becomes this task's question type
        (:func:`real_question_type`: "Audio/Counting" -> "audio_counting").

        Raises:
            SampleError: no question, or one with an empty text, an answer outside
                :data:`METRIC_LABELS` or an unknown type (names the clip).
        """
        questions = answer.get("questions", [answer]) if isinstance(answer, dict) else None
        if not isinstance(questions, list) or not questions:
            raise SampleError(f"clip {clip.key!r}: avqa answer {answer!r} holds no questions")
        chosen = rng.choice(questions)
        try:
            question, word = chosen["question"], chosen["answer"]
            if not isinstance(question, str) or not question.strip() or not isinstance(word, str):
                raise UserError("question and answer must be strings, the question not empty")
            if label_key(word) not in _METRIC_KEYS:
                raise UserError(f"answer {word!r} is not one of the task's {len(METRIC_LABELS)} answers")
            qtype = real_question_type(chosen["type"])
        except (KeyError, TypeError, ValueError) as error:
            raise SampleError(f"clip {clip.key!r}: avqa question {chosen!r} is not "
                              f"{{'question', 'answer', 'type'}}: {error}") from None
        tagged = wrap_tag("answer", word)
        parsed = {"answer": word, "type": qtype}
        if "question_id" in chosen:
            parsed["question_id"] = chosen["question_id"]
        return TaskParts(" ".join(question.split()), [], f"So the answer is {tagged}.", tagged, parsed)

    def parse(self, text: Any) -> str | None:
        """The content of the ``<answer>`` tag as written (case kept, whitespace collapsed), or
        None; the accuracy compares it with the answer case-insensitively."""
        return extract_tag(text, "answer", keep_case=True)  # never raises

    def metrics(self) -> MetricCollection:
        """The same keys for AVSynth and MUSIC-AVQA answers (a key with no question scores 0):

        - ``accuracy``: every question;
        - ``accuracy/{type}`` for each of the 14 question types (on MUSIC-AVQA the paper's nine
          columns, e.g. ``accuracy/audio_visual_temporal``; the other five score 0);
        - ``accuracy/{modality}`` for audio, visual and audio_visual: the questions of every type
          of that modality, micro-averaged (on MUSIC-AVQA exactly the paper's Audio, Visual and
          Audio-Visual averages, :data:`MUSIC_AVQA_GROUPS`);
        - ``parse_failure_rate``.
        """
        metrics: dict = {"accuracy": LabelAccuracy(METRIC_LABELS, target_key="answer")}
        for qtype in QUESTION_TYPES:
            metrics[f"accuracy/{qtype}"] = LabelAccuracy(METRIC_LABELS, target_key="answer", qtype=qtype)
        for modality in MODALITIES:
            qtypes = [qtype for qtype in QUESTION_TYPES if question_modality(qtype) == modality]
            metrics[f"accuracy/{modality}"] = QuestionGroupAccuracy(METRIC_LABELS, qtypes)
        metrics["parse_failure_rate"] = ParseFailureRate()
        return self._collection(metrics)

    def extra_baselines(self, answers: Sequence[dict]) -> dict[str, dict[str, float]]:
        """The best constant answer (:meth:`majority_baseline`), the trivial baseline of every other
        classification task, beside the question-type prior."""
        return {"best constant answer": self.majority_baseline(answers)}

    def answer_to_pred(self, answer: dict) -> str:
        """The answer word."""
        return answer["answer"]

    def constant_candidates(self, answers: list[dict]) -> list[str]:
        """Every distinct answer word."""
        return sorted({a["answer"] for a in answers})

    def type_prior(self, answers: Sequence[dict]) -> dict[str, str]:
        """The most frequent answer word of each question type in ``answers`` (ties: the
        alphabetically first word); only the types that occur."""
        counts: dict[str, Counter] = {}
        for a in answers:
            counts.setdefault(a["type"], Counter())[a["answer"]] += 1
        return {qtype: min(c, key=lambda word: (-c[word], word)) for qtype, c in counts.items()}

    def trivial_baseline(
        self, answers: Sequence[dict], train_answers: Sequence[dict] | None = None
    ) -> dict[str, float]:
        """The question-type prior, scored through :meth:`metrics`: every question gets the most
        frequent answer of its type (:meth:`type_prior`), which a model can learn from the question
        text alone. Every key (overall and per-type accuracy, failure rate) comes from the same
        metric code; :meth:`majority_baseline` (one global constant) is still available.

        The prior is fitted on ``train_answers`` when given, as a text-only model would learn it
        (a type absent from them gets the most frequent training answer overall). Fitted on
        ``answers`` themselves it is an oracle: with a few questions per type it learns the
        evaluated answers (on AVSynth's 100 validation questions, 14 types: 0.46 in-sample against
        0.35 fitted on the training questions).
        """
        answers = list(answers)
        if not answers:
            raise UserError(f"task {self.name!r}: trivial_baseline needs at least one answer")
        fitted = list(train_answers) if train_answers else answers
        prior = self.type_prior(fitted)
        overall = self.type_prior([{"type": "", "answer": a["answer"]} for a in fitted])[""]
        collection = self.metrics()
        collection.update([prior.get(a["type"], overall) for a in answers], answers)
        return {key: float(value) for key, value in collection.compute().items()}

