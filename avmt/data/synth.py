"""AVSynth: procedurally generated audio-visual scenes with exact ground truth.

A scene is a small graph (JSON, schema version 2, see :func:`generate_scene`): 1-3 sound objects,
each with a class, colour, shape, screen cell (``position`` x ``row``), motion, visible and
sounding segment intervals, loudness, exact per-segment boxes and a region description, plus a
scene mood and a list of referring expressions.  A *single-source* scene (the v1 kind) has exactly
one audio-visual object, the event (visible *and* sounding over one contiguous interval of >= 2
segments); the others are audio-only, visual-only, or visible and sounding but never at the same
time.  A *multi-source* scene (``SynthConfig.multi_source``; AVSBench MS3-like) has two or three
co-sources, each seen and heard over one common contiguous range, which overlap in >= 2 segments,
and no single event (``av_event`` and ``action`` are ``null``).

Everything is a pure function of ``(seed, split, index)`` and the :class:`SynthConfig`:

>>> cfg = SynthConfig(frame_size=32)
>>> scene = generate_scene(7, "train", 0, cfg)
>>> frames, audio = render_clip(scene, cfg)     # uint8 [T*F, 3, H, W], float32 [S]
>>> masks = render_masks(scene, cfg)            # uint8 [T*F, H, W]: 0 background, id + 1

Rendering is vectorized numpy.  Each class has its own appearance (shape + texture + default
colour) and audio signature (harmonic partials on a fundamental, or a noise band, with an
amplitude-modulation rate); objects never overlap (each stays inside its own screen cell), so the
rendered masks and boxes are exact.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from avmt.data import vocab
from avmt.intervals import mask_to_ranges, ranges_to_mask

__all__ = [
    "SCHEMA_VERSION",
    "GENERATOR_VERSION",
    "SynthConfig",
    "ClassStyle",
    "CLASS_STYLES",
    "COLOR_RGB",
    "BACKGROUND_RGB",
    "TEXTURES",
    "LOUDNESS_LEVELS",
    "SYNTH_COMMAND",
    "DESCRIPTION_TEMPLATE",
    "MOTION_PHRASES",
    "EXPRESSION_TEMPLATES",
    "ORDINALS",
    "describe_object",
    "is_multi_source",
    "old_schema_message",
    "scene_seed",
    "validate_scene",
    "clip_id",
    "generate_scene",
    "render_clip",
    "render_frames",
    "render_audio",
    "render_masks",
    "object_audio",
    "mood_audio",
]

#: Version of the scene graph.  v2 added ``objects[i]["description"]``, ``expressions``, multi-source
#: scenes (``av_event`` / ``action`` null) and exact object masks in the shards; v1 is not read.
SCHEMA_VERSION = 2
#: Bump whenever the generator's output for a given (seed, split, index, cfg) changes, so that
#: cached shards (``avmt.data.shards.ensure_shards``) are regenerated.
GENERATOR_VERSION = 2
#: How a user makes AVSynth shards (the CLI's ``data synth`` subcommand); ``{root}`` is the folder.
SYNTH_COMMAND = "python -m avmt data synth --out {root} --clips N --seed S"
#: Namespace of :func:`scene_seed`.  Frozen at v1 so that the scene seeds, and with them every
#: v1 field of a single-source scene, stay what AVSynth v1 generated.
_SEED_NAMESPACE = "avsynth/v1"

_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")

# --------------------------------------------------------------------------------------------
# Appearance and sound of each class
# --------------------------------------------------------------------------------------------

#: RGB value of every colour name in ``vocab.COLORS``.
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (230, 50, 50),
    "green": (60, 200, 70),
    "blue": (70, 110, 255),
    "yellow": (240, 220, 50),
    "purple": (170, 80, 230),
    "orange": (255, 150, 40),
    "white": (235, 235, 235),
    "cyan": (50, 220, 230),
}
BACKGROUND_RGB: tuple[int, int, int] = (16, 16, 24)
TEXTURES: tuple[str, ...] = ("solid", "hstripes", "vstripes", "checker")
#: Darkening factor of the dark texture cells (the light cells keep the full colour).
TEXTURE_DARK = 0.5
#: Loudness values given to sounding objects (distinct within a scene: no ties).
LOUDNESS_LEVELS: tuple[float, ...] = (0.4, 0.55, 0.7, 0.85, 1.0)
#: An object's waveform is scaled to RMS ``object_level x loudness`` unless its peak would exceed
#: ``MAX_CREST`` times that (then the peak is capped there).
MAX_CREST = 4.0


@dataclass(frozen=True)
class ClassStyle:
    """Appearance and audio signature of one class.

    Audio: ``partials`` are ``(frequency ratio to f0, amplitude)`` pairs on the fundamental ``f0``
    (Hz); ``noise_band`` ``(lo, hi)`` Hz adds band-limited noise instead (``f0 = None``).
    ``am_kind`` is ``"none"`` (steady), ``"sine"`` (tremolo of depth ``am_depth``) or
    ``"decay"`` (a struck/plucked envelope restarting ``am_rate`` times per second, time constant
    ``decay`` s).  ``fm_depth`` > 0 sweeps the pitch by +-``fm_depth`` x f0 at ``fm_rate`` Hz.
    """

    shape: str
    color: str
    texture: str
    f0: float | None
    partials: tuple[tuple[float, float], ...] = ((1.0, 1.0),)
    noise_band: tuple[float, float] | None = None
    am_kind: str = "none"
    am_rate: float = 0.0
    am_depth: float = 0.0
    decay: float = 0.1
    fm_rate: float = 0.0
    fm_depth: float = 0.0


#: One style per class of ``vocab.CLASSES``.  The first 8 (the default ``num_classes``) have
#: pairwise distinct shapes, colours and pitches/bands; every class has a distinct
#: (shape, texture) pair so classes stay distinguishable with ``random_colors=True``.
CLASS_STYLES: dict[str, ClassStyle] = {
    "violin": ClassStyle("circle", "red", "solid", 523.25,
                         ((1, 1.0), (2, 0.6), (3, 0.45), (4, 0.3), (5, 0.2)),
                         am_kind="sine", am_rate=5.0, am_depth=0.3),
    "flute": ClassStyle("bar", "cyan", "solid", 1046.5, ((1, 1.0), (2, 0.15), (3, 0.05)),
                        am_kind="sine", am_rate=1.0, am_depth=0.4),
    "guitar": ClassStyle("triangle", "orange", "solid", 196.0,
                         ((1, 1.0), (2, 0.7), (3, 0.5), (4, 0.3), (5, 0.2), (6, 0.1)),
                         am_kind="decay", am_rate=3.0, decay=0.12),
    "drum": ClassStyle("ring", "yellow", "solid", None, noise_band=(60.0, 250.0),
                       am_kind="decay", am_rate=2.0, decay=0.08),
    "piano": ClassStyle("square", "white", "checker", 293.66,
                        ((1, 1.0), (2, 0.5), (3, 0.25), (4, 0.12)),
                        am_kind="decay", am_rate=1.5, decay=0.3),
    "trumpet": ClassStyle("star", "purple", "solid", 392.0,
                          ((1, 1.0), (2, 0.9), (3, 0.8), (4, 0.6), (5, 0.45), (6, 0.3))),
    "cello": ClassStyle("diamond", "green", "hstripes", 130.81,
                        ((1, 1.0), (2, 0.8), (3, 0.6), (4, 0.4), (5, 0.3)),
                        am_kind="sine", am_rate=0.5, am_depth=0.3),
    "bell": ClassStyle("cross", "blue", "solid", 1568.0, ((1, 1.0), (2.76, 0.5), (5.4, 0.25)),
                       am_kind="decay", am_rate=1.0, decay=0.4),
    "dog": ClassStyle("square", "orange", "hstripes", None, noise_band=(500.0, 1500.0),
                      am_kind="decay", am_rate=2.5, decay=0.1),
    "cat": ClassStyle("triangle", "white", "vstripes", 700.0, ((1, 1.0), (2, 0.4), (3, 0.2)),
                      am_kind="sine", am_rate=0.7, am_depth=0.8, fm_rate=0.7, fm_depth=0.08),
    "car": ClassStyle("bar", "red", "checker", None, noise_band=(80.0, 500.0),
                      am_kind="sine", am_rate=0.5, am_depth=0.2),
    "bird": ClassStyle("diamond", "cyan", "solid", 3200.0, ((1, 1.0), (2, 0.1)),
                       am_kind="decay", am_rate=8.0, decay=0.04),
    "clock": ClassStyle("circle", "white", "checker", None, noise_band=(2500.0, 5000.0),
                        am_kind="decay", am_rate=2.0, decay=0.015),
    "siren": ClassStyle("triangle", "blue", "checker", 800.0, ((1, 1.0), (2, 0.3)),
                        fm_rate=0.5, fm_depth=0.25),
    "cow": ClassStyle("square", "green", "vstripes", 98.0,
                      ((1, 1.0), (2, 0.9), (3, 0.7), (4, 0.5), (5, 0.4), (6, 0.3)),
                      am_kind="sine", am_rate=0.5, am_depth=0.5),
    "horn": ClassStyle("ring", "orange", "hstripes", 233.08, ((1, 1.0), (2, 0.7), (3, 0.5))),
}

# --------------------------------------------------------------------------------------------
# Words: region descriptions and referring expressions
# --------------------------------------------------------------------------------------------

#: Region description of a visible object, e.g. "a red violin at the top left, moving right";
#: ``{motion}`` is the object's ``MOTION_PHRASES`` entry.
DESCRIPTION_TEMPLATE = "a {color} {class} at the {row} {position}, {motion}"
#: How each motion of ``vocab.MOTIONS`` reads in a description.
MOTION_PHRASES: dict[str, str] = {
    "static": "standing still",
    "moving left": "moving left",
    "moving right": "moving right",
    "moving up": "moving up",
    "moving down": "moving down",
    "pulsing": "pulsing",
}
#: Words of the order expressions, by rank of sounding onset.
ORDINALS: tuple[str, ...] = ("first", "second", "third")
#: Every referring-expression template (Ref-AVS-like), by kind.  Slots: ``{color}``, ``{class}``,
#: ``{where}`` (a ``vocab.POSITION_PHRASES`` value) and ``{ordinal}`` (an ``ORDINALS`` word).
#: The ``null_*`` kinds refer to nothing (target: an empty mask); the others to one object that
#: is visible at some time and sounding at some time.
EXPRESSION_TEMPLATES: dict[str, str] = {
    "attribute": "the {color} {class} {where}",
    "sounding": "the sounding {class}",
    "makes_sound": "the {class} that makes a sound",
    "order": "the object that starts sounding {ordinal}",
    "loudest": "the loudest object",
    "quietest": "the quietest sounding object",
    "null_absent": "the sounding {class} {where}",
    "null_silent": "the {color} {class} {where} that makes a sound",
}

# Mood bed: notes per second, semitone offsets of the repeating pattern (relative to the base
# pitch), and whether each note is a dissonant dyad (a second tone one semitone up).
_MOOD_BASE_HZ = 523.25
_MOOD_PATTERNS: dict[str, tuple[float, tuple[int, ...], bool]] = {
    "happy": (4.0, (0, 4, 7, 12), False),  # fast, rising major arpeggio
    "sad": (1.0, (7, 3, 0, -5), False),  # slow, falling minor line
    "calm": (1.0, (0, 0, 0, 0), False),  # slow, flat
    "tense": (4.0, (0, 0, 0, 0), True),  # fast, flat, dissonant semitone dyads
}


# --------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------


def _check_int(name: str, value: Any, lo: int, hi: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"SynthConfig.{name} must be an int, got {value!r}")
    if value < lo or (hi is not None and value > hi):
        bound = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise ValueError(f"SynthConfig.{name} must be {bound}, got {value}")


def _check_float(name: str, value: Any, lo: float, hi: float, lo_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float, np.floating, np.integer)):
        raise ValueError(f"SynthConfig.{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise ValueError(f"SynthConfig.{name} must be in {left}{lo}, {hi}], got {value}")


@dataclass
class SynthConfig:
    """Knobs of the AVSynth generator (validated on construction; a bad value raises a
    ``ValueError`` naming the field).

    Args:
        num_classes: classes used, the first N of ``vocab.CLASSES`` (>= max_objects).
        min_objects, max_objects: objects per scene (1..3): one AV event + 0-2 distractors.
        num_segments: T, segments per clip.
        segment_seconds: length of a segment; ``segment_seconds * sample_rate`` must be whole.
        frames_per_segment: F, video frames per segment.
        frame_size: H = W of a frame in pixels (32..512).
        sample_rate: audio sample rate (Hz).
        noise_level: standard deviation of the white background noise added to the audio.
        random_colors: draw each object's colour uniformly (recorded in the scene) instead of
            using its class colour; classes then differ only by shape, texture and sound.
        min_event_segments: minimum length of the audio-visual event (>= 2).
        object_level: RMS amplitude of a sounding object at loudness 1.0 (peak capped at 4x).
        mood_level: peak amplitude of the quiet mood bed (tempo + pitch contour).
        visual_noise: standard deviation of Gaussian pixel noise, as a fraction of 255 (0 = clean).
        multi_source: probability in [0, 1] that a scene is a multi-source scene (AVSBench
            MS3-like: 2-3 co-sources, each seen and heard over one contiguous range, overlapping
            in >= ``min_event_segments`` segments, plus at most one silent visible or audio-only
            object; no single ``av_event``).  Needs ``max_objects >= 2`` when > 0.  The coin is
            drawn from its own random stream, so with 0.0 (the default) every scene is exactly
            the single-source scene AVSynth v1 generated (plus the v2 fields), and with p > 0
            the scenes that are not multi-source are too.
    """

    num_classes: int = 8
    min_objects: int = 1
    max_objects: int = 3
    num_segments: int = 10
    segment_seconds: float = 1.0
    frames_per_segment: int = 1
    frame_size: int = 64
    sample_rate: int = 16000
    noise_level: float = 0.05
    random_colors: bool = False
    min_event_segments: int = 2
    object_level: float = 0.12
    mood_level: float = 0.04
    visual_noise: float = 0.0
    multi_source: float = 0.0

    def __post_init__(self) -> None:
        _check_int("max_objects", self.max_objects, 1, 3)
        _check_int("min_objects", self.min_objects, 1, self.max_objects)
        _check_int("num_classes", self.num_classes, 1, len(vocab.CLASSES))
        if self.num_classes < self.max_objects:
            raise ValueError(
                f"SynthConfig.num_classes ({self.num_classes}) must be >= max_objects "
                f"({self.max_objects}): the objects of a scene have distinct classes"
            )
        _check_int("num_segments", self.num_segments, 2, 10_000)
        _check_int("min_event_segments", self.min_event_segments, 2, self.num_segments)
        _check_int("frames_per_segment", self.frames_per_segment, 1, 64)
        _check_int("frame_size", self.frame_size, 32, 512)
        _check_int("sample_rate", self.sample_rate, 8000, 96000)
        _check_float("segment_seconds", self.segment_seconds, 0.0, 60.0, lo_open=True)
        samples = self.segment_seconds * self.sample_rate
        if abs(samples - round(samples)) > 1e-6:
            raise ValueError(
                f"SynthConfig.segment_seconds ({self.segment_seconds}) x sample_rate "
                f"({self.sample_rate}) must be a whole number of samples, got {samples}"
            )
        _check_float("noise_level", self.noise_level, 0.0, 1.0)
        _check_float("object_level", self.object_level, 0.0, 1.0, lo_open=True)
        _check_float("mood_level", self.mood_level, 0.0, 1.0)
        _check_float("visual_noise", self.visual_noise, 0.0, 1.0)
        _check_float("multi_source", self.multi_source, 0.0, 1.0)
        if self.multi_source > 0 and self.max_objects < 2:
            raise ValueError(
                f"SynthConfig.multi_source ({self.multi_source}) > 0 needs max_objects >= 2 "
                f"(a multi-source scene has >= 2 co-sources), got max_objects={self.max_objects}"
            )
        if not isinstance(self.random_colors, (bool, np.bool_)):
            raise ValueError(f"SynthConfig.random_colors must be a bool, got {self.random_colors!r}")

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names in use: the first ``num_classes`` of ``vocab.CLASSES``."""
        return tuple(vocab.CLASSES[: self.num_classes])

    @property
    def samples_per_segment(self) -> int:
        """Audio samples per segment (``segment_seconds x sample_rate``)."""
        return int(round(self.segment_seconds * self.sample_rate))

    @property
    def num_samples(self) -> int:
        """S, audio samples per clip."""
        return self.num_segments * self.samples_per_segment

    @property
    def num_frames(self) -> int:
        """T*F, video frames per clip."""
        return self.num_segments * self.frames_per_segment

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able dict of every field."""
        fields = dataclasses.asdict(self)
        return {k: (bool(v) if isinstance(v, (bool, np.bool_)) else v) for k, v in fields.items()}


# --------------------------------------------------------------------------------------------
# Seeds and intervals
# --------------------------------------------------------------------------------------------


def _check_split(split: str) -> None:
    if not isinstance(split, str) or not _SPLIT_RE.match(split):
        raise ValueError(f"split must be a non-empty name of letters, digits or '_', got {split!r}")


def scene_seed(seed: int, split: str, index: int) -> int:
    """The scene seed of clip ``index`` of ``split``: a 53-bit hash of ``(seed, split, index)``.

    Different splits hash different strings, so their scene seeds are disjoint (up to 2^-53
    collisions); the value fits a JSON number exactly.
    """
    _check_split(split)
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"clip index must be an int >= 0, got {index!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an int, got {seed!r}")
    digest = hashlib.sha256(f"{_SEED_NAMESPACE}/{int(seed)}/{split}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 53) - 1)


def clip_id(split: str, index: int) -> str:
    """Clip key ``"{split}-{index:08d}"`` (no dots: it is a WebDataset key)."""
    return f"{split}-{int(index):08d}"


def _random_mask(rng: np.random.Generator, num_segments: int, allowed: np.ndarray) -> np.ndarray:
    """1-2 random intervals restricted to ``allowed`` segments (may come out empty)."""
    mask = np.zeros(num_segments, dtype=bool)
    max_len = max(1, num_segments // 2)
    for _ in range(int(rng.integers(1, 3))):
        length = int(rng.integers(1, max_len + 1))
        start = int(rng.integers(0, num_segments - length + 1))
        mask[start : start + length] = True
    return mask & allowed


# --------------------------------------------------------------------------------------------
# Scene generation
# --------------------------------------------------------------------------------------------


def _av_intervals(rng: np.random.Generator, cfg: SynthConfig) -> tuple[list[int], list[int], list[int]]:
    """Visible, sounding and shared range of the AV object; visible ∩ sounding = shared."""
    T = cfg.num_segments
    length = int(rng.integers(cfg.min_event_segments, T + 1))
    start = int(rng.integers(0, T - length + 1))
    end = start + length
    vis, snd = [start, end], [start, end]
    # on each side, at most one of the two modalities extends beyond the shared range
    for side in (0, 1):
        room = start if side == 0 else T - end
        which = int(rng.choice(4))  # 0, 1: none; 2: visible; 3: sounding
        if room > 0 and which >= 2:
            ext = int(rng.integers(1, room + 1))
            target = vis if which == 2 else snd
            if side == 0:
                target[0] = start - ext
            else:
                target[1] = end + ext
    return vis, snd, [start, end]


def _distractor_intervals(rng: np.random.Generator, cfg: SynthConfig) -> tuple[list, list]:
    """Visible and sounding ranges of a distractor: audio-only, visual-only, or both but disjoint."""
    T = cfg.num_segments
    everything = np.ones(T, dtype=bool)
    kind = int(rng.choice(3))
    if kind == 2:  # visible and sounding, never at the same time
        for _ in range(8):
            vis = _random_mask(rng, T, everything)
            snd = _random_mask(rng, T, ~vis)
            if vis.any() and snd.any():
                return mask_to_ranges(vis), mask_to_ranges(snd)
        kind = 0
    mask = _random_mask(rng, T, everything)
    if kind == 0:  # audio-only
        return [], mask_to_ranges(mask)
    return mask_to_ranges(mask), []  # visual-only


def _multi_source_intervals(
    rng: np.random.Generator, cfg: SynthConfig, n_obj: int
) -> list[tuple[list, list]]:
    """Visible and sounding ranges of the objects of a multi-source scene (generation order).

    The first 2 (or, with 3 objects, sometimes 3) are co-sources: each is visible and sounding over
    the same contiguous range, a common core of >= ``min_event_segments`` segments extended on
    either side by a random amount.  A third non-co-source object is visual-only or audio-only.
    """
    T = cfg.num_segments
    length = int(rng.integers(cfg.min_event_segments, T + 1))
    start = int(rng.integers(0, T - length + 1))
    end = start + length
    kind = int(rng.integers(3)) if n_obj == 3 else 0  # 0: third co-source; 1: visual-only; 2: audio-only
    n_co = 3 if n_obj == 3 and kind == 0 else 2
    intervals: list[tuple[list, list]] = []
    for _ in range(n_co):
        lo = start - int(rng.integers(0, start + 1))
        hi = end + int(rng.integers(0, T - end + 1))
        intervals.append(([[lo, hi]], [[lo, hi]]))
    if n_obj > n_co:
        ranges = mask_to_ranges(_random_mask(rng, T, np.ones(T, dtype=bool)))
        intervals.append((ranges, []) if kind == 1 else ([], ranges))
    return intervals


def describe_object(obj: dict) -> str | None:
    """Region description of ``obj`` (``DESCRIPTION_TEMPLATE``), ``None`` when it is never visible."""
    if not obj["visible"]:
        return None
    return DESCRIPTION_TEMPLATE.format(
        color=obj["color"], row=obj["row"], position=obj["position"], motion=MOTION_PHRASES[obj["motion"]],
        **{"class": obj["class"]},
    )


def is_multi_source(scene: dict) -> bool:
    """True for a multi-source scene (no single audio-visual event: ``av_event`` is null)."""
    return scene.get("av_event") is None


def _expression(kind: str, obj: dict | None = None, **slots: str) -> str:
    if obj is not None:
        where = vocab.POSITION_PHRASES[obj["position"]]
        slots = {"color": obj["color"], "class": obj["class"], "where": where, **slots}
    return EXPRESSION_TEMPLATES[kind].format(**slots)


def _expressions(scene: dict, classes: tuple[str, ...]) -> list[dict]:
    """Referring expressions ``{"text", "object"}`` of a scene (see :func:`generate_scene`)."""
    rng = np.random.default_rng([scene["seed"], 7])
    objects = scene["objects"]
    referents = [o for o in objects if o["visible"] and o["sounding"]]
    referent_ids = {o["id"] for o in referents}
    out: list[dict] = []
    # attribute: one per referent (classes are distinct in a scene, so each names one object)
    for obj in referents:
        kind = ("attribute", "sounding", "makes_sound")[int(rng.integers(3))]
        out.append({"text": _expression(kind, obj), "object": obj["id"]})
    # order and loudness rank every sounding object (an audio-only one too, so that the words stay
    # true of the audio); an expression is made for each rank a referent holds
    sounding = [o for o in objects if o["sounding"]]
    if len(sounding) >= 2:
        onsets = [o["sounding"][0][0] for o in sounding]
        if len(set(onsets)) == len(onsets):
            for rank, obj in enumerate(sorted(sounding, key=lambda o: o["sounding"][0][0])):
                if obj["id"] in referent_ids:
                    out.append({"text": _expression("order", ordinal=ORDINALS[rank]), "object": obj["id"]})
        loudest = max(sounding, key=lambda o: o["loudness"])
        quietest = min(sounding, key=lambda o: o["loudness"])
        if loudest["id"] in referent_ids:
            out.append({"text": _expression("loudest"), "object": loudest["id"]})
        if quietest["id"] in referent_ids:
            out.append({"text": _expression("quietest"), "object": quietest["id"]})
    # null: a sounding class that is not in the scene (or, when every class of the config is, a
    # class of the scene in a column where it is not), and every silent visible object
    present = {o["class"] for o in objects}
    absent = [c for c in classes if c not in present]
    if absent:
        name = absent[int(rng.integers(len(absent)))]
        column = vocab.POSITIONS[int(rng.integers(len(vocab.POSITIONS)))]
    else:
        obj = objects[int(rng.integers(len(objects)))]
        name = obj["class"]
        others = [c for c in vocab.POSITIONS if c != obj["position"]]
        column = others[int(rng.integers(len(others)))]
    where = vocab.POSITION_PHRASES[column]
    out.append({"text": _expression("null_absent", **{"class": name, "where": where}), "object": None})
    for obj in objects:
        if obj["visible"] and not obj["sounding"]:
            out.append({"text": _expression("null_silent", obj), "object": None})
    return out


def generate_scene(index: int, split: str, seed: int, cfg: SynthConfig | None = None) -> dict:
    """Scene graph (JSON-able dict, schema version 2) of clip ``index`` of ``split``.

    Deterministic in ``(index, split, seed, cfg)``.  Fields: ``version``, ``clip_id``, ``split``,
    ``seed`` (the scene seed), the clip geometry (``num_segments``, ``segment_seconds``,
    ``frames_per_segment``, ``frame_size`` ``[H, W]``, ``sample_rate``, ``noise_level``),
    ``mood``, ``objects``, ``av_event`` ``{"object", "class", "range"}`` (``null`` in a
    multi-source scene), ``action`` (the AV object's motion; ``null`` in a multi-source scene) and
    ``expressions``.

    Each object: ``id`` (its index), ``class``, ``color``, ``shape``, ``position``, ``row``,
    ``motion``, ``visible`` and ``sounding`` (sorted, separate ``[start, end)`` segment ranges),
    ``loudness``, ``boxes`` (T entries: the exact rendered box ``[x1, y1, x2, y2]``, ints
    normalized to 0..1000, of the union of the segment's F frame masks, or ``None`` where the
    object is not visible) and ``description`` (``DESCRIPTION_TEMPLATE``, ``None`` for a
    never-visible object).

    ``expressions`` (Ref-AVS-like) is a list of ``{"text", "object"}``; ``object`` is the id of
    an object visible at some time and sounding at some time (a *referent*), or ``None`` when
    the expression refers to nothing (the target is an empty mask).  Texts are
    ``EXPRESSION_TEMPLATES`` filled in: one attribute expression per referent (its phrasing
    drawn), order ("the object that starts sounding second") and loudness ("the loudest
    object", "the quietest sounding object") expressions for the referents among >= 2 sounding
    objects (ranked over *all* sounding objects, so an audio-only one takes its rank; order only
    when the onsets are distinct), one null expression naming a sounding class absent from the
    scene, and one null expression per silent visible object.

    Conventions beyond the schema: objects have distinct classes and distinct screen cells
    (so they never overlap and the masks are exact); sounding objects get distinct loudness values
    from ``LOUDNESS_LEVELS`` and never-sounding objects loudness 0.0; never-visible objects have
    motion ``"static"``; the AV object of a single-source scene may be visible (or sounding) longer
    than ``av_event.range`` on either side, but never both on the same side.  New fields draw from
    their own random streams, so a single-source scene's v1 fields are those AVSynth v1 generated.
    """
    cfg = cfg or SynthConfig()
    sseed = scene_seed(seed, split, index)
    rng = np.random.default_rng(sseed)
    T = cfg.num_segments
    classes = cfg.classes
    multi = cfg.multi_source > 0 and float(np.random.default_rng([sseed, 6]).random()) < cfg.multi_source

    mood = vocab.MOODS[int(rng.integers(len(vocab.MOODS)))]
    n_obj = int(rng.integers(max(2, cfg.min_objects) if multi else cfg.min_objects, cfg.max_objects + 1))
    class_idx = rng.choice(len(classes), size=n_obj, replace=False)
    cells = rng.choice(len(vocab.POSITIONS) * len(vocab.ROWS), size=n_obj, replace=False)

    if multi:
        intervals = _multi_source_intervals(rng, cfg, n_obj)
        av_range = None
    else:
        av_vis, av_snd, av_range = _av_intervals(rng, cfg)
        intervals = [([av_vis], [av_snd])]
        for _ in range(n_obj - 1):
            intervals.append(_distractor_intervals(rng, cfg))

    order = rng.permutation(n_obj)  # order[k] = which generated object gets id k
    loud_pool = list(rng.permutation(len(LOUDNESS_LEVELS)))
    objects = []
    av_id = -1
    for new_id, gen in enumerate(order):
        gen = int(gen)
        name = classes[int(class_idx[gen])]
        style = CLASS_STYLES[name]
        visible, sounding = intervals[gen]
        color = vocab.COLORS[int(rng.integers(len(vocab.COLORS)))] if cfg.random_colors else style.color
        motion = vocab.MOTIONS[int(rng.integers(len(vocab.MOTIONS)))] if visible else "static"
        loudness = float(LOUDNESS_LEVELS[int(loud_pool.pop())]) if sounding else 0.0
        cell = int(cells[gen])
        if gen == 0 and not multi:
            av_id = new_id
        objects.append(
            {
                "id": new_id,
                "class": name,
                "color": color,
                "shape": style.shape,
                "position": vocab.POSITIONS[cell % len(vocab.POSITIONS)],
                "row": vocab.ROWS[cell // len(vocab.POSITIONS)],
                "motion": motion,
                "visible": [list(r) for r in visible],
                "sounding": [list(r) for r in sounding],
                "loudness": loudness,
                "boxes": [None] * T,
                "description": None,
            }
        )

    scene = {
        "version": SCHEMA_VERSION,
        "clip_id": clip_id(split, index),
        "split": split,
        "seed": sseed,
        "num_segments": T,
        "segment_seconds": float(cfg.segment_seconds),
        "frames_per_segment": cfg.frames_per_segment,
        "frame_size": [cfg.frame_size, cfg.frame_size],
        "sample_rate": cfg.sample_rate,
        "mood": mood,
        "noise_level": float(cfg.noise_level),
        "objects": objects,
        "av_event": None
        if multi
        else {"object": av_id, "class": objects[av_id]["class"], "range": list(av_range)},
        "action": None if multi else objects[av_id]["motion"],
        "expressions": [],
    }
    for obj in objects:
        obj["boxes"] = _object_boxes(scene, obj)
        obj["description"] = describe_object(obj)
    scene["expressions"] = _expressions(scene, classes)
    return scene


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------

_OBJECT_KEYS = (
    "id", "class", "color", "shape", "position", "row", "motion", "visible", "sounding", "loudness", "boxes",
    "description",
)  # fmt: skip
_TOP_KEYS = (
    "version", "clip_id", "split", "seed", "num_segments", "segment_seconds", "frames_per_segment",
    "frame_size", "sample_rate", "mood", "noise_level", "objects", "av_event", "action", "expressions",
)  # fmt: skip


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_ranges(where: str, ranges: Any, T: int) -> np.ndarray:
    if not isinstance(ranges, list):
        raise ValueError(f"{where} must be a list of [start, end) ranges, got {ranges!r}")
    prev_end = -1
    for r in ranges:
        if not (isinstance(r, list) and len(r) == 2 and all(_is_int(v) for v in r)):
            raise ValueError(f"{where}: {r!r} is not an [start, end) pair of ints")
        if not (0 <= r[0] < r[1] <= T) or r[0] <= prev_end:
            raise ValueError(f"{where}: ranges {ranges!r} are not sorted, separate, within [0, {T}]")
        prev_end = r[1]
    return ranges_to_mask(ranges, T)


def old_schema_message(version: Any, where: str = "this scene") -> str:
    """What to say about data of an older schema ``version``: it is not read; how to regenerate."""
    return (
        f"{where} is AVSynth schema v{version}, which is no longer read: this version of avmt reads "
        f"AVSynth v{SCHEMA_VERSION} (object masks, multi-source scenes, referring expressions). "
        f"Regenerate the data with: {SYNTH_COMMAND.format(root='DIR')}"
    )


def validate_scene(scene: Any) -> None:
    """Check a scene graph against the schema-v2 contract (fields, vocabularies, ranges, boxes,
    descriptions, expressions, and either exactly one audio-visual event or a multi-source scene);
    raise ``ValueError`` saying what is wrong.  A v1 scene is rejected with how to regenerate."""
    if not isinstance(scene, dict):
        raise ValueError(f"a scene must be a JSON object, got {type(scene).__name__}")
    version = scene.get("version")
    if _is_int(version) and version < SCHEMA_VERSION:
        raise ValueError(old_schema_message(version, f"scene {scene.get('clip_id')!r}"))
    missing = [k for k in _TOP_KEYS if k not in scene]
    if missing:
        raise ValueError(f"scene misses fields {missing}")
    if version != SCHEMA_VERSION:
        raise ValueError(f"scene version {version!r} is not {SCHEMA_VERSION}")
    T, F = scene["num_segments"], scene["frames_per_segment"]
    size = scene["frame_size"]
    if not (_is_int(T) and 1 <= T <= 100_000 and _is_int(F) and 1 <= F <= 1000):
        raise ValueError("scene num_segments / frames_per_segment must be ints in [1, 100000] / [1, 1000]")
    if not (_is_int(scene["sample_rate"]) and 1 <= scene["sample_rate"] <= 1_000_000):
        raise ValueError(f"scene sample_rate must be a positive int, got {scene['sample_rate']!r}")
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v) and 0 < v <= 8192 for v in size)):
        raise ValueError(f"scene frame_size must be [H, W] positive ints, got {size!r}")
    if not isinstance(scene["segment_seconds"], (int, float)) or scene["segment_seconds"] <= 0:
        raise ValueError(f"scene segment_seconds must be > 0, got {scene['segment_seconds']!r}")
    if scene["mood"] not in vocab.MOODS:
        raise ValueError(f"scene mood {scene['mood']!r} is not one of {vocab.MOODS}")
    objects = scene["objects"]
    if not isinstance(objects, list) or not objects:
        raise ValueError("scene objects must be a non-empty list")
    av_objects = []
    both = np.zeros((len(objects), T), dtype=bool)  # visible and sounding, per object and segment
    referents = set()  # visible at some time and sounding at some time
    vocabularies = {"class": vocab.CLASSES, "color": vocab.COLORS, "shape": vocab.SHAPES,
                    "position": vocab.POSITIONS, "row": vocab.ROWS, "motion": vocab.MOTIONS}
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict) or any(k not in obj for k in _OBJECT_KEYS):
            raise ValueError(f"scene object {i} must have the fields {_OBJECT_KEYS}")
        if obj["id"] != i:
            raise ValueError(f"scene object {i} has id {obj['id']!r}")
        for key, words in vocabularies.items():
            if obj[key] not in words:
                raise ValueError(f"object {i} {key} {obj[key]!r} is not one of {words}")
        vis = _check_ranges(f"object {i} visible", obj["visible"], T)
        snd = _check_ranges(f"object {i} sounding", obj["sounding"], T)
        loud = obj["loudness"]
        if isinstance(loud, bool) or not isinstance(loud, (int, float)) or not 0 <= loud <= 1:
            raise ValueError(f"object {i} loudness must be in [0, 1], got {loud!r}")
        boxes = obj["boxes"]
        if not isinstance(boxes, list) or len(boxes) != T:
            raise ValueError(f"object {i} boxes must be a list of {T} entries")
        for t, box in enumerate(boxes):
            if box is None:
                if vis[t]:
                    raise ValueError(f"object {i} is visible in segment {t} but its box is null")
                continue
            if not vis[t]:
                raise ValueError(f"object {i} is not visible in segment {t} but has a box")
            ints = isinstance(box, list) and len(box) == 4 and all(_is_int(v) for v in box)
            in_range = ints and all(0 <= v <= 1000 for v in box)
            if not in_range:
                raise ValueError(f"object {i} box {box!r} is not 4 ints in 0..1000")
            if not (box[0] < box[2] and box[1] < box[3]):
                raise ValueError(f"object {i} box {box!r} is empty")
        description = obj["description"]
        if vis.any() != (isinstance(description, str) and bool(description.strip())):
            expected = "a non-empty string" if vis.any() else "null (the object is never visible)"
            raise ValueError(f"object {i} description must be {expected}, got {description!r}")
        if vis.any() and snd.any():
            referents.add(i)
        both[i] = vis & snd
        if both[i].any():
            av_objects.append((i, mask_to_ranges(both[i])))
    expressions = scene["expressions"]
    if not isinstance(expressions, list):
        raise ValueError(f"scene expressions must be a list, got {type(expressions).__name__}")
    for k, expr in enumerate(expressions):
        if not (isinstance(expr, dict) and set(expr) == {"text", "object"}):
            raise ValueError(
                f"expression {k} must be an object with the fields text and object, got {expr!r}"
            )
        if not (isinstance(expr["text"], str) and expr["text"].strip()):
            raise ValueError(f"expression {k} text must be a non-empty string, got {expr['text']!r}")
        target = expr["object"]
        if target is not None and not (_is_int(target) and target in referents):
            raise ValueError(
                f"expression {k} ({expr['text']!r}) object {target!r} is not the id of an object that "
                f"is visible and sounding (those are {sorted(referents)}), nor null"
            )
    event = scene["av_event"]
    if event is None or scene["action"] is None:
        if event is not None or scene["action"] is not None:
            raise ValueError("scene av_event and action must both be null (a multi-source scene) or both set")
        if int(both.sum(axis=0).max(initial=0)) < 2:
            raise ValueError(
                "scene av_event is null but the scene is not multi-source: it needs >= 2 objects that "
                "are both visible and sounding in a common segment"
            )
        return
    if len(av_objects) != 1:
        raise ValueError(f"scene must have exactly one audio-visual object, has {len(av_objects)}")
    av_id, shared = av_objects[0]
    if not isinstance(event, dict) or event.get("object") != av_id:
        raise ValueError(f"av_event {event!r} does not name object {av_id}, the visible-and-sounding one")
    if event.get("class") != objects[av_id]["class"] or len(shared) != 1 or event.get("range") != shared[0]:
        raise ValueError(f"av_event {event!r} does not match object {av_id} (shared range {shared})")
    if shared[0][1] - shared[0][0] < 2:
        raise ValueError(f"av_event range {shared[0]} is shorter than 2 segments")
    if scene["action"] != objects[av_id]["motion"]:
        raise ValueError(f"scene action {scene['action']!r} is not the AV object's motion")


# --------------------------------------------------------------------------------------------
# Geometry (shared by boxes, masks and frames)
# --------------------------------------------------------------------------------------------


def _visible_frames(scene: dict, obj: dict) -> np.ndarray:
    """bool ``[T*F]``: frames on which ``obj`` is drawn."""
    seg = ranges_to_mask(obj["visible"], scene["num_segments"])
    return np.repeat(seg, scene["frames_per_segment"])


def _object_track(scene: dict, obj: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Centre x, centre y and radius of ``obj`` on every frame (pixels), each ``[T*F]``.

    The object stays inside its screen cell (a third of the width x half the height): static
    and pulsing objects sit near the cell centre (small per-object jitter); moving objects travel
    from 30% to 70% of the cell over the span between their first and last visible frame;
    pulsing objects alternate their size between 1.3x and 0.7x every segment.
    """
    H, W = scene["frame_size"]
    F = scene["frames_per_segment"]
    N = scene["num_segments"] * F
    rng = np.random.default_rng([scene["seed"], 4, obj["id"]])
    jx, jy = rng.uniform(-0.1, 0.1, size=2)
    radius = float(rng.uniform(0.08, 0.095)) * min(H, W)
    col = vocab.POSITIONS.index(obj["position"])
    row = vocab.ROWS.index(obj["row"])
    cw, ch = W / len(vocab.POSITIONS), H / len(vocab.ROWS)
    x0, y0 = col * cw, row * ch

    vis = np.flatnonzero(_visible_frames(scene, obj))
    n = np.arange(N, dtype=np.float64)
    if len(vis) > 1:
        u = np.clip((n - vis[0]) / (vis[-1] - vis[0]), 0.0, 1.0)
    else:
        u = np.full(N, 0.5)
    fx = np.full(N, 0.5 + jx)
    fy = np.full(N, 0.5 + jy)
    r = np.full(N, radius)
    motion = obj["motion"]
    if motion == "moving left":
        fx = 0.7 - 0.4 * u
    elif motion == "moving right":
        fx = 0.3 + 0.4 * u
    elif motion == "moving up":
        fy = 0.7 - 0.4 * u
    elif motion == "moving down":
        fy = 0.3 + 0.4 * u
    elif motion == "pulsing":
        r = radius * (1.0 + 0.3 * np.cos(np.pi * n / F))
    elif motion != "static":
        raise ValueError(f"unknown motion {motion!r} (expected one of {vocab.MOTIONS})")
    return x0 + fx * cw, y0 + fy * ch, r


def _shape_mask(shape: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray:
    """bool mask of ``shape`` given pixel offsets from the centre (broadcast ``[N, H, W]``)."""
    adx, ady = np.abs(dx), np.abs(dy)
    if shape == "circle":
        return dx * dx + dy * dy <= r * r
    if shape == "square":
        return np.maximum(adx, ady) <= 0.8 * r
    if shape == "triangle":
        return (dy >= -r) & (dy <= 0.75 * r) & (adx <= (dy + r) * 0.57)
    if shape == "diamond":
        return adx + ady <= r
    if shape == "cross":
        return ((adx <= 0.33 * r) & (ady <= r)) | ((ady <= 0.33 * r) & (adx <= r))
    if shape == "ring":
        d2 = dx * dx + dy * dy
        return (d2 <= r * r) & (d2 >= 0.25 * r * r)
    if shape == "bar":
        return (adx <= r) & (ady <= 0.38 * r)
    if shape == "star":
        rho = np.sqrt(dx * dx + dy * dy)
        theta = np.arctan2(dy, dx)
        return rho <= r * (0.68 + 0.32 * np.cos(5.0 * (theta + np.pi / 2)))
    raise ValueError(f"unknown shape {shape!r} (expected one of {vocab.SHAPES})")


def _texture_dark(texture: str, dx: np.ndarray, dy: np.ndarray, r: np.ndarray) -> np.ndarray | None:
    """bool ``[N, H, W]`` of the dark texture cells (``None`` for solid)."""
    if texture == "solid":
        return None
    half = np.maximum(2.0, np.round(r / 3.0))
    cx = np.floor(dx / half).astype(np.int64)
    cy = np.floor(dy / half).astype(np.int64)
    if texture == "hstripes":
        return cy % 2 == 1
    if texture == "vstripes":
        return cx % 2 == 1
    if texture == "checker":
        return (cx + cy) % 2 == 1
    raise ValueError(f"unknown texture {texture!r} (expected one of {TEXTURES})")


def _object_pixels(scene: dict, obj: dict) -> tuple[np.ndarray, np.ndarray | None]:
    """Mask ``[T*F, H, W]`` of ``obj`` (False on invisible frames) and its dark texture cells."""
    H, W = scene["frame_size"]
    cx, cy, r = _object_track(scene, obj)
    xs = np.arange(W, dtype=np.float64) + 0.5
    ys = np.arange(H, dtype=np.float64) + 0.5
    dx = xs[None, None, :] - cx[:, None, None]
    dy = ys[None, :, None] - cy[:, None, None]
    rr = r[:, None, None]
    mask = _shape_mask(obj["shape"], dx, dy, rr)
    mask &= _visible_frames(scene, obj)[:, None, None]
    dark = _texture_dark(CLASS_STYLES[obj["class"]].texture, dx, dy, rr)
    return mask, dark


def _object_boxes(scene: dict, obj: dict) -> list:
    """Per-segment exact box (normalized ints 0..1000) of the rendered mask, ``None`` when hidden."""
    H, W = scene["frame_size"]
    T, F = scene["num_segments"], scene["frames_per_segment"]
    if not obj["visible"]:
        return [None] * T
    mask, _ = _object_pixels(scene, obj)
    seg = mask.reshape(T, F, H, W).any(axis=1)  # [T, H, W]
    cols = seg.any(axis=1)  # [T, W]
    rows = seg.any(axis=2)  # [T, H]
    boxes: list = []
    for t in range(T):
        xs, ys = np.flatnonzero(cols[t]), np.flatnonzero(rows[t])
        if len(xs) == 0:
            boxes.append(None)
            continue
        boxes.append(
            [
                int(round(1000 * xs[0] / W)),
                int(round(1000 * ys[0] / H)),
                int(round(1000 * (xs[-1] + 1) / W)),
                int(round(1000 * (ys[-1] + 1) / H)),
            ]
        )
    return boxes


# --------------------------------------------------------------------------------------------
# Rendering
# --------------------------------------------------------------------------------------------


def _check_scene_cfg(scene: dict, cfg: SynthConfig) -> None:
    """The fields a scene records must agree with the config it is rendered with."""
    version = scene.get("version")
    if _is_int(version) and version < SCHEMA_VERSION:
        raise ValueError(old_schema_message(version, f"scene {scene.get('clip_id')!r}"))
    if version != SCHEMA_VERSION:
        raise ValueError(f"scene schema version {version!r} is not {SCHEMA_VERSION}")
    expected = {
        "num_segments": cfg.num_segments,
        "segment_seconds": float(cfg.segment_seconds),
        "frames_per_segment": cfg.frames_per_segment,
        "frame_size": [cfg.frame_size, cfg.frame_size],
        "sample_rate": cfg.sample_rate,
        "noise_level": float(cfg.noise_level),
    }
    for key, value in expected.items():
        if scene.get(key) != value:
            raise ValueError(
                f"scene {scene.get('clip_id')!r} has {key}={scene.get(key)!r} but the SynthConfig "
                f"gives {value!r}: render it with the config it was generated with"
            )


def render_masks(scene: dict, cfg: SynthConfig | None = None) -> np.ndarray:
    """Object-id masks ``uint8 [T*F, H, W]``: 0 = background, ``id + 1`` where object ``id`` is drawn.

    Exact: the pixels of object ``id`` are exactly those :func:`render_frames` paints in its
    colour (objects stay inside their own screen cells, so no pixel is drawn twice; a scene
    whose objects would overlap raises ``ValueError``).
    """
    cfg = cfg or SynthConfig()
    _check_scene_cfg(scene, cfg)
    H, W = scene["frame_size"]
    out = np.zeros((cfg.num_frames, H, W), dtype=np.uint8)
    for obj in scene["objects"]:
        if obj["visible"]:
            mask, _ = _object_pixels(scene, obj)
            if (out[mask] != 0).any():
                raise ValueError(
                    f"scene {scene.get('clip_id')!r}: object {obj['id']} overlaps another object; the masks "
                    "would not be exact (objects must sit in distinct screen cells)"
                )
            out[mask] = obj["id"] + 1
    return out


def render_frames(scene: dict, cfg: SynthConfig | None = None) -> np.ndarray:
    """Video frames ``uint8 [T*F, 3, H, W]`` of ``scene``."""
    cfg = cfg or SynthConfig()
    _check_scene_cfg(scene, cfg)
    H, W = scene["frame_size"]
    N = cfg.num_frames
    frames = np.empty((N, H, W, 3), dtype=np.uint8)
    frames[...] = np.asarray(BACKGROUND_RGB, dtype=np.uint8)
    for obj in scene["objects"]:
        if not obj["visible"]:
            continue
        if obj["color"] not in COLOR_RGB:
            raise ValueError(f"unknown colour {obj['color']!r} (expected one of {tuple(COLOR_RGB)})")
        light = np.asarray(COLOR_RGB[obj["color"]], dtype=np.float64)
        mask, dark = _object_pixels(scene, obj)
        if dark is None:
            frames[mask] = light.astype(np.uint8)
        else:
            frames[mask & ~dark] = light.astype(np.uint8)
            frames[mask & dark] = np.round(light * TEXTURE_DARK).astype(np.uint8)
    if cfg.visual_noise > 0:
        rng = np.random.default_rng([scene["seed"], 5])
        noisy = frames + rng.normal(0.0, cfg.visual_noise * 255.0, size=frames.shape)
        frames = np.clip(np.round(noisy), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(frames.transpose(0, 3, 1, 2))


def _gate(ranges: list[list[int]], cfg: SynthConfig) -> np.ndarray:
    """Sample gate ``float [S]``: 1 inside ``ranges``, 0 outside, 10 ms linear ramps inside the edges."""
    S, sps = cfg.num_samples, cfg.samples_per_segment
    gate = np.zeros(S, dtype=np.float64)
    ramp_len = max(1, min(int(0.01 * cfg.sample_rate), sps // 4))
    ramp = (np.arange(ramp_len, dtype=np.float64) + 1.0) / (ramp_len + 1.0)
    for start, end in ranges:
        a, b = start * sps, end * sps
        gate[a:b] = 1.0
        gate[a : a + ramp_len] = ramp
        gate[b - ramp_len : b] = ramp[::-1]
    return gate


def _band_noise(rng: np.random.Generator, n: int, band: tuple[float, float], sr: int) -> np.ndarray:
    spec = np.fft.rfft(rng.standard_normal(n))
    freqs = np.fft.rfftfreq(n, 1.0 / sr)
    spec[(freqs < band[0]) | (freqs > band[1])] = 0.0
    return np.fft.irfft(spec, n)


def _sin(phase: np.ndarray) -> np.ndarray:
    """``sin`` of a float64 phase (radians): wrapped to one period in float64, evaluated in float32."""
    cycles = phase * (1.0 / (2 * np.pi))
    cycles -= np.floor(cycles)
    cycles *= 2 * np.pi
    return np.sin(cycles.astype(np.float32))


def object_audio(scene: dict, obj: dict, cfg: SynthConfig | None = None) -> np.ndarray:
    """Waveform ``float64 [S]`` of one object: its class signature at RMS ``object_level x loudness``
    (peak capped at ``MAX_CREST`` x that) inside its sounding segments, exactly 0 outside them.

    Only the sounding samples are synthesized; the onset and offset of every sounding interval
    have 10 ms linear ramps that lie inside the interval.
    """
    cfg = cfg or SynthConfig()
    S, sr = cfg.num_samples, cfg.sample_rate
    out = np.zeros(S)
    if not obj["sounding"] or obj["loudness"] <= 0:
        return out
    style = CLASS_STYLES[obj["class"]]
    rng = np.random.default_rng([scene["seed"], 1, obj["id"]])
    gate = _gate(obj["sounding"], cfg)
    idx = np.flatnonzero(gate)
    t = idx / sr
    nyquist = 0.45 * sr
    if style.f0 is not None:
        if style.fm_depth:
            fm_phase = rng.uniform(0, 2 * np.pi)
            # closed-form phase of f0 * (1 + d sin(2 pi r t + p))
            base = 2 * np.pi * style.f0 * t - (style.f0 * style.fm_depth / style.fm_rate) * np.cos(
                2 * np.pi * style.fm_rate * t + fm_phase
            )
        else:
            base = 2 * np.pi * style.f0 * t
        top = style.f0 * (1 + style.fm_depth)
        partials = [(ratio, amp) for ratio, amp in style.partials if ratio * top < nyquist] or [(1.0, 1.0)]
        phases = rng.uniform(0, 2 * np.pi, size=len(partials))
        wave = np.zeros(len(idx), dtype=np.float32)
        for (ratio, amp), phi in zip(partials, phases):  # <= 6 partials, each vectorized over samples
            wave += np.float32(amp) * _sin(ratio * base + phi)
    else:
        lo, hi = style.noise_band
        wave = _band_noise(rng, len(idx), (lo, min(hi, nyquist)), sr).astype(np.float32)
    if style.am_kind == "sine":
        offset = rng.uniform(0, 1)
        cos = _sin(2 * np.pi * (style.am_rate * t + offset) + np.pi / 2)
        wave *= np.float32(1.0 - 0.5 * style.am_depth) + np.float32(0.5 * style.am_depth) * cos
    elif style.am_kind == "decay":
        period = 1.0 / style.am_rate
        offset = rng.uniform(0, period)
        cycles = (t + offset) * style.am_rate
        local = ((cycles - np.floor(cycles)) * (period / style.decay)).astype(np.float32)
        wave *= np.exp(-local)
    # RMS normalization, with the peak capped at MAX_CREST x object_level for very peaky
    # (struck/ticking) classes so that a loud scene does not clip
    rms = math.sqrt(float(np.mean(np.square(wave, dtype=np.float64))))
    norm = max(rms, float(np.max(np.abs(wave))) / MAX_CREST)
    out[idx] = wave * (cfg.object_level * obj["loudness"] / (norm or 1.0)) * gate[idx]
    return out


def mood_audio(scene: dict, cfg: SynthConfig | None = None) -> np.ndarray:
    """Quiet mood bed ``float64 [S]`` (peak ``mood_level``): a pure-tone note pattern whose tempo
    and pitch contour give the mood (happy fast/rising, sad slow/falling, calm slow/flat,
    tense fast/dissonant semitone dyads).  Present over the whole clip."""
    cfg = cfg or SynthConfig()
    S, sr = cfg.num_samples, cfg.sample_rate
    if cfg.mood_level == 0:
        return np.zeros(S)
    rate, steps, dyad = _MOOD_PATTERNS[scene["mood"]]
    rng = np.random.default_rng([scene["seed"], 2])
    transpose = int(rng.integers(-2, 3))
    pos = np.arange(S, dtype=np.float64) * (rate / sr)  # time in notes
    note = pos.astype(np.int64)
    step_hz = _MOOD_BASE_HZ * 2.0 ** ((np.asarray(steps, dtype=np.float64) + transpose) / 12.0)
    phase = np.cumsum(step_hz[note % len(steps)]) * (2 * np.pi / sr)
    local = (pos - note).astype(np.float32)  # position inside the note, 0..1
    env = np.minimum(np.float32(1.0), local * np.float32(20.0)) * np.exp(np.float32(-3.0) * local)
    wave = _sin(phase)
    if dyad:
        wave = np.float32(0.5) * (wave + _sin(phase * 2.0 ** (1 / 12)))
    return (cfg.mood_level * env * wave).astype(np.float64)


def render_audio(scene: dict, cfg: SynthConfig | None = None) -> np.ndarray:
    """Mono waveform ``float32 [S]`` in [-1, 1): objects + mood bed + white noise (``noise_level``)."""
    cfg = cfg or SynthConfig()
    _check_scene_cfg(scene, cfg)
    audio = mood_audio(scene, cfg)
    for obj in scene["objects"]:
        audio = audio + object_audio(scene, obj, cfg)
    if cfg.noise_level > 0:
        noise = np.random.default_rng([scene["seed"], 3]).standard_normal(audio.shape, dtype=np.float32)
        audio += cfg.noise_level * noise
    return np.clip(audio, -1.0, 32767 / 32768).astype(np.float32)


def render_clip(scene: dict, cfg: SynthConfig | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Render ``scene``: frames ``uint8 [T*F, 3, H, W]`` and audio ``float32 [S]``
    (S = T x segment_seconds x sample_rate).  ``cfg`` must match the fields the scene records."""
    return render_frames(scene, cfg), render_audio(scene, cfg)
