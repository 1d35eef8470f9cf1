"""Majority baseline: the best constant predictor, scored through the task's own metrics."""

import random

import pytest

from avmt.tasks import get_task


def test_action_majority_hand_checked():
    answers = ["static", "static", "pulsing", "moving left"]
    out = get_task("action").majority_baseline(answers)
    # constant "static": accuracy 2/4; F1 static = 2*2/(2*2+2) = 2/3, pulsing 0, moving left 0 -> 2/9.
    # (constant "pulsing": F1 = 2/(2+3) = 0.4 over 3 classes -> 0.133, worse.)
    assert out == {"accuracy": pytest.approx(0.5), "macro_f1": pytest.approx(2 / 9),
                   "parse_failure_rate": 0.0}


def test_emotion_majority_hand_checked():
    out = get_task("emotion").majority_baseline(["sad", "sad", "sad", "calm"])
    # "sad": accuracy 3/4; F1 sad = 6/(6+1) = 6/7, calm 0 -> 3/7
    assert out["accuracy"] == pytest.approx(0.75) and out["macro_f1"] == pytest.approx(3 / 7)


def test_avqa_majority_hand_checked():
    answers = [
        {"answer": "yes", "type": "audio_existential"},
        {"answer": "no", "type": "audio_existential"},
        {"answer": "yes", "type": "visual_existential"},
        {"answer": "left", "type": "visual_location"},
        {"answer": "two", "type": "audio_counting"},
    ]
    out = get_task("avqa").majority_baseline(answers)
    assert out["accuracy"] == pytest.approx(2 / 5)  # "yes"
    assert out["accuracy/audio_existential"] == pytest.approx(0.5)
    assert out["accuracy/visual_existential"] == 1.0
    assert out["accuracy/visual_location"] == 1.0  # best constant for that key: "left"
    assert out["accuracy/audio_counting"] == 1.0
    assert out["accuracy/visual_temporal"] == 0.0  # no questions of that type
    assert out["parse_failure_rate"] == 0.0


def test_avqa_question_type_prior_hand_checked():
    task = get_task("avqa")
    assert task.baseline_name == "question-type prior"
    answers = [
        {"answer": "yes", "type": "audio_existential"},
        {"answer": "no", "type": "audio_existential"},
        {"answer": "no", "type": "audio_existential"},
        {"answer": "two", "type": "audio_counting"},
        {"answer": "three", "type": "audio_counting"},
    ]
    # audio_existential: "no" 2 of 3; audio_counting: "three" and "two" tie at 1 -> "three" (alphabetical)
    assert task.type_prior(answers) == {"audio_existential": "no", "audio_counting": "three"}
    out = task.trivial_baseline(answers)
    # predictions no, no, no, three, three: right 2 + 1 = 3 of 5
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["accuracy/audio_existential"] == pytest.approx(2 / 3)
    assert out["accuracy/audio_counting"] == pytest.approx(1 / 2)
    assert out["accuracy/visual_location"] == 0.0  # no questions of that type
    assert out["parse_failure_rate"] == 0.0
    assert set(out) == set(task.metrics().keys())
    # the best single constant ("no") gets 2 of 5 overall; per key it may pick different constants
    majority = task.majority_baseline(answers)
    assert majority["accuracy"] == pytest.approx(2 / 5)
    assert majority["accuracy/audio_counting"] == pytest.approx(1 / 2)
    # reported beside the prior: the constant answer, the trivial baseline of the other tasks
    assert task.extra_baselines(answers) == {"best constant answer": majority}
    assert get_task("emotion").extra_baselines(["sad"]) == {}  # a constant already is its trivial baseline
    with pytest.raises(ValueError, match="at least one"):
        task.trivial_baseline([])


def test_avqa_prior_fitted_on_training_answers_hand_checked():
    """Fitted on the evaluated answers the prior is an oracle; fitted on the training answers it is
    what a text-only model learns. A type the training never saw gets the overall training favourite."""
    task = get_task("avqa")
    assert task.baseline_fits_training
    train = [
        {"answer": "yes", "type": "audio_existential"},
        {"answer": "yes", "type": "audio_existential"},
        {"answer": "no", "type": "audio_existential"},
        {"answer": "two", "type": "audio_counting"},
    ]
    answers = [
        {"answer": "no", "type": "audio_existential"},
        {"answer": "no", "type": "audio_existential"},
        {"answer": "yes", "type": "audio_existential"},
        {"answer": "two", "type": "audio_counting"},
        {"answer": "yes", "type": "visual_existential"},
    ]
    # in-sample: no, no, no(wrong), two, yes -> 4 of 5
    assert task.trivial_baseline(answers)["accuracy"] == pytest.approx(4 / 5)
    # from training: yes(wrong), yes(wrong), yes, two, and visual_existential unseen -> "yes" (3 of 4 overall)
    out = task.trivial_baseline(answers, train)
    assert out["accuracy"] == pytest.approx(3 / 5)
    assert out["accuracy/audio_existential"] == pytest.approx(1 / 3)
    assert out["accuracy/visual_existential"] == 1.0
    assert task.trivial_baseline(answers, []) == task.trivial_baseline(answers)  # nothing recorded: in-sample


def test_ave_majority_hand_checked():
    answers = [
        {"class": "violin", "range": [2, 7], "num_segments": 10},
        {"class": "violin", "range": [3, 8], "num_segments": 10},
        {"class": "dog", "range": [0, 2], "num_segments": 10},
    ]
    out = get_task("ave").majority_baseline(answers)
    # best constant: violin over [3, 7): 9 + 9 + 4 (dog's 2 segments and 4 violin segments wrong) = 22 of 30.
    # For comparison: violin [2, 7) 10 + 8 + 3 = 21; all background 5 + 5 + 8 = 18.
    # class: violin, 2 of 3. Range IoU: [2, 7) scores 1, 4/6 and 0 (as does [2, 8): 5/6, 5/6, 0) = 5/9;
    # [3, 7) only 4/5, 4/5, 0; any range reaching [0, 2) loses more on the two violin clips.
    assert out == {
        "segment_accuracy": pytest.approx(22 / 30),
        "class_accuracy": pytest.approx(2 / 3),
        "range_iou": pytest.approx(5 / 9),
        "parse_failure_rate": 0.0,
    }


def test_avvp_majority():
    gt = {"audio": {"dog": [[0, 3]]}, "visual": {"dog": [[0, 3]]}, "num_segments": 10}
    out = get_task("avvp").majority_baseline([gt, gt])
    assert all(v == pytest.approx(1.0) for k, v in out.items() if k != "parse_failure_rate")
    other = {"audio": {"cat": [[5, 10]]}, "visual": {}, "num_segments": 10}
    out = get_task("avvp").majority_baseline([gt, gt, other])
    # constant = the dog answer: audio F1 1, 1, 0 (dog FP and cat FN in the third video) -> 2/3
    assert out["segment_f1/audio"] == pytest.approx(2 / 3)
    # visual: 1, 1, and 0 for the dog false alarm in the third video (no visual events there) -> 2/3;
    # predicting no visual events instead scores 0, 0, 1 -> 1/3
    assert out["segment_f1/visual"] == pytest.approx(2 / 3)


def test_avcap_majority():
    caps = ["a dog is heard", "a dog is heard", "a cat is seen"]
    out = get_task("avcap").majority_baseline(caps)
    # constant "a dog is heard": ROUGE-L 1, 1, and 2/4 ("a", "is") -> 5/6
    assert out["rouge_l"] == pytest.approx(5 / 6, abs=1e-5)
    # CIDEr-D, N = 3: "a", "is" are in every clip's references (weight 0), the dog n-grams in 2 (weight
    # log 3/2 > 0). "a dog is heard": exact on clips 1, 2 (cos 1 for n = 1..4 -> 10), no weighted
    # n-gram shared with "a cat is seen" -> 0: 20/3. ("a cat is seen" gets 10/3.)
    assert out["cider_d"] == pytest.approx(20 / 3)
    assert 0 < out["bleu4"] < 1 and out["parse_failure_rate"] == 0.0


def test_majority_on_built_answers_beats_nothing(scene_factory):
    f, rng = scene_factory, random.Random(5)
    clips = [f.clip(f.random_scene(rng, num_classes=8)) for _ in range(40)]
    for name in ("action", "emotion", "avqa"):
        task = get_task(name)
        answers = [task.build(c, random.Random(i)).answer for i, c in enumerate(clips)]
        out = task.majority_baseline(answers)
        assert 0 < out["accuracy"] < 1
    with pytest.raises(ValueError, match="at least one"):
        get_task("ave").majority_baseline([])
