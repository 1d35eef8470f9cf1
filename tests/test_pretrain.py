"""Stage-1 media pretraining: per-segment targets from the scene graph, training, caching, freezing."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from avmt.data import vocab
from avmt.pretrain import AUDIO_TARGETS, VISION_TARGETS, MediaPretraining, PretrainingDataError, segment_targets

REPO = Path(__file__).resolve().parents[1]
K, COLUMNS, ROWS = len(vocab.CLASSES), len(vocab.POSITIONS), len(vocab.ROWS)


def _scene() -> dict:
    return {
        "num_segments": 4,
        "mood": "calm",
        "objects": [
            {"class": "drum", "position": "right", "row": "top", "visible": [[1, 3]], "sounding": [[0, 4]], "loudness": 0.4},
            {"class": "cello", "position": "left", "row": "bottom", "visible": [[0, 1]], "sounding": [[2, 3]], "loudness": 0.7},
        ],
    }


def test_segment_targets_spell_out_the_scene_per_segment():
    vision, audio = segment_targets(_scene())
    assert vision.shape == (4, sum(size for _, size in VISION_TARGETS)) == (4, 6 * K)
    assert audio.shape == (4, sum(size for _, size in AUDIO_TARGETS)) == (4, 2 * K + len(vocab.MOODS))
    drum, cello = vocab.CLASSES.index("drum"), vocab.CLASSES.index("cello")
    visible = vision[:, :K]
    assert visible[:, drum].tolist() == [0, 1, 1, 0] and visible[:, cello].tolist() == [1, 0, 0, 0]
    column = vision[:, K : K + K * COLUMNS].view(4, K, COLUMNS)
    assert column[1, drum, vocab.POSITIONS.index("right")] == 1 and column[1].sum() == 1
    assert column[0, cello, vocab.POSITIONS.index("left")] == 1 and column[3].sum() == 0
    row = vision[:, K + K * COLUMNS :].view(4, K, ROWS)
    assert row[2, drum, vocab.ROWS.index("top")] == 1 and row[0, cello, vocab.ROWS.index("bottom")] == 1
    sounding, loudest, mood = audio[:, :K], audio[:, K : 2 * K], audio[:, 2 * K :]
    assert sounding[:, drum].tolist() == [1, 1, 1, 1] and sounding[:, cello].tolist() == [0, 0, 1, 0]
    # the cello (0.7) is the loudest where both sound, the drum (0.4) everywhere else
    assert loudest[:, cello].tolist() == [0, 0, 1, 0] and loudest[:, drum].tolist() == [1, 1, 0, 1]
    assert (mood.argmax(1) == vocab.MOODS.index("calm")).all() and mood.sum() == 4


def test_a_converted_clip_without_scene_graph_is_refused_by_name():
    with pytest.raises(PretrainingDataError, match="clip 'ave-0001'.*media_pretraining: null"):
        segment_targets({"format": "avmt-annotation", "num_segments": 10, "answers": {}}, "ave-0001")


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory) -> Path:
    from avmt.data.shards import synthesize

    root = tmp_path_factory.mktemp("avsynth")
    synthesize(root, {"train": 12, "val": 4, "test": 4}, seed=5, progress=False)
    return root


def _model():
    from avmt.connectors import QFormerConnector
    from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder
    from avmt.llm import CausalLM
    from avmt.model import AVModel

    torch.manual_seed(0)
    return AVModel(
        CausalLM(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        ViTVisionEncoder(hidden_size=32, num_layers=1),
        Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, conv_dim=16),
        QFormerConnector(num_queries=2, hidden_size=32, num_layers=1),
        QFormerConnector(num_queries=2, hidden_size=32, num_layers=1),
    )


def test_pretraining_trains_caches_and_freezes_the_encoders(tiny_shards, tmp_path, monkeypatch):
    from avmt.data.shards import list_shards

    monkeypatch.setenv("AVMT_CACHE", str(tmp_path / "cache"))
    train, val = list_shards(tiny_shards / "train"), list_shards(tiny_shards / "val")
    model = _model()
    before = {k: v.clone() for k, v in model.vision_connector.state_dict().items()}
    stage = MediaPretraining(epochs=2, clips_per_batch=4, eval_clips=4)
    key = stage.fingerprint(model, train)
    curve = stage.apply(model, train, val)
    assert [point["epoch"] for point in curve] == [1, 2] and curve[-1]["step"] == 6
    assert all(0 <= point["vision_accuracy"] <= 1 and 0 <= point["mood_accuracy"] <= 1 and point["loss"] > 0 for point in curve)
    assert any(not torch.equal(before[k], v) for k, v in model.vision_connector.state_dict().items())
    assert not any(p.requires_grad for p in model.vision_encoder.parameters())
    assert not any(p.requires_grad for p in model.audio_encoder.parameters())
    assert all(p.requires_grad for p in model.vision_connector.parameters())
    folder = tmp_path / "cache" / "media-pretraining" / key
    assert (folder / "weights.pt").is_file() and (folder / "curve.json").is_file()

    # the same model and data again: loaded from the cache, not trained
    again = _model()
    monkeypatch.setattr(MediaPretraining, "_train", lambda *args: pytest.fail("trained although cached"))
    assert MediaPretraining(epochs=2, clips_per_batch=4, eval_clips=4).apply(again, train, val) == curve
    for name in ("vision_encoder", "audio_encoder", "vision_connector", "audio_connector"):
        for (k, a), b in zip(getattr(model, name).state_dict().items(), getattr(again, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{k}"

    # anything it depends on changes the fingerprint: settings, pixel normalization, data
    assert MediaPretraining(epochs=3).fingerprint(again, train) != MediaPretraining(epochs=2).fingerprint(again, train)
    changed = _model()
    changed.vision_encoder.pixel_mean.fill_(0.1)
    assert stage.fingerprint(changed, train) != stage.fingerprint(_model(), train)
    assert stage.fingerprint(_model(), train[:0]) != stage.fingerprint(_model(), train)


def test_base_pixel_normalization_is_avsynths_pixel_statistics():
    """experiments/base.yaml normalizes frames with AVSynth's per-channel mean and std (measured here)."""
    from avmt.data.shards import clip_from_index

    config = yaml.safe_load((REPO / "experiments" / "base.yaml").read_text())
    init = config["model"]["vision_encoder"]["init_args"]
    frames = torch.stack([clip_from_index(i, "train", 0).frames for i in range(60)]).float() / 255
    mean, std = frames.mean(dim=(0, 1, 3, 4)), frames.std(dim=(0, 1, 3, 4))
    assert torch.allclose(mean, torch.tensor(init["image_mean"]), atol=0.01), mean
    assert torch.allclose(std, torch.tensor(init["image_std"]), atol=0.01), std


@pytest.mark.parametrize("stage", ["validate", "test", "predict"])
def test_outside_fit_the_encoders_are_frozen_as_stage_1_left_them(stage):
    """validate / test / predict rebuild the model from the run's config (encoders ``freeze: false``, frozen by
    stage 1 during fit) and load the checkpoint: the encoders must be frozen there too, or a feature cache
    (which takes only frozen encoders) refuses the checkpoint of a run that trained on it."""
    from avmt.data.features import check_frozen
    from avmt.errors import UserError
    from avmt.module import AVModule

    model = _model()
    with pytest.raises(UserError, match="vision encoder is trainable"):
        check_frozen(model)
    parts = {name: getattr(model, name) for name in ("llm", "vision_encoder", "audio_encoder", "vision_connector",
                                                      "audio_connector")}
    module = AVModule(**parts, num_segments=10, media_pretraining=MediaPretraining(epochs=1))
    module.setup(stage)
    check_frozen(module.model)  # no error: frozen
    assert all(p.requires_grad for p in module.model.vision_connector.parameters())

    unfrozen = AVModule(**{name: getattr(_model(), name) for name in parts}, num_segments=10,
                        media_pretraining=MediaPretraining(epochs=1, freeze_encoders=False))
    unfrozen.setup(stage)
    assert all(p.requires_grad for p in unfrozen.model.vision_encoder.parameters())
