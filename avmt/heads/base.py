"""Head contract: LLM hidden states at a special token + encoder features -> dense predictions.

Like a connector, a head is constructed with its own hyperparameters only (so it can be written
in YAML) and built lazily by the model with the widths it reads: :meth:`Head.build`. The model
finds every position that predicts the head's ``token`` (teacher-forced in training, emitted in
generation), gathers the last-layer hidden states there and calls the head with one query per
position, the encoder features of the batch's clips and the clip of each query.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from avmt.errors import UserError
from avmt.outputs import EncodedMedia


class Head(nn.Module):
    """Base class of the heads: lazy ``build``, ``token``, ``output`` name, forward contract.

    Args:
        token: the special token whose hidden states the head reads (the LLM must have it among
            its ``special_tokens``).

    Subclasses set ``output`` (the name of what they produce, e.g. ``"mask_logits"``; tasks
    read it from ``ModelOutput.dense``) and implement ``_build`` and ``forward``.
    """

    output: ClassVar[str] = ""

    def __init__(self, token: str = "<seg>") -> None:
        super().__init__()
        self.token = token
        self.dims: tuple[int, int, int] | None = None

    @property
    def built(self) -> bool:
        """Whether :meth:`build` has created the layers."""
        return self.dims is not None

    def build(self, llm_dim: int, vision_dim: int, audio_dim: int) -> None:
        """Create the layers for the LLM width and the vision / audio feature widths.

        Calling it again with the same widths is a no-op; with other widths it is an error.
        """
        dims = (int(llm_dim), int(vision_dim), int(audio_dim))
        if self.built:
            if dims != self.dims:
                raise RuntimeError(f"{type(self).__name__} already built for {self.dims}, cannot rebuild for {dims}")
            return
        if min(dims) < 1:
            raise UserError(f"widths must be positive, got {dims}")
        self._build(*dims)
        self.dims = dims

    def _build(self, llm_dim: int, vision_dim: int, audio_dim: int) -> None:
        raise NotImplementedError

    def forward(self, queries: torch.Tensor, media: EncodedMedia, clip_index: torch.Tensor | None = None) -> torch.Tensor:
        """Dense predictions, one per query.

        Args:
            queries: ``[M, D_llm]`` hidden states at the head's token.
            media: the encoder features of C clips.
            clip_index: ``long [M]`` the clip each query reads (None: query m reads clip m, C = M).
        Returns:
            ``[M, ...]`` predictions (for a mask head: ``[M, T, H, W]`` logits at the frame size).
        """
        raise NotImplementedError

    def _check_built(self) -> None:
        if not self.built:
            raise RuntimeError(
                f"{type(self).__name__}.forward called before build(llm_dim, vision_dim, audio_dim); "
                "the model builds its heads once the widths are known"
            )

    def extra_repr(self) -> str:
        return f"token={self.token!r}, dims={self.dims}"
