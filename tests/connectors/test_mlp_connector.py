"""MLPConnector: lazy build, shapes, num_tokens, pooling order."""

import pytest
import torch

from avmt.connectors import MLPConnector


def test_forward_before_build_raises():
    with pytest.raises(RuntimeError, match="build"):
        MLPConnector()(torch.randn(1, 2, 16, 8))


@pytest.mark.parametrize("tokens,patches", [(4, 16), (2, 7), (1, 3)])
def test_shapes_and_num_tokens(tokens, patches):
    conn = MLPConnector(tokens_per_segment=tokens, hidden_size=32)
    conn.build(8, 24)
    out = conn(torch.randn(3, 5, patches, 8))
    assert out.shape == (3, conn.num_tokens(5), 24) == (3, 5 * tokens, 24)


def test_pooling_is_segment_major_and_local():
    torch.manual_seed(0)
    conn = MLPConnector(tokens_per_segment=2, hidden_size=16)
    conn.build(4, 6)
    x = torch.randn(1, 3, 8, 4)
    y = x.clone()
    y[0, 1, 6] += 1.0  # patch 6 of segment 1 -> pooled token 1 of segment 1 = output token 3
    diff = (conn(x) - conn(y)).abs().amax(dim=-1)[0]
    assert diff[3] > 0 and torch.all(diff[[0, 1, 2, 4, 5]] == 0)
