"""``ms3``: multi-source audio-visual segmentation (AVSBench MS3): the mask of every object that sounds."""

from __future__ import annotations

import random
from typing import Any

from avmt.data.annotation import is_annotation
from avmt.data.sample import Clip, SampleError
from avmt.tasks import register_task
from avmt.tasks.base import TaskParts
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import has_overlap, ordered_objects, scene_objects
from avmt.tasks.spatial import MaskTask, annotated_segments, objects_mask, sounding_mask


@register_task
class MS3Task(MaskTask):
    """Segment every object that sounds, on every segment frame (silent objects stay out).

    Applies to multi-source scenes (several objects seen and heard at once; no single
    audio-visual event) and to converted AVSBench MS3 clips. Target mask ``[T, H, W]``: on frame t,
    the pixels of the objects sounding in segment t. Target text: ``... <seg>``. Answer:
    ``{"mask": bool [T, H, W], "annotated_frames": bool [T]}``.
    """

    name = "ms3"
    task_id = 8
    needs_av_event = False
    prompts = (
        "Segment every object that makes a sound in every frame.",
        "Which pixels belong to the objects that are heard? Give their mask.",
        "Find all the sounding objects and segment them.",
        "Show where the sounds come from in each frame.",
    )
    phrases = ("So the objects that make the sounds are masked by", "<seg>")

    def applies(self, clip: Clip) -> bool:
        """Only multi-source scenes (the scene has no single audio-visual event), or converted clips
        with an ms3 answer."""
        if is_annotation(clip.scene):
            return super().applies(clip)
        return isinstance(clip.scene, dict) and clip.scene.get("av_event", {}) is None

    def _compose_clip(self, clip: Clip, rng: random.Random) -> TaskParts:
        scene = clip.scene
        mask = sounding_mask(clip, self.name, scene_objects(scene))
        sentences = [object_sentence(o) for o in ordered_objects(scene) if has_overlap(o)]
        conclusion = "So the objects that make the sounds are masked by"
        return self._mask_sample(self._question(rng), sentences, conclusion, mask)

    def compose_annotated(self, clip: Clip, answer: Any, rng: random.Random) -> TaskParts:
        """AVSBench MS3 (``avsbench`` converter): ``{"objects": [mask object ids]}``; the target is the
        union of those objects' masks (every sounding object) on the annotated frames."""
        object_ids = answer.get("objects") if isinstance(answer, dict) else None
        if not isinstance(object_ids, list):
            raise SampleError(f"clip {clip.key!r}: ms3 answer {answer!r} is not {{'objects': [id, ...]}}")
        mask = objects_mask(clip, self.name, object_ids)
        conclusion = "So the objects that make the sounds are masked by"
        return self._mask_sample(self._question(rng), [], conclusion, mask, annotated_segments(clip))
