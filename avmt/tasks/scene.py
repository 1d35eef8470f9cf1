"""Reading the AVSynth scene graph (schema v2, see ``avmt/data/synth.py``): objects and their intervals."""

from __future__ import annotations

from collections import Counter
from typing import Iterable

from avmt.data.sample import SampleError
from avmt.intervals import intersect_ranges, ranges_onset, ranges_total

__all__ = [
    "scene_objects",
    "is_visible",
    "is_sounding",
    "has_overlap",
    "sort_objects",
    "ordered_objects",
    "av_object",
    "unique_class_objects",
]


def scene_objects(scene: dict) -> list[dict]:
    """The scene's objects (list of object dicts)."""
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
    """The object of the scene's audio-visual event (``scene["av_event"]["object"]``).

    Raises:
        SampleError: the scene has no single audio-visual event, or it names no object of the scene.
    """
    event = scene.get("av_event")
    if not isinstance(event, dict):
        raise SampleError(f"scene {scene.get('clip_id')!r} has no single audio-visual event (av_event is null)")
    oid = event.get("object")
    for obj in scene_objects(scene):
        if obj.get("id") == oid:
            return obj
    raise SampleError(f"scene {scene.get('clip_id')!r}: av_event.object={oid} is not an object id")


def unique_class_objects(scene: dict) -> list[dict]:
    """Objects whose class occurs once in the scene (so the class name alone refers to them)."""
    counts = Counter(o["class"] for o in scene_objects(scene))
    return [o for o in ordered_objects(scene) if counts[o["class"]] == 1]

