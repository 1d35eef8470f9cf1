"""Head contract: LLM hidden states at a special token + encoder features -> dense predictions.

Like a connector, a head is constructed with its own hyperparameters only (so it can be written
in YAML) and built lazily by the model with the widths it reads: :meth:`Head.build`. The model
finds every position that predicts the head's ``token`` (teacher-forced in training, emitted in
generation), gathers the last-layer hidden states there and calls the head with one query per
position, the encoder features of the batch's clips and the clip of each query.

Two extensions (both off by default):

- a **token group** (``query_tokens``): the answer holds several special tokens in place of
  ``token`` (Crab's six ``<mask_i>``); tasks keep writing ``token``, the model writes the group
  into training targets, forces the rest of the group in generation once its first token is
  emitted and decodes the group back to ``token``. The head then gets ``[M, G, D_llm]`` queries,
  the states that predict each token of the group.
- **feedback**: :meth:`Head.feedback` turns the head's prediction into a vector that the model adds
  to the LLM input embedding of the group's last token (``token`` itself for a single token), so
  every later answer token attends to it (AVUFormer's Mask Collaboration Module).
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
        query_tokens: the token group an answer holds in place of ``token`` (each a special token
            of the LLM); ``None`` = ``(token,)``, the token itself.

    Subclasses set ``output`` (the name of what they produce, e.g. ``"mask_logits"``; tasks
    read it from ``ModelOutput.dense``) and implement ``_build`` and ``forward``.
    """

    output: ClassVar[str] = ""

    def __init__(self, token: str = "<seg>", query_tokens: list[str] | None = None) -> None:
        super().__init__()
        self.token = token
        group = (token,) if query_tokens is None else tuple(query_tokens)
        if not group or len(set(group)) != len(group) or not all(isinstance(t, str) and t for t in group):
            raise UserError(f"query_tokens must be distinct non-empty token strings, got {query_tokens!r}")
        if len(group) > 1 and token in group:
            raise UserError(f"query_tokens {list(group)} replace {token!r} in answers and cannot hold it")
        self.query_tokens: tuple[str, ...] = group
        self.dims: tuple[int, int, int] | None = None

    @property
    def group_size(self) -> int:
        """G, the number of tokens (and query states) per emission of the head's token."""
        return len(self.query_tokens)

    @property
    def gives_feedback(self) -> bool:
        """Whether :meth:`feedback` may return a vector (the model then runs the feedback passes);
        by default, whether the subclass overrides it."""
        return type(self).feedback is not Head.feedback

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
            queries: ``[M, D_llm]`` hidden states that predict the head's token, or ``[M, G, D_llm]``
                those that predict each token of its group when ``G = len(query_tokens) > 1``.
            media: the encoder features of C clips.
            clip_index: ``long [M]`` the clip each query reads (None: query m reads clip m, C = M).
        Returns:
            ``[M, ...]`` predictions (for a mask head: ``[M, T, H, W]`` logits at the frame size).
        """
        raise NotImplementedError

    def feedback(self, prediction: torch.Tensor, media: EncodedMedia,
                 clip_index: torch.Tensor | None = None) -> torch.Tensor | None:
        """What the LLM reads back from the head's prediction, or None (this default: nothing).

        Args:
            prediction: ``[M, ...]`` this head's output for M queries.
            media: the encoder features of C clips.
            clip_index: ``long [M]`` the clip of each prediction (None: prediction m is of clip m).
        Returns:
            ``[M, D_llm]``, added to the LLM input embedding of the group's last token (the
            head's token itself when ``G = 1``) of each emission; or None.
        """
        return None

    @staticmethod
    def _check_frames(media: EncodedMedia) -> None:
        """Refuse ``media.frames`` that are not ``[C, T, 3, H, W]`` or a ``media.grid`` that is not ``(h, w)``."""
        frames = media.frames
        if frames.dim() != 5 or frames.shape[2] != 3:
            raise ValueError(f"media.frames must be [C, T, 3, H, W], got shape {tuple(frames.shape)}")
        if len(media.grid) != 2:
            raise ValueError(f"media.grid must be (h, w), got {media.grid!r}")

    @staticmethod
    def _clip_index(shapes: dict[str, torch.Size], frames: torch.Tensor, m: int, clip_index: torch.Tensor | None,
                    device: torch.device) -> torch.Tensor:
        """The clip of each of ``m`` queries (``long [M]`` on ``device``), after checking that every feature
        tensor named in ``shapes`` (``[C, T, ...]``) has the clips and segments of ``frames [C, T, ...]``."""
        clips = frames.shape[0]
        for name, shape in shapes.items():
            if shape[0] != clips:
                raise ValueError(f"{name} has {shape[0]} clips, media.frames has {clips}")
            if shape[1] != frames.shape[1]:
                raise ValueError(f"{name} has T={shape[1]}, media.frames has T={frames.shape[1]}")
        if clip_index is None:
            if clips != m:
                raise ValueError(f"media has {clips} clips, expected one per query (M={m}) when no clip_index is given")
            return torch.arange(m, device=device)
        if clip_index.shape != (m,) or (m and not 0 <= int(clip_index.min()) <= int(clip_index.max()) < clips):
            raise ValueError(f"clip_index must be [M={m}] indices into the {clips} clips, got {clip_index.tolist()}")
        return clip_index.to(device)

    def _check_built(self) -> None:
        if not self.built:
            raise RuntimeError(
                f"{type(self).__name__}.forward called before build(llm_dim, vision_dim, audio_dim); "
                "the model builds its heads once the widths are known"
            )

    def extra_repr(self) -> str:
        return f"token={self.token!r}, dims={self.dims}"
