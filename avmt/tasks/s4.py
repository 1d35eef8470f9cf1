"""``s4``: single-source audio-visual segmentation (AVSBench S4): the mask of what sounds, per frame."""

from __future__ import annotations

import random

from avmt.data.sample import Clip
from avmt.tasks import register_task
from avmt.tasks.base import TaskParts
from avmt.tasks.reasoning import object_noun, object_sentence
from avmt.tasks.scene import av_object, scene_objects
from avmt.tasks.spatial import MaskTask, sounding_mask


@register_task
class S4Task(MaskTask):
    """Segment the one object that makes the sound, on every segment frame.

    Applies to single-source scenes (one audio-visual event). Target mask ``[T, H, W]``: on frame
    t, the pixels of the objects sounding in segment t (here: the audio-visual object while it is
    heard and seen). Target text: ``... <seg>``. Answer: ``{"mask": bool [T, H, W]}``.
    """

    name = "s4"
    task_id = 7
    prompts = (
        "Segment the object that makes the sound in every frame.",
        "Which pixels belong to the object that is heard? Give its mask.",
        "Find the sounding object and segment it.",
        "Show where the sound comes from in each frame.",
    )
    phrases = ("So the object that makes the sound is the {noun}, and its mask is", "<seg>")

    def _compose_clip(self, clip: Clip, rng: random.Random) -> TaskParts:
        scene = clip.scene
        source = av_object(scene)
        mask = sounding_mask(clip, self.name, scene_objects(scene))
        conclusion = f"So the object that makes the sound is the {object_noun(source)}, and its mask is"
        return self._mask_sample(self._question(rng), [object_sentence(source)], conclusion, mask)
