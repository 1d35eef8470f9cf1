"""Encoders: video ``[B, T, 3, H, W]`` -> ``[B, T, P, D]``; audio ``[B, S]`` -> ``[B, T, Q, D]``."""

from avmt.encoders.ast import ASTAudioEncoder
from avmt.encoders.audio import Wav2Vec2AudioEncoder
from avmt.encoders.base import AudioEncoder, Encoder, VisionEncoder
from avmt.encoders.clap import CLAPAudioEncoder
from avmt.encoders.vision import ViTVisionEncoder
from avmt.encoders.whisper import WhisperAudioEncoder

__all__ = [
    "ASTAudioEncoder",
    "AudioEncoder",
    "CLAPAudioEncoder",
    "Encoder",
    "VisionEncoder",
    "ViTVisionEncoder",
    "Wav2Vec2AudioEncoder",
    "WhisperAudioEncoder",
]
