"""Heads: LLM hidden states at a special token + encoder features -> dense predictions."""

from avmt.heads.base import Head
from avmt.heads.crab_mask_decoder import CrabMaskDecoderHead
from avmt.heads.mask_decoder import MaskCollaborationHead, MaskDecoderHead

__all__ = ["CrabMaskDecoderHead", "Head", "MaskCollaborationHead", "MaskDecoderHead"]
