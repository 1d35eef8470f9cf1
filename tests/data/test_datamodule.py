"""AVDataModule: batch sizes per split."""

from __future__ import annotations

from avmt.data.datamodule import AVDataModule
from avmt.data.shards import ensure_shards
from avmt.data.synth import SynthConfig


def test_evaluation_batches_take_their_own_clip_count(tmp_path):
    """Generation is batched per task, so evaluation batches are larger than training ones."""
    ensure_shards(tmp_path, {"train": 6, "val": 6, "test": 3}, seed=1, cfg=SynthConfig(frame_size=32), progress=False)
    data = AVDataModule(root=str(tmp_path), tasks=["action", "emotion"], reasoning=False, clips_per_batch=2,
                        eval_clips_per_batch=5)
    data.setup("fit")
    data.setup("test")
    assert len(next(iter(data.train_dataloader())).clip_keys) == 2
    assert [len(b.clip_keys) for b in data.val_dataloader()] == [5, 1]
    assert [len(b.clip_keys) for b in data.test_dataloader()] == [3]
    same = AVDataModule(root=str(tmp_path), tasks=["action"], reasoning=False, clips_per_batch=2)
    same.setup("validate")
    assert [len(b.clip_keys) for b in same.val_dataloader()] == [2, 2, 2]
