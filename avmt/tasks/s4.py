"""``s4``: single-source audio-visual segmentation (AVSBench S4): the mask of what sounds, per frame."""

from __future__ import annotations

import random
from typing import Any

from avmt.data.sample import Clip, SampleError
from avmt.tasks import register_task
from avmt.tasks.base import TaskParts
from avmt.tasks.reasoning import object_noun, object_sentence
from avmt.tasks.scene import av_object, scene_objects
from avmt.tasks.spatial import MaskTask, annotated_segments, objects_mask, sounding_mask


@register_task
class S4Task(MaskTask):
    """Segment the one object that makes the sound, on every segment frame.

    Applies to single-source scenes (one audio-visual event) and to converted AVSBench S4 clips.
    Target mask ``[T, H, W]``: on frame t, the pixels of the objects sounding in segment t (here:
    the audio-visual object while it is heard and seen; AVSBench: the annotated sounding object).
    Target text: ``... <seg>``. Answer: ``{"mask": bool [T, H, W], "annotated_frames": bool [T]}``.
    """

    name = "s4"
    task_id = 7
    prompts = (
        "Segment the object that makes the sound in every frame.",
        "Which pixels belong to the object that is heard? Give its mask.",
        "Find the sounding object and segment it.",
        "Show where the sound comes from in each frame.",
    )
    phrases = (
        "So the object that makes the sound is the {noun}, and its mask is",
        "So the sound is {sound}, and the object that makes it is masked by",
        "<seg>",
    )

    def _compose_clip(self, clip: Clip, rng: random.Random) -> TaskParts:
        scene = clip.scene
        source = av_object(scene)
        mask = sounding_mask(clip, self.name, scene_objects(scene))
        conclusion = f"So the object that makes the sound is the {object_noun(source)}, and its mask is"
        return self._mask_sample(self._question(rng), [object_sentence(source)], conclusion, mask)

    def compose_annotated(self, clip: Clip, answer: Any, rng: random.Random) -> TaskParts:
        """AVSBench S4 (``avsbench`` converter): ``{"class": the clip's sound category, "objects":
        [mask object ids]}``; the target is the union of those objects' masks on the annotated frames."""
        if not isinstance(answer, dict) or not isinstance(answer.get("class"), str) or not answer["class"].strip():
            raise SampleError(f"clip {clip.key!r}: s4 answer {answer!r} is not {{'class': str, 'objects': [id, ...]}}")
        object_ids = answer.get("objects", list(range(len(clip.scene.get("objects", [])))))
        if not isinstance(object_ids, list):
            raise SampleError(f"clip {clip.key!r}: s4 answer objects {object_ids!r} is not a list of mask object ids")
        mask = objects_mask(clip, self.name, object_ids)
        conclusion = f"So the sound is {' '.join(answer['class'].split())}, and the object that makes it is masked by"
        return self._mask_sample(self._question(rng), [], conclusion, mask, annotated_segments(clip))
