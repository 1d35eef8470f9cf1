"""Frozen-feature cache: the outputs of the frozen encoders for every clip, computed once.

``python -m avmt data features -c CONFIG [-c ...] --out DIR [--splits train val]`` builds the
model of an experiment config (the encoders only run), reads the clip shards of each split of
its data module and writes the vision and audio encoder outputs of every clip to ``DIR``; a fit
with ``data.features: DIR`` then reads them instead of running the encoders.

Layout of ``DIR``::

    manifest.json                 format and version, the encoder fingerprint, the media sizes,
                                  storage dtypes and, per split, its feature shards with the clip
                                  shard each was made from (path, size, SHA-256), clip and corrupt
                                  counts; ``"complete": false`` while the cache is being written
    train/train-000000.tar, ...   one feature shard per clip shard of the split (its clips, in order)
    val/val-000000.tar, ...

A feature shard is a WebDataset tar (readable with ``tar`` and stock ``webdataset``) with one
member per clip, ``{key}.features.safetensors``: safetensors bytes (never a pickle) holding
``vision [T, P, D_v]`` and ``audio [T, Q, D_a]`` (in the encoders' output dtype unless
``--dtype`` says otherwise) and, as metadata, ``media_sha256``: the SHA-256 of what the encoders
saw of the clip (:func:`media_sha256`).  Each shard is written to a temporary name and renamed
when complete, the manifest is rewritten (atomically) after every shard, and a rerun with the
same encoders skips the shards whose clip shard is unchanged, so an interrupted run resumes.

**Fingerprint** (:func:`encoder_fingerprint`): ``num_segments`` and, per encoder, its class path,
``model`` (hub id / path, ``None`` for a tiny random one), whether it is pretrained, its inputs
(vision: ``image_size``, ``patch_size``, ``num_patches``, ``select_layer``, ``image_mean`` /
``image_std``; audio: ``sample_rate``, ``tokens_per_segment``, ``normalize``), its ``dtype``,
``output_dim`` and ``weights_sha256`` (the SHA-256 of its state dict: random tiny weights differ
per seed).  The media sizes (frame size, frames per segment, audio samples and window) are
recorded under ``inputs``.

**Refusals.** Encoders that are not frozen (``model.vision_encoder.init_args.freeze: false``, or
an adapter injected into an encoder) cannot be cached (:func:`check_frozen`).  When training on
a cache, the module compares the cache's fingerprint with its own encoders' at the first batch
and refuses another encoder's cache, naming every field that differs
(:func:`check_cache_matches`).  A clip missing from the cache, or whose media differ from the
media the cache was made from (``media_sha256``), is an error naming the clip and the cache
(:meth:`FeatureReader.attach`), never skipped: a silently partial cache would change the data.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tarfile
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from avmt.data.sample import Clip, ClipFeatures, segment_frames
from avmt.data.shards import CorruptSampleCounter, iter_clips, write_tar
from avmt.errors import UserError

if TYPE_CHECKING:  # imported lazily (the model pulls in transformers)
    from jsonargparse import ArgumentParser

    from avmt.data.datamodule import AVDataModule
    from avmt.model import AVModel

__all__ = [
    "FEATURES_FORMAT",
    "FEATURES_FORMAT_VERSION",
    "FEATURES_MEMBER",
    "STORAGE_DTYPES",
    "check_frozen",
    "encoder_fingerprint",
    "weights_sha256",
    "fingerprint_differences",
    "check_cache_matches",
    "media_sha256",
    "encode_features",
    "decode_features",
    "read_feature_manifest",
    "FeatureReader",
    "write_features",
    "parse_experiment",
    "datamodule_shards",
    "features_parser",
    "features_run",
]

FEATURES_FORMAT = "avmt-features"
#: Version of the cache layout (members, encodings, manifest).
FEATURES_FORMAT_VERSION = 1
#: Member suffix of a clip's features in a feature shard.
FEATURES_MEMBER = "features.safetensors"
#: ``--dtype`` choices: the dtype the features are stored in (default: each encoder's output dtype).
STORAGE_DTYPES: tuple[str, ...] = ("float32", "float16", "bfloat16")
MANIFEST = "manifest.json"
#: How a user (re)builds a cache; ``{root}`` is the cache folder.
FEATURES_COMMAND = "python -m avmt data features -c <the experiment's config> --out {root}"
_STAGE_OF_SPLIT = {"train": "fit", "val": "validate", "test": "test"}
_ENCODERS = ("vision", "audio")


# --------------------------------------------------------------------------------------------
# Fingerprint
# --------------------------------------------------------------------------------------------


def check_frozen(model: AVModel) -> None:
    """Raise ``ValueError`` when an encoder of ``model`` has trainable weights.

    The message names the config key: ``model.{vision,audio}_encoder.init_args.freeze`` for a
    trainable encoder, ``model.adapter.init_args.scopes`` for an adapter injected into a frozen one.
    """
    for scope in _ENCODERS:
        encoder = getattr(model, f"{scope}_encoder")
        trainable = [name for name, p in encoder.named_parameters() if p.requires_grad]
        if not trainable:
            continue
        key = f"model.{scope}_encoder.init_args.freeze"
        if not getattr(encoder, "frozen", False):
            raise UserError(
                f"the {scope} encoder is trainable ({key}: false), so its features cannot be cached: a cache "
                f"would stand for weights that change during training. Set {key}: true to train on cached "
                "features (or data.features: null to encode the media)"
            )
        raise UserError(
            f"the adapter injects trainable weights into the frozen {scope} encoder ({trainable[0]}, ...): its "
            f"outputs change during training, so they cannot be cached. Remove {scope!r} from "
            "model.adapter.init_args.scopes (or set data.features: null to encode the media)"
        )


def weights_sha256(module: nn.Module) -> str:
    """SHA-256 (hex) of ``module``'s state dict: every entry's name, dtype, shape and bytes, by name."""
    digest = hashlib.sha256()
    for name, value in sorted(module.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{name}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _encoder_fingerprint(encoder: nn.Module, fields: Sequence[str]) -> dict[str, Any]:
    """Class path, checkpoint, ``fields`` (the attributes that shape its inputs and outputs), dtype,
    output width and weights hash of one encoder."""
    cls = type(encoder)
    out: dict[str, Any] = {
        "class_path": f"{cls.__module__}.{cls.__qualname__}",
        "model": getattr(encoder, "model_name", None),
        "pretrained": bool(getattr(encoder, "pretrained", False)),
    }
    for name in fields:
        value = getattr(encoder, name, None)
        out[name] = value.flatten().tolist() if isinstance(value, Tensor) else value
    out["dtype"] = _dtype_name(encoder.dtype)
    out["output_dim"] = int(encoder.output_dim)
    out["weights_sha256"] = weights_sha256(encoder)
    return out


def encoder_fingerprint(model: AVModel) -> dict[str, Any]:
    """What determines the encoder features of ``model`` (JSON-able).

    Returns:
        ``{"num_segments": T, "vision_encoder": {...}, "audio_encoder": {...}}``; each encoder's
        entry holds ``class_path``, ``model``, ``pretrained``, its input fields (vision:
        ``image_size``, ``patch_size``, ``num_patches``, ``select_layer``, ``image_mean``,
        ``image_std``; audio: ``sample_rate``, ``tokens_per_segment``, ``normalize``), ``dtype``,
        ``output_dim`` and ``weights_sha256``.

    Raises:
        ValueError: an encoder is not frozen (:func:`check_frozen`).
    """
    check_frozen(model)
    fingerprint = {
        "num_segments": int(model.num_segments),
        "vision_encoder": _encoder_fingerprint(
            model.vision_encoder,
            ("image_size", "patch_size", "num_patches", "select_layer", "pixel_mean", "pixel_std"),
        ),
        "audio_encoder": _encoder_fingerprint(
            model.audio_encoder, ("sample_rate", "tokens_per_segment", "normalize")
        ),
    }
    for old, new in (("pixel_mean", "image_mean"), ("pixel_std", "image_std")):
        fingerprint["vision_encoder"][new] = fingerprint["vision_encoder"].pop(old)
    return json.loads(json.dumps(fingerprint))  # the form it has in the manifest (lists, plain types)


_MISSING = object()


def _show(value: Any) -> str:
    if value is _MISSING:
        return "nothing"
    if isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value):
        return value[:12] + "…"  # a hash
    return repr(value)


def fingerprint_differences(cached: dict, current: dict, prefix: str = "") -> list[str]:
    """Every field where two fingerprints differ, as ``"vision_encoder.select_layer: cache made
    with -2, model uses -1"`` (nested fields joined by dots, in ``current``'s order)."""
    out: list[str] = []
    for key in [*current, *(k for k in cached if k not in current)]:
        a, b = cached.get(key, _MISSING), current.get(key, _MISSING)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += fingerprint_differences(a, b, f"{name}.")
        elif a != b:
            out.append(f"{name}: cache made with {_show(a)}, model uses {_show(b)}")
    return out


def check_cache_matches(root: str | os.PathLike, model: AVModel) -> dict:
    """Refuse the feature cache ``root`` unless it was made by ``model``'s encoders.

    Returns:
        The cache's manifest.

    Raises:
        FileNotFoundError / ValueError: no complete cache in ``root`` (:func:`read_feature_manifest`).
        ValueError: an encoder of ``model`` is not frozen, or the cache's fingerprint differs from
            the model's; the message lists every differing field (e.g. ``vision_encoder.select_layer:
            cache made with -2, model uses -1``).
    """
    manifest = read_feature_manifest(root)
    differences = fingerprint_differences(manifest["fingerprint"], encoder_fingerprint(model))
    if differences:
        raise UserError(
            f"the feature cache '{root}' (data.features) was made by other encoders than this model's: "
            f"{'; '.join(differences)}. Rebuild it for this config with: {FEATURES_COMMAND.format(root=root)} "
            "(or set data.features: null to encode the media)"
        )
    return manifest


# --------------------------------------------------------------------------------------------
# One clip's features
# --------------------------------------------------------------------------------------------


def media_sha256(frames: Tensor, audio: Tensor, num_segments: int) -> str:
    """SHA-256 (hex) of what the encoders see of one clip: its segment frames (the middle frame of
    each of the ``num_segments`` segments of ``frames [T·F, 3, H, W]``) and its waveform
    ``audio [S]``, with their dtypes and shapes."""
    digest = hashlib.sha256()
    for tensor in (frames[segment_frames(frames.shape[0], num_segments)], audio):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tensor.dtype}:{tuple(tensor.shape)};".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def encode_features(vision: Tensor, audio: Tensor, media_digest: str) -> bytes:
    """One clip's feature member: safetensors bytes of ``vision [T, P, D_v]`` and ``audio [T, Q, D_a]``
    with ``media_sha256`` (:func:`media_sha256`) as metadata."""
    from safetensors.torch import save

    tensors = {"vision": vision.detach().cpu().contiguous(), "audio": audio.detach().cpu().contiguous()}
    return save(tensors, metadata={"media_sha256": media_digest})


def decode_features(data: bytes, where: str) -> tuple[Tensor, Tensor, dict[str, str]]:
    """``(vision [T, P, D_v], audio [T, Q, D_a], metadata)`` from a feature member (nothing is unpickled).

    Raises:
        ValueError: the bytes are not such a member; the message starts with ``where``.
    """
    from safetensors.torch import load

    try:
        tensors = load(data)
        (length,) = struct.unpack("<Q", data[:8])
        metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    except Exception as exn:  # noqa: BLE001 - safetensors raises several types on bad bytes
        raise UserError(f"{where}: unreadable cached features ({exn})") from None
    if set(tensors) != {"vision", "audio"} or any(t.dim() != 3 for t in tensors.values()):
        shapes = {name: tuple(t.shape) for name, t in tensors.items()}
        raise UserError(f"{where}: expected cached features vision [T, P, D] and audio [T, Q, D], found {shapes}")
    return tensors["vision"], tensors["audio"], metadata


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def _load_manifest(root: Path) -> dict | None:
    """The manifest of ``root`` when it is a feature cache's (complete or not), else ``None``."""
    try:
        manifest = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FEATURES_FORMAT else None


def read_feature_manifest(root: str | os.PathLike) -> dict:
    """The manifest of the complete feature cache ``root``.

    Raises:
        FileNotFoundError: ``root`` or its ``manifest.json`` is missing.
        ValueError: the manifest is not a feature cache's, is of another format version, or says
            the cache is incomplete (an interrupted run); the message gives the command that
            (re)builds it.
    """
    root = Path(root)
    command = FEATURES_COMMAND.format(root=root)
    path = root / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(f"feature cache '{root}' (data.features) not found: no {path}. Make it with: {command}")
    manifest = _load_manifest(root)
    if manifest is None:
        raise UserError(f"'{path}' is not the manifest of a feature cache (data.features); make one with: {command}")
    if manifest.get("format_version") != FEATURES_FORMAT_VERSION:
        raise UserError(
            f"the feature cache '{root}' is of format version {manifest.get('format_version')!r}; this avmt "
            f"reads version {FEATURES_FORMAT_VERSION}. Rebuild it with: {command}"
        )
    if not manifest.get("complete"):
        raise UserError(f"the feature cache '{root}' is incomplete (its writing was interrupted); "
                         f"rerun the command that makes it to finish it: {command}")
    return manifest


class FeatureReader:
    """Attaches the cached features of one split of a feature cache to clips, by key.

    The feature shards' tar headers are indexed on first use (key -> file, offset, size), so a
    clip's member is read with one seek whatever the order clips come in (shuffling, workers,
    the other clips of multi-clip samples).

    Args:
        root: the cache folder (``data.features``).
        split: ``"train"``, ``"val"`` or ``"test"``.

    Raises:
        FileNotFoundError / ValueError: no complete cache in ``root`` (:func:`read_feature_manifest`),
            or it lacks ``split``.
    """

    def __init__(self, root: str | os.PathLike, split: str) -> None:
        self.root = Path(root)
        self.split = split
        manifest = read_feature_manifest(self.root)
        splits = manifest.get("splits", {})
        if split not in splits:
            raise UserError(
                f"the feature cache '{self.root}' (data.features) has no {split!r} split (it has "
                f"{sorted(splits)}); add it with: {FEATURES_COMMAND.format(root=self.root)} --splits {split}"
            )
        self.shards = [self.root / entry["path"] for entry in splits[split]["shards"]]
        self.num_segments = int(manifest["fingerprint"]["num_segments"])
        self._index: dict[str, tuple[Path, int, int]] | None = None

    def _build_index(self) -> dict[str, tuple[Path, int, int]]:
        """Clip key -> (feature shard, data offset, size), from the shards' tar headers."""
        index: dict[str, tuple[Path, int, int]] = {}
        suffix = f".{FEATURES_MEMBER}"
        for path in self.shards:
            if not path.is_file():
                raise FileNotFoundError(f"feature shard '{path}' of the cache '{self.root}' is missing; rebuild "
                                        f"the cache with: {FEATURES_COMMAND.format(root=self.root)}")
            try:
                with tarfile.open(path, "r:") as tar:
                    for member in tar:
                        if member.isfile() and member.name.endswith(suffix):
                            index[member.name[: -len(suffix)]] = (path, member.offset_data, member.size)
            except tarfile.TarError as exn:
                raise UserError(f"feature shard '{path}' of the cache '{self.root}' is unreadable ({exn}); rebuild "
                                 f"the cache with: {FEATURES_COMMAND.format(root=self.root)}") from None
        return index

    def __len__(self) -> int:
        """Clips in this split of the cache."""
        if self._index is None:
            self._index = self._build_index()
        return len(self._index)

    def attach(self, clip: Clip) -> Clip:
        """``clip`` with ``features`` set: ``vision [T, P, D_v]``, ``audio [T, Q, D_a]`` from the cache.

        Raises:
            ValueError: the clip is not in the cache, its member is unreadable, or its media differ
                from the media the cache was made from (the shards changed since); the message
                names the clip and the cache.
        """
        if self._index is None:
            self._index = self._build_index()
        entry = self._index.get(clip.key)
        command = FEATURES_COMMAND.format(root=self.root)
        if entry is None:
            raise UserError(
                f"clip {clip.key!r} is not in the {self.split!r} split of the feature cache '{self.root}' "
                f"(data.features; {len(self._index)} clips, made from other shards): rebuild it for this "
                f"data with: {command} (or set data.features: null)"
            )
        path, offset, size = entry
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read(size)
        where = f"clip {clip.key!r} in the feature cache '{self.root}' ({path.name})"
        vision, audio, metadata = decode_features(data, where)
        if metadata.get("media_sha256") != media_sha256(clip.frames, clip.audio, self.num_segments):
            raise UserError(
                f"{where}: the clip's media differ from the media its features were computed from (the "
                f"shards changed since the cache was made): rebuild it with: {command} (or set data.features: null)"
            )
        clip.features = ClipFeatures(vision=vision, audio=audio, cache=str(self.root))
        return clip


# --------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_manifest(root: Path, manifest: dict) -> None:
    tmp = root / f".{MANIFEST}.tmp"
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, root / MANIFEST)


def _check_out(out: Path, shards: dict[str, list[Path]]) -> dict | None:
    """Refuse an ``--out`` folder that holds other data; return its feature manifest when it has one."""
    existing = _load_manifest(out)
    if existing is None and (out / MANIFEST).exists():
        raise UserError(f"--out '{out}' holds another manifest.json (not a feature cache's); choose another folder")
    sources = {p.resolve().parent.parent for paths in shards.values() for p in paths}
    if out.resolve() in sources:
        raise UserError(f"--out '{out}' is the folder of the clip shards; write the feature cache to another folder")
    if existing is None:
        for split in shards:
            if any((out / split).glob("*.tar")):
                raise UserError(f"--out '{out}': '{out / split}' holds .tar files that are not a feature cache's; "
                                 "choose an empty folder")
    return existing


class _ShardEncoder:
    """Encodes the clips of clip shards into feature shards (one tar each), in batches."""

    def __init__(self, model: AVModel, batch_size: int, device: torch.device, dtype: str | None) -> None:
        self.model = model
        self.batch_size = batch_size
        self.device = device
        self.dtypes = {kind: getattr(torch, dtype) if dtype else getattr(model, f"{kind}_encoder").dtype
                       for kind in _ENCODERS}
        self.inputs: dict[str, Any] | None = None

    def write(self, source: Path, target: Path, progress: Any) -> dict[str, int]:
        """Encode ``source``'s clips into ``target`` (:func:`~avmt.data.shards.write_tar`: written
        to a temporary name, then renamed); returns ``{"clips", "corrupt", "size"}``."""
        counter = CorruptSampleCounter()
        clips = write_tar(target, self._samples(iter_clips([source], counter), progress))
        return {"clips": clips, "corrupt": counter.count, "size": target.stat().st_size}

    def _samples(self, clips: Iterable[Clip], progress: Any) -> Iterator[tuple[str, dict[str, bytes]]]:
        """``(key, {FEATURES_MEMBER: safetensors bytes})`` of each clip, in order, encoded in
        batches of up to ``batch_size`` consecutive clips of one shape."""
        pending: list[Clip] = []
        for clip in clips:
            shape = (tuple(clip.frames.shape), tuple(clip.audio.shape))
            if pending and shape != (tuple(pending[0].frames.shape), tuple(pending[0].audio.shape)):
                yield from self._encode(pending, progress)
                pending = []
            pending.append(clip)
            if len(pending) >= self.batch_size:
                yield from self._encode(pending, progress)
                pending = []
        if pending:
            yield from self._encode(pending, progress)

    def _encode(self, pending: list[Clip], progress: Any) -> list[tuple[str, dict[str, bytes]]]:
        """Encode ``pending`` (clips of one shape) as one batch: their feature samples."""
        model, t = self.model, self.model.num_segments
        frames = torch.stack([clip.frames for clip in pending]).to(self.device)  # [C, T·F, 3, H, W]
        audio = torch.stack([clip.audio for clip in pending]).to(self.device)  # [C, S]
        with torch.inference_mode():
            media = model.encode_media(frames, audio)
        if self.inputs is None:
            samples = int(audio.shape[1])
            self.inputs = {"frame_size": list(frames.shape[-2:]), "frames_per_segment": int(frames.shape[1]) // t,
                           "audio_samples": samples, "audio_window": samples // t}
        vision = media.vision.to(self.dtypes["vision"]).cpu()
        encoded_audio = media.audio.to(self.dtypes["audio"]).cpu()
        encoded = [(clip.key, {FEATURES_MEMBER: encode_features(vision[i], encoded_audio[i],
                                                                media_sha256(clip.frames, clip.audio, t))})
                   for i, clip in enumerate(pending)]
        progress.update(len(pending))
        return encoded


def write_features(
    model: AVModel,
    shards: dict[str, list[Path]],
    out: str | os.PathLike,
    batch_size: int,
    device: str | torch.device = "cpu",
    dtype: str | None = None,
    progress: bool = True,
    command: str | None = None,
) -> dict:
    """Run ``model``'s frozen encoders over the clips of ``shards`` (split -> clip shards) and write
    the feature cache ``out`` (see the module docstring).

    Args:
        model: the model whose encoders run (only they are moved to ``device``, and back).
        shards: split -> the clip shards of the split (the data module's).
        out: the cache folder.  Splits of an earlier cache of the same encoders that are not in
            ``shards`` are kept; a cache of other encoders is replaced.
        batch_size: clips per encoder call.
        device: where the encoders run.
        dtype: storage dtype (``STORAGE_DTYPES``); ``None`` keeps each encoder's output dtype
            (the features equal what the encoders return).
        progress: show a progress bar.
        command: the command line, recorded in the manifest.

    Returns:
        The manifest (also written to ``{out}/manifest.json``).

    Raises:
        ValueError: an encoder is not frozen (:func:`check_frozen`), ``out`` holds other data, or a
            bad ``batch_size`` / ``dtype``.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"--batch_size must be an int >= 1, got {batch_size!r}")
    if dtype is not None and dtype not in STORAGE_DTYPES:
        raise UserError(f"--dtype must be one of {STORAGE_DTYPES} (or unset: the encoders' dtype), got {dtype!r}")
    fingerprint = encoder_fingerprint(model)
    out = Path(out)
    previous = _check_out(out, shards)
    out.mkdir(parents=True, exist_ok=True)
    encoder = _ShardEncoder(model, batch_size, torch.device(device), dtype)
    storage = {kind: _dtype_name(encoder.dtypes[kind]) for kind in _ENCODERS}
    reusable = previous is not None and previous.get("format_version") == FEATURES_FORMAT_VERSION and \
        previous.get("fingerprint") == fingerprint and previous.get("storage_dtype") == storage
    if previous is not None and not reusable:
        print(f"replacing the feature cache in '{out}' (made by other encoders or settings)")
        for entries in previous.get("splits", {}).values():
            for entry in entries.get("shards", []):
                (out / entry["path"]).unlink(missing_ok=True)
    manifest: dict[str, Any] = {
        "format": FEATURES_FORMAT,
        "format_version": FEATURES_FORMAT_VERSION,
        "complete": False,
        "command": command,
        "fingerprint": fingerprint,
        "inputs": previous.get("inputs") if reusable else None,
        "storage_dtype": storage,
        "member": FEATURES_MEMBER,
        "splits": dict(previous.get("splits", {})) if reusable else {},
    }
    _write_manifest(out, manifest)
    originals = {kind: getattr(model, f"{kind}_encoder").device for kind in _ENCODERS}
    for kind in _ENCODERS:
        getattr(model, f"{kind}_encoder").to(encoder.device)
    from tqdm.auto import tqdm

    try:
        for split, paths in shards.items():
            old = {entry["path"]: entry for entry in (previous or {}).get("splits", {}).get(split, {}).get("shards", [])
                   } if reusable else {}
            folder = out / split
            folder.mkdir(parents=True, exist_ok=True)
            entries: list[dict] = []
            with tqdm(desc=f"features {split}", unit="clip", disable=not progress) as bar:
                for index, source in enumerate(paths):
                    path = f"{split}/{split}-{index:06d}.tar"
                    record = {"source": str(Path(source).resolve()), "source_size": Path(source).stat().st_size,
                              "source_sha256": _file_sha256(Path(source))}
                    done = old.get(path)
                    if (done is not None and (out / path).is_file() and (out / path).stat().st_size == done.get("size")
                            and all(done.get(k) == record[k] for k in ("source_size", "source_sha256"))):
                        entries.append(done)  # resumed: this clip shard was encoded by these encoders already
                        bar.update(done["clips"])
                        continue
                    entries.append({"path": path, **record, **encoder.write(Path(source), out / path, bar)})
                    manifest["inputs"] = manifest["inputs"] or encoder.inputs
                    manifest["splits"][split] = _split_summary(entries)
                    _write_manifest(out, manifest)
            manifest["splits"][split] = _split_summary(entries)
            kept = {out / entry["path"] for entry in entries}
            for stale in [*folder.glob(f"{split}-*.tar"), *folder.glob(f".{split}-*.tar.tmp")]:
                if stale not in kept:
                    stale.unlink()
    finally:
        for kind in _ENCODERS:
            getattr(model, f"{kind}_encoder").to(originals[kind])
    manifest["complete"] = True
    _write_manifest(out, manifest)
    return manifest


def _split_summary(entries: list[dict]) -> dict:
    return {"clips": sum(e["clips"] for e in entries), "corrupt": sum(e["corrupt"] for e in entries),
            "shards": list(entries)}


# --------------------------------------------------------------------------------------------
# python -m avmt data features
# --------------------------------------------------------------------------------------------


def features_parser() -> ArgumentParser:
    """Arguments of ``python -m avmt data features``."""
    from jsonargparse import ArgumentParser

    parser = ArgumentParser(description="Run an experiment's frozen encoders once over its clip shards and write a "
                            "feature cache for data.features.")
    parser.add_argument("--config", "-c", type=str, action="append", required=True,
                        help="experiment YAML(s), merged in order (the model's encoders must be frozen)")
    parser.add_argument("--out", type=str, required=True, help="output folder of the feature cache")
    parser.add_argument("--splits", type=str, nargs="+", default=["train", "val"], help="splits to encode")
    parser.add_argument("--batch_size", type=int | None, default=None,
                        help="clips per encoder call (default: data.eval_clips_per_batch, else data.clips_per_batch)")
    parser.add_argument("--device", type=str, default="auto",
                        help="where the encoders run: auto (cuda when present), cpu, cuda, ...")
    parser.add_argument("--dtype", type=str | None, default=None, choices=[None, *STORAGE_DTYPES],
                        help="storage dtype (default: the encoders' output dtype, so the features are exact)")
    parser.add_argument("--progress", type=bool, default=True, help="show progress bars")
    return parser


def parse_experiment(configs: Sequence[str], overrides: Sequence[str] = ()) -> Any:
    """The ``LightningCLI`` (``run=False``) of experiment YAMLs ``configs`` (merged in order, bases
    expanded) and ``--key=value`` ``overrides``, parsed and seeded as ``fit`` does: its ``model``
    (AVModule), ``datamodule`` (AVDataModule) and ``config``."""
    import warnings

    from lightning.pytorch.cli import LightningCLI

    from avmt.cli import check_plugins, expand_config_bases
    from avmt.data.datamodule import AVDataModule
    from avmt.module import AVModule

    argv = expand_config_bases([*(item for path in configs for item in ("-c", path)), *overrides])
    check_plugins(argv)
    with warnings.catch_warnings():  # "args and sys.argv both given": sys.argv holds this command's own arguments
        warnings.filterwarnings("ignore", message=".*args parameter is intended to run from within Python.*")
        return LightningCLI(AVModule, AVDataModule, run=False, save_config_callback=None, args=argv)


def datamodule_shards(datamodule: AVDataModule, splits: Sequence[str]) -> dict[str, list[Path]]:
    """Split -> the clip shards the data module reads for it (generating AVSynth data when needed)."""
    unknown = [split for split in splits if split not in _STAGE_OF_SPLIT]
    if unknown or not splits:
        raise UserError(f"--splits: unknown split(s) {unknown or splits}; choose from {list(_STAGE_OF_SPLIT)}")
    datamodule.features = None  # read the media, not an (older) cache
    datamodule.prepare_data()
    shards: dict[str, list[Path]] = {}
    for split in dict.fromkeys(splits):
        datamodule.setup(_STAGE_OF_SPLIT[split])
        shards[split] = [Path(p) for p in datamodule.shards[split]]
    return shards


def features_run(args: Any) -> None:
    """Run ``python -m avmt data features`` with its parsed arguments."""
    cli = parse_experiment(args.config)
    module, datamodule = cli.model, cli.datamodule
    shards = datamodule_shards(datamodule, args.splits)
    batch_size = args.batch_size or datamodule.eval_clips_per_batch or datamodule.clips_per_batch
    device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    if module.media_pretraining is not None:  # the features of the encoders as fit will use them (stage 1 cached)
        datamodule.setup("fit")
        module.pretrain_media(datamodule, device)
    command = " ".join(["python -m avmt data features", *(f"-c {c}" for c in args.config), f"--out {args.out}",
                        "--splits", *args.splits, *([f"--dtype {args.dtype}"] if args.dtype else [])])
    manifest = write_features(module.model, shards, args.out, batch_size=batch_size, device=device,
                              dtype=args.dtype, progress=args.progress, command=command)
    for split in shards:
        entry = manifest["splits"][split]
        size = sum(shard["size"] for shard in entry["shards"])
        print(f"{split}: {entry['clips']} clips ({entry['corrupt']} corrupt skipped) in {len(entry['shards'])} "
              f"shard(s), {size / 2**20:.1f} MiB under {Path(args.out) / split}")
    print(f"train on the cache with --data.features {args.out}")
