"""Hand-written scene graphs (schema v2) and clips for the task tests: a fixed single-source scene,
a fixed multi-source scene and factories of random valid scenes of both kinds.

Independent of the scene generator (avmt/data/synth.py): only its word templates (the region
description and the referring expressions, part of the schema) are reused. Every scene made here
passes ``avmt.data.synth.validate_scene``. :func:`make_clip` wraps a scene into a
:class:`~avmt.data.sample.Clip` with tiny media and an object-id ``masks`` tensor consistent with
the scene: each visible object's box rectangle (scaled from 0..1000 to the frame size) holds
``id + 1`` on the frames of the segments where it is visible (one frame per segment).

Real AVSynth clips (rendered in memory by ``avmt.data.shards.clip_from_index``) are in the
session fixture ``synth_clips``.
"""

from __future__ import annotations

import pytest
import torch

from avmt.data.sample import Clip
from avmt.data.synth import DESCRIPTION_TEMPLATE, EXPRESSION_TEMPLATES, MOTION_PHRASES
from avmt.data.vocab import CLASSES, COLORS, MOODS, MOTIONS, POSITION_PHRASES, POSITIONS, ROWS, SHAPES

_X = {"left": (50, 300), "center": (370, 630), "right": (700, 950)}
_Y = {"top": (50, 450), "bottom": (550, 950)}
#: Frame size of the clips of :func:`make_clip` (scenes record it in ``frame_size``).
FRAME_SIZE = 8
#: Real AVSynth clips of the ``synth_clips`` fixture, and their config.
NUM_SYNTH_CLIPS = 200


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


def describe(obj):
    """The region description of a visible object ("a red violin at the top left, moving right"), else None."""
    if not obj["visible"]:
        return None
    return DESCRIPTION_TEMPLATE.format(color=obj["color"], row=obj["row"], position=obj["position"],
                                       motion=MOTION_PHRASES[obj["motion"]], **{"class": obj["class"]})


def make_object(oid, cls, *, visible=(), sounding=(), color="red", shape="circle", position="left", row="top",
                motion="static", loudness=0.8, num_segments=10):
    """One scene-graph object; ``boxes`` follow ``visible``, ``description`` is None when never visible."""
    visible, sounding = _merge(visible), _merge(sounding)
    obj = {
        "id": oid, "class": cls, "color": color, "shape": shape, "position": position, "row": row,
        "motion": motion, "visible": visible, "sounding": sounding, "loudness": loudness,
        "boxes": _boxes(visible, position, row, num_segments),
    }
    obj["description"] = describe(obj)
    return obj


def make_expressions(objects):
    """Referring expressions of a scene, deterministic: the attribute expression of every object
    that is visible and sounding (at some time), "the loudest object" when the loudest of >= 2
    sounding objects is one of those, a null expression naming a class absent from the scene, and
    a null expression for every visible silent object."""
    out = []
    referents = [o for o in objects if o["visible"] and o["sounding"]]
    for obj in referents:
        text = EXPRESSION_TEMPLATES["attribute"].format(color=obj["color"], where=POSITION_PHRASES[obj["position"]],
                                                        **{"class": obj["class"]})
        out.append({"text": text, "object": obj["id"]})
    sounding = [o for o in objects if o["sounding"]]
    if len(sounding) >= 2:
        loudest = max(sounding, key=lambda o: (o["loudness"], -o["id"]))
        if loudest in referents:
            out.append({"text": EXPRESSION_TEMPLATES["loudest"], "object": loudest["id"]})
    present = {o["class"] for o in objects}
    absent = next(c for c in CLASSES if c not in present)
    out.append({"text": EXPRESSION_TEMPLATES["null_absent"].format(where=POSITION_PHRASES["center"],
                                                                   **{"class": absent}), "object": None})
    for obj in objects:
        if obj["visible"] and not obj["sounding"]:
            text = EXPRESSION_TEMPLATES["null_silent"].format(
                color=obj["color"], where=POSITION_PHRASES[obj["position"]], **{"class": obj["class"]})
            out.append({"text": text, "object": None})
    return out


def make_scene(objects, *, av=0, mood="happy", num_segments=10, clip_id="test-00000000", seed=0,
               expressions=None, frame_size=FRAME_SIZE):
    """A scene graph (schema v2). With ``av`` an object id, ``av_event`` is that object's first
    seen-and-heard interval (a single-source scene); with ``av=None`` the scene is multi-source
    (``av_event`` and ``action`` null). ``expressions`` defaults to :func:`make_expressions`."""
    event = action = None
    if av is not None:
        obj = next(o for o in objects if o["id"] == av)
        vis = [t for s, e in obj["visible"] for t in range(s, e)]
        snd = {t for s, e in obj["sounding"] for t in range(s, e)}
        both = sorted(t for t in vis if t in snd)
        start = end = both[0]
        while end in snd and end in vis:
            end += 1
        event = {"object": av, "class": obj["class"], "range": [start, end]}
        action = obj["motion"]
    return {
        "version": 2, "clip_id": clip_id, "split": "test", "seed": seed, "num_segments": num_segments,
        "segment_seconds": 1.0, "frames_per_segment": 1, "frame_size": [frame_size, frame_size],
        "sample_rate": 16000, "mood": mood, "noise_level": 0.05, "objects": objects,
        "av_event": event, "action": action,
        "expressions": make_expressions(objects) if expressions is None else expressions,
    }


def box_pixels(box, size):
    """Pixel slices ``(rows, cols)`` of a 0..1000 box on a ``size`` x ``size`` frame (at least one pixel)."""
    x1, y1, x2, y2 = (round(v * size / 1000) for v in box)
    return slice(y1, max(y2, y1 + 1)), slice(x1, max(x2, x1 + 1))


def make_masks(scene):
    """``uint8 [T, H, W]`` object-id map of ``scene`` (one frame per segment): each object's box
    rectangle holds ``id + 1`` on the frames where it has a box."""
    height, width = scene["frame_size"]
    assert height == width and scene["frames_per_segment"] == 1
    masks = torch.zeros(scene["num_segments"], height, width, dtype=torch.uint8)
    for obj in scene["objects"]:
        for t, box in enumerate(obj["boxes"]):
            if box is not None:
                rows, cols = box_pixels(box, width)
                masks[t, rows, cols] = obj["id"] + 1
    return masks


def make_clip(scene, masks=None):
    """A :class:`Clip` around ``scene``: zero frames ``[T, 3, H, W]`` and audio, and ``masks``
    (default :func:`make_masks`)."""
    t = scene["num_segments"]
    height, width = scene["frame_size"]
    return Clip(key=scene["clip_id"], frames=torch.zeros(t, 3, height, width, dtype=torch.uint8),
                audio=torch.zeros(t * 160), scene=scene, masks=make_masks(scene) if masks is None else masks)


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


def multi_scene():
    """Multi-source: a red violin top left seen and heard 1-6 (moving right), a green flute bottom
    right seen and heard 3-9, a blue cat top center seen 0-10 but silent; mood calm."""
    objects = [
        make_object(0, "violin", visible=[[1, 6]], sounding=[[1, 6]], color="red", position="left",
                    motion="moving right", loudness=0.55),
        make_object(1, "flute", visible=[[3, 9]], sounding=[[3, 9]], color="green", shape="diamond",
                    position="right", row="bottom", motion="moving up", loudness=0.85),
        make_object(2, "cat", visible=[[0, 10]], color="blue", shape="square", position="center", loudness=0.0),
    ]
    return make_scene(objects, av=None, mood="calm", clip_id="test-00000002")


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


def _free_cell(position, row, taken):
    """``(position, row)``, or the first free screen cell when it is taken (objects never overlap)."""
    if (position, row) not in taken:
        return position, row
    return next((p, r) for r in ROWS for p in POSITIONS if (p, r) not in taken)


def _attributes(rng, num_segments, taken):
    """Random colour, shape, cell, motion and loudness of one object (its cell not in ``taken``)."""
    common = dict(color=rng.choice(COLORS), shape=rng.choice(SHAPES), position=rng.choice(POSITIONS),
                  row=rng.choice(ROWS), motion=rng.choice(MOTIONS),
                  loudness=round(rng.uniform(0.2, 1.0), 2),
                  num_segments=num_segments)
    common["position"], common["row"] = _free_cell(common["position"], common["row"], taken)
    taken.add((common["position"], common["row"]))
    return common


def random_scene(rng, num_classes=len(CLASSES), num_segments=10, clip_id="rand"):
    """A random valid single-source scene: one AV-event object plus 0-2 distractors (audio-only,
    visual-only, or both but never at the same time); classes usually distinct, cells distinct."""
    n = rng.randint(1, 3)
    classes = rng.sample(CLASSES[:num_classes], k=n)
    if n > 1 and rng.random() < 0.05:
        classes[-1] = classes[0]  # occasional repeated class
    objects, taken = [], set()
    for i, cls in enumerate(classes):
        common = _attributes(rng, num_segments, taken)
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


def random_multi_scene(rng, num_classes=len(CLASSES), num_segments=10, clip_id="rand-multi"):
    """A random valid multi-source scene: 2-3 co-sources, each seen and heard over one range, all
    ranges sharing >= 2 segments, and maybe one silent visible or audio-only object; distinct
    classes and cells; ``av_event`` and ``action`` null."""
    n_sources = rng.randint(2, 3)
    extra = rng.choice([None, "visual", "audio"]) if n_sources == 2 else None
    classes = rng.sample(CLASSES[:num_classes], k=n_sources + (extra is not None))
    core = _span(rng, num_segments, min_len=2)
    objects, taken = [], set()
    for i, cls in enumerate(classes):
        common = _attributes(rng, num_segments, taken)
        if i < n_sources:
            span = [rng.randint(0, core[0]), rng.randint(core[1], num_segments)]
            objects.append(make_object(i, cls, visible=[span], sounding=[span], **common))
        elif extra == "visual":
            objects.append(make_object(i, cls, visible=[_span(rng, num_segments)], **dict(common, loudness=0.0)))
        else:
            objects.append(make_object(i, cls, sounding=[_span(rng, num_segments)], **dict(common, motion="static")))
    return make_scene(objects, av=None, mood=rng.choice(MOODS), num_segments=num_segments, clip_id=clip_id)


@pytest.fixture
def scene():
    """The fixed scene of :func:`basic_scene`."""
    return basic_scene()


@pytest.fixture
def clip():
    """A clip around :func:`basic_scene`."""
    return make_clip(basic_scene())


@pytest.fixture
def multi_clip():
    """A clip around the multi-source :func:`multi_scene`."""
    return make_clip(multi_scene())


@pytest.fixture(scope="session")
def scene_factory():
    """The factories, for tests that write their own scenes: ``.object``, ``.scene``, ``.clip``,
    ``.masks``, ``.random_scene``, ``.random_multi_scene``, ``.basic_scene``, ``.multi_scene``,
    ``.expressions``, ``.describe``, ``.box_pixels``."""

    class Factory:
        object = staticmethod(make_object)
        scene = staticmethod(make_scene)
        clip = staticmethod(make_clip)
        masks = staticmethod(make_masks)
        random_scene = staticmethod(random_scene)
        random_multi_scene = staticmethod(random_multi_scene)
        basic_scene = staticmethod(basic_scene)
        multi_scene = staticmethod(multi_scene)
        expressions = staticmethod(make_expressions)
        describe = staticmethod(describe)
        box_pixels = staticmethod(box_pixels)

    return Factory


def same(a, b):
    """Deep equality of answers and samples that may hold tensors (equal shape, dtype and values)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype
                and a.shape == b.shape and bool(torch.equal(a, b)))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


@pytest.fixture(scope="session")
def same_value():
    """:func:`same`: deep equality through tensors."""
    return same


@pytest.fixture(scope="session")
def synth_clips():
    """``NUM_SYNTH_CLIPS`` real AVSynth v2 clips (32x32 frames, half of them multi-source),
    rendered in memory with their masks; built once per session."""
    from avmt.data.shards import clip_from_index
    from avmt.data.synth import SynthConfig

    cfg = SynthConfig(frame_size=32, multi_source=0.5)
    return [clip_from_index(i, "val", 11, cfg) for i in range(NUM_SYNTH_CLIPS)]
