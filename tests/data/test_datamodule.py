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


def test_a_task_draws_the_same_samples_alone_and_among_other_tasks(tmp_path):
    """The transfer study's equal budget: a single-task run sees exactly the samples (prompts, questions,
    other clips) that the same task gets in the multi-task run."""
    from avmt.data.datamodule import ClipTaskStream
    from avmt.data.shards import list_shards

    ensure_shards(tmp_path, {"train": 12, "val": 2, "test": 2}, seed=2, cfg=SynthConfig(frame_size=32), progress=False)
    shards = list_shards(tmp_path / "train")

    def samples(tasks: list[str], task: str) -> list[tuple]:
        stream = ClipTaskStream(shards, tasks, reasoning=True, seed=0, shuffle=False)
        return [(s.prompt, s.target, tuple(s.media)) for group in stream for s in group.samples if s.task == task]

    for task in ("avqa", "ave", "v2a"):
        alone = samples([task], task)
        assert alone and alone == samples(["ave", "avqa", "emotion", "v2a", "avcap"], task), task
