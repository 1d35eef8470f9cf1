"""``data convert llp``: LLP's weak lists, dense eval files and videos -> shards for ``avvp_weak`` and ``avvp``."""

from __future__ import annotations

import json
import random

import pytest

from avmt.data.converters import ConvertError, get_converter
from avmt.data.converters.base import Skip, SourceClip
from avmt.data.media import MediaConfig
from avmt.tasks import get_task
from tests.data.converters.common import convert as run_convert
from tests.data.converters.common import fit_steps, read_split
from tests.data.test_media import write_video

WEAK = "filename\tevent_labels\n"
DENSE = "filename\tonset\toffset\tevent_labels\n"
#: The fixture's media (tests/data/converters/common.py MEDIA_ARGS): 4 segments of 0.5 s.
MEDIA = MediaConfig(num_segments=4, segment_seconds=0.5, image_size=32)


def write_lines(path, header, rows):
    path.write_text(header + "".join("\t".join(map(str, row)) + "\n" for row in rows))


@pytest.fixture(scope="module")
def llp_tree(tmp_path_factory):
    """The official repository's layout (the csvs and LLP_dataset/ under data/): YouTube ids with
    '_' and '-', one video saved under the download script's 11-character name, one corrupt
    video, one unknown class in the train list and one in the visual eval file, one val video
    without dense rows."""
    repo = tmp_path_factory.mktemp("AVVP-ECCV20")
    data = repo / "data"
    videos = data / "LLP_dataset" / "video"
    videos.mkdir(parents=True)
    for name in ("a_B-c_9xYz_30_40", "v-al_One_20_30", "valNoDense_0_10", "t_E-st_Two_0_10", "badDense_5_15"):
        write_video(videos / f"{name}.mp4", seconds=2.0)
    write_video(videos / "K1nl3lRbDHg.mp4", seconds=2.0)  # the download script's name for K1nl3lRbDHg_40_50
    (videos / "corrupt_vid_10_20.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    write_lines(data / "AVVP_train.csv", WEAK, [
        ("a_B-c_9xYz_30_40", "Speech,Frying_(food)"),
        ("K1nl3lRbDHg_40_50", "Dog"),
        ("corrupt_vid_10_20", "Cat"),
        ("unknownCls_0_10", "Speech,Whistling"),  # line 5
    ])
    write_lines(data / "AVVP_val_pd.csv", WEAK, [("v-al_One_20_30", "Dog,Speech"), ("valNoDense_0_10", "Cat")])
    write_lines(data / "AVVP_test_pd.csv", WEAK, [("t_E-st_Two_0_10", "Baby_cry_infant_cry,Frying_(food)"),
                                                  ("badDense_5_15", "Dog")])
    write_lines(data / "AVVP_eval_audio.csv", DENSE, [
        ("v-al_One_20_30", 0, 1, "Dog"),
        ("v-al_One_20_30", 1, 2, "Dog"),  # touches the first Dog event: merged
        ("v-al_One_20_30", 1, 2, "Speech"),
        ("v-al_One_20_30", 5, 10, "Speech"),  # beyond the 2 s the fixture's clips are cut to: dropped
        ("v-al_One_20_30", 1, 1, "Speech"),  # zero length (LLP has such rows): marks nothing
        ("t_E-st_Two_0_10", 0, 2, "Frying_(food)"),
        ("badDense_5_15", 0, 1, "Dog"),
    ])
    write_lines(data / "AVVP_eval_visual.csv", DENSE, [
        ("v-al_One_20_30", 0, 1, "Dog"),
        ("t_E-st_Two_0_10", 1, 2, "Baby_cry_infant_cry"),
        ("t_E-st_Two_0_10", 0, 1, "Frying_(food)"),
        ("badDense_5_15", 0, 2, "Dog"),
        ("badDense_5_15", 1, 2, "Barking"),  # line 6: not an LLP class
    ])
    return repo


@pytest.fixture(scope="module")
def converted(llp_tree, tmp_path_factory):
    """One conversion of the fixture for the whole module: (output folder, manifest)."""
    out = tmp_path_factory.mktemp("llp_out") / "out"
    return out, run_convert("llp", llp_tree, out)


def test_manifest_counts_and_names_every_skipped_entry(converted):
    _, manifest = converted
    assert manifest["source_format"] == "llp" and manifest["source"].startswith("AVVP-ECCV20")
    assert {split: info["clips"] for split, info in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert {split: info["skipped"] for split, info in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert manifest["tasks"] == {"avvp": 2, "avvp_weak": 4}
    skipped = {s["key"]: s for s in manifest["skipped"]}
    assert set(skipped) == {"corrupt_vid_10_20", "unknownCls_0_10", "valNoDense_0_10", "badDense_5_15"}
    assert skipped["corrupt_vid_10_20"]["file"] == "data/LLP_dataset/video/corrupt_vid_10_20.mp4"
    assert "corrupt" in skipped["corrupt_vid_10_20"]["reason"]
    unknown = skipped["unknownCls_0_10"]
    assert unknown["file"] == "data/AVVP_train.csv" and unknown["split"] == "train"
    assert "line 5" in unknown["reason"] and "'Whistling'" in unknown["reason"]
    dense = skipped["badDense_5_15"]
    assert dense["file"] == "data/AVVP_eval_visual.csv" and dense["split"] == "test"
    assert "AVVP_eval_visual.csv line 6" in dense["reason"] and "'Barking'" in dense["reason"]
    no_dense = skipped["valNoDense_0_10"]
    assert no_dense["file"] == "data/AVVP_val_pd.csv"
    assert "no row in AVVP_eval_audio.csv or AVVP_eval_visual.csv" in no_dense["reason"]
    assert {"Frying", "food", "Speech", "Baby", "cry", "infant"} <= set(manifest["words"])


def test_val_clip_carries_the_dense_answer_in_segments(converted):
    out, _ = converted
    (clip,) = read_split(out, "val")
    assert clip.key == "v-al_One_20_30" and tuple(clip.frames.shape) == (4, 3, 32, 32)
    # 0.5 s segments: Dog 0-1 s -> [0, 2), 1-2 s -> [2, 4), merged [0, 4); Speech 1-2 s -> [2, 4);
    # Speech 5-10 s lies beyond the 2 s clip and the zero-length row marks nothing. Classes by onset.
    assert clip.scene["answers"] == {
        "avvp": {"audio": {"Dog": [[0, 4]], "Speech": [[2, 4]]}, "visual": {"Dog": [[0, 2]]}},
        "avvp_weak": {"events": ["Dog", "Speech"]},
    }
    task = get_task("avvp", reasoning=False)
    sample = task.build(clip, random.Random(0))
    assert sample.target == ("<audio_event> Dog,(0 4) Speech,(2 4) </audio_event> "
                             "<visual_event> Dog,(0 2) </visual_event>")
    assert sample.answer == {"audio": {"Dog": [[0, 4]], "Speech": [[2, 4]]}, "visual": {"Dog": [[0, 2]]},
                             "num_segments": 4}
    assert task.parse(sample.target) == task.answer_to_pred(sample.answer)
    reasoning = get_task("avvp", reasoning=True).build(clip, random.Random(0))
    assert reasoning.target == ("So the audio events are <audio_event> Dog,(0 4) Speech,(2 4) </audio_event> and the "
                                "visual events are <visual_event> Dog,(0 2) </visual_event>.")  # no reasoning sentences
    scores = task.metrics()
    scores.update([task.parse(sample.target)], [sample.answer])
    assert float(scores.compute()["segment_f1/audio_visual"]) == 1.0


def test_test_clip_names_with_parentheses_round_trip(converted):
    out, _ = converted
    (clip,) = read_split(out, "test")
    assert clip.scene["answers"]["avvp"] == {"audio": {"Frying_(food)": [[0, 4]]},
                                             "visual": {"Frying_(food)": [[0, 2]], "Baby_cry_infant_cry": [[2, 4]]}}
    for name in ("avvp", "avvp_weak"):
        task = get_task(name, reasoning=False)
        sample = task.build(clip, random.Random(1))
        assert task.parse(sample.target) == task.answer_to_pred(sample.answer), sample.target
    weak = get_task("avvp_weak", reasoning=False).build(clip, random.Random(1))
    assert weak.target == "<event> Baby_cry_infant_cry </event> <event> Frying_(food) </event>"


def test_train_clips_carry_only_the_weak_label(converted):
    out, _ = converted
    clips = {clip.key: clip for clip in read_split(out, "train")}
    assert set(clips) == {"a_B-c_9xYz_30_40", "K1nl3lRbDHg_40_50"}  # the second read from K1nl3lRbDHg.mp4
    assert clips["a_B-c_9xYz_30_40"].scene["answers"] == {"avvp_weak": {"events": ["Speech", "Frying_(food)"]}}
    assert clips["K1nl3lRbDHg_40_50"].audio.abs().max() > 0.01  # the fixture's tone came through
    clip = clips["a_B-c_9xYz_30_40"]
    assert not get_task("avvp").applies(clip)  # no ranges are made up from weak labels
    task = get_task("avvp_weak", reasoning=True)
    assert task.applies(clip)
    sample = task.build(clip, random.Random(0))
    assert sample.target == "So the events in this clip are <event> Frying_(food) </event> <event> Speech </event>."
    assert task.parse(sample.target) == task.answer_to_pred(sample.answer) == ["Frying_(food)", "Speech"]


def test_the_data_folder_itself_is_a_source_and_missing_files_are_user_errors(llp_tree, tmp_path):
    converter = get_converter("llp")
    entries = list(converter.items(llp_tree / "data", MEDIA))
    # the corrupt video is a clip until it is decoded; the three annotation problems are skips already
    assert sum(isinstance(e, SourceClip) for e in entries) == 5 and sum(isinstance(e, Skip) for e in entries) == 3
    # a val list without the dense eval files cannot be scored: the missing file is named
    (tmp_path / "AVVP_val_pd.csv").write_text(WEAK + "v-al_One_20_30\tDog\n")
    (tmp_path / "AVVP_eval_audio.csv").write_text(DENSE)
    with pytest.raises(ConvertError, match="AVVP_eval_visual.csv' is missing"):
        list(converter.items(tmp_path, MEDIA))
    # a comma-separated file is not the LLP layout
    (tmp_path / "AVVP_eval_visual.csv").write_text("filename,onset,offset,event_labels\n")
    with pytest.raises(ConvertError, match="AVVP_eval_visual.csv' has the header"):
        list(converter.items(tmp_path, MEDIA))
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as exit_info:  # no list at all: the CLI says so and exits 2
        run_convert("llp", tmp_path / "empty", tmp_path / "out")
    assert exit_info.value.code == 2


def test_a_fit_trains_the_weak_task_and_validates_both(converted, tmp_path):
    out, _ = converted
    checkpoint = fit_steps(out, ["avvp_weak", "avvp"], tmp_path / "work", steps=3)
    assert checkpoint["global_step"] == 3
    # trained on the weak train labels; the val clip is scored by both tasks, each next to its baseline
    final = json.loads(next((tmp_path / "work").rglob("val_metrics.json")).read_text())
    assert {name: entry["samples"] for name, entry in final.items()} == {"avvp_weak": 1, "avvp": 1}
    assert "sample_f1" in final["avvp_weak"]["scores"] and "segment_f1/type_av" in final["avvp"]["scores"]
