"""Data streams: workers, ranks and shards of any number, a stream with a length.

Lost data that must not end quietly, corrupt samples and clips of another layout, and bad counts
in the data config are cases of the bad-input matrix, tests/test_bad_inputs.py."""

from __future__ import annotations

import math

import pytest
import torch

from avmt.data.datamodule import AVDataModule, BatchedStream
from avmt.data.shards import ensure_shards
from avmt.data.synth import SynthConfig

# small and fast: 4 segments x 2 frames of 32x32, 0.5 s segments at 8 kHz
CFG = SynthConfig(num_segments=4, frames_per_segment=2, frame_size=32, sample_rate=8000, segment_seconds=0.5)
TASKS = ["action", "emotion"]  # single-clip tasks: every clip is the anchor of its own group


def _shards(root, train: int, clips_per_shard: int = 256):
    return ensure_shards(root, {"train": train, "val": 2, "test": 1}, seed=4, cfg=CFG, progress=False,
                         clips_per_shard=clips_per_shard)


def _data(root, **kwargs) -> AVDataModule:
    data = AVDataModule(root=str(root), tasks=TASKS, reasoning=False, **kwargs)
    data.setup("fit")
    return data


def _epoch_keys(data: AVDataModule) -> list[str]:
    return [key for batch in data.train_dataloader() for key in batch.clip_keys]


@pytest.mark.parametrize("clips_per_shard", [256, 2], ids=["1-shard", "3-shards"])
def test_two_workers_see_every_training_clip_once_per_epoch(tmp_path, clips_per_shard):
    """Fewer shards than workers used to crash ("no shard paths given"); the workers now share the
    stream by clip position, so each clip is seen once per epoch, as with no worker."""
    paths = _shards(tmp_path, 5, clips_per_shard)
    assert len(paths["train"]) == (1 if clips_per_shard == 256 else 3)
    alone = _epoch_keys(_data(tmp_path, clips_per_batch=2, num_workers=0))
    shared = _epoch_keys(_data(tmp_path, clips_per_batch=2, num_workers=2))
    assert len(alone) == len(set(alone)) == 5
    assert sorted(shared) == sorted(alone)


def test_the_train_loader_has_the_length_of_the_manifest(tmp_path):
    """With ``data.root`` set the loader's length comes from the manifest's clip count, so Lightning
    can size the schedule (it used to have none and the schedule was built for -1 steps)."""
    _shards(tmp_path, 7, clips_per_shard=3)
    for workers in (0, 2):
        data = _data(tmp_path, clips_per_batch=2, num_workers=workers)
        loader = data.train_dataloader()
        # one reader: ceil(7 / 2); two workers batch their own clips (4 and 3): 2 + 2
        assert len(loader) == math.ceil(7 / 2) == 4
        assert len(loader) == len(list(loader))
    data = _data(tmp_path, clips_per_batch=2)
    ranks = [len(BatchedStream(data.datasets["train"], 2, 0, rank, 2)) for rank in (0, 1)]
    assert ranks == [math.ceil(4 / 2), math.ceil(3 / 2)]  # DDP rank 0 gets clips 0,2,4,6, rank 1 the rest
    assert len(BatchedStream(data.datasets["train"], 2, 2, 1, 2)) == 1 + 1  # rank 1 of 2, two workers: 2 + 1 clips


def test_two_ranks_with_two_workers_each_share_one_shard_without_overlap(tmp_path):
    """DDP ranks split the stream too (the trainer's rank, times the workers): 2 ranks x 2 workers
    on a 1-shard split see every clip once, and each rank's loader length is its batch count."""
    _shards(tmp_path, 5)
    seen: list[str] = []
    for rank in (0, 1):
        data = _data(tmp_path, clips_per_batch=1, num_workers=2)
        data.datasets["train"].set_ranks(rank, 2)
        batches = BatchedStream(data.datasets["train"], 1, 2, rank, 2)
        loader = torch.utils.data.DataLoader(batches, batch_size=None, num_workers=2,
                                             collate_fn=lambda groups: [g.clips[0].key for g in groups])
        keys = [key for batch in loader for key in batch]
        assert len(keys) == len(batches) == (3 if rank == 0 else 2)
        seen += keys
    assert sorted(seen) == sorted(_epoch_keys(_data(tmp_path, clips_per_batch=2)))
