"""Cross-modal matching (``a2v``, ``v2a``): multi-clip samples with inline placeholders, the choice
of the other clips, parsing, the metric and its chance baseline, the data stream and the model."""

from __future__ import annotations

import dataclasses
import random
import re
import warnings
from collections import Counter

import pytest
import torch

from avmt.data.datamodule import ClipTaskStream, collate_rules
from avmt.data.sample import ClipGroup, MediaRef, SampleError, collate
from avmt.data.shards import CorruptSampleWarning, write_shards
from avmt.data.synth import SynthConfig
from avmt.module import AVModule
from avmt.tasks import get_task, task_ids
from avmt.tasks.base import Task, TaskParts
from avmt.tasks.matching import CandidateAccuracy, MatchingTask
from avmt.tasks.text import text_words

NAMES = ("a2v", "v2a")
K = 4
#: query placeholder, candidate placeholder, candidate label of each task
KINDS = {"a2v": ("<audio>", "<video>", "Video"), "v2a": ("<video>", "<audio>", "Audio")}
PLACEHOLDER_RE = re.compile(r"<video>|<audio>|<image>")


def classes_of(scene: dict) -> set[str]:
    """Classes seen or heard in a scene, read straight from the scene graph."""
    return {o["class"] for o in scene["objects"] if o["visible"] or o["sounding"]}


def both_of(scene: dict) -> set[str]:
    """Classes of the objects that are seen and heard."""
    return {o["class"] for o in scene["objects"] if o["visible"] and o["sounding"]}


def samples(task: Task, clips, window: int = 16, limit: int | None = None):
    """``(anchor, others, sample)`` for each clip the task applies to, the others chosen from the
    ``window`` clips before it, as the data stream does (anchors with too few fitting clips skipped)."""
    out = []
    for i, clip in enumerate(clips):
        if not task.applies(clip):
            continue
        rng = random.Random(i)
        others = task.select_others(clip, clips[max(0, i - window):i][::-1], rng)
        if others is None:
            continue
        out.append((clip, others, task.build(clip, rng, others)))
        if limit is not None and len(out) >= limit:
            break
    return out


# ---- declarations ---------------------------------------------------------------------------------


def test_declarations():
    for name in NAMES:
        task = get_task(name)
        assert isinstance(task, MatchingTask) and task.num_clips == K and task.baseline_name == "chance"
        assert task.inputs[0] == KINDS[name][0] and set(task.inputs) == {"<video>", "<audio>"}
        assert not task.needs_av_event and not task.dense_targets and not task.outputs
    assert task_ids()["a2v"] == 13 and task_ids()["v2a"] == 14


# ---- building on real AVSynth clips ---------------------------------------------------------------


@pytest.mark.parametrize("name", NAMES)
def test_samples_on_real_clips(name, synth_clips):
    task, bare = get_task(name), get_task(name, reasoning=False)
    query, candidate, label = KINDS[name]
    built = samples(task, synth_clips)
    assert len(built) >= 100
    positions, prompts = Counter(), set()
    for (anchor, others, s), (_, bare_others, b) in zip(built, samples(bare, synth_clips)):
        # K distinct clips; none of the others shares a class with the anchor scene
        keys = [anchor.key, *(o.key for o in others)]
        assert len(others) == K - 1 and len(set(keys)) == K
        assert all(not classes_of(o.scene) & classes_of(anchor.scene) for o in others)
        # the prompt's placeholders are the media references, in order: the query, then K candidates
        assert PLACEHOLDER_RE.findall(s.prompt) == [ref.placeholder for ref in s.media]
        assert s.media[0] == MediaRef(query, 0)
        assert [ref.placeholder for ref in s.media[1:]] == [candidate] * K
        assert sorted(ref.clip for ref in s.media[1:]) == list(range(K))  # each of the K clips once
        # every candidate placeholder sits right after its label, in label order
        assert re.findall(rf"{label} (\d): {candidate}", s.prompt) == [str(p) for p in range(1, K + 1)]
        assert s.prompt.startswith(query + " ") and s.prompt.count(query) == 1
        # the answer's candidate is the anchor clip, and no other candidate shares its classes
        index = s.answer["index"]
        assert s.answer == {"index": index, "num_candidates": K}
        assert s.media[index].clip == 0
        for p, ref in enumerate(s.media[1:], start=1):
            cand = anchor if ref.clip == 0 else others[ref.clip - 1]
            assert (p == index) == bool(both_of(anchor.scene) & classes_of(cand.scene))
        # targets: two short sentences naming what ties the two modalities, then the tagged index
        assert bare_others == others
        assert b.prompt == s.prompt and b.media == s.media and b.answer == s.answer
        assert b.target == f"<answer> {index} </answer>"
        assert s.target.endswith(f"So the answer is <answer> {index} </answer>.")
        assert f"{label} {index} " in s.target and s.target.count(". ") == 2
        assert all(c in s.target for c in both_of(anchor.scene))
        assert task.parse(s.target) == task.parse(b.target) == index == task.answer_to_pred(s.answer)
        positions[index] += 1
        prompts.add(PLACEHOLDER_RE.sub("", s.prompt).split(":")[0])
    assert set(positions) == set(range(1, K + 1))
    assert max(positions.values()) / len(built) < 0.4  # the right position is random
    assert len(prompts) >= 3  # several phrasings


@pytest.mark.parametrize("name", NAMES)
def test_words_cover_every_sample(name, synth_clips):
    for reasoning in (True, False):
        task = get_task(name, reasoning=reasoning)
        words, missing = task.words(), set()
        for _, _, s in samples(task, synth_clips):
            missing |= (text_words(s.prompt) | text_words(s.target)) - words
        assert not missing, sorted(missing)


def test_build_is_deterministic(synth_clips):
    for name in NAMES:
        task = get_task(name)
        for anchor, others, s in samples(task, synth_clips, limit=20):
            i = synth_clips.index(anchor)
            rng = random.Random(i)
            again = task.build(anchor, rng, task.select_others(anchor, synth_clips[max(0, i - 16):i][::-1], rng))
            assert dataclasses.asdict(again) == dataclasses.asdict(s)


def test_hand_made_reasoning(scene_factory):
    f = scene_factory
    anchor = f.clip(f.scene([f.object(0, "violin", visible=[[2, 7]], sounding=[[2, 7]]),
                             f.object(1, "flute", visible=[[0, 5]], sounding=[[6, 9]], position="right"),
                             f.object(2, "dog", sounding=[[0, 3]], position="center")], av=0, clip_id="anchor"))
    others = [f.clip(f.scene([f.object(0, cls, visible=[[0, 4]], sounding=[[0, 4]])], av=0, clip_id=f"o-{cls}"))
              for cls in ("drum", "bell", "cow")]
    a2v, v2a = get_task("a2v"), get_task("v2a")
    s = a2v.build(anchor, random.Random(0), others)  # in order of first onset: the flute is seen at 0
    i = s.answer["index"]
    assert s.target == (f"A flute and a violin are heard. Video {i} shows a flute and a violin. "
                        f"So the answer is <answer> {i} </answer>.")
    s = v2a.build(anchor, random.Random(0), others)
    i = s.answer["index"]
    assert s.target == (f"A flute and a violin are seen. Audio {i} sounds like a flute and a violin. "
                        f"So the answer is <answer> {i} </answer>.")


# ---- applies / select_others ----------------------------------------------------------------------


def _clip(f, key, *objects, av=0):
    return f.clip(f.scene(list(objects), av=av, clip_id=key))


def test_applies_needs_an_object_seen_and_heard(scene_factory, multi_clip):
    f = scene_factory
    task = get_task("a2v")
    assert task.applies(_clip(f, "ok", f.object(0, "violin", visible=[[0, 3]], sounding=[[5, 8]]), av=None))
    none = _clip(f, "none", f.object(0, "violin", visible=[[0, 3]]), f.object(1, "dog", sounding=[[0, 3]]), av=None)
    assert not task.applies(none) and not get_task("v2a").applies(none)
    assert task.applies(multi_clip)  # multi-source scenes too (no single av_event needed)
    assert not task.applies(dataclasses.replace(none, scene={"num_segments": 10}))  # never raises


def test_select_others_only_clips_without_a_shared_class(scene_factory):
    f = scene_factory
    anchor = _clip(f, "anchor", f.object(0, "violin", visible=[[2, 7]], sounding=[[2, 7]]),
                   f.object(1, "dog", sounding=[[0, 3]], position="right"))
    fit = [_clip(f, f"fit-{c}", f.object(0, c, visible=[[0, 4]], sounding=[[0, 4]])) for c in ("drum", "bell", "cow")]
    heard_dog = _clip(f, "dog-heard", f.object(0, "cat", visible=[[0, 4]], sounding=[[0, 4]]),
                      f.object(1, "dog", sounding=[[5, 6]], position="right"))  # shares the anchor's audio-only dog
    seen_violin = _clip(f, "violin-seen", f.object(0, "car", visible=[[0, 4]], sounding=[[0, 4]]),
                        f.object(1, "violin", visible=[[5, 6]], position="right"))
    task = get_task("a2v")
    rng = random.Random(0)
    # 2 fitting clips: no sample (None), whatever else is there (the anchor itself, repeats, sharers)
    recent = [anchor, fit[0], heard_dog, fit[0], seen_violin, fit[1], anchor]
    assert task.select_others(anchor, recent, rng) is None
    assert task.select_others(anchor, [], rng) is None
    # 3 fit: exactly those, in an rng-chosen order
    recent = [heard_dog, *fit, seen_violin]
    chosen = {tuple(c.key for c in task.select_others(anchor, recent, random.Random(s))) for s in range(30)}
    assert all(sorted(keys) == sorted(c.key for c in fit) for keys in chosen) and len(chosen) > 1
    # more than enough: a random choice among the fitting ones only
    more = [*fit, _clip(f, "fit-horn", f.object(0, "horn", visible=[[0, 4]], sounding=[[0, 4]])), seen_violin]
    picks = Counter(c.key for s in range(200) for c in task.select_others(anchor, more, random.Random(s)))
    assert set(picks) == {c.key for c in more[:4]}


def test_default_select_others():
    class Two(Task):
        name, task_id, num_clips = "two_test", 998, 3

    clips = [dataclasses.replace(_dummy(), key=k) for k in ("a", "b", "a", "c", "d")]
    one = Task()
    assert one.select_others(clips[0], clips, random.Random(0)) == []
    assert [c.key for c in Two().select_others(clips[0], clips, random.Random(0))] == ["b", "c"]
    assert Two().select_others(clips[0], clips[:3], random.Random(0)) is None  # only "b" besides "a"


def _dummy():
    from avmt.data.sample import Clip

    return Clip("x", torch.zeros(1, 3, 2, 2, dtype=torch.uint8), torch.zeros(4), {"objects": [], "num_segments": 1})


def test_build_rejects_wrong_others(scene_factory):
    f = scene_factory
    anchor = _clip(f, "anchor", f.object(0, "violin", visible=[[2, 7]], sounding=[[2, 7]]))
    fit = [_clip(f, f"fit-{c}", f.object(0, c, visible=[[0, 4]], sounding=[[0, 4]])) for c in ("drum", "bell", "cow")]
    sharer = _clip(f, "sharer", f.object(0, "cat", visible=[[0, 4]], sounding=[[0, 4]]),
                   f.object(1, "violin", sounding=[[0, 4]], position="right"))
    task = get_task("a2v")
    with pytest.raises(ValueError, match=r"'a2v'.*3 other clips.*got 2"):
        task.build(anchor, random.Random(0), fit[:2])
    with pytest.raises(ValueError, match=r"'a2v'.*3 other clips.*got 0"):
        task.build(anchor, random.Random(0))
    with pytest.raises(ValueError, match=r"'v2a'.*distinct"):
        get_task("v2a").build(anchor, random.Random(0), [fit[0], fit[0], fit[1]])
    with pytest.raises(ValueError, match=r"'a2v'.*sharer.*ambiguous"):
        task.build(anchor, random.Random(0), [fit[0], sharer, fit[1]])
    no_av = _clip(f, "no-av", f.object(0, "violin", visible=[[2, 7]]), f.object(1, "dog", sounding=[[0, 3]]), av=None)
    with pytest.raises(SampleError, match=r"no-av.*'a2v'.*seen and heard"):
        task.build(no_av, random.Random(0), fit)


# ---- the inline-media contract of Task.build -----------------------------------------------------


class InlineTask(Task):
    """Made up for these tests: a prompt with its placeholders between text."""

    name, task_id, num_clips, needs_av_event = "inline_test", 997, 2, False
    question, media, inline = "<audio> Is this sound the one of <video> ?", None, True

    def _compose_clips(self, clip, others, rng):
        media = self.media or (MediaRef("<audio>", 0), MediaRef("<video>", 1))
        return TaskParts(self.question, [], "", "<answer> no </answer>", "no", media=media,
                         inline_media=self.inline)


def test_inline_placeholders_are_kept_and_checked(clip):
    other = dataclasses.replace(clip, key="other")
    task = InlineTask()
    s = task.build(clip, random.Random(0), [other])
    assert s.prompt == "<audio> Is this sound the one of <video> ?"  # no prefix
    assert s.media == (MediaRef("<audio>", 0), MediaRef("<video>", 1))
    bad = [
        ("<video> Is this sound the one of <audio> ?", None, True, "order"),  # swapped
        ("<audio> Is this sound the one?", None, True, "missing"),
        ("<audio> <video> Is this <video> ?", None, True, "extra"),
        ("Is this <video> ?", (MediaRef("<audio>", 0),), False, "prefixed plus inline"),
    ]
    for question, media, inline, why in bad:
        task.question, task.media, task.inline = question, media, inline
        with pytest.raises(ValueError, match=r"'inline_test'.*placeholders.*one to one") as err:
            task.build(clip, random.Random(0), [other])
        assert not isinstance(err.value, SampleError), why  # a task bug, not bad data
    task.question, task.media, task.inline = "<audio> Is it <video> ?", (MediaRef("<audio>", 0),
                                                                         MediaRef("<video>", 2)), True
    with pytest.raises(ValueError, match=r"'inline_test'.*beyond the anchor and the 1 other"):
        task.build(clip, random.Random(0), [other])


# ---- parsing -------------------------------------------------------------------------------------


@pytest.mark.parametrize("text,want", [
    ("<answer> 2 </answer>", 2),
    ("So the answer is <answer> 3 </answer>.", 3),
    ("<ANSWER>4</answer>", 4),
    ("< answer >  1  </ answer >", 1),
    ("<answer> three </answer>", 3),
    ("<answer> Video 2 </answer>", 2),
    ("<answer> audio four </answer>", 4),
    ("<answer> 2. </answer>", 2),
    ("<answer> 1 </answer> ... <answer> 4 </answer>", 4),  # the last tag
    ("<answer> 7 </answer>", 7),  # out of range: parsed, and scored wrong
    ("<answer> 0 </answer>", None),
    ("<answer> zero </answer>", None),
    ("<answer> ten </answer>", None),
    ("<answer> 2 or 3 </answer>", None),
    ("<answer> video </answer>", None),
    ("<answer> </answer>", None),
    ("<answer> 2", None),
    ("2", None),
    ("", None),
    (None, None),
    (3, None),
    (["<answer> 2 </answer>"], None),
])
def test_parse(text, want):
    for name in NAMES:
        assert get_task(name).parse(text) == want


# ---- metrics -------------------------------------------------------------------------------------


def _answers(*indices):
    return [{"index": i, "num_candidates": K} for i in indices]


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_hand_computed():
    task = get_task("a2v")
    m = task.metrics()
    m.update([1, 2, None, 4, 7], _answers(1, 3, 2, 4, 1))
    scores = {k: float(v) for k, v in m.compute().items()}
    assert scores == {"accuracy": 2 / 5, "parse_failure_rate": 1 / 5}
    m.update([None, None, 3], _answers(1, 1, 3))  # accumulates over updates
    assert {k: float(v) for k, v in m.compute().items()} == {"accuracy": 3 / 8, "parse_failure_rate": 3 / 8}
    m.reset()
    assert {k: float(v) for k, v in m.compute().items()} == {"accuracy": 0.0, "parse_failure_rate": 0.0}
    acc = CandidateAccuracy()
    acc.update([None, None], _answers(1, 2))
    assert float(acc.compute()) == 0.0 and acc.compute().dtype == torch.float64
    acc.update([True, "1"], _answers(1, 1))  # neither is an index
    assert float(acc.compute()) == 0.0
    with pytest.raises(ValueError, match="pair up"):
        acc.update([1], _answers(1, 2))


@pytest.mark.filterwarnings("ignore:The ``compute`` method")
def test_metric_states_sum_like_ddp():
    preds, targets = [1, 2, None, 3, 4, 4], _answers(1, 1, 2, 3, 4, 2)
    whole = CandidateAccuracy()
    whole.update(preds, targets)
    parts = [CandidateAccuracy(), CandidateAccuracy()]
    parts[0].update(preds[:2], targets[:2])
    parts[1].update(preds[2:], targets[2:])
    assert all(m._reductions[s] is not None for m in parts for s in ("correct", "total"))
    merged = CandidateAccuracy()
    merged.correct = parts[0].correct + parts[1].correct
    merged.total = parts[0].total + parts[1].total
    assert float(merged.compute()) == float(whole.compute()) == 3 / 6


@pytest.mark.parametrize("n", [1, 3, 7, 10, 101])
def test_chance_baseline_is_one_over_k_exactly(n):
    task = get_task("v2a")
    answers = _answers(*[1 + (i * 7) % K for i in range(n)])
    baseline = task.trivial_baseline(answers)
    assert baseline == {"accuracy": 1 / K, "parse_failure_rate": 0.0}
    # the same number as the mean of the K constants' own scores
    means = []
    for c in range(1, K + 1):
        m = task.metrics()
        m.update([c] * n, answers)
        means.append(float(m.compute()["accuracy"]))
    assert baseline["accuracy"] == pytest.approx(sum(means) / K, abs=1e-12)
    # the majority baseline still works: the most frequent position
    majority = task.majority_baseline(answers)
    assert majority["accuracy"] == max(means) and majority["parse_failure_rate"] == 0.0
    with pytest.raises(ValueError, match="v2a"):
        task.trivial_baseline([])


def test_exact_predictions_score_one(synth_clips):
    for name in NAMES:
        task = get_task(name)
        answers = [s.answer for _, _, s in samples(task, synth_clips, limit=40)]
        m = task.metrics()
        m.update([task.parse(f"<answer> {a['index']} </answer>") for a in answers], answers)
        assert {k: float(v) for k, v in m.compute().items()} == {"accuracy": 1.0, "parse_failure_rate": 0.0}


# ---- the data stream and the model ---------------------------------------------------------------

CFG = SynthConfig(frame_size=32, multi_source=0.5)


@pytest.fixture(scope="module")
def stream_groups(tmp_path_factory):
    """Clip groups of a ClipTaskStream over real shards (a2v, v2a and ave)."""
    root = tmp_path_factory.mktemp("matching-shards")
    paths = write_shards(root, "val", 24, 3, CFG, clips_per_shard=8, progress=False, num_workers=1)
    stream = ClipTaskStream(paths, ["ave", "a2v", "v2a"], reasoning=True, seed=0, shuffle=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", CorruptSampleWarning)
        groups = list(stream)
    assert stream.counter.count == 0  # no sample was corrupt; clips without enough others are not counted
    return stream, groups


def test_stream_builds_matching_samples_over_four_clips(stream_groups):
    stream, groups = stream_groups
    assert not any(s.task in NAMES for s in groups[0].samples)  # nothing recent yet: no matching sample
    matching = [(g, s) for g in groups for s in g.samples if s.task in NAMES]
    assert {s.task for _, s in matching} == set(NAMES) and len(matching) >= 10
    for group, s in matching:
        keys = [c.key for c in group.clips]
        assert len(set(keys)) == len(keys)
        used = {ref.clip for ref in s.media}
        assert len(used) == K and max(used) < len(group.clips) and s.media[0].clip == 0
        right = group.clips[s.media[s.answer["index"]].clip]
        assert right.key == group.clips[0].key
        for ref in s.media[1:]:
            if ref.clip != 0:
                assert not classes_of(group.clips[ref.clip].scene) & classes_of(group.clips[0].scene)
    # collated: the media of a matching row refer to 4 batch clips, the right one its anchor's
    batch = collate(groups[-6:], collate_rules(stream.tasks))
    rows = [r for r, t in enumerate(batch.tasks) if t in NAMES]
    assert rows
    for r in rows:
        clips = [ref.clip for ref in batch.media[r]]
        assert len(set(clips)) == K and all(0 <= c < len(batch.clip_keys) for c in clips)
        assert clips[batch.answers[r]["index"]] == batch.anchor_clips[r]
    assert len(batch.clip_keys) == len(set(batch.clip_keys))  # a clip used twice is stacked once
    sub = batch.take(rows[:1])
    assert len(sub.clip_keys) == K and sub.media[0][0].clip in range(K)


def tiny_module() -> AVModule:
    from tests.test_task_contract import tiny_module as contract_module

    return contract_module(heads=False, generation_tasks=list(NAMES), max_new_tokens=6)


def test_model_forward_and_generate_on_a_matching_batch(stream_groups):
    stream, groups = stream_groups
    module = tiny_module()
    batch = collate(groups[-4:], collate_rules(stream.tasks))
    assert any(t in NAMES for t in batch.tasks)
    batch = module.on_before_batch_transfer(batch, 0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # self.log without a Trainer
        loss = module._losses(batch, "train")
    assert torch.isfinite(loss)
    loss.backward()
    generated = module.model.generate(batch, max_new_tokens=6)
    assert len(generated.texts) == len(batch)
    for name, rows in batch.task_rows().items():
        if name not in NAMES:
            continue
        task = stream.tasks[[t.name for t in stream.tasks].index(name)]
        preds = [task.predict(generated.texts[r], {}) for r in rows]
        m = task.metrics()
        m.update(preds, [batch.answers[r] for r in rows])
        assert all(torch.isfinite(torch.as_tensor(v)) for v in m.compute().values())


def test_inline_placeholders_get_their_clips_media_tokens(stream_groups):
    """Through the model: each placeholder in the middle of the prompt is replaced by the media
    tokens of the clip its reference names, and the text between them keeps its embeddings."""
    stream, groups = stream_groups
    group = next(g for g in groups if any(s.task == "a2v" for s in g.samples))
    group = ClipGroup(group.clips, [s for s in group.samples if s.task == "a2v"][:1])
    batch = collate([group])
    model = tiny_module().model.eval()
    prompt, refs = batch.prompts[0], batch.media[0]
    tokens = model.tokenize([prompt])
    ids = tokens.input_ids[0]
    with torch.no_grad():
        media = model.encode_media(batch.frames, batch.audio)
        embeds = model.embed(tokens.input_ids, media, batch.media)[0]
        plain = model.llm.embed(tokens.input_ids)[0]
    text_positions = torch.ones_like(ids, dtype=torch.bool)
    for kind in ("<audio>", "<video>"):
        n = model.placeholder_lengths[kind]
        positions = (ids == model.placeholder_ids[kind]).nonzero().flatten()
        kind_refs = [ref for ref in refs if ref.placeholder == kind]
        assert len(positions) == n * len(kind_refs)
        for j, ref in enumerate(kind_refs):
            with torch.no_grad():
                want = model.media_tokens(media, {kind: [(0, ref)]})[kind][0]
            torch.testing.assert_close(embeds[positions[j * n:(j + 1) * n]], want)
        text_positions[positions] = False
    # the placeholders really are between text: text tokens before the last candidate
    video_pos = (ids == model.placeholder_ids["<video>"]).nonzero().flatten()
    assert text_positions[video_pos[0]:video_pos[-1]].any()
    torch.testing.assert_close(embeds[text_positions], plain[text_positions])
    # the candidates differ: the anchor's video tokens are not another clip's
    n = model.placeholder_lengths["<video>"]
    video_refs = [ref for ref in refs if ref.placeholder == "<video>"]
    a, b = (video_refs.index(next(r for r in video_refs if (r.clip == 0) == anchor)) for anchor in (True, False))
    assert not torch.allclose(embeds[video_pos[a * n:(a + 1) * n]], embeds[video_pos[b * n:(b + 1) * n]])
