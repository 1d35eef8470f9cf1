"""Shared machinery of the spectrogram audio encoders (Whisper, AST, CLAP).

These backbones take a log-mel spectrogram of a fixed length (Whisper: 30 s, AST: 1024 frames,
CLAP: 10 s), not a raw waveform. They are :class:`~avmt.encoders.windowed.WindowedAudioEncoder`
subclasses: each window of the waveform goes on its own to the subclass's ``encode_windows``, which

1. computes the window's spectrogram in torch exactly as the checkpoint's transformers feature
   extractor would on that window alone (its padding to the backbone's input length included),
2. runs the backbone on it, and
3. keeps only the backbone's time steps that cover the window (the rest covers the padding).

The kept steps are average-pooled to Q tokens, so segment t of the output only depends on
window t of the waveform.
"""

from __future__ import annotations

import logging
import math

import torch

from avmt.errors import UserError

log = logging.getLogger(__name__)


def steps_covering(window_frames: int, total_frames: int, total_steps: int) -> int:
    """How many of the backbone's first time steps cover the window's spectrogram frames.

    The backbone maps ``total_frames`` input frames evenly onto ``total_steps`` output steps;
    the window fills the first ``window_frames`` frames (the rest is padding).

    Returns:
        ``ceil(total_steps * window_frames / total_frames)``, clamped to ``[1, total_steps]``.
    """
    return max(1, min(total_steps, math.ceil(total_steps * window_frames / total_frames)))


def frame_signal(signal: torch.Tensor, frame_length: int, hop_length: int) -> torch.Tensor:
    """Cut signals into overlapping frames (no padding: the last partial frame is dropped).

    Args:
        signal: ``[N, L]``, ``L >= frame_length``.
    Returns:
        ``[N, 1 + (L - frame_length) // hop_length, frame_length]`` (a view).
    """
    return signal.unfold(-1, frame_length, hop_length)


def centered_power_spectrum(
    signal: torch.Tensor, n_fft: int, hop_length: int, window: torch.Tensor
) -> torch.Tensor:
    """Power STFT with centered frames (the signal is reflect-padded by ``n_fft // 2`` on each side).

    Matches ``transformers.audio_utils.spectrogram(..., center=True, pad_mode="reflect", power=2.0)``
    and ``torch.stft(center=True)``.

    Args:
        signal: ``[N, L]`` float32.
        window: ``[n_fft]`` analysis window.
    Returns:
        ``[N, n_fft // 2 + 1, 1 + L // hop_length]`` power spectrum.
    """
    spectrum = torch.stft(
        signal, n_fft, hop_length, window=window.to(signal.dtype), center=True, pad_mode="reflect",
        return_complex=True,
    )
    return spectrum.abs().square()


def mel_filters_tensor(filters) -> torch.Tensor:
    """A transformers (numpy) mel filter bank ``[n_freq, n_mels]`` as a float32 tensor."""
    return torch.as_tensor(filters, dtype=torch.float64).float()


def load_feature_extractor(model: str, expected: type, default_kwargs: dict):
    """The checkpoint's feature extractor, or ``expected(**default_kwargs)`` when it has none.

    Args:
        model: hub id or local path of the checkpoint.
        expected: the transformers feature extractor class of the family.
        default_kwargs: settings of the fallback extractor (e.g. the model's number of mel bins).
    Raises:
        ValueError: the checkpoint's feature extractor is of another class.
    """
    from transformers import AutoFeatureExtractor

    try:
        extractor = AutoFeatureExtractor.from_pretrained(model)
    except OSError as e:
        log.warning(
            "%s has no feature extractor config (preprocessor_config.json; %s); using %s(%s) defaults",
            model, e, expected.__name__, default_kwargs,
        )
        return expected(**default_kwargs)
    if not isinstance(extractor, expected):
        raise UserError(
            f"model: {model!r} has a {type(extractor).__name__} feature extractor, but this encoder computes "
            f"{expected.__name__} features"
        )
    return extractor


def tiny_feature_extractor(expected: type, sample_rate: int | None, **settings):
    """The feature extractor of a tiny random config: ``expected(**settings)`` at ``sample_rate``.

    Args:
        expected: the transformers feature extractor class of the family.
        sample_rate: its ``sampling_rate``; ``None`` = the class default.
        settings: its other settings (e.g. the number of mel bins).
    """
    rate = {} if sample_rate is None else {"sampling_rate": int(sample_rate)}
    return expected(**settings, **rate)
