"""``unav``: dense audio-visual event localization (UnAV-100 style): every event seen and heard, with its range."""

from __future__ import annotations

import random
import re
from collections import Counter
from typing import Any, Sequence

from torchmetrics import MetricCollection

from avmt.data.sample import Clip, SampleError
from avmt.intervals import intersect_ranges, merge_ranges
from avmt.tasks import register_task
from avmt.tasks.ave import event_tags
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.formats import AnswerFormat
from avmt.tasks.localization_metrics import MAP_THRESHOLDS, TemporalDetectionMAP, temporal_iou
from avmt.tasks.metrics import ParseFailureRate
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import ordered_objects, scene_objects
from avmt.tasks.text import clean_text

__all__ = ["av_events", "events_tags", "UNAVTask"]

#: The ``<event>`` / ``<range>`` tags (opening or closing), whitespace and case tolerant.
_TAG_RE = re.compile(r"<\s*(/?)\s*(event|range)\s*>", re.IGNORECASE)
#: The tag sequence of one event: open, close, then its range open, close.
_PAIR = (("", "event"), ("/", "event"), ("", "range"), ("/", "range"))


def av_events(scene: dict) -> list[dict]:
    """Every audio-visual event of ``scene``: ``[{"class", "range"}, ...]`` sorted by (onset, class).

    An object's events are the maximal runs of segments where it is both visible and sounding;
    the events of objects of the same class are merged per class (touching or overlapping runs
    become one event). Events of different classes may overlap.
    """
    per_class: dict[str, list[list[int]]] = {}
    for obj in scene_objects(scene):
        runs = intersect_ranges(obj.get("visible", []), obj.get("sounding", []))
        if runs:
            per_class[obj["class"]] = merge_ranges(per_class.get(obj["class"], []) + runs)
    events = [{"class": c, "range": r} for c, ranges in per_class.items() for r in ranges]
    return sorted(events, key=lambda ev: (ev["range"][0], ev["class"], ev["range"][1]))


def events_tags(events: Sequence[dict], answer_format: AnswerFormat | None = None) -> str:
    """``[{"class": "violin", "range": [2, 7]}, ...]`` -> "<event> violin </event> <range> 2,7 </range> ..."
    (each range as ``answer_format`` writes it)."""
    return " ".join(event_tags(ev["class"], ev["range"], answer_format) for ev in events)


@register_task
class UNAVTask(Task):
    """Find every event that is both seen and heard and give the range of each (dense localization).

    Target: ``<event> {class} </event> <range> s,e </range>`` once per event, in answer order.
    Answer: ``{"events": [{"class": c, "range": [s, e]}, ...], "num_segments": T}``, events as
    :func:`av_events` (sorted by onset, then class; >= 1). Applies to any scene (single- or
    multi-source) with at least one audio-visual event. Metric: temporal detection mAP at tIoU
    0.5..0.9 and their mean (:class:`~avmt.tasks.localization_metrics.TemporalDetectionMAP`).
    """

    name = "unav"
    task_id = 12
    needs_av_event = False  # multi-source scenes have several events
    baseline_name = "best constant range"
    prompts = (
        "Find every event that is both seen and heard in this clip and give the time range of each.",
        "List all the audio-visual events in this clip: the class of each object that is seen and heard at the "
        "same time, and its time range.",
        "Which events can be both seen and heard in this clip, and when does each of them happen?",
        "Localize all the events that are audible and visible. Answer with the class and the time range of each.",
    )
    phrases = (
        "So the audible and visible events are {events}.",
        "<event> {c} </event> <range> {s},{e} </range>",
    )

    def applies(self, clip: Clip) -> bool:
        """True when the clip's scene has at least one audio-visual event (no event: no sample)."""
        scene = clip.scene if isinstance(clip.scene, dict) else {}
        try:
            return bool(av_events(scene))
        except Exception:  # a malformed scene: build reports it, applies only says "not this one"
            return False

    def _compose(self, scene: dict, rng: random.Random) -> TaskParts:
        events = av_events(scene)
        if not events:
            raise SampleError(f"clip {scene.get('clip_id')!r}: task {self.name!r} needs an audio-visual event "
                              "and the scene has none")
        tags = events_tags(events, self.format)
        return TaskParts(
            question=self._question(rng),
            sentences=[object_sentence(o) for o in ordered_objects(scene)],
            conclusion=f"So the audible and visible events are {tags}.",
            bare=tags,
            answer={"events": events, "num_segments": int(scene["num_segments"])},
        )

    def parse(self, text: Any) -> list[dict] | None:
        """``[{"class": str, "range": [s, e]}, ...]``: every ``<event> X </event>`` with the
        ``<range> s,e </range>`` that follows it, in output order (duplicates kept).

        A class is everything between ``<event>`` and ``</event>`` as written (case and inner
        punctuation kept, whitespace collapsed): "Race car, auto racing", "Frying (food)".
        Tags are case and whitespace tolerant, and any text may stand between an event's tags and
        its range (e.g. ", and the time range is"). Returns None (a parse failure) when the text
        has no complete event/range pair, when the ``<event>``/``<range>`` tags do not form a
        sequence of such pairs (an event without a range, a stray or unclosed tag), when a class
        is empty, or when a range is not ``s,e`` with ``s < e``. No pair at all is a failure, not
        an empty prediction: every answer has at least one event. Never raises.
        """
        try:
            if not isinstance(text, str):
                return None
            tags = list(_TAG_RE.finditer(text))
            if not tags or len(tags) % 4:
                return None
            out = []
            for i in range(0, len(tags), 4):
                group = tags[i:i + 4]
                if tuple((m.group(1), m.group(2).lower()) for m in group) != _PAIR:
                    return None
                cls = clean_text(text[group[0].end():group[1].start()])  # as written, case kept
                rng = self.format.parse_range(text[group[2].end():group[3].start()])
                if not cls or rng is None or rng[1] <= rng[0]:
                    return None
                out.append({"class": cls, "range": rng})
            return out
        except Exception:  # never raises
            return None

    def metrics(self) -> MetricCollection:
        """``map@0.5`` .. ``map@0.9`` (one threshold each), ``map`` (mean of the five) and
        ``parse_failure_rate``."""
        # entry names cannot hold "." (torch modules): "map_0_5" reports as "map@0.5" (its key)
        metrics: dict = {f"map_{t}".replace(".", "_"): TemporalDetectionMAP(thresholds=(t,), key=f"map@{t}")
                         for t in MAP_THRESHOLDS}
        metrics["map"] = TemporalDetectionMAP(thresholds=MAP_THRESHOLDS)
        metrics["parse_failure_rate"] = ParseFailureRate()
        return self._collection(metrics)

    def answer_to_pred(self, answer: dict) -> list[dict]:
        """The answer's events (without ``num_segments``): the exact prediction."""
        return [{"class": ev["class"], "range": list(ev["range"])} for ev in answer["events"]]

    def constant_candidates(self, answers: Sequence[dict]) -> list[list[dict]]:
        """Single-event constants ``[{"class": c, "range": [s, e]}]``: the best one for each key.

        The family is exhaustive: every class seen (most frequent first) x every range
        ``0 <= s < e <= T``. Scoring all of them through the metrics (16 classes x 55 ranges =
        880 metric collections) takes seconds, so they are ranked here in closed form and only
        the best for each mAP key goes through the metrics: a constant predicts class c once per
        clip, all at the same rank (one tie group), so with TP_t = the clips with a class-c event
        at tIoU >= t, N clips and G_c class-c events, AP_c = recall x precision =
        TP_t^2 / (N G_c), and the mAP divides it by the number of classes with events.
        """
        num_segments = max(int(a["num_segments"]) for a in answers)
        counts: Counter = Counter(ev["class"] for a in answers for ev in a["events"])
        classes = sorted(counts, key=lambda c: (-counts[c], c))
        ranges = [(s, e) for s in range(num_segments) for e in range(s + 1, num_segments + 1)]
        # tp[c][(s, e)][k]: clips with a class-c event at tIoU >= threshold k of the range (s, e)
        tp: dict[str, dict[tuple[int, int], list[int]]] = {c: {r: [0] * len(MAP_THRESHOLDS) for r in ranges}
                                                            for c in classes}
        for answer in answers:
            by_class: dict[str, list] = {}
            for ev in answer["events"]:
                by_class.setdefault(ev["class"], []).append(ev["range"])
            t_clip = int(answer["num_segments"])
            for cls, gts in by_class.items():
                for r in ranges:
                    best = max(temporal_iou(r, g, t_clip) for g in gts)
                    row = tp[cls][r]
                    for k, t in enumerate(MAP_THRESHOLDS):
                        row[k] += best >= t
        n = len(answers)
        scored = []  # (per-threshold AP, candidate), in the deterministic family order
        for cls in classes:
            for r in ranges:
                aps = [hits * hits / (n * counts[cls]) for hits in tp[cls][r]]
                scored.append((aps, [{"class": cls, "range": list(r)}]))
        best_per_key = [max(scored, key=lambda sc, k=k: sc[0][k])[1] for k in range(len(MAP_THRESHOLDS))]
        best_per_key.append(max(scored, key=lambda sc: sum(sc[0]))[1])
        out: list[list[dict]] = []
        for cand in best_per_key:  # unique, first occurrence kept
            if cand not in out:
                out.append(cand)
        return out
