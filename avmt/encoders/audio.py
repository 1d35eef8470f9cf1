"""Audio encoder: a transformers Wav2Vec2-family backbone applied window by window.

The waveform of a clip is cut into T equal windows aligned to the T video segments; each
window is encoded on its own (``[B*T, S/T]``) and its frames are average-pooled to Q tokens, so
segment t of the audio features only depends on window t of the waveform.

By default a tiny randomly initialized ``Wav2Vec2Model`` (7 conv layers of 32 channels, 2
transformer layers of width 64) that is fast on a CPU; ``model=`` loads a checkpoint (any
``AutoModel`` taking ``input_values``: wav2vec2, HuBERT, WavLM, ...).
"""

from __future__ import annotations

import logging
import math
from typing import Any

import torch

from avmt.encoders.base import check_heads, disable_training_noise, load_pretrained
from avmt.encoders.windowed import WindowedAudioEncoder, sample_rate_mismatch
from avmt.inspect import building_without_weights

log = logging.getLogger(__name__)


class Wav2Vec2AudioEncoder(WindowedAudioEncoder):
    """Per-segment waveform features.

    Args:
        model: hub id or local path of a wav2vec2-like checkpoint; ``None`` builds a tiny
            random ``Wav2Vec2Config`` (nothing is downloaded).
        sample_rate: the rate the waveform must have (16 kHz for wav2vec2 checkpoints).
        tokens_per_segment: Q, tokens each window is pooled to.
        hidden_size, num_layers, num_heads, conv_dim: the tiny config (``conv_dim`` channels in
            each of the 7 feature-extractor conv layers); ignored when ``model`` is given.
        freeze: turn off the backbone's gradients and keep it in eval mode.
        normalize: zero-mean / unit-variance normalization of each clip's waveform (what the
            wav2vec2 feature extractor does), before it is cut into windows.
        dtype: dtype of a loaded checkpoint.
        window_seconds: audio window per segment, centred on it (Crab: 1 s; MUSIC-AVQA: 2 s);
            ``None`` = the whole segment (the windows tile the clip).
        config: the checkpoint's architecture (``model_type`` plus the sizes that differ from that
            transformers config class's defaults): checked against the checkpoint when it is loaded,
            and what ``python -m avmt inspect`` builds the backbone from (ignored when ``model`` is None).

    SpecAugment-style masking and layer-drop are switched off: the backbone is a feature
    extractor here.
    """

    resample_hint = "resample when converting the data (or set the encoder's sample_rate)"

    def __init__(
        self,
        model: str | None = None,
        sample_rate: int = 16000,
        tokens_per_segment: int = 4,
        hidden_size: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        conv_dim: int = 32,
        freeze: bool = False,
        normalize: bool = True,
        dtype: str = "float32",
        window_seconds: float | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(model, tokens_per_segment, window_seconds)
        self.sample_rate = int(sample_rate)
        self.normalize = bool(normalize)
        if model is None:
            from transformers import Wav2Vec2Config, Wav2Vec2Model

            check_heads(hidden_size, num_heads)
            config = Wav2Vec2Config(
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=2 * hidden_size,
                conv_dim=(conv_dim,) * 7,
                conv_stride=(5, 2, 2, 2, 2, 2, 2),
                conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=math.gcd(hidden_size, 4),
                hidden_dropout=0.0,
                activation_dropout=0.0,
                attention_dropout=0.0,
                feat_proj_dropout=0.0,
                final_dropout=0.0,
                layerdrop=0.0,
                apply_spec_augment=False,
                mask_time_prob=0.0,
            )
            self.backbone = Wav2Vec2Model(config)
        else:
            self.backbone = load_pretrained(model, dtype, "audio", config=config)
            if not building_without_weights():  # an inspect build reads nothing from the checkpoint
                _warn_on_other_sample_rate(model, self.sample_rate)
        disable_training_noise(self.backbone)
        self._apply_freeze(freeze)

    def num_frames(self, window: int) -> int:
        """Backbone frames produced for a window of ``window`` samples (< 1: shorter than the receptive field)."""
        fn = getattr(self.backbone, "_get_feat_extract_output_lengths", None)
        if fn is not None:
            return int(fn(torch.tensor(window)).item())
        length = window
        for k, s in zip(self.backbone.config.conv_kernel, self.backbone.config.conv_stride):
            length = (length - k) // s + 1
        return length

    @property
    def min_window_samples(self) -> int:
        """The conv feature extractor's receptive field: the shortest window giving one frame (400 samples)."""
        samples = 1
        for k, s in zip(reversed(self.backbone.config.conv_kernel), reversed(self.backbone.config.conv_stride)):
            samples = (samples - 1) * s + k
        return samples

    def preprocess(self, audio: torch.Tensor) -> torch.Tensor:
        """Zero-mean / unit-variance normalization of each clip when ``normalize``.

        Args:
            audio: ``[B, S]`` float32 waveform.
        Returns:
            ``[B, S]`` float32.
        """
        if not self.normalize:
            return audio
        std = torch.sqrt(audio.var(dim=1, keepdim=True, unbiased=False) + 1e-7)
        return (audio - audio.mean(dim=1, keepdim=True)) / std

    def encode_windows(self, windows: torch.Tensor) -> torch.Tensor:
        """Backbone frames of independent windows.

        Args:
            windows: ``[N, L]`` float32 waveform, ``L >= min_window_samples``.
        Returns:
            ``[N, num_frames(L), D]`` (one frame per 20 ms for wav2vec2 checkpoints).
        """
        return self.backbone(input_values=windows.to(self.dtype)).last_hidden_state


def _warn_on_other_sample_rate(model: str, sample_rate: int) -> None:
    """Warn when the checkpoint's feature extractor declares another sampling rate."""
    try:
        from transformers import AutoFeatureExtractor

        rate = getattr(AutoFeatureExtractor.from_pretrained(model), "sampling_rate", None)
    except Exception as e:  # noqa: BLE001 - the check is advisory
        log.info("no feature extractor for %s (%s); not checking its sampling rate", model, e)
        return
    problem = None if rate is None else sample_rate_mismatch(sample_rate, rate, model)
    if problem is not None:
        log.warning("%s; resample the audio to %s Hz or check the encoder's sample_rate", problem, rate)
