"""Two processes on CPU (DDP with gloo): a fit starts both ranks, trains every clip once per epoch
(on 9 clips, both ranks take 2 steps of 2 clips: rank 0 leaves its fifth clip out instead of
taking a third step alone, which would hang in the gradient all-reduce) and ends with final
metrics, and validating one checkpoint with 1 and with 2 processes gives the same scores,
baselines, sample counts and bootstrap noise (metric states synced, answers and predictions
gathered)."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pytest
from lightning.pytorch.callbacks import Callback

from tests.test_cli import EXPERIMENTS, REPO, run_cli

TWO_PROCESSES = ["--trainer.strategy=ddp", "--trainer.devices=2", "--trainer.accelerator=cpu"]
IMPORTS_TESTS = {"PYTHONPATH": str(REPO)}  # the fit and its config.yaml name TrainKeys from this module


class TrainKeys(Callback):
    """Test-only: writes ``train_keys.rank<r>.json`` in the working folder at the end of fit: epoch ->
    the clip keys of every training batch this rank stepped on (the batches' anchor clips)."""

    def __init__(self) -> None:
        self.keys: dict[str, list[list[str]]] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.keys.setdefault(str(trainer.current_epoch), []).append(sorted(set(batch.keys)))

    def on_train_end(self, trainer, pl_module) -> None:
        Path(f"train_keys.rank{trainer.global_rank}.json").write_text(json.dumps(self.keys))


@pytest.fixture(scope="module")
def ddp_fit(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ddp")
    run_cli("data", "synth", "--out", "shards", "--clips", "9", "--val_clips", "4", "--test_clips", "4", cwd=work)
    # -c with a `config:` base: Lightning re-runs the typed command line in rank 1, which expands it again
    result = run_cli("fit", "-c", str(EXPERIMENTS / "ilora.yaml"), "--data.root=shards", "--model.media_pretraining=null",
                     *TWO_PROCESSES, "--trainer.max_epochs=2", "--trainer.enable_progress_bar=false",
                     "--model.max_new_tokens=24", "--data.clips_per_batch=2", "--trainer.logger.init_args.save_dir=runs",
                     "--trainer.callbacks+=tests.test_ddp.TrainKeys", cwd=work, env_extra=IMPORTS_TESTS)
    output = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output and "File name too long" not in output, output[-3000:]
    return work


def test_a_two_process_fit_ends_with_every_validation_sample_scored(ddp_fit):
    final = json.loads((ddp_fit / "runs" / "ilora" / "version_0" / "val_metrics.json").read_text())
    assert final["ave"]["samples"] == 4 and final["avqa"]["samples"] == 16  # 4 clips over 2 ranks; 4 questions each
    assert (ddp_fit / "runs" / "ilora" / "version_0" / "checkpoints" / "last.ckpt").is_file()


def test_each_epoch_trains_every_clip_exactly_once_in_equal_steps(ddp_fit):
    """9 clips, 2 ranks, 2 clips per batch: rank 0 reads clips 0, 2, 4, 6, 8 (3 batches), rank 1 the
    other 4, which it splits into 3 batches (2, 1, 1), so both take 3 steps and no clip is left out."""
    with tarfile.open(next((ddp_fit / "shards" / "train").glob("*.tar"))) as tar:
        clips = {name.split(".", 1)[0] for name in tar.getnames()}
    assert len(clips) == 9
    ranks = [json.loads((ddp_fit / f"train_keys.rank{rank}.json").read_text()) for rank in (0, 1)]
    for epoch in ("0", "1"):
        assert [len(ranks[0][epoch]), len(ranks[1][epoch])] == [3, 3]  # equal steps
        seen = [key for rank in ranks for batch in rank[epoch] for key in batch]
        assert len(seen) == len(set(seen)), f"epoch {epoch}: a clip trained twice: {seen}"
        assert set(seen) == clips, f"epoch {epoch}: not every one of the 9 clips: {seen}"
        assert sorted(len(batch) for batch in ranks[1][epoch]) == [1, 1, 2]


def test_one_and_two_processes_validate_a_checkpoint_to_the_same_metrics(ddp_fit):
    run = ddp_fit / "runs" / "ilora" / "version_0"
    results = {}
    for devices in (1, 2):
        run_cli("validate", "-c", str(run / "config.yaml"), f"--ckpt_path={run / 'checkpoints' / 'last.ckpt'}",
                f"--trainer.devices={devices}", f"--trainer.logger.init_args.save_dir=validate{devices}", cwd=ddp_fit,
                env_extra=IMPORTS_TESTS)
        results[devices] = json.loads(next((ddp_fit / f"validate{devices}").rglob("val_metrics.json")).read_text())
    assert set(results[1]) == set(results[2])
    for task, one in results[1].items():
        two = results[2][task]
        for key in ("scores", "baseline", "baseline_name", "samples", "bootstrap_std"):
            assert one[key] == two[key], (task, key, one[key], two[key])
