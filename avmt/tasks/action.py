"""``action``: recognize the motion of the object that is both seen and heard."""

from __future__ import annotations

from avmt.data.vocab import MOTIONS
from avmt.tasks import register_task
from avmt.tasks.label import LabelTask
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import av_object

#: What each motion looks like (the reasoning's visual evidence).
MOTION_EVIDENCE = {
    "static": "It stays in the same place.",
    "moving left": "It moves toward the left.",
    "moving right": "It moves toward the right.",
    "moving up": "It moves upward.",
    "moving down": "It moves downward.",
    "pulsing": "It grows and shrinks in place.",
}


@register_task
class ActionTask(LabelTask):
    """Motion of the audio-visual event object (``scene["action"]``), one of ``MOTIONS``.

    Target: ``<answer> {motion} </answer>``, e.g. ``<answer> moving left </answer>``.
    """

    name = "action"
    task_id = 0
    labels = MOTIONS
    conclusion_template = "So the action is {answer}."
    prompts = (
        "What is the object that is both seen and heard doing?",
        "How does the sounding object that is visible move?",
        "Which action does the object that is seen and heard perform: static, moving left, moving right, "
        "moving up, moving down or pulsing?",
        "Describe the motion of the object that makes the sound it is seen with.",
    )
    phrases = tuple(MOTION_EVIDENCE.values())

    def label(self, scene: dict) -> str:
        """``scene["action"]`` (falls back to the AV object's ``motion``)."""
        return scene.get("action") or av_object(scene)["motion"]

    def sentences(self, scene: dict) -> list[str]:
        """What the AV object is, when it is seen and heard, and how it moves."""
        return [object_sentence(av_object(scene)), MOTION_EVIDENCE[self.label(scene)]]
