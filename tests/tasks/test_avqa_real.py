"""The ``avqa`` task on converted MUSIC-AVQA clips: samples from the annotation, stable metric keys,
hand-computed accuracies per question type and per modality (the paper's groups), the type prior."""

from __future__ import annotations

import random

import pytest
import torch

from avmt.data.annotation import make_annotation
from avmt.data.sample import Clip, SampleError
from avmt.tasks import get_task
from avmt.tasks.avqa import MUSIC_AVQA_GROUPS, QUESTION_TYPES

SIZES = {"num_segments": 10, "frames_per_segment": 1, "segment_seconds": 6.0, "frame_size": [8, 8],
         "sample_rate": 16000}


def real_clip(questions: list[dict], key: str = "00000272") -> Clip:
    """A converted clip as the ``music-avqa`` converter writes it."""
    scene = make_annotation(clip_id=key, source="music-avqa", source_id=key, split="test", sizes=SIZES,
                            answers={"avqa": {"questions": questions}})
    return Clip(key, torch.zeros(10, 3, 8, 8, dtype=torch.uint8), torch.zeros(16000), scene)


def real_answer(answer: str, music_type: str, question_id: int = 0) -> dict:
    """The task's answer for one MUSIC-AVQA question, built through ``compose_annotated``."""
    clip = real_clip([{"question_id": question_id, "question": "Is it?", "answer": answer, "type": music_type}])
    return get_task("avqa").build(clip, random.Random(0)).answer


#: (answer, MUSIC-AVQA type, prediction): right 1, 3, 5, 7, 9, 10; wrong 2, 4, 6 (no parse), 8.
CASES = [
    ("two", "Audio/Counting", "two"),
    ("three", "Audio/Counting", "two"),
    ("yes", "Audio/Comparative", "yes"),
    ("left", "Visual/Location", "middle"),
    ("more than ten", "Visual/Counting", "More  than ten"),
    ("simultaneously", "Audio-Visual/Temporal", None),
    ("acoustic_guitar", "Audio-Visual/Comparative", "acoustic_guitar"),
    ("no", "Audio-Visual/Existential", "yes"),
    ("indoor", "Audio-Visual/Location", "indoor"),
    ("zero", "Audio-Visual/Counting", "zero"),
]


def test_a_real_question_is_the_prompt_and_the_answer_the_avsynth_target():
    clip = real_clip([{"question_id": 7, "question": "Where is the  first sounding instrument?", "answer": "left",
                       "type": "Audio-Visual/Location"}])
    sample = get_task("avqa", reasoning=False).build(clip, random.Random(0))
    assert sample.prompt == "<video> <audio> Where is the first sounding instrument?"
    assert sample.target == "<answer> left </answer>"
    assert sample.answer == {"answer": "left", "type": "audio_visual_location", "question_id": 7}
    assert get_task("avqa").build(clip, random.Random(0)).target == "So the answer is <answer> left </answer>."


@pytest.mark.parametrize("questions, match", [
    ([], "holds no questions"),
    ([{"question": "Is it?", "answer": "maybe", "type": "Audio/Counting"}], "'maybe' is not one of"),
    ([{"question": "Is it?", "answer": "yes", "type": "Audio/Location"}], "question type"),
    ([{"question": "", "answer": "yes", "type": "Audio/Counting"}], "not empty"),
    ([{"answer": "yes", "type": "Audio/Counting"}], "'question'"),
])
def test_a_malformed_real_question_is_a_sample_error_naming_the_clip(questions, match):
    with pytest.raises(SampleError, match=match) as error:
        get_task("avqa").build(real_clip(questions, key="bad-clip"), random.Random(0))
    assert "bad-clip" in str(error.value)


def test_metric_keys_are_declared_whatever_the_data():
    keys = set(get_task("avqa").metrics().keys())
    assert keys == {"accuracy", "parse_failure_rate", "accuracy/audio", "accuracy/visual", "accuracy/audio_visual",
                    *(f"accuracy/{t}" for t in QUESTION_TYPES)}
    # the paper's nine columns are among them
    assert {f"accuracy/{t}" for types in MUSIC_AVQA_GROUPS.values() for t in types} <= keys


def test_real_answers_hand_computed_per_type_and_modality():
    task = get_task("avqa")
    answers = [real_answer(a, t, i) for i, (a, t, _) in enumerate(CASES)]
    assert [a["type"] for a in answers[:3]] == ["audio_counting", "audio_counting", "audio_comparative"]
    metrics = task.metrics()
    metrics.update([p for _, _, p in CASES], answers)
    out = {key: float(value) for key, value in metrics.compute().items()}
    assert out["accuracy"] == pytest.approx(6 / 10)
    assert out["parse_failure_rate"] == pytest.approx(1 / 10)
    # Audio {Counting 1/2, Comparative 1/1} -> 2/3 (micro, as the paper)
    assert out["accuracy/audio_counting"] == 0.5 and out["accuracy/audio_comparative"] == 1.0
    assert out["accuracy/audio"] == pytest.approx(2 / 3)
    # Visual {Counting 1/1 (case and spacing do not matter), Location 0/1} -> 1/2
    assert out["accuracy/visual_counting"] == 1.0 and out["accuracy/visual_location"] == 0.0
    assert out["accuracy/visual"] == 0.5
    # Audio-Visual {Existential 0, Counting 1, Location 1, Comparative 1, Temporal 0} -> 3/5
    assert [out[f"accuracy/{t}"] for t in MUSIC_AVQA_GROUPS["audio_visual"]] == [0.0, 1.0, 1.0, 1.0, 0.0]
    assert out["accuracy/audio_visual"] == pytest.approx(3 / 5)
    # AVSynth-only types have no MUSIC-AVQA question: declared, 0
    for qtype in ("audio_existential", "audio_temporal", "visual_existential", "visual_temporal", "visual_comparative"):
        assert out[f"accuracy/{qtype}"] == 0.0


def test_the_question_type_prior_on_real_answers():
    task = get_task("avqa")
    answers = [real_answer(a, t) for a, t in [("two", "Audio/Counting"), ("two", "Audio/Counting"),
                                               ("three", "Audio/Counting"), ("yes", "Audio-Visual/Existential"),
                                               ("no", "Audio-Visual/Existential"), ("no", "Audio-Visual/Existential"),
                                               ("middle", "Visual/Location")]]
    assert task.type_prior(answers) == {"audio_counting": "two", "audio_visual_existential": "no",
                                        "visual_location": "middle"}
    out = task.trivial_baseline(answers)
    # right: two, two, no, no, middle = 5 of 7; audio 2/3, audio-visual 2/3, visual 1/1
    assert out["accuracy"] == pytest.approx(5 / 7)
    assert out["accuracy/audio"] == pytest.approx(2 / 3) and out["accuracy/audio_visual"] == pytest.approx(2 / 3)
    assert out["accuracy/visual"] == 1.0 and out["parse_failure_rate"] == 0.0
    assert set(out) == set(task.metrics().keys())
