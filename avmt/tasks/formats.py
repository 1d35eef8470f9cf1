"""Answer formats: how a task's answer writes and reads time ranges, boxes and masks.

A task composes its answer's structure (which events, which tags, in which order) and asks its
format for the pieces that carry numbers or pixels; its parser asks the same format to read them
back. Two formats ship:

- :class:`TaggedText` (the default): numbers as text, ``<range> 2,7 </range>``,
  ``<box> 310,520,590,880 </box>`` (0..1000), and masks from the mask head read at ``<seg>``.
- :class:`DiscreteTokens` (AV-Unified: every output a sequence of discrete tokens): a time is one
  token per segment boundary (``<t_0>`` .. ``<t_T>``), a box coordinate one of ``box_bins``
  quantized tokens (``<bin_k>``), and a mask a discrete code of ``mask_grid x mask_grid`` cells
  decoded back to a mask: ``<mask> <t_s><t_e><cell_a><cell_b>... </mask>``, each group a run of
  segment frames ``[s, e)`` whose coarse mask has those cells on. A mask task in this format
  needs no head: its prediction is the decoded code, scored by the same J / F metrics.

The data module (``data.answer_format``) builds its tasks with the format and the module takes
the data module's format, so the targets trained on and the parser that scores the generations
agree; checkpoints keep the format's :meth:`AnswerFormat.config`. The tokens a format adds
(:meth:`AnswerFormat.tokens`) must be single tokens of the LLM: list them in
``model.llm.init_args.special_tokens`` (the module checks it).
"""

from __future__ import annotations

import re
from typing import Any, ClassVar, Sequence

import torch

from avmt.errors import UserError

__all__ = ["AnswerFormat", "TaggedText", "DiscreteTokens", "SEG", "cell_index", "mask_cells", "cells_mask"]

#: The special token whose hidden state the mask head reads (the TaggedText mask answer).
SEG = "<seg>"

_TEXT_RANGE_RE = re.compile(r"^(\d+)\s*[,\s]\s*(\d+)$")
_TEXT_BOX_RE = re.compile(r"^(\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*,\s*(\d+)$")


class AnswerFormat:
    """Base class: how answers write and read times, ranges, boxes and masks.

    Subclasses set ``dense_masks`` (masks come from a head at ``<seg>``) and ``time_pattern``
    (a regex matching one written time, its integer in group 1), and implement the methods below.
    Parsers never raise: malformed text gives None.
    """

    #: Masks are decoded by a head from the state at ``<seg>`` (True) or read from the answer text.
    dense_masks: ClassVar[bool] = True
    #: Regex of one written time value; group 1 is its integer.
    time_pattern: ClassVar[str] = r"(\d+)"

    def config(self) -> dict[str, Any]:
        """``{"class_path": ..., "init_args": {...}}``: what checkpoints keep to refuse another format."""
        return {"class_path": f"{type(self).__module__}.{type(self).__qualname__}", "init_args": self._init_args()}

    def _init_args(self) -> dict[str, Any]:
        return {}

    def __eq__(self, other: object) -> bool:
        return isinstance(other, AnswerFormat) and self.config() == other.config()

    def __hash__(self) -> int:
        return hash(repr(self.config()))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self._init_args().items())
        return f"{type(self).__name__}({args})"

    def tokens(self) -> list[str]:
        """The tokens this format writes that must each be one token of the LLM (in order)."""
        return []

    def check_data(self, num_segments: int | None, frame_size: int | None) -> None:
        """Raise :class:`UserError` when the format cannot write the data's answers (segments per
        clip, frame height = width; None: unknown). Default: any data fits."""

    # ---- time ---------------------------------------------------------------------------------
    def time(self, t: int) -> str:
        """One time (a segment boundary, ``0 <= t <= T``) as written in an answer."""
        raise NotImplementedError

    def read_time(self, match: re.Match[str]) -> int:
        """The integer of a :attr:`time_pattern` match."""
        return int(match.group(1))

    def range(self, start: int, end: int) -> str:
        """The content of a ``<range>`` tag for ``[start, end)``."""
        raise NotImplementedError

    def parse_range(self, text: str | None) -> list[int] | None:
        """``[s, e]`` from a ``<range>`` tag's content; None if malformed or ``e < s``."""
        raise NotImplementedError

    # ---- boxes --------------------------------------------------------------------------------
    def box(self, box: Sequence[int]) -> str:
        """The content of a ``<box>`` tag for ``[x1, y1, x2, y2]`` (normalized 0..1000)."""
        raise NotImplementedError

    def parse_box(self, text: str | None) -> list[int] | None:
        """``[x1, y1, x2, y2]`` (0..1000) from a ``<box>`` tag's content; None if malformed."""
        raise NotImplementedError

    # ---- masks --------------------------------------------------------------------------------
    def mask(self, mask: torch.Tensor, annotated: torch.Tensor | None = None) -> str:
        """The answer's mask part for ``mask`` (bool ``[T, H, W]``; ``annotated`` bool ``[T]``)."""
        raise NotImplementedError

    def parse_mask(self, text: Any) -> torch.Tensor | None:
        """float ``[T, H, W]`` 0/1 mask read from the answer text (formats without ``dense_masks``);
        None if the text holds no well-formed mask code."""
        return None


class TaggedText(AnswerFormat):
    """Today's answers: ``<range> 2,7 </range>``, ``<box> x1,y1,x2,y2 </box>`` and ``<seg>`` for
    a mask (decoded by the mask head). Adds no token."""

    dense_masks = True
    time_pattern = r"(\d+)"

    def time(self, t: int) -> str:
        """``7`` -> "7"."""
        return str(int(t))

    def range(self, start: int, end: int) -> str:
        """``(2, 7)`` -> "2,7"."""
        return f"{int(start)},{int(end)}"

    def parse_range(self, text: str | None) -> list[int] | None:
        """"2,7" / "2 , 7" / "2 7" -> [2, 7]; None if malformed or end < start."""
        match = _TEXT_RANGE_RE.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            return None
        s, e = int(match.group(1)), int(match.group(2))
        return [s, e] if e >= s else None

    def box(self, box: Sequence[int]) -> str:
        """``[310, 520, 590, 880]`` -> "310,520,590,880"."""
        return ",".join(str(int(v)) for v in box)

    def parse_box(self, text: str | None) -> list[int] | None:
        """"310,520,590,880" -> [310, 520, 590, 880]; None unless 4 integers in 0..1000."""
        match = _TEXT_BOX_RE.match(text.strip()) if isinstance(text, str) else None
        if match is None:
            return None
        box = [int(v) for v in match.groups()]
        return box if all(0 <= v <= 1000 for v in box) else None

    def mask(self, mask: torch.Tensor, annotated: torch.Tensor | None = None) -> str:
        """``<seg>``: the head decodes the mask from the state that predicts it."""
        return SEG


def cell_index(height: int, width: int, grid: int) -> torch.Tensor:
    """long ``[H, W]``: the cell (row-major, ``0 .. grid² - 1``) each pixel falls in; cell
    ``(r, c)`` covers rows ``[r H // grid, (r + 1) H // grid)`` and likewise columns."""
    rows = torch.div(torch.arange(height) * grid, height, rounding_mode="floor")
    cols = torch.div(torch.arange(width) * grid, width, rounding_mode="floor")
    return rows[:, None] * grid + cols[None, :]


def mask_cells(mask: torch.Tensor, grid: int, threshold: float) -> torch.Tensor:
    """bool ``[T, grid²]``: the cells of each frame of ``mask`` (bool ``[T, H, W]``) whose
    fraction of mask pixels is at least ``threshold``."""
    frames = mask.shape[0]
    index = cell_index(mask.shape[1], mask.shape[2], grid).flatten()  # [H*W]
    area = torch.bincount(index, minlength=grid * grid).double()  # pixels per cell
    on = mask.reshape(frames, -1).double()  # [T, H*W]
    covered = torch.zeros(frames, grid * grid, dtype=torch.float64).index_add_(1, index, on)
    return covered >= threshold * area


def cells_mask(cells: torch.Tensor, height: int, width: int, grid: int) -> torch.Tensor:
    """bool ``[T, H, W]``: ``cells`` (bool ``[T, grid²]``) upsampled to the frame (every pixel of
    an on cell is on)."""
    return cells[:, cell_index(height, width, grid)]


class DiscreteTokens(AnswerFormat):
    """AV-Unified's answers: every time, coordinate and mask as discrete tokens.

    - a time ``t`` is ``<t_t>`` (``0 <= t <= num_segments``), a range ``<t_s><t_e>``;
    - a box coordinate ``v`` (0..1000) is ``<bin_k>``, ``k = round(v (box_bins - 1) / 1000)``,
      read back as ``round(k 1000 / (box_bins - 1))`` (error at most ``500 / (box_bins - 1)``);
    - a mask (bool ``[T, H, W]``) is coded on a ``mask_grid x mask_grid`` cell grid per frame: a
      cell is on when at least ``cell_threshold`` of its pixels are; consecutive frames with the
      same cells form one group ``<t_s><t_e>`` followed by those cells' ``<cell_k>`` tokens
      (row-major); frames with no cell on are left out. The code ``<mask> groups </mask>``
      decodes by upsampling each group's cells to the frame, on frames ``[s, e)``. A frame
      without an annotation (``annotated`` false) has no target: it joins the run of the frame
      before it (the first frames, the run after them), so it costs no tokens.

    Args:
        num_segments: T, the data's segments per clip (time tokens ``<t_0>`` .. ``<t_T>``).
        frame_size: the data's frame height = width in pixels (masks decode to it).
        box_bins: quantization levels of a box coordinate.
        mask_grid: cells per side of a frame's mask code.
        cell_threshold: fraction of a cell's pixels that must be on for the cell to be on.
    """

    dense_masks = False
    time_pattern = r"<t_(\d+)>"

    def __init__(self, num_segments: int = 10, frame_size: int = 64, box_bins: int = 32, mask_grid: int = 8,
                 cell_threshold: float = 0.5) -> None:
        for key, value, low in (("num_segments", num_segments, 1), ("frame_size", frame_size, 1),
                                ("box_bins", box_bins, 2), ("mask_grid", mask_grid, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise UserError(f"data.answer_format.init_args.{key} must be an integer >= {low}, got {value!r}")
        if mask_grid > frame_size:
            raise UserError(f"data.answer_format.init_args.mask_grid ({mask_grid}) exceeds frame_size ({frame_size}): "
                            "a cell must hold at least one pixel")
        if not 0.0 < float(cell_threshold) <= 1.0:
            raise UserError(f"data.answer_format.init_args.cell_threshold must be within (0, 1], got {cell_threshold!r}")
        self.num_segments = num_segments
        self.frame_size = frame_size
        self.box_bins = box_bins
        self.mask_grid = mask_grid
        self.cell_threshold = float(cell_threshold)
        self._range_re = re.compile(r"^\s*<t_(\d+)>\s*<t_(\d+)>\s*$")
        self._box_re = re.compile(r"^\s*" + r"\s*".join([r"<bin_(\d+)>"] * 4) + r"\s*$")
        self._mask_re = re.compile(r"<\s*mask\s*>(.*?)<\s*/\s*mask\s*>", re.DOTALL)
        self._code_re = re.compile(r"<(t|cell)_(\d+)>|(\S)")

    def _init_args(self) -> dict[str, Any]:
        return {"num_segments": self.num_segments, "frame_size": self.frame_size, "box_bins": self.box_bins,
                "mask_grid": self.mask_grid, "cell_threshold": self.cell_threshold}

    def check_data(self, num_segments: int | None, frame_size: int | None) -> None:
        """The data's segments and frame size must be ``num_segments`` and ``frame_size``."""
        for key, mine, data in (("num_segments", self.num_segments, num_segments),
                                ("frame_size", self.frame_size, frame_size)):
            if data is not None and data != mine:
                raise UserError(f"data.answer_format.init_args.{key} is {mine} but the data has {data}: "
                                f"set it to {data} (and the LLM's format tokens with it)")

    def tokens(self) -> list[str]:
        """``<t_0>..<t_T>``, ``<bin_0>..<bin_{B-1}>``, ``<cell_0>..<cell_{G²-1}>``, ``<mask>``, ``</mask>``."""
        return ([f"<t_{t}>" for t in range(self.num_segments + 1)]
                + [f"<bin_{k}>" for k in range(self.box_bins)]
                + [f"<cell_{k}>" for k in range(self.mask_grid ** 2)] + ["<mask>", "</mask>"])

    # ---- time ---------------------------------------------------------------------------------
    def time(self, t: int) -> str:
        """``7`` -> "<t_7>"; a time beyond ``num_segments`` is a configuration error."""
        t = int(t)
        if not 0 <= t <= self.num_segments:
            raise UserError(f"time {t} has no token: data.answer_format.init_args.num_segments is "
                            f"{self.num_segments} (times 0..{self.num_segments}); set it to the data's segments")
        return f"<t_{t}>"

    def range(self, start: int, end: int) -> str:
        """``(2, 7)`` -> "<t_2><t_7>"."""
        return self.time(start) + self.time(end)

    def parse_range(self, text: str | None) -> list[int] | None:
        """"<t_2><t_7>" (spaces allowed) -> [2, 7]; None if malformed, out of range or end < start."""
        match = self._range_re.match(text) if isinstance(text, str) else None
        if match is None:
            return None
        s, e = int(match.group(1)), int(match.group(2))
        return [s, e] if s <= e <= self.num_segments else None

    # ---- boxes --------------------------------------------------------------------------------
    def box(self, box: Sequence[int]) -> str:
        """``[310, 520, 590, 880]`` -> "<bin_10><bin_16><bin_18><bin_27>" (32 bins)."""
        return "".join(f"<bin_{round(int(v) * (self.box_bins - 1) / 1000)}>" for v in box)

    def parse_box(self, text: str | None) -> list[int] | None:
        """Four ``<bin_k>`` -> ``[x1, y1, x2, y2]`` at the bins' values (0..1000); None if malformed."""
        match = self._box_re.match(text) if isinstance(text, str) else None
        if match is None:
            return None
        bins = [int(v) for v in match.groups()]
        if any(k >= self.box_bins for k in bins):
            return None
        return [round(k * 1000 / (self.box_bins - 1)) for k in bins]

    # ---- masks --------------------------------------------------------------------------------
    def mask(self, mask: torch.Tensor, annotated: torch.Tensor | None = None) -> str:
        """``<mask> <t_s><t_e><cell_a>... </mask>`` for ``mask`` (bool ``[T, H, W]``).

        Raises:
            UserError: the mask's frames or size differ from ``num_segments`` / ``frame_size``.
        """
        frames, height, width = mask.shape
        if frames != self.num_segments or (height, width) != (self.frame_size, self.frame_size):
            raise UserError(
                f"a mask of {frames} frames of {height}x{width} pixels does not fit data.answer_format "
                f"(num_segments {self.num_segments}, frame_size {self.frame_size}): set them to the data's")
        cells = mask_cells(mask.bool().cpu(), self.mask_grid, self.cell_threshold)  # [T, G²]
        known = torch.ones(frames, dtype=torch.bool) if annotated is None else torch.as_tensor(annotated).bool().cpu()
        if bool(known.any()):
            first = int(known.nonzero()[0])
            for t in range(frames):  # an unannotated frame takes the cells of the run it joins
                if not known[t]:
                    cells[t] = cells[t - 1] if t > first else cells[first]
        groups, start = [], 0
        for t in range(1, frames + 1):
            if t == frames or not torch.equal(cells[t], cells[start]):
                on = cells[start].nonzero().flatten().tolist()
                if on:
                    groups.append(self.range(start, t) + "".join(f"<cell_{k}>" for k in on))
                start = t
        return "<mask> " + "".join(groups) + " </mask>" if groups else "<mask> </mask>"

    def parse_mask(self, text: Any) -> torch.Tensor | None:
        """float ``[T, H, W]`` 0/1: the last ``<mask> ... </mask>`` code decoded; None when there is
        none or it is not a sequence of groups ``<t_s><t_e>`` (``s < e <= T``) with cells."""
        if not isinstance(text, str):
            return None
        codes = self._mask_re.findall(text)
        if not codes:
            return None
        grid, frames = self.mask_grid, self.num_segments
        cells = torch.zeros(frames, grid * grid, dtype=torch.bool)
        items = [(m.group(1), m.group(2), m.group(3)) for m in self._code_re.finditer(codes[-1])]
        i = 0
        while i < len(items):
            if i + 1 >= len(items) or items[i][0] != "t" or items[i + 1][0] != "t":
                return None
            s, e = int(items[i][1]), int(items[i + 1][1])
            if not s < e <= frames:
                return None
            i += 2
            while i < len(items) and items[i][0] == "cell":
                k = int(items[i][1])
                if k >= grid * grid:
                    return None
                cells[s:e, k] = True
                i += 1
        return cells_mask(cells, self.frame_size, self.frame_size, grid).float()
