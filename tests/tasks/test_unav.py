"""``unav``: dense audio-visual event localization, its parser, its mAP metric and its baseline."""

import random
import time

import numpy as np
import pytest
import torch

from avmt.data.sample import SampleError
from avmt.tasks import get_task
from avmt.tasks.localization_metrics import (
    MAP_THRESHOLDS,
    TemporalDetectionMAP,
    interpolated_ap,
    temporal_iou,
)
from avmt.tasks.unav import av_events

T = 10
KEYS = ["map@0.5", "map@0.6", "map@0.7", "map@0.8", "map@0.9", "map"]


def ev(cls, s, e):
    return {"class": cls, "range": [s, e]}


def tgt(*events, num_segments=T):
    return {"events": list(events), "num_segments": num_segments}


def scores(preds, targets):
    collection = get_task("unav").metrics()
    collection.update(preds, targets)
    return {k: float(v) for k, v in collection.compute().items()}


def value(metric):
    return float(metric.compute())


# ---- events, samples, applies ----------------------------------------------------------------


def test_events_of_the_fixed_scenes(clip, multi_clip):
    task = get_task("unav", reasoning=False)
    assert av_events(clip.scene) == [ev("violin", 2, 7)]
    # multi-source: overlapping events of different classes, sorted by onset
    assert av_events(multi_clip.scene) == [ev("violin", 1, 6), ev("flute", 3, 9)]
    sample = task.build(multi_clip, random.Random(0))
    assert sample.target == "<event> violin </event> <range> 1,6 </range> <event> flute </event> <range> 3,9 </range>"
    assert sample.answer == {"events": [ev("violin", 1, 6), ev("flute", 3, 9)], "num_segments": 10}
    reasoned = get_task("unav").build(multi_clip, random.Random(0)).target
    assert reasoned.endswith("So the audible and visible events are <event> violin </event> <range> 1,6 </range> "
                             "<event> flute </event> <range> 3,9 </range>.")
    assert reasoned.startswith("A blue cat in the center is seen from second 0 to second 10 but not heard. ")


def test_events_are_runs_of_seen_and_heard_merged_per_class(scene_factory):
    f = scene_factory
    objects = [
        # two runs of one object: two events
        f.object(0, "violin", visible=[[0, 10]], sounding=[[0, 2], [6, 8]], position="left"),
        # two dogs whose runs touch/overlap: one dog event
        f.object(1, "dog", visible=[[1, 4]], sounding=[[0, 10]], position="center"),
        f.object(2, "dog", visible=[[3, 6]], sounding=[[3, 6]], position="right"),
        # seen and heard but never at the same time: no event
        f.object(3, "cat", visible=[[0, 3]], sounding=[[5, 9]], position="left", row="bottom"),
        # same onset as the violin: ordered by class
        f.object(4, "bell", visible=[[0, 1]], sounding=[[0, 1]], position="center", row="bottom"),
    ]
    scene = f.scene(objects, av=None)
    assert av_events(scene) == [ev("bell", 0, 1), ev("violin", 0, 2), ev("dog", 1, 6), ev("violin", 6, 8)]
    task = get_task("unav", reasoning=False)
    sample = task.build(f.clip(scene), random.Random(0))
    assert task.parse(sample.target) == sample.answer["events"]


def test_applies_only_to_scenes_with_an_av_event(scene_factory, clip, multi_clip):
    f, task = scene_factory, get_task("unav")
    assert task.applies(clip) and task.applies(multi_clip)
    silent = f.scene([f.object(0, "cat", visible=[[0, 5]], sounding=[[5, 10]]),
                      f.object(1, "dog", sounding=[[0, 10]], position="right")], av=None)
    assert not task.applies(f.clip(silent))
    with pytest.raises(SampleError, match="'unav'.*audio-visual event"):
        task.build(f.clip(silent), random.Random(0))


def test_round_trip_on_real_synth_clips(synth_clips):
    task, bare = get_task("unav"), get_task("unav", reasoning=False)
    built, multi, overlapping = 0, 0, 0
    for i, clip in enumerate(synth_clips):
        if not task.applies(clip):
            assert not av_events(clip.scene)
            continue
        s, b = task.build(clip, random.Random(i)), bare.build(clip, random.Random(i))
        events = s.answer["events"]
        assert events and s.answer["num_segments"] == clip.num_segments == T
        assert events == sorted(events, key=lambda e: (e["range"][0], e["class"]))
        assert task.parse(s.target) == task.parse(b.target) == task.answer_to_pred(s.answer) == events
        assert b.target.startswith("<event>") and b.target.endswith("</range>")
        built += 1
        multi += clip.scene["av_event"] is None
        overlapping += any(temporal_iou(a["range"], c["range"]) > 0 for a in events for c in events if a is not c)
    assert built >= 150 and multi >= 50 and overlapping >= 30, (built, multi, overlapping)


# ---- parser --------------------------------------------------------------------------------------


def test_parser_tolerates_case_whitespace_and_filler():
    task = get_task("unav")
    assert task.parse("< EVENT >  Violin\n</Event><range>2 , 7</ RANGE >") == [ev("Violin", 2, 7)]  # case kept
    assert task.parse("So the event is <event> violin </event>, and the time range is <range> 2 7 </range>. "
                      "Then <event> french  dog </event> from <range>0,3</range>.") == [
        ev("violin", 2, 7), ev("french dog", 0, 3)]
    # duplicates are kept (they are false positives for mAP), output order kept
    dup = "<event> dog </event> <range> 5,8 </range> <event> dog </event> <range> 5,8 </range>"
    assert task.parse(dup) == [ev("dog", 5, 8), ev("dog", 5, 8)]
    # ranges past the clip are kept as written (the metric clips them)
    assert task.parse("<event> dog </event> <range> 8,12 </range>") == [ev("dog", 8, 12)]


@pytest.mark.parametrize("text", [
    None, 7, "", "no tags at all", "<event> </event> <range> 2,7 </range>",
    "<event> violin </event>",  # no range
    "<event> violin </event> <range> 2,7 </range> <event> dog </event>",  # the second event has no range
    "<event> violin </event> <range> 2,7 </range> <event> dog",  # truncated
    "<event> violin <range> 2,7 </range>",  # unclosed event
    "<range> 2,7 </range>",  # a range of no event
    "<range> 1,2 </range> <event> dog </event> <range> 2,7 </range>",
    "<event> dog </event> <range> 2,7 </range> <range> 3,4 </range>",  # two ranges for one event
    "<event> dog </event> <range> 7,2 </range>",  # reversed
    "<event> dog </event> <range> 3,3 </range>",  # empty
    "<event> dog </event> <range> a,b </range>",
    "<event> dog </event> <range> 1,2,3 </range>",
])
def test_parser_failures(text):
    assert get_task("unav").parse(text) is None


# ---- metric: hand-computed cases -----------------------------------------------------------------


def test_perfect_prediction_scores_one_at_every_threshold():
    target = tgt(ev("violin", 1, 6), ev("flute", 3, 9))
    for pred in ([ev("violin", 1, 6), ev("flute", 3, 9)], [ev("flute", 3, 9), ev("violin", 1, 6)]):
        out = scores([pred, [ev("dog", 0, 3)]], [target, tgt(ev("dog", 0, 3))])
        assert out == {**{k: 1.0 for k in KEYS}, "parse_failure_rate": 0.0}


def test_empty_and_none_predictions_miss_every_event():
    target = tgt(ev("violin", 2, 7))
    assert scores([[]], [target]) == {**{k: 0.0 for k in KEYS}, "parse_failure_rate": 0.0}
    assert scores([None], [target]) == {**{k: 0.0 for k in KEYS}, "parse_failure_rate": 1.0}
    # a None prediction still counts its clip's events: one of two violin events found.
    # Ranking: the found one (TP) alone: P = 1 at R = 1/2 -> AP = 1/2
    out = scores([[ev("violin", 2, 7)], None], [target, tgt(ev("violin", 0, 4))])
    assert out["map"] == pytest.approx(0.5) and out["parse_failure_rate"] == 0.5


def test_iou_of_0_6_is_a_hit_up_to_0_6_only():
    # GT [2, 7), prediction [2, 5): IoU = 3 / 5 = 0.6 exactly
    assert temporal_iou([2, 5], [2, 7]) == 0.6
    out = scores([[ev("violin", 2, 5)]], [tgt(ev("violin", 2, 7))])
    assert out == {"map@0.5": 1.0, "map@0.6": 1.0, "map@0.7": 0.0, "map@0.8": 0.0, "map@0.9": 0.0,
                   "map": pytest.approx(2 / 5), "parse_failure_rate": 0.0}


def test_a_duplicate_is_a_false_positive():
    # clip A: GT violin [2, 7), predicted twice (positions 0 and 1: confidences 1 and 1/2).
    # clip B: GT violin [0, 4), predicted at position 2 (confidence 1/3) after two dogs (no dog
    # GT anywhere: the dog class is not averaged). Violin ranking:
    #   conf 1   A#0 TP -> P = 1,   R = 1/2
    #   conf 1/2 A#1 FP (A's event is taken) -> P = 1/2, R = 1/2
    #   conf 1/3 B#2 TP -> P = 2/3, R = 1
    # envelope: R <= 1/2 -> max(1, 1/2, 2/3) = 1; R in (1/2, 1] -> 2/3. AP = 1/2 * 1 + 1/2 * 2/3 = 5/6.
    targets = [tgt(ev("violin", 2, 7)), tgt(ev("violin", 0, 4))]
    preds = [[ev("violin", 2, 7), ev("violin", 2, 7)], [ev("dog", 0, 3), ev("dog", 5, 8), ev("violin", 0, 4)]]
    out = scores(preds, targets)
    assert all(out[k] == pytest.approx(5 / 6) for k in KEYS)
    without = scores([preds[0][:1], preds[1]], targets)
    assert all(without[k] == pytest.approx(1.0) for k in KEYS)
    # a duplicate cannot take another event of its class: the second copy of [5, 10) has IoU 0
    # with the free [0, 2). P = 1 at R = 1/2, then P = 1/2 at R = 1/2 -> AP = 1/2
    out = scores([[ev("violin", 5, 10), ev("violin", 5, 10)]], [tgt(ev("violin", 0, 2), ev("violin", 5, 10))])
    assert out["map"] == pytest.approx(0.5)


def test_a_prediction_takes_the_unmatched_event_of_best_iou():
    # GT a = [0, 4), b = [2, 8) (same class). First prediction [1, 6): IoU 3/6 = 0.5 with a and
    # 4/7 = 0.571 with b -> at 0.5 it takes b; the second, [0, 4), then takes a: both TP, AP = 1.
    # (Taking the first listed event, a, would leave [0, 4) only b at IoU 2/8: a false positive.)
    # At 0.6 the first is a FP and the second TP: P = 0 at R = 0, P = 1/2 at R = 1/2 -> AP = 1/4.
    m5, m6 = TemporalDetectionMAP(thresholds=(0.5,)), TemporalDetectionMAP(thresholds=(0.6,))
    for m in (m5, m6):
        m.update([[ev("violin", 1, 6), ev("violin", 0, 4)]], [tgt(ev("violin", 0, 4), ev("violin", 2, 8))])
    assert value(m5) == 1.0 and value(m6) == pytest.approx(0.25)


def test_a_predicted_class_without_ground_truth_adds_no_class_to_the_mean():
    # violin found at position 1 (the dog before it has no GT): violin AP = 1, dog not averaged
    out = scores([[ev("dog", 2, 7), ev("violin", 2, 7)]], [tgt(ev("violin", 2, 7))])
    assert out["map"] == 1.0
    # a class with GT and no prediction does count: (1 + 0) / 2
    out = scores([[ev("violin", 2, 7)]], [tgt(ev("violin", 2, 7), ev("flute", 0, 3))])
    assert out["map"] == pytest.approx(0.5)
    # a class outside the vocabulary is dropped from predictions, refused in targets
    assert scores([[ev("xylophone", 0, 3), ev("violin", 2, 7)]], [tgt(ev("violin", 2, 7))])["map"] == 1.0
    with pytest.raises(ValueError, match="xylophone"):
        scores([[]], [tgt(ev("xylophone", 0, 3))])


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_no_ground_truth_at_all_scores_zero():
    assert scores([[ev("violin", 2, 7)]], [tgt()])["map"] == 0.0
    assert value(TemporalDetectionMAP()) == 0.0


def test_ranges_past_the_clip_are_clipped():
    # [8, 12) on a 10-segment clip is [8, 10): IoU 1 with the event [8, 10)
    assert scores([[ev("dog", 8, 12)]], [tgt(ev("dog", 8, 10))])["map@0.9"] == 1.0


# ---- metric: ties, DDP, reset --------------------------------------------------------------------

# clip A: its prediction (position 0) is a TP; clip B: its prediction (position 0) is a FP. Both
# have confidence 1: one tie group, P = 1/2 at R = 1/2 -> AP = 1/4 whatever the order. (Evaluated
# after each prediction instead, A first gives 1/2 and B first 1/4.)
TIE_PREDS = [[ev("violin", 0, 5)], [ev("violin", 0, 3)]]
TIE_TARGETS = [tgt(ev("violin", 0, 5)), tgt(ev("violin", 5, 10))]


def test_ties_do_not_depend_on_the_order_of_updates():
    for order in ([0, 1], [1, 0]):
        m = TemporalDetectionMAP()
        m.update([TIE_PREDS[i] for i in order], [TIE_TARGETS[i] for i in order])
        assert value(m) == pytest.approx(0.25)
        m = TemporalDetectionMAP()
        for i in order:
            m.update([TIE_PREDS[i]], [TIE_TARGETS[i]])
        assert value(m) == pytest.approx(0.25)


def test_ties_do_not_depend_on_the_order_of_merged_instances():
    for first, second in ((0, 1), (1, 0)):
        a, b = TemporalDetectionMAP(), TemporalDetectionMAP()
        a.update([TIE_PREDS[first]], [TIE_TARGETS[first]])
        b.update([TIE_PREDS[second]], [TIE_TARGETS[second]])
        a.merge_state(b)
        assert value(a) == pytest.approx(0.25)


def _ddp_sync(ranks):
    """Sync each metric of ``ranks`` as DDP would: every state gathered from every rank (checking
    what all_gather needs: the same dtype and number of dimensions everywhere), then reduced."""
    def snapshot(m):
        out = []
        for attr in m._reductions:
            state = getattr(m, attr)
            if isinstance(state, list):  # torchmetrics pre-concatenates, or sends an empty tensor
                state = torch.cat(state) if state else torch.tensor([], dtype=m.dtype)
            out.append(state)
        return out

    snapshots = [snapshot(m) for m in ranks]
    for rank, m in enumerate(ranks):
        calls = iter(range(len(snapshots[0])))

        def gather(tensor, group=None):
            i = next(calls)
            others = [s[i] for s in snapshots]
            assert all(o.dtype == tensor.dtype and o.dim() == tensor.dim() for o in others)
            return others

        m._sync_dist(gather)


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_ddp_sync_equals_one_pass_even_with_an_idle_rank():
    preds = TIE_PREDS + [[ev("dog", 0, 2), ev("violin", 1, 5)], None]
    targets = TIE_TARGETS + [tgt(ev("violin", 1, 6)), tgt(ev("dog", 3, 9))]
    whole = TemporalDetectionMAP()
    whole.update(preds, targets)
    ranks = [TemporalDetectionMAP() for _ in range(3)]
    ranks[0].update(preds[1::2], targets[1::2])
    ranks[1].update(preds[0::2], targets[0::2])  # ranks[2] sees no sample of the task
    _ddp_sync(ranks)
    assert all(value(m) == pytest.approx(value(whole), abs=1e-12) for m in ranks)
    assert 0 < value(whole) < 1


@pytest.mark.filterwarnings("ignore:The ``compute`` method of metric")
def test_reset_clears():
    m = TemporalDetectionMAP()
    m.update(TIE_PREDS, TIE_TARGETS)
    m.reset()
    assert value(m) == 0.0
    m.update([[ev("violin", 2, 7)]], [tgt(ev("violin", 2, 7))])
    assert value(m) == 1.0


def test_bad_arguments():
    with pytest.raises(ValueError, match="thresholds"):
        TemporalDetectionMAP(thresholds=())
    with pytest.raises(ValueError, match="thresholds"):
        TemporalDetectionMAP(thresholds=(0.0,))
    with pytest.raises(ValueError, match="pair up"):
        TemporalDetectionMAP().update([None], [])


# ---- metric: against a reference implementation -------------------------------------------------


def _reference_map(preds, targets, threshold):
    """ActivityNet's ``compute_average_precision_detection`` (global greedy matching in score order,
    GT tried in decreasing IoU) and ``interpolated_prec_rec``, in numpy, with scores 1 / (1 + position),
    precision and recall taken at the end of each group of equal score."""
    aps = []
    classes = sorted({e["class"] for t in targets for e in t["events"]})
    for cls in classes:
        gts = [(v, e["range"]) for v, t in enumerate(targets) for e in t["events"] if e["class"] == cls]
        dets = [(1.0 / (1 + p), v, d["range"]) for v, pred in enumerate(preds) for p, d in enumerate(pred or [])
                if d["class"] == cls]
        dets.sort(key=lambda d: -d[0])
        taken = [False] * len(gts)
        tp = np.zeros(len(dets))
        for i, (_, v, rng) in enumerate(dets):
            ious = np.array([temporal_iou(rng, g, T) if gv == v else -1.0 for gv, g in gts])
            for j in np.argsort(-ious, kind="stable"):
                if ious[j] < threshold:
                    break
                if taken[j]:
                    continue
                taken[j], tp[i] = True, 1
                break
        ctp, cfp = np.cumsum(tp), np.cumsum(1 - tp)
        ends = [i for i in range(len(dets)) if i == len(dets) - 1 or dets[i + 1][0] != dets[i][0]]
        prec, rec = ctp[ends] / (ctp[ends] + cfp[ends]), ctp[ends] / len(gts)
        mprec, mrec = np.hstack([[0], prec, [0]]), np.hstack([[0], rec, [1]])
        for i in range(len(mprec) - 1)[::-1]:
            mprec[i] = max(mprec[i], mprec[i + 1])
        idx = np.where(mrec[1:] != mrec[0:-1])[0] + 1
        aps.append(np.sum((mrec[idx] - mrec[idx - 1]) * mprec[idx]))
    return float(np.mean(aps))


def _random_case(rng, n):
    classes = ["violin", "dog", "flute", "bell"]
    preds, targets = [], []
    for _ in range(n):
        events = []
        for cls in rng.sample(classes, rng.randint(1, 3)):
            s = rng.randint(0, 8)
            events.append(ev(cls, s, rng.randint(s + 1, T)))
        targets.append(tgt(*events))
        if rng.random() < 0.1:
            preds.append(None)
            continue
        pred = []
        for _ in range(rng.randint(0, 4)):
            base = rng.choice(events) if rng.random() < 0.7 else ev(rng.choice(classes), 0, T)
            s = max(0, base["range"][0] + rng.randint(-2, 2))
            pred.append(ev(base["class"], s, max(s + 1, base["range"][1] + rng.randint(-2, 2))))
        preds.append(pred)
    return preds, targets


@pytest.mark.parametrize("seed", range(4))
def test_matches_the_reference_implementation(seed):
    preds, targets = _random_case(random.Random(seed), 30)
    out = scores(preds, targets)
    want = [_reference_map(preds, targets, t) for t in MAP_THRESHOLDS]
    for t, w in zip(MAP_THRESHOLDS, want):
        assert out[f"map@{t}"] == pytest.approx(w, abs=1e-12)
    assert out["map"] == pytest.approx(sum(want) / len(want), abs=1e-12)
    assert 0 < out["map"] < 1


def test_interpolated_ap_envelope():
    # points (R, P) = (1/4, 1), (1/2, 1/2), (3/4, 3/5): envelope 1, 3/5, 3/5 -> 1/4 + 1/4 * 3/5 * 2
    ap = interpolated_ap(torch.tensor([1.0, 0.5, 0.6], dtype=torch.float64),
                         torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64))
    assert float(ap) == pytest.approx(0.25 + 0.3)
    assert float(interpolated_ap(torch.zeros(0, dtype=torch.float64), torch.zeros(0, dtype=torch.float64))) == 0.0


# ---- baseline -----------------------------------------------------------------------------------


def test_baseline_hand_checked():
    task = get_task("unav")
    answers = [tgt(ev("violin", 2, 7)), tgt(ev("violin", 2, 7)), tgt(ev("dog", 0, 3))]
    # constant violin [2, 7): the three predictions tie, 2 TP of 2 violin events -> P = 2/3, R = 1,
    # AP = 2/3; dog AP 0 -> mAP 1/3 at every threshold. (Constant dog [0, 3): AP 1/3, mAP 1/6.)
    out = task.majority_baseline(answers)
    assert out == {**{k: pytest.approx(1 / 3) for k in KEYS}, "parse_failure_rate": 0.0}
    assert task.baseline_name == "best constant range"
    assert [ev("violin", 2, 7)] in task.constant_candidates(answers)


def test_baseline_equals_the_best_of_every_single_event_constant(scene_factory):
    """The closed-form preselection of constant_candidates finds the best of the exhaustive family."""
    f, rng = scene_factory, random.Random(3)
    task = get_task("unav")
    clips = [f.clip(f.random_scene(rng, num_classes=3)) for _ in range(12)]
    clips += [f.clip(f.random_multi_scene(rng, num_classes=4)) for _ in range(6)]
    answers = [task.build(c, random.Random(i)).answer for i, c in enumerate(clips)]
    best: dict = {}
    for cls in sorted({e["class"] for a in answers for e in a["events"]}):
        for s in range(T):
            for e in range(s + 1, T + 1):
                for key, v in scores([[ev(cls, s, e)]] * len(answers), answers).items():
                    pick = min if key == "parse_failure_rate" else max
                    best[key] = pick(best.get(key, v), v)
    assert task.majority_baseline(answers) == pytest.approx(best, abs=1e-12)


def test_baseline_is_fast_and_below_a_perfect_score(synth_clips):
    task = get_task("unav")
    answers = [task.build(c, random.Random(i)).answer for i, c in enumerate(synth_clips) if task.applies(c)][:100]
    assert len(answers) == 100
    start = time.perf_counter()
    out = task.majority_baseline(answers)
    assert time.perf_counter() - start < 1.0
    perfect = scores([task.answer_to_pred(a) for a in answers], answers)
    assert set(out) == set(perfect) == {*KEYS, "parse_failure_rate"}
    assert all(0.0 <= out[k] < perfect[k] == 1.0 for k in KEYS)
    assert out["parse_failure_rate"] == 0.0
