"""``ssu``: fine-grained sound-source understanding (AVUFormer): the source's mask and a description of it."""

from __future__ import annotations

import random
from typing import Sequence

import torch
from torchmetrics import MetricCollection

from avmt.data.sample import Clip, SampleError
from avmt.data.synth import DESCRIPTION_TEMPLATE, MOTION_PHRASES
from avmt.tasks import register_task
from avmt.tasks.base import TaskParts
from avmt.tasks.metrics import CaptionBLEU, CaptionCIDErD, CaptionROUGEL, ParseFailureRate
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import av_object, scene_objects
from avmt.tasks.spatial import MaskTask, sounding_mask
from avmt.tasks.spatial_metrics import MaskF, MaskJ
from avmt.tasks.text import extract_tag


class _DescriptionMetric:
    """Mixin: score the ``"description"`` of predictions (None -> "") against the targets'."""

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:  # type: ignore[override]
        super().update([p.get("description") if p else None for p in preds],  # type: ignore[misc]
                       [t["description"] for t in targets])


class DescriptionBLEU(_DescriptionMetric, CaptionBLEU):
    """BLEU-4 of the region descriptions."""


class DescriptionROUGEL(_DescriptionMetric, CaptionROUGEL):
    """ROUGE-L of the region descriptions."""


class DescriptionCIDErD(_DescriptionMetric, CaptionCIDErD):
    """CIDEr-D of the region descriptions (document frequencies over the evaluated descriptions)."""


@register_task
class SSUTask(MaskTask):
    """Segment the sounding source on every frame and describe its region.

    Applies to single-source scenes. Target text: ``<seg> <desc> {description} </desc>`` (with
    reasoning: a sentence on when it is seen and heard first). Answer: ``{"mask": bool [T, H, W],
    "description": str}``. Metrics: J and F of the mask, BLEU-4, ROUGE-L and CIDEr-D of the description,
    the failure rate (no ``<seg>`` or no description).
    """

    name = "ssu"
    task_id = 11
    prompts = (
        "Segment the source of the sound and describe its region.",
        "Which region makes the sound? Describe it and give its mask.",
        "Find the sounding source, describe it and segment it.",
        "Describe where the sound comes from and segment that region.",
    )
    phrases = ("So the sound comes from", "<seg> <desc> {d} </desc>", DESCRIPTION_TEMPLATE, *MOTION_PHRASES.values())

    def _compose_clip(self, clip: Clip, rng: random.Random) -> TaskParts:
        scene = clip.scene
        source = av_object(scene)
        description = source.get("description")
        if not isinstance(description, str) or not description.strip():
            raise SampleError(f"clip {clip.key!r}: task {self.name!r} needs the description of object {source['id']}")
        mask = sounding_mask(clip, self.name, scene_objects(scene))
        tagged = f"<desc> {description} </desc>"
        parts = self._mask_sample(self._question(rng), [object_sentence(source)], "So the sound comes from", mask,
                                  description=description)
        # the mask first: a head that feeds its mask back (AVUFormer's mask collaboration) informs the description
        parts.conclusion, parts.bare = f"{parts.conclusion} {tagged}", f"{parts.bare} {tagged}"
        return parts

    def predict(self, text: str, outputs: dict[str, torch.Tensor]) -> dict | None:
        """``{"mask": probabilities [T, H, W], "description": str}``; None when either is missing."""
        mask = super().predict(text, outputs)
        description = extract_tag(text, "desc")
        if mask is None or description is None:
            return None
        return {**mask, "description": description}

    def metrics(self) -> MetricCollection:
        """{"j", "f", "bleu4", "rouge_l", "cider_d", "parse_failure_rate"}."""
        return self._collection({
            "j": MaskJ(), "f": MaskF(), "bleu4": DescriptionBLEU(n_gram=4), "rouge_l": DescriptionROUGEL(),
            "cider_d": DescriptionCIDErD(), "parse_failure_rate": ParseFailureRate(),
        })

    def answer_to_pred(self, answer: dict) -> dict:
        """The target mask as probabilities and the description, normalized like the parser's."""
        return {"mask": answer["mask"].float(), "description": " ".join(answer["description"].split()).lower()}

    def constant_candidates(self, answers: Sequence[dict]) -> list[dict]:
        """The constant masks of :class:`MaskTask` with the most frequent description."""
        descriptions = [a["description"] for a in answers]
        common = max(sorted(set(descriptions)), key=descriptions.count)
        return [None if c is None else {**c, "description": common} for c in super().constant_candidates(answers)]

