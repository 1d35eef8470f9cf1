"""Every registered plugin, timm-style: it builds from its defaults at a tiny size, the forward has
the contract's shape and no NaN, and every trainable parameter receives a gradient."""

from __future__ import annotations

import importlib

import pytest
import torch

from avmt.connectors import QFormerConnector
from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder
from avmt.llm import CausalLM
from avmt.model import AVModel
from avmt.plugins import check_class_path, list_plugins

T = 4
TINY_ENCODERS = {
    "avmt.encoders.ViTVisionEncoder": dict(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2),
    "avmt.encoders.Wav2Vec2AudioEncoder": dict(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=2),
}


def build(class_path: str, **kwargs):
    module_name, _, class_name = class_path.rpartition(".")
    return getattr(importlib.import_module(module_name), class_name)(**kwargs)


def test_every_kind_has_plugins():
    for kind in ("vision_encoder", "audio_encoder", "connector", "llm", "adapter", "head"):
        assert list_plugins(kind), kind


@pytest.mark.parametrize("class_path", list_plugins("vision_encoder") + list_plugins("audio_encoder"))
def test_encoder_plugins(class_path):
    torch.manual_seed(0)
    encoder = build(class_path, **TINY_ENCODERS.get(class_path, {}))
    if "Vision" in class_path:
        out = encoder(torch.randint(0, 256, (2, T, 3, 32, 32), dtype=torch.uint8))
    else:
        out = encoder(torch.randn(2, T * 4000) * 0.1, T)
    assert out.shape[:2] == (2, T) and out.shape[-1] == encoder.output_dim
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in encoder.parameters() if p.requires_grad)


@pytest.mark.parametrize("class_path", list_plugins("connector"))
def test_connector_plugins(class_path):
    torch.manual_seed(0)
    connector = build(class_path)
    cross_modal = connector.context_modality is not None  # also reads the other modality: [B, T, Q, D_ctx]
    connector.build(24, 40, context_dim=16 if cross_modal else None)
    features = torch.randn(2, T, 5, 24, requires_grad=True)
    if cross_modal and not connector.reads_instruction:
        out = connector(features, torch.randn(2, T, 3, 16))
    elif connector.reads_instruction:  # the prompt as the LLM embeds it, [B, L, D_llm], the second one padded
        from avmt.connectors import Instruction

        out = connector(features, Instruction(torch.randn(2, 6, 40), torch.arange(6).expand(2, 6) < torch.tensor([[6], [4]])))
    else:
        out = connector(features)
    assert out.shape == (2, connector.num_tokens(T), 40)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in connector.parameters() if p.requires_grad)


@pytest.mark.parametrize("class_path", list_plugins("adapter"))
def test_adapter_plugins_train_every_parameter_inside_the_model(class_path, make_batch):
    torch.manual_seed(0)
    adapter = build(class_path, r=4, alpha=8, dropout=0.0)
    model = AVModel(
        CausalLM(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        ViTVisionEncoder(**TINY_ENCODERS["avmt.encoders.ViTVisionEncoder"]),
        Wav2Vec2AudioEncoder(**TINY_ENCODERS["avmt.encoders.Wav2Vec2AudioEncoder"]),
        QFormerConnector(num_queries=1, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        QFormerConnector(num_queries=1, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        adapter,
        num_segments=T,
    )
    with torch.no_grad():  # leave the zero-initialised B so that A and the routers get gradients too
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.02)
    frames = torch.randint(0, 256, (2, T, 3, 32, 32), dtype=torch.uint8)
    batch = make_batch(["<video> <audio> Which mood?"] * 2, frames, torch.randn(2, T * 4000) * 0.1, [0, 1],
                       targets=["<answer> calm </answer>", "<answer> sad </answer>"], model=model)
    out = model(batch)
    assert torch.isfinite(out.loss_sum).all()
    loss = out.mean_loss()
    aux = adapter.aux_loss()
    if aux is not None:
        loss = loss + aux
    loss.backward()
    adapter_parameters = adapter.trainable_parameters()
    assert adapter_parameters and all(p.requires_grad for p in adapter_parameters)
    # the new embedding rows of <video>/<audio> are overwritten by media tokens, and <seg>/<image> do not occur here
    silent = [
        name
        for name, p in model.named_parameters()
        if p.requires_grad and not name.endswith("embed_tokens.new_rows") and (p.grad is None or not p.grad.abs().sum())
    ]
    assert not silent, silent


@pytest.mark.parametrize("class_path", list_plugins("head"))
def test_head_plugins(class_path):
    """Every head: built lazily, [M, ...] out for M queries, no NaN, every parameter gets a gradient."""
    from avmt.outputs import EncodedMedia

    torch.manual_seed(0)
    head = build(class_path)
    head.build(40, 24, 16)
    media = EncodedMedia(
        frames=torch.randint(0, 256, (3, T, 3, 16, 16), dtype=torch.uint8),
        vision=torch.randn(3, T, 4, 24),
        grid=(2, 2),
        audio=torch.randn(3, T, 2, 16),
        levels=(torch.randn(3, T, 4, 24), torch.randn(3, T, 4, 24)),
    )
    group = head.group_size  # a head read at a token group gets [M, G, D_llm]
    out = head(torch.randn(3, 40) if group == 1 else torch.randn(3, group, 40), media)
    assert out.shape[:2] == (3, T) and torch.isfinite(out).all()
    loss = out.square().mean()
    back = head.feedback(out, media)  # a head that feeds its prediction back to the LLM: [M, D_llm]
    if back is not None:
        assert back.shape == (3, 40) and torch.isfinite(back).all()
        loss = loss + back.square().mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters() if p.requires_grad)


def test_unknown_class_path_error_lists_the_choices():
    with pytest.raises(ValueError, match="avmt.adapters.ILoRA.*avmt.adapters.LoRA|avmt.adapters.LoRA.*avmt.adapters.ILoRA"):
        check_class_path("adapter", "avmt.adapters.Nope", "model.adapter.class_path")
    check_class_path("adapter", "avmt.adapters.ILoRA", "model.adapter.class_path")
