"""``python -m avmt data convert FORMAT --src DIR --out DIR [options]`` (registered in ``avmt.cli.DATA_COMMANDS``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from jsonargparse import ArgumentParser

from avmt.data.converters.base import FRAMES_FORMATS
from avmt.data.media import MediaConfig

_MEDIA_HELP = {
    "num_segments": "T, segments per clip",
    "segment_seconds": "seconds per segment",
    "frames_per_segment": "F, frames per segment",
    "frame_sampling": "center | uniform",
    "image_size": "side of the square frames",
    "resize": "crop | pad",
    "sample_rate": "audio rate in Hz",
    "audio_window_seconds": "audio window per segment (Crab: 1 s; MUSIC-AVQA: 2 s)",
    "missing_audio": "a video without audio: skip | silence",
}


def convert_parser() -> ArgumentParser:
    """Arguments of ``data convert``; every media option defaults to the format's own choice."""
    from avmt.data.converters import list_converters

    parser = ArgumentParser(description="Convert a dataset in its own layout into avmt shards (WebDataset).")
    parser.add_argument("format", type=str, help=f"dataset format: {', '.join(list_converters())}")
    parser.add_argument("--src", type=str, required=True, help="the dataset's root folder")
    parser.add_argument("--out", type=str, required=True, help="output folder (resumed when a run was interrupted)")
    parser.add_argument("--clips_per_shard", type=int, default=64, help="clips per tar")
    parser.add_argument("--workers", type=int, default=0, help="decoding processes (0: this process)")
    parser.add_argument("--frames_format", type=str, default="jpg", help=" | ".join(FRAMES_FORMATS))
    parser.add_argument("--limit", type=int | None, default=None, help="only the first N clips of each split")
    for item in dataclasses.fields(MediaConfig):
        kind = item.type if isinstance(item.type, type) else None
        value_type = {"int": int, "float": float, "str": str}.get(str(item.type).split(" ")[0], kind) or str
        parser.add_argument(f"--{item.name}", type=value_type | None, default=None,
                            help=f"{_MEDIA_HELP.get(item.name, item.name)} (default: the format's)")
    return parser


def convert_run(args: Any) -> None:
    """Run the conversion and print the manifest's counts."""
    from avmt.data.converters import convert, get_converter

    converter = get_converter(args.format)
    overrides = {f.name: args[f.name] for f in dataclasses.fields(MediaConfig) if args[f.name] is not None}
    media = MediaConfig(**{**converter.media_defaults, **overrides})
    manifest = convert(converter, Path(args.src), Path(args.out), media, clips_per_shard=args.clips_per_shard,
                       workers=args.workers, frames_format=args.frames_format, limit=args.limit)
    for split, info in manifest["splits"].items():
        print(f"{split}: {info['clips']} clips in {len(info['shards'])} shard(s), {info['skipped']} skipped")
    for skip in manifest["skipped"][:20]:
        print(f"skipped {skip['key']}: {skip['file']}: {skip['reason']}")
    if len(manifest["skipped"]) > 20:
        print(f"... and {len(manifest['skipped']) - 20} more (manifest.json lists them all)")
    print(f"tasks: {manifest['tasks']}; manifest: {Path(args.out) / 'manifest.json'}")
