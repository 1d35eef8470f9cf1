"""``instruct`` (Crab's AV-UIE instructions): the final-answer parser, hand-computed metrics and
baseline, samples from converted clips (placeholders in place, the answer as it is) and from AVSynth."""

from __future__ import annotations

import random

import pytest
import torch

from avmt.data.annotation import make_annotation
from avmt.data.sample import Clip, MediaRef, SampleError
from avmt.tasks import get_task, task_ids
from avmt.tasks.instruct import SYNTHETIC_TASKS, final_answer, final_tokens, token_f1

T = 4
AVQA = ("In the video, four men are playing. The man on the left plays the saxophone. "
        "So the answer is <answer> Saxophone </answer>.")
AVE = ("A man speaks from the beginning until the 8th second. So the audible and visible event is "
       "<event> Male speech, man speaking </event>, and the time range is <range> 0,8 </range>.")
CAPTION = "A man plays the guitar while a dog barks."


def converted_clip(answer: dict, key: str = "AVUIE_2_avqa_train-000000") -> Clip:
    sizes = {"num_segments": T, "frames_per_segment": 1, "segment_seconds": 0.5, "frame_size": [8, 8],
             "sample_rate": 16000}
    scene = make_annotation(clip_id=key, source="avuie", source_id="train.json#0", split="train", sizes=sizes,
                            answers={"instruct": answer})
    return Clip(key=key, frames=torch.zeros(T, 3, 8, 8, dtype=torch.uint8), audio=torch.zeros(T * 8000), scene=scene)


def scores(preds, answers) -> dict[str, float]:
    collection = get_task("instruct").metrics()
    collection.update(preds, answers)
    return {k: float(v) for k, v in collection.compute().items()}


def answer(text: str, task: str = "avqa") -> dict:
    return {"instruction": "<video> <audio> Please answer.", "answer": text, "task": task}


def test_the_id_and_the_source_tasks():
    assert task_ids()["instruct"] == 16
    task = get_task("instruct")
    assert set(SYNTHETIC_TASKS) <= set(task_ids()) and task.baseline_name == "most frequent answer"


def test_the_final_answer_is_the_tags_in_order_else_the_text():
    assert final_answer(AVQA) == {"tags": [["answer", "saxophone"]]}
    assert final_answer(AVE) == {"tags": [["event", "male speech, man speaking"], ["range", "0,8"]]}
    # case, spaces inside the brackets and line breaks do not matter; unpaired tags are text
    assert final_answer("so <EVENT>\n Male  Speech, man speaking</ event > and < range >0,8</range>") == \
        final_answer(AVE)
    assert final_answer(CAPTION) == {"text": "a man plays the guitar while a dog barks."}
    assert final_answer("<answer> </answer>") == {"tags": [["answer", ""]]}
    for blank in ("", " \n ", None, 7, ["<answer> x </answer>"]):
        assert final_answer(blank) is None
    assert get_task("instruct").parse(AVQA) == final_answer(AVQA)
    assert final_tokens(final_answer(AVE)) == ["<event>", "male", "speech", ",", "man", "speaking", "<range>",
                                                "0", ",", "8"]


def test_token_f1_hand_computed():
    assert token_f1(["a", "b", "c"], ["a", "b", "c"]) == 1.0
    # common 2 ("a", "b"): P = 2/4, R = 2/3 -> F1 = 2 * (1/2) * (2/3) / (1/2 + 2/3) = 4/7
    assert token_f1(["a", "b", "x", "y"], ["a", "b", "c"]) == pytest.approx(4 / 7)
    assert token_f1(["a", "a"], ["a"]) == pytest.approx(2 / 3)  # multiset: one "a" in common
    assert token_f1([], []) == 1.0 and token_f1([], ["a"]) == 0.0 and token_f1(["a"], []) == 0.0


def test_metrics_hand_computed():
    answers = [answer(AVQA), answer(AVE, "ave"), answer(CAPTION, "avcap"), answer(AVQA)]
    preds = [
        final_answer("I think it is <answer> saxophone </answer>"),  # right: exact 1, F1 1
        # right event, wrong range: tokens <event> male speech , man speaking <range> 0 , 6 vs ... 0 , 8
        final_answer("<event> Male speech, man speaking </event> <range> 0,6 </range>"),
        final_answer("A man plays the guitar."),  # a caption: tokens a man plays the guitar . vs 9 tokens
        final_answer("the saxophone"),  # no tags where the reference has them: the empty answer, a failure
    ]
    # sample 2: 10 tokens each, 9 in common -> F1 0.9; sample 3: prediction 6 tokens, reference 10
    # (a man plays the guitar while a dog barks .), common 6 ("a" once, man, plays, the, guitar, ".")
    # -> P 1, R 6/10 -> F1 = 2 * 1 * 0.6 / 1.6 = 0.75
    got = scores(preds, answers)
    assert got["exact_match"] == pytest.approx(1 / 4)
    assert got["token_f1"] == pytest.approx((1 + 0.9 + 0.75 + 0) / 4)
    assert got["parse_failure_rate"] == pytest.approx(1 / 4)
    # no text at all is a failure too; the exact answers score 1 with no failures
    assert scores([None], [answer(CAPTION)]) == {"exact_match": 0.0, "token_f1": 0.0, "parse_failure_rate": 1.0}
    task = get_task("instruct")
    assert scores([task.answer_to_pred(a) for a in answers], answers) == {
        "exact_match": 1.0, "token_f1": 1.0, "parse_failure_rate": 0.0}
    assert scores([], []) == {"exact_match": 0.0, "token_f1": 0.0, "parse_failure_rate": 0.0}


def test_the_baseline_is_the_most_frequent_final_answer():
    answers = [answer(AVQA), answer("So it is <answer> saxophone </answer>."), answer(AVE, "ave"),
               answer("<answer> piano </answer>")]
    out = get_task("instruct").trivial_baseline(answers)
    # constant <answer> saxophone </answer>: exact 2 of 4; F1: 1, 1, 0 (no common token with the
    # AVE answer), "<answer> piano" vs "<answer> saxophone": 1 of 2 tokens -> 0.5
    assert out == {"exact_match": pytest.approx(0.5), "token_f1": pytest.approx(2.5 / 4), "parse_failure_rate": 0.0}


def test_a_converted_sample_keeps_its_placeholders_and_its_answer_as_it_is():
    instruction = "This is an image and an audio: <image> <audio> Please recognize the sounding object."
    clip = converted_clip({"instruction": instruction, "answer": AVQA, "task": "arig"})
    task = get_task("instruct")
    assert task.applies(clip) and not get_task("ave").applies(clip)
    for reasoning in (True, False):
        sample = get_task("instruct", reasoning=reasoning).build(clip, random.Random(0))
        assert sample.prompt == instruction and sample.target == AVQA
        assert sample.media == (MediaRef("<image>", segment=0), MediaRef("<audio>"))
        assert sample.answer == {"instruction": instruction, "answer": AVQA, "task": "arig"}
    assert task.parse(sample.target) == task.answer_to_pred(sample.answer)
    # an instruction without placeholders is about the video and the audio
    bare = get_task("instruct").build(converted_clip(answer(CAPTION) | {"instruction": "Describe it."}),
                                      random.Random(0))
    assert bare.prompt == "<video> <audio> Describe it." and bare.target == CAPTION
    assert bare.media == (MediaRef("<video>"), MediaRef("<audio>"))


@pytest.mark.parametrize("bad", [{"instruction": "Say it.", "answer": " "}, {"answer": AVQA}, "text", None])
def test_a_malformed_answer_names_the_clip(bad):
    with pytest.raises(SampleError, match=r"AVUIE_2_avqa_train-000000.*instruct"):
        get_task("instruct").build(converted_clip(bad), random.Random(0))


def test_avsynth_samples_are_samples_of_the_source_tasks(scene_factory):
    f, rng = scene_factory, random.Random(3)
    clips = [f.clip(f.random_scene(rng, clip_id=f"rand-{i}")) for i in range(40)]
    task, bare = get_task("instruct"), get_task("instruct", reasoning=False)
    seen = set()
    for i, clip in enumerate(clips):
        s, b = task.build(clip, random.Random(i)), bare.build(clip, random.Random(i))
        seen.add(s.answer["task"])
        assert s.answer == b.answer and s.answer["answer"] == s.target and s.answer["instruction"] == s.prompt
        assert s.prompt.startswith("<video> <audio> ") and b.target.startswith("<") and b.target in s.target or \
            all(tag in s.target for tag in b.target.split("> <"))
        assert task.parse(s.target) == task.parse(b.target) == task.answer_to_pred(s.answer)
    assert len(seen) >= 4
