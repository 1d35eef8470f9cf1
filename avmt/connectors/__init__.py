"""Connectors: ``[B, T, P, D_enc]`` -> ``[B, N_tokens, D_llm]``, built lazily by ``build(in_dim, out_dim)``.
"""

from avmt.connectors.audio_guided_spatial import AudioGuidedSpatialConnector
from avmt.connectors.av_integration import AVIntegrationAudioConnector, AVIntegrationConnector
from avmt.connectors.base import Connector, Instruction
from avmt.connectors.direct import DirectConnector
from avmt.connectors.instruct_qformer import InstructQFormerConnector
from avmt.connectors.mlp import MLPConnector
from avmt.connectors.multiscale_temporal import MultiScaleTemporalConnector
from avmt.connectors.qformer import QFormerConnector

__all__ = ["AudioGuidedSpatialConnector", "MultiScaleTemporalConnector", "AVIntegrationAudioConnector", "AVIntegrationConnector", "Connector", "DirectConnector", "InstructQFormerConnector", "Instruction", "MLPConnector", "QFormerConnector"]
