"""Wav2Vec2AudioEncoder: shapes, window alignment, freeze switch."""

import pytest
import torch

from avmt.encoders import AudioEncoder, Wav2Vec2AudioEncoder


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return Wav2Vec2AudioEncoder(normalize=False).eval()


def test_shapes(encoder):
    audio = torch.randn(2, 4 * 4000)
    out = encoder(audio, num_segments=4)
    assert isinstance(encoder, AudioEncoder)
    assert out.shape == (2, 4, encoder.tokens_per_segment, encoder.output_dim) == (2, 4, 4, 64)
    assert torch.isfinite(out).all()
    assert encoder.pretrained is False


def test_remainder_dropped_and_short_window_rejected(encoder):
    assert encoder(torch.randn(1, 3 * 2000 + 2), num_segments=3).shape == (1, 3, 4, 64)
    with pytest.raises(ValueError, match="receptive field"):
        encoder(torch.randn(1, 300), num_segments=3)
    with pytest.raises(ValueError, match="Hz"):
        encoder(torch.randn(1, 8000), num_segments=2, sample_rate=8000)


def test_windows_align_to_segments(encoder):
    audio = torch.randn(1, 3 * 3200)
    changed = audio.clone()
    changed[0, 3200:6400] = torch.randn(3200)  # only window 1 changes
    a, b = encoder(audio, 3), encoder(changed, 3)
    torch.testing.assert_close(a[:, 0], b[:, 0])
    torch.testing.assert_close(a[:, 2], b[:, 2])
    assert not torch.allclose(a[:, 1], b[:, 1])


def test_more_tokens_than_frames_and_normalization():
    torch.manual_seed(0)
    enc = Wav2Vec2AudioEncoder(tokens_per_segment=8, hidden_size=32, num_heads=2, conv_dim=16)
    out = enc(torch.randn(2, 2 * 1600), num_segments=2)  # 4 frames per window, pooled to 8 tokens
    assert out.shape == (2, 2, 8, 32)
    enc.eval()
    x = torch.randn(1, 2 * 1600)
    # clip-level normalization: invariant to gain and offset
    torch.testing.assert_close(enc(x, 2), enc(3.0 * x + 0.5, 2), atol=1e-4, rtol=1e-4)


def test_freeze_switch():
    torch.manual_seed(0)
    enc = Wav2Vec2AudioEncoder(freeze=True)
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.backbone.training
    assert not enc(torch.randn(1, 2 * 1600), 2).requires_grad

    trainable = Wav2Vec2AudioEncoder().train()
    assert trainable.backbone.training
    trainable(torch.randn(1, 2 * 1600), 2).sum().backward()
    grads = [p.grad for p in trainable.parameters() if p.requires_grad]
    assert grads and all(g is not None for g in grads)


def test_local_checkpoint(tmp_path):
    torch.manual_seed(0)
    Wav2Vec2AudioEncoder(hidden_size=32, num_heads=2, conv_dim=16).backbone.save_pretrained(tmp_path)
    enc = Wav2Vec2AudioEncoder(model=str(tmp_path), tokens_per_segment=2, freeze=True)
    assert enc.pretrained is True and enc.output_dim == 32
    assert enc(torch.randn(1, 3 * 1600), 3).shape == (1, 3, 2, 32)
    assert all(not p.requires_grad for p in enc.parameters())
