"""A bad fit never ends as a success: non-finite losses and gradients, a schedule without a length,
zero optimizer updates, no validation, and a model that does not match its data.

Each test runs a tiny in-process fit on CPU (a few steps on AVSynth shards of a handful of clips).
"""

from __future__ import annotations

import io
import math
import types
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from avmt.data.datamodule import AVDataModule
from avmt.data.shards import ensure_shards
from avmt.data.synth import SynthConfig
from avmt.errors import UserError
from avmt.module import AVModule, TrainingDiverged
from tests.test_module import T
from tests.test_module import tiny_module as module_of

TASKS = ["emotion", "action"]


def make_shards(root: Path, num_segments: int = T, train_clips: int = 4) -> Path:
    ensure_shards(root, {"train": train_clips, "val": 2, "test": 2}, 0, SynthConfig(num_segments=num_segments),
                  progress=False)
    return root


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 training clips (2 batches of 2 clips), 2 validation clips, T = 4 segments."""
    return make_shards(tmp_path_factory.mktemp("avsynth"))


def tiny_module(**kwargs) -> AVModule:
    """test_module's tiny module without an adapter, with short generation and no bootstrap."""
    options = {"max_new_tokens": 4, "max_generation_samples": 2, "bootstrap_resamples": 0, **kwargs}
    return module_of(None, **options)


def fit(module: AVModule, root: Path, checkpoints: Path, **trainer_options) -> L.Trainer:
    """Fit ``module`` on ``root`` with a ModelCheckpoint that keeps only ``last.ckpt`` (as base.yaml)."""
    options = {"max_epochs": 1, "num_sanity_val_steps": 0, "gradient_clip_val": 1.0, **trainer_options}
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=str(checkpoints),
                        callbacks=[ModelCheckpoint(dirpath=str(checkpoints), save_last=True, save_top_k=0)], **options)
    trainer.fit(module, AVDataModule(root=str(root), tasks=TASKS, reasoning=False, clips_per_batch=2))
    return trainer


def poison_gradients(module: AVModule, steps: set[int] | None = None) -> None:
    """Make one trainable parameter's gradient NaN (at the backward passes numbered in ``steps``,
    counted from 0; every one when ``None``), the loss staying finite."""
    parameter = next(p for p in module.model.vision_connector.parameters() if p.requires_grad)
    calls = {"count": 0}

    def hook(grad: torch.Tensor) -> torch.Tensor:
        call, calls["count"] = calls["count"], calls["count"] + 1
        return grad * float("nan") if steps is None or call in steps else grad

    parameter.register_hook(hook)


def test_a_nan_loss_stops_the_fit_naming_the_step_and_the_tasks_and_writes_no_checkpoint(shards, tmp_path):
    module = tiny_module()
    with torch.no_grad():
        for parameter in module.model.vision_connector.parameters():
            parameter.fill_(float("nan"))
    with pytest.raises(TrainingDiverged, match=r"global step 0.*non-finite: (emotion, action|action, emotion)"):
        fit(module, shards, tmp_path)
    assert not (tmp_path / "last.ckpt").exists()


def test_nonfinite_gradients_stop_the_fit_before_the_optimizer_step(shards, tmp_path):
    module = tiny_module()
    poison_gradients(module)
    before = {name: p.detach().clone() for name, p in module.named_parameters()}
    with pytest.raises(TrainingDiverged, match=r"non-finite gradients in 1 parameter.*global step 0.*emotion"):
        fit(module, shards, tmp_path)
    assert all(torch.equal(before[name], p.detach()) for name, p in module.named_parameters())
    assert not (tmp_path / "last.ckpt").exists()


def test_skip_drops_the_step_counts_it_and_the_run_succeeds_within_the_allowed_fraction(shards, tmp_path):
    module = tiny_module(nonfinite="skip", max_nonfinite_fraction=0.5)
    poison_gradients(module, steps={0})
    with pytest.warns(UserWarning, match="skipped the optimizer step at global step 0"):
        trainer = fit(module, shards, tmp_path, max_epochs=2)  # 4 steps, 1 skipped
    assert (module.optimizer_steps, module.nonfinite_skipped) == (4, 1)
    assert float(trainer.callback_metrics["train/nonfinite_skipped"]) == 1.0
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert (tmp_path / "last.ckpt").exists() and module.final_metrics


def test_skip_fails_the_run_when_more_steps_than_allowed_were_skipped(shards, tmp_path):
    module = tiny_module(nonfinite="skip", max_nonfinite_fraction=0.1)
    poison_gradients(module, steps={0})
    with pytest.raises(TrainingDiverged, match=r"1 of 2 optimizer step\(s\) were skipped"):
        fit(module, shards, tmp_path)
    assert not (tmp_path / "last.ckpt").exists()


def test_skip_fails_the_run_when_every_step_was_skipped_whatever_the_fraction(shards, tmp_path):
    module = tiny_module(nonfinite="skip", max_nonfinite_fraction=1.0)
    poison_gradients(module)
    with pytest.raises(TrainingDiverged, match=r"2 of 2 optimizer step\(s\) were skipped"):
        fit(module, shards, tmp_path)
    assert not (tmp_path / "last.ckpt").exists()


def test_an_unknown_nonfinite_policy_is_a_user_error():
    with pytest.raises(UserError, match="model.nonfinite"):
        tiny_module(nonfinite="ignore")


@pytest.mark.parametrize("estimate", [-1, math.inf])
def test_the_learning_rate_schedule_is_never_built_from_an_unknown_length(estimate):
    module = tiny_module()
    module._trainer = types.SimpleNamespace(estimated_stepping_batches=estimate)
    with pytest.raises(UserError, match=r"trainer\.max_steps.*"):
        module.configure_optimizers()


def test_a_fit_without_validation_warns_that_it_has_no_final_metrics(shards, tmp_path):
    with pytest.warns(UserWarning, match=r"without running validation.*trainer.limit_val_batches is 0"):
        fit(tiny_module(), shards, tmp_path, limit_val_batches=0)
    assert (tmp_path / "last.ckpt").exists()


def test_a_fit_that_stops_mid_epoch_before_validation_warns(shards, tmp_path):
    with pytest.warns(UserWarning, match=r"ended after 1 step\(s\) without running validation.*max_steps is 1"):
        fit(tiny_module(), shards, tmp_path, max_steps=1)


def test_a_healthy_fit_passes_every_check(shards, tmp_path):
    module = tiny_module()
    fit(module, shards, tmp_path)
    assert (module.optimizer_steps, module.nonfinite_skipped, module.validations_completed) == (2, 0, 1)
    assert set(module.final_metrics) == set(TASKS)
    assert (tmp_path / "last.ckpt").exists()
    meta = torch.load(tmp_path / "last.ckpt", weights_only=False)["avmt"]
    assert meta["training_health"] == {"optimizer_steps": 2, "nonfinite_skipped": 0}


def test_generation_tasks_outside_the_data_tasks_are_a_user_error(shards, tmp_path):
    with pytest.raises(UserError, match=r"model.generation_tasks \['emotion', 'avqa'\].*\['avqa'\].*data.tasks "
                                        r"\['emotion', 'action'\]"):
        fit(tiny_module(generation_tasks=["emotion", "avqa"]), shards, tmp_path)


def test_a_model_num_segments_unlike_the_data_is_a_user_error(tmp_path):
    root = make_shards(tmp_path / "shards", num_segments=T + 1)
    with pytest.raises(UserError, match=rf"model.num_segments is {T} but the data has {T + 1} segments.*manifest"):
        fit(tiny_module(), root, tmp_path / "run")


def test_a_fit_whose_every_training_sample_is_corrupt_fails_with_the_count_and_no_checkpoint(shards, tmp_path):
    import shutil
    import tarfile

    root = tmp_path / "shards"
    shutil.copytree(shards, root)
    for path in (root / "train").glob("*.tar"):
        with tarfile.open(path) as source:
            members = [(member, source.extractfile(member).read()) for member in source.getmembers()]
        with tarfile.open(path, "w") as target:
            for member, data in members:
                data = b"not json" if member.name.endswith(".json") else data
                member.size = len(data)
                target.addfile(member, io.BytesIO(data))
    with pytest.raises(UserError, match=r"train.*no (data|usable sample).*4 sample\(s\).*corrupt"):
        fit(tiny_module(), root, tmp_path / "run")
    assert not (tmp_path / "run" / "last.ckpt").exists()
