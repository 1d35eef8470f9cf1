"""Spatial-task metrics against hand-computed numbers, including the empty cases."""

import math

import pytest
import torch

from avmt.tasks.metrics import ParseFailureRate
from avmt.tasks.spatial_metrics import (
    AUC_THRESHOLDS,
    F_THRESHOLDS,
    BoxAUC,
    BoxCIoU,
    ClassMapF,
    ClassMapIoU,
    MaskF,
    MaskJ,
    NullS,
    box_iou,
    mask_iou,
)

pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")


def value(metric):
    out = metric.compute()
    assert out.dtype == torch.float64 and out.ndim == 0
    return float(out)


def rows(*on, h=4, w=4):
    """A bool [H, W] frame with the listed rows set."""
    m = torch.zeros(h, w, dtype=torch.bool)
    for r in on:
        m[r] = True
    return m


def tgt(*frames, null=None):
    out = {"mask": torch.stack(frames)}
    if null is not None:
        out["null"] = null
    return out


def pred(*frames):
    return {"mask": torch.stack([f.float() if f.dtype == torch.bool else f for f in frames])}


EMPTY = rows()
TOP = rows(0, 1)  # 8 pixels
MID = rows(1, 2)  # overlaps TOP on row 1: inter 4, union 12


# ---- mask IoU / J -----------------------------------------------------------------------------


def test_mask_iou_hand_computed():
    prob = torch.stack([TOP.float(), EMPTY.float(), EMPTY.float(), TOP.float(), MID.float() * 0.9])
    target = torch.stack([TOP, TOP, EMPTY, EMPTY, TOP])
    # perfect 1; empty pred on an object 0; empty frame predicted empty 1 (TN 16/16);
    # empty frame predicted half full 8/16; half overlap 4/12
    assert mask_iou(prob, target).tolist() == pytest.approx([1.0, 0.0, 1.0, 0.5, 1 / 3])
    assert mask_iou(prob, target).dtype == torch.float64
    # binarization is prob > 0.5 (strict): 0.5 is background
    assert mask_iou(TOP.float()[None] * 0.5, TOP[None]).tolist() == [0.0]
    assert mask_iou(torch.zeros(0, 4, 4), torch.zeros(0, 4, 4, dtype=torch.bool)).numel() == 0
    with pytest.raises(ValueError):
        mask_iou(prob, target[:2])


def test_mask_j_averages_frames_not_samples():
    m = MaskJ()
    m.update([pred(TOP)], [tgt(TOP)])
    assert value(m) == 1.0
    m.update([pred(EMPTY, MID)], [tgt(TOP, TOP)])  # IoUs 0 and 1/3
    assert value(m) == pytest.approx((1 + 0 + 1 / 3) / 3)  # per frame; per sample would be (1 + 1/6) / 2
    m.update([pred(rows(2, 3))], [tgt(EMPTY)])  # empty target, half predicted: 0.5
    assert value(m) == pytest.approx((1 + 0 + 1 / 3 + 0.5) / 4)


def test_mask_j_none_and_empty_cases():
    m = MaskJ()
    assert value(m) == 0.0  # no samples
    m.update([], [])
    assert value(m) == 0.0
    m.update([None, None], [tgt(TOP, EMPTY), tgt(TOP)])  # None = empty mask: 0 on objects, 1 on empty frames
    assert value(m) == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="pair up"):
        m.update([None], [])
    with pytest.raises(ValueError, match="shape"):
        m.update([pred(TOP, TOP)], [tgt(TOP)])


def test_mask_subsets():
    preds = [pred(TOP), pred(MID), pred(rows(0)), None]
    targets = [tgt(TOP, null=False), tgt(TOP, null=False), tgt(EMPTY, null=True), tgt(EMPTY, null=True)]
    expect = {"all": (1 + 1 / 3 + 0.75 + 1) / 4, "non_null": (1 + 1 / 3) / 2, "null": (0.75 + 1) / 2}
    for subset, want in expect.items():
        m = MaskJ(subset=subset)
        m.update(preds, targets)
        assert value(m) == pytest.approx(want), subset
    # targets without a "null" key are non-null
    m = MaskJ(subset="null")
    m.update([pred(TOP)], [tgt(TOP)])
    assert value(m) == 0.0
    f = MaskF(subset="non_null")
    f.update(preds[:1] + preds[2:3], targets[:1] + targets[2:3])
    assert value(f) == 1.0
    f = MaskF(subset="null")
    f.update(preds, targets)
    assert value(f) == 0.0  # null targets have no foreground frame
    with pytest.raises(ValueError):
        MaskJ(subset="seen")
    with pytest.raises(ValueError):
        MaskF(subset="unseen")


# ---- F-measure --------------------------------------------------------------------------------


def avsbench_f(pred, gt, pr_num=255):
    """AVSBench's Eval_Fmeasure / _eval_pr written out literally (float32, per-threshold loop)."""
    beta2 = 0.3
    avg_f, img_num, score = 0.0, 0, torch.zeros(pr_num)
    for i in range(pred.size(0)):
        if torch.mean(gt[i]) == 0.0:
            continue
        prec, recall = torch.zeros(pr_num), torch.zeros(pr_num)
        thlist = torch.linspace(0, 1 - 1e-10, pr_num)
        for k in range(pr_num):
            y_temp = (pred[i] >= thlist[k]).float()
            tp = (y_temp * gt[i]).sum()
            prec[k], recall[k] = tp / (y_temp.sum() + 1e-20), tp / (gt[i].sum() + 1e-20)
        f = (1 + beta2) * prec * recall / (beta2 * prec + recall)
        f[f != f] = 0
        avg_f += f
        img_num += 1
        score = avg_f / img_num
    return score.max().item()


def test_mask_f_perfect_and_thresholds():
    assert len(F_THRESHOLDS) == 255 and float(F_THRESHOLDS[0]) == 0.0
    m = MaskF()
    m.update([pred(TOP)], [tgt(TOP)])
    assert value(m) == pytest.approx(1.0)


def test_mask_f_best_threshold_is_not_half():
    # frame 1: the 4 object pixels (row 0) at 0.3, one background pixel at 0.6, the rest 0
    # frame 2: the 4 object pixels at 0.9, the same background pixel at 0.6
    obj = rows(0)
    f1 = torch.where(obj, 0.3, 0.0)
    f1[2, 2] = 0.6
    f2 = torch.where(obj, 0.9, 0.0)
    f2[2, 2] = 0.6
    # th = 0: everything predicted: P = 4/16, R = 1 -> 1.3 * 0.25 / 1.075 (both frames)
    # 0 < th <= 0.3: 5 predicted, tp 4: P = 0.8, R = 1 -> 1.3 * 0.8 / 1.24 = 26/31 (both frames)
    # 0.3 < th <= 0.6: frame 1 has tp 0 -> 0; frame 2 again 26/31 -> mean 13/31
    # 0.6 < th <= 0.9: frame 1 0, frame 2 exact (1) -> mean 1/2; above 0.9: 0
    # F = max of the per-threshold means = 26/31 (at 0.5 it would be 13/31; the mean of
    # per-frame maxima would be (26/31 + 1) / 2)
    m = MaskF()
    m.update([{"mask": torch.stack([f1, f2])}], [tgt(obj, obj)])
    assert value(m) == pytest.approx(26 / 31)
    reference = avsbench_f(torch.stack([f1, f2]), torch.stack([obj, obj]).float())
    assert value(m) == pytest.approx(reference, abs=1e-6)
    f_mean = m.f_sum / m.frames
    assert float(f_mean[0]) == pytest.approx(1.3 * 0.25 / 1.075)
    assert float(f_mean[127]) == pytest.approx(13 / 31)  # threshold 0.5


def test_mask_f_matches_avsbench_on_random_maps():
    g = torch.Generator().manual_seed(0)
    prob = torch.rand(6, 12, 10, generator=g)
    prob[0, :3] = 1.0  # exact 1.0 and exact threshold values are counted as AVSBench does
    prob[1, :2] = F_THRESHOLDS[100]
    gt = torch.rand(6, 12, 10, generator=g) > 0.6
    gt[3] = False  # an empty frame: skipped
    m = MaskF()
    m.update([{"mask": prob[:4]}, {"mask": prob[4:].double()}], [tgt(*gt[:4]), tgt(*gt[4:])])
    assert int(m.frames) == 5
    assert value(m) == pytest.approx(avsbench_f(prob, gt.float()), abs=1e-6)


def test_mask_f_empty_and_none_cases():
    m = MaskF()
    assert value(m) == 0.0  # no samples
    m.update([pred(TOP)], [tgt(EMPTY)])
    assert value(m) == 0.0 and int(m.frames) == 0  # empty target frames are skipped
    m.update([None], [tgt(rows(0))])
    # None = all-zero map: only threshold 0 predicts anything (everything): P = 4/16, R = 1
    assert value(m) == pytest.approx(1.3 * 0.25 / (0.3 * 0.25 + 1))
    m.update([pred(EMPTY)], [tgt(rows(0))])  # same as None
    assert value(m) == pytest.approx(1.3 * 0.25 / 1.075)


# ---- null S -----------------------------------------------------------------------------------


def test_null_s_hand_computed():
    m = NullS()
    assert value(m) == 0.0  # no null sample
    assert NullS.higher_is_better is False
    m.update([None], [tgt(EMPTY, EMPTY, null=True)])
    assert value(m) == 0.0  # None = no foreground
    m.update([pred(rows(0), rows(0, 1, 2, 3))], [tgt(EMPTY, EMPTY, null=True)])  # 4 + 16 of 32
    assert value(m) == pytest.approx(math.sqrt(20 / 64))
    m.update([pred(TOP)], [tgt(TOP, null=False)])  # not null: ignored
    m.update([pred(TOP)], [tgt(TOP)])  # no "null" key: ignored
    assert value(m) == pytest.approx(math.sqrt(20 / 64))
    m.update([{"mask": torch.full((1, 4, 4), 0.5)}], [tgt(EMPTY, null=True)])  # 0.5 is not > 0.5
    assert value(m) == pytest.approx(math.sqrt(20 / 80))
    m.reset()
    assert value(m) == 0.0


# ---- AVSS class maps --------------------------------------------------------------------------

CM_TGT = torch.tensor([[[0, 0, 1, 1], [0, 2, 2, 2]]])
CM_PRED = torch.tensor([[[0, 1, 1, 1], [0, 0, 2, 2]]])
# class 0: tgt 3, pred 3, inter 2 -> IoU 2/4; tp 2 fp 1 fn 1 -> P = R = 2/3 -> F = 2/3
# class 1: tgt 2, pred 3, inter 2 -> IoU 2/3; tp 2 fp 1 fn 0 -> P 2/3, R 1 -> F = 1.3*(2/3)/1.2 = 13/18
# class 2: tgt 3, pred 2, inter 2 -> IoU 2/3; tp 2 fp 0 fn 1 -> P 1, R 2/3 -> F = 1.3*(2/3)/(0.3+2/3) = 26/29
# class 3: absent from both -> not averaged
F_BY_CLASS = [2 / 3, 13 / 18, 26 / 29]


def test_class_map_iou_and_f_hand_computed():
    for bg, miou, mf in ((True, (1 / 2 + 2 / 3 + 2 / 3) / 3, sum(F_BY_CLASS) / 3),
                         (False, 2 / 3, sum(F_BY_CLASS[1:]) / 2)):
        iou, f = ClassMapIoU(4, include_background=bg), ClassMapF(4, include_background=bg)
        iou.update([{"class_map": CM_PRED}], [{"class_map": CM_TGT}])
        f.update([{"class_map": CM_PRED}], [{"class_map": CM_TGT}])
        assert value(iou) == pytest.approx(miou)
        assert value(f) == pytest.approx(mf)
    assert iou.inter.tolist() == [2, 2, 2, 0] and iou.union.tolist() == [4, 3, 3, 0]
    assert (f.tp.tolist(), f.fp.tolist(), f.fn.tolist()) == ([2, 2, 2, 0], [1, 1, 0, 0], [1, 0, 1, 0])


def test_class_map_accumulates_over_the_split():
    # a second sample: all class 1 predicted on an all-class-1 target (8 px). Pooled class 1:
    # inter 10, union 11 -> IoU 10/11 (the mean of per-sample IoUs would be (2/3 + 1) / 2)
    full = torch.ones(1, 2, 4, dtype=torch.long)
    iou = ClassMapIoU(3, include_background=False)
    iou.update([{"class_map": CM_PRED}, {"class_map": full}], [{"class_map": CM_TGT}, {"class_map": full}])
    assert value(iou) == pytest.approx((10 / 11 + 2 / 3) / 2)


def test_class_map_none_and_empty_cases():
    iou, f = ClassMapIoU(3), ClassMapF(3)
    assert value(iou) == 0.0 and value(f) == 0.0  # no samples
    iou.update([None], [{"class_map": CM_TGT}])  # all background: class 0 inter 3 union 8; 1, 2: 0
    f.update([None], [{"class_map": CM_TGT}])  # class 0: tp 3 fp 5 -> P 3/8, R 1; classes 1, 2: 0
    assert value(iou) == pytest.approx((3 / 8 + 0 + 0) / 3)
    assert value(f) == pytest.approx(1.3 * (3 / 8) / (0.3 * 3 / 8 + 1) / 3)
    # background only, nothing else anywhere: no foreground class to average -> 0
    no_fg = ClassMapIoU(3, include_background=False)
    no_fg.update([None], [{"class_map": torch.zeros(1, 2, 2, dtype=torch.long)}])
    assert value(no_fg) == 0.0
    with pytest.raises(ValueError, match="outside"):
        iou.update([{"class_map": CM_PRED + 2}], [{"class_map": CM_TGT}])
    with pytest.raises(ValueError, match="shape"):
        iou.update([{"class_map": CM_PRED[:, :1]}], [{"class_map": CM_TGT}])


# ---- boxes ------------------------------------------------------------------------------------


def test_box_iou_cases():
    assert box_iou([100, 100, 300, 300], [100, 100, 300, 300]) == 1.0  # identical
    assert box_iou([0, 0, 100, 100], [200, 200, 300, 300]) == 0.0  # disjoint
    assert box_iou([0, 0, 100, 100], [100, 0, 200, 100]) == 0.0  # touching
    assert box_iou([0, 0, 400, 400], [100, 100, 300, 300]) == pytest.approx(1 / 4)  # nested
    assert box_iou([0, 0, 200, 100], [100, 0, 300, 100]) == pytest.approx(1 / 3)  # half overlap
    assert box_iou([300, 300, 100, 100], [0, 0, 1000, 1000]) == 0.0  # inverted: area 0
    assert box_iou([100, 100, 100, 500], [0, 0, 1000, 1000]) == 0.0  # empty (zero width)
    assert box_iou([5, 5, 5, 5], [5, 5, 5, 5]) == 0.0  # union 0
    assert box_iou(torch.tensor([0, 0, 10, 10]), (0, 0, 10, 5)) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        box_iou([0, 0, 10], [0, 0, 10, 10])


def boxes_with_ious(ious):
    """(preds, targets) whose IoUs are the given values: target [0, 0, 1000, 100], prediction
    [0, 0, 1000 * iou, 100] (None for IoU 0)."""
    target = {"box": [0, 0, 1000, 100]}
    return [None if i == 0 else {"box": [0, 0, 1000 * i, 100]} for i in ious], [target] * len(ious)


def test_ciou_and_auc_hand_computed():
    preds, targets = boxes_with_ious([1.0, 0.5, 0.0])
    ciou, auc = BoxCIoU(), BoxAUC()
    ciou.update(preds, targets)
    auc.update(preds, targets)
    assert value(ciou) == pytest.approx(2 / 3)  # 1.0 and 0.5 reach 0.5
    # success rates: t = 0 -> 3/3; t = 0.05..0.5 -> 2/3; t = 0.55..1.0 -> 1/3. Trapezoids of width 0.05:
    # (1 + 2/3)/2 + 9 * 2/3 + (2/3 + 1/3)/2 + 9 * 1/3 = 5/6 + 6 + 1/2 + 3 = 31/3 -> * 0.05 = 31/60
    assert auc.successes.tolist() == [3] + [2] * 10 + [1] * 10
    assert value(auc) == pytest.approx(31 / 60)
    assert float(AUC_THRESHOLDS[10]) == 0.5 and float(AUC_THRESHOLDS[20]) == 1.0
    perfect = BoxAUC()
    perfect.update(*boxes_with_ious([1.0, 1.0]))
    assert value(perfect) == pytest.approx(1.0)


def test_box_metrics_none_and_empty_cases():
    ciou, auc = BoxCIoU(), BoxAUC()
    assert value(ciou) == 0.0 and value(auc) == 0.0  # no samples
    ciou.update([], [])
    auc.update([], [])
    assert value(ciou) == 0.0 and value(auc) == 0.0
    preds, targets = boxes_with_ious([0.0, 0.0])  # all None
    ciou.update(preds, targets)
    auc.update(preds, targets)
    assert value(ciou) == 0.0
    assert value(auc) == pytest.approx(0.05 / 2)  # IoU 0 succeeds at t = 0 only (as in LVS)
    with pytest.raises(ValueError, match="pair up"):
        ciou.update([None], [])


# ---- failures, DDP, reset ---------------------------------------------------------------------


def test_parse_failure_rate_is_reused_for_spatial_predictions():
    m = ParseFailureRate()
    m.update([None, pred(TOP), None, {"box": [0, 0, 1, 1]}], [tgt(TOP)] * 4)
    assert value(m) == 0.5


def make_metrics():
    return [MaskJ(), MaskJ(subset="non_null"), MaskF(), MaskF(subset="non_null"), NullS(),
            ClassMapIoU(3), ClassMapIoU(3, include_background=False), ClassMapF(3),
            ClassMapF(3, include_background=False), BoxCIoU(), BoxAUC()]


def data_for(metric):
    g = torch.Generator().manual_seed(1)
    if isinstance(metric, (ClassMapIoU, ClassMapF)):
        maps = [torch.randint(0, 3, (2, 4, 4), generator=g) for _ in range(8)]
        preds = [None if i == 3 else {"class_map": torch.randint(0, 3, (2, 4, 4), generator=g)}
                 for i in range(8)]
        return preds, [{"class_map": m} for m in maps]
    if isinstance(metric, (BoxCIoU, BoxAUC)):
        return boxes_with_ious([1.0, 0.55, 0.5, 0.0, 0.3, 0.15, 0.05, 0.8])
    masks = [torch.rand(2, 4, 4, generator=g) > 0.5 for _ in range(8)]
    masks[2][0] = False  # an empty frame
    preds = [None if i == 3 else {"mask": torch.rand(2, 4, 4, generator=g)} for i in range(8)]
    targets = [{"mask": m & (i % 3 != 0), "null": i % 3 == 0} for i, m in enumerate(masks)]
    return preds, targets


def test_states_are_sum_reduced():
    for metric in make_metrics():
        names = [getattr(fx, "__name__", "") for fx in metric._reductions.values()]
        assert names and all(n in ("_sum", "sum", "dim_zero_sum") for n in names), type(metric)


@pytest.mark.parametrize("idx", range(11))
def test_merged_state_equals_single_pass(idx):
    """Two instances on halves of the data, states summed (as DDP's sum reduction) = one pass."""
    whole, left, right = make_metrics()[idx], make_metrics()[idx], make_metrics()[idx]
    preds, targets = data_for(whole)
    whole.update(preds, targets)
    left.update(preds[:5], targets[:5])
    right.update(preds[5:], targets[5:])
    left.merge_state(right)
    assert value(left) == pytest.approx(value(whole), rel=1e-12, abs=1e-15)
    for name in whole._defaults:
        a, b = getattr(left, name), getattr(whole, name)
        if a.dtype == torch.long:
            assert torch.equal(a, b), name  # count states: exactly equal
        else:
            assert torch.allclose(a, b, rtol=1e-12, atol=1e-15), name
    # summing state tensors by hand is the same as merge_state
    manual = make_metrics()[idx]
    a, b = make_metrics()[idx], make_metrics()[idx]
    a.update(preds[:5], targets[:5])
    b.update(preds[5:], targets[5:])
    for name in manual._defaults:
        setattr(manual, name, getattr(a, name) + getattr(b, name))
    manual._update_count = 1
    assert value(manual) == pytest.approx(value(whole), rel=1e-12, abs=1e-15)


@pytest.mark.parametrize("idx", range(11))
def test_reset_clears(idx):
    metric = make_metrics()[idx]
    preds, targets = data_for(metric)
    metric.update(preds, targets)
    metric.reset()
    assert value(metric) == 0.0
    fresh = make_metrics()[idx]
    metric.update(preds[:4], targets[:4])
    fresh.update(preds[:4], targets[:4])
    assert value(metric) == value(fresh)
