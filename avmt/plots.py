"""Pictures of predictions for TensorBoard: masks, class maps and boxes drawn over frames (numpy only)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

__all__ = ["mask_panel", "class_map_panel", "box_panel", "TARGET_RGB", "PREDICTION_RGB"]

#: Mask colours, painted over the darkened frame: the target in green, the prediction in magenta
#: (solid, so a mask shows on an object of any colour).
TARGET_RGB = (40, 220, 60)
PREDICTION_RGB = (240, 40, 240)
_DIM = 0.35


def _hwc(frame: torch.Tensor) -> np.ndarray:
    """``uint8 [3, H, W]`` tensor -> ``float [H, W, 3]`` array."""
    return frame.detach().cpu().permute(1, 2, 0).numpy().astype(np.float32)


def _paint(image: np.ndarray, where: np.ndarray, rgb: Sequence[int]) -> np.ndarray:
    """The frame darkened, with the pixels of ``where`` painted ``rgb``."""
    out = image * _DIM
    out[where] = np.asarray(rgb, dtype=np.float32)
    return out


def _shown_frames(num_frames: int, weights: np.ndarray, count: int) -> list[int]:
    """Up to ``count`` frame indices, the frames with most target pixels first, in time order."""
    order = sorted(range(num_frames), key=lambda t: (-float(weights[t]), t))
    return sorted(order[:count])


def _grid(rows: list[list[np.ndarray]], scale: int) -> np.ndarray:
    image = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    image = np.repeat(np.repeat(image, scale, axis=0), scale, axis=1)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)


def mask_panel(frames: torch.Tensor, target: torch.Tensor | None, prediction: torch.Tensor | None,
               max_frames: int = 4, scale: int = 2) -> np.ndarray:
    """Frames, then the target (green) and the predicted mask (magenta, probability > 0.5) painted on them.

    Args:
        frames: ``uint8 [T, 3, H, W]``.
        target: ``bool [T, H, W]`` or None; prediction: ``float [T, H, W]`` probabilities or None.
        max_frames: frames shown (those with the most target pixels).
        scale: nearest-neighbour upscaling.
    Returns:
        ``uint8 [3·H·scale, n·W·scale, 3]``: rows frame / target / prediction.
    """
    num = frames.shape[0]
    weights = target.flatten(1).sum(1).cpu().numpy() if target is not None else np.zeros(num)
    shown = _shown_frames(num, weights, max_frames)
    rows: list[list[np.ndarray]] = [[], [], []]
    for t in shown:
        image = _hwc(frames[t])
        rows[0].append(image)
        truth = target[t].cpu().numpy().astype(bool) if target is not None else np.zeros(image.shape[:2], bool)
        rows[1].append(_paint(image, truth, TARGET_RGB))
        guess = (prediction[t].float().cpu().numpy() > 0.5) if prediction is not None else np.zeros_like(truth)
        rows[2].append(_paint(image, guess, PREDICTION_RGB))
    return _grid(rows, scale)


def _palette(num_classes: int) -> np.ndarray:
    rng = np.random.default_rng(0)
    colours = rng.integers(60, 256, size=(num_classes, 3)).astype(np.float32)
    colours[0] = 0
    return colours


def class_map_panel(frames: torch.Tensor, target: torch.Tensor | None, prediction: torch.Tensor | None,
                    num_classes: int, max_frames: int = 4, scale: int = 2) -> np.ndarray:
    """Frames with the target and the predicted class maps overlaid (one colour per class).

    Args:
        frames: ``uint8 [T, 3, H, W]``; target, prediction: ``long [T, H, W]`` (0 = background) or None.
        num_classes: classes including background.
    Returns:
        ``uint8 [3·H·scale, n·W·scale, 3]``: rows frame / target / prediction.
    """
    palette = _palette(num_classes)
    num = frames.shape[0]
    weights = (target > 0).flatten(1).sum(1).cpu().numpy() if target is not None else np.zeros(num)
    rows: list[list[np.ndarray]] = [[], [], []]
    for t in _shown_frames(num, weights, max_frames):
        image = _hwc(frames[t])
        rows[0].append(image)
        for row, classes in ((1, target), (2, prediction)):
            labels = classes[t].cpu().numpy() if classes is not None else np.zeros(image.shape[:2], np.int64)
            labels = np.clip(labels, 0, num_classes - 1)
            out = image * _DIM
            fg = labels > 0
            out[fg] = palette[labels[fg]]
            rows[row].append(out)
    return _grid(rows, scale)


def _draw_box(image: np.ndarray, box: Sequence[float] | None, rgb: Sequence[int]) -> None:
    if box is None:
        return
    height, width = image.shape[:2]
    x1, y1, x2, y2 = (float(v) / 1000.0 for v in box)
    left, right = int(np.clip(round(x1 * width), 0, width - 1)), int(np.clip(round(x2 * width) - 1, 0, width - 1))
    top, bottom = int(np.clip(round(y1 * height), 0, height - 1)), int(np.clip(round(y2 * height) - 1, 0, height - 1))
    colour = np.asarray(rgb, dtype=np.float32)
    image[top, left : right + 1] = colour
    image[bottom, left : right + 1] = colour
    image[top : bottom + 1, left] = colour
    image[top : bottom + 1, right] = colour


def box_panel(frame: torch.Tensor, target: Sequence[float] | None, prediction: Sequence[float] | None,
              scale: int = 4) -> np.ndarray:
    """One frame with the target box (green) and the predicted box (magenta) drawn.

    Args:
        frame: ``uint8 [3, H, W]``; target, prediction: ``[x1, y1, x2, y2]`` normalized to 0..1000, or None.
    Returns:
        ``uint8 [H·scale, W·scale, 3]``.
    """
    image = np.repeat(np.repeat(_hwc(frame), scale, axis=0), scale, axis=1)
    _draw_box(image, target, TARGET_RGB)
    _draw_box(image, prediction, PREDICTION_RGB)
    return np.clip(np.round(image), 0, 255).astype(np.uint8)
