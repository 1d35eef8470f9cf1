"""MoELoRALinear / MoELoRA invariants: zero B, explicit expert sum, gradients, 2-D/3-D, task gate."""

import pytest
import torch
from torch import nn

from avmt.adapters import MoELoRA, MoELoRALinear

D_IN, D_OUT, R, K = 16, 12, 4, 4


def _layer(seed=0, random_b=True, **kw):
    torch.manual_seed(seed)
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT), r=R, alpha=8, num_experts=K, **kw)
    if random_b:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
            if layer.gate == "task":
                layer.lora_task_gate.normal_(0, 1.0)
    return layer


def _reference(layer, x, logits):
    xd = x.double().reshape(-1, D_IN)
    y = xd @ layer.base_layer.weight.double().T + layer.base_layer.bias.double()
    w = torch.softmax(logits.double() / layer.temperature, -1)
    if layer.top_k is not None:
        v, i = w.topk(layer.top_k, -1)
        w = torch.zeros_like(w).scatter(-1, i, v / v.sum(-1, keepdim=True))
    for k in range(K):
        y = y + layer.scaling * w[:, k : k + 1] * (xd @ layer.lora_A[k].double().T @ layer.lora_B[k].double().T)
    return y.reshape(*x.shape[:-1], D_OUT)


@pytest.mark.parametrize("shape", [(7, D_IN), (2, 5, D_IN)])
def test_zero_b_leaves_base_output_unchanged(shape):
    layer = _layer(random_b=False)
    x = torch.randn(*shape)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("top_k", [None, 2, 1])
@pytest.mark.parametrize("shape", [(9, D_IN), (2, 5, D_IN)])
def test_token_gate_equals_explicit_expert_sum(top_k, shape):
    layer = _layer(top_k=top_k)
    x = torch.randn(*shape)
    y = layer(x)
    logits = x.reshape(-1, D_IN).double() @ layer.lora_router.double().T
    torch.testing.assert_close(y.double(), _reference(layer, x, logits), rtol=1e-5, atol=1e-5)


def test_token_gate_gradients_and_balance_loss():
    layer = _layer(top_k=2)  # default switch_coef = 0.001 (MixLoRA)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(3, 8, D_IN)
    y = layer(x)
    aux = layer.aux_loss()
    assert aux is not None and aux.item() > 0
    (y.pow(2).sum() + aux).backward()
    assert layer.lora_router.grad.abs().sum() > 0
    assert all(layer.lora_A.grad[k].abs().sum() > 0 for k in range(K))
    assert all(layer.lora_B.grad[k].abs().sum() > 0 for k in range(K))


def test_switch_loss_uniform_vs_imbalanced():
    layer = _layer(top_k=2, switch_coef=1.0)
    x = torch.rand(64, D_IN) + 0.1
    with torch.no_grad():
        layer.lora_router.zero_()
    layer(x)
    assert layer.aux_loss().item() == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        layer.lora_router[1].fill_(1.0)
        layer.lora_router[2].fill_(0.8)
    layer(x)
    assert layer.aux_loss().item() > 1.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dtypes(dtype):
    torch.manual_seed(0)
    layer = MoELoRALinear(nn.Linear(D_IN, D_OUT).to(dtype), r=R, alpha=8, num_experts=K)
    y = layer(torch.randn(2, 3, D_IN, dtype=dtype))
    assert y.dtype == dtype and y.shape == (2, 3, D_OUT)


def test_task_gate_per_sample_and_per_token():
    layer = _layer(gate="task", num_tasks=3, top_k=None)
    x = torch.randn(2, 5, D_IN)
    with pytest.raises(RuntimeError, match="set_task_ids"):
        layer(x)
    ids = torch.tensor([2, 0])
    layer.set_task_ids(ids)
    y = layer(x)
    logits = layer.lora_task_gate[ids].repeat_interleave(5, dim=0)
    torch.testing.assert_close(y.double(), _reference(layer, x, logits), rtol=1e-5, atol=1e-5)
    # the gate depends only on the task: same tokens, other task -> other output
    layer.set_task_ids(torch.tensor([1, 0]))
    y2 = layer(x)
    assert not torch.allclose(y2[0], y[0]) and torch.allclose(y2[1], y[1])
    # per-token ids for a 2-D input, and a size mismatch
    x2 = torch.randn(4, D_IN)
    layer.set_task_ids(torch.tensor([0, 1, 2, 0]))
    assert layer(x2).shape == (4, D_OUT)
    layer.set_task_ids(torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="task ids"):
        layer(x2)


def test_task_gate_gradients():
    layer = _layer(gate="task", num_tasks=3, top_k=None)
    layer.set_task_ids(torch.tensor([0, 2]))
    layer(torch.randn(2, 3, D_IN)).pow(2).sum().backward()
    g = layer.lora_task_gate.grad
    assert g[0].abs().sum() > 0 and g[2].abs().sum() > 0 and g[1].abs().sum() == 0
    assert all(layer.lora_B.grad[k].abs().sum() > 0 for k in range(K))


def test_moe_adapter_task_ids_on_the_model(make_llama, tokens):
    model = make_llama()
    adapter = MoELoRA(target_modules=["v_proj", "up_proj"], r=2, alpha=4, num_experts=3, gate="task", num_tasks=4)
    assert adapter.num_tasks == 4
    adapter.apply({"llm": model})
    with torch.no_grad():
        for layer in adapter.injected().values():
            layer.lora_B.normal_(0, 0.5)
            layer.lora_task_gate.normal_(0, 1.0)
    adapter.set_task_ids(torch.tensor([1, 3]))
    out_a = model(tokens).logits
    adapter.set_task_ids(torch.tensor([2, 3]))
    out_b = model(tokens).logits
    assert not torch.allclose(out_a[0], out_b[0]) and torch.allclose(out_a[1], out_b[1])
    stats = adapter.router_stats()
    assert len(stats) == 4 and all(v.shape == (3,) for v in stats.values())
    with pytest.raises(ValueError, match="num_tasks"):
        adapter.set_task_ids(torch.tensor([0, 4]))
    with pytest.raises(TypeError):
        adapter.set_task_ids(torch.tensor([0.0, 1.0]))


def test_invalid_moe_configs():
    with pytest.raises(ValueError, match="num_tasks"):
        MoELoRA(gate="task")
    with pytest.raises(ValueError, match="token|task"):
        MoELoRA(gate="sample")
    with pytest.raises(ValueError, match="top_k"):
        MoELoRA(num_experts=2, top_k=3)
