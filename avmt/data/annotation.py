"""The annotation of a converted clip: the ``scene.json`` member of a converted dataset's shards.

AVSynth shards carry a scene graph (:mod:`avmt.data.synth`); shards written by a converter
(``python -m avmt data convert FORMAT``, :mod:`avmt.data.converters`) carry this annotation
instead, in the same members (``audio.flac``, ``frames.png`` or ``frames.jpg``, ``masks.png``,
``scene.json``). A task reads its structured answer from ``answers[task name]``
(:meth:`avmt.tasks.base.Task.compose_annotated`), so one task serves both.

Schema (``format`` ``"avmt-annotation"``, ``version`` 1)::

    {
      "format": "avmt-annotation", "version": 1,
      "clip_id": "MH3m4AwEcRY",            # the WebDataset key
      "source": "ave",                     # converter name
      "source_id": "MH3m4AwEcRY",          # the id in the source dataset (video id, uid, ...)
      "split": "train",
      "num_segments": 10, "frames_per_segment": 1, "segment_seconds": 1.0,
      "frame_size": [224, 224], "sample_rate": 16000,
      "objects": [{"id": 0, "class": "Church bell"}],   # what masks.png value id+1 stands for
      "mask_frames": [0, 1, 2],            # frames (of the T·F) whose masks are annotated
      "media": {...},                      # avmt.data.media.MediaFlags of the decode
      "answers": {"ave": {"class": "Church bell", "range": [6, 8], "num_segments": 10}}
    }

``masks.png`` is present exactly when ``mask_frames`` is not empty; pixels of frames not in
``mask_frames`` are 0 and mean "not annotated", not background.
"""

from __future__ import annotations

from typing import Any, Iterable

from avmt.errors import UserError

__all__ = [
    "ANNOTATION_FORMAT",
    "ANNOTATION_VERSION",
    "is_annotation",
    "make_annotation",
    "validate_annotation",
    "annotation_words",
]

ANNOTATION_FORMAT = "avmt-annotation"
ANNOTATION_VERSION = 1
_SIZE_KEYS = ("num_segments", "frames_per_segment", "segment_seconds", "frame_size", "sample_rate")
_KEYS = ("format", "version", "clip_id", "source", "source_id", "split", *_SIZE_KEYS, "objects", "mask_frames",
         "media", "answers")


def is_annotation(scene: Any) -> bool:
    """Whether ``scene`` is a converted clip's annotation (not an AVSynth scene graph)."""
    return isinstance(scene, dict) and scene.get("format") == ANNOTATION_FORMAT


def make_annotation(
    clip_id: str,
    source: str,
    source_id: str,
    split: str,
    sizes: dict[str, Any],
    answers: dict[str, Any],
    objects: Iterable[str] = (),
    mask_frames: Iterable[int] = (),
    media: dict[str, Any] | None = None,
) -> dict:
    """A validated annotation.

    Args:
        clip_id: the shard key; source: the converter's name; source_id: the dataset's own id.
        split: the split it is written to.
        sizes: ``num_segments``, ``frames_per_segment``, ``segment_seconds``, ``frame_size``
            ``[H, W]`` and ``sample_rate`` of the stored media.
        answers: task name -> the task's structured answer.
        objects: class name of each mask object id (value ``id + 1`` in ``masks.png``).
        mask_frames: indices of the frames whose masks are annotated.
        media: what decoding found (``MediaFlags`` as a dict).
    """
    scene = {
        "format": ANNOTATION_FORMAT,
        "version": ANNOTATION_VERSION,
        "clip_id": clip_id,
        "source": source,
        "source_id": source_id,
        "split": split,
        **{key: sizes[key] for key in _SIZE_KEYS},
        "objects": [{"id": i, "class": name} for i, name in enumerate(objects)],
        "mask_frames": [int(i) for i in mask_frames],
        "media": dict(media or {}),
        "answers": dict(answers),
    }
    validate_annotation(scene)
    return scene


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def validate_annotation(scene: Any) -> None:
    """Raise ``ValueError`` saying what is wrong when ``scene`` breaks the schema above."""
    if not is_annotation(scene):
        raise UserError(f"not an {ANNOTATION_FORMAT} annotation")
    missing = [key for key in _KEYS if key not in scene]
    if missing:
        raise UserError(f"annotation misses fields {missing}")
    version = scene["version"]
    if version != ANNOTATION_VERSION:
        newer = isinstance(version, int) and version > ANNOTATION_VERSION
        raise UserError(
            f"annotation version {version!r}; this avmt reads version {ANNOTATION_VERSION}"
            + (" (upgrade avmt)" if newer else " (convert the data again)")
        )
    for key in ("num_segments", "frames_per_segment", "sample_rate"):
        if not _positive_int(scene[key]):
            raise UserError(f"annotation {key} must be a positive int, got {scene[key]!r}")
    if not isinstance(scene["segment_seconds"], (int, float)) or not scene["segment_seconds"] > 0:
        raise UserError(f"annotation segment_seconds must be > 0, got {scene['segment_seconds']!r}")
    size = scene["frame_size"]
    if not (isinstance(size, list) and len(size) == 2 and all(_positive_int(v) and v <= 8192 for v in size)):
        raise UserError(f"annotation frame_size must be [H, W] positive ints, got {size!r}")
    objects = scene["objects"]
    if not isinstance(objects, list) or len(objects) > 255:
        raise UserError("annotation objects must be a list of at most 255 objects")
    for i, obj in enumerate(objects):
        if not isinstance(obj, dict) or obj.get("id") != i or not isinstance(obj.get("class"), str):
            raise UserError(f"annotation object {i} must be {{'id': {i}, 'class': str}}, got {obj!r}")
    frames = scene["num_segments"] * scene["frames_per_segment"]
    mask_frames = scene["mask_frames"]
    if not isinstance(mask_frames, list) or any(
        not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < frames for i in mask_frames
    ):
        raise UserError(f"annotation mask_frames must be frame indices in [0, {frames}), got {mask_frames!r}")
    answers = scene["answers"]
    if not isinstance(answers, dict) or not answers or not all(isinstance(k, str) for k in answers):
        raise UserError("annotation answers must be a non-empty object keyed by task name")
    if not isinstance(scene["media"], dict):
        raise UserError("annotation media must be an object")


def annotation_words(value: Any) -> set[str]:
    """Every word of the text in an annotation's answers (recursively through lists and dicts),
    as :func:`avmt.tasks.text.text_words` splits it: what an offline vocabulary must hold."""
    from avmt.tasks.text import text_words  # lazily: the tasks package imports torch

    out: set[str] = set()
    if isinstance(value, str):
        out |= text_words(value)
    elif isinstance(value, dict):
        for item in value.values():
            out |= annotation_words(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            out |= annotation_words(item)
    return out
