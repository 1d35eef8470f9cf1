"""``music-avqa``: the MUSIC-AVQA dataset (Li et al., CVPR 2022) for the ``avqa`` task.

Layout under ``--src`` (the official repository's ``data/`` folder, or any folder holding the same)::

    avqa-train.json avqa-val.json avqa-test.json     the question files (at least one of them),
                                                     in ``--src`` itself or in json_update/,
                                                     data/json_update/, json/ or data/json/
    MUSIC-AVQA-videos-Real/{video_id}.mp4            the real videos (60 s each)
    MUCIS-AVQA-videos-Synthetic/{video_id}.mp4       the synthetic videos (the archive's own spelling;
                                                     MUSIC-AVQA-videos-Synthetic/ is accepted too)

The video folders may also sit under ``video/``, ``videos/``, ``data/video/`` or ``avqa-videos/``,
or the videos may lie directly in one of those folders. When several question folders exist the
first in the order above is read (``json_update/``, the corrected release, before ``json/``).

A question file is a JSON list of questions::

    {"video_id": "00000272", "question_id": 7,
     "type": "[\\"Audio-Visual\\", \\"Location\\"]",            # a stringified [modality, kind] list
     "question_content": "Where is the <FL> sounding instrument?",
     "templ_values": "[\\"first\\"]",                           # a stringified list: the <...> slots, in order
     "anser": "left",                                         # (sic) one of the 42 answers
     "question_deleted": 0}                                   # json_update only: 1 = withdrawn question

Clips: a train clip is one video with all its questions (the ``avqa`` task picks one per epoch
with its rng); a val or test clip is one (video, question) pair, the video's media written once
per question, so that evaluation, which builds one sample per clip, scores every question exactly
once. Keys: ``{video_id}`` (train), ``{video_id}-{question_id}`` (val / test). The cost: a video
has about five questions, so the val / test shards are about five times the size of one clip per
video (a clip at the defaults is roughly 1.3 MB, mostly its 60 s of FLAC audio: some 18 GB instead
of 3.6 GB for the two splits); the decoding is not repeated (consecutive clips of a video reuse it).

Answer written (``answers["avqa"]``)::

    {"questions": [{"question_id": 7, "question": "Where is the first sounding instrument?",
                    "answer": "left", "type": "Audio-Visual/Location"}, ...]}

An entry that cannot be read (not an object, a missing field, a ``type`` that is not one of
MUSIC-AVQA's nine question types, slots and ``templ_values`` that do not pair up, an answer
outside the 42, a repeated question id, a withdrawn question) is a :class:`Skip` naming the file
and the question; a missing or corrupt video skips its clip(s).
"""

from __future__ import annotations

import ast
import json
import os
import re
from pathlib import Path
from typing import Any, Iterator

from avmt.data.converters import register_converter
from avmt.data.converters.base import ConvertError, Converter, LoadedClip, Skip, SourceClip, read_json, safe_key
from avmt.data.labels import MUSIC_AVQA_ANSWERS
from avmt.data.media import MediaConfig
from avmt.errors import UserError

SPLITS = ("train", "val", "test")
#: Where the question files ``avqa-{split}.json`` may be, relative to ``--src``; the first folder
#: holding any of them is read.
QUESTION_FOLDERS = (".", "json_update", "data/json_update", "json", "data/json")
#: The video folders' own names (the synthetic archive is spelled "MUCIS" by the dataset).
VIDEO_FOLDERS = ("MUSIC-AVQA-videos-Real", "MUCIS-AVQA-videos-Synthetic", "MUSIC-AVQA-videos-Synthetic", ".")
#: Folders (relative to ``--src``) that may hold the video folders, or the videos themselves.
VIDEO_ROOTS = (".", "video", "videos", "data/video", "data/videos", "avqa-videos")
#: MUSIC-AVQA's nine question types, ``(modality, kind)`` as the ``type`` field writes them; the
#: paper reports them grouped by modality: Audio {Counting, Comparative}, Visual {Counting,
#: Location}, Audio-Visual {Existential, Counting, Location, Comparative, Temporal}.
QUESTION_TYPES: tuple[tuple[str, str], ...] = (
    ("Audio", "Counting"),
    ("Audio", "Comparative"),
    ("Visual", "Counting"),
    ("Visual", "Location"),
    ("Audio-Visual", "Existential"),
    ("Audio-Visual", "Counting"),
    ("Audio-Visual", "Location"),
    ("Audio-Visual", "Comparative"),
    ("Audio-Visual", "Temporal"),
)
REQUIRED_FIELDS = ("video_id", "question_id", "type", "question_content", "templ_values", "anser")
_SLOT_RE = re.compile(r"<[^<>\s]+>")
_ANSWER_KEYS = {"".join(a.split()).casefold(): a for a in MUSIC_AVQA_ANSWERS}


def _string_list(text: Any, field: str) -> list[str]:
    """A stringified list (``'["Audio", "Counting"]'``; JSON, or a Python literal as the official
    loader reads it with ``ast.literal_eval``) -> its strings. ValueError saying what is wrong."""
    if isinstance(text, list):
        value: Any = text
    elif isinstance(text, str):
        try:
            value = json.loads(text)
        except ValueError:
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                raise UserError(f"{field} {text!r} is not a stringified list") from None
    else:
        raise UserError(f"{field} {text!r} is not a stringified list")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, int, float)) for v in value):
        raise UserError(f"{field} {text!r} is not a list of strings")
    return [str(v) for v in value]


def question_type(text: Any) -> str:
    """``'["Audio-Visual", "Location"]'`` -> ``"Audio-Visual/Location"``; ValueError when the
    string is malformed or not one of MUSIC-AVQA's nine question types."""
    parts = _string_list(text, "type")
    if len(parts) != 2 or (parts[0], parts[1]) not in QUESTION_TYPES:
        known = ", ".join(f"{m}/{k}" for m, k in QUESTION_TYPES)
        raise UserError(f"type {text!r} is not one of MUSIC-AVQA's question types ({known})")
    return f"{parts[0]}/{parts[1]}"


def fill_question(content: Any, templ_values: Any) -> str:
    """The question text: each ``<...>`` slot of ``content`` replaced, in order, by the next
    value of ``templ_values`` (a stringified list). ValueError when they do not pair up.

    >>> fill_question("Is the <Object> on the <LR> louder?", '["piano", "left"]')
    'Is the piano on the left louder?'
    """
    if not isinstance(content, str) or not content.strip():
        raise UserError(f"question_content {content!r} is not a non-empty string")
    values = _string_list(templ_values, "templ_values")
    slots = _SLOT_RE.findall(content)
    if len(slots) != len(values):
        raise UserError(f"question_content {content!r} has {len(slots)} slot(s) {slots}, "
                         f"templ_values {templ_values!r} gives {len(values)} value(s)")
    remaining = iter(values)
    return " ".join(_SLOT_RE.sub(lambda _: next(remaining), content).split())


def read_question(entry: Any) -> tuple[str, dict[str, Any]]:
    """One entry of a question file -> ``(video_id, {"question_id", "question", "answer", "type"})``.

    Raises:
        ValueError: the entry is not usable (says which field and why).
    """
    if not isinstance(entry, dict):
        raise UserError(f"the entry is a {type(entry).__name__}, not an object")
    missing = [name for name in REQUIRED_FIELDS if name not in entry]
    if missing:
        raise UserError(f"the entry misses the field(s) {missing}")
    video_id = entry["video_id"]
    if not isinstance(video_id, (str, int)) or not str(video_id).strip():
        raise UserError(f"video_id {video_id!r} is not an id")
    question_id = entry["question_id"]
    if not isinstance(question_id, (str, int)) or isinstance(question_id, bool) or not str(question_id).strip():
        raise UserError(f"question_id {question_id!r} is not an id")
    if entry.get("question_deleted") in (1, "1", True):
        raise UserError("the question is withdrawn (question_deleted = 1)")
    answer = entry["anser"]
    known = _ANSWER_KEYS.get("".join(str(answer).split()).casefold()) if isinstance(answer, str) else None
    if known is None:
        raise UserError(f"anser {answer!r} is not one of MUSIC-AVQA's {len(MUSIC_AVQA_ANSWERS)} answers")
    return str(video_id).strip(), {
        "question_id": question_id,
        "question": fill_question(entry["question_content"], entry["templ_values"]),
        "answer": " ".join(answer.split()),
        "type": question_type(entry["type"]),
    }


def _question_files(src: Path) -> dict[str, Path]:
    """``split -> avqa-{split}.json`` of the first folder in ``QUESTION_FOLDERS`` holding any."""
    for folder in QUESTION_FOLDERS:
        files = {split: src / folder / f"avqa-{split}.json" for split in SPLITS}
        files = {split: path for split, path in files.items() if path.is_file()}
        if files:
            return files
    names = ", ".join(f"avqa-{split}.json" for split in SPLITS)
    raise ConvertError(f"'{src}' holds none of {names} (looked in {', '.join(QUESTION_FOLDERS)}): not the "
                       f"MUSIC-AVQA layout ({MusicAVQAConverter.description})")


def _video_index(src: Path) -> tuple[dict[str, Path], Path]:
    """``video_id -> file`` for every ``*.mp4`` in the known video folders (the first folder in
    the order of ``VIDEO_ROOTS`` x ``VIDEO_FOLDERS`` wins), and the folder a missing video is
    reported in (the first video folder found)."""
    index: dict[str, Path] = {}
    first: Path | None = None
    for root in VIDEO_ROOTS:
        for name in VIDEO_FOLDERS:
            folder = src / root / name  # pathlib drops the "." parts
            if not folder.is_dir():
                continue
            videos = sorted(folder.glob("*.mp4"))
            if videos and first is None:
                first = folder
            for path in videos:
                index.setdefault(path.stem, path)
    return index, first or src / VIDEO_FOLDERS[0]


#: The last decoded video: a video's val / test clips are consecutive in key order, so each
#: (video, question) clip after the first reuses the decode (per process).
_LAST_DECODED: dict[Any, LoadedClip] = {}


@register_converter
class MusicAVQAConverter(Converter):
    """MUSIC-AVQA question files + videos -> clips with an ``avqa`` answer ``{"questions": [...]}``.

    Media: 10 segments of 6 s cover the 60 s videos: one frame per 6 s (at each segment's centre;
    the official code keeps every 6th of its 1 fps frames) and ``audio_window_seconds`` 2 s, the
    audio window MUSIC-AVQA (and Crab on it: 10 frames + 10 windows) encodes around each frame.
    """

    name = "music-avqa"
    version = 1
    description = ("avqa-{train,val,test}.json (video_id, question_id, type, question_content, templ_values, anser) "
                   "+ MUSIC-AVQA-videos-Real/ and MUCIS-AVQA-videos-Synthetic/{video_id}.mp4")
    media_defaults = {"num_segments": 10, "segment_seconds": 6.0, "audio_window_seconds": 2.0}

    def items(self, src: Path, media: MediaConfig) -> Iterator[SourceClip | Skip]:
        """Train: one clip per video (all its questions); val / test: one clip per question."""
        files = _question_files(src)
        videos, missing_folder = _video_index(src)
        for split, path in files.items():
            entries = read_json(path, "MUSIC-AVQA question file")
            if not isinstance(entries, list):
                raise ConvertError(f"the MUSIC-AVQA question file '{path}' holds a {type(entries).__name__}, "
                                   f"not a list of questions")
            by_video: dict[str, list[dict[str, Any]]] = {}
            seen: set[str] = set()
            for index, entry in enumerate(entries):
                question_id = entry.get("question_id") if isinstance(entry, dict) else None
                where = f"{path.name}:{question_id if question_id is not None else f'#{index}'}"
                try:
                    video_id, question = read_question(entry)
                except ValueError as error:
                    yield Skip(where, str(path), f"question {index} of {path.name}: {error}", split)
                    continue
                if str(question_id) in seen:
                    yield Skip(where, str(path), f"question {index} of {path.name}: question_id {question_id!r} "
                               f"is listed twice", split)
                    continue
                seen.add(str(question_id))
                by_video.setdefault(video_id, []).append(question)
            for video_id, questions in by_video.items():
                video = videos.get(video_id, missing_folder / f"{video_id}.mp4")
                groups = [questions] if split == "train" else [[q] for q in questions]
                for group in groups:
                    key = safe_key(video_id) if split == "train" else safe_key(video_id, group[0]["question_id"])
                    yield SourceClip(key=key, split=split, source_id=video_id,
                                     answers={"avqa": {"questions": group}}, video=video)

    def load(self, item: SourceClip, media: MediaConfig) -> LoadedClip:
        """The default decode of ``item.video``, reused for the next clip of the same video."""
        try:
            stat = os.stat(item.video) if item.video is not None else None
        except OSError:
            stat = None  # missing: the decode below raises the MediaError naming it
        version = (stat.st_size, stat.st_mtime_ns) if stat is not None else None
        cache_key = (str(item.video), version, item.start, item.end, media)
        cached = _LAST_DECODED.get(cache_key)
        if cached is None:
            cached = super().load(item, media)
            _LAST_DECODED.clear()
            _LAST_DECODED[cache_key] = cached
        return LoadedClip(frames=cached.frames, audio=cached.audio, media=dict(cached.media))
