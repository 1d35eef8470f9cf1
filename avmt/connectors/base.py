"""Connector contract: ``[B, T, P, D_enc]`` encoder features -> ``[B, N_tokens, D_llm]`` LLM inputs.

A connector is constructed with its own hyperparameters only (so it can be written in YAML
without knowing the encoder or LLM widths); the model calls :meth:`Connector.build` with the
widths once both are known. ``num_tokens(T)`` tells collate how many placeholder tokens a
modality with T segments expands to, before any forward pass.
"""

from __future__ import annotations

from typing import ClassVar, NamedTuple

import torch
from torch import nn

from avmt.errors import UserError


class Instruction(NamedTuple):
    """The prompt text of each media reference, for connectors that read it (InstructBLIP style).

    embeds: ``[n, L, D_llm]`` the LLM input embeddings of the prompt's text tokens (placeholders,
        padding and answer tokens removed), left-aligned; mask: ``bool [n, L]``, true on real tokens.
    """

    embeds: torch.Tensor
    mask: torch.Tensor


class Connector(nn.Module):
    """Base class: lazy ``build(in_dim, out_dim)``, ``num_tokens``, forward contract.

    A connector whose ``reads_instruction`` is true takes ``forward(features, instruction)`` and
    is run once per media reference with that sample's prompt (:class:`Instruction`); the others
    take ``forward(features)`` and are run once per clip.

    A cross-modal connector names the other modality it also reads in ``context_modality``
    (``"audio"``: a vision connector guided by the clip's sound; ``"vision"``: an audio connector
    that looks at the frames). It is built with that modality's width (``context_dim``) and takes
    ``forward(features [n, T, P, D_enc], context [n, T, Q, D_ctx])``, segment t of the context
    aligned with segment t of the features (for ``<image>``, T = 1: the audio of that segment);
    one that also reads the prompt takes ``forward(features, context, instruction)``.
    """

    reads_instruction = False
    context_modality: ClassVar[str | None] = None

    def __init__(self) -> None:
        super().__init__()
        self.in_dim: int | None = None
        self.out_dim: int | None = None
        self.context_dim: int | None = None

    @property
    def built(self) -> bool:
        """Whether :meth:`build` has created the layers."""
        return self.in_dim is not None

    def build(self, in_dim: int, out_dim: int, context_dim: int | None = None) -> None:
        """Create the layers for encoder width ``in_dim`` (D_enc) and LLM width ``out_dim`` (D_llm).

        ``context_dim`` (D_ctx): the width of the ``context_modality`` features, for a cross-modal
        connector (set as ``self.context_dim`` before ``_build`` runs); ignored by the others.
        Calling it again with the same widths is a no-op; with other widths it is an error.
        """
        in_dim, out_dim = int(in_dim), int(out_dim)
        if self.context_modality is None:
            context_dim = None
        elif context_dim is None or int(context_dim) < 1:
            raise RuntimeError(f"{type(self).__name__} reads {self.context_modality} features: build it with their width")
        else:
            context_dim = int(context_dim)
        if self.built:
            if (in_dim, out_dim, context_dim) != (self.in_dim, self.out_dim, self.context_dim):
                raise RuntimeError(
                    f"{type(self).__name__} already built for ({self.in_dim} -> {self.out_dim}, context "
                    f"{self.context_dim}), cannot rebuild for ({in_dim} -> {out_dim}, context {context_dim})"
                )
            return
        if in_dim < 1 or out_dim < 1:
            raise UserError(f"widths must be positive, got in_dim={in_dim}, out_dim={out_dim}")
        self.context_dim = context_dim
        self._build(in_dim, out_dim)
        self.in_dim, self.out_dim = in_dim, out_dim

    def _build(self, in_dim: int, out_dim: int) -> None:
        raise NotImplementedError

    def num_tokens(self, num_segments: int) -> int:
        """N_tokens produced for ``num_segments`` segments (T)."""
        raise NotImplementedError

    def _check_input(self, x: torch.Tensor) -> None:
        if not self.built:
            raise RuntimeError(
                f"{type(self).__name__}.forward called before build(in_dim, out_dim); "
                f"the model must build its connectors once the encoder and LLM widths are known"
            )
        if x.dim() != 4:
            raise ValueError(f"connector input must be [B, T, P, D_enc], got shape {tuple(x.shape)}")
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"connector built for D_enc={self.in_dim}, got features of width {x.shape[-1]}")

    def extra_repr(self) -> str:
        return f"in_dim={self.in_dim}, out_dim={self.out_dim}"
