"""User mistakes end in one line and exit 2; internal bugs keep their traceback; DDP's child processes start."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import avmt.cli
from avmt.cli import check_checkpoint_file, main
from avmt.errors import UserError

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"


def one_error_line(capsys) -> str:
    """The single ``avmt: error: ...`` line the CLI printed on stderr (fails when there are more lines)."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("avmt: error: "), lines
    return lines[0]


def exit_code_of(argv: list[str]) -> int:
    """The exit status of ``python -m avmt ARGV`` run in this process."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    return exit_info.value.code


def test_malformed_yaml_names_the_config_file(tmp_path, capsys):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model:\n  adapter: [unclosed\n")
    assert exit_code_of(["fit", "-c", str(broken)]) == 2
    assert str(broken) in one_error_line(capsys)


def test_malformed_yaml_in_a_base_names_the_base_file(tmp_path, capsys):
    (tmp_path / "base.yaml").write_text("trainer: {max_steps: 1\n")
    experiment = tmp_path / "experiment.yaml"
    experiment.write_text("config: base.yaml\n")
    assert exit_code_of(["fit", "-c", str(experiment)]) == 2
    assert str(tmp_path / "base.yaml") in one_error_line(capsys)


def test_missing_llm_path_names_the_key_and_the_path(tmp_path, capsys):
    missing = tmp_path / "nonexistent" / "path"
    code = exit_code_of(
        ["fit", "-c", str(EXPERIMENTS / "ilora.yaml"), f"--model.llm.init_args.model={missing}",
         "--model.media_pretraining=null", "--trainer.logger=false"]
    )
    assert code == 2
    line = one_error_line(capsys)
    assert "model.llm.init_args.model" in line and str(missing) in line


def test_a_plugin_argument_out_of_range_is_a_user_error(capsys):
    code = exit_code_of(
        ["fit", "-c", str(EXPERIMENTS / "ilora.yaml"), "--model.adapter.init_args.r=0",
         "--model.media_pretraining=null", "--trainer.logger=false"]
    )
    assert code == 2 and "r must be a positive integer" in one_error_line(capsys)


def saved_checkpoint(path: Path) -> Path:
    """A small torch checkpoint in Lightning's layout, written by ``torch.save``."""
    torch.save({"state_dict": {"weight": torch.zeros(64, 64)}, "pytorch-lightning_version": "2.6.0"}, path)
    return path


def truncated_copy(source: Path, target: Path) -> Path:
    """The first half of ``source``, as a copy that stopped mid-write leaves it."""
    data = source.read_bytes()
    target.write_bytes(data[: len(data) // 2])
    return target


def test_check_checkpoint_file_accepts_a_checkpoint_and_lightning_keywords(tmp_path):
    check_checkpoint_file(str(saved_checkpoint(tmp_path / "good.ckpt")))
    for keyword in (None, "last", "best", "hpc"):
        check_checkpoint_file(keyword)


@pytest.mark.parametrize("kind", ["text", "truncated", "missing"])
def test_check_checkpoint_file_rejects_a_bad_file_naming_it(kind, tmp_path):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("this is not a checkpoint\n")
    elif kind == "truncated":
        truncated_copy(saved_checkpoint(tmp_path / "good.ckpt"), path)
    with pytest.raises(UserError, match=str(path)):
        check_checkpoint_file(str(path))


@pytest.mark.parametrize("kind", ["text", "truncated"])
def test_ckpt_path_to_a_bad_file_is_one_line_naming_it(kind, tmp_path, capsys):
    path = tmp_path / f"{kind}.ckpt"
    if kind == "text":
        path.write_text("epoch: 3\n")
    else:
        truncated_copy(saved_checkpoint(tmp_path / "good.ckpt"), path)
    code = exit_code_of(
        ["validate", "-c", str(EXPERIMENTS / "ilora.yaml"), f"--ckpt_path={path}", "--trainer.logger=false"]
    )
    assert code == 2 and str(path) in one_error_line(capsys)


class _RunsCode:
    """A pickle gadget: unpickling it would call ``Path.touch`` on ``target``."""

    def __init__(self, target: Path) -> None:
        self.target = target

    def __reduce__(self):
        return (Path.touch, (self.target,))


def test_a_checkpoint_that_would_run_code_is_refused_unloaded(tmp_path, capsys):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _RunsCode(target)}, path)
    code = exit_code_of(
        ["validate", "-c", str(EXPERIMENTS / "ilora.yaml"), f"--ckpt_path={path}", "--trainer.logger=false"]
    )
    line = one_error_line(capsys)
    assert code == 2 and str(path) in line and "weights_only" in line and "pathlib" in line, line
    assert not target.exists()


@pytest.mark.parametrize("bug", [KeyError("internal key"), ValueError("internal invariant"), ZeroDivisionError()])
def test_an_internal_bug_keeps_its_traceback(bug, monkeypatch):
    def broken(argv):
        raise bug

    monkeypatch.setattr(avmt.cli, "check_plugins", broken)
    with pytest.raises(type(bug)):
        main(["fit", "-c", str(EXPERIMENTS / "ilora.yaml")])


def test_an_internal_bug_in_a_command_keeps_its_traceback(monkeypatch):
    def broken(argv):
        raise KeyError("internal key")

    monkeypatch.setitem(avmt.cli.COMMANDS, "plugins", "tests.test_cli_errors:raise_internal_key_error")
    with pytest.raises(KeyError):
        main(["plugins"])


def raise_internal_key_error(argv: list[str]) -> None:
    """A command with a bug: raises a KeyError (used by the test above through ``COMMANDS``)."""
    raise KeyError("internal key")


def test_user_error_with_avmt_debug_keeps_its_traceback(tmp_path, monkeypatch):
    broken = tmp_path / "broken.yaml"
    broken.write_text("model: [\n")
    monkeypatch.setenv("AVMT_DEBUG", "1")
    with pytest.raises(UserError):
        main(["fit", "-c", str(broken)])
