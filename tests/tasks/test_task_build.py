"""Building samples: determinism, placeholders, words coverage, round trips, answer balance.

Tests over all tasks use, for each task, the clips it applies to (``Task.applies``): the clip set
holds single-source and multi-source scenes, so every task is exercised.
"""

import dataclasses
import random
import re
from collections import Counter

import pytest
import torch

from avmt.data import vocab
from avmt.data.sample import PLACEHOLDERS, SampleError
from avmt.data.synth import validate_scene
from avmt.tasks import get_task, list_tasks
from avmt.tasks.avqa import QUESTION_TYPES
from avmt.tasks.text import text_words

#: Logit magnitude whose sigmoid is exactly 0 / 1 in float32.
BIG = 1e4


@pytest.fixture(scope="module")
def clips(scene_factory):
    """Many random scenes covering the whole vocabulary (16 classes): 400 single-source, then 100
    multi-source."""
    f, rng = scene_factory, random.Random(1234)
    single = [f.clip(f.random_scene(rng, clip_id=f"rand-{i:05d}")) for i in range(400)]
    multi = [f.clip(f.random_multi_scene(rng, clip_id=f"multi-{i:05d}")) for i in range(100)]
    return single + multi


def others_pool(clips, clip):
    """The clips a multi-clip sample of ``clip`` may look at: the 16 before it, most recent first
    (as the data stream's buffer of recent clips)."""
    i = next(j for j, c in enumerate(clips) if c is clip)
    return clips[max(0, i - 16):i][::-1]


def usable(task, clips, limit=None):
    """The clips ``task`` applies to and, for a multi-clip task, finds its other clips for (at
    most ``limit``); there must be some."""
    out = [c for c in clips if task.applies(c)
           and task.select_others(c, others_pool(clips, c), random.Random(0)) is not None]
    assert out, f"no clip exercises task {task.name!r}"
    return out[:limit]


def make(task, clip, seed, clips):
    """``task``'s sample of ``clip`` with ``random.Random(seed)``, its other clips (if any) chosen
    from :func:`others_pool` with that rng first."""
    rng = random.Random(seed)
    return task.build(clip, rng, task.select_others(clip, others_pool(clips, clip), rng))


def perfect_outputs(sample):
    """Model outputs that are exactly right for ``sample``, from its dense targets: one mask-logit
    map per ``<seg>`` (the target mask, or one per class of ``seg_classes`` over the class map)."""
    if "mask" in sample.dense:
        masks = sample.dense["mask"][None]
    elif "class_map" in sample.dense:
        masks = torch.stack([sample.dense["class_map"] == c for c in sample.dense["seg_classes"].tolist()])
    else:
        return {}
    return {"mask_logits": torch.where(masks, BIG, -BIG)}


def test_scenes_cover_the_vocabulary(clips):
    objs = [o for c in clips for o in c.scene["objects"]]
    assert {o["class"] for o in objs} == set(vocab.CLASSES)
    assert {o["color"] for o in objs} == set(vocab.COLORS)
    assert {o["position"] for o in objs} == set(vocab.POSITIONS)
    assert {o["motion"] for o in objs} == set(vocab.MOTIONS)
    assert {c.scene["mood"] for c in clips} == set(vocab.MOODS)


def test_scenes_are_valid_v2_with_consistent_masks(clips, scene_factory):
    """The hand-written scenes follow the v2 contract, and each object's mask is its box rectangle."""
    f = scene_factory
    multi = 0
    for clip in [*clips, f.clip(f.basic_scene()), f.clip(f.multi_scene())]:
        validate_scene(clip.scene)
        multi += clip.scene["av_event"] is None
        assert any(e["object"] is not None for e in clip.scene["expressions"])
        assert any(e["object"] is None for e in clip.scene["expressions"])
        ids = clip.segment_masks()
        for obj in clip.scene["objects"]:
            assert (obj["description"] is None) == (not obj["visible"])
            for t, box in enumerate(obj["boxes"]):
                want = torch.zeros(ids.shape[1:], dtype=torch.bool)
                if box is not None:
                    want[f.box_pixels(box, ids.shape[-1])] = True
                assert torch.equal(ids[t] == obj["id"] + 1, want), (clip.key, obj["id"], t)
    assert multi == 101


@pytest.mark.parametrize("name", list_tasks())
def test_words_cover_every_sample(name, clips):
    for reasoning in (True, False):
        task = get_task(name, reasoning=reasoning)
        words = task.words()
        missing = set()
        for i, clip in enumerate(usable(task, clips)):
            sample = make(task, clip, i, clips)
            missing |= (text_words(sample.prompt) | text_words(sample.target)) - words
        assert not missing, f"{name}: words() misses {sorted(missing)}"


@pytest.mark.parametrize("name", list_tasks())
def test_build_is_deterministic_given_seed(name, clips, same_value):
    task = get_task(name)
    mine = usable(task, clips)
    for i, clip in enumerate(mine[:50]):
        a, b = make(task, clip, i, clips), make(task, clip, i, clips)
        assert same_value(dataclasses.asdict(a), dataclasses.asdict(b))
    prompts = {make(task, mine[0], s, clips).prompt for s in range(40)}
    assert len(prompts) >= 3  # several phrasings


@pytest.mark.parametrize("name", list_tasks())
def test_sample_shape_and_round_trip(name, clips, same_value):
    task, bare = get_task(name), get_task(name, reasoning=False)
    specs = {spec.name: spec for spec in task.dense_targets}
    seg_end = ">" if task.outputs else ">."  # a mask answer ends with its tags, no period (ssu: <seg> then <desc>)
    for i, clip in enumerate(usable(task, clips, 150)):
        s, b = make(task, clip, i, clips), make(bare, clip, i, clips)
        assert s.task == name and b.task == name
        # the prompt's placeholders are its media references, one to one, in order
        assert re.findall("|".join(PLACEHOLDERS), s.prompt) == [ref.placeholder for ref in s.media]
        if task.num_clips == 1:
            # the prompt starts with the declared inputs, each placeholder exactly as often as declared
            assert tuple(ref.placeholder for ref in s.media) == task.inputs
            assert s.prompt.startswith(" ".join(task.inputs) + " ")
            for placeholder in PLACEHOLDERS:
                assert s.prompt.count(placeholder) == task.inputs.count(placeholder), (placeholder, s.prompt)
            assert all(ref.clip == 0 for ref in s.media)
        else:  # placeholders of the declared kinds, about every clip of the sample, the anchor first
            assert s.media[0].clip == 0 and {ref.placeholder for ref in s.media} <= set(task.inputs)
            assert {ref.clip for ref in s.media} == set(range(task.num_clips))
        assert all(0 <= ref.segment < clip.num_segments for ref in s.media if ref.placeholder == "<image>")
        # dense targets: exactly the declared ones ({} for the text-only tasks)
        assert set(s.dense) == set(specs)
        for key, value in s.dense.items():
            specs[key].check(value, name)
        assert same_value(s.answer, b.answer) and s.prompt == b.prompt
        assert s.media == b.media and same_value(s.dense, b.dense)
        # the parsed target is exactly right, with and without reasoning
        outputs = perfect_outputs(s)
        if not task.outputs:
            assert task.parse(s.target) == task.answer_to_pred(s.answer)
            assert task.parse(b.target) == task.answer_to_pred(b.answer)
        assert same_value(task.predict(s.target, outputs), task.answer_to_pred(s.answer))
        assert same_value(task.predict(b.target, outputs), task.answer_to_pred(b.answer))
        if i < 30:  # a right prediction scores 1 on every metric (0 failures)
            m = task.metrics()
            m.update([task.predict(s.target, outputs)], [s.answer])
            null = isinstance(s.answer, dict) and bool(s.answer.get("null"))
            corpus = {key for key, metric in m.items() if getattr(metric, "corpus_level", False)}
            for key, v in m.compute().items():
                if key in corpus:
                    continue  # e.g. CIDEr-D: one sample has no document frequencies to weigh by
                if key.startswith("accuracy/") and key != f"accuracy/{s.answer['type']}":
                    continue  # avqa: question types absent from this batch score 0
                if null and key not in task.lower_is_better:
                    continue  # a null sample (ref_avs) is scored only by the null metrics
                want = 0.0 if key in task.lower_is_better else pytest.approx(1.0)
                assert float(v) == want, (key, s.target)
        if name != "avcap":
            assert b.target.startswith("<") and b.target.endswith(">")  # only the tagged answer
            # reasoning: one to three sentences, then a concluding sentence holding the tags
            reasoning, _, conclusion = s.target.rpartition(" So ")
            assert reasoning.endswith(".") and conclusion.endswith(seg_end), s.target
            assert not task.outputs or "<seg>" in conclusion, s.target
            assert 1 <= reasoning.count(". ") + 1 <= 3, s.target
            assert all(part in conclusion for part in b.target.split("> <")), (conclusion, b.target)


def test_reasoning_sentences_say_what_is_seen_and_heard(clip):
    ave = get_task("ave").build(clip, random.Random(0)).target
    assert "A red violin on the left is seen and heard from second 2 to second 7." in ave
    assert "A dog is heard from second 0 to second 3 and from second 8 to second 10 but not seen." in ave
    assert "A blue cat on the right is seen from second 4 to second 9 but not heard." in ave


def test_avqa_answer_distribution(scene_factory):
    f, rng = scene_factory, random.Random(99)
    scenes = [f.clip(f.random_scene(rng, num_classes=8)) for _ in range(1500)]
    task = get_task("avqa")
    answers = [task.build(c, random.Random(i)).answer for i, c in enumerate(scenes)]
    words = Counter(a["answer"] for a in answers)
    types = Counter(a["type"] for a in answers)
    assert set(types) == set(QUESTION_TYPES)
    assert len(QUESTION_TYPES) >= 8 and max(types.values()) / len(answers) < 0.15
    assert words.most_common(1)[0][1] / len(answers) < 0.25  # majority answer well under 30 %
    assert 0.4 < words["yes"] / (words["yes"] + words["no"]) < 0.6
    for kind in ("audio_existential", "visual_existential", "audio_visual_existential"):
        yes = sum(a["answer"] == "yes" for a in answers if a["type"] == kind)
        assert 0.35 < yes / types[kind] < 0.65, kind


def test_avqa_answers_are_right(scene_factory):
    f = scene_factory
    objs = [
        f.object(0, "flute", visible=[[1, 6]], sounding=[[1, 6]], position="right", loudness=0.4),
        f.object(1, "drum", visible=[[0, 10]], sounding=[[4, 5], [7, 9]], position="left", loudness=0.9),
    ]
    clip = f.clip(f.scene(objs, av=0))
    task = get_task("avqa")
    seen = {}
    for seed in range(300):
        s = task.build(clip, random.Random(seed))
        seen[s.prompt] = s.answer["answer"]
    expect = {
        "Which sound starts first?": "flute",
        "Which sound starts last?": "drum",
        "Which object appears first?": "drum",
        "How many objects are heard in the clip?": "two",
        "How many times does the drum start sounding?": "two",
        "Which is louder, the flute or the drum?": "drum",
        "Which is visible for longer, the drum or the flute?": "drum",
        "Which is further to the left, the flute or the drum?": "drum",
        "Where is the object that is both seen and heard?": "right",
        "How many visible objects make no sound?": "zero",
    }
    found = {q: a for q, a in expect.items() if "<video> <audio> " + q in seen}
    assert len(found) >= 5
    for q, a in found.items():
        assert seen["<video> <audio> " + q] == a, q


def test_build_errors(clip):
    task = get_task("ave")
    with pytest.raises(ValueError, match="scene"):
        task.build({"key": "x"}, random.Random(0))
    # an annotation without objects, or without the single event the task needs: a SampleError
    # naming the clip and the task (the data stream skips and counts it)
    bad = dataclasses.replace(clip, scene={k: v for k, v in clip.scene.items() if k != "objects"})
    with pytest.raises(SampleError, match=r"test-00000001.*'ave'.*objects"):
        task.build(bad, random.Random(0))
    bad = dataclasses.replace(clip, scene=dict(clip.scene, av_event=None, action=None))
    with pytest.raises(SampleError, match=r"test-00000001.*'ave'.*audio-visual event"):
        task.build(bad, random.Random(0))
    bad = dataclasses.replace(clip, scene=dict(clip.scene, av_event={"object": 7, "class": "violin", "range": [2, 7]}))
    with pytest.raises(ValueError, match="av_event"):
        task.build(bad, random.Random(0))
    bad = dataclasses.replace(clip, scene=dict(clip.scene, action="flying"))
    with pytest.raises(ValueError, match="flying"):
        get_task("action").build(bad, random.Random(0))
