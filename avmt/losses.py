"""Dense losses the spatial tasks add to the LM loss (weighted by ``model.dense_loss_weights``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["mask_bce", "mask_dice", "class_map_cross_entropy"]


def mask_bce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of mask logits, mean over every pixel.

    Args:
        logits: ``[n, T, H, W]`` mask logits.
        target: ``[n, T, H, W]`` bool (or 0/1) masks.
    Returns:
        scalar loss.
    """
    return F.binary_cross_entropy_with_logits(logits.float(), target.float())


def mask_dice(logits: torch.Tensor, target: torch.Tensor, smooth: float = 1.0) -> torch.Tensor:
    """Soft Dice loss ``1 - (2 Σ p t + s) / (Σ p + Σ t + s)`` per sample (all its frames), mean over samples.

    With ``smooth = 1`` an empty target predicted empty costs ~0 (the null and silent cases).

    Args:
        logits: ``[n, T, H, W]`` mask logits.
        target: ``[n, T, H, W]`` bool masks.
    Returns:
        scalar loss.
    """
    prob = torch.sigmoid(logits.float()).flatten(1)
    truth = target.float().flatten(1)
    dice = (2 * (prob * truth).sum(1) + smooth) / (prob.sum(1) + truth.sum(1) + smooth)
    return (1 - dice).mean()


def class_map_cross_entropy(channel_logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Pixel-wise cross-entropy of a class map, mean over pixels.

    Args:
        channel_logits: ``[n, K + 1, T, H, W]`` logits of background (channel 0) and K classes.
        target: ``long [n, T, H, W]`` channel index of every pixel (0 = background).
    Returns:
        scalar loss.
    """
    return F.cross_entropy(channel_logits.float(), target)
