"""MaskDecoderHead: lazy build, shapes, checks, what the masks depend on, and that it learns."""

import pytest
import torch
import torch.nn.functional as F

from avmt.heads import Head, MaskDecoderHead
from avmt.outputs import EncodedMedia

DIMS = (24, 16, 12)  # llm, vision, audio widths


def _media(m=3, t=4, height=32, width=32, grid=(2, 2), q=3, seed=0) -> EncodedMedia:
    g = torch.Generator().manual_seed(seed)
    frames = torch.randint(0, 256, (m, t, 3, height, width), generator=g, dtype=torch.uint8)
    vision = torch.randn(m, t, grid[0] * grid[1], DIMS[1], generator=g)
    audio = torch.randn(m, t, q, DIMS[2], generator=g)
    return EncodedMedia(frames, vision, grid, audio)


def _head(**kwargs) -> MaskDecoderHead:
    torch.manual_seed(0)
    head = MaskDecoderHead(**kwargs)
    head.build(*DIMS)
    return head


def _queries(m=3, seed=1) -> torch.Tensor:
    return torch.randn(m, DIMS[0], generator=torch.Generator().manual_seed(seed))


def test_is_a_head_with_its_output_name():
    head = MaskDecoderHead()
    assert isinstance(head, Head) and head.output == "mask_logits" and head.token == "<seg>"
    assert MaskDecoderHead(token="<mask>").token == "<mask>"


@pytest.mark.parametrize("audio", ["query", "gate", "none"])
@pytest.mark.parametrize(
    "m,t,height,width,grid", [(3, 4, 32, 32, (2, 2)), (2, 3, 24, 40, (2, 3)), (1, 1, 8, 8, (1, 1))]
)
def test_shapes_finite_and_every_parameter_learns(audio, m, t, height, width, grid):
    head = _head(audio=audio)
    logits = head(_queries(m), _media(m, t, height, width, grid))
    assert logits.shape == (m, t, height, width) and logits.dtype == torch.float32
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    for name, param in head.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_no_queries():
    assert _head()(torch.zeros(0, DIMS[0]), _media(m=0, t=3)).shape == (0, 3, 32, 32)


def test_logits_start_near_zero_on_average():
    head = _head()
    media = _media(m=16, t=2)
    assert head(torch.randn(16, DIMS[0]), media).mean().abs() < 0.5


def test_bfloat16_parameters():
    head = _head().to(torch.bfloat16)
    logits = head(_queries(), _media())
    assert logits.dtype == torch.bfloat16 and logits.shape == (3, 4, 32, 32)
    assert torch.isfinite(logits.float()).all()


def test_forward_before_build_raises():
    head = MaskDecoderHead()
    assert not head.built
    with pytest.raises(RuntimeError, match="build"):
        head(_queries(), _media())


def test_build_is_idempotent_and_checked():
    head = _head()
    n = sum(p.numel() for p in head.parameters())
    head.build(*DIMS)
    assert sum(p.numel() for p in head.parameters()) == n
    with pytest.raises(RuntimeError):
        head.build(32, DIMS[1], DIMS[2])


@pytest.mark.parametrize(
    "kwargs,name",
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"pixel_channels": -2}, "pixel_channels"),
        ({"hidden_size": 2.5}, "hidden_size"),
        ({"audio": "loud"}, "audio"),
    ],
)
def test_bad_arguments(kwargs, name):
    with pytest.raises(ValueError, match=name):
        MaskDecoderHead(**kwargs)


def _replace(media: EncodedMedia, **fields) -> EncodedMedia:
    values = {"frames": media.frames, "vision": media.vision, "grid": media.grid, "audio": media.audio}
    values.update(fields)
    return EncodedMedia(**values)


@pytest.mark.parametrize(
    "change",
    [
        lambda q, md: (q[:2], md),  # M mismatch between queries and clips
        lambda q, md: (q[:, :8], md),  # wrong D_llm
        lambda q, md: (q[0], md),  # queries not [M, D]
        lambda q, md: (q, _replace(md, grid=(3, 3))),  # P != h * w
        lambda q, md: (q, _replace(md, vision=md.vision[..., :8])),  # wrong D_v
        lambda q, md: (q, _replace(md, vision=md.vision[:, :2])),  # T mismatch
        lambda q, md: (q, _replace(md, audio=md.audio[..., :5])),  # wrong D_a
        lambda q, md: (q, _replace(md, audio=md.audio[:2])),  # M mismatch in audio
        lambda q, md: (q, _replace(md, frames=md.frames[:, :, :1])),  # not RGB
        lambda q, md: (q, _replace(md, frames=md.frames[0])),  # frames not 5-d
    ],
)
def test_bad_shapes_raise(change):
    head = _head()
    queries, media = change(_queries(), _media())
    with pytest.raises(ValueError):
        head(queries, media)


def test_queries_sharing_a_clip_read_it_once_with_the_same_result():
    head, media, queries = _head(), _media(m=2), _queries(m=4)
    clip_index = torch.tensor([1, 0, 1, 1])
    with torch.no_grad():
        shared = head(queries, media, clip_index)
        one_each = head(queries, media.take(clip_index))
    torch.testing.assert_close(shared, one_each)
    with pytest.raises(ValueError, match="clip_index"):
        head(queries, media, torch.tensor([0, 1, 2, 0]))


def test_masks_depend_on_the_query():
    head = _head()
    media = _media()
    a = head(_queries(seed=1), media)
    b = head(_queries(seed=2), media)
    assert (a - b).abs().amax(dim=(1, 2, 3)).min() > 1e-3  # every query's masks changed


@pytest.mark.parametrize("audio", ["query", "gate", "none"])
def test_frames_are_independent(audio):
    head = _head(audio=audio)
    media = _media()
    frames = media.frames.clone()
    frames[:, 2, :, 5:20, 10:30] = 255 - frames[:, 2, :, 5:20, 10:30]
    vision = media.vision.clone()
    vision[:, 1] = torch.randn(3, 4, DIMS[1])
    a = head(_queries(), media)
    b = head(_queries(), _replace(media, frames=frames))
    c = head(_queries(), _replace(media, vision=vision))
    for t in range(4):
        if t != 2:
            torch.testing.assert_close(a[:, t], b[:, t])
        if t != 1:
            torch.testing.assert_close(a[:, t], c[:, t])
    assert (a[:, 2] - b[:, 2]).abs().amax() > 1e-3
    assert (a[:, 1] - c[:, 1]).abs().amax() > 1e-3


@pytest.mark.parametrize("audio", ["query", "gate"])
def test_audio_of_window_t_changes_frame_t_only(audio):
    head = _head(audio=audio)
    media = _media()
    audio = media.audio.clone()
    audio[:, 3] = torch.randn(3, 3, DIMS[2])
    a = head(_queries(), media)
    b = head(_queries(), _replace(media, audio=audio))
    for t in range(3):
        torch.testing.assert_close(a[:, t], b[:, t])
    assert (a[:, 3] - b[:, 3]).abs().amax(dim=(1, 2)).min() > 1e-4


def test_a_gate_only_shifts_a_frame_and_none_ignores_the_audio():
    head = _head(audio="gate")
    media = _media()
    audio = media.audio.clone()
    audio[:, 3] = torch.randn(3, 3, DIMS[2])
    shift = head(_queries(), _replace(media, audio=audio))[:, 3] - head(_queries(), media)[:, 3]
    # the gate moves every pixel of the frame by the same amount: it cannot pick an object
    torch.testing.assert_close(shift, shift[:, :1, :1].expand_as(shift))


def test_without_audio_the_audio_is_ignored():
    head = _head(audio="none")
    media = _media()
    a = head(_queries(), media)
    b = head(_queries(), _replace(media, audio=torch.randn(3, 4, 3, DIMS[2])))
    torch.testing.assert_close(a, b)


# Learning check: two coloured squares per frame, the query names a colour, the target is its square.
PALETTE = torch.tensor([[230, 40, 40], [40, 220, 40], [50, 60, 240], [230, 220, 40]], dtype=torch.float32)
SIZE, T, GRID, LLM, VIS, AUD = 24, 2, (3, 3), 8, 16, 8


def _squares(
    n: int, g: torch.Generator, proj: torch.Tensor
) -> tuple[torch.Tensor, EncodedMedia, torch.Tensor]:
    """n clips: queries ``[n, LLM]``, media, target masks ``[n, T, SIZE, SIZE]``.

    Each clip has two colours; on each frame, one square of each at a random place, one in each
    half of the frame (halves split left/right or top/bottom at random), so they never overlap.
    """
    k, half = n * T, SIZE // 2
    colours = torch.rand(n, len(PALETTE), generator=g).argsort(dim=1)[:, :2]  # [n, 2], distinct
    side = torch.randint(5, 9, (k, 2), generator=g)
    slot = torch.stack([torch.zeros(k), torch.ones(k)], dim=1).long()
    slot = torch.where(torch.rand(k, 1, generator=g) < 0.5, slot, 1 - slot)  # which half each square takes
    along = (torch.rand(k, 2, generator=g) * (SIZE - side + 1)).floor().long()
    across = (torch.rand(k, 2, generator=g) * (half - side + 1)).floor().long() + half * slot
    split_x = torch.rand(k, 1, generator=g) < 0.5
    y0, x0 = torch.where(split_x, along, across), torch.where(split_x, across, along)
    yy = torch.arange(SIZE).view(1, 1, SIZE, 1)
    xx = torch.arange(SIZE).view(1, 1, 1, SIZE)
    y0, x0, side = (v.view(k, 2, 1, 1) for v in (y0, x0, side))
    masks = (yy >= y0) & (yy < y0 + side) & (xx >= x0) & (xx < x0 + side)  # [k, 2, SIZE, SIZE]
    frames = torch.randint(0, 40, (k, 3, SIZE, SIZE), generator=g).float()
    rgb = PALETTE[colours].repeat_interleave(T, dim=0)  # [k, 2, 3]
    for j in range(2):
        colour = rgb[:, j].view(k, 3, 1, 1) + torch.randint(-20, 21, (k, 3, 1, 1), generator=g)
        frames = torch.where(masks[:, j : j + 1], colour, frames)
    frames = frames.clamp(0, 255).to(torch.uint8)
    # Stand-in patch features: each patch's mean colour through a fixed random projection, plus noise.
    pooled = F.adaptive_avg_pool2d(frames.float() / 255, GRID).flatten(2).transpose(1, 2)  # [k, P, 3]
    p = GRID[0] * GRID[1]
    vision = (pooled @ proj).view(n, T, p, VIS) + 0.1 * torch.randn(n, T, p, VIS, generator=g)
    audio = torch.randn(n, T, 2, AUD, generator=g)
    queries = F.one_hot(colours[:, 0], LLM).float() * 2 + 0.1 * torch.randn(n, LLM, generator=g)
    media = EncodedMedia(frames.view(n, T, 3, SIZE, SIZE), vision, GRID, audio)
    return queries, media, masks[:, 0].view(n, T, SIZE, SIZE).float()


def test_learns_to_segment_the_named_square(one_thread):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    proj = torch.randn(3, VIS, generator=g)
    head = MaskDecoderHead()
    head.build(LLM, VIS, AUD)
    opt = torch.optim.Adam(head.parameters(), lr=1e-2)
    for _ in range(150):
        queries, media, targets = _squares(8, g, proj)
        loss = F.binary_cross_entropy_with_logits(head(queries, media), targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    queries, media, targets = _squares(32, g, proj)
    with torch.no_grad():
        pred = head(queries, media).sigmoid() > 0.5
    inter = (pred & targets.bool()).sum(dim=(2, 3)).float()
    union = (pred | targets.bool()).sum(dim=(2, 3)).float()
    iou = (inter / union.clamp(min=1)).mean()
    assert iou > 0.7, f"mean IoU {iou:.3f}"
