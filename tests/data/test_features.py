"""Frozen-feature cache: ``python -m avmt data features``, training on it, refusals, ``bench features``."""

from __future__ import annotations

import json
import tarfile
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from avmt.cli import main as cli_main
from avmt.data.datamodule import AVDataModule
from avmt.data.features import (
    FEATURES_MEMBER,
    FeatureReader,
    check_cache_matches,
    datamodule_shards,
    decode_features,
    parse_experiment,
    write_features,
)
from avmt.data.shards import ensure_shards, iter_clips, list_shards
from avmt.data.synth import SynthConfig
from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder

BASE = Path(__file__).resolve().parents[2] / "experiments" / "base.yaml"

TINY = """
seed_everything: 0
trainer:
  max_epochs: 1
  limit_train_batches: 2
  limit_val_batches: 1
  enable_progress_bar: false
  enable_model_summary: false
  logger:
    class_path: lightning.pytorch.loggers.TensorBoardLogger
    init_args: {{save_dir: {runs}, name: tiny}}
model:
  max_generation_samples: 2
  max_new_tokens: 8
  llm:
    class_path: avmt.llm.CausalLM
    init_args: {{hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
  vision_encoder:
    class_path: avmt.encoders.ViTVisionEncoder
    init_args: {{image_size: 32, hidden_size: 32, num_layers: 1, num_heads: 2, freeze: true}}
  audio_encoder:
    class_path: avmt.encoders.Wav2Vec2AudioEncoder
    init_args: {{hidden_size: 32, num_layers: 1, num_heads: 2, conv_dim: 16, freeze: true}}
  vision_connector:
    class_path: avmt.connectors.QFormerConnector
    init_args: {{num_queries: 1, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
  audio_connector:
    class_path: avmt.connectors.QFormerConnector
    init_args: {{num_queries: 1, hidden_size: 32, num_layers: 1, num_heads: 2, intermediate_size: 64}}
data:
  root: {root}
  tasks: [action, ave, a2v]
  clips_per_batch: 2
  eval_clips_per_batch: 2
"""


@pytest.fixture(scope="module")
def configs(tmp_path_factory) -> list[str]:
    """Tiny AVSynth shards (32 px) and the experiment: the base config plus a tiny model with frozen encoders."""
    work = tmp_path_factory.mktemp("features")
    ensure_shards(work / "shards", {"train": 6, "val": 4, "test": 2}, seed=1, cfg=SynthConfig(frame_size=32),
                  progress=False)
    tiny = work / "tiny.yaml"
    tiny.write_text(TINY.format(runs=work / "runs", root=work / "shards"))
    return [str(BASE), str(tiny)]


@pytest.fixture(scope="module")
def cache(configs) -> Path:
    """The feature cache of the train and val splits, written by the command, in-process."""
    out = Path(configs[1]).parent / "cache"
    cli_main(["data", "features", *(item for c in configs for item in ("-c", c)), "--out", str(out),
              "--progress", "false"])
    return out


@pytest.fixture(scope="module")
def module(configs):
    """The experiment's AVModule, built as ``fit`` builds it (same seed, same encoder weights)."""
    return parse_experiment(configs).model


def first_batch(features: Path | None, configs: list[str], split: str = "val"):
    """The first ``split`` batch of the tiny data, read with the feature cache ``features`` (or without)."""
    root = Path(configs[1]).parent / "shards"
    data = AVDataModule(root=str(root), tasks=["action", "ave", "a2v"], reasoning=False, clips_per_batch=2,
                        features=None if features is None else str(features))
    data.setup("validate" if split == "val" else "fit")
    return next(iter(data.val_dataloader() if split == "val" else data.train_dataloader()))


def first_data(configs: list[str]) -> AVDataModule:
    """A data module over the tiny shards, without a feature cache (to list its shards)."""
    return AVDataModule(root=str(Path(configs[1]).parent / "shards"), tasks=["action"], reasoning=False)


def test_cache_holds_one_safetensors_member_per_clip_and_the_fingerprint(cache, configs):
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest["complete"] and manifest["format"] == "avmt-features"
    fingerprint = manifest["fingerprint"]
    assert fingerprint["num_segments"] == 10
    vision, audio = fingerprint["vision_encoder"], fingerprint["audio_encoder"]
    assert vision["class_path"] == "avmt.encoders.vision.ViTVisionEncoder" and vision["model"] is None
    assert (vision["select_layer"], vision["image_size"], vision["num_patches"]) == (-1, 32, 4)
    assert vision["dtype"] == audio["dtype"] == "float32"
    assert (audio["sample_rate"], audio["tokens_per_segment"]) == (16000, 4)
    assert len(vision["weights_sha256"]) == len(audio["weights_sha256"]) == 64
    assert manifest["inputs"] == {"frame_size": [32, 32], "frames_per_segment": 1, "audio_samples": 160000,
                                  "audio_window": 16000}
    root = Path(configs[1]).parent / "shards"
    for split, clips in (("train", 6), ("val", 4)):
        assert manifest["splits"][split]["clips"] == clips
        keys = [clip.key for clip in iter_clips(list_shards(root / split))]
        names = [m.name for path in sorted((cache / split).glob("*.tar")) for m in tarfile.open(path).getmembers()]
        assert names == [f"{key}.{FEATURES_MEMBER}" for key in keys]
    with tarfile.open(cache / "val" / "val-000000.tar") as tar:
        vision_features, audio_features, meta = decode_features(tar.extractfile(tar.getmembers()[0]).read(), "test")
    assert vision_features.shape == (10, 4, 32) and audio_features.shape == (10, 4, 32)
    assert len(meta["media_sha256"]) == 64


def test_cached_features_give_the_same_loss_as_the_raw_media(cache, configs, module):
    batch = first_batch(cache, configs, split="train")
    assert batch.vision_features.shape == (len(batch.clip_keys), 10, 4, 32)
    assert batch.audio_features.shape == (len(batch.clip_keys), 10, 4, 32)
    raw = replace(batch, vision_features=None, audio_features=None, feature_cache=None)
    module.eval()
    with torch.no_grad():
        cached_out = module.model(module.on_before_batch_transfer(batch, 0))
        raw_out = module.model(module.on_before_batch_transfer(raw, 0))
    torch.testing.assert_close(cached_out.media.vision, raw_out.media.vision)
    torch.testing.assert_close(cached_out.media.audio, raw_out.media.audio)
    torch.testing.assert_close(cached_out.loss_sum, raw_out.loss_sum)
    torch.testing.assert_close(cached_out.mean_loss(), raw_out.mean_loss())
    sub = batch.take([len(batch) - 1])  # Batch.take keeps the features of the clips it keeps
    assert sub.vision_features.shape[0] == len(sub.clip_keys) and sub.feature_cache == str(cache)


def test_a_cache_of_other_encoders_is_refused_with_the_field_that_differs(cache, configs, module, tmp_path):
    other = parse_experiment(configs, ["--model.vision_encoder.init_args.select_layer=-2"]).model
    write_features(other.model, datamodule_shards(first_data(configs), ["val"]), tmp_path / "layer-2",
                   batch_size=2, progress=False)
    batch = first_batch(tmp_path / "layer-2", configs)
    with pytest.raises(ValueError, match="vision_encoder.select_layer: cache made with -2, model uses -1") as error:
        module.on_before_batch_transfer(batch, 0)  # what the module does at the first batch of a cache
    assert "weights_sha256" not in str(error.value) and str(tmp_path / "layer-2") in str(error.value)
    reseeded = parse_experiment(configs, ["--seed_everything=1"]).model
    reason = r"vision_encoder\.weights_sha256: cache made with \w{12}…, model uses"
    with pytest.raises(ValueError, match=reason) as error:
        check_cache_matches(cache, reseeded.model)
    assert "audio_encoder.weights_sha256" in str(error.value)


def test_trainable_encoders_are_refused_naming_the_key(configs, tmp_path, capsys):
    unfrozen = tmp_path / "unfrozen.yaml"
    # without stage 1, which would freeze the encoders itself
    unfrozen.write_text("model:\n  media_pretraining: null\n  audio_encoder:\n    init_args: {freeze: false}\n")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["data", "features", *(item for c in configs for item in ("-c", c)), "-c", str(unfrozen),
                  "--out", str(tmp_path / "c2"), "--progress", "false"])
    assert exit_info.value.code == 2
    assert "model.audio_encoder.init_args.freeze: false" in capsys.readouterr().err
    assert not (tmp_path / "c2").exists()


def test_a_clip_missing_from_the_cache_or_with_other_media_is_an_error(cache, configs):
    reader = FeatureReader(cache, "val")
    clip = next(iter_clips(list_shards(Path(configs[1]).parent / "shards" / "val")))
    assert reader.attach(clip).features.vision.shape == (10, 4, 32) and len(reader) == 4
    missing = rf"clip 'val-00000099' is not in the 'val' split of the feature cache '{cache}'"
    with pytest.raises(ValueError, match=missing):
        reader.attach(replace(clip, key="val-00000099", features=None))
    changed = replace(clip, audio=clip.audio.flip(0), features=None)
    with pytest.raises(ValueError, match="media differ from the media its features were computed from"):
        reader.attach(changed)
    with pytest.raises(ValueError, match="has no 'test' split"):
        FeatureReader(cache, "test")


def test_rerun_skips_the_shards_already_encoded(cache, configs, module, monkeypatch):
    import avmt.data.features as features

    def fail(*args, **kwargs):
        raise AssertionError("an unchanged clip shard was encoded again")

    monkeypatch.setattr(features._ShardEncoder, "write", fail)
    before = (cache / "train" / "train-000000.tar").stat().st_mtime_ns
    manifest = write_features(module.model, datamodule_shards(first_data(configs), ["train"]), cache, batch_size=2,
                              progress=False)
    assert manifest["complete"] and set(manifest["splits"]) == {"train", "val"}  # val is kept
    assert (cache / "train" / "train-000000.tar").stat().st_mtime_ns == before


def test_fit_on_the_cache_never_runs_the_encoders(cache, configs, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("an encoder ran during a fit on the feature cache")

    monkeypatch.setattr(ViTVisionEncoder, "forward", refuse)
    monkeypatch.setattr(Wav2Vec2AudioEncoder, "forward", refuse)
    cli_main(["fit", *(item for c in configs for item in ("-c", c)), f"--data.features={cache}"])
    run = Path(configs[1]).parent / "runs" / "tiny"
    assert list(run.glob("version_*/checkpoints/last.ckpt"))
    assert list(run.glob("version_*/val_metrics.json"))  # validation generated answers from cached features too


def test_bench_features_reports_both_epochs_and_their_ratio(configs, tmp_path):
    path = tmp_path / "bench.json"
    threads = torch.get_num_threads()
    cli_main(["bench", "features", *(item for c in configs for item in ("-c", c)), "--steps", "2",
              "--warmup_steps", "0", "--json", str(path)])
    assert torch.get_num_threads() == threads
    result = json.loads(path.read_text())
    assert result["benchmark"] == "features" and result["clock"] == "cpu" and result["threads"] == 1
    assert result["steps"] == {"raw": 2, "cached": 2}
    assert result["encoder_calls"]["raw"] == 4 and result["encoder_calls"]["cached"] == 0  # 2 steps x 2 encoders
    assert result["raw_epoch_s"] > 0 and result["cached_epoch_s"] > 0
    assert result["ratio"] == pytest.approx(result["raw_epoch_s"] / result["cached_epoch_s"])
    assert result["target_ratio"] == 3.0 and result["passed"] == (result["ratio"] >= 3.0)
    assert set(result["epoch_seconds"]["raw"]) == {"cpu", "wall"}
    assert result["cache_clips"] == 6 and result["cache_bytes"] > 0
    assert set(result["fingerprint"]) == {"num_segments", "vision_encoder", "audio_encoder"}
