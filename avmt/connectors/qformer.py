"""Q-Former connector (BLIP-2 / Crab style), built on transformers' ``Blip2QFormerModel``.

Per segment, ``num_queries`` learned queries cross-attend to that segment's P encoder
features (segments are batched as ``[B*T, P, D_enc]``, so segment t's tokens depend on segment
t only); the query outputs are projected to the LLM width (one linear layer, or Crab's 2-layer
MLP: ``projector_layers``). One instance per modality.
"""

from __future__ import annotations

import torch
from torch import nn

from avmt.connectors.base import Connector
from avmt.errors import UserError


class QFormerConnector(Connector):
    """``[B, T, P, D_enc]`` -> ``[B, T * num_queries, D_llm]``.

    Args:
        num_queries: learned query tokens per segment.
        hidden_size, num_layers, num_heads, intermediate_size: the Q-Former's own config.
        cross_attention_frequency: a cross-attention block every this many layers (1 = every
            layer; BLIP-2 uses 2).
        dropout: hidden and attention dropout inside the Q-Former.
        initializer_range: std of the Q-Former's initial weights and queries; ``None`` =
            ``hidden_size ** -0.5`` (fan-in scaled). BLIP-2's fixed 0.02 suits width 768; at the
            tiny default width it leaves the cross-attention so weak that the outputs barely
            depend on the features, and training from scratch stalls.
        projector_layers: layers of the projection from the Q-Former width into the LLM: 1 = one
            linear layer; 2 = Linear, GELU, Linear (Crab's 2-layer MLP per modality).
    """

    def __init__(
        self,
        num_queries: int = 4,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        intermediate_size: int = 128,
        cross_attention_frequency: int = 1,
        dropout: float = 0.0,
        initializer_range: float | None = None,
        projector_layers: int = 1,
    ) -> None:
        super().__init__()
        if num_queries < 1:
            raise UserError(f"num_queries must be >= 1, got {num_queries}")
        if hidden_size % num_heads != 0:
            raise UserError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
        if projector_layers not in (1, 2):
            raise UserError(f"projector_layers must be 1 or 2, got {projector_layers!r}")
        self.num_queries = int(num_queries)
        self.hidden_size = int(hidden_size)
        self.num_layers = int(num_layers)
        self.num_heads = int(num_heads)
        self.intermediate_size = int(intermediate_size)
        self.cross_attention_frequency = int(cross_attention_frequency)
        self.dropout = float(dropout)
        self.initializer_range = float(initializer_range) if initializer_range is not None else self.hidden_size**-0.5
        self.projector_layers = int(projector_layers)

    def _qformer_config(self, in_dim: int) -> dict:
        """Keyword arguments of the ``Blip2QFormerConfig`` (a subclass may add to them)."""
        return dict(
            hidden_size=self.hidden_size,
            num_hidden_layers=self.num_layers,
            num_attention_heads=self.num_heads,
            intermediate_size=self.intermediate_size,
            hidden_dropout_prob=self.dropout,
            attention_probs_dropout_prob=self.dropout,
            cross_attention_frequency=self.cross_attention_frequency,
            encoder_hidden_size=in_dim,
            initializer_range=self.initializer_range,
        )

    def _build(self, in_dim: int, out_dim: int) -> None:
        from transformers import Blip2QFormerConfig, Blip2QFormerModel

        config = Blip2QFormerConfig(**self._qformer_config(in_dim))
        self.input_norm = nn.LayerNorm(in_dim)
        init = torch.randn(1, self.num_queries, self.hidden_size) * config.initializer_range
        self.queries = nn.Parameter(init)
        self.qformer = Blip2QFormerModel(config)
        if self.projector_layers == 1:
            self.proj = nn.Linear(self.hidden_size, out_dim)
        else:
            self.proj = nn.Sequential(nn.Linear(self.hidden_size, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))

    def num_tokens(self, num_segments: int) -> int:
        """``num_segments * num_queries``."""
        return int(num_segments) * self.num_queries

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Query each segment's features.

        Args:
            features: ``[B, T, P, D_enc]``.
        Returns:
            ``[B, T * num_queries, D_llm]``; tokens ``t*num_queries .. (t+1)*num_queries-1``
            come from segment t.
        """
        self._check_input(features)
        b, t = features.shape[:2]
        out = self._query(features, self.queries.expand(b * t, -1, -1))
        return out.reshape(b, t * self.num_queries, -1)

    def _query(self, features: torch.Tensor, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Run the Q-Former over every segment.

        Args:
            features: ``[B, T, P, D_enc]``.
            hidden: ``[B*T, Q + L, H]`` the learned queries, then (optionally) L text tokens that
                the queries attend to but that do not cross-attend the features.
            mask: ``bool [B*T, Q + L]`` the tokens to attend to (None: all).
        Returns:
            ``[B*T, Q, D_llm]`` the projected query outputs.
        """
        b, t, p, d = features.shape
        enc = self.input_norm(features.reshape(b * t, p, d).to(self.input_norm.weight.dtype))
        out = self.qformer(query_embeds=hidden, query_length=self.num_queries, attention_mask=mask,
                           encoder_hidden_states=enc).last_hidden_state[:, : self.num_queries]  # [B*T, Q, H]
        return self.proj(out.to(self.input_norm.weight.dtype))

    def extra_repr(self) -> str:
        # projector_layers only when not 1: the repr is part of stage 1's cache fingerprint
        projector = f", projector_layers={self.projector_layers}" if self.projector_layers != 1 else ""
        return f"num_queries={self.num_queries}{projector}, " + super().extra_repr()
