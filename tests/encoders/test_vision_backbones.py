"""ViTVisionEncoder on real backbone families loaded by path: CLIP, SigLIP and ViT.

Each family is a tiny random config saved with ``save_pretrained`` next to an image processor
config with non-default mean/std, then loaded through ``ViTVisionEncoder(model=path)`` and
compared with calling the vision tower directly.
"""

from __future__ import annotations

import re

import pytest
import torch

from avmt.encoders import ViTVisionEncoder

IMAGE_SIZE, PATCH_SIZE, WIDTH, LAYERS = 32, 8, 32, 3
NUM_PATCHES = (IMAGE_SIZE // PATCH_SIZE) ** 2  # 16
MEAN, STD = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)
TOWER = dict(hidden_size=WIDTH, intermediate_size=2 * WIDTH, num_hidden_layers=LAYERS, num_attention_heads=2,
             image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, vocab_size=64,
            max_position_embeddings=16, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def build_family(family: str):
    """(model to save, its vision tower, image processor, prefix tokens before the patches)."""
    import transformers as tf

    if family == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(text_config=TEXT, vision_config=TOWER, projection_dim=16))
        return model, model.vision_model, tf.CLIPImageProcessor(image_mean=MEAN, image_std=STD), 1
    if family == "clip_vision":
        model = tf.CLIPVisionModel(tf.CLIPVisionConfig(**TOWER))
        return model, model, tf.CLIPImageProcessor(image_mean=MEAN, image_std=STD), 1
    if family == "siglip":
        model = tf.SiglipModel(tf.SiglipConfig(text_config=TEXT, vision_config=TOWER))
        return model, model.vision_model, tf.SiglipImageProcessor(image_mean=MEAN, image_std=STD), 0
    if family == "siglip_vision":
        model = tf.SiglipVisionModel(tf.SiglipVisionConfig(**TOWER))
        return model, model, tf.SiglipImageProcessor(image_mean=MEAN, image_std=STD), 0
    if family == "vit":
        model = tf.ViTModel(tf.ViTConfig(**TOWER))  # with its pooler, as hub ViT checkpoints are
        return model, model, tf.ViTImageProcessor(image_mean=MEAN, image_std=STD), 1
    raise ValueError(family)


FAMILIES = ["clip", "clip_vision", "siglip", "siglip_vision", "vit"]


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """A saved tiny checkpoint of one family: (family, path, in-memory tower, prefix tokens)."""
    torch.manual_seed(0)
    model, tower, processor, prefix = build_family(request.param)
    path = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(path)
    processor.save_pretrained(path)
    return request.param, str(path), tower.eval(), prefix


def reference(tower, video: torch.Tensor, prefix: int, layer: int | None) -> torch.Tensor:
    """Patch tokens of ``tower`` on ``[B, T, 3, H, W]`` float video normalized with MEAN/STD."""
    pixels = (video.flatten(0, 1) - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)
    with torch.no_grad():
        out = tower(pixel_values=pixels, output_hidden_states=True)
    hidden = out.last_hidden_state if layer is None else out.hidden_states[layer]
    assert hidden.shape[1] == NUM_PATCHES + prefix
    return hidden[:, prefix:].reshape(*video.shape[:2], NUM_PATCHES, WIDTH)


def test_loads_by_path_with_processor_normalization_and_penultimate_layer(saved):
    family, path, tower, prefix = saved
    encoder = ViTVisionEncoder(model=path, select_layer=-2, freeze=True)
    assert encoder.pretrained is True
    assert encoder.num_patches == NUM_PATCHES and encoder.output_dim == WIDTH and encoder.grid == (4, 4)
    torch.testing.assert_close(encoder.pixel_mean.flatten(), torch.tensor(MEAN))
    torch.testing.assert_close(encoder.pixel_std.flatten(), torch.tensor(STD))
    video = torch.rand(2, 3, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        out = encoder(video)
    assert out.shape == (2, 3, NUM_PATCHES, WIDTH)
    assert torch.isfinite(out).all()
    # hidden_states[-2] of the tower with its prefix token (CLIP/ViT CLS; SigLIP has none) dropped
    torch.testing.assert_close(out, reference(tower, video, prefix, layer=-2), atol=1e-5, rtol=1e-5)


def test_default_layer_is_the_final_output(saved):
    family, path, tower, prefix = saved
    encoder = ViTVisionEncoder(model=path, freeze=True)
    video = torch.rand(1, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        out = encoder(video)
    torch.testing.assert_close(out, reference(tower, video, prefix, layer=None), atol=1e-5, rtol=1e-5)


def test_keeps_only_the_vision_tower(saved):
    family, path, _, _ = saved
    encoder = ViTVisionEncoder(model=path)
    expected = {"clip": "CLIPVisionModel", "clip_vision": "CLIPVisionModel", "siglip": "SiglipVisionModel",
                "siglip_vision": "SiglipVisionModel", "vit": "ViTModel"}[family]
    assert type(encoder.backbone).__name__ == expected
    assert not any("text" in name for name, _ in encoder.named_parameters())


def test_select_layer_out_of_range_is_a_clear_error(saved):
    _, path, _, _ = saved
    ViTVisionEncoder(model=path, select_layer=-(LAYERS + 1))  # the embeddings: still valid
    with pytest.raises(ValueError, match="select_layer"):
        ViTVisionEncoder(model=path, select_layer=-(LAYERS + 2))
    with pytest.raises(ValueError, match="select_layer"):
        ViTVisionEncoder(select_layer=5)  # the tiny default has 2 layers


def test_family_default_normalization_without_a_processor(tmp_path):
    import transformers as tf

    torch.manual_seed(0)
    tf.SiglipVisionModel(tf.SiglipVisionConfig(**TOWER)).save_pretrained(tmp_path / "siglip")
    tf.CLIPVisionModel(tf.CLIPVisionConfig(**TOWER)).save_pretrained(tmp_path / "clip")
    siglip = ViTVisionEncoder(model=str(tmp_path / "siglip"))
    torch.testing.assert_close(siglip.pixel_mean.flatten(), torch.full((3,), 0.5))
    clip = ViTVisionEncoder(model=str(tmp_path / "clip"), image_std=[1.0, 1.0, 1.0])  # explicit values win
    torch.testing.assert_close(clip.pixel_mean.flatten(), torch.tensor([0.48145466, 0.4578275, 0.40821073]))
    torch.testing.assert_close(clip.pixel_std.flatten(), torch.ones(3))


def selected(select_layer: int) -> int | None:
    """The ``reference`` layer of ``select_layer`` (``None``: the tower's final output)."""
    return None if select_layer == -1 else select_layer


@pytest.mark.parametrize("select_layer", [-1, -2])
def test_every_trainable_parameter_gets_a_gradient(saved, select_layer):
    family, path, tower, prefix = saved
    encoder = ViTVisionEncoder(model=path, select_layer=select_layer).train()
    video = torch.rand(1, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    encoder(video).sum().backward()
    trainable = {name: p for name, p in encoder.named_parameters() if p.requires_grad}
    assert trainable
    silent = [name for name, p in trainable.items() if p.grad is None]
    assert not silent, silent
    # what the output never passes through is dropped: the pooling parts, and the last layer at -2
    assert not any(".pooler." in name or ".head." in name for name in trainable)
    layers = {int(m.group(1)) for name in trainable if (m := re.search(r"\.layers?\.(\d+)\.", name))}
    assert layers == set(range(LAYERS if select_layer == -1 else LAYERS - 1))
    with torch.no_grad():
        out = encoder.eval()(video)
    torch.testing.assert_close(out, reference(tower, video, prefix, selected(select_layer)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("select_layer", [0, 1, LAYERS, -(LAYERS + 1)])
def test_a_trainable_tower_gives_the_towers_hidden_state_of_any_layer(saved, select_layer):
    family, path, tower, prefix = saved
    encoder = ViTVisionEncoder(model=path, select_layer=select_layer).eval()
    video = torch.rand(1, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    with torch.no_grad():
        out = encoder(video)
    torch.testing.assert_close(out, reference(tower, video, prefix, select_layer), atol=1e-5, rtol=1e-5)


def test_a_frozen_tower_is_kept_whole(saved):
    _, path, tower, _ = saved
    encoder = ViTVisionEncoder(model=path, select_layer=-2, freeze=True)
    assert encoder.backbone.state_dict().keys() == tower.state_dict().keys()


@pytest.mark.parametrize("select_layer", [-1, -2])
def test_dinov2_trainable_tower(tmp_path, select_layer):
    import transformers as tf

    torch.manual_seed(0)
    tower = tf.Dinov2Model(tf.Dinov2Config(**TOWER)).eval()
    tower.save_pretrained(tmp_path)
    encoder = ViTVisionEncoder(model=str(tmp_path), select_layer=select_layer, image_mean=MEAN, image_std=STD)
    video = torch.rand(1, 2, 3, IMAGE_SIZE, IMAGE_SIZE)
    encoder.train()(video).sum().backward()
    silent = [name for name, p in encoder.named_parameters() if p.requires_grad and p.grad is None]
    assert not silent, silent
    with torch.no_grad():
        out = encoder.eval()(video)
    torch.testing.assert_close(out, reference(tower, video, 1, selected(select_layer)), atol=1e-5, rtol=1e-5)
