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

import torch
import torch.nn.functional as F

from avmt.encoders.base import AudioEncoder, torch_dtype

log = logging.getLogger(__name__)


class Wav2Vec2AudioEncoder(AudioEncoder):
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

    SpecAugment-style masking and layer-drop are switched off: the backbone is a feature
    extractor here.
    """

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
    ) -> None:
        super().__init__()
        if tokens_per_segment < 1:
            raise ValueError(f"tokens_per_segment must be >= 1, got {tokens_per_segment}")
        self.model_name = model
        self.sample_rate = int(sample_rate)
        self.tokens_per_segment = int(tokens_per_segment)
        self.normalize = bool(normalize)
        if model is None:
            from transformers import Wav2Vec2Config, Wav2Vec2Model

            if hidden_size % num_heads != 0:
                raise ValueError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
            groups = math.gcd(hidden_size, 4)
            config = Wav2Vec2Config(
                hidden_size=hidden_size,
                num_hidden_layers=num_layers,
                num_attention_heads=num_heads,
                intermediate_size=2 * hidden_size,
                conv_dim=(conv_dim,) * 7,
                conv_stride=(5, 2, 2, 2, 2, 2, 2),
                conv_kernel=(10, 3, 3, 3, 3, 2, 2),
                num_conv_pos_embeddings=16,
                num_conv_pos_embedding_groups=groups,
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
            self.pretrained = False
        else:
            from transformers import AutoModel

            try:
                self.backbone = AutoModel.from_pretrained(model, dtype=torch_dtype(dtype))
            except OSError as e:
                raise OSError(
                    f"could not load the audio encoder {model!r} (a hub id or a local directory with a "
                    f"transformers checkpoint is expected; set init_args.model: null for the tiny "
                    f"offline one): {e}"
                ) from e
            cfg = self.backbone.config
            for name, value in (("apply_spec_augment", False), ("mask_time_prob", 0.0), ("layerdrop", 0.0)):
                if hasattr(cfg, name):
                    setattr(cfg, name, value)
            self.pretrained = True
            _check_sample_rate(model, self.sample_rate)
        self._apply_freeze(freeze)

    @property
    def output_dim(self) -> int:
        """Feature width D."""
        return int(self.backbone.config.hidden_size)

    def num_frames(self, window: int) -> int:
        """Backbone frames produced for a window of ``window`` samples."""
        fn = getattr(self.backbone, "_get_feat_extract_output_lengths", None)
        if fn is not None:
            return int(fn(torch.tensor(window)).item())
        length = window
        for k, s in zip(self.backbone.config.conv_kernel, self.backbone.config.conv_stride):
            length = (length - k) // s + 1
        return length

    def forward(self, audio: torch.Tensor, num_segments: int, sample_rate: int | None = None) -> torch.Tensor:
        """Encode the waveform window by window.

        Args:
            audio: ``[B, S]`` float waveform at ``self.sample_rate`` (mono).
            num_segments: T, the number of video segments; the waveform is split into T windows
                of ``S // T`` samples (a remainder of fewer than T samples at the end is dropped).
            sample_rate: rate of ``audio`` when known; must equal ``self.sample_rate``.
        Returns:
            ``[B, T, Q, D]`` features, ``Q = tokens_per_segment``, ``D = output_dim``.
        """
        if audio.dim() != 2:
            raise ValueError(f"audio must be [B, S], got shape {tuple(audio.shape)}")
        if sample_rate is not None and int(sample_rate) != self.sample_rate:
            raise ValueError(
                f"audio at {sample_rate} Hz but the audio encoder expects {self.sample_rate} Hz; "
                f"resample when converting the data (or set the encoder's sample_rate)"
            )
        t = int(num_segments)
        if t < 1:
            raise ValueError(f"num_segments must be >= 1, got {num_segments}")
        b, s = audio.shape
        window = s // t
        if self.num_frames(window) < 1:
            raise ValueError(
                f"audio windows of {window} samples ({s} samples / {t} segments) are shorter than the "
                f"audio encoder's receptive field"
            )
        x = audio.float()
        if self.normalize:
            std = torch.sqrt(x.var(dim=1, keepdim=True, unbiased=False) + 1e-7)
            x = (x - x.mean(dim=1, keepdim=True)) / std
        x = x[:, : window * t].reshape(b * t, window).to(self.dtype)
        hidden = self.backbone(input_values=x).last_hidden_state  # [B*T, frames, D]
        pooled = F.adaptive_avg_pool1d(hidden.transpose(1, 2).float(), self.tokens_per_segment)
        pooled = pooled.transpose(1, 2).to(hidden.dtype)  # [B*T, Q, D]
        return pooled.reshape(b, t, self.tokens_per_segment, hidden.shape[-1])


def _check_sample_rate(model: str, sample_rate: int) -> None:
    """Warn when the checkpoint's feature extractor declares another sampling rate."""
    try:
        from transformers import AutoFeatureExtractor

        fe = AutoFeatureExtractor.from_pretrained(model)
        rate = getattr(fe, "sampling_rate", None)
    except Exception as e:  # noqa: BLE001 - the check is advisory
        log.info("no feature extractor for %s (%s); not checking its sampling rate", model, e)
        return
    if rate is not None and int(rate) != sample_rate:
        log.warning("%s was trained on %s Hz audio but sample_rate=%s", model, rate, sample_rate)
