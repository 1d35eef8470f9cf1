"""Multi-modality integration connector (AVUFormer): self-attention within one modality's tokens,
cross-attention to the other modality's tokens of the same segment.

One instance per modality: as the vision connector it reads the clip's audio as its context
(``context_modality = "audio"``), as the audio connector (:class:`AVIntegrationAudioConnector`)
the vision features. Each segment's P encoder features are pooled to ``tokens_per_segment``
tokens; every layer is a pre-norm transformer decoder layer (torch's ``TransformerDecoderLayer``):
self-attention over all ``T * tokens_per_segment`` tokens of the clip (each carrying a sinusoidal
code of its segment, so attention knows when a token was seen or heard), cross-attention to the
context tokens of the token's own segment, and an MLP.
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from avmt.connectors.base import Connector
from avmt.errors import UserError


def segment_codes(num_segments: int, width: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Sinusoidal codes of the segment indices: ``[T, width]`` (the Transformer's position encoding)."""
    position = torch.arange(num_segments, device=device, dtype=torch.float32).unsqueeze(1)
    even = torch.arange(0, width, 2, device=device, dtype=torch.float32)
    frequency = torch.exp(even * (-math.log(10000.0) / width))
    codes = torch.zeros(num_segments, width, device=device, dtype=torch.float32)
    codes[:, 0::2] = torch.sin(position * frequency)
    codes[:, 1::2] = torch.cos(position * frequency)[:, : width // 2]
    return codes.to(dtype)


class AVIntegrationConnector(Connector):
    """``features [n, T, P, D_enc]`` + ``context [n, T, Q, D_ctx]`` -> ``[n, T * tokens_per_segment, D_llm]``.

    Args:
        tokens_per_segment: each segment's P features are adaptive-average-pooled (along P, in
            order) to this many tokens.
        hidden_size: width of the integration layers.
        num_layers: integration layers (self-attention, cross-attention, MLP each).
        num_heads: attention heads (``hidden_size`` must divide by it).
        intermediate_size: width of each layer's MLP.
        dropout: dropout inside the layers.
    """

    context_modality: ClassVar[str | None] = "audio"

    def __init__(
        self,
        tokens_per_segment: int = 4,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 128,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        for name, value in (("tokens_per_segment", tokens_per_segment), ("hidden_size", hidden_size),
                            ("num_layers", num_layers), ("num_heads", num_heads),
                            ("intermediate_size", intermediate_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise UserError(f"{name} must be a positive int, got {value!r}")
        if hidden_size % num_heads:
            raise UserError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if not 0.0 <= dropout < 1.0:
            raise UserError(f"dropout must be within [0, 1), got {dropout!r}")
        self.tokens_per_segment = tokens_per_segment
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.num_heads = num_heads
        self.intermediate_size = intermediate_size
        self.dropout = float(dropout)

    def _build(self, in_dim: int, out_dim: int) -> None:
        d = self.hidden_size
        self.input_proj = nn.Sequential(nn.LayerNorm(in_dim), nn.Linear(in_dim, d))
        self.context_proj = nn.Sequential(nn.LayerNorm(self.context_dim), nn.Linear(self.context_dim, d))
        self.layers = nn.ModuleList(
            nn.TransformerDecoderLayer(d, self.num_heads, self.intermediate_size, self.dropout,
                                       activation="gelu", batch_first=True, norm_first=True)
            for _ in range(self.num_layers)
        )
        self.output_proj = nn.Sequential(nn.LayerNorm(d), nn.Linear(d, out_dim))

    def num_tokens(self, num_segments: int) -> int:
        """``num_segments * tokens_per_segment``."""
        return int(num_segments) * self.tokens_per_segment

    def forward(self, features: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        """Integrate one modality's tokens with the other's.

        Args:
            features: ``[n, T, P, D_enc]`` this modality's encoder features.
            context: ``[n, T, Q, D_ctx]`` the other modality's encoder features, segment t aligned
                with segment t of ``features``.
        Returns:
            ``[n, T * tokens_per_segment, D_llm]``, segment-major.
        """
        self._check_input(features)
        if context is None:
            raise ValueError(f"{type(self).__name__} needs the {self.context_modality} features as context")
        n, t, p, _ = features.shape
        if context.dim() != 4 or context.shape[:2] != (n, t) or context.shape[-1] != self.context_dim:
            raise ValueError(
                f"context must be [{n}, {t}, Q, {self.context_dim}] (aligned with the features), "
                f"got shape {tuple(context.shape)}"
            )
        dtype = self.input_proj[1].weight.dtype
        k, q = self.tokens_per_segment, context.shape[2]
        x = features.reshape(n * t, p, -1).transpose(1, 2).to(dtype)
        x = F.adaptive_avg_pool1d(x, k).transpose(1, 2).reshape(n, t, k, -1)  # [n, T, k, D_enc]
        codes = segment_codes(t, self.hidden_size, features.device, dtype)[None, :, None]  # [1, T, 1, d]
        x = (self.input_proj(x) + codes).reshape(n, t * k, -1)
        memory = (self.context_proj(context.to(dtype)) + codes).reshape(n, t * q, -1)
        segment = torch.arange(t, device=features.device)
        # True = not attended: a token reads only the context of its own segment
        memory_mask = segment.repeat_interleave(k)[:, None] != segment.repeat_interleave(q)[None, :]
        for layer in self.layers:
            x = layer(x, memory, memory_mask=memory_mask)
        return self.output_proj(x)

    def extra_repr(self) -> str:
        own = (f"tokens_per_segment={self.tokens_per_segment}, hidden_size={self.hidden_size}, "
               f"num_layers={self.num_layers}, context={self.context_modality}")
        return f"{own}, {super().extra_repr()}"


class AVIntegrationAudioConnector(AVIntegrationConnector):
    """:class:`AVIntegrationConnector` as the audio connector: the audio tokens attend to the vision
    features of their segment (``context_modality = "vision"``)."""

    context_modality: ClassVar[str | None] = "vision"
