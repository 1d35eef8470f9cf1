"""MLP connector (LLaVA-1.5 style): pool each segment's patches, then a 2-layer GELU MLP."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avmt.connectors.base import Connector
from avmt.errors import UserError


class MLPConnector(Connector):
    """``[B, T, P, D_enc]`` -> ``[B, T * tokens_per_segment, D_llm]``.

    Args:
        tokens_per_segment: each segment's P features are adaptive-average-pooled (along P,
            in order) to this many tokens.
        hidden_size: width of the MLP's hidden layer.
    """

    def __init__(self, tokens_per_segment: int = 4, hidden_size: int = 256) -> None:
        super().__init__()
        if tokens_per_segment < 1:
            raise UserError(f"tokens_per_segment must be >= 1, got {tokens_per_segment}")
        self.tokens_per_segment = int(tokens_per_segment)
        self.hidden_size = int(hidden_size)

    def _build(self, in_dim: int, out_dim: int) -> None:
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, self.hidden_size), nn.GELU(), nn.Linear(self.hidden_size, out_dim)
        )

    def num_tokens(self, num_segments: int) -> int:
        """``num_segments * tokens_per_segment``."""
        return int(num_segments) * self.tokens_per_segment

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pool and project.

        Args:
            features: ``[B, T, P, D_enc]``.
        Returns:
            ``[B, T * tokens_per_segment, D_llm]``, segment-major.
        """
        self._check_input(features)
        b, t, p, d = features.shape
        x = features.reshape(b * t, p, d).transpose(1, 2).to(self.mlp[0].weight.dtype)  # [B*T, D, P]
        x = F.adaptive_avg_pool1d(x, self.tokens_per_segment).transpose(1, 2)  # [B*T, Q, D]
        return self.mlp(x).reshape(b, t * self.tokens_per_segment, -1)

    def extra_repr(self) -> str:
        own = f"tokens_per_segment={self.tokens_per_segment}, hidden_size={self.hidden_size}"
        return f"{own}, {super().extra_repr()}"
