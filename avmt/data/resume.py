"""Where a training epoch stands, so that a run killed mid-epoch resumes at the right batch.

The clip stream is deterministic (same seed and epoch: same clips, same order, same samples), so
the position in an epoch is a batch count: :class:`ResumableLoader` counts the batches it hands to
the training loop and every checkpoint keeps that count, with the random state. Lightning keeps a
loader with ``state_dict`` / ``load_state_dict`` under its fit loop, but gives it back only if the
loader is made after the restore (not when ``configure_optimizers`` asks for
``trainer.estimated_stepping_batches``, as the learning-rate schedule does: Lightning issue
#20550), so the data module carries it as well (``AVDataModule.state_dict``). On resume each
DataLoader worker passes over the batches of its share that the count covers
(:func:`worker_positions`) without collating them.

The same helpers give every DDP rank one batch count per epoch (:func:`rank_quotas`): ranks that
stepped different numbers of times would wait for each other forever in the gradient all-reduce.
A rank with fewer clips splits some of its batches (:func:`batch_sizes`) rather than leaving clips
out, so every training clip is seen exactly once per epoch across ranks and workers.
"""

from __future__ import annotations

import math
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from avmt.errors import UserError


def rank_quotas(reader_clips: Sequence[int], batch_size: int, world_size: int) -> list[list[int]]:
    """Training batches per rank and worker when every rank must take the same number of steps.

    Reader ``rank * workers + worker`` (``workers = len(reader_clips) // world_size``) batches its
    own ``reader_clips[reader]`` clips; a rank steps once per batch of any of its workers. Every
    rank takes as many steps as the rank with the most batches: a rank with fewer makes more,
    smaller batches (:func:`batch_sizes`; each time the reader with the most clips per batch
    splits one more), so every clip is still trained exactly once per epoch. A rank with fewer
    clips than those steps (shards of very unequal sizes) gets batches beyond its clips, which
    :class:`~avmt.data.datamodule.BatchedStream` fills by repeating its last batch, with a warning.

    Returns:
        ``quotas[rank][worker]`` batches; every ``sum(quotas[rank])`` is equal.
    """
    workers = len(reader_clips) // world_size
    quotas = [[math.ceil(c / batch_size) for c in reader_clips[rank * workers:(rank + 1) * workers]]
              for rank in range(world_size)]
    steps = max(sum(counts) for counts in quotas)
    for rank, counts in enumerate(quotas):
        clips = reader_clips[rank * workers:(rank + 1) * workers]
        while sum(counts) < steps:
            # the reader with the most clips per batch (the first on ties) makes one batch more
            worker = max(range(workers), key=lambda w: (clips[w] / max(counts[w], 1), -w))
            counts[worker] += 1
    return quotas


def batch_sizes(clips: int, batches: int, batch_size: int) -> list[int]:
    """Sizes of ``batches`` batches of ``clips`` clips, full (``batch_size``) first, then smaller
    so that each later batch keeps at least one clip: ``batch_sizes(5, 4, 2) == [2, 1, 1, 1]``.
    With ``batches`` below ``ceil(clips / batch_size)`` the trailing clips are in no batch."""
    sizes, left = [], clips
    for index in range(batches):
        size = max(1, min(batch_size, left - (batches - index - 1)))
        sizes.append(size)
        left -= size
    return sizes


def worker_positions(batches: int, per_worker: Sequence[int]) -> tuple[list[int], int | None]:
    """Where the workers stand after a DataLoader handed out its first ``batches`` batches.

    A DataLoader over an IterableDataset takes one batch from each worker in turn (worker 0, 1,
    ..., then 0 again), passing over workers that have run out; ``per_worker[w]`` is how many
    batches worker ``w`` makes in the epoch (``[total]`` with no workers).

    Returns:
        ``(taken, next_worker)``: how many of each worker's batches were handed out, and the worker
        whose batch comes next (``None`` when none is left). A resumed DataLoader starts its turns
        at worker 0 again, so each worker before ``next_worker`` first yields one empty batch
        (:data:`TURN`), which the loader drops: the order then goes on exactly as it would have.
    """
    taken = [0] * len(per_worker)
    left = batches
    while left > 0:
        progressed = False
        for worker, total in enumerate(per_worker):
            if left and taken[worker] < total:
                taken[worker] += 1
                left -= 1
                progressed = True
        if not progressed:
            raise ValueError(f"{batches} batches asked for, but the workers make only {sum(per_worker)}")
    # within a round the workers give in index order: the next is the first of those still holding
    # batches that have given fewest
    holding = [w for w, total in enumerate(per_worker) if taken[w] < total]
    fewest = min((taken[w] for w in holding), default=0)
    next_worker = next((w for w in holding if taken[w] == fewest), None)
    return taken, next_worker


TURN: list = []  # the empty batch a resumed worker yields to give up its first turn


def collate_turns(groups: list, collate_fn: Callable[[list], Any]) -> Any:
    """``collate_fn(groups)``, or ``None`` for :data:`TURN` (dropped by :class:`ResumableLoader`)."""
    return collate_fn(groups) if groups else None


def rng_states() -> dict[str, Any]:
    """The global random states a training step may draw from (dropout): torch's CPU and CUDA
    generators and Python's ``random``; plain tensors and ints, loadable with ``weights_only``."""
    states: dict[str, Any] = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    """Restore :func:`rng_states`."""
    if "torch" in states:
        torch.set_rng_state(states["torch"])
    if "python" in states:
        version, internal, gauss = states["python"]
        random.setstate((version, tuple(internal), gauss))
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


class ResumableLoader(DataLoader):
    """The training DataLoader over a :class:`~avmt.data.datamodule.BatchedStream`, with its place
    in the epoch in checkpoints.

    ``state_dict()`` = ``{"epoch", "batches"}`` (batches of this rank handed out in that epoch),
    ``"readers"`` (``[world_size, workers]``, the stream's split) and ``"rng"`` (:func:`rng_states`
    at that moment: Lightning keeps no random state, and a step's dropout draws from it). A
    checkpoint is written by rank 0, whose count every rank shares (all take the same number of
    steps, :func:`rank_quotas`). After ``load_state_dict`` the next pass restores the random states
    (once its iterator has drawn its worker seed, as the interrupted pass's had) and, if it is of
    the same epoch, starts after the counted batches; another epoch starts at its beginning.

    Args:
        dataset: the rank's batches.
        epoch: gives the training epoch when a pass starts (``trainer.current_epoch``); ``None``:
            the stream's own ``epoch``.
        kwargs: the DataLoader's.

    A pass reads the epoch when its first batch is asked for (and sets it on the stream), and only
    then starts the workers: a resumed trainer makes the iterator before it has settled which
    epoch it is in (a checkpoint taken at an epoch's last batch resumes in the next one).
    """

    def __init__(self, dataset, epoch: Callable[[], int] | None = None, **kwargs) -> None:
        super().__init__(dataset, **kwargs)
        self._epoch = epoch
        self._position = [dataset.stream.epoch, 0]
        self._resume: dict[str, Any] | None = None

    def _readers(self) -> list[int]:
        return [self.dataset.world_size, max(1, self.dataset.num_workers)]

    def state_dict(self) -> dict[str, Any]:
        epoch, batches = self._position
        return {"epoch": epoch, "batches": batches, "readers": self._readers(), "rng": rng_states()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._resume = dict(state)

    def __iter__(self) -> Iterator[Any]:
        return self._batches()

    def _skip(self, state: dict[str, Any] | None, epoch: int) -> int:
        """Batches of ``epoch`` that the checkpoint ``state`` says were trained already."""
        if state is None or int(state["epoch"]) != epoch:
            return 0
        readers = list(state.get("readers", self._readers()))
        if readers != self._readers():
            warnings.warn(
                f"the checkpoint's training stream was read by {readers[0]} rank(s) x {readers[1]} worker(s), this run "
                f"reads it with {self._readers()[0]} x {self._readers()[1]} (trainer.devices, data.num_workers): each "
                f"reader gets other clips, so epoch {epoch} restarts from its first batch", stacklevel=3)
            return 0
        skip = int(state["batches"])
        if skip > len(self.dataset):
            raise UserError(
                f"the checkpoint resumes epoch {epoch} after {skip} training batches, but this rank's stream has only "
                f"{len(self.dataset)} (data.clips_per_batch, the train split or the devices changed?)")
        return skip

    def _batches(self) -> Iterator[Any]:
        stream = self.dataset
        if self._epoch is not None:
            stream.stream.set_epoch(self._epoch())
        epoch = stream.stream.epoch
        state, self._resume = self._resume, None
        skip = self._skip(state, epoch)
        stream.resume_batches = skip  # set before the workers copy the stream
        self._position = [epoch, skip]
        iterator = super().__iter__()  # draws the workers' base seed from torch's generator
        if state is not None:
            set_rng_states(state.get("rng", {}))
        for batch in iterator:
            if batch is None:  # a worker giving up its turn (worker_positions)
                continue
            self._position[1] += 1
            yield batch
