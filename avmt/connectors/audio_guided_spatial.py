"""Audio-guided spatial perception (AV-Unified): per segment, queries shaped by that segment's sound
attend over the frame's patches, so the tokens carry where the sounding object is.

Per segment t, the clip's audio tokens of t are pooled and projected to the connector width and
added to every one of ``num_queries`` learned query slots; the queries then run ``num_layers``
transformer decoder blocks (self-attention among the queries, cross-attention over the segment's
P visual patches, MLP) and are projected into the LLM. A cross-modal connector
(``context_modality = "audio"``): the model passes the audio features aligned with the frames
(for ``<image>``, the audio of that segment). Called without the audio (stage-1 pretraining reads
the connector alone), the queries are the learned slots only.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from avmt.connectors.base import Connector
from avmt.errors import UserError


class AudioGuidedSpatialConnector(Connector):
    """``[B, T, P, D_v]`` (+ audio ``[B, T, Q_a, D_a]``) -> ``[B, T * num_queries, D_llm]``.

    Args:
        num_queries: query slots per segment (tokens per segment).
        hidden_size: the attention width.
        num_layers: decoder blocks (self-attention, cross-attention over the patches, MLP).
        num_heads: attention heads.
        intermediate_size: MLP width of a block.
        dropout: dropout inside the blocks.
    """

    context_modality: ClassVar[str | None] = "audio"

    def __init__(self, num_queries: int = 2, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                 intermediate_size: int = 128, dropout: float = 0.0) -> None:
        super().__init__()
        if num_queries < 1 or num_layers < 1:
            raise UserError(f"num_queries and num_layers must be >= 1, got {num_queries} and {num_layers}")
        if hidden_size % num_heads != 0:
            raise UserError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        self.num_queries = int(num_queries)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.intermediate_size = int(intermediate_size)
        self.dropout = float(dropout)

    def _build(self, in_dim: int, out_dim: int) -> None:
        width = self.hidden_size
        self.patch_norm = nn.LayerNorm(in_dim)
        self.patch_proj = nn.Linear(in_dim, width)
        self.audio_norm = nn.LayerNorm(self.context_dim)
        self.audio_proj = nn.Linear(self.context_dim, width)
        self.queries = nn.Parameter(torch.randn(1, self.num_queries, width) * width ** -0.5)
        layer = nn.TransformerDecoderLayer(width, self.num_heads, self.intermediate_size, self.dropout,
                                           activation="gelu", batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, self.num_layers, norm=nn.LayerNorm(width))
        self.proj = nn.Linear(width, out_dim)

    def num_tokens(self, num_segments: int) -> int:
        """``num_segments * num_queries``."""
        return int(num_segments) * self.num_queries

    def forward(self, features: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Audio-guided queries read each segment's patches.

        Args:
            features: ``[B, T, P, D_v]`` the frames' patch features.
            context: ``[B, T, Q_a, D_a]`` the audio tokens of the same segments, or None (unguided).
        Returns:
            ``[B, T * num_queries, D_llm]``; tokens ``t*num_queries .. (t+1)*num_queries-1`` come
            from segment t.
        """
        self._check_input(features)
        b, t, p, d = features.shape
        dtype = self.patch_proj.weight.dtype
        patches = self.patch_proj(self.patch_norm(features.reshape(b * t, p, d).to(dtype)))  # [B*T, P, H]
        queries = self.queries.expand(b * t, -1, -1)  # [B*T, Q, H]
        if context is not None:
            if context.dim() != 4 or context.shape[:2] != (b, t) or context.shape[-1] != self.context_dim:
                raise ValueError(f"audio context must be [{b}, {t}, Q_a, {self.context_dim}], got {tuple(context.shape)}")
            sound = self.audio_proj(self.audio_norm(context.to(dtype).mean(2)))  # [B, T, H]
            queries = queries + sound.reshape(b * t, 1, -1)
        out = self.blocks(queries, patches)  # [B*T, Q, H]
        return self.proj(out).reshape(b, t * self.num_queries, -1)

    def extra_repr(self) -> str:
        return f"num_queries={self.num_queries}, hidden_size={self.hidden_size}, {super().extra_repr()}"
