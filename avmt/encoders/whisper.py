"""Audio encoder: the encoder of a transformers Whisper model applied window by window.

Whisper's encoder only takes log-mel inputs of exactly ``chunk_length`` seconds (30 s, 3000
frames, for the released checkpoints: its position embeddings are fixed to that length). Each
window is therefore zero-padded to ``chunk_length`` seconds *before* the spectrogram -- what
``WhisperFeatureExtractor`` itself does to a short clip -- so the encoder sees the input it was
trained on; of its ``max_source_positions`` output steps only those covering the window's own
frames are kept (50 steps for a 1 s window) and pooled to Q tokens. The cost per window is that
of a full ``chunk_length`` input, whatever the window's length.

The tiny default (``model=None``) builds its feature extractor with a short ``chunk_length_s``
(2 s) and a ``WhisperEncoder`` whose ``max_source_positions`` matches it, so it runs fast on a
CPU while following the same path as a real checkpoint.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from avmt.encoders.base import check_heads, checkpoint_feature_extractor, disable_training_noise, load_pretrained
from avmt.encoders.spectrogram import (
    centered_power_spectrum,
    mel_filters_tensor,
    steps_covering,
    tiny_feature_extractor,
)
from avmt.encoders.windowed import WindowedAudioEncoder, check_sample_rate
from avmt.errors import UserError

# Whisper's conv stem (conv1 stride 1, conv2 stride 2) halves the frame rate:
# max_source_positions = mel frames / 2.
_STEM_STRIDE = 2


class WhisperLogMel(nn.Module):
    """``WhisperFeatureExtractor``'s log-mel spectrogram, in torch, for a batch of waveforms.

    Each waveform is padded with ``padding_value`` -- to ``chunk_length`` seconds when
    ``pad_to_chunk``, else by ``n_fft`` samples (every frame that overlaps the waveform then sees
    the padding the extractor adds) -- then: centered STFT (``n_fft``, ``hop_length``, periodic
    Hann window, reflect padding) without its last frame, power, the extractor's Slaney mel filter
    bank, ``log10`` (floor 1e-10), clamp to 8 below the waveform's maximum, ``(x + 4) / 4``. The
    extractor's ``dither`` (0 in released checkpoints) is applied like the extractor does, to the
    padded waveform.

    Args:
        extractor: a ``transformers.WhisperFeatureExtractor`` (its settings and filter bank are
            copied); ``None`` builds one from ``num_mel_bins``, ``sampling_rate``, ``hop_length``
            and ``n_fft``.
        pad_to_chunk: ``True``: every frame of the extractor's chunk (``chunk_length`` seconds)
            is returned, as Whisper's encoder takes them; the waveform must fit the chunk.
            ``False``: only the valid frames of the unpadded waveform, ``ceil(L / hop_length)`` (the
            frames the extractor's attention mask keeps; Qwen2.5-Omni's audio tower takes these),
            for a waveform of any length.
        num_mel_bins, sampling_rate, hop_length, n_fft: the settings of the extractor built when
            ``extractor`` is ``None``.
    """

    def __init__(
        self,
        extractor=None,
        pad_to_chunk: bool = True,
        num_mel_bins: int = 80,
        sampling_rate: int = 16000,
        hop_length: int = 160,
        n_fft: int = 400,
    ) -> None:
        super().__init__()
        if extractor is None:
            from transformers import WhisperFeatureExtractor

            extractor = WhisperFeatureExtractor(
                feature_size=num_mel_bins, sampling_rate=sampling_rate, hop_length=hop_length, n_fft=n_fft
            )
        self.pad_to_chunk = bool(pad_to_chunk)
        self.n_fft = int(extractor.n_fft)
        self.hop_length = int(extractor.hop_length)
        self.sampling_rate = int(extractor.sampling_rate)
        self.num_samples = int(extractor.n_samples)
        self.chunk_frames = int(extractor.nb_max_frames)
        self.num_mel_bins = int(extractor.feature_size)
        self.padding_value = float(extractor.padding_value)
        self.dither = float(extractor.dither)
        self.register_buffer("mel_filters", mel_filters_tensor(extractor.mel_filters), persistent=False)
        self.register_buffer("window", torch.hann_window(self.n_fft, dtype=torch.float32), persistent=False)

    def valid_frames(self, num_samples: int) -> int:
        """Frames that overlap a waveform of ``num_samples`` samples: ``ceil(num_samples / hop_length)``."""
        return math.ceil(int(num_samples) / self.hop_length)

    def num_frames(self, num_samples: int) -> int:
        """Frames returned for a waveform of ``num_samples`` samples: ``chunk_frames`` when
        ``pad_to_chunk``, else :meth:`valid_frames`."""
        return self.chunk_frames if self.pad_to_chunk else self.valid_frames(num_samples)

    def forward(self, waveforms: torch.Tensor) -> torch.Tensor:
        """Log-mel features of independent waveforms.

        Args:
            waveforms: ``[N, L]`` float waveform at ``sampling_rate`` (``L <= num_samples`` when
                ``pad_to_chunk``).
        Returns:
            ``[N, num_mel_bins, num_frames(L)]`` float32.
        """
        if waveforms.dim() != 2:
            raise ValueError(f"waveforms must be [N, L], got shape {tuple(waveforms.shape)}")
        length = waveforms.shape[1]
        padding = self.num_samples - length if self.pad_to_chunk else self.n_fft
        padded = torch.nn.functional.pad(waveforms.float(), (0, padding), value=self.padding_value)
        if self.dither != 0.0:
            padded = padded + self.dither * torch.randn_like(padded)
        power = centered_power_spectrum(padded, self.n_fft, self.hop_length, self.window)[..., :-1]
        mel = self.mel_filters.float().T @ power  # [N, mels, frames]
        log_mel = mel.clamp(min=1e-10).log10()
        peak = log_mel.amax(dim=(1, 2), keepdim=True)
        log_mel = torch.maximum(log_mel, peak - 8.0)
        return ((log_mel + 4.0) / 4.0)[..., : self.num_frames(length)]


class WhisperAudioEncoder(WindowedAudioEncoder):
    """Per-segment features from Whisper's audio encoder.

    Args:
        model: hub id or local path of a Whisper checkpoint (``WhisperModel`` or
            ``WhisperForConditionalGeneration``; only the encoder is kept); its
            ``WhisperFeatureExtractor`` config (mel bins, sampling rate, chunk length) is read from
            the same place. ``None`` builds a tiny random encoder (nothing is downloaded).
        sample_rate: rate of the waveform; ``None`` = the feature extractor's (16 kHz for Whisper).
            With a checkpoint it must equal the extractor's.
        tokens_per_segment: Q, tokens each window is pooled to.
        hidden_size, num_layers, num_heads, num_mel_bins, chunk_length_s: the tiny config and its
            feature extractor (``chunk_length_s`` seconds of input, ``num_mel_bins`` 80 or 128 like
            the released checkpoints); ignored when ``model`` is given.
        freeze: turn off the backbone's gradients and keep it in eval mode.
        dtype: dtype of a loaded checkpoint.
        window_seconds: audio window per segment, centred on it (Crab: 1 s; MUSIC-AVQA: 2 s);
            ``None`` = the whole segment (the windows tile the clip).
        config: the checkpoint's architecture (``model_type`` plus the sizes that differ from that
            transformers config class's defaults): checked against the checkpoint when it is loaded,
            and what ``python -m avmt inspect`` builds the backbone from (ignored when ``model`` is None).

    The sinusoidal position embeddings stay fixed (``requires_grad=False``) even when the
    encoder is trainable, as in transformers' Whisper. Layer-drop is switched off.
    """

    def __init__(
        self,
        model: str | None = None,
        sample_rate: int | None = None,
        tokens_per_segment: int = 4,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_mel_bins: int = 80,
        chunk_length_s: int = 2,
        freeze: bool = False,
        dtype: str = "float32",
        window_seconds: float | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, tokens_per_segment, window_seconds)
        from transformers import WhisperConfig, WhisperFeatureExtractor
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        if model is None:
            check_heads(hidden_size, num_heads)
            if chunk_length_s < 1:
                raise UserError(f"chunk_length_s must be >= 1, got {chunk_length_s}")
            extractor = tiny_feature_extractor(
                WhisperFeatureExtractor, sample_rate, feature_size=num_mel_bins, chunk_length=int(chunk_length_s)
            )
            if extractor.nb_max_frames % _STEM_STRIDE != 0:
                raise UserError(
                    f"chunk_length_s={chunk_length_s} gives {extractor.nb_max_frames} mel frames, which "
                    f"Whisper's stride-{_STEM_STRIDE} conv stem cannot halve"
                )
            config = WhisperConfig(
                num_mel_bins=num_mel_bins,
                d_model=hidden_size,
                encoder_layers=num_layers,
                encoder_attention_heads=num_heads,
                encoder_ffn_dim=4 * hidden_size,
                max_source_positions=extractor.nb_max_frames // _STEM_STRIDE,
                dropout=0.0,
                attention_dropout=0.0,
                activation_dropout=0.0,
                encoder_layerdrop=0.0,
            )
            self.backbone = WhisperEncoder(config)
        else:
            self.backbone = _load_whisper_encoder(model, dtype, config)
            extractor = checkpoint_feature_extractor(
                model, WhisperFeatureExtractor, {"feature_size": int(self.backbone.config.num_mel_bins)}
            )
        self.sample_rate = check_sample_rate(sample_rate, extractor.sampling_rate, model)
        self.log_mel = WhisperLogMel(extractor)
        _check_extractor_fits(self.backbone, self.log_mel, model)
        self._apply_freeze(freeze)

    def _apply_freeze(self, freeze: bool) -> None:
        """Freeze or unfreeze the backbone; the sinusoidal position embeddings always stay fixed."""
        super()._apply_freeze(freeze)
        self.backbone.embed_positions.requires_grad_(False)

    @property
    def output_dim(self) -> int:
        """Feature width D (the encoder's ``d_model``)."""
        return int(self.backbone.config.d_model)

    @property
    def max_window_samples(self) -> int:
        """The feature extractor's ``chunk_length`` in samples (480000 = 30 s for released checkpoints)."""
        return self.log_mel.num_samples

    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Encoder states of independent windows, cut to the steps that cover each window.

        Args:
            windows: ``[N, L]`` float32 waveform, ``L <= max_window_samples``.
        Returns:
            ``[N, steps, D]``, ``steps = ceil(ceil(L / hop_length) / 2)`` (50 for 1 s at 16 kHz).
        """
        features = self.log_mel(windows).to(self.dtype)  # [N, mels, frames]
        hidden = self.backbone(input_features=features).last_hidden_state  # [N, positions, D]
        window_frames = self.log_mel.valid_frames(windows.shape[1])
        keep = steps_covering(window_frames, features.shape[-1], hidden.shape[1])
        return hidden[:, :keep]


def _load_whisper_encoder(model: str, dtype: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Load a Whisper checkpoint with ``AutoModel`` and return its encoder (layer-drop switched off);
    ``config``: see :func:`load_pretrained`."""
    loaded = load_pretrained(model, dtype, "audio", "Whisper", config=config)
    encoder = loaded.get_encoder() if hasattr(loaded, "get_encoder") else loaded
    config = getattr(encoder, "config", None)
    fields = ("max_source_positions", "num_mel_bins", "d_model")
    if not all(hasattr(config, name) for name in fields) or not hasattr(encoder, "embed_positions"):
        raise UserError(f"model: {model!r} ({type(loaded).__name__}) is not a Whisper checkpoint")
    disable_training_noise(encoder)
    return encoder


def _check_extractor_fits(backbone: nn.Module, log_mel: WhisperLogMel, model: str | None) -> None:
    """The feature extractor's mel bins and frame count must be what the encoder takes.

    Raises:
        ValueError: naming ``model`` and both values.
    """
    config = backbone.config
    expected_frames = config.max_source_positions * backbone.conv1.stride[0] * backbone.conv2.stride[0]
    if log_mel.num_mel_bins != config.num_mel_bins:
        raise UserError(
            f"model: the feature extractor of {model!r} makes {log_mel.num_mel_bins} mel bins but the "
            f"encoder takes {config.num_mel_bins}"
        )
    if log_mel.chunk_frames != expected_frames:
        raise UserError(
            f"model: the feature extractor of {model!r} makes {log_mel.chunk_frames} frames (chunk_length "
            f"{log_mel.num_samples} samples) but the encoder takes exactly {expected_frames}"
        )
