"""Heads: LLM hidden states at a special token + encoder features -> dense predictions."""

from avmt.heads.base import Head
from avmt.heads.mask_decoder import MaskDecoderHead

__all__ = ["Head", "MaskDecoderHead"]
