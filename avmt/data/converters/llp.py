"""``llp``: the LLP dataset (Look, Listen and Parse; AVVP, Tian et al., ECCV 2020) for the ``avvp``
and ``avvp_weak`` tasks.

Layout under ``--src`` (the official repository's ``data/`` folder; the repository root that
holds ``data/`` is accepted too). Every file is tab-separated with a header line::

    AVVP_train.csv         filename  event_labels                   weak labels of the training videos
    AVVP_val_pd.csv        filename  event_labels                   the val videos (weak labels)
    AVVP_test_pd.csv       filename  event_labels                   the test videos (weak labels)
    AVVP_eval_audio.csv    filename  onset  offset  event_labels    dense audio events of val + test,
    AVVP_eval_visual.csv   filename  onset  offset  event_labels    dense visual events, one row per event
    LLP_dataset/video/{filename}.mp4                                the 10 s videos

``filename`` is ``{youtube_id}_{start}_{end}`` (the id may itself hold ``_`` and ``-``: it is
used whole, never split); ``event_labels`` is comma-joined class names of the 25 LLP classes,
spelled as :data:`avmt.data.labels.LLP_CLASSES` (``Speech,Frying_(food)``); onset and offset
are whole seconds of the 10 s clip, an event covering ``[onset, offset)`` as the official
evaluation reads it (``GT[class, onset:offset] = 1``). The official download script names the
videos by the first 11 characters of ``filename`` instead; ``LLP_dataset/video/{filename[:11]}.mp4``
is used when ``{filename}.mp4`` is not there. Videos are already cut to their 10 s window.

At least one of the three lists must exist; with the val or the test list both eval files must
exist too (a missing file is a :class:`ConvertError` naming it).

Answers written:

- every clip: ``answers["avvp_weak"] = {"events": [class, ...]}`` (the weak, video-level label:
  what occurs in the video, heard or seen, with no time and no modality);
- val / test clips also: ``answers["avvp"] = {"audio": {class: [[s, e], ...]}, "visual": {...}}``,
  each event's seconds in segments (:func:`~avmt.data.converters.base.seconds_to_segments`),
  merged per class, classes ordered by onset. Training clips get no ``avvp`` answer: their labels
  say nothing about when or in which modality, and no ranges are made up for them.

Skipped and named (:class:`Skip`): a list row whose labels are empty or name a class outside the
25, a malformed row, a video listed twice; a val / test video with any malformed or unknown-class
dense row (its dense labels would be incomplete), or with no row in either eval file (in LLP
every val / test video has dense rows, so it could not be scored); a missing or corrupt video.
Rows of zero length (``onset == offset``, which LLP has, e.g. ``9 9 Speech``) mark nothing, as in
the official evaluation, and are dropped; so are events outside a clip cut shorter than 10 s.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from avmt.data.converters import register_converter
from avmt.data.converters.base import (
    ConvertError,
    Converter,
    Skip,
    SourceClip,
    TableRow,
    read_table,
    safe_key,
    seconds_to_segments,
)
from avmt.data.labels import LLP_CLASSES
from avmt.data.media import MediaConfig
from avmt.intervals import merge_ranges

SPLIT_LISTS = {"train": "AVVP_train.csv", "val": "AVVP_val_pd.csv", "test": "AVVP_test_pd.csv"}
#: Dense annotation files, by the ``avvp`` answer's event kind.
EVAL_FILES = {"audio": "AVVP_eval_audio.csv", "visual": "AVVP_eval_visual.csv"}
WEAK_COLUMNS = ("filename", "event_labels")
DENSE_COLUMNS = ("filename", "onset", "offset", "event_labels")
VIDEO_FOLDER = Path("LLP_dataset") / "video"
#: Length of a YouTube id: the official download script names the videos ``filename[:11]``.
YOUTUBE_ID_LENGTH = 11
#: LLP class by its comparison key (case and whitespace insensitive), spelled as the dataset does.
_CLASS_BY_KEY = {"".join(c.split()).casefold(): c for c in LLP_CLASSES}


@dataclass
class _DenseLabels:
    """The dense rows of one video: events per kind, which files list it, its first bad row."""

    events: dict[str, dict[str, list[list[int]]]] = field(default_factory=lambda: {"audio": {}, "visual": {}})
    listed_in: set[str] = field(default_factory=set)
    error: tuple[str, str] | None = None  # (file, reason)


def _classes(labels: str) -> tuple[list[str], str | None]:
    """``"Speech,Frying_(food)"`` -> the LLP classes as the dataset spells them, or the reason it
    is not a label list (empty, or a class outside the 25)."""
    names = [name.strip() for name in labels.split(",") if name.strip()]
    if not names:
        return [], "no event labels"
    unknown = [name for name in names if "".join(name.split()).casefold() not in _CLASS_BY_KEY]
    if unknown:
        return [], f"unknown class {unknown[0]!r} (not one of the {len(LLP_CLASSES)} LLP classes)"
    out: list[str] = []
    for name in names:
        cls = _CLASS_BY_KEY["".join(name.split()).casefold()]
        if cls not in out:
            out.append(cls)
    return out, None


def _read_dense(root: Path, media: MediaConfig) -> dict[str, _DenseLabels]:
    """Every video's dense events from the two eval files, in segments of ``media``."""
    videos: dict[str, _DenseLabels] = {}
    for kind, name in EVAL_FILES.items():
        path = root / name
        if not path.is_file():
            raise ConvertError(f"'{path}' is missing: the val / test videos' dense {kind} labels are read from it "
                               f"(the LLP layout: tab-separated {', '.join(DENSE_COLUMNS)})")
        for row in read_table(path, DENSE_COLUMNS, "LLP annotation file", delimiter="\t")[1]:
            filename = row.fields["filename"]
            video = videos.setdefault(filename, _DenseLabels())
            video.listed_in.add(kind)
            if video.error is not None:
                continue
            reason = _dense_row_error(row, video, kind, media)
            if reason is not None:
                video.error = (name, f"{name} line {row.line}: {reason}")
    return videos


def _dense_row_error(row: TableRow, video: _DenseLabels, kind: str, media: MediaConfig) -> str | None:
    """Add one dense row's event to ``video``; the reason when the row is malformed."""
    if not row.complete:
        return f"expected {len(DENSE_COLUMNS)} tab-separated fields ({', '.join(DENSE_COLUMNS)})"
    classes, reason = _classes(row.fields["event_labels"])
    if reason is not None:
        return reason
    if len(classes) != 1:
        return f"one class per dense row expected, got {row.fields['event_labels']!r}"
    try:
        onset, offset = float(row.fields["onset"]), float(row.fields["offset"])
    except ValueError:
        return f"onset {row.fields['onset']!r} / offset {row.fields['offset']!r} are not seconds"
    if not 0 <= onset <= offset:
        return f"onset {onset:g} s and offset {offset:g} s do not make a time span"
    segments = seconds_to_segments(onset, offset, media)
    if segments is not None:  # None: a zero-length row, or outside a clip cut shorter than 10 s
        events = video.events[kind]
        events[classes[0]] = merge_ranges(events.get(classes[0], []) + [segments])
    return None


def _ordered(events: dict[str, list[list[int]]]) -> dict[str, list[list[int]]]:
    """Classes ordered by onset, then name (the order the ``avvp`` target lists them in)."""
    return dict(sorted(events.items(), key=lambda kv: (kv[1][0][0], kv[0])))


def _video_path(root: Path, filename: str) -> Path:
    """``LLP_dataset/video/{filename}.mp4``, else the download script's ``{filename[:11]}.mp4`` when
    that one exists (a missing video is reported under the first name)."""
    folder = root / VIDEO_FOLDER
    whole, short = folder / f"{filename}.mp4", folder / f"{filename[:YOUTUBE_ID_LENGTH]}.mp4"
    return short if not whole.is_file() and short.is_file() else whole


@register_converter
class LLPConverter(Converter):
    """LLP's weak lists + dense eval files + videos -> clips with ``avvp_weak`` (all splits) and
    ``avvp`` (val / test) answers."""

    name = "llp"
    version = 1
    description = ("AVVP_train.csv / AVVP_val_pd.csv / AVVP_test_pd.csv (filename, event_labels) + "
                   "AVVP_eval_audio.csv / AVVP_eval_visual.csv (filename, onset, offset, event_labels), "
                   "tab-separated + LLP_dataset/video/{filename}.mp4")
    media_defaults = {"num_segments": 10, "segment_seconds": 1.0}

    def items(self, src: Path, media: MediaConfig) -> Iterator[SourceClip | Skip]:
        root = src
        if not any((src / name).is_file() for name in SPLIT_LISTS.values()) and (src / "data").is_dir():
            root = src / "data"  # the repository root
        lists = {split: root / name for split, name in SPLIT_LISTS.items() if (root / name).is_file()}
        if not lists:
            raise ConvertError(f"'{src}' holds none of {', '.join(SPLIT_LISTS.values())}: not the LLP layout "
                               f"({self.description})")
        dense = _read_dense(root, media) if {"val", "test"} & set(lists) else {}
        seen: dict[str, str] = {}
        for split, path in lists.items():
            for row in read_table(path, WEAK_COLUMNS, "LLP annotation file", delimiter="\t")[1]:
                yield self._clip(root, split, path, row, dense, seen, media)

    def _clip(self, root: Path, split: str, path: Path, row: TableRow, dense: dict[str, _DenseLabels],
              seen: dict[str, str], media: MediaConfig) -> SourceClip | Skip:
        """One list row as a clip, or the Skip saying why it cannot be one."""
        where = f"{path.name} line {row.line}"
        filename = row.fields["filename"]
        if not filename or not row.complete:
            return Skip(filename or f"{path.name}:{row.line}", str(path),
                        f"{where}: expected the tab-separated fields {', '.join(WEAK_COLUMNS)}", split)
        weak, reason = _classes(row.fields["event_labels"])
        if reason is not None:
            return Skip(filename, str(path), f"{where}: {reason}", split)
        if filename in seen:
            return Skip(filename, str(path), f"{where}: video {filename} is already listed in {seen[filename]}", split)
        seen[filename] = where
        answers: dict = {"avvp_weak": {"events": weak}}
        if split != "train":
            video = dense.get(filename)
            if video is None:
                return Skip(filename, str(path), f"{where}: no row in {' or '.join(EVAL_FILES.values())}; a "
                            f"{split} video needs its dense labels to be scored", split)
            if video.error is not None:
                file, reason = video.error
                return Skip(filename, str(root / file), reason, split)
            answers["avvp"] = {kind: _ordered(video.events[kind]) for kind in EVAL_FILES}
        return SourceClip(
            key=safe_key(filename),
            split=split,
            source_id=filename,
            answers=answers,
            video=_video_path(root, filename),
        )
