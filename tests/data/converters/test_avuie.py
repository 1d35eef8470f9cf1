"""``data convert avuie``: Crab's AV-UIE instruction JSON (Crab+'s ``AVUIE_2/{task}/{split}.json``
layout, Crab's absolute data-root paths, conversations and Crab's media tokens) -> one clip per
instruction sample, the ``instruct`` task training on the answers as they are."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from PIL import Image

from avmt.data.converters import ConvertError, get_converter
from avmt.data.media import MediaConfig
from avmt.data.sample import MediaRef
from avmt.tasks import all_words, get_task
from avmt.tasks.text import text_words
from tests.data.converters.common import convert as run_convert
from tests.data.converters.common import fit_steps, read_split
from tests.data.test_media import write_audio, write_video

AVE_ANSWER = ("A bell hangs in a tower and rings from the start. So the audible and visible event is "
              "<event> Church bell </event>, and the time range is <range> 0,1 </range>.")
AVQA_ANSWER = "Two people play: a man plays the piano and a woman the violin. So the answer is <answer> two </answer>."
ARIG_ANSWER = "The sounding object is dog. Its coordinate of top left corner is (3,4) and bottom right corner is (20,30)"
AVVP_ANSWER = ("A man cuts a tree with a chainsaw. Therefore, visual and audio events are: "
               "<visual>Chainsaw,(0 2)</visual> and <audio>Chainsaw,(0 2)</audio>")
CAPTION = "A man is playing the guitar on a stage while people clap."
ROOT = "/group/40061/cserdu/data"  # the data root Crab's own JSON files hold


def _json(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(value, indent=1))


@pytest.fixture(scope="module")
def avuie_tree(tmp_path_factory):
    src = tmp_path_factory.mktemp("AVUIE")
    ave, avqa, arig = src / "AVUIE_2" / "ave", src / "AVUIE_2" / "avqa", src / "AVUIE_2" / "arig"
    for folder in (ave / "video", ave / "audio", avqa / "video", avqa / "audio", arig / "v1s" / "abc" / "frames",
                   src / "avvp" / "llp_videos", src / "avvp" / "audio_data", src / "valor" / "video_data"):
        folder.mkdir(parents=True)
    write_video(ave / "video" / "vidA.mp4", seconds=2.0)
    write_audio(ave / "audio" / "vidA.mp3", "libmp3lame", seconds=2.0)
    write_video(avqa / "video" / "00007.mp4", seconds=2.0)
    write_audio(avqa / "audio" / "00007.wav", "pcm_s16le", seconds=2.0)
    pixels = np.zeros((48, 64, 3), dtype=np.uint8)
    pixels[:, :32, 2] = 200
    Image.fromarray(pixels).save(arig / "v1s" / "abc" / "frames" / "1.jpg")
    write_audio(arig / "v1s" / "abc" / "audio.wav", "pcm_s16le", seconds=2.0)
    write_video(src / "avvp" / "llp_videos" / "vidB.mp4", seconds=2.0)
    write_audio(src / "avvp" / "audio_data" / "vidB.mp3", "libmp3lame", seconds=2.0)
    write_video(src / "valor" / "video_data" / "vidC.mp4", seconds=2.0)
    # Crab+: per-task lists, file names relative to the task's video/ and audio/ folders
    _json(ave / "train.json", [
        {"vid": "vidA", "event": "Church bell", "start_time": 0, "end_time": 1, "video_path": "vidA.mp4",
         "audio_path": "vidA.mp3", "label_content": AVE_ANSWER},
        {"vid": "gone", "event": "Bark", "start_time": 0, "end_time": 2, "video_path": "gone.mp4",
         "audio_path": "vidA.mp3", "label_content": "So the event is <event> Bark </event> <range> 0,2 </range>."},
    ])
    _json(avqa / "test.json", [
        {"video_id": "00007", "question_id": 7, "type": "[\"Audio\", \"Counting\"]",
         "question": "How many instruments are sounding?", "answer": "two", "label": AVQA_ANSWER,
         "video_path": "00007.mp4", "audio_path": "00007.wav"},
    ])
    _json(arig / "train.json", [
        {"image_path": "v1s/abc/frames/1.jpg", "audio_path": "v1s/abc/audio.wav", "a_obj": "dog",
         "label_content": ARIG_ANSWER},
    ])
    _json(src / "AVUIE_2" / "a2v" / "train.json", [
        {"video1_path": "x.mp4", "video2_path": "y.mp4", "audio_path": "z.mp3", "label": "<answer> 1 </answer>"},
    ])
    # Crab's own samples: absolute paths under its data root, a conversation, Crab's media tokens
    _json(src / "crab" / "avvp_conv.json", [{
        "conv": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": [
                {"type": "text", "text": "These are a video and an audio:"},
                {"type": "video", "video": f"{ROOT}/avvp/llp_videos/vidB.mp4"},
                {"type": "audio", "audio": f"{ROOT}/avvp/audio_data/vidB.mp3"},
                {"type": "text", "text": "Please determine the events and their start and end times."}]},
            {"role": "assistant", "content": AVVP_ANSWER}],
        "metadata": {"task_name": "avvp"}}])
    _json(src / "crab" / "valor_data" / "valid_train_samples.json", [{
        "task": "avcap", "video_path": f"{ROOT}/valor/video_data/vidC.mp4",
        "instruction": "This is a video:\n<video_start><video><video_end>\nPlease describe this video.",
        "output": CAPTION}])
    _json(src / "label2idx.json", {"dog": 1})  # not an instruction list
    return src


@pytest.fixture(scope="module")
def converted(avuie_tree, tmp_path_factory):
    out = tmp_path_factory.mktemp("avuie_out")
    return out, run_convert("avuie", avuie_tree, out)


def test_manifest_counts_and_names_every_skipped_entry(converted):
    _, manifest = converted
    assert manifest["source_format"] == "avuie" and manifest["tasks"] == {"instruct": 5}
    assert {split: info["clips"] for split, info in manifest["splits"].items()} == {"train": 4, "test": 1}
    assert manifest["splits"]["train"]["skipped"] == 2
    skipped = {s["key"]: s for s in manifest["skipped"]}
    assert skipped["AVUIE_2_ave_train-000001"]["file"] == "AVUIE_2/ave/video/gone.mp4"
    assert "video file 'gone.mp4' not found" in skipped["AVUIE_2_ave_train-000001"]["reason"]
    assert "video1_path, video2_path" in skipped["AVUIE_2_a2v_train-000000"]["reason"]
    assert skipped["label2idx.json"]["reason"].startswith("not a list")
    # the instructions' and the answers' words are in the vocabulary the tiny LLM reads
    assert {"describe", "determine", "instruments", "Chainsaw", "<visual>", "<audio_event>", "<answer>", "<video>",
            "coordinate"} <= set(manifest["words"])


def test_clips_carry_the_instruction_and_the_answer_as_it_is(converted):
    out, _ = converted
    clips = {clip.key: clip for clip in read_split(out, "train")}
    assert set(clips) == {"AVUIE_2_ave_train-000000", "AVUIE_2_arig_train-000000", "crab_avvp_conv-000000",
                          "crab_valor_data_valid_train_samples-000000"}
    ave = clips["AVUIE_2_ave_train-000000"].scene["answers"]["instruct"]
    assert ave == {"instruction": "This is a video and an audio: <video> <audio> Please describe the events and time "
                                  "range that occurred in the video.", "answer": AVE_ANSWER, "task": "ave"}
    avvp = clips["crab_avvp_conv-000000"]
    assert avvp.scene["answers"]["instruct"] == {
        "instruction": "These are a video and an audio: <video> <audio> Please determine the events and their start "
                       "and end times.",
        "answer": AVVP_ANSWER.replace("<audio>", "<audio_event>").replace("</audio>", "</audio_event>"),
        "task": "avvp"}
    assert avvp.audio.abs().max() > 0.01  # the data root's prefix was stripped: its media were found
    caption = clips["crab_valor_data_valid_train_samples-000000"]
    assert caption.scene["answers"]["instruct"]["instruction"] == "This is a video: <video> Please describe this video."
    arig = clips["AVUIE_2_arig_train-000000"]
    assert tuple(arig.frames.shape) == (4, 3, 32, 32)  # the image on every frame (up to the JPEG's rounding)
    blue = arig.frames[:, 2].float().mean(dim=(1, 2))
    assert float(blue.max() - blue.min()) < 5 and float(blue.min()) > 50
    (avqa,) = read_split(out, "test")
    assert avqa.scene["answers"]["instruct"]["instruction"].endswith("Please answer this question: How many "
                                                                     "instruments are sounding?")


def test_instruct_samples_train_on_the_answers_as_they_are(converted):
    out, _ = converted
    clips = {clip.key: clip for clip in read_split(out, "train")}
    task, bare = get_task("instruct"), get_task("instruct", reasoning=False)
    arig = clips["AVUIE_2_arig_train-000000"]
    sample = task.build(arig, random.Random(0))
    assert sample.prompt == ("This is an image and an audio: <image> <audio> Please recognize the category of object "
                             "that makes the sound and then output its bounding box.")
    assert sample.media == (MediaRef("<image>", segment=0), MediaRef("<audio>"))
    assert sample.target == bare.build(arig, random.Random(0)).target == ARIG_ANSWER
    caption = task.build(clips["crab_valor_data_valid_train_samples-000000"], random.Random(0))
    assert caption.media == (MediaRef("<video>"),) and caption.target == CAPTION
    ave = task.build(clips["AVUIE_2_ave_train-000000"], random.Random(0))
    assert task.parse(ave.target) == {"tags": [["event", "church bell"], ["range", "0,1"]]}
    assert not get_task("ave").applies(clips["AVUIE_2_ave_train-000000"])  # answers only for instruct


def test_the_vocabulary_spells_every_sample(converted):
    """The tiny LLM's words (the tasks' and the manifest's) hold every word of every instruction and answer."""
    out, manifest = converted
    vocabulary = set(all_words()) | set(manifest["words"])
    for split in manifest["splits"]:
        for clip in read_split(out, split):
            sample = get_task("instruct").build(clip, random.Random(0))
            assert text_words(sample.prompt) | text_words(sample.target) <= vocabulary, clip.key


def test_the_instructions_crab_plus_builds_per_task(tmp_path):
    """Listing only (no decoding): Crab+'s ref_avs and avqa_thu instructions are filled from the
    sample's fields; a task without an instruction of its own, a sample without an answer and a path
    climbing out of --src are skipped, named."""
    folder = tmp_path / "AVUIE_2" / "ref_avs"
    (folder / "v2" / "u1" / "frames").mkdir(parents=True)
    for name in ("v2/u1/frames/7.jpg", "v2/u1/audio.wav"):
        (folder / name).write_bytes(b"")
    image = {"image_path": "v2/u1/frames/7.jpg", "audio_path": "v2/u1/audio.wav"}
    _json(folder / "test.json", [
        {**image, "description": "The Sounding  Piano", "output": "true. The object is a piano."},
        {**image, "task": "mystery", "output": "x"},
        {**image, "description": "a dog"},
        {**image, "audio_path": "../../outside.wav", "description": "a dog", "output": "false"},
    ])
    items = list(get_converter("avuie").items(tmp_path, MediaConfig(num_segments=2)))
    clip, *skips = items
    assert clip.split == "test" and clip.frames == [folder / "v2/u1/frames/7.jpg"] * 2
    assert clip.audio == folder / "v2/u1/audio.wav" and clip.video is None
    assert clip.answers["instruct"]["instruction"] == (
        "This is an image and an audio: <image> <audio> Please analyze the video frame and audio to find the "
        "object described as <des> the sounding piano </des>. Answer with \"true\" or \"false\" whether the "
        "object exists. If it exists, respond with a sentence identifying the object's name, its bounding box, "
        "and three pixel points; if not, state that the object is absent.")
    reasons = [skip.reason for skip in skips]
    assert "task 'mystery' is not one whose instruction Crab+ builds" in reasons[0]
    assert "no answer text" in reasons[1] and "climbs out of --src" in reasons[2]


def test_missing_instruction_files_are_a_user_error(tmp_path):
    with pytest.raises(ConvertError, match="no \\*.json instruction file"):
        list(get_converter("avuie").items(tmp_path, MediaConfig()))
    (tmp_path / "train.json").write_text("[{broken")
    with pytest.raises(ConvertError, match="train.json"):
        list(get_converter("avuie").items(tmp_path, MediaConfig()))


def test_a_fit_trains_on_the_converted_shards(converted, tmp_path):
    out, _ = converted
    checkpoint = fit_steps(out, ["instruct"], tmp_path / "work", splits={"val": "test", "test": "test"}, steps=3)
    assert checkpoint["global_step"] == 3
