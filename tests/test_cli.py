"""End-to-end: the real CLI in a subprocess on tiny AVSynth shards (fit → validate from the checkpoint)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EXPERIMENTS = REPO / "experiments"

# A few steps of the default experiment at a smaller scale.
TINY = [
    "--trainer.max_epochs=1",
    "--trainer.max_steps=4",
    "--trainer.limit_val_batches=2",
    "--trainer.log_every_n_steps=1",
    "--trainer.enable_progress_bar=false",
    "--model.max_generation_samples=4",
    "--model.max_new_tokens=12",
    "--data.clips_per_batch=2",
]


def run_cli(*args: str, cwd: Path, env_extra: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    env = {**os.environ, "AVMT_CACHE": str(cwd / "cache"), "PYTHONUNBUFFERED": "1"}
    env.update(env_extra or {})
    result = subprocess.run(
        [sys.executable, "-m", "avmt", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    if check and result.returncode != 0:
        raise AssertionError(f"avmt {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("avsynth")
    run_cli("data", "synth", "--out", str(root), "--clips", "8", "--val_clips", "4", "--test_clips", "4", "--seed", "3", cwd=root)
    return root


@pytest.fixture(scope="module")
def fitted(shards, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("run")
    result = run_cli(
        "fit",
        "-c",
        str(EXPERIMENTS / "ilora.yaml"),
        f"--data.root={shards}",
        "--trainer.logger.init_args.save_dir=runs",
        *TINY,
        cwd=work,
    )
    (work / "fit.log").write_text(result.stdout + result.stderr)
    return work / "runs" / "ilora" / "version_0"


def test_fit_prints_trainable_parameters_per_adapter_family_and_scope(fitted):
    log = (fitted.parent.parent.parent / "fit.log").read_text()
    assert "adapter ILoRA [llm]" in log and "vision connector" in log and "total trainable" in log


@pytest.mark.parametrize("experiment", ["lora", "moe_lora"])
def test_every_adapter_experiment_fits(experiment, shards, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli("fit", "-c", str(EXPERIMENTS / f"{experiment}.yaml"), f"--data.root={shards}", *TINY, cwd=tmp_path)
    run_dir = tmp_path / "runs" / experiment / "version_0"
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    assert ("router/heatmap" in events.Tags()["images"]) == (experiment == "moe_lora")


def test_spatial_experiment_fits_and_logs_metrics_and_example_images(tmp_path):
    """experiments/spatial.yaml end to end on a few clips: every spatial task is scored by generation
    next to its baseline, and TensorBoard holds example images."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_cli(
        "fit", "-c", str(EXPERIMENTS / "spatial.yaml"), *TINY, "--trainer.max_steps=3", "--model.max_generation_samples=2",
        "--data.train_clips=6", "--data.val_clips=6", "--data.test_clips=2", "--data.frame_size=32",
        "--model.vision_encoder.init_args.image_size=32", "--model.image_connector.init_args.tokens_per_segment=4",
        cwd=tmp_path,
    )
    run_dir = tmp_path / "runs" / "spatial" / "version_0"
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    scalars, images = set(events.Tags()["scalars"]), set(events.Tags()["images"])
    expected = {"val/s4/j", "val/s4/f", "val/s4/parse_failure_rate", "val/arig/ciou", "val/arig/auc",
                "val/ref_avs/s_null", "val/avss/miou_no_bg", "val/ssu/bleu4", "train/loss/s4/dice", "train/loss/s4/bce"}
    assert expected <= scalars, sorted(expected - scalars)
    assert {"val/s4/examples/0", "val/arig/examples/0"} <= images, sorted(images)
    final = json.loads((run_dir / "val_metrics.json").read_text())
    assert "j" in final["s4"]["baseline"] and "ciou" in final["arig"]["baseline"]
    # predict on the checkpoint: one jsonl line per sample; masks as PNGs named by key and task
    from PIL import Image

    out = run_cli("predict", "-c", str(run_dir / "config.yaml"), f"--ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                  "--trainer.limit_predict_batches=1", cwd=tmp_path)
    lines = [json.loads(line) for line in next(tmp_path.glob("runs/spatial/version_*/predictions.jsonl")).read_text().splitlines()]
    assert "predictions.jsonl" in out.stdout + out.stderr
    assert lines and {"key", "task", "prompt", "text", "prediction", "answer"} <= set(lines[0])
    masked = [line for line in lines if isinstance(line["answer"], dict) and "mask" in line["answer"]]
    assert masked, sorted({line["task"] for line in lines})
    folder = next(tmp_path.glob("runs/spatial/version_*/predictions.jsonl")).parent
    for line in masked:
        mask = Image.open(folder / line["answer"]["mask"])
        assert mask.mode == "L" and mask.size == (32 * 10, 32)  # T frames tiled
        if line["prediction"] is not None:
            assert (folder / line["prediction"]["mask"]).is_file()


def test_every_task_is_scored_by_generation_next_to_its_baseline(tmp_path):
    """experiments/all_tasks.yaml on a few clips: every registered task trains, generates, parses and
    is scored through the generic path; the table and val_metrics.json hold every one."""
    from avmt.tasks import list_tasks

    result = run_cli(
        "fit", "-c", str(EXPERIMENTS / "all_tasks.yaml"), *TINY, "--trainer.max_steps=2", "--model.max_generation_samples=2",
        "--data.train_clips=8", "--data.val_clips=24", "--data.test_clips=2", "--data.frame_size=32",
        "--data.clips_per_batch=4", "--model.vision_encoder.init_args.image_size=32",
        "--model.image_connector.init_args.tokens_per_segment=4", "--trainer.limit_val_batches=6", cwd=tmp_path,
    )
    final = json.loads(next(tmp_path.glob("runs/all_tasks/version_*/val_metrics.json")).read_text())
    assert len(list_tasks()) >= 15 and set(final) == set(list_tasks()), sorted(set(list_tasks()) - set(final))
    for name, entry in final.items():
        assert entry["samples"] > 0 and set(entry["baseline"]) <= set(entry["scores"]), name
        assert "parse_failure_rate" in entry["scores"], name
    assert final["a2v"]["baseline"]["accuracy"] == pytest.approx(0.25)  # chance, K = 4
    assert final["unav"]["baseline_name"] == "best constant range"
    table = result.stdout + result.stderr
    assert all(f"\n{name} " in table for name in list_tasks())


def test_data_synth_writes_every_split(shards):
    for split in ("train", "val", "test"):
        assert sorted((shards / split).glob("*.tar")), split
    assert (shards / "manifest.json").is_file()


def test_fit_writes_checkpoint_config_and_tensorboard_scalars(fitted):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert (fitted / "checkpoints" / "last.ckpt").is_file()
    assert (fitted / "config.yaml").is_file()
    events = EventAccumulator(str(fitted), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    expected = {"train/loss", "lr-AdamW", "val/loss"}
    for task in ("ave", "unav", "avvp", "avqa", "action", "emotion", "avcap"):
        expected |= {f"train/loss/{task}", f"val/loss/{task}"}
    expected |= {"val/ave/segment_accuracy", "val/ave/class_accuracy", "val/ave/range_iou",
                 "val/ave/parse_failure_rate", "val/avqa/accuracy"}
    assert expected <= scalars, sorted(expected - scalars)
    assert any(tag.startswith("config") for tag in events.Tags()["tensors"]), events.Tags()["tensors"]
    examples = events.Tensors("val/ave/examples/text_summary")[-1].tensor_proto.string_val[0].decode()
    assert examples.count("**prompt**") == examples.count("**target** <event>") == examples.count("**answer**") > 0
    router = [tag for tag in scalars if tag.startswith("router/")]
    assert {"router/ave/head0", "router/ave/head2", "router/ave/entropy"} <= set(router), router[:5]
    assert len(router) == 7 * (3 + 1), sorted(router)  # per task: K = 3 heads averaged over layers + entropy
    assert {"router/heatmap", "router/ave/layers"} <= set(events.Tags()["images"])
    final = json.loads((fitted / "val_metrics.json").read_text())
    assert set(final) == {"ave", "unav", "avvp", "avqa", "action", "emotion", "avcap"}  # every task, by default
    assert {"segment_accuracy", "class_accuracy", "range_iou"} <= set(final["ave"]["baseline"])
    assert {"accuracy", "macro_f1"} <= set(final["action"]["scores"]) and "bleu4" in final["avcap"]["scores"]
    assert final["avqa"]["baseline_name"] == "question-type prior"
    assert all(entry["samples"] > 0 and entry["generation_seconds"] > 0 for entry in final.values())
    assert "val/generation_seconds" in scalars


def test_validate_from_checkpoint_reloads_strictly(fitted):
    result = run_cli(
        "validate",
        "-c",
        str(fitted / "config.yaml"),
        f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}",
        "--trainer.logger=false",
        cwd=fitted.parent.parent.parent,
    )
    assert "val/loss" in result.stdout + result.stderr


def test_test_prints_one_table_and_writes_test_metrics(fitted):
    result = run_cli(
        "test", "-c", str(fitted / "config.yaml"), f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}",
        "--trainer.logger.init_args.version=test", cwd=fitted.parent.parent.parent,
    )
    out = result.stdout + result.stderr
    assert "task" in out and "trivial baseline" in out and "failure rate" in out and "samples" in out
    saved = json.loads((fitted.parent / "test" / "test_metrics.json").read_text())
    assert {"ave", "avqa", "avvp", "action", "emotion", "avcap"} <= set(saved)
    # the question-type prior is fitted on the training answers the checkpoint keeps, not on the test's
    assert saved["avqa"]["baseline_name"] == "question-type prior"
    assert set(saved["avqa"]["extra_baselines"]) == {"best constant answer"}  # shown after the prior
    assert "extra_baselines" not in saved["ave"]
    assert re.search(r"avqa +accuracy +[01]\.\d{3} +[01]\.\d{3} \(question-type prior\); [01]\.\d{3} "
                     r"\(best constant answer\)", out)
    for name, entry in saved.items():
        assert f"{name}  " in out
        assert 0.0 <= entry["scores"]["parse_failure_rate"] <= 1.0 and entry["samples"] > 0


def test_predict_writes_one_line_per_sample_with_the_parsed_answer(fitted):
    result = run_cli(
        "predict", "-c", str(fitted / "config.yaml"), f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}",
        "--trainer.logger.init_args.version=predict", cwd=fitted.parent.parent.parent,
    )
    path = fitted.parent / "predict" / "predictions.jsonl"
    assert str(path.relative_to(fitted.parent.parent.parent)) in result.stdout + result.stderr
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert {line["task"] for line in lines} == {"ave", "unav", "avvp", "avqa", "action", "emotion", "avcap"}
    assert len({(line["key"], line["task"], line["prompt"]) for line in lines}) == len(lines)  # every test sample once
    per_clip = {task: sum(line["task"] == task for line in lines) / len({line["key"] for line in lines}) for task in ("ave", "avqa")}
    assert per_clip["ave"] == 1 and 1 < per_clip["avqa"] <= 4  # base.yaml's data.samples_per_clip: {avqa: 4}
    from avmt.tasks import get_task

    for line in lines:
        assert {"key", "task", "prompt", "text", "prediction", "answer"} <= set(line)
        assert line["prediction"] == get_task(line["task"], reasoning=False).parse(line["text"])
        assert line["answer"] is not None


def test_predict_on_media_files_from_a_request_file(fitted, tmp_path):
    """The way Crab's quick-start script is used: a request file names media and a task or an instruction."""
    from tests.data.test_media import write_video

    write_video(tmp_path / "clip.mp4", seconds=3.0)
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": "mine", "task": "ave", "video": "clip.mp4"}) + "\n"
                        + json.dumps({"id": "free", "instruction": "What is heard?", "video": "clip.mp4"}) + "\n")
    run_cli(
        "predict", "-c", str(fitted / "config.yaml"), f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}",
        f"--data.requests={requests}", "--trainer.logger.init_args.version=requests", cwd=fitted.parent.parent.parent,
    )
    lines = [json.loads(line) for line in (fitted.parent / "requests" / "predictions.jsonl").read_text().splitlines()]
    assert [(line["key"], line["task"]) for line in lines] == [("mine", "ave"), ("free", "instruction")]
    assert lines[1]["prompt"] == "<video> <audio> What is heard?" and isinstance(lines[1]["text"], str)
    assert lines[0]["answer"] is None and lines[1]["prediction"] is None
    bad = run_cli(
        "predict", "-c", str(fitted / "config.yaml"), f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}",
        f"--data.requests={tmp_path / 'missing.jsonl'}", "--trainer.logger=false", cwd=fitted.parent.parent.parent,
        check=False,
    )
    assert bad.returncode == 2 and "missing.jsonl" in bad.stderr


def test_checkpoint_rejects_a_different_adapter(fitted, shards):
    result = run_cli(
        "validate",
        "-c",
        str(fitted / "config.yaml"),
        "--model.adapter.init_args.num_heads=2",
        f"--ckpt_path={fitted / 'checkpoints' / 'last.ckpt'}",
        "--trainer.logger=false",
        cwd=fitted.parent.parent.parent,
        check=False,
    )
    assert result.returncode != 0
    assert "lora_B" in result.stderr or "size mismatch" in result.stderr


def test_print_config_round_trip(tmp_path):
    first = run_cli("fit", "-c", str(EXPERIMENTS / "lora.yaml"), "--print_config", cwd=tmp_path).stdout
    (tmp_path / "printed.yaml").write_text(first)
    second = run_cli("fit", "-c", str(tmp_path / "printed.yaml"), "--print_config", cwd=tmp_path).stdout
    assert first == second
    config = yaml.safe_load(first)
    assert config["model"]["adapter"]["class_path"] == "avmt.adapters.LoRA"
    assert config["trainer"]["logger"]["init_args"]["name"] == "lora"
    assert config["data"]["tasks"] == ["ave", "unav", "avvp", "avqa", "action", "emotion", "avcap"]


def test_configs_merge_in_order(tmp_path):
    ablation = tmp_path / "ablation.yaml"
    ablation.write_text("model:\n  adapter:\n    init_args:\n      num_heads: 5\n")
    printed = run_cli(
        "fit", "-c", str(EXPERIMENTS / "ilora.yaml"), "-c", str(ablation), "--print_config", cwd=tmp_path
    ).stdout
    adapter = yaml.safe_load(printed)["model"]["adapter"]
    assert adapter["class_path"] == "avmt.adapters.ILoRA"
    assert adapter["init_args"]["num_heads"] == 5
    assert adapter["init_args"]["r"] == 16  # kept from ilora.yaml


def test_the_scale_and_time_word_ablations_set_only_their_keys(tmp_path):
    def printed(*ablations: str) -> dict:
        configs = [arg for name in ("ilora.yaml", *ablations) for arg in ("-c", str(EXPERIMENTS / name))]
        return yaml.safe_load(run_cli("fit", *configs, "--print_config", cwd=tmp_path).stdout)

    plain, scaled, worded = printed(), printed("signal_scale.yaml"), printed("time_words.yaml")
    assert (plain["model"]["media_token_rms"], plain["model"]["llm"]["init_args"]["initializer_range"]) == (None, 0.02)
    assert (scaled["model"]["media_token_rms"], scaled["model"]["llm"]["init_args"]["initializer_range"]) == (1.0, 0.088)
    assert (plain["model"]["time_word_rms"], worded["model"]["time_word_rms"]) == (None, 1.0)
    scaled["model"]["media_token_rms"] = None
    scaled["model"]["llm"]["init_args"]["initializer_range"] = 0.02
    worded["model"]["time_word_rms"] = None
    assert scaled == plain  # nothing else changes (the LLM plugin and its other settings stay ilora.yaml's)
    assert worded == plain


def test_unknown_class_path_lists_the_plugins(tmp_path):
    result = run_cli(
        "fit",
        "-c",
        str(EXPERIMENTS / "ilora.yaml"),
        "--model.adapter.class_path=avmt.adapters.NoSuchAdapter",
        cwd=tmp_path,
        check=False,
    )
    assert result.returncode == 2
    assert "avmt.adapters.NoSuchAdapter" in result.stderr
    for name in ("avmt.adapters.LoRA", "avmt.adapters.ILoRA"):
        assert name in result.stderr


def test_unknown_head_in_a_list_lists_the_heads(tmp_path):
    ablation = tmp_path / "bad_head.yaml"
    ablation.write_text("model:\n  heads:\n    - class_path: avmt.heads.NoSuchHead\n")
    result = run_cli("fit", "-c", str(EXPERIMENTS / "spatial.yaml"), "-c", str(ablation), cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert "model.heads.class_path" in result.stderr and "avmt.heads.MaskDecoderHead" in result.stderr


def test_plugins_lists_the_heads_and_the_tasks(tmp_path):
    listed = run_cli("plugins", cwd=tmp_path).stdout
    assert "avmt.heads.MaskDecoderHead" in listed.split("head:\n", 1)[1].split(":\n", 1)[0]  # under the heads
    assert all(f"  {task}" in listed for task in ("s4", "ms3", "arig", "avss", "ref_avs", "ssu"))
    formats = listed.split("dataset format")[1]
    assert all(f"  {name} " in formats for name in ("ave", "music-avqa", "llp", "avsbench", "ref-avs", "avuie"))


def test_missing_shard_folder_names_path_and_command(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_cli("validate", "-c", str(EXPERIMENTS / "ilora.yaml"), f"--data.root={missing}", cwd=tmp_path, check=False)
    assert result.returncode == 2
    assert str(missing) in result.stderr
    assert "python -m avmt data synth" in result.stderr


def test_lightning_misconfiguration_is_one_line(tmp_path):
    result = run_cli(
        "fit", "-c", str(EXPERIMENTS / "ilora.yaml"), "--trainer.enable_checkpointing=false", cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert "avmt: error: Trainer was configured with `enable_checkpointing=False`" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_task_lists_the_tasks(tmp_path):
    result = run_cli(
        "validate", "-c", str(EXPERIMENTS / "ilora.yaml"), "--data.tasks=[ave,nosuchtask]", cwd=tmp_path, check=False
    )
    assert result.returncode == 2
    assert "nosuchtask" in result.stderr
    assert "avqa" in result.stderr and "avvp" in result.stderr


@pytest.mark.parametrize("command", [["bench", "adapters"], ["bench", "llm"], ["bench", "features"], ["data", "synth"],
                                     ["data", "convert"], ["data", "features"], ["export", "peft"], ["convert", "crab-lora"]])
def test_every_command_prints_its_help(command, capsys):
    from avmt.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0 and "usage" in capsys.readouterr().out.lower()
