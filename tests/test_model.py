"""AVModel: placeholder expansion, label masking, splicing, losses and generation on tiny plugins."""

from __future__ import annotations

import pytest
import torch

from avmt.adapters import ILoRA
from avmt.connectors import MLPConnector, QFormerConnector
from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder
from avmt.llm import CausalLM
from avmt.data.sample import MediaRef, iter_refs
from avmt.errors import UserError
from avmt.model import IGNORE_INDEX, AVModel

T = 4  # segments
SAMPLE_RATE = 16000


def build_model(**options) -> AVModel:
    """The tiny seeded model of these tests; ``options`` go to AVModel."""
    torch.manual_seed(0)
    return AVModel(
        CausalLM(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2),
        Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=2),
        QFormerConnector(num_queries=2, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        MLPConnector(tokens_per_segment=3, hidden_size=32),
        ILoRA(r=4, alpha=8, num_heads=3, dropout=0.0),
        num_segments=T,
        **options,
    )


@pytest.fixture(scope="module")
def model() -> AVModel:
    return build_model()


def media(clips: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(clips)
    frames = torch.randint(0, 256, (clips, T, 3, 32, 32), dtype=torch.uint8, generator=generator)
    audio = torch.randn(clips, T * SAMPLE_RATE // 4, generator=generator) * 0.1
    return frames, audio


def test_placeholders_expand_to_connector_token_counts(model):
    # <image> is one frame through the vision connector (no image_connector here): 2 queries
    assert model.placeholder_lengths == {"<video>": 2 * T, "<audio>": 3 * T, "<image>": 2}
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


def test_splicing_puts_each_feature_at_its_placeholder(model, make_batch):
    frames, audio = media(2)
    prompts = ["<video> <audio> Is the dog heard?", "<audio> <video> Where is it?", "<video> <audio> Why?"]
    batch = make_batch(prompts, frames, audio, [1, 0, 1])
    tokens = model.tokenize(prompts)
    with torch.no_grad():
        encoded = model.encode_media(frames, audio)
        features = model.media_tokens(encoded, {name: iter_refs(batch.media, name) for name in ("<video>", "<audio>")})
        embeds = model.embed(tokens.input_ids, encoded, batch.media)
        plain = model.llm.embed(tokens.input_ids)
    for name in ("<video>", "<audio>"):
        for row in range(3):
            positions = (tokens.input_ids[row] == model.placeholder_ids[name]).nonzero().squeeze(1)
            torch.testing.assert_close(embeds[row, positions], features[name][row])
    # samples of the same clip get the same tokens
    torch.testing.assert_close(features["<video>"][0], features["<video>"][2])
    assert not torch.allclose(features["<video>"][0], features["<video>"][1])
    text = (tokens.input_ids != model.placeholder_ids["<video>"]) & (tokens.input_ids != model.placeholder_ids["<audio>"])
    torch.testing.assert_close(embeds[text], plain[text])


def test_image_placeholder_takes_its_segment_frame_features_and_time_code(model, make_batch):
    frames, audio = media(2)
    prompts = ["<image> <audio> Where?", "<image> <audio> Where?"]
    batch = make_batch(prompts, frames, audio, [0, 0])
    batch.media[1] = (MediaRef("<image>", 0, segment=2), MediaRef("<audio>", 0))
    tokens = model.tokenize(prompts)
    assert int((tokens.input_ids[0] == model.placeholder_ids["<image>"]).sum()) == model.placeholder_lengths["<image>"]
    with torch.no_grad():
        encoded = model.encode_media(frames, audio)
        embeds = model.embed(tokens.input_ids, encoded, batch.media)
        expected = model.vision_connector(encoded.vision[0, 2][None, None]) + model.segment_embedding.weight[2]
    positions = (tokens.input_ids[1] == model.placeholder_ids["<image>"]).nonzero().squeeze(1)
    torch.testing.assert_close(embeds[1, positions], expected[0])
    assert not torch.allclose(embeds[0, positions], embeds[1, positions])


def test_placeholders_and_media_references_must_match(model, make_batch):
    frames, audio = media(1)
    batch = make_batch(["<video> <audio> Why?"], frames, audio, [0])
    tokens = model.tokenize(["<video> <video> <audio> Why?"])
    with torch.no_grad(), pytest.raises(ValueError, match="<video>.*match one to one"):
        model.embed(tokens.input_ids, model.encode_media(frames, audio), batch.media)


def test_several_clips_per_sample_each_placeholder_takes_its_clip(model, make_batch):
    frames, audio = media(3)
    prompts = ["<audio> <video> <video> Which video matches the sound?"]
    batch = make_batch(prompts, frames, audio, [0])
    batch.media[0] = (MediaRef("<audio>", 2), MediaRef("<video>", 0), MediaRef("<video>", 1))
    tokens = model.tokenize(prompts)
    with torch.no_grad():
        encoded = model.encode_media(frames, audio)
        embeds = model.embed(tokens.input_ids, encoded, batch.media)
        video = model._add_time_codes(model.vision_connector(encoded.vision))
        sound = model._add_time_codes(model.audio_connector(encoded.audio))
    positions = (tokens.input_ids[0] == model.placeholder_ids["<video>"]).nonzero().squeeze(1)
    torch.testing.assert_close(embeds[0, positions], torch.cat([video[0], video[1]]))
    positions = (tokens.input_ids[0] == model.placeholder_ids["<audio>"]).nonzero().squeeze(1)
    torch.testing.assert_close(embeds[0, positions], sound[2])


def test_media_features_depend_on_their_own_clip_only(model):
    frames, audio = media(2)
    with torch.no_grad():
        before = model.encode_media(frames, audio)
        frames2 = frames.clone()
        frames2[1] = 255 - frames2[1]
        after = model.encode_media(frames2, audio)
    torch.testing.assert_close(after.vision[0], before.vision[0])
    assert not torch.allclose(after.vision[1], before.vision[1])
    torch.testing.assert_close(after.audio, before.audio)
    assert after.frames.shape == (2, T, 3, 32, 32) and after.grid == (2, 2)
    assert after.vision.shape[:3] == (2, T, 4)


def test_forward_returns_summed_losses_and_counts_and_trains_only_new_parameters(model, make_batch):
    frames, audio = media(2)
    prompts = ["<video> <audio> Is the dog heard?", "<video> <audio> Which mood?"]
    targets = ["<answer> yes </answer>", "So the mood of the clip is <answer> calm </answer>."]
    batch = make_batch(prompts, frames, audio, [0, 1], targets=targets, model=model)
    tokens = batch.tokens
    out = model(batch, return_logits=True)
    assert out.loss_sum.shape == out.token_count.shape == (2,)
    assert out.token_count.tolist() == [float((tokens.labels[i] != IGNORE_INDEX).sum()) for i in range(2)]
    assert torch.isfinite(out.loss_sum).all() and (out.loss_sum > 0).all()
    # the shifted loss equals a direct cross-entropy on the returned logits
    direct = torch.nn.functional.cross_entropy(out.logits[0, :-1], tokens.labels[0, 1:], ignore_index=IGNORE_INDEX,
                                               reduction="sum")
    torch.testing.assert_close(out.loss_sum[0], direct)
    out.loss_sum.sum().backward()
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable, "nothing to train"
    base = [n for n in trainable if n.startswith("llm.") and "lora_" not in n and "new_" not in n and "extra" not in n]
    assert not base, f"frozen LLM weights became trainable: {base[:5]}"
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    # B is zero-initialised, so A and the router receive no gradient on the first step; all else does
    assert all("lora_A" in n or "lora_router" in n for n in missing), missing
    model.zero_grad()


def test_states_at_requested_tokens_are_the_final_hidden_states_that_predict_them(model, make_batch):
    frames, audio = media(2)
    prompts = ["<video> <audio> Is the dog heard?", "<video> <audio> Which mood?"]
    targets = ["<answer> yes </answer>", "<answer> calm </answer>"]
    batch = make_batch(prompts, frames, audio, [0, 1], targets=targets, model=model)
    with torch.no_grad():
        out = model(batch, state_tokens=["<answer>"])
        embeds = model.embed(batch.tokens.input_ids, out.media, batch.media)
        hidden = model.llm(inputs_embeds=embeds, attention_mask=batch.tokens.attention_mask,
                           output_hidden_states=True).hidden_states[-1]
    answer_id = model.llm.placeholder_id("<answer>")
    rows, positions = torch.nonzero(batch.tokens.labels[:, 1:] == answer_id, as_tuple=True)
    assert rows.tolist() == [0, 1] == out.states["<answer>"].rows.tolist()
    torch.testing.assert_close(out.states["<answer>"].values, hidden[rows, positions])


def test_generate_returns_one_string_per_prompt(model, make_batch):
    frames, audio = media(1)
    batch = make_batch(["<video> <audio> Is the dog heard?"] * 2, frames, audio, [0, 0])
    answers = model.generate(batch, max_new_tokens=5).texts
    assert len(answers) == 2 and all(isinstance(a, str) for a in answers)
    assert answers[0] == answers[1]  # same prompt, same clip, greedy


@pytest.fixture(scope="module")
def instructed_model() -> AVModel:
    torch.manual_seed(0)
    from avmt.connectors import InstructQFormerConnector

    return AVModel(
        CausalLM(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=1, num_heads=2),
        Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=2),
        InstructQFormerConnector(num_queries=2, hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64),
        MLPConnector(tokens_per_segment=3, hidden_size=32),
        ILoRA(r=4, alpha=8, num_heads=3, dropout=0.0),
        num_segments=T,
    ).eval()


def _connector_outputs(model, run) -> torch.Tensor:
    """The vision connector's output ``[n_refs, N, D]`` during ``run()``."""
    seen = []
    handle = model.vision_connector.register_forward_hook(lambda module, args, out: seen.append(out))
    try:
        run()
    finally:
        handle.remove()
    return torch.cat(seen)


def test_a_connector_that_reads_the_prompt_sees_its_question_and_never_its_answer(instructed_model, make_batch):
    model = instructed_model
    frames, audio = media(1)
    prompts = ["<video> <audio> Is the dog heard?", "<video> <audio> Is the dog heard?", "<video> <audio> Where is it?"]
    targets = ["<answer> yes </answer>", "<answer> no, it is not heard at all </answer>", "<answer> yes </answer>"]
    batch = make_batch(prompts, frames, audio, [0, 0, 0], targets=targets, model=model)
    with torch.no_grad():
        trained = _connector_outputs(model, lambda: model(batch))
        generated = _connector_outputs(model, lambda: model.generate(batch, max_new_tokens=2))
    torch.testing.assert_close(trained[0], trained[1])  # same question, different answers: same media tokens
    assert (trained[0] - trained[2]).abs().max() > 1e-4  # another question: other tokens
    torch.testing.assert_close(trained, generated)  # teacher forcing reads what generation reads


class _AudioGuided(MLPConnector):
    """A test connector that reads the audio: its tokens are the MLP's plus a projection of the
    mean audio feature of their segment (so each segment's tokens depend on that segment's sound)."""

    context_modality = "audio"

    def _build(self, in_dim: int, out_dim: int) -> None:
        super()._build(in_dim, out_dim)
        self.from_audio = torch.nn.Linear(self.context_dim, out_dim)

    def forward(self, features: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens = super().forward(features)  # [n, T*k, D]
        sound = self.from_audio(context.mean(dim=2))  # [n, T, D]
        return tokens + sound.repeat_interleave(tokens.shape[1] // features.shape[1], dim=1)


@pytest.fixture(scope="module")
def cross_modal_model() -> AVModel:
    torch.manual_seed(0)
    return AVModel(
        CausalLM(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64),
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=2,
                         feature_layers=[1, 2]),
        Wav2Vec2AudioEncoder(hidden_size=24, num_layers=1, num_heads=2, tokens_per_segment=2),
        _AudioGuided(tokens_per_segment=2, hidden_size=32),
        MLPConnector(tokens_per_segment=3, hidden_size=32),
        num_segments=T,
    ).eval()


def test_a_cross_modal_connector_gets_the_same_clips_and_segments_of_the_other_modality(cross_modal_model, make_batch):
    model = cross_modal_model
    assert model.vision_connector.context_dim == 24  # built with the audio encoder's width
    frames, audio = media(2)
    prompts = ["<video> <audio> Why?", "<image> <audio> Where?"]
    batch = make_batch(prompts, frames, audio, [1, 0])
    batch.media[1] = (MediaRef("<image>", 0, segment=2), MediaRef("<audio>", 0))
    tokens = model.tokenize(prompts)
    with torch.no_grad():
        encoded = model.encode_media(frames, audio)
        embeds = model.embed(tokens.input_ids, encoded, batch.media)
        video = model.vision_connector(encoded.vision[1:2], encoded.audio[1:2]) + model.segment_embedding.weight.repeat_interleave(2, 0)
        image = model.vision_connector(encoded.vision[0:1, 2:3], encoded.audio[0:1, 2:3]) + model.segment_embedding.weight[2]
        silent = model.vision_connector(encoded.vision[1:2], torch.zeros_like(encoded.audio[1:2]))
    torch.testing.assert_close(embeds[0, tokens.input_ids[0] == model.placeholder_ids["<video>"]], video[0])
    torch.testing.assert_close(embeds[1, tokens.input_ids[1] == model.placeholder_ids["<image>"]], image[0])
    assert not torch.allclose(video[0] - model.segment_embedding.weight.repeat_interleave(2, 0), silent[0])


def test_feature_layers_reach_the_heads_as_levels_of_the_same_pass(cross_modal_model):
    model = cross_modal_model
    frames, audio = media(2)
    with torch.no_grad():
        encoded = model.encode_media(frames, audio)
        pixels = model.vision_encoder.preprocess(encoded.frames.flatten(0, 1))
        hidden = model.vision_encoder.backbone(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(encoded.levels) == 2
    for level, layer in zip(encoded.levels, (1, 2)):
        assert level.shape == encoded.vision.shape
        torch.testing.assert_close(level.flatten(0, 1), hidden[layer][:, 1:])  # CLS dropped
    assert not torch.allclose(encoded.levels[0], encoded.levels[1])
    taken = encoded.take(torch.tensor([1, 1, 0]))
    torch.testing.assert_close(taken.levels[1][2], encoded.levels[1][0])
    with pytest.raises(UserError, match="feature_layers"):
        model.encode_media(frames, audio, vision_features=encoded.vision, audio_features=encoded.audio)


def test_feature_layers_deeper_than_the_selected_layer_are_refused():
    with pytest.raises(UserError, match="deeper than select_layer"):
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=3, num_heads=2,
                         select_layer=-2, feature_layers=[3])


def test_media_token_rms_rescales_each_connector_token_before_its_time_code(make_batch):
    plain, scaled = build_model(), build_model(media_token_rms=0.5)
    frames, audio = media(2)
    prompts = ["<video> <audio> Is the dog heard?", "<audio> <video> Where is it?"]
    batch = make_batch(prompts, frames, audio, [1, 0])
    refs = {name: iter_refs(batch.media, name) for name in ("<video>", "<audio>")}
    with torch.no_grad():
        before = plain.media_tokens(plain.encode_media(frames, audio), refs)
        after = scaled.media_tokens(scaled.encode_media(frames, audio), refs)
        codes = scaled.segment_embedding.weight
    for name, per_segment in (("<video>", 2), ("<audio>", 3)):
        time_codes = codes.repeat_interleave(per_segment, dim=0)
        raw, rescaled = before[name] - time_codes, after[name] - time_codes  # same seed: same weights and codes
        rms = rescaled.pow(2).mean(-1).sqrt()
        torch.testing.assert_close(rms, torch.full_like(rms, 0.5), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rescaled, raw * (0.5 / raw.pow(2).mean(-1, keepdim=True).sqrt()), rtol=1e-4, atol=1e-5)
        assert not torch.allclose(raw.pow(2).mean(-1).sqrt(), rms)  # the connector's own scale differs
    with pytest.raises(UserError, match="media_token_rms must be > 0"):
        build_model(media_token_rms=0.0)


def test_time_word_rms_adds_each_segments_time_word_embedding_to_its_media_tokens(make_batch):
    plain, worded = build_model(), build_model(time_word_rms=0.7)
    worded.set_time_words([str(s) for s in range(T)])
    frames, audio = media(2)
    batch = make_batch(["<video> <audio> When is it heard?", "<audio> <video> When?"], frames, audio, [1, 0])
    refs = {name: iter_refs(batch.media, name) for name in ("<video>", "<audio>")}
    with torch.no_grad():
        before = plain.media_tokens(plain.encode_media(frames, audio), refs)
        after = worded.media_tokens(worded.encode_media(frames, audio), refs)
        digit_ids = worded.tokenizer.convert_tokens_to_ids([str(s) for s in range(T)])
        digits = worded.llm.model.get_input_embeddings()(torch.tensor(digit_ids))  # [T, D]
    expected_words = digits * 0.7 / (digits.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()  # rms_norm, eps 1e-6
    for name, per_segment in (("<video>", 2), ("<audio>", 3)):
        added = after[name] - before[name]  # same seed: same weights and learned codes
        torch.testing.assert_close(added, expected_words.repeat_interleave(per_segment, dim=0).expand_as(added),
                                   rtol=1e-4, atol=1e-5)
    # the code is the word's embedding row itself (trained in full with the tiny LLM's embed_tokens)
    rows = worded.llm.model.get_input_embeddings().base.weight.requires_grad_(True)
    worded.time_codes().sum().backward()
    touched = rows.grad.abs().sum(-1).nonzero().flatten().tolist()
    assert touched == sorted(digit_ids)


def test_time_words_follow_the_answer_format_and_must_be_known():
    from avmt.tasks.formats import DiscreteTokens

    model = build_model(time_word_rms=1.0, segment_embedding=False)
    with pytest.raises(RuntimeError, match="set_time_words was never called"):
        model.time_codes()
    fmt = DiscreteTokens(num_segments=T)
    with pytest.raises(UserError, match="does not know the time word"):
        model.set_time_words([fmt.time(s) for s in range(T)])  # <t_s> are not tokens of this LLM
    with pytest.raises(UserError, match="one time word per segment"):
        model.set_time_words(["0", "1"])
    model.set_time_words(["3", "2", "1", "0"])
    codes = model.time_codes()  # no learned code: the words alone, at RMS 1
    torch.testing.assert_close(codes.pow(2).mean(-1).sqrt(), torch.ones(T), rtol=0, atol=1e-2)  # eps 1e-6
    model.set_time_words(["0", "1", "2", "3"])
    torch.testing.assert_close(model.time_codes(), codes.flip(0))
    model.set_time_words(["10", "1", "0", "2"])  # "10" is two tokens: its code is their mean, rescaled
    unscaled = model.llm.embed(torch.tensor([model.tokenizer.convert_tokens_to_ids(["1", "0"])])).mean(1)[0]
    expected = unscaled / (unscaled.pow(2).mean() + 1e-6).sqrt()
    with torch.no_grad():
        got = model.time_codes()
    torch.testing.assert_close(got[0], expected, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got[1:], codes.flip(0)[[1, 0, 2]])
    assert not any(key.startswith("_time_word") for key in model.state_dict())  # derived from the words, not saved
    with pytest.raises(UserError, match="time_word_rms must be > 0"):
        build_model(time_word_rms=-1.0)
