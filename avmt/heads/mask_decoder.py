"""Mask decoder head: one ``<seg>`` query -> a mask logit map on every frame of its clip.

Frame by frame, a per-pixel feature map (upsampled ViT patch features plus a small convolutional
stem on the frame itself) is scored against a query vector; with audio conditioning, frame t's
query vector and bias are modulated by the audio of window t, so the head can follow a sounding
object and switch a frame off when it is silent there. Frames never see each other.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from avmt.errors import UserError
from avmt.heads.base import Head
from avmt.outputs import EncodedMedia


#: How the audio enters the masks (see :class:`MaskDecoderHead`).
AUDIO_MODES: tuple[str, ...] = ("query", "gate", "none")


class MaskDecoderHead(Head):
    """``queries [M, D_llm]`` + M clips -> mask logits ``[M, T, H, W]`` at the frame size.

    For query m and frame t: ``logits[m, t] = <w_t, F_t> / sqrt(d) + b_t``, where ``F_t [d, H, W]``
    is the sum of the frame's patch features (projected to d, bilinearly upsampled) and a pixel
    stem (two 3x3 convolutions on the normalized frame, projected to d), and ``(w_t, b_t)`` come
    from the projected query and, depending on ``audio``, the mean audio feature of window t.

    Args:
        token: the special token whose hidden states are the queries.
        hidden_size: d, the width in which queries and pixels meet.
        pixel_channels: channels of the pixel stem's 3x3 convolutions (full resolution, so this
            drives the cost).
        audio: how window t's audio enters frame t: ``"query"`` modulates the query vector and
            the bias (the head itself can match sounds to objects); ``"gate"`` only sets the
            frame's bias (the audio switches a frame on or off, while which object to segment is
            left to the LLM's query); ``"none"``: one query vector and bias for all frames.
    """

    output = "mask_logits"

    def __init__(
        self,
        token: str = "<seg>",
        hidden_size: int = 32,
        pixel_channels: int = 16,
        audio: str = "query",
    ) -> None:
        super().__init__(token)
        for name, value in (("hidden_size", hidden_size), ("pixel_channels", pixel_channels)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive int, got {value!r}")
        if audio not in AUDIO_MODES:
            raise UserError(f"audio must be one of {AUDIO_MODES}, got {audio!r}")
        self.hidden_size = hidden_size
        self.pixel_channels = pixel_channels
        self.audio = audio

    def _build(self, llm_dim: int, vision_dim: int, audio_dim: int) -> None:
        d, c = self.hidden_size, self.pixel_channels
        self.query_proj = nn.Sequential(nn.LayerNorm(llm_dim), nn.Linear(llm_dim, d))
        self.vision_proj = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, d))
        self.pixel_stem = nn.Sequential(
            nn.Conv2d(3, c, 3, padding=1),
            nn.GELU(),
            nn.Conv2d(c, c, 3, padding=1),
            nn.GELU(),
        )
        self.pixel_proj = nn.Linear(c, d)
        if self.audio != "none":
            self.audio_proj = nn.Sequential(nn.LayerNorm(audio_dim), nn.Linear(audio_dim, d))
            # [query, audio_t] -> (delta w_t, b_t) with w_t = query + delta w_t ("query"), or b_t only ("gate")
            out = d + 1 if self.audio == "query" else 1
            self.condition = nn.Sequential(nn.Linear(2 * d, d), nn.GELU(), nn.Linear(d, out))
            last = self.condition[-1]
        else:
            self.condition = nn.Linear(d, 1)
            last = self.condition
        # Start near w_t = projected query, b_t = 0 (logits ~0 on average at init); not exactly
        # there, or the layers before ``last`` would get no gradient on the first step.
        with torch.no_grad():
            last.weight.mul_(0.1)
            last.bias.zero_()

    def forward(self, queries: torch.Tensor, media: EncodedMedia, clip_index: torch.Tensor | None = None) -> torch.Tensor:
        """Mask logits of each query on each frame of its clip.

        Args:
            queries: ``[M, D_llm]`` hidden states at the head's token.
            media: C clips: ``frames uint8 [C, T, 3, H, W]``, ``vision [C, T, P, D_v]`` with
                ``P = h * w`` for ``grid = (h, w)``, ``audio [C, T, Q, D_a]``.
            clip_index: ``long [M]`` the clip of each query (None: query m reads clip m, C = M).
                The per-pixel features of a clip are computed once, however many queries read it.
        Returns:
            ``[M, T, H, W]`` logits, in the parameters' dtype.
        """
        self._check_built()
        clip_index = self._check_shapes(queries, media, clip_index)
        dtype = self.query_proj[1].weight.dtype
        clips, t, _, height, width = media.frames.shape
        h, w = media.grid
        d, m = self.hidden_size, queries.shape[0]

        query = self.query_proj(queries.to(dtype))  # [M, d]
        if self.audio != "none":
            audio = self.audio_proj(media.audio.to(dtype).mean(dim=2))[clip_index]  # [M, T, d]
            cond = self.condition(torch.cat([query.unsqueeze(1).expand(-1, t, -1), audio], dim=-1))
            bias = cond[..., -1]  # [M, T]
            weight = query.unsqueeze(1) + (cond[..., :d] if self.audio == "query" else 0)  # [M, T, d]
            weight = weight.expand(-1, t, -1)
        else:
            weight = query.unsqueeze(1).expand(-1, t, -1)
            bias = self.condition(query).expand(-1, t)

        # The logits are linear in the pixel features, so each term is scored at its own
        # resolution: the patch scores are upsampled as one channel instead of d, and the stem's
        # projection to d is folded into the query vector.
        n, weight = m * t, weight.reshape(m * t, d)
        patches = self.vision_proj(media.vision.to(dtype))[clip_index].reshape(n, h * w, d)
        coarse = torch.bmm(patches, weight.unsqueeze(-1)).reshape(n, 1, h, w)
        coarse = F.interpolate(coarse, size=(height, width), mode="bilinear", align_corners=False)
        frames = media.frames.reshape(clips * t, 3, height, width).to(dtype) / 127.5 - 1.0
        stem = self.pixel_stem(frames).reshape(clips, t, self.pixel_channels, height * width)  # once per clip
        fine = torch.bmm((weight @ self.pixel_proj.weight).unsqueeze(1), stem[clip_index].flatten(0, 1))
        fine = fine.reshape(n, 1, height, width) + (weight @ self.pixel_proj.bias).reshape(n, 1, 1, 1)
        logits = (coarse + fine).reshape(m, t, height, width) / math.sqrt(d)
        return logits + bias[..., None, None]

    def _check_shapes(self, queries: torch.Tensor, media: EncodedMedia,
                      clip_index: torch.Tensor | None) -> torch.Tensor:
        """Validate the inputs; return the clip index of every query (``long [M]``)."""
        llm_dim, vision_dim, audio_dim = self.dims
        if queries.dim() != 2 or queries.shape[1] != llm_dim:
            raise ValueError(f"queries must be [M, {llm_dim}], got shape {tuple(queries.shape)}")
        frames, vision = media.frames, media.vision
        self._check_frames(media)
        h, w = media.grid
        if vision.dim() != 4 or vision.shape[3] != vision_dim:
            raise ValueError(f"media.vision must be [C, T, P, {vision_dim}], got shape {tuple(vision.shape)}")
        if vision.shape[2] != h * w:
            raise ValueError(f"media.vision has P={vision.shape[2]} patches, grid {media.grid} needs {h * w}")
        shapes = {"media.vision": vision.shape}
        if self.audio != "none":
            audio = media.audio
            if audio.dim() != 4 or audio.shape[3] != audio_dim or audio.shape[2] < 1:
                raise ValueError(
                    f"media.audio must be [C, T, Q>=1, {audio_dim}], got shape {tuple(audio.shape)}"
                )
            shapes["media.audio"] = audio.shape
        return self._clip_index(shapes, frames, queries.shape[0], clip_index, vision.device)

    def extra_repr(self) -> str:
        own = (
            f"hidden_size={self.hidden_size}, pixel_channels={self.pixel_channels}, "
            f"audio={self.audio!r}"
        )
        return f"{own}, {super().extra_repr()}"


class MaskCollaborationHead(MaskDecoderHead):
    """:class:`MaskDecoderHead` with AVUFormer's Mask Collaboration Module: the predicted mask feeds
    the region it covers back to the LLM, which writes the description after ``<seg>``.

    Feedback of query m: the mask's soft weights (sigmoid of the logits, averaged onto the patch
    grid) pool the vision encoder's patch features of every frame of its clip into one vector
    (``sum_t,p w[t,p] v[t,p] / sum_t,p w[t,p]``: frames where the source covers more count more),
    projected to the LLM width. The description loss reaches the mask through these weights.
    Arguments as :class:`MaskDecoderHead`.
    """

    def _build(self, llm_dim: int, vision_dim: int, audio_dim: int) -> None:
        super()._build(llm_dim, vision_dim, audio_dim)
        self.region_proj = nn.Sequential(nn.LayerNorm(vision_dim), nn.Linear(vision_dim, llm_dim))

    @property
    def gives_feedback(self) -> bool:
        """True: the mask-pooled region features go back to the LLM."""
        return True

    def feedback(self, prediction: torch.Tensor, media: EncodedMedia,
                 clip_index: torch.Tensor | None = None) -> torch.Tensor:
        """Mask-pooled regional visual features.

        Args:
            prediction: ``[M, T, H, W]`` mask logits of this head.
            media: C clips with ``vision [C, T, P, D_v]`` on ``grid = (h, w)``.
            clip_index: ``long [M]`` the clip of each mask (None: mask m is of clip m).
        Returns:
            ``[M, D_llm]``.
        """
        self._check_built()
        m, t = prediction.shape[:2]
        h, w = media.grid
        index = torch.arange(m, device=prediction.device) if clip_index is None else clip_index.to(prediction.device)
        dtype = self.region_proj[1].weight.dtype
        weights = F.adaptive_avg_pool2d(torch.sigmoid(prediction.to(dtype)).flatten(0, 1), (h, w))
        weights = weights.reshape(m, t * h * w, 1)  # [M, T*P, 1]
        patches = media.vision.to(dtype)[index].reshape(m, t * h * w, -1)  # [M, T*P, D_v]
        pooled = (weights * patches).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-6)
        return self.region_proj(pooled)
