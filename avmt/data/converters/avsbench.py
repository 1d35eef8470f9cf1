"""``avsbench``: AVSBench (Zhou et al., ECCV 2022; AVSBench-semantic, 2023) for the ``s4``, ``ms3``
and ``avss`` tasks.

The three subsets are found by their annotation files, in ``--src`` itself or in one of its
sub-folders (``--src`` may be the ``avsbench_data`` root, or one subset's folder); every subset
found is converted, each clip for its own task::

    Single-source/                 S4: the folder holding s4_meta_data.csv
      s4_meta_data.csv             name, start time, category, split (header row; name first)
      s4_data/visual_frames/{split}/{category}/{name}/{name}_{i}.png     i = 1..5
      s4_data/gt_masks/{split}/{category}/{name}/{name}_{i}.png          train: i = 1; val, test: 1..5
      s4_data/audio_wav/{split}/{category}/{name}.wav
    Multi-sources/                 MS3: the folder holding ms3_meta_data.csv
      ms3_meta_data.csv            name, split (header row; name first)
      ms3_data/visual_frames/{name}/{name}.mp4_{i}.png                   i = 1..5
      ms3_data/gt_masks/{split}/{name}/{name}_{i}.png                    i = 1..5
      ms3_data/audio_wav/{split}/{name}.wav
    AVSBench_semantic/             AVSS: the folder holding metadata.csv and label2idx.json
      metadata.csv                 vid, uid, s_min, s_sec, a_obj, split, label (v1s | v1m | v2)
      label2idx.json               {"background": 1, "accordion": 2, ..., "woman": 71}
      {label}/{uid}/audio.wav
      {label}/{uid}/frames/{i}.jpg                                       i = 0..4 (v1s, v1m), 0..9 (v2)
      {label}/{uid}/labels_rgb/{i}.png   colour masks of the annotated frames (v1s train: i = 0 only)

These are the paths of the official loaders (OpenNLPLab/AVSBench ``avs_scripts/avs_s4``,
``avs_ms3`` and ``avss``). Frame ``i`` of a clip shows second ``i`` (1 frame per second); the
output frame sampled at time ``t`` (:class:`~avmt.data.media.MediaConfig`, the same sampling
times as a decoded video) is the source frame of second ``floor(t)``, its mask that frame's mask.
Output frames past the clip's last frame repeat it, without a mask (``media.padded_frames``).
The default layout is the dataset's own: 5 segments of 1 s (a v2 clip of AVSS then keeps its
first 5 s; ``--num_segments 10`` keeps all of it and pads the 5 s clips).

Masks (``LoadedClip.masks``, value ``id + 1``):

- S4 / MS3: the binary ground truth (foreground: any pixel that is not black) is one object,
  class the S4 category (MS3: ``"sounding object"``). Answers: ``s4`` ``{"class": category,
  "objects": [0]}``, ``ms3`` ``{"objects": [0]}``.
- AVSS: each colour mask is decoded through the 71-colour palette of the official code (the
  PASCAL-VOC bit-interleaved colour map; palette index ``p`` = the label of ``label2idx`` value
  ``p + 1``, index 0 = background, black; colours outside the palette are background, as there).
  One object per class present in the clip's annotated frames, ordered by first appearance
  (frame, then label index). Answer: ``avss`` ``{"classes": [name, ...]}`` in that order.

``mask_frames`` lists the output frames whose source frame has a mask. Keys are ``s4-{name}``,
``ms3-{name}``, ``avss-{uid}`` (one video can be in several subsets). A row that does not parse,
a repeated name and an unknown AVSS label are skipped and named with the file and line; a clip
with a missing or corrupt frame, mask or wav is skipped naming that file.
"""

from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path
from typing import Iterator

import numpy as np

from avmt.data.converters import register_converter
from avmt.data.converters.base import (
    ConvertError,
    Converter,
    LoadedClip,
    Skip,
    SourceClip,
    read_json,
    read_table,
    safe_key,
)
from avmt.data.media import MediaConfig, decode_clip, read_image, sampling_times
from avmt.errors import UserError

S4_CSV, MS3_CSV, AVSS_CSV, AVSS_LABELS = "s4_meta_data.csv", "ms3_meta_data.csv", "metadata.csv", "label2idx.json"
S4_DATA, MS3_DATA = "s4_data", "ms3_data"
#: Frames per clip of each AVSS ``label`` (v1s / v1m: the 5 s AVSBench-object clips; v2: 10 s).
AVSS_FRAMES = {"v1s": 5, "v1m": 5, "v2": 10}
#: Seconds of video each source frame stands for (AVSBench extracts one frame per second).
SOURCE_FRAME_SECONDS = 1.0
FRAMES_PER_CLIP = 5
MS3_CLASS = "sounding object"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_-]+$")


def avss_palette(num_colors: int) -> np.ndarray:
    """``uint8 [num_colors, 3]``: the colour of each AVSBench-semantic label index.

    The PASCAL-VOC colour map: the bits of index ``j`` are dealt in turn to R, G and B, from the
    most significant bit of each channel down (index 0 is black, 1 is (128, 0, 0), 2 is (0, 128, 0)).
    """
    palette = np.zeros((num_colors, 3), dtype=np.uint8)
    for index in range(num_colors):
        label, bit, rgb = index, 7, [0, 0, 0]
        while label > 0:
            for channel in range(3):
                rgb[channel] |= ((label >> channel) & 1) << bit
            label >>= 3
            bit -= 1
        palette[index] = rgb
    return palette


def palette_indices(mask: np.ndarray, palette: np.ndarray) -> np.ndarray:
    """``int64 [S, S]`` palette index of every pixel of a colour mask.

    Args:
        mask: ``uint8 [S, S, 3]`` RGB (or ``[S, S]`` gray, read as gray RGB).
        palette: ``uint8 [K, 3]`` (:func:`avss_palette`).
    Returns:
        the index of each pixel's colour in ``palette``; 0 (background) for a colour not in it.
    """
    rgb = np.repeat(mask[..., None], 3, axis=-1) if mask.ndim == 2 else mask
    codes = (rgb[..., 0].astype(np.int64) << 16) | (rgb[..., 1].astype(np.int64) << 8) | rgb[..., 2]
    palette_codes = (palette[:, 0].astype(np.int64) << 16) | (palette[:, 1].astype(np.int64) << 8) | palette[:, 2]
    index_of = {int(code): index for index, code in reversed(list(enumerate(palette_codes)))}
    unique, inverse = np.unique(codes, return_inverse=True)
    return np.array([index_of.get(int(code), 0) for code in unique], dtype=np.int64)[inverse].reshape(codes.shape)


def source_frame_of_outputs(num_source_frames: int, media: MediaConfig) -> tuple[list[int], list[bool]]:
    """Which source frame (1 per :data:`SOURCE_FRAME_SECONDS`) each of the ``T·F`` output frames shows.

    Returns:
        ``(index [T·F], past_end [T·F])``: the source frame index (clipped to the last frame) and
        whether the output frame's time lies past the clip's frames (a repeated frame, no mask).
    """
    times = sampling_times(media, 0.0, 1.0 / SOURCE_FRAME_SECONDS)  # same sampling times as a video
    wanted = [math.floor(t / SOURCE_FRAME_SECONDS + 1e-9) for t in times]
    past_end = [index >= num_source_frames for index in wanted]
    return [min(max(index, 0), num_source_frames - 1) for index in wanted], past_end


def _read_labels(path: Path) -> list[str]:
    """AVSBench-semantic label names by palette index (``label2idx.json`` sorted by value: index 0
    is the label of the smallest value, "background").

    Raises:
        ConvertError: the file is missing, unreadable or not ``{name: int}``.
    """
    if not path.is_file():
        raise ConvertError(f"'{path}' is missing: AVSBench-semantic needs it to decode its colour masks")
    label_to_index = read_json(path, "AVSBench-semantic label file")
    if (not isinstance(label_to_index, dict) or not label_to_index
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in label_to_index.values())
            or len(set(label_to_index.values())) != len(label_to_index)):
        raise ConvertError(f"'{path}' must map every label name to a distinct integer index")
    return [name for name, _ in sorted(label_to_index.items(), key=lambda item: item[1])]


@register_converter
class AVSBenchConverter(Converter):
    """AVSBench S4 / MS3 / AVSS metadata + frames, masks and wavs -> clips with masks and an
    ``s4``, ``ms3`` or ``avss`` answer (see the module docstring)."""

    name = "avsbench"
    version = 1
    description = ("AVSBench: Single-source/s4_meta_data.csv + s4_data/, Multi-sources/ms3_meta_data.csv + ms3_data/, "
                   "AVSS metadata.csv + label2idx.json + {v1s,v1m,v2}/{uid}/ (any of them, in --src or a sub-folder)")
    media_defaults = {"num_segments": 5, "segment_seconds": 1.0}

    def items(self, src: Path, media: MediaConfig) -> Iterator[SourceClip | Skip]:
        s4, ms3, avss = self._find(src, S4_CSV), self._find(src, MS3_CSV), self._find_avss(src)
        if s4 is None and ms3 is None and avss is None:
            raise ConvertError(f"'{src}' holds no AVSBench subset: none of {S4_CSV}, {MS3_CSV}, or {AVSS_CSV} with "
                               f"{AVSS_LABELS}, in it or in its sub-folders ({self.description})")
        if s4 is not None:
            yield from self._s4_items(s4)
        if ms3 is not None:
            yield from self._ms3_items(ms3)
        if avss is not None:
            yield from self._avss_items(avss)

    # ---- finding the subsets -----------------------------------------------------------------

    @staticmethod
    def _candidates(src: Path) -> list[Path]:
        return [src, *sorted(p for p in src.iterdir() if p.is_dir())]

    def _find(self, src: Path, marker: str) -> Path | None:
        """The one folder (``src`` or a sub-folder) holding ``marker``; None when none does."""
        found = [folder for folder in self._candidates(src) if (folder / marker).is_file()]
        if len(found) > 1:
            raise ConvertError(f"{marker} is in several folders ({', '.join(str(f) for f in found)}); "
                               f"point --src at one of them")
        return found[0] if found else None

    def _find_avss(self, src: Path) -> Path | None:
        """The AVSBench-semantic folder: metadata.csv next to label2idx.json or a v1s / v1m / v2 folder."""
        found = [folder for folder in self._candidates(src) if (folder / AVSS_CSV).is_file()
                 and ((folder / AVSS_LABELS).is_file() or any((folder / label).is_dir() for label in AVSS_FRAMES))]
        if len(found) > 1:
            raise ConvertError(f"AVSBench-semantic's {AVSS_CSV} is in several folders "
                               f"({', '.join(str(f) for f in found)}); point --src at one of them")
        return found[0] if found else None

    # ---- listing the clips -------------------------------------------------------------------

    @staticmethod
    def _data_folder(folder: Path, name: str, csv_name: str) -> Path:
        data = folder / name
        if not data.is_dir():
            raise ConvertError(f"'{data}' is missing: {csv_name} is there, its frames, masks and wavs are expected "
                               f"in {name}/")
        return data

    @staticmethod
    def _check_row(where: str, path: Path, name: str, split: str, seen: dict[str, str]) -> Skip | None:
        """A Skip when a row has no name, a split that is not a folder name, or a repeated name."""
        if not name:
            return Skip(where, str(path), f"{where}: the row names no clip", split)
        if not _SPLIT_RE.match(split):
            return Skip(name, str(path), f"{where}: split {split!r} is not a folder name (letters, digits, _ or -)",
                        split if split else "")
        if name in seen:
            return Skip(name, str(path), f"{where}: {name} is already listed at {seen[name]}", split)
        seen[name] = where
        return None

    def _s4_items(self, folder: Path) -> Iterator[SourceClip | Skip]:
        path = folder / S4_CSV
        header, rows = read_table(path, ("category", "split"), "AVSBench metadata file")
        data = self._data_folder(folder, S4_DATA, S4_CSV)
        seen: dict[str, str] = {}
        for row in rows:
            name, category, split = row.fields[header[0]], row.fields["category"], row.fields["split"]
            where = f"{S4_CSV}:{row.line}"
            skip = self._check_row(where, path, name, split, seen)
            if skip is None and not category:
                skip = Skip(name, str(path), f"{where}: no category", split)
            if skip is not None:
                yield skip
                continue
            frames = data / "visual_frames" / split / category / name
            masks = data / "gt_masks" / split / category / name
            annotated = 1 if split == "train" else FRAMES_PER_CLIP  # the official loader's mask_num
            yield SourceClip(
                key=safe_key("s4", name), split=split, source_id=name,
                answers={"s4": {"class": category, "objects": [0]}},
                audio=data / "audio_wav" / split / category / f"{name}.wav",
                frames=[frames / f"{name}_{i}.png" for i in range(1, FRAMES_PER_CLIP + 1)],
                extra={"masks": [masks / f"{name}_{i}.png" if i <= annotated else None
                                 for i in range(1, FRAMES_PER_CLIP + 1)],
                       "mask_kind": "binary", "mask_class": category},
            )

    def _ms3_items(self, folder: Path) -> Iterator[SourceClip | Skip]:
        path = folder / MS3_CSV
        header, rows = read_table(path, ("split",), "AVSBench metadata file")
        data = self._data_folder(folder, MS3_DATA, MS3_CSV)
        seen: dict[str, str] = {}
        for row in rows:
            name, split = row.fields[header[0]], row.fields["split"]
            skip = self._check_row(f"{MS3_CSV}:{row.line}", path, name, split, seen)
            if skip is not None:
                yield skip
                continue
            masks = data / "gt_masks" / split / name
            yield SourceClip(
                key=safe_key("ms3", name), split=split, source_id=name,
                answers={"ms3": {"objects": [0]}},
                audio=data / "audio_wav" / split / f"{name}.wav",
                frames=[data / "visual_frames" / name / f"{name}.mp4_{i}.png" for i in range(1, FRAMES_PER_CLIP + 1)],
                extra={"masks": [masks / f"{name}_{i}.png" for i in range(1, FRAMES_PER_CLIP + 1)],
                       "mask_kind": "binary", "mask_class": MS3_CLASS},
            )

    def _avss_items(self, folder: Path) -> Iterator[SourceClip | Skip]:
        path = folder / AVSS_CSV
        labels = _read_labels(folder / AVSS_LABELS)
        _, rows = read_table(path, ("uid", "split", "label"), "AVSBench metadata file")
        seen: dict[str, str] = {}
        for row in rows:
            uid, split, subset = row.fields["uid"], row.fields["split"], row.fields["label"]
            where = f"{AVSS_CSV}:{row.line}"
            skip = self._check_row(where, path, uid, split, seen)
            if skip is None and subset not in AVSS_FRAMES:
                skip = Skip(uid, str(path), f"{where}: label {subset!r} is not one of {', '.join(AVSS_FRAMES)}", split)
            if skip is not None:
                yield skip
                continue
            clip = folder / subset / uid
            count = AVSS_FRAMES[subset]
            yield SourceClip(
                key=safe_key("avss", uid), split=split, source_id=uid,
                answers={"avss": {"classes": []}},  # filled in by load(): the classes its masks show
                audio=clip / "audio.wav",
                frames=[clip / "frames" / f"{i}.jpg" for i in range(count)],
                extra={"masks": [clip / "labels_rgb" / f"{i}.png" for i in range(count)],
                       # the official loader takes the masks there are in training (v1s: the first)
                       "masks_optional": split == "train",
                       "mask_kind": "palette", "labels": labels},
            )

    # ---- loading one clip --------------------------------------------------------------------

    def load(self, item: SourceClip, media: MediaConfig) -> LoadedClip:
        """Frames, wav and masks of one clip (see the module docstring).

        Returns:
            LoadedClip: frames ``uint8 [T·F, 3, S, S]``, audio ``float32 [T·segment_seconds·rate]``,
            masks ``uint8 [T·F, S, S]`` (``id + 1``; 0 on frames without a mask), the objects'
            classes, ``mask_frames``; AVSS: the answer with the classes its masks show.
        Raises:
            MediaError: a frame, mask or wav is missing or unreadable (names the file).
            ValueError: no annotated mask falls within the clip, or an AVSS clip shows no class.
        """
        sources, past_end = source_frame_of_outputs(len(item.frames), media)
        frame_cache: dict[int, np.ndarray] = {}
        for index in sources:
            if index not in frame_cache:
                frame_cache[index] = read_image(item.frames[index], media)
        frames = np.stack([frame_cache[index] for index in sources])
        decoded = decode_clip(item.audio, dataclasses.replace(media, missing_audio="skip"))
        flags = {"audio_file": dataclasses.asdict(decoded.flags), "source_frames": len(item.frames),
                 "padded_frames": int(sum(past_end))}

        mask_paths: list[Path | None] = list(item.extra["masks"])
        if item.extra.get("masks_optional"):
            mask_paths = [p if p is not None and p.is_file() else None for p in mask_paths]
        mask_frames = [j for j, (index, past) in enumerate(zip(sources, past_end))
                       if not past and mask_paths[index] is not None]
        if not mask_frames:
            raise UserError(f"no annotated mask within the clip's first {media.clip_seconds:g} s "
                             f"(masks of source frames {[i for i, p in enumerate(mask_paths) if p is not None]})")
        raw: dict[int, np.ndarray] = {}
        for index in sorted({sources[j] for j in mask_frames}):
            raw[index] = read_image(mask_paths[index], media, mode="mask")
        size = media.image_size
        masks = np.zeros((len(sources), size, size), dtype=np.uint8)
        answers = None
        if item.extra["mask_kind"] == "binary":
            objects = [item.extra["mask_class"]]
            for j in mask_frames:
                mask = raw[sources[j]]
                masks[j] = (mask > 0) if mask.ndim == 2 else mask.any(axis=-1)
        else:
            labels: list[str] = item.extra["labels"]
            palette = avss_palette(len(labels))
            label_maps = {index: palette_indices(mask, palette) for index, mask in raw.items()}
            order: list[int] = []  # palette indices of the classes, by first appearance (frame, then index)
            for j in mask_frames:
                order += [int(p) for p in np.unique(label_maps[sources[j]]) if p > 0 and int(p) not in order]
            if not order:
                raise UserError("its annotated masks show no sounding object (every pixel is background)")
            object_of = np.zeros(len(labels), dtype=np.uint8)
            object_of[order] = np.arange(1, len(order) + 1)
            for j in mask_frames:
                masks[j] = object_of[label_maps[sources[j]]]
            objects = [labels[p] for p in order]
            answers = {"avss": {"classes": list(objects)}}
        return LoadedClip(frames=frames, audio=decoded.audio.numpy(), masks=masks, objects=objects,
                          mask_frames=mask_frames, media=flags, answers=answers)
