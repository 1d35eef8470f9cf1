"""The converter contract and the one writer every converter shares.

A converter knows one dataset's own layout. It lists the dataset's clips
(:meth:`Converter.items`: annotation files only, cheap) and loads one clip's media
(:meth:`Converter.load`: decoding, the slow part). :func:`convert` does everything else the
same way for every format: deterministic shard plan, parallel decoding, atomic shard writes,
resuming an interrupted run, counting and naming what was skipped, and the manifest.

Output layout (``--out``)::

    manifest.json                    format "avmt-converted", versions, counts, skipped, words
    {split}/{split}-000000.tar ...   WebDataset shards: audio.flac, frames.jpg|png, [masks.png], scene.json
    .convert-state.json              progress of an unfinished run (removed when it completes)

``scene.json`` is an :mod:`avmt.data.annotation`; the tasks read their answers from it.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import io
import json
import multiprocessing
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Iterator

import numpy as np

from avmt.data.annotation import annotation_words, make_annotation
from avmt.data.media import MediaConfig, MediaError, decode_clip, read_image
from avmt.data.shards import encode_members, write_tar
from avmt.errors import UserError

__all__ = [
    "CONVERTED_FORMAT",
    "CONVERTED_FORMAT_VERSION",
    "ConvertError",
    "SourceClip",
    "Skip",
    "LoadedClip",
    "Converter",
    "convert",
    "safe_key",
    "seconds_to_segments",
    "read_text",
    "read_json",
    "TableRow",
    "read_table",
]

CONVERTED_FORMAT = "avmt-converted"
#: Version of the converted layout (members, manifest); the annotation has its own version.
CONVERTED_FORMAT_VERSION = 1
#: ``--frames_format`` choices: how the frames are stored in the shards
FRAMES_FORMATS = ("jpg", "png")
MANIFEST = "manifest.json"
STATE = ".convert-state.json"
_KEY_RE = re.compile(r"[^A-Za-z0-9_-]+")


class ConvertError(UserError):
    """The source folder cannot be converted at all (a missing or unreadable annotation file):
    a user error, the CLI prints it and exits 2. One bad clip is a :class:`Skip`, not this."""


def safe_key(*parts: Any) -> str:
    """A WebDataset key from id parts: characters other than ``A-Za-z0-9_-`` become ``_`` (a dot
    would split the key), parts joined by ``-``. ``safe_key("a.b", 3) == "a_b-3"``."""
    return "-".join(_KEY_RE.sub("_", str(part)) for part in parts)


# ---------------------------------------------------------------------------------------------
# reading annotation files
# ---------------------------------------------------------------------------------------------


def read_text(path: Path, what: str) -> str:
    """The text of the annotation file ``path`` (UTF-8, a byte-order mark dropped).

    Args:
        what: what the file is, for the message (``"AVE annotation file"``).
    Raises:
        ConvertError: the file is missing, unreadable or not UTF-8 ("cannot read the {what} '{path}': ...").
    """
    try:
        return path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise ConvertError(f"cannot read the {what} '{path}': {error}") from None


def read_json(path: Path, what: str) -> Any:
    """The JSON value of the annotation file ``path`` (:func:`read_text`).

    Raises:
        ConvertError: the file cannot be read or is not JSON ("cannot read the {what} '{path}': ...").
    """
    text = read_text(path, what)
    try:
        return json.loads(text)
    except ValueError as error:
        raise ConvertError(f"cannot read the {what} '{path}': {error}") from None


@dataclass
class TableRow:
    """One data row of an annotation table (:func:`read_table`).

    Attributes:
        line: the 1-based line of the file the row starts on (for ``{file}:{line}`` in messages).
        fields: header column -> the row's field, stripped ("" where the row is short; of two
            columns of one name, the first).
        size: how many fields the row has.
        complete: whether it has a field for every header column (``size >= len(header)``).
    """

    line: int
    fields: dict[str, str]
    size: int
    complete: bool


def read_table(path: Path, columns: tuple[str, ...], what: str,
               delimiter: str = ",") -> tuple[list[str], list[TableRow]]:
    """``(header, rows)`` of a delimited annotation file: CSV, or TSV with ``delimiter="\\t"``.

    The header is the first non-blank line (its names stripped) and must name every one of
    ``columns``; the other lines are the data rows, blank ones passed over. A malformed row is
    the caller's to skip (:class:`Skip`, naming ``row.line``).

    Args:
        path: the file (UTF-8, a byte-order mark dropped).
        columns: the columns the file must have.
        what: what the file is, for the messages (``"Ref-AVS metadata file"``).
    Raises:
        ConvertError: the file cannot be read or parsed, is empty, or its header lacks one of
            ``columns`` (the message names the file, its header and the missing columns).
    """
    text = read_text(path, what)
    kind = {",": "comma-separated", "\t": "tab-separated"}.get(delimiter, f"{delimiter!r}-separated")
    header: list[str] | None = None
    index: dict[str, int] = {}
    rows: list[TableRow] = []
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    last = 0  # the line the previous record ended on
    try:
        for record in reader:
            line, last = last + 1, reader.line_num
            values = [value.strip() for value in record]
            if not any(values):
                continue
            if header is None:
                header = values
                for position, name in enumerate(header):
                    index.setdefault(name, position)
                continue
            fields = {name: values[i] if i < len(values) else "" for name, i in index.items()}
            rows.append(TableRow(line, fields, len(values), len(values) >= len(header)))
    except csv.Error as error:
        raise ConvertError(f"cannot read the {what} '{path}': line {reader.line_num}: {error}") from None
    if header is None:
        raise ConvertError(f"the {what} '{path}' is empty; expected a header naming the {kind} columns "
                           f"{', '.join(columns)}")
    missing = [name for name in columns if name not in index]
    if missing:
        raise ConvertError(f"the {what} '{path}' has the header {header!r}, which lacks the columns {missing} "
                           f"(expected the {kind} columns {', '.join(columns)})")
    return header, rows


@dataclass
class SourceClip:
    """One clip of the source dataset, as its annotation files describe it.

    Attributes:
        key: unique shard key (:func:`safe_key`).
        split: output split (``train``, ``val``, ``test``, or the dataset's own names).
        source_id: the dataset's id of the clip (video id, uid, file name).
        answers: task name -> structured answer (what the task's ``compose_annotated`` reads).
        video: a video file (its audio too, unless ``audio`` is given), or ``None``.
        audio: a separate audio file, or ``None``.
        frames: image files, one per output frame (datasets that ship frames), or ``None``.
        start, end: the clip's window in the media file, in seconds (``None``: from 0 / to the end).
        extra: converter-private data for :meth:`Converter.load` (e.g. mask files).
    """

    key: str
    split: str
    source_id: str
    answers: dict[str, Any]
    video: Path | None = None
    audio: Path | None = None
    frames: list[Path] | None = None
    start: float | None = None
    end: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Skip:
    """A source entry that cannot become a clip: counted and named in the manifest.

    Attributes:
        key: the entry's id; file: the file at fault (annotation or media file); reason: why.
        split: the split it would have gone to ("" when unknown).
    """

    key: str
    file: str
    reason: str
    split: str = ""


@dataclass
class LoadedClip:
    """A clip's decoded media (what :meth:`Converter.load` returns).

    Attributes:
        frames: ``uint8 [T·F, 3, S, S]``; audio: ``float32 [T · segment_seconds · sample_rate]``.
        masks: ``uint8 [T·F, S, S]`` object-id maps (``id + 1``; 0 background or not annotated), or ``None``.
        objects: class name of each mask object id.
        mask_frames: frames whose masks are annotated.
        media: what decoding found (:class:`~avmt.data.media.MediaFlags` as a dict).
        answers: answers to replace the item's (when loading the media changes them), or ``None``.
    """

    frames: np.ndarray
    audio: np.ndarray
    masks: np.ndarray | None = None
    objects: list[str] = field(default_factory=list)
    mask_frames: list[int] = field(default_factory=list)
    media: dict[str, Any] = field(default_factory=dict)
    answers: dict[str, Any] | None = None


class Converter:
    """One dataset format: subclasses set ``name``, ``version``, ``description`` and
    ``media_defaults`` and implement :meth:`items`; most use the default :meth:`load`.

    Attributes:
        name: the ``FORMAT`` of ``python -m avmt data convert FORMAT``.
        version: bump when the output for the same source changes (it is in the manifest).
        description: one line for ``--help``: the layout the converter expects.
        media_defaults: :class:`~avmt.data.media.MediaConfig` fields this dataset uses unless the
            user sets them (e.g. AVE: 10 segments of 1 s).
    """

    name: ClassVar[str] = ""
    version: ClassVar[int] = 1
    description: ClassVar[str] = ""
    media_defaults: ClassVar[dict[str, Any]] = {}

    def items(self, src: Path, media: MediaConfig) -> Iterator[SourceClip | Skip]:
        """The clips of the dataset under ``src`` (and the entries that cannot be clips).

        ``media`` says how the clips will be cut (answers in segments depend on it).

        Raises:
            ConvertError: a required annotation file is missing or unreadable (names it).
        """
        raise NotImplementedError

    def load(self, item: SourceClip, media: MediaConfig) -> LoadedClip:
        """Decode one clip: frames from ``item.frames`` (images) or ``item.video``, audio from
        ``item.audio`` or the video's own track. Override to add masks.

        Raises:
            MediaError: a media file is missing, corrupt or unusable (the clip is skipped, named).
        """
        flags: dict[str, Any] = {}
        frames = None
        if item.frames is not None:
            if len(item.frames) != media.num_frames:
                raise MediaError(item.frames[0] if item.frames else item.key,
                                 f"{len(item.frames)} frame images, the clip needs {media.num_frames}")
            frames = np.stack([read_image(path, media) for path in item.frames])
        if item.video is not None and (frames is None or item.audio is None):
            decoded = decode_clip(item.video, media, start=item.start, end=item.end)
            flags = dataclasses.asdict(decoded.flags)
            if frames is None:
                if decoded.frames is None:
                    raise MediaError(item.video, "no video stream")
                frames = decoded.frames.numpy()
            audio = decoded.audio.numpy()
        if item.audio is not None:
            audio_media = dataclasses.replace(media, missing_audio="skip")
            decoded_audio = decode_clip(item.audio, audio_media, start=item.start, end=item.end)
            audio = decoded_audio.audio.numpy()
            flags = {**flags, "audio_file": dataclasses.asdict(decoded_audio.flags)}
        if frames is None:
            raise MediaError(item.key, "the clip names no video and no frame images")
        if item.video is None and item.audio is None:
            raise MediaError(item.key, "the clip names no video and no audio file")
        return LoadedClip(frames=frames, audio=audio, media=flags)


# ---------------------------------------------------------------------------------------------
# the writer
# ---------------------------------------------------------------------------------------------


def _sizes(media: MediaConfig) -> dict[str, Any]:
    return {
        "num_segments": media.num_segments,
        "frames_per_segment": media.frames_per_segment,
        "segment_seconds": media.segment_seconds,
        "frame_size": [media.image_size, media.image_size],
        "sample_rate": media.sample_rate,
    }


def _encode(job: tuple[Converter, SourceClip, MediaConfig, str]) -> tuple[str, dict[str, bytes] | Skip]:
    """Load and encode one clip (runs in a worker process); a bad clip comes back as a Skip."""
    converter, item, media, frames_format = job
    try:
        loaded = converter.load(item, media)
        answers = loaded.answers if loaded.answers is not None else item.answers
        scene = make_annotation(
            clip_id=item.key, source=converter.name, source_id=item.source_id, split=item.split,
            sizes=_sizes(media), answers=answers, objects=loaded.objects, mask_frames=loaded.mask_frames,
            media=loaded.media,
        )
        masks = loaded.masks if loaded.mask_frames else None
        return item.key, encode_members(scene, loaded.frames, loaded.audio, masks, frames_format)
    except MediaError as error:
        return item.key, Skip(item.key, str(error.path), error.reason, item.split)
    except ValueError as error:  # a malformed annotation of this one clip
        return item.key, Skip(item.key, item.source_id, str(error), item.split)


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=1, sort_keys=True))
    os.replace(tmp, path)


def _plan(items: list[SourceClip], clips_per_shard: int) -> dict[str, list[list[SourceClip]]]:
    """Split -> shards -> clips, in key order (the same source gives the same shards)."""
    by_split: dict[str, list[SourceClip]] = {}
    for item in sorted(items, key=lambda i: (i.split, i.key)):
        by_split.setdefault(item.split, []).append(item)
    return {
        split: [clips[i : i + clips_per_shard] for i in range(0, len(clips), clips_per_shard)]
        for split, clips in by_split.items()
    }


def _fingerprint(converter: Converter, media: MediaConfig, frames_format: str, plan: dict) -> str:
    """What an unfinished run must share with this one to be resumed."""
    description = {
        "converter": [converter.name, converter.version],
        "media": dataclasses.asdict(media),
        "frames_format": frames_format,
        "plan": {split: [[i.key for i in shard] for shard in shards] for split, shards in plan.items()},
    }
    return hashlib.sha256(json.dumps(description, sort_keys=True, default=str).encode()).hexdigest()


def _check_unique(items: Iterable[SourceClip]) -> None:
    seen: dict[str, str] = {}
    for item in items:
        if item.key in seen:
            raise ConvertError(f"two source clips have the key {item.key!r} ({seen[item.key]} and {item.source_id}); "
                               f"the converter must make keys unique")
        seen[item.key] = item.source_id


def convert(
    converter: Converter,
    src: str | os.PathLike,
    out: str | os.PathLike,
    media: MediaConfig,
    clips_per_shard: int = 64,
    workers: int = 0,
    frames_format: str = "jpg",
    progress: bool = True,
    limit: int | None = None,
) -> dict:
    """Convert the dataset under ``src`` into shards under ``out``; returns the manifest.

    An interrupted run (``.convert-state.json`` in ``out``) restarts where it stopped: shards
    already written are kept, the rest are written. A finished conversion is not redone.

    Args:
        converter: the format's :class:`Converter`.
        src: the dataset's root folder, in the dataset's own layout.
        out: the output folder.
        media: how media is decoded (segments, frame size, sample rate, ...).
        clips_per_shard: clips per tar.
        workers: decoding processes (0: in this process).
        frames_format: ``"jpg"`` (smaller) or ``"png"`` (lossless).
        progress: show a progress bar.
        limit: convert only the first ``limit`` clips of each split (a quick trial).
    Raises:
        ConvertError: the source cannot be read, or ``out`` holds a different conversion.
    """
    from tqdm import tqdm

    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise ConvertError(f"--src '{src}' is not a folder (the {converter.name} dataset's root is expected)")
    if clips_per_shard < 1:
        raise UserError(f"clips_per_shard must be >= 1, got {clips_per_shard}")
    if frames_format not in FRAMES_FORMATS:
        raise UserError(f"--frames_format must be one of {', '.join(FRAMES_FORMATS)}, got {frames_format!r}")
    if workers < 0:
        raise UserError(f"--workers must be >= 0 (0: decode in this process), got {workers}")
    if limit is not None and limit < 1:
        raise UserError(f"--limit must be >= 1 clips per split (or left out: every clip), got {limit}")
    if out.exists() and not out.is_dir():
        raise ConvertError(f"--out '{out}' is a file; the output must be a folder")
    entries = list(converter.items(src, media))
    items = [e for e in entries if isinstance(e, SourceClip)]
    listing_skips = [e for e in entries if isinstance(e, Skip)]
    _check_unique(items)
    if limit is not None:
        per_split: dict[str, list[SourceClip]] = {}
        for item in sorted(items, key=lambda i: (i.split, i.key)):
            per_split.setdefault(item.split, []).append(item)
        items = [item for clips in per_split.values() for item in clips[:limit]]
    plan = _plan(items, clips_per_shard)
    fingerprint = _fingerprint(converter, media, frames_format, plan)
    out.mkdir(parents=True, exist_ok=True)
    manifest_path, state_path = out / MANIFEST, out / STATE
    old = _read_json(manifest_path)
    if old is not None and not state_path.exists():
        if old.get("fingerprint") == fingerprint:
            return old
        raise ConvertError(f"--out '{out}' already holds a conversion ({old.get('source_format')}, other settings or "
                           f"source); choose a new --out folder")
    state = _read_json(state_path) or {}
    if state.get("fingerprint") != fingerprint:
        if state:
            raise ConvertError(f"--out '{out}' holds an unfinished conversion with other settings or another source; "
                               f"finish it with the same arguments, or choose a new --out folder")
        state = {"fingerprint": fingerprint, "done": {}}
        _write_json(state_path, state)
    done: dict[str, dict] = state["done"]
    todo = [(split, index, shard) for split, shards in plan.items() for index, shard in enumerate(shards)
            if not (f"{split}/{split}-{index:06d}.tar" in done and (out / split / f"{split}-{index:06d}.tar").is_file())]
    total = sum(len(shard) for _, _, shard in todo)
    bar = tqdm(total=total, desc=f"convert {converter.name}", unit="clip", disable=not progress)
    pool = multiprocessing.get_context("spawn").Pool(workers) if workers > 0 else None
    try:
        for split, index, shard in todo:
            jobs = [(converter, item, media, frames_format) for item in shard]
            results = pool.imap(_encode, jobs) if pool is not None else map(_encode, jobs)
            samples, skipped, words, tasks = [], [], set(), Counter()
            for (key, result), item in zip(results, shard):
                bar.update(1)
                if isinstance(result, Skip):
                    skipped.append(dataclasses.asdict(_relative(result, src)))
                    continue
                samples.append((key, result))
                answers = json.loads(result["scene.json"])["answers"]
                tasks.update(answers.keys())
                words |= annotation_words(answers)
            rel = f"{split}/{split}-{index:06d}.tar"
            (out / split).mkdir(exist_ok=True)
            if samples:
                write_tar(out / rel, samples)
            done[rel] = {"clips": len(samples), "skipped": skipped, "words": sorted(words), "tasks": dict(tasks),
                         "written": bool(samples)}
            _write_json(state_path, state)
    finally:
        bar.close()
        if pool is not None:
            pool.terminate()
    manifest = _manifest(converter, src, media, frames_format, plan, done, listing_skips, fingerprint)
    _write_json(manifest_path, manifest)
    state_path.unlink()
    return manifest


def _relative(skip: Skip, src: Path) -> Skip:
    """The skip with its file (and any mention of it in the reason, e.g. ffmpeg's message) named
    relative to the source folder: the manifest holds no absolute paths."""
    reason = skip.reason.replace(f"{src}{os.sep}", "")
    try:
        return dataclasses.replace(skip, file=str(Path(skip.file).relative_to(src)), reason=reason)
    except ValueError:
        return dataclasses.replace(skip, reason=reason)


def _read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def _manifest(converter: Converter, src: Path, media: MediaConfig, frames_format: str, plan: dict,
              done: dict[str, dict], listing_skips: list[Skip], fingerprint: str) -> dict:
    splits: dict[str, dict] = {}
    skipped = [dataclasses.asdict(_relative(s, src)) for s in listing_skips]
    words: set[str] = set()
    tasks: Counter[str] = Counter()
    for split, shards in plan.items():
        rels = [f"{split}/{split}-{i:06d}.tar" for i in range(len(shards))]
        records = [done[rel] for rel in rels]
        splits[split] = {
            "clips": sum(r["clips"] for r in records),
            "skipped": sum(len(r["skipped"]) for r in records),
            "shards": [rel for rel, r in zip(rels, records) if r["written"]],
        }
        for record in records:
            skipped.extend(record["skipped"])
            words |= set(record["words"])
            tasks.update(record["tasks"])
    for skip in listing_skips:
        if skip.split in splits:
            splits[skip.split]["skipped"] += 1
    return {
        "format": CONVERTED_FORMAT,
        "format_version": CONVERTED_FORMAT_VERSION,
        "source_format": converter.name,
        "converter_version": converter.version,
        "source": src.name,
        "media": dataclasses.asdict(media),
        "frames_format": frames_format,
        "splits": splits,
        "clips": sum(s["clips"] for s in splits.values()),
        "tasks": dict(sorted(tasks.items())),
        "skipped": skipped,
        "words": sorted(words),
        "fingerprint": fingerprint,
    }


def seconds_to_segments(start: float, end: float, media: MediaConfig) -> list[int] | None:
    """``[s, e)`` segment range covering the time span ``[start, end]`` seconds of a clip cut by
    ``media`` (``s = floor(start / seg)``, ``e = ceil(end / seg)``, clipped to ``[0, T]``); None when
    the span is empty or outside the clip."""
    seg, total = media.segment_seconds, media.num_segments
    first = max(0, int(np.floor(float(start) / seg + 1e-9)))
    last = min(total, int(np.ceil(float(end) / seg - 1e-9)))
    return [first, last] if last > first else None
