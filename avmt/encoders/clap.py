"""Audio encoder: the audio tower of a transformers CLAP model (HTSAT) applied window by window.

CLAP's audio tower takes a log-mel spectrogram of ``max_length_s`` seconds (10 s at 48 kHz =
1001 frames for the LAION checkpoints), stretched to its ``spec_size * freq_ratio`` frames. Each
window is padded to ``max_length_s`` the way the checkpoint's ``ClapFeatureExtractor`` pads a
short clip (``padding``: ``"repeatpad"`` repeats the window and pads the rest with zeros,
``"repeat"`` repeats it to the full length, ``"pad"`` zero-pads it), the spectrogram is
computed in torch, and of the tower's time steps (its output grid is frequency x time) only
those covering the window's first occurrence are kept, averaged over frequency, and pooled to
Q tokens.

Windows are never longer than ``max_length_s``, so the feature-fusion path of fused checkpoints
(which only runs on clips longer than ``max_length_s``) is never used: ``is_longer`` is always
False (the extractor picks a random clip of a batch as "longer" during CLAP pre-training; that
is not reproduced), and the fusion parameters stay frozen since they can get no gradient.

HTSAT normalizes the spectrogram with a ``BatchNorm2d`` over mel bins; it is kept in eval mode
(running statistics) even when the encoder trains, so a window's features never depend on the
other windows of the batch.

The tiny default (``model=None``) is a 2-stage ``ClapAudioModel`` (``spec_size`` 64 and 16 mel
bins: a 64 x 64 image of up to 256 frames, enough for a 2 s input) with a ``ClapFeatureExtractor``
to match.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from avmt.encoders.base import checkpoint_feature_extractor, load_pretrained
from avmt.encoders.spectrogram import (
    centered_power_spectrum,
    mel_filters_tensor,
    steps_covering,
    tiny_feature_extractor,
)
from avmt.encoders.windowed import WindowedAudioEncoder, check_sample_rate
from avmt.errors import UserError

_PADDINGS = ("repeatpad", "repeat", "pad")
_POWER_FLOOR = 1e-10  # ClapFeatureExtractor's mel floor before converting to dB (reference power 1.0)
_FUSION_CHANNELS = 4  # a fused checkpoint takes 4 spectrograms: the whole clip + 3 crops (identical here)


class ClapLogMel(nn.Module):
    """``ClapFeatureExtractor``'s log-mel spectrogram (dB), in torch, for a batch of short windows.

    Each window is padded to ``max_length_s`` seconds by the extractor's ``padding`` rule, then:
    centered STFT (``fft_window_size``, ``hop_length``, periodic Hann window, reflect padding),
    power, mel filter bank (HTK for ``truncation="fusion"``, Slaney otherwise, as the extractor
    chooses), ``10 log10(max(x, 1e-10))``.

    Args:
        extractor: a ``transformers.ClapFeatureExtractor`` (its settings and filter banks are copied).
    """

    def __init__(self, extractor) -> None:
        super().__init__()
        if extractor.padding not in _PADDINGS:
            raise UserError(f"ClapFeatureExtractor padding {extractor.padding!r} is not one of {_PADDINGS}")
        self.n_fft = int(extractor.fft_window_size)
        self.hop_length = int(extractor.hop_length)
        self.num_samples = int(extractor.nb_max_samples)
        self.num_frames = self.num_samples // self.hop_length + 1
        self.num_mel_bins = int(extractor.feature_size)
        self.padding = str(extractor.padding)
        filters = extractor.mel_filters if extractor.truncation == "fusion" else extractor.mel_filters_slaney
        self.register_buffer("mel_filters", mel_filters_tensor(filters), persistent=False)
        window = torch.hann_window(self.n_fft, dtype=torch.float64).float()
        self.register_buffer("window", window, persistent=False)

    def pad(self, windows: torch.Tensor) -> torch.Tensor:
        """Pad windows ``[N, L]`` (``L <= num_samples``) to ``[N, num_samples]`` by the ``padding`` rule."""
        length = windows.shape[1]
        if length < self.num_samples and self.padding == "repeat":
            windows = windows.repeat(1, self.num_samples // length + 1)[:, : self.num_samples]
        elif length < self.num_samples and self.padding == "repeatpad":
            windows = windows.repeat(1, self.num_samples // length)
        return torch.nn.functional.pad(windows, (0, self.num_samples - windows.shape[1]))

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Log-mel spectrograms of independent windows.

        Args:
            windows: ``[N, L]`` float waveform, ``L <= num_samples``.
        Returns:
            ``[N, num_frames, num_mel_bins]`` float32 in dB (``num_frames = num_samples // hop + 1``).
        """
        power = centered_power_spectrum(self.pad(windows.float()), self.n_fft, self.hop_length, self.window)
        mel = (self.mel_filters.float().T @ power).clamp(min=_POWER_FLOOR)  # [N, mels, frames]
        return (10.0 * mel.log10()).transpose(1, 2)


class CLAPAudioEncoder(WindowedAudioEncoder):
    """Per-segment features from CLAP's audio tower (HTSAT).

    Args:
        model: hub id or local path of a CLAP checkpoint (``ClapModel``: only ``audio_model`` is
            kept; or a saved ``ClapAudioModel``); its ``ClapFeatureExtractor`` config (mel bins,
            sampling rate, max_length_s, padding, truncation) is read from the same place.
            ``None`` builds a tiny random ``ClapAudioModel`` (nothing is downloaded).
        sample_rate: rate of the waveform; ``None`` = the feature extractor's (48 kHz for CLAP).
            With a checkpoint it must equal the extractor's.
        tokens_per_segment: Q, tokens each window is pooled to.
        hidden_size, depths, num_heads, num_mel_bins, spec_size, max_length_s: the tiny config
            (output width ``hidden_size``, Swin stages of ``depths`` blocks with ``num_heads``
            heads, the patch width halving back from ``hidden_size`` stage by stage) and its
            feature extractor; ignored when ``model`` is given.
        freeze: turn off the backbone's gradients and keep it in eval mode.
        dtype: dtype of a loaded checkpoint.
        window_seconds: audio window per segment, centred on it (Crab: 1 s; MUSIC-AVQA: 2 s);
            ``None`` = the whole segment (the windows tile the clip).
        config: the checkpoint's architecture (``model_type`` ``clap`` or ``clap_audio_model`` plus the
            sizes that differ from that transformers config class's defaults): checked against the
            checkpoint when it is loaded, and what ``python -m avmt inspect`` builds the tower from
            (ignored when ``model`` is None).
    """

    def __init__(
        self,
        model: str | None = None,
        sample_rate: int | None = None,
        tokens_per_segment: int = 4,
        hidden_size: int = 64,
        depths: tuple[int, ...] = (1, 1),
        num_heads: tuple[int, ...] = (2, 4),
        num_mel_bins: int = 16,
        spec_size: int = 64,
        max_length_s: int = 2,
        freeze: bool = False,
        dtype: str = "float32",
        window_seconds: float | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, tokens_per_segment, window_seconds)
        from transformers import ClapAudioConfig, ClapAudioModel, ClapFeatureExtractor

        if model is None:
            stages = len(depths)
            if stages < 1 or len(num_heads) != stages:
                raise UserError(
                    f"depths {tuple(depths)} and num_heads {tuple(num_heads)} need one entry per stage"
                )
            if hidden_size % 2 ** (stages - 1) != 0:
                raise UserError(
                    f"hidden_size ({hidden_size}) must be divisible by 2^(stages - 1) = {2 ** (stages - 1)}"
                )
            config = ClapAudioConfig(
                hidden_size=hidden_size,
                patch_embeds_hidden_size=hidden_size // 2 ** (stages - 1),
                depths=list(depths),
                num_attention_heads=list(num_heads),
                num_mel_bins=num_mel_bins,
                spec_size=spec_size,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
                drop_path_rate=0.0,
                enable_fusion=False,
            )
            self.backbone = ClapAudioModel(config)
            extractor = tiny_feature_extractor(
                ClapFeatureExtractor, sample_rate, feature_size=num_mel_bins, max_length_s=max_length_s
            )
        else:
            self.backbone = load_pretrained(
                model, dtype, "audio", "CLAP", load=_clap_audio_tower, config=config, build=_clap_tower_from_config
            )
            extractor = checkpoint_feature_extractor(
                model, ClapFeatureExtractor, {"feature_size": int(self.backbone.config.num_mel_bins)}
            )
        self.sample_rate = check_sample_rate(sample_rate, extractor.sampling_rate, model)
        self.log_mel = ClapLogMel(extractor)
        self._check_extractor_fits(model)
        self._apply_freeze(freeze)

    def _check_extractor_fits(self, model: str | None) -> None:
        """The spectrogram must have the tower's mel bins and at most its number of frames.

        Raises:
            ValueError: naming ``model`` and both values.
        """
        tower = self.backbone.audio_encoder
        config = self.backbone.config
        max_frames = tower.spec_size * tower.freq_ratio
        if self.log_mel.num_mel_bins != config.num_mel_bins:
            raise UserError(
                f"model: the feature extractor of {model!r} makes {self.log_mel.num_mel_bins} mel bins but "
                f"the CLAP audio tower takes {config.num_mel_bins}"
            )
        if self.log_mel.num_frames > max_frames:
            raise UserError(
                f"model: the feature extractor of {model!r} makes {self.log_mel.num_frames} frames but the "
                f"CLAP audio tower takes at most {max_frames} (spec_size {tower.spec_size} x freq_ratio "
                f"{tower.freq_ratio})"
            )

    def _apply_freeze(self, freeze: bool) -> None:
        """Freeze or unfreeze the backbone; the fusion parameters (never used) always stay frozen."""
        super()._apply_freeze(freeze)
        patch_embed = self.backbone.audio_encoder.patch_embed
        for name in ("fusion_model", "mel_conv2d"):
            module = getattr(patch_embed, name, None)
            if module is not None:
                module.requires_grad_(False)
        self.backbone.audio_encoder.batch_norm.eval()

    def train(self, mode: bool = True) -> "CLAPAudioEncoder":
        """Set train/eval mode; the spectrogram BatchNorm always stays in eval mode."""
        super().train(mode)
        self.backbone.audio_encoder.batch_norm.eval()
        return self

    @property
    def output_dim(self) -> int:
        """Feature width D (the last Swin stage's width)."""
        return int(self.backbone.audio_encoder.num_features)

    @property
    def max_window_samples(self) -> int:
        """The feature extractor's ``max_length_s`` in samples (480000 = 10 s for the LAION checkpoints)."""
        return self.log_mel.num_samples

    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Audio-tower time steps of independent windows, averaged over frequency.

        Args:
            windows: ``[N, L]`` float32 waveform, ``L <= max_window_samples``.
        Returns:
            ``[N, steps, D]``: the time steps covering the window's first occurrence.
        """
        mel = self.log_mel(windows).to(self.dtype)  # [N, frames, mels]
        inputs = mel.unsqueeze(1)  # [N, 1, frames, mels]
        is_longer = None
        if self.backbone.config.enable_fusion:
            inputs = inputs.expand(-1, _FUSION_CHANNELS, -1, -1)
            is_longer = torch.zeros(mel.shape[0], 1, dtype=torch.bool, device=mel.device)
        grid = self.backbone(input_features=inputs, is_longer=is_longer).last_hidden_state  # [N, D, F, T]
        steps = grid.mean(dim=2).transpose(1, 2)  # [N, T, D]
        window_frames = math.ceil(windows.shape[1] / self.log_mel.hop_length)
        keep = steps_covering(window_frames, mel.shape[1], steps.shape[1])
        return steps[:, :keep]


def _clap_tower_from_config(config) -> nn.Module:
    """The audio tower of a CLAP model built from a ``ClapConfig`` or ``ClapAudioConfig`` (no weights read)."""
    from transformers import ClapAudioModel, ClapModel

    if config.model_type == "clap":
        return ClapModel(config).audio_model
    if config.model_type == "clap_audio_model":
        return ClapAudioModel(config)
    raise UserError(f"model.audio_encoder.init_args.config: model_type {config.model_type!r} is not a CLAP "
                    "architecture (clap or clap_audio_model)")


def _clap_audio_tower(model: str, dtype: torch.dtype) -> nn.Module:
    """The audio tower (a ``ClapAudioModel``) of a CLAP checkpoint (``ClapModel`` or ``ClapAudioModel``).

    Raises:
        ValueError: ``model`` is not a CLAP checkpoint.
    """
    from transformers import AutoConfig, ClapAudioModel, ClapModel

    model_type = getattr(AutoConfig.from_pretrained(model), "model_type", None)
    if model_type == "clap":
        return ClapModel.from_pretrained(model, dtype=dtype).audio_model
    if model_type == "clap_audio_model":
        return ClapAudioModel.from_pretrained(model, dtype=dtype)
    raise UserError(f"model: {model!r} (model_type {model_type!r}) is not a CLAP checkpoint")
