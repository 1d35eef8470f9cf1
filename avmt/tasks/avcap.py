"""``avcap``: audio-visual captioning (free text describing the scene)."""

from __future__ import annotations

import random
from typing import Any, Sequence

from torchmetrics import MetricCollection

from avmt.tasks import register_task
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.metrics import CaptionBLEU, CaptionCIDErD, CaptionROUGEL, ParseFailureRate
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import av_object, ordered_objects

CAPTION_PHRASES = (
    "The {c} that is seen and heard is {motion}.",
    "The mood is {mood}.",
)


def scene_caption(scene: dict) -> str:
    """The reference caption: one sentence per object in onset order, the AV object's motion,
    the mood. E.g. "A red violin on the left is seen and heard from second 2 to second 7. A dog
    is heard from second 0 to second 3 but not seen. The violin that is seen and heard is
    moving right. The mood is happy." """
    sentences = [object_sentence(o) for o in ordered_objects(scene)]
    av = av_object(scene)
    motion = scene.get("action") or av.get("motion")
    if motion:
        sentences.append(CAPTION_PHRASES[0].format(c=av["class"], motion=motion))
    if scene.get("mood"):
        sentences.append(CAPTION_PHRASES[1].format(mood=scene["mood"]))
    return " ".join(sentences)


@register_task
class AVCapTask(Task):
    """Describe what is seen and heard. The caption is itself the description, so the target is
    the caption with or without ``reasoning`` (there is no tag). Answer: the caption string.
    Metrics: BLEU-4, ROUGE-L and CIDEr-D on normalized text (lower case, punctuation split off)."""

    name = "avcap"
    task_id = 1
    prompts = (
        "Describe what is seen and heard in this clip.",
        "Write a caption for this clip that says what can be seen and heard, and when.",
        "What happens in this clip? Describe the sights and the sounds.",
        "Give a short description of the objects in this clip, when they are seen and heard, and the mood.",
    )
    phrases = CAPTION_PHRASES

    def _compose(self, scene: dict, rng: random.Random) -> TaskParts:
        caption = scene_caption(scene)
        return TaskParts(self._question(rng), [], caption, caption, caption)

    def parse(self, text: Any) -> str | None:
        """The generated text with whitespace collapsed; None if not a string or empty."""
        if not isinstance(text, str):
            return None
        return " ".join(text.split()) or None

    def metrics(self) -> MetricCollection:
        """{"bleu4", "rouge_l", "cider_d", "parse_failure_rate"}."""
        return self._collection({"bleu4": CaptionBLEU(n_gram=4), "rouge_l": CaptionROUGEL(),
                                 "cider_d": CaptionCIDErD(), "parse_failure_rate": ParseFailureRate()})

    def constant_candidates(self, answers: Sequence[str]) -> list[str]:
        """The 16 most frequent captions: each candidate costs a full BLEU / ROUGE-L / CIDEr-D pass
        over ``answers`` (measured: ~1.3 s per 500 captions on a CPU core, CIDEr-D ~0.2 s of it)."""
        return super().constant_candidates(answers)[:16]
