"""``ave``: the AVE dataset (Tian et al., 2018) for the ``ave`` task.

Layout under ``--src``::

    Annotations.txt              header, then Category&VideoID&Quality&StartTime&EndTime per line
    trainSet.txt valSet.txt testSet.txt   (optional) the same format: the official splits
    AVE/{VideoID}.mp4            10 s videos

With the split files, each line of ``trainSet.txt`` / ``valSet.txt`` / ``testSet.txt`` becomes a
clip of split train / val / test; without them every line of ``Annotations.txt`` is a train
clip. Start and end are whole seconds; the answer's range is in segments
(:func:`~avmt.data.converters.base.seconds_to_segments`). A line that does not parse and a
repeated video id are skipped and named with the file and line.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

from avmt.data.converters import register_converter
from avmt.data.converters.base import (
    ConvertError,
    Converter,
    Skip,
    SourceClip,
    read_text,
    safe_key,
    seconds_to_segments,
)
from avmt.data.media import MediaConfig

SPLIT_FILES = {"train": "trainSet.txt", "val": "valSet.txt", "test": "testSet.txt"}
VIDEO_FOLDER = "AVE"


@register_converter
class AVEConverter(Converter):
    """AVE annotation lines + videos -> clips with an ``ave`` answer ``{"class", "range"}``."""

    name = "ave"
    version = 1
    description = "Annotations.txt (Category&VideoID&Quality&StartTime&EndTime) [+ trainSet/valSet/testSet.txt] + AVE/{VideoID}.mp4"
    media_defaults = {"num_segments": 10, "segment_seconds": 1.0}

    def items(self, src: Path, media: MediaConfig) -> Iterator[SourceClip | Skip]:
        lists = {split: src / name for split, name in SPLIT_FILES.items() if (src / name).is_file()}
        if not lists:
            if not (src / "Annotations.txt").is_file():
                raise ConvertError(f"'{src}' holds neither Annotations.txt nor {', '.join(SPLIT_FILES.values())}: "
                                   f"not the AVE layout ({self.description})")
            lists = {"train": src / "Annotations.txt"}
        seen: dict[str, str] = {}
        for split, path in lists.items():
            lines = read_text(path, "AVE annotation file").splitlines()
            for number, line in enumerate(lines, start=1):
                if not line.strip() or line.startswith("Category&"):
                    continue
                where = f"{path.name}:{number}"
                fields = line.strip().split("&")
                if len(fields) != 5:
                    yield Skip(where, str(path), f"line {number} has {len(fields)} '&' fields, expected 5 "
                               f"(Category&VideoID&Quality&StartTime&EndTime)", split)
                    continue
                category, video_id, _quality, start, end = (f.strip() for f in fields)
                try:
                    segments = seconds_to_segments(float(start), float(end), media)
                except ValueError:
                    segments = None
                if not category or segments is None:
                    yield Skip(video_id or where, str(path), f"line {number}: no class or an empty/invalid time "
                               f"range {start!r}..{end!r} within the {media.clip_seconds:g} s clip", split)
                    continue
                if video_id in seen:
                    yield Skip(video_id, str(path), f"line {number}: video {video_id} is already listed in {seen[video_id]}",
                               split)
                    continue
                seen[video_id] = where
                yield SourceClip(
                    key=safe_key(video_id),
                    split=split,
                    source_id=video_id,
                    answers={"ave": {"class": category, "range": segments}},
                    video=src / VIDEO_FOLDER / f"{video_id}.mp4",
                )
