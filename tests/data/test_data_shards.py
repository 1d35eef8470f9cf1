"""AVSynth shards: writing, determinism, reading with webdataset, corrupt samples, manifest."""

import dataclasses
import io
import json
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import torch
import webdataset as wds
from PIL import Image

from avmt.data import shards as shards_mod
from avmt.data.shards import (
    MEMBERS,
    CorruptSampleCounter,
    CorruptSampleWarning,
    clip_from_index,
    clip_from_scene,
    encode_clip,
    ensure_shards,
    iter_clips,
    list_shards,
    read_manifest,
    synthesize,
    write_shards,
)
from avmt.data.synth import SynthConfig, generate_scene, render_clip

# small and fast: 4 segments x 2 frames of 32x32, 0.5 s segments at 8 kHz
CFG = SynthConfig(num_segments=4, frames_per_segment=2, frame_size=32, sample_rate=8000, segment_seconds=0.5)


def _bytes(paths):
    return [p.read_bytes() for p in paths]


def test_write_is_byte_identical_for_a_seed(tmp_path):
    a = write_shards(tmp_path / "a", "train", 5, 7, CFG, clips_per_shard=2, progress=False)
    b = write_shards(tmp_path / "b", "train", 5, 7, CFG, clips_per_shard=2, progress=False)
    c = write_shards(tmp_path / "c", "train", 5, 8, CFG, clips_per_shard=2, progress=False)
    assert [p.name for p in a] == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert a[0].parent == tmp_path / "a" / "train"
    assert _bytes(a) == _bytes(b)
    assert _bytes(a) != _bytes(c)
    with tarfile.open(a[0]) as tar:
        members = tar.getmembers()
    names = [m.name for m in members]
    assert names == sorted(names) == [f"train-0000000{i}.{m}" for i in (0, 1) for m in MEMBERS]
    meta = {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members}
    assert meta == {(946684800, 0, 0, "", "", 0o644)}
    with tarfile.open(a[2]) as tar:
        assert len(tar.getnames()) == 3  # the last shard holds the remaining clip


def test_parallel_writing_gives_the_same_bytes(tmp_path):
    one = write_shards(tmp_path / "one", "val", 6, 1, CFG, clips_per_shard=4, progress=False, num_workers=1)
    two = write_shards(tmp_path / "two", "val", 6, 1, CFG, clips_per_shard=4, progress=False, num_workers=2)
    assert _bytes(one) == _bytes(two)


def test_rewrite_replaces_old_shards(tmp_path):
    write_shards(tmp_path, "train", 6, 0, CFG, clips_per_shard=2, progress=False)
    paths = write_shards(tmp_path, "train", 2, 0, CFG, clips_per_shard=2, progress=False)
    assert list_shards(tmp_path / "train") == paths and len(paths) == 1


def test_stock_webdataset_reads_the_members(tmp_path):
    paths = write_shards(tmp_path, "test", 2, 0, CFG, progress=False)
    samples = list(wds.WebDataset([str(p) for p in paths], shardshuffle=False, empty_check=False))
    assert [s["__key__"] for s in samples] == ["test-00000000", "test-00000001"]
    assert all(set(MEMBERS) <= set(s) for s in samples)
    scene = json.loads(samples[1]["scene.json"])
    assert scene == generate_scene(1, "test", 0, CFG)
    png = Image.open(io.BytesIO(samples[0]["frames.png"]))
    assert png.size == (CFG.num_frames * 32, 32) and png.mode == "RGB"


def test_round_trip_equals_rendering(tmp_path):
    paths = write_shards(tmp_path, "train", 3, 5, CFG, clips_per_shard=2, progress=False)
    counter = CorruptSampleCounter()
    clips = list(iter_clips(paths, counter))
    assert counter.count == 0 and [c["key"] for c in clips] == [f"train-0000000{i}" for i in range(3)]
    for i, clip in enumerate(clips):
        assert set(clip) == {"key", "frames", "audio", "scene"}
        scene = generate_scene(i, "train", 5, CFG)
        frames, audio = render_clip(scene, CFG)
        assert clip["scene"] == scene
        assert clip["frames"].dtype == torch.uint8 and clip["frames"].shape == (8, 3, 32, 32)
        assert torch.equal(clip["frames"], torch.from_numpy(frames))
        assert clip["audio"].dtype == torch.float32 and clip["audio"].shape == (CFG.num_samples,)
        assert np.abs(clip["audio"].numpy() - audio).max() <= 1 / 32768 + 1e-7  # PCM-16 quantization
        mem = clip_from_scene(scene, CFG)  # in-memory clips equal decoded ones exactly
        assert torch.equal(mem["frames"], clip["frames"]) and torch.equal(mem["audio"], clip["audio"])
        assert mem["key"] == clip["key"] and mem["scene"] == clip["scene"]
    assert torch.equal(clip_from_index(2, "train", 5, CFG)["audio"], clips[2]["audio"])
    # a folder works as well as a list
    assert [c["key"] for c in iter_clips(tmp_path / "train")] == [c["key"] for c in clips]


class _Boom:
    """Unpickling this would flip a flag: the reader must never unpickle."""

    triggered = False

    def __reduce__(self):
        return (_trigger, ())


def _trigger():
    _Boom.triggered = True
    return "unpickled!"


def _tar(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, members in samples:
            for suffix, data in members.items():
                info = tarfile.TarInfo(f"{key}.{suffix}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _good(i):
    scene = generate_scene(i, "train", 0, CFG)
    frames, audio = render_clip(scene, CFG)
    return scene["clip_id"], encode_clip(scene, frames, audio)


def test_corrupt_samples_are_skipped_counted_and_warned(tmp_path):
    samples = [_good(i) for i in range(9)]
    key1, m1 = samples[1]
    m1["frames.png"] = b"\x89PNG not really"
    key2, m2 = samples[2]
    del m2["audio.flac"]
    key3, m3 = samples[3]
    small = io.BytesIO()
    Image.new("RGB", (10, 10)).save(small, format="PNG")
    m3["frames.png"] = small.getvalue()  # valid PNG, wrong shape
    key4, m4 = samples[4]
    m4["scene.json"] = b"{not json"
    key5, m5 = samples[5]
    m5["audio.flac"] = m5["audio.flac"][:200]  # truncated FLAC
    key6, m6 = samples[6]
    m6["extra.pickle"] = pickle.dumps(_Boom())  # an undecodable member on a good sample
    m6["x.pyd"] = pickle.dumps(_Boom())
    key8, m8 = samples[8]
    scene8 = json.loads(m8["scene.json"])
    scene8["av_event"]["object"] = 99  # valid JSON, broken scene graph
    m8["scene.json"] = json.dumps(scene8).encode()
    path = tmp_path / "bad.tar"
    _tar(path, samples)
    counter = CorruptSampleCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [c["key"] for c in iter_clips([path], counter)]
    assert keys == [samples[i][0] for i in (0, 6, 7)]
    assert not _Boom.triggered
    assert counter.count == 6 and counter.keys == [key1, key2, key3, key4, key5, key8]
    assert counter.reasons == {
        "bad frames.png": 1,
        "missing audio.flac": 1,
        "wrong shape": 1,
        "bad scene.json": 2,
        "bad audio.flac": 1,
    }
    assert counter.ignored == {"extra.pickle": 1, "x.pyd": 1}
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptSampleWarning)]
    for key in (key1, key2, key3, key4, key5, key6, key8):
        assert any(key in m for m in messages), key


def test_truncated_shard_does_not_raise(tmp_path):
    paths = write_shards(tmp_path, "train", 4, 0, CFG, clips_per_shard=4, progress=False)
    data = paths[0].read_bytes()
    paths[0].write_bytes(data[: len(data) // 2])
    counter = CorruptSampleCounter()
    with pytest.warns(CorruptSampleWarning):
        clips = list(iter_clips(paths, counter))
    assert 1 <= len(clips) < 4 and counter.count >= 1
    for clip in clips:
        assert torch.equal(clip["frames"], clip_from_scene(clip["scene"], CFG)["frames"])


def test_missing_or_empty_folder_names_path_and_command(tmp_path):
    missing = tmp_path / "root" / "train"
    with pytest.raises(FileNotFoundError) as err:
        list_shards(missing)
    msg = str(err.value)
    assert str(missing) in msg and "python -m avmt data synth --out" in msg and "--clips N --seed S" in msg
    missing.mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no .tar"):
        list_shards(missing)
    with pytest.raises(FileNotFoundError, match="python -m avmt data synth"):
        iter_clips(missing)
    with pytest.raises(FileNotFoundError, match="nope.tar"):
        iter_clips([missing / "nope.tar"])


def test_synthesize_writes_manifest_and_ensure_reuses_it(tmp_path, monkeypatch):
    clips = {"train": 3, "val": 2}
    made = synthesize(tmp_path, clips, 4, CFG, progress=False, clips_per_shard=2)
    manifest = read_manifest(tmp_path)
    assert manifest["seed"] == 4 and manifest["clips"] == clips and manifest["schema_version"] == 1
    assert manifest["cfg"] == CFG.to_dict()
    assert manifest["shards"] == {
        "train": ["train/train-000000.tar", "train/train-000001.tar"],
        "val": ["val/val-000000.tar"],
    }
    mtimes = {p: p.stat().st_mtime_ns for paths in made.values() for p in paths}

    def fail(*args, **kwargs):
        raise AssertionError("should have reused the shards")

    monkeypatch.setattr(shards_mod, "synthesize", fail)
    again = ensure_shards(tmp_path, clips, 4, CFG, progress=False, clips_per_shard=2)
    assert again == made and {p: p.stat().st_mtime_ns for p in mtimes} == mtimes
    monkeypatch.undo()

    # a different seed, config or clip count regenerates; so does a missing shard
    ensure_shards(tmp_path, clips, 5, CFG, progress=False, clips_per_shard=2)
    assert read_manifest(tmp_path)["seed"] == 5
    other = dataclasses.replace(CFG, frames_per_segment=1)
    ensure_shards(tmp_path, clips, 5, other, progress=False, clips_per_shard=2)
    assert read_manifest(tmp_path)["cfg"]["frames_per_segment"] == 1
    (tmp_path / "val" / "val-000000.tar").unlink()
    out = ensure_shards(tmp_path, clips, 5, other, progress=False, clips_per_shard=2)
    assert out["val"][0].is_file()
    assert next(iter_clips(out["val"]))["frames"].shape[0] == 4
