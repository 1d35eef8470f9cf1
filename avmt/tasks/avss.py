"""``avss``: audio-visual semantic segmentation (AVSBench-semantic): a class map of what sounds, per frame."""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

import torch
from torchmetrics import MetricCollection

from avmt.data.sample import Clip, Dense, DenseSpec, MediaRef
from avmt.data.vocab import CLASSES
from avmt.intervals import ranges_to_mask
from avmt.losses import class_map_cross_entropy
from avmt.plots import class_map_panel
from avmt.tasks import register_task
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.metrics import ParseFailureRate
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import has_overlap, ordered_objects
from avmt.tasks.spatial import SEG
from avmt.tasks.spatial_metrics import ClassMapF, ClassMapIoU
from avmt.tasks.text import clean_text, label_key, wrap_tag

#: Class ids of the class maps: 0 = background, ``i + 1`` = ``CLASSES[i]``.
CLASS_IDS = {name: index + 1 for index, name in enumerate(CLASSES)}
#: :data:`CLASS_IDS` by :func:`label_key`: predicted names match case and whitespace insensitively.
_CLASS_IDS_BY_KEY = {label_key(name): index for name, index in CLASS_IDS.items()}
NUM_CLASSES = len(CLASSES) + 1
CLASS_MAP = DenseSpec("class_map", ("T", "H", "W"), torch.long, doc="class id of every pixel (0 = background)")
SEG_CLASSES = DenseSpec("seg_classes", ("K",), torch.long, collate="pad",
                        doc="class id of each <seg> of the answer, in order (0-padded)")
_CLASS_RE = re.compile(r"<\s*class\s*>(.*?)<\s*/\s*class\s*>", re.IGNORECASE | re.DOTALL)


def class_tags(classes: Sequence[str]) -> str:
    """``["Violin", "dog"]`` -> "<class> Violin </class> <seg> <class> dog </class> <seg>" (the target text)."""
    return " ".join(f"{wrap_tag('class', name)} {SEG}" for name in classes)


@register_task
class AVSSTask(Task):
    """Name every class that sounds and segment it: a per-frame class map.

    Target text: one ``<class> {name} </class> <seg>`` per sounding class, in onset order; the
    mask head decodes one mask per ``<seg>``, and the class map takes, at every pixel, the class
    whose mask logit is highest if it is positive (background otherwise). Loss: cross-entropy over
    background + the answer's classes. Answer: ``{"class_map": long [T, H, W], "classes": [str]}``.
    Metrics: mIoU and F over classes (split-level), with and without background; failure rate (no
    class named or no ``<seg>``).
    """

    name = "avss"
    task_id = 9
    needs_av_event = False
    outputs = ("mask_logits",)
    dense_targets = (CLASS_MAP, SEG_CLASSES)
    max_baseline_candidates = 8
    prompts = (
        "Name every object that makes a sound and segment each of them.",
        "Which classes are heard, and where are they in each frame?",
        "Give a class map of the sounding objects.",
        "Segment the sounding objects by class.",
    )
    phrases = ("So the sounding classes are", "<class> {c} </class> <seg>")

    def _compose_clip(self, clip: Clip, rng: random.Random) -> TaskParts:
        scene = clip.scene
        ids = clip.segment_masks(self.name)
        class_map = torch.zeros(ids.shape, dtype=torch.long)
        sources = [o for o in ordered_objects(scene) if has_overlap(o)]
        classes: list[str] = []
        for obj in sources:
            sounding = torch.from_numpy(ranges_to_mask(obj["sounding"], clip.num_segments))
            class_map[(ids == int(obj["id"]) + 1) & sounding[:, None, None]] = CLASS_IDS[obj["class"]]
            if obj["class"] not in classes:
                classes.append(obj["class"])
        bare = class_tags(classes)
        return TaskParts(
            question=self._question(rng),
            sentences=[object_sentence(o) for o in sources],
            conclusion=f"So the sounding classes are {bare}",
            bare=bare,
            answer={"class_map": class_map, "classes": classes},
            dense={"class_map": class_map, "seg_classes": torch.tensor([CLASS_IDS[c] for c in classes], dtype=torch.long)},
        )

    def dense_losses(self, outputs: dict[str, Dense], targets: dict[str, Dense]) -> dict[str, torch.Tensor]:
        """``{"ce"}``: per sample, cross-entropy over background + its classes' ``<seg>`` masks."""
        if "mask_logits" not in outputs or "class_map" not in targets:
            return {}
        logits, class_maps, seg_classes = outputs["mask_logits"], targets["class_map"], targets["seg_classes"]
        losses = []
        for index, row in enumerate(class_maps.rows.tolist()):
            classes = seg_classes.for_row(row)[0]
            classes = classes[classes > 0]
            masks = logits.for_row(row)[: len(classes)]
            if masks.shape[0] == 0:
                continue
            lookup = torch.zeros(NUM_CLASSES, dtype=torch.long, device=masks.device)
            lookup[classes[: masks.shape[0]]] = torch.arange(1, masks.shape[0] + 1, device=masks.device)
            channels = torch.cat([masks.new_zeros((1, *masks.shape[1:])), masks])  # [1 + k, T, H, W]
            losses.append(class_map_cross_entropy(channels.unsqueeze(0), lookup[class_maps.values[index]].unsqueeze(0)))
        return {"ce": torch.stack(losses).mean()} if losses else {}

    def parse(self, text: Any) -> list[str] | None:
        """The class names of the ``<class>`` tags, in order (unknown names kept); None if there is none.

        Names come back as written (case and punctuation kept, whitespace collapsed):
        "vacuum-cleaner", "Frying_(food)"."""
        if not isinstance(text, str):
            return None
        names = [clean_text(m) for m in _CLASS_RE.findall(text)]
        return [n for n in names if n] or None

    def predict(self, text: str, outputs: dict[str, torch.Tensor]) -> dict | None:
        """``{"class_map": long [T, H, W]}`` from the named classes and their masks; None if either is missing."""
        names = self.parse(text)
        masks = outputs.get("mask_logits")
        if names is None or masks is None or masks.shape[0] == 0:
            return None
        count = min(len(names), masks.shape[0])
        ids = torch.tensor([0] + [_CLASS_IDS_BY_KEY.get(label_key(n), 0) for n in names[:count]], device=masks.device)
        channels = torch.cat([masks.new_zeros((1, *masks.shape[1:])), masks[:count]])
        return {"class_map": ids[channels.argmax(0)]}

    def metrics(self) -> MetricCollection:
        """{"miou", "miou_no_bg", "f", "f_no_bg", "parse_failure_rate"}."""
        return self._collection({
            "miou": ClassMapIoU(NUM_CLASSES), "miou_no_bg": ClassMapIoU(NUM_CLASSES, include_background=False),
            "f": ClassMapF(NUM_CLASSES), "f_no_bg": ClassMapF(NUM_CLASSES, include_background=False),
            "parse_failure_rate": ParseFailureRate(),
        })

    def answer_to_pred(self, answer: dict) -> dict:
        """The target class map."""
        return {"class_map": answer["class_map"]}

    def constant_candidates(self, answers: Sequence[dict]) -> list[dict]:
        """All background, and the most frequent class wherever pixels are foreground in >= 25 % / 50 % of the answers."""
        maps = [a["class_map"] for a in answers]
        if len({tuple(m.shape) for m in maps}) != 1:
            return [None]
        stacked = torch.stack(maps)
        empty = torch.zeros_like(stacked[0])
        counts = torch.bincount(stacked[stacked > 0].flatten(), minlength=NUM_CLASSES)
        if counts.sum() == 0:
            return [{"class_map": empty}]
        common = int(counts.argmax())
        frequency = (stacked > 0).float().mean(0)
        return [{"class_map": empty}, *({"class_map": (frequency >= q).long() * common} for q in (0.25, 0.5))]

    def render(self, frames: torch.Tensor, media: Sequence[MediaRef], answer: Any, prediction: Any) -> Any:
        """Frames with the target and predicted class maps."""
        predicted = prediction.get("class_map") if isinstance(prediction, dict) else None
        return class_map_panel(frames, answer["class_map"], predicted, NUM_CLASSES)
