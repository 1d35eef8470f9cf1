"""Dense temporal localization metrics (``unav``): ActivityNet / UnAV-100 style detection mAP.

Inputs follow the task-metric convention of :mod:`avmt.tasks.metrics`: ``update(preds, targets)``
with ``preds`` a list of parsed predictions (None = parse failure) and ``targets`` a list of
ground-truth answers. Here

- a target is ``{"events": [{"class": str, "range": [s, e]}, ...], "num_segments": T}``;
- a prediction is a list ``[{"class": str, "range": [s, e]}, ...]`` in output order, or None.

Ranges are ``[start, end)`` on the segment grid, read as continuous intervals clipped to
``[0, T]``; the temporal IoU of two ranges is length(intersection) / length(union) (0 when either
is empty after clipping).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from avmt.data.vocab import CLASSES
from avmt.errors import UserError
from avmt.tasks.metrics import _check_lengths
from avmt.tasks.text import label_key

__all__ = [
    "MAP_THRESHOLDS",
    "temporal_iou",
    "match_detections",
    "interpolated_ap",
    "TemporalDetectionMAP",
]

#: The tIoU thresholds of the UnAV-100 evaluation (``map`` is the mean over them).
MAP_THRESHOLDS: tuple[float, ...] = (0.5, 0.6, 0.7, 0.8, 0.9)


def _clip_range(rng: Sequence[int], num_segments: int | None) -> tuple[int, int]:
    s, e = int(rng[0]), int(rng[1])
    if num_segments is not None:
        s, e = max(0, min(s, num_segments)), max(0, min(e, num_segments))
    return s, e


def temporal_iou(a: Sequence[int], b: Sequence[int], num_segments: int | None = None) -> float:
    """Temporal IoU of two ``[start, end)`` ranges (clipped to ``[0, num_segments]`` when given).

    One exact division of integers, so an IoU of e.g. 3/5 compares equal to the threshold 0.6.
    Returns 0.0 when the union is empty or either range is empty.
    """
    s1, e1 = _clip_range(a, num_segments)
    s2, e2 = _clip_range(b, num_segments)
    if e1 <= s1 or e2 <= s2:
        return 0.0
    inter = max(0, min(e1, e2) - max(s1, s2))
    union = (e1 - s1) + (e2 - s2) - inter
    return inter / union if union > 0 else 0.0


def _valid_item(item: Any) -> bool:
    if not isinstance(item, dict) or not isinstance(item.get("class"), str):
        return False
    rng = item.get("range")
    return (isinstance(rng, (list, tuple)) and len(rng) == 2
            and all(isinstance(v, int) and not isinstance(v, bool) for v in rng))


def match_detections(
    pred: Sequence[dict], events: Sequence[dict], num_segments: int, thresholds: Sequence[float]
) -> list[tuple[str, int, list[bool]]]:
    """Greedy ActivityNet matching of one clip's predictions to its ground-truth events.

    Predictions are taken in rank order (their order in ``pred``). At each threshold ``t``
    separately, a prediction is a true positive if some not-yet-matched event of its class has
    tIoU >= t with it; it then takes the unmatched event of highest tIoU (first in ``events`` on
    ties). Each event is matched at most once, so a duplicate prediction is a false positive.

    Within a clip this is exactly the global ActivityNet matching: a prediction can only match
    events of its own clip, and within a clip the ranks are all distinct.

    Args:
        pred: ``[{"class", "range"}, ...]`` in output order; items that are not such a dict (a
            string class and two int bounds) are skipped but keep their position.
        events: the clip's ground-truth ``[{"class", "range"}, ...]``.
        num_segments: T, ranges are clipped to ``[0, T]``.
        thresholds: the tIoU thresholds.
    Returns:
        one ``(class, position, [is_tp at each threshold])`` per valid prediction, position = its
        index in ``pred`` (its rank: 0 is the most confident).
    """
    gt = [(label_key(e["class"]), e["range"]) for e in events]
    matched = [[False] * len(gt) for _ in thresholds]
    out = []
    for position, item in enumerate(pred):
        if not _valid_item(item):
            continue
        cls = label_key(item["class"])  # case and whitespace insensitive
        ious = [(temporal_iou(item["range"], rng, num_segments), j) for j, (c, rng) in enumerate(gt) if c == cls]
        ious.sort(key=lambda x: (-x[0], x[1]))
        flags = []
        for k, t in enumerate(thresholds):
            hit = next((j for iou, j in ious if iou >= t and not matched[k][j]), None)
            if hit is not None:
                matched[k][hit] = True
            flags.append(hit is not None)
        out.append((cls, position, flags))
    return out


def interpolated_ap(precision: Tensor, recall: Tensor) -> Tensor:
    """Area under the interpolated precision envelope (ActivityNet ``interpolated_prec_rec``).

    Args:
        precision, recall: ``[P]`` operating points in rank order (recall non-decreasing).
    Returns:
        float64 scalar: sum over recall steps of the step width times the maximum precision at
        that recall or beyond; 0 for no points.
    """
    zero, one = precision.new_zeros(1), precision.new_ones(1)
    mprec = torch.cat([zero, precision, zero])
    mrec = torch.cat([zero, recall, one])
    envelope = torch.flip(torch.cummax(torch.flip(mprec, [0]), 0).values, [0])
    steps = torch.nonzero(mrec[1:] != mrec[:-1]).flatten() + 1
    return ((mrec[steps] - mrec[steps - 1]) * envelope[steps]).sum()


class TemporalDetectionMAP(Metric):
    """Temporal detection mAP (ActivityNet / UnAV-100 evaluation) over tIoU thresholds.

    Per class, the predictions of all clips are ranked by confidence. Predictions carry no
    confidence of their own: a clip's predictions rank in output order, the one at position p
    (0-based) having confidence ``1 / (1 + p)``, so predictions at the same position of different
    clips tie. Matching is greedy in rank order (:func:`match_detections`). Precision and recall
    are evaluated only at the end of each group of equal confidence, so the result never depends
    on the order of ``update`` calls or of DDP ranks. AP is the area under the interpolated
    precision envelope (:func:`interpolated_ap`); a class with ground truth but no prediction
    has AP 0. mAP at a threshold is the mean AP over the classes with at least one ground-truth
    event (a predicted class without ground truth adds nothing to the mean); the metric returns
    the mean of the mAPs over its ``thresholds`` (one threshold: that mAP).

    A None prediction (parse failure) and an empty list both predict nothing: the clip's events
    are missed. With no ground-truth event at all the metric returns 0.0.

    States (DDP-exact): ``gt_count`` ``long [C]`` (events per class, summed) and
    ``detections``, a list of 1-D tensors (concatenated across ranks) holding one row
    ``[class index, position, is_tp at each threshold]`` per prediction, flattened; they use
    the metric's dtype so that a rank without data gathers the same dtype.

    Args:
        thresholds: tIoU thresholds in (0, 1] (default the five of UnAV-100, 0.5..0.9).
        classes: the class vocabulary (default ``vocab.CLASSES``): target classes must be in it;
            a predicted class outside it is dropped (it has no ground truth, so it could only be a
            false positive of a class that is not averaged).
        key: when given, ``compute`` returns ``{key: value}`` instead of the bare value, so that
            the metric reports under a key that cannot be a ``MetricCollection`` entry name
            (entry names cannot contain "."; the collection flattens the one-key dict to
            ``key``, e.g. ``"map@0.5"``). Still exactly one number per metric.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, thresholds: Sequence[float] = MAP_THRESHOLDS, classes: Sequence[str] | None = None,
                 key: str | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.key = key
        thresholds = tuple(float(t) for t in thresholds)
        if not thresholds or not all(0.0 < t <= 1.0 for t in thresholds):
            raise ValueError(f"thresholds must be a non-empty sequence of values in (0, 1], got {thresholds}")
        self.thresholds = thresholds
        self.classes = tuple(CLASSES if classes is None else classes)
        # classes are compared by their label_key: case and whitespace insensitive
        self._index = {label_key(c): i for i, c in enumerate(self.classes)}
        if len(self._index) != len(self.classes):
            raise ValueError(f"classes contain duplicates: {self.classes}")
        self._width = 2 + len(thresholds)
        self.add_state("gt_count", default=torch.zeros(len(self.classes), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("detections", default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[list[dict] | None], targets: Sequence[dict]) -> None:
        """Match each clip's predictions to its events and store one row per prediction."""
        _check_lengths(preds, targets)
        rows: list[float] = []
        counts = [0] * len(self.classes)
        for pred, target in zip(preds, targets):
            events = list(target["events"])
            for event in events:
                cls = label_key(event["class"])
                if cls not in self._index:
                    raise UserError(
                        f"target class {event['class']!r} is not one of the metric's classes {self.classes}")
                counts[self._index[cls]] += 1
            if pred is None:
                continue
            for cls, position, flags in match_detections(pred, events, int(target["num_segments"]), self.thresholds):
                if cls in self._index:
                    rows += [self._index[cls], position, *map(float, flags)]
        self.gt_count += torch.tensor(counts, dtype=torch.long, device=self.gt_count.device)
        if rows:
            self.detections.append(torch.tensor(rows, dtype=self.dtype, device=self.gt_count.device))

    def _rows(self) -> Tensor:
        state = self.detections
        if isinstance(state, list):
            state = dim_zero_cat(state) if state else torch.zeros(0, device=self.gt_count.device)
        return state.reshape(-1, self._width).double()

    def compute(self) -> Tensor | dict[str, Tensor]:
        """Mean over thresholds of the mAP over classes with ground truth, float64 scalar
        (``{key: scalar}`` when the metric has a ``key``)."""
        value = self._map()
        return value if self.key is None else {self.key: value}

    def _map(self) -> Tensor:
        gt = self.gt_count
        device = gt.device
        active = torch.nonzero(gt > 0).flatten().tolist()
        if not active:
            return torch.zeros((), dtype=torch.float64, device=device)
        rows = self._rows()
        aps = torch.zeros(len(self.thresholds), len(active), dtype=torch.float64, device=device)
        for j, c in enumerate(active):
            mine = rows[rows[:, 0] == c]
            if not len(mine):
                continue
            mine = mine[torch.argsort(mine[:, 1], stable=True)]
            positions = mine[:, 1]
            ends = torch.ones(len(mine), dtype=torch.bool, device=device)  # last row of each tie group
            ends[:-1] = positions[1:] != positions[:-1]
            for k in range(len(self.thresholds)):
                tp = torch.cumsum(mine[:, 2 + k], 0)[ends]
                fp = torch.cumsum(1.0 - mine[:, 2 + k], 0)[ends]
                aps[k, j] = interpolated_ap(tp / (tp + fp), tp / float(gt[c]))
        return aps.mean(dim=1).mean()
