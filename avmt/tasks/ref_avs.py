"""``ref_avs``: referring audio-visual segmentation (Ref-AVS): the mask of the object an expression names."""

from __future__ import annotations

import random
from typing import Any, ClassVar

from torchmetrics import MetricCollection

from avmt.data.sample import Clip, SampleError
from avmt.data.synth import EXPRESSION_TEMPLATES, ORDINALS
from avmt.tasks import register_task
from avmt.tasks.base import TaskParts
from avmt.tasks.metrics import ParseFailureRate
from avmt.tasks.reasoning import object_noun, object_sentence
from avmt.tasks.scene import scene_objects
from avmt.tasks.spatial import MaskTask, object_mask, objects_mask
from avmt.tasks.spatial_metrics import MaskF, MaskJ, NullS


#: Leading articles of a dataset's expression that the prompts write in lower case (words every
#: vocabulary has; other capitalized first words stay as written, the way the manifest lists them).
_ARTICLES = {"The": "the", "A": "a", "An": "an"}


def expression_phrase(text: str) -> str:
    """A dataset's referring expression as a noun phrase for the prompts: whitespace collapsed,
    trailing full stops dropped, a leading article lower-cased ("The object making the loudest
    sound." -> "the object making the loudest sound"; "Roaring is the sound ..." stays)."""
    phrase = " ".join(str(text).split()).rstrip(". ").strip()
    first, _, rest = phrase.partition(" ")
    return f"{_ARTICLES[first]} {rest}".strip() if first in _ARTICLES else phrase


@register_task
class RefAVSTask(MaskTask):
    """Segment the object a referring expression names ("the red drum on the left", "the loudest
    object"), on every frame it is visible; a **null** expression (it names nothing that sounds)
    has the empty mask as its target.

    Reads the annotation's ``expressions`` (``[{"text", "object": id | None}]``); a null one is
    picked with probability ``null_fraction`` when the clip has one. A converted Ref-AVS clip (one
    expression per clip) is read by :meth:`compose_annotated`. Answer: ``{"mask": bool [T, H, W],
    "annotated_frames": bool [T], "null": bool, "expression": str}``. Metrics: J and F over the
    non-null samples (the Ref-AVS seen split), S = sqrt(mean predicted foreground fraction) over the
    null samples (lower is better), the failure rate (no ``<seg>``).
    """

    name = "ref_avs"
    task_id = 10
    needs_av_event = False
    text_fields = ("expressions",)
    null_fraction: ClassVar[float] = 0.25
    lower_is_better = frozenset({"parse_failure_rate", "s_null"})
    prompts = (
        "Segment {expression}.",
        "Which pixels show {expression}? Give its mask.",
        "Find {expression} in every frame and segment it.",
        "Show where {expression} is in each frame.",
    )
    phrases = (
        "So {expression} is the {noun}, and its mask is",
        "Nothing that makes a sound in this clip is {expression}.",
        "So the mask is empty:",
        "<seg>",
        *EXPRESSION_TEMPLATES.values(),
        *ORDINALS,
    )

    def _compose_clip(self, clip: Clip, rng: random.Random) -> TaskParts:
        scene = clip.scene
        expressions = scene["expressions"]
        if not all(isinstance(e, dict) and isinstance(e.get("text"), str) and e["text"].strip() and "object" in e
                   for e in expressions):
            raise SampleError(f"clip {clip.key!r}: task {self.name!r}: every expression needs a non-empty 'text' "
                              "and an 'object' (an object id, or null for a null expression)")
        null = [e for e in expressions if e.get("object") is None]
        named = [e for e in expressions if e.get("object") is not None]
        expression = rng.choice(null) if null and (not named or rng.random() < self.null_fraction) else rng.choice(named)
        text = " ".join(expression["text"].split())
        referent, named_id = None, expression.get("object")
        if named_id is not None:
            referent = next((o for o in scene_objects(scene) if o.get("id") == named_id), None)
            if referent is None:
                raise SampleError(f"clip {clip.key!r}: task {self.name!r}: expression {text!r} names object "
                                  f"{named_id!r}, which the scene does not have")
        mask = object_mask(clip, self.name, referent)
        if referent is None:
            sentences, conclusion = [f"Nothing that makes a sound in this clip is {text}."], "So the mask is empty:"
        else:
            sentences = [object_sentence(referent)]
            conclusion = f"So {text} is the {object_noun(referent)}, and its mask is"
        return self._mask_sample(self._question(rng, expression=text), sentences, conclusion, mask,
                                 null=referent is None, expression=text)

    def compose_annotated(self, clip: Clip, answer: Any, rng: random.Random) -> TaskParts:
        """Ref-AVS's own annotation (``ref-avs`` converter): ``{"expression": str, "null": bool,
        "object": class name | None}``; the referred object is mask object 0 of the clip, a null
        expression's target is the empty mask. No reasoning sentences (the dataset has none): the
        target is the AVSynth conclusion, "So {expression} is the {class}, and its mask is <seg>"
        or "So the mask is empty: <seg>", and ``<seg>`` alone without reasoning."""
        try:
            expression, null = expression_phrase(answer["expression"]), answer["null"]
            noun = answer.get("object")
        except (KeyError, TypeError, AttributeError):
            raise SampleError(f"clip {clip.key!r}: ref_avs answer {answer!r} is not "
                              "{'expression': str, 'null': bool, 'object': str | None}") from None
        named = isinstance(noun, str) and bool(noun.strip())
        if not expression or not isinstance(null, bool) or not (null or named):
            raise SampleError(f"clip {clip.key!r}: ref_avs answer {answer!r} needs a non-empty expression, a "
                              "boolean 'null' and, unless null, the referred object's class")
        mask = object_mask(clip, self.name, None) if null else objects_mask(clip, self.name, [0])
        conclusion = ("So the mask is empty:" if null
                      else f"So {expression} is the {' '.join(noun.split())}, and its mask is")
        return self._mask_sample(self._question(rng, expression=expression), [], conclusion, mask, null=null,
                                 expression=expression)

    def metrics(self) -> MetricCollection:
        """{"j", "f" (non-null samples), "s_null" (null samples), "parse_failure_rate"}."""
        return self._collection({
            "j": MaskJ(subset="non_null"), "f": MaskF(subset="non_null"), "s_null": NullS(),
            "parse_failure_rate": ParseFailureRate(),
        })
