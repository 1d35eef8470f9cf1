"""``avvp_weak`` (video-level event tagging from LLP's weak labels) and ``avvp`` reading LLP's dense
labels from a converted clip: parser, hand-computed metrics and baseline, answer validation."""

from __future__ import annotations

import random

import pytest
import torch

from avmt.data.annotation import make_annotation
from avmt.data.labels import AVE_CLASSES, LLP_CLASSES
from avmt.data.sample import Clip, SampleError
from avmt.tasks import get_task, task_ids
from avmt.tasks.avvp_weak import MultiLabelF1, event_list_tags, sorted_classes

T = 4


def converted_clip(answers: dict) -> Clip:
    """A converted clip of T segments whose annotation holds ``answers``."""
    sizes = {"num_segments": T, "frames_per_segment": 1, "segment_seconds": 0.5, "frame_size": [8, 8],
             "sample_rate": 16000}
    scene = make_annotation(clip_id="vid_0_10", source="llp", source_id="vid_0_10", split="val", sizes=sizes,
                            answers=answers)
    return Clip(key="vid_0_10", frames=torch.zeros(T, 3, 8, 8, dtype=torch.uint8), audio=torch.zeros(T * 8000),
                scene=scene)


def scores(preds, targets) -> dict[str, float]:
    collection = get_task("avvp_weak").metrics()
    collection.update(preds, targets)
    return {key: float(value) for key, value in collection.compute().items()}


def test_registered_with_its_own_id():
    assert task_ids()["avvp_weak"] == 15 and task_ids()["avvp"] == 4


# ---- parser -----------------------------------------------------------------------------------------


def test_parser_reads_every_event_pair_as_written():
    task = get_task("avvp_weak")
    text = "So the events in this clip are <event> Dog </event> <event> Frying_(food) </event>."
    assert task.parse(text) == ["Dog", "Frying_(food)"]
    assert task.parse("<EVENT>  speech\n</Event>") == ["speech"]  # case kept, whitespace collapsed
    assert task.parse("< event > Dog < / event >, and then <event>Cat</event>") == ["Dog", "Cat"]
    assert task.parse("<event> Male speech, man speaking </event>") == ["Male speech, man speaking"]
    for bad in (None, 7, "", "Dog and Speech", "<event> Dog", "Dog </event>", "<event> </event>",
                "</event> Dog <event>", "<event> a <event> b </event> </event>",
                "<event> Dog </event> <event> Cat"):
        assert task.parse(bad) is None, bad


@pytest.mark.parametrize("labels", [LLP_CLASSES, AVE_CLASSES], ids=["llp", "ave"])
def test_real_class_lists_round_trip(labels):
    task = get_task("avvp_weak", reasoning=False)
    classes = sorted_classes(labels)
    assert len(classes) == len(labels)
    assert task.parse(event_list_tags(classes)) == classes
    assert scores([task.parse(event_list_tags(classes))], [{"events": list(labels)}])["sample_f1"] == 1.0


def test_sorted_classes_dedupes_by_label_key():
    assert sorted_classes(["Speech", "Dog", "speech ", "Frying_(food)"]) == ["Dog", "Frying_(food)", "Speech"]


# ---- metrics and baseline ----------------------------------------------------------------------------


def test_metrics_hand_computed():
    targets = [{"events": ["Dog", "Speech"]}, {"events": ["Cat"]}, {"events": ["Speech"]}]
    preds = [["speech", "Cat"], None, ["Speech"]]
    # clip 1: 1 hit of 2 + 2 -> F1 2/4; clip 2: a parse failure scores 0 and misses Cat; clip 3: exact.
    # micro: TP 2, FP 1 (Cat in clip 1), FN 2 (Dog in clip 1, Cat in clip 2) -> 4 / 7
    assert scores(preds, targets) == {
        "sample_f1": pytest.approx(0.5),
        "micro_f1": pytest.approx(4 / 7),
        "exact_match": pytest.approx(1 / 3),
        "parse_failure_rate": pytest.approx(1 / 3),
    }
    assert scores([[]], [{"events": []}])["sample_f1"] == 1.0  # both empty: nothing to miss
    with pytest.warns(UserWarning, match="before the ``update``"):
        assert float(MultiLabelF1("micro_f1").compute()) == 0.0  # no clips
    with pytest.raises(ValueError, match="kind"):
        MultiLabelF1("macro")


def test_baseline_is_the_best_constant_class_set():
    task = get_task("avvp_weak")
    answers = [{"events": ["Dog", "Speech"]}, {"events": ["Speech"]}, {"events": ["Speech"]}, {"events": ["Cat"]}]
    # constant ["Speech"]: F1 2/3, 1, 1, 0 -> 2/3; micro TP 3, FP 1, FN 2 -> 6/9; exact 2/4.
    # ["Dog", "Speech"] gets 7/12 and 8/13, ["Cat", "Speech"] (the 2 most frequent) 5/8 and 8/13: both lower.
    assert task.baseline_name == "best constant class set"
    assert task.trivial_baseline(answers) == {
        "sample_f1": pytest.approx(2 / 3),
        "micro_f1": pytest.approx(2 / 3),
        "exact_match": pytest.approx(0.5),
        "parse_failure_rate": 0.0,
    }


# ---- converted clips ---------------------------------------------------------------------------------


def test_weak_answer_of_a_converted_clip():
    clip = converted_clip({"avvp_weak": {"events": ["Speech", "Frying_(food)", "Speech"]}})
    task = get_task("avvp_weak", reasoning=True)
    assert task.applies(clip) and not get_task("avvp").applies(clip)
    sample = task.build(clip, random.Random(0))
    assert sample.target == "So the events in this clip are <event> Frying_(food) </event> <event> Speech </event>."
    assert sample.answer == {"events": ["Frying_(food)", "Speech"]}
    assert task.parse(sample.target) == task.answer_to_pred(sample.answer)
    for bad in ({"events": []}, {"events": "Speech"}, {"events": ["Speech", ""]}, {"events": ["<event>"]}, ["Speech"]):
        with pytest.raises(SampleError, match="vid_0_10"):
            task.build(converted_clip({"avvp_weak": bad}), random.Random(0))


def test_dense_answer_of_a_converted_clip():
    answer = {"audio": {"Speech": [[2, 4], [0, 1], [1, 2]], "Dog": [[1, 3]]}, "visual": {}}
    clip = converted_clip({"avvp": answer})
    task = get_task("avvp", reasoning=False)
    sample = task.build(clip, random.Random(0))
    # merged per class, classes by onset; an empty kind is the empty tag pair
    assert sample.target == "<audio_event> Speech,(0 4) Dog,(1 3) </audio_event> <visual_event> </visual_event>"
    assert sample.answer == {"audio": {"Speech": [[0, 4]], "Dog": [[1, 3]]}, "visual": {}, "num_segments": T}
    assert task.parse(sample.target) == task.answer_to_pred(sample.answer)
    for bad in ({"audio": {"Dog": [[0, 5]]}, "visual": {}}, {"audio": {"Dog": [[2, 2]]}, "visual": {}},
                {"audio": {"Dog": [[0, 1.5]]}, "visual": {}}, {"audio": {"Dog": [0, 1]}, "visual": {}},
                {"audio": {}}, {"audio": {"": [[0, 1]]}, "visual": {}}, "Dog"):
        with pytest.raises(SampleError, match="vid_0_10"):
            task.build(converted_clip({"avvp": bad}), random.Random(0))
