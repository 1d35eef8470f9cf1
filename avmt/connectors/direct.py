"""Direct connector: the encoder's tokens go to the LLM as they are (Crab+ / Qwen2.5-Omni style).

Qwen2.5-Omni's vision and audio towers already end in a projection to the LLM's width, so Crab+
feeds their outputs to the LLM without a connector of its own. This connector keeps that path
inside avmt's contract: no parameters when the encoder width equals the LLM width, one linear
projection otherwise; all P tokens of a segment when ``tokens_per_segment`` equals P, else an
average pooling of them along P (in order) to ``tokens_per_segment``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from avmt.connectors.base import Connector
from avmt.errors import UserError


class DirectConnector(Connector):
    """``[B, T, P, D_enc]`` -> ``[B, T * tokens_per_segment, D_llm]``, segment-major.

    Args:
        tokens_per_segment: Q, tokens per segment; equal to the encoder's P (e.g. the vision
            tower's merged patches per frame) to pass every token through unchanged, smaller to
            average-pool each segment's P tokens (along P, in order) to Q.

    Width: identity when ``D_enc == D_llm`` (no parameters), else one ``nn.Linear(D_enc, D_llm)``.
    """

    def __init__(self, tokens_per_segment: int = 4) -> None:
        super().__init__()
        if tokens_per_segment < 1:
            raise UserError(f"tokens_per_segment must be >= 1, got {tokens_per_segment}")
        self.tokens_per_segment = int(tokens_per_segment)

    def _build(self, in_dim: int, out_dim: int) -> None:
        self.projection = nn.Identity() if in_dim == out_dim else nn.Linear(in_dim, out_dim)

    def num_tokens(self, num_segments: int) -> int:
        """``num_segments * tokens_per_segment``."""
        return int(num_segments) * self.tokens_per_segment

    def token_grid(self, grid: tuple[int, int]) -> tuple[int, int] | None:
        """The ``(rows, cols)`` grid of one segment's output tokens when it keeps the encoder's patch
        ``grid`` (all P = rows * cols tokens passed through, row-major), else ``None`` (pooled)."""
        rows, cols = int(grid[0]), int(grid[1])
        return (rows, cols) if rows * cols == self.tokens_per_segment else None

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Pass through (or pool) and project.

        Args:
            features: ``[B, T, P, D_enc]``.
        Returns:
            ``[B, T * tokens_per_segment, D_llm]``, segment-major (each segment's tokens in the
            encoder's order when ``P == tokens_per_segment``).
        """
        self._check_input(features)
        b, t, p, d = features.shape
        tokens = features
        if p != self.tokens_per_segment:
            by_segment = features.reshape(b * t, p, d).transpose(1, 2)  # [B*T, D_enc, P]
            pooled = F.adaptive_avg_pool1d(by_segment, self.tokens_per_segment)
            tokens = pooled.transpose(1, 2)  # [B*T, Q, D_enc]
        tokens = tokens.reshape(b, t * self.tokens_per_segment, d)
        if isinstance(self.projection, nn.Linear):
            tokens = tokens.to(self.projection.weight.dtype)
        return self.projection(tokens)

    def extra_repr(self) -> str:
        return f"tokens_per_segment={self.tokens_per_segment}, {super().extra_repr()}"
