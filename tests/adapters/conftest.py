"""Shared fixtures of the adapter tests: a tiny random Llama (no download)."""

import pytest
import torch


def _tiny_llama_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=61,
        hidden_size=32,
        intermediate_size=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )


@pytest.fixture
def make_llama():
    """Factory: a tiny LlamaForCausalLM in eval mode, random init from ``seed``."""
    from transformers import LlamaForCausalLM

    def make(seed: int = 0):
        torch.manual_seed(seed)
        return LlamaForCausalLM(_tiny_llama_config()).eval()

    return make


@pytest.fixture
def tokens():
    """A batch of token ids [2, 7]."""
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 61, (2, 7), generator=g)


LLAMA_LINEARS = [
    f"model.layers.{i}.{m}"
    for i in range(2)
    for m in (
        "self_attn.q_proj",
        "self_attn.k_proj",
        "self_attn.v_proj",
        "self_attn.o_proj",
        "mlp.gate_proj",
        "mlp.up_proj",
        "mlp.down_proj",
    )
]


@pytest.fixture
def llama_linears():
    """Qualified names of the 14 projection linears of the tiny Llama (lm_head excluded)."""
    return list(LLAMA_LINEARS)
