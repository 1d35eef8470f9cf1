"""Whisper, AST and CLAP audio encoders: loaded by path with their own feature extractors.

Each family is a tiny random config saved with ``save_pretrained`` next to a feature extractor
config with non-default settings, loaded through the encoder by path, and checked for the
contract (``[B, S] -> [B, T, Q, D]``, window t -> segment t only), gradients, freezing, and
torch features equal to the official transformers feature extractor's.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from avmt.encoders import ASTAudioEncoder, AudioEncoder, CLAPAudioEncoder, WhisperAudioEncoder

# AST's 128 Kaldi bins leave one mel filter empty; the official ASTFeatureExtractor warns about it
pytestmark = pytest.mark.filterwarnings("ignore:At least one mel filter has all zero values")

ENCODERS = {"whisper": WhisperAudioEncoder, "ast": ASTAudioEncoder, "clap": CLAPAudioEncoder}
WINDOW_SECONDS = 0.25
T = 3


def save_whisper(path) -> dict:
    """A 128-bin, 1 s Whisper (encoder + decoder, as hub checkpoints are) and its extractor."""
    import transformers as tf

    config = tf.WhisperConfig(
        num_mel_bins=128, d_model=32, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=64,
        decoder_layers=1, decoder_attention_heads=2, decoder_ffn_dim=64, vocab_size=64,
        max_target_positions=16, max_source_positions=50,
        pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
    )
    tf.WhisperModel(config).save_pretrained(path)
    tf.WhisperFeatureExtractor(feature_size=128, chunk_length=1).save_pretrained(path)
    return dict(width=32, sample_rate=16000)


def save_ast(path) -> dict:
    """A 64-bin, 150-frame AST classifier (its ASTModel is kept) and an extractor with its own mean/std."""
    import transformers as tf

    config = tf.ASTConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                          num_mel_bins=64, max_length=150, num_labels=3)
    tf.ASTForAudioClassification(config).save_pretrained(path)
    tf.ASTFeatureExtractor(num_mel_bins=64, max_length=150, mean=-3.0, std=3.0).save_pretrained(path)
    return dict(width=32, sample_rate=16000)


def save_clap(path) -> dict:
    """A fused dual-tower CLAP (32 mel bins, 1 s at 48 kHz) and its fusion-mode extractor."""
    import transformers as tf

    audio = dict(num_mel_bins=32, spec_size=64, patch_embeds_hidden_size=16, hidden_size=32, depths=[1, 1],
                 num_attention_heads=[2, 2], enable_fusion=True, fusion_type="aff_2d",
                 hidden_dropout_prob=0.0)
    text = dict(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                intermediate_size=32, max_position_embeddings=32,
                pad_token_id=1, bos_token_id=0, eos_token_id=2)
    tf.ClapModel(tf.ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).save_pretrained(path)
    extractor = tf.ClapFeatureExtractor(feature_size=32, max_length_s=1, truncation="fusion",
                                        padding="repeatpad")
    extractor.save_pretrained(path)
    return dict(width=32, sample_rate=48000)


SAVERS = {"whisper": save_whisper, "ast": save_ast, "clap": save_clap}


@pytest.fixture(scope="module", params=sorted(ENCODERS))
def checkpoint(request, tmp_path_factory):
    """(family, path, expected {width, sample_rate}) of a saved tiny checkpoint."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(request.param)
    expected = SAVERS[request.param](path)
    return request.param, str(path), expected


def clip_audio(sample_rate: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """``[batch, T * window]`` random waveform of T windows of WINDOW_SECONDS."""
    generator = torch.Generator().manual_seed(seed)
    return 0.1 * torch.randn(batch, T * int(WINDOW_SECONDS * sample_rate), generator=generator)


def official_features(family: str, extractor, window: np.ndarray) -> np.ndarray:
    """The transformers feature extractor's output for one window, as this encoder's layout."""
    out = extractor(window, sampling_rate=extractor.sampling_rate, return_tensors="np")
    if family == "whisper":
        return out["input_features"][0]  # [mels, frames]
    if family == "ast":
        return out["input_values"][0]  # [frames, mels]
    return out["input_features"][0, 0]  # [frames, mels] (first of the fused copies)


def torch_features(family: str, encoder, window: np.ndarray) -> np.ndarray:
    module = {"whisper": "log_mel", "ast": "fbank", "clap": "log_mel"}[family]
    return getattr(encoder, module)(torch.from_numpy(window)[None])[0].numpy()


def test_loads_by_path_with_its_feature_extractor(checkpoint):
    family, path, expected = checkpoint
    encoder = ENCODERS[family](model=path, tokens_per_segment=3).eval()
    assert isinstance(encoder, AudioEncoder) and encoder.pretrained is True
    assert encoder.sample_rate == expected["sample_rate"] and encoder.output_dim == expected["width"]
    assert not any("text" in name or "decoder" in name for name, _ in encoder.named_parameters())
    with torch.no_grad():
        out = encoder(clip_audio(encoder.sample_rate), num_segments=T, sample_rate=encoder.sample_rate)
    assert out.shape == (2, T, 3, expected["width"])
    assert torch.isfinite(out).all()


def test_torch_features_equal_the_official_extractor(checkpoint):
    from transformers import AutoFeatureExtractor

    family, path, _ = checkpoint
    encoder = ENCODERS[family](model=path)
    extractor = AutoFeatureExtractor.from_pretrained(path)
    samples = int(0.6 * extractor.sampling_rate)
    window = (0.1 * np.random.default_rng(0).standard_normal(samples)).astype(np.float32)
    ours, theirs = torch_features(family, encoder, window), official_features(family, extractor, window)
    assert ours.shape == theirs.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-4, rtol=0)


@pytest.mark.parametrize(
    "family, settings",
    [
        ("whisper", dict(feature_size=80)),  # 30 s, as released checkpoints
        ("whisper", dict(feature_size=128)),  # large-v3
        ("ast", dict()),  # AudioSet: 1024 frames x 128 bins
        ("clap", dict(truncation="rand_trunc", padding="repeatpad")),  # clap-htsat-unfused: Slaney mel bank
        ("clap", dict(truncation="fusion", padding="repeat", max_length_s=2)),
        ("clap", dict(truncation="rand_trunc", padding="pad", max_length_s=2)),
    ],
)
def test_torch_features_equal_the_official_extractor_at_checkpoint_settings(family, settings):
    import transformers as tf

    from avmt.encoders.ast import KaldiFbank
    from avmt.encoders.clap import ClapLogMel
    from avmt.encoders.whisper import WhisperLogMel

    extractor_class, module_class = {
        "whisper": (tf.WhisperFeatureExtractor, WhisperLogMel),
        "ast": (tf.ASTFeatureExtractor, KaldiFbank),
        "clap": (tf.ClapFeatureExtractor, ClapLogMel),
    }[family]
    extractor = extractor_class(**settings)
    features = module_class(extractor)
    one_second = extractor.sampling_rate
    window = (0.1 * np.random.default_rng(1).standard_normal(one_second)).astype(np.float32)
    ours = features(torch.from_numpy(window)[None])[0].numpy()
    np.testing.assert_allclose(ours, official_features(family, extractor, window), atol=1e-4, rtol=0)


def test_whisper_valid_frames_are_the_first_frames_of_the_chunk():
    import transformers as tf

    from avmt.encoders.whisper import WhisperLogMel

    extractor = tf.WhisperFeatureExtractor(feature_size=80, chunk_length=2)
    waveforms = 0.1 * torch.randn(2, 5050, generator=torch.Generator().manual_seed(2))
    padded = WhisperLogMel(extractor)(waveforms)
    valid = WhisperLogMel(extractor, pad_to_chunk=False)(waveforms)
    assert padded.shape == (2, 80, 200) and valid.shape == (2, 80, math.ceil(5050 / 160))
    torch.testing.assert_close(valid, padded[..., : valid.shape[-1]], atol=1e-5, rtol=0)


def test_segment_t_depends_only_on_window_t(checkpoint):
    family, path, _ = checkpoint
    encoder = ENCODERS[family](model=path).eval()
    audio = clip_audio(encoder.sample_rate, batch=1)
    window = audio.shape[1] // T
    changed = audio.clone()
    changed[0, window : 2 * window] = clip_audio(encoder.sample_rate, batch=1, seed=1)[0, :window]
    with torch.no_grad():
        before, after = encoder(audio, T), encoder(changed, T)
    torch.testing.assert_close(before[:, 0], after[:, 0])
    torch.testing.assert_close(before[:, 2], after[:, 2])
    assert not torch.allclose(before[:, 1], after[:, 1])
    # the same window alone, at another position in a batch, gives the same segment
    with torch.no_grad():
        alone = encoder(torch.cat([changed[:, window : 2 * window], audio[:, :window]]), 1)
    torch.testing.assert_close(alone[0, 0], after[0, 1], atol=1e-5, rtol=1e-5)


def test_every_trainable_parameter_gets_a_gradient(checkpoint):
    family, path, _ = checkpoint
    encoder = ENCODERS[family](model=path).train()
    assert encoder.backbone.training
    encoder(clip_audio(encoder.sample_rate), T).square().mean().backward()
    trainable = {name: p for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable
    silent = [name for name, p in trainable.items() if p.grad is None or not p.grad.abs().sum()]
    assert not silent, silent
    if family == "whisper":  # fixed sinusoids, as in transformers' Whisper
        assert not encoder.backbone.embed_positions.weight.requires_grad
    if family == "clap":  # fused checkpoint: the fusion branch only runs on clips longer than max_length_s
        fusion = encoder.backbone.audio_encoder.patch_embed.fusion_model
        assert not any(p.requires_grad for p in fusion.parameters())
        assert not encoder.backbone.audio_encoder.batch_norm.training


def test_frozen_backbone_has_no_gradients_and_stays_in_eval_mode(checkpoint):
    family, path, _ = checkpoint
    encoder = ENCODERS[family](model=path, freeze=True)
    assert all(not p.requires_grad for p in encoder.parameters())
    encoder.train()
    assert not encoder.backbone.training
    assert not encoder(clip_audio(encoder.sample_rate), T).requires_grad


def test_bfloat16_checkpoint(checkpoint):
    family, path, expected = checkpoint
    encoder = ENCODERS[family](model=path, dtype="bfloat16", freeze=True)
    out = encoder(clip_audio(encoder.sample_rate, batch=1), T)
    assert out.dtype == torch.bfloat16 and out.shape == (1, T, 4, expected["width"])
    assert torch.isfinite(out.float()).all()


def test_bad_input_is_a_clear_error(checkpoint):
    family, path, expected = checkpoint
    encoder = ENCODERS[family](model=path)
    rate = expected["sample_rate"]
    with pytest.raises(ValueError, match="longer than"):
        encoder(torch.zeros(1, 2 * encoder.max_window_samples + 2), num_segments=1)
    with pytest.raises(ValueError, match="Hz"):
        encoder(torch.zeros(1, rate), num_segments=2, sample_rate=rate // 2)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        encoder(torch.zeros(rate), num_segments=2)
    with pytest.raises(ValueError, match="sample_rate"):
        ENCODERS[family](model=path, sample_rate=rate // 2)


def test_window_steps_kept_for_one_second():
    """Only the backbone steps covering the window are kept, not those of the padding."""
    whisper, ast, clap = WhisperAudioEncoder(), ASTAudioEncoder(), CLAPAudioEncoder()
    with torch.no_grad():
        assert whisper.encode_windows(torch.randn(1, 16000)).shape[1] == 50  # 100 mel frames, stride 2
        assert ast.encode_windows(torch.randn(1, 16000)).shape[1] == 10  # 98 frames, time stride 10
        all_steps = clap.encode_windows(torch.randn(1, clap.max_window_samples)).shape[1]
        # 1 s of the 2 s input: the 100 frames centred inside the window, of 201
        assert clap.encode_windows(torch.randn(1, 48000)).shape[1] == math.ceil(all_steps * 100 / 201)


def test_extractor_that_does_not_fit_the_model_is_a_clear_error(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    tf.ASTModel(tf.ASTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                             num_mel_bins=64, max_length=150)).save_pretrained(tmp_path)
    tf.ASTFeatureExtractor(num_mel_bins=128, max_length=150).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="mel bins"):
        ASTAudioEncoder(model=str(tmp_path))
    tf.WhisperFeatureExtractor().save_pretrained(tmp_path)  # another family's extractor
    with pytest.raises(ValueError, match="WhisperFeatureExtractor"):
        ASTAudioEncoder(model=str(tmp_path))


def test_clap_audio_tower_saved_alone(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    config = tf.ClapAudioConfig(num_mel_bins=32, spec_size=64, patch_embeds_hidden_size=16, hidden_size=32,
                                depths=[1, 1], num_attention_heads=[2, 2])
    tf.ClapAudioModel(config).save_pretrained(tmp_path)
    # without a feature extractor: the family default (10 s = 1001 frames) does not fit this 128-frame tower
    with pytest.raises(ValueError, match="1001 frames"):
        CLAPAudioEncoder(model=str(tmp_path))
    tf.ClapFeatureExtractor(feature_size=32, max_length_s=1).save_pretrained(tmp_path)
    encoder = CLAPAudioEncoder(model=str(tmp_path), tokens_per_segment=2).eval()
    assert encoder.sample_rate == 48000 and encoder.log_mel.num_mel_bins == 32
    with torch.no_grad():
        assert encoder(clip_audio(48000), T).shape == (2, T, 2, 32)


@pytest.mark.parametrize("family", sorted(ENCODERS))
def test_default_tiny_encoder_builds_offline_and_trains(family):
    """What tests/test_plugins.py checks for every audio plugin, at the plugin's defaults."""
    torch.manual_seed(0)
    encoder = ENCODERS[family]()
    assert encoder.pretrained is False
    out = encoder(torch.randn(2, 4 * 4000) * 0.1, 4)
    assert out.shape == (2, 4, encoder.tokens_per_segment, encoder.output_dim)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)
    with torch.no_grad():  # Crab's 1 s windows, and MUSIC-AVQA's 2 s ones
        assert encoder(torch.randn(1, 2 * encoder.sample_rate), 2).shape[:2] == (1, 2)
        assert encoder(torch.randn(1, 2 * encoder.sample_rate), 1).shape[:2] == (1, 1)
