"""AVSynth shards: WebDataset tar files with the media of each clip stored once.

Layout of ``{out_dir}``::

    manifest.json                       schema version, seed, SynthConfig, clip counts, shard lists
    train/train-000000.tar, ...         one tar per ``clips_per_shard`` clips
    val/val-000000.tar, ...

Members of a sample (WebDataset key = clip id, e.g. ``train-00000042``), sorted by name:

- ``{key}.audio.flac``: mono PCM-16 FLAC (float = int16 / 32768),
- ``{key}.frames.png``: all T*F frames tiled horizontally in one RGB PNG (``H x (T*F*W)``),
- ``{key}.masks.png``: the object-id maps of the same T*F frames (0 background, ``id + 1`` where
  object ``id`` is drawn), tiled the same way in one 8-bit grayscale ("L") PNG (``H x (T*F*W)``),
- ``{key}.scene.json``: the scene graph (schema version 2, see ``avmt.data.synth``).

Reading yields :class:`avmt.data.sample.Clip` s (``key``, ``frames``, ``audio``, ``scene``,
``masks``).  The tars are byte-identical for the same seed and config (fixed mtime/uid/gid/uname,
sorted members, ustar format), readable with plain ``tar`` and stock ``webdataset``.  Reading never
unpickles anything: only the four members above are decoded (PIL, soundfile, json); any other
member is ignored with a warning, and a corrupt sample is skipped, counted in a
:class:`CorruptSampleCounter` and reported with a :class:`CorruptSampleWarning` naming its key.

The shards of a split may also be read where they lie, from a webdataset URL pattern holding
``{split}`` (``pipe:``, ``file:``, ``http(s):`` ... opened with webdataset's ``gopen``; see
:func:`split_source`).  Readers (DDP ranks x DataLoader workers) split a split's shards between them
when there are at least as many shards as readers, else share the stream by sample position
(:func:`iter_clips`, :func:`reader_clip_count`).  A member whose name is an absolute path or has a
``..`` component is never used: its sample is skipped as corrupt (reason ``"unsafe member path"``).

Shards of an older version (AVSynth v1: no masks) are refused with a message that says how to
regenerate them (:func:`check_shard_version`; an old sample met while reading is a corrupt sample
of reason ``"old schema"``); :func:`ensure_shards` regenerates them by itself.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import itertools
import json
import multiprocessing
import os
import random
import tarfile
import threading
import warnings
import zlib
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from avmt.data.annotation import is_annotation, validate_annotation
from avmt.data.synth import (
    GENERATOR_VERSION,
    SCHEMA_VERSION,
    SYNTH_COMMAND,
    SynthConfig,
    generate_scene,
    old_schema_message,
    render_clip,
    render_masks,
    scene_seed,
    validate_scene,
)
from avmt.errors import UserError

if TYPE_CHECKING:  # imported lazily at run time (it imports torch)
    from avmt.data.sample import Clip

__all__ = [
    "SHARD_FORMAT_VERSION",
    "MEMBERS",
    "SYNTH_COMMAND",
    "CorruptSampleCounter",
    "CorruptSampleWarning",
    "CorruptSampleError",
    "encode_clip",
    "decode_sample",
    "write_tar",
    "write_shards",
    "synthesize",
    "ensure_shards",
    "read_manifest",
    "check_shard_version",
    "list_shards",
    "split_clip_count",
    "manifest_segments",
    "shard_clip_counts",
    "stream_part",
    "SplitSource",
    "split_source",
    "is_url_pattern",
    "shard_order",
    "by_shard",
    "reader_clip_count",
    "unsafe_member",
    "iter_clips",
    "clip_from_scene",
    "clip_from_index",
]

#: Version of the shard layout (members, encodings, manifest).  v2 added ``masks.png``.
SHARD_FORMAT_VERSION = 2
#: Sample members, in the (sorted) order they are written.
MEMBERS: tuple[str, ...] = ("audio.flac", "frames.png", "masks.png", "scene.json")
#: Members a reader decodes: ``MEMBERS`` plus ``frames.jpg`` (converted datasets may store JPEG frames).
READ_MEMBERS: tuple[str, ...] = ("audio.flac", "frames.jpg", "frames.png", "masks.png", "scene.json")
# SYNTH_COMMAND (how a user makes the shards, the CLI's ``data synth`` subcommand) is defined in
# avmt.data.synth, so that the scene validator can say it too, and re-exported here.
MANIFEST = "manifest.json"
_TAR_MTIME = 946684800  # 2000-01-01T00:00:00Z: fixed, so the tars are reproducible
_PCM_SCALE = 32768.0


# --------------------------------------------------------------------------------------------
# Corrupt-sample accounting
# --------------------------------------------------------------------------------------------


class CorruptSampleWarning(UserWarning):
    """A shard sample was skipped (corrupt / incomplete) or a member was ignored."""


class CorruptSampleCounter:
    """Thread-safe tally of skipped samples.

    Attributes:
        count: number of skipped samples (plus unreadable tar streams).
        reasons: reason category (e.g. ``"bad frames.png"``) -> count.
        keys: keys of the skipped samples (the first ``max_keys``).
        ignored: member suffix (e.g. ``"pickle"``) -> how many such members were ignored undecoded.
        read: samples of the reader's share met in the shards, decoded or skipped (so a pass that
            read some and decoded none can say so).
    """

    def __init__(self, max_keys: int = 1000) -> None:
        self._lock = threading.Lock()
        self.max_keys = max_keys
        self.count = 0
        self.reasons: dict[str, int] = {}
        self.keys: list[str] = []
        self.ignored: dict[str, int] = {}
        self.read = 0

    def add(self, key: str, reason: str, count: int = 1) -> None:
        """Record ``count`` skipped samples under ``reason``; ``key`` names them (a sample key, or
        a shard for the clips missing from it)."""
        with self._lock:
            self.count += count
            self.reasons[reason] = self.reasons.get(reason, 0) + count
            if len(self.keys) < self.max_keys:
                self.keys.append(key)

    def add_read(self) -> None:
        """Record one sample of the reader's share met in the shards (decoded or not)."""
        with self._lock:
            self.read += 1

    def ignore(self, suffix: str) -> None:
        """Record one member with an unsupported ``suffix`` that was not decoded."""
        with self._lock:
            self.ignored[suffix] = self.ignored.get(suffix, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        """Snapshot ``{"count", "reasons", "ignored"}`` (JSON-able, e.g. for logging)."""
        with self._lock:
            return {"count": self.count, "reasons": dict(self.reasons), "ignored": dict(self.ignored)}

    def __repr__(self) -> str:
        return f"CorruptSampleCounter(count={self.count}, reasons={self.reasons}, ignored={self.ignored})"


class CorruptSampleError(UserError):
    """A shard sample cannot be decoded; ``reason`` is its category (e.g. ``"bad frames.png"``)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


# --------------------------------------------------------------------------------------------
# Encoding / decoding one clip
# --------------------------------------------------------------------------------------------


def _quantize(audio: np.ndarray) -> np.ndarray:
    """float ``[S]`` -> int16 ``[S]`` (x 32768, rounded, clipped)."""
    return np.clip(np.round(np.asarray(audio, dtype=np.float64) * _PCM_SCALE), -32768, 32767).astype(np.int16)


def _png(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    # no mode argument: PIL infers RGB from [h, w, 3] uint8 and L from [h, w] uint8
    Image.fromarray(array).save(out, format="PNG", compress_level=6)
    return out.getvalue()


def encode_clip(scene: dict, frames: np.ndarray, audio: np.ndarray, masks: np.ndarray) -> dict[str, bytes]:
    """Encode one AVSynth clip into its shard members (``MEMBERS`` -> bytes).

    Args:
        scene: scene graph (JSON-able dict).
        frames: ``uint8 [N, 3, H, W]`` (N = T*F), stored as one PNG of ``H x (N*W)`` RGB pixels.
        audio: ``float [S]`` in [-1, 1), stored as mono PCM-16 FLAC at ``scene["sample_rate"]``.
        masks: ``uint8 [N, H, W]`` object-id maps (``synth.render_masks``), stored as one 8-bit
            grayscale PNG of ``H x (N*W)`` pixels.
    """
    return encode_members(scene, frames, audio, masks, frames_format="png")


def encode_members(
    scene: dict, frames: np.ndarray, audio: np.ndarray, masks: np.ndarray | None, frames_format: str = "png"
) -> dict[str, bytes]:
    """Encode a clip (AVSynth or converted) into shard members.

    Args:
        scene: the ``scene.json`` content (scene graph or :mod:`avmt.data.annotation`).
        frames: ``uint8 [N, 3, H, W]``, tiled horizontally into one ``frames.png`` or
            ``frames.jpg`` (``frames_format``: ``"png"`` lossless, ``"jpg"`` quality 92).
        audio: ``float [S]``, mono PCM-16 FLAC at ``scene["sample_rate"]``.
        masks: ``uint8 [N, H, W]`` object-id maps (one grayscale ``masks.png``), or ``None``.
    """
    import soundfile as sf

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be uint8 [N, 3, H, W], got {frames.dtype} {frames.shape}")
    if frames_format not in ("png", "jpg"):
        raise ValueError(f"frames_format must be 'png' or 'jpg', got {frames_format!r}")
    n, _, h, w = frames.shape
    tiled = np.ascontiguousarray(frames.transpose(2, 0, 3, 1).reshape(h, n * w, 3))
    flac = io.BytesIO()
    sf.write(flac, _quantize(audio), int(scene["sample_rate"]), format="FLAC", subtype="PCM_16")
    text = json.dumps(scene, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    members = {"audio.flac": flac.getvalue(), "scene.json": text.encode("utf-8")}
    members[f"frames.{frames_format}"] = _png(tiled) if frames_format == "png" else _jpeg(tiled)
    if masks is not None:
        masks = np.asarray(masks)
        if masks.dtype != np.uint8 or masks.shape != (n, h, w):
            raise ValueError(
                f"masks must be uint8 [N, H, W] = [{n}, {h}, {w}] like the frames, "
                f"got {masks.dtype} {masks.shape}"
            )
        members["masks.png"] = _png(np.ascontiguousarray(masks.transpose(1, 0, 2).reshape(h, n * w)))
    return dict(sorted(members.items()))


def _jpeg(array: np.ndarray) -> bytes:
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(array).save(out, format="JPEG", quality=92)
    return out.getvalue()


def _expected_sizes(scene: dict) -> tuple[int, int, int, int, int]:
    """(N frames, H, W, S samples, sample rate) a scene promises."""
    T, F = int(scene["num_segments"]), int(scene["frames_per_segment"])
    H, W = (int(v) for v in scene["frame_size"])
    sr = int(scene["sample_rate"])
    S = int(round(T * float(scene["segment_seconds"]) * sr))
    if min(T, F, H, W, sr, S) <= 0:
        raise ValueError("non-positive size")
    return T * F, H, W, S, sr


def _check_scene_version(scene: Any, key: str) -> None:
    """Raise the ``"old schema"`` error when ``scene`` (a parsed ``scene.json``) is an AVSynth scene
    of an older schema version; a converted clip's annotation has its own versions."""
    if not isinstance(scene, dict) or is_annotation(scene):
        return
    version = scene.get("version")
    if isinstance(version, int) and not isinstance(version, bool) and version < SCHEMA_VERSION:
        raise CorruptSampleError("old schema", old_schema_message(version, f"sample {key!r}"))


def _decode_scene(data: bytes, key: str) -> dict:
    """``scene.json`` bytes -> a valid AVSynth scene or converted annotation whose ``clip_id`` is
    ``key``; CorruptSampleError (``"bad scene.json"`` or ``"old schema"``) otherwise."""
    try:
        scene = json.loads(data.decode("utf-8"))
    except Exception as exn:  # noqa: BLE001 - any parse failure is a corrupt member
        raise CorruptSampleError("bad scene.json", f"not JSON ({exn})") from None
    if not isinstance(scene, dict):
        raise CorruptSampleError("bad scene.json", f"expected an object, got {type(scene).__name__}")
    annotated = is_annotation(scene)
    _check_scene_version(scene, key)
    try:
        (validate_annotation if annotated else validate_scene)(scene)
    except ValueError as exn:
        raise CorruptSampleError("bad scene.json", str(exn)) from None
    if scene["clip_id"] != key:
        raise CorruptSampleError("bad scene.json", f"clip_id {scene['clip_id']!r} does not match the key")
    if not annotated:
        try:
            _expected_sizes(scene)
        except Exception as exn:  # noqa: BLE001
            raise CorruptSampleError("bad scene.json", f"bad sizes ({exn})") from None
    return scene


def _decode_tiled_png(data: bytes, member: str, mode: str, n: int, h: int, w: int) -> np.ndarray:
    """A PNG (or, for ``*.jpg`` members, a JPEG) of ``n`` frames tiled horizontally ->
    ``uint8 [h, n * w(, 3)]``; CorruptSampleError naming ``member``."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["JPEG" if member.endswith(".jpg") else "PNG"]) as img:
            if img.size != (n * w, h) or img.mode != mode:
                raise CorruptSampleError(
                    "wrong shape",
                    f"{member} is {img.mode} {img.size[0]}x{img.size[1]}, expected {mode} {n * w}x{h}",
                )
            img.load()
            return np.asarray(img, dtype=np.uint8)
    except CorruptSampleError:
        raise
    except Exception as exn:  # noqa: BLE001 - PIL raises many types on bad data
        raise CorruptSampleError(f"bad {member}", str(exn)) from None


def _decode_frames(data: bytes, n: int, h: int, w: int, member: str = "frames.png") -> np.ndarray:
    arr = _decode_tiled_png(data, member, "RGB", n, h, w)
    return np.ascontiguousarray(arr.reshape(h, n, w, 3).transpose(1, 3, 0, 2))


def _decode_masks(data: bytes, n: int, h: int, w: int, num_objects: int) -> np.ndarray:
    arr = _decode_tiled_png(data, "masks.png", "L", n, h, w)
    top = int(arr.max(initial=0))
    if top > num_objects:
        raise CorruptSampleError(
            "bad masks.png",
            f"object id {top - 1} (value {top}) in masks.png, but the scene has {num_objects} objects",
        )
    return np.ascontiguousarray(arr.reshape(h, n, w).transpose(1, 0, 2))


def _decode_audio(data: bytes, s: int, sr: int) -> np.ndarray:
    import soundfile as sf

    try:
        with sf.SoundFile(io.BytesIO(data)) as f:
            if f.format != "FLAC" or f.channels != 1 or f.samplerate != sr:
                raise CorruptSampleError(
                    "wrong shape",
                    f"audio.flac is {f.format} {f.channels} ch {f.samplerate} Hz, expected FLAC mono {sr} Hz",
                )
            pcm = f.read(dtype="int16")
    except CorruptSampleError:
        raise
    except Exception as exn:  # noqa: BLE001 - libsndfile errors
        raise CorruptSampleError("bad audio.flac", str(exn)) from None
    if pcm.shape != (s,):
        raise CorruptSampleError("wrong shape", f"audio.flac has {pcm.shape[0]} samples, expected {s}")
    return pcm.astype(np.float32) / np.float32(_PCM_SCALE)


def decode_sample(sample: dict[str, Any]) -> Clip:
    """Decode a raw WebDataset sample (``__key__`` + member bytes) into a
    :class:`~avmt.data.sample.Clip`: ``key``, ``frames`` (uint8 tensor ``[T*F, 3, H, W]``),
    ``audio`` (float32 tensor ``[S]``), ``scene`` (dict) and ``masks`` (uint8 tensor
    ``[T*F, H, W]``, 0 background, ``id + 1`` where object ``id`` is drawn).

    A converted clip (``scene.json`` an :mod:`avmt.data.annotation`) may store ``frames.jpg``
    instead of ``frames.png`` and has ``masks.png`` only when its ``mask_frames`` is not empty
    (``masks`` is ``None`` otherwise).

    Raises :class:`CorruptSampleError` on any problem (reason ``"missing {member}"``, ``"bad
    {member}"``, ``"wrong shape"`` or ``"old schema"``); members other than ``READ_MEMBERS`` are
    not decoded.  A v1 sample (no ``masks.png``, scene version 1) is ``"old schema"``.
    """
    import torch

    from avmt.data.sample import Clip

    key = sample.get("__key__")
    if not isinstance(key, str):
        raise CorruptSampleError("missing key", "sample without __key__")
    if not isinstance(sample.get("scene.json"), (bytes, bytearray)):
        raise CorruptSampleError("missing scene.json", "no scene.json member")
    scene = _decode_scene(sample["scene.json"], key)  # an old-schema scene is reported as such before anything else
    annotated = is_annotation(scene)
    frames_member = "frames.jpg" if annotated and "frames.png" not in sample and "frames.jpg" in sample else "frames.png"
    required = ["audio.flac", frames_member]
    if not annotated or scene["mask_frames"]:
        required.append("masks.png")
    missing = [m for m in required if not isinstance(sample.get(m), (bytes, bytearray))]
    if missing:
        raise CorruptSampleError(f"missing {missing[0]}", f"no {missing[0]} member")
    n, h, w, s, sr = _expected_sizes(scene)
    frames = _decode_frames(sample[frames_member], n, h, w, frames_member)
    masks = None
    if "masks.png" in required:
        masks = torch.from_numpy(_decode_masks(sample["masks.png"], n, h, w, len(scene["objects"])))
    audio = _decode_audio(sample["audio.flac"], s, sr)
    return Clip(key=key, frames=torch.from_numpy(frames), audio=torch.from_numpy(audio), scene=scene, masks=masks)


# --------------------------------------------------------------------------------------------
# In-memory clips
# --------------------------------------------------------------------------------------------


def clip_from_scene(scene: dict, cfg: SynthConfig | None = None) -> Clip:
    """Render ``scene`` into a :class:`~avmt.data.sample.Clip` in memory, equal to what its shard
    sample decodes to: ``frames`` uint8 ``[T*F, 3, H, W]``, ``audio`` float32 ``[S]`` (quantized
    to PCM-16 like the shards), ``scene`` (a JSON round-tripped copy) and ``masks`` uint8
    ``[T*F, H, W]`` (rendered object-id maps)."""
    import torch

    from avmt.data.sample import Clip

    frames, audio = render_clip(scene, cfg)
    masks = render_masks(scene, cfg)
    audio = _quantize(audio).astype(np.float32) / np.float32(_PCM_SCALE)
    scene = json.loads(json.dumps(scene))
    return Clip(
        key=scene["clip_id"],
        frames=torch.from_numpy(frames),
        audio=torch.from_numpy(audio),
        scene=scene,
        masks=torch.from_numpy(masks),
    )


def clip_from_index(index: int, split: str, seed: int, cfg: SynthConfig | None = None) -> Clip:
    """Generate and render clip ``index`` of ``split`` in memory (see :func:`clip_from_scene`)."""
    cfg = cfg or SynthConfig()
    return clip_from_scene(generate_scene(index, split, seed, cfg), cfg)


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _make_sample(job: tuple[int, str, int, SynthConfig]) -> tuple[str, dict[str, bytes]]:
    index, split, seed, cfg = job
    scene = generate_scene(index, split, seed, cfg)
    frames, audio = render_clip(scene, cfg)
    return scene["clip_id"], encode_clip(scene, frames, audio, render_masks(scene, cfg))


def write_tar(path: str | os.PathLike, samples: Iterable[tuple[str, dict[str, bytes]]]) -> int:
    """Write ``samples`` to the WebDataset tar ``path``, reproducibly and atomically: the one tar
    writer of avmt (AVSynth shards, converted shards, feature caches).

    Each sample ``(key, members)`` (member suffix -> bytes, e.g. ``{"audio.flac": ...}``) becomes
    the tar members ``{key}.{suffix}``: samples in the order given, a sample's members sorted by
    suffix, every member with the same metadata (mtime 2000-01-01T00:00:00Z, uid and gid 0, empty
    uname and gname, mode 0644; ustar format), so the same samples always give the same bytes.
    ``samples`` may be a generator: it is consumed once, while the tar is written.

    The tar is written to ``.{name}.tmp`` next to ``path`` and renamed over ``path`` when
    complete; if writing fails, the temporary file is removed and ``path`` is left as it was.

    Returns:
        the number of samples written.
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    count = 0
    try:
        with tarfile.open(tmp, "w", format=tarfile.USTAR_FORMAT) as tar:
            for key, members in samples:
                for suffix in sorted(members):
                    data = members[suffix]
                    info = tarfile.TarInfo(f"{key}.{suffix}")
                    info.size, info.mtime, info.mode = len(data), _TAR_MTIME, 0o644
                    info.uid = info.gid = 0
                    info.uname = info.gname = ""
                    tar.addfile(info, io.BytesIO(data))
                count += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return count


def _default_workers(num_clips: int) -> int:
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return 1 if num_clips < 400 else max(1, min(2, cpus))


@contextlib.contextmanager
def _sample_stream(jobs: list, num_workers: int) -> Iterator[Iterable[tuple[str, dict[str, bytes]]]]:
    """Encoded samples in job order (deterministic whatever the number of workers)."""
    if num_workers <= 1:
        yield map(_make_sample, jobs)
        return
    # fork (as torch's DataLoader does on Linux): the workers only run numpy/PIL/soundfile, and
    # unlike spawn it works from scripts without an ``if __name__ == "__main__"`` guard
    methods = multiprocessing.get_all_start_methods()
    ctx = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with ctx.Pool(num_workers) as pool:
        yield pool.imap(_make_sample, jobs, chunksize=8)


def write_shards(
    out_dir: str | os.PathLike,
    split: str,
    num_clips: int,
    seed: int,
    cfg: SynthConfig | None = None,
    clips_per_shard: int = 256,
    progress: bool = True,
    num_workers: int | None = None,
) -> list[Path]:
    """Generate clips ``0..num_clips-1`` of ``split`` and write them to
    ``{out_dir}/{split}/{split}-000000.tar, ...`` (``clips_per_shard`` clips each).

    Byte-identical output for the same arguments (and any ``num_workers``).  Existing
    ``{split}-*.tar`` files of the folder are replaced; each shard is written to a temporary name
    and renamed when complete.  ``num_workers`` processes render in parallel (default: 2 for
    >= 400 clips, else 1).  Returns the shard paths in order.
    """
    cfg = cfg or SynthConfig()
    if isinstance(num_clips, bool) or not isinstance(num_clips, int) or num_clips < 0:
        raise UserError(f"num_clips must be an int >= 0, got {num_clips!r}")
    if isinstance(clips_per_shard, bool) or not isinstance(clips_per_shard, int) or clips_per_shard < 1:
        raise UserError(f"clips_per_shard must be an int >= 1, got {clips_per_shard!r}")
    scene_seed(seed, split, 0)  # validates split and seed early
    folder = Path(out_dir) / split
    folder.mkdir(parents=True, exist_ok=True)
    for old in [*folder.glob(f"{split}-*.tar"), *folder.glob(f".{split}-*.tar.tmp")]:
        old.unlink()
    workers = _default_workers(num_clips) if num_workers is None else max(1, int(num_workers))
    jobs = [(i, split, seed, cfg) for i in range(num_clips)]
    paths: list[Path] = []
    from tqdm.auto import tqdm

    with tqdm(total=num_clips, desc=f"AVSynth {split}", unit="clip", disable=not progress) as bar:
        with _sample_stream(jobs, workers) as stream:
            stream = iter(stream)

            def shard_samples(count: int) -> Iterator[tuple[str, dict[str, bytes]]]:
                """The next ``count`` samples of the stream, ticking the bar as each is written."""
                for sample in itertools.islice(stream, count):
                    yield sample
                    bar.update(1)

            for shard_index, first in enumerate(range(0, num_clips, clips_per_shard)):
                path = folder / f"{split}-{shard_index:06d}.tar"
                write_tar(path, shard_samples(min(clips_per_shard, num_clips - first)))
                paths.append(path)
    return paths


def _manifest_head(clips: dict[str, int], seed: int, cfg: SynthConfig, clips_per_shard: int) -> dict:
    return {
        "format": "avsynth-webdataset",
        "format_version": SHARD_FORMAT_VERSION,
        "schema_version": SCHEMA_VERSION,
        "generator_version": GENERATOR_VERSION,
        "seed": int(seed),
        "cfg": cfg.to_dict(),
        "clips_per_shard": int(clips_per_shard),
        "clips": {str(k): int(v) for k, v in clips.items()},
    }


def _check_clips(clips: dict[str, int]) -> None:
    if not isinstance(clips, dict) or not clips:
        raise UserError(f"clips must be a non-empty dict split -> number of clips, got {clips!r}")
    for split, n in clips.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise UserError(f"clips[{split!r}] must be an int >= 0, got {n!r}")


def synthesize(
    out_dir: str | os.PathLike,
    clips: dict[str, int],
    seed: int,
    cfg: SynthConfig | None = None,
    progress: bool = True,
    clips_per_shard: int = 256,
    num_workers: int | None = None,
) -> dict[str, list[Path]]:
    """Write every split of ``clips`` (split -> number of clips) under ``out_dir`` and then
    ``{out_dir}/manifest.json`` (format/schema/generator versions, seed, cfg, clip counts, shard
    lists relative to ``out_dir``).  Returns split -> shard paths."""
    cfg = cfg or SynthConfig()
    _check_clips(clips)
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / MANIFEST
    manifest_path.unlink(missing_ok=True)  # an interrupted run must not leave a stale manifest
    shards = {
        split: write_shards(root, split, n, seed, cfg, clips_per_shard, progress, num_workers)
        for split, n in clips.items()
    }
    manifest = _manifest_head(clips, seed, cfg, clips_per_shard)
    manifest["shards"] = {
        split: [p.relative_to(root).as_posix() for p in paths] for split, paths in shards.items()
    }
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, manifest_path)
    return shards


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """The manifest of ``out_dir``, or ``None`` when it is missing or unreadable."""
    try:
        data = json.loads((Path(out_dir) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_shard_version(root: str | os.PathLike) -> None:
    """Refuse shards of another version: read ``{root}/manifest.json`` when present and raise
    ``ValueError`` when its ``schema_version`` or ``format_version`` differs from this avmt's.

    The message names the folder, says what the shards are (e.g. AVSynth v1) and what this avmt
    reads (v2: masks, multi-source scenes, expressions), and gives the command that regenerates
    them.  No manifest (or an unreadable one, or one of another format): nothing is checked.
    """
    manifest = read_manifest(root)
    if manifest is not None and manifest.get("format") == "avmt-converted":
        from avmt.data.converters.base import CONVERTED_FORMAT_VERSION

        if manifest.get("format_version") != CONVERTED_FORMAT_VERSION:
            raise UserError(
                f"the converted shards in '{root}' are of format version {manifest.get('format_version')!r}; this "
                f"avmt reads version {CONVERTED_FORMAT_VERSION}: convert the {manifest.get('source_format')} data again "
                f"(python -m avmt data convert {manifest.get('source_format')} --src ... --out ...)"
            )
        return
    if manifest is None or manifest.get("format", "avsynth-webdataset") != "avsynth-webdataset":
        return
    schema, fmt = manifest.get("schema_version"), manifest.get("format_version")
    if schema == SCHEMA_VERSION and fmt == SHARD_FORMAT_VERSION:
        return
    command = SYNTH_COMMAND.format(root=root)
    found = f"schema_version {schema!r}, format_version {fmt!r}"
    ints = all(isinstance(v, int) and not isinstance(v, bool) for v in (schema, fmt))
    if ints and (schema > SCHEMA_VERSION or fmt > SHARD_FORMAT_VERSION):
        raise UserError(
            f"the shards in '{root}' are newer ({found}) than this version of avmt reads (AVSynth "
            f"v{SCHEMA_VERSION}, format v{SHARD_FORMAT_VERSION}): upgrade avmt, or regenerate them with: "
            f"{command}"
        )
    known = isinstance(schema, int) and not isinstance(schema, bool)
    what = f"AVSynth v{schema}" if known else "of an unknown AVSynth version"
    raise UserError(
        f"the shards in '{root}' are {what} ({found}); this version of avmt reads AVSynth "
        f"v{SCHEMA_VERSION} shards (format v{SHARD_FORMAT_VERSION}: object masks, multi-source scenes, "
        f"referring expressions). Regenerate them with: {command}"
    )


@contextlib.contextmanager
def dir_lock(root: Path) -> Iterator[None]:
    """Exclusive lock on ``root/.lock`` (so concurrent ranks generate once); no-op without fcntl."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - non-POSIX
        yield
        return
    root.mkdir(parents=True, exist_ok=True)
    with open(root / ".lock", "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure_shards(
    out_dir: str | os.PathLike,
    clips: dict[str, int],
    seed: int,
    cfg: SynthConfig | None = None,
    progress: bool = True,
    clips_per_shard: int = 256,
) -> dict[str, list[Path]]:
    """Shards of ``clips`` under ``out_dir``: reused when the manifest matches (format, schema and
    generator versions, seed, cfg, clip counts, shard size) and every listed shard exists, else
    (re)generated with :func:`synthesize` (so AVSynth v1 shards are replaced by v2 ones).  Safe to
    call on every start and from several processes at once."""
    cfg = cfg or SynthConfig()
    _check_clips(clips)
    root = Path(out_dir)
    head = _manifest_head(clips, seed, cfg, clips_per_shard)
    with dir_lock(root):
        manifest = read_manifest(root)
        if manifest is not None and {k: manifest.get(k) for k in head} == head:
            listed = manifest.get("shards")
            if isinstance(listed, dict) and set(listed) == set(clips):
                shards = {split: [root / rel for rel in listed[split]] for split in clips}
                if all(p.is_file() for paths in shards.values() for p in paths):
                    return shards
        return synthesize(root, clips, seed, cfg, progress=progress, clips_per_shard=clips_per_shard)


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def split_clip_count(root: str | os.PathLike, folder: str) -> int | None:
    """Clips of the split folder ``folder`` (e.g. ``"train"``) of ``root``, from its manifest:
    ``clips[folder]`` of an AVSynth manifest, ``splits[folder]["clips"]`` of a converted one;
    ``None`` when there is no manifest or it does not say."""
    manifest = read_manifest(root) or {}
    if manifest.get("format") == "avmt-converted":
        splits = manifest.get("splits")
        info = splits.get(folder) if isinstance(splits, dict) else None
        count = info.get("clips") if isinstance(info, dict) else None
    else:
        clips = manifest.get("clips")
        count = clips.get(folder) if isinstance(clips, dict) else None
    return count if isinstance(count, int) and not isinstance(count, bool) and count >= 0 else None


def manifest_segments(root: str | os.PathLike) -> int | None:
    """Segments per clip that the manifest of ``root`` gives (AVSynth's ``cfg``, a converted
    dataset's ``media``); ``None`` when there is no manifest or it does not say."""
    manifest = read_manifest(root) or {}
    for section in ("cfg", "media"):
        value = manifest.get(section, {}).get("num_segments") if isinstance(manifest.get(section), dict) else None
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def shard_clip_counts(root: str | os.PathLike) -> dict[Path, int]:
    """Shard path -> clips the manifest of ``root`` says it holds, for the AVSynth shards (every
    shard of a split holds ``clips_per_shard`` clips, the last one the rest); ``{}`` for converted
    shards (their manifest counts clips per split only) or without a manifest."""
    manifest = read_manifest(root) or {}
    if manifest.get("format", "avsynth-webdataset") != "avsynth-webdataset":
        return {}
    clips, shards, per_shard = manifest.get("clips"), manifest.get("shards"), manifest.get("clips_per_shard")
    if not (isinstance(clips, dict) and isinstance(shards, dict) and isinstance(per_shard, int) and per_shard > 0):
        return {}
    counts: dict[Path, int] = {}
    for split, paths in shards.items():
        total = clips.get(split)
        if not isinstance(total, int) or not isinstance(paths, list):
            continue
        for index, rel in enumerate(paths):
            counts[Path(root) / rel] = max(0, min(per_shard, total - index * per_shard))
    return counts


def stream_part(split_by_node: bool, split_by_worker: bool) -> tuple[int, int]:
    """``(index, count)`` of this reader among the readers of one stream: the DDP rank (from
    ``RANK``/``WORLD_SIZE`` or ``torch.distributed``) when ``split_by_node``, times the DataLoader
    workers (``get_worker_info``) when ``split_by_worker``; ``(0, 1)`` for a lone reader."""
    from webdataset.utils import pytorch_worker_info

    rank, world, worker, workers = pytorch_worker_info()
    rank, world = (rank, world) if split_by_node else (0, 1)
    worker, workers = (worker, workers) if split_by_worker else (0, 1)
    return rank * workers + worker, world * workers


def list_shards(folder: str | os.PathLike) -> list[Path]:
    """Sorted ``*.tar`` files of ``folder`` (e.g. ``{root}/train``).

    Raises:
        FileNotFoundError: the folder is missing or holds no ``.tar`` file; the message names
            the folder and the command that makes the shards.
        ValueError: ``{folder}/../manifest.json`` says the shards are of another version
            (:func:`check_shard_version`).
    """
    folder = Path(folder)
    check_shard_version(folder.parent)
    if not folder.is_dir():
        problem = "does not exist" if not folder.exists() else "is not a folder"
    else:
        paths = sorted(p for p in folder.glob("*.tar") if p.is_file())
        if paths:
            return paths
        problem = "holds no .tar shards"
    manifest = read_manifest(folder.parent)
    if manifest is not None and manifest.get("format") == "avmt-converted":  # the user's own data: never suggest synth
        splits = sorted(p.name for p in folder.parent.iterdir() if p.is_dir() and any(p.glob("*.tar")))
        raise FileNotFoundError(
            f"shard folder '{folder}' {problem}: the converted dataset under '{folder.parent}' has the split(s) "
            f"{', '.join(splits) or 'none'}. Convert the {folder.name} split too, or read another split for this "
            f"stage with data.splits (e.g. --data.splits='{{\"{folder.name}\": \"{splits[0] if splits else 'train'}\"}}')")
    command = SYNTH_COMMAND.format(root=folder.parent)
    raise FileNotFoundError(f"shard folder '{folder}' {problem}. Make the AVSynth shards with: {command}")


#: The placeholder that makes ``data.root`` a URL pattern: it stands for the split's folder name.
SPLIT_PLACEHOLDER = "{split}"


def is_url_pattern(root: str | os.PathLike | None) -> bool:
    """Whether ``root`` is a shard URL pattern (a string holding ``{split}``) rather than a folder."""
    return isinstance(root, str) and SPLIT_PLACEHOLDER in root


def _is_local(url: str) -> bool:
    """Whether webdataset's ``gopen`` opens ``url`` as a local file (no scheme, or ``file:``)."""
    from urllib.parse import urlparse

    return urlparse(url).scheme in ("", "file")


def _local_path(url: str) -> Path:
    from urllib.parse import urlparse
    from urllib.request import url2pathname

    parsed = urlparse(url)
    return Path(url2pathname(parsed.path)) if parsed.scheme == "file" else Path(url)


def _missing_local(urls: Sequence[str]) -> list[Path]:
    """The local files among ``urls`` (no scheme, or ``file:``) that do not exist."""
    return [path for path in (_local_path(url) for url in urls if _is_local(url)) if not path.is_file()]


@dataclasses.dataclass(frozen=True)
class SplitSource:
    """The shards of one split and what is known of their sizes.

    Attributes:
        urls: the shards in file order, each opened with webdataset's ``gopen`` (a local path, or a
            ``file:``, ``pipe:``, ``http(s):`` ... URL).
        where: the folder or URL pattern they come from, for messages.
        num_clips: clips of the split (manifest or ``data.num_clips``); ``None`` when unknown.
        expected: shard URL -> clips its manifest says it holds (may cover no shard at all).
    """

    urls: tuple[str, ...]
    where: str
    num_clips: int | None = None
    expected: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def shard_clips(self) -> tuple[int, ...] | None:
        """Clips of each shard (aligned with ``urls``) when the manifest gives every one, else ``None``."""
        if not self.urls or any(url not in self.expected for url in self.urls):
            return None
        return tuple(self.expected[url] for url in self.urls)

    @classmethod
    def from_paths(cls, paths: Sequence[str | os.PathLike], num_clips: int | None = None) -> SplitSource:
        """Local shard files (checked against the manifest of ``{shard}/../..`` for their version and
        per-shard clip counts); ``num_clips`` is the split's clip count when known."""
        paths = [Path(p) for p in paths]
        expected: dict[str, int] = {}
        for root in dict.fromkeys(p.parent.parent for p in paths):
            expected.update({str(path): n for path, n in shard_clip_counts(root).items()})
        where = str(paths[0].parent) if paths else "?"
        return cls(tuple(str(p) for p in paths), where, num_clips, expected)


def split_source(root: str | os.PathLike, folder: str, num_clips: int | None = None) -> SplitSource:
    """The shards of the split folder ``folder`` (e.g. ``"train"``) of ``root``.

    ``root`` is either a folder (``{root}/{folder}/*.tar``, sizes from ``{root}/manifest.json``) or
    a URL pattern holding ``{split}`` (:func:`is_url_pattern`), e.g.
    ``"pipe:aws s3 cp s3://bucket/avsynth/{split}/{000000..000099}.tar -"``: ``{split}`` is replaced
    by ``folder`` and the rest expanded by webdataset's own ``expand_urls`` (brace ranges and lists,
    ``::`` between patterns, ``${VAR}`` from ``WDS_VAR``); there is no manifest, so the split's size
    is ``num_clips`` (``None``: unknown).

    Raises:
        UserError: the pattern does not expand, or a local shard it names does not exist (names it).
        FileNotFoundError, UserError: the folder form as :func:`list_shards` says.
    """
    if not is_url_pattern(root):
        folder_path = Path(root) / folder
        paths = list_shards(folder_path)
        counted = split_clip_count(root, folder)
        return SplitSource.from_paths(paths, num_clips if num_clips is not None else counted)
    from braceexpand import UnbalancedBracesError
    from webdataset.shardlists import expand_urls

    pattern = str(root).replace(SPLIT_PLACEHOLDER, folder)
    try:
        urls = expand_urls(pattern)
    except (AssertionError, UnbalancedBracesError) as exn:  # webdataset asserts on a missing WDS_ variable
        raise UserError(f"data.root: cannot expand the shard URL pattern {pattern!r}: {exn}") from None
    missing = _missing_local(urls)
    if missing:
        raise UserError(
            f"data.root: {len(missing)} shard(s) of the {folder} split named by {pattern!r} do not exist, e.g. "
            f"{str(missing[0])!r}: fix the pattern's brace range, or write the shards there"
        )
    return SplitSource(tuple(urls), pattern, num_clips)


def shard_order(num_shards: int, seed: int, epoch: int, shuffle: bool = True) -> list[int]:
    """The order readers open the shards in during ``epoch``: a permutation of ``range(num_shards)``
    drawn from ``(seed, epoch)`` alone, so every DDP rank and DataLoader worker draws the same one;
    file order when ``shuffle`` is false."""
    order = list(range(num_shards))
    if shuffle:
        random.Random(zlib.crc32(f"shards:{seed}:{epoch}".encode())).shuffle(order)
    return order


def by_shard(source: SplitSource, readers: int) -> bool:
    """Whether ``readers`` readers split ``source`` by shard (each opens only its own shards:
    reader ``i`` of ``n`` owns shards ``i, i + n, ...`` of the file order) rather than by sample
    position (each reads every shard and keeps the samples at its positions).

    By shard when there are at least as many shards as readers and the readers' shares stay
    countable: the manifest gives every shard's size, or the split's size is unknown anyway."""
    return len(source.urls) >= readers and (source.shard_clips is not None or source.num_clips is None)


def reader_clip_count(
    root_or_sources: str | os.PathLike | SplitSource | dict[str, SplitSource],
    split: str,
    part: tuple[int, int],
    num_clips: int | None = None,
) -> int | None:
    """Clips that reader ``part = (index, count)`` of a split's stream yields in one epoch when every
    clip is usable (:func:`iter_clips`), whatever the epoch's shard order; ``None`` when unknown.

    Args:
        root_or_sources: ``data.root`` (folder or URL pattern), a :class:`SplitSource`, or split
            folder -> :class:`SplitSource`.
        split: the split's folder name (e.g. ``"train"``).
        part: ``(index, count)`` of the reader among the stream's readers (DDP ranks x workers).
        num_clips: the split's clip count for a URL pattern (``data.num_clips``).
    """
    if isinstance(root_or_sources, SplitSource):
        source = root_or_sources
    elif isinstance(root_or_sources, dict):
        source = root_or_sources[split]
    else:
        source = split_source(root_or_sources, split, num_clips)
    index, count = _check_part(part)
    if by_shard(source, count):
        sizes = source.shard_clips
        return None if sizes is None else sum(sizes[index::count])
    return None if source.num_clips is None else len(range(index, source.num_clips, count))


def _check_part(part: tuple[int, int]) -> tuple[int, int]:
    index, count = part
    if not (0 <= index < count):
        raise ValueError(f"part must be (index, count) with 0 <= index < count, got {part!r}")
    return int(index), int(count)


def _as_source(shard_paths: str | os.PathLike | Sequence[str | os.PathLike] | SplitSource) -> SplitSource:
    if isinstance(shard_paths, SplitSource):
        source = shard_paths
    elif isinstance(shard_paths, (str, os.PathLike)):
        path = Path(shard_paths)
        source = SplitSource.from_paths([path] if path.suffix == ".tar" else list_shards(path))
    else:
        if not shard_paths:
            raise ValueError("iter_clips: no shard paths given")
        source = SplitSource.from_paths(shard_paths)
    missing = [str(p) for p in _missing_local(source.urls)]
    if missing:
        raise FileNotFoundError(
            f"shard file(s) not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
            f"Make the AVSynth shards with: {SYNTH_COMMAND.format(root=Path(missing[0]).parent.parent)}"
        )
    for root in dict.fromkeys(_local_path(url).parent.parent for url in source.urls if _is_local(url)):
        check_shard_version(root)
    return source


def unsafe_member(name: str) -> bool:
    """Whether a tar member name is an absolute path (``/x``, ``C:x``) or has a ``..`` component
    (``/`` or ``\\`` separated)."""
    parts = name.replace("\\", "/").split("/")
    return name.startswith(("/", "\\")) or ".." in parts or (len(name) > 1 and name[1] == ":")


def iter_clips(
    shard_paths: str | os.PathLike | Sequence[str | os.PathLike] | SplitSource,
    counter: CorruptSampleCounter | None = None,
    *,
    split_by_node: bool = False,
    split_by_worker: bool = False,
    part: tuple[int, int] | None = None,
    order: Sequence[int] | None = None,
) -> Iterator[Clip]:
    """Clips of the shards, read with stock ``webdataset`` (opened with its ``gopen``).

    Readers share the stream in one of two ways (:func:`by_shard`):

    - by shard, when there are at least as many shards as readers (and the shares stay
      countable): reader ``index`` of ``count`` opens only the shards ``index, index + count, ...``
      of the file order and yields all their samples;
    - by sample position otherwise: every reader reads every shard's bytes and decodes the samples
      at positions ``index, index + count, ...`` of the whole stream (any number of readers works
      with any number of shards, even one).

    Either way every sample goes to exactly one reader per pass; :func:`reader_clip_count` says
    how many.

    Args:
        shard_paths: a :class:`SplitSource`, a list of ``.tar`` paths, one ``.tar`` path, or a
            folder of shards.
        counter: receives skipped samples (a fresh one when ``None``).
        split_by_node: keep only this rank's share of the samples (see :func:`stream_part`).
        split_by_worker: keep only this DataLoader worker's share (see :func:`stream_part`).
        part: ``(index, count)`` of this reader, given outright (overrides the two flags).
        order: the order to open the shards in, a permutation of their indices that every reader
            must be given alike (:func:`shard_order`); file order when ``None``.

    Each shard's problems are counted once over all readers: an unreadable tar (a missing file, a
    failing ``pipe:`` command, a broken tar) by the reader that owns it, or reader 0 when sharing
    by position; a shard holding fewer samples than its manifest says is warned about (naming it
    with both counts) and its missing clips counted (reason ``"missing from shard"``) the same way.

    Yields:
        :class:`~avmt.data.sample.Clip` s (see :func:`decode_sample`): ``key``, ``frames`` uint8
        ``[T*F, 3, H, W]``, ``audio`` float32 ``[S]``, ``scene`` dict, ``masks`` uint8
        ``[T*F, H, W]``.  A corrupt sample (bad PNG/FLAC/JSON, missing member, wrong shape, old
        schema, a member with an absolute path or a ``..`` component) is skipped with a
        :class:`CorruptSampleWarning` naming its key (or member) and counted in ``counter``;
        members other than ``READ_MEMBERS`` are never decoded (warned once per suffix).

    Raises:
        FileNotFoundError: a local shard or the folder is missing (before iteration starts).
        UserError: the manifest next to local shards (``{shard}/../../manifest.json``) says they are
            of another version, e.g. AVSynth v1 (:func:`check_shard_version`).
    """
    source = _as_source(shard_paths)
    if part is not None:
        _check_part(part)
    if order is not None and sorted(order) != list(range(len(source.urls))):
        raise ValueError(f"iter_clips: order must be a permutation of range({len(source.urls)}), got {order!r}")
    counter = counter if counter is not None else CorruptSampleCounter()
    return _iter_clips(source, counter, part, (split_by_node, split_by_worker), order)


def _iter_clips(
    source: SplitSource,
    counter: CorruptSampleCounter,
    part: tuple[int, int] | None,
    split_by: tuple[bool, bool],
    order: Sequence[int] | None,
) -> Iterator[Clip]:
    """webdataset's own tar iteration and grouping (``tar_file_expander`` + ``group_by_keys``, the
    stages ``wds.WebDataset`` is built from) over the shards this generator opens (``gopen``) and
    closes; this reader's share (``part``, else :func:`stream_part` of ``split_by``, worked out
    when the iteration starts, i.e. in the worker) decoded, the samples found per owned shard
    checked against ``source.expected``."""
    from webdataset.gopen import gopen
    from webdataset.tariterators import group_by_keys, tar_file_expander

    index, count = part if part is not None else stream_part(*split_by)
    shard_mode = by_shard(source, count)
    order = list(order) if order is not None else list(range(len(source.urls)))
    urls = [source.urls[i] for i in order if not shard_mode or i % count == index]
    reports = shard_mode or index == 0  # the reader that counts the shards' own problems

    current = {"url": "?"}
    reported: set[str] = set()

    def tar_error(exn: Exception) -> bool:
        url = current["url"]
        if reports and url not in reported:  # one count per unreadable shard, however many errors it raises
            reported.add(url)
            counter.add(url, "unreadable tar")
            message = exn.args[0] if exn.args else exn
            warnings.warn(f"AVSynth: skipping the unreadable rest of shard {url}: {message}",
                          CorruptSampleWarning, stacklevel=2)
        return True  # go on with the next sample / shard

    def streams(selected: Iterable[str]) -> Iterator[dict]:
        for url in selected:
            current["url"] = url
            try:
                fh = gopen(url, "rb")
            except Exception as exn:  # noqa: BLE001 - OSError for a file, anything from a scheme handler
                tar_error(exn)
                continue
            try:
                yield {"url": url, "stream": fh}
            except GeneratorExit:  # the pass was abandoned: close quietly
                with contextlib.suppress(Exception):
                    fh.close()
                raise
            try:
                if url not in reported:  # let a pipe's command write the tar's end padding and exit
                    while fh.read(1 << 16):
                        pass
                fh.close()  # a pipe: reports its command's failure here (IOError naming the exit status)
            except Exception as exn:  # noqa: BLE001
                tar_error(exn)

    samples = group_by_keys(tar_file_expander(streams(urls), handler=tar_error), handler=tar_error)
    warned_suffixes: set[str] = set()
    found: dict[str, int] = dict.fromkeys(urls, 0)
    for position, sample in enumerate(samples):
        url = str(sample.get("__url__", current["url"]))
        found[url] = found.get(url, 0) + 1
        if not shard_mode and position % count != index:
            continue
        counter.add_read()
        key = str(sample.get("__key__", "?"))
        if unsafe_member(key):  # the key is the members' path up to the first dot of the file name
            members = sorted(f"{key}.{suffix}" for suffix in sample if not suffix.startswith("__"))
            counter.add(members[0] if members else key, "unsafe member path")
            warnings.warn(
                f"AVSynth: skipping sample '{key}' in {url}: its member(s) {members} have an absolute path or a "
                "'..' component; they are never used", CorruptSampleWarning, stacklevel=2,
            )
            continue
        for suffix in sample:
            if suffix.startswith("__") or suffix in READ_MEMBERS:
                continue
            counter.ignore(suffix)
            if suffix not in warned_suffixes:
                warned_suffixes.add(suffix)
                warnings.warn(
                    f"AVSynth: ignoring member '{key}.{suffix}' (only {', '.join(READ_MEMBERS)} are decoded; "
                    "nothing is ever unpickled)", CorruptSampleWarning, stacklevel=2,
                )
        try:
            clip = decode_sample({k: sample[k] for k in (*READ_MEMBERS, "__key__") if k in sample})
        except CorruptSampleError as exn:
            counter.add(key, exn.reason)
            warnings.warn(
                f"AVSynth: skipping corrupt sample '{key}' in {url}: {exn}",
                CorruptSampleWarning, stacklevel=2,
            )
            continue
        yield clip
    if reports:  # in position mode every reader finds the same counts: one of them reports
        _report_short_shards(found, source.expected, counter)


def _report_short_shards(found: dict[str, int], expected: dict[str, int], counter: CorruptSampleCounter) -> None:
    """Warn about (and count the missing clips of) each shard that held fewer samples than
    ``expected`` says (shard path -> manifest count)."""
    for url, seen in found.items():
        wanted = expected.get(url)
        if wanted is None or seen >= wanted:
            continue
        counter.add(url, "missing from shard", wanted - seen)
        warnings.warn(
            f"AVSynth: shard {url} holds {seen} clip(s) but its manifest says {wanted}: {wanted - seen} clip(s) "
            "are missing (a truncated or replaced shard; the epoch is shorter than planned). Regenerate or "
            "re-convert the shards.", CorruptSampleWarning, stacklevel=2,
        )
