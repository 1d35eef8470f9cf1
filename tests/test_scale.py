"""Sharded training (experiments/scale/): a two-process FSDP2 fit on CPU (gloo) of the spatial
experiment (I-LoRA routing and the mask head) shards every LLM block and the root per parameter,
optimizes the trainable shards only, gives both ranks the same answer budgets, scores validation,
and writes a checkpoint that one process validates to the same scores and baselines; the
DeepSpeed ZeRO-2 YAML parses into the intended strategy, and without deepspeed the CLI says which
package to install (exit 2). Unit level: answer shapes recorded by two ranks merge into those of
one process that saw every target, however often they are merged."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml
from lightning.pytorch.callbacks import Callback

from avmt.cli import main
from avmt.generation import AnswerShapes
from tests.test_cli import EXPERIMENTS, REPO, run_cli

SCALE = EXPERIMENTS / "scale"
TINY_FIT = ["--data.root=shards", "--model.media_pretraining=null", "--trainer.accelerator=cpu",
            "--trainer.max_epochs=1", "--trainer.enable_progress_bar=false", "--model.max_new_tokens=24",
            "--data.clips_per_batch=2", "--trainer.logger.init_args.save_dir=runs", "--data.tasks=[ave,avqa,s4]"]


#: the runs' config.yaml names ShardReport, so every command on them imports tests.test_scale
REPORT_ENV = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}


class ShardReport(Callback):
    """Writes, per rank, what FSDP2 made of the model (``shards-rank<r>.json``) and the answer shapes the
    rank generates with (``answer-shapes-rank<r>.json``), into the working folder, for the tests below."""

    def on_train_start(self, trainer, pl_module) -> None:
        from torch.distributed.fsdp import FSDPModule
        from torch.distributed.tensor import DTensor

        from avmt.module import sharding_units

        def describe(p) -> dict:
            sharded = isinstance(p, DTensor)
            return {"dtensor": sharded, "placements": [str(x) for x in p.placements] if sharded else None,
                    "local": list((p.to_local() if sharded else p).shape), "global": list(p.shape),
                    "requires_grad": p.requires_grad}

        units = sharding_units(pl_module.model.llm)
        adapted = next(m for m in units[0].modules() if hasattr(m, "lora_router"))
        optimized = [p for group in trainer.optimizers[0].param_groups for p in group["params"]]
        report = {
            "units": len(units),
            "units_sharded": all(isinstance(unit, FSDPModule) for unit in units),
            "root_sharded": isinstance(pl_module.model, FSDPModule),
            "frozen_weight": describe(adapted.base_layer.weight),
            "lora_A": describe(adapted.lora_A),
            "router": describe(adapted.lora_router),
            "head": describe(next(pl_module.model.heads.parameters())),
            "optimized": len(optimized),
            "optimized_trainable": all(p.requires_grad for p in optimized),
            "trainable": sum(1 for p in pl_module.parameters() if p.requires_grad),
            "not_dtensor": [name for name, p in pl_module.named_parameters() if not isinstance(p, DTensor)],
        }
        Path(f"shards-rank{trainer.global_rank}.json").write_text(json.dumps(report))

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if trainer.state.fn != "fit":
            return
        shapes = pl_module.answer_shapes.state_dict() if pl_module.answer_shapes is not None else {}
        Path(f"answer-shapes-rank{trainer.global_rank}.json").write_text(json.dumps(shapes, sort_keys=True))


@pytest.fixture(scope="module")
def fsdp2_fit(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("fsdp2")
    run_cli("data", "synth", "--out", "shards", "--clips", "8", "--val_clips", "4", "--test_clips", "4", cwd=work)
    result = run_cli("fit", "-c", str(EXPERIMENTS / "spatial.yaml"), "-c", str(SCALE / "fsdp2.yaml"), *TINY_FIT,
                     "--trainer.callbacks+=tests.test_scale.ShardReport", cwd=work, env_extra=REPORT_ENV)
    output = result.stdout + result.stderr
    assert "GLOBAL_RANK: 1, MEMBER: 2/2" in output, output[-3000:]
    return work


def test_fsdp2_shards_every_llm_block_per_parameter_and_optimizes_only_trainable_shards(fsdp2_fit):
    reports = [json.loads((fsdp2_fit / f"shards-rank{rank}.json").read_text()) for rank in (0, 1)]
    for report in reports:
        assert report["units"] == 4 and report["units_sharded"] and report["root_sharded"]
        assert report["not_dtensor"] == []  # every parameter is a shard, the root unit's included
        frozen, lora_a, router = report["frozen_weight"], report["lora_A"], report["router"]
        # a frozen base weight and the trainable I-LoRA weights of one layer, each split in half over the ranks
        assert frozen["dtensor"] and frozen["placements"] == ["S(0)"] and not frozen["requires_grad"]
        assert frozen["local"][0] * 2 == frozen["global"][0] and frozen["local"][1:] == frozen["global"][1:]
        assert lora_a["dtensor"] and lora_a["requires_grad"] and router["dtensor"] and router["requires_grad"]
        assert report["head"]["dtensor"] and report["head"]["requires_grad"]  # the mask head, in the root unit
        assert report["optimized"] == report["trainable"] and report["optimized_trainable"]
    for name in ("frozen_weight", "lora_A", "router"):  # the ranks' shards make up each weight (3 router rows: 2 + 1)
        assert sum(report[name]["local"][0] for report in reports) == reports[0][name]["global"][0], name


def test_fsdp2_fit_scores_validation_with_the_same_answer_budgets_on_both_ranks(fsdp2_fit):
    run = fsdp2_fit / "runs" / "spatial" / "version_0"
    final = json.loads((run / "val_metrics.json").read_text())
    assert final["ave"]["samples"] == 4 and final["avqa"]["samples"] == 16 and final["s4"]["samples"] == 4
    shapes = [(fsdp2_fit / f"answer-shapes-rank{rank}.json").read_text() for rank in (0, 1)]
    assert shapes[0] == shapes[1] and json.loads(shapes[0])["avqa"]["targets"] == 8 * 4  # every clip's 4 questions


def test_an_fsdp2_checkpoint_is_one_file_that_one_process_validates_to_the_same_metrics(fsdp2_fit):
    run = fsdp2_fit / "runs" / "spatial" / "version_0"
    checkpoint = run / "checkpoints" / "last.ckpt"
    assert checkpoint.resolve().is_file()  # save_distributed_checkpoint: false
    run_cli("validate", "-c", str(run / "config.yaml"), f"--ckpt_path={checkpoint}", "--trainer.devices=1",
            "--trainer.strategy=auto", "--trainer.logger.init_args.save_dir=validate1", cwd=fsdp2_fit,
            env_extra=REPORT_ENV)
    fit = json.loads((run / "val_metrics.json").read_text())
    one = json.loads(next((fsdp2_fit / "validate1").rglob("val_metrics.json")).read_text())
    assert set(fit) == set(one)
    for task, values in fit.items():
        for key in ("scores", "baseline"):  # the baseline of the prior tasks: both ranks' training answers
            # (mask metrics sum their pixels in another order over two ranks: equal to the last digits)
            assert values[key] == pytest.approx(one[task][key], rel=1e-9, abs=1e-12), (task, key)
        assert (values["baseline_name"], values["samples"]) == (one[task]["baseline_name"], one[task]["samples"])


def test_the_deepspeed_yaml_parses_into_a_zero2_strategy(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_:  # --print_config: parsed and checked against the class, nothing built
        main(["fit", "-c", str(EXPERIMENTS / "ilora.yaml"), "-c", str(SCALE / "deepspeed_zero2.yaml"), "--print_config"])
    assert exit_.value.code in (None, 0)
    trainer = yaml.safe_load(capsys.readouterr().out)["trainer"]
    assert trainer["strategy"]["class_path"] == "lightning.pytorch.strategies.DeepSpeedStrategy"
    assert trainer["precision"] == "bf16-mixed" and trainer["accelerator"] == "cuda"
    args = trainer["strategy"]["init_args"]
    assert args["stage"] == 2 and args["zero_optimization"]
    assert not args["offload_optimizer"] and not args["offload_parameters"]
    assert args["allgather_bucket_size"] == args["reduce_bucket_size"] == 200_000_000
    assert args["overlap_comm"] and args["contiguous_gradients"] and not args["exclude_frozen_parameters"]


def test_without_deepspeed_the_cli_names_the_package_to_install(tmp_path, monkeypatch, capsys):
    import importlib.util

    if importlib.util.find_spec("deepspeed") is not None:
        pytest.skip("deepspeed is installed")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("AVMT_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("AVMT_DEBUG", raising=False)
    with pytest.raises(SystemExit) as exit_:
        main(["fit", "-c", str(EXPERIMENTS / "ilora.yaml"), "-c", str(SCALE / "deepspeed_zero2.yaml"),
              "--trainer.accelerator=cpu", "--model.media_pretraining=null"])
    stderr = capsys.readouterr().err
    assert exit_.value.code == 2 and "pip install" in stderr and "deepspeed" in stderr, stderr[-2000:]


def test_answer_shapes_of_two_ranks_merge_into_those_of_one_process():
    ends = [9]
    one, ranks = AnswerShapes(ends), [AnswerShapes(ends), AnswerShapes(ends)]
    targets = [("ave", "A b. <event> x </event>", [1, 9, 5, 6, 2]), ("ave", "<event> y </event>", [5, 7, 2]),
               ("avqa", "So <answer> 2 </answer>", [3, 4, 2]), ("avqa", "Then <answer> 1 </answer>", [8, 4, 2, 2])]
    for index, (task, text, ids) in enumerate(targets):
        one.update(task, text, ids)
        ranks[index % 2].update(task, text, ids)
    assert ranks[0].state_dict() != ranks[1].state_dict()  # each rank saw other targets: other budgets
    for _ in range(2):  # merging again adds nothing
        states = [rank.rank_state() for rank in ranks]
        for rank in ranks:
            rank.merge(states)
        assert ranks[0].state_dict() == ranks[1].state_dict() == one.state_dict()
    ranks[1].update("ave", "<event> z </event>", [5, 7, 7, 7, 2])  # training goes on: only the new target is added
    one.update("ave", "<event> z </event>", [5, 7, 7, 7, 2])
    states = [rank.rank_state() for rank in ranks]
    for rank in ranks:
        rank.merge(states)
    assert ranks[0].state_dict() == one.state_dict() and ranks[0].max_new_tokens("ave", 99) == one.max_new_tokens("ave", 99)
    restored = AnswerShapes(ends)
    restored.load_state_dict(one.state_dict())  # a checkpoint's shapes count as merged
    restored.merge([restored.rank_state()])
    assert restored.state_dict() == one.state_dict()
