"""``emotion``: recognize the mood of the clip."""

from __future__ import annotations

from avmt.data.vocab import MOODS
from avmt.tasks import register_task
from avmt.tasks.label import LabelTask
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import ordered_objects


@register_task
class EmotionTask(LabelTask):
    """Mood of the scene (``scene["mood"]``), one of ``MOODS``. Target: ``<answer> {mood} </answer>``."""

    name = "emotion"
    task_id = 5
    needs_av_event = False  # applies to multi-source scenes too
    labels = MOODS
    conclusion_template = "So the mood of the clip is {answer}."
    prompts = (
        "What is the mood of this clip?",
        "Which emotion does this clip convey: happy, sad, calm or tense?",
        "How does this clip feel?",
        "What feeling do the sights and sounds of this clip express?",
    )

    def label(self, scene: dict) -> str:
        """``scene["mood"]``."""
        return scene["mood"]

    def sentences(self, scene: dict) -> list[str]:
        """What is seen and heard and when (the mood comes from the tempo and pitch of the sounds)."""
        return [object_sentence(o) for o in ordered_objects(scene)]
