"""``data convert ave``: AVE's annotation files and videos -> shards the ``ave`` task trains on."""

from __future__ import annotations

import json
import random

import pytest

from avmt.data.converters import ConvertError, convert, get_converter
from avmt.data.converters import base as converter_base
from avmt.data.media import MediaConfig
from avmt.tasks import get_task
from tests.data.converters.common import convert as run_convert
from tests.data.converters.common import fit_steps, read_split
from tests.data.test_media import write_video

HEADER = "Category&VideoID&Quality&StartTime&EndTime\n"


@pytest.fixture(scope="module")
def ave_tree(tmp_path_factory):
    """AVE's layout: split lists + AVE/{id}.mp4; one corrupt video, one missing, one bad line."""
    src = tmp_path_factory.mktemp("AVE_Dataset")
    (src / "AVE").mkdir()
    for video in ("vidA", "vid-B_2", "vidC", "vidD"):
        write_video(src / "AVE" / f"{video}.mp4", seconds=2.0)
    (src / "AVE" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42 truncated")
    (src / "Annotations.txt").write_text(HEADER + "Church bell&vidA&good&0&1\n")
    (src / "trainSet.txt").write_text(
        HEADER
        + "Church bell&vidA&good&0&1\n"
        + "Frying (food)&vidC&good&1&2\n"
        + "Male speech, man speaking&broken&good&0&2\n"
        + "Dog&missing&good&0&1\n"
        + "not an annotation line\n"
    )
    (src / "valSet.txt").write_text(HEADER + "Church bell&vidD&bad&0&2\n")
    (src / "testSet.txt").write_text(HEADER + "Church bell&vid-B_2&good&1&2\n")
    return src


def test_manifest_counts_and_names_every_skipped_entry(ave_tree, tmp_path):
    manifest = run_convert("ave", ave_tree, tmp_path / "out")
    assert manifest["format"] == "avmt-converted" and manifest["source_format"] == "ave"
    assert {split: info["clips"] for split, info in manifest["splits"].items()} == {"train": 2, "val": 1, "test": 1}
    assert manifest["splits"]["train"]["skipped"] == 3 and manifest["tasks"] == {"ave": 4}
    skipped = {s["key"]: s for s in manifest["skipped"]}
    assert skipped["broken"]["file"] == "AVE/broken.mp4" and "corrupt" in skipped["broken"]["reason"]
    assert str(ave_tree) not in json.dumps(manifest)  # no absolute path in the manifest
    assert skipped["missing"]["reason"] == "cannot open: no such file"
    assert skipped["trainSet.txt:6"]["file"] == "trainSet.txt" and "expected 5" in skipped["trainSet.txt:6"]["reason"]
    assert {"Church", "bell", "Frying", "food"} <= set(manifest["words"])


def test_clips_carry_the_answer_in_segments_and_build_ave_samples(ave_tree, tmp_path):
    out = tmp_path / "out"
    run_convert("ave", ave_tree, out, "--frames_format", "png")
    clips = {clip.key: clip for clip in read_split(out, "train")}
    assert set(clips) == {"vidA", "vidC"}
    clip = clips["vidC"]
    assert tuple(clip.frames.shape) == (4, 3, 32, 32) and tuple(clip.audio.shape) == (32000,) and clip.masks is None
    assert clip.audio.abs().max() > 0.01  # the fixture's tone came through
    # 1..2 s of a clip cut into 0.5 s segments: segments [2, 4)
    assert clip.scene["answers"]["ave"] == {"class": "Frying (food)", "range": [2, 4]}
    task = get_task("ave", reasoning=False)
    sample = task.build(clip, random.Random(0))
    assert sample.target == "<event> Frying (food) </event> <range> 2,4 </range>"
    assert task.parse(sample.target) == task.answer_to_pred(sample.answer)
    assert not get_task("avqa").applies(clip)  # a task without an answer in the annotation is not built


def test_an_interrupted_conversion_resumes_where_it_stopped(ave_tree, tmp_path, monkeypatch):
    out, media = tmp_path / "out", MediaConfig(num_segments=4, segment_seconds=0.5, image_size=32)
    encode, calls = converter_base._encode, []

    def failing(job):
        calls.append(job[1].key)
        if len(calls) == 3:
            raise KeyboardInterrupt  # the run is killed while the second shard is written
        return encode(job)

    monkeypatch.setattr(converter_base, "_encode", failing)
    with pytest.raises(KeyboardInterrupt):
        convert(get_converter("ave"), ave_tree, out, media, clips_per_shard=2, progress=False)
    state = json.loads((out / ".convert-state.json").read_text())
    assert list(state["done"]) == ["test/test-000000.tar"] and not (out / "manifest.json").exists()
    monkeypatch.setattr(converter_base, "_encode", encode)
    resumed = []
    monkeypatch.setattr(converter_base, "_encode", lambda job: resumed.append(job[1].key) or encode(job))
    manifest = convert(get_converter("ave"), ave_tree, out, media, clips_per_shard=2, progress=False)
    assert "vid-B_2" not in resumed and len(resumed) == 5  # the finished test shard was not redone
    assert manifest["splits"]["train"]["clips"] == 2 and not (out / ".convert-state.json").exists()
    # converting again with other settings into the same folder is refused, naming the folder
    with pytest.raises(ConvertError, match="already holds a conversion"):
        convert(get_converter("ave"), ave_tree, out, MediaConfig(num_segments=2, image_size=32), progress=False)


def test_a_missing_annotation_file_is_a_user_error(tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        run_convert("ave", tmp_path, tmp_path / "out")
    assert exit_info.value.code == 2


def test_a_fit_trains_on_the_converted_shards(ave_tree, tmp_path):
    out = tmp_path / "out"
    run_convert("ave", ave_tree, out)
    checkpoint = fit_steps(out, ["ave"], tmp_path / "work", steps=3)
    assert checkpoint["global_step"] == 3


def test_a_fit_without_the_data_words_names_the_missing_words_and_the_key(ave_tree, tmp_path, capsys):
    from avmt.cli import main
    from tests.data.converters.common import BASE

    out = tmp_path / "out"
    run_convert("ave", ave_tree, out)
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", BASE, f"--data.root={out}", "--data.tasks=[ave]", "--model.num_segments=4",
              "--trainer.max_steps=1", f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    message = capsys.readouterr().err
    assert "'Church'" in message and "model.llm.init_args.words_from" in message


def test_a_fit_on_shards_of_raw_videos_fails_instead_of_ending_as_a_success(tmp_path, capsys):
    """A tar of .mp4 files (not avmt samples) is all corrupt: the fit exits 2 saying what was skipped."""
    import io
    import tarfile

    from avmt.cli import main
    from tests.data.converters.common import BASE

    for split in ("train", "val"):
        (tmp_path / split).mkdir()
        with tarfile.open(tmp_path / split / f"{split}-000000.tar", "w") as tar:
            data = b"\x00" * 64
            info = tarfile.TarInfo("clip1.mp4")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "-c", BASE, f"--data.root={tmp_path}", "--model.media_pretraining=null", "--trainer.max_epochs=1",
              "--trainer.enable_progress_bar=false",
              f"--trainer.default_root_dir={tmp_path}"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "the train split in" in err and "gave no usable sample" in err and "skipped as corrupt" in err, err
