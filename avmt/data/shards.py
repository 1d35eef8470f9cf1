"""AVSynth shards: WebDataset tar files with the media of each clip stored once.

Layout of ``{out_dir}``::

    manifest.json                       schema version, seed, SynthConfig, clip counts, shard lists
    train/train-000000.tar, ...         one tar per ``clips_per_shard`` clips
    val/val-000000.tar, ...

Members of a sample (WebDataset key = clip id, e.g. ``train-00000042``), sorted by name:

- ``{key}.audio.flac``: mono PCM-16 FLAC (float = int16 / 32768),
- ``{key}.frames.png``: all T*F frames tiled horizontally in one RGB PNG (``H x (T*F*W)``),
- ``{key}.scene.json``: the scene graph (schema version 1, see ``avmt.data.synth``).

The tars are byte-identical for the same seed and config (fixed mtime/uid/gid/uname, sorted
members, ustar format), readable with plain ``tar`` and stock ``webdataset``.  Reading never
unpickles anything: only the three members above are decoded (PIL, soundfile, json); any other
member is ignored with a warning, and a corrupt sample is skipped, counted in a
:class:`CorruptSampleCounter` and reported with a :class:`CorruptSampleWarning` naming its key.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import tarfile
import threading
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from avmt.data.synth import (
    GENERATOR_VERSION,
    SCHEMA_VERSION,
    SynthConfig,
    generate_scene,
    render_clip,
    scene_seed,
    validate_scene,
)

__all__ = [
    "SHARD_FORMAT_VERSION",
    "MEMBERS",
    "SYNTH_COMMAND",
    "CorruptSampleCounter",
    "CorruptSampleWarning",
    "CorruptSampleError",
    "encode_clip",
    "decode_sample",
    "write_shards",
    "synthesize",
    "ensure_shards",
    "read_manifest",
    "list_shards",
    "iter_clips",
    "clip_from_scene",
    "clip_from_index",
]

#: Version of the shard layout (members, encodings, manifest).
SHARD_FORMAT_VERSION = 1
#: Sample members, in the (sorted) order they are written.
MEMBERS: tuple[str, ...] = ("audio.flac", "frames.png", "scene.json")
#: How a user makes the shards (the CLI's ``data synth`` subcommand).
SYNTH_COMMAND = "python -m avmt data synth --out {root} --clips N --seed S"
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
    """

    def __init__(self, max_keys: int = 1000) -> None:
        self._lock = threading.Lock()
        self.max_keys = max_keys
        self.count = 0
        self.reasons: dict[str, int] = {}
        self.keys: list[str] = []
        self.ignored: dict[str, int] = {}

    def add(self, key: str, reason: str) -> None:
        """Record one skipped sample ``key`` under ``reason``."""
        with self._lock:
            self.count += 1
            self.reasons[reason] = self.reasons.get(reason, 0) + 1
            if len(self.keys) < self.max_keys:
                self.keys.append(key)

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


class CorruptSampleError(ValueError):
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


def encode_clip(scene: dict, frames: np.ndarray, audio: np.ndarray) -> dict[str, bytes]:
    """Encode one clip into its shard members (``MEMBERS`` -> bytes).

    Args:
        scene: scene graph (JSON-able dict).
        frames: ``uint8 [N, 3, H, W]`` (N = T*F), stored as one PNG of ``H x (N*W)`` RGB pixels.
        audio: ``float [S]`` in [-1, 1), stored as mono PCM-16 FLAC at ``scene["sample_rate"]``.
    """
    import soundfile as sf
    from PIL import Image

    frames = np.asarray(frames)
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[1] != 3:
        raise ValueError(f"frames must be uint8 [N, 3, H, W], got {frames.dtype} {frames.shape}")
    n, _, h, w = frames.shape
    tiled = np.ascontiguousarray(frames.transpose(2, 0, 3, 1).reshape(h, n * w, 3))
    png = io.BytesIO()
    Image.fromarray(tiled, mode="RGB").save(png, format="PNG", compress_level=6)
    flac = io.BytesIO()
    sf.write(flac, _quantize(audio), int(scene["sample_rate"]), format="FLAC", subtype="PCM_16")
    text = json.dumps(scene, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
    return {"audio.flac": flac.getvalue(), "frames.png": png.getvalue(), "scene.json": text.encode("utf-8")}


def _expected_sizes(scene: dict) -> tuple[int, int, int, int, int]:
    """(N frames, H, W, S samples, sample rate) a scene promises."""
    T, F = int(scene["num_segments"]), int(scene["frames_per_segment"])
    H, W = (int(v) for v in scene["frame_size"])
    sr = int(scene["sample_rate"])
    S = int(round(T * float(scene["segment_seconds"]) * sr))
    if min(T, F, H, W, sr, S) <= 0:
        raise ValueError("non-positive size")
    return T * F, H, W, S, sr


def _decode_scene(data: bytes, key: str) -> dict:
    try:
        scene = json.loads(data.decode("utf-8"))
    except Exception as exn:  # noqa: BLE001 - any parse failure is a corrupt member
        raise CorruptSampleError("bad scene.json", f"not JSON ({exn})") from None
    if not isinstance(scene, dict):
        raise CorruptSampleError("bad scene.json", f"expected an object, got {type(scene).__name__}")
    try:
        validate_scene(scene)
    except ValueError as exn:
        raise CorruptSampleError("bad scene.json", str(exn)) from None
    if scene["clip_id"] != key:
        raise CorruptSampleError("bad scene.json", f"clip_id {scene['clip_id']!r} does not match the key")
    try:
        _expected_sizes(scene)
    except Exception as exn:  # noqa: BLE001
        raise CorruptSampleError("bad scene.json", f"bad sizes ({exn})") from None
    return scene


def _decode_frames(data: bytes, n: int, h: int, w: int) -> np.ndarray:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data), formats=["PNG"]) as img:
            if img.size != (n * w, h) or img.mode != "RGB":
                raise CorruptSampleError(
                    "wrong shape",
                    f"frames.png is {img.mode} {img.size[0]}x{img.size[1]}, expected RGB {n * w}x{h}",
                )
            img.load()
            arr = np.asarray(img, dtype=np.uint8)
    except CorruptSampleError:
        raise
    except Exception as exn:  # noqa: BLE001 - PIL raises many types on bad data
        raise CorruptSampleError("bad frames.png", str(exn)) from None
    return np.ascontiguousarray(arr.reshape(h, n, w, 3).transpose(1, 3, 0, 2))


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


def decode_sample(sample: dict[str, Any]) -> dict:
    """Decode a raw WebDataset sample (``__key__`` + member bytes) into a Clip.

    Returns ``{"key": str, "frames": uint8 tensor [T*F, 3, H, W], "audio": float32 tensor [S],
    "scene": dict}``.  Raises :class:`CorruptSampleError` on any problem; members other than
    ``MEMBERS`` are not decoded.
    """
    import torch

    key = sample.get("__key__")
    if not isinstance(key, str):
        raise CorruptSampleError("missing key", "sample without __key__")
    for member in MEMBERS:
        if not isinstance(sample.get(member), (bytes, bytearray)):
            raise CorruptSampleError(f"missing {member}", f"no {member} member")
    scene = _decode_scene(sample["scene.json"], key)
    n, h, w, s, sr = _expected_sizes(scene)
    frames = _decode_frames(sample["frames.png"], n, h, w)
    audio = _decode_audio(sample["audio.flac"], s, sr)
    return {"key": key, "frames": torch.from_numpy(frames), "audio": torch.from_numpy(audio), "scene": scene}


# --------------------------------------------------------------------------------------------
# In-memory clips
# --------------------------------------------------------------------------------------------


def clip_from_scene(scene: dict, cfg: SynthConfig | None = None) -> dict:
    """Render ``scene`` into a Clip in memory, equal to what its shard sample decodes to.

    Returns ``{"key": str, "frames": uint8 tensor [T*F, 3, H, W], "audio": float32 tensor [S]
    (quantized to PCM-16 like the shards), "scene": dict}``.
    """
    import torch

    frames, audio = render_clip(scene, cfg)
    audio = _quantize(audio).astype(np.float32) / np.float32(_PCM_SCALE)
    scene = json.loads(json.dumps(scene))
    return {
        "key": scene["clip_id"],
        "frames": torch.from_numpy(frames),
        "audio": torch.from_numpy(audio),
        "scene": scene,
    }


def clip_from_index(index: int, split: str, seed: int, cfg: SynthConfig | None = None) -> dict:
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
    return scene["clip_id"], encode_clip(scene, frames, audio)


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = _TAR_MTIME
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tar.addfile(info, io.BytesIO(data))


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
        raise ValueError(f"num_clips must be an int >= 0, got {num_clips!r}")
    if isinstance(clips_per_shard, bool) or not isinstance(clips_per_shard, int) or clips_per_shard < 1:
        raise ValueError(f"clips_per_shard must be an int >= 1, got {clips_per_shard!r}")
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
            for shard_index, first in enumerate(range(0, num_clips, clips_per_shard)):
                path = folder / f"{split}-{shard_index:06d}.tar"
                tmp = folder / f".{path.name}.tmp"
                with open(tmp, "wb") as fh:
                    with tarfile.open(fileobj=fh, mode="w", format=tarfile.USTAR_FORMAT) as tar:
                        for _ in range(min(clips_per_shard, num_clips - first)):
                            key, members = next(stream)
                            for suffix in sorted(members):
                                _add_member(tar, f"{key}.{suffix}", members[suffix])
                            bar.update(1)
                os.replace(tmp, path)
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
        raise ValueError(f"clips must be a non-empty dict split -> number of clips, got {clips!r}")
    for split, n in clips.items():
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"clips[{split!r}] must be an int >= 0, got {n!r}")


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


@contextlib.contextmanager
def _dir_lock(root: Path) -> Iterator[None]:
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
    """Shards of ``clips`` under ``out_dir``: reused when the manifest matches (versions, seed,
    cfg, clip counts, shard size) and every listed shard exists, else (re)generated with
    :func:`synthesize`.  Safe to call on every start and from several processes at once."""
    cfg = cfg or SynthConfig()
    _check_clips(clips)
    root = Path(out_dir)
    head = _manifest_head(clips, seed, cfg, clips_per_shard)
    with _dir_lock(root):
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


def list_shards(folder: str | os.PathLike) -> list[Path]:
    """Sorted ``*.tar`` files of ``folder`` (e.g. ``{root}/train``).

    Raises:
        FileNotFoundError: the folder is missing or holds no ``.tar`` file; the message names
            the folder and the command that makes the shards.
    """
    folder = Path(folder)
    if not folder.is_dir():
        problem = "does not exist" if not folder.exists() else "is not a folder"
    else:
        paths = sorted(p for p in folder.glob("*.tar") if p.is_file())
        if paths:
            return paths
        problem = "holds no .tar shards"
    command = SYNTH_COMMAND.format(root=folder.parent)
    raise FileNotFoundError(f"shard folder '{folder}' {problem}. Make the AVSynth shards with: {command}")


def _as_shard_list(shard_paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    if isinstance(shard_paths, (str, os.PathLike)):
        path = Path(shard_paths)
        return [path] if path.suffix == ".tar" else list_shards(path)
    paths = [Path(p) for p in shard_paths]
    if not paths:
        raise ValueError("iter_clips: no shard paths given")
    return paths


def iter_clips(
    shard_paths: str | os.PathLike | Sequence[str | os.PathLike],
    counter: CorruptSampleCounter | None = None,
    *,
    split_by_node: bool = False,
    split_by_worker: bool = False,
) -> Iterator[dict]:
    """Clips of the shards, in order, read with stock ``webdataset``.

    Args:
        shard_paths: a list of ``.tar`` paths, one ``.tar`` path, or a folder of shards.
        counter: receives skipped samples (a fresh one when ``None``).
        split_by_node: keep only this rank's share of the shards (``wds.split_by_node``).
        split_by_worker: keep only this DataLoader worker's share (``wds.split_by_worker``).

    Yields:
        ``{"key": str, "frames": uint8 tensor [T*F, 3, H, W], "audio": float32 tensor [S],
        "scene": dict}``.  A corrupt sample (bad PNG/FLAC/JSON, missing member, wrong shape,
        unreadable tar) is skipped with a :class:`CorruptSampleWarning` naming its key and counted
        in ``counter``; members other than ``MEMBERS`` are never decoded (warned once per suffix).

    Raises:
        FileNotFoundError: a shard or the folder is missing (before iteration starts).
    """
    paths = _as_shard_list(shard_paths)
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(
            f"shard file(s) not found: {missing[:5]}{' ...' if len(missing) > 5 else ''}. "
            f"Make the AVSynth shards with: {SYNTH_COMMAND.format(root=paths[0].parent.parent)}"
        )
    counter = counter if counter is not None else CorruptSampleCounter()
    return _iter_clips([str(p) for p in paths], counter, split_by_node, split_by_worker)


def _iter_clips(
    urls: list[str], counter: CorruptSampleCounter, by_node: bool, by_worker: bool
) -> Iterator[dict]:
    """webdataset's own tar iteration and grouping (``tar_file_expander`` + ``group_by_keys``, the
    stages ``wds.WebDataset`` is built from) over shard files this generator opens and closes."""
    import webdataset as wds
    from webdataset.tariterators import group_by_keys, tar_file_expander

    current = {"url": "?"}
    reported: set[str] = set()

    def tar_error(exn: Exception) -> bool:
        url = current["url"]
        if url not in reported:  # one count per unreadable shard, however many errors it raises
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
                fh = open(url, "rb")
            except OSError as exn:
                tar_error(exn)
                continue
            with fh:
                yield {"url": url, "stream": fh}

    selected: Iterable[str] = iter(urls)
    if by_node:
        selected = wds.split_by_node(selected)
    if by_worker:
        selected = wds.split_by_worker(selected)
    samples = group_by_keys(tar_file_expander(streams(selected), handler=tar_error), handler=tar_error)
    warned_suffixes: set[str] = set()
    for sample in samples:
        key = str(sample.get("__key__", "?"))
        for suffix in sample:
            if suffix.startswith("__") or suffix in MEMBERS:
                continue
            counter.ignore(suffix)
            if suffix not in warned_suffixes:
                warned_suffixes.add(suffix)
                warnings.warn(
                    f"AVSynth: ignoring member '{key}.{suffix}' (only {', '.join(MEMBERS)} are decoded; "
                    "nothing is ever unpickled)", CorruptSampleWarning, stacklevel=2,
                )
        try:
            clip = decode_sample({k: sample[k] for k in (*MEMBERS, "__key__") if k in sample})
        except CorruptSampleError as exn:
            counter.add(key, exn.reason)
            warnings.warn(
                f"AVSynth: skipping corrupt sample '{key}' in {sample.get('__url__', '?')}: {exn}",
                CorruptSampleWarning, stacklevel=2,
            )
            continue
        yield clip
