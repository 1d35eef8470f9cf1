"""The training loader's place in an epoch (exact mid-epoch resume) and equal step counts across
DDP ranks, on the stream with simulated ranks and real DataLoader workers."""

from __future__ import annotations

import warnings
from types import SimpleNamespace

import pytest
import torch

from avmt.data.datamodule import AVDataModule
from avmt.data.resume import batch_sizes, rank_quotas, worker_positions
from avmt.data.shards import CorruptSampleWarning, ensure_shards, write_tar
from avmt.data.synth import SynthConfig
from avmt.errors import UserError
from tests.data.test_shard_sources import read_tar

# small and fast: 4 segments x 2 frames of 32x32, 0.5 s segments at 8 kHz
CFG = SynthConfig(num_segments=4, frames_per_segment=2, frame_size=32, sample_rate=8000, segment_seconds=0.5)
TASKS = ["action", "emotion"]  # single-clip tasks: every clip is the anchor of its own group


@pytest.fixture(scope="module")
def nine(tmp_path_factory):
    """9 training and 5 validation clips: odd counts, so 2 ranks get uneven shares."""
    root = tmp_path_factory.mktemp("nine")
    ensure_shards(root, {"train": 9, "val": 5, "test": 1}, seed=4, cfg=CFG, progress=False)
    return root


def _data(root, rank: int = 0, world_size: int = 1, epoch: int = 0, **kwargs) -> AVDataModule:
    data = AVDataModule(root=str(root), tasks=TASKS, reasoning=False, **kwargs)
    data.setup("fit")
    data.trainer = SimpleNamespace(current_epoch=epoch, global_rank=rank, world_size=world_size)
    return data


def _keys(batches) -> list[list[str]]:
    return [list(batch.clip_keys) for batch in batches]


def test_rank_quotas_split_batches_of_the_shorter_ranks_and_workers_take_turns():
    assert rank_quotas([5, 4], 2, 2) == [[3], [3]]  # 9 clips, 2 ranks: rank 1 splits a batch to step 3 times
    assert batch_sizes(5, 3, 2) == [2, 2, 1] and batch_sizes(4, 3, 2) == [2, 1, 1] and batch_sizes(5, 4, 2) == [2, 1, 1, 1]
    assert rank_quotas([3, 2, 2, 2], 2, 2) == [[2, 1], [2, 1]]  # 2 workers: rank 1's first worker splits
    assert rank_quotas([4, 4], 2, 2) == [[2], [2]]
    assert rank_quotas([3, 3, 3, 2], 3, 2) == [[1, 1], [1, 1]]
    assert rank_quotas([12, 2], 4, 2) == [[3], [3]]  # fewer clips than steps: the stream repeats its last batch
    assert worker_positions(1, [3, 2]) == ([1, 0], 1) and worker_positions(2, [3, 1]) == ([1, 1], 0)
    assert worker_positions(3, [3, 1]) == ([2, 1], 0) and worker_positions(4, [2, 2]) == ([2, 2], None)
    with pytest.raises(ValueError):
        worker_positions(5, [2, 2])


@pytest.mark.parametrize("workers", [0, 2])
def test_uneven_ranks_take_equal_steps_and_evaluation_scores_every_clip_once(nine, workers):
    """9 clips on 2 ranks with batches of 2 made 3 steps on rank 0 and 2 on rank 1 (a DDP hang in
    the gradient all-reduce): now both take 3, rank 1 in batches of 2, 1 and 1, and every clip is
    trained once; validation (5 clips) still reads every clip once, unpadded."""
    train, val = {}, {}
    for rank in (0, 1):
        data = _data(nine, rank, 2, epoch=1, clips_per_batch=2, num_workers=workers)
        loader = data.train_dataloader()
        train[rank] = _keys(loader)
        assert len(train[rank]) == len(loader) == 3, (rank, train[rank])
        assert sorted(len(batch) for batch in train[rank]) == ([1, 2, 2] if rank == 0 else [1, 1, 2])
        val[rank] = [key for keys in _keys(data.val_dataloader()) for key in keys]
    trained = [key for rank in (0, 1) for keys in train[rank] for key in keys]
    assert len(trained) == len(set(trained)) == 9
    alone = _data(nine, epoch=1, clips_per_batch=2)
    every = {key for keys in _keys(alone.train_dataloader()) for key in keys}
    assert set(trained) == every and len(every) == 9
    scored = val[0] + val[1]
    assert len(scored) == len(set(scored)) == 5


def test_too_few_clips_for_the_ranks_is_a_user_error(nine):
    data = _data(nine, 0, 10, clips_per_batch=2)  # 9 clips for 10 ranks: one would take no step at all
    with pytest.raises(UserError, match="trainer.devices, data.num_workers"):
        data.train_dataloader()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_loader_restored_mid_epoch_yields_the_rest_of_that_epoch(nine, workers):
    """The state a checkpoint keeps after n batches makes a fresh loader (a resumed run) yield exactly
    batches n+1.. of the uninterrupted epoch; another epoch starts at its first batch."""
    full = _keys(_data(nine, epoch=2, clips_per_batch=2, num_workers=workers).train_dataloader())
    assert len(full) == 5 and sorted(k for b in full for k in b) == sorted({k for b in full for k in b})
    for consumed in (1, 3):
        data = _data(nine, epoch=2, clips_per_batch=2, num_workers=workers)
        iterator = iter(data.train_dataloader())
        assert [next(iterator).clip_keys for _ in range(consumed)] == full[:consumed]
        state = data.state_dict()  # the data module carries the loader's place into checkpoints
        assert (state["train_loader"]["epoch"], state["train_loader"]["batches"]) == (2, consumed)
        expected_draw = torch.rand(3)  # the random state is kept: a resumed step draws what this one would

        again = _data(nine, epoch=2, clips_per_batch=2, num_workers=workers)
        if consumed == 1:  # restored before the loader is made (Lightning restores the data module first) ...
            again.load_state_dict(state)
            resumed = again.train_dataloader()
        else:  # ... or on the loader itself (Lightning's fit loop, when it can)
            resumed = again.train_dataloader()
            resumed.load_state_dict(state["train_loader"])
        iterator = iter(resumed)
        rest = [next(iterator).clip_keys]
        assert torch.equal(torch.rand(3), expected_draw)
        assert rest + _keys(iterator) == full[consumed:], consumed
        assert _keys(resumed) == full  # the next pass is a whole epoch again

    other = _data(nine, epoch=3, clips_per_batch=2, num_workers=workers).train_dataloader()
    other.load_state_dict(state["train_loader"])  # a state of epoch 2: epoch 3 starts at its beginning
    assert len(_keys(other)) == 5


def test_a_rank_short_of_clips_repeats_its_last_batch_to_keep_in_step(nine, tmp_path):
    """A corrupt clip must not leave one rank a step behind the other (a hang): the short rank
    repeats its last batch, with a warning naming the rank."""
    import shutil

    shutil.copytree(nine, tmp_path / "data")
    shard = next((tmp_path / "data" / "train").glob("*.tar"))
    items = read_tar(shard)
    items[1][1]["frames.png"] = b"\x89PNG not really"  # position 1: rank 1's first clip
    write_tar(shard, items)
    data = _data(tmp_path / "data", 1, 2, clips_per_batch=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CorruptSampleWarning)
        expected_steps = len(_data(nine, 0, 2, clips_per_batch=1).train_dataloader())
    # rank 0 takes 5 steps of one clip, rank 1 made 3 of its 4 clips: it repeats its last batch twice
    with pytest.warns(CorruptSampleWarning, match="DDP rank 1, worker 0: 2 train batch"):
        got = _keys(data.train_dataloader())
    assert len(got) == expected_steps == 5 and got[-1] == got[-2] == got[-3]


def test_one_process_short_of_clips_still_takes_its_announced_steps(nine, tmp_path):
    """With one process too, an epoch that lost clips (corrupt, or none of the tasks applies) keeps the length
    its loader announced, by repeating the last batch: Lightning runs the end-of-epoch validation only after
    that many batches, so a shorter epoch ended without any validation (and without scores)."""
    import shutil

    import lightning as L

    shutil.copytree(nine, tmp_path / "data")
    shard = next((tmp_path / "data" / "train").glob("*.tar"))
    items = read_tar(shard)
    for position in (2, 5):
        items[position][1]["frames.png"] = b"\x89PNG not really"
    write_tar(shard, items)
    loader = _data(tmp_path / "data", clips_per_batch=2).train_dataloader()
    assert len(loader) == 5  # 9 clips in batches of 2, as the manifest says
    with pytest.warns(CorruptSampleWarning, match="^worker 0: 1 train batch"):
        got = _keys(loader)
    assert len(got) == 5 and got[-1] == got[-2] and len({key for batch in got for key in batch}) == 7

    class Recorder(L.LightningModule):
        """Counts validation batches; trains one weight on the batches' clip counts."""

        def __init__(self) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.ones(1))
            self.validated = 0

        def training_step(self, batch, index):
            return self.weight.sum() * len(batch.clip_keys)

        def validation_step(self, batch, index):
            self.validated += 1

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    data = _data(tmp_path / "data", clips_per_batch=2)
    recorder = Recorder()
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, num_sanity_val_steps=0, accelerator="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(recorder, train_dataloaders=data.train_dataloader(), val_dataloaders=data.val_dataloader())
    assert trainer.global_step == 5 and recorder.validated > 0
