"""ILoRALinear invariants: LoRA equivalence, zero-B identity, stacked = per-head sum, top-k, grads, aux, dtypes."""

import math

import pytest
import torch
from torch import nn

from avmt.adapters import ILoRALinear
from avmt.adapters.routing import cv_squared, route, router_z_loss, switch_balance_loss

D_IN, D_OUT, R = 16, 12, 4


def _layer(k=3, seed=0, dtype=torch.float32, random_b=True, **kw):
    torch.manual_seed(seed)
    base = nn.Linear(D_IN, D_OUT).to(dtype)
    layer = ILoRALinear(base, r=R, alpha=8, num_heads=k, **kw)
    if random_b:
        with torch.no_grad():
            layer.lora_B.normal_(0, 0.5)
    return layer


def _reference(layer: ILoRALinear, x: torch.Tensor) -> torch.Tensor:
    """Explicit per-head sum  y0 + s Σ_k w_k B_k A x  (fp64), with optional top-k renormalization."""
    xd = x.double().reshape(-1, D_IN)
    a, b, rt = layer.lora_A.double(), layer.lora_B.double(), layer.lora_router.double()
    base = layer.base_layer
    y0 = xd @ base.weight.double().T + base.bias.double()
    w = torch.softmax(xd @ rt.T / layer.temperature, dim=-1)
    if layer.top_k is not None:
        v, i = w.topk(layer.top_k, dim=-1)
        w = torch.zeros_like(w).scatter(-1, i, v / v.sum(-1, keepdim=True))
    z = xd @ a.T
    y = y0.clone()
    for k in range(layer.num_heads):
        y = y + layer.scaling * w[:, k : k + 1] * (z @ b[k].T)
    return y.reshape(*x.shape[:-1], D_OUT)


def test_k1_equals_peft_lora():
    from peft import LoraConfig, inject_adapter_in_model

    torch.manual_seed(0)
    holder = nn.Sequential(nn.Linear(D_IN, D_OUT))
    ref_base = nn.Linear(D_IN, D_OUT)
    ref_base.load_state_dict(holder[0].state_dict())
    inject_adapter_in_model(LoraConfig(r=R, lora_alpha=8, lora_dropout=0.0, target_modules=["0"]), holder)
    peft_layer = holder[0]
    with torch.no_grad():
        peft_layer.lora_B["default"].weight.normal_(0, 0.5)
    layer = ILoRALinear(ref_base, r=R, alpha=8, num_heads=1)
    with torch.no_grad():
        layer.lora_A.copy_(peft_layer.lora_A["default"].weight)
        layer.lora_B.copy_(peft_layer.lora_B["default"].weight.unsqueeze(0))
    x = torch.randn(3, 5, D_IN)
    torch.testing.assert_close(layer(x), peft_layer(x), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(7, D_IN), (2, 5, D_IN)])
def test_zero_b_leaves_base_output_unchanged(shape):
    layer = _layer(random_b=False)
    x = torch.randn(*shape)
    assert torch.equal(layer(x), layer.base_layer(x))


@pytest.mark.parametrize("top_k,temperature", [(None, 1.0), (2, 0.7), (1, 1.0)])
@pytest.mark.parametrize("shape", [(9, D_IN), (2, 5, D_IN)])
def test_stacked_forward_equals_per_head_sum(top_k, temperature, shape):
    layer = _layer(k=3, top_k=top_k, temperature=temperature)
    x = torch.randn(*shape)
    y = layer(x)
    assert y.shape == (*shape[:-1], D_OUT)
    torch.testing.assert_close(y.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)


def test_top_k_equal_to_k_is_dense():
    dense = _layer(k=4)
    topk = _layer(k=4, top_k=4)
    x = torch.randn(2, 6, D_IN)
    torch.testing.assert_close(topk(x), dense(x), rtol=1e-6, atol=1e-6)


def test_top_k_selects_k_heads_and_renormalizes():
    logits = torch.randn(50, 5)
    probs, w = route(logits, 1.0, 2)
    assert ((w > 0).sum(-1) == 2).all()
    torch.testing.assert_close(w.sum(-1), torch.ones(50))
    torch.testing.assert_close(probs, torch.softmax(logits, -1))


def test_every_trainable_parameter_gets_a_gradient():
    layer = _layer(k=3)
    layer.base_layer.requires_grad_(False)
    x = torch.randn(2, 5, D_IN)
    layer(x).pow(2).sum().backward()
    assert layer.base_layer.weight.grad is None
    for name in ("lora_A", "lora_router"):
        g = getattr(layer, name).grad
        assert g is not None and g.abs().sum() > 0, name
    for k in range(3):
        assert layer.lora_B.grad[k].abs().sum() > 0, f"head {k}"


def test_zero_b_gives_gradient_to_b_only():
    layer = _layer(k=2, random_b=False)
    layer(torch.randn(4, D_IN)).sum().backward()
    assert layer.lora_B.grad.abs().sum() > 0
    assert layer.lora_A.grad.abs().sum() == 0 and layer.lora_router.grad.abs().sum() == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(6, D_IN), (2, 3, D_IN)])
def test_dtypes_and_ranks(dtype, shape):
    layer = _layer(k=3, dtype=dtype)
    x = torch.randn(*shape).to(dtype)
    y = layer(x)
    assert y.dtype == dtype and y.shape == (*shape[:-1], D_OUT)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(y.double(), _reference(layer, x), rtol=tol, atol=tol)
    y.float().sum().backward()
    assert layer.lora_B.grad is not None and layer.lora_B.grad.dtype == dtype


def test_bf16_input_with_fp32_adapter_computes_in_input_dtype():
    torch.manual_seed(0)
    layer = ILoRALinear(nn.Linear(D_IN, D_OUT).bfloat16(), r=R, alpha=8, num_heads=2)
    layer.lora_A.data = layer.lora_A.data.float()  # adapter kept in fp32 (e.g. master weights)
    y = layer(torch.randn(3, D_IN, dtype=torch.bfloat16))
    assert y.dtype == torch.bfloat16


def test_dropout_path_uses_undropped_router_input():
    layer = _layer(k=3, dropout=0.5)
    x = torch.randn(4, 5, D_IN)
    layer.eval()
    y_eval = layer(x)
    torch.testing.assert_close(y_eval.double(), _reference(layer, x), rtol=1e-5, atol=1e-5)
    layer.train()
    torch.manual_seed(3)
    y_train = layer(x)
    assert not torch.allclose(y_train, y_eval)
    # the routing statistics of the train forward come from x without dropout: same weights as eval
    layer.reset_router_stats()
    layer(x)
    mean_train = layer.router_mean()
    layer.eval()
    layer.reset_router_stats()
    layer(x)
    torch.testing.assert_close(mean_train, layer.router_mean())


def test_aux_losses_uniform_vs_imbalanced():
    k = 3
    uniform = _layer(k=k, balance_coef=1.0)
    sw = _layer(k=k, switch_coef=1.0)
    zl = _layer(k=k, z_loss_coef=1.0)
    x = torch.rand(64, D_IN) + 0.1  # positive inputs: a positive router row wins every token
    for layer in (uniform, sw, zl):
        with torch.no_grad():
            layer.lora_router.zero_()
        layer(x)
    assert uniform.aux_loss().item() == pytest.approx(0.0, abs=1e-6)  # CV² of equal importances
    assert sw.aux_loss().item() == pytest.approx(1.0, abs=1e-5)  # Switch loss at its balanced value
    assert zl.aux_loss().item() == pytest.approx(math.log(k) ** 2, rel=1e-5)  # zero logits
    for layer in (uniform, sw, zl):
        with torch.no_grad():
            layer.lora_router[0].fill_(1.0)
        layer(x)
    assert uniform.aux_loss().item() > 0.5
    assert sw.aux_loss().item() > 1.5
    assert zl.aux_loss().item() > 4 * math.log(k) ** 2
    # the aux loss is differentiable w.r.t. the router
    uniform.aux_loss().backward()
    assert uniform.lora_router.grad.abs().sum() > 0


def test_aux_loss_none_without_coefficients_and_functions():
    layer = _layer()
    layer(torch.randn(3, D_IN))
    assert layer.aux_loss() is None
    assert cv_squared(torch.ones(4)).item() == 0.0
    assert cv_squared(torch.tensor([3.0])).item() == 0.0
    probs = torch.full((10, 4), 0.25)
    assert switch_balance_loss(probs).item() == pytest.approx(1.0)
    assert switch_balance_loss(probs, top_k=2).item() == pytest.approx(1.0)
    assert router_z_loss(torch.zeros(5, 4)).item() == pytest.approx(math.log(4) ** 2)


def test_router_stats_accumulate_and_reset():
    layer = _layer(k=3, top_k=2)
    assert layer.router_mean() is None
    x1, x2 = torch.randn(4, D_IN), torch.randn(2, 3, D_IN)
    layer(x1)
    layer(x2)
    _, w1 = route(x1 @ layer.lora_router.detach().T, 1.0, 2)
    _, w2 = route(x2.reshape(-1, D_IN) @ layer.lora_router.detach().T, 1.0, 2)
    expected = torch.cat([w1, w2]).mean(0)
    torch.testing.assert_close(layer.router_mean(), expected)
    assert not layer.router_mean().requires_grad
    ent = layer.router_entropy()
    assert 0 < ent.item() <= math.log(2) + 1e-6  # top-2: at most log 2 nats
    layer.reset_router_stats()
    assert layer.router_mean() is None


def test_invalid_arguments():
    base = nn.Linear(4, 4)
    with pytest.raises(ValueError, match="auto|triton|torch"):
        ILoRALinear(base, 2, 4, 2, kernel="cuda")
    with pytest.raises(ValueError, match="top_k"):
        ILoRALinear(base, 2, 4, 2, top_k=3)
    with pytest.raises(ValueError, match="num_heads"):
        ILoRALinear(base, 2, 4, 0)
    with pytest.raises(TypeError):
        ILoRALinear(nn.Conv1d(4, 4, 1), 2, 4, 2)


def test_autocast_bf16_with_fp32_layer():
    layer = _layer(k=3)
    x = torch.randn(2, 4, D_IN)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = layer(x)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), _reference(layer, x), rtol=5e-2, atol=5e-2)
