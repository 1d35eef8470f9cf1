"""InstructQFormerConnector: the queries read the prompt (InstructBLIP); padding and absence behave."""

import torch

from avmt.connectors import Instruction, InstructQFormerConnector, QFormerConnector


def _built(**kwargs) -> InstructQFormerConnector:
    torch.manual_seed(0)
    conn = InstructQFormerConnector(num_queries=2, hidden_size=32, num_layers=2, num_heads=2,
                                    intermediate_size=64, **kwargs)
    conn.build(48, 96)
    return conn.eval()


def _instruction(rows: int, length: int, seed: int) -> Instruction:
    generator = torch.Generator().manual_seed(seed)
    return Instruction(torch.randn(rows, length, 96, generator=generator), torch.ones(rows, length, dtype=torch.bool))


def test_shapes_and_the_prompt_changes_the_tokens():
    conn = _built()
    x = torch.randn(2, 3, 16, 48)
    a, b = conn(x, _instruction(2, 5, 0)), conn(x, _instruction(2, 5, 1))
    assert a.shape == b.shape == (2, conn.num_tokens(3), 96)
    assert (a - b).abs().max() > 1e-3


def test_padding_of_the_prompt_is_ignored():
    conn = _built()
    x = torch.randn(1, 3, 16, 48)
    short = _instruction(1, 4, 0)
    padded = Instruction(torch.cat([short.embeds, torch.randn(1, 3, 96)], dim=1),
                         torch.cat([short.mask, torch.zeros(1, 3, dtype=torch.bool)], dim=1))
    torch.testing.assert_close(conn(x, short), conn(x, padded))


def test_each_row_reads_its_own_prompt_and_each_segment_its_own_features():
    conn = _built()
    x = torch.randn(2, 3, 16, 48)
    first = _instruction(2, 4, 0)
    second = Instruction(first.embeds.clone(), first.mask)
    second.embeds[1] = torch.randn(4, 96)
    a, b = conn(x, first).view(2, 3, 2, 96), conn(x, second).view(2, 3, 2, 96)
    torch.testing.assert_close(a[0], b[0])
    assert (a[1] - b[1]).abs().max() > 1e-3
    y = x.clone()
    y[:, 1] = torch.randn(2, 16, 48)
    c = conn(y, first).view(2, 3, 2, 96)
    torch.testing.assert_close(a[:, [0, 2]], c[:, [0, 2]])


def test_without_a_prompt_it_is_a_q_former_and_every_parameter_learns_with_one():
    conn = _built()
    plain = QFormerConnector(num_queries=2, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    plain.build(48, 96)
    plain.load_state_dict({k: v for k, v in conn.state_dict().items() if k in plain.state_dict()})
    x = torch.randn(2, 3, 16, 48)
    torch.testing.assert_close(conn(x), plain.eval()(x))
    conn.train()
    conn(x, _instruction(2, 4, 0)).square().mean().backward()
    missing = [name for name, p in conn.named_parameters() if p.requires_grad and not (p.grad is not None and p.grad.abs().sum() > 0)]
    assert not missing
    frozen = [name for name, p in conn.named_parameters() if not p.requires_grad]
    assert frozen and all(name.startswith("qformer.encoder.layer.1.") for name in frozen), frozen
