"""Checkpoints during fit: one per epoch and one every N steps (newest of each kept, last.ckpt linking
to the newest), written atomically, and a run killed with SIGKILL in the middle of an epoch resumes
with ``--ckpt_path last`` at that batch, to the same final metrics and weights."""

from __future__ import annotations

import errno
import json
import os
import random
import signal
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.callbacks import Callback

from tests.test_cli import EXPERIMENTS, REPO, run_cli

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


class KillAt(Callback):
    """Test-only: SIGKILLs its own process when training step ``step`` ends, before that step's
    checkpoint (Lightning runs checkpoint callbacks last): the run dies with the work of step
    ``step`` lost and its newest checkpoint at step ``step - 1``. Inactive in a resumed run."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, *args) -> None:
        if trainer.global_step == self.step and trainer.ckpt_path is None:
            os.kill(os.getpid(), signal.SIGKILL)


def _every_step(path: Path, kill_at: int | None = None) -> Path:
    """A config layer: base.yaml's callbacks with a step checkpoint after every step (and KillAt)."""
    callbacks = yaml.safe_load((EXPERIMENTS / "base.yaml").read_text())["trainer"]["callbacks"]
    stepped = [c for c in callbacks if "every_n_train_steps" in c.get("init_args", {})]
    assert len(stepped) == 1, "base.yaml should have one ModelCheckpoint with every_n_train_steps"
    stepped[0]["init_args"]["every_n_train_steps"] = 1
    if kill_at is not None:
        callbacks.append({"class_path": "tests.test_checkpointing.KillAt", "init_args": {"step": kill_at}})
    path.write_text(yaml.safe_dump({"trainer": {"callbacks": callbacks}}))
    return path


def test_a_run_killed_mid_epoch_resumes_at_that_batch_to_the_same_metrics_and_weights(shards, tmp_path):
    # one stage-1 cache; the runs import KillAt from this module; a fixed hash seed, since a run's
    # floating-point sums depend on Python's per-process string hashing (~1e-9 apart otherwise)
    # one thread and a fixed hash seed: the same float reductions in every process
    env = {"AVMT_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO), "PYTHONHASHSEED": "0", "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    full.mkdir()
    every_step = ["-c", str(_every_step(tmp_path / "every_step.yaml"))]
    run_cli("fit", *RUN, f"--data.root={shards}", *every_step, cwd=full, env_extra=env)
    want = json.loads((full / "runs" / "ilora" / "version_0" / "val_metrics.json").read_text())
    checkpoints = full / "runs" / "ilora" / "version_0" / "checkpoints"
    # the newest of each kind; at the last step both came, the epoch one (after validation) last
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "epoch=2-step=12.ckpt", "last.ckpt", "steps-epoch=2-step=12.ckpt"]
    assert (checkpoints / "last.ckpt").resolve() == checkpoints / "epoch=2-step=12.ckpt"

    # a step strictly inside epoch 1 or 2 whose previous step (the newest checkpoint) is not an epoch's last
    kill = random.Random(2026).choice([6, 7, 8, 10, 11, 12])
    print(f"killing the run at the end of step {kill}; it resumes from the checkpoint of step {kill - 1}")
    killed = tmp_path / "killed"
    killed.mkdir()
    layer = _every_step(tmp_path / "kill.yaml", kill_at=kill)
    result = run_cli("fit", *RUN, f"--data.root={shards}", "-c", str(layer), cwd=killed, env_extra=env, check=False)
    assert result.returncode == -signal.SIGKILL, result.stderr[-3000:]
    run_dir = killed / "runs" / "ilora" / "version_0"
    assert not (run_dir / "val_metrics.json").exists()
    last = run_dir / "checkpoints" / "last.ckpt"
    epoch, batch = divmod(kill - 1, 4)
    assert last.resolve().name == f"steps-epoch={epoch}-step={kill - 1}.ckpt"
    saved = torch.load(last, map_location="cpu", weights_only=True)
    assert saved["global_step"] == kill - 1
    loader = saved["AVDataModule"]["train_loader"]  # the training stream's place in its epoch
    assert (loader["epoch"], loader["batches"]) == (epoch, batch)

    run_cli("fit", "-c", str(run_dir / "config.yaml"), f"--ckpt_path={last}", cwd=killed, env_extra=env)
    resumed = killed / "runs" / "ilora" / "version_1"
    got = json.loads((resumed / "val_metrics.json").read_text())
    print("uninterrupted:", {task: want[task]["scores"] for task in want})
    print("resumed:      ", {task: got[task]["scores"] for task in got})
    assert set(got) == set(want)
    for task in want:
        assert got[task]["scores"] == want[task]["scores"], task
    final = torch.load(checkpoints / "epoch=2-step=12.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    again = torch.load(resumed / "checkpoints" / "epoch=2-step=12.ckpt", map_location="cpu", weights_only=True)
    assert again["state_dict"].keys() == final.keys()
    # equal to float rounding (a batch skipped or repeated on resume moves weights by ~lr = 1e-3)
    differ = {k: (again["state_dict"][k].float() - final[k].float()).abs().max().item() for k in final}
    assert max(differ.values()) < 1e-4, f"the resumed run's weights differ: {sorted(differ.items(), key=lambda kv: -kv[1])[:5]}"
    print("largest weight difference, resumed vs uninterrupted:", max(differ.values()))
