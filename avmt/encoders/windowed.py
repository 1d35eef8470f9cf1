"""Shared machinery of the audio encoders that encode every window of the waveform on its own.

:class:`WindowedAudioEncoder` cuts the waveform of a clip into T equal windows aligned to the T
video segments, hands each window on its own to the subclass (:meth:`~WindowedAudioEncoder.encode_windows`:
the waveform backbone of wav2vec2, or the spectrogram and backbone of Whisper / AST / CLAP, see
:mod:`avmt.encoders.spectrogram`) and average-pools the time steps it returns to Q tokens, so
segment t of the output only depends on window t of the waveform.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from avmt.encoders.base import AudioEncoder
from avmt.errors import UserError


class WindowedAudioEncoder(AudioEncoder):
    """Base of the encoders that encode every window of the waveform on its own.

    Args:
        model: hub id or local path of the checkpoint the subclass loads (``None``: its tiny
            random config); recorded as ``model_name`` and ``pretrained``.
        tokens_per_segment: Q, tokens each window is pooled to.
        window_seconds: length of each segment's window, centred on the segment
            (:func:`avmt.data.media.audio_windows`: zeros past the clip's ends), e.g. Crab's 1 s or
            MUSIC-AVQA's 2 s with longer segments; ``None`` = the segment itself (the T windows
            tile the clip).

    Subclasses set ``self.backbone`` and ``self.sample_rate`` and implement :meth:`encode_windows`;
    they may declare ``output_dim`` (default: the config's ``hidden_size``), ``min_window_samples``
    (default: one sample), ``max_window_samples`` (default: no limit), :meth:`preprocess`
    (default: none) and ``resample_hint``.
    """

    resample_hint = "resample when converting the data"
    """What the error on audio at another rate advises."""

    def __init__(self, model: str | None, tokens_per_segment: int, window_seconds: float | None = None) -> None:
        super().__init__()
        if tokens_per_segment < 1:
            raise UserError(f"tokens_per_segment must be >= 1, got {tokens_per_segment}")
        if window_seconds is not None and not window_seconds > 0:
            raise UserError(f"window_seconds must be > 0 or None, got {window_seconds!r}")
        self.window_seconds = window_seconds
        self.model_name = model
        self.pretrained = model is not None
        self.tokens_per_segment = int(tokens_per_segment)

    @property
    def min_window_samples(self) -> int:
        """Fewest waveform samples per window the encoder accepts (its receptive field)."""
        return 1

    @property
    def max_window_samples(self) -> int | None:
        """Most waveform samples per window (a backbone's fixed input length); ``None``: no limit."""
        return None

    def preprocess(self, audio: torch.Tensor) -> torch.Tensor:
        """Clip-level preprocessing before the waveform is cut into windows.

        Args:
            audio: ``[B, S]`` float32 waveform.
        Returns:
            ``[B, S]`` float32 (here: ``audio`` unchanged).
        """
        return audio

    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Backbone features of independent windows.

        Args:
            windows: ``[N, L]`` float32 waveform windows at ``self.sample_rate``,
                ``min_window_samples <= L <= max_window_samples``.
        Returns:
            ``[N, steps, D]`` features of the backbone's time steps that cover each window (in
            time order, steps >= 1), ``D = output_dim``.
        """
        raise NotImplementedError

    def forward(self, audio: torch.Tensor, num_segments: int, sample_rate: int | None = None) -> torch.Tensor:
        """Encode the waveform window by window.

        Args:
            audio: ``[B, S]`` float waveform at ``self.sample_rate`` (mono).
            num_segments: T, the number of video segments; the waveform is split into T windows
                of ``S // T`` samples (a remainder of fewer than T samples at the end is dropped),
                or, with ``window_seconds``, T windows of that length centred on the segments.
            sample_rate: rate of ``audio`` when known; must equal ``self.sample_rate``.
        Returns:
            ``[B, T, Q, D]`` features, ``Q = tokens_per_segment``, ``D = output_dim``.
        """
        if audio.dim() != 2:
            raise ValueError(f"audio must be [B, S], got shape {tuple(audio.shape)}")
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            raise UserError(
                f"audio at {sample_rate} Hz but the audio encoder expects {self.sample_rate} Hz; {self.resample_hint}"
            )
        segments = int(num_segments)
        if segments < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        batch, samples = audio.shape
        clip = self.preprocess(audio.float())
        if self.window_seconds is None:
            window = samples // segments
            self._check_window(window, samples, segments)
            windows = clip[:, : window * segments].reshape(batch * segments, window)
        else:
            from avmt.data.media import MediaConfig, audio_windows

            layout = MediaConfig(num_segments=segments, segment_seconds=samples / segments / self.sample_rate,
                                 sample_rate=self.sample_rate, audio_window_seconds=self.window_seconds)
            self._check_window(layout.window_samples, samples, segments)
            windows = audio_windows(clip, layout).reshape(batch * segments, layout.window_samples)
        steps = self.encode_windows(windows)  # [B*T, steps, D]
        tokens = pool_steps(steps, self.tokens_per_segment)  # [B*T, Q, D]
        return tokens.reshape(batch, segments, self.tokens_per_segment, tokens.shape[-1])

    def _check_window(self, window: int, samples: int, segments: int) -> None:
        """Windows of ``window`` samples (``samples`` / ``segments``) must fit the encoder.

        Raises:
            ValueError: shorter than ``min_window_samples`` or longer than ``max_window_samples``.
        """
        name = type(self).__name__
        if window < self.min_window_samples:
            raise UserError(
                f"audio windows of {window} samples ({samples} samples / {segments} segments) are shorter "
                f"than {name}'s receptive field ({self.min_window_samples} samples per window)"
            )
        longest = self.max_window_samples
        if longest is not None and window > longest:
            raise UserError(
                f"audio windows of {window} samples ({samples} samples / {segments} segments) are longer "
                f"than the {longest} samples ({longest / self.sample_rate:g} s) that {name}'s backbone "
                f"takes; use more num_segments or a checkpoint with a longer input"
            )


def pool_steps(steps: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """Average-pool a sequence of time steps to a fixed number of tokens.

    Args:
        steps: ``[N, S, D]`` features.
        num_tokens: Q; fewer steps than tokens repeat steps.
    Returns:
        ``[N, Q, D]`` in the dtype of ``steps`` (pooled in float32).
    """
    pooled = F.adaptive_avg_pool1d(steps.transpose(1, 2).float(), num_tokens)
    return pooled.transpose(1, 2).to(steps.dtype)


def sample_rate_mismatch(requested: int, extractor_rate: int, model: str | None) -> str | None:
    """What is wrong when ``requested`` differs from the feature extractor's sampling rate, else ``None``."""
    if int(requested) == int(extractor_rate):
        return None
    where = f"the feature extractor of {model!r}" if model is not None else "the feature extractor"
    return f"sample_rate={requested} but {where} works at {extractor_rate} Hz"


def check_sample_rate(requested: int | None, extractor_rate: int, model: str | None) -> int:
    """The encoder's sample rate: the feature extractor's, which ``requested`` (when given) must equal.

    Raises:
        ValueError: ``requested`` differs from the feature extractor's sampling rate.
    """
    problem = None if requested is None else sample_rate_mismatch(requested, extractor_rate, model)
    if problem is not None:
        raise UserError(
            f"{problem}; resample the audio to {extractor_rate} Hz (or leave sample_rate unset)"
        )
    return int(extractor_rate)
