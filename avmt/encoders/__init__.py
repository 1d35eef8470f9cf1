"""Encoders: video ``[B, T, 3, H, W]`` -> ``[B, T, P, D]``; audio ``[B, S]`` -> ``[B, T, Q, D]``."""

from avmt.encoders.audio import Wav2Vec2AudioEncoder
from avmt.encoders.base import AudioEncoder, Encoder, VisionEncoder
from avmt.encoders.vision import ViTVisionEncoder

__all__ = ["AudioEncoder", "Encoder", "VisionEncoder", "ViTVisionEncoder", "Wav2Vec2AudioEncoder"]
