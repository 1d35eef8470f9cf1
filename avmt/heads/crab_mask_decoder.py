"""Crab's segmentation head: six mask-token states prompt a SAM-like two-way mask decoder at two scales.

Crab (CVPR 2025) ends a segmentation answer with six mask tokens; the LLM states that predict
them are the prompts of a SAM-style mask decoder, three per scale: scale s reads vision feature
level s (Crab: CLIP ViT-L/14 layers 14 and 22, :attr:`avmt.outputs.EncodedMedia.levels`). At
each scale a two-way transformer lets the prompt tokens and a learned output token attend to the
frame's patch grid and the grid attend back to them; the grid is upsampled with transposed
convolutions and scored against the output token through a hypernetwork MLP (SAM's mask
decoder). The coarse scale's mask enters the fine scale as a dense prompt, and the scales' masks
are summed with learned weights at the frame size. Crab sums each scale's three states into one
prompt with learned weights; here they stay three prompt tokens, which the two-way transformer's
token self-attention can weigh per frame.

Crab decodes one frame per answer (each AVS frame is its own sample, with that frame's audio in
the prompt); here one answer's six states decode every frame of its clip, so frame t's audio
window can enter the decoder as one more prompt token (``audio_prompt``), which lets the head
switch a frame off where its sound is silent.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avmt.errors import UserError
from avmt.heads.base import Head
from avmt.outputs import EncodedMedia


class _ChannelNorm(nn.LayerNorm):
    """LayerNorm over the channels of a ``[N, C, H, W]`` map (SAM's LayerNorm2d)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


class TwoWayBlock(nn.Module):
    """One block of SAM's two-way transformer on ``tokens [N, K, d]`` and ``image [N, P, d]``.

    Token self-attention, token -> image cross-attention, a token MLP, then image -> token
    cross-attention; each with a residual and a LayerNorm. Positional encodings are added to the
    queries and keys of every attention (``token_pe``: the tokens' initial embeddings,
    ``image_pe``: the grid's), never to the values.
    """

    def __init__(self, dim: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.self_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.token_to_image = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.image_to_token = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Linear(mlp_dim, dim))
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(4))

    def forward(self, tokens: torch.Tensor, image: torch.Tensor, token_pe: torch.Tensor,
                image_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens [N, K, d]``, ``image [N, P, d]`` -> both updated, same shapes."""
        q = tokens + token_pe
        tokens = self.norms[0](tokens + self.self_attn(q, q, tokens, need_weights=False)[0])
        q, k = tokens + token_pe, image + image_pe
        tokens = self.norms[1](tokens + self.token_to_image(q, k, image, need_weights=False)[0])
        tokens = self.norms[2](tokens + self.mlp(tokens))
        q, k = tokens + token_pe, image + image_pe
        image = self.norms[3](image + self.image_to_token(k, q, tokens, need_weights=False)[0])
        return tokens, image


class TwoWayTransformer(nn.Module):
    """SAM's two-way transformer: ``depth`` :class:`TwoWayBlock` s and a final token -> image attention.

    Args:
        dim: width of tokens and image.
        depth: blocks (SAM: 2).
        num_heads: attention heads.
        mlp_dim: hidden width of the token MLP.
    """

    def __init__(self, dim: int, depth: int, num_heads: int, mlp_dim: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TwoWayBlock(dim, num_heads, mlp_dim) for _ in range(depth))
        self.final_attn = nn.MultiheadAttention(dim, num_heads, batch_first=True)
        self.final_norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor, image: torch.Tensor,
                image_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``tokens [N, K, d]``, ``image [N, P, d]``, ``image_pe [1 or N, P, d]`` -> updated tokens and image."""
        token_pe = tokens
        for block in self.blocks:
            tokens, image = block(tokens, image, token_pe, image_pe)
        q, k = tokens + token_pe, image + image_pe
        tokens = self.final_norm(tokens + self.final_attn(q, k, image, need_weights=False)[0])
        return tokens, image


class CrabMaskDecoderHead(Head):
    """``queries [M, S*K, D_llm]`` (S scales x K mask-token states) + M clips -> mask logits ``[M, T, H, W]``.

    For query m, frame t and scale s: the tokens ``[output_s, prompt_{sK} .. prompt_{sK+K-1},
    (audio_t)]`` (the prompts: the projected LLM states; ``audio_t``: window t's mean audio
    feature, projected) and the frame's level-s patch grid (SAM's convolutional neck to ``hidden_size``, plus a
    random-Fourier positional encoding, plus the dense prompt: a learned no-mask embedding at
    s = 0, the embedded scale s-1 mask after) pass through the shared two-way transformer; the
    grid is upsampled ``2 ** upscale_stages`` times and scored against the hypernetwork MLP of
    the output token. ``logits[m, t] = sum_s weight_s * resize(mask_s, (H, W))``.

    Args:
        token: the token the tasks write (``<seg>``); the answer holds ``query_tokens`` in its place.
        query_tokens: the S*K special tokens whose states prompt the decoder, scale-major (the LLM
            must have them among its ``special_tokens``); Crab: 6.
        num_scales: S, feature levels read (``media.levels[0 .. S-1]``; Crab: 2).
        hidden_size: the decoder width d (SAM / Crab: 256).
        depth: two-way blocks (SAM / Crab: 2).
        num_heads: attention heads (SAM: 8).
        mlp_dim: hidden width of the token MLP (SAM: 2048).
        upscale_stages: 2x transposed-convolution stages after the transformer (SAM: 2, a 16x16
            grid -> 64x64 masks); the mask is resized bilinearly to the frame size after them.
        audio_prompt: add frame t's audio window as a prompt token of frame t.
    """

    output = "mask_logits"

    def __init__(
        self,
        token: str = "<seg>",
        query_tokens: list[str] = ["<mask_0>", "<mask_1>", "<mask_2>", "<mask_3>", "<mask_4>", "<mask_5>"],  # noqa: B006
        num_scales: int = 2,
        hidden_size: int = 32,
        depth: int = 2,
        num_heads: int = 2,
        mlp_dim: int = 64,
        upscale_stages: int = 2,
        audio_prompt: bool = True,
    ) -> None:
        super().__init__(token, query_tokens)
        for name, value in (("num_scales", num_scales), ("hidden_size", hidden_size), ("depth", depth),
                            ("num_heads", num_heads), ("mlp_dim", mlp_dim), ("upscale_stages", upscale_stages)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive int, got {value!r}")
        if hidden_size % num_heads or hidden_size % 2:
            raise UserError(f"hidden_size ({hidden_size}) must be even and divisible by num_heads ({num_heads})")
        if len(self.query_tokens) % num_scales:
            raise UserError(f"query_tokens: {len(self.query_tokens)} tokens do not split into num_scales={num_scales} "
                            f"scales (Crab: 2 scales x 3), got {list(query_tokens)}")
        self.num_scales = num_scales
        self.tokens_per_scale = len(self.query_tokens) // num_scales
        self.hidden_size = hidden_size
        self.depth = depth
        self.num_heads = num_heads
        self.mlp_dim = mlp_dim
        self.upscale_stages = upscale_stages
        self.audio_prompt = bool(audio_prompt)

    def _build(self, llm_dim: int, vision_dim: int, audio_dim: int) -> None:
        d, scales = self.hidden_size, self.num_scales
        self.query_proj = nn.Sequential(nn.LayerNorm(llm_dim), nn.Linear(llm_dim, d))
        # SAM's / Crab's image neck per level: 1x1 conv to d, norm, 3x3 conv, norm
        self.necks = nn.ModuleList(
            nn.Sequential(nn.Conv2d(vision_dim, d, 1, bias=False), _ChannelNorm(d),
                          nn.Conv2d(d, d, 3, padding=1, bias=False), _ChannelNorm(d))
            for _ in range(scales)
        )
        self.output_tokens = nn.Parameter(torch.randn(scales, d) * d**-0.5)
        # SAM's PositionEmbeddingRandom: fixed Gaussian frequencies, saved with the weights
        self.register_buffer("pe_frequencies", torch.randn(2, d // 2))
        self.no_mask_embed = nn.Parameter(torch.zeros(d))
        if self.audio_prompt:
            self.audio_proj = nn.Sequential(nn.LayerNorm(audio_dim), nn.Linear(audio_dim, d))
        self.transformer = TwoWayTransformer(d, self.depth, self.num_heads, self.mlp_dim)
        channels, stages = d, []
        for i in range(self.upscale_stages):
            out = max(d // 4 // 2**i, 1)  # SAM: d/4, then d/8
            stages.append(nn.ConvTranspose2d(channels, out, kernel_size=2, stride=2))
            if i < self.upscale_stages - 1:
                stages.append(_ChannelNorm(out))
            stages.append(nn.GELU())
            channels = out
        self.upscale = nn.Sequential(*stages)
        self.mask_channels = channels
        self.hypernetwork = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, d), nn.GELU(), nn.Linear(d, channels))
        if scales > 1:  # the previous scale's mask as SAM's dense (mask) prompt
            self.mask_embed = nn.Sequential(nn.Conv2d(1, max(d // 4, 1), 3, padding=1), nn.GELU(),
                                            nn.Conv2d(max(d // 4, 1), d, 1))
        self.scale_weights = nn.Parameter(torch.full((scales,), 1.0 / scales))

    def _image_pe(self, h: int, w: int) -> torch.Tensor:
        """``[1, h*w, d]`` random-Fourier encoding of the patch centres (SAM's dense PE)."""
        device, dtype = self.pe_frequencies.device, self.pe_frequencies.dtype
        ys = (torch.arange(h, device=device, dtype=dtype) + 0.5) / h
        xs = (torch.arange(w, device=device, dtype=dtype) + 0.5) / w
        grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # [h, w, 2]: (x, y) of each patch centre
        angles = 2 * math.pi * (2 * grid - 1) @ self.pe_frequencies
        return torch.cat([angles.sin(), angles.cos()], dim=-1).reshape(1, h * w, -1)

    def forward(self, queries: torch.Tensor, media: EncodedMedia, clip_index: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits of each query group on each frame of its clip.

        Args:
            queries: ``[M, S*K, D_llm]`` the states that predict each of ``query_tokens``.
            media: C clips: ``frames uint8 [C, T, 3, H, W]``, ``levels`` (at least S of them, each
                ``[C, T, P, D_v]`` with ``P = h * w`` for ``grid = (h, w)``), ``audio [C, T, Q, D_a]``.
            clip_index: ``long [M]`` the clip of each query (None: query m reads clip m, C = M).
                A clip's projected feature levels are computed once, however many queries read it.
        Returns:
            ``[M, T, H, W]`` logits, in the parameters' dtype.
        """
        self._check_built()
        clip_index = self._check_shapes(queries, media, clip_index)
        dtype = self.output_tokens.dtype
        t, _, height, width = media.frames.shape[1:]
        h, w = media.grid
        d, m, k = self.hidden_size, queries.shape[0], self.tokens_per_scale
        n = m * t

        prompts = self.query_proj(queries.to(dtype))  # [M, S*K, d]
        prompts = prompts.unsqueeze(1).expand(-1, t, -1, -1).reshape(n, len(self.query_tokens), d)  # every frame of the clip
        extra = []
        if self.audio_prompt:
            audio = self.audio_proj(media.audio.to(dtype).mean(dim=2))[clip_index]  # [M, T, d]
            extra.append(audio.reshape(n, 1, d))
        image_pe = self._image_pe(h, w).to(dtype)
        dense = self.no_mask_embed.view(1, 1, d)
        logits = None
        for s in range(self.num_scales):
            level = media.levels[s].to(dtype)  # [C, T, P, D_v]
            grid = level.flatten(0, 1).transpose(1, 2).reshape(-1, level.shape[-1], h, w)
            image = self.necks[s](grid).flatten(2).transpose(1, 2).reshape(*level.shape[:2], h * w, d)
            image = image[clip_index].reshape(n, h * w, d) + dense
            tokens = torch.cat([self.output_tokens[s].expand(n, 1, d), prompts[:, s * k:(s + 1) * k], *extra], dim=1)
            tokens, image = self.transformer(tokens, image, image_pe)
            grid = self.upscale(image.transpose(1, 2).reshape(n, d, h, w))  # [n, c, h', w']
            mask = torch.einsum("nc,nchw->nhw", self.hypernetwork(tokens[:, 0]), grid).unsqueeze(1)  # [n, 1, h', w']
            if s + 1 < self.num_scales:
                coarse = F.adaptive_avg_pool2d(mask, (h, w))  # back onto the patch grid
                dense = self.mask_embed(coarse).flatten(2).transpose(1, 2)  # [n, h*w, d]
            mask = F.interpolate(mask, size=(height, width), mode="bilinear", align_corners=False)
            logits = self.scale_weights[s] * mask if logits is None else logits + self.scale_weights[s] * mask
        return logits.reshape(m, t, height, width)

    def _check_shapes(self, queries: torch.Tensor, media: EncodedMedia,
                      clip_index: torch.Tensor | None) -> torch.Tensor:
        """Validate the inputs; return the clip index of every query (``long [M]``)."""
        llm_dim, vision_dim, audio_dim = self.dims
        group = len(self.query_tokens)
        if queries.dim() != 3 or queries.shape[1:] != (group, llm_dim):
            raise ValueError(f"queries must be [M, {group}, {llm_dim}] (one state per mask token), "
                             f"got shape {tuple(queries.shape)}")
        frames = media.frames
        self._check_frames(media)
        if len(media.levels) < self.num_scales:
            raise UserError(
                f"{type(self).__name__} reads {self.num_scales} vision feature levels and the vision encoder gives "
                f"{len(media.levels)}: set model.vision_encoder.init_args.feature_layers to {self.num_scales} "
                "hidden layers (Crab: [14, 22] of CLIP ViT-L/14)"
            )
        h, w = media.grid
        shapes = {}
        for s in range(self.num_scales):
            level = media.levels[s]
            if level.dim() != 4 or level.shape[2:] != (h * w, vision_dim):
                raise ValueError(f"media.levels[{s}] must be [C, T, {h * w}, {vision_dim}] (grid {media.grid}), "
                                 f"got shape {tuple(level.shape)}")
            shapes[f"media.levels[{s}]"] = level.shape
        if self.audio_prompt:
            audio = media.audio
            if audio.dim() != 4 or audio.shape[3] != audio_dim or audio.shape[2] < 1:
                raise ValueError(f"media.audio must be [C, T, Q>=1, {audio_dim}], got shape {tuple(audio.shape)}")
            shapes["media.audio"] = audio.shape
        return self._clip_index(shapes, frames, queries.shape[0], clip_index, media.levels[0].device)

    def extra_repr(self) -> str:
        own = (
            f"query_tokens={list(self.query_tokens)}, num_scales={self.num_scales}, hidden_size={self.hidden_size}, "
            f"depth={self.depth}, num_heads={self.num_heads}, mlp_dim={self.mlp_dim}, "
            f"upscale_stages={self.upscale_stages}, audio_prompt={self.audio_prompt}"
        )
        return f"{own}, {super().extra_repr()}"
