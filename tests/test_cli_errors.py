"""``check_checkpoint_file`` accepts what ``--ckpt_path`` may name.

Every user mistake and internal bug of the CLI (bad configs, checkpoints, commands) is a case of
the bad-input matrix, tests/test_bad_inputs.py.
"""

from __future__ import annotations

from pathlib import Path

import torch

from avmt.cli import check_checkpoint_file
from avmt.module import CHECKPOINT_FORMAT


def saved_checkpoint(path: Path) -> Path:
    """A small avmt checkpoint in Lightning's layout, written by ``torch.save``."""
    torch.save({"state_dict": {"weight": torch.zeros(64, 64)}, "pytorch-lightning_version": "2.6.0",
                "avmt": {"format": CHECKPOINT_FORMAT}}, path)
    return path


def test_check_checkpoint_file_accepts_a_checkpoint_and_lightning_keywords(tmp_path):
    check_checkpoint_file(str(saved_checkpoint(tmp_path / "good.ckpt")))
    torch.save(torch.load(tmp_path / "good.ckpt", weights_only=True), tmp_path / "legacy.ckpt",
               _use_new_zipfile_serialization=False)
    check_checkpoint_file(str(tmp_path / "legacy.ckpt"))  # torch's pre-zip format
    for keyword in (None, "last", "best", "hpc", "registry:model"):
        check_checkpoint_file(keyword)
