"""A fit that ran without validation warns that it has no final metrics; a healthy fit passes every check.

The fits that must fail (non-finite losses and gradients, too many skipped steps, a schedule
without a length, zero data, a model unlike its data) are cases of the bad-input matrix,
tests/test_bad_inputs.py, whose tiny in-process fit these tests share.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from avmt.data.shards import ensure_shards
from avmt.data.synth import SynthConfig
from tests.test_bad_inputs import TASKS, fit, tiny_module
from tests.test_module import T


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    """4 training clips (2 batches of 2 clips), 2 validation clips, T = 4 segments."""
    root = tmp_path_factory.mktemp("avsynth")
    ensure_shards(root, {"train": 4, "val": 2, "test": 2}, 0, SynthConfig(num_segments=T), progress=False)
    return root


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
