"""Task metrics as torchmetrics ``Metric`` subclasses.

Every metric here takes the task-level inputs directly: ``update(preds, targets)`` with
``preds`` a list of parsed predictions (None = parse failure, always scored as wrong) and
``targets`` a list of ground-truth answers (``TaskSample.answer``). States are sums
(``dist_reduce_fx="sum"``) so results are exact under DDP; ``reset()`` clears them (Lightning
does it per epoch). Where torchmetrics has a metric computing the same number it is reused:
accuracy and F1 counts come from ``MulticlassAccuracy`` / ``MulticlassStatScores`` on class-index
tensors, BLEU-4 and ROUGE-L from ``torchmetrics.text``. CIDEr-D (no stock metric) needs the document
frequencies of the whole corpus, so it keeps the texts themselves as UTF-8 byte tensors in
``"cat"``-reduced list states and scores everything in ``compute()``. With no samples a metric
returns 0.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any, Callable, Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.classification import MulticlassAccuracy, MulticlassStatScores
from torchmetrics.text import BLEUScore, ROUGEScore
from torchmetrics.utilities.data import dim_zero_cat
from torchmetrics.utilities.distributed import gather_all_tensors

from avmt.errors import UserError
from avmt.intervals import mask_to_ranges, ranges_to_mask
from avmt.tasks.text import label_key

__all__ = [
    "ParseFailureRate",
    "SegmentAccuracy",
    "EventClassAccuracy",
    "RangeIoU",
    "AVVPF1",
    "avvp_video_scores",
    "LabelAccuracy",
    "LabelMacroF1",
    "CaptionBLEU",
    "CaptionROUGEL",
    "CaptionCIDErD",
    "cider_d_scores",
    "normalize_caption",
    "BACKGROUND",
]

#: Class name that means "no event" in an AVE prediction.
BACKGROUND = "background"


def _check_lengths(preds: Sequence, targets: Sequence) -> None:
    if len(preds) != len(targets):
        raise ValueError(f"got {len(preds)} predictions for {len(targets)} targets; they must pair up")


def _ratio(num: Tensor, den: Tensor) -> Tensor:
    return num.double() / den.double() if den > 0 else torch.zeros((), dtype=torch.float64, device=num.device)


# --------------------------------------------------------------------------------------------
# Parse failures
# --------------------------------------------------------------------------------------------


class ParseFailureRate(Metric):
    """Fraction of predictions that failed to parse (None). Scalar in [0, 1]; lower is better."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("failures", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[Any], targets: Sequence[Any]) -> None:
        """Count None predictions. ``preds``/``targets``: lists of equal length N."""
        _check_lengths(preds, targets)
        self.failures += sum(p is None for p in preds)
        self.total += len(preds)

    def compute(self) -> Tensor:
        """Failures / predictions, float64 scalar (0 with no predictions)."""
        return _ratio(self.failures, self.total)


# --------------------------------------------------------------------------------------------
# AVE: segment accuracy
# --------------------------------------------------------------------------------------------


def _segment_labels(cls: str | None, rng: Sequence[int] | None, num_segments: int) -> list[str | None]:
    if not isinstance(cls, str) or label_key(cls) == BACKGROUND or rng is None:
        return [None] * num_segments
    key = label_key(cls)  # classes compare case and whitespace insensitively
    mask = ranges_to_mask([rng], num_segments)
    return [key if on else None for on in mask]


class SegmentAccuracy(Metric):
    """AVE segment accuracy: fraction of segments whose label (event class or background) is right.

    Target: ``{"class": str, "range": [s, e], "num_segments": T}`` (an empty range, s == e, means
    an all-background clip). Prediction: ``{"class": str, "range": [s, e]}`` (ranges clipped to
    ``[0, T)``; class "background" labels nothing) or None (all T segments wrong). Micro-averaged
    over all segments of all clips, as in AVE.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("correct", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:
        """Accumulate correct / total segment counts over N (pred, target) pairs."""
        _check_lengths(preds, targets)
        for pred, target in zip(preds, targets):
            num_segments = int(target["num_segments"])
            self.total += num_segments
            if pred is None:
                continue
            gt = _segment_labels(target.get("class"), target.get("range"), num_segments)
            pr = _segment_labels(pred.get("class"), pred.get("range"), num_segments)
            self.correct += sum(g == p for g, p in zip(gt, pr))

    def compute(self) -> Tensor:
        """Correct segments / all segments, float64 scalar."""
        return _ratio(self.correct, self.total)


def _labeled_mask(cls: str | None, rng: Sequence[int] | None, num_segments: int) -> list[bool]:
    """Segments an AVE answer labels with its class (none for "background", None or an empty range)."""
    return [label is not None for label in _segment_labels(cls, rng, num_segments)]


class _MeanOverClips(Metric):
    """Mean over clips of a per-clip score in [0, 1] (a None prediction scores 0)."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("score_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def _score(self, pred: dict, target: dict) -> float:
        raise NotImplementedError

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:
        """Add the scores of N (pred, target) pairs."""
        _check_lengths(preds, targets)
        for pred, target in zip(preds, targets):
            self.total += 1
            if pred is not None:
                self.score_sum += self._score(pred, target)

    def compute(self) -> Tensor:
        """Sum of scores / clips, float64 scalar."""
        return _ratio(self.score_sum, self.total)


def _masks(pred: dict, target: dict) -> tuple[list[bool], list[bool]]:
    num_segments = int(target["num_segments"])
    return (
        _labeled_mask(pred.get("class"), pred.get("range"), num_segments),
        _labeled_mask(target.get("class"), target.get("range"), num_segments),
    )


class EventClassAccuracy(_MeanOverClips):
    """AVE diagnostic: fraction of clips whose event class is right, whatever the range.

    An answer that labels no segment (class "background", an empty range) means background; a
    target with an empty range is background too. A None prediction is wrong. Separates "which
    event" from "when" in :class:`SegmentAccuracy`, where a wrong class makes every segment wrong.
    """

    def _score(self, pred: dict, target: dict) -> float:
        pr, gt = _masks(pred, target)
        predicted = label_key(pred.get("class")) if any(pr) else BACKGROUND
        return float(predicted == (label_key(target.get("class")) if any(gt) else BACKGROUND))


class RangeIoU(_MeanOverClips):
    """AVE diagnostic: mean temporal IoU of the predicted and the target range, whatever the class.

    Ranges are segment sets ``[s, e)`` clipped to ``[0, T)``; an answer that labels nothing has the
    empty set, and two empty sets have IoU 1. A None prediction scores 0. Mean over clips.
    """

    def _score(self, pred: dict, target: dict) -> float:
        pr, gt = _masks(pred, target)
        union = sum(g or p for g, p in zip(gt, pr))
        return 1.0 if union == 0 else sum(g and p for g, p in zip(gt, pr)) / union


# --------------------------------------------------------------------------------------------
# AVVP: segment- and event-level F1 (LLP evaluation)
# --------------------------------------------------------------------------------------------


def _class_masks(
    events: dict[str, Sequence[Sequence[int]]] | None, num_segments: int
) -> dict[str, list[bool]]:
    """Per-class segment masks, keyed by :func:`label_key` (entries whose classes differ only in
    case or whitespace are one class)."""
    out: dict[str, list[bool]] = {}
    for name, ranges in (events or {}).items():
        cls = label_key(name)
        mask = ranges_to_mask(ranges, num_segments)
        if cls in out:
            mask = [a or b for a, b in zip(out[cls], mask)]
        out[cls] = mask
    return out


def _seg_counts(pred: list[bool], gt: list[bool]) -> tuple[int, int, int]:
    tp = sum(p and g for p, g in zip(pred, gt))
    fp = sum(p and not g for p, g in zip(pred, gt))
    fn = sum(g and not p for p, g in zip(pred, gt))
    return tp, fp, fn


def _event_counts(pred: list[bool], gt: list[bool]) -> tuple[int, int, int]:
    """LLP event matching: a predicted event is a TP if it has IoU >= 0.5 with any GT event
    (else FP); a GT event with no predicted event at IoU >= 0.5 is a FN (not one-to-one)."""
    pe, ge = mask_to_ranges(pred), mask_to_ranges(gt)

    def match(a: list[int], b: list[int]) -> bool:
        inter = max(0, min(a[1], b[1]) - max(a[0], b[0]))
        union = (a[1] - a[0]) + (b[1] - b[0]) - inter
        return inter >= 0.5 * union

    tp = sum(any(match(p, g) for g in ge) for p in pe)
    fp = len(pe) - tp
    fn = sum(not any(match(g, p) for p in pe) for g in ge)
    return tp, fp, fn


def _mean_f1(counts: dict[str, tuple[int, int, int]]) -> float:
    """Mean F1 over classes that occur in prediction or ground truth; 1.0 if none does."""
    scores = [2 * tp / (2 * tp + fp + fn) for tp, fp, fn in counts.values() if tp + fp + fn > 0]
    return sum(scores) / len(scores) if scores else 1.0


def avvp_video_scores(pred: dict | None, target: dict, level: str) -> dict[str, float]:
    """Per-video AVVP F1 scores, exactly as the LLP evaluation computes them.

    Args:
        pred: ``{"audio": {cls: [[s, e], ...]}, "visual": {...}}`` or None (scores all 0).
        target: same plus ``"num_segments": T``.
        level: "segment" (per-segment TP/FP/FN) or "event" (events = contiguous runs per class,
            matched at IoU >= 0.5).
    Returns:
        {"audio", "visual", "audio_visual", "event"}: mean F1 over the classes present in the
        prediction or the ground truth (1.0 when there are none). audio_visual events are the
        per-class intersection of audio and visual; "event" pools audio and visual counts per
        class (the LLP "Event@AV").
    """
    if level not in ("segment", "event"):
        raise ValueError(f"level must be 'segment' or 'event', got {level!r}")
    if pred is None:
        return {"audio": 0.0, "visual": 0.0, "audio_visual": 0.0, "event": 0.0}
    num_segments = int(target["num_segments"])
    counter = _seg_counts if level == "segment" else _event_counts
    pa, pv = _class_masks(pred.get("audio"), num_segments), _class_masks(pred.get("visual"), num_segments)
    ga, gv = _class_masks(target.get("audio"), num_segments), _class_masks(target.get("visual"), num_segments)
    empty = [False] * num_segments
    classes = sorted(set(pa) | set(pv) | set(ga) | set(gv))
    ca, cv, cav, cev = {}, {}, {}, {}
    for c in classes:
        ca[c] = counter(pa.get(c, empty), ga.get(c, empty))
        cv[c] = counter(pv.get(c, empty), gv.get(c, empty))
        pav = [a and v for a, v in zip(pa.get(c, empty), pv.get(c, empty))]
        gav = [a and v for a, v in zip(ga.get(c, empty), gv.get(c, empty))]
        cav[c] = counter(pav, gav)
        cev[c] = tuple(x + y for x, y in zip(ca[c], cv[c]))
    return {
        "audio": _mean_f1(ca),
        "visual": _mean_f1(cv),
        "audio_visual": _mean_f1(cav),
        "event": _mean_f1(cev),
    }


class AVVPF1(Metric):
    """One AVVP F1 number (LLP evaluation), averaged over videos.

    Args:
        level: "segment" or "event".
        kind: "audio", "visual", "audio_visual", "type_av" (mean of the audio, visual and
            audio-visual F1, the LLP "Type@AV") or "event_av" (audio and visual counts pooled
            per class, the LLP "Event@AV"); ``None`` = all five at once, as a dict keyed
            ``{level}_f1/{kind}`` (one pass over the videos instead of five in a collection).
    Inputs as :func:`avvp_video_scores`; a None prediction scores 0 for its video.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    KINDS = ("audio", "visual", "audio_visual", "type_av", "event_av")

    def __init__(self, level: str = "segment", kind: str | None = "audio", **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if level not in ("segment", "event"):
            raise ValueError(f"level must be 'segment' or 'event', got {level!r}")
        if kind is not None and kind not in self.KINDS:
            raise ValueError(f"kind must be one of {self.KINDS}, got {kind!r}")
        self.level, self.kind = level, kind
        for name in ("f_audio", "f_visual", "f_audio_visual", "f_event"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("videos", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Sequence[dict | None], targets: Sequence[dict]) -> None:
        """Accumulate per-video F1 sums over N (pred, target) pairs."""
        _check_lengths(preds, targets)
        for pred, target in zip(preds, targets):
            s = avvp_video_scores(pred, target, self.level)
            self.f_audio += s["audio"]
            self.f_visual += s["visual"]
            self.f_audio_visual += s["audio_visual"]
            self.f_event += s["event"]
            self.videos += 1

    def compute(self) -> Tensor | dict[str, Tensor]:
        """Mean over videos of the selected F1, float64 scalar in [0, 1] (a dict of all five
        when ``kind`` is None)."""
        if self.kind is None:
            return {f"{self.level}_f1/{kind}": self._value(kind) for kind in self.KINDS}
        return self._value(self.kind)

    def _value(self, kind: str) -> Tensor:
        if kind == "type_av":
            return _ratio(self.f_audio + self.f_visual + self.f_audio_visual, self.videos * 3)
        state = {"audio": self.f_audio, "visual": self.f_visual, "audio_visual": self.f_audio_visual,
                 "event_av": self.f_event}[kind]
        return _ratio(state, self.videos)


# --------------------------------------------------------------------------------------------
# Label accuracy / macro-F1 (stock torchmetrics on class indices)
# --------------------------------------------------------------------------------------------


class _LabelEncoder:
    """Maps (pred, target) label strings to class indices; unknown/None predictions -> index C."""

    labels: tuple[str, ...]
    target_key: str | None
    qtype: str | None

    def _setup(self, labels: Sequence[str], target_key: str | None, qtype: str | None) -> None:
        self.labels = tuple(labels)
        # labels are compared by their label_key: case and whitespace insensitive
        self._index = {label_key(label): i for i, label in enumerate(self.labels)}
        if len(self._index) != len(self.labels):
            raise ValueError(f"labels contain duplicates: {labels}")
        self.target_key = target_key
        self.qtype = qtype

    def _encode(self, preds: Sequence[Any], targets: Sequence[Any]) -> tuple[Tensor, Tensor] | None:
        _check_lengths(preds, targets)
        invalid = len(self.labels)
        p_idx, t_idx = [], []
        for pred, target in zip(preds, targets):
            if self.qtype is not None and target.get("type") != self.qtype:
                continue
            label = target[self.target_key] if self.target_key is not None else target
            if not isinstance(label, str) or label_key(label) not in self._index:
                raise UserError(f"target label {label!r} is not one of the metric's labels {self.labels}")
            t_idx.append(self._index[label_key(label)])
            p_idx.append(self._index.get(label_key(pred), invalid) if isinstance(pred, str) else invalid)
        if not t_idx:
            return None
        device = getattr(self, "device", torch.device("cpu"))
        return torch.tensor(p_idx, device=device), torch.tensor(t_idx, device=device)


class LabelAccuracy(_LabelEncoder, MulticlassAccuracy):
    """Accuracy of label predictions (micro ``MulticlassAccuracy`` over class indices).

    Args:
        labels: the label vocabulary; targets must be in it. A prediction that is None or not
            in it gets an extra "invalid" index (always wrong).
        target_key: read the label from ``target[target_key]`` (None: the target is the label).
        qtype: only score targets whose ``target["type"] == qtype`` (per-question-type accuracy).
    """

    def __init__(self, labels: Sequence[str], target_key: str | None = None, qtype: str | None = None,
                 **kwargs: Any) -> None:
        MulticlassAccuracy.__init__(self, num_classes=len(labels) + 1, average="micro", **kwargs)
        self._setup(labels, target_key, qtype)

    def update(self, preds: Sequence[str | None], targets: Sequence[Any]) -> None:  # type: ignore[override]
        """Encode N predictions / targets to class indices [N] and update the counts."""
        encoded = self._encode(preds, targets)
        if encoded is not None:
            MulticlassAccuracy.update(self, *encoded)


class LabelMacroF1(_LabelEncoder, MulticlassStatScores):
    """Macro-F1 over the label vocabulary (per-class counts from ``MulticlassStatScores``).

    The F1 of each label is averaged over the labels that occur in targets or predictions (as
    torchmetrics' macro average does); the "invalid" index of None / unknown predictions counts
    as a miss of the true label but is not itself averaged in. Args as :class:`LabelAccuracy`.
    """

    higher_is_better = True

    def __init__(self, labels: Sequence[str], target_key: str | None = None, qtype: str | None = None,
                 **kwargs: Any) -> None:
        MulticlassStatScores.__init__(self, num_classes=len(labels) + 1, average="none", **kwargs)
        self._setup(labels, target_key, qtype)

    def update(self, preds: Sequence[str | None], targets: Sequence[Any]) -> None:  # type: ignore[override]
        """Encode N predictions / targets to class indices [N] and update the per-class counts."""
        encoded = self._encode(preds, targets)
        if encoded is not None:
            MulticlassStatScores.update(self, *encoded)

    def compute(self) -> Tensor:
        """Macro-F1, float64 scalar (0 with no samples)."""
        tp, fp, _, fn = self._final_state()
        c = len(self.labels)
        tp, fp, fn = tp[:c].double(), fp[:c].double(), fn[:c].double()
        active = (tp + fp + fn) > 0
        if not bool(active.any()):
            return torch.zeros((), dtype=torch.float64, device=tp.device)
        f1 = 2 * tp[active] / (2 * tp[active] + fp[active] + fn[active])
        return f1.mean()


# --------------------------------------------------------------------------------------------
# Captions
# --------------------------------------------------------------------------------------------

_PUNCT_RE = re.compile(r"([^\w\s])")


def normalize_caption(text: Any) -> str:
    """Lower-case, split punctuation off words, collapse whitespace ("" for None / non-str)."""
    if not isinstance(text, str):
        return ""
    return " ".join(_PUNCT_RE.sub(r" \1 ", text.lower()).split())


def _refs(target: Any) -> list[str]:
    refs = [target] if isinstance(target, str) else list(target)
    return [normalize_caption(r) for r in refs]


class CaptionBLEU(BLEUScore):
    """Corpus BLEU-4 (torchmetrics ``BLEUScore``) of captions after :func:`normalize_caption`.

    Targets: a reference caption (str) or a list of references. None predictions count as the
    empty caption (no n-gram matches).
    """

    def __init__(self, n_gram: int = 4, **kwargs: Any) -> None:
        super().__init__(n_gram=n_gram, **kwargs)

    def update(self, preds: Sequence[str | None], targets: Sequence[Any]) -> None:  # type: ignore[override]
        """Accumulate n-gram statistics over N captions."""
        _check_lengths(preds, targets)
        super().update([normalize_caption(p) for p in preds], [_refs(t) for t in targets])


class CaptionROUGEL(ROUGEScore):
    """Mean sentence ROUGE-L F-measure (torchmetrics ``ROUGEScore``) of normalized captions.

    None predictions count as the empty caption (score 0); 0 with no samples.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(rouge_keys=("rougeL",), **kwargs)

    def update(self, preds: Sequence[str | None], targets: Sequence[Any]) -> None:  # type: ignore[override]
        """Accumulate per-caption ROUGE-L scores over N captions."""
        _check_lengths(preds, targets)
        super().update([normalize_caption(p) for p in preds], [_refs(t) for t in targets])

    def compute(self) -> Tensor:  # type: ignore[override]
        """Mean ROUGE-L F-measure, scalar."""
        state = self.rougeL_fmeasure
        if (len(state) if isinstance(state, list) else state.numel()) == 0:
            return torch.zeros((), dtype=torch.float32, device=self.device)
        return super().compute()["rougeL_fmeasure"]


# --------------------------------------------------------------------------------------------
# CIDEr-D (coco-caption's cider_scorer.py, re-implemented; no stock torchmetrics metric)
# --------------------------------------------------------------------------------------------


def _ngram_counts(words: Sequence[str], n: int) -> Counter:
    """Counts of the 1..n-grams of ``words`` (tuples), in coco's ``precook`` order."""
    counts: Counter = Counter()
    for k in range(1, n + 1):
        for i in range(len(words) - k + 1):
            counts[tuple(words[i:i + k])] += 1
    return counts


def cider_d_scores(hyps: Sequence[str], refs: Sequence[Sequence[str]], n: int = 4,
                   sigma: float = 6.0) -> list[float]:
    """Per-clip CIDEr-D of a corpus, exactly as coco-caption's ``CiderScorer`` computes it.

    Args:
        hyps: one hypothesis per clip (already tokenized: words are split on whitespace; "" = the
            empty caption, which scores 0).
        refs: one non-empty list of reference captions per clip.
        n: largest n-gram length; sigma: width of the Gaussian length penalty.
    Returns:
        the CIDEr-D of each clip (the corpus score is their mean); see :class:`CaptionCIDErD`.
    """
    if len(hyps) != len(refs):
        raise ValueError(f"got {len(hyps)} hypotheses for {len(refs)} reference lists; they must pair up")
    if not hyps:
        return []
    hyp_counts = [_ngram_counts(h.split(), n) for h in hyps]
    ref_counts = [[_ngram_counts(r.split(), n) for r in rs] for rs in refs]
    if any(not rs for rs in ref_counts):
        raise UserError("every clip needs at least one reference caption")
    # document frequency: the number of clips whose references contain the n-gram
    df: Counter = Counter()
    for rs in ref_counts:
        df.update({g for counts in rs for g in counts})
    log_clips = math.log(float(len(refs)))

    def vectors(counts: Counter) -> tuple[list[dict], list[float], int]:
        vec: list[dict] = [{} for _ in range(n)]
        norm = [0.0] * n
        length = 0
        for gram, tf in counts.items():
            k = len(gram) - 1
            weight = float(tf) * (log_clips - math.log(max(1.0, float(df.get(gram, 0)))))
            vec[k][gram] = weight
            norm[k] += weight * weight
            if k == 1:  # coco's "length" counts bigrams (see CaptionCIDErD)
                length += tf
        return vec, [math.sqrt(x) for x in norm], length

    scores = []
    for counts, rs in zip(hyp_counts, ref_counts):
        vec, norm, length = vectors(counts)
        total = [0.0] * n
        for ref in rs:
            vec_r, norm_r, length_r = vectors(ref)
            penalty = math.e ** (-(float(length - length_r) ** 2) / (2 * sigma ** 2))
            for k in range(n):
                val = 0.0
                for gram, weight in vec[k].items():
                    w_ref = vec_r[k].get(gram, 0.0)
                    val += min(weight, w_ref) * w_ref  # clipped: min(hyp, ref) counts
                if norm[k] != 0 and norm_r[k] != 0:
                    val /= norm[k] * norm_r[k]
                total[k] += val * penalty
        scores.append(sum(total) / n / len(rs) * 10.0)
    return scores


def _utf8_tensor(texts: Sequence[str], device: torch.device) -> tuple[Tensor, Tensor]:
    """The UTF-8 bytes of ``texts`` back to back (uint8 [B]) and each text's byte length (int64 [N])."""
    encoded = [t.encode("utf-8") for t in texts]
    flat = b"".join(encoded)
    data = torch.frombuffer(bytearray(flat), dtype=torch.uint8) if flat else torch.zeros(0, dtype=torch.uint8)
    lengths = torch.tensor([len(e) for e in encoded], dtype=torch.long)
    return data.to(device), lengths.to(device)


def _utf8_texts(data: Tensor, lengths: Tensor) -> list[str]:
    flat = data.to(device="cpu", dtype=torch.uint8).numpy().tobytes()
    out, start = [], 0
    for length in lengths.to(device="cpu", dtype=torch.long).tolist():
        out.append(flat[start:start + length].decode("utf-8"))
        start += length
    if start != len(flat):
        raise RuntimeError(f"CIDEr-D state is inconsistent: {len(flat)} bytes for texts of {start} bytes")
    return out


class CaptionCIDErD(Metric):
    """Corpus CIDEr-D of captions after :func:`normalize_caption`, as coco-caption computes it
    (``pycocoevalcap/cider/cider_scorer.py``, Vedantam et al. 2015, with its "-D" changes).

    For N clips with hypothesis ``h_i`` and references ``R_i``, n-grams of length n = 1..4 get
    tf-idf weights ``g(x) = tf(x) * (log N - log max(1, df(x)))``, where ``df(x)`` is the number
    of clips whose references contain ``x`` (hypotheses never count). Per clip::

        CIDEr-D(h, R) = 10 / |R| * sum_{r in R} exp(-(l_h - l_r)^2 / (2 sigma^2))
                                     * 1/4 sum_{n=1..4} <min(g_n(h), g_n(r)), g_n(r)> / (|g_n(h)| |g_n(r)|)

    (a cosine whose numerator clips the hypothesis weights at the reference's, 0 where a vector
    is all zero; sigma = 6), and the metric is the mean over clips, in [0, 10] (not [0, 1]).
    ``l`` is coco's length: the number of bigrams, i.e. words - 1; its difference is the
    word-count difference whenever the score can be non-zero. Consequences of the corpus idf:
    with one clip every n-gram has ``df = N = 1`` and weight 0, so CIDEr-D is 0 even for a
    perfect caption; an n-gram in every clip's references weighs 0.

    Targets: a reference caption (str) or a list of them (at least one). A None prediction is
    the empty caption (score 0, still counted). With no clips: 0.

    DDP: the df need the whole corpus, so the states are the texts: the UTF-8 bytes of the
    hypotheses and of the references (one uint8 tensor per update each) with the byte length of
    each text and the number of references of each clip, all ``dist_reduce_fx="cat"``; ranks'
    states are concatenated in the same rank order, and the score is order independent. A rank
    that saw no clip sends empty tensors of the states' dtypes (see ``_sync_dist``).
    """

    is_differentiable = False
    higher_is_better = True
    plot_lower_bound = 0.0
    plot_upper_bound = 10.0  # coco's x10 scale
    #: One sample does not score itself 10: the idf weights need a corpus (see the docstring).
    corpus_level = True
    full_state_update = False
    _STATE_DTYPES = {"hyp_bytes": torch.uint8, "hyp_lengths": torch.long, "ref_bytes": torch.uint8,
                     "ref_lengths": torch.long, "ref_counts": torch.long}

    def __init__(self, n_gram: int = 4, sigma: float = 6.0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if n_gram < 1 or sigma <= 0:
            raise ValueError(f"need n_gram >= 1 and sigma > 0, got {n_gram}, {sigma}")
        self.n_gram, self.sigma = int(n_gram), float(sigma)
        for name in self._STATE_DTYPES:
            self.add_state(name, default=[], dist_reduce_fx="cat")

    def update(self, preds: Sequence[str | None], targets: Sequence[Any]) -> None:  # type: ignore[override]
        """Store N normalized hypotheses (None -> "") and their references."""
        _check_lengths(preds, targets)
        if not preds:
            return
        refs = [_refs(t) for t in targets]
        if any(not r for r in refs):
            raise UserError("CIDEr-D needs at least one reference caption per clip")
        hyp_bytes, hyp_lengths = _utf8_tensor([normalize_caption(p) for p in preds], self.device)
        ref_bytes, ref_lengths = _utf8_tensor([r for rs in refs for r in rs], self.device)
        self.hyp_bytes.append(hyp_bytes)
        self.hyp_lengths.append(hyp_lengths)
        self.ref_bytes.append(ref_bytes)
        self.ref_lengths.append(ref_lengths)
        self.ref_counts.append(torch.tensor([len(r) for r in refs], dtype=torch.long, device=self.device))

    def _state(self, name: str) -> Tensor:
        state = getattr(self, name)
        if isinstance(state, list):
            state = dim_zero_cat(state) if state else torch.zeros(0)
        return state.to(self._STATE_DTYPES[name])

    def corpus(self) -> tuple[list[str], list[list[str]]]:
        """The stored (hypotheses, references per clip), in update order."""
        hyps = _utf8_texts(self._state("hyp_bytes"), self._state("hyp_lengths"))
        flat_refs = _utf8_texts(self._state("ref_bytes"), self._state("ref_lengths"))
        counts = self._state("ref_counts").tolist()
        if len(counts) != len(hyps) or sum(counts) != len(flat_refs):
            raise RuntimeError("CIDEr-D state is inconsistent: hypotheses, references and counts disagree")
        refs, start = [], 0
        for c in counts:
            refs.append(flat_refs[start:start + c])
            start += c
        return hyps, refs

    def compute(self) -> Tensor:
        """Mean CIDEr-D over clips, float64 scalar (0 with no clips)."""
        hyps, refs = self.corpus()
        scores = cider_d_scores(hyps, refs, n=self.n_gram, sigma=self.sigma)
        mean = sum(scores) / len(scores) if scores else 0.0
        return torch.tensor(mean, dtype=torch.float64, device=self.device)

    def _sync_dist(self, dist_sync_fn: Callable = gather_all_tensors,
                   process_group: Any | None = None) -> None:
        # torchmetrics stands in an empty *float* tensor for an empty list state of a rank that saw
        # no data, which cannot be all-gathered with the uint8 / int64 tensors of the other ranks:
        # give such a rank empty tensors of the right dtypes (sync() restores the states after).
        for name, dtype in self._STATE_DTYPES.items():
            if isinstance(getattr(self, name), list) and not getattr(self, name):
                setattr(self, name, [torch.zeros(0, dtype=dtype, device=self.device)])
        super()._sync_dist(dist_sync_fn, process_group)
