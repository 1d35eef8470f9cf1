"""Qwen2.5-Omni as avmt plugins (avmt.omni), on a tiny random thinker saved to disk with a Qwen-style tokenizer.

The towers are checked against the thinker's own feature functions fed by transformers' own
processors (Whisper log-mel features, Qwen2-VL pixel patches), TMRoPE against the thinker's own
``get_rope_index`` on the equivalent Qwen-format input, and the whole AVModel (loss, gradients into
I-LoRA in the LLM and both towers, zero-B invariance, generation with the KV cache).
"""

from __future__ import annotations

import importlib
import inspect
import json
import re
from pathlib import Path
from unittest import mock

import pytest
import torch
import yaml

from avmt.adapters import ILoRA
from avmt.connectors import DirectConnector
from avmt.data.sample import Batch, MediaRef
from avmt.llm import CausalLM, MediaSpan
from avmt.model import AVModel
from avmt.omni import QwenOmniAudioEncoder, QwenOmniLM, QwenOmniVisionEncoder, WhisperLogMel, tmrope_position_ids
from avmt.plugins import MODULE_ARGUMENTS, check_class_path
from transformers import Qwen2_5OmniThinkerConfig, Qwen2_5OmniThinkerForConditionalGeneration

T = 4  # segments
IMAGE = 56  # frame size: 4 x 4 patches of 14 px -> 2 x 2 merged tokens per segment
AUDIO_TOKENS = 2  # per segment
SAMPLES = T * AUDIO_TOKENS * 640  # 640 samples = 40 ms = one audio token: the clip is exactly T x 2 tokens
SECONDS_PER_SEGMENT = AUDIO_TOKENS * 0.04
REPO = Path(__file__).resolve().parents[1]
QWEN_SPECIALS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|AUDIO|>", "<|audio_bos|>", "<|audio_eos|>",
    "<|IMAGE|>", "<|VIDEO|>", "<|vision_bos|>", "<|vision_eos|>",
]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
PROMPTS = ["<video> <audio> Is the dog heard?", "<video> <audio> Which mood does the whole clip have?"]
TARGETS = ["<answer> yes </answer>", "<answer> calm </answer>"]


def qwen_style_tokenizer():
    """A small byte-level BPE tokenizer with Qwen's special tokens and ChatML template (nothing downloaded)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=QWEN_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator([" ".join(PROMPTS + TARGETS)] * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=CHATML
    )


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> str:
    """A tiny random thinker and its tokenizer, saved like a Qwen2.5-Omni thinker checkpoint."""
    tokenizer = qwen_style_tokenizer()
    ids = {token: tokenizer.convert_tokens_to_ids(token) for token in QWEN_SPECIALS}
    config = Qwen2_5OmniThinkerConfig(
        text_config=dict(
            vocab_size=len(tokenizer) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=4096, tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            initializer_range=0.5,  # large random weights: the outputs depend on the positions
        ),
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=32,
                           fullatt_block_indexes=[1]),
        audio_config=dict(encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32, d_model=16, output_dim=32),
        audio_token_index=ids["<|AUDIO|>"], image_token_index=ids["<|IMAGE|>"], video_token_index=ids["<|VIDEO|>"],
        audio_start_token_id=ids["<|audio_bos|>"], audio_end_token_id=ids["<|audio_eos|>"],
        vision_start_token_id=ids["<|vision_bos|>"], vision_end_token_id=ids["<|vision_eos|>"],
    )
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("qwen_omni")
    Qwen2_5OmniThinkerForConditionalGeneration(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reference(checkpoint):
    """The same thinker loaded by transformers alone."""
    return Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained(checkpoint).eval()


def build_model(checkpoint: str, adapter: ILoRA | None) -> tuple[AVModel, int]:
    """An AVModel of the three Qwen plugins; also how many times the thinker was loaded for it."""
    load = Qwen2_5OmniThinkerForConditionalGeneration.from_pretrained
    with mock.patch.object(Qwen2_5OmniThinkerForConditionalGeneration, "from_pretrained", side_effect=load) as spy:
        model = AVModel(
            QwenOmniLM(checkpoint, seconds_per_segment=SECONDS_PER_SEGMENT),
            QwenOmniVisionEncoder(checkpoint, image_size=IMAGE),
            QwenOmniAudioEncoder(checkpoint, tokens_per_segment=AUDIO_TOKENS),
            DirectConnector(tokens_per_segment=4),
            DirectConnector(tokens_per_segment=AUDIO_TOKENS),
            adapter,
            num_segments=T,
            segment_embedding=False,
        )
    return model.eval(), spy.call_count


@pytest.fixture(scope="module")
def built(checkpoint):
    adapter = ILoRA(
        r=4, alpha=8, num_heads=2, dropout=0.0, scopes=["llm", "vision", "audio"],
        target_modules={"llm": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                        "vision": ["gate_proj", "up_proj", "down_proj"], "audio": ["q_proj", "k_proj", "v_proj"]},
    )
    return build_model(checkpoint, adapter)


@pytest.fixture(scope="module")
def model(built) -> AVModel:
    return built[0]


def media(clips: int, samples: int = SAMPLES, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (clips, T, 3, IMAGE, IMAGE), dtype=torch.uint8, generator=generator)
    audio = torch.randn(clips, samples, generator=generator) * 0.1
    return frames, audio


def make_batch(model: AVModel, prompts, targets=None) -> Batch:
    frames, audio = media(len(prompts))
    refs = [tuple(MediaRef(name, row) for name in re.findall(r"<video>|<audio>|<image>", p)) for row, p in enumerate(prompts)]
    batch = Batch(
        frames=frames, audio=audio, clip_keys=[f"clip-{i}" for i in range(len(prompts))], tasks=["test"] * len(prompts),
        prompts=list(prompts), targets=list(targets or [""] * len(prompts)), answers=[None] * len(prompts), media=refs,
    )
    if targets is not None:
        batch.tokens = model.tokenize(prompts, targets)
    return batch


# ---------------------------------------------------------------------------------------------- loading
def test_one_load_is_shared_by_the_three_plugins(built, reference):
    model, loads = built
    assert loads == 1
    thinker = model.llm.model
    assert thinker.model.visual is None and thinker.model.audio_tower is None  # towers live in the encoders only
    every = [id(p) for _, p in model.named_parameters(remove_duplicate=False)]
    assert len(every) == len(set(every)), "a weight is registered twice"
    # the LLM's weights are the checkpoint's
    torch.testing.assert_close(thinker.model.language_model.norm.weight, reference.model.language_model.norm.weight)
    assert isinstance(model.llm, CausalLM) and model.llm.pretrained


def test_a_full_omni_checkpoint_gives_its_thinker(checkpoint, reference, tmp_path):
    """The released layout: a qwen2_5_omni config around the thinker's, weights prefixed ``thinker.``
    next to the talker's (which are skipped)."""
    from safetensors.torch import load_file, save_file
    from transformers import Qwen2_5OmniConfig

    thinker_config = Qwen2_5OmniThinkerConfig.from_pretrained(checkpoint)
    Qwen2_5OmniConfig(thinker_config=thinker_config.to_dict(), enable_audio_output=False).save_pretrained(tmp_path)
    weights = {f"thinker.{name}": value for name, value in load_file(Path(checkpoint) / "model.safetensors").items()}
    weights["talker.model.norm.weight"] = torch.ones(4)
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    vision = QwenOmniVisionEncoder(str(tmp_path), image_size=IMAGE)
    for name, value in reference.model.visual.state_dict().items():
        torch.testing.assert_close(vision.backbone.state_dict()[name], value)


def test_bad_arguments_name_the_argument(checkpoint, tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        QwenOmniVisionEncoder(checkpoint, image_size=50)
    with pytest.raises(ValueError, match="model must name a Qwen2.5-Omni checkpoint"):
        QwenOmniAudioEncoder(None)
    with pytest.raises(ValueError, match="tokens_per_segment"):
        QwenOmniAudioEncoder(checkpoint, tokens_per_segment=0)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="holds a 'llama' model"):
        QwenOmniLM(str(tmp_path))
    with pytest.raises(ValueError, match="dtype"):
        QwenOmniVisionEncoder(checkpoint, dtype="float8")


# ---------------------------------------------------------------------------------------------- towers
def test_log_mel_matches_whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    extractor = WhisperFeatureExtractor(feature_size=128)
    generator = torch.Generator().manual_seed(1)
    times = torch.arange(20810) / 16000
    waveforms = torch.stack([torch.randn(20810, generator=generator) * 0.3, torch.sin(2 * torch.pi * 440 * times)])
    ours = WhisperLogMel(num_mel_bins=128)(waveforms)
    for row, waveform in enumerate(waveforms):
        theirs = extractor(waveform.numpy(), sampling_rate=16000, return_tensors="pt", return_attention_mask=True)
        frames = int(theirs["attention_mask"].sum())
        assert ours.shape[1:] == (128, frames)
        torch.testing.assert_close(ours[row], theirs["input_features"][0, :, :frames], atol=2e-5, rtol=1e-5)


def test_pixel_patches_match_qwen_image_processor(checkpoint):
    from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    encoder = QwenOmniVisionEncoder(checkpoint, image_size=IMAGE)
    frames, _ = media(2)
    pixel_values, grid_thw = encoder.pixel_patches(frames)
    assert grid_thw.tolist() == [[T, 4, 4]] * 2
    processor = Qwen2VLImageProcessorPil(do_resize=False, image_mean=OPENAI_CLIP_MEAN, image_std=OPENAI_CLIP_STD)
    images = [frame.permute(1, 2, 0).numpy() for frame in frames.flatten(0, 1)]  # one image per segment frame
    theirs = processor(images=images, return_tensors="pt")
    assert theirs["image_grid_thw"].tolist() == [[1, 4, 4]] * (2 * T)
    torch.testing.assert_close(pixel_values, theirs["pixel_values"], atol=1e-5, rtol=1e-5)


def test_vision_tokens_are_the_thinkers_image_features_of_each_segment_frame(checkpoint, reference):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    encoder = QwenOmniVisionEncoder(checkpoint, image_size=IMAGE).eval()
    frames, _ = media(2, seed=3)
    with torch.no_grad():
        ours = encoder(frames)
        processed = Qwen2VLImageProcessorPil(do_resize=False)(
            images=[frame.permute(1, 2, 0).numpy() for frame in frames.flatten(0, 1)], return_tensors="pt"
        )
        theirs = reference.get_image_features(processed["pixel_values"], processed["image_grid_thw"]).pooler_output
    assert ours.shape == (2, T, encoder.num_patches, 32) and encoder.grid == (2, 2)
    torch.testing.assert_close(ours.flatten(0, 1), torch.stack(theirs), atol=1e-4, rtol=1e-4)
    # segment t depends on frame t only
    changed = frames.clone()
    changed[0, 1] = 255 - changed[0, 1]
    with torch.no_grad():
        after = encoder(changed)
    torch.testing.assert_close(after[:, [0, 2, 3]], ours[:, [0, 2, 3]])
    assert not torch.allclose(after[0, 1], ours[0, 1])


def test_audio_tokens_are_the_thinkers_audio_features(checkpoint, reference):
    from transformers import WhisperFeatureExtractor

    encoder = QwenOmniAudioEncoder(checkpoint, tokens_per_segment=AUDIO_TOKENS).eval()
    _, audio = media(2, seed=4)
    features = WhisperFeatureExtractor(feature_size=128)(
        list(audio.numpy()), sampling_rate=16000, return_tensors="pt", return_attention_mask=True
    )
    with torch.no_grad():
        ours = encoder(audio, T)
        theirs = reference.get_audio_features(
            features["input_features"], feature_attention_mask=features["attention_mask"]
        ).last_hidden_state  # [2 * T * Q, D]
        # a clip twice as long gives twice the tokens: each window's are averaged in pairs
        long_audio = torch.cat([audio, audio.flip(1)], dim=1)
        pooled = encoder(long_audio, T)
        native = encoder.backbone(
            encoder.log_mel(long_audio).permute(1, 0, 2).reshape(128, -1),
            feature_lens=torch.tensor([64, 64]), aftercnn_lens=torch.tensor([32, 32]),
        ).last_hidden_state.reshape(2, 2 * T * AUDIO_TOKENS, -1)
    assert ours.shape == (2, T, AUDIO_TOKENS, 32)
    torch.testing.assert_close(ours.reshape(-1, 32), theirs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(pooled.reshape(2, -1, 32), native.reshape(2, T * AUDIO_TOKENS, 2, 32).mean(2))
    with pytest.raises(ValueError, match="tokens_per_segment"):
        encoder(audio[:, : SAMPLES // 2], T)


# ---------------------------------------------------------------------------------------------- the model
def test_forward_loss_and_gradients_reach_ilora_in_the_llm_and_both_towers(model):
    batch = make_batch(model, PROMPTS, TARGETS)
    lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
    with torch.no_grad():
        for p in lora_b:
            p.normal_(std=0.05)
    try:
        out = model(batch)
        assert torch.isfinite(out.loss_sum).all() and (out.loss_sum > 0).all()
        out.mean_loss().backward()
        grads = {name: p.grad for name, p in model.adapter.named_adapter_parameters().items()}
        assert {name.split(".")[0] for name in grads} == {"llm", "vision", "audio"}
        silent = [name for name, grad in grads.items() if grad is None or not grad.abs().sum()]
        assert not silent, silent
        base = [n for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n and "new_rows" not in n]
        assert not base, f"frozen weights became trainable: {base[:5]}"
    finally:
        with torch.no_grad():
            for p in lora_b:
                p.zero_()
        model.zero_grad(set_to_none=True)


def test_zero_b_ilora_leaves_the_logits_unchanged(model, checkpoint):
    plain, loads = build_model(checkpoint, None)
    assert loads == 1
    batch = make_batch(model, PROMPTS, TARGETS)
    with torch.no_grad():
        adapted = model(batch, return_logits=True).logits
        reference = plain(batch, return_logits=True).logits
        torch.testing.assert_close(adapted, reference)
        # and the adapter is live: non-zero heads change them
        lora_b = [p for name, p in model.named_parameters() if "lora_B" in name]
        for p in lora_b:
            p.normal_(std=0.05)
        changed = model(batch, return_logits=True).logits
        for p in lora_b:
            p.zero_()
    assert not torch.allclose(changed, reference)


def test_generation_with_the_kv_cache_continues_the_tmrope_ids(model):
    batch = make_batch(model, PROMPTS)
    new_tokens = 5
    with torch.no_grad():
        generated = model.generate(batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens).token_ids
        assert generated.shape == (2, new_tokens)
        # one teacher-forced pass over prompt + answer, numbered by the hook, predicts the same tokens
        tokens = model.tokenize(batch.prompts)  # left-padded
        length = tokens.input_ids.shape[1]
        prompt_embeds = model.embed(tokens.input_ids, model.encode_media(batch.frames, batch.audio), batch.media)
        full_ids = torch.cat([tokens.input_ids, generated], dim=1)
        full_mask = torch.cat([tokens.attention_mask, torch.ones_like(generated)], dim=1)
        positions = model.llm.position_ids(full_ids, full_mask, model.media_layout)
        embeds = torch.cat([prompt_embeds, model.llm.embed(generated)], dim=1)
        logits = model.llm(inputs_embeds=embeds, attention_mask=full_mask, position_ids=positions).logits
    assert positions.shape == (3, 2, length + new_tokens)
    # generated ids continue from the prompt's largest id + 1 in all three axes (Qwen's rope_deltas)
    prompt_max = positions[:, :, :length].amax(dim=(0, 2))
    expected = prompt_max[:, None] + 1 + torch.arange(new_tokens)
    for axis in range(3):
        torch.testing.assert_close(positions[axis, :, length:], expected)
    assert torch.equal(logits[:, length - 1 : -1].argmax(-1), generated)


# ---------------------------------------------------------------------------------------------- TMRoPE
TEXT = 200  # a plain text token of the tiny vocabulary (no special meaning)
SPACE_TEXT = " "


def tmrope_layout(model: AVModel, rows: int = 2, cols: int = 2, audio_per_segment: int = 25) -> dict[str, MediaSpan]:
    ids = model.placeholder_ids
    return {
        "<video>": MediaSpan(ids["<video>"], "video", T, (rows, cols)),
        "<audio>": MediaSpan(ids["<audio>"], "audio", T, (1, audio_per_segment)),
        "<image>": MediaSpan(ids["<image>"], "image", 1, (rows, cols)),
    }


def equivalent_inputs(model: AVModel, reference, pieces, layout, seconds_per_segment=1.0):
    """avmt ids of ``pieces`` and the thinker's equivalent input: the same tokens with Qwen's markers
    around each media block (a "video+audio" piece as Qwen's audio-in-video: one clip's picture and
    sound interleaved in 2-s chunks). Returns avmt ids, Qwen ids, the Qwen position of every avmt
    token, and get_rope_index's keyword arguments."""
    config = reference.config
    space = model.tokenizer(SPACE_TEXT, add_special_tokens=False)["input_ids"]
    video, audio, image = layout["<video>"], layout["<audio>"], layout["<image>"]
    avmt_ids, qwen_ids, qwen_index = [], [], []
    video_grids, image_grids, audio_lengths = [], [], []

    def emit(avmt_token, qwen_token):
        qwen_index.append(len(qwen_ids))
        avmt_ids.append(avmt_token)
        qwen_ids.append(qwen_token)

    def video_tokens():
        video_grids.append([video.segments, 2 * video.grid[0], 2 * video.grid[1]])
        per_frame = video.grid[0] * video.grid[1]
        return [int(t * seconds_per_segment * 25) for t in range(video.segments) for _ in range(per_frame)]

    for kind, *args in pieces:
        if kind == "text":
            for _ in range(args[0]):
                emit(TEXT, TEXT)
        elif kind == "video":
            video_tokens()
            qwen_ids.append(config.vision_start_token_id)
            for _ in range(video.block_length):
                emit(video.token_id, config.video_token_id)
            qwen_ids.append(config.vision_end_token_id)
        elif kind == "image":
            image_grids.append([1, 2 * image.grid[0], 2 * image.grid[1]])
            qwen_ids.append(config.vision_start_token_id)
            for _ in range(image.block_length):
                emit(image.token_id, config.image_token_id)
            qwen_ids.append(config.vision_end_token_id)
        elif kind == "audio":
            audio_lengths.append(4 * audio.block_length)  # mel frames that give block_length tokens
            qwen_ids.append(config.audio_start_token_id)
            for _ in range(audio.block_length):
                emit(audio.token_id, config.audio_token_id)
            qwen_ids.append(config.audio_end_token_id)
        elif kind == "video+audio":  # Qwen: <vbos><abos> then per 2-s chunk its video tokens, then its audio tokens
            times = video_tokens()
            audio_lengths.append(4 * audio.block_length)
            gap = space * args[0]
            qwen_ids.extend([config.vision_start_token_id, config.audio_start_token_id])
            bos = len(qwen_ids) - 1
            chunk = config.position_id_per_seconds * config.seconds_per_chunk
            order = sorted(
                [(time // chunk, 0, k) for k, time in enumerate(times)]
                + [(j // chunk, 1, j) for j in range(audio.block_length)]
            )
            where = {(kind_, k): len(qwen_ids) + n for n, (_, kind_, k) in enumerate(order)}
            qwen_ids.extend(config.video_token_id if kind_ == 0 else config.audio_token_id for _, kind_, _ in order)
            qwen_ids.extend([config.audio_end_token_id, config.vision_end_token_id])
            avmt_ids.extend([video.token_id] * video.block_length + gap + [audio.token_id] * audio.block_length)
            qwen_index.extend([where[0, k] for k in range(video.block_length)] + [bos] * len(gap)
                              + [where[1, j] for j in range(audio.block_length)])
    kwargs = dict(
        video_grid_thw=torch.tensor(video_grids) if video_grids else None,
        image_grid_thw=torch.tensor(image_grids) if image_grids else None,
        audio_seqlens=torch.tensor(audio_lengths) if audio_lengths else None,
        second_per_grids=torch.tensor([seconds_per_segment] * len(video_grids)) if video_grids else None,
        use_audio_in_video=any(piece[0] == "video+audio" for piece in pieces),
    )
    return torch.tensor(avmt_ids), torch.tensor(qwen_ids), torch.tensor(qwen_index), kwargs


def test_tmrope_of_a_text_prompt_is_ordinary_positions(model, reference):
    input_ids = torch.full((2, 9), TEXT)
    attention_mask = torch.ones(2, 9, dtype=torch.long)
    attention_mask[1, :3] = 0  # left padding
    ours = model.llm.position_ids(input_ids, attention_mask, model.media_layout)
    ordinary = (attention_mask.cumsum(1) - 1).clamp(min=0)
    for axis in range(3):
        torch.testing.assert_close(ours[axis][attention_mask.bool()], ordinary[attention_mask.bool()])
    theirs, _ = reference.get_rope_index(input_ids, attention_mask=attention_mask)
    torch.testing.assert_close(ours, theirs)


@pytest.mark.parametrize(
    "pieces",
    [
        [("text", 3), ("video", 1), ("text", 2), ("audio", 1), ("text", 4)],
        [("text", 2), ("audio", 1), ("text", 1), ("video", 1), ("video", 1), ("text", 3)],
        [("text", 1), ("image", 1), ("text", 2), ("video", 1), ("text", 2)],
        [("video", 1), ("text", 2)],
    ],
    ids=["video-then-audio", "audio-then-two-videos", "image-and-video", "video-first"],
)
def test_tmrope_matches_the_thinkers_get_rope_index(model, reference, pieces):
    layout = tmrope_layout(model)
    avmt_ids, qwen_ids, qwen_index, kwargs = equivalent_inputs(model, reference, pieces, layout)
    ours = tmrope_position_ids(avmt_ids[None], torch.ones(1, len(avmt_ids)), layout)
    theirs, _ = reference.get_rope_index(qwen_ids[None], attention_mask=torch.ones(1, len(qwen_ids)), **kwargs)
    torch.testing.assert_close(ours[:, 0], theirs[:, 0, qwen_index])
    # left-padded next to a longer row: the same ids on the valid tokens
    padded = torch.cat([torch.full((2,), TEXT), avmt_ids])
    batch_ids = torch.stack([padded, torch.cat([avmt_ids, torch.full((2,), TEXT)])])
    mask = torch.ones_like(batch_ids)
    mask[0, :2] = 0
    batched = tmrope_position_ids(batch_ids, mask, layout)
    torch.testing.assert_close(batched[:, 0, 2:], ours[:, 0])
    assert (batched[:, 0, :2] == 1).all()


@pytest.mark.parametrize("gap", [0, 1], ids=["adjacent", "space-between"])
def test_tmrope_of_video_with_its_sound_matches_qwens_audio_in_video(model, reference, gap):
    layout = tmrope_layout(model)
    pieces = [("text", 3), ("video+audio", gap), ("text", 2)]
    avmt_ids, qwen_ids, qwen_index, kwargs = equivalent_inputs(model, reference, pieces, layout)
    ours = tmrope_position_ids(avmt_ids[None], torch.ones(1, len(avmt_ids)), layout, pairs=model.llm.is_blank)
    theirs, _ = reference.get_rope_index(qwen_ids[None], attention_mask=torch.ones(1, len(qwen_ids)), **kwargs)
    torch.testing.assert_close(ours[:, 0], theirs[:, 0, qwen_index])
    # the audio tokens of second s share the temporal ids of segment s's video tokens
    video = avmt_ids == layout["<video>"].token_id
    audio = avmt_ids == layout["<audio>"].token_id
    assert ours[0, 0, video].unique().tolist() == ours[0, 0, audio][::25].tolist()


def test_tmrope_pooled_audio_tokens_keep_their_time(model):
    layout = tmrope_layout(model, audio_per_segment=5)  # 5 tokens per 1-s segment: 200 ms each
    audio = layout["<audio>"]
    ids = torch.tensor([TEXT] + [audio.token_id] * audio.block_length + [TEXT])
    positions = tmrope_position_ids(ids[None], torch.ones(1, len(ids)), layout)[0, 0]
    assert positions[1:-1].tolist() == [2 + 5 * j for j in range(audio.block_length)]
    assert positions[-1] == positions[1:-1].max() + 2


def test_tmrope_rejects_a_partial_block(model):
    layout = tmrope_layout(model)
    ids = torch.tensor([TEXT] + [layout["<video>"].token_id] * 5)
    with pytest.raises(ValueError, match="not a whole number of blocks"):
        tmrope_position_ids(ids[None], torch.ones(1, len(ids)), layout)


# ---------------------------------------------------------------------------------------------- experiment
def test_the_experiment_yaml_names_the_qwen_plugins():
    config = yaml.safe_load((REPO / "experiments" / "qwen_omni.yaml").read_text())
    section = config["model"]
    assert section["llm"]["init_args"]["model"] == "Qwen/Qwen2.5-Omni-7B"
    for argument, kind in MODULE_ARGUMENTS.items():
        entry = section.get(argument)
        if not isinstance(entry, dict):
            continue
        check_class_path(kind, entry["class_path"], f"model.{argument}.class_path")
        module_name, _, class_name = entry["class_path"].rpartition(".")
        cls = getattr(importlib.import_module(module_name), class_name)
        parameters = set(inspect.signature(cls).parameters) | set(inspect.signature(CausalLM).parameters)
        unknown = set(entry.get("init_args", {})) - parameters
        assert not unknown, f"{argument}: {unknown}"
    for name in ("model", "image_size", "dtype"):
        assert name in section["vision_encoder"]["init_args"]
    dtypes = {section["llm"]["init_args"]["torch_dtype"], section["vision_encoder"]["init_args"]["dtype"],
              section["audio_encoder"]["init_args"]["dtype"]}
    assert len(dtypes) == 1, "one dtype for the three plugins, so that they share one load"
