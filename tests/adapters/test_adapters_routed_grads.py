"""Every routed layer (I-LoRA, MoE-LoRA token and task gates) on the shared stacked path: outputs and
every gradient (x, the adapter's parameters, a trainable base) equal a per-head loop written with
plain autograd ops, in float64, for 2-D and 3-D inputs, on the fused base+down node and off it."""

import pytest
import torch
from torch import nn

from avmt.adapters import ILoRALinear, MoELoRALinear

D_IN, D_OUT, R, K, TASKS = 10, 7, 3, 4, 3

LAYERS = {
    "ilora": lambda base: ILoRALinear(base, r=R, alpha=6, num_heads=K, kernel="torch", temperature=0.8),
    "ilora_top2": lambda base: ILoRALinear(base, r=R, alpha=6, num_heads=K, kernel="torch", top_k=2),
    "moe_token": lambda base: MoELoRALinear(base, r=R, alpha=6, num_experts=K, top_k=None),
    "moe_token_top2": lambda base: MoELoRALinear(base, r=R, alpha=6, num_experts=K, top_k=2),
    "moe_task": lambda base: MoELoRALinear(base, r=R, alpha=6, num_experts=K, top_k=None, gate="task", num_tasks=TASKS),
}


def _explicit(layer, x, task_ids):
    """y = W x + b + s Σ_k w_k B_k A_k x, one head at a time, from the layer's own parameters."""
    x2 = x.reshape(-1, D_IN)
    y = x2 @ layer.base_layer.weight.T + layer.base_layer.bias
    if isinstance(layer, MoELoRALinear) and layer.gate == "task":
        per_sample = task_ids.view(-1, *([1] * (x.dim() - 2))).expand(x.shape[:-1]).reshape(-1)
        logits = layer.lora_task_gate[per_sample]
    else:
        logits = x2 @ layer.lora_router.T
    w = torch.softmax(logits / layer.temperature, dim=-1)
    if layer.top_k is not None:
        v, i = w.topk(layer.top_k, dim=-1)
        w = torch.zeros_like(w).scatter(-1, i, v / v.sum(-1, keepdim=True))
    for k in range(K):
        a_k = layer.lora_A if isinstance(layer, ILoRALinear) else layer.lora_A[k]
        y = y + layer.scaling * w[:, k : k + 1] * (x2 @ a_k.T @ layer.lora_B[k].T)
    return y.reshape(*x.shape[:-1], D_OUT)


@pytest.mark.parametrize("name", sorted(LAYERS))
@pytest.mark.parametrize("shape", [(9, D_IN), (2, 5, D_IN)])
@pytest.mark.parametrize("train_base", [False, True], ids=["frozen_base", "trainable_base"])
@pytest.mark.parametrize("hooked", [False, True], ids=["fused_node", "hooked_base"])
def test_outputs_and_gradients_equal_the_per_head_loop(name, shape, train_base, hooked):
    torch.manual_seed(0)
    base = nn.Linear(D_IN, D_OUT).double()
    layer = LAYERS[name](base).double()
    with torch.no_grad():
        layer.lora_B.normal_(0, 0.5)
        if getattr(layer, "gate", "token") == "task":
            layer.lora_task_gate.normal_(0, 1.0)
    base.requires_grad_(train_base)
    if hooked:  # a forward hook on the base makes the layer take the unfused, out-of-place path
        base.register_forward_hook(lambda module, args, out: None)
    task_ids = torch.tensor([2, 0]) if shape[0] == 2 else torch.arange(shape[0]) % TASKS
    if isinstance(layer, MoELoRALinear):
        layer.set_task_ids(task_ids)
    params = [p for p in layer.parameters() if p.requires_grad]
    assert len(params) == (5 if train_base else 3)

    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(*shape[:-1], D_OUT, dtype=torch.float64)
    y = layer(x)
    grads = torch.autograd.grad(y, [x, *params], dy)

    x_ref = x.detach().clone().requires_grad_(True)
    y_ref = _explicit(layer, x_ref, task_ids)
    grads_ref = torch.autograd.grad(y_ref, [x_ref, *params], dy)

    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    names = ["x"] + [n for n, p in layer.named_parameters() if p.requires_grad]
    for n, g, g_ref in zip(names, grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12, msg=lambda m, n=n: f"d{n}: {m}")
