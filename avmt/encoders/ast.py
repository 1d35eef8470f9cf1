"""Audio encoder: a transformers Audio Spectrogram Transformer (``ASTModel``) applied window by window.

AST takes a Kaldi log-mel filter bank of exactly ``max_length`` frames (1024 frames = 10.24 s
for the AudioSet checkpoints: its position embeddings are fixed to that patch grid). Each
window's filter bank is computed on the window alone and padded with zeros to ``max_length``
frames -- what ``ASTFeatureExtractor`` itself does to a short clip -- then normalized with the
extractor's mean/std. Of the backbone's patch tokens (the CLS and distillation tokens are
dropped) only the time columns that start inside the window are kept; each column is averaged
over frequency and the columns are pooled to Q tokens.

The tiny default (``model=None``) is an ``ASTModel`` of width 64 with a ``max_frames`` (200
frames = 2 s) input and an ``ASTFeatureExtractor`` to match.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from avmt.encoders.base import check_heads, checkpoint_feature_extractor, load_pretrained
from avmt.encoders.spectrogram import (
    frame_signal,
    mel_filters_tensor,
    tiny_feature_extractor,
)
from avmt.encoders.windowed import WindowedAudioEncoder, check_sample_rate
from avmt.errors import UserError

# Kaldi's filter bank as ASTFeatureExtractor computes it (torchaudio.compliance.kaldi.fbank
# defaults): 25 ms frames every 10 ms without centering, DC offset removed, pre-emphasis 0.97,
# symmetric Hann window, FFT padded to the next power of two, mel bank from 20 Hz to Nyquist
# (Kaldi mel scale, triangular in mel space), natural log with a floor of float32's epsilon.
_FRAME_SECONDS = 0.025
_HOP_SECONDS = 0.010
_PREEMPHASIS = 0.97
_LOW_FREQUENCY = 20.0
_LOG_FLOOR = 1.192092955078125e-07


@contextlib.contextmanager
def _quiet_empty_mel_filter() -> Iterator[None]:
    """Silence transformers' warning about an all-zero mel filter.

    128 Kaldi bins on a 512-point FFT leave a narrow low filter empty, in AST's own feature
    extractor as in Kaldi (that bin is the constant log floor); it is how AST was trained, not a
    configuration error.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="At least one mel filter has all zero values")
        yield


class KaldiFbank(nn.Module):
    """``ASTFeatureExtractor``'s normalized Kaldi filter bank, in torch, for a batch of windows.

    Args:
        extractor: a ``transformers.ASTFeatureExtractor`` (mel bins, sampling rate, max_length,
            do_normalize, mean, std are copied).
    """

    def __init__(self, extractor) -> None:
        super().__init__()
        from transformers.audio_utils import mel_filter_bank

        rate = int(extractor.sampling_rate)
        self.frame_length = int(round(_FRAME_SECONDS * rate))
        self.hop_length = int(round(_HOP_SECONDS * rate))
        self.n_fft = 1 << (self.frame_length - 1).bit_length()
        self.num_mel_bins = int(extractor.num_mel_bins)
        self.max_length = int(extractor.max_length)
        self.do_normalize = bool(extractor.do_normalize)
        self.mean = float(extractor.mean)
        self.std = float(extractor.std)
        with _quiet_empty_mel_filter():
            filters = mel_filter_bank(
                num_frequency_bins=self.n_fft // 2 + 1,
                num_mel_filters=self.num_mel_bins,
                min_frequency=_LOW_FREQUENCY,
                max_frequency=rate // 2,
                sampling_rate=rate,
                norm=None,
                mel_scale="kaldi",
                triangularize_in_mel_space=True,
            )
        self.register_buffer("mel_filters", mel_filters_tensor(filters), persistent=False)
        window = torch.hann_window(self.frame_length, periodic=False, dtype=torch.float64).float()
        self.register_buffer("window", window, persistent=False)

    def num_frames(self, samples: int) -> int:
        """Filter-bank frames of a window of ``samples`` samples (0 when shorter than one frame)."""
        return 0 if samples < self.frame_length else 1 + (samples - self.frame_length) // self.hop_length

    def forward(self, windows: torch.Tensor) -> torch.Tensor:
        """Normalized filter banks of independent windows.

        Args:
            windows: ``[N, L]`` float waveform, ``frame_length <= L`` and ``num_frames(L) <= max_length``.
        Returns:
            ``[N, max_length, num_mel_bins]`` float32: the window's frames, then zero frames (before
            normalization), normalized as ``(x - mean) / (2 std)`` when ``do_normalize``.
        """
        frames = frame_signal(windows.float(), self.frame_length, self.hop_length)  # [N, F, frame]
        frames = frames - frames.mean(dim=-1, keepdim=True)
        first = frames[..., :1] * (1.0 - _PREEMPHASIS)
        emphasized = torch.cat((first, frames[..., 1:] - _PREEMPHASIS * frames[..., :-1]), dim=-1)
        spectrum = torch.fft.rfft(emphasized * self.window.float(), n=self.n_fft)  # [N, F, freq]
        mel = spectrum.abs().square() @ self.mel_filters.float()  # [N, F, mels]
        fbank = mel.clamp(min=_LOG_FLOOR).log()
        fbank = torch.nn.functional.pad(fbank, (0, 0, 0, self.max_length - fbank.shape[1]))
        if self.do_normalize:
            fbank = (fbank - self.mean) / (self.std * 2)
        return fbank


class ASTAudioEncoder(WindowedAudioEncoder):
    """Per-segment features from an Audio Spectrogram Transformer.

    Args:
        model: hub id or local path of an AST checkpoint (``ASTModel`` or
            ``ASTForAudioClassification``; the classifier is dropped); its ``ASTFeatureExtractor``
            config (mel bins, max_length, mean/std, sampling rate) is read from the same place.
            ``None`` builds a tiny random ``ASTModel`` (nothing is downloaded).
        sample_rate: rate of the waveform; ``None`` = the feature extractor's (16 kHz for AST).
            With a checkpoint it must equal the extractor's.
        tokens_per_segment: Q, tokens each window is pooled to.
        hidden_size, num_layers, num_heads, num_mel_bins, max_frames: the tiny config and its
            feature extractor (``max_frames`` filter-bank frames of input, 10 ms each); ignored
            when ``model`` is given.
        freeze: turn off the backbone's gradients and keep it in eval mode.
        dtype: dtype of a loaded checkpoint.
        window_seconds: audio window per segment, centred on it (Crab: 1 s; MUSIC-AVQA: 2 s);
            ``None`` = the whole segment (the windows tile the clip).
        config: the checkpoint's architecture (``model_type`` plus the sizes that differ from that
            transformers config class's defaults): checked against the checkpoint when it is loaded,
            and what ``python -m avmt inspect`` builds the backbone from (ignored when ``model`` is None).
    """

    def __init__(
        self,
        model: str | None = None,
        sample_rate: int | None = None,
        tokens_per_segment: int = 4,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        num_mel_bins: int = 128,
        max_frames: int = 200,
        freeze: bool = False,
        dtype: str = "float32",
        window_seconds: float | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, tokens_per_segment, window_seconds)
        from transformers import ASTConfig, ASTFeatureExtractor, ASTModel

        if model is None:
            check_heads(hidden_size, num_heads)
            config = ASTConfig(
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=4 * hidden_size,
                num_mel_bins=num_mel_bins,
                max_length=max_frames,
                hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0,
            )
            if min(num_mel_bins, max_frames) < config.patch_size:
                raise UserError(
                    f"num_mel_bins ({num_mel_bins}) and max_frames ({max_frames}) must be at least AST's "
                    f"patch size ({config.patch_size})"
                )
            self.backbone = ASTModel(config)
            with _quiet_empty_mel_filter():
                extractor = tiny_feature_extractor(
                    ASTFeatureExtractor, sample_rate, num_mel_bins=num_mel_bins, max_length=max_frames
                )
        else:
            self.backbone = _load_ast(model, dtype, config)
            cfg = self.backbone.config
            with _quiet_empty_mel_filter():
                extractor = checkpoint_feature_extractor(
                    model, ASTFeatureExtractor,
                    {"num_mel_bins": int(cfg.num_mel_bins), "max_length": int(cfg.max_length)},
                )
        self.sample_rate = check_sample_rate(sample_rate, extractor.sampling_rate, model)
        self.fbank = KaldiFbank(extractor)
        cfg = self.backbone.config
        if (self.fbank.num_mel_bins, self.fbank.max_length) != (cfg.num_mel_bins, cfg.max_length):
            raise UserError(
                f"model: the feature extractor of {model!r} makes {self.fbank.max_length} frames x "
                f"{self.fbank.num_mel_bins} mel bins but the AST takes {cfg.max_length} x {cfg.num_mel_bins}"
            )
        self.frequency_patches, self.time_patches = self.backbone.embeddings.get_shape(cfg)
        self._apply_freeze(freeze)

    @property
    def min_window_samples(self) -> int:
        """One filter-bank frame (25 ms)."""
        return self.fbank.frame_length

    @property
    def max_window_samples(self) -> int:
        """The samples of ``max_length`` filter-bank frames (10.24 s for the AudioSet checkpoints)."""
        return self.fbank.frame_length + (self.fbank.max_length - 1) * self.fbank.hop_length

    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Patch-token columns of independent windows, averaged over frequency.

        Args:
            windows: ``[N, L]`` float32 waveform, ``min_window_samples <= L <= max_window_samples``.
        Returns:
            ``[N, steps, D]``: the time columns of patches starting inside the window's frames
            (``ceil(frames / time_stride)``, 10 for 1 s), each averaged over its frequency patches.
        """
        features = self.fbank(windows).to(self.dtype)  # [N, max_length, mels]
        hidden = self.backbone(input_values=features).last_hidden_state  # [N, prefix + F*T, D]
        patches = self.frequency_patches * self.time_patches
        grid = hidden[:, hidden.shape[1] - patches :]  # the CLS and distillation tokens dropped
        grid = grid.unflatten(1, (self.frequency_patches, self.time_patches))  # [N, F, T, D]
        columns = grid.mean(dim=1)  # [N, time_patches, D]
        window_frames = self.fbank.num_frames(windows.shape[1])
        keep = max(1, min(self.time_patches, math.ceil(window_frames / self.backbone.config.time_stride)))
        return columns[:, :keep]


def _load_ast(model: str, dtype: str, config: dict[str, Any] | None = None) -> nn.Module:
    """Load an AST checkpoint with ``AutoModel`` (an ``ASTModel``); ``config``: see :func:`load_pretrained`."""
    loaded = load_pretrained(model, dtype, "audio", "Audio Spectrogram Transformer", config=config)
    if getattr(loaded.config, "model_type", None) != "audio-spectrogram-transformer":
        raise UserError(
            f"model: {model!r} ({type(loaded).__name__}) is not an Audio Spectrogram Transformer checkpoint"
        )
    return loaded
