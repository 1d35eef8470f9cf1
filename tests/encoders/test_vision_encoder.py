"""ViTVisionEncoder: shapes, resizing, normalization, layer selection, freeze switch."""

import pytest
import torch

from avmt.encoders import VisionEncoder, ViTVisionEncoder


@pytest.fixture(scope="module")
def encoder():
    torch.manual_seed(0)
    return ViTVisionEncoder()


def test_shapes_uint8_and_resize(encoder):
    video = torch.randint(0, 256, (2, 3, 3, 48, 40), dtype=torch.uint8)  # resized to 64x64 inside
    out = encoder(video)
    assert isinstance(encoder, VisionEncoder)
    assert encoder.num_patches == 16 and encoder.output_dim == 64
    assert out.shape == (2, 3, encoder.num_patches, encoder.output_dim)
    assert torch.isfinite(out).all()
    assert encoder.pretrained is False


def test_uint8_equals_float_in_unit_range(encoder):
    video = torch.randint(0, 256, (1, 2, 3, 64, 64), dtype=torch.uint8)
    encoder.eval()
    torch.testing.assert_close(encoder(video), encoder(video.float() / 255.0))


def test_frames_are_encoded_independently(encoder):
    encoder.eval()
    video = torch.rand(1, 3, 3, 64, 64)
    changed = video.clone()
    changed[0, 1] = torch.rand(3, 64, 64)
    a, b = encoder(video), encoder(changed)
    torch.testing.assert_close(a[:, 0], b[:, 0])
    torch.testing.assert_close(a[:, 2], b[:, 2])
    assert not torch.allclose(a[:, 1], b[:, 1])


def test_select_layer_and_custom_config():
    torch.manual_seed(0)
    enc = ViTVisionEncoder(
        image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2, select_layer=-2
    )
    out = enc(torch.rand(2, 1, 3, 32, 32))
    assert out.shape == (2, 1, 16, 32)
    with pytest.raises(ValueError):
        enc(torch.rand(2, 3, 32, 32))  # missing the T axis


def test_freeze_switch():
    torch.manual_seed(0)
    enc = ViTVisionEncoder(freeze=True)
    assert all(not p.requires_grad for p in enc.parameters())
    enc.train()
    assert not enc.backbone.training  # a frozen backbone stays in eval mode
    out = enc(torch.rand(1, 2, 3, 64, 64))
    assert not out.requires_grad

    trainable = ViTVisionEncoder(freeze=False)
    trainable.train()
    assert trainable.backbone.training
    trainable(torch.rand(1, 2, 3, 64, 64)).sum().backward()
    assert all(p.grad is not None for p in trainable.parameters() if p.requires_grad)


def test_local_vit_checkpoint(tmp_path):
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                    intermediate_size=64)
    ViTModel(cfg).save_pretrained(tmp_path)
    enc = ViTVisionEncoder(model=str(tmp_path), freeze=True)
    assert enc.pretrained is True and enc.num_patches == 16 and enc.output_dim == 32
    assert enc(torch.randint(0, 256, (1, 2, 3, 50, 50), dtype=torch.uint8)).shape == (1, 2, 16, 32)
    assert all(not p.requires_grad for p in enc.parameters())


def test_local_clip_checkpoint_keeps_vision_tower(tmp_path):
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(0)
    cfg = CLIPConfig(
        text_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=50, max_position_embeddings=16),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=28, patch_size=14),
        projection_dim=16,
    )
    CLIPModel(cfg).save_pretrained(tmp_path)
    enc = ViTVisionEncoder(model=str(tmp_path), select_layer=-2)
    assert type(enc.backbone).__name__ == "CLIPVisionModel"
    assert enc.num_patches == 4 and enc.output_dim == 32
    torch.testing.assert_close(enc.pixel_mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    assert enc(torch.rand(2, 1, 3, 28, 28)).shape == (2, 1, 4, 32)


@pytest.mark.parametrize("select_layer", [-1, -2, 0])
def test_tiny_trainable_encoder_every_parameter_gets_a_gradient(select_layer):
    torch.manual_seed(0)
    enc = ViTVisionEncoder(image_size=32, patch_size=8, hidden_size=32, num_layers=3, num_heads=2,
                           select_layer=select_layer).train()
    enc(torch.rand(1, 2, 3, 32, 32)).sum().backward()
    silent = [name for name, p in enc.named_parameters() if p.requires_grad and p.grad is None]
    assert not silent, silent
