"""Multi-scale temporal perception (AV-Unified): a Q-Former that also queries features pooled over
longer windows of segments, so events of different lengths each have tokens at their own scale.

For every window length ``w`` of ``windows``, segment t's encoder features are averaged over the
``w`` segments around it (``[t - (w - 1) // 2, t + w // 2]``, moved inside the clip at its ends), and that
scale's own learned queries read the pooled patches with one shared Q-Former. Segment t then
holds, scale by scale, ``num_queries`` tokens that see its window: scale 1 is the plain per-segment
Q-Former, the longer windows what happens around it. The tokens stay grouped by segment
(``N = T * len(windows) * num_queries``), so the model's per-segment time codes apply as they are.
"""

from __future__ import annotations

import torch
from torch import nn

from avmt.connectors.qformer import QFormerConnector
from avmt.errors import UserError


def window_means(features: torch.Tensor, window: int) -> torch.Tensor:
    """Mean of every segment's features over the ``window`` segments around it.

    Args:
        features: ``[B, T, P, D]``.
        window: segments per window (>= 1); segment t averages ``[t - (window - 1) // 2,
            t - (window - 1) // 2 + window)``, shifted to lie inside ``[0, T)`` at the clip's ends
            (and cut to ``T`` segments when the clip is shorter than the window).
    Returns:
        ``[B, T, P, D]``.
    """
    t = features.shape[1]
    if window == 1:
        return features
    zero = features.new_zeros(features[:, :1].shape)
    total = torch.cat([zero, features.cumsum(1)], dim=1)  # [B, T + 1, P, D]
    start = (torch.arange(t, device=features.device) - (window - 1) // 2).clamp(0, t)
    end = (start + window).clamp(max=t)
    start = (end - window).clamp(min=0)  # windows at the ends keep their length where the clip allows
    count = (end - start).to(features.dtype).view(1, t, 1, 1)
    return (total[:, end] - total[:, start]) / count


class MultiScaleTemporalConnector(QFormerConnector):
    """``[B, T, P, D_enc]`` -> ``[B, T * len(windows) * num_queries, D_llm]``.

    Args:
        windows: the temporal window lengths in segments, one scale each (e.g. ``[1, 2, 4]``).
        num_queries: learned queries per segment and scale (each scale has its own).
        hidden_size, num_layers, num_heads, intermediate_size, cross_attention_frequency,
            dropout, initializer_range, projector_layers: the shared Q-Former's, as
            :class:`~avmt.connectors.QFormerConnector`.
    """

    def __init__(
        self,
        windows: list[int] = [1, 2, 4],  # noqa: B006
        num_queries: int = 1,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 128,
        cross_attention_frequency: int = 1,
        dropout: float = 0.0,
        initializer_range: float | None = None,
        projector_layers: int = 1,
    ) -> None:
        super().__init__(num_queries, hidden_size, num_layers, num_heads, intermediate_size,
                         cross_attention_frequency, dropout, initializer_range, projector_layers)
        windows = [int(w) for w in windows]
        if not windows or any(w < 1 for w in windows) or len(set(windows)) != len(windows):
            raise UserError(f"windows must be distinct segment counts >= 1, got {windows!r}")
        self.windows = windows

    def _build(self, in_dim: int, out_dim: int) -> None:
        super()._build(in_dim, out_dim)
        scales = len(self.windows)
        init = torch.randn(scales, self.num_queries, self.hidden_size) * self.initializer_range
        self.queries = nn.Parameter(init)  # [S, Q, H]: each scale's own queries

    def num_tokens(self, num_segments: int) -> int:
        """``num_segments * len(windows) * num_queries``."""
        return int(num_segments) * len(self.windows) * self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Query each segment's features at every scale.

        Args:
            features: ``[B, T, P, D_enc]``.
        Returns:
            ``[B, T * S * Q, D_llm]`` (S scales, Q queries): segment t's ``S * Q`` tokens are
            ``t*S*Q .. (t+1)*S*Q - 1``, scale by scale in ``windows`` order.
        """
        self._check_input(features)
        b, t = features.shape[:2]
        scales = len(self.windows)
        pooled = torch.cat([window_means(features, w) for w in self.windows], dim=0)  # [S*B, T, P, D]
        hidden = self.queries.repeat_interleave(b * t, dim=0)  # [S*B*T, Q, H], scale-major as pooled
        out = self._query(pooled, hidden)  # [S*B*T, Q, D_llm]
        out = out.reshape(scales, b, t, self.num_queries, -1).permute(1, 2, 0, 3, 4)
        return out.reshape(b, t * scales * self.num_queries, -1)

    def extra_repr(self) -> str:
        return f"windows={self.windows}, " + super().extra_repr()
