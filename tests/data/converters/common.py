"""What every converter test does: convert a fixture tree, read the shards back, fit a few steps."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import torch

from avmt.cli import main
from avmt.data.shards import iter_clips

REPO = Path(__file__).resolve().parents[3]
BASE = str(REPO / "experiments" / "base.yaml")

#: A tiny, fast media layout for fixtures: 4 segments of 0.5 s, 32 px frames, 16 kHz audio.
MEDIA_ARGS = ["--num_segments", "4", "--segment_seconds", "0.5", "--image_size", "32", "--sample_rate", "16000"]


def convert(fmt: str, src: Path, out: Path, *extra: str) -> dict:
    """Run ``python -m avmt data convert FMT`` in-process; the manifest it wrote."""
    main(["data", "convert", fmt, "--src", str(src), "--out", str(out), *MEDIA_ARGS, *extra])
    return json.loads((out / "manifest.json").read_text())


def read_split(out: Path, split: str) -> list:
    """Every clip of a converted split."""
    return list(iter_clips(out / split))


def fit_steps(out: Path, tasks: list[str], work: Path, splits: dict[str, str] | None = None, steps: int = 3,
              num_segments: int = 4, configs: Sequence[str] = ()) -> dict:
    """A fit of ``steps`` steps of the tiny default model on the converted shards; its last checkpoint.

    ``configs``: further experiment YAMLs (names under ``experiments/``, e.g. ``"spatial.yaml"`` for
    the mask head the spatial tasks need), read after ``base.yaml``; the arguments here override them.
    """
    splits_arg = [f"--data.splits={json.dumps(splits)}"] if splits else []
    config_args = [arg for name in configs for arg in ("-c", str(REPO / "experiments" / name))]
    main([
        "fit", "-c", BASE, *config_args,
        f"--data.root={out}",
        f"--data.tasks={json.dumps(tasks)}",
        f"--model.llm.init_args.words_from={json.dumps([str(out)])}",
        f"--model.num_segments={num_segments}",
        "--model.media_pretraining=null",  # converted clips carry no AVSynth scene graph to pretrain on
        "--trainer.max_epochs=50",
        f"--trainer.max_steps={steps}",
        "--trainer.limit_val_batches=1",
        "--trainer.num_sanity_val_steps=0",
        "--trainer.enable_progress_bar=false",
        "--model.max_generation_samples=2",
        "--model.max_new_tokens=8",
        "--data.clips_per_batch=2",
        f"--trainer.default_root_dir={work}",
        f"--trainer.logger.init_args.save_dir={work / 'runs'}",
        *splits_arg,
    ])
    checkpoints = sorted(work.rglob("*.ckpt"))
    assert checkpoints, f"the fit wrote no checkpoint under {work}"
    return torch.load(checkpoints[-1], map_location="cpu", weights_only=False)
