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


def test_several_samples_of_a_task_per_clip(tmp_path):
    """``samples_per_clip``: more questions per decoded clip, all different, the first one the sample a
    single-sample run draws; bad settings name the key."""
    import pytest

    ensure_shards(tmp_path, {"train": 8, "val": 4, "test": 2}, seed=3, cfg=SynthConfig(frame_size=32), progress=False)

    def questions(**kwargs) -> dict[str, list[str]]:
        data = AVDataModule(root=str(tmp_path), tasks=["avqa", "emotion"], reasoning=False, **kwargs)
        data.setup("fit")
        out: dict[str, list[str]] = {}
        for group in data.datasets["val"]:
            for sample in group.samples:
                out.setdefault(f"{group.clips[0].key}/{sample.task}", []).append(sample.prompt)
        return out

    single, several = questions(), questions(samples_per_clip={"avqa": 4})
    assert set(single) == set(several)
    for key, prompts in several.items():
        if key.endswith("/emotion"):
            assert prompts == single[key]
            continue
        assert prompts[0] == single[key][0] and len(prompts) == len(set(prompts))
    assert sum(len(p) for k, p in several.items() if k.endswith("/avqa")) > 2 * 4  # mostly 4 per clip
    AVDataModule(root=str(tmp_path), tasks=["ave"], samples_per_clip={"avqa": 2})  # a shared base's setting
    with pytest.raises(ValueError, match="samples_per_clip: unknown task 'avqq'"):
        AVDataModule(root=str(tmp_path), tasks=["avqa"], samples_per_clip={"avqq": 2})
    with pytest.raises(ValueError, match="samples_per_clip.avqa must be a whole number"):
        AVDataModule(root=str(tmp_path), tasks=["avqa"], samples_per_clip={"avqa": 0})
