"""CrabMaskDecoderHead (six mask-token states, two scales, two-way decoder) and the Q-Former's 2-layer projector."""

import pytest
import torch
import torch.nn.functional as F

from avmt.connectors import QFormerConnector
from avmt.errors import UserError
from avmt.heads import CrabMaskDecoderHead, Head
from avmt.outputs import EncodedMedia

DIMS = (24, 16, 12)  # llm, vision, audio widths
GROUP = 6


def _media(m=3, t=4, height=32, width=32, grid=(2, 2), q=3, levels=2, seed=0) -> EncodedMedia:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (m, t, 3, height, width), generator=g, dtype=torch.uint8)
    p = grid[0] * grid[1]
    vision = torch.randn(m, t, p, DIMS[1], generator=g)
    audio = torch.randn(m, t, q, DIMS[2], generator=g)
    return EncodedMedia(frames, vision, grid, audio, tuple(torch.randn(m, t, p, DIMS[1], generator=g) for _ in range(levels)))


def _head(**kwargs) -> CrabMaskDecoderHead:
    torch.manual_seed(0)
    head = CrabMaskDecoderHead(**kwargs)
    head.build(*DIMS)
    return head


def _queries(m=3, seed=1) -> torch.Tensor:
    return torch.randn(m, GROUP, DIMS[0], generator=torch.Generator().manual_seed(seed))


def _replace(media: EncodedMedia, **fields) -> EncodedMedia:
    values = {"frames": media.frames, "vision": media.vision, "grid": media.grid, "audio": media.audio,
              "levels": media.levels}
    values.update(fields)
    return EncodedMedia(**values)


def test_is_a_mask_head_read_at_six_mask_tokens():
    head = CrabMaskDecoderHead()
    assert isinstance(head, Head) and head.output == "mask_logits" and head.token == "<seg>"
    assert head.query_tokens == tuple(f"<mask_{i}>" for i in range(6)) and head.tokens_per_scale == 3


@pytest.mark.parametrize("audio_prompt", [True, False])
@pytest.mark.parametrize("m,t,height,width,grid,stages", [(3, 4, 32, 32, (2, 2), 2), (2, 3, 24, 40, (2, 3), 3),
                                                          (1, 1, 8, 8, (1, 1), 1)])
def test_shapes_finite_and_every_parameter_learns(audio_prompt, m, t, height, width, grid, stages):
    head = _head(audio_prompt=audio_prompt, upscale_stages=stages)
    logits = head(_queries(m), _media(m, t, height, width, grid))
    assert logits.shape == (m, t, height, width) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_no_queries_and_bfloat16():
    assert _head()(torch.zeros(0, GROUP, DIMS[0]), _media(m=0, t=3)).shape == (0, 3, 32, 32)
    head = _head().to(torch.bfloat16)
    logits = head(_queries(), _media())
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits.float()).all()


def test_forward_before_build_and_rebuild_are_checked():
    with pytest.raises(RuntimeError, match="build"):
        CrabMaskDecoderHead()(_queries(), _media())
    head = _head()
    head.build(*DIMS)
    with pytest.raises(RuntimeError):
        head.build(32, DIMS[1], DIMS[2])


@pytest.mark.parametrize("kwargs,name", [
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": 30, "num_heads": 4}, "hidden_size"),
    ({"upscale_stages": 0}, "upscale_stages"),
    ({"num_scales": 4}, "query_tokens"),  # 6 tokens do not split into 4 scales
    ({"query_tokens": ["<m>", "<m>"], "num_scales": 1}, "query_tokens"),
])
def test_bad_arguments(kwargs, name):
    with pytest.raises(UserError, match=name):
        CrabMaskDecoderHead(**kwargs)


def test_too_few_feature_levels_name_the_encoder_key():
    with pytest.raises(UserError, match="feature_layers"):
        _head()(_queries(), _media(levels=1))


@pytest.mark.parametrize("change", [
    lambda q, md: (q[:, :3], md),  # not one state per mask token
    lambda q, md: (q[:, 0], md),  # [M, D]: a single state
    lambda q, md: (q[:2], md),  # M mismatch between queries and clips
    lambda q, md: (q, _replace(md, grid=(3, 3))),  # P != h * w
    lambda q, md: (q, _replace(md, levels=(md.levels[0], md.levels[1][..., :8]))),  # wrong D_v
    lambda q, md: (q, _replace(md, levels=(md.levels[0][:, :2], md.levels[1]))),  # T mismatch
    lambda q, md: (q, _replace(md, audio=md.audio[..., :5])),  # wrong D_a
])
def test_bad_shapes_raise(change):
    queries, media = change(_queries(), _media())
    with pytest.raises(ValueError):
        _head()(queries, media)


def test_queries_sharing_a_clip_give_the_same_result_as_one_clip_each():
    head, media, queries = _head(), _media(m=2), _queries(m=4)
    clip_index = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        torch.testing.assert_close(head(queries, media, clip_index), head(queries, media.take(clip_index)))
    with pytest.raises(ValueError, match="clip_index"):
        head(queries, media, torch.tensor([0, 1, 2, 0]))


def test_each_scale_reads_its_three_states_and_its_level():
    """Scale 0's states and level reach the masks (also through the fine scale's dense prompt);
    scale 1's states and level reach them; the main vision features (the LLM's layer) do not."""
    head, media = _head(), _media()
    with torch.no_grad():
        base = head(_queries(), media)
        for s in range(2):
            queries = _queries()
            queries[:, 3 * s: 3 * s + 3] += torch.randn(3, 3, DIMS[0])
            assert (head(queries, media) - base).abs().amax(dim=(1, 2, 3)).min() > 1e-4, s
            levels = list(media.levels)
            levels[s] = torch.randn_like(levels[s])
            assert (head(_queries(), _replace(media, levels=tuple(levels))) - base).abs().amax() > 1e-4, s
        torch.testing.assert_close(head(_queries(), _replace(media, vision=torch.randn_like(media.vision))), base)


@pytest.mark.parametrize("audio_prompt", [True, False])
def test_frames_are_independent_and_window_t_reaches_frame_t_only(audio_prompt):
    head, media = _head(audio_prompt=audio_prompt), _media()
    levels = (media.levels[0].clone(), media.levels[1])
    levels[0][:, 1] = torch.randn(3, 4, DIMS[1])
    audio = media.audio.clone()
    audio[:, 3] = torch.randn(3, 3, DIMS[2])
    with torch.no_grad():
        a = head(_queries(), media)
        b = head(_queries(), _replace(media, levels=levels))
        c = head(_queries(), _replace(media, audio=audio))
    for t in range(4):
        if t != 1:
            torch.testing.assert_close(a[:, t], b[:, t])
        if t != 3 or not audio_prompt:
            torch.testing.assert_close(a[:, t], c[:, t])
    assert (a[:, 1] - b[:, 1]).abs().amax() > 1e-4
    if audio_prompt:
        assert (a[:, 3] - c[:, 3]).abs().amax(dim=(1, 2)).min() > 1e-4


# Learning check: a 4x4 grid of coloured cells per frame; the six states name a colour; the target is
# that colour's cells. Each level holds the cells' colours through its own fixed projection, plus noise.
COLOURS, CELL, GRID, T = 4, 4, (4, 4), 2


def _cells(n: int, g: torch.Generator, projections: list[torch.Tensor]) -> tuple[torch.Tensor, EncodedMedia, torch.Tensor]:
    """n clips: queries ``[n, 6, D_llm]``, media, target masks ``[n, T, 16, 16]``."""
    p = GRID[0] * GRID[1]
    colour_of_cell = torch.randint(0, COLOURS, (n, T, p), generator=g)
    named = torch.randint(0, COLOURS, (n,), generator=g)
    onehot = F.one_hot(colour_of_cell, COLOURS).float()  # [n, T, P, COLOURS]
    levels = tuple(onehot @ w + 0.1 * torch.randn(n, T, p, DIMS[1], generator=g) for w in projections)
    queries = F.one_hot(named, DIMS[0]).float()[:, None].expand(-1, GROUP, -1) + 0.1 * torch.randn(n, GROUP, DIMS[0], generator=g)
    cells = (colour_of_cell == named[:, None, None]).float().view(n * T, 1, *GRID)
    targets = F.interpolate(cells, scale_factor=CELL, mode="nearest").view(n, T, GRID[0] * CELL, GRID[1] * CELL)
    size = GRID[0] * CELL
    frames = torch.zeros(n, T, 3, size, size, dtype=torch.uint8)
    media = EncodedMedia(frames, levels[-1], GRID, torch.randn(n, T, 2, DIMS[2], generator=g), levels)
    return queries, media, targets


def test_learns_to_segment_the_named_colour(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    projections = [torch.randn(COLOURS, DIMS[1], generator=g) for _ in range(2)]
    head = CrabMaskDecoderHead(hidden_size=32, num_heads=2, mlp_dim=64)
    head.build(*DIMS)
    opt = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(120):
        queries, media, targets = _cells(8, g, projections)
        logits = head(queries, media)
        probs = logits.sigmoid()
        dice = 1 - (2 * (probs * targets).sum((2, 3)) + 1) / (probs.sum((2, 3)) + targets.sum((2, 3)) + 1)
        loss = F.binary_cross_entropy_with_logits(logits, targets) + 0.5 * dice.mean()  # Crab's BCE + 0.5 Dice
        opt.zero_grad()
        loss.backward()
        opt.step()
    queries, media, targets = _cells(32, g, projections)
    with torch.no_grad():
        pred = head(queries, media) > 0
    inter = (pred & targets.bool()).sum(dim=(2, 3)).float()
    union = (pred | targets.bool()).sum(dim=(2, 3)).float()
    iou = (inter / union.clamp(min=1)).mean()
    assert iou > 0.8, f"mean IoU {iou:.3f}"


def test_qformer_two_layer_projector():
    torch.manual_seed(0)
    connector = QFormerConnector(num_queries=2, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                                 projector_layers=2)
    connector.build(24, 40)
    assert [type(m).__name__ for m in connector.proj] == ["Linear", "GELU", "Linear"]
    out = connector(torch.randn(2, 3, 5, 24))
    assert out.shape == (2, 6, 40) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(p.grad is not None for p in connector.parameters())
    # the one-layer default keeps its repr (stage 1's cache fingerprint) and its state-dict keys
    default = QFormerConnector()
    assert "projector_layers" not in repr(default) and "projector_layers=2" in repr(connector)
    default.build(24, 40)
    assert {k for k in default.state_dict() if k.startswith("proj.")} == {"proj.weight", "proj.bias"}
    with pytest.raises(UserError, match="projector_layers"):
        QFormerConnector(projector_layers=3)


def test_inside_the_model_the_six_states_reach_the_head_and_train_it(make_batch):
    """The model writes the six mask tokens in place of ``<seg>``, hands the head their states
    ``[M, 6, D_llm]`` and the ViT's two feature levels; the mask logits train every head parameter."""
    from avmt.connectors import MLPConnector
    from avmt.encoders import ViTVisionEncoder, Wav2Vec2AudioEncoder
    from avmt.llm import DEFAULT_SPECIAL_TOKENS, CausalLM
    from avmt.model import AVModel

    torch.manual_seed(0)
    t, head = 3, CrabMaskDecoderHead(hidden_size=16, num_heads=2, mlp_dim=32)
    model = AVModel(
        CausalLM(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                 special_tokens=[*DEFAULT_SPECIAL_TOKENS, *head.query_tokens], words=["segment", "what", "sounds", "dog", "."]),
        ViTVisionEncoder(image_size=32, patch_size=16, hidden_size=32, num_layers=2, num_heads=2, select_layer=2,
                         feature_layers=[1, 2]),
        Wav2Vec2AudioEncoder(hidden_size=32, num_layers=1, num_heads=2, tokens_per_segment=2),
        MLPConnector(tokens_per_segment=2, hidden_size=32),
        MLPConnector(tokens_per_segment=2, hidden_size=32),
        num_segments=t,
        heads=[head],
    )
    frames = torch.randint(0, 256, (2, t, 3, 32, 32), dtype=torch.uint8)
    batch = make_batch(["<video> <audio> Segment what sounds."] * 2, frames, torch.randn(2, t * 4000) * 0.1, [0, 1],
                       targets=["<seg>", "dog <seg>"], model=model)
    mask_ids = [model.llm.placeholder_id(token) for token in head.query_tokens]
    assert all((batch.tokens.labels == i).sum() == 2 for i in mask_ids)
    assert model.tokenizer.unk_token_id not in batch.tokens.input_ids.tolist()
    out = model(batch)
    assert out.states["<seg>"].values.shape == (2, 6, 32)
    masks = out.dense["mask_logits"]
    assert masks.rows.tolist() == [0, 1] and masks.values.shape == (2, t, 32, 32)
    (masks.values.square().mean() + out.mean_loss()).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
