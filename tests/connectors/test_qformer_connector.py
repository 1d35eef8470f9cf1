"""QFormerConnector: lazy build, shapes, num_tokens, per-segment independence."""

import pytest
import torch

from avmt.connectors import Connector, QFormerConnector


def _built(**kwargs) -> QFormerConnector:
    torch.manual_seed(0)
    conn = QFormerConnector(**kwargs)
    conn.build(48, 96)
    return conn.eval()


def test_forward_before_build_raises():
    conn = QFormerConnector()
    assert isinstance(conn, Connector) and not conn.built
    with pytest.raises(RuntimeError, match="build"):
        conn(torch.randn(1, 2, 16, 48))


def test_shapes_and_num_tokens():
    conn = _built(num_queries=3)
    for t in (1, 5):
        out = conn(torch.randn(2, t, 16, 48))
        assert out.shape == (2, conn.num_tokens(t), 96) == (2, 3 * t, 96)
    with pytest.raises(ValueError):
        conn(torch.randn(2, 5, 16, 32))  # wrong D_enc


def test_build_is_idempotent_and_checked():
    conn = _built()
    n = sum(p.numel() for p in conn.parameters())
    conn.build(48, 96)
    assert sum(p.numel() for p in conn.parameters()) == n
    with pytest.raises(RuntimeError):
        conn.build(64, 96)


def test_segment_t_only_affects_its_tokens():
    conn = _built(num_queries=4, cross_attention_frequency=2)
    x = torch.randn(2, 4, 16, 48)
    y = x.clone()
    y[:, 2] = torch.randn(2, 16, 48)
    a, b = conn(x).view(2, 4, 4, 96), conn(y).view(2, 4, 4, 96)
    for t in (0, 1, 3):
        torch.testing.assert_close(a[:, t], b[:, t])
    assert (a[:, 2] - b[:, 2]).abs().max() > 1e-4


def test_gradients_reach_queries_and_input():
    conn = _built()
    conn.train()
    x = torch.randn(1, 2, 16, 48, requires_grad=True)
    conn(x).square().mean().backward()
    assert conn.queries.grad is not None and conn.queries.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
