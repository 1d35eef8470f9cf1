"""Metrics against hand-computed numbers, including the empty cases."""

import math

import pytest
import torch

from avmt.tasks import get_task
from avmt.tasks.metrics import (
    AVVPF1,
    CaptionBLEU,
    CaptionROUGEL,
    LabelAccuracy,
    LabelMacroF1,
    ParseFailureRate,
    SegmentAccuracy,
    EventClassAccuracy,
    RangeIoU,
    avvp_video_scores,
)


pytestmark = pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")


def value(metric):
    return float(metric.compute())


# ---- parse failures -------------------------------------------------------------------------


def test_parse_failure_rate():
    m = ParseFailureRate()
    m.update([None, "a", None, "b"], [0, 0, 0, 0])
    assert value(m) == 0.5
    m.update(["c"] * 4, [0] * 4)
    assert value(m) == 0.25
    m.reset()
    assert value(m) == 0.0  # no predictions
    with pytest.raises(ValueError, match="pair up"):
        m.update([None], [0, 0])


# ---- AVE --------------------------------------------------------------------------------------


def test_segment_accuracy_hand_computed():
    gt = {"class": "violin", "range": [2, 7], "num_segments": 10}
    m = SegmentAccuracy()
    m.update([{"class": "violin", "range": [3, 7]}], [gt])  # segment 2 missed
    assert value(m) == pytest.approx(9 / 10)
    m.update([{"class": "dog", "range": [2, 7]}], [gt])  # wrong class: 5 event segments wrong
    assert value(m) == pytest.approx(14 / 20)
    m.update([None], [gt])  # parse failure: all 10 wrong
    assert value(m) == pytest.approx(14 / 30)
    m.update([{"class": "violin", "range": [0, 99]}], [gt])  # clipped to [0, 10): 5 background wrong
    assert value(m) == pytest.approx(19 / 40)


def test_segment_accuracy_empty_cases():
    no_event = {"class": "violin", "range": [4, 4], "num_segments": 10}
    m = SegmentAccuracy()
    m.update([{"class": "background", "range": [0, 10]}], [no_event])  # "background" labels nothing
    assert value(m) == 1.0
    m.update([{"class": "violin", "range": [0, 2]}], [no_event])
    assert value(m) == pytest.approx(18 / 20)
    m.reset()
    assert value(m) == 0.0  # no samples


def test_event_class_accuracy_and_range_iou_hand_computed():
    gt = {"class": "violin", "range": [2, 7], "num_segments": 10}
    no_event = {"class": "violin", "range": [4, 4], "num_segments": 10}
    preds = [
        {"class": "violin", "range": [3, 7]},  # class right; IoU 4/5
        {"class": "dog", "range": [2, 7]},  # class wrong; IoU 1
        None,  # parse failure: wrong, IoU 0
        {"class": "violin", "range": [0, 99]},  # clipped to [0, 10): class right; IoU 5/10
        {"class": "background", "range": [0, 10]},  # labels nothing: background (wrong); IoU 0
        {"class": "background", "range": [0, 10]},  # on a clip without event: right; two empty sets, IoU 1
        {"class": "dog", "range": [1, 3]},  # on a clip without event: wrong; IoU 0
    ]
    targets = [gt] * 5 + [no_event] * 2
    classes, ious = EventClassAccuracy(), RangeIoU()
    classes.update(preds, targets)
    ious.update(preds, targets)
    assert value(classes) == pytest.approx(3 / 7)
    assert value(ious) == pytest.approx((0.8 + 1.0 + 0.0 + 0.5 + 0.0 + 1.0 + 0.0) / 7)
    classes.reset()
    assert value(classes) == 0.0


# ---- AVVP -------------------------------------------------------------------------------------

GT = {
    "audio": {"dog": [[0, 3], [8, 10]], "violin": [[2, 7]]},
    "visual": {"violin": [[2, 7]], "cat": [[4, 9]]},
    "num_segments": 10,
}
PRED = {"audio": {"dog": [[0, 4]], "violin": [[2, 7]]}, "visual": {"violin": [[3, 7]], "bird": [[0, 2]]}}

# Worked by hand (see the comments in test_avvp_hand_worked_video):
SEG = {"audio": 5 / 6, "visual": 8 / 27, "audio_visual": 8 / 9, "event": 23 / 57}
EVT = {"audio": 5 / 6, "visual": 1 / 3, "audio_visual": 1.0, "event": 5 / 12}


def test_avvp_hand_worked_video():
    # Segment level. audio: dog pred 0-3 vs gt {0,1,2,8,9}: tp3 fp1 fn2 -> 6/9; violin exact -> 1; mean 5/6.
    # visual: violin pred 3-6 vs gt 2-6: tp4 fn1 -> 8/9; cat missed -> 0; bird false alarm -> 0; mean 8/27.
    # audio-visual (per-class a AND v): only violin: pred 3-6 vs gt 2-6 -> 8/9.
    # event@AV (a+v counts pooled per class): dog 6/9, violin tp9 fn1 -> 18/19, cat 0, bird 0 -> 23/57.
    assert avvp_video_scores(PRED, GT, "segment") == pytest.approx(SEG)
    # Event level (IoU >= 0.5). audio: dog pred [0,4) matches gt [0,3) (IoU 3/4), gt [8,10) missed ->
    # tp1 fn1 -> 2/3; violin 1 -> 5/6. visual: violin [3,7) vs [2,7) IoU 4/5 -> 1; cat 0; bird 0 -> 1/3.
    # audio-visual: violin [3,7) vs [2,7) -> 1. pooled: dog 2/3, violin 1, cat 0, bird 0 -> 5/12.
    assert avvp_video_scores(PRED, GT, "event") == pytest.approx(EVT)


def test_avvp_event_matching_threshold():
    gt = {"audio": {"dog": [[0, 6]]}, "visual": {}, "num_segments": 10}
    # [0,3) vs [0,6): IoU exactly 0.5 -> match; [4,6): IoU 1/3 -> FP. tp1 fp1 fn0 -> 2/3.
    s = avvp_video_scores({"audio": {"dog": [[0, 3], [4, 6]]}, "visual": {}}, gt, "event")
    assert s["audio"] == pytest.approx(2 / 3)
    # IoU 2/6 < 0.5 -> no match: fp1 fn1 -> 0
    assert avvp_video_scores({"audio": {"dog": [[0, 2]]}, "visual": {}}, gt, "event")["audio"] == 0.0
    # one long prediction over two GT events: matches [0,4) (IoU 4/8) -> tp1; [5,8) (IoU 3/8) -> fn1 -> 2/3
    gt2 = {"audio": {"dog": [[0, 4], [5, 8]]}, "visual": {}, "num_segments": 10}
    s = avvp_video_scores({"audio": {"dog": [[0, 8]]}, "visual": {}}, gt2, "event")
    assert s["audio"] == pytest.approx(2 / 3)


def test_avvp_empty_cases():
    empty_gt = {"audio": {}, "visual": {}, "num_segments": 10}
    empty_pred = {"audio": {}, "visual": {}}
    for level in ("segment", "event"):
        # nothing to find and nothing predicted: all true negatives -> 1 (as the LLP evaluation)
        assert avvp_video_scores(empty_pred, empty_gt, level) == {
            "audio": 1.0, "visual": 1.0, "audio_visual": 1.0, "event": 1.0}
        # no prediction on a clip with events -> 0
        assert avvp_video_scores(empty_pred, GT, level) == {
            "audio": 0.0, "visual": 0.0, "audio_visual": 0.0, "event": 0.0}
        # a parse failure is wrong even where there is nothing to find
        assert avvp_video_scores(None, empty_gt, level)["audio"] == 0.0


def test_avvp_false_alarms_where_there_is_nothing():
    empty_gt = {"audio": {}, "visual": {}, "num_segments": 10}
    # audio dog and visual cat predicted on an empty clip: every audio / visual / pooled class is all
    # false positives -> 0; no class is predicted in both modalities, so no audio-visual event is
    # predicted or present -> audio-visual 1 (all true negatives, as the LLP evaluation)
    pred = {"audio": {"dog": [[0, 3]]}, "visual": {"cat": [[2, 5]]}}
    want = {"audio": 0.0, "visual": 0.0, "audio_visual": 1.0, "event": 0.0}
    for level in ("segment", "event"):
        assert avvp_video_scores(pred, empty_gt, level) == want
    # the same class in both: an audio-visual false alarm [1, 3) -> audio-visual 0 too
    pred = {"audio": {"dog": [[0, 3]]}, "visual": {"dog": [[1, 5]]}}
    for level in ("segment", "event"):
        assert avvp_video_scores(pred, empty_gt, level)["audio_visual"] == 0.0
    # a class named with no ranges predicts nothing
    assert avvp_video_scores({"audio": {"dog": []}, "visual": {}}, empty_gt, "event")["audio"] == 1.0
    # through the metric, with a hand-worked video, a parse failure and this false alarm:
    # Type@AV per video = mean(audio, visual, audio-visual) -> SEG's, 0, (0 + 0 + 1) / 3
    m = AVVPF1(level="segment", kind="type_av")
    m.update([PRED, None, {"audio": {"dog": [[0, 3]]}, "visual": {"cat": [[2, 5]]}}], [GT, GT, empty_gt])
    type_av = (SEG["audio"] + SEG["visual"] + SEG["audio_visual"]) / 3
    assert value(m) == pytest.approx((type_av + 0 + 1 / 3) / 3)
    m = AVVPF1(level="event", kind="event_av")
    m.update([PRED, None, {"audio": {"dog": [[0, 3]]}, "visual": {"cat": [[2, 5]]}}], [GT, GT, empty_gt])
    assert value(m) == pytest.approx((EVT["event"] + 0 + 0) / 3)


def test_avvp_metric_averages_over_videos():
    empty_gt = {"audio": {}, "visual": {}, "num_segments": 10}
    preds, targets = [PRED, None, {"audio": {}, "visual": {}}], [GT, GT, empty_gt]
    for level, ref in (("segment", SEG), ("event", EVT)):
        expect = {
            "audio": (ref["audio"] + 0 + 1) / 3,
            "visual": (ref["visual"] + 0 + 1) / 3,
            "audio_visual": (ref["audio_visual"] + 0 + 1) / 3,
            "type_av": ((ref["audio"] + ref["visual"] + ref["audio_visual"]) / 3 + 0 + 1) / 3,
            "event_av": (ref["event"] + 0 + 1) / 3,
        }
        for kind, want in expect.items():
            m = AVVPF1(level=level, kind=kind)
            m.update(preds[:2], targets[:2])
            m.update(preds[2:], targets[2:])
            assert value(m) == pytest.approx(want), (level, kind)
    m = AVVPF1()
    assert value(m) == 0.0  # no videos
    with pytest.raises(ValueError):
        AVVPF1(level="frame")
    with pytest.raises(ValueError):
        AVVPF1(kind="both")


def test_avvp_collection_keys():
    m = get_task("avvp").metrics()
    m.update([PRED], [GT])
    out = m.compute()
    kinds = ("audio", "visual", "audio_visual", "type_av", "event_av")
    expected = {f"{lvl}_f1/{k}" for lvl in ("segment", "event") for k in kinds} | {"parse_failure_rate"}
    assert set(out) == expected
    type_av = (SEG["audio"] + SEG["visual"] + SEG["audio_visual"]) / 3
    assert float(out["segment_f1/type_av"]) == pytest.approx(type_av)
    assert float(out["event_f1/event_av"]) == pytest.approx(EVT["event"])


# ---- labels -----------------------------------------------------------------------------------

LABELS = ("a", "b", "c", "d")


def test_label_accuracy_and_macro_f1_hand_computed():
    preds, targets = ["a", "b", "b", None], ["a", "a", "b", "c"]
    acc, f1 = LabelAccuracy(LABELS), LabelMacroF1(LABELS)
    acc.update(preds, targets)
    f1.update(preds, targets)
    assert value(acc) == pytest.approx(0.5)
    # a: tp1 fn1 -> 2/3; b: tp1 fp1 -> 2/3; c: fn1 -> 0; d absent -> not averaged. (2/3+2/3+0)/3
    assert value(f1) == pytest.approx(4 / 9)
    # an unknown label is wrong like None (but it is not a parse failure)
    acc2 = LabelAccuracy(LABELS)
    acc2.update(["zzz", "A"], ["a", "a"])  # predictions are normalized: "A" == "a"
    assert value(acc2) == 0.5


def test_label_metrics_empty_and_errors():
    acc, f1 = LabelAccuracy(LABELS), LabelMacroF1(LABELS)
    acc.update([], [])
    f1.update([], [])
    assert value(acc) == 0.0 and value(f1) == 0.0
    with pytest.raises(ValueError, match="not one of"):
        LabelAccuracy(LABELS).update(["a"], ["e"])
    with pytest.raises(ValueError, match="duplicates"):
        LabelAccuracy(("a", "a"))


def test_label_accuracy_per_type_filter():
    targets = [{"answer": "a", "type": "x"}, {"answer": "b", "type": "x"}, {"answer": "c", "type": "y"}]
    m = LabelAccuracy(LABELS, target_key="answer", qtype="x")
    m.update(["a", "a", "c"], targets)
    assert value(m) == 0.5
    m = LabelAccuracy(LABELS, target_key="answer", qtype="z")
    m.update(["a", "a", "c"], targets)
    assert value(m) == 0.0  # no questions of that type


def test_avqa_collection_keys_and_values():
    task = get_task("avqa")
    m = task.metrics()
    types = [
        "audio_counting", "visual_counting", "audio_visual_counting",
        "visual_location", "audio_visual_location",
        "audio_existential", "visual_existential", "audio_visual_existential",
        "audio_temporal", "visual_temporal", "audio_visual_temporal",
        "audio_comparative", "visual_comparative", "audio_visual_comparative",
    ]
    modalities = {"accuracy/audio", "accuracy/visual", "accuracy/audio_visual"}  # per-modality averages
    assert set(m.keys()) == {"accuracy", "parse_failure_rate"} | {f"accuracy/{t}" for t in types} | modalities
    targets = [{"answer": "yes", "type": "audio_existential"}, {"answer": "two", "type": "audio_counting"},
               {"answer": "flute", "type": "audio_temporal"}, {"answer": "left", "type": "visual_location"}]
    m.update(["yes", "three", None, "left"], targets)
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["accuracy"] == 0.5
    assert out["accuracy/audio_existential"] == 1.0
    assert out["accuracy/audio_counting"] == 0.0
    assert out["accuracy/audio_temporal"] == 0.0
    assert out["accuracy/visual_location"] == 1.0
    assert out["accuracy/visual_temporal"] == 0.0  # empty type
    # audio: existential right, counting and temporal wrong; visual: location right
    assert out["accuracy/audio"] == pytest.approx(1 / 3) and out["accuracy/visual"] == 1.0
    assert out["accuracy/audio_visual"] == 0.0  # no audio-visual question
    assert out["parse_failure_rate"] == 0.25


def test_action_collection_hand_computed():
    preds = ["static", "moving left", None, "pulsing", "static", "jumping"]
    targets = ["static", "static", "moving left", "moving right", "static", "pulsing"]
    m = get_task("action").metrics()
    m.update(preds, targets)
    out = {k: float(v) for k, v in m.compute().items()}
    # right: 1st and 5th -> 2/6. "jumping" is parsed (no failure) but not a label: a miss like None.
    # F1: static tp2 fn1 -> 4/5; moving left fp1 fn1 -> 0; moving right (never predicted) fn1 -> 0;
    # pulsing fp1 fn1 -> 0; moving up / down occur nowhere -> not averaged: (4/5) / 4 = 1/5
    assert out == {"accuracy": pytest.approx(1 / 3), "macro_f1": pytest.approx(1 / 5),
                   "parse_failure_rate": pytest.approx(1 / 6)}


def test_emotion_collection_hand_computed():
    m = get_task("emotion").metrics()
    m.update(["happy", "happy", "sad", None, "tense"], ["happy", "sad", "sad", "calm", "calm"])
    out = {k: float(v) for k, v in m.compute().items()}
    # right: 1st, 3rd -> 2/5. F1: happy tp1 fp1 -> 2/3; sad tp1 fn1 -> 2/3; calm (never predicted)
    # fn2 -> 0; tense (predicted, never true) fp1 -> 0: (2/3 + 2/3) / 4 = 1/3
    assert out == {"accuracy": pytest.approx(2 / 5), "macro_f1": pytest.approx(1 / 3),
                   "parse_failure_rate": pytest.approx(1 / 5)}


@pytest.mark.parametrize("name", ["action", "emotion", "avqa", "avcap", "ave", "avvp"])
def test_empty_collections_are_zero_not_nan(name):
    m = get_task(name).metrics()
    m.update([], [])
    out = {k: float(v) for k, v in m.compute().items()}
    assert out and all(v == 0.0 for v in out.values()), out
    fresh = {k: float(v) for k, v in get_task(name).metrics().compute().items()}  # no update at all
    assert fresh == out


@pytest.mark.parametrize("name,labels", [("action", "moving left"), ("emotion", "happy")])
def test_label_task_collection_keys(name, labels):
    m = get_task(name).metrics()
    m.update([labels, None], [labels, labels])
    out = {k: float(v) for k, v in m.compute().items()}
    assert out == {"accuracy": 0.5, "macro_f1": pytest.approx(2 / 3), "parse_failure_rate": 0.5}


def test_ave_collection_keys():
    m = get_task("ave").metrics()
    m.update([None], [{"class": "violin", "range": [2, 7], "num_segments": 10}])
    out = {k: float(v) for k, v in m.compute().items()}
    assert out == {"segment_accuracy": 0.0, "class_accuracy": 0.0, "range_iou": 0.0, "parse_failure_rate": 1.0}


# ---- captions ---------------------------------------------------------------------------------


def test_bleu_and_rouge_hand_computed():
    pred, ref = "a red violin is heard", "a red violin is seen and heard"
    bleu, rouge = CaptionBLEU(), CaptionROUGEL()
    bleu.update([pred], [ref])
    rouge.update([pred], [ref])
    # n-gram precisions 5/5, 3/4, 2/3, 1/2; brevity penalty exp(1 - 7/5)
    assert value(bleu) == pytest.approx((1 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25 * math.exp(1 - 7 / 5), abs=1e-5)
    # LCS 5: P = 1, R = 5/7 -> F = 5/6
    assert value(rouge) == pytest.approx(5 / 6, abs=1e-5)


def test_caption_normalization_and_empty_cases():
    bleu, rouge = CaptionBLEU(), CaptionROUGEL()
    bleu.update(["A red violin is seen and heard."], ["a RED violin is seen and heard ."])
    rouge.update(["A red violin is seen and heard."], [["a RED violin is seen and heard ."]])
    assert value(bleu) == pytest.approx(1.0) and value(rouge) == pytest.approx(1.0)
    bleu, rouge = CaptionBLEU(), CaptionROUGEL()
    bleu.update([None], ["a red violin is seen and heard"])
    rouge.update([None], ["a red violin is seen and heard"])
    assert value(bleu) == 0.0 and value(rouge) == 0.0  # no prediction
    assert value(CaptionROUGEL()) == 0.0  # no samples
    m = get_task("avcap").metrics()
    m.update(["a dog is heard", None], ["a dog is heard", "a cat is seen"])
    out = {k: float(v) for k, v in m.compute().items()}
    assert set(out) == {"bleu4", "rouge_l", "cider_d", "parse_failure_rate"}
    assert out["rouge_l"] == pytest.approx(0.5) and out["parse_failure_rate"] == 0.5
    # CIDEr-D (tests/tasks/test_caption_metrics.py): N = 2, "dog", "heard", "a dog", ... weigh log 2,
    # "a" and "is" (in both clips' references) 0; clip 1 is exact: cos 1 for n = 1..4 -> 10; clip 2: 0
    assert out["cider_d"] == pytest.approx(5.0)


# ---- torchmetrics behaviour -------------------------------------------------------------------


def test_states_are_sum_reduced_and_reset():
    for metric in (ParseFailureRate(), SegmentAccuracy(), EventClassAccuracy(), RangeIoU(), AVVPF1()):
        names = [getattr(fx, "__name__", "") for fx in metric._reductions.values()]
        assert names and all(n in ("_sum", "sum", "dim_zero_sum") for n in names)
    m = get_task("ave").metrics()
    m.update([None], [{"class": "violin", "range": [2, 7], "num_segments": 10}])
    m.reset()
    gt = {"class": "violin", "range": [2, 7], "num_segments": 10}
    m.update([{"class": "violin", "range": [2, 7]}], [gt])
    assert float(m.compute()["segment_accuracy"]) == 1.0


def test_merged_state_equals_single_pass():
    """Splitting the data over two metric instances and merging states (what DDP's sum does)
    gives the single-pass number."""
    preds = ["a", "b", "b", None, "c", "d"]
    targets = ["a", "a", "b", "c", "c", "d"]
    whole = LabelAccuracy(LABELS)
    whole.update(preds, targets)
    left, right = LabelAccuracy(LABELS), LabelAccuracy(LABELS)
    left.update(preds[:3], targets[:3])
    right.update(preds[3:], targets[3:])
    left.merge_state(right)
    assert value(left) == value(whole)
    w, a, b = AVVPF1(kind="type_av"), AVVPF1(kind="type_av"), AVVPF1(kind="type_av")
    w.update([PRED, None], [GT, GT])
    a.update([PRED], [GT])
    b.update([None], [GT])
    a.merge_state(b)
    assert value(a) == pytest.approx(value(w))
    assert isinstance(w.f_audio, torch.Tensor)
