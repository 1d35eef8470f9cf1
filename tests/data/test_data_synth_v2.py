"""AVSynth v2 (avmt/data/synth.py): exact masks and boxes, multi-source scenes, region descriptions,
referring expressions, and the v1 scene distribution kept under ``multi_source=0``."""

import copy
import dataclasses
import hashlib
import json
import re
from collections import Counter

import numpy as np
import pytest

from avmt.data import vocab
from avmt.data.sample import segment_frames
from avmt.data.synth import (
    BACKGROUND_RGB,
    CLASS_STYLES,
    COLOR_RGB,
    DESCRIPTION_TEMPLATE,
    EXPRESSION_TEMPLATES,
    MOTION_PHRASES,
    ORDINALS,
    TEXTURE_DARK,
    SynthConfig,
    describe_object,
    generate_scene,
    is_multi_source,
    render_frames,
    render_masks,
    validate_scene,
)
from avmt.intervals import intersect_ranges, ranges_to_mask

V1_TOP = (
    "clip_id", "split", "seed", "num_segments", "segment_seconds", "frames_per_segment", "frame_size",
    "sample_rate", "mood", "noise_level", "av_event", "action",
)  # fmt: skip
V1_OBJECT = (
    "id", "class", "color", "shape", "position", "row", "motion", "visible", "sounding", "loudness", "boxes",
)  # fmt: skip

SMALL = SynthConfig(
    num_segments=4, frames_per_segment=2, frame_size=32, sample_rate=8000, segment_seconds=0.5,
    random_colors=True, num_classes=12,
)  # fmt: skip


def _v1_fields(scene):
    out = {k: scene[k] for k in V1_TOP}
    out["objects"] = [{k: o[k] for k in V1_OBJECT} for o in scene["objects"]]
    return out


def _v1_digest(cfg, n, split, seed):
    h = hashlib.sha256()
    for i in range(n):
        h.update(json.dumps(_v1_fields(generate_scene(i, split, seed, cfg)), sort_keys=True).encode())
    return h.hexdigest()


# ------------------------------------------------------------------------------- v1 distribution kept


@pytest.mark.parametrize(
    "cfg, split, seed, digest",
    [
        # digests of the v1 fields that the AVSynth v1 generator (GENERATOR_VERSION 1) produced
        (SynthConfig(), "train", 0, "c3a9dfc98c347abe03799e833fc28fc43d9b2291d449d87fb6b64aae4ac5bdbc"),
        (SMALL, "val", 7, "6466fc4ce3bd1e67404e645e8a799e6be1faddda33dbbe5571d123c14b3465d1"),
    ],
)
def test_multi_source_zero_keeps_the_v1_scenes(cfg, split, seed, digest):
    assert cfg.multi_source == 0.0
    assert _v1_digest(cfg, 40, split, seed) == digest


def test_single_source_scenes_do_not_depend_on_multi_source():
    """The multi-source coin has its own random stream: a scene that is not multi-source is the
    same scene (every field) whatever the probability."""
    base, mixed = SynthConfig(frame_size=32), SynthConfig(frame_size=32, multi_source=0.4)
    multi = 0
    for i in range(200):
        scene = generate_scene(i, "train", 1, mixed)
        if is_multi_source(scene):
            multi += 1
        else:
            assert scene == generate_scene(i, "train", 1, base)
    assert 40 <= multi <= 120  # ~ 0.4 x 200
    assert not any(is_multi_source(generate_scene(i, "train", 1, base)) for i in range(200))


# ------------------------------------------------------------------------------- masks and boxes

MASK_CONFIGS = [
    SynthConfig(),
    SynthConfig(frame_size=48, frames_per_segment=2, num_segments=6, multi_source=0.5),
    SynthConfig(frame_size=37, random_colors=True, multi_source=1.0, num_classes=16),
    SMALL,
]


@pytest.mark.parametrize("cfg", MASK_CONFIGS, ids=["default", "48px-F2-ms", "37px-multi", "small"])
def test_masks_are_exact(cfg):
    cfg = dataclasses.replace(cfg, visual_noise=0.0)
    T, F, H, W = cfg.num_segments, cfg.frames_per_segment, cfg.frame_size, cfg.frame_size
    background = np.array(BACKGROUND_RGB, np.uint8)
    for i in range(60):
        scene = generate_scene(i, "train", 13, cfg)
        masks = render_masks(scene, cfg)
        frames = render_frames(scene, cfg).transpose(0, 2, 3, 1)  # [N, H, W, 3]
        assert masks.shape == (T * F, H, W) and masks.dtype == np.uint8
        assert set(np.unique(masks).tolist()) <= {0} | {o["id"] + 1 for o in scene["objects"]}
        # the background of the masks is exactly the background of the frames
        np.testing.assert_array_equal(masks == 0, (frames == background).all(-1))
        for obj in scene["objects"]:
            mine = masks == obj["id"] + 1
            # rendered alone, the object paints exactly its mask (so nothing hides any of it)
            alone = dict(scene, objects=[obj])
            np.testing.assert_array_equal(render_masks(alone, cfg) > 0, mine)
            painted = (render_frames(alone, cfg).transpose(0, 2, 3, 1) != background).any(-1)
            np.testing.assert_array_equal(painted, mine)
            # and in the full frame every mask pixel has the object's colour (light or dark texture cell)
            light = np.array(COLOR_RGB[obj["color"]], np.uint8)
            dark = np.round(light * TEXTURE_DARK).astype(np.uint8)
            pix = frames[mine]
            assert ((pix == light).all(1) | (pix == dark).all(1)).all()
            # empty exactly on the frames of the segments where the object is not visible
            visible = np.repeat(ranges_to_mask(obj["visible"], T), F)
            np.testing.assert_array_equal(mine.any(axis=(1, 2)), visible)
            # boxes: the bounding box of the segment's mask pixels (union of its F frames), which
            # for F = 1 is the mask of the segment frame
            per_seg = mine.reshape(T, F, H, W).any(1)
            if F == 1:
                np.testing.assert_array_equal(per_seg, mine[segment_frames(T * F, T)])
            for t, box in enumerate(obj["boxes"]):
                if box is None:
                    assert not per_seg[t].any()
                    continue
                ys, xs = np.nonzero(per_seg[t])
                expected = [
                    round(1000 * xs.min() / W), round(1000 * ys.min() / H),
                    round(1000 * (xs.max() + 1) / W), round(1000 * (ys.max() + 1) / H),
                ]  # fmt: skip
                assert box == expected, (scene["clip_id"], obj["id"], t)


def test_objects_never_overlap_even_in_a_full_screen():
    """All six screen cells taken at once, for every motion and several jitters and sizes: no
    pixel is claimed twice (render_masks raises on an overlap) and no object is clipped."""
    for size in (32, 33, 64, 100):
        cfg = SynthConfig(frame_size=size, num_segments=4)
        for seed in range(5):
            scene = generate_scene(seed, "train", 0, cfg)
            proto = scene["objects"][0]
            cells = [(row, pos) for row in vocab.ROWS for pos in vocab.POSITIONS]
            for motion in vocab.MOTIONS:
                objects = [
                    dict(proto, id=k, position=pos, row=row, motion=motion, visible=[[0, 4]],
                         shape=CLASS_STYLES[vocab.CLASSES[k]].shape, **{"class": vocab.CLASSES[k]})
                    for k, (row, pos) in enumerate(cells)
                ]  # fmt: skip
                crowded = dict(scene, objects=objects)
                masks = render_masks(crowded, cfg)
                for obj in objects:
                    alone = render_masks(dict(scene, objects=[obj]), cfg) > 0
                    np.testing.assert_array_equal(masks == obj["id"] + 1, alone)
    # two objects in one cell would overlap: refused, not silently merged
    clash = dict(scene, objects=[dict(proto, id=0, visible=[[0, 4]]), dict(proto, id=1, visible=[[0, 4]])])
    with pytest.raises(ValueError, match="overlaps"):
        render_masks(clash, cfg)


# ------------------------------------------------------------------------------- multi-source scenes


def _co_sources(scene):
    return [o for o in scene["objects"] if o["visible"] and o["visible"] == o["sounding"]]


@pytest.mark.parametrize("cfg", [SynthConfig(multi_source=1.0), dataclasses.replace(SMALL, multi_source=1.0)])
def test_multi_source_scenes(cfg):
    T = cfg.num_segments
    shapes, thirds = Counter(), Counter()
    for i in range(150):
        scene = generate_scene(i, "train", 5, cfg)
        validate_scene(scene)
        assert is_multi_source(scene) and scene["av_event"] is None and scene["action"] is None
        objects = scene["objects"]
        assert 2 <= len(objects) <= 3
        co = _co_sources(scene)
        assert len(co) >= 2
        for obj in co:  # one contiguous range, seen and heard
            assert len(obj["visible"]) == 1
        common = co[0]["visible"]
        for obj in co[1:]:
            common = intersect_ranges(common, obj["visible"])
        assert common and common[0][1] - common[0][0] >= cfg.min_event_segments
        others = [o for o in objects if o not in co]
        assert len(others) <= 1
        for obj in others:  # a silent visible distractor or an audio-only object
            assert bool(obj["visible"]) != bool(obj["sounding"])
            thirds["visual-only" if obj["visible"] else "audio-only"] += 1
        loud = [o["loudness"] for o in objects if o["sounding"]]
        assert len(set(loud)) == len(loud) and all(v > 0 for v in loud)
        shapes[(len(objects), len(co))] += 1
    assert set(shapes) == {(2, 2), (3, 2), (3, 3)}
    assert set(thirds) == {"visual-only", "audio-only"}


def test_multi_source_respects_min_objects_and_the_mix():
    cfg = SynthConfig(multi_source=1.0, min_objects=3, frame_size=32)
    assert all(len(generate_scene(i, "train", 0, cfg)["objects"]) == 3 for i in range(30))
    mixed = SynthConfig(multi_source=0.3, frame_size=32)
    multi = sum(is_multi_source(generate_scene(i, "val", 2, mixed)) for i in range(400))
    assert 80 <= multi <= 160
    for i in range(100):  # both kinds validate, each with its own invariant
        scene = generate_scene(i, "val", 2, mixed)
        validate_scene(scene)
        both = [
            o for o in scene["objects"]
            if (ranges_to_mask(o["visible"], 10) & ranges_to_mask(o["sounding"], 10)).any()
        ]  # fmt: skip
        assert (len(both) >= 2) if is_multi_source(scene) else (len(both) == 1)


def test_validate_rejects_a_fake_multi_source_scene():
    cfg = SynthConfig(multi_source=1.0, frame_size=32)
    scene = generate_scene(0, "train", 0, cfg)
    validate_scene(scene)
    bad = copy.deepcopy(scene)
    co = _co_sources(bad)
    bad["av_event"] = {"object": co[0]["id"], "class": co[0]["class"], "range": co[0]["visible"][0]}
    bad["action"] = co[0]["motion"]
    with pytest.raises(ValueError, match="exactly one audio-visual object"):
        validate_scene(bad)
    lonely = copy.deepcopy(scene)
    for obj in _co_sources(lonely)[1:]:
        obj.update(sounding=[], loudness=0.0)
    lonely["expressions"] = [e for e in lonely["expressions"] if e["object"] is None]
    with pytest.raises(ValueError, match="not multi-source"):
        validate_scene(lonely)


# ------------------------------------------------------------------------------- descriptions


def _words(text):
    return re.findall(r"[a-z]+", text.lower())


def _template_words(template):
    return set(_words(re.sub(r"\{[a-z]+\}", " ", template)))


def test_descriptions():
    cfg = SynthConfig(multi_source=0.5, random_colors=True, num_classes=16)
    allowed = (
        _template_words(DESCRIPTION_TEMPLATE) | {w for p in MOTION_PHRASES.values() for w in _words(p)}
        | set(vocab.CLASSES) | set(vocab.COLORS) | set(vocab.POSITIONS) | set(vocab.ROWS)
    )  # fmt: skip
    assert set(MOTION_PHRASES) == set(vocab.MOTIONS)
    seen = set()
    for i in range(150):
        for obj in generate_scene(i, "train", 9, cfg)["objects"]:
            text = obj["description"]
            if not obj["visible"]:
                assert text is None
                continue
            expected = (
                f"a {obj['color']} {obj['class']} at the {obj['row']} {obj['position']}, "
                f"{MOTION_PHRASES[obj['motion']]}"
            )
            assert text == expected == describe_object(obj)
            assert set(_words(text)) <= allowed
            seen.add(obj["motion"])
    assert seen == set(vocab.MOTIONS)
    violin = {"color": "red", "class": "violin", "row": "top", "position": "left", "motion": "moving right",
              "visible": [[0, 2]]}  # fmt: skip
    assert describe_object(violin) == "a red violin at the top left, moving right"


# ------------------------------------------------------------------------------- referring expressions


def _kind_patterns():
    slots = {
        "color": "|".join(vocab.COLORS),
        "class": "|".join(vocab.CLASSES),
        "where": "|".join(re.escape(p) for p in vocab.POSITION_PHRASES.values()),
        "ordinal": "|".join(ORDINALS),
    }
    patterns = {}
    for kind, template in EXPRESSION_TEMPLATES.items():
        rx = re.escape(template)
        for slot, alternatives in slots.items():
            rx = rx.replace(re.escape("{" + slot + "}"), f"(?P<{slot}>{alternatives})")
        patterns[kind] = re.compile(f"^{rx}$")
    return patterns


PATTERNS = _kind_patterns()


def _parse(text):
    """(kind, slots) of an expression; null kinds share templates with others only when their
    slots differ, so the kind is the one the object field agrees with (checked by the caller)."""
    matches = [(kind, m.groupdict()) for kind, m in ((k, p.match(text)) for k, p in PATTERNS.items()) if m]
    assert matches, f"{text!r} matches no template"
    return matches


def _column_of(where):
    return next(col for col, phrase in vocab.POSITION_PHRASES.items() if phrase == where)


def _check_expressions(scene, classes):
    objects = scene["objects"]
    by_id = {o["id"]: o for o in objects}
    referents = {o["id"] for o in objects if o["visible"] and o["sounding"]}
    sounding = [o for o in objects if o["sounding"]]
    exprs = scene["expressions"]
    assert any(e["object"] is None for e in exprs), "at least one null expression"
    if referents:
        assert any(e["object"] is not None for e in exprs), "at least one expression with a referent"
    assert {e["object"] for e in exprs if e["object"] is not None} == referents  # each referent is named
    kinds = []
    for e in exprs:
        assert set(e) == {"text", "object"} and e["text"]
        matches = _parse(e["text"])
        if e["object"] is None:
            kind, slots = next((k, s) for k, s in matches if k.startswith("null_"))
            # a null expression describes nothing that sounds
            for obj in sounding:
                same_class = obj["class"] == slots["class"]
                same_place = vocab.POSITION_PHRASES[obj["position"]] == slots["where"]
                assert not (same_class and same_place), (e, obj)
            if kind == "null_absent" and slots["class"] in {o["class"] for o in objects}:
                # only when every class of the config is in the scene: a present class, elsewhere
                assert {o["class"] for o in objects} >= set(classes)
            if kind == "null_silent":
                silent = [
                    o for o in objects if o["visible"] and not o["sounding"] and o["class"] == slots["class"]
                ]  # fmt: skip
                assert len(silent) == 1 and silent[0]["color"] == slots["color"]
                assert _column_of(slots["where"]) == silent[0]["position"]
        else:
            obj = by_id[e["object"]]
            assert obj["id"] in referents  # visible at some time and sounding at some time
            kind, slots = next((k, s) for k, s in matches if not k.startswith("null_"))
            if "class" in slots:
                assert slots["class"] == obj["class"]
            if "color" in slots:
                assert slots["color"] == obj["color"]
            if "where" in slots:
                assert _column_of(slots["where"]) == obj["position"]
            if kind == "order":  # the rank of its onset among all sounding objects (distinct onsets)
                onsets = sorted(o["sounding"][0][0] for o in sounding)
                assert len(set(onsets)) == len(onsets) >= 2
                assert onsets.index(obj["sounding"][0][0]) == ORDINALS.index(slots["ordinal"])
            if kind == "loudest":
                assert len(sounding) >= 2 and obj["loudness"] == max(o["loudness"] for o in sounding)
            if kind == "quietest":
                assert len(sounding) >= 2 and obj["loudness"] == min(o["loudness"] for o in sounding)
        kinds.append(kind)
    # every silent visible object gets its null expression
    assert kinds.count("null_silent") == sum(1 for o in objects if o["visible"] and not o["sounding"])
    return kinds


@pytest.mark.parametrize(
    "cfg",
    [
        SynthConfig(multi_source=0.5),
        SynthConfig(multi_source=0.5, random_colors=True, num_classes=16, frame_size=32),
        SynthConfig(num_classes=3, min_objects=3, frame_size=32),  # every class in every scene
        SynthConfig(num_classes=2, max_objects=2, min_objects=1, frame_size=32, multi_source=0.5),
    ],
    ids=["default", "16-classes", "all-classes-present", "two-classes"],
)
def test_expressions(cfg):
    kinds = Counter()
    for i in range(200):
        scene = generate_scene(i, "train", 17, cfg)
        kinds.update(_check_expressions(scene, cfg.classes))
    if cfg.max_objects == 3:
        assert set(kinds) == set(EXPRESSION_TEMPLATES), kinds  # every kind is generated somewhere
    else:
        assert set(kinds) >= set(EXPRESSION_TEMPLATES) - {"null_silent"} - {"order"}, kinds


def test_expression_words_are_declared():
    """Every word of every text is a template word or a vocabulary word (what a task declares)."""
    allowed = (
        {w for t in EXPRESSION_TEMPLATES.values() for w in _template_words(t)} | set(ORDINALS)
        | set(vocab.CLASSES) | set(vocab.COLORS)
        | {w for p in vocab.POSITION_PHRASES.values() for w in _words(p)}
    )  # fmt: skip
    cfg = SynthConfig(multi_source=0.5, random_colors=True, num_classes=16, frame_size=32)
    for i in range(200):
        for e in generate_scene(i, "test", 4, cfg)["expressions"]:
            assert set(_words(e["text"])) <= allowed, e["text"]
            assert e["text"] == e["text"].strip() and "  " not in e["text"] and "{" not in e["text"]
