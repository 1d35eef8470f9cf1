"""``avvp``: audio-visual video parsing (audio events and visual events, each class with ranges)."""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from typing import Any, Sequence

from torchmetrics import MetricCollection

from avmt.data.sample import Clip, SampleError
from avmt.intervals import merge_ranges
from avmt.tasks import register_task
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.formats import AnswerFormat, TaggedText
from avmt.tasks.metrics import AVVPF1, ParseFailureRate
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import ordered_objects, scene_objects
from avmt.tasks.text import extract_tag

#: What may stand between items and around the whole list.
_SEPARATORS = " ,;\t\n\r\f\v"
#: time pattern of a format -> (one range ``(s e)``, the ranges part of one item: the comma that
#: ends its class, then one or more ranges, spaces or commas between them, an optional trailing comma)
_PATTERNS: dict[str, tuple[re.Pattern[str], re.Pattern[str]]] = {}


def _patterns(answer_format: AnswerFormat) -> tuple[re.Pattern[str], re.Pattern[str]]:
    time = answer_format.time_pattern
    if time not in _PATTERNS:
        one = rf"\(\s*{time}\s*[\s,\-]\s*{time}\s*\)"
        _PATTERNS[time] = (re.compile(one), re.compile(rf",\s*((?:{one}\s*,?\s*)+)"))
    return _PATTERNS[time]


def events_text(events: dict[str, list[list[int]]], answer_format: AnswerFormat | None = None) -> str:
    """``{"violin": [[2, 7], [8, 10]], "dog": [[0, 3]]}`` -> "violin,(2 7) (8 10) dog,(0 3)".

    Classes in the dict's order (targets order them by onset), written as they are (real names
    such as "Frying_(food)" or "Male speech, man speaking" included; :func:`parse_events` reads
    them back). Each time as ``answer_format`` writes it (:class:`~avmt.tasks.formats.DiscreteTokens`:
    ``violin,(<t_2> <t_7>)``)."""
    fmt = answer_format or TaggedText()
    return " ".join(f"{c}," + " ".join(f"({fmt.time(s)} {fmt.time(e)})" for s, e in ranges)
                    for c, ranges in events.items())


def parse_events(content: str | None, answer_format: AnswerFormat | None = None) -> dict[str, list[list[int]]] | None:
    """Inverse of :func:`events_text`, tolerant: ``"violin,(2 7),(8 10) violin,(1,2)"`` is fine.

    Grammar: the content is a sequence of items ``CLASS,RANGES`` where RANGES is one or more
    ``(s e)`` (``(s,e)`` / ``(s-e)`` too; s and e as ``answer_format`` writes times), separated by
    spaces or commas. The class of an item is
    everything after the previous item's ranges up to the last ``,`` before its first range, i.e.
    up to the first ``,`` that is followed (after optional spaces) by ``(digits``; it may hold
    spaces, commas, underscores, hyphens and parentheses ("Male speech, man speaking",
    "Frying_(food)", "Race car, auto racing"), and comes back as written, whitespace collapsed
    (case kept). Unambiguous as long as no class itself contains ``,(digits digits)``; a class
    that holds a whole ``(s e)`` range, or ``<`` / ``>``, is rejected. Spaces, commas and ``;``
    between items are ignored.

    Returns class -> merged ranges ({} for empty content; entries of the same class merged), or
    None when the content has text that is not such an item (an empty class, text after the
    last ranges, a class holding a range).
    """
    if content is None:
        return None
    one, ranges_re = _patterns(answer_format or TaggedText())
    out: dict[str, list[list[int]]] = {}
    pos = 0
    for m in ranges_re.finditer(content):
        cls = " ".join(content[pos:m.start()].strip(_SEPARATORS).split())
        if not cls or "<" in cls or ">" in cls or one.search(cls):
            return None
        ranges = [[int(s), int(e)] for s, e in one.findall(m.group(1))]
        out[cls] = merge_ranges(out.get(cls, []) + ranges)
        pos = m.end()
    if content[pos:].strip(_SEPARATORS):
        return None
    return out


def scene_events(scene: dict, key: str) -> dict[str, list[list[int]]]:
    """Per-class merged ``key`` ("sounding" or "visible") ranges, classes ordered by onset."""
    out: dict[str, list[list[int]]] = {}
    for obj in scene_objects(scene):
        if obj.get(key):
            out[obj["class"]] = merge_ranges(out.get(obj["class"], []) + [list(r) for r in obj[key]])
    return dict(sorted(out.items(), key=lambda kv: (kv[1][0][0], kv[0])))


def order_events(events: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    """Per-class merged ranges, classes ordered by onset then name (the order targets list them in);
    classes without a non-empty range are dropped."""
    merged = {cls: merge_ranges(ranges) for cls, ranges in events.items()}
    return dict(sorted(((c, r) for c, r in merged.items() if r), key=lambda kv: (kv[1][0][0], kv[0])))


def avvp_tags(audio: dict[str, list[list[int]]], visual: dict[str, list[list[int]]],
              answer_format: AnswerFormat | None = None) -> tuple[str, str]:
    """The two tagged halves of an avvp target: ``("<audio_event> dog,(0 3) </audio_event>",
    "<visual_event> </visual_event>")`` (an empty pair when there are no events)."""
    a_tag = f"<audio_event> {events_text(audio, answer_format)} </audio_event>".replace("  ", " ")
    v_tag = f"<visual_event> {events_text(visual, answer_format)} </visual_event>".replace("  ", " ")
    return a_tag, v_tag


def _annotated_events(clip: Clip, answer: Any, key: str) -> dict[str, list[list[int]]]:
    """``answer[key]`` of a converted clip checked: class -> ``[[s, e], ...]`` whole segments with
    ``0 <= s < e <= T``; returned merged and ordered (:func:`order_events`).

    Raises:
        SampleError: not that structure, or a range outside the clip (names the clip and the class).
    """
    events = answer.get(key) if isinstance(answer, dict) else None
    if not isinstance(events, dict):
        raise SampleError(f"clip {clip.key!r}: avvp answer has no {key!r} events dict "
                          f"({{'audio': {{class: [[s, e], ...]}}, 'visual': {{...}}}} expected)")
    out: dict[str, list[list[int]]] = {}
    for cls, ranges in events.items():
        if not isinstance(cls, str) or not cls.strip() or not isinstance(ranges, list):
            raise SampleError(f"clip {clip.key!r}: avvp {key} event {cls!r}: {ranges!r} is not class -> [[s, e], ...]")
        for pair in ranges:
            valid = (isinstance(pair, (list, tuple)) and len(pair) == 2
                     and all(isinstance(v, int) and not isinstance(v, bool) for v in pair))
            if not valid or not 0 <= pair[0] < pair[1] <= clip.num_segments:
                raise SampleError(f"clip {clip.key!r}: avvp {key} range {pair!r} of {cls!r} is not [s, e] "
                                  f"with 0 <= s < e <= {clip.num_segments}")
        out[cls] = [list(pair) for pair in ranges]
    return order_events(out)


@register_task
class AVVPTask(Task):
    """Parse the clip into audio events (sounding intervals per class) and visual events
    (visible intervals per class).

    Target: ``<audio_event> violin,(2 7) dog,(0 3) (8 10) </audio_event> <visual_event> ... </visual_event>``.
    Answer: ``{"audio": {cls: [[s, e], ...]}, "visual": {...}, "num_segments": T}``.
    """

    name = "avvp"
    task_id = 4
    needs_av_event = False  # applies to multi-source scenes too
    prompts = (
        "Parse this clip into audio events and visual events, with the class and time range of each.",
        "Which events are heard and which are seen in this clip, and when? List the audio events and the "
        "visual events.",
        "List every sound event and every visual event in the clip with its class and time ranges.",
        "What can be heard and what can be seen in this clip? Give the class and the time ranges of each "
        "audio event and each visual event.",
    )
    phrases = (
        "So the audio events are {audio} and the visual events are {visual}.",
        "<audio_event> {c},({s} {e}) </audio_event> <visual_event> {c},({s} {e}) </visual_event>",
    )

    def _compose(self, scene: dict, rng: random.Random) -> TaskParts:
        audio, visual = scene_events(scene, "sounding"), scene_events(scene, "visible")
        a_tag, v_tag = avvp_tags(audio, visual, self.format)
        return TaskParts(
            question=self._question(rng),
            sentences=[object_sentence(o) for o in ordered_objects(scene)],
            conclusion=f"So the audio events are {a_tag} and the visual events are {v_tag}.",
            bare=f"{a_tag} {v_tag}",
            answer={"audio": audio, "visual": visual, "num_segments": int(scene["num_segments"])},
        )

    def compose_annotated(self, clip: Clip, answer: Any, rng: random.Random) -> TaskParts:
        """LLP's dense evaluation labels (``llp`` converter, val / test clips):
        ``{"audio": {class: [[s, e], ...]}, "visual": {...}}`` in segments, ``[s, e)`` per class.

        The target is the AVSynth one without reasoning sentences: ``<audio_event> Speech,(0 8)
        Blender,(8 10) </audio_event> <visual_event> ... </visual_event>`` (classes by onset, ranges
        merged); the answer adds ``num_segments``. No events of a kind is the empty tag pair.

        Raises:
            SampleError: the answer is not that structure, or a range lies outside the clip.
        """
        audio, visual = _annotated_events(clip, answer, "audio"), _annotated_events(clip, answer, "visual")
        a_tag, v_tag = avvp_tags(audio, visual, self.format)
        return TaskParts(
            question=self._question(rng),
            sentences=[],
            conclusion=f"So the audio events are {a_tag} and the visual events are {v_tag}.",
            bare=f"{a_tag} {v_tag}",
            answer={"audio": audio, "visual": visual, "num_segments": clip.num_segments},
        )

    def parse(self, text: Any) -> dict | None:
        """``{"audio": {...}, "visual": {...}}``; None if a tag is missing or holds non-events.
        Class names come back as written (see :func:`parse_events`). An empty tag pair (``<audio_event> </audio_event>``) is a valid "no events"."""
        try:
            if not isinstance(text, str):
                return None
            out = {}
            for key, tag in (("audio", "audio_event"), ("visual", "visual_event")):
                content = extract_tag(text, tag, keep_case=True)
                if content is None:
                    if not re.search(rf"<\s*{tag}\s*>\s*<\s*/\s*{tag}\s*>", text, re.IGNORECASE):
                        return None
                    content = ""
                events = parse_events(content, self.format)
                if events is None:
                    return None
                out[key] = events
            return out
        except Exception:  # never raises
            return None

    def metrics(self) -> MetricCollection:
        """``{segment,event}_f1/{audio,visual,audio_visual,type_av,event_av}`` + parse_failure_rate."""
        metrics: dict = {f"{level}_f1": AVVPF1(level=level, kind=None) for level in ("segment", "event")}
        metrics["parse_failure_rate"] = ParseFailureRate()
        return self._collection(metrics)

    def answer_to_pred(self, answer: dict) -> dict:
        """Drop ``num_segments``: the exact prediction for ``answer``."""
        return {"audio": answer["audio"], "visual": answer["visual"]}

    def constant_candidates(self, answers: Sequence[dict]) -> list[dict]:
        """The most frequent answers, no events, and for each class seen: that class over the
        whole clip as audio only, visual only, and both. (No closed form exists for the best
        constant under per-video F1, so this family stands in for it.)"""
        cands = super().constant_candidates(answers)
        num_segments = max(int(a["num_segments"]) for a in answers)
        full = [[0, num_segments]]
        cands.append({"audio": {}, "visual": {}})
        counts: Counter = Counter()
        for a in answers:
            counts.update(set(a["audio"]) | set(a["visual"]))
        for cls in sorted(counts, key=lambda c: (-counts[c], c)):
            cands += [
                {"audio": {cls: full}, "visual": {}},
                {"audio": {}, "visual": {cls: full}},
                {"audio": {cls: full}, "visual": {cls: full}},
            ]
        seen, unique = set(), []
        for c in cands:
            key = json.dumps(c, sort_keys=True)
            if key not in seen:
                seen.add(key)
                unique.append(c)
        return unique
