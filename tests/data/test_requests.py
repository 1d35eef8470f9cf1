"""``predict`` on files: request files are read and checked, and their media decoded into clips."""

from __future__ import annotations

import json

import pytest

from avmt.data.media import MediaConfig
from avmt.data.requests import INSTRUCTION, RequestDataset, load_requests
from tests.data.test_media import write_audio, write_video

CONFIG = MediaConfig(num_segments=4, image_size=32, sample_rate=16000, missing_audio="silence")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("requests")
    write_video(folder / "clip.mp4", seconds=3.0)
    write_audio(folder / "tone.wav", "pcm_s16le", seconds=2.0)
    return folder


def write(folder, entries, jsonl=True):
    path = folder / ("requests.jsonl" if jsonl else "requests.json")
    path.write_text("\n".join(json.dumps(e) for e in entries) if jsonl else json.dumps(entries))
    return path


def test_requests_become_clips_with_the_task_prompt_or_the_instruction(files):
    path = write(files, [
        {"id": "a", "task": "ave", "video": "clip.mp4"},
        {"instruction": "What do you hear?", "audio": "tone.wav", "start": 0.5},
        {"task": "ref_avs", "video": "clip.mp4", "audio": "tone.wav", "expression": "the red square"},
    ])
    requests = load_requests(path)
    assert [r.id for r in requests] == ["a", "1", "2"] and requests[1].task == INSTRUCTION
    groups = list(RequestDataset(requests, CONFIG))
    ave, instruction, ref = (g.samples[0] for g in groups)
    assert ave.prompt.startswith("<video> <audio> ") and ave.answer is None
    assert instruction.prompt == "<audio> What do you hear?"
    assert "the red square" in ref.prompt
    for group in groups:
        clip = group.clips[0]
        assert tuple(clip.frames.shape) == (4, 3, 32, 32) and tuple(clip.audio.shape) == (4 * 16000,)
    assert float(groups[1].clips[0].audio.abs().max()) > 0.01  # the tone, from 0.5 s on
    assert load_requests(write(files, [{"task": "ave", "video": "clip.mp4"}], jsonl=False))[0].task == "ave"


@pytest.mark.parametrize("entry, message", [
    ({"task": "ave", "instruction": "x", "video": "clip.mp4"}, "exactly one of 'task' and 'instruction'"),
    ({"task": "nope", "video": "clip.mp4"}, "unknown task 'nope'"),
    ({"task": "ave"}, "name a 'video'"),
    ({"task": "ref_avs", "video": "clip.mp4"}, "add the key(s)"),
    ({"task": "a2v", "video": "clip.mp4"}, "compares 4 clips"),
    ("just text", "expected an object"),
])
def test_bad_requests_name_the_file_the_request_and_the_problem(files, entry, message):
    with pytest.raises(ValueError, match="request 0") as error:
        load_requests(write(files, [entry]))
    assert message in str(error.value)


def test_missing_media_and_undecodable_media(files):
    with pytest.raises(FileNotFoundError, match="missing.mp4"):
        load_requests(write(files, [{"task": "ave", "video": "missing.mp4"}]))
    (files / "broken.mp4").write_text("not a video")
    requests = load_requests(write(files, [{"id": "bad", "task": "ave", "video": "broken.mp4"}]))
    with pytest.raises(ValueError, match="request 'bad'.*broken.mp4"):
        list(RequestDataset(requests, CONFIG))
    audio_only = load_requests(write(files, [{"task": "ave", "audio": "tone.wav"}]))
    with pytest.raises(ValueError, match=r"needs \['<video>'\]"):
        list(RequestDataset(audio_only, CONFIG))
