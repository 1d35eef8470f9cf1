"""Two processes on CPU (DDP with gloo): a fit starts both ranks and ends with final metrics, and
validating one checkpoint with 1 and with 2 processes gives the same scores, baselines, sample
counts and bootstrap noise (metric states synced, answers and predictions gathered)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.test_cli import EXPERIMENTS, run_cli

TWO_PROCESSES = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ddp")
    run_cli("data", "synth", "--out", "shards", "--clips", "8", "--val_clips", "4", "--test_clips", "4", cwd=work)
    # -c with a `config:` base: Lightning re-runs the typed command line in rank 1, which expands it again
    result = run_cli("fit", "-c", str(EXPERIMENTS / "ilora.yaml"), "--data.root=shards", "--model.media_pretraining=null",
                     *TWO_PROCESSES, "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
                     "--model.max_new_tokens=24", "--data.clips_per_batch=2", "--trainer.logger.init_args.save_dir=runs",
                     cwd=work)
    output = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output and "File name too long" not in output, output[-3000:]
    return work


def test_a_two_process_fit_ends_with_every_validation_sample_scored(ddp_fit):
    final = json.loads((ddp_fit / "runs" / "ilora" / "version_0" / "val_metrics.json").read_text())
    assert final["ave"]["samples"] == 4 and final["avqa"]["samples"] == 16  # 4 clips over 2 ranks; 4 questions each
    assert (ddp_fit / "runs" / "ilora" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_one_and_two_processes_validate_a_checkpoint_to_the_same_metrics(ddp_fit):
    run = ddp_fit / "runs" / "ilora" / "version_0"
    results = {}
    for devices in (1, 2):
        run_cli("validate", "-c", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                f"--trainer.devices={devices}", f"--trainer.logger.init_args.save_dir=validate{devices}", cwd=ddp_fit)
        results[devices] = json.loads(next((ddp_fit / f"validate{devices}").rglob("val_metrics.json")).read_text())
    assert set(results[1]) == set(results[2])
    for task, one in results[1].items():
        two = results[2][task]
        for key in ("scores", "baseline", "baseline_name", "samples", "bootstrap_std"):
            assert one[key] == two[key], (task, key, one[key], two[key])
