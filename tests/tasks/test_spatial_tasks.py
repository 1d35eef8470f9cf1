"""The spatial tasks (s4, ms3, avss, ref_avs, ssu, arig): targets on hand-made clips, predictions
from model outputs, dense losses, majority baselines on real AVSynth clips, bad annotations, task
ids and words.

The hand-made clips have 10 segments (one frame each) of 8x8 pixels and an object-id mask tensor
written pixel by pixel, so every expected target below can be checked by eye.
"""

import dataclasses
import math
import random

import pytest
import torch

import avmt.tasks as tasks
from avmt.data.sample import Dense, MediaRef, SampleError
from avmt.tasks import TASKS, Task, get_task, list_tasks, num_task_ids, register_task, task_ids
from avmt.tasks.arig import parse_box
from avmt.tasks.avss import CLASS_IDS
from avmt.tasks.spatial import MaskTask
from avmt.tasks.text import text_words

T, SIZE = 10, 8
SPATIAL = ("arig", "avss", "ms3", "ref_avs", "s4", "ssu")
MASK_TASKS = ("ms3", "ref_avs", "s4", "ssu")

# ---- hand-made clips ------------------------------------------------------------------------

#: Pixels (row, col) each object covers on every frame where it is visible, by object id.
SINGLE_PIXELS = {0: [(0, 0), (0, 1)], 2: [(7, 7)], 3: [(4, 4), (5, 4)]}
MULTI_PIXELS = {0: [(0, 0)], 1: [(7, 0), (7, 1)], 2: [(3, 3)]}


def hand_masks(scene, pixels):
    """``uint8 [T, 8, 8]``: object ``id`` (``id + 1``) on its pixels on the frames where it is visible."""
    masks = torch.zeros(T, SIZE, SIZE, dtype=torch.uint8)
    for obj in scene["objects"]:
        for s, e in obj["visible"]:
            for r, c in pixels.get(obj["id"], []):
                masks[s:e, r, c] = obj["id"] + 1
    return masks


def expected(frames_pixels):
    """bool ``[T, 8, 8]`` from ``{frame: [(row, col), ...]}``."""
    out = torch.zeros(T, SIZE, SIZE, dtype=torch.bool)
    for t, pixels in frames_pixels.items():
        for r, c in pixels:
            out[t, r, c] = True
    return out


@pytest.fixture
def single(scene_factory):
    """Single-source: violin (0) seen 1-8, heard 2-7 (the event [2, 7)); dog (1) heard 0-3, 8-10,
    never seen; cat (2) seen 4-9, silent; bell (3) heard 0-2, seen 8-10 (never at once).
    The violin's boxes move right by 10 per segment."""
    f = scene_factory
    objects = [
        f.object(0, "violin", visible=[[1, 8]], sounding=[[2, 7]], position="left", motion="moving right"),
        f.object(1, "dog", sounding=[[0, 3], [8, 10]], position="center", row="bottom", loudness=0.5),
        f.object(2, "cat", visible=[[4, 9]], color="blue", position="right", loudness=0.0),
        f.object(3, "bell", visible=[[8, 10]], sounding=[[0, 2]], color="yellow", position="center", loudness=0.3),
    ]
    objects[0]["boxes"] = [None if b is None else [100 + 10 * t, 200, 300 + 10 * t, 400]
                           for t, b in enumerate(objects[0]["boxes"])]
    scene = f.scene(objects, av=0, clip_id="hand-single")
    assert scene["av_event"]["range"] == [2, 7]
    return f.clip(scene, masks=hand_masks(scene, SINGLE_PIXELS))


@pytest.fixture
def multi(scene_factory):
    """Multi-source: flute (0) seen and heard 3-9; violin (1) seen 1-7 and heard 1-6 (onset first);
    cat (2) seen 0-10, silent."""
    f = scene_factory
    objects = [
        f.object(0, "flute", visible=[[3, 9]], sounding=[[3, 9]], color="green", position="left", loudness=0.7),
        f.object(1, "violin", visible=[[1, 7]], sounding=[[1, 6]], position="left", row="bottom", loudness=0.9),
        f.object(2, "cat", visible=[[0, 10]], color="blue", position="center", loudness=0.0),
    ]
    scene = f.scene(objects, av=None, clip_id="hand-multi")
    return f.clip(scene, masks=hand_masks(scene, MULTI_PIXELS))


# what sounds and is seen, per frame, on the hand-made clips (worked out by hand from the docstrings)
SINGLE_SOUNDING = expected({t: [(0, 0), (0, 1)] for t in range(2, 7)})  # violin 2-6; bell never seen+heard
MULTI_SOUNDING = expected({t: [(0, 0)] * (3 <= t < 9) + [(7, 0), (7, 1)] * (1 <= t < 6) for t in range(T)})


def build(name, clip, seed=0, reasoning=True):
    return get_task(name, reasoning=reasoning).build(clip, random.Random(seed))


# ---- which clips a task applies to ------------------------------------------------------------


def test_applies(single, multi):
    for name in ("s4", "arig", "ssu", "ave"):
        assert get_task(name).applies(single) and not get_task(name).applies(multi), name
    assert get_task("ms3").applies(multi) and not get_task("ms3").applies(single)
    for name in ("avss", "ref_avs"):
        assert get_task(name).applies(single) and get_task(name).applies(multi), name
    with pytest.raises(SampleError, match=r"hand-multi.*'s4'.*audio-visual event"):
        build("s4", multi)


# ---- targets ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["s4", "ssu"])
def test_single_source_mask_is_what_sounds_per_frame(name, single):
    sample = build(name, single)
    assert sample.dense["mask"].dtype == torch.bool
    assert torch.equal(sample.dense["mask"], SINGLE_SOUNDING)
    assert torch.equal(sample.answer["mask"], SINGLE_SOUNDING)
    assert sample.media == (MediaRef("<video>"), MediaRef("<audio>"))
    assert (" <seg> <desc>" if name == "ssu" else " <seg>") in sample.target + " "  # ssu: the mask before its description


def test_ms3_mask_is_every_sounding_object_per_frame(multi):
    sample = build("ms3", multi)
    assert torch.equal(sample.dense["mask"], MULTI_SOUNDING)
    assert torch.equal(sample.answer["mask"], MULTI_SOUNDING)
    # frame 0: nothing sounds (the cat is silent); frame 4: both; frame 6: the flute only (the
    # violin is still visible there but silent)
    assert sample.dense["mask"][0].sum() == 0 and sample.dense["mask"][4].sum() == 3
    assert sample.dense["mask"][6].sum() == 1 and bool(sample.dense["mask"][6, 0, 0])


def test_ssu_describes_the_source(single):
    sample = build("ssu", single)
    assert sample.answer["description"] == "a red violin at the top left, moving right"
    assert build("ssu", single, reasoning=False).target == (
        "<seg> <desc> a red violin at the top left, moving right </desc>")


def test_ref_avs_null_and_named(single):
    by_text = {e["text"]: e["object"] for e in single.scene["expressions"]}
    null = named = 0
    for seed in range(200):
        sample = build("ref_avs", single, seed)
        answer = sample.answer
        assert torch.equal(sample.dense["mask"], answer["mask"])
        assert answer["expression"] in by_text and answer["expression"] in sample.prompt
        oid = by_text[answer["expression"]]
        assert answer["null"] is (oid is None)
        if oid is None:
            null += 1
            assert not answer["mask"].any()
        else:
            named += 1
            # exactly the referent's pixels on every frame where it is visible (sounding or not)
            want = expected({t: SINGLE_PIXELS[oid] for s, e in single.scene["objects"][oid]["visible"]
                             for t in range(s, e)})
            assert torch.equal(answer["mask"], want)
    assert null > 0 and named > 0
    assert 0.1 < null / 200 < 0.45  # null_fraction 0.25


def test_ref_avs_referent_in_a_multi_source_scene(multi):
    scene = dict(multi.scene, expressions=[{"text": "the green flute on the left", "object": 0}])
    sample = get_task("ref_avs").build(dataclasses.replace(multi, scene=scene), random.Random(0))
    assert torch.equal(sample.answer["mask"], expected({t: [(0, 0)] for t in range(3, 9)}))
    assert sample.answer["null"] is False


def test_avss_class_map_and_text(single, multi):
    sample = build("avss", multi, reasoning=False)
    violin, flute = CLASS_IDS["violin"], CLASS_IDS["flute"]
    want = torch.zeros(T, SIZE, SIZE, dtype=torch.long)
    want[3:9, 0, 0] = flute
    want[1:6, 7, 0:2] = violin
    assert sample.dense["class_map"].dtype == torch.long
    assert torch.equal(sample.dense["class_map"], want) and torch.equal(sample.answer["class_map"], want)
    # onset order: the violin (second 1) before the flute (second 3), whatever their ids
    assert sample.answer["classes"] == ["violin", "flute"]
    assert sample.target == "<class> violin </class> <seg> <class> flute </class> <seg>"
    assert sample.dense["seg_classes"].tolist() == [violin, flute]
    assert build("avss", multi).target.endswith("So the sounding classes are " + sample.target)
    # single source: only the violin (the dog is never seen, the bell never seen while heard)
    sample = build("avss", single, reasoning=False)
    assert sample.target == "<class> violin </class> <seg>"
    assert torch.equal(sample.answer["class_map"], SINGLE_SOUNDING.long() * CLASS_IDS["violin"])


def test_arig_image_segment_media_and_box(single):
    segments = set()
    for seed in range(60):
        sample = build("arig", single, seed)
        t = sample.answer["segment"]
        segments.add(t)
        assert sample.media == (MediaRef("<image>", 0, segment=t), MediaRef("<audio>"))
        assert sample.prompt.startswith("<image> <audio> ") and "<video>" not in sample.prompt
        assert sample.answer["box"] == [100 + 10 * t, 200, 300 + 10 * t, 400]
        assert sample.dense == {}
        # the target's box is read back; the prediction from text alone is exact
        assert get_task("arig").predict(sample.target, {}) == {"box": sample.answer["box"]}
    assert segments == set(range(2, 7))  # inside the event [2, 7), each of them


def test_arig_parse():
    task = get_task("arig")
    assert task.parse("So its box is <box> 310,520,590,880 </box>.") == {"box": [310, 520, 590, 880]}
    assert task.parse("<BOX>310 , 520,590 ,880</BOX>") == {"box": [310, 520, 590, 880]}
    assert task.parse("<box> 0,0,1000,1000 </box>") == {"box": [0, 0, 1000, 1000]}
    for bad in ("<box> 310,520,590 </box>", "<box> 310,520,590,880,10 </box>", "<box> 310,520,590,1001 </box>",
                "<box> -10,520,590,880 </box>", "<box> 310.5,520,590,880 </box>", "<box> a,b,c,d </box>",
                "<box> 310 520 590 880 </box>", "<box> </box>", "<box> 310,520,590,880", "310,520,590,880",
                "<box> 99999999999999999999999,1,2,3 </box>", None, 42, b"<box> 1,2,3,4 </box>", ["<box>"]):
        assert task.parse(bad) is None, bad
    assert parse_box(" 1,2,3,4 ") == [1, 2, 3, 4] and parse_box(None) is None


# ---- predictions from model outputs -----------------------------------------------------------


@pytest.mark.parametrize("name", MASK_TASKS)
def test_mask_predict(name, single, multi):
    task = get_task(name)
    assert isinstance(task, MaskTask) and task.outputs == ("mask_logits",)
    sample = task.build(multi if name == "ms3" else single, random.Random(0))
    text = sample.target if name != "ssu" else "<desc> a red violin </desc> <seg>"
    assert task.predict(text, {}) is None
    assert task.predict(text, {"mask_logits": torch.zeros(0, T, SIZE, SIZE)}) is None
    metrics = task.metrics()
    metrics.update([task.predict(text, {"mask_logits": torch.zeros(0, T, SIZE, SIZE)})], [sample.answer])
    assert float(metrics.compute()["parse_failure_rate"]) == 1.0  # no <seg>: a failure
    logits = torch.randn(2, T, SIZE, SIZE)
    pred = task.predict(text, {"mask_logits": logits})
    assert torch.allclose(pred["mask"], torch.sigmoid(logits[0]))  # the first <seg>'s mask


def test_ssu_predict_needs_description_and_mask():
    task = get_task("ssu")
    logits = {"mask_logits": torch.full((1, T, SIZE, SIZE), 3.0)}
    pred = task.predict("So the sound comes from <desc> A Red  Violin </desc> <seg>", logits)
    assert pred["description"] == "a red violin" and torch.allclose(pred["mask"], torch.sigmoid(logits["mask_logits"][0]))
    assert task.predict("So the sound comes from <seg>", logits) is None  # no description
    assert task.predict("<desc> </desc> <seg>", logits) is None  # empty description
    assert task.predict("<desc> a red violin </desc>", {"mask_logits": torch.zeros(0, T, SIZE, SIZE)}) is None


def test_avss_predict_combines_names_and_masks():
    task = get_task("avss")
    violin, flute = CLASS_IDS["violin"], CLASS_IDS["flute"]
    # two <seg> masks over one 2x2 frame: the class with the higher positive logit wins, background
    # where both logits are < 0
    logits = torch.tensor([[[[3.0, 1.0], [-1.0, -3.0]]], [[[1.0, 5.0], [-2.0, 0.5]]]])  # [2, 1, 2, 2]
    text = "<class> Violin </class> <seg> <class> flute </class> <seg>"
    pred = task.predict(text, {"mask_logits": logits})
    assert pred["class_map"].tolist() == [[[violin, flute], [0, flute]]]
    # more names than masks: the names without a mask are dropped; an unknown name is background
    assert task.predict(text, {"mask_logits": logits[:1]})["class_map"].tolist() == [[[violin, violin], [0, 0]]]
    unknown = task.predict("<class> unicorn </class> <seg> <class> flute </class> <seg>", {"mask_logits": logits})
    assert unknown["class_map"].tolist() == [[[0, flute], [0, flute]]]
    assert task.predict("<seg> <seg>", {"mask_logits": logits}) is None  # no class named
    assert task.predict(text, {"mask_logits": logits[:0]}) is None  # no <seg>
    assert task.predict(text, {}) is None
    assert task.parse(text) == ["Violin", "flute"] and task.parse("no tags") is None  # names as written


# ---- dense losses -------------------------------------------------------------------------------


def _dense(rows, values, keep):
    """A batch-level table restricted to the task's rows ``keep`` (renumbered 0..n-1, as the module does)."""
    return Dense(torch.tensor(rows, dtype=torch.long), values).take(keep)


def test_mask_losses():
    task = get_task("s4")
    target = torch.zeros(2, T, 4, 4, dtype=torch.bool)
    target[0, :, 0, :] = True  # 4 of 16 pixels on every frame
    target[1, 2:5, 1:3, 1:3] = True
    targets = {"mask": _dense([3, 5], target, [3, 5])}
    assert targets["mask"].rows.tolist() == [0, 1]
    perfect = torch.where(target, 50.0, -50.0)
    losses = task.dense_losses({"mask_logits": _dense([3, 5], perfect, [3, 5])}, targets)
    assert set(losses) == {"bce", "dice"}
    assert float(losses["bce"]) == pytest.approx(0.0, abs=1e-6) and float(losses["dice"]) == pytest.approx(0.0, abs=1e-6)
    losses = task.dense_losses({"mask_logits": _dense([3, 5], torch.zeros(2, T, 4, 4), [3, 5])}, targets)
    assert float(losses["bce"]) == pytest.approx(math.log(2))
    # dice with p = 0.5 everywhere: sample 0: (2*0.5*40 + 1) / (0.5*160 + 40 + 1) = 41/121;
    # sample 1: 12 target pixels: (2*0.5*12 + 1) / (80 + 12 + 1) = 13/93
    assert float(losses["dice"]) == pytest.approx(1 - (41 / 121 + 13 / 93) / 2)
    # a row without an output entry is skipped; a row's first entry is its mask
    wrong = -perfect
    outputs = _dense([3, 3], torch.stack([perfect[0], wrong[0]]), [3, 5])
    losses = task.dense_losses({"mask_logits": outputs}, targets)
    assert float(losses["bce"]) == pytest.approx(0.0, abs=1e-6) and float(losses["dice"]) == pytest.approx(0.0, abs=1e-6)
    assert task.dense_losses({"mask_logits": _dense([7], perfect[:1], [3, 5])}, targets) == {}
    assert task.dense_losses({}, targets) == {}


def test_avss_loss():
    task = get_task("avss")
    violin, flute = CLASS_IDS["violin"], CLASS_IDS["flute"]
    class_map = torch.zeros(2, T, 2, 2, dtype=torch.long)
    class_map[0, :, 0, 0], class_map[0, :, 1, 1] = violin, flute
    class_map[1, :, 0, 1] = violin
    seg_classes = torch.tensor([[violin, flute], [violin, 0]])  # 0-padded
    targets = {"class_map": _dense([0, 1], class_map, [0, 1]), "seg_classes": _dense([0, 1], seg_classes, [0, 1])}
    masks = torch.stack([class_map[0] == violin, class_map[0] == flute, class_map[1] == violin])
    rows = [0, 0, 1]
    perfect = torch.where(masks, 50.0, -50.0)
    losses = task.dense_losses({"mask_logits": _dense(rows, perfect, [0, 1])}, targets)
    assert set(losses) == {"ce"} and float(losses["ce"]) == pytest.approx(0.0, abs=1e-6)
    # zero logits: every channel ties: log 3 (background + 2 classes) and log 2, averaged over samples
    losses = task.dense_losses({"mask_logits": _dense(rows, torch.zeros_like(perfect), [0, 1])}, targets)
    assert float(losses["ce"]) == pytest.approx((math.log(3) + math.log(2)) / 2)
    # the sample without masks is skipped
    losses = task.dense_losses({"mask_logits": _dense([1], torch.zeros(1, T, 2, 2), [0, 1])}, targets)
    assert float(losses["ce"]) == pytest.approx(math.log(2))
    assert task.dense_losses({"mask_logits": _dense([], perfect[:0], [0, 1])}, targets) == {}


# ---- majority baselines on real AVSynth clips -------------------------------------------------

HEADLINE = {"s4": "j", "ms3": "j", "ssu": "j", "ref_avs": "j", "avss": "miou", "arig": "ciou"}


@pytest.mark.parametrize("name", SPATIAL)
def test_majority_baseline_and_exact_prediction(name, synth_clips):
    task = get_task(name)
    clips = [c for c in synth_clips if task.applies(c)][:30]
    assert len(clips) == 30
    answers = [task.build(c, random.Random(i)).answer for i, c in enumerate(clips)]
    collection = task.metrics()
    upper = {key: getattr(metric, "plot_upper_bound", None) or 1.0 for key, metric in collection.items()}
    baseline = task.majority_baseline(answers)
    assert set(baseline) == set(upper)
    assert all(math.isfinite(v) and 0.0 <= v <= upper[k] for k, v in baseline.items()), baseline
    assert baseline["parse_failure_rate"] == 0.0
    assert baseline[HEADLINE[name]] < 1.0  # no constant fits 30 different clips
    exact = task.metrics()
    exact.update([task.answer_to_pred(a) for a in answers], answers)
    scores = {k: float(v) for k, v in exact.compute().items()}
    for key, value in scores.items():
        want = 0.0 if key in task.lower_is_better else pytest.approx(upper[key])
        assert value == want, (key, value)
        assert key in task.lower_is_better or baseline[key] <= value + 1e-9


def test_ref_avs_real_clips_have_null_and_named_samples(synth_clips):
    task = get_task("ref_avs")
    answers = [task.build(c, random.Random(i)).answer for i, c in enumerate(synth_clips[:60])]
    assert any(a["null"] for a in answers) and not all(a["null"] for a in answers)


# ---- bad annotations ------------------------------------------------------------------------


def test_masks_that_do_not_fit_the_frames(single):
    bad = dataclasses.replace(single, masks=torch.zeros(T, 4, 4, dtype=torch.uint8))
    with pytest.raises(SampleError, match=r"hand-single.*\(10, 4, 4\).*'s4'"):
        build("s4", bad)
    with pytest.raises(SampleError, match=r"hand-single.*'s4'.*no"):
        build("s4", dataclasses.replace(single, masks=None))
    with pytest.raises(SampleError, match=r"hand-single"):
        build("avss", dataclasses.replace(single, masks=torch.zeros(T + 1, SIZE, SIZE, dtype=torch.uint8)))


def _with_event_boxes(clip, box):
    scene = dict(clip.scene, objects=[dict(o) for o in clip.scene["objects"]])
    scene["objects"][0]["boxes"] = [None if b is None else list(box) for b in scene["objects"][0]["boxes"]]
    return dataclasses.replace(clip, scene=scene)


def test_arig_box_outside_the_frame(single):
    for box in ([900, 10, 1200, 50], [300, 10, 100, 50], [10, 10, 20, None]):
        with pytest.raises(SampleError, match=r"hand-single.*box") as err:
            build("arig", _with_event_boxes(single, box))
        assert str(box) in str(err.value)


def test_arig_box_error_names_the_task(single):
    with pytest.raises(SampleError, match="arig"):
        build("arig", _with_event_boxes(single, [900, 10, 1200, 50]))


def test_ref_avs_without_expressions(single):
    no_field = {k: v for k, v in single.scene.items() if k != "expressions"}
    for scene in (no_field, dict(single.scene, expressions=[])):
        with pytest.raises(SampleError, match=r"hand-single.*'ref_avs'.*expressions"):
            build("ref_avs", dataclasses.replace(single, scene=scene))
    for expressions, words in (([{"text": " ", "object": 0}], "text"),
                               ([{"text": "the purple dog", "object": 9}], "object 9")):
        with pytest.raises(SampleError, match=rf"hand-single.*{words}"):
            build("ref_avs", dataclasses.replace(single, scene=dict(single.scene, expressions=expressions)))


def test_ref_avs_expression_without_object_key(single):
    with pytest.raises(SampleError, match="hand-single"):
        build("ref_avs", dataclasses.replace(single, scene=dict(single.scene, expressions=[{"text": "the dog"}])))


def test_ssu_source_without_description(single):
    for description in (None, "", "   "):
        scene = dict(single.scene, objects=[dict(o) for o in single.scene["objects"]])
        scene["objects"][0]["description"] = description
        with pytest.raises(SampleError, match=r"hand-single.*'ssu'.*description"):
            build("ssu", dataclasses.replace(single, scene=scene))


# ---- task ids -------------------------------------------------------------------------------------


def test_task_ids_are_stable_and_unique():
    ids = task_ids()
    assert list(ids) == list_tasks()
    assert len(set(ids.values())) == len(ids)
    # the ids existing checkpoints hold: the v1 tasks in sorted name order
    v1 = {"action": 0, "avcap": 1, "ave": 2, "avqa": 3, "avvp": 4, "emotion": 5}
    assert {k: ids[k] for k in v1} == v1
    assert {k: ids[k] for k in SPATIAL} == {"arig": 6, "s4": 7, "ms3": 8, "avss": 9, "ref_avs": 10, "ssu": 11}
    assert ids["unav"] == 12
    assert {k: ids[k] for k in ("a2v", "v2a")} == {"a2v": 13, "v2a": 14}
    assert num_task_ids() == max(ids.values()) + 1


def test_register_a_taken_id():
    free = num_task_ids()
    taken = type("Duplicate", (Task,), {"name": "dup_task", "task_id": 3})
    fresh = type("Fresh", (Task,), {"name": "fresh_task", "task_id": num_task_ids()})
    try:
        with pytest.raises(ValueError) as err:
            register_task(taken)
        msg = str(err.value)
        assert "'dup_task'" in msg and "'avqa'" in msg and f"next free id is {free}" in msg
        assert "dup_task" not in TASKS
        for bad in (-1, True, "7", None):
            with pytest.raises(ValueError, match="task_id"):
                register_task(type("Bad", (Task,), {"name": "bad_task", "task_id": bad}))
        assert register_task(fresh) is fresh
        assert task_ids()["fresh_task"] == free and num_task_ids() == free + 1
    finally:
        for name in ("dup_task", "bad_task", "fresh_task"):
            TASKS.pop(name, None)
    assert num_task_ids() == free and set(tasks.TASKS) == set(list_tasks())


# ---- words ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", list_tasks())
def test_words_cover_real_clips(name, synth_clips):
    """The offline tokenizer is built from words(): every word of every prompt and target a task
    builds on real AVSynth clips (single- and multi-source) must be in it."""
    for reasoning in (True, False):
        task = get_task(name, reasoning=reasoning)
        words = task.words()
        missing, built = set(), 0
        for i, clip in enumerate(synth_clips):
            if not task.applies(clip):
                continue
            rng = random.Random(i)
            others = task.select_others(clip, synth_clips[max(0, i - 16):i][::-1], rng)  # multi-clip tasks
            if others is None:
                continue
            sample = task.build(clip, rng, others)
            built += 1
            missing |= (text_words(sample.prompt) | text_words(sample.target)) - words
        assert built >= 50, built
        assert not missing, f"{name}: words() misses {sorted(missing)}"
