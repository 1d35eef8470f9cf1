"""Instruction-aware Q-Former connector (InstructBLIP), built on transformers' ``Blip2QFormerModel``.

As :class:`~avmt.connectors.qformer.QFormerConnector`, but the learned queries of each segment
also self-attend to the sample's prompt text before they cross-attend to the features, so what
the connector extracts depends on the question (InstructBLIP, Dai et al. 2023: the instruction
tokens share the self-attention with the queries, have their own feed-forward blocks, and do
not cross-attend the image). The prompt enters as the LLM's own input embeddings projected to the
Q-Former width (InstructBLIP tokenizes it again for its BERT; here the LLM's embedding table is
the one vocabulary). Without an instruction (stage-1 media pretraining) it is a plain Q-Former.
"""

from __future__ import annotations

import torch
from torch import nn

from avmt.connectors.base import Instruction
from avmt.connectors.qformer import QFormerConnector


class InstructQFormerConnector(QFormerConnector):
    """``[B, T, P, D_enc]`` and the prompt ``[B, L, D_llm]`` -> ``[B, T * num_queries, D_llm]``.

    Args: those of :class:`~avmt.connectors.qformer.QFormerConnector`.
    """

    reads_instruction = True

    def _qformer_config(self, in_dim: int) -> dict:
        return {**super()._qformer_config(in_dim), "use_qformer_text_input": True}

    def _build(self, in_dim: int, out_dim: int) -> None:
        super()._build(in_dim, out_dim)
        # the last layer's text feed-forward feeds nothing the queries read: frozen, so that every
        # trainable parameter gets a gradient (DDP needs no unused-parameter search)
        last = self.qformer.encoder.layer[-1]
        for module in (last.intermediate, last.output):
            module.requires_grad_(False)
        self.instruction_proj = nn.Linear(out_dim, self.hidden_size)  # D_llm -> Q-Former width

    def forward(self, features: torch.Tensor, instruction: Instruction | None = None) -> torch.Tensor:
        """Query each segment's features, conditioned on the prompt.

        Args:
            features: ``[B, T, P, D_enc]``.
            instruction: each row's prompt text (embeds ``[B, L, D_llm]``, mask ``[B, L]``); None
                queries without one.
        Returns:
            ``[B, T * num_queries, D_llm]``; tokens ``t*num_queries .. (t+1)*num_queries-1``
            come from segment t.
        """
        if instruction is None:
            return super().forward(features)
        self._check_input(features)
        b, t = features.shape[:2]
        if instruction.embeds.shape[0] != b:
            raise ValueError(f"{b} feature rows but {instruction.embeds.shape[0]} instructions")
        text = self.instruction_proj(instruction.embeds.to(self.instruction_proj.weight.dtype))  # [B, L, H]
        queries = self.queries.expand(b, -1, -1).to(text.dtype)
        hidden = torch.cat([queries, text], dim=1).repeat_interleave(t, dim=0)  # [B*T, Q+L, H]
        query_mask = torch.ones(b, self.num_queries, dtype=torch.bool, device=text.device)
        mask = torch.cat([query_mask, instruction.mask.bool()], dim=1).repeat_interleave(t, dim=0)
        out = self._query(features, hidden, mask.long())
        return out.reshape(b, t * self.num_queries, -1)
