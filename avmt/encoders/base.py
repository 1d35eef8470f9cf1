"""Shared machinery of the encoders: the ``freeze`` switch, the ``pretrained`` record, and the
checks and checkpoint loading every encoder's constructor does.

An encoder wraps a transformers backbone (``self.backbone``). ``freeze=True`` turns off the
gradients of every backbone parameter and keeps the backbone in eval mode even when the
surrounding LightningModule calls ``.train()`` (dropout / layer-drop stay off). Parameters
added later inside the backbone (e.g. adapters injected with scope ``vision`` / ``audio``) are
not touched by the switch: only the parameters present when ``freeze`` was applied are frozen.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from avmt.errors import UserError


class Encoder(nn.Module):
    """Base class of the encoders.

    Subclasses set ``self.backbone`` (an ``nn.Module``) and ``self.pretrained`` (``True`` when
    the weights came from a checkpoint, ``False`` for a randomly initialized tiny config),
    then call :meth:`_apply_freeze`; they override ``output_dim`` when their width is not the
    backbone config's ``hidden_size``.
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
        """Feature width D of the encoder's output (by default the backbone config's ``hidden_size``)."""
        return int(self.backbone.config.hidden_size)

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

    Subclasses expose ``output_dim`` (D) and ``num_patches`` (P). An encoder that also gives the
    heads more feature levels (e.g. Crab's mask decoder reads two intermediate CLIP layers) sets
    ``feature_layers`` and overrides :meth:`forward_levels`.
    """

    #: hidden layers returned besides the main output, for the heads (empty: none)
    feature_layers: tuple[int, ...] = ()

    def forward_levels(self, video: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """The main features and the ``feature_layers`` levels of ``video [B, T, 3, H, W]``.

        Returns:
            ``([B, T, P, D], (level [B, T, P, D], ...))``, one level per ``feature_layers`` entry.
        """
        return self(video), ()

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
        raise UserError(f"unknown dtype {name!r}; use one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def check_heads(hidden_size: int, num_heads: int) -> None:
    """A tiny config's width must split evenly over its attention heads.

    Raises:
        ValueError: ``hidden_size`` is not a multiple of ``num_heads``.
    """
    if hidden_size % num_heads != 0:
        raise UserError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")


def load_pretrained(
    model: str,
    dtype: str,
    role: str,
    family: str = "",
    load: Callable[..., nn.Module] | None = None,
    config: dict[str, Any] | None = None,
    build: Callable[[Any], nn.Module] | None = None,
) -> nn.Module:
    """A checkpoint loaded with ``load(model, dtype=...)`` (default ``AutoModel.from_pretrained``), or,
    under ``python -m avmt inspect``, built from its written architecture ``config`` without weights.

    Args:
        model: hub id or local path of the checkpoint.
        dtype: ``"float32"`` / ``"bfloat16"`` / ``"float16"`` (:func:`torch_dtype`).
        role: ``"audio"`` / ``"vision"``, the encoder named in the error.
        family: the kind of checkpoint expected (``"Whisper"``, ...), named in the error.
        load: the loader, called as ``load(model, dtype=torch.dtype)``.
        config: the encoder's ``config`` init arg: the checkpoint's architecture (``model_type`` plus
            the sizes that differ from that transformers config class's defaults). When the
            checkpoint is loaded, every key written must equal the checkpoint's config; an inspect
            build (:func:`avmt.inspect.without_weights`) builds ``build(transformers config)`` from it.
        build: what ``load`` returns, built from a transformers config (default ``AutoModel.from_config``).
    Raises:
        OSError: the checkpoint cannot be read; the message names ``model`` and the config key
            (``init_args.model``) that selects it.
        UserError: ``config`` differs from the checkpoint's, or is missing in an inspect build.
    """
    from avmt.inspect import building_without_weights, check_written_config, config_from_dict

    key = f"model.{role}_encoder.init_args.config"
    if building_without_weights():
        built = config_from_dict(config, key, model)
        if build is None:
            from transformers import AutoModel

            build = AutoModel.from_config
        module = build(built)
        return module.to(torch_dtype(dtype))
    if load is None:
        from transformers import AutoModel

        load = AutoModel.from_pretrained
    checkpoint = f"transformers {family} checkpoint" if family else "transformers checkpoint"
    try:
        loaded = load(model, dtype=torch_dtype(dtype))
        if config is not None:
            from transformers import AutoConfig

            check_written_config(config, AutoConfig.from_pretrained(model), key, model)
        return loaded
    except OSError as e:
        raise OSError(
            f"could not load the {role} encoder {model!r} (a hub id or a local directory with a {checkpoint} "
            f"is expected; set the encoder's init_args.model: null for the tiny offline one): {e}"
        ) from e


def checkpoint_feature_extractor(model: str, expected: type, defaults: dict[str, Any]):
    """The checkpoint's feature extractor (:func:`avmt.encoders.spectrogram.load_feature_extractor`), or
    ``expected(**defaults)`` in an inspect build, which reads nothing from the checkpoint."""
    from avmt.encoders.spectrogram import load_feature_extractor
    from avmt.inspect import building_without_weights

    if building_without_weights():
        return expected(**defaults)
    return load_feature_extractor(model, expected, defaults)


# SpecAugment-style masking and layer-drop, as the configs of transformers' audio backbones name them
_TRAINING_NOISE = (
    ("apply_spec_augment", False),
    ("mask_time_prob", 0.0),
    ("layerdrop", 0.0),
    ("encoder_layerdrop", 0.0),
)


def disable_training_noise(backbone: nn.Module) -> None:
    """Switch off SpecAugment-style masking and layer-drop where ``backbone`` has them.

    The backbone is a feature extractor here: its output must not depend on such training-time
    noise. Sets the options its config has (and a ``layerdrop`` the module copied from it).
    """
    for name, value in _TRAINING_NOISE:
        if hasattr(backbone.config, name):
            setattr(backbone.config, name, value)
    if hasattr(backbone, "layerdrop"):
        backbone.layerdrop = 0.0
