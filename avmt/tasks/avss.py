"""``avss``: audio-visual semantic segmentation (AVSBench-semantic): a class map of what sounds, per frame.

Class ids: one fixed vocabulary for AVSynth and the real dataset, :data:`AVSS_CLASSES`: AVSynth's
classes (ids 1..16, unchanged) then the AVSBench-semantic classes AVSynth lacks (names shared by
both, such as "violin" or "dog", keep one id). The metrics are declared over all of them (the
mIoU averages only the classes that occur), so the metric states never grow with the data.
"""

from __future__ import annotations

import random
import re
from typing import Any, Sequence

import torch
from torchmetrics import MetricCollection

from avmt.data.labels import AVSBENCH_SEMANTIC_CLASSES
from avmt.data.sample import Clip, Dense, DenseSpec, MediaRef, SampleError
from avmt.data.vocab import CLASSES
from avmt.intervals import ranges_to_mask
from avmt.losses import class_map_cross_entropy
from avmt.plots import class_map_panel
from avmt.tasks import register_task
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.metrics import ParseFailureRate
from avmt.tasks.reasoning import object_sentence
from avmt.tasks.scene import has_overlap, ordered_objects
from avmt.tasks.spatial import ANNOTATED, SEG, annotated_segments
from avmt.tasks.spatial_metrics import ClassMapF, ClassMapIoU
from avmt.tasks.text import clean_text, label_key, wrap_tag

#: The class vocabulary of the class maps: AVSynth's classes, then the AVSBench-semantic classes
#: (:data:`~avmt.data.labels.AVSBENCH_SEMANTIC_CLASSES`) whose :func:`label_key` AVSynth lacks.
AVSS_CLASSES: tuple[str, ...] = (*CLASSES, *(
    name for name in AVSBENCH_SEMANTIC_CLASSES if label_key(name) not in {label_key(c) for c in CLASSES}
))
#: Class ids of the class maps: 0 = background, ``i + 1`` = ``AVSS_CLASSES[i]``.
CLASS_IDS = {name: index + 1 for index, name in enumerate(AVSS_CLASSES)}
#: :data:`CLASS_IDS` by :func:`label_key`: predicted names match case and whitespace insensitively.
_CLASS_IDS_BY_KEY = {label_key(name): index for name, index in CLASS_IDS.items()}
#: Background + :data:`AVSS_CLASSES`: the size of the metrics' per-class states.
NUM_CLASSES = len(AVSS_CLASSES) + 1
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
    background + the answer's classes, on the annotated frames. Answer: ``{"class_map": long
    [T, H, W], "classes": [str], "annotated_frames": bool [T]}``. Metrics: mIoU and F over classes
    (split-level, annotated frames only), with and without background; failure rate (no class
    named or no ``<seg>``). Reads converted AVSBench-semantic clips too (:meth:`compose_annotated`).
    """

    name = "avss"
    task_id = 9
    needs_av_event = False
    outputs = ("mask_logits",)
    dense_targets = (CLASS_MAP, SEG_CLASSES, ANNOTATED)
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
        return self._class_map_sample(self._question(rng), [object_sentence(o) for o in sources], class_map, classes,
                                      [CLASS_IDS[c] for c in classes], torch.ones(clip.num_segments, dtype=torch.bool))

    def compose_annotated(self, clip: Clip, answer: Any, rng: random.Random) -> TaskParts:
        """AVSBench-semantic (``avsbench`` converter): ``{"classes": [name, ...]}``, the sounding
        classes in order of appearance; the class of each mask object is the clip's
        ``objects[id]["class"]`` (an AVSBench-semantic name, matched by :func:`label_key`). Frames
        without an annotated mask are background in the class map and ignored by loss and metrics.
        """
        classes = answer.get("classes") if isinstance(answer, dict) else None
        if not isinstance(classes, list) or not classes or not all(isinstance(c, str) and c.strip() for c in classes):
            raise SampleError(f"clip {clip.key!r}: avss answer {answer!r} is not {{'classes': [name, ...]}}")
        ids = clip.segment_masks(self.name)
        annotated = annotated_segments(clip)
        class_map = torch.zeros(ids.shape, dtype=torch.long)
        for obj in clip.scene.get("objects", []):
            class_id = _CLASS_IDS_BY_KEY.get(label_key(obj["class"]))
            if class_id is None:
                raise SampleError(f"clip {clip.key!r}: avss class {obj['class']!r} is not an AVSBench-semantic "
                                  f"or AVSynth class")
            class_map[ids == int(obj["id"]) + 1] = class_id
        class_map[~annotated] = 0
        seg_classes = [_CLASS_IDS_BY_KEY.get(label_key(c)) for c in classes]
        if None in seg_classes:
            raise SampleError(f"clip {clip.key!r}: avss answer class {classes[seg_classes.index(None)]!r} is not an "
                              f"AVSBench-semantic or AVSynth class")
        return self._class_map_sample(self._question(rng), [], class_map, [" ".join(c.split()) for c in classes],
                                      seg_classes, annotated)

    def _class_map_sample(self, question: str, sentences: list[str], class_map: torch.Tensor, classes: list[str],
                          seg_classes: list[int], annotated: torch.Tensor) -> TaskParts:
        """Parts of an avss sample: ``class_map`` long ``[T, H, W]``, ``classes`` the tagged names in
        order, ``seg_classes`` their class ids, ``annotated`` bool ``[T]`` the scored frames."""
        bare = class_tags(classes)
        return TaskParts(
            question=question,
            sentences=sentences,
            conclusion=f"So the sounding classes are {bare}",
            bare=bare,
            answer={"class_map": class_map, "classes": classes, "annotated_frames": annotated},
            dense={"class_map": class_map, "seg_classes": torch.tensor(seg_classes, dtype=torch.long),
                   "annotated_frames": annotated},
        )

    def dense_losses(self, outputs: dict[str, Dense], targets: dict[str, Dense]) -> dict[str, torch.Tensor]:
        """``{"ce"}``: per sample, cross-entropy over background + its classes' ``<seg>`` masks, on
        its annotated frames (all frames without an ``annotated_frames`` target)."""
        if "mask_logits" not in outputs or "class_map" not in targets:
            return {}
        logits, class_maps, seg_classes = outputs["mask_logits"], targets["class_map"], targets["seg_classes"]
        annotated_frames = targets.get("annotated_frames")
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
            target = lookup[class_maps.values[index]]  # [T, H, W]
            if annotated_frames is not None:
                annotated = annotated_frames.for_row(row)[0].to(device=masks.device, dtype=torch.bool)
                if not bool(annotated.any()):
                    continue
                channels, target = channels[:, annotated], target[annotated]
            losses.append(class_map_cross_entropy(channels.unsqueeze(0), target.unsqueeze(0)))
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
        """All background, and the most frequent class wherever pixels are foreground in >= 25 % / 50 % of
        the answers (that annotate the frame)."""
        maps = [a["class_map"] for a in answers]
        if len({tuple(m.shape) for m in maps}) != 1:
            return [None]
        stacked = torch.stack(maps)
        empty = torch.zeros_like(stacked[0])
        counts = torch.bincount(stacked[stacked > 0].flatten(), minlength=NUM_CLASSES)
        if counts.sum() == 0:
            return [{"class_map": empty}]
        common = int(counts.argmax())
        weights = torch.stack([torch.as_tensor(a.get("annotated_frames", torch.ones(stacked.shape[1]))).float().cpu()
                               for a in answers])[:, :, None, None]  # [N, T, 1, 1]: annotated frames only
        frequency = ((stacked > 0).float() * weights).sum(0) / weights.sum(0).clamp(min=1)
        return [{"class_map": empty}, *({"class_map": (frequency >= q).long() * common} for q in (0.25, 0.5))]

    def render(self, frames: torch.Tensor, media: Sequence[MediaRef], answer: Any, prediction: Any) -> Any:
        """Frames with the target and predicted class maps."""
        predicted = prediction.get("class_map") if isinstance(prediction, dict) else None
        return class_map_panel(frames, answer["class_map"], predicted, NUM_CLASSES)
