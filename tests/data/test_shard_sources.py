"""Shards at scale: URL patterns and ``pipe:`` roots, seeded shard shuffling, readers split by
shard, problems counted once over all readers, tar members that point outside the shard."""

from __future__ import annotations

import io
import tarfile
import warnings

import lightning as L
import pytest
import torch

from avmt.data.datamodule import AVDataModule
from avmt.data.shards import (
    CorruptSampleCounter,
    CorruptSampleWarning,
    by_shard,
    ensure_shards,
    iter_clips,
    reader_clip_count,
    shard_order,
    split_source,
    write_tar,
)
from avmt.data.synth import SynthConfig
from avmt.errors import UserError

# small and fast: 4 segments x 2 frames of 32x32, 0.5 s segments at 8 kHz
CFG = SynthConfig(num_segments=4, frames_per_segment=2, frame_size=32, sample_rate=8000, segment_seconds=0.5)
TASKS = ["action", "emotion"]  # single-clip tasks: every clip is the anchor of its own group


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """AVSynth shards: train 5 clips in 3 shards (2, 2, 1), val 2 clips in 1 shard, test 1 clip."""
    out = tmp_path_factory.mktemp("shards")
    ensure_shards(out, {"train": 5, "val": 2, "test": 1}, seed=4, cfg=CFG, progress=False, clips_per_shard=2)
    return out


def _pipe_root(root) -> str:
    return f"pipe:cat {root}/{{split}}/{{split}}-{{000000..000002}}.tar"


def _keys(source, part=None, order=None, counter=None) -> list[str]:
    return [clip.key for clip in iter_clips(source, counter, part=part, order=order)]


def _epoch_keys(data: AVDataModule) -> list[str]:
    return [key for batch in data.train_dataloader() for key in batch.clip_keys]


def test_a_pipe_url_pattern_streams_the_same_clips_as_the_folder(root):
    folder = list(iter_clips(root / "train"))
    local = f"{root}/{{split}}/{{split}}-{{000000..000002}}.tar"
    for pattern in (_pipe_root(root), local, f"file:{local}"):
        source = split_source(pattern, "train")
        assert len(source.urls) == 3 and source.num_clips is None and "{split}" not in source.where
        streamed = list(iter_clips(source))
        assert [c.key for c in streamed] == [c.key for c in folder] and len(folder) == 5
        for a, b in zip(streamed, folder):
            assert torch.equal(a.frames, b.frames) and torch.equal(a.audio, b.audio) and a.scene == b.scene
    # the data module: the same epoch through the URL root as through the folder, with a length
    kwargs = dict(tasks=TASKS, reasoning=False, clips_per_batch=2, shuffle_buffer=0)
    by_folder = AVDataModule(root=str(root), **kwargs)
    by_url = AVDataModule(root=_pipe_root(root), num_clips={"train": 5, "val": 2}, **kwargs)
    for data in (by_folder, by_url):
        data.setup("fit")
    assert _epoch_keys(by_url) == _epoch_keys(by_folder)
    assert len(by_url.train_dataloader()) == len(by_folder.train_dataloader()) == 3


def test_a_bad_url_is_a_user_error_or_a_counted_skip_naming_it(root):
    missing = f"{root}/{{split}}/{{split}}-{{000000..000003}}.tar"  # one shard too many
    with pytest.raises(UserError, match="train-000003.tar"):
        split_source(missing, "train")
    good, failing = f"pipe:cat {root}/{{split}}/{{split}}-000000.tar", f"pipe:cat {root}/{{split}}/nope.tar"
    source = split_source(f"{good}::{failing}", "train")  # webdataset's '::' joins two patterns
    counter = CorruptSampleCounter()
    with pytest.warns(CorruptSampleWarning, match="nope.tar"):
        keys = _keys(source, counter=counter)
    named = failing.replace("{split}", "train")
    assert len(keys) == 2 and counter.reasons == {"unreadable tar": 1} and counter.keys == [named]
    # every shard failing: the pass is refused, naming the split and the pattern
    data = AVDataModule(root=f"pipe:exit 3; cat {root}/{{split}}/{{split}}-{{000000..000002}}.tar", tasks=TASKS,
                        reasoning=False, num_clips={"train": 5})
    data.setup("fit")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        with pytest.raises(UserError, match=r"train split in 'pipe:exit 3.*3 sample\(s\) skipped"):
            _epoch_keys(data)


@pytest.mark.parametrize(
    ("root_arg", "kwargs", "match"),
    [
        ("pipe:cat shards.tar", {}, r"data.root 'pipe:cat shards.tar' looks like a URL but has no \{split\}"),
        ("some/folder", {"num_clips": {"train": 3}}, "data.num_clips is for a URL pattern data.root"),
        ("x/{split}.tar", {"num_clips": {"trian": 3}}, r"data.num_clips: unknown stage split\(s\) \['trian'\]"),
        ("x/{split}.tar", {"num_clips": {"train": -1}}, "data.num_clips.train must be a whole number >= 0"),
        ("x/{split}.tar", {"shuffle_buffer": -1}, "data.shuffle_buffer must be a whole number >= 0"),
    ],
)
def test_bad_source_keys_are_user_errors(root_arg, kwargs, match):
    with pytest.raises(UserError, match=match):
        AVDataModule(root=root_arg, tasks=TASKS, **kwargs)


def test_an_unknown_training_size_needs_num_clips_or_max_steps(root):
    data = AVDataModule(root=_pipe_root(root), tasks=TASKS, reasoning=False)
    data.trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
    with pytest.raises(UserError, match="give data.num_clips.train, or set trainer.max_steps"):
        data.setup("fit")
    data.trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False)
    data.setup("fit")  # max_steps sizes the schedule; the stream has no length
    assert data.counts["train"] is None and reader_clip_count(data.sources, "train", (0, 1)) is None


def test_shard_order_is_seeded_by_seed_and_epoch(root):
    assert shard_order(8, 0, 1) == shard_order(8, 0, 1) != shard_order(8, 0, 2)
    assert shard_order(8, 1, 1) != shard_order(8, 0, 1) and sorted(shard_order(8, 0, 1)) == list(range(8))
    assert shard_order(8, 0, 1, shuffle=False) == list(range(8))
    file_order = _keys(root / "train")

    def epoch(epoch: int, **kwargs) -> list[str]:
        data = AVDataModule(root=str(root), tasks=TASKS, reasoning=False, clips_per_batch=1, **kwargs)
        data.setup("fit")
        data.datasets["train"].set_epoch(epoch)
        return [key for batch in data.train_dataloader() for key in batch.clip_keys]

    assert epoch(1, shuffle_shards=False, shuffle_buffer=0) == file_order
    shuffled = epoch(1, shuffle_buffer=0)
    assert shuffled == epoch(1, shuffle_buffer=0) and sorted(shuffled) == sorted(file_order)
    assert shuffled != file_order and epoch(2, shuffle_buffer=0) not in (shuffled, file_order)
    buffered = epoch(1, shuffle_shards=False, shuffle_buffer=4)
    assert buffered == epoch(1, shuffle_shards=False, shuffle_buffer=4) and sorted(buffered) == sorted(file_order)


@pytest.mark.parametrize("readers", [1, 2, 3, 4, 6], ids=lambda n: f"{n}-readers")
def test_every_clip_goes_to_one_reader_in_both_modes(root, readers, tmp_path):
    """3 training shards: 1-3 readers split by shard, 4 and 6 by position; with a shuffled shard
    order every clip is read exactly once, each reader gets reader_clip_count clips, and a reader
    splitting by shard opens only its own shards."""
    log = tmp_path / "opened.log"
    pattern = f"pipe:f={root}/{{split}}/{{split}}-{{000000..000002}}.tar; echo $f >> {log}; cat $f"
    source = split_source(pattern, "train", num_clips=None)
    folder = split_source(root, "train")
    assert by_shard(folder, readers) == (readers <= 3) and by_shard(source, readers) == (readers <= 3)
    order = shard_order(3, seed=0, epoch=5)
    everything = sorted(_keys(folder))
    seen: list[str] = []
    for index in range(readers):
        log.write_text("")
        keys = _keys(folder, (index, readers), order)
        assert len(keys) == reader_clip_count(root, "train", (index, readers))
        assert _keys(source, (index, readers), order) == keys
        opened = log.read_text().split()
        if readers <= 3:  # by shard: its own shards only, in the epoch's order
            assert opened == [folder.urls[i] for i in order if i % readers == index]
        else:
            assert opened == [folder.urls[i] for i in order]
        seen += keys
    assert sorted(seen) == everything and len(everything) == 5
    assert reader_clip_count(root, "train", (1, 2)) == 2 and reader_clip_count(root, "train", (0, 4)) == 2


def read_tar(path) -> list[tuple[str, dict[str, bytes]]]:
    """``(key, {suffix: bytes})`` of every sample of a shard, in order."""
    samples: dict[str, dict[str, bytes]] = {}
    with tarfile.open(path) as tar:
        for member in tar.getmembers():
            key, suffix = member.name.split(".", 1)
            samples.setdefault(key, {})[suffix] = tar.extractfile(member).read()
    return list(samples.items())


@pytest.mark.parametrize("readers", [2, 4], ids=["by-shard", "by-position"])
def test_shard_problems_are_counted_once_over_all_readers(root, tmp_path, readers):
    """An unreadable tar, a shard shorter than its manifest and a corrupt sample are each counted
    once over all readers, not once per reader."""
    bad = tmp_path / "bad"
    ensure_shards(bad, {"train": 5}, seed=4, cfg=CFG, progress=False, clips_per_shard=2)
    first, second, third = sorted((bad / "train").glob("*.tar"))
    samples = read_tar(first)
    samples[1][1]["frames.png"] = b"\x89PNG not really"
    write_tar(first, samples)
    second.write_bytes(b"not a tar at all" * 64)
    write_tar(third, [])  # the manifest says 1 clip
    total = CorruptSampleCounter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        keys = [key for index in range(readers) for key in _keys(bad / "train", (index, readers), counter=total)]
    assert keys == [samples[0][0]]
    assert total.reasons == {"bad frames.png": 1, "unreadable tar": 1, "missing from shard": 1 + 2}
    assert str(second) in total.keys and samples[1][0] in total.keys


def test_members_with_absolute_or_parent_paths_are_never_used(tmp_path, root):
    good_key, good = read_tar(sorted((root / "train").glob("*.tar"))[0])[0]
    path = tmp_path / "evil.tar"
    with tarfile.open(path, "w") as tar:
        members = [("../evil.json", b"{}"), ("/abs.json", b"{}"), ("../x/../train-9.scene.json", good["scene.json"])]
        members += [(f"{good_key}.{suffix}", data) for suffix, data in good.items()]
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    counter = CorruptSampleCounter()
    with pytest.warns(CorruptSampleWarning) as caught:
        keys = _keys([path], counter=counter)
    assert keys == [good_key]
    assert counter.reasons == {"unsafe member path": 3}
    assert counter.keys == ["../evil.json", "/abs.json", "../x/../train-9.scene.json"]
    messages = " ".join(str(w.message) for w in caught)
    assert "'../evil.json'" in messages and "'/abs.json'" in messages and "never used" in messages
