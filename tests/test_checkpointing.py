"""Checkpoints during fit: one per epoch (newest kept, last.ckpt linking to it), written atomically,
and a run killed with SIGKILL resumes with ``--ckpt_path last`` to the same final metrics."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.test_cli import EXPERIMENTS, run_cli

RUN = [
    "-c", str(EXPERIMENTS / "ilora.yaml"),
    "--trainer.max_epochs=3",
    "--trainer.limit_val_batches=1",
    "--trainer.enable_progress_bar=false",
    "--model.max_generation_samples=2",
    "--model.max_new_tokens=8",
    "--model.bootstrap_resamples=0",
    "--data.clips_per_batch=2",
    "--trainer.logger.init_args.save_dir=runs",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("avsynth")
    run_cli("data", "synth", "--out", str(root), "--clips", "8", "--val_clips", "4", "--test_clips", "4",
            "--seed", "3", cwd=root)
    return root


def test_lightning_checkpoint_write_is_atomic_on_a_full_disk(tmp_path, monkeypatch):
    """A write that fails half-way (ENOSPC) leaves the previous checkpoint intact and no partial file."""
    import fsspec.implementations.local as local
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    path = tmp_path / "last.ckpt"
    io = TorchCheckpointIO()
    io.save_checkpoint({"step": torch.tensor(1)}, path)
    real_write = local.LocalFileOpener.write

    def full_disk(self, data):
        real_write(self, data[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(local.LocalFileOpener, "write", full_disk)
    with pytest.raises(OSError, match="No space left"):
        io.save_checkpoint({"step": torch.tensor(2), "big": torch.zeros(10_000)}, path)
    assert os.listdir(tmp_path) == ["last.ckpt"]
    assert torch.load(path, weights_only=True)["step"] == 1


def test_a_killed_run_keeps_its_last_epoch_and_resumes_to_the_same_metrics(shards, tmp_path):
    cache = tmp_path / "cache"
    full = tmp_path / "full"
    full.mkdir()
    run_cli("fit", *RUN, f"--data.root={shards}", cwd=full, env_extra={"AVMT_CACHE": str(cache)})
    want = json.loads((full / "runs" / "ilora" / "version_0" / "val_metrics.json").read_text())
    checkpoints = full / "runs" / "ilora" / "version_0" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=2-step=12.ckpt", "last.ckpt"]
    assert (checkpoints / "last.ckpt").resolve() == checkpoints / "epoch=2-step=12.ckpt"

    killed = tmp_path / "killed"
    killed.mkdir()
    env = {**os.environ, "AVMT_CACHE": str(cache), "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, "-m", "avmt", "fit", *RUN, f"--data.root={shards}"], cwd=killed,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = killed / "runs" / "ilora" / "version_0"
    deadline = time.monotonic() + 300
    while not (run_dir / "checkpoints" / "epoch=0-step=4.ckpt").exists():
        assert process.poll() is None and time.monotonic() < deadline, "no epoch checkpoint before the run ended"
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (run_dir / "val_metrics.json").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    assert torch.load(last, map_location="cpu", weights_only=False)["global_step"] == 4

    run_cli("fit", "-c", str(run_dir / "config.yaml"), f"--ckpt_path={last}", cwd=killed,
            env_extra={"AVMT_CACHE": str(cache)})
    got = json.loads((killed / "runs" / "ilora" / "version_1" / "val_metrics.json").read_text())
    for task in want:
        assert got[task]["scores"] == want[task]["scores"], task
