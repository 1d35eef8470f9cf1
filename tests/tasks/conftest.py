"""Hand-written scene graphs (schema v1) for the task tests: a fixed scene and a factory of
random valid scenes. Independent of the scene generator (avmt/data/synth.py)."""

from __future__ import annotations

import pytest
import torch

from avmt.data.vocab import CLASSES, COLORS, MOODS, MOTIONS, POSITIONS, ROWS, SHAPES

_X = {"left": (50, 300), "center": (370, 630), "right": (700, 950)}
_Y = {"top": (50, 450), "bottom": (550, 950)}


def _boxes(visible, position, row, num_segments):
    boxes = [None] * num_segments
    for s, e in visible:
        for t in range(s, e):
            x1, x2 = _X[position]
            y1, y2 = _Y[row]
            boxes[t] = [x1, y1, x2, y2]
    return boxes


def _merge(ranges):
    out = []
    for s, e in sorted(tuple(r) for r in ranges):
        if out and s <= out[-1][1]:
            out[-1][1] = max(out[-1][1], e)
        else:
            out.append([s, e])
    return out


def make_object(oid, cls, *, visible=(), sounding=(), color="red", shape="circle", position="left", row="top",
                motion="static", loudness=0.8, num_segments=10):
    """One scene-graph object; ``boxes`` follow ``visible``."""
    visible, sounding = _merge(visible), _merge(sounding)
    return {
        "id": oid, "class": cls, "color": color, "shape": shape, "position": position, "row": row,
        "motion": motion, "visible": visible, "sounding": sounding, "loudness": loudness,
        "boxes": _boxes(visible, position, row, num_segments),
    }


def make_scene(objects, *, av=0, mood="happy", num_segments=10, clip_id="test-00000000", seed=0):
    """A scene graph; ``av_event`` is object ``av``'s first seen-and-heard interval."""
    obj = next(o for o in objects if o["id"] == av)
    vis = [t for s, e in obj["visible"] for t in range(s, e)]
    snd = {t for s, e in obj["sounding"] for t in range(s, e)}
    both = sorted(t for t in vis if t in snd)
    start = end = both[0]
    while end in snd and end in vis:
        end += 1
    return {
        "version": 1, "clip_id": clip_id, "split": "test", "seed": seed, "num_segments": num_segments,
        "segment_seconds": 1.0, "frames_per_segment": 1, "frame_size": [64, 64], "sample_rate": 16000,
        "mood": mood, "noise_level": 0.05, "objects": objects,
        "av_event": {"object": av, "class": obj["class"], "range": [start, end]},
        "action": obj["motion"],
    }


def make_clip(scene):
    """A clip dict around ``scene`` with tiny media (the tasks read only the scene)."""
    t = scene["num_segments"]
    return {"key": scene["clip_id"], "frames": torch.zeros(t, 3, 8, 8, dtype=torch.uint8),
            "audio": torch.zeros(t * 160), "scene": scene}


def basic_scene():
    """Red violin on the left seen and heard 2-7 (moving right), a dog heard 0-3 and 8-10 but
    never seen, a blue cat on the right seen 4-9 but silent; mood happy."""
    objects = [
        make_object(0, "violin", visible=[[2, 7]], sounding=[[2, 7]], color="red", position="left",
                    motion="moving right", loudness=0.8),
        make_object(1, "dog", sounding=[[0, 3], [8, 10]], color="yellow", shape="triangle", position="center",
                    row="bottom", loudness=0.5),
        make_object(2, "cat", visible=[[4, 9]], color="blue", shape="square", position="right", loudness=0.6),
    ]
    return make_scene(objects, av=0, mood="happy", clip_id="test-00000001")


def _span(rng, num_segments, min_len=1, max_len=None):
    max_len = max_len or num_segments
    length = rng.randint(min_len, max_len)
    start = rng.randint(0, num_segments - length)
    return [start, start + length]


def _free_ranges(rng, num_segments, taken):
    """1-2 ranges avoiding the segments in ``taken`` (for 'both but never at the same time')."""
    free = [t for t in range(num_segments) if t not in taken]
    runs, cur = [], []
    for t in free:
        if cur and t != cur[-1] + 1:
            runs.append(cur)
            cur = []
        cur.append(t)
    if cur:
        runs.append(cur)
    out = []
    for run in rng.sample(runs, k=min(len(runs), rng.randint(1, 2))):
        s = rng.choice(run)
        e = rng.randint(s + 1, run[-1] + 1)
        out.append([s, e])
    return sorted(out)


def random_scene(rng, num_classes=len(CLASSES), num_segments=10, clip_id="rand"):
    """A random valid scene: one AV-event object plus 0-2 distractors (audio-only, visual-only,
    or both but never at the same time); classes usually distinct."""
    n = rng.randint(1, 3)
    classes = rng.sample(CLASSES[:num_classes], k=n)
    if n > 1 and rng.random() < 0.05:
        classes[-1] = classes[0]  # occasional repeated class
    objects = []
    for i, cls in enumerate(classes):
        common = dict(color=rng.choice(COLORS), shape=rng.choice(SHAPES), position=rng.choice(POSITIONS),
                      row=rng.choice(ROWS), motion=rng.choice(MOTIONS),
                      loudness=round(rng.uniform(0.2, 1.0), 2),
                      num_segments=num_segments)
        if i == 0:
            av = _span(rng, num_segments, min_len=2)
            vis = [min(av[0], rng.randint(0, av[0])), max(av[1], rng.randint(av[1], num_segments))]
            snd = [av]
            if rng.random() < 0.3:  # also heard while not visible
                snd += _free_ranges(rng, num_segments, set(range(vis[0], vis[1])))[:1]
            objects.append(make_object(i, cls, visible=[av] if rng.random() < 0.6 else [vis],
                                       sounding=sorted(snd), **common))
            continue
        kind = rng.choice(["audio", "visual", "both"])
        if kind == "audio":
            objects.append(make_object(i, cls, sounding=[_span(rng, num_segments)], **common))
        elif kind == "visual":
            objects.append(make_object(i, cls, visible=[_span(rng, num_segments)], **common))
        else:
            vis = _span(rng, num_segments, max_len=num_segments - 2)
            snd = _free_ranges(rng, num_segments, set(range(*vis)))
            objects.append(make_object(i, cls, visible=[vis], sounding=snd, **common))
    return make_scene(objects, av=0, mood=rng.choice(MOODS), num_segments=num_segments, clip_id=clip_id)


@pytest.fixture
def scene():
    """The fixed scene of :func:`basic_scene`."""
    return basic_scene()


@pytest.fixture
def clip():
    """A clip around :func:`basic_scene`."""
    return make_clip(basic_scene())


@pytest.fixture(scope="session")
def scene_factory():
    """The factories, for tests that write their own scenes: ``.object``, ``.scene``, ``.clip``,
    ``.random_scene``, ``.basic_scene``."""

    class Factory:
        object = staticmethod(make_object)
        scene = staticmethod(make_scene)
        clip = staticmethod(make_clip)
        random_scene = staticmethod(random_scene)
        basic_scene = staticmethod(basic_scene)

    return Factory
