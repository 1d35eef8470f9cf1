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


def test_min_window_is_the_receptive_field(encoder):
    shortest = encoder.min_window_samples
    assert shortest == 400  # wav2vec2's conv stack: 25 ms at 16 kHz
    assert encoder.num_frames(shortest) == 1 and encoder.num_frames(shortest - 1) < 1
    assert encoder(torch.randn(1, 2 * shortest), num_segments=2).shape == (1, 2, 4, 64)


def test_window_seconds_centres_each_segments_window_on_it():
    """With window_seconds, segment t sees only the window centred on it (MUSIC-AVQA: 2 s windows of
    6 s segments); the rest of the segment changes nothing, and the window's own samples do."""
    torch.manual_seed(0)
    encoder = Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=2,
                                   normalize=False, window_seconds=0.25).eval()
    audio = torch.randn(1, 16000)  # 4 segments of 0.25 s... of a 1 s clip: windows of 0.25 s = the segments
    half = Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=2,
                                normalize=False, window_seconds=0.125)
    half.load_state_dict(encoder.state_dict())
    half.eval()
    with torch.no_grad():
        tiled = Wav2Vec2AudioEncoder.forward(encoder, audio, 4)
        encoder.window_seconds = None
        assert torch.allclose(tiled, encoder(audio, 4), atol=1e-6)  # a window as long as the segment: the tiling
        base = half(audio, 4)
        edges = audio.clone()
        edges[:, 4000:4000 + 1000] += 1.0  # first eighth of segment 1: outside its centred window
        assert torch.allclose(half(edges, 4)[:, 1], base[:, 1], atol=1e-6)
        centre = audio.clone()
        centre[:, 6000:6100] += 1.0  # the middle of segment 1
        changed = half(centre, 4)
        assert not torch.allclose(changed[:, 1], base[:, 1]) and torch.allclose(changed[:, 0], base[:, 0], atol=1e-6)
