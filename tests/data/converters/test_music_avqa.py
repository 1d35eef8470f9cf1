"""``data convert music-avqa``: MUSIC-AVQA's question files and videos -> shards the ``avqa`` task trains on."""

from __future__ import annotations

import json
import random

import pytest
import torch

from avmt.data.converters import ConvertError, convert, get_converter
from avmt.data.converters.music_avqa import fill_question, question_type
from avmt.data.datamodule import ClipTaskStream
from avmt.data.media import MediaConfig
from avmt.data.shards import list_shards
from avmt.tasks import get_task
from avmt.tasks.avqa import MUSIC_AVQA_GROUPS, real_question_type
from tests.data.converters.common import convert as run_convert
from tests.data.converters.common import fit_steps, read_split
from tests.data.test_media import write_video


def question(video_id, question_id, modality, kind, content, values, answer, **extra):
    """One entry as MUSIC-AVQA writes it: ``type`` and ``templ_values`` are stringified lists."""
    return {"video_id": video_id, "question_id": question_id, "type": json.dumps([modality, kind]),
            "question_content": content, "templ_values": json.dumps(values), "anser": answer,
            "question_deleted": 0, **extra}


@pytest.fixture(scope="module")
def avqa_tree(tmp_path_factory):
    """The official repository's layout: data/json_update/avqa-{split}.json (preferred over the stale
    data/json/) + data/video/MUSIC-AVQA-videos-Real/ and MUCIS-AVQA-videos-Synthetic/ (sic); one
    corrupt video, one missing, a malformed type string, a withdrawn question, an unknown answer."""
    src = tmp_path_factory.mktemp("MUSIC-AVQA")
    real = src / "data" / "video" / "MUSIC-AVQA-videos-Real"
    synthetic = src / "data" / "video" / "MUCIS-AVQA-videos-Synthetic"
    real.mkdir(parents=True)
    synthetic.mkdir(parents=True)
    for video in ("00000001", "00000002", "00000006", "00000007", "00000008", "00000009", "00000010"):
        write_video(real / f"{video}.mp4", seconds=2.0)
    write_video(synthetic / "sa00003.mp4", seconds=2.0)
    (real / "00000004.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    train = [
        question("00000001", 1, "Audio", "Counting", "How many instruments are sounding in the video?", [], "two"),
        {**question("00000001", 2, "Audio", "Comparative", "Is the <Object> on the <LR> louder than the <Object> "
                    "on the <LR>?", [], "yes"), "templ_values": "['piano', 'left', 'violin', 'right']"},
        question("00000004", 3, "Visual", "Counting", "How many instruments are in the video?", [], "one"),
        question("00000005", 4, "Visual", "Counting", "How many <Object> are in the video?", ["cello"], "one"),
        {**question("00000006", 5, "Audio", "Counting", "How many sounding instruments?", [], "one"),
         "type": '["Audio", "Counting"'},
        question("00000006", 6, "Visual", "Location", "Where is the <Object>?", ["cello"], "right"),
        # more train videos: a fit of 3 steps of 2 clips stays within one epoch (one validation)
        *(question(f"0000000{v}", 30 + v, "Audio-Visual", "Existential", "Is this sound from the instrument in "
                   "the video?", [], "no") for v in (7, 8, 9)),
        question("00000010", 40, "Visual", "Counting", "How many instruments are in the video?", [], "three"),
    ]
    val = [
        question("00000002", 10, "Audio-Visual", "Existential", "Is this sound from the instrument in the video?", [],
                 "yes"),
        question("00000002", 11, "Audio-Visual", "Temporal", "Where is the <FL> sounding instrument?", ["first"],
                 "left"),
        question("00000002", 12, "Audio-Visual", "Location", "Where is the sounding instrument?", [], "middle",
                 question_deleted=1),
    ]
    test = [
        question("sa00003", 20, "Audio-Visual", "Counting", "How many <Object> are sounding?", ["violin"],
                 "more than ten"),
        question("sa00003", 21, "Visual", "Counting", "How many <Object> are in the video?", ["acoustic_guitar"],
                 "two"),
        question("00000001", 22, "Audio", "Counting", "How many instruments are sounding?", [], "maybe"),
    ]
    update = src / "data" / "json_update"
    update.mkdir(parents=True)
    for split, entries in (("train", train), ("val", val), ("test", test)):
        (update / f"avqa-{split}.json").write_text(json.dumps(entries))
    (src / "data" / "json").mkdir()
    (src / "data" / "json" / "avqa-train.json").write_text("stale, not read")  # json_update/ comes first
    return src


@pytest.fixture(scope="module")
def converted(avqa_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("converted") / "out"
    return out, run_convert("music-avqa", avqa_tree, out)


def test_question_slots_and_types_follow_the_dataset():
    assert fill_question("Is the <Object> on the <LR> louder than the <Object> on the <LRer>?",
                         '["piano", "left", "violin", "right"]') == \
        "Is the piano on the left louder than the violin on the right?"
    assert fill_question("How many instruments are sounding in the video?", "[]") == \
        "How many instruments are sounding in the video?"
    with pytest.raises(ValueError, match="1 slot"):
        fill_question("Where is the <Object>?", "[]")
    assert question_type('["Audio-Visual", "Temporal"]') == "Audio-Visual/Temporal"
    assert question_type("['Visual', 'Location']") == "Visual/Location"  # the official loader's literal_eval
    with pytest.raises(ValueError, match="question types"):
        question_type('["Visual", "Temporal"]')
    # every MUSIC-AVQA type is one of the avqa task's types, in the paper's modality group
    groups = {t: m for m, types in MUSIC_AVQA_GROUPS.items() for t in types}
    from avmt.data.converters.music_avqa import QUESTION_TYPES
    assert sorted(groups) == sorted(real_question_type(f"{m}/{k}") for m, k in QUESTION_TYPES)
    assert get_converter("music-avqa").media_defaults == {"num_segments": 10, "segment_seconds": 6.0,
                                                          "audio_window_seconds": 2.0}


def test_manifest_counts_and_names_every_skipped_entry(converted):
    out, manifest = converted
    assert manifest["format"] == "avmt-converted" and manifest["source_format"] == "music-avqa"
    assert {split: info["clips"] for split, info in manifest["splits"].items()} == {"train": 6, "val": 2, "test": 2}
    assert {split: info["skipped"] for split, info in manifest["splits"].items()} == {"train": 3, "val": 1, "test": 1}
    assert manifest["tasks"] == {"avqa": 10} and manifest["media"]["audio_window_seconds"] == 2.0
    skipped = {s["key"]: s for s in manifest["skipped"]}
    assert set(skipped) == {"00000004", "00000005", "avqa-train.json:5", "avqa-val.json:12", "avqa-test.json:22"}
    assert skipped["00000004"]["file"] == "data/video/MUSIC-AVQA-videos-Real/00000004.mp4"
    assert "corrupt" in skipped["00000004"]["reason"]
    assert skipped["00000005"]["reason"] == "cannot open: no such file"
    assert skipped["avqa-train.json:5"]["file"] == "data/json_update/avqa-train.json"
    assert "not a stringified list" in skipped["avqa-train.json:5"]["reason"]
    assert "withdrawn" in skipped["avqa-val.json:12"]["reason"]
    assert "'maybe' is not one of MUSIC-AVQA's 42 answers" in skipped["avqa-test.json:22"]["reason"]
    assert {"piano", "louder", "acoustic", "guitar", "first", "Visual", "Location"} <= set(manifest["words"])


def test_train_clips_hold_a_video_s_questions_and_the_task_picks_one(converted):
    out, _ = converted
    clips = {clip.key: clip for clip in read_split(out, "train")}
    assert set(clips) == {"00000001", "00000006", "00000007", "00000008", "00000009", "00000010"}
    clip = clips["00000001"]
    assert tuple(clip.frames.shape) == (4, 3, 32, 32) and tuple(clip.audio.shape) == (32000,)
    assert clip.audio.abs().max() > 0.01  # the fixture's tone came through
    assert clip.scene["answers"]["avqa"] == {"questions": [
        {"question_id": 1, "question": "How many instruments are sounding in the video?", "answer": "two",
         "type": "Audio/Counting"},
        {"question_id": 2, "question": "Is the piano on the left louder than the violin on the right?",
         "answer": "yes", "type": "Audio/Comparative"},
    ]}
    task = get_task("avqa", reasoning=False)
    built = {task.build(clip, random.Random(seed)).answer["question_id"] for seed in range(12)}
    assert built == {1, 2}  # the rng picks one of the clip's questions per epoch
    sample = task.build(clips["00000006"], random.Random(0))
    assert sample.prompt == "<video> <audio> Where is the cello?"
    assert sample.target == "<answer> right </answer>"
    assert sample.answer == {"answer": "right", "type": "visual_location", "question_id": 6}
    reasoned = get_task("avqa").build(clips["00000006"], random.Random(0))
    assert reasoned.target == "So the answer is <answer> right </answer>."  # AVSynth's conclusion, no reasoning
    assert task.parse(sample.target) == task.answer_to_pred(sample.answer)
    assert not get_task("ave").applies(clip)  # a task without an answer in the annotation is not built


def test_evaluation_scores_every_val_and_test_question_once(converted):
    out, _ = converted
    val = {clip.key: clip for clip in read_split(out, "val")}
    assert set(val) == {"00000002-10", "00000002-11"}  # one clip per (video, question): the media twice
    assert [q["question_id"] for q in val["00000002-11"].scene["answers"]["avqa"]["questions"]] == [11]
    assert torch.equal(val["00000002-10"].frames, val["00000002-11"].frames)  # decoded once, written twice
    for split, expected in (("val", [10, 11]), ("test", [20, 21])):
        stream = ClipTaskStream(list_shards(out / split), ["avqa"], reasoning=False, seed=0, shuffle=False)
        samples = [sample for group in stream for sample in group.samples]
        assert sorted(s.answer["question_id"] for s in samples) == expected
    test = {s.answer["question_id"]: s for s in samples}
    assert test[20].prompt == "<video> <audio> How many violin are sounding?"
    assert test[20].target == "<answer> more than ten </answer>"
    assert test[20].answer["type"] == "audio_visual_counting"
    task = get_task("avqa")
    metrics = task.metrics()
    metrics.update([task.parse(test[20].target), "one"], [test[20].answer, test[21].answer])
    scores = {key: float(value) for key, value in metrics.compute().items()}
    assert scores["accuracy"] == 0.5 and scores["accuracy/audio_visual"] == 1.0 and scores["accuracy/visual"] == 0.0
    baseline = task.trivial_baseline([test[20].answer, test[21].answer])  # the question-type prior
    assert baseline["accuracy"] == 1.0 and set(baseline) == set(scores)


def test_missing_or_unreadable_question_files_are_user_errors(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_convert("music-avqa", tmp_path, tmp_path / "out")
    assert exit_info.value.code == 2
    (tmp_path / "avqa-val.json").write_text('{"not": "a list"}')
    media = MediaConfig(num_segments=4, segment_seconds=0.5, image_size=32)
    with pytest.raises(ConvertError, match="avqa-val.json' holds a dict"):
        convert(get_converter("music-avqa"), tmp_path, tmp_path / "out", media, progress=False)


def test_a_fit_trains_on_the_converted_shards(converted, tmp_path):
    out, _ = converted
    checkpoint = fit_steps(out, ["avqa"], tmp_path / "work", steps=3)
    assert checkpoint["global_step"] == 3
