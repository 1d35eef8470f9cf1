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
from avmt.data.sample import Clip
from avmt.data.shards import (
    MEMBERS,
    SHARD_FORMAT_VERSION,
    CorruptSampleCounter,
    CorruptSampleError,
    CorruptSampleWarning,
    check_shard_version,
    clip_from_index,
    clip_from_scene,
    decode_sample,
    encode_clip,
    ensure_shards,
    iter_clips,
    list_shards,
    read_manifest,
    synthesize,
    write_shards,
)
from avmt.data.synth import SCHEMA_VERSION, SynthConfig, generate_scene, render_clip, render_masks

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
        assert len(tar.getnames()) == len(MEMBERS)  # the last shard holds the remaining clip


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
    masks = Image.open(io.BytesIO(samples[0]["masks.png"]))
    assert masks.size == (CFG.num_frames * 32, 32) and masks.mode == "L"
    tiled = np.asarray(masks)  # frame k is the k-th block of 32 columns
    expected = render_masks(generate_scene(0, "test", 0, CFG), CFG)
    for k in range(CFG.num_frames):
        np.testing.assert_array_equal(tiled[:, k * 32 : (k + 1) * 32], expected[k])


def test_round_trip_equals_rendering(tmp_path):
    paths = write_shards(tmp_path, "train", 3, 5, CFG, clips_per_shard=2, progress=False)
    counter = CorruptSampleCounter()
    clips = list(iter_clips(paths, counter))
    assert counter.count == 0 and [c.key for c in clips] == [f"train-0000000{i}" for i in range(3)]
    for i, clip in enumerate(clips):
        assert isinstance(clip, Clip)
        scene = generate_scene(i, "train", 5, CFG)
        frames, audio = render_clip(scene, CFG)
        assert clip.scene == scene
        assert clip.frames.dtype == torch.uint8 and clip.frames.shape == (8, 3, 32, 32)
        assert torch.equal(clip.frames, torch.from_numpy(frames))
        assert clip.audio.dtype == torch.float32 and clip.audio.shape == (CFG.num_samples,)
        assert np.abs(clip.audio.numpy() - audio).max() <= 1 / 32768 + 1e-7  # PCM-16 quantization
        assert clip.masks.dtype == torch.uint8 and clip.masks.shape == (8, 32, 32)
        assert torch.equal(clip.masks, torch.from_numpy(render_masks(scene, CFG)))
        assert clip.segment_masks().shape == (CFG.num_segments, 32, 32)
        mem = clip_from_scene(scene, CFG)  # in-memory clips equal decoded ones exactly
        assert isinstance(mem, Clip)
        assert torch.equal(mem.frames, clip.frames) and torch.equal(mem.audio, clip.audio)
        assert torch.equal(mem.masks, clip.masks)
        assert mem.key == clip.key and mem.scene == clip.scene
    assert torch.equal(clip_from_index(2, "train", 5, CFG).audio, clips[2].audio)
    # a folder works as well as a list
    assert [c.key for c in iter_clips(tmp_path / "train")] == [c.key for c in clips]


def test_round_trip_of_multi_source_scenes(tmp_path):
    cfg = dataclasses.replace(CFG, multi_source=1.0)
    paths = write_shards(tmp_path, "train", 4, 2, cfg, progress=False)
    clips = list(iter_clips(paths))
    assert len(clips) == 4
    for i, clip in enumerate(clips):
        scene = generate_scene(i, "train", 2, cfg)
        assert clip.scene == scene and scene["av_event"] is None
        assert torch.equal(clip.masks, torch.from_numpy(render_masks(scene, cfg)))
        present = set(torch.unique(clip.masks).tolist()) - {0}
        assert present == {o["id"] + 1 for o in scene["objects"] if o["visible"]}


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
    return scene["clip_id"], encode_clip(scene, frames, audio, render_masks(scene, CFG))


def _png(array):
    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(out, format="PNG")
    return out.getvalue()


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
        keys = [c.key for c in iter_clips([path], counter)]
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
        assert torch.equal(clip.frames, clip_from_scene(clip.scene, CFG).frames)
        assert torch.equal(clip.masks, clip_from_scene(clip.scene, CFG).masks)


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
    assert manifest["seed"] == 4 and manifest["clips"] == clips
    assert manifest["schema_version"] == SCHEMA_VERSION == 2
    assert manifest["format_version"] == SHARD_FORMAT_VERSION == 2
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
    assert next(iter_clips(out["val"])).frames.shape[0] == 4


# ------------------------------------------------------------------------------- masks.png and versions


def test_bad_masks_png_is_counted_with_its_key(tmp_path):
    samples = [_good(i) for i in range(5)]
    n, h, w = CFG.num_frames, CFG.frame_size, CFG.frame_size
    key0, m0 = samples[0]
    m0["masks.png"] = _png(np.zeros((h, (n - 1) * w), np.uint8))  # one frame short
    key1, m1 = samples[1]
    m1["masks.png"] = _png(np.zeros((h, n * w, 3), np.uint8))  # right size, RGB instead of L
    key2, m2 = samples[2]
    scene2 = json.loads(m2["scene.json"])
    bad = np.zeros((h, n * w), np.uint8)
    bad[0, 0] = len(scene2["objects"]) + 1  # an object id the scene does not have
    m2["masks.png"] = _png(bad)
    key3, m3 = samples[3]
    del m3["masks.png"]
    path = tmp_path / "masks.tar"
    _tar(path, samples)
    counter = CorruptSampleCounter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        keys = [c.key for c in iter_clips([path], counter)]
    assert keys == [samples[4][0]]
    assert counter.keys == [key0, key1, key2, key3]
    assert counter.reasons == {"wrong shape": 2, "bad masks.png": 1, "missing masks.png": 1}
    messages = [str(w.message) for w in caught if issubclass(w.category, CorruptSampleWarning)]
    for key in (key0, key1, key2, key3):
        assert any(key in m and "masks.png" in m for m in messages), key
    with pytest.raises(CorruptSampleError, match="wrong shape: masks.png"):
        decode_sample({"__key__": key0, **m0})


def _v1_sample(i):
    """A sample as AVSynth v1 wrote it: no masks.png, scene version 1 without the v2 fields."""
    key, members = _good(i)
    del members["masks.png"]
    scene = json.loads(members["scene.json"])
    scene["version"] = 1
    scene.pop("expressions")
    for obj in scene["objects"]:
        obj.pop("description")
    members["scene.json"] = json.dumps(scene).encode()
    return key, members


def test_v1_sample_is_an_old_schema_corrupt_sample(tmp_path):
    samples = [_v1_sample(0), _good(1)]
    with_masks = _v1_sample(2)
    with_masks[1]["masks.png"] = _good(2)[1]["masks.png"]  # even with a masks.png it is old
    samples.append(with_masks)
    path = tmp_path / "old.tar"
    _tar(path, samples)
    counter = CorruptSampleCounter()
    with pytest.warns(CorruptSampleWarning, match="python -m avmt data synth --out"):
        keys = [c.key for c in iter_clips([path], counter)]
    assert keys == [samples[1][0]]
    assert counter.reasons == {"old schema": 2} and counter.keys == [samples[0][0], samples[2][0]]
    with pytest.raises(CorruptSampleError) as err:
        decode_sample({"__key__": samples[0][0], **samples[0][1]})
    assert err.value.reason == "old schema"
    assert "v1" in str(err.value) and "no longer read" in str(err.value)


def _write_v1_manifest(root, **overrides):
    synthesize(root, {"train": 2}, 0, CFG, progress=False)
    manifest = read_manifest(root)
    manifest.update({"format_version": 1, "schema_version": 1, "generator_version": 1, **overrides})
    (root / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_v1_manifest_gives_a_clear_error(tmp_path):
    root = tmp_path / "old"
    _write_v1_manifest(root)
    with pytest.raises(ValueError) as err:
        check_shard_version(root)
    msg = str(err.value)
    assert str(root) in msg and "AVSynth v1" in msg and "v2" in msg
    assert "masks" in msg and "multi-source" in msg and "expressions" in msg
    assert f"python -m avmt data synth --out {root} --clips N --seed S" in msg
    # reading the folder or its shards fails the same way, before anything is decoded
    with pytest.raises(ValueError, match="AVSynth v1"):
        list_shards(root / "train")
    with pytest.raises(ValueError, match="AVSynth v1"):
        iter_clips(root / "train")
    with pytest.raises(ValueError, match="AVSynth v1"):
        iter_clips(sorted((root / "train").glob("*.tar")))
    # an old format with a current schema is refused too; a newer one asks for a newer avmt
    _write_v1_manifest(root, schema_version=SCHEMA_VERSION)
    with pytest.raises(ValueError, match="format_version 1"):
        check_shard_version(root)
    _write_v1_manifest(root, schema_version=SCHEMA_VERSION + 1, format_version=SHARD_FORMAT_VERSION)
    with pytest.raises(ValueError, match="newer"):
        check_shard_version(root)
    # no manifest: nothing to check; a current one passes
    check_shard_version(tmp_path / "nothing-here")
    synthesize(tmp_path / "new", {"train": 1}, 0, CFG, progress=False)
    check_shard_version(tmp_path / "new")


def test_ensure_shards_regenerates_v1_shards(tmp_path):
    clips = {"train": 2}
    _write_v1_manifest(tmp_path)
    made = ensure_shards(tmp_path, clips, 0, CFG, progress=False)
    manifest = read_manifest(tmp_path)
    assert (manifest["schema_version"], manifest["format_version"]) == (SCHEMA_VERSION, SHARD_FORMAT_VERSION)
    check_shard_version(tmp_path)
    assert [c.masks is not None for c in iter_clips(made["train"])] == [True, True]


def test_multi_source_config_changes_the_manifest_and_the_bytes(tmp_path):
    clips = {"train": 3}
    synthesize(tmp_path, clips, 1, CFG, progress=False)
    single = _bytes(list_shards(tmp_path / "train"))
    multi = dataclasses.replace(CFG, multi_source=1.0)
    ensure_shards(tmp_path, clips, 1, multi, progress=False)
    assert read_manifest(tmp_path)["cfg"]["multi_source"] == 1.0
    assert _bytes(list_shards(tmp_path / "train")) != single
    again = write_shards(tmp_path / "again", "train", 3, 1, multi, progress=False)
    assert _bytes(again) == _bytes(list_shards(tmp_path / "train"))
