"""Metrics of the spatial tasks (s4, ms3, avss, ref_avs, ssu, arig) as torchmetrics ``Metric`` subclasses.

Same conventions as :mod:`avmt.tasks.metrics`: ``update(preds, targets)`` takes task-level lists
(a None prediction is a failure), states are sums (``dist_reduce_fx="sum"``) so the results are
the same under DDP as in one process, ``reset()`` clears them, and ``compute()`` returns a float64
scalar, 0 with no samples. Parse failures are counted by
:class:`avmt.tasks.metrics.ParseFailureRate`, reused as is.

Formats:

- Mask prediction: ``{"mask": prob}``, ``prob`` float ``[T, H, W]`` in [0, 1] (a probability map),
  or None (scored as the empty mask: an all-zero probability map). Mask target:
  ``{"mask": bool [T, H, W]}`` (non-bool masks: foreground where > 0); Ref-AVS targets also carry
  ``"null": bool`` (a null expression: the target mask is all empty).
- Any target may carry ``"annotated_frames": bool [T]`` (real datasets annotate only some frames,
  e.g. AVSBench S4 training clips the first): only those frames are scored, of the prediction and
  of the target alike. Without it every frame is.
- Class-map prediction (AVSS): ``{"class_map": long [T, H, W]}``, 0 = background and 1..K the
  classes, or None (scored as all background). Target: ``{"class_map": long [T, H, W]}``.
  Metrics take ``num_classes = K + 1`` (background included).
- Box prediction (ARIG): ``{"box": [x1, y1, x2, y2]}`` in normalized 0..1000 coordinates, or None
  (IoU 0). Target: ``{"box": [x1, y1, x2, y2]}``.

Inputs may be on any device; they are moved to the metric's device, where the states live.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric

from avmt.tasks.metrics import _check_lengths, _ratio

__all__ = [
    "mask_iou",
    "MaskJ",
    "MaskF",
    "NullS",
    "ClassMapIoU",
    "ClassMapF",
    "box_iou",
    "BoxCIoU",
    "BoxAUC",
    "F_THRESHOLDS",
    "AUC_THRESHOLDS",
]

#: The 255 binarization thresholds of AVSBench's ``Eval_Fmeasure`` (``torch.linspace(0, 1 - 1e-10,
#: 255)``, float32 as there: the last one rounds to 1.0).
F_THRESHOLDS = torch.linspace(0, 1 - 1e-10, 255)

#: The 21 IoU thresholds of the LVS / VGG-SS success-rate curve, ``0.05 * i`` for i in 0..20
#: (computed in float64 exactly as the LVS code does, so e.g. 0.15 is 0.15000000000000002).
AUC_THRESHOLDS = torch.tensor([0.05 * i for i in range(21)], dtype=torch.float64)

_SUBSETS = ("all", "non_null", "null")


def _zero(device: torch.device) -> Tensor:
    return torch.zeros((), dtype=torch.float64, device=device)


def _as_bool(mask: Tensor) -> Tensor:
    return mask if mask.dtype == torch.bool else mask > 0


def _mask_pair(pred: dict | None, target: dict, device: torch.device) -> tuple[Tensor, Tensor]:
    """(prob float [N, H, W], target bool [N, H, W]) on ``device``: the target's annotated frames
    (all T without ``annotated_frames``); None -> all-zero probability."""
    tgt = _as_bool(torch.as_tensor(target["mask"], device=device))
    if tgt.ndim != 3:
        raise ValueError(f"target mask must be [T, H, W], got shape {tuple(tgt.shape)}")
    if pred is None:
        prob = torch.zeros(tgt.shape, dtype=torch.float32, device=device)
    else:
        prob = torch.as_tensor(pred["mask"], device=device)
        if prob.shape != tgt.shape:
            raise ValueError(
                f"predicted mask {tuple(prob.shape)} and target mask {tuple(tgt.shape)} differ in shape")
        if prob.dtype != torch.float64:
            prob = prob.float()
    annotated = _annotated_frames(target, tgt.shape[0], device)
    return (prob, tgt) if annotated is None else (prob[annotated], tgt[annotated])


def _annotated_frames(target: dict, num_frames: int, device: torch.device) -> Tensor | None:
    """The target's ``annotated_frames`` as ``bool [T]`` on ``device``, or None (every frame scored)."""
    annotated = target.get("annotated_frames")
    if annotated is None:
        return None
    annotated = torch.as_tensor(annotated, device=device).bool()
    if annotated.shape != (num_frames,):
        raise ValueError(f"annotated_frames must be [T] = [{num_frames}], got shape {tuple(annotated.shape)}")
    return None if bool(annotated.all()) else annotated


def _keep(target: dict, subset: str) -> bool:
    null = bool(target.get("null", False))
    return subset == "all" or (subset == "null") == null


def _mask_pairs(preds: Sequence[dict | None], targets: Sequence[dict], subset: str,
                device: torch.device) -> Iterator[tuple[Tensor, Tensor]]:
    """``(prob, target)`` ``[T, H, W]`` of every (pred, target) pair of ``subset``, on ``device``."""
    _check_lengths(preds, targets)
    for pred, target in zip(preds, targets):
        if _keep(target, subset):
            yield _mask_pair(pred, target, device)


def _check_subset(subset: str) -> str:
    if subset not in _SUBSETS:
        raise ValueError(f"subset must be one of {_SUBSETS}, got {subset!r}")
    return subset


# --------------------------------------------------------------------------------------------
# Masks (s4, ms3, ref_avs, ssu): J, F, null S
# --------------------------------------------------------------------------------------------


def mask_iou(prob: Tensor, target: Tensor) -> Tensor:
    """Per-frame IoU exactly as AVSBench's ``mask_iou`` computes it (without its ``eps``).

    Args:
        prob: float ``[N, H, W]`` probabilities, binarized as ``prob > 0.5``.
        target: bool ``[N, H, W]`` (or 0/1 numbers: foreground where > 0).
    Returns:
        float64 ``[N]`` on ``prob``'s device: ``inter / union`` for a frame with foreground; for a
        frame whose target is empty, the fraction of pixels predicted background (TN / H·W).
    """
    if prob.ndim != 3 or prob.shape != target.shape:
        raise ValueError(
            f"prob and target must both be [N, H, W], got {tuple(prob.shape)} and {tuple(target.shape)}")
    pred = prob > 0.5
    tgt = _as_bool(target).to(pred.device)
    num_pixels = prob.shape[-1] * prob.shape[-2]
    inter = (pred & tgt).sum((1, 2)).double()
    union = (pred | tgt).sum((1, 2)).double()
    empty = ~tgt.any(2).any(1)
    true_neg = (~pred).sum((1, 2)).double()
    return torch.where(empty, true_neg / max(num_pixels, 1), inter / union.clamp(min=1))


def _frame_fmeasure(prob: Tensor, target: Tensor, beta2: float) -> Tensor:
    """AVSBench ``_eval_pr`` + F per frame: float64 ``[N, 255]`` (NaN -> 0) for ``prob, target
    [N, H, W]``. Pixel counts at each threshold come from sorted probabilities (exact, no
    ``[N, 255, H, W]`` tensor)."""
    n = prob.shape[0]
    flat = prob.reshape(n, -1)
    fg = target.reshape(n, -1)
    th = F_THRESHOLDS.to(device=prob.device, dtype=prob.dtype).expand(n, -1).contiguous()
    num_pixels = flat.shape[1]
    # pixels with prob >= th: those not strictly below th in the sorted row
    predicted = num_pixels - torch.searchsorted(flat.sort(dim=1).values, th, side="left")
    fg_probs = torch.where(fg, flat, torch.full_like(flat, -1.0)).sort(dim=1).values  # thresholds are >= 0
    tp = (num_pixels - torch.searchsorted(fg_probs, th, side="left")).double()
    prec = tp / (predicted.double() + 1e-20)
    recall = tp / (fg.sum(1, keepdim=True).double() + 1e-20)
    f = (1 + beta2) * prec * recall / (beta2 * prec + recall)
    return torch.nan_to_num(f, nan=0.0)


class MaskJ(Metric):
    """J: mean mask IoU over all frames of all samples (frames, not samples, are averaged, as in
    AVSBench), with the per-frame IoU of :func:`mask_iou`.

    Prediction: ``{"mask": float [T, H, W]}`` probabilities, or None (the empty mask: IoU 0 on a
    frame with an object, 1 on an empty frame). Target: ``{"mask": bool [T, H, W]}``, optionally
    ``"null": bool``.

    Args:
        subset: "all" (default), "non_null" (skip samples whose ``target["null"]`` is true: the
            Ref-AVS seen / unseen scoring) or "null" (only those).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, subset: str = "all", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.subset = _check_subset(subset)
        self.add_state("iou_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("frames", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:
        """Add the per-frame IoUs of N (pred, target) pairs (each ``[T, H, W]``)."""
        for prob, tgt in _mask_pairs(preds, targets, self.subset, self.device):
            iou = mask_iou(prob, tgt)
            self.iou_sum += iou.sum()
            self.frames += iou.numel()

    def compute(self) -> Tensor:
        """Sum of frame IoUs / frames, float64 scalar (0 with no frames)."""
        return _ratio(self.iou_sum, self.frames)


class MaskF(Metric):
    """F-measure (beta² = 0.3) exactly as AVSBench's ``Eval_Fmeasure`` / ``_eval_pr``.

    For each frame whose target has foreground (frames with an empty target are skipped), at each
    of the 255 thresholds of :data:`F_THRESHOLDS`: ``pred = prob >= th``,
    ``prec = tp / (pred.sum() + 1e-20)``, ``recall = tp / (target.sum() + 1e-20)``,
    ``f = (1 + b2) prec recall / (b2 prec + recall)`` with NaN -> 0. F = max over thresholds of the
    mean over frames of f. State: the per-threshold sum of f over frames (float64 ``[255]``) and the
    frame count, so the result is the same under DDP.

    Prediction: ``{"mask": float [T, H, W]}`` probabilities, or None (an all-zero probability map;
    note that, as in AVSBench, threshold 0 marks every pixel foreground whatever the prediction,
    so a frame's f at threshold 0 is that of the full mask). Target: ``{"mask": bool [T, H, W]}``,
    optionally ``"null": bool``.

    Args:
        subset: "all", "non_null" or "null", as in :class:`MaskJ`.
        beta2: beta² of the F-measure (0.3, as AVSBench).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, subset: str = "all", beta2: float = 0.3, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.subset = _check_subset(subset)
        self.beta2 = float(beta2)
        self.add_state("f_sum", default=torch.zeros(len(F_THRESHOLDS), dtype=torch.float64),
                       dist_reduce_fx="sum")
        self.add_state("frames", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:
        """Add the per-threshold f ``[255]`` of every non-empty target frame of N pairs ``[T, H, W]``."""
        for prob, tgt in _mask_pairs(preds, targets, self.subset, self.device):
            has_fg = tgt.any(2).any(1)
            if not bool(has_fg.any()):
                continue
            f = _frame_fmeasure(prob[has_fg], tgt[has_fg], self.beta2)
            self.f_sum += f.sum(0)
            self.frames += f.shape[0]

    def compute(self) -> Tensor:
        """max over thresholds of (f sum / frames), float64 scalar (0 with no non-empty frame)."""
        if self.frames == 0:
            return _zero(self.f_sum.device)
        return (self.f_sum / self.frames.double()).max()


class NullS(Metric):
    """Ref-AVS null metric S = sqrt(predicted foreground pixels / pixels), pooled over all frames
    of the null samples (``target["null"]`` true; others are skipped). Lower is better.

    Prediction: ``{"mask": float [T, H, W]}`` probabilities, foreground where ``prob > 0.5``, or
    None (the empty mask: no foreground). Target: ``{"mask": bool [T, H, W], "null": bool}``
    (only the mask's shape is used). 0 with no null sample.
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("foreground", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("pixels", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:
        """Add foreground / pixel counts of the null samples among N pairs ``[T, H, W]``."""
        for prob, tgt in _mask_pairs(preds, targets, "null", self.device):
            self.foreground += (prob > 0.5).sum()
            self.pixels += tgt.numel()

    def compute(self) -> Tensor:
        """sqrt(foreground / pixels), float64 scalar (0 with no null sample)."""
        return _ratio(self.foreground, self.pixels).sqrt()


# --------------------------------------------------------------------------------------------
# Class maps (avss): split-level mIoU and F
# --------------------------------------------------------------------------------------------


def _class_counts(
    pred: dict | None, target: dict, num_classes: int, device: torch.device
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-class (intersection, predicted, target) pixel counts, long ``[num_classes]`` each."""
    tgt = torch.as_tensor(target["class_map"], device=device).long()
    if tgt.ndim != 3:
        raise ValueError(f"target class map must be [T, H, W], got shape {tuple(tgt.shape)}")
    if pred is None:
        prd = torch.zeros_like(tgt)
    else:
        prd = torch.as_tensor(pred["class_map"], device=device).long()
        if prd.shape != tgt.shape:
            raise ValueError(
                f"predicted class map {tuple(prd.shape)} and target {tuple(tgt.shape)} differ in shape")
    annotated = _annotated_frames(target, tgt.shape[0], device)
    if annotated is not None:
        prd, tgt = prd[annotated], tgt[annotated]
    for name, m in (("predicted", prd), ("target", tgt)):
        if m.numel() and (int(m.min()) < 0 or int(m.max()) >= num_classes):
            raise ValueError(f"{name} class map has values outside [0, {num_classes})")
    inter = torch.bincount(tgt[prd == tgt], minlength=num_classes)
    predicted = torch.bincount(prd.flatten(), minlength=num_classes)
    return inter, predicted, torch.bincount(tgt.flatten(), minlength=num_classes)


class _ClassMapMetric(Metric):
    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, num_classes: int, include_background: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1 (background included), got {num_classes}")
        self.num_classes = int(num_classes)
        self.include_background = bool(include_background)

    def _add(self, inter: Tensor, predicted: Tensor, target: Tensor) -> None:
        raise NotImplementedError

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:
        """Add per-class pixel counts ``[num_classes]`` of N (pred, target) class maps ``[T, H, W]``."""
        _check_lengths(preds, targets)
        for pred, target in zip(preds, targets):
            self._add(*_class_counts(pred, target, self.num_classes, self.device))

    def _mean(self, scores: Tensor, active: Tensor) -> Tensor:
        """Mean of float64 ``scores [C]`` over ``active [C]`` classes (background dropped if asked)."""
        if not self.include_background:
            active = active.clone()
            active[0] = False
        if not bool(active.any()):
            return _zero(scores.device)
        return scores[active].mean()


class ClassMapIoU(_ClassMapMetric):
    """AVSS mIoU, split-level (accumulated) definition: per-class intersection and union pixel
    counts are summed over all frames of all samples (states long ``[num_classes]``), then
    IoU_c = inter_c / union_c and mIoU = mean over the classes whose union > 0.

    Prediction: ``{"class_map": long [T, H, W]}`` (0 = background, 1..K classes) or None (all
    background). Target: ``{"class_map": long [T, H, W]}``.

    Args:
        num_classes: K + 1, background included.
        include_background: average class 0 too (default) or only classes 1..K.
    """

    def __init__(self, num_classes: int, include_background: bool = True, **kwargs: Any) -> None:
        super().__init__(num_classes, include_background, **kwargs)
        self.add_state("inter", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, inter: Tensor, predicted: Tensor, target: Tensor) -> None:
        self.inter += inter
        self.union += predicted + target - inter

    def compute(self) -> Tensor:
        """mIoU over classes with union > 0, float64 scalar (0 when there is none)."""
        active = self.union > 0
        iou = self.inter.double() / self.union.double().clamp(min=1)
        return self._mean(iou, active)


class ClassMapF(_ClassMapMetric):
    """AVSS mean F-measure, split-level (accumulated) definition: per-class TP / FP / FN pixel
    counts summed over all frames of all samples (states long ``[num_classes]``);
    P_c = tp / (tp + fp), R_c = tp / (tp + fn), F_c = (1 + b2) P R / (b2 P + R) (0 where undefined);
    mean over the classes with tp + fp + fn > 0.

    Inputs as :class:`ClassMapIoU`.

    Args:
        num_classes: K + 1, background included.
        include_background: average class 0 too (default) or only classes 1..K.
        beta2: beta² of the F-measure (0.3).
    """

    def __init__(self, num_classes: int, include_background: bool = True, beta2: float = 0.3,
                 **kwargs: Any) -> None:
        super().__init__(num_classes, include_background, **kwargs)
        self.beta2 = float(beta2)
        for name in ("tp", "fp", "fn"):
            self.add_state(name, default=torch.zeros(num_classes, dtype=torch.long), dist_reduce_fx="sum")

    def _add(self, inter: Tensor, predicted: Tensor, target: Tensor) -> None:
        self.tp += inter
        self.fp += predicted - inter
        self.fn += target - inter

    def compute(self) -> Tensor:
        """Mean F over classes with tp + fp + fn > 0, float64 scalar (0 when there is none)."""
        tp, fp, fn = self.tp.double(), self.fp.double(), self.fn.double()
        prec = torch.where(tp + fp > 0, tp / (tp + fp).clamp(min=1), torch.zeros_like(tp))
        recall = torch.where(tp + fn > 0, tp / (tp + fn).clamp(min=1), torch.zeros_like(tp))
        den = self.beta2 * prec + recall
        f = (1 + self.beta2) * prec * recall / den.clamp(min=1e-300)
        f = torch.where(den > 0, f, torch.zeros_like(tp))
        return self._mean(f, (self.tp + self.fp + self.fn) > 0)


# --------------------------------------------------------------------------------------------
# Boxes (arig): cIoU and AUC, as the LVS / VGG-SS evaluation
# --------------------------------------------------------------------------------------------


def _box(box: Any) -> tuple[float, float, float, float]:
    vals = [float(v) for v in (box.tolist() if isinstance(box, Tensor) else box)]
    if len(vals) != 4:
        raise ValueError(f"a box is [x1, y1, x2, y2], got {box!r}")
    return vals[0], vals[1], vals[2], vals[3]


def box_iou(a: Sequence[float], b: Sequence[float]) -> float:
    """IoU of two boxes ``[x1, y1, x2, y2]`` (4 numbers, normalized 0..1000 coordinates).

    Areas are continuous, ``max(0, x2 - x1) * max(0, y2 - y1)``: an empty or inverted box has area
    0 (and no intersection). Returns a float in [0, 1]; 0 when the union is 0.
    """
    ax1, ay1, ax2, ay2 = _box(a)
    bx1, by1, bx2, by2 = _box(b)
    iw = max(0.0, min(ax2, bx2) - max(ax1, bx1))
    ih = max(0.0, min(ay2, by2) - max(ay1, by1))
    inter = iw * ih
    union = max(0.0, ax2 - ax1) * max(0.0, ay2 - ay1) + max(0.0, bx2 - bx1) * max(0.0, by2 - by1) - inter
    return inter / union if union > 0 else 0.0


def _box_ious(preds: Sequence[dict | None], targets: Sequence[dict]) -> list[float]:
    _check_lengths(preds, targets)
    return [0.0 if p is None else box_iou(p["box"], t["box"]) for p, t in zip(preds, targets)]


class BoxCIoU(Metric):
    """ARIG cIoU as the LVS / VGG-SS evaluation defines it: fraction of samples whose box IoU
    (:func:`box_iou`) is >= 0.5 (``np.mean(ious >= 0.5)``).

    Prediction: ``{"box": [x1, y1, x2, y2]}`` or None (IoU 0). Target: ``{"box": [x1, y1, x2, y2]}``.

    Args:
        threshold: the IoU a sample must reach (0.5, as LVS / VGG-SS).
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, threshold: float = 0.5, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.threshold = float(threshold)
        self.add_state("hits", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:
        """Count the N samples and those with IoU >= threshold."""
        ious = _box_ious(preds, targets)
        self.hits += sum(iou >= self.threshold for iou in ious)
        self.total += len(ious)

    def compute(self) -> Tensor:
        """Hits / samples, float64 scalar (0 with no samples)."""
        return _ratio(self.hits, self.total)


class BoxAUC(Metric):
    """ARIG AUC as the LVS / VGG-SS evaluation: area under the success-rate curve over the 21
    thresholds of :data:`AUC_THRESHOLDS` (0, 0.05, ..., 1.0), success rate at t = fraction of
    samples with IoU >= t, trapezoid rule over x in [0, 1] (``sklearn.metrics.auc(x, results)``).

    As there, a sample with IoU 0 (a None prediction included) succeeds at t = 0. State: counts of
    samples with IoU >= each threshold (long ``[21]``) and the total. Inputs as :class:`BoxCIoU`.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("successes", default=torch.zeros(len(AUC_THRESHOLDS), dtype=torch.long),
                       dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:
        """Count, per threshold ``[21]``, the N samples with IoU >= it."""
        ious = _box_ious(preds, targets)
        if not ious:
            return
        thresholds = AUC_THRESHOLDS.to(self.device)
        iou = torch.tensor(ious, dtype=torch.float64, device=self.device)
        self.successes += (iou[:, None] >= thresholds[None, :]).sum(0)
        self.total += len(ious)

    def compute(self) -> Tensor:
        """Trapezoid area of success rate [21] over thresholds [21], float64 scalar (0 with no samples)."""
        if self.total == 0:
            return _zero(self.successes.device)
        rates = self.successes.double() / self.total.double()
        return torch.trapezoid(rates, AUC_THRESHOLDS.to(rates.device))
