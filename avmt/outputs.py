"""What the model returns: encoder features with their layout, token states, head outputs, losses.

Per-sample tables use :class:`avmt.data.sample.Dense` (``rows [M]`` + ``values [M, ...]``), so a
sample may own several entries (one state and one mask per ``<seg>`` token it emitted).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from avmt.data.sample import Dense

__all__ = ["EncodedMedia", "ModelOutput", "GenerationOutput"]


@dataclass
class EncodedMedia:
    """Encoder outputs of C clips, with their spatial and temporal layout.

    Attributes:
        frames: ``uint8 [C, T, 3, H, W]`` the segment frames the vision encoder saw (one per segment).
        vision: ``[C, T, P, D_v]`` patch features; patch ``p`` sits at row ``p // w``, column
            ``p % w`` of the grid.
        grid: ``(h, w)``, ``P = h * w``.
        audio: ``[C, T, Q, D_a]`` audio features, window t aligned with segment t.
        levels: more vision feature levels for the heads (the encoder's ``feature_layers``), each
            ``[C, T, P, D_v]`` on the same grid; empty when the encoder has none.
    """

    frames: Tensor
    vision: Tensor
    grid: tuple[int, int]
    audio: Tensor
    levels: tuple[Tensor, ...] = ()

    def features(self, modality: str | None) -> Tensor | None:
        """The ``"vision"`` or ``"audio"`` features (a cross-modal connector's ``context_modality``); None for None."""
        return {"vision": self.vision, "audio": self.audio, None: None}[modality]

    def take(self, index: Tensor) -> "EncodedMedia":
        """The clips ``index`` (``long [M]``, repeats allowed), in that order."""
        return EncodedMedia(
            self.frames.index_select(0, index.to(self.frames.device)),
            self.vision.index_select(0, index.to(self.vision.device)),
            self.grid,
            self.audio.index_select(0, index.to(self.audio.device)),
            tuple(level.index_select(0, index.to(level.device)) for level in self.levels),
        )


@dataclass
class ModelOutput:
    """Outputs of :meth:`avmt.model.AVModel.forward` (teacher-forced).

    Attributes:
        loss_sum: ``[B]`` summed cross-entropy over each sample's target tokens.
        token_count: ``[B]`` number of those tokens.
        media: the encoder features of the batch's clips.
        states: special token (every head's, and those asked for) -> last-layer hidden states
            ``[M, D_llm]`` at the positions that predict that token (the LISA convention), rows = samples.
        dense: head output name (e.g. ``"mask_logits"``) -> one entry per head query, rows = samples.
        logits: ``[B, L, V]`` when asked for.
    """

    loss_sum: Tensor
    token_count: Tensor
    media: EncodedMedia
    states: dict[str, Dense] = field(default_factory=dict)
    dense: dict[str, Dense] = field(default_factory=dict)
    logits: Tensor | None = None

    def mean_loss(self) -> Tensor:
        """Token-weighted mean LM loss over the batch (scalar)."""
        return self.loss_sum.sum() / self.token_count.sum().clamp(min=1)


@dataclass
class GenerationOutput:
    """Outputs of :meth:`avmt.model.AVModel.generate`.

    Attributes:
        texts: ``[B]`` decoded answers (special tokens such as ``<seg>`` kept, padding and eos dropped).
        token_ids: ``long [B, N]`` generated ids.
        states: special token -> states that predicted each emission of it (when asked for).
        dense: head outputs for those states (when asked for).
    """

    texts: list[str]
    token_ids: Tensor
    states: dict[str, Dense] = field(default_factory=dict)
    dense: dict[str, Dense] = field(default_factory=dict)

