"""AVModel: placeholder expansion, label masking, splicing, losses and generation on tiny plugins."""

from __future__ import annotations

import pytest
import torch

from avmt.adapters import ILoRA
from avmt.connectors import MLPConnector, QFormerConnector
from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder
from avmt.llm import CausalLM
from avmt.model import IGNORE_INDEX, AVModel

T = 4  # segments
SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def model() -> AVModel:
    torch.manual_seed(0)
    return AVModel(
        CausalLM(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2),
        Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=2),
        QFormerConnector(num_queries=2, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        MLPConnector(tokens_per_segment=3, hidden_size=32),
        ILoRA(r=4, alpha=8, num_heads=3, dropout=0.0),
        num_segments=T,
    )


def media(clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(clips)
    frames = torch.randint(0, 256, (clips, T, 3, 32, 32), dtype=torch.uint8, generator=generator)
    audio = torch.randn(clips, T * SAMPLE_RATE // 4, generator=generator) * 0.1
    return frames, audio


def test_placeholders_expand_to_connector_token_counts(model):
    assert model.placeholder_lengths == {"<video>": 2 * T, "<audio>": 3 * T}
    tokens = model.tokenize(["<video> <audio> Which instrument sounds first?"], ["<answer> violin </answer>"])
    ids = tokens.input_ids[0]
    assert int((ids == model.placeholder_ids["<video>"]).sum()) == 2 * T
    assert int((ids == model.placeholder_ids["<audio>"]).sum()) == 3 * T


def test_labels_are_masked_over_prompt_and_padding(model):
    prompts = ["<video> <audio> Is the dog heard?", "<video> <audio> Which instrument sounds first?"]
    targets = ["<answer> yes </answer>", "The violin starts first. So the answer is <answer> violin </answer>."]
    tokens = model.tokenize(prompts, targets)
    tokenizer = model.tokenizer
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        labels = tokens.labels[row]
        kept = labels[labels != IGNORE_INDEX].tolist()
        assert kept == tokenizer(target, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        length = int(tokens.attention_mask[row].sum())
        # the target is the last part of the unpadded row; everything before it is prompt
        assert (labels[: length - len(kept)] == IGNORE_INDEX).all()
        assert (labels[length:] == IGNORE_INDEX).all()
        assert labels[length - len(kept) : length].tolist() == kept
    assert tokenizer.decode(tokens.input_ids[1][tokens.labels[1] != IGNORE_INDEX], skip_special_tokens=True) == targets[1]


def test_generation_prompts_are_left_padded(model):
    tokens = model.tokenize(["<video> <audio> Is the dog heard?", "<video> <audio> Which instrument sounds first in the clip?"])
    assert tokens.labels is None
    assert (tokens.attention_mask[:, -1] == 1).all()
    assert tokens.attention_mask[0, 0] == 0 or tokens.attention_mask[1, 0] == 0


def test_splicing_puts_each_feature_at_its_placeholder(model):
    frames, audio = media(2)
    tokens = model.tokenize(["<video> <audio> Is the dog heard?", "<audio> <video> Where is it?", "<video> <audio> Why?"])
    clip_index = torch.tensor([1, 0, 1])
    with torch.no_grad():
        features = model.encode_media(frames, audio)
        embeds = model.embed(tokens.input_ids, features, clip_index)
        plain = model.llm.embed(tokens.input_ids)
    for name, placeholder in model.placeholder_ids.items():
        for row in range(3):
            positions = (tokens.input_ids[row] == placeholder).nonzero().squeeze(1)
            torch.testing.assert_close(embeds[row, positions], features[name][clip_index[row]])
    text = (tokens.input_ids != model.placeholder_ids["<video>"]) & (tokens.input_ids != model.placeholder_ids["<audio>"])
    torch.testing.assert_close(embeds[text], plain[text])


def test_media_tokens_depend_on_their_own_clip_only(model):
    frames, audio = media(2)
    with torch.no_grad():
        before = model.encode_media(frames, audio)
        frames2 = frames.clone()
        frames2[1] = 255 - frames2[1]
        after = model.encode_media(frames2, audio)
    torch.testing.assert_close(after["<video>"][0], before["<video>"][0])
    assert not torch.allclose(after["<video>"][1], before["<video>"][1])
    torch.testing.assert_close(after["<audio>"], before["<audio>"])


def test_forward_returns_summed_losses_and_counts_and_trains_only_new_parameters(model):
    frames, audio = media(2)
    prompts = ["<video> <audio> Is the dog heard?", "<video> <audio> Which mood?"]
    targets = ["<answer> yes </answer>", "So the mood of the clip is <answer> calm </answer>."]
    tokens = model.tokenize(prompts, targets)
    out = model(tokens, frames, audio, torch.tensor([0, 1]))
    assert out.shape == (2, 2)
    assert out[:, 1].tolist() == [float((tokens.labels[i] != IGNORE_INDEX).sum()) for i in range(2)]
    assert torch.isfinite(out).all() and (out[:, 0] > 0).all()
    # the shifted loss matches a direct cross-entropy on the HF logits
    out[:, 0].sum().backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    base = [n for n in trainable if n.startswith("llm.") and "lora_" not in n and "new_" not in n and "extra" not in n]
    assert not base, f"frozen LLM weights became trainable: {base[:5]}"
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # B is zero-initialised, so A and the router receive no gradient on the first step; all else does
    assert all("lora_A" in n or "lora_router" in n for n in missing), missing
    model.zero_grad()


def test_generate_returns_one_string_per_prompt(model):
    frames, audio = media(1)
    answers = model.generate(["<video> <audio> Is the dog heard?"] * 2, frames, audio, torch.tensor([0, 0]), max_new_tokens=5)
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert answers[0] == answers[1]  # same prompt, same clip, greedy
