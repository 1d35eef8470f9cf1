"""AVSynth scene generation and rendering (avmt/data/synth.py)."""

import dataclasses

import numpy as np
import pytest

from avmt.data import vocab
from avmt.data.synth import (
    BACKGROUND_RGB,
    CLASS_STYLES,
    COLOR_RGB,
    TEXTURE_DARK,
    SynthConfig,
    generate_scene,
    mood_audio,
    object_audio,
    render_audio,
    render_clip,
    render_frames,
    render_masks,
    scene_seed,
    validate_scene,
)
from avmt.intervals import mask_to_ranges, ranges_to_mask

SCENE_KEYS = {
    "version", "clip_id", "split", "seed", "num_segments", "segment_seconds", "frames_per_segment",
    "frame_size", "sample_rate", "mood", "noise_level", "objects", "av_event", "action", "expressions",
}  # fmt: skip
OBJECT_KEYS = {
    "id", "class", "color", "shape", "position", "row", "motion", "visible", "sounding", "loudness", "boxes",
    "description",
}  # fmt: skip


def _scenes(n, cfg, split="train", seed=0):
    return [generate_scene(i, split, seed, cfg) for i in range(n)]


def _find(cfg, pred, limit=400):
    for i in range(limit):
        scene = generate_scene(i, "train", 3, cfg)
        if pred(scene):
            return scene
    raise AssertionError("no scene satisfies the predicate")


def _px_box(box, h, w):
    x1, y1, x2, y2 = box
    return round(x1 * w / 1000), round(y1 * h / 1000), round(x2 * w / 1000), round(y2 * h / 1000)


# ------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"num_classes": 0}, "num_classes"),
        ({"num_classes": 99}, "num_classes"),
        ({"num_classes": 2, "max_objects": 3}, "num_classes"),
        ({"max_objects": 4}, "max_objects"),
        ({"min_objects": 3, "max_objects": 2}, "min_objects"),
        ({"num_segments": 1}, "num_segments"),
        ({"min_event_segments": 1}, "min_event_segments"),
        ({"frame_size": 8}, "frame_size"),
        ({"frame_size": 64.0}, "frame_size"),
        ({"frames_per_segment": 0}, "frames_per_segment"),
        ({"sample_rate": 100}, "sample_rate"),
        ({"segment_seconds": 0.0}, "segment_seconds"),
        ({"segment_seconds": 1 / 3}, "segment_seconds"),
        ({"noise_level": -0.1}, "noise_level"),
        ({"noise_level": float("nan")}, "noise_level"),
        ({"random_colors": "yes"}, "random_colors"),
        ({"visual_noise": 2.0}, "visual_noise"),
        ({"multi_source": 1.5}, "multi_source"),
        ({"multi_source": -0.1}, "multi_source"),
        ({"multi_source": "often"}, "multi_source"),
        ({"multi_source": 0.5, "min_objects": 1, "max_objects": 1}, "multi_source"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        SynthConfig(**kwargs)


def test_config_defaults_and_dict():
    cfg = SynthConfig()
    assert cfg.classes == vocab.CLASSES[:8]
    assert (cfg.num_frames, cfg.num_samples) == (10, 160000)
    assert cfg.to_dict()["frame_size"] == 64 and cfg.to_dict()["multi_source"] == 0.0
    assert SynthConfig(**cfg.to_dict()) == cfg


# ------------------------------------------------------------------------------- seeds


def test_scene_is_deterministic_and_seeded():
    cfg = SynthConfig(frame_size=32)
    assert generate_scene(5, "train", 1, cfg) == generate_scene(5, "train", 1, cfg)
    assert generate_scene(5, "train", 1, cfg) != generate_scene(5, "train", 2, cfg)
    assert generate_scene(5, "train", 1, cfg)["clip_id"] == "train-00000005"


def test_splits_are_disjoint_by_scene_seed():
    seeds = {split: {scene_seed(0, split, i) for i in range(3000)} for split in ("train", "val", "test")}
    assert all(len(s) == 3000 for s in seeds.values())
    assert not seeds["train"] & seeds["val"] and not seeds["train"] & seeds["test"]
    assert not seeds["val"] & seeds["test"]
    assert all(0 <= s < 2**53 for s in seeds["train"])
    with pytest.raises(ValueError, match="split"):
        scene_seed(0, "bad.split", 0)
    with pytest.raises(ValueError, match="index"):
        scene_seed(0, "train", -1)


def test_ranges_mask_round_trip():
    assert mask_to_ranges(np.array([0, 1, 1, 0, 1, 0, 0, 1], bool)) == [[1, 3], [4, 5], [7, 8]]
    assert mask_to_ranges(ranges_to_mask([[0, 2], [5, 6]], 6)) == [[0, 2], [5, 6]]


# ------------------------------------------------------------------------------- scene invariants


@pytest.mark.parametrize("random_colors", [False, True])
def test_scene_invariants(random_colors):
    cfg = SynthConfig(random_colors=random_colors)
    T = cfg.num_segments
    kinds, moods, motions, counts = set(), set(), set(), set()
    for scene in _scenes(100, cfg, seed=11 + random_colors):
        assert set(scene) == SCENE_KEYS
        assert scene["version"] == 2 and scene["num_segments"] == T and scene["frame_size"] == [64, 64]
        assert scene["mood"] in vocab.MOODS
        moods.add(scene["mood"])
        objs = scene["objects"]
        counts.add(len(objs))
        assert cfg.min_objects <= len(objs) <= cfg.max_objects
        assert [o["id"] for o in objs] == list(range(len(objs)))
        assert len({o["class"] for o in objs}) == len(objs)
        assert len({(o["position"], o["row"]) for o in objs}) == len(objs)
        av_objects = []
        sounding_loudness = []
        for o in objs:
            assert set(o) == OBJECT_KEYS
            assert o["class"] in cfg.classes and o["shape"] == CLASS_STYLES[o["class"]].shape
            assert o["color"] in vocab.COLORS and o["shape"] in vocab.SHAPES
            if not random_colors:
                assert o["color"] == CLASS_STYLES[o["class"]].color
            assert o["position"] in vocab.POSITIONS and o["row"] in vocab.ROWS
            assert o["motion"] in vocab.MOTIONS
            for ranges in (o["visible"], o["sounding"]):
                flat = [v for r in ranges for v in r]
                assert all(isinstance(v, int) for v in flat)
                assert flat == sorted(flat) and all(0 <= s < e <= T for s, e in ranges)
                assert all(ranges[k][1] < ranges[k + 1][0] for k in range(len(ranges) - 1))  # merged
            vis, snd = ranges_to_mask(o["visible"], T), ranges_to_mask(o["sounding"], T)
            assert vis.any() or snd.any()
            assert len(o["boxes"]) == T
            for t, box in enumerate(o["boxes"]):
                assert (box is None) == (not vis[t])
                if box is not None:
                    assert all(isinstance(v, int) and 0 <= v <= 1000 for v in box)
                    assert box[0] < box[2] and box[1] < box[3]
            assert (o["loudness"] > 0) == bool(snd.any())
            if snd.any():
                sounding_loudness.append(o["loudness"])
            if (vis & snd).any():
                av_objects.append((o, mask_to_ranges(vis & snd)))
            else:
                kind = "audio-only" if not vis.any() else "visual-only" if not snd.any() else "both-disjoint"
                kinds.add(kind)
        assert len(set(sounding_loudness)) == len(sounding_loudness)
        assert len(av_objects) == 1, "exactly one audio-visual event object"
        av, shared = av_objects[0]
        assert len(shared) == 1 and shared[0] == scene["av_event"]["range"]
        assert shared[0][1] - shared[0][0] >= cfg.min_event_segments
        assert scene["av_event"]["object"] == av["id"] and scene["av_event"]["class"] == av["class"]
        assert scene["action"] == av["motion"]
        motions.add(av["motion"])
    assert kinds == {"audio-only", "visual-only", "both-disjoint"}
    assert moods == set(vocab.MOODS) and motions == set(vocab.MOTIONS) and counts == {1, 2, 3}


def test_validate_scene_accepts_generated_and_rejects_broken_scenes():
    import copy

    cfg = SynthConfig(frame_size=32)
    scenes = _scenes(50, cfg, seed=21)
    for scene in scenes:
        validate_scene(scene)
    scene = next(s for s in scenes if any(not o["visible"] for o in s["objects"]))
    hidden = next(o["id"] for o in scene["objects"] if not o["visible"])
    av = scene["av_event"]["object"]

    def broken(edit):
        bad = copy.deepcopy(scene)
        edit(bad)
        return bad

    cases = {
        "exactly one audio-visual": broken(lambda s: s["objects"][hidden].update(
            visible=s["objects"][av]["visible"], sounding=s["objects"][av]["sounding"],
            boxes=s["objects"][av]["boxes"], description="a red violin at the top left, standing still")),
        "has a box": broken(lambda s: s["objects"][hidden]["boxes"].__setitem__(0, [1, 2, 3, 4])),
        "class": broken(lambda s: s["objects"][0].update({"class": "unicorn"})),
        "av_event": broken(lambda s: s["av_event"].update(range=[0, 1])),
        "action": broken(lambda s: s.update(action="pulsing" if s["action"] != "pulsing" else "static")),
        "misses fields": broken(lambda s: s.pop("mood")),
        "sorted": broken(lambda s: s["objects"][av].update(sounding=[[5, 6], [1, 2]])),
        "num_segments": broken(lambda s: s.update(num_segments=10**9)),
        "description must be a non-empty string": broken(lambda s: s["objects"][av].update(description=None)),
        "never visible": broken(lambda s: s["objects"][hidden].update(description="a red violin")),
        "not the id of an object that is visible and sounding": broken(
            lambda s: s["expressions"].append({"text": "the hidden one", "object": hidden})),
        "non-empty string": broken(lambda s: s["expressions"].append({"text": " ", "object": None})),
        "fields text and object": broken(lambda s: s["expressions"].append({"text": "x"})),
        "not multi-source": broken(lambda s: s.update(av_event=None, action=None)),
        "both be null": broken(lambda s: s.update(av_event=None)),
        "expressions": broken(lambda s: s.pop("expressions")),
        "no longer read": broken(lambda s: s.update(version=1)),
        "is not 2": broken(lambda s: s.update(version=3)),
    }
    for message, bad in cases.items():
        with pytest.raises(ValueError, match=message):
            validate_scene(bad)


def test_random_colors_are_drawn_and_rendered():
    cfg = SynthConfig(random_colors=True, frame_size=32)
    scenes = _scenes(60, cfg)
    drawn = {(o["class"], o["color"]) for s in scenes for o in s["objects"]}
    assert any(color != CLASS_STYLES[name].color for name, color in drawn)
    scene = next(s for s in scenes if any(o["visible"] for o in s["objects"]))
    frames, masks = render_frames(scene, cfg), render_masks(scene, cfg)
    for o in scene["objects"]:
        if o["visible"]:
            pix = frames.transpose(0, 2, 3, 1)[masks == o["id"] + 1]
            light = np.array(COLOR_RGB[o["color"]], dtype=np.uint8)
            dark = np.round(light * TEXTURE_DARK).astype(np.uint8)
            assert ((pix == light).all(1) | (pix == dark).all(1)).all()


# ------------------------------------------------------------------------------- rendering: video


@pytest.mark.parametrize(
    "cfg", [SynthConfig(), SynthConfig(frame_size=48, frames_per_segment=2, num_segments=6)]
)
def test_object_pixels_inside_box_and_only_on_visible_segments(cfg):
    H = W = cfg.frame_size
    F = cfg.frames_per_segment
    for scene in _scenes(20, cfg, seed=4):
        frames, audio = render_clip(scene, cfg)
        assert frames.shape == (cfg.num_frames, 3, H, W) and frames.dtype == np.uint8
        assert audio.shape == (cfg.num_samples,) and audio.dtype == np.float32
        masks = render_masks(scene, cfg)
        foreground = (frames != np.array(BACKGROUND_RGB, np.uint8)[None, :, None, None]).any(1)
        np.testing.assert_array_equal(foreground, masks > 0)
        for o in scene["objects"]:
            mine = masks == o["id"] + 1  # [N, H, W]
            vis = ranges_to_mask(o["visible"], cfg.num_segments)
            per_seg = mine.reshape(cfg.num_segments, F, H, W)
            np.testing.assert_array_equal(per_seg.any(axis=(1, 2, 3)), vis)
            for t, box in enumerate(o["boxes"]):
                if box is None:
                    continue
                x1, y1, x2, y2 = _px_box(box, H, W)
                seg = per_seg[t].any(0)
                ys, xs = np.nonzero(seg)
                # the stored box is exactly the rendered extent of the object
                assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)
                # and its pixels carry the object's colour
                rgb = frames[t * F : (t + 1) * F].transpose(0, 2, 3, 1)[per_seg[t]]
                light = np.array(COLOR_RGB[o["color"]], np.uint8)
                assert (rgb == light).all(1).any()


def test_position_row_and_motion_are_rendered():
    cfg = SynthConfig()
    W = cfg.frame_size
    for scene in _scenes(60, cfg, seed=8):
        for o in scene["objects"]:
            boxes = [b for b in o["boxes"] if b is not None]
            for b in boxes:  # the centre lies in the object's horizontal third and vertical half
                cx, cy = (b[0] + b[2]) / 2000, (b[1] + b[3]) / 2000
                assert vocab.POSITIONS[int(cx * 3)] == o["position"]
                assert vocab.ROWS[int(cy * 2)] == o["row"]
            if len(boxes) < 2:
                continue
            cx = [(b[0] + b[2]) / 2 for b in boxes]
            cy = [(b[1] + b[3]) / 2 for b in boxes]
            size = [(b[2] - b[0]) * (b[3] - b[1]) for b in boxes]
            motion = o["motion"]
            px = 1000 / W  # rasterization may move the other axis' extent by one pixel
            if motion == "moving right":
                assert all(np.diff(cx) >= 0) and cx[-1] > cx[0] and np.ptp(cy) <= px
            elif motion == "moving left":
                assert all(np.diff(cx) <= 0) and cx[-1] < cx[0] and np.ptp(cy) <= px
            elif motion == "moving down":
                assert all(np.diff(cy) >= 0) and cy[-1] > cy[0] and np.ptp(cx) <= px
            elif motion == "moving up":
                assert all(np.diff(cy) <= 0) and cy[-1] < cy[0] and np.ptp(cx) <= px
            elif motion == "static":
                assert len(set(map(tuple, boxes))) == 1
            elif motion == "pulsing":
                assert len(set(size)) > 1


def test_classes_look_different():
    """Default classes differ in shape and colour; all 16 differ in (shape, texture)."""
    first = [CLASS_STYLES[c] for c in vocab.CLASSES[:8]]
    assert len({s.shape for s in first}) == 8 and len({s.color for s in first}) == 8
    assert len({(s.shape, s.texture) for s in CLASS_STYLES.values()}) == len(vocab.CLASSES)
    assert set(CLASS_STYLES) == set(vocab.CLASSES)


def test_render_checks_config_and_is_deterministic():
    cfg = SynthConfig(frame_size=32)
    scene = generate_scene(1, "val", 0, cfg)
    a, b = render_clip(scene, cfg), render_clip(scene, cfg)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError, match="frame_size"):
        render_clip(scene, SynthConfig(frame_size=64))
    noisy = render_frames(scene, dataclasses.replace(cfg, visual_noise=0.05))
    assert noisy.shape == a[0].shape and not np.array_equal(noisy, a[0])


# ------------------------------------------------------------------------------- rendering: audio


def test_audio_silent_outside_sounding_segments():
    cfg = SynthConfig(noise_level=0.0)
    sps = cfg.samples_per_segment
    for scene in _scenes(25, cfg, seed=5):
        audio = render_audio(scene, cfg).astype(np.float64)
        objects_only = audio - mood_audio(scene, cfg)
        sounding = np.zeros(cfg.num_segments, bool)
        for o in scene["objects"]:
            own = object_audio(scene, o, cfg)
            snd = np.repeat(ranges_to_mask(o["sounding"], cfg.num_segments), sps)
            assert np.all(own[~snd] == 0.0)
            if snd.any():
                assert np.sqrt(np.mean(own[snd] ** 2)) > 0.2 * cfg.object_level * o["loudness"]
            sounding |= ranges_to_mask(o["sounding"], cfg.num_segments)
        silent = ~np.repeat(sounding, sps)
        assert np.abs(objects_only[silent]).max(initial=0.0) < 1e-6  # only the mood bed remains
    quiet = dataclasses.replace(cfg, mood_level=0.0)
    scene = generate_scene(0, "train", 5, quiet)
    audio = render_audio(scene, quiet)
    snd = np.zeros(quiet.num_segments, bool)
    for o in scene["objects"]:
        snd |= ranges_to_mask(o["sounding"], quiet.num_segments)
    assert np.all(audio[~np.repeat(snd, sps)] == 0.0)


def _spectrum(x, sr):
    mag = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return np.fft.rfftfreq(len(x), 1 / sr), mag


@pytest.mark.parametrize("name", vocab.CLASSES)
def test_class_audio_signature(name):
    cfg = SynthConfig(noise_level=0.0, mood_level=0.0)
    scene = generate_scene(0, "train", 0, cfg)
    obj = dict(scene["objects"][0], **{"class": name, "sounding": [[2, 4]], "loudness": 1.0})
    audio = object_audio(scene, obj, cfg)
    sps, sr = cfg.samples_per_segment, cfg.sample_rate
    inside = audio[2 * sps : 4 * sps]
    freqs, mag = _spectrum(inside, sr)
    power = mag**2
    style = CLASS_STYLES[name]
    if style.f0 is not None:
        lo, hi = style.f0 * (1 - style.fm_depth) * 0.97, style.f0 * (1 + style.fm_depth) * 1.03
        band = (freqs >= lo) & (freqs <= hi)
        assert freqs[np.argmax(mag)] == pytest.approx(style.f0, rel=max(0.03, style.fm_depth * 1.05))
        assert power[band].sum() > 0.2 * power.sum()
    else:
        band = (freqs >= style.noise_band[0] * 0.9) & (freqs <= style.noise_band[1] * 1.1)
        assert power[band].sum() > 0.9 * power.sum()
    assert np.all(audio[: 2 * sps] == 0) and np.all(audio[4 * sps :] == 0)


def test_default_class_pitches_are_distinct():
    styles = [CLASS_STYLES[c] for c in vocab.CLASSES[:8]]
    f0 = sorted(s.f0 for s in styles if s.f0 is not None)
    assert np.diff(np.log2(f0)).min() > 0.3  # tonal classes at least ~a major third apart
    assert sum(s.f0 is None for s in styles) <= 1  # and at most one noise class
    rates = [(s.am_kind, s.am_rate) for s in styles]
    assert len(set(rates)) == 8


def test_loudness_scales_the_object():
    cfg = SynthConfig(noise_level=0.0, mood_level=0.0)
    scene = generate_scene(0, "train", 0, cfg)
    base = dict(scene["objects"][0], **{"class": "violin", "sounding": [[0, 10]]})
    loud = object_audio(scene, dict(base, loudness=1.0), cfg)
    soft = object_audio(scene, dict(base, loudness=0.4), cfg)
    assert np.sqrt(np.mean(loud**2)) == pytest.approx(cfg.object_level, rel=0.02)
    np.testing.assert_allclose(soft, 0.4 * loud, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    "mood, rate, contour",
    [("happy", 4, "rising"), ("sad", 1, "falling"), ("calm", 1, "flat"), ("tense", 4, "flat")],
)
def test_mood_bed_tempo_and_contour(mood, rate, contour):
    cfg = SynthConfig(noise_level=0.0)
    scene = dict(generate_scene(0, "train", 0, cfg), mood=mood)
    bed = mood_audio(scene, cfg)
    assert np.abs(bed).max() <= cfg.mood_level + 1e-9
    sr = cfg.sample_rate
    note = sr // rate
    peaks, dissonant = [], []
    for k in range(3):
        freqs, mag = _spectrum(bed[k * note : (k + 1) * note], sr)
        peaks.append(freqs[np.argmax(mag)])
        strong = freqs[mag > 0.5 * mag.max()]
        dissonant.append(strong.max() / strong.min() > 1.04)
    if contour == "rising":
        assert peaks[0] < peaks[1] < peaks[2]
    elif contour == "falling":
        assert peaks[0] > peaks[1] > peaks[2]
    else:
        assert max(peaks) / min(peaks) < 1.07
    assert any(dissonant) == (mood == "tense")
    # note onsets: the envelope restarts `rate` times per second
    env = np.abs(bed).reshape(-1, sr // 20).max(1)  # 50 ms frames
    loud = env >= 0.5 * cfg.mood_level
    onsets = np.sum(loud[1:] & ~loud[:-1]) + loud[0]
    assert onsets == pytest.approx(rate * cfg.num_segments, abs=rate)
