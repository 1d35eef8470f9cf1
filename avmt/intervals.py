"""Interval arithmetic on the segment grid: ``[start, end)`` ranges of whole segments.

The one place where ranges and per-segment masks are converted into each other; the AVSynth
generator, the tasks and the metrics all use it.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

__all__ = [
    "merge_ranges",
    "intersect_ranges",
    "ranges_total",
    "ranges_onset",
    "ranges_to_mask",
    "mask_to_ranges",
]


def merge_ranges(ranges: Iterable[Sequence[int]]) -> list[list[int]]:
    """Sort ``[start, end)`` ranges and merge overlapping or touching ones; empty ones dropped."""
    out: list[list[int]] = []
    for s, e in sorted((int(r[0]), int(r[1])) for r in ranges):
        if e <= s:
            continue
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def intersect_ranges(a: Iterable[Sequence[int]], b: Iterable[Sequence[int]]) -> list[list[int]]:
    """Intersection of two sets of ``[start, end)`` ranges, as merged sorted ranges."""
    out = []
    for s1, e1 in merge_ranges(a):
        for s2, e2 in merge_ranges(b):
            s, e = max(s1, s2), min(e1, e2)
            if s < e:
                out.append([s, e])
    return merge_ranges(out)


def ranges_total(ranges: Iterable[Sequence[int]]) -> int:
    """Number of segments covered by the (merged) ranges."""
    return sum(e - s for s, e in merge_ranges(ranges))


def ranges_onset(ranges: Iterable[Sequence[int]]) -> int | None:
    """First covered segment, or None for no ranges."""
    merged = merge_ranges(ranges)
    return merged[0][0] if merged else None


def ranges_to_mask(ranges: Iterable[Sequence[int]], num_segments: int) -> np.ndarray:
    """bool mask ``[num_segments]`` of the segments the ranges cover (clipped to ``[0, num_segments)``)."""
    mask = np.zeros(int(num_segments), dtype=bool)
    for s, e in ranges:
        mask[max(0, int(s)) : max(0, min(int(num_segments), int(e)))] = True
    return mask


def mask_to_ranges(mask: Sequence[bool] | np.ndarray) -> list[list[int]]:
    """Contiguous runs of True in a mask ``[T]`` as sorted, separate ``[start, end)`` ranges."""
    padded = np.concatenate([[0], np.asarray(mask, dtype=np.int8).reshape(-1), [0]])
    edges = np.flatnonzero(np.diff(padded))
    return [[int(s), int(e)] for s, e in zip(edges[0::2], edges[1::2])]
