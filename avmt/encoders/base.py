"""Shared machinery of the encoders: the ``freeze`` switch and the ``pretrained`` record.

An encoder wraps a transformers backbone (``self.backbone``). ``freeze=True`` turns off the
gradients of every backbone parameter and keeps the backbone in eval mode even when the
surrounding LightningModule calls ``.train()`` (dropout / layer-drop stay off). Parameters
added later inside the backbone (e.g. adapters injected with scope ``vision`` / ``audio``) are
not touched by the switch: only the parameters present when ``freeze`` was applied are frozen.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Encoder(nn.Module):
    """Base class of the encoders.

    Subclasses set ``self.backbone`` (an ``nn.Module``) and ``self.pretrained`` (``True`` when
    the weights came from a checkpoint, ``False`` for a randomly initialized tiny config),
    then call :meth:`_apply_freeze`.
    """

    backbone: nn.Module
    pretrained: bool
    frozen: bool

    def _apply_freeze(self, freeze: bool) -> None:
        """Freeze (``requires_grad=False`` + eval mode) or unfreeze (train mode) the backbone.

        A backbone from ``from_pretrained`` arrives in eval mode and Lightning keeps submodule
        modes, so an unfrozen one is put in train mode here (its dropout, an adapter's dropout).
        """
        self.frozen = bool(freeze)
        for p in self.backbone.parameters():
            p.requires_grad_(not self.frozen)
        self.backbone.train(not self.frozen)

    def train(self, mode: bool = True) -> "Encoder":
        """Set train/eval mode; a frozen backbone always stays in eval mode."""
        super().train(mode)
        if getattr(self, "frozen", False):
            self.backbone.eval()
        return self

    @property
    def output_dim(self) -> int:
        """Feature width D of the encoder's output."""
        raise NotImplementedError

    @property
    def device(self) -> torch.device:
        """Device of the backbone's parameters."""
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        """Floating dtype of the backbone's parameters."""
        for p in self.backbone.parameters():
            if p.is_floating_point():
                return p.dtype
        return torch.float32



class VisionEncoder(Encoder):
    """Base class of video encoders: ``forward(video [B, T, 3, H, W]) -> [B, T, P, D]``.

    Subclasses expose ``output_dim`` (D) and ``num_patches`` (P).
    """

    @property
    def num_patches(self) -> int:
        """P, patch tokens per frame."""
        raise NotImplementedError

    @property
    def grid(self) -> tuple[int, int]:
        """``(h, w)``: the P patches lie on an h x w grid, row-major (default: a square grid)."""
        side = math.isqrt(self.num_patches)
        if side * side != self.num_patches:
            raise NotImplementedError(f"{type(self).__name__}: {self.num_patches} patches are not a square grid")
        return side, side


class AudioEncoder(Encoder):
    """Base class of audio encoders: ``forward(audio [B, S], num_segments=T) -> [B, T, Q, D]``.

    Subclasses expose ``output_dim`` (D), ``tokens_per_segment`` (Q) and ``sample_rate``.
    """

    tokens_per_segment: int
    sample_rate: int


_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def torch_dtype(name: str) -> torch.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``"float16"`` (or fp32/bf16/fp16) -> torch dtype."""
    if name not in _DTYPES:
        raise ValueError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]
