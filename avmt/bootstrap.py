"""Bootstrap noise of a task's scores: how much each metric moves when the scored samples are resampled.

:func:`bootstrap_std` scores ``resamples`` resamples (with replacement, same size) of the scored
(prediction, answer) pairs, each with a fresh ``task.metrics()`` collection, so every metric is
computed by its own code (corpus-level metrics such as CIDEr-D included). The standard deviation of
a metric over the resamples estimates the standard error of its value on these samples: the noise
a score difference has to exceed before it says something about the model rather than the samples.
"""

from __future__ import annotations

import math
import random
import statistics
from typing import Any, Sequence

from avmt.tasks.base import Task

__all__ = ["bootstrap_std"]


def _never_distributed() -> bool:
    return False


def bootstrap_std(task: Task, predictions: Sequence[Any], answers: Sequence[Any], resamples: int,
                  seed: int = 0) -> dict[str, float]:
    """Standard deviation of each of the task's metrics over bootstrap resamples of the scored samples.

    Args:
        task: the task whose ``metrics()`` scores every resample (a fresh collection each time).
        predictions: N parsed predictions (``None`` = parse failure), as given to the task's metrics.
        answers: the N ground-truth answers paired with ``predictions``.
        resamples: number of resamples, each N indices drawn with replacement; fewer than 2 (or no
            samples) gives ``{}``.
        seed: seed of the local random generator that draws the indices (the global RNGs are untouched).
    Returns:
        metric name -> sample standard deviation (float) of its value over the resamples; a metric that
        is not finite in some resample is left out.
    """
    if len(predictions) != len(answers):
        raise ValueError(f"bootstrap_std: got {len(predictions)} predictions for {len(answers)} answers")
    count = len(predictions)
    if resamples < 2 or count == 0:
        return {}
    rng = random.Random(seed)
    values: dict[str, list[float]] = {}
    for _ in range(resamples):
        indices = [rng.randrange(count) for _ in range(count)]
        collection = task.metrics()
        for metric in collection.values():  # a resample of samples every rank already holds: no sync
            metric.distributed_available_fn = _never_distributed
        collection.update([predictions[i] for i in indices], [answers[i] for i in indices])
        for key, value in collection.compute().items():
            values.setdefault(key, []).append(float(value))
    return {key: statistics.stdev(samples) for key, samples in values.items()
            if len(samples) == resamples and all(math.isfinite(v) for v in samples)}
