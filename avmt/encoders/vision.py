"""Vision encoder: a transformers ViT-family backbone applied frame by frame.

By default a tiny randomly initialized ``ViTModel`` (64 px, 16 px patches -> 16 patches of
width 64), so everything runs offline on a CPU. A hub id or local path (``model=``) loads a
checkpoint with ``AutoModel.from_pretrained``; for dual-tower checkpoints (CLIP, SigLIP) only
the vision tower is kept.

A trainable tower (``freeze=False``) keeps only what the selected hidden state passes through
(for the families of ``_LAYOUTS``): the layers after ``select_layer``, the final norm when the
selected state is not the final output, and the parts that only compute ``pooler_output``
(CLIP's ``post_layernorm``, SigLIP's attention-pooling head, a hub ViT's pooler) are dropped at
construction. The output is unchanged, every trainable parameter gets a gradient (as DDP
requires), and the dropped weights take no memory or optimizer state. A frozen tower is kept
whole: it needs no gradients, and its state dict is the fingerprint of cached features
(:mod:`avmt.data.features`), which then differ from those of another ``select_layer`` in
``select_layer`` alone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from avmt.encoders.base import VisionEncoder, check_heads, load_pretrained
from avmt.errors import UserError

log = logging.getLogger(__name__)

# Pixel normalization per model family (used when the checkpoint's image processor is unavailable).
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)
_HALF = (0.5, 0.5, 0.5)
_FAMILY_NORM = {
    "vit": (_HALF, _HALF),
    "clip_vision_model": (_CLIP_MEAN, _CLIP_STD),
    "clip": (_CLIP_MEAN, _CLIP_STD),
    "siglip_vision_model": (_HALF, _HALF),
    "siglip": (_HALF, _HALF),
    "dinov2": (_IMAGENET_MEAN, _IMAGENET_STD),
}


@dataclass(frozen=True)
class _Layout:
    """Where a vision tower family keeps its parts (module paths inside the tower).

    Attributes:
        layers: the ``nn.ModuleList`` of transformer layers (``hidden_states[k]`` is the output of
            the first k; ``hidden_states[0]`` the input of the first).
        final_norm: the norm that turns the last layer's output into ``last_hidden_state``;
            ``None`` when ``last_hidden_state`` is the last layer's output.
        unused: parts the patch tokens never pass through (pooling heads, mask tokens).
    """

    layers: str
    final_norm: str | None
    unused: tuple[str, ...] = ()


# model_type -> layout, read from each family's forward in transformers
_LAYOUTS = {
    "vit": _Layout("layers", "layernorm", ("pooler",)),
    "clip_vision_model": _Layout("encoder.layers", None, ("post_layernorm",)),  # it only normalizes the pooled CLS
    "siglip_vision_model": _Layout("encoder.layers", "post_layernorm", ("head",)),
    "dinov2": _Layout("encoder.layer", "layernorm", ("embeddings.mask_token",)),
}


def _as_int(v: int | list[int] | tuple[int, ...]) -> int:
    """A square size from an int or an ``[h, w]`` pair (non-square sizes are rejected)."""
    if isinstance(v, (list, tuple)):
        if len(set(v)) != 1:
            raise UserError(f"only square image/patch sizes are supported, got {v}")
        return int(v[0])
    return int(v)


class ViTVisionEncoder(VisionEncoder):
    """Frame-wise ViT patch features.

    Args:
        model: hub id or local path of a ViT / CLIP / SigLIP (or other ViT-like) checkpoint;
            ``None`` builds a tiny random ``ViTConfig`` (nothing is downloaded).
        image_size, patch_size, hidden_size, num_layers, num_heads: the tiny config
            (ignored when ``model`` is given).
        freeze: turn off the backbone's gradients and keep it in eval mode.
        select_layer: which hidden state to return; ``-1`` = the backbone's final output,
            ``-2`` = the penultimate layer (what LLaVA / Crab feed to the LLM), ...
        image_mean, image_std: per-channel pixel normalization; ``None`` = the checkpoint's
            image processor (when one can be read) or the family default (0.5 / 0.5 for ViT).
        dtype: dtype of a loaded checkpoint ("float32", "bfloat16", "float16").
        config: the checkpoint's architecture (``model_type`` plus the sizes that differ from that
            transformers config class's defaults): checked against the checkpoint when it is loaded,
            what ``python -m avmt inspect`` builds without weights; ignored when ``model`` is None.
        feature_layers: hidden states (indexed like ``select_layer``, none deeper than it) that
            the heads also read, as ``EncodedMedia.levels`` (Crab: layers 14 and 22 of CLIP
            ViT-L/14 for the mask decoder, 23 for the LLM); ``[]`` = none.
    """

    def __init__(
        self,
        model: str | None = None,
        image_size: int = 64,
        patch_size: int = 16,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        freeze: bool = False,
        select_layer: int = -1,
        image_mean: list[float] | None = None,
        image_std: list[float] | None = None,
        dtype: str = "float32",
        feature_layers: list[int] = [],  # noqa: B006
        config: dict | None = None,
    ) -> None:
        super().__init__()
        self.model_name = model
        self.select_layer = int(select_layer)
        mean: tuple[float, ...] | None = None
        std: tuple[float, ...] | None = None
        if model is None:
            from transformers import ViTConfig, ViTModel

            if image_size % patch_size != 0:
                raise UserError(f"image_size ({image_size}) must be a multiple of patch_size ({patch_size})")
            check_heads(hidden_size, num_heads)
            config = ViTConfig(
                image_size=image_size,
                patch_size=patch_size,
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=4 * hidden_size,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
            self.backbone = ViTModel(config, add_pooling_layer=False)
            self.pretrained = False
            family = "vit"
        else:
            self.backbone = _load_vision_tower(model, dtype, config)
            self.pretrained = True
            family = getattr(self.backbone.config, "model_type", "")
            mean, std = _processor_norm(model)
        cfg = self.backbone.config
        layers = getattr(cfg, "num_hidden_layers", None)  # hidden states: the embeddings + one per layer
        if layers is not None and not -layers - 1 <= self.select_layer <= layers:
            raise UserError(
                f"select_layer={select_layer} is out of range for a backbone with {layers} layers "
                f"({layers + 1} hidden states: use -1 .. -{layers + 1} or 0 .. {layers})"
            )
        self._hidden_index = None if self.select_layer == -1 else self.select_layer  # of the tower's hidden_states
        self.feature_layers = _feature_layers(feature_layers, self.select_layer, layers)
        if not freeze:
            self._hidden_index = _drop_unused(self.backbone, self.select_layer)
        self.image_size = _as_int(cfg.image_size)
        self.patch_size = _as_int(cfg.patch_size)
        if mean is None or std is None:
            mean, std = _FAMILY_NORM.get(family, (_HALF, _HALF))
        if image_mean is not None:
            mean = tuple(image_mean)
        if image_std is not None:
            std = tuple(image_std)
        if len(mean) != 3 or len(std) != 3:
            raise UserError(f"image_mean/image_std need 3 values, got {mean} / {std}")
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.register_buffer("pixel_mean", mean_t, persistent=False)
        self.register_buffer("pixel_std", std_t, persistent=False)
        self._apply_freeze(freeze)

    @property
    def num_patches(self) -> int:
        """Patch tokens per frame P = (image_size / patch_size)^2 (prefix tokens such as CLS excluded)."""
        return (self.image_size // self.patch_size) ** 2

    def preprocess(self, video: torch.Tensor) -> torch.Tensor:
        """Frames to normalized pixel values.

        Args:
            video: ``[N, 3, H, W]`` uint8 (0..255) or float (0..1).
        Returns:
            ``[N, 3, image_size, image_size]`` float, normalized with ``pixel_mean``/``pixel_std``.
        """
        x = video.float() / 255.0 if video.dtype == torch.uint8 else video.float()
        if x.shape[-2:] != (self.image_size, self.image_size):
            size = (self.image_size, self.image_size)
            x = F.interpolate(x, size=size, mode="bilinear", align_corners=False, antialias=True)
        return (x - self.pixel_mean) / self.pixel_std

    def forward(self, video: torch.Tensor, return_levels: bool = False):
        """Encode every frame.

        Args:
            video: ``[B, T, 3, H, W]`` uint8 (0..255) or float (0..1); frames whose size differs
                from the model's ``image_size`` are resized (bilinear, antialiased).
            return_levels: also return the ``feature_layers`` hidden states of the same pass
                (what :meth:`forward_levels` asks for).
        Returns:
            ``[B, T, P, D]`` patch features, ``P = num_patches``, ``D = output_dim``; with
            ``return_levels``, ``(features, (level [B, T, P, D], ...))``.
        """
        if video.dim() != 5 or video.shape[2] != 3:
            raise ValueError(f"video must be [B, T, 3, H, W], got shape {tuple(video.shape)}")
        b, t = video.shape[:2]
        pixels = self.preprocess(video.flatten(0, 1)).to(self.dtype)
        if self._hidden_index is None and not self.feature_layers:
            states = [self.backbone(pixel_values=pixels).last_hidden_state]
        else:
            out = self.backbone(pixel_values=pixels, output_hidden_states=True)
            main = out.last_hidden_state if self._hidden_index is None else out.hidden_states[self._hidden_index]
            states = [main, *(out.hidden_states[k] for k in self.feature_layers)]
        p = self.num_patches
        if states[0].shape[1] < p:
            raise RuntimeError(f"backbone returned {states[0].shape[1]} tokens, fewer than {p} patches")
        # drop CLS / register prefix tokens
        main, *levels = (h[:, h.shape[1] - p :].reshape(b, t, p, h.shape[-1]) for h in states)
        return (main, tuple(levels)) if return_levels else main

    def forward_levels(self, video: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
        """:meth:`forward` and the ``feature_layers`` hidden states, from one pass of the tower (through
        the module's ``__call__``, so its hooks run).

        Args:
            video: ``[B, T, 3, H, W]`` as in :meth:`forward`.
        Returns:
            ``([B, T, P, D], (level [B, T, P, D], ...))``, one level per ``feature_layers`` entry.
        """
        return self(video, return_levels=True)


def _feature_layers(feature_layers: list[int], select_layer: int, num_layers: int | None) -> tuple[int, ...]:
    """``feature_layers`` as non-negative indices of the tower's ``hidden_states``.

    Raises:
        UserError: an index out of range, or deeper than ``select_layer`` (a trainable tower keeps
            no layer after the selected one).
    """
    if not feature_layers:
        return ()
    if num_layers is None:
        raise UserError("vision_encoder.feature_layers: this backbone's config does not say its number of layers")
    selected = select_layer % (num_layers + 1)
    out = []
    for layer in feature_layers:
        if not -num_layers - 1 <= int(layer) <= num_layers:
            raise UserError(f"vision_encoder.feature_layers: {layer} is out of range for a backbone with "
                            f"{num_layers} layers (use -{num_layers + 1} .. {num_layers})")
        index = int(layer) % (num_layers + 1)
        if index > selected:
            raise UserError(f"vision_encoder.feature_layers: layer {layer} is deeper than select_layer "
                            f"({select_layer}); the heads can read only layers up to the selected one")
        out.append(index)
    return tuple(out)


def _load_vision_tower(model: str, dtype: str, config: dict | None = None) -> nn.Module:
    """Load ``model`` with ``AutoModel`` and return its vision tower (the model itself for plain ViTs).

    ``config`` is the encoder's written architecture (:func:`~avmt.encoders.base.load_pretrained`:
    checked against the checkpoint, or what ``python -m avmt inspect`` builds the tower from).
    """
    loaded = load_pretrained(model, dtype, "vision", config=config)
    tower = getattr(loaded, "vision_model", None)
    if tower is None:
        tower = loaded
    if not hasattr(tower.config, "image_size") or not hasattr(tower.config, "patch_size"):
        raise UserError(
            f"{model!r} ({type(tower).__name__}) is not a ViT-like vision model (no image_size/patch_size)"
        )
    return tower


def _drop_unused(tower: nn.Module, select_layer: int) -> int | None:
    """Drop from ``tower`` what the selected hidden state never passes through.

    For a family of ``_LAYOUTS``: the layers after ``select_layer`` and, unless ``select_layer``
    is ``-1`` (the final output), the final norm are removed, so that the tower's
    ``last_hidden_state`` is the selected state; the ``unused`` parts are removed too (a module
    becomes ``nn.Identity``, a parameter ``None``). ``config.num_hidden_layers`` follows. An
    unknown family is kept whole, with a warning.

    Args:
        tower: the vision tower (modified in place).
        select_layer: the encoder's ``select_layer``, already checked to be in range.
    Returns:
        Which of the tower's ``hidden_states`` to read; ``None``: its ``last_hidden_state``
        (always for a known family).
    """
    model_type = getattr(tower.config, "model_type", "")
    layout = _LAYOUTS.get(model_type)
    if layout is None:
        log.warning(
            "vision tower %r: unknown layout, so its layers after select_layer and its pooling head are kept; "
            "they get no gradient while training (DDP then needs find_unused_parameters)", model_type,
        )
        return None if select_layer == -1 else select_layer
    dropped = list(layout.unused)
    if select_layer != -1:
        layers = tower.get_submodule(layout.layers)
        keep = select_layer % (len(layers) + 1)  # hidden_states[keep] is the output of the first `keep` layers
        del layers[keep:]
        tower.config.num_hidden_layers = keep
        if layout.final_norm is not None:
            dropped.append(layout.final_norm)
    for path in dropped:
        owner_path, _, name = path.rpartition(".")
        owner = tower.get_submodule(owner_path)
        setattr(owner, name, nn.Identity() if isinstance(getattr(owner, name, None), nn.Module) else None)
    return None


def _processor_norm(model: str) -> tuple[tuple[float, ...] | None, tuple[float, ...] | None]:
    """image_mean/image_std from the checkpoint's image processor config, when one can be read (not in an
    inspect build, which reads nothing from the checkpoint)."""
    from avmt.inspect import building_without_weights

    if building_without_weights():
        return None, None
    try:
        from transformers import AutoImageProcessor

        proc = AutoImageProcessor.from_pretrained(model)
        mean, std = getattr(proc, "image_mean", None), getattr(proc, "image_std", None)
        if mean is not None and std is not None:
            return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    except Exception as e:  # noqa: BLE001 - any failure falls back to the family defaults
        log.info("no image processor for %s (%s); using family default normalization", model, e)
    return None, None

