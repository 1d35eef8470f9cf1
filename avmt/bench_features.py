"""``python -m avmt bench features``: a training epoch with frozen encoders, from raw media vs from the feature cache.

    python -m avmt bench features -c CONFIG [-c ...] [--steps 20] [--warmup_steps 1] [--cache DIR]
                                  [--threads 1] [--clock cpu|wall] [--json PATH]

In one process: the experiment of the configs is built (its encoders must be frozen) and the
feature cache of its train and val splits (a fit sets both up) is written, into ``--cache`` or a
temporary folder removed afterwards (``cache_build_s``, wall clock). Then one training epoch of
``--steps`` steps over the same training shards is timed twice with the same model: reading the
raw media (the encoders run) and reading the cache (``data.features``: they do not). An epoch is
timed from ``on_train_epoch_start`` to ``on_train_epoch_end`` (data loading and decoding,
forward, backward, optimizer steps), after an untimed warm-up fit of ``--warmup_steps`` steps in
each mode. There is no validation, logging or checkpointing; the trainer's accelerator,
precision and gradient clipping come from the config. Forward hooks count the encoder calls of
each epoch (the cached epoch must have none).

Measurement: as ``bench adapters``, one intra-op thread and the process's CPU-time clock by
default, so that other processes on a shared machine do not count (wall-clock times are in the
JSON too). Prints both epoch times and their ratio, checked against ``TARGET_RATIO`` (the cache
makes the epoch at least 3x faster).

``experiments/features_bench.yaml`` is the benchmark's experiment: the I-LoRA experiment with
frozen encoders of a realistic small size (DeiT-Ti-sized ViT at 224 px, a 12-layer wav2vec2).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from avmt.errors import UserError

__all__ = ["TARGET_RATIO", "add_parser", "run"]

#: The cache must make a training epoch with frozen encoders at least this many times faster.
TARGET_RATIO = 3.0


def add_parser(subparsers: Any) -> None:
    """Add the ``features`` benchmark to ``python -m avmt bench``'s subparsers."""
    p = subparsers.add_parser(
        "features",
        help="a training epoch with frozen encoders: raw media vs the feature cache",
        description="Time one training epoch (a fixed number of steps over the same training shards) with "
        "frozen encoders reading raw media, then reading the feature cache, in one run.",
    )
    p.add_argument("-c", "--config", action="append", required=True,
                   help="experiment YAML(s), merged in order (e.g. experiments/features_bench.yaml)")
    p.add_argument("--steps", type=int, default=20, help="training steps of the timed epoch (default 20)")
    p.add_argument("--warmup_steps", type=int, default=1, help="untimed steps per mode before timing (default 1)")
    p.add_argument("--cache", type=Path, default=None,
                   help="feature cache folder (kept; default: a temporary folder, removed afterwards)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default 1, as bench adapters; 0 = leave torch's default)")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                   help="cpu: CPU time of the process (default: time other processes hold the cores does not "
                   "count); wall: elapsed time. Both are in the JSON")
    p.add_argument("--json", type=Path, default=None, help="write the result as JSON to this path")


def _epoch_timer() -> Any:
    """A Lightning callback recording the training epoch (``on_train_epoch_start`` to
    ``on_train_epoch_end``): ``seconds`` ``{"cpu": process CPU time, "wall": elapsed}`` and ``steps``."""
    import lightning as L

    def now() -> dict[str, float]:
        return {"cpu": time.process_time(), "wall": time.perf_counter()}

    class EpochTimer(L.Callback):
        def __init__(self) -> None:
            self.seconds: dict[str, float] | None = None
            self.steps = 0
            self._start = now()

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self._start = now()

        def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                               batch_idx: int) -> None:
            self.steps += 1

        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            end = now()
            self.seconds = {clock: end[clock] - self._start[clock] for clock in end}

    return EpochTimer()


def _fit(module: Any, datamodule: Any, steps: int, config: Any) -> Any:
    """Fit ``module`` (AVModule) on ``datamodule`` for one epoch of at most ``steps`` steps, with the
    trainer settings of ``config`` that change a step's cost; returns the epoch timer."""
    import lightning as L

    timer = _epoch_timer()
    trainer = L.Trainer(
        accelerator=config.trainer.accelerator, devices=1, precision=config.trainer.precision,
        gradient_clip_val=config.trainer.gradient_clip_val, max_epochs=1, limit_train_batches=steps,
        limit_val_batches=0, num_sanity_val_steps=0, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[timer],
    )
    trainer.fit(module, datamodule=datamodule)
    return timer


def run(args: argparse.Namespace, argv: list[str]) -> dict:
    """Run the benchmark with its parsed ``args`` (``argv``: the command line, recorded); returns the result."""
    if args.steps < 1 or args.warmup_steps < 0 or args.threads < 0:
        raise UserError(f"--steps must be >= 1, --warmup_steps and --threads >= 0, got {args.steps}, "
                         f"{args.warmup_steps} and {args.threads}")
    threads_before = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, argv)
    finally:
        torch.set_num_threads(threads_before)


def _run(args: argparse.Namespace, argv: list[str]) -> dict:
    """The benchmark (``run`` without the thread setting)."""
    from avmt.data.datamodule import AVDataModule
    from avmt.data.features import datamodule_shards, parse_experiment, write_features

    started = time.perf_counter()
    cli = parse_experiment(args.config)
    module, config = cli.model, cli.config
    data_args = {**config.data.as_dict(), "features": None}
    raw_data = AVDataModule(**data_args)
    encoders = {"vision": module.model.vision_encoder, "audio": module.model.audio_encoder}
    calls = {"untimed": 0, "raw": 0, "cached": 0}  # encoder forward calls while building, warming up, timing
    counting = ["untimed"]

    def count(*_: Any) -> None:
        calls[counting[0]] += 1

    hooks = [encoder.register_forward_hook(count) for encoder in encoders.values()]
    temporary = tempfile.TemporaryDirectory(prefix="avmt-features-bench-") if args.cache is None else None
    cache = Path(temporary.name) if temporary is not None else args.cache
    try:
        shards = datamodule_shards(raw_data, ["train", "val"])  # a fit sets both splits up
        print(f"bench features: writing the feature cache of the train and val shards to {cache}", flush=True)
        built = time.perf_counter()
        manifest = write_features(module.model, shards, cache, batch_size=raw_data.clips_per_batch, device="cpu",
                                  progress=False, command="python -m avmt bench " + " ".join(argv))
        cache_build_s = time.perf_counter() - built
        cached_data = AVDataModule(**{**data_args, "features": str(cache)})
        if args.warmup_steps:
            for data in (raw_data, cached_data):
                _fit(module, data, args.warmup_steps, config)
        timers = {}
        for mode, data in (("raw", raw_data), ("cached", cached_data)):
            counting[0] = mode
            print(f"bench features: timing a {args.steps}-step epoch from {mode} "
                  f"{'media' if mode == 'raw' else 'features'}", flush=True)
            timers[mode] = _fit(module, data, args.steps, config)
        cache_bytes = sum(p.stat().st_size for p in cache.rglob("*.tar"))
    finally:
        for hook in hooks:
            hook.remove()
        if temporary is not None:
            temporary.cleanup()
    clock = args.clock
    raw_s, cached_s = timers["raw"].seconds[clock], timers["cached"].seconds[clock]
    ratio = raw_s / cached_s if cached_s > 0 else None
    result = {
        "benchmark": "features",
        "command": "python -m avmt bench " + " ".join(argv),
        "configs": list(args.config),
        "clock": clock,
        "steps": {mode: timer.steps for mode, timer in timers.items()},
        "clips_per_batch": raw_data.clips_per_batch,
        "raw_epoch_s": raw_s,
        "cached_epoch_s": cached_s,
        "raw_step_s": raw_s / max(timers["raw"].steps, 1),
        "cached_step_s": cached_s / max(timers["cached"].steps, 1),
        "ratio": ratio,
        "target_ratio": TARGET_RATIO,
        "passed": ratio is not None and ratio >= TARGET_RATIO and calls["cached"] == 0,
        "epoch_seconds": {mode: timer.seconds for mode, timer in timers.items()},  # both clocks
        "encoder_calls": {"raw": calls["raw"], "cached": calls["cached"]},
        "cache_build_s": cache_build_s,
        "cache_clips": manifest["splits"]["train"]["clips"],
        "cache_bytes": cache_bytes,
        "fingerprint": manifest["fingerprint"],
        "threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "elapsed_s": time.perf_counter() - started,
    }
    wall = {mode: timer.seconds["wall"] for mode, timer in timers.items()}
    print(f"raw media:       epoch {raw_s:7.2f} s {clock} ({result['raw_step_s']:.3f} s/step, {timers['raw'].steps} "
          f"steps; {wall['raw']:.2f} s wall), encoder calls {calls['raw']}")
    print(f"cached features: epoch {cached_s:7.2f} s {clock} ({result['cached_step_s']:.3f} s/step, "
          f"{timers['cached'].steps} steps; {wall['cached']:.2f} s wall), encoder calls {calls['cached']}")
    verdict = "PASS" if result["passed"] else "FAIL"
    shown = f"{ratio:.2f}x" if ratio is not None else "n/a"
    print(f"ratio raw / cached: {shown} (target >= {TARGET_RATIO:g}x): {verdict}")
    print(f"cache: {result['cache_clips']} training clips, {cache_bytes / 2**20:.1f} MiB (train + val), built in "
          f"{cache_build_s:.1f} s wall; {result['threads']} thread(s); elapsed {result['elapsed_s']:.0f} s")
    if args.json is not None:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
        print(f"wrote {args.json}")
    return result
