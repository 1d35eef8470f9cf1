"""``ref-avs``: the Ref-AVS dataset (Wang et al., ECCV 2024) for the ``ref_avs`` task.

Layout under ``--src`` (GeWu-Lab/Ref-AVS, ``datasets/dataset_refavs.py``)::

    metadata.csv                              vid,uid,split,fid,exp (header, one row per expression)
    media/{vid}/audio.wav                     the 10 s clip's audio
    media/{vid}/frames/{0..9}.jpg             one frame per second
    gt_mask/{vid}/fid_{fid}/0000{i}.png       the referred object's mask on frame i (foreground > 0)

A row is one referring expression (``uid``, e.g. ``-1HyqEM_VwM_137000_147000_piano_2``: the video,
the referred object's class and a number) and becomes one converted clip, since every expression
has its own target mask. ``fid`` names the mask folder of the referred object. Splits are kept as
the dataset names them: ``train``, ``val``, ``test_s`` (seen classes), ``test_u`` (unseen
classes) and ``test_n`` (null expressions), so each test split is evaluated on its own
(``data.splits: {"test": "test_u"}``).

**Null expressions** name nothing that sounds: the target mask is empty. They are the rows of
split ``test_n`` and the rows whose uid's class is ``null`` (the dataset also trains on such rows,
e.g. ``null_m-ciaPfihYEEk_3000_13000_null_1``). Their masks are all background (mask files are
not read: the annotation says the mask is empty).

**Media folder.** The official loader derives the folder from the uid
(``uid.rsplit("_", 2)[0]``) rather than the ``vid`` column; the converter uses ``media/{vid}``
and falls back to the uid's prefix when that folder does not exist (the same for ``gt_mask``).

**Frames.** Output frame ``k`` (segment ``t = k // F``, ``f = k % F``) shows the dataset frame
of second ``floor((t + (f + 0.5) / F) · segment_seconds)`` (at most 9); the masks use the same
frame, so every output frame's mask is annotated (``mask_frames`` = all frames). With the
default 10 segments of 1 s, output frame ``t`` is ``frames/{t}.jpg``.

The answer (``answers["ref_avs"]``): ``{"expression": str as written, "null": bool,
"object": class name from the uid, or None for a null expression}``; the referred object is mask
object 0 (``objects = [class]``, mask value 1). A row that does not parse (empty uid or
expression, a non-integer fid, a repeated uid) is skipped and named with its line; a missing or
unreadable frame, mask or audio file skips the expression, naming the file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from avmt.data.converters import register_converter
from avmt.data.converters.base import ConvertError, Converter, LoadedClip, Skip, SourceClip, read_table, safe_key
from avmt.data.media import MediaConfig, read_image

METADATA = "metadata.csv"
COLUMNS = ("vid", "uid", "split", "fid", "exp")
#: Frames per clip and their spacing in the dataset (``frames/{0..9}.jpg``, one per second).
DATASET_FRAMES = 10
DATASET_FRAME_SECONDS = 1.0
NULL_SPLIT = "test_n"
NULL_CLASS = "null"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def uid_parts(uid: str) -> tuple[str, str | None]:
    """``(video folder, class)`` encoded in a uid: ``"-1HyqEM_VwM_137000_147000_piano_2"`` ->
    ``("-1HyqEM_VwM_137000_147000", "piano")``; ``(uid, None)`` when it has no ``_{class}_{n}`` tail."""
    parts = uid.rsplit("_", 2)
    if len(parts) == 3 and parts[0] and parts[1] and parts[2].isdigit():
        return parts[0], parts[1]
    return uid, None


def dataset_frame(frame: int, media: MediaConfig) -> int:
    """The dataset frame (0..9) shown by output frame ``frame`` of a clip cut by ``media``."""
    segment, within = divmod(frame, media.frames_per_segment)
    seconds = (segment + (within + 0.5) / media.frames_per_segment) * media.segment_seconds
    return min(DATASET_FRAMES - 1, int(math.floor(seconds / DATASET_FRAME_SECONDS + 1e-9)))


@register_converter
class RefAVSConverter(Converter):
    """Ref-AVS metadata + frames, audio and masks -> one clip per expression with a ``ref_avs``
    answer ``{"expression", "null", "object"}`` and the referred object's mask."""

    name = "ref-avs"
    version = 1
    description = ("metadata.csv (vid,uid,split,fid,exp) + media/{vid}/audio.wav, "
                   "media/{vid}/frames/{0..9}.jpg + gt_mask/{vid}/fid_{fid}/0000{i}.png")
    media_defaults = {"num_segments": 10, "segment_seconds": 1.0}

    def items(self, src: Path, media: MediaConfig) -> Iterator[SourceClip | Skip]:
        path = src / METADATA
        if not path.is_file():
            raise ConvertError(f"'{src}' holds no {METADATA}: not the Ref-AVS layout ({self.description})")
        header, rows = read_table(path, COLUMNS, "Ref-AVS metadata file")
        seen: dict[str, str] = {}
        folders: dict[str, str] = {}
        for row in rows:
            number = row.line
            where = f"{METADATA}:{number}"
            if not row.complete:
                yield Skip(where, str(path), f"line {number} has {row.size} fields, the header {len(header)}")
                continue
            vid, uid, split, fid, expression = (row.fields[name] for name in COLUMNS)
            if not uid or not expression or not _SPLIT_RE.match(split):
                yield Skip(uid or where, str(path), f"line {number}: an empty uid or expression, or a split "
                           f"name {split!r} that is not a plain word", split if _SPLIT_RE.match(split) else
                           "")
                continue
            if any(sep in name for name in (vid, uid) for sep in ("/", "\\")) or vid in (".", ".."):
                yield Skip(uid, str(path), f"line {number}: vid {vid!r} or uid {uid!r} is not a folder name",
                           split)
                continue
            if not fid.isdigit():
                yield Skip(uid, str(path), f"line {number}: fid {fid!r} is not a mask folder number", split)
                continue
            if uid in seen:
                yield Skip(uid, str(path), f"line {number}: uid {uid} is already listed on {seen[uid]}",
                           split)
                continue
            seen[uid] = where
            uid_folder, object_class = uid_parts(uid)
            null = split == NULL_SPLIT or object_class == NULL_CLASS
            folder = folders.get(f"{vid}\0{uid_folder}")
            if folder is None:
                folder = self._media_folder(src, vid, uid_folder)
                folders[f"{vid}\0{uid_folder}"] = folder
            frame_folder = src / "media" / folder / "frames"
            frames = [frame_folder / f"{dataset_frame(k, media)}.jpg" for k in range(media.num_frames)]
            yield SourceClip(
                key=safe_key(uid),
                split=split,
                source_id=uid,
                answers={"ref_avs": {"expression": expression, "null": null,
                                     "object": None if null else (object_class or "object")}},
                audio=src / "media" / folder / "audio.wav",
                frames=frames,
                extra={"mask_folder": None if null else str(self._mask_folder(src, vid, uid_folder,
                                                                               int(fid)))},
            )

    @staticmethod
    def _media_folder(src: Path, vid: str, uid_folder: str) -> str:
        """``vid`` when ``media/{vid}`` exists, else the uid's prefix when that exists, else ``vid``."""
        for name in (vid, uid_folder):
            if name and (src / "media" / name).is_dir():
                return name
        return vid or uid_folder

    @staticmethod
    def _mask_folder(src: Path, vid: str, uid_folder: str, fid: int) -> Path:
        for name in (vid, uid_folder):
            if name and (src / "gt_mask" / name / f"fid_{fid}").is_dir():
                return src / "gt_mask" / name / f"fid_{fid}"
        return src / "gt_mask" / (vid or uid_folder) / f"fid_{fid}"

    def load(self, item: SourceClip, media: MediaConfig) -> LoadedClip:
        """Frames and audio as usual, plus ``masks uint8 [T·F, S, S]``: 1 where the referred
        object is (mask pixel > 0 in any channel), 0 elsewhere; all 0 for a null expression."""
        loaded = super().load(item, media)
        masks = np.zeros((media.num_frames, media.image_size, media.image_size), dtype=np.uint8)
        mask_folder = item.extra.get("mask_folder")
        objects: list[str] = []
        if mask_folder is not None:
            objects = [item.answers["ref_avs"]["object"]]
            decoded: dict[int, np.ndarray] = {}
            for k in range(media.num_frames):
                index = dataset_frame(k, media)
                if index not in decoded:
                    mask = read_image(Path(mask_folder) / f"0000{index}.png", media, mode="mask")
                    decoded[index] = (mask > 0) if mask.ndim == 2 else (mask > 0).any(axis=-1)
                masks[k] = decoded[index]
        return dataclasses.replace(loaded, masks=masks, objects=objects,
                                   mask_frames=list(range(media.num_frames)))
