"""``avvp_weak``: video-level audio-visual event tagging (which event classes occur in the clip).

The training half of LLP (Tian et al., ECCV 2020) is weakly labelled: each training video lists
the event classes that occur in it, heard or seen, with no time and no modality. This task trains
on exactly that and nothing more (no ranges are made up from the weak labels); the dense ``avvp``
task scores the parsing on the val / test videos, which carry dense labels.

On AVSynth scenes the answer is the same kind of label: the classes of the objects that are
heard or seen at some time.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric, MetricCollection

from avmt.data.sample import Clip, SampleError
from avmt.errors import UserError
from avmt.tasks import register_task
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.metrics import ParseFailureRate
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import ordered_objects, scene_objects
from avmt.tasks.text import clean_text, label_key, wrap_tag

__all__ = ["AVVPWeakTask", "MultiLabelF1", "event_list_tags", "sorted_classes"]

#: One ``<event>`` or ``</event>`` tag (case and inner spaces tolerated).
_EVENT_TAG_RE = re.compile(r"<\s*(/?)\s*event\s*>", re.IGNORECASE)


def sorted_classes(classes: Sequence[str]) -> list[str]:
    """Distinct classes (by :func:`~avmt.tasks.text.label_key`, the first spelling kept), sorted by
    that key: the order the targets list them in (weak labels carry no time to order them by)."""
    out: dict[str, str] = {}
    for cls in classes:
        out.setdefault(label_key(cls), clean_text(cls))
    return [out[key] for key in sorted(out)]


def event_list_tags(classes: Sequence[str]) -> str:
    """``["Dog", "Speech"]`` -> "<event> Dog </event> <event> Speech </event>" (the target)."""
    return " ".join(wrap_tag("event", cls) for cls in classes)


def _class_set(classes: Sequence[str] | None) -> set[str]:
    return {label_key(c) for c in classes or () if isinstance(c, str) and label_key(c)}


class MultiLabelF1(Metric):
    """Set-valued (multi-label) scores of class-set predictions.

    Inputs: ``preds`` lists of class names (or None: a parse failure, scores 0 and counts every
    target class as missed); ``targets`` ``{"events": [class, ...]}``. Classes compare by
    :func:`~avmt.tasks.text.label_key` (case and whitespace insensitive).

    Args:
        kind: ``"sample_f1"``: mean over clips of the clip's F1 ``2|P∩G| / (|P| + |G|)`` (1 when
            both sets are empty); ``"micro_f1"``: ``2 TP / (2 TP + FP + FN)`` pooled over all
            clips and classes; ``"exact_match"``: fraction of clips whose set is exactly right.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    KINDS = ("sample_f1", "micro_f1", "exact_match")

    def __init__(self, kind: str = "sample_f1", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if kind not in self.KINDS:
            raise UserError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.kind = kind
        for name in ("f1_sum", "exact"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        for name in ("tp", "fp", "fn", "clips"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[Sequence[str] | None], targets: Sequence[dict]) -> None:
        """Accumulate the counts of N (prediction, target) pairs."""
        if len(preds) != len(targets):
            raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets; they must pair up")
        for pred, target in zip(preds, targets):
            truth = _class_set(target["events"])
            self.clips += 1
            if pred is None:
                self.fn += len(truth)
                continue
            guess = _class_set(pred)
            hits = len(guess & truth)
            self.tp += hits
            self.fp += len(guess) - hits
            self.fn += len(truth) - hits
            self.f1_sum += 1.0 if not guess and not truth else 2 * hits / (len(guess) + len(truth))
            self.exact += float(guess == truth)

    def compute(self) -> Tensor:
        """The selected score, float64 scalar in [0, 1] (0 with no clips)."""
        zero = torch.zeros((), dtype=torch.float64, device=self.clips.device)
        if self.kind == "micro_f1":
            den = 2 * self.tp + self.fp + self.fn
            return (2 * self.tp).double() / den.double() if den > 0 else zero
        if self.clips == 0:
            return zero
        state = self.f1_sum if self.kind == "sample_f1" else self.exact
        return state / self.clips.double()


@register_task
class AVVPWeakTask(Task):
    """Name every event class that occurs in the clip, heard or seen (LLP's weak, video-level label).

    Target: ``<event> Dog </event> <event> Speech </event>``, one ``<event>`` pair per class,
    classes sorted (:func:`sorted_classes`). Answer: ``{"events": [class, ...]}`` (>= 1 class).
    Metrics: per-clip (sample) F1, micro F1 over clips and classes, exact set match
    (:class:`MultiLabelF1`), parse failures. Baseline: the best constant class set (the most
    frequent sets, and the k most frequent classes for every k).
    """

    name = "avvp_weak"
    task_id = 15
    needs_av_event = False  # multi-source scenes have events too
    baseline_name = "best constant class set"
    prompts = (
        "Which events occur in this clip? Name the class of everything that is heard or seen.",
        "List the classes of all the events in this clip, whether they are heard, seen or both.",
        "What can be heard or seen in this clip? Name each event class once.",
        "Tag this clip with its events: every class that is audible or visible at some time.",
    )
    phrases = (
        "So the events in this clip are {events}.",
        "<event> {c} </event>",
    )

    def _compose(self, scene: dict, rng: random.Random) -> TaskParts:
        classes = sorted_classes([o["class"] for o in scene_objects(scene) if o.get("sounding") or o.get("visible")])
        if not classes:
            raise SampleError(f"clip {scene.get('clip_id')!r}: task {self.name!r}: no object is heard or seen")
        tags = event_list_tags(classes)
        return TaskParts(
            question=self._question(rng),
            sentences=[object_sentence(o) for o in ordered_objects(scene)],
            conclusion=f"So the events in this clip are {tags}.",
            bare=tags,
            answer={"events": classes},
        )

    def compose_annotated(self, clip: Clip, answer: Any, rng: random.Random) -> TaskParts:
        """A weak label (``llp`` converter): ``{"events": [class, ...]}``, the classes as the dataset
        spells them (``"Frying_(food)"``); no reasoning sentences.

        Raises:
            SampleError: not a non-empty list of class names.
        """
        events = answer.get("events") if isinstance(answer, dict) else None
        if (not isinstance(events, list) or not events
                or not all(isinstance(c, str) and c.strip() and "<" not in c and ">" not in c for c in events)):
            raise SampleError(f"clip {clip.key!r}: avvp_weak answer {answer!r} is not {{'events': [class, ...]}} "
                              f"with at least one class")
        classes = sorted_classes(events)
        tags = event_list_tags(classes)
        return TaskParts(
            question=self._question(rng),
            sentences=[],
            conclusion=f"So the events in this clip are {tags}.",
            bare=tags,
            answer={"events": classes},
        )

    def parse(self, text: Any) -> list[str] | None:
        """The classes of every ``<event> X </event>`` pair, as written (case kept, whitespace
        collapsed), in output order; None when there is no pair, a tag is stray or unclosed, or a
        class is empty. Text between the pairs is ignored. Never raises."""
        try:
            if not isinstance(text, str):
                return None
            tags = list(_EVENT_TAG_RE.finditer(text))
            if not tags or len(tags) % 2:
                return None
            out = []
            for opening, closing in zip(tags[0::2], tags[1::2]):
                if opening.group(1) or not closing.group(1):
                    return None
                cls = clean_text(text[opening.end():closing.start()])
                if not cls:
                    return None
                out.append(cls)
            return out
        except Exception:  # never raises
            return None

    def metrics(self) -> MetricCollection:
        """{"sample_f1", "micro_f1", "exact_match", "parse_failure_rate"}."""
        return self._collection({
            **{kind: MultiLabelF1(kind) for kind in MultiLabelF1.KINDS},
            "parse_failure_rate": ParseFailureRate(),
        })

    def answer_to_pred(self, answer: dict) -> list[str]:
        """The answer's class list: the exact prediction."""
        return list(answer["events"])

    def constant_candidates(self, answers: Sequence[dict]) -> list[list[str]]:
        """The most frequent class sets, and the ``k`` most frequent classes for every ``k``."""
        cands = super().constant_candidates(answers)
        counts: Counter = Counter()
        spelling: dict[str, str] = {}
        for answer in answers:
            for cls in answer["events"]:
                key = label_key(cls)
                spelling.setdefault(key, cls)
                counts[key] += 1
        ranked = [spelling[k] for k in sorted(counts, key=lambda k: (-counts[k], k))]
        cands += [sorted_classes(ranked[:k]) for k in range(1, min(len(ranked), self.max_baseline_candidates) + 1)]
        seen, unique = set(), []
        for cand in cands:
            key = json.dumps(sorted(_class_set(cand)))
            if key not in seen:
                seen.add(key)
                unique.append(cand)
        return unique
